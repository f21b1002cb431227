//! Group commit: the orders of concurrent `POST /orders` requests are written
//! together, in one transaction with one statement per table for the whole batch.
//!
//! A handler hands its validated order to the [`OrderWriter`] and awaits the
//! answer. Each writer task takes whatever is queued, up to `WRITE_BATCH_MAX`,
//! and never waits to fill a batch: a lone request is written at once (after one
//! turn of the scheduler, which lets the requests being handled on the other
//! threads join it), and under load the requests that arrive during one commit
//! form the next batch. A commit
//! costs one WAL flush and a handful of round trips whatever the batch's size;
//! that is where the throughput comes from.
//!
//! The writers take turns at the queue: one holds it from taking its batch until
//! it sends that batch's `COMMIT`, then the next takes what has queued meanwhile
//! and writes while the first waits for its WAL flush. So at most one batch is
//! being staged at a time, and a writer that is free does not take the one order
//! that has just arrived while another writer is still staging (which, with the
//! writers taking the queue as soon as they were free, made a quarter of the
//! transactions single orders even at 128 requests in flight). A batch that
//! cannot be staged (the database does not answer) keeps the other writers
//! waiting, up to COMMIT_DEADLINE: they could not have written either. With
//! `WRITE_BATCH_MAX=1` there are no turns: the writers write side by side.
//!
//! Each order still commits atomically with its lines, its event and its
//! Idempotency-Key, and what concerns one request is answered for it alone:
//! - an unknown SKU is found in the batch's one price lookup; that order is left out;
//! - the keys are inserted first (`ON CONFLICT DO NOTHING`): an order whose key
//!   another request committed first is not written at all;
//! - of two requests with one key in a batch only the first is written; the
//!   second is answered after it, as a retry of it;
//! - when the database refuses the batch for its data (an error of one order's
//!   making, say), the batch is rolled back and its orders are written one by
//!   one, so the error reaches only the request that causes it. Any other error
//!   (the database cannot be reached, is shutting down, the connection breaks)
//!   reaches every request of the batch, and none is written again;
//! - every answer is true. A transaction that fails before its `COMMIT` is sent
//!   wrote nothing. When the answer to `COMMIT` is lost (the connection breaks,
//!   or no answer comes within COMMIT_DEADLINE), the outcome is asked of the
//!   database on another connection ([`crate::commit`]): committed, the batch's
//!   requests get their orders (201); rolled back, a retryable 503; not known,
//!   `commit_outcome_unknown`, which tells the client to retry only with the same
//!   Idempotency-Key;
//! - a request that is gone (timed out, client disconnected) before its batch
//!   is formed is not written; once its batch is formed, its request timeout no
//!   longer answers for it: the batch's outcome does, within 2 × COMMIT_DEADLINE
//!   per transaction it takes (one, unless the batch is refused for its data
//!   and written again order by order).
//!
//! After a commit the writer wakes the in-process relay, which publishes the
//! events at once; no `NOTIFY` is needed (see the migration that dropped it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use order_events::{OrderPlaced, OrderPlacedLine};
use outbox::relay::RelayWaker;
use outbox::supervisor::Supervisor;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::commit::{self, CommitOutcome, XactId};
use crate::error::{ApiError, Result};
use crate::idempotency::IdempotencyKey;
use crate::orders::{Order, OrderLine, ValidLine};

/// A validated order, waiting to be written.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub customer_id: String,
    pub lines: Vec<ValidLine>,
    /// The request's Idempotency-Key, with the request as JSON, which a retry
    /// must match.
    pub key: Option<(IdempotencyKey, Value)>,
    /// Headers stored with the order's event: the W3C trace context of its
    /// producer span (`traceparent`, `tracestate`).
    pub trace: HashMap<String, String>,
}

/// What became of one order.
#[derive(Debug)]
pub enum Written {
    /// Committed, PENDING.
    Placed(Order),
    /// Nothing was written: the order's Idempotency-Key belongs to an order
    /// another request placed. Answer with that request's response.
    KeyTaken,
}

/// How the writer batches.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most orders per transaction; 1 writes each order in a transaction of its own.
    pub max_batch: usize,
    /// Writer tasks, each with at most one transaction open.
    pub concurrency: usize,
    /// How each transaction is written.
    pub write: WriteOptions,
}

/// How one batch's transaction is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Also `NOTIFY` the outbox channel in each transaction, for relays in other
    /// processes (see [`outbox::notify`] for its cost).
    pub notify: bool,
    /// Longest a transaction may take, from taking a connection to the answer
    /// to its `COMMIT`; when that answer is late or lost, finding out the
    /// outcome may take as long again.
    pub commit_deadline: Duration,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { notify: false, commit_deadline: Duration::from_secs(5) }
    }
}

/// The handle handlers write through. Cheap to clone.
#[derive(Clone)]
pub struct OrderWriter {
    queue: mpsc::Sender<Job>,
}

struct Job {
    order: NewOrder,
    answer: oneshot::Sender<Result<Written>>,
    /// Who has the job: [`QUEUED`] until a writer takes it into a batch
    /// ([`TAKEN`]) or its request gives up waiting ([`ABANDONED`]), whichever
    /// comes first. Once taken, the batch's outcome answers the request.
    state: Arc<AtomicU8>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// The writer's metrics.
#[derive(Clone)]
pub struct WriterMetrics {
    /// Orders per transaction.
    pub batch_size: Histogram,
}

impl WriterMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self { batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)) };
        registry.register(
            "order_write_batch_size",
            "Orders written per database transaction (group commit)",
            metrics.batch_size.clone(),
        );
        metrics
    }
}

impl OrderWriter {
    /// Starts the writer tasks under `supervisor`. They stop once every
    /// `OrderWriter` is dropped and the queue is empty, so requests still being
    /// served at shutdown are written.
    pub fn spawn(
        db: PgPool,
        config: WriterConfig,
        relay: Option<RelayWaker>,
        metrics: WriterMetrics,
        supervisor: &Supervisor,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let max_batch = config.max_batch.max(1);
        let (queue, receiver) = mpsc::channel(max_batch * config.concurrency.max(1) * 2);
        let task = Arc::new(WriterTask {
            db,
            config: WriterConfig { max_batch, ..config },
            relay,
            metrics,
            queue: Mutex::new(receiver),
        });
        for index in 0..config.concurrency.max(1) {
            let task = task.clone();
            supervisor.spawn(tasks, format!("order-writer-{index}"), move || task.clone().run());
        }
        Self { queue }
    }

    /// Writes `order` with whatever other orders are waiting, and says what
    /// became of it. If no writer has taken it into a batch by `deadline`, it is
    /// not written and the answer is [`ApiError::Timeout`]; once taken, the
    /// batch's outcome is awaited whatever the time (the writer bounds it).
    pub async fn write(&self, order: NewOrder, deadline: Instant) -> Result<Written> {
        let (answer, mut answered) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let stopped = || ApiError::Internal(anyhow::anyhow!("the order writer has stopped"));
        let job = Job { order, answer, state: state.clone() };
        match tokio::time::timeout_at(deadline, self.queue.send(job)).await {
            Ok(sent) => sent.map_err(|_| stopped())?,
            Err(_) => return Err(ApiError::Timeout),
        }
        tokio::select! {
            result = &mut answered => return result.map_err(|_| stopped())?,
            () = tokio::time::sleep_until(deadline) => {}
        }
        if state.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Err(ApiError::Timeout); // no writer took it: it will not be written
        }
        answered.await.map_err(|_| stopped())?
    }
}

struct WriterTask {
    db: PgPool,
    config: WriterConfig,
    relay: Option<RelayWaker>,
    metrics: WriterMetrics,
    /// Shared by the writer tasks: the one holding it waits for the next batch,
    /// and keeps it until that batch's `COMMIT` is sent ([`Turn`]).
    queue: Mutex<mpsc::Receiver<Job>>,
}

/// A writer's turn at the queue: held from taking a batch until its `COMMIT` is
/// sent (or its transaction ends without one), then passed on, so that the next
/// writer's batch is made of what arrived while this one was staged.
struct Turn<'q>(Option<MutexGuard<'q, mpsc::Receiver<Job>>>);

impl Turn<'_> {
    /// Lets the next writer take the queue.
    fn pass(&mut self) {
        self.0 = None;
    }
}

impl WriterTask {
    async fn run(self: Arc<Self>) {
        let mut jobs = Vec::with_capacity(self.config.max_batch);
        loop {
            let mut queue = self.queue.lock().await;
            let received = queue.recv_many(&mut jobs, self.config.max_batch).await;
            if received == 0 {
                return; // every sender is gone: the server has stopped
            }
            if jobs.len() < self.config.max_batch {
                // Requests being handled right now on the other threads join
                // this batch: one turn of the scheduler, not a wait for more.
                tokio::task::yield_now().await;
                if !queue.is_empty() {
                    let room = self.config.max_batch - jobs.len();
                    queue.recv_many(&mut jobs, room).await; // at once: some are queued
                }
            }
            // A request that timed out or whose client went away no longer waits
            // for its answer: its order is not written, as before group commit a
            // dropped request rolled its transaction back. The others are taken:
            // from here on their batch's outcome answers them.
            let before = jobs.len();
            jobs.retain(|job| {
                !job.answer.is_closed()
                    && job
                        .state
                        .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            });
            if jobs.len() < before {
                tracing::warn!(
                    orders = before - jobs.len(),
                    "requests gone before their orders were written; not writing them"
                );
            }
            if jobs.is_empty() {
                continue;
            }
            let (orders, answers): (Vec<NewOrder>, Vec<_>) =
                jobs.drain(..).map(|job| (job.order, job.answer)).unzip();
            // Batches of one (WRITE_BATCH_MAX=1) are written side by side, as
            // many as WRITE_CONCURRENCY: there is no batch to fill.
            let mut turn = Turn((self.config.max_batch > 1).then_some(queue));
            let results =
                write_in_turn(&self.db, &orders, self.config.write, &self.metrics, &mut turn).await;
            turn.pass();
            if let Some(relay) = &self.relay
                && results.iter().any(|result| matches!(result, Ok(Written::Placed(_))))
            {
                relay.wake();
            }
            for (answer, result) in answers.into_iter().zip(results) {
                // A client that went away while its batch was being written gets
                // no answer; its order stands (a retry with its key says so).
                let _ = answer.send(result);
            }
        }
    }
}

/// Writes `orders` as one batch where it can and returns what became of each, in
/// order. Public for the tests that compose batches.
pub async fn write_batch(
    db: &PgPool,
    orders: &[NewOrder],
    options: WriteOptions,
    metrics: &WriterMetrics,
) -> Vec<Result<Written>> {
    write_in_turn(db, orders, options, metrics, &mut Turn(None)).await
}

/// [`write_batch`], passing `turn` on as the batch's `COMMIT` is sent.
async fn write_in_turn(
    db: &PgPool,
    orders: &[NewOrder],
    options: WriteOptions,
    metrics: &WriterMetrics,
    turn: &mut Turn<'_>,
) -> Vec<Result<Written>> {
    // Two requests with one key: the first leads, the others follow it.
    let mut leaders = Vec::with_capacity(orders.len());
    let mut followers = Vec::new();
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    for (index, order) in orders.iter().enumerate() {
        match &order.key {
            Some((key, _)) => match first_with_key.get(key.as_str()) {
                Some(&leader) => followers.push((index, leader)),
                None => {
                    first_with_key.insert(key.as_str(), index);
                    leaders.push(index);
                }
            },
            None => leaders.push(index),
        }
    }
    let mut results: Vec<Option<Result<Written>>> = orders.iter().map(|_| None).collect();
    let members: Vec<&NewOrder> = leaders.iter().map(|&index| &orders[index]).collect();
    let written = write_members(db, &members, options, metrics, turn).await;
    for (index, result) in leaders.iter().zip(written) {
        results[*index] = Some(result);
    }
    for (follower, leader) in followers {
        results[follower] = Some(match &results[leader] {
            // The key is committed now, with the leader's response.
            Some(Ok(_)) => Ok(Written::KeyTaken),
            // The leader wrote nothing: the follower has a try of its own.
            _ => write_alone(db, &orders[follower], options, metrics).await,
        });
    }
    results.into_iter().map(|result| result.expect("every order answered")).collect()
}

async fn write_members(
    db: &PgPool,
    orders: &[&NewOrder],
    options: WriteOptions,
    metrics: &WriterMetrics,
    turn: &mut Turn<'_>,
) -> Vec<Result<Written>> {
    let written = write_transaction(db, orders, options, metrics, turn).await;
    // Whatever follows (writing the orders one by one, the followers) is no
    // reason to keep the other writers from the queue.
    turn.pass();
    let error = match written {
        Ok(results) => return results,
        Err(BatchError::OutcomeUnknown(reason)) => {
            tracing::error!(orders = orders.len(), %reason,
                "the outcome of a batch's COMMIT is unknown; its requests are told so");
            return orders
                .iter()
                .map(|_| Err(ApiError::CommitOutcomeUnknown(reason.clone())))
                .collect();
        }
        Err(BatchError::NotWritten(error)) => error,
    };
    if !refused_by_data(&error) {
        // The database as a whole, not one order: every order gets the error,
        // and none is written again now.
        tracing::error!(orders = orders.len(), error = %error, "writing a batch of orders failed");
        return orders.iter().map(|_| Err(ApiError::batch_failed(&error))).collect();
    }
    if orders.len() == 1 {
        return vec![Err(error.into())];
    }
    tracing::warn!(orders = orders.len(), error = %error,
        "the database refused a batch of orders; writing them one by one");
    let mut results = Vec::with_capacity(orders.len());
    for order in orders {
        results.push(write_alone(db, order, options, metrics).await);
    }
    results
}

async fn write_alone(
    db: &PgPool,
    order: &NewOrder,
    options: WriteOptions,
    metrics: &WriterMetrics,
) -> Result<Written> {
    match write_transaction(db, &[order], options, metrics, &mut Turn(None)).await {
        Ok(mut results) => results.pop().expect("one result for one order"),
        Err(BatchError::NotWritten(error)) => Err(error.into()),
        Err(BatchError::OutcomeUnknown(reason)) => Err(ApiError::CommitOutcomeUnknown(reason)),
    }
}

/// Why a batch's transaction did not (certainly) commit.
#[derive(Debug)]
enum BatchError {
    /// Nothing was written: the transaction failed before its `COMMIT` was
    /// sent, or was rolled back (the database said so, or said so when asked).
    NotWritten(sqlx::Error),
    /// `COMMIT` was sent and its outcome could not be learnt (the text says why).
    OutcomeUnknown(String),
}

/// Whether the database refused the transaction for its data, so that one
/// order may be the cause and the others can be written without it: a data
/// exception (SQLSTATE class 22), a violated constraint (23), an error raised by
/// a trigger (P0), or a serialization failure or deadlock (40). The transaction
/// is rolled back in each case, so writing its orders again is safe.
fn refused_by_data(error: &sqlx::Error) -> bool {
    let Some(code) = error.as_database_error().and_then(|error| error.code()) else {
        return false;
    };
    ["22", "23", "P0", "40"].iter().any(|class| code.starts_with(class))
}

/// An order priced from the catalogue, before it is written.
struct Priced<'a> {
    order: &'a NewOrder,
    id: Uuid,
    total_cents: i64,
    /// In SKU order, as `GET /orders/{id}` lists them.
    items: Vec<OrderLine>,
}

/// One transaction for `orders`: the outer error is the transaction's (nothing
/// was written, or its outcome is unknown), the inner results each order's.
///
/// Everything up to the answer to `COMMIT` must happen within the commit
/// deadline. Until `COMMIT` is sent, giving up (an error, the deadline) means
/// the transaction cannot commit; after, its outcome is asked of the database.
async fn write_transaction(
    db: &PgPool,
    orders: &[&NewOrder],
    options: WriteOptions,
    metrics: &WriterMetrics,
    turn: &mut Turn<'_>,
) -> std::result::Result<Vec<Result<Written>>, BatchError> {
    let deadline = Instant::now() + options.commit_deadline;
    let late = || {
        BatchError::NotWritten(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the database did not answer within COMMIT_DEADLINE ({:?})",
                options.commit_deadline
            ),
        )))
    };
    let mut conn = match tokio::time::timeout_at(deadline, db.acquire()).await {
        Ok(conn) => conn.map_err(BatchError::NotWritten)?,
        Err(_) => return Err(late()),
    };
    let (xact, error, results, written) = match attempt(&mut conn, orders, options, deadline, turn)
        .await
    {
        Attempt::Done { results, written } => {
            if written > 0 {
                metrics.batch_size.observe(written as f64);
            }
            return Ok(results);
        }
        Attempt::NotWritten(error) => return Err(BatchError::NotWritten(error)),
        Attempt::Late => {
            // The connection is mid-statement: it must not serve anyone again.
            drop(conn.detach());
            return Err(late());
        }
        Attempt::CommitLost { xact, error, results, written } => (xact, error, results, written),
    };
    // The answer to COMMIT is lost: ask another connection what became of it.
    drop(conn.detach());
    tracing::warn!(orders = written, %error, xact = %xact,
        "the answer to COMMIT was lost; asking the database what became of it");
    let placed: Vec<Uuid> = results
        .iter()
        .filter_map(|result| match result {
            Ok(Written::Placed(order)) => Some(order.id),
            _ => None,
        })
        .collect();
    match commit::resolve(db, &xact, &placed, options.commit_deadline).await {
        CommitOutcome::Committed => {
            tracing::info!(orders = written, xact = %xact,
                "the batch whose COMMIT answer was lost had committed");
            metrics.batch_size.observe(written as f64);
            Ok(results)
        }
        CommitOutcome::Aborted => {
            Err(BatchError::NotWritten(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!(
                    "the transaction was rolled back after its COMMIT answer was lost: {error}"
                ),
            ))))
        }
        CommitOutcome::Unknown(reason) => {
            Err(BatchError::OutcomeUnknown(format!("{error}; {reason}")))
        }
    }
}

/// How far one transaction got.
enum Attempt {
    /// Committed (or nothing was left to write: `written` is 0).
    Done { results: Vec<Result<Written>>, written: usize },
    /// Failed before `COMMIT` was sent, or was refused at `COMMIT` for its data:
    /// nothing was written.
    NotWritten(sqlx::Error),
    /// The deadline passed before `COMMIT` was sent: nothing was written.
    Late,
    /// `COMMIT` was sent and its answer is lost (`error` says how).
    CommitLost { xact: XactId, error: String, results: Vec<Result<Written>>, written: usize },
}

async fn attempt(
    conn: &mut PgConnection,
    orders: &[&NewOrder],
    options: WriteOptions,
    deadline: Instant,
    turn: &mut Turn<'_>,
) -> Attempt {
    let (tx, xact, results, written) =
        match tokio::time::timeout_at(deadline, stage(conn, orders, options.notify)).await {
            Ok(Ok(staged)) => staged,
            Ok(Err(error)) => return Attempt::NotWritten(error),
            Err(_) => return Attempt::Late,
        };
    let Some(tx) = tx else { return Attempt::Done { results, written } };
    turn.pass();
    let error = match tokio::time::timeout_at(deadline, tx.commit()).await {
        Ok(Ok(())) => return Attempt::Done { results, written },
        // A deferred check failed at COMMIT: the database rolled it back.
        Ok(Err(error)) if refused_by_data(&error) => return Attempt::NotWritten(error),
        Ok(Err(error)) => error.to_string(),
        Err(_) => {
            format!("no answer to COMMIT within COMMIT_DEADLINE ({:?})", options.commit_deadline)
        }
    };
    Attempt::CommitLost { xact, error, results, written }
}

/// A transaction ready for `COMMIT` (`None` when no order is left to write),
/// its id, each order's result, and how many orders it writes.
type Staged<'c> =
    (Option<sqlx::Transaction<'c, sqlx::Postgres>>, XactId, Vec<Result<Written>>, usize);

/// Begins the transaction and writes every order that can be written, up to
/// but not including `COMMIT`.
async fn stage<'c>(
    conn: &'c mut PgConnection,
    orders: &[&NewOrder],
    notify: bool,
) -> sqlx::Result<Staged<'c>> {
    let mut tx = conn.begin().await?;
    let (prices, created_at, xact) = prices(&mut tx, orders).await?;
    let priced: Vec<Result<Priced>> = orders.iter().map(|order| price(order, &prices)).collect();
    let batch: Vec<&Priced> = priced.iter().filter_map(|priced| priced.as_ref().ok()).collect();
    let mut placed: HashMap<Uuid, Order> =
        batch.iter().map(|priced| (priced.id, priced.to_order(created_at))).collect();
    // Keys first: an order whose key a concurrent request committed (or is
    // committing) first is not written at all.
    let taken = insert_keys(&mut tx, &batch, &placed).await?;
    let winners: Vec<&Priced> =
        batch.iter().copied().filter(|priced| !taken.contains(&priced.id)).collect();
    let written = winners.len();
    if written > 0 {
        insert_orders(&mut tx, &winners).await?;
        let events: Vec<outbox::NewEvent> =
            winners.iter().map(|priced| priced.event()).collect::<outbox::Result<_>>()?;
        outbox::enqueue_many(&mut tx, &events).await?;
        if notify {
            outbox::notify(&mut tx).await?;
        }
    }
    let results = priced
        .into_iter()
        .map(|priced| {
            let id = priced?.id;
            Ok(if taken.contains(&id) {
                Written::KeyTaken
            } else {
                Written::Placed(placed.remove(&id).expect("every priced order was placed"))
            })
        })
        .collect();
    Ok(((written > 0).then_some(tx), xact, results, written))
}

/// The catalogue price of every SKU the orders name, the transaction's start
/// (every order's `created_at`), and the transaction's id, by which its outcome
/// can be asked for if the answer to its `COMMIT` is lost.
async fn prices(
    tx: &mut PgConnection,
    orders: &[&NewOrder],
) -> sqlx::Result<(HashMap<String, i64>, DateTime<Utc>, XactId)> {
    let mut skus: Vec<&str> =
        orders.iter().flat_map(|order| order.lines.iter().map(|line| line.sku.as_str())).collect();
    skus.sort_unstable();
    skus.dedup();
    /// The transaction's start, id and backend, and the SKUs found with their prices.
    type Row = (DateTime<Utc>, String, i32, Option<Vec<String>>, Option<Vec<i64>>);
    let (now, xact, backend, found, prices): Row = sqlx::query_as(
        "SELECT now(), pg_current_xact_id()::text, pg_backend_pid(),
                array_agg(sku), array_agg(price_cents)
         FROM inventory WHERE sku = ANY($1)",
    )
    .bind(&skus)
    .fetch_one(&mut *tx)
    .await?;
    let prices = found.unwrap_or_default().into_iter().zip(prices.unwrap_or_default()).collect();
    Ok((prices, now, XactId { xid: xact, backend }))
}

/// Prices `order`'s lines; a SKU that is not in the catalogue is this order's error.
fn price<'a>(order: &'a NewOrder, prices: &HashMap<String, i64>) -> Result<Priced<'a>> {
    let mut items = Vec::with_capacity(order.lines.len());
    for (index, line) in order.lines.iter().enumerate() {
        let Some(&unit_price_cents) = prices.get(&line.sku) else {
            return Err(ApiError::validation(
                "unknown_sku",
                format!("items[{index}].sku {:?} is not in the catalogue", line.sku),
            ));
        };
        items.push(OrderLine { sku: line.sku.clone(), quantity: line.quantity, unit_price_cents });
    }
    items.sort_unstable_by(|a, b| a.sku.cmp(&b.sku));
    let total_cents =
        items.iter().map(|item| i64::from(item.quantity) * item.unit_price_cents).sum();
    Ok(Priced { order, id: Uuid::now_v7(), total_cents, items })
}

impl Priced<'_> {
    fn to_order(&self, created_at: DateTime<Utc>) -> Order {
        Order {
            id: self.id,
            customer_id: self.order.customer_id.clone(),
            status: "PENDING".to_owned(),
            total_cents: self.total_cents,
            items: self.items.clone(),
            created_at,
            updated_at: created_at,
        }
    }

    fn event(&self) -> outbox::Result<outbox::NewEvent> {
        let event = OrderPlaced {
            order_id: self.id,
            customer_id: self.order.customer_id.clone(),
            lines: self
                .items
                .iter()
                .map(|item| OrderPlacedLine { sku: item.sku.clone(), quantity: item.quantity })
                .collect(),
            total_cents: self.total_cents,
        };
        // Typed (names and version from `outbox::Event`), plus the trace context.
        let event = outbox::NewEvent::from_event(&event)?;
        Ok(self
            .order
            .trace
            .iter()
            .fold(event, |event, (name, value)| event.with_header(name, value)))
    }
}

/// Inserts the orders and their lines, one statement each. `created_at` is the
/// column's default, the transaction's start.
async fn insert_orders(tx: &mut PgConnection, batch: &[&Priced<'_>]) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = batch.iter().map(|priced| priced.id).collect();
    let customers: Vec<&str> =
        batch.iter().map(|priced| priced.order.customer_id.as_str()).collect();
    let totals: Vec<i64> = batch.iter().map(|priced| priced.total_cents).collect();
    sqlx::query(
        "INSERT INTO orders (id, customer_id, total_cents)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[])",
    )
    .bind(&ids)
    .bind(&customers)
    .bind(&totals)
    .execute(&mut *tx)
    .await?;

    let lines = batch.iter().flat_map(|priced| priced.items.iter().map(|item| (priced.id, item)));
    let (order_ids, items): (Vec<Uuid>, Vec<&OrderLine>) = lines.unzip();
    let skus: Vec<&str> = items.iter().map(|item| item.sku.as_str()).collect();
    let quantities: Vec<i32> = items.iter().map(|item| item.quantity).collect();
    let unit_prices: Vec<i64> = items.iter().map(|item| item.unit_price_cents).collect();
    sqlx::query(
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int8[])",
    )
    .bind(&order_ids)
    .bind(&skus)
    .bind(&quantities)
    .bind(&unit_prices)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Stores the Idempotency-Key of each order that has one, with the response it
/// gets, and returns the orders whose key another transaction committed first
/// (their orders are then not written). The key's reference to its order is
/// checked at commit, when the order exists.
async fn insert_keys(
    tx: &mut PgConnection,
    batch: &[&Priced<'_>],
    placed: &HashMap<Uuid, Order>,
) -> sqlx::Result<HashSet<Uuid>> {
    let keyed: Vec<(&str, &Value, Uuid)> = batch
        .iter()
        .filter_map(|priced| {
            let (key, request) = priced.order.key.as_ref()?;
            Some((key.as_str(), request, priced.id))
        })
        .collect();
    if keyed.is_empty() {
        return Ok(HashSet::new());
    }
    let keys: Vec<&str> = keyed.iter().map(|(key, _, _)| *key).collect();
    let requests: Vec<&Value> = keyed.iter().map(|(_, request, _)| *request).collect();
    let order_ids: Vec<Uuid> = keyed.iter().map(|(_, _, id)| *id).collect();
    let bodies: Vec<Value> = order_ids
        .iter()
        .map(|id| serde_json::to_value(&placed[id]))
        .collect::<serde_json::Result<_>>()
        .map_err(|error| sqlx::Error::Encode(error.into()))?;
    let created = i16::try_from(axum::http::StatusCode::CREATED.as_u16()).expect("201 fits");
    let stored: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys
             (idempotency_key, request, order_id, response_status, response_body)
         SELECT key, request, order_id, $4, body
         FROM unnest($1::text[], $2::jsonb[], $3::uuid[], $5::jsonb[])
              AS k(key, request, order_id, body)
         -- In key order, so two batches cannot each wait for a key the other holds.
         ORDER BY key
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING order_id",
    )
    .bind(&keys)
    .bind(&requests)
    .bind(&order_ids)
    .bind(created)
    .bind(&bodies)
    .fetch_all(&mut *tx)
    .await?;
    let stored: HashSet<Uuid> = stored.into_iter().collect();
    Ok(order_ids.into_iter().filter(|id| !stored.contains(id)).collect())
}
