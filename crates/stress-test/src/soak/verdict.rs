//! The pass rule of a soak run. A service that "runs for months" must not get
//! slower, must not hoard rows its sweepers should remove, and must not leak
//! memory; a soak run checks each of these over its minutes.
//!
//! Each figure is a median or a maximum over several minutes rather than one
//! minute's value, because the machines it runs on are shared: one minute during
//! someone else's compile must not fail a run, and a real trend moves the median.

use std::fmt;

use super::Row;

/// Minutes compared at each end of a run for latency and lag.
pub const STABILITY_WINDOW_MINUTES: usize = 5;
/// The latest window's p99 may be this many times the first window's.
pub const STABILITY_FACTOR: f64 = 1.5;
/// ... or this much more, in ms, whichever is larger: below 2 ms a factor of
/// 1.5 is scheduler jitter, not a trend.
pub const STABILITY_SLACK_MS: f64 = 1.0;
/// A swept table's largest count in the last third of the run may be this many
/// times its largest count in the middle third.
pub const BOUNDED_FACTOR: f64 = 1.3;
/// Minutes of warm-up: RSS is compared from the minute after them (or a later
/// one in a run too short to have it) to the last minute.
pub const WARM_UP_MINUTES: usize = 2;
/// Allowed RSS growth from the minute after warm-up to the last minute.
pub const RSS_GROWTH_LIMIT: f64 = 0.20;

/// One criterion, judged, with the figures it was judged on.
#[derive(Debug, Clone)]
pub struct Criterion {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Every criterion of a run. It passes when each criterion does; a criterion
/// that cannot be judged (too few minutes, a figure missing) fails, so that a
/// run never passes on evidence it does not have.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub minutes: usize,
    pub criteria: Vec<Criterion>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.minutes > 0 && self.criteria.iter().all(|criterion| criterion.passed)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "verdict over {} minutes", self.minutes)?;
        for criterion in &self.criteria {
            let mark = if criterion.passed { "PASS" } else { "FAIL" };
            writeln!(f, "  {mark}  {:<30} {}", criterion.name, criterion.detail)?;
        }
        writeln!(f, "soak {}", if self.passed() { "PASSED" } else { "FAILED" })
    }
}

/// Judges a run from its rows, in minute order.
pub fn judge(rows: &[Row]) -> Verdict {
    let mut criteria = vec![no_errors(rows)];
    criteria.push(stable("latency p99", rows, |row| Some(row.latency_p99_ms)));
    criteria.push(stable("e2e lag p99", rows, |row| row.e2e_lag_p99_ms));
    criteria.push(bounded("processed_messages bounded", rows, |row| row.processed_messages));
    criteria.push(bounded("idempotency_keys bounded", rows, |row| row.idempotency_keys));
    criteria.push(rss("RSS order-service", rows, |row| row.order_service_rss_mib));
    criteria.push(rss("RSS inventory-consumer", rows, |row| row.inventory_consumer_rss_mib));
    Verdict { minutes: rows.len(), criteria }
}

fn no_errors(rows: &[Row]) -> Criterion {
    let name = "no errors";
    let non_2xx: u64 = rows.iter().map(|row| row.client_errors + row.server_errors).sum();
    let transport: u64 = rows.iter().map(|row| row.transport_errors).sum();
    let sent: u64 = rows.iter().map(|row| row.sent).sum();
    let converged = rows.iter().filter(|row| row.converged).count();
    let stuck: Vec<String> =
        rows.iter().filter(|row| !row.converged).map(|row| row.minute.to_string()).collect();
    let mut detail = format!(
        "{non_2xx} non-2xx and {transport} transport errors in {sent} requests; \
         {converged}/{} minutes converged",
        rows.len()
    );
    if !stuck.is_empty() {
        detail.push_str(&format!(" (not: minute {})", stuck.join(", ")));
    }
    let passed = !rows.is_empty() && sent > 0 && non_2xx == 0 && transport == 0 && stuck.is_empty();
    Criterion { name, passed, detail }
}

/// The first and the last window of a run and their length in minutes: five
/// minutes each, or the first and last halves (the middle minute of an odd count
/// left out) when the run is shorter than two windows, which `halves` says.
struct Ends<'a> {
    first: &'a [Row],
    last: &'a [Row],
    minutes: usize,
    halves: bool,
}

fn ends(rows: &[Row]) -> Ends<'_> {
    let count = rows.len();
    let halves = count < 2 * STABILITY_WINDOW_MINUTES;
    let minutes = if halves { count / 2 } else { STABILITY_WINDOW_MINUTES };
    Ends { first: &rows[..minutes], last: &rows[count - minutes..], minutes, halves }
}

/// The latest window's median of the minute figures is within
/// [`STABILITY_FACTOR`] (or [`STABILITY_SLACK_MS`]) of the first window's.
fn stable(name: &'static str, rows: &[Row], figure: impl Fn(&Row) -> Option<f64>) -> Criterion {
    let Ends { first, last, minutes, halves } = ends(rows);
    let median_of = |window: &[Row]| median(window.iter().filter_map(&figure).collect());
    let (Some(first), Some(last)) = (median_of(first), median_of(last)) else {
        return Criterion {
            name,
            passed: false,
            detail: format!(
                "not judged: needs figures in the first and the last minutes (the run has {})",
                rows.len()
            ),
        };
    };
    let limit = (first * STABILITY_FACTOR).max(first + STABILITY_SLACK_MS);
    let halves = match halves {
        true => format!("; halves, as the run is under {} min", 2 * STABILITY_WINDOW_MINUTES),
        false => String::new(),
    };
    Criterion {
        name,
        passed: last <= limit,
        detail: format!(
            "{last:.1} ms in the last {minutes} min vs {first:.1} ms in the first {minutes} min, \
             limit {limit:.1} ms ({STABILITY_FACTOR}x or +{STABILITY_SLACK_MS} ms; medians of the \
             minute p99s{halves})"
        ),
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

/// Once the retention window has passed, the sweeper deletes as many rows as
/// arrive: the count stops growing. The largest count of the last third of the
/// run may be at most [`BOUNDED_FACTOR`] times that of the middle third (the
/// first third holds the growth up to the window). Without a sweeper the count
/// grows with the run, and the last third's maximum is 1.5 times the middle's.
fn bounded(name: &'static str, rows: &[Row], count: impl Fn(&Row) -> u64) -> Criterion {
    let minutes = rows.len();
    if minutes < 3 {
        return Criterion {
            name,
            passed: false,
            detail: format!("not judged: needs at least 3 minutes, the run has {minutes}"),
        };
    }
    let (middle, last) = (&rows[minutes / 3..2 * minutes / 3], &rows[2 * minutes / 3..]);
    let max = |window: &[Row]| window.iter().map(&count).max().unwrap_or_default();
    let span = |window: &[Row]| match (window.first(), window.last()) {
        (Some(first), Some(last)) if first.minute != last.minute => {
            format!("minutes {}-{}", first.minute, last.minute)
        }
        (Some(first), _) => format!("minute {}", first.minute),
        (None, _) => "no minutes".to_owned(),
    };
    let (middle_max, last_max) = (max(middle), max(last));
    let limit = middle_max as f64 * BOUNDED_FACTOR;
    Criterion {
        name,
        passed: last_max as f64 <= limit,
        detail: format!(
            "max {last_max} rows in the last third ({}) vs {middle_max} in the middle third \
             ({}), limit {limit:.0} ({BOUNDED_FACTOR}x)",
            span(last),
            span(middle)
        ),
    }
}

/// RSS grows less than [`RSS_GROWTH_LIMIT`] from the minute after warm-up to
/// the last minute.
fn rss(name: &'static str, rows: &[Row], mib: impl Fn(&Row) -> Option<f64>) -> Criterion {
    if rows.len() < 2 {
        return Criterion {
            name,
            passed: false,
            detail: format!("not judged: needs at least 2 minutes, the run has {}", rows.len()),
        };
    }
    let (base, last) = (&rows[WARM_UP_MINUTES.min(rows.len() - 2)], &rows[rows.len() - 1]);
    let (Some(base_mib), Some(last_mib)) = (mib(base), mib(last)) else {
        return Criterion {
            name,
            passed: false,
            detail: format!("not judged: no RSS at minute {} or {}", base.minute, last.minute),
        };
    };
    let growth = if base_mib > 0.0 { last_mib / base_mib - 1.0 } else { f64::INFINITY };
    Criterion {
        name,
        passed: growth < RSS_GROWTH_LIMIT,
        detail: format!(
            "{last_mib:.1} MiB at minute {} vs {base_mib:.1} MiB at minute {}: {:+.1} %, limit +{:.0} %",
            last.minute,
            base.minute,
            growth * 100.0,
            RSS_GROWTH_LIMIT * 100.0
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::row;
    use super::*;

    fn run(minutes: u32) -> Vec<Row> {
        (1..=minutes).map(row).collect()
    }

    fn criterion<'a>(verdict: &'a Verdict, name: &str) -> &'a Criterion {
        verdict.criteria.iter().find(|c| c.name == name).expect("a criterion of that name")
    }

    fn failed(verdict: &Verdict) -> Vec<&'static str> {
        verdict.criteria.iter().filter(|c| !c.passed).map(|c| c.name).collect()
    }

    #[test]
    fn a_steady_run_passes() {
        let verdict = judge(&run(30));
        assert!(verdict.passed(), "{verdict}");
        assert_eq!(verdict.criteria.len(), 7);
        let latency = criterion(&verdict, "latency p99");
        assert!(latency.detail.contains("in the last 5 min vs"), "{}", latency.detail);
        assert!(!latency.detail.contains("halves"), "{}", latency.detail);
        assert!(verdict.to_string().ends_with("soak PASSED\n"), "{verdict}");
    }

    #[test]
    fn noise_in_single_minutes_and_sub_millisecond_jitter_pass() {
        let mut rows = run(30);
        // Someone else's compile: two slow minutes among the last five.
        rows[26].latency_p99_ms = 90.0;
        rows[28].e2e_lag_p99_ms = Some(200.0);
        for row in &mut rows[25..] {
            row.latency_p50_ms = 1.2;
        }
        // Low latencies: 1.4 ms to 2.3 ms is more than 1.5x, but within +1 ms.
        for row in &mut rows[..5] {
            row.e2e_lag_p99_ms = Some(1.4);
        }
        for row in &mut rows[25..] {
            row.e2e_lag_p99_ms = Some(2.3);
        }
        rows[28].e2e_lag_p99_ms = Some(200.0);
        let verdict = judge(&rows);
        assert!(verdict.passed(), "{verdict}");
    }

    #[test]
    fn a_run_that_degrades_leaks_or_hoards_fails_each_criterion() {
        let mut rows = run(30);
        for row in &mut rows[25..] {
            row.latency_p99_ms = 12.5; // 8 ms at the start: more than 1.5x
            row.e2e_lag_p99_ms = Some(19.0); // 12 ms at the start
        }
        rows[17].server_errors = 1;
        rows[20].converged = false;
        for row in &mut rows {
            // No sweeper: the table keeps every message.
            row.processed_messages = 6_000 * u64::from(row.minute);
            // Leaks 0.5 MiB a minute: +14 MiB from minute 3 to 30.
            row.inventory_consumer_rss_mib = Some(25.0 + 0.5 * f64::from(row.minute));
        }
        let verdict = judge(&rows);
        assert!(!verdict.passed());
        assert_eq!(
            failed(&verdict),
            [
                "no errors",
                "latency p99",
                "e2e lag p99",
                "processed_messages bounded",
                "RSS inventory-consumer"
            ],
            "{verdict}"
        );
        assert!(criterion(&verdict, "no errors").detail.contains("(not: minute 21)"));
        assert!(verdict.to_string().ends_with("soak FAILED\n"), "{verdict}");
    }

    #[test]
    fn transport_errors_alone_fail_the_run() {
        let mut rows = run(12);
        rows[3].transport_errors = 2;
        assert_eq!(failed(&judge(&rows)), ["no errors"]);
    }

    #[test]
    fn short_runs_compare_halves_and_say_so() {
        let verdict = judge(&run(3));
        assert!(verdict.passed(), "{verdict}");
        let latency = criterion(&verdict, "latency p99");
        assert!(latency.detail.contains("in the last 1 min vs"), "{}", latency.detail);
        assert!(
            latency.detail.contains("halves, as the run is under 10 min"),
            "{}",
            latency.detail
        );
        // RSS from minute 2, the only minute between warm-up and the last one.
        let rss = criterion(&verdict, "RSS order-service");
        assert!(rss.detail.contains("at minute 3 vs 28.0 MiB at minute 2"), "{}", rss.detail);
        let verdict = judge(&run(30));
        let rss = criterion(&verdict, "RSS order-service");
        assert!(rss.detail.contains("at minute 30 vs 28.0 MiB at minute 3"), "{}", rss.detail);
    }

    #[test]
    fn what_cannot_be_judged_fails() {
        assert!(!judge(&[]).passed());
        let verdict = judge(&run(1));
        assert_eq!(
            failed(&verdict),
            [
                "latency p99",
                "e2e lag p99",
                "processed_messages bounded",
                "idempotency_keys bounded",
                "RSS order-service",
                "RSS inventory-consumer"
            ],
            "{verdict}"
        );
        let mut rows = run(4);
        for row in &mut rows {
            row.e2e_lag_p99_ms = None;
            row.order_service_rss_mib = None;
        }
        assert_eq!(failed(&judge(&rows)), ["e2e lag p99", "RSS order-service"]);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }
}
