//! Wake-ups for the relay workers: a `LISTEN` on the outbox channel turns each
//! committed insert into a wake-up, so an event is normally published within
//! milliseconds of its commit rather than at the next poll.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::NOTIFY_CHANNEL;

/// Listens until `shutdown`, waking every waiting worker on each notification.
/// The workers also poll, so a lost connection delays events but never loses them.
pub async fn run(db: PgPool, wakeup: Arc<Notify>, shutdown: CancellationToken) {
    let mut retry_in = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match listen(&db, &wakeup, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(error = %error, retry_in_ms = retry_in.as_millis() as u64,
                    "outbox listener lost its connection; workers fall back to polling");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(retry_in) => {}
        }
        retry_in = (retry_in * 2).min(Duration::from_secs(10));
    }
}

async fn listen(db: &PgPool, wakeup: &Notify, shutdown: &CancellationToken) -> sqlx::Result<()> {
    // Holds one of the pool's connections for as long as it listens.
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    // Anything committed while nobody listened is found by this wake-up.
    wakeup.notify_waiters();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            notification = listener.try_recv() => {
                // `None`: the connection dropped and sqlx reconnects on the next call;
                // notifications may have been missed, so wake the workers either way.
                notification?;
                wakeup.notify_waiters();
            }
        }
    }
}
