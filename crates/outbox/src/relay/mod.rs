//! The relay pool: workers that move committed events from the outbox to the
//! broker, deleting an event only after the broker confirmed it.
//!
//! One pass of a worker ([`relay_batch`]) is one transaction:
//! claim due events with `FOR UPDATE SKIP LOCKED`, publish them all, await their
//! confirms, delete the confirmed ones, record a failed attempt (with backoff) for
//! the others, commit. A crash anywhere before the commit leaves every claimed
//! event in the outbox, to be published again: delivery is at-least-once, and
//! consumers deduplicate on the message id.
//!
//! A failure belongs to someone. An event's own failure (refused while others
//! are accepted, unroutable, too large, a channel closed by it) spends that
//! event's attempts, and parks it alone once its attempts are spent or at once
//! when it can never be sent. A failure of the transport (the connection lost,
//! blocked or stalled, the broker refusing everything) spends none: the pass
//! rolls back what it could not settle, and the worker backs off as a whole,
//! then probes with one event before it takes full batches again (a circuit
//! breaker). The pool's view of its broker is [`RelayStatus::transport`], in
//! the logs at every change and in the metrics.
//!
//! Workers run under a [`Supervisor`]: one that panics is restarted.

mod listener;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics::RelayMetrics;
use crate::store::{self, Failure, FailureKind, OutboxEvent};
use crate::supervisor::{CountGuard, CrashSwitch, Supervisor};
use crate::transport::{Outcome, Publisher, TopologyStatus, Transport, TransportState};
use crate::{Error, Result};

/// How the relay works, whatever the broker. Checked by [`RelayConfig::validate`]
/// (which [`Relay::spawn`] calls).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Concurrent workers; each has its own broker connection and claims its own rows.
    pub workers: usize,
    /// Most events one worker claims and publishes per transaction.
    pub batch_size: i64,
    /// How often an idle worker looks for due events without being woken: events
    /// committed by other processes, retries whose backoff ended.
    pub poll_interval: Duration,
    /// Failed attempts after which an event is marked dead.
    pub max_attempts: i32,
    /// What becomes of an event that nothing would receive.
    pub unroutable: Unroutable,
    /// Delay before the first retry of a failed event; doubles with every attempt.
    pub retry_base: Duration,
    /// Longest delay between two attempts of one event.
    pub retry_max: Duration,
    /// How far before the newest event it has claimed a worker starts its next
    /// claim (see [`ClaimFloor`]). An event committed longer than this after its
    /// transaction began waits for the next full scan.
    pub claim_lookback: Duration,
    /// How often a worker's claim scans the whole due index instead of starting
    /// at its floor. A full scan that finds events below the floor (late
    /// commits) is followed by more until none is left.
    pub full_scan_interval: Duration,
    /// Largest event published (payload, header names and values, routing
    /// key, in bytes); a larger one is parked dead at once, naming this limit.
    /// Keep it below the broker's own limit (RabbitMQ's `max_message_size`,
    /// 128 MiB by default; Kafka's `message.max.bytes`, about 1 MB), so that the
    /// relay, not the broker, refuses it.
    pub max_message_bytes: usize,
    /// Test hook: armed, it makes a worker panic before its next pass.
    pub crash_switch: CrashSwitch,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 200,
            poll_interval: Duration::from_millis(100),
            max_attempts: 10,
            unroutable: Unroutable::Park,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            claim_lookback: Duration::from_secs(10),
            full_scan_interval: Duration::from_secs(30),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            crash_switch: CrashSwitch::default(),
        }
    }
}

/// The default of [`RelayConfig::max_message_bytes`]: 1,000,000 bytes, below
/// both RabbitMQ's and Kafka's default limits.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// How long a worker waits for a broken publisher to close politely.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a worker waits before it looks again whether the broker still
/// blocks its connection.
const BLOCKED_RECHECK: Duration = Duration::from_millis(250);

/// What becomes of an event the broker says nothing would receive (RabbitMQ: no
/// queue is bound for its routing key; Kafka: its topic does not exist). It is
/// never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unroutable {
    /// Marked dead at once, with the broker's reason in `last_error`: visible to
    /// operators (`state = 'dead'`), published again by a replay once something
    /// is bound. The default.
    #[default]
    Park,
    /// Left pending and tried again every `retry_max` (with jitter), without
    /// counting towards `max_attempts`, until something is bound.
    Retry,
}

impl std::str::FromStr for Unroutable {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "park" => Ok(Self::Park),
            "retry" => Ok(Self::Retry),
            _ => Err(format!("{text:?} is not an unroutable policy: use park or retry")),
        }
    }
}

impl RelayConfig {
    /// Checks every setting, naming the first one out of its range: a pool that
    /// could never publish (no workers, batches of 0, no attempts) or would
    /// spin (a zero poll interval) is an error, not a silent idle loop.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.workers == 0 {
            "workers must be at least 1"
        } else if self.batch_size < 1 {
            "batch_size must be at least 1"
        } else if self.poll_interval.is_zero() {
            "poll_interval must be more than zero"
        } else if self.max_attempts < 1 {
            "max_attempts must be at least 1"
        } else if self.retry_base.is_zero() {
            "retry_base must be more than zero"
        } else if self.retry_max < self.retry_base {
            "retry_max must be at least retry_base"
        } else if self.full_scan_interval.is_zero() {
            "full_scan_interval must be more than zero"
        } else if self.max_message_bytes == 0 {
            "max_message_bytes must be at least 1"
        } else {
            return Ok(());
        };
        Err(Error::Config(problem.to_owned()))
    }

    /// The delay before the next attempt of an event that has failed `attempts`
    /// times before this failure: exponential, capped, with "equal jitter" (a
    /// random point in the upper half) so that events failing together do not
    /// retry in lockstep.
    pub fn retry_delay(&self, attempts: i32) -> Duration {
        let exponent = attempts.clamp(0, 30) as u32;
        let ceiling = self.retry_base.saturating_mul(1 << exponent).min(self.retry_max);
        ceiling.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// A running relay pool.
pub struct Relay {
    tasks: JoinSet<()>,
    status: RelayStatus,
    waker: RelayWaker,
}

/// Wakes a relay's idle workers. A writer in the relay's own process calls
/// [`RelayWaker::wake`] after committing events, so they are published at once
/// without a `NOTIFY` (whose commit-time lock serialises every notifying
/// transaction). Events committed by other processes are found by polling, or
/// by `LISTEN` when their writers call [`crate::notify`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RelayWaker(Arc<Notify>);

impl RelayWaker {
    /// Wakes every worker waiting for work; a busy worker claims again anyway.
    pub fn wake(&self) {
        self.0.notify_waiters();
    }
}

/// Cheap, cloneable view of the pool's broker connectivity, for readiness checks.
#[derive(Debug, Clone)]
pub struct RelayStatus {
    /// Workers holding a usable broker channel, each counted by a [`CountGuard`].
    connected_workers: Arc<AtomicUsize>,
    /// Why the topology cannot be declared (a queue that exists with other
    /// arguments), until a declaration succeeds.
    topology: TopologyStatus,
    /// The broker's state as the workers last saw it, and since when.
    transport: Arc<std::sync::Mutex<(TransportState, DateTime<Utc>)>>,
}

impl Default for RelayStatus {
    fn default() -> Self {
        Self {
            connected_workers: Arc::default(),
            topology: TopologyStatus::default(),
            transport: Arc::new(std::sync::Mutex::new((TransportState::Down, Utc::now()))),
        }
    }
}

impl RelayStatus {
    /// The broker's state as the workers last saw it (down until a worker has
    /// connected), and since when.
    pub fn transport(&self) -> (TransportState, DateTime<Utc>) {
        *self.transport.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `state`; returns how long the previous state had lasted when it changed.
    fn set_transport(&self, state: TransportState) -> Option<(TransportState, Duration)> {
        let mut current = self.transport.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 == state {
            return None;
        }
        let now = Utc::now();
        let (previous, since) = std::mem::replace(&mut *current, (state, now));
        Some((previous, (now - since).to_std().unwrap_or_default()))
    }

    /// Whether at least one worker holds a usable broker channel.
    pub fn broker_connected(&self) -> bool {
        self.connected_workers.load(Ordering::Relaxed) > 0
    }

    /// The reason the broker's topology disagrees with this service, if it does.
    pub fn topology_error(&self) -> Option<String> {
        self.topology.error()
    }
}

impl Relay {
    /// Checks `config`, then starts the listener and `config.workers` workers
    /// publishing through `transport`. They run until `shutdown` is cancelled; a
    /// worker then finishes (or rolls back) its batch and stops.
    pub fn spawn<T: Transport>(
        db: PgPool,
        transport: T,
        config: RelayConfig,
        metrics: RelayMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        Self::spawn_supervised(db, transport, config, metrics, &Supervisor::unregistered(shutdown))
    }

    /// Like [`Relay::spawn`], under `supervisor`, which restarts a task that
    /// panics and stops them all with its shutdown token.
    pub fn spawn_supervised<T: Transport>(
        db: PgPool,
        transport: T,
        config: RelayConfig,
        metrics: RelayMetrics,
        supervisor: &Supervisor,
    ) -> Result<Self> {
        config.validate()?;
        let transport = Arc::new(transport);
        let shutdown = supervisor.shutdown().clone();
        let waker = RelayWaker::default();
        let wakeup = waker.0.clone();
        let status = RelayStatus::default();
        let config = Arc::new(config);
        let mut tasks = JoinSet::new();
        let (listener_db, listener_wakeup, listener_shutdown) =
            (db.clone(), wakeup.clone(), shutdown.clone());
        supervisor.spawn(&mut tasks, "outbox-listener", move || {
            listener::run(listener_db.clone(), listener_wakeup.clone(), listener_shutdown.clone())
        });
        for worker in 0..config.workers {
            let worker = Worker {
                name: format!("outbox-relay-{worker}"),
                db: db.clone(),
                transport: transport.clone(),
                config: config.clone(),
                metrics: metrics.clone(),
                wakeup: wakeup.clone(),
                status: status.clone(),
                shutdown: shutdown.clone(),
            };
            supervisor.spawn(&mut tasks, worker.name.clone(), move || worker.clone().run());
        }
        tracing::info!(workers = config.workers, batch_size = config.batch_size, "relay started");
        Ok(Self { tasks, status, waker })
    }

    /// The pool's broker connectivity, for readiness checks.
    pub fn status(&self) -> RelayStatus {
        self.status.clone()
    }

    /// The handle that wakes this relay's workers.
    pub fn waker(&self) -> RelayWaker {
        self.waker.clone()
    }

    /// Waits until every task has stopped (after the shutdown token was cancelled).
    pub async fn join(mut self) {
        while let Some(result) = self.tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "relay task panicked");
            }
        }
        tracing::info!("relay stopped");
    }
}

struct Worker<T: Transport> {
    name: String,
    db: PgPool,
    transport: Arc<T>,
    config: Arc<RelayConfig>,
    metrics: RelayMetrics,
    wakeup: Arc<Notify>,
    status: RelayStatus,
    shutdown: CancellationToken,
}

impl<T: Transport> Clone for Worker<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            db: self.db.clone(),
            transport: self.transport.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            wakeup: self.wakeup.clone(),
            status: self.status.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<T: Transport> Worker<T> {
    async fn run(self) {
        let mut publisher: Option<(T::Publisher, CountGuard)> = None;
        let mut floor = ClaimFloor::default();
        let mut trouble = Backoff::new();
        // After a failure of the transport, one event at a time until one goes through.
        let mut probing = false;
        while !self.shutdown.is_cancelled() {
            if !publisher.as_ref().is_some_and(|(publisher, _)| publisher.is_usable()) {
                publisher = self.reconnect(publisher.take()).await;
            }
            let Some((current, _)) = &publisher else {
                self.pause(trouble.next_pause()).await;
                continue;
            };
            if current.is_blocked() {
                // Claim nothing while the broker asks for a pause: the events
                // keep their attempts and no row lock is held.
                self.transport_is(TransportState::Blocked, "the broker blocked publishing");
                self.pause(BLOCKED_RECHECK).await;
                continue;
            }
            self.config.crash_switch.check(&self.name);

            // Register for a wake-up before looking for work, so that a commit
            // landing between the claim and the wait is not missed.
            let wakeup = self.wakeup.notified();
            tokio::pin!(wakeup);
            wakeup.as_mut().enable();

            let from = floor.next(&self.config);
            let limit = if probing { 1 } else { self.config.batch_size };
            let result =
                relay_pass(&self.db, current, &self.config, &self.metrics, from, limit).await;
            floor.observe(&result, limit);
            match result {
                Ok(pass) if pass.unknown > 0 => {
                    // The transport failed mid-batch: no event is to blame.
                    let retry_in = trouble.next_pause();
                    self.transport_is(TransportState::Down, "the broker did not confirm a batch");
                    tracing::warn!(worker = %self.name, unknown = pass.unknown,
                        published = pass.published, retry_in_ms = retry_in.as_millis() as u64,
                        "the broker did not settle a batch; backing off, no attempt spent");
                    probing = true;
                    self.pause(retry_in).await;
                }
                // There may be more: claim again without sleeping.
                Ok(pass) if pass.claimed > 0 => {
                    trouble.reset();
                    probing = false;
                    if pass.published > 0 || pass.failed > 0 {
                        self.transport_is(TransportState::Up, "");
                    }
                }
                Ok(_) => {
                    trouble.reset();
                    tokio::select! {
                        () = wakeup => {}
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                }
                Err(error) => {
                    let retry_in = trouble.next_pause();
                    if matches!(error, Error::Database(_)) {
                        tracing::warn!(worker = %self.name, %error,
                            retry_in_ms = retry_in.as_millis() as u64,
                            "relay pass failed on the database; retrying");
                    } else {
                        self.transport_is(TransportState::Down, &error.to_string());
                        tracing::warn!(worker = %self.name, %error,
                            retry_in_ms = retry_in.as_millis() as u64,
                            "the broker failed a batch; backing off, no attempt spent");
                        probing = true;
                    }
                    self.pause(retry_in).await;
                }
            }
        }
        if let Some((publisher, connected)) = publisher.take() {
            drop(connected);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, publisher.close()).await;
        }
    }

    /// Records what this worker saw of the broker, saying so when it changed.
    fn transport_is(&self, state: TransportState, reason: &str) {
        let Some((previous, lasted)) = self.status.set_transport(state) else { return };
        self.metrics.transport_changed(state);
        let lasted_s = lasted.as_secs_f64();
        match state {
            TransportState::Up => tracing::info!(worker = %self.name, %previous, lasted_s,
                "the broker is up again"),
            TransportState::Blocked => tracing::warn!(worker = %self.name, %previous, lasted_s,
                "the broker blocked publishing (a resource alarm); events wait in the outbox"),
            TransportState::Down => tracing::warn!(worker = %self.name, %previous, lasted_s,
                reason, "the broker is down; events wait in the outbox"),
        }
    }

    async fn reconnect(
        &self,
        old: Option<(T::Publisher, CountGuard)>,
    ) -> Option<(T::Publisher, CountGuard)> {
        if let Some((old, connected)) = old {
            drop(connected);
            tracing::warn!(worker = %self.name, "broker channel lost; reconnecting");
            // Politely if the broker answers; a partitioned one would never.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, old.close()).await;
        }
        match self.transport.connect(&self.name).await {
            Ok(publisher) => {
                tracing::info!(worker = %self.name, "connected to the broker");
                self.status.topology.set(None);
                self.transport_is(TransportState::Up, "");
                Some((publisher, CountGuard::new(&self.status.connected_workers)))
            }
            Err(error @ Error::TopologyMismatch { .. }) => {
                // Not transient: said loudly, retried calmly; orders are still
                // taken and wait in the outbox until the queue is fixed.
                tracing::error!(worker = %self.name, error = %error,
                    "the broker's queue does not match this service's settings; events wait in the outbox");
                self.status.topology.set(Some(error.to_string()));
                self.transport_is(TransportState::Down, "topology mismatch");
                None
            }
            Err(error) => {
                tracing::warn!(worker = %self.name, %error,
                    "cannot reach the broker; events wait in the outbox");
                self.transport_is(TransportState::Down, &error.to_string());
                None
            }
        }
    }

    async fn pause(&self, duration: Duration) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.shutdown.cancelled() => {}
        }
    }
}

/// Where a worker's next claim starts in the due index.
///
/// Published events are deleted, but their index entries stay until vacuum
/// removes them, and vacuum cannot while any transaction older than them is
/// open. A claim that scans the due index from its start wades through all of
/// them: measured, 0.7 s per claim with a million dead entries behind a held
/// snapshot. So a worker starts its claims at `claim_lookback` before the newest
/// `next_attempt_at` it has claimed. Nothing due can hide below that floor but an
/// event whose transaction took longer than the lookback to commit (its
/// `next_attempt_at` is its transaction's start), or one a broken channel left
/// unconfirmed; those are found by a full scan, which a worker makes at start,
/// after a failed pass or an unknown outcome, and every `full_scan_interval`.
/// A full scan that claims a whole batch starting below the floor has found
/// late events, and there may be more: the next claim is a full scan again,
/// until one claims less than a batch or nothing below the floor. So a burst
/// of late commits waits at most `full_scan_interval`, then drains at the
/// relay's full speed.
#[derive(Debug, Default)]
pub struct ClaimFloor {
    newest_claimed: Option<DateTime<Utc>>,
    last_full_scan: Option<tokio::time::Instant>,
    /// The floor a claim would have had, when the last claim was a full scan.
    full_scan_below: Option<Option<DateTime<Utc>>>,
}

impl ClaimFloor {
    /// The lower bound of the next claim; `None` for a full scan.
    pub fn next(&mut self, config: &RelayConfig) -> Option<DateTime<Utc>> {
        let now = tokio::time::Instant::now();
        let full_scan_due = self
            .last_full_scan
            .is_none_or(|last| now.duration_since(last) >= config.full_scan_interval);
        let floor = self.newest_claimed.and_then(|newest| {
            Some(newest - chrono::Duration::from_std(config.claim_lookback).ok()?)
        });
        if floor.is_some() && !full_scan_due {
            self.full_scan_below = None;
            return floor;
        }
        self.last_full_scan = Some(now);
        self.full_scan_below = Some(floor);
        None
    }

    /// Learns from a pass that claimed at most `limit` events: moves up with
    /// what it claimed; forgets the floor when the pass failed or left events
    /// unconfirmed, so the next claim finds them; asks for another full scan
    /// when this one found a batch of late events.
    pub fn observe(&mut self, pass: &Result<Pass>, limit: i64) {
        let Ok(pass) = pass else {
            *self = Self::default();
            return;
        };
        if pass.unknown > 0 {
            *self = Self::default();
            return;
        }
        if let Some(floor) = self.full_scan_below.take() {
            let full_batch = i64::try_from(pass.claimed).unwrap_or(i64::MAX) >= limit;
            let started_below = match (pass.oldest_claimed, floor) {
                (Some(oldest), Some(floor)) => oldest < floor,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if full_batch && started_below {
                self.last_full_scan = None;
            }
        }
        self.newest_claimed = self.newest_claimed.max(pass.newest_claimed);
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Events claimed.
    pub claimed: usize,
    /// Events the broker confirmed, now deleted.
    pub published: usize,
    /// Events that failed (including unroutable and invalid ones), recorded
    /// with a retry time or parked.
    pub failed: usize,
    /// Events whose fate is unknown (the transport failed before the broker
    /// answered) in a pass where nothing was confirmed: left as they were,
    /// attempts unspent, to be published again; the worker backs off.
    pub unknown: usize,
    /// Events the broker did not settle while it confirmed others: due again
    /// after `retry_base` or so, attempts unspent.
    pub deferred: usize,
    /// Events that became dead in this pass.
    pub dead: u64,
    /// The earliest `next_attempt_at` among the claimed events.
    pub oldest_claimed: Option<DateTime<Utc>>,
    /// The latest `next_attempt_at` among the claimed events.
    pub newest_claimed: Option<DateTime<Utc>>,
}

/// One pass over the whole due index: claim a batch, publish it, delete what was
/// confirmed, record the failures, commit. Public so tests can drive the relay
/// step by step.
pub async fn relay_batch<P: Publisher>(
    db: &PgPool,
    publisher: &P,
    config: &RelayConfig,
    metrics: &RelayMetrics,
) -> Result<Pass> {
    relay_batch_from(db, publisher, config, metrics, None).await
}

/// [`relay_batch`], claiming only events due at or after `from` (see [`ClaimFloor`]).
pub async fn relay_batch_from<P: Publisher>(
    db: &PgPool,
    publisher: &P,
    config: &RelayConfig,
    metrics: &RelayMetrics,
    from: Option<DateTime<Utc>>,
) -> Result<Pass> {
    relay_pass(db, publisher, config, metrics, from, config.batch_size).await
}

/// [`relay_batch_from`], claiming at most `limit` events.
async fn relay_pass<P: Publisher>(
    db: &PgPool,
    publisher: &P,
    config: &RelayConfig,
    metrics: &RelayMetrics,
    from: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Pass> {
    let mut tx = db.begin().await?;
    let claimed = store::claim_due(&mut tx, limit, from).await?;
    if claimed.is_empty() {
        return Ok(Pass::default());
    }
    // What no broker would take is not sent: parked at once with the reason.
    let (events, too_large): (Vec<OutboxEvent>, Vec<OutboxEvent>) =
        claimed.iter().cloned().partition(|event| event.size_bytes() <= config.max_message_bytes);
    // A broker error here drops `tx`, which rolls back: the events stay as they were.
    let outcomes = if events.is_empty() { Vec::new() } else { publisher.publish(&events).await? };
    if outcomes.len() != events.len() {
        return Err(Error::broker(std::io::Error::other(format!(
            "the transport answered {} outcomes for {} events",
            outcomes.len(),
            events.len()
        ))));
    }

    metrics.batch_size.observe(claimed.len() as f64);
    let confirmed_at = Utc::now();
    let mut confirmed = Vec::with_capacity(events.len());
    let mut failures = Vec::new();
    let mut unknown = Vec::new();
    let refused = too_large.iter().map(|event| {
        let reason = format!(
            "{} bytes, over the relay's limit of {} (RELAY_MAX_MESSAGE_BYTES)",
            event.size_bytes(),
            config.max_message_bytes
        );
        (event, Outcome::Invalid(reason))
    });
    for (event, outcome) in events.iter().zip(outcomes).chain(refused) {
        match outcome {
            Outcome::Confirmed => {
                let latency = (confirmed_at - event.created_at).to_std().unwrap_or_default();
                metrics.commit_to_confirm_seconds.observe(latency.as_secs_f64());
                confirmed.push(event.id);
            }
            Outcome::Failed(error) => {
                tracing::warn!(message_id = %event.id, attempts = event.attempts + 1, %error,
                    "event not published");
                failures.push(Failure {
                    id: event.id,
                    error,
                    retry_in_ms: config.retry_delay(event.attempts).as_millis() as i64,
                    kind: FailureKind::Attempt,
                });
            }
            Outcome::Invalid(error) => {
                tracing::error!(message_id = %event.id, event_type = %event.event_type, %error,
                    "event can never be published; parked as dead");
                failures.push(Failure {
                    id: event.id,
                    error: format!("cannot be published: {error}"),
                    retry_in_ms: 0,
                    kind: FailureKind::Park,
                });
            }
            Outcome::Unroutable(error) => {
                let (kind, retry_in) = match config.unroutable {
                    Unroutable::Park => (FailureKind::Park, Duration::ZERO),
                    Unroutable::Retry => (FailureKind::Wait, config.retry_delay(i32::MAX)),
                };
                tracing::warn!(message_id = %event.id, routing_key = %event.routing_key(),
                    policy = ?config.unroutable, %error, "event is unroutable");
                failures.push(Failure {
                    id: event.id,
                    error: format!("unroutable: {error}"),
                    retry_in_ms: retry_in.as_millis() as i64,
                    kind,
                });
            }
            Outcome::Unknown => unknown.push(event.id),
        }
    }
    // The broker confirmed others of this batch, so it works: those it did not
    // settle (a partition whose leader moved, say) wait a little, without an
    // attempt, instead of holding the whole relay back with them.
    let deferred = if confirmed.is_empty() { Vec::new() } else { std::mem::take(&mut unknown) };
    let waits = deferred.iter().map(|id| Failure {
        id: *id,
        error: "not confirmed while others were: the broker's trouble, no attempt spent".to_owned(),
        retry_in_ms: config.retry_delay(0).as_millis() as i64,
        kind: FailureKind::Wait,
    });
    store::delete(&mut tx, &confirmed).await?;
    let recorded: Vec<Failure> = failures.iter().cloned().chain(waits).collect();
    let dead = if recorded.is_empty() {
        0
    } else {
        store::record_failures(&mut tx, &recorded, config.max_attempts).await?
    };
    tx.commit().await?;

    metrics.published.inc_by(confirmed.len() as u64);
    metrics.publish_failures.inc_by(failures.len() as u64);
    metrics.dead.inc_by(dead);
    if dead > 0 {
        tracing::error!(
            dead,
            "events reached the attempt limit or can never be published, and were marked dead"
        );
    }
    Ok(Pass {
        claimed: claimed.len(),
        published: confirmed.len(),
        failed: failures.len(),
        unknown: unknown.len(),
        deferred: deferred.len(),
        dead,
        oldest_claimed: claimed.iter().map(|event| event.next_attempt_at).min(),
        newest_claimed: claimed.iter().map(|event| event.next_attempt_at).max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_within_jitter_and_stop_at_the_cap() {
        let config = RelayConfig {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..RelayConfig::default()
        };
        for _ in 0..100 {
            for attempts in 0..4 {
                let ceiling = Duration::from_millis(100 << attempts);
                let delay = config.retry_delay(attempts);
                assert!(delay >= ceiling / 2 && delay <= ceiling, "{attempts}: {delay:?}");
            }
            let capped = config.retry_delay(20);
            assert!(capped >= Duration::from_secs(1) && capped <= Duration::from_secs(2));
        }
    }
}
