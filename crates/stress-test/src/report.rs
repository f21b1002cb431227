//! The report: what was sent, how it was answered, how fast, and whether every
//! order was decided. Serialised as the `--json` object, or printed as a table;
//! deserialised again by `soak-report`, which reads one `--json` object a minute.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Requests sent; always `ok + client_errors + server_errors + transport_errors`.
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 4xx.
    pub client_errors: u64,
    /// Answered 5xx, or any other status that is neither 2xx nor 4xx.
    pub server_errors: u64,
    /// Not answered: connection refused or reset, timed out, body cut short.
    pub transport_errors: u64,
    /// Requests sent again after no answer or a 5xx (`--retries`); an order
    /// counts once above, by its last answer.
    #[serde(default)]
    pub retries: u64,
    /// Cancels sent after a 201 (`--cancel-ratio`, `--late-cancel-ratio`), of
    /// those accepted (2xx), and refused because the order was REJECTED (409
    /// `order_not_cancellable`, a true answer for a late cancel).
    #[serde(default)]
    pub cancels: u64,
    #[serde(default)]
    pub cancels_accepted: u64,
    #[serde(default)]
    pub cancels_not_cancellable: u64,
    /// 2xx answers whose body held no order id; their orders cannot be followed.
    pub unreadable_bodies: u64,
    /// Answers by HTTP status code.
    pub status_codes: BTreeMap<String, u64>,
    /// From the first request to the last answer.
    pub elapsed_seconds: f64,
    /// `sent / elapsed_seconds`.
    pub throughput_rps: f64,
    /// Of every answered request; in open-loop mode measured from the time the
    /// request was due.
    pub latency_ms: Latency,
    /// Whether convergence was waited for (false with `--no-wait`).
    pub waited: bool,
    /// Every order answered 2xx is COMPLETED or REJECTED, or CANCELLED when its
    /// cancel was accepted. False when not waited for.
    pub converged: bool,
    /// Time spent waiting after the load: the time to converge when `converged`,
    /// the timeout otherwise; `null` when not waited for.
    pub converge_seconds: Option<f64>,
    /// From an order's creation to its decision, of the orders decided.
    pub e2e_lag_ms: Lag,
    /// The created orders by status as last read (empty when not waited for).
    pub status_counts: BTreeMap<String, u64>,
    /// Created orders the database does not hold.
    pub not_found: u64,
    /// Stopped early by SIGINT or SIGTERM: the counts cover what was done.
    pub interrupted: bool,
    /// The first few error answers, to say why a run failed.
    pub error_samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lag {
    /// Orders measured; the percentiles are `null` when it is 0.
    pub count: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    /// From a histogram of microseconds; all 0 when it is empty.
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        let at = |quantile| millis(histogram.value_at_quantile(quantile));
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: millis(histogram.max()),
        }
    }
}

impl Lag {
    /// From a histogram of microseconds.
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        let count = histogram.len();
        let at = |quantile| (count > 0).then(|| millis(histogram.value_at_quantile(quantile)));
        Self {
            count,
            p50: at(0.5),
            p99: at(0.99),
            max: (count > 0).then(|| millis(histogram.max())),
        }
    }
}

fn millis(micros: u64) -> f64 {
    micros as f64 / 1_000.0
}

impl Report {
    /// Every request answered 2xx with an order id, every order decided unless
    /// convergence was not waited for, and the run not cut short.
    pub fn passed(&self) -> bool {
        self.sent > 0
            && !self.interrupted
            && self.ok == self.sent
            && self.unreadable_bodies == 0
            && self.cancels_accepted + self.cancels_not_cancellable == self.cancels
            && (!self.waited || self.converged)
    }
}

/// The table printed without `--json`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value is made a string first: `format_args!` values ignore the width.
        let row =
            |f: &mut fmt::Formatter<'_>, label: &str, value: &dyn fmt::Display, unit: &str| {
                let line = format!("  {label:<20} {:>12} {unit}", value.to_string());
                writeln!(f, "{}", line.trim_end())
            };
        writeln!(f, "requests")?;
        row(f, "sent", &self.sent, "")?;
        row(f, "2xx", &self.ok, "")?;
        row(f, "4xx", &self.client_errors, "")?;
        row(f, "5xx / other", &self.server_errors, "")?;
        row(f, "transport errors", &self.transport_errors, "")?;
        if self.retries > 0 {
            row(f, "retries", &self.retries, "")?;
        }
        if self.unreadable_bodies > 0 {
            row(f, "2xx without an id", &self.unreadable_bodies, "")?;
        }
        if self.cancels > 0 {
            row(f, "cancels", &self.cancels, "")?;
            row(f, "cancels accepted", &self.cancels_accepted, "")?;
            if self.cancels_not_cancellable > 0 {
                row(f, "cancels of REJECTED", &self.cancels_not_cancellable, "(409)")?;
            }
        }
        row(f, "elapsed", &format_args!("{:.2}", self.elapsed_seconds), "s")?;
        row(f, "throughput", &format_args!("{:.1}", self.throughput_rps), "req/s")?;
        writeln!(f, "latency")?;
        let latency = &self.latency_ms;
        for (label, value) in [
            ("p50", latency.p50),
            ("p90", latency.p90),
            ("p99", latency.p99),
            ("p99.9", latency.p999),
            ("max", latency.max),
        ] {
            row(f, label, &format_args!("{value:.3}"), "ms")?;
        }
        writeln!(f, "convergence")?;
        match (self.waited, self.converged, self.converge_seconds) {
            (false, _, _) => row(f, "not checked", &"--no-wait", "")?,
            (true, true, Some(seconds)) => {
                row(f, "converged in", &format_args!("{seconds:.2}"), "s")?
            }
            (true, _, seconds) => row(
                f,
                "NOT converged after",
                &format_args!("{:.2}", seconds.unwrap_or_default()),
                "s",
            )?,
        }
        if self.waited {
            let lag = &self.e2e_lag_ms;
            for (label, value) in [("e2e lag p50", lag.p50), ("e2e lag p99", lag.p99)] {
                match value {
                    Some(value) => row(f, label, &format_args!("{value:.1}"), "ms")?,
                    None => row(f, label, &"-", "")?,
                }
            }
            for (status, count) in &self.status_counts {
                row(f, status, count, "orders")?;
            }
            if self.not_found > 0 {
                row(f, "NOT FOUND", &self.not_found, "orders")?;
            }
        }
        if self.interrupted {
            writeln!(f, "INTERRUPTED: the run was stopped early")?;
        }
        if !self.error_samples.is_empty() {
            writeln!(f, "first errors")?;
            for sample in &self.error_samples {
                writeln!(f, "  {sample}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let empty = Histogram::new(3).expect("histogram");
        Report {
            sent: 10,
            ok: 10,
            client_errors: 0,
            server_errors: 0,
            transport_errors: 0,
            retries: 0,
            cancels: 0,
            cancels_accepted: 0,
            cancels_not_cancellable: 0,
            unreadable_bodies: 0,
            status_codes: BTreeMap::from([("201".to_owned(), 10)]),
            elapsed_seconds: 1.0,
            throughput_rps: 10.0,
            latency_ms: Latency::from_micros(&empty),
            waited: true,
            converged: true,
            converge_seconds: Some(0.5),
            e2e_lag_ms: Lag::from_micros(&empty),
            status_counts: BTreeMap::new(),
            not_found: 0,
            interrupted: false,
            error_samples: Vec::new(),
        }
    }

    #[test]
    fn a_run_passes_only_when_everything_went_right() {
        assert!(report().passed());
        assert!(Report { waited: false, converged: false, ..report() }.passed());
        assert!(!Report { converged: false, ..report() }.passed());
        assert!(!Report { ok: 9, server_errors: 1, ..report() }.passed());
        assert!(!Report { ok: 9, transport_errors: 1, ..report() }.passed());
        assert!(!Report { unreadable_bodies: 1, ..report() }.passed());
        assert!(Report { cancels: 3, cancels_accepted: 3, ..report() }.passed());
        assert!(!Report { cancels: 3, cancels_accepted: 2, ..report() }.passed());
        let late =
            Report { cancels: 3, cancels_accepted: 2, cancels_not_cancellable: 1, ..report() };
        assert!(late.passed(), "a late cancel of a REJECTED order is answered 409, truly");
        assert!(!Report { interrupted: true, ..report() }.passed());
        assert!(!Report { sent: 0, ok: 0, ..report() }.passed());
    }

    #[test]
    fn percentiles_are_milliseconds_and_absent_without_samples() {
        let mut micros = Histogram::<u64>::new(3).expect("histogram");
        for value in 1..=1_000 {
            micros.record(value * 1_000).expect("recorded");
        }
        let latency = Latency::from_micros(&micros);
        assert!((latency.p50 - 500.0).abs() < 1.0, "{latency:?}");
        assert!((latency.max - 1_000.0).abs() < 1.0, "{latency:?}");
        let lag = Lag::from_micros(&Histogram::new(3).expect("histogram"));
        assert_eq!((lag.count, lag.p50, lag.p99), (0, None, None));
    }
}
