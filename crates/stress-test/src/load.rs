//! The load: workers that place orders and tally every answer.
//!
//! One worker function serves both modes. Closed loop (no rate): a worker sends
//! its next order as soon as its previous one is answered. Open loop (a rate):
//! order `i` is due at `start + i / rate`, and its latency is measured from that
//! due time, not from when a worker got round to sending it. Otherwise a slow
//! server would make the generator send less, and the requests it delayed would
//! never be counted as slow ("coordinated omission").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// SKUs SKU-001 ..= SKU-020 have a million in stock each: orders on them are COMPLETED.
const AMPLE_SKUS: u32 = 20;
/// SKU-021 ..= SKU-025 have 25 each: once taken, orders on them are REJECTED.
const SCARCE_SKUS: std::ops::RangeInclusive<u32> = 21..=25;
/// Error answers kept verbatim for the report, so a failed run says why.
const ERROR_SAMPLES: usize = 5;
/// Largest latency recorded exactly (an hour, in microseconds); longer ones are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

/// How much load to make.
pub struct Plan {
    pub url: String,
    pub limit: Option<u64>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub concurrency: u64,
    pub request_timeout: Duration,
    pub scarce_ratio: f64,
    /// Fraction of placed orders cancelled right after their 201.
    pub cancel_ratio: f64,
    /// Fraction of the others cancelled `late_cancel_after` after their 201.
    pub late_cancel_ratio: f64,
    pub late_cancel_after: Duration,
    /// Send a fresh `Idempotency-Key` with each order.
    pub idempotency_keys: bool,
    /// Attempts after the first for an order that got no answer or a 5xx.
    pub retries: u32,
}

/// What the workers saw, merged.
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub client_errors: u64,
    /// 5xx, and any other status that is neither 2xx nor 4xx.
    pub server_errors: u64,
    pub transport_errors: u64,
    /// Orders sent again (`Plan::retries`).
    pub retries: u64,
    /// 2xx answers whose body held no order id (counted in `ok` too).
    pub unreadable_bodies: u64,
    pub status_codes: BTreeMap<u16, u64>,
    /// Request latency in microseconds, of every request that got an answer.
    pub latency: Histogram<u64>,
    /// The orders the service said it created.
    pub ids: Vec<Uuid>,
    /// Cancels sent (`Plan::cancel_ratio`, `Plan::late_cancel_ratio`), the
    /// orders whose cancel was accepted, and the cancels refused with 409.
    pub cancels: u64,
    pub cancelled: Vec<Uuid>,
    pub cancels_not_cancellable: u64,
    pub error_samples: Vec<String>,
    /// From the start of the load to its last answer.
    pub elapsed: Duration,
}

impl Tally {
    fn new() -> Self {
        Self {
            sent: 0,
            ok: 0,
            client_errors: 0,
            server_errors: 0,
            transport_errors: 0,
            retries: 0,
            unreadable_bodies: 0,
            status_codes: BTreeMap::new(),
            latency: micros_histogram(),
            ids: Vec::new(),
            cancels: 0,
            cancelled: Vec::new(),
            cancels_not_cancellable: 0,
            error_samples: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.sent += 1;
        let status = match outcome {
            Outcome::Created { status, id } => {
                self.ok += 1;
                match id {
                    Some(id) => self.ids.push(id),
                    None => self.unreadable_bodies += 1,
                }
                status
            }
            Outcome::Refused { status, body } => {
                if (400..500).contains(&status) {
                    self.client_errors += 1;
                } else {
                    self.server_errors += 1;
                }
                self.sample(|| format!("HTTP {status}: {body}"));
                status
            }
            Outcome::Failed(error) => {
                self.transport_errors += 1;
                self.sample(|| error);
                return;
            }
        };
        *self.status_codes.entry(status).or_default() += 1;
        self.latency.saturating_record(u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS));
    }

    fn record_cancel(&mut self, id: Uuid, answer: CancelAnswer) {
        self.cancels += 1;
        match answer {
            CancelAnswer::Accepted => self.cancelled.push(id),
            CancelAnswer::NotCancellable => self.cancels_not_cancellable += 1,
            CancelAnswer::Failed => {
                self.sample(|| format!("the cancel of order {id} was not accepted"));
            }
        }
    }

    fn sample(&mut self, describe: impl FnOnce() -> String) {
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(describe());
        }
    }

    fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.transport_errors += other.transport_errors;
        self.retries += other.retries;
        self.unreadable_bodies += other.unreadable_bodies;
        for (status, count) in other.status_codes {
            *self.status_codes.entry(status).or_default() += count;
        }
        self.latency.add(&other.latency).expect("histograms of the same bounds add up");
        self.ids.extend(other.ids);
        self.cancels += other.cancels;
        self.cancelled.extend(other.cancelled);
        self.cancels_not_cancellable += other.cancels_not_cancellable;
        for sample in other.error_samples {
            self.sample(|| sample);
        }
    }
}

/// A histogram of microseconds, 1 µs to an hour, three significant figures.
pub fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// What became of one request.
enum Outcome {
    /// A 2xx; `id` is the order's, if the body could be read.
    Created { status: u16, id: Option<Uuid> },
    /// Any other status, with the start of the body.
    Refused { status: u16, body: String },
    /// No answer: connection refused or reset, timeout, body cut short.
    Failed(String),
}

impl Outcome {
    /// No answer, or one that says "not now" rather than "no": a retry with the
    /// same Idempotency-Key may succeed, and cannot create the order twice.
    fn is_worth_retrying(&self) -> bool {
        match self {
            Self::Failed(_) => true,
            Self::Refused { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            Self::Created { .. } => false,
        }
    }
}

/// State shared by the workers.
struct Shared {
    client: reqwest::Client,
    /// Parsed once: parsing it for every request was a tenth of the load
    /// generator's CPU.
    orders_url: reqwest::Url,
    limit: Option<u64>,
    rate: Option<f64>,
    scarce_ratio: f64,
    cancel_ratio: f64,
    late_cancel_ratio: f64,
    late_cancel_after: Duration,
    idempotency_keys: bool,
    retries: u32,
    start: Instant,
    deadline: Option<Instant>,
    /// The index of the next order to send, taken by whichever worker is free.
    next: AtomicU64,
    progress: ProgressBar,
    shutdown: CancellationToken,
}

/// Runs the load until the order limit or the duration is reached, or `shutdown`
/// is cancelled; requests in flight are always answered (or time out) first.
pub async fn run(
    plan: &Plan,
    progress: ProgressBar,
    shutdown: CancellationToken,
) -> anyhow::Result<Tally> {
    let client = reqwest::Client::builder()
        .timeout(plan.request_timeout)
        // One pooled connection per worker stays open between requests.
        .pool_max_idle_per_host(usize::try_from(plan.concurrency).unwrap_or(usize::MAX))
        // A redirect is not an answer the API gives: count it, do not follow it.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        client,
        orders_url: orders_url(&plan.url)?,
        limit: plan.limit,
        rate: plan.rate,
        scarce_ratio: plan.scarce_ratio,
        cancel_ratio: plan.cancel_ratio,
        late_cancel_ratio: plan.late_cancel_ratio,
        late_cancel_after: plan.late_cancel_after,
        idempotency_keys: plan.idempotency_keys,
        retries: plan.retries,
        start,
        deadline: plan.duration.map(|duration| start + duration),
        next: AtomicU64::new(0),
        progress,
        shutdown,
    });
    let (late_cancels, mut late) = mpsc::unbounded_channel();
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|_| tokio::spawn(worker(Arc::clone(&shared), late_cancels.clone())))
        .collect();
    drop(late_cancels);
    // Late cancels run beside the workers, each when it is due.
    let late_cancelling = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            let mut cancels = tokio::task::JoinSet::new();
            while let Some((id, due)) = late.recv().await {
                let shared = Arc::clone(&shared);
                cancels.spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => Some((id, cancel(&shared, id).await)),
                        () = shared.shutdown.cancelled() => None,
                    }
                });
            }
            let mut tally = Tally::new();
            while let Some(done) = cancels.join_next().await {
                if let Some((id, answer)) = done.expect("a late cancel does not panic") {
                    tally.record_cancel(id, answer);
                }
            }
            tally
        }
    });
    let mut tally = Tally::new();
    for worker in workers {
        tally.merge(worker.await?);
    }
    tally.elapsed = start.elapsed();
    let elapsed = tally.elapsed;
    tally.merge(late_cancelling.await?);
    tally.elapsed = elapsed;
    Ok(tally)
}

async fn worker(
    shared: Arc<Shared>,
    late_cancels: mpsc::UnboundedSender<(Uuid, Instant)>,
) -> Tally {
    let mut tally = Tally::new();
    while !shared.shutdown.is_cancelled() {
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        if shared.limit.is_some_and(|limit| index >= limit) {
            break;
        }
        let due = match shared.rate {
            Some(rate) => shared.start + Duration::from_secs_f64(index as f64 / rate),
            None => Instant::now(),
        };
        if shared.deadline.is_some_and(|deadline| due >= deadline) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = shared.shutdown.cancelled() => break,
        }
        let order = random_order(shared.scarce_ratio);
        let key = shared.idempotency_keys.then(idempotency_key);
        let mut outcome = place(&shared.client, &shared.orders_url, &order, key.as_deref()).await;
        let mut pause = Duration::from_millis(100);
        for _ in 0..shared.retries {
            if !outcome.is_worth_retrying() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shared.shutdown.cancelled() => break,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
            tally.retries += 1;
            outcome = place(&shared.client, &shared.orders_url, &order, key.as_deref()).await;
        }
        if !matches!(outcome, Outcome::Created { .. }) {
            shared.progress.set_message("(errors: see the report)");
        }
        let placed = match outcome {
            Outcome::Created { id: Some(id), .. } => Some(id),
            _ => None,
        };
        tally.record(outcome, due.elapsed());
        if let Some(id) = placed {
            if shared.cancel_ratio > 0.0 && rand::rng().random_bool(shared.cancel_ratio) {
                let answer = cancel(&shared, id).await;
                if answer == CancelAnswer::Failed {
                    shared.progress.set_message("(a cancel failed: see the report)");
                }
                tally.record_cancel(id, answer);
            } else if shared.late_cancel_ratio > 0.0
                && rand::rng().random_bool(shared.late_cancel_ratio)
            {
                // Cannot fail: the receiver lives until every worker is done.
                let _ = late_cancels.send((id, Instant::now() + shared.late_cancel_after));
            }
        }
        shared.progress.inc(1);
    }
    tally
}

/// What a cancel was answered, after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelAnswer {
    /// 2xx.
    Accepted,
    /// 409: the order was REJECTED, there is nothing to cancel.
    NotCancellable,
    /// Any other 4xx, or no 2xx after every retry.
    Failed,
}

/// Cancels order `id`, retrying no answer or a 5xx as an order is (a cancel is
/// idempotent).
async fn cancel(shared: &Shared, id: Uuid) -> CancelAnswer {
    let url = format!("{}/{id}/cancel", shared.orders_url);
    let mut pause = Duration::from_millis(100);
    for attempt in 0..=shared.retries {
        if attempt > 0 {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        match shared.client.post(&url).send().await {
            Ok(response) if response.status().is_success() => return CancelAnswer::Accepted,
            Ok(response) if response.status() == reqwest::StatusCode::CONFLICT => {
                return CancelAnswer::NotCancellable;
            }
            Ok(response) if response.status().is_client_error() => return CancelAnswer::Failed,
            _ => {}
        }
    }
    CancelAnswer::Failed
}

async fn place(
    client: &reqwest::Client,
    url: &reqwest::Url,
    order: &OrderRequest,
    idempotency_key: Option<&str>,
) -> Outcome {
    let mut request = client.post(url.clone()).json(order);
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(error_chain(&error)),
    };
    let status = response.status();
    // The whole body is read even for errors, so the connection can be reused.
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return Outcome::Failed(error_chain(&error)),
    };
    if status.is_success() {
        let id = serde_json::from_slice::<Created>(&body).ok().map(|created| created.id);
        Outcome::Created { status: status.as_u16(), id }
    } else {
        let text = String::from_utf8_lossy(&body);
        let body = text.chars().take(200).collect();
        Outcome::Refused { status: status.as_u16(), body }
    }
}

/// `<url>/orders`.
fn orders_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let orders = format!("{}/orders", url.trim_end_matches('/'));
    reqwest::Url::parse(&orders).with_context(|| format!("--url {url:?} is not a URL"))
}

/// An error with its causes: reqwest's own message rarely says what went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The body of `POST /orders`.
#[derive(Debug, Serialize)]
pub struct OrderRequest {
    pub customer_id: String,
    pub items: Vec<OrderItem>,
}

#[derive(Debug, Serialize)]
pub struct OrderItem {
    pub sku: String,
    pub quantity: u32,
}

/// The part of a 201 answer that is needed: the order's id.
#[derive(Deserialize)]
struct Created {
    id: Uuid,
}

/// One to three distinct ample SKUs, quantity one to five each; with
/// probability `scarce_ratio` a scarce SKU is added, which may get it REJECTED.
pub fn random_order(scarce_ratio: f64) -> OrderRequest {
    let mut rng = rand::rng();
    let lines = rng.random_range(1..=3);
    let mut items: Vec<OrderItem> = rand::seq::index::sample(&mut rng, AMPLE_SKUS as usize, lines)
        .into_iter()
        .map(|index| OrderItem { sku: sku(index as u32 + 1), quantity: rng.random_range(1..=5) })
        .collect();
    if rng.random_bool(scarce_ratio) {
        items.push(OrderItem {
            sku: sku(rng.random_range(SCARCE_SKUS)),
            quantity: rng.random_range(1..=5),
        });
    }
    OrderRequest { customer_id: format!("stress-{}", rng.random_range(1..=1_000)), items }
}

/// A key no other order has: the API takes 1 to 255 visible ASCII characters,
/// and a random UUID cannot collide with the keys of earlier runs on the same
/// database, which a counter would.
pub fn idempotency_key() -> String {
    format!("stress-{}", Uuid::new_v4())
}

fn sku(number: u32) -> String {
    format!("SKU-{number:03}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_orders_url_is_parsed_once_with_or_without_a_trailing_slash() {
        for url in ["http://127.0.0.1:8080", "http://127.0.0.1:8080/"] {
            assert_eq!(orders_url(url).unwrap().as_str(), "http://127.0.0.1:8080/orders");
        }
        let error = orders_url("127.0.0.1:8080").unwrap_err().to_string();
        assert!(error.contains("is not a URL"), "{error}");
    }

    #[test]
    fn orders_use_distinct_catalogue_skus() {
        for _ in 0..1_000 {
            let order = random_order(0.0);
            assert!((1..=3).contains(&order.items.len()));
            for (index, item) in order.items.iter().enumerate() {
                assert!(("SKU-001".."SKU-021").contains(&item.sku.as_str()), "{}", item.sku);
                assert!((1..=5).contains(&item.quantity));
                assert!(order.items[..index].iter().all(|other| other.sku != item.sku));
            }
        }
    }

    #[test]
    fn the_scarce_ratio_adds_a_scarce_sku() {
        let order = random_order(1.0);
        let last = order.items.last().expect("items");
        assert!(("SKU-021"..="SKU-025").contains(&last.sku.as_str()), "{}", last.sku);
        assert!(
            order.items[..order.items.len() - 1].iter().all(|item| item.sku.as_str() < "SKU-021")
        );
    }

    #[test]
    fn idempotency_keys_are_unique_visible_ascii_and_short_enough() {
        let keys: std::collections::HashSet<String> =
            (0..1_000).map(|_| idempotency_key()).collect();
        assert_eq!(keys.len(), 1_000);
        for key in keys {
            assert!((1..=255).contains(&key.len()), "{key}");
            assert!(key.bytes().all(|byte| byte.is_ascii_graphic()), "{key}");
        }
    }

    #[test]
    fn a_tally_counts_each_outcome_once() {
        let mut tally = Tally::new();
        let id = Uuid::now_v7();
        tally.record(Outcome::Created { status: 201, id: Some(id) }, Duration::from_millis(2));
        tally.record(Outcome::Created { status: 201, id: None }, Duration::from_millis(2));
        tally.record(Outcome::Refused { status: 422, body: String::new() }, Duration::ZERO);
        tally.record(Outcome::Refused { status: 503, body: String::new() }, Duration::ZERO);
        tally.record(Outcome::Refused { status: 302, body: String::new() }, Duration::ZERO);
        tally.record(Outcome::Failed("refused".to_owned()), Duration::ZERO);
        let mut total = Tally::new();
        total.merge(tally);
        assert_eq!(total.sent, 6);
        assert_eq!((total.ok, total.unreadable_bodies), (2, 1));
        assert_eq!((total.client_errors, total.server_errors, total.transport_errors), (1, 2, 1));
        assert_eq!(total.ids, [id]);
        assert_eq!(total.latency.len(), 5, "a request without an answer has no latency");
        assert_eq!(total.status_codes[&201], 2);
        assert_eq!(total.error_samples.len(), 4);
    }
}
