//! The outbox from end to end, against a local Postgres and RabbitMQ:
//! `cargo run -p outbox --example quickstart`.
//!
//! It creates the database if it is missing, applies the outbox's tables, writes
//! a note and its event in one transaction, lets the relay publish the event and
//! reads the message back from a queue. Every step is idempotent: run it again.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox::amqp::redact;
use outbox::metrics::RelayMetrics;
use outbox::rabbitmq::RabbitMq;
use outbox::relay::{Relay, RelayConfig};
use serde::Serialize;
use sqlx::migrate::MigrateDatabase;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EXCHANGE: &str = "quickstart";
const QUEUE: &str = "quickstart.notes";
/// How long the relay may take to get the event confirmed.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The event. Its JSON is the message body; its routing key is `note.NoteAdded`.
#[derive(Serialize)]
struct NoteAdded {
    note_id: Uuid,
    text: String,
}

impl outbox::Event for NoteAdded {
    const AGGREGATE_TYPE: &'static str = "note";
    const EVENT_TYPE: &'static str = "NoteAdded";

    fn aggregate_id(&self) -> String {
        self.note_id.to_string()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url =
        env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/outbox_quickstart");
    let amqp_url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");

    // 1. The database and the tables: the outbox's, then the application's own.
    let exists = Postgres::database_exists(&database_url)
        .await
        .with_context(|| format!("cannot reach Postgres at {}", redact(&database_url)))?;
    if !exists {
        Postgres::create_database(&database_url).await.context("cannot create the database")?;
    }
    println!("database: {} ({})", redact(&database_url), if exists { "exists" } else { "created" });
    let db = PgPool::connect(&database_url).await.context("cannot connect to the database")?;
    outbox::MIGRATOR.run(&db).await.context("cannot apply the outbox's migrations")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS quickstart_notes (
             id UUID PRIMARY KEY,
             text TEXT NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .execute(&db)
    .await?;
    println!("tables: outbox, processed_messages, quickstart_notes");

    // 2. A note and its event in one transaction: both are committed, or neither.
    let note = NoteAdded { note_id: Uuid::now_v7(), text: "hello, outbox".to_owned() };
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO quickstart_notes (id, text) VALUES ($1, $2)")
        .bind(note.note_id)
        .bind(&note.text)
        .execute(&mut *tx)
        .await?;
    let message_id = outbox::enqueue(&mut tx, &note).await?;
    tx.commit().await?;
    let committed = Instant::now();
    println!("enqueued: event {message_id} for note {}", note.note_id);

    // 3. The relay. Its topology hook declares our queue, bound to the event's
    //    routing key, before anything is published: the event is routed to it.
    let transport = RabbitMq::new(amqp_url.clone(), EXCHANGE).with_topology(|channel| {
        Box::pin(async move {
            let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
            channel.queue_declare(QUEUE.into(), durable, FieldTable::default()).await?;
            channel
                .queue_bind(
                    QUEUE.into(),
                    EXCHANGE.into(),
                    "note.NoteAdded".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok(())
        })
    });
    let shutdown = CancellationToken::new();
    let relay = Relay::spawn(
        db.clone(),
        transport,
        RelayConfig::default(),
        RelayMetrics::default(),
        shutdown.clone(),
    )?;

    // 4. The relay deletes the event's row once RabbitMQ confirmed the message.
    loop {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, last_error FROM outbox WHERE id = $1")
                .bind(message_id)
                .fetch_optional(&db)
                .await?;
        match row {
            None => break,
            Some((state, error)) if state == "dead" => {
                bail!("the relay gave up on event {message_id}: {}", error.unwrap_or_default())
            }
            Some(_) if committed.elapsed() > TIMEOUT => bail!(
                "event {message_id} is still in the outbox after {TIMEOUT:?}: \
                 is RabbitMQ running at {}?",
                redact(&amqp_url)
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    println!("confirmed: by RabbitMQ {} ms after the commit", committed.elapsed().as_millis());

    // 5. Read it back, as a consumer would. Messages left by an earlier run that
    //    stopped half way are taken off the queue and skipped.
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", redact(&amqp_url)))?;
    let channel = connection.create_channel().await?;
    let expected = message_id.to_string();
    let message = loop {
        let got = channel.basic_get(QUEUE.into(), BasicGetOptions { no_ack: true }).await?;
        let Some(message) = got else { bail!("event {message_id} is not in the queue {QUEUE}") };
        let id = message.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
        if id.as_deref() == Some(expected.as_str()) {
            break message;
        }
        println!("skipped: message {} from an earlier run", id.unwrap_or_default());
    };
    println!("received: message {expected}, routing key {}", message.routing_key.as_str());
    connection.close(200, "done".into()).await?;

    // 6. Stop the relay: each worker finishes or rolls back its batch.
    shutdown.cancel();
    relay.join().await;
    println!("stopped: the relay");
    Ok(())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}
