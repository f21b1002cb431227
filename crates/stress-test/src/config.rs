//! The command line: every knob is a flag and an environment variable.

use std::time::Duration;

use clap::Parser;

/// Places orders on the order API, reports throughput and latency, then waits
/// until the inventory consumer has decided every order it placed.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "stress-test",
    version,
    about,
    after_help = "\
Load: without --rate, --concurrency workers each send the next order as soon as the \
previous one is answered (closed loop). With --rate, orders are due at fixed intervals \
whatever the answers (open loop), at most --concurrency at a time; latency is then measured \
from the time an order was due, so a slow server cannot hide its queueing delay.

Convergence: after the load, the orders table at --database-url is polled until every \
order that was answered 2xx is COMPLETED or REJECTED, or --timeout passes. --no-wait skips \
this: the report then says \"waited\": false and \"converged\": false, and only the HTTP \
results decide the exit status.

Exit status: 0 when every request was answered 2xx and, unless --no-wait, every order \
converged; 1 when a request failed, the orders did not converge in time, or SIGINT/SIGTERM \
cut the run short (the report still covers what was done); 2 when the run could not start \
(bad arguments, database unreachable)."
)]
pub struct Config {
    /// Base URL of the order API; orders are POSTed to `<url>/orders`.
    #[arg(long, env = "ORDER_SERVICE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Orders to place [default: 1000, or no limit when --duration is given].
    #[arg(long, env = "STRESS_ORDERS", value_parser = clap::value_parser!(u64).range(1..))]
    pub orders: Option<u64>,

    /// Most requests in flight at once (the number of workers).
    #[arg(long, env = "STRESS_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,

    /// Open loop: requests per second, sent on schedule whatever the latency.
    /// Without it, each worker sends as soon as its previous answer arrives.
    #[arg(long, env = "STRESS_RATE", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Stop sending after this long (`30`, `30s`, `500ms`, `2m`), even if fewer
    /// than --orders were sent.
    #[arg(long, env = "STRESS_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Postgres holding the service's `orders` table, watched for convergence.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/outbox"
    )]
    pub database_url: String,

    /// Do not wait for the orders to be decided (and do not connect to the database).
    #[arg(long, env = "STRESS_NO_WAIT", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_wait: bool,

    /// How long to wait, after the last answer, for every order to be decided.
    #[arg(long, env = "STRESS_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Per-request timeout; a request that takes longer counts as a transport error.
    #[arg(long, env = "STRESS_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Fraction of orders (0 to 1) that also ask for a scarce SKU (SKU-021 ..
    /// SKU-025, 25 in stock each), so that some orders end up REJECTED.
    #[arg(long, env = "STRESS_SCARCE_RATIO", default_value_t = 0.02, value_parser = parse_ratio)]
    pub scarce_ratio: f64,

    /// Fraction of placed orders (0 to 1) cancelled right after their 201
    /// (`POST /orders/{id}/cancel`, retried like an order with --retries); the
    /// wait then also waits for each of them to be CANCELLED.
    #[arg(long, env = "STRESS_CANCEL_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub cancel_ratio: f64,

    /// Fraction of the other placed orders (0 to 1) cancelled later, once
    /// --late-cancel-after has passed (usually after they were decided, so a
    /// COMPLETED order gives its stock back; a REJECTED one answers 409
    /// order_not_cancellable, counted apart). Waited for like --cancel-ratio.
    #[arg(long, env = "STRESS_LATE_CANCEL_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub late_cancel_ratio: f64,

    /// How long after its 201 a late cancel is sent (`2s`, `500ms`).
    #[arg(long, env = "STRESS_LATE_CANCEL_AFTER", default_value = "2s", value_parser = parse_duration)]
    pub late_cancel_after: Duration,

    /// Send an `Idempotency-Key` header with every order, a fresh unique key
    /// each (`stress-<uuid>`), so that the service stores one key per order, as
    /// it does for clients that retry safely. Off: no header, no key stored.
    #[arg(long, env = "STRESS_IDEMPOTENCY_KEYS", value_parser = clap::builder::FalseyValueParser::new())]
    pub idempotency_keys: bool,

    /// Send an order again, with the same Idempotency-Key, when it got no answer
    /// or a 5xx, 408 or 429, up to this many times, after a growing pause (100 ms
    /// doubling to 2 s): how a client rides out a restart of the service. Its
    /// latency then spans every attempt. Needs --idempotency-keys.
    #[arg(long, env = "STRESS_RETRIES", default_value_t = 0, requires = "idempotency_keys")]
    pub retries: u32,

    /// Print one JSON object on stdout instead of the table, and no progress bar.
    #[arg(long, env = "STRESS_JSON", value_parser = clap::builder::FalseyValueParser::new())]
    pub json: bool,
}

/// Orders placed when neither --orders nor --duration is given.
pub const DEFAULT_ORDERS: u64 = 1_000;

impl Config {
    /// The most orders to send; `None` when only --duration bounds the run.
    pub fn order_limit(&self) -> Option<u64> {
        match (self.orders, self.duration) {
            (Some(orders), _) => Some(orders),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_ORDERS),
        }
    }
}

/// `250ms`, `30s`, `2m`, or a bare number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(number) = text.strip_suffix("ms") {
        (number, 0.001)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 30s, 2m or 1.5"))?;
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("{text:?} is not a duration that can be waited for"))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number of requests per second")),
    }
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1_500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn the_order_limit_defaults_unless_a_duration_bounds_the_run() {
        let parse = |args: &[&str]| Config::parse_from(["stress-test"].iter().chain(args));
        assert_eq!(parse(&[]).order_limit(), Some(DEFAULT_ORDERS));
        assert_eq!(parse(&["--duration", "5s"]).order_limit(), None);
        assert_eq!(parse(&["--duration", "5s", "--orders", "7"]).order_limit(), Some(7));
        assert!(Config::try_parse_from(["stress-test", "--rate", "0"]).is_err());
        assert!(Config::try_parse_from(["stress-test", "--scarce-ratio", "1.5"]).is_err());
        assert!(!parse(&[]).idempotency_keys);
        assert!(parse(&["--idempotency-keys"]).idempotency_keys);
    }
}
