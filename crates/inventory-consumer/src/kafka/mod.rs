//! The consumer on Kafka (`CONSUMER_TRANSPORT=kafka`): the topic
//! `<KAFKA_TOPIC_PREFIX>order`, whose partitions the replicas sharing a
//! `CONSUMER_NAME` split between them, each partition applied by one replica
//! at a time, in offset order.
//!
//! **Offsets live in Postgres**, in `consumer_offsets`, written in the
//! transaction of the batch's effect: an effect and the offset after it commit
//! together, so a crash neither applies a batch again nor skips one. Kafka's
//! own group offsets are never used. The relay can still publish an event
//! twice (a lost acknowledgement), so `processed_messages` keeps deduplicating
//! by message id.
//!
//! **Partitions are leased in Postgres**, not through Kafka's group protocol
//! (which rskafka does not speak): every second a replica writes its heartbeat
//! in `consumer_members`, counts the live replicas (seen in the last
//! [`MEMBER_TIMEOUT`]), and holds its fair share of the partitions (their
//! number divided by the live replicas, rounded up) as session advisory locks
//! on one connection of its own. A replica that dies loses its connection and
//! with it its locks at once (a SIGKILL too: Postgres ends the session when
//! the socket closes; a vanished host, through TCP keepalives, in about 25 s),
//! and the others take its partitions once its heartbeat is
//! [`MEMBER_TIMEOUT`] old, within about four seconds (at once when it stopped
//! cleanly: it says it left). A replica holding more than its share (a
//! new one joined) stops the extra partitions' workers and then unlocks them.
//! Each batch's transaction first checks that the lease connection still holds
//! the partition's lock, and moves the stored offset only from where the batch
//! started: of two workers that both believe they own a partition (one whose
//! lease connection broke mid-batch), only one commits; the other stops, and
//! its replica starts it again from the stored offset if it still holds the
//! lock.
//!
//! A record that cannot be applied (malformed, an unknown event type, an
//! order that does not exist) goes to the dead-letter topic
//! `<KAFKA_TOPIC_PREFIX>order.dlq` with the reason in its
//! `x-dead-letter-reason` header, before the offset past it commits; the
//! partition moves on. [`dead_letter`] lists and replays them.

pub mod dead_letter;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::{Record, RecordAndOffset};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use crate::apply::{Outcome, apply_batch_waited};
use crate::config::KafkaConfig;
use crate::message::{Message, decode_parts};
use crate::metrics::ConsumerMetrics;

/// A replica unseen for this long (three lease rounds) has left: the others'
/// shares grow to cover its partitions. Only fairness hangs on it: a replica
/// that is slow, not gone, still holds its locks, so nobody takes its
/// partitions while it lives.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a replica beats and looks at its share.
const LEASE_ROUND: Duration = Duration::from_secs(1);
/// The longest a Kafka call (connect, fetch, produce) retries before it fails.
const KAFKA_CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes fetched at most per request.
const FETCH_MAX_BYTES: i32 = 4 * 1024 * 1024;

/// What every partition worker of this replica shares.
#[derive(Clone)]
pub struct KafkaConsumer {
    pub db: PgPool,
    pub config: KafkaConfig,
    pub consumer_name: String,
    pub batch_size: usize,
    pub out_of_order_wait: Duration,
    pub metrics: ConsumerMetrics,
    /// Counts this consumer as one connected worker while it runs (`/readyz`).
    pub connected: Arc<std::sync::atomic::AtomicUsize>,
}

impl KafkaConsumer {
    /// Connects, creates the topics when missing and runs the lease rounds
    /// (which start and stop the partition workers) until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (config, name) = (self.config.clone(), self.consumer_name.clone());
        let started = async move {
            let client = connect(&config, &name).await?;
            let partitions = ensure_topics(&client, &config).await?;
            anyhow::Ok((Arc::new(client), partitions))
        };
        let (client, partitions) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            started = started => started?,
        };
        tracing::info!(topic = %self.config.topic(), partitions = partitions.len(),
            "consuming from Kafka");
        // Uncounted when dropped, also by a panic's unwinding.
        let _connected = outbox::supervisor::CountGuard::new(&self.connected);
        let mut leases = Leases::new(self, client, partitions);
        let outcome = leases.run(&shutdown).await;
        leases.leave().await;
        outcome
    }
}

/// A client of the cluster at the configured brokers.
pub async fn connect(config: &KafkaConfig, name: &str) -> anyhow::Result<Client> {
    let brokers = config.brokers();
    anyhow::ensure!(!brokers.is_empty(), "KAFKA_BROKERS names no broker");
    // rskafka retries a lost connection or a moved leader by itself, by
    // default for ever: bounded here, so that no fetch or produce (the
    // dead-letter one runs inside the batch's transaction) waits longer.
    let backoff = rskafka::BackoffConfig {
        init_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        base: 3.0,
        deadline: Some(KAFKA_CALL_DEADLINE),
    };
    let building =
        ClientBuilder::new(brokers).client_id(name.to_owned()).backoff_config(backoff).build();
    match tokio::time::timeout(KAFKA_CALL_DEADLINE, building).await {
        Ok(client) => {
            client.with_context(|| format!("cannot reach Kafka at {}", config.kafka_brokers))
        }
        Err(_) => anyhow::bail!(
            "no answer from Kafka at {} within {KAFKA_CALL_DEADLINE:?}",
            config.kafka_brokers
        ),
    }
}

/// Creates the events topic (`KAFKA_PARTITIONS` partitions) and its
/// dead-letter topic (one) when they are missing; the events topic's
/// partitions.
pub async fn ensure_topics(client: &Client, config: &KafkaConfig) -> anyhow::Result<Vec<i32>> {
    let wanted =
        [(config.topic(), config.topics.kafka_partitions), (config.dead_letter_topic(), 1)];
    for (topic, partitions) in &wanted {
        let listed = client.list_topics().await.context("cannot list Kafka's topics")?;
        if listed.iter().any(|listed| &listed.name == topic) {
            continue;
        }
        let controller = client.controller_client()?;
        match controller
            .create_topic(topic, *partitions, config.topics.kafka_replication_factor, 5_000)
            .await
        {
            Ok(()) => tracing::info!(%topic, partitions, "created the topic"),
            // Another replica, or order-service, created it meanwhile.
            Err(rskafka::client::error::Error::ServerError {
                protocol_error: rskafka::client::error::ProtocolError::TopicAlreadyExists,
                ..
            }) => {}
            Err(error) => return Err(error).with_context(|| format!("cannot create {topic}")),
        }
    }
    let topic = config.topic();
    let listed = client.list_topics().await.context("cannot list Kafka's topics")?;
    let partitions = listed
        .into_iter()
        .find(|listed| listed.name == topic)
        .map(|listed| listed.partitions.into_iter().collect::<Vec<_>>())
        .unwrap_or_default();
    anyhow::ensure!(!partitions.is_empty(), "the topic {topic} has no partitions");
    Ok(partitions)
}

/// The advisory lock key of a partition: the first half names the consumer
/// and topic (31 bits of an FNV-1a hash, so that it is the same in every
/// replica and positive as Postgres shows it in `pg_locks.classid`), the
/// second is the partition.
fn lock_key(consumer: &str, topic: &str, partition: i32) -> (i32, i32) {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in consumer.bytes().chain([0]).chain(topic.bytes()) {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    ((hash & 0x7fff_ffff) as i32, partition)
}

/// A partition this replica holds, and its worker.
struct Held {
    stop: CancellationToken,
    /// Aborted if dropped: no worker outlives its replica's leases.
    worker: AbortOnDropHandle<()>,
}

/// This replica's membership and partitions.
struct Leases {
    consumer: KafkaConsumer,
    client: Arc<Client>,
    partitions: Vec<i32>,
    member: Uuid,
    /// The connection holding the advisory locks, and its backend pid.
    connection: Option<(PgConnection, i32)>,
    held: BTreeMap<i32, Held>,
}

impl Leases {
    fn new(consumer: KafkaConsumer, client: Arc<Client>, partitions: Vec<i32>) -> Self {
        Self {
            consumer,
            client,
            partitions,
            member: Uuid::now_v7(),
            connection: None,
            held: BTreeMap::new(),
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut rounds = tokio::time::interval(LEASE_ROUND);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = rounds.tick() => {}
            }
            let round = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                round = self.round() => round,
            };
            if let Err(error) = round {
                // Without the lease connection no lock is held any more: stop
                // every worker before another replica's takes over.
                tracing::warn!(
                    error = format!("{error:#}"),
                    "a lease round failed; releasing every partition and starting again"
                );
                self.release_all().await;
            }
        }
    }

    /// Beats, then takes or gives back partitions to hold this replica's share.
    async fn round(&mut self) -> anyhow::Result<()> {
        let name = self.consumer.consumer_name.clone();
        if self.connection.is_none() {
            let options = (*self.consumer.db.connect_options()).clone();
            let mut connection = PgConnection::connect_with(&options).await?;
            // A replica whose host vanished (no FIN) is noticed by Postgres in
            // about 25 s, not after the default two hours of TCP keepalive:
            // its session ends and its locks with it.
            sqlx::query(
                "SELECT set_config('tcp_keepalives_idle', '10', false),
                        set_config('tcp_keepalives_interval', '5', false),
                        set_config('tcp_keepalives_count', '3', false)",
            )
            .execute(&mut connection)
            .await?;
            let pid: i32 =
                sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut connection).await?;
            self.connection = Some((connection, pid));
        }
        let Some((connection, pid)) = self.connection.as_mut() else { unreachable!() };
        let pid = *pid;
        let timeout = MEMBER_TIMEOUT.as_secs_f64();
        let live: i64 = sqlx::query_scalar(
            "WITH beat AS (
                 INSERT INTO consumer_members (consumer, member) VALUES ($1, $2)
                 ON CONFLICT (consumer, member) DO UPDATE SET seen_at = now()
             ), gone AS (
                 DELETE FROM consumer_members
                 WHERE consumer = $1 AND seen_at < now() - make_interval(secs => $3)
             )
             SELECT count(*) + 1 FROM consumer_members
             WHERE consumer = $1 AND member <> $2
               AND seen_at >= now() - make_interval(secs => $3)",
        )
        .bind(&name)
        .bind(self.member)
        .bind(timeout)
        .fetch_one(&mut *connection)
        .await?;
        let live = usize::try_from(live).unwrap_or(1).max(1);
        let share = self.partitions.len().div_ceil(live);

        // A worker that ended by itself (it saw another replica's offset, or
        // panicked) while the lock is still held here starts again: it reads
        // the stored offset afresh.
        let finished: Vec<i32> = self
            .held
            .iter()
            .filter(|(_, held)| held.worker.is_finished())
            .map(|(&partition, _)| partition)
            .collect();
        for partition in finished {
            self.held.remove(&partition);
            tracing::info!(partition, "the partition's worker ended; starting it again");
            self.start(partition, pid).await?;
        }

        // Too many: give back the highest partitions, their workers stopped first.
        while self.held.len() > share {
            let Some((&partition, _)) = self.held.last_key_value() else { break };
            self.release(partition).await?;
        }
        // Too few: try the others, lowest first.
        let topic = self.consumer.config.topic();
        for partition in self.partitions.clone() {
            if self.held.len() >= share {
                break;
            }
            if self.held.contains_key(&partition) {
                continue;
            }
            let (key, sub) = lock_key(&name, &topic, partition);
            let Some((connection, _)) = self.connection.as_mut() else { unreachable!() };
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(key)
                .bind(sub)
                .fetch_one(&mut *connection)
                .await?;
            if locked {
                self.start(partition, pid).await?;
            }
        }
        Ok(())
    }

    async fn start(&mut self, partition: i32, lease_pid: i32) -> anyhow::Result<()> {
        let topic = self.consumer.config.topic();
        let client = self
            .client
            .partition_client(topic.clone(), partition, UnknownTopicHandling::Retry)
            .await
            .with_context(|| format!("no client for {topic}/{partition}"))?;
        let dead_letters = self
            .client
            .partition_client(
                self.consumer.config.dead_letter_topic(),
                0,
                UnknownTopicHandling::Retry,
            )
            .await
            .context("no client for the dead-letter topic")?;
        let stop = CancellationToken::new();
        let worker = PartitionWorker {
            consumer: self.consumer.clone(),
            topic,
            partition,
            lease_pid,
            client,
            dead_letters,
            stop: stop.clone(),
        };
        tracing::info!(partition, member = %self.member, "took the partition");
        let worker = AbortOnDropHandle::new(tokio::spawn(worker.run()));
        self.held.insert(partition, Held { stop, worker });
        Ok(())
    }

    /// Stops the partition's worker, then unlocks it.
    async fn release(&mut self, partition: i32) -> anyhow::Result<()> {
        if let Some(held) = self.held.remove(&partition) {
            held.stop.cancel();
            let _ = held.worker.await;
        }
        let (key, sub) =
            lock_key(&self.consumer.consumer_name, &self.consumer.config.topic(), partition);
        if let Some((connection, _)) = self.connection.as_mut() {
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(key)
                .bind(sub)
                .execute(&mut *connection)
                .await?;
        }
        tracing::info!(partition, member = %self.member, "gave the partition back");
        Ok(())
    }

    /// Stops every worker and closes the lease connection (its locks go with it).
    async fn release_all(&mut self) {
        for (_, held) in std::mem::take(&mut self.held) {
            held.stop.cancel();
            let _ = held.worker.await;
        }
        if let Some((connection, _)) = self.connection.take() {
            let _ = connection.close().await;
        }
    }

    /// [`Leases::release_all`], and this replica leaves at once: the others
    /// take its partitions at their next round.
    async fn leave(&mut self) {
        self.release_all().await;
        let left = sqlx::query("DELETE FROM consumer_members WHERE consumer = $1 AND member = $2")
            .bind(&self.consumer.consumer_name)
            .bind(self.member)
            .execute(&self.consumer.db)
            .await;
        if let Err(error) = left {
            tracing::warn!(%error, "could not say this replica left; the others wait for its heartbeat to age");
        }
    }
}

/// Applies one partition, in offset order, while its lease holds.
struct PartitionWorker {
    consumer: KafkaConsumer,
    topic: String,
    partition: i32,
    /// The backend pid of the connection holding this partition's lock.
    lease_pid: i32,
    client: PartitionClient,
    dead_letters: PartitionClient,
    stop: CancellationToken,
}

/// The records of one transaction.
struct Batch<'a> {
    records: &'a [RecordAndOffset],
    /// The offset the batch starts from, as stored (or the earliest).
    from: i64,
    /// The offset after its last record.
    next: i64,
    /// Each record in a savepoint of its own: the database refused the batch's data.
    one_by_one: bool,
}

/// Why a batch was not committed.
enum NotCommitted {
    /// The lease is gone, or another worker moved the offset: stop.
    LeaseLost,
    /// The database refused some record's data (SQLSTATE class 22): apply
    /// them one by one, so that only the refused one is poison.
    DataRefused(String),
    /// A cancel came before its OrderPlaced: try the batch again shortly.
    Deferred(Vec<Uuid>),
}

impl PartitionWorker {
    async fn run(self) {
        let mut offset = None;
        let mut deferred_since: HashMap<Uuid, Instant> = HashMap::new();
        let mut pause = Duration::from_millis(100);
        while !self.stop.is_cancelled() {
            let step = async {
                let from = match offset {
                    Some(offset) => offset,
                    None => self.stored_offset().await?,
                };
                self.step(from, &mut deferred_since).await
            };
            let result = tokio::select! {
                () = self.stop.cancelled() => return,
                result = step => result,
            };
            match result {
                Ok(Some(next)) => {
                    offset = Some(next);
                    pause = Duration::from_millis(100);
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition,
                        error = format!("{error:#}"), "a batch failed; trying again");
                    self.consumer.metrics.retries.inc();
                    offset = None; // read it again from the database
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The next offset to apply: the stored one, else the partition's earliest.
    async fn stored_offset(&self) -> anyhow::Result<i64> {
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM consumer_offsets
             WHERE consumer = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&self.consumer.consumer_name)
        .bind(&self.topic)
        .bind(self.partition)
        .fetch_optional(&self.consumer.db)
        .await?;
        match stored {
            Some(offset) => Ok(offset),
            None => Ok(self.client.get_offset(OffsetAt::Earliest).await?),
        }
    }

    /// Fetches from `from` and applies what came; the offset to go on from,
    /// or `None` when the partition is no longer this worker's.
    async fn step(
        &self,
        from: i64,
        deferred_since: &mut HashMap<Uuid, Instant>,
    ) -> anyhow::Result<Option<i64>> {
        // KAFKA_FETCH_WAIT: on tansu, which holds a fetch for its whole wait,
        // 500 ms made the end-to-end lag p50 119 ms at 50 orders/s, 50 ms 12 ms.
        let wait = i32::try_from(self.consumer.config.kafka_fetch_wait.as_millis().max(1))
            .unwrap_or(i32::MAX);
        let fetched = self.client.fetch_records(from, 1..FETCH_MAX_BYTES, wait).await;
        let (mut records, high_watermark) = match fetched {
            Err(rskafka::client::error::Error::ServerError {
                protocol_error: rskafka::client::error::ProtocolError::OffsetOutOfRange,
                ..
            }) => return self.out_of_range(from).await,
            fetched => fetched.with_context(|| {
                format!("cannot fetch {}/{} from offset {from}", self.topic, self.partition)
            })?,
        };
        if records.is_empty() && from > high_watermark {
            // Past the end: Kafka answers OffsetOutOfRange, some brokers nothing.
            return self.out_of_range(from).await;
        }
        records.retain(|record| record.offset >= from);
        records.sort_by_key(|record| record.offset);
        records.truncate(self.consumer.batch_size.max(1));
        let Some(last) = records.last().map(|record| record.offset) else {
            return Ok(Some(from));
        };
        let mut one_by_one = false;
        loop {
            let now = Instant::now();
            let waited_out: HashSet<Uuid> = deferred_since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= self.consumer.out_of_order_wait)
                .map(|(id, _)| *id)
                .collect();
            let batch = Batch { records: &records, from, next: last + 1, one_by_one };
            // Not raced against the stop: a commit is never cut half-way.
            match self.apply(&batch, &waited_out).await? {
                Ok(()) => {
                    deferred_since.clear();
                    return Ok(Some(last + 1));
                }
                Err(NotCommitted::LeaseLost) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition,
                        "the partition's lease or offset is no longer this worker's; stopping");
                    return Ok(None);
                }
                Err(NotCommitted::DataRefused(reason)) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, reason,
                        "the database refused a batch's data; applying its records one by one");
                    one_by_one = true;
                }
                Err(NotCommitted::Deferred(ids)) => {
                    for id in ids {
                        deferred_since.entry(id).or_insert(now);
                    }
                    self.consumer.metrics.record(Outcome::Deferred.label());
                    tokio::select! {
                        () = self.stop.cancelled() => return Ok(None),
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }

    /// The stored offset `from` is not in the partition's log: the records
    /// from it on were deleted before they were applied (retention shorter
    /// than an outage), or the topic was deleted and created again. Either
    /// way nothing at `from` will ever come: the partition goes on from the
    /// log's earliest offset (the offset moved in a transaction of its own,
    /// under the lease), counted in `inventory_kafka_offset_resets_total` and
    /// logged as an error naming what was skipped. Records read again (a
    /// recreated topic) are duplicates the dedupe ignores.
    async fn out_of_range(&self, from: i64) -> anyhow::Result<Option<i64>> {
        let earliest = self.client.get_offset(OffsetAt::Earliest).await?;
        let latest = self.client.get_offset(OffsetAt::Latest).await?;
        if (earliest..=latest).contains(&from) {
            // In range after all (the log moved meanwhile): fetch again.
            return Ok(Some(from));
        }
        let mut tx = self.consumer.db.begin().await?;
        if !self.holds_lease(&mut tx).await? || !self.move_offset(&mut tx, from, earliest).await? {
            return Ok(None);
        }
        tx.commit().await?;
        self.consumer.metrics.kafka_offset_resets.inc();
        if from < earliest {
            tracing::error!(topic = %self.topic, partition = self.partition, stored = from,
                earliest, skipped = earliest - from,
                "the records from the stored offset on were deleted before they were applied \
                 (retention shorter than the consumer's outage): going on from the earliest \
                 offset; their orders stay PENDING (order-service reconcile lists them) \
                 until their events are published again by hand");
        } else {
            tracing::error!(topic = %self.topic, partition = self.partition, stored = from,
                earliest, latest,
                "the stored offset is past the partition's end (the topic was recreated?): \
                 going on from the earliest offset; events applied before are ignored as \
                 duplicates");
        }
        Ok(Some(earliest))
    }

    /// Whether the lease connection still holds this partition's lock.
    async fn holds_lease(&self, tx: &mut PgConnection) -> anyhow::Result<bool> {
        let (key, sub) = lock_key(&self.consumer.consumer_name, &self.topic, self.partition);
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory' AND granted AND pid = $1
                              AND classid = $2::int8::oid AND objid = $3::int8::oid
                              AND objsubid = 2)",
        )
        .bind(self.lease_pid)
        .bind(key)
        .bind(sub)
        .fetch_one(&mut *tx)
        .await?;
        Ok(held)
    }

    /// Stores `next` as the partition's offset if the stored one is `from`
    /// (or there is none): whether it moved. A row that says otherwise was
    /// moved by another worker, which owns the partition now.
    async fn move_offset(
        &self,
        tx: &mut PgConnection,
        from: i64,
        next: i64,
    ) -> anyhow::Result<bool> {
        let moved = sqlx::query(
            "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()
             WHERE consumer_offsets.next_offset = $5",
        )
        .bind(&self.consumer.consumer_name)
        .bind(&self.topic)
        .bind(self.partition)
        .bind(next)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        Ok(moved.rows_affected() == 1)
    }

    /// One transaction: the lease checked, the batch's effect, the poison sent
    /// to the dead-letter topic, the next offset stored, if the stored one is
    /// still the one this batch starts from (so that of two workers that
    /// both believe they own the partition, only one moves it).
    async fn apply(
        &self,
        batch: &Batch<'_>,
        waited_out: &HashSet<Uuid>,
    ) -> anyhow::Result<Result<(), NotCommitted>> {
        let mut messages: Vec<Message> = Vec::with_capacity(batch.records.len());
        let mut message_records = Vec::with_capacity(batch.records.len());
        let mut poison: Vec<(&RecordAndOffset, String)> = Vec::new();
        for record in batch.records {
            match decode(&record.record) {
                Ok(message) => {
                    messages.push(message);
                    message_records.push(record);
                }
                Err(reason) => poison.push((record, reason)),
            }
        }

        let mut tx = self.consumer.db.begin().await?;
        if !self.holds_lease(&mut tx).await? {
            return Ok(Err(NotCommitted::LeaseLost));
        }
        let outcomes = if batch.one_by_one {
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in &messages {
                // A savepoint each, so that a refused one undoes only itself.
                let mut one = tx.begin().await?;
                let applied = apply_batch_waited(
                    &mut one,
                    &self.consumer.consumer_name,
                    std::slice::from_ref(message),
                    waited_out,
                )
                .await;
                match applied {
                    Ok(mut outcome) => {
                        one.commit().await?;
                        outcomes.push(outcome.remove(0));
                    }
                    Err(error) => {
                        let error = anyhow::Error::from(error);
                        let Some(reason) = crate::worker::data_error(&error) else {
                            return Err(error);
                        };
                        one.rollback().await?;
                        outcomes.push(Outcome::Refused(reason));
                    }
                }
            }
            outcomes
        } else {
            let applied =
                apply_batch_waited(&mut tx, &self.consumer.consumer_name, &messages, waited_out)
                    .await;
            match applied {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    let error = anyhow::Error::from(error);
                    let Some(reason) = crate::worker::data_error(&error) else {
                        return Err(error);
                    };
                    tx.rollback().await?;
                    return Ok(Err(NotCommitted::DataRefused(reason)));
                }
            }
        };
        let deferred: Vec<Uuid> = messages
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| **outcome == Outcome::Deferred)
            .map(|(message, _)| message.id)
            .collect();
        if !deferred.is_empty() {
            // The batch applies whole, in offset order, or not at all.
            tx.rollback().await?;
            return Ok(Err(NotCommitted::Deferred(deferred)));
        }
        let mut applied = Vec::with_capacity(outcomes.len());
        // When the events of decided orders were created, for the lag.
        let mut decided_created = Vec::with_capacity(outcomes.len());
        for ((message, record), outcome) in messages.iter().zip(&message_records).zip(&outcomes) {
            match outcome {
                Outcome::UnknownOrder => poison
                    .push((record, format!("order {} does not exist", message.event.order_id()))),
                Outcome::Refused(reason) => poison.push((record, reason.clone())),
                outcome => {
                    applied.push(outcome.label());
                    if matches!(outcome, Outcome::Completed | Outcome::Rejected) {
                        decided_created.push(created_at(&record.record));
                    }
                }
            }
        }
        // The offset moves only from where this batch started.
        if !self.move_offset(&mut tx, batch.from, batch.next).await? {
            tx.rollback().await?;
            return Ok(Err(NotCommitted::LeaseLost));
        }
        if !poison.is_empty() {
            // Before the offset past them commits (a crash in between sends
            // them again, never loses them), bounded by the client's deadline.
            self.dead_letter(&poison).await?;
        }
        tx.commit().await?;
        let committed_at = chrono::Utc::now();
        for label in applied {
            self.consumer.metrics.record(label);
        }
        for created_at in decided_created {
            // Clocks of different hosts may disagree a little: never negative.
            let lag = (committed_at - created_at).as_seconds_f64().max(0.0);
            self.consumer.metrics.e2e_lag_seconds.observe(lag);
        }
        self.consumer.metrics.batch_size.observe(messages.len() as f64);
        Ok(Ok(()))
    }

    async fn dead_letter(&self, poison: &[(&RecordAndOffset, String)]) -> anyhow::Result<()> {
        let letters: Vec<Record> = poison
            .iter()
            .map(|(record, reason)| {
                dead_letter::letter(
                    &record.record,
                    &self.topic,
                    self.partition,
                    record.offset,
                    reason,
                )
            })
            .collect();
        let produced = self.dead_letters.produce(letters, Compression::NoCompression);
        tokio::time::timeout(KAFKA_CALL_DEADLINE, produced)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {KAFKA_CALL_DEADLINE:?}"))
            .and_then(|produced| produced.map_err(anyhow::Error::from))
            .context("the dead-letter topic did not take the poison records")?;
        for (record, reason) in poison {
            let message_id = header(&record.record, "message_id").unwrap_or_default();
            tracing::warn!(topic = %self.topic, partition = self.partition,
                offset = record.offset, message_id, reason,
                "poison record moved to the dead-letter topic");
            self.consumer.metrics.record("poison");
        }
        Ok(())
    }
}

fn header<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
    record.headers.get(name).and_then(|value| std::str::from_utf8(value).ok())
}

/// When a record's event was created: the relay's `x-created-at` header (the
/// outbox row's `created_at`), else the record's timestamp.
fn created_at(record: &Record) -> chrono::DateTime<chrono::Utc> {
    header(record, outbox::transport::CREATED_AT_HEADER)
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(text.trim()).ok())
        .map_or(record.timestamp, |at| at.with_timezone(&chrono::Utc))
}

/// A record's event, as the relay wrote it (see the outbox's Kafka transport).
fn decode(record: &Record) -> Result<Message, String> {
    let body = record.value.as_deref().ok_or("the record has no value")?;
    decode_parts(
        header(record, "message_id"),
        header(record, "type"),
        header(record, order_events::VERSION_HEADER),
        body,
    )
}
