//! A worker: one AMQP channel consuming the inventory queue, applying what arrives
//! in batches and settling each batch only after its transaction committed.
//!
//! Per batch: decode every delivery (poison is set aside), apply the rest in ONE
//! transaction ([`apply_batch`]), commit, then dead-letter the poison and ack the
//! rest with a single `multiple` ack. Poison is republished to the dead-letter
//! exchange with the reason in a header ([`crate::dead_letter`]) on a second,
//! confirm-mode channel, and acked only once the broker confirmed the copy.
//! A crash anywhere before the ack leaves the messages unacked, so the broker
//! redelivers them, and `processed_messages` turns the redelivery into a no-op.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use outbox::amqp::{ConsumerQueue, TopologyStatus};
use outbox::backoff::Backoff;
use outbox::supervisor::{CountGuard, CrashSwitch};
use service_kit::trace_context;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::apply::{Outcome, apply_batch_waited};
use crate::message::{Message, created_at, decode, trace_parent};
use crate::metrics::ConsumerMetrics;

/// How long the broker has to confirm the dead-lettered copies of a batch's poison.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a worker holding deferred cancels waits for a new batch before it
/// tries them alone.
const HELD_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A delivery taken from the channel and not settled yet; `deferred_since` when
/// it is a cancel held for its order's `OrderPlaced`.
struct Held {
    delivery: Delivery,
    deferred_since: Option<Instant>,
}

impl Held {
    fn new(delivery: Delivery) -> Self {
        Self { delivery, deferred_since: None }
    }
}

/// What every worker needs to know.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: ConsumerQueue,
    pub consumer_name: String,
    pub prefetch: u16,
    pub batch_size: usize,
    /// How long a cancel waits for its order's `OrderPlaced` to be applied
    /// before it is applied without it (`OUT_OF_ORDER_WAIT`).
    pub out_of_order_wait: Duration,
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

/// An open channel with its consumer, and a confirm-mode channel on the same
/// connection for dead-lettering. Publishing on a channel of its own keeps a
/// failed publish (an exchange deleted under us closes its channel) from taking
/// the consumer and its unacked deliveries down with it.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    dead_letters: Channel,
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
                            "stopped consuming; reconnecting");
                    }
                }
                Err(error) => match error.downcast_ref::<outbox::Error>() {
                    Some(mismatch @ outbox::Error::TopologyMismatch { .. }) => {
                        // Not transient: said loudly, retried calmly, shown by /readyz.
                        tracing::error!(worker = %self.name, error = %mismatch,
                            "the broker's queue does not match this service's settings");
                        self.topology.set(Some(format!(
                            "{mismatch} (this service's settings: QUEUE_TYPE, DELIVERY_LIMIT)"
                        )));
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
        let dead_letters =
            connection.create_channel().await.context("cannot open the dead-lettering channel")?;
        dead_letters
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot switch the dead-lettering channel to publisher confirms")?;
        Ok(Session { connection, channel, consumer, dead_letters })
    }

    /// Returns `Ok` on shutdown, an error when the channel fails.
    async fn consume(&self, session: &Session) -> anyhow::Result<()> {
        // `ready_chunks` yields what has already arrived, up to a batch: a lone
        // message is applied at once, a backlog in full batches.
        let mut batches = session.consumer.clone().ready_chunks(self.config.batch_size);
        // Deferred cancels, held unacked (a requeue would count against a quorum
        // queue's delivery limit) and tried again after the next batch's
        // messages, or alone after a pause: their `OrderPlaced` may be in it.
        let mut held: Vec<Held> = Vec::new();
        loop {
            let batch = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(()),
                batch = batches.next() => Some(batch),
                () = tokio::time::sleep(HELD_RETRY_PAUSE), if !held.is_empty() => None,
            };
            let mut deliveries: Vec<Held> = match batch {
                Some(batch) => batch
                    .context("the broker cancelled the consumer")?
                    .into_iter()
                    .map(|delivery| delivery.map(Held::new))
                    .collect::<Result<_, _>>()
                    .context("the channel failed")?,
                None => Vec::new(),
            };
            deliveries.append(&mut held);
            // Once a batch is taken it is finished, even during shutdown.
            match self.handle(session, deliveries).await? {
                Some(deferred) => held = deferred,
                None => return Ok(()),
            }
        }
    }

    /// Applies and settles one batch, and returns its deferred cancels, unsettled,
    /// to hold. `Ok(None)`: shutdown came while the database was down; the batch
    /// stays unacked and will be redelivered. An
    /// error when poison could not be dead-lettered: it went back to the queue
    /// (the rest of the batch was acked), and the worker reconnects after a pause,
    /// declaring its topology afresh (a deleted dead-letter exchange comes back).
    async fn handle(
        &self,
        session: &Session,
        batch: Vec<Held>,
    ) -> anyhow::Result<Option<Vec<Held>>> {
        // A panic here drops the session, whose connection closes: the broker
        // redelivers the batch to the restarted worker or another one.
        self.config.crash_switch.check(&self.name);
        let channel = &session.channel;
        let now = Instant::now();
        let (deliveries, deferred_since): (Vec<Delivery>, Vec<Option<Instant>>) =
            batch.into_iter().map(|held| (held.delivery, held.deferred_since)).unzip();
        // One span per message, a child of the producer's span whose context the
        // message carries; ended once the message is settled.
        let spans: Vec<opentelemetry::Context> = deliveries
            .iter()
            .map(|delivery| {
                let attributes = vec![KeyValue::new("messaging.message.id", message_id(delivery))];
                let parent = trace_parent(delivery);
                trace_context::start("OrderPlaced process", SpanKind::Consumer, &parent, attributes)
            })
            .collect();
        let mut messages = Vec::with_capacity(deliveries.len());
        // Deferred cancels that have waited long enough for their OrderPlaced.
        let mut waited_out = HashSet::new();
        // The delivery (its index) of each message.
        let mut delivered_as = Vec::with_capacity(deliveries.len());
        // Poison: the delivery's index and the reason.
        let mut poison = Vec::new();
        for (index, delivery) in deliveries.iter().enumerate() {
            match decode(delivery) {
                Ok(message) => {
                    if deferred_since[index].is_some_and(|since| {
                        now.duration_since(since) >= self.config.out_of_order_wait
                    }) {
                        waited_out.insert(message.id);
                    }
                    messages.push(message);
                    delivered_as.push(index);
                }
                Err(reason) => poison.push((index, reason)),
            }
        }

        let Some(outcomes) = self.apply_until_done(&messages, &waited_out).await else {
            return Ok(None);
        };
        let committed_at = chrono::Utc::now();
        self.metrics.batch_size.observe(messages.len() as f64);

        // The tags to ack. One `multiple` ack of the highest settles every
        // earlier delivery on the channel, so poison that is not dead-lettered
        // must be settled (handed back) before it; while cancels are held, each
        // tag is acked alone.
        let mut acks = Vec::new();
        // Deferred cancels: the delivery (its index) and since when.
        let mut deferred: Vec<(usize, Instant)> = Vec::new();
        for ((message, &index), outcome) in messages.iter().zip(&delivered_as).zip(&outcomes) {
            match outcome {
                Outcome::UnknownOrder => {
                    let reason = format!("order {} does not exist", message.event.order_id());
                    poison.push((index, reason));
                    continue;
                }
                Outcome::Refused(reason) => {
                    poison.push((index, reason.clone()));
                    continue;
                }
                Outcome::Deferred => {
                    if deferred_since[index].is_none() {
                        tracing::debug!(worker = %self.name, message_id = %message.id,
                            order_id = %message.event.order_id(),
                            "a cancel came before its order's OrderPlaced; holding it");
                    }
                    self.metrics.record(outcome.label());
                    deferred.push((index, deferred_since[index].unwrap_or(now)));
                    continue;
                }
                Outcome::CancelledBeforePlaced => {
                    tracing::warn!(worker = %self.name, message_id = %message.id,
                        order_id = %message.event.order_id(),
                        waited = ?self.config.out_of_order_wait,
                        "a cancel's OrderPlaced did not come within OUT_OF_ORDER_WAIT: the \
                         order is cancelled with nothing to give back (applied out of order; \
                         reconcile reports it)");
                }
                _ => {}
            }
            self.metrics.record(outcome.label());
            let delivery = &deliveries[index];
            if matches!(outcome, Outcome::Completed | Outcome::Rejected)
                && let Some(created_at) = created_at(delivery)
            {
                // Clocks of different hosts may disagree a little: never negative.
                let lag = (committed_at - created_at).as_seconds_f64().max(0.0);
                self.metrics.e2e_lag_seconds.observe(lag);
            }
            acks.push(delivery.delivery_tag);
        }

        // After the commit of the good messages, before any ack.
        let letters: Vec<(&Delivery, &str)> =
            poison.iter().map(|(index, reason)| (&deliveries[*index], reason.as_str())).collect();
        let confirmed = if letters.is_empty() {
            Vec::new()
        } else {
            crate::dead_letter::publish(
                &session.dead_letters,
                &self.config.topology.dead_letter_exchange,
                &letters,
                DEAD_LETTER_CONFIRM_TIMEOUT,
            )
            .await
        };
        let mut handed_back = 0;
        for ((index, reason), confirmed) in poison.iter().zip(confirmed) {
            let delivery = &deliveries[*index];
            let message_id = message_id(delivery);
            let span = &spans[*index];
            trace_context::end(span, Some(reason));
            let trace_id = trace_context::trace_id(span);
            if confirmed {
                tracing::warn!(worker = %self.name, message_id, reason, trace_id,
                    "poison message moved to the dead-letter queue");
                self.metrics.record("poison");
                acks.push(delivery.delivery_tag);
            } else {
                tracing::warn!(worker = %self.name, message_id, reason, trace_id,
                    "the dead-letter exchange did not confirm a poison message; handing it back");
                channel
                    .basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions { multiple: false, requeue: true },
                    )
                    .await
                    .context("cannot hand a poison message back to the queue")?;
                self.metrics.dead_letter_failures.inc();
                handed_back += 1;
            }
        }
        if deferred.is_empty() {
            if let Some(&tag) = acks.iter().max() {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .context("cannot ack the batch")?;
            }
        } else {
            for tag in acks {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await
                    .context("cannot ack the batch")?;
            }
        }
        for span in &spans {
            trace_context::end(span, None); // a poison message's span has ended already
        }
        tracing::debug!(worker = %self.name, batch = deliveries.len(), held = deferred.len(),
            "batch settled");
        if handed_back > 0 {
            anyhow::bail!(
                "the broker did not confirm {handed_back} poison message(s) on the dead-letter \
                 exchange {:?}; they went back to the queue",
                self.config.topology.dead_letter_exchange
            );
        }
        let since: HashMap<usize, Instant> = deferred.into_iter().collect();
        let held = deliveries
            .into_iter()
            .enumerate()
            .filter_map(|(index, delivery)| {
                since.get(&index).map(|&since| Held { delivery, deferred_since: Some(since) })
            })
            .collect();
        Ok(Some(held))
    }

    /// Applies `messages`, retrying database failures with a growing pause: an
    /// outage is transient, so nothing is acked or dead-lettered meanwhile. When
    /// the database refuses the batch's data (not transient), the messages are
    /// applied one by one so that only the refused one is poison
    /// ([`Outcome::Refused`]). `None` when shutdown interrupts the retries.
    async fn apply_until_done(
        &self,
        messages: &[Message],
        waited_out: &HashSet<Uuid>,
    ) -> Option<Vec<Outcome>> {
        if messages.is_empty() {
            return Some(Vec::new());
        }
        match self.apply_retrying(messages, waited_out).await? {
            Ok(outcomes) => return Some(outcomes),
            Err(reason) => tracing::warn!(worker = %self.name, reason,
                "the database refused a batch's data; applying its messages one by one"),
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            outcomes.push(
                match self.apply_retrying(std::slice::from_ref(message), waited_out).await? {
                    Ok(mut one) => one.remove(0),
                    Err(reason) => Outcome::Refused(reason),
                },
            );
        }
        Some(outcomes)
    }

    /// Applies `messages` in one transaction until it commits or the database
    /// refuses their data (`Err` with its reason); other failures are retried.
    async fn apply_retrying(
        &self,
        messages: &[Message],
        waited_out: &HashSet<Uuid>,
    ) -> Option<Result<Vec<Outcome>, String>> {
        let mut trouble = Backoff::new();
        loop {
            let error = match self.apply(messages, waited_out).await {
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

    async fn apply(
        &self,
        messages: &[Message],
        waited_out: &HashSet<Uuid>,
    ) -> anyhow::Result<Vec<Outcome>> {
        let mut tx = self.db.begin().await.context("cannot begin a transaction")?;
        let outcomes =
            apply_batch_waited(&mut tx, &self.config.consumer_name, messages, waited_out)
                .await
                .context("cannot apply the batch")?;
        tx.commit().await.context("cannot commit the batch")?;
        Ok(outcomes)
    }

    /// Stops consuming; deliveries received but not acked go back to the queue.
    async fn close(&self, session: Session) {
        let Session { connection, channel, consumer, dead_letters } = session;
        if channel.status().connected() {
            let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
            let _ = channel.close(200, "consumer stopping".into()).await;
        }
        if dead_letters.status().connected() {
            let _ = dead_letters.close(200, "consumer stopping".into()).await;
        }
        if connection.status().connected() {
            let _ = connection.close(200, "consumer stopping".into()).await;
        }
    }
}

/// The database's reason when `error` is a data exception (SQLSTATE class 22:
/// a value it cannot take, whatever the retry), else `None`.
pub(crate) fn data_error(error: &anyhow::Error) -> Option<String> {
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
