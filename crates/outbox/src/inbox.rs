//! The consumer side of exactly-once effect: remember which messages were applied,
//! in the same transaction as their effect.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Records that `consumer` applies the messages `ids` in `tx`, and returns the ids
/// that were NOT seen before: only those may have an effect. A duplicate (already
/// committed, or repeated within `ids`) is left out.
///
/// A concurrent transaction recording the same id makes this one wait until it
/// ends, so two deliveries of one message can never both be "new".
pub async fn claim_new(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    ids: &[Uuid],
) -> crate::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "INSERT INTO processed_messages (consumer, message_id)
         SELECT $1, id FROM unnest($2::uuid[]) AS t(id)
         ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind(consumer)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(Into::into)
}

/// Forgets, in `tx`, that `consumer` applies the messages `ids`, which
/// [`claim_new`] recorded in this transaction: a message whose effect has to
/// wait (its predecessor not applied yet) takes effect when it comes again.
pub async fn forget(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    ids: &[Uuid],
) -> crate::Result<()> {
    sqlx::query("DELETE FROM processed_messages WHERE consumer = $1 AND message_id = ANY($2)")
        .bind(consumer)
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
