//! A worker: one AMQP channel consuming the inventory queue, applying what arrives
//! in batches and settling each batch only after its transaction committed.
//!
//! Per batch: decode every delivery (poison is set aside), apply the rest in ONE
//! transaction ([`apply_batch`]), commit, then reject the poison without requeue
//! (the broker dead-letters it) and ack the rest with a single `multiple` ack.
//! A crash anywhere before the ack leaves the messages unacked, so the broker
//! redelivers them, and `processed_messages` turns the redelivery into a no-op.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use outbox::amqp::{ConsumerQueue, TopologyError, TopologyStatus};
use outbox::backoff::Backoff;
use outbox::supervisor::{CountGuard, CrashSwitch};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::apply::{Outcome, apply_batch};
use crate::message::{Message, decode};
use crate::metrics::ConsumerMetrics;

/// What every worker needs to know.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: ConsumerQueue,
    pub consumer_name: String,
    pub prefetch: u16,
    pub batch_size: usize,
    /// Test hook: armed, it makes a worker panic with a batch in hand.
    pub crash_switch: CrashSwitch,
}

#[derive(Clone)]
pub struct Worker {
    pub name: String,
    pub db: PgPool,
    pub config: Arc<WorkerConfig>,
    pub metrics: ConsumerMetrics,
    /// Workers currently consuming, each counted by a [`CountGuard`] (so a panic
    /// cannot leave the count wrong); `/readyz` reports the broker up while > 0.
    pub connected: Arc<AtomicUsize>,
    /// A queue that exists with other arguments, reported by `/readyz`.
    pub topology: TopologyStatus,
    pub shutdown: CancellationToken,
}

/// An open channel with its consumer.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

impl Worker {
    /// Consumes until shutdown, reconnecting whenever the broker goes away.
    pub async fn run(self) {
        let mut trouble = Backoff::new();
        while !self.shutdown.is_cancelled() {
            match self.open().await {
                Ok(session) => {
                    trouble.reset();
                    self.topology.set(None);
                    tracing::info!(worker = %self.name, queue = %self.config.topology.queue,
                        "consuming");
                    let consuming = CountGuard::new(&self.connected);
                    let result = self.consume(&session).await;
                    drop(consuming);
                    self.close(session).await;
                    if let Err(error) = result {
                        tracing::warn!(worker = %self.name, error = format!("{error:#}"),
                            "lost the broker; reconnecting");
                    }
                }
                Err(error) => match error.downcast_ref::<TopologyError>() {
                    Some(mismatch @ TopologyError::Mismatch { .. }) => {
                        // Not transient: said loudly, retried calmly, shown by /readyz.
                        tracing::error!(worker = %self.name, error = %mismatch,
                            "the broker's queue does not match this service's settings");
                        self.topology.set(Some(mismatch.to_string()));
                    }
                    _ => {
                        tracing::warn!(worker = %self.name, error = format!("{error:#}"),
                            "cannot consume from the broker; retrying");
                    }
                },
            }
            tokio::select! {
                () = tokio::time::sleep(trouble.next_pause()) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
        tracing::info!(worker = %self.name, "worker stopped");
    }

    async fn open(&self) -> anyhow::Result<Session> {
        let config = &self.config;
        let connection = outbox::amqp::connect(&config.amqp_url, &self.name)
            .await
            .context("cannot connect to RabbitMQ")?;
        let channel = connection.create_channel().await.context("cannot open a channel")?;
        config.topology.declare(&channel).await.context("cannot declare the topology")?;
        // The prefetch bounds what this worker holds unacked: enough to fill a
        // batch while the previous one commits, little enough to bound memory and
        // what a crash hands back for redelivery.
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .context("cannot set the prefetch")?;
        let consumer = channel
            .basic_consume(
                config.topology.queue.as_str().into(),
                format!("{}-{}", self.name, std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot start consuming")?;
        Ok(Session { connection, channel, consumer })
    }

    /// Returns `Ok` on shutdown, an error when the channel fails.
    async fn consume(&self, session: &Session) -> anyhow::Result<()> {
        // `ready_chunks` yields what has already arrived, up to a batch: a lone
        // message is applied at once, a backlog in full batches.
        let mut batches = session.consumer.clone().ready_chunks(self.config.batch_size);
        loop {
            let batch = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(()),
                batch = batches.next() => batch,
            };
            let batch = batch.context("the broker cancelled the consumer")?;
            let deliveries: Vec<Delivery> =
                batch.into_iter().collect::<Result<_, _>>().context("the channel failed")?;
            // Once a batch is taken it is finished, even during shutdown.
            if !self.handle(&session.channel, deliveries).await? {
                return Ok(());
            }
        }
    }

    /// Applies and settles one batch. `Ok(false)`: shutdown came while the
    /// database was down; the batch stays unacked and will be redelivered.
    async fn handle(&self, channel: &Channel, deliveries: Vec<Delivery>) -> anyhow::Result<bool> {
        // A panic here drops the session, whose connection closes: the broker
        // redelivers the batch to the restarted worker or another one.
        self.config.crash_switch.check(&self.name);
        let mut messages = Vec::with_capacity(deliveries.len());
        let mut message_tags = Vec::with_capacity(deliveries.len());
        let mut poison = Vec::new();
        for delivery in &deliveries {
            match decode(delivery) {
                Ok(message) => {
                    messages.push(message);
                    message_tags.push(delivery.delivery_tag);
                }
                Err(reason) => poison.push((delivery.delivery_tag, message_id(delivery), reason)),
            }
        }

        let Some(outcomes) = self.apply_until_done(&messages).await else {
            return Ok(false);
        };
        self.metrics.batch_size.observe(messages.len() as f64);

        let mut last_ack = None;
        for ((message, tag), outcome) in messages.iter().zip(message_tags).zip(&outcomes) {
            if *outcome == Outcome::UnknownOrder {
                let reason = format!("order {} does not exist", message.event.order_id);
                poison.push((tag, message.id.to_string(), reason));
            } else if let Outcome::Refused(reason) = outcome {
                poison.push((tag, message.id.to_string(), reason.clone()));
            } else {
                self.metrics.record(outcome.label());
                last_ack = Some(tag);
            }
        }
        // Reject before the ack: an ack with `multiple` settles every earlier
        // delivery on the channel, the poison ones included.
        for (tag, message_id, reason) in poison {
            tracing::warn!(worker = %self.name, message_id, reason,
                "poison message rejected to the dead-letter queue");
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: false })
                .await
                .context("cannot reject a poison message")?;
            self.metrics.record("poison");
        }
        if let Some(tag) = last_ack {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .context("cannot ack the batch")?;
        }
        tracing::debug!(worker = %self.name, batch = deliveries.len(), "batch settled");
        Ok(true)
    }

    /// Applies `messages`, retrying database failures with a growing pause: an
    /// outage is transient, so nothing is acked or dead-lettered meanwhile. When
    /// the database refuses the batch's data (not transient), the messages are
    /// applied one by one so that only the refused one is poison
    /// ([`Outcome::Refused`]). `None` when shutdown interrupts the retries.
    async fn apply_until_done(&self, messages: &[Message]) -> Option<Vec<Outcome>> {
        if messages.is_empty() {
            return Some(Vec::new());
        }
        match self.apply_retrying(messages).await? {
            Ok(outcomes) => return Some(outcomes),
            Err(reason) => tracing::warn!(worker = %self.name, reason,
                "the database refused a batch's data; applying its messages one by one"),
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            outcomes.push(match self.apply_retrying(std::slice::from_ref(message)).await? {
                Ok(mut one) => one.remove(0),
                Err(reason) => Outcome::Refused(reason),
            });
        }
        Some(outcomes)
    }

    /// Applies `messages` in one transaction until it commits or the database
    /// refuses their data (`Err` with its reason); other failures are retried.
    async fn apply_retrying(&self, messages: &[Message]) -> Option<Result<Vec<Outcome>, String>> {
        let mut trouble = Backoff::new();
        loop {
            let error = match self.apply(messages).await {
                Ok(outcomes) => return Some(Ok(outcomes)),
                Err(error) => error,
            };
            if let Some(reason) = data_error(&error) {
                return Some(Err(reason));
            }
            self.metrics.retries.inc();
            let retry_in = trouble.next_pause();
            tracing::warn!(worker = %self.name, error = format!("{error:#}"),
                retry_in_ms = retry_in.as_millis() as u64, "cannot apply a batch; retrying");
            tokio::select! {
                () = tokio::time::sleep(retry_in) => {}
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    async fn apply(&self, messages: &[Message]) -> anyhow::Result<Vec<Outcome>> {
        let mut tx = self.db.begin().await.context("cannot begin a transaction")?;
        let outcomes = apply_batch(&mut tx, &self.config.consumer_name, messages)
            .await
            .context("cannot apply the batch")?;
        tx.commit().await.context("cannot commit the batch")?;
        Ok(outcomes)
    }

    /// Stops consuming; deliveries received but not acked go back to the queue.
    async fn close(&self, session: Session) {
        let Session { connection, channel, consumer } = session;
        if channel.status().connected() {
            let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
            let _ = channel.close(200, "consumer stopping".into()).await;
        }
        if connection.status().connected() {
            let _ = connection.close(200, "consumer stopping".into()).await;
        }
    }
}

/// The database's reason when `error` is a data exception (SQLSTATE class 22:
/// a value it cannot take, whatever the retry), else `None`.
fn data_error(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(database))
            if database.code().is_some_and(|code| code.starts_with("22")) =>
        {
            Some(format!("the database refused its data: {}", database.message()))
        }
        _ => None,
    })
}

/// The message id as sent, for logs (poison may carry none, or a bad one).
fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "<none>".to_owned(), |id| id.as_str().to_owned())
}
