//! The soak run's record: one [`Row`] a minute, kept as CSV by `scripts/soak.sh`
//! (through `soak-report row`), then judged ([`verdict`]) and drawn ([`chart`])
//! by `soak-report verdict`.
//!
//! The CSV is written and read here, by column name, so that a spreadsheet or a
//! later version with more columns can still read it. It is plain numbers: no
//! quoting is ever needed, and an empty field is a figure that was not measured
//! (no end-to-end lag when no order was decided; no RSS without `/proc`).

pub mod chart;
pub mod verdict;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{Context, bail};

use crate::Report;

/// One minute of a soak run: that minute's stress-test report, and a sample of
/// the database and of the services' memory taken right after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1 for the first minute of load.
    pub minute: u32,
    /// Seconds from the start of the soak to this sample; a "minute" is the
    /// 60 s of load plus the wait for convergence and the sampling.
    pub elapsed_s: f64,
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    /// Every order of the minute was decided before the next minute began.
    pub converged: bool,
    /// `ok` per second of load.
    pub accepted_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Created to decided, of the minute's orders; `None` when none was decided.
    pub e2e_lag_p99_ms: Option<f64>,
    /// Events not yet published (`outbox.state = 'pending'`).
    pub outbox_pending: u64,
    /// `n_dead_tup` of `outbox`: the rows the relay deleted that vacuum has not
    /// reclaimed yet. If it only grows, the table bloats.
    pub outbox_dead_tuples: u64,
    pub orders: u64,
    pub processed_messages: u64,
    pub idempotency_keys: u64,
    pub outbox_rows: u64,
    pub order_service_rss_mib: Option<f64>,
    pub inventory_consumer_rss_mib: Option<f64>,
}

/// What `soak.sh` samples after each minute, besides the stress-test report.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub elapsed_s: f64,
    pub outbox_pending: u64,
    pub outbox_dead_tuples: u64,
    pub orders: u64,
    pub processed_messages: u64,
    pub idempotency_keys: u64,
    pub outbox_rows: u64,
    pub order_service_rss_kib: Option<u64>,
    pub inventory_consumer_rss_kib: Option<u64>,
}

/// The CSV header, in the order the values are written.
pub const COLUMNS: [&str; 20] = [
    "minute",
    "elapsed_s",
    "sent",
    "ok",
    "client_errors",
    "server_errors",
    "transport_errors",
    "converged",
    "accepted_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "e2e_lag_p99_ms",
    "outbox_pending",
    "outbox_dead_tuples",
    "orders",
    "processed_messages",
    "idempotency_keys",
    "outbox_rows",
    "order_service_rss_mib",
    "inventory_consumer_rss_mib",
];

impl Row {
    pub fn new(minute: u32, report: &Report, sample: &Sample) -> Self {
        let mib = |kib: Option<u64>| kib.map(|kib| kib as f64 / 1024.0);
        Self {
            minute,
            elapsed_s: sample.elapsed_s,
            sent: report.sent,
            ok: report.ok,
            client_errors: report.client_errors,
            server_errors: report.server_errors,
            transport_errors: report.transport_errors,
            // A chunk that was not waited for proves nothing about convergence.
            converged: report.waited && report.converged,
            accepted_per_s: if report.elapsed_seconds > 0.0 {
                report.ok as f64 / report.elapsed_seconds
            } else {
                0.0
            },
            latency_p50_ms: report.latency_ms.p50,
            latency_p99_ms: report.latency_ms.p99,
            e2e_lag_p99_ms: report.e2e_lag_ms.p99,
            outbox_pending: sample.outbox_pending,
            outbox_dead_tuples: sample.outbox_dead_tuples,
            orders: sample.orders,
            processed_messages: sample.processed_messages,
            idempotency_keys: sample.idempotency_keys,
            outbox_rows: sample.outbox_rows,
            order_service_rss_mib: mib(sample.order_service_rss_kib),
            inventory_consumer_rss_mib: mib(sample.inventory_consumer_rss_kib),
        }
    }

    /// Requests not answered 2xx: 4xx, 5xx and those with no answer at all.
    pub fn errors(&self) -> u64 {
        self.client_errors + self.server_errors + self.transport_errors
    }

    /// The CSV header line, without a line break.
    pub fn csv_header() -> String {
        COLUMNS.join(",")
    }

    /// The row as a CSV line, in the order of [`COLUMNS`], without a line break.
    pub fn to_csv(&self) -> String {
        let optional = |value: Option<f64>| value.map(|value| format!("{value:.3}"));
        [
            Some(self.minute.to_string()),
            Some(format!("{:.1}", self.elapsed_s)),
            Some(self.sent.to_string()),
            Some(self.ok.to_string()),
            Some(self.client_errors.to_string()),
            Some(self.server_errors.to_string()),
            Some(self.transport_errors.to_string()),
            Some(u8::from(self.converged).to_string()),
            Some(format!("{:.2}", self.accepted_per_s)),
            Some(format!("{:.3}", self.latency_p50_ms)),
            Some(format!("{:.3}", self.latency_p99_ms)),
            optional(self.e2e_lag_p99_ms),
            Some(self.outbox_pending.to_string()),
            Some(self.outbox_dead_tuples.to_string()),
            Some(self.orders.to_string()),
            Some(self.processed_messages.to_string()),
            Some(self.idempotency_keys.to_string()),
            Some(self.outbox_rows.to_string()),
            optional(self.order_service_rss_mib),
            optional(self.inventory_consumer_rss_mib),
        ]
        .map(Option::unwrap_or_default)
        .join(",")
    }

    /// One data line of a CSV whose header is `header`.
    fn from_csv(header: &[&str], line: &str) -> anyhow::Result<Self> {
        let values: Vec<&str> = line.split(',').map(str::trim).collect();
        if values.len() != header.len() {
            bail!("{} fields where the header has {}", values.len(), header.len());
        }
        let fields: HashMap<&str, &str> = header.iter().copied().zip(values).collect();
        let fields = Fields(fields);
        Ok(Self {
            minute: fields.get("minute")?,
            elapsed_s: fields.get("elapsed_s")?,
            sent: fields.get("sent")?,
            ok: fields.get("ok")?,
            client_errors: fields.get("client_errors")?,
            server_errors: fields.get("server_errors")?,
            transport_errors: fields.get("transport_errors")?,
            converged: fields.get::<u8>("converged")? != 0,
            accepted_per_s: fields.get("accepted_per_s")?,
            latency_p50_ms: fields.get("latency_p50_ms")?,
            latency_p99_ms: fields.get("latency_p99_ms")?,
            e2e_lag_p99_ms: fields.optional("e2e_lag_p99_ms")?,
            outbox_pending: fields.get("outbox_pending")?,
            outbox_dead_tuples: fields.get("outbox_dead_tuples")?,
            orders: fields.get("orders")?,
            processed_messages: fields.get("processed_messages")?,
            idempotency_keys: fields.get("idempotency_keys")?,
            outbox_rows: fields.get("outbox_rows")?,
            order_service_rss_mib: fields.optional("order_service_rss_mib")?,
            inventory_consumer_rss_mib: fields.optional("inventory_consumer_rss_mib")?,
        })
    }

    /// The header of the table `soak.sh` prints, aligned with [`Row::table_line`].
    pub fn table_header() -> String {
        format!(
            "{:>4} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>7} {:>8} {:>8} {:>7}",
            "min",
            "acc/s",
            "p50 ms",
            "p99 ms",
            "lag99ms",
            "pending",
            "dead tup",
            "orders",
            "processed",
            "idem keys",
            "outbox",
            "svc MiB",
            "con MiB",
            "errors",
        )
    }

    /// The row as one line of the table; a minute that did not converge says so.
    pub fn table_line(&self) -> String {
        let optional = |value: Option<f64>| match value {
            Some(value) => format!("{value:.1}"),
            None => "-".to_owned(),
        };
        let line = format!(
            "{:>4} {:>8.1} {:>7.1} {:>7.1} {:>8} {:>8} {:>8} {:>9} {:>10} {:>9} {:>7} {:>8} {:>8} {:>7} {}",
            self.minute,
            self.accepted_per_s,
            self.latency_p50_ms,
            self.latency_p99_ms,
            optional(self.e2e_lag_p99_ms),
            self.outbox_pending,
            self.outbox_dead_tuples,
            self.orders,
            self.processed_messages,
            self.idempotency_keys,
            self.outbox_rows,
            optional(self.order_service_rss_mib),
            optional(self.inventory_consumer_rss_mib),
            self.errors(),
            if self.converged { "" } else { "NOT CONVERGED" },
        );
        line.trim_end().to_owned()
    }
}

/// The fields of one CSV line by column name.
struct Fields<'a>(HashMap<&'a str, &'a str>);

impl Fields<'_> {
    fn optional<T: FromStr>(&self, column: &str) -> anyhow::Result<Option<T>> {
        let Some(text) = self.0.get(column) else { bail!("no column {column:?}") };
        if text.is_empty() {
            return Ok(None);
        }
        match text.parse() {
            Ok(value) => Ok(Some(value)),
            Err(_) => bail!("{column} is {text:?}, not a number"),
        }
    }

    fn get<T: FromStr>(&self, column: &str) -> anyhow::Result<T> {
        self.optional(column)?.with_context(|| format!("{column} is empty"))
    }
}

/// Parses a whole CSV: a header line, then one row per line; blank lines are
/// skipped, columns the header names but [`Row`] does not know are ignored.
pub fn parse_csv(text: &str) -> anyhow::Result<Vec<Row>> {
    let mut lines = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
    let Some((_, header)) = lines.next() else { bail!("the CSV is empty: no header") };
    let header: Vec<&str> = header.split(',').map(str::trim).collect();
    lines
        .map(|(index, line)| {
            Row::from_csv(&header, line).with_context(|| format!("line {}", index + 1))
        })
        .collect()
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table_line())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A healthy minute: a steady load, bounded tables, steady memory.
    pub fn row(minute: u32) -> Row {
        Row {
            minute,
            elapsed_s: f64::from(minute) * 61.0,
            sent: 6_000,
            ok: 6_000,
            client_errors: 0,
            server_errors: 0,
            transport_errors: 0,
            converged: true,
            accepted_per_s: 100.0,
            latency_p50_ms: 1.5,
            latency_p99_ms: 8.0,
            e2e_lag_p99_ms: Some(12.0),
            outbox_pending: 0,
            outbox_dead_tuples: 150,
            orders: 6_000 * u64::from(minute),
            // Grows for the two-minute window, then the sweeper holds it.
            processed_messages: 6_000 * u64::from(minute.min(2)) + 500,
            idempotency_keys: 6_000 * u64::from(minute.min(2)) + 500,
            outbox_rows: 0,
            order_service_rss_mib: Some(28.0),
            inventory_consumer_rss_mib: Some(25.0),
        }
    }

    #[test]
    fn rows_survive_a_round_trip_through_csv() {
        let rows =
            vec![row(1), Row { e2e_lag_p99_ms: None, order_service_rss_mib: None, ..row(2) }];
        let mut text = Row::csv_header();
        for row in &rows {
            text.push('\n');
            text.push_str(&row.to_csv());
        }
        text.push_str("\n\n");
        assert_eq!(parse_csv(&text).expect("parsed"), rows);
    }

    #[test]
    fn columns_are_found_by_name_and_bad_fields_are_named() {
        let mut header: Vec<&str> = COLUMNS.to_vec();
        header.reverse();
        header.push("added_later");
        let mut values: Vec<String> = row(3).to_csv().split(',').map(str::to_owned).collect();
        values.reverse();
        values.push("42".to_owned());
        let text = format!("{}\n{}\n", header.join(","), values.join(","));
        assert_eq!(parse_csv(&text).expect("parsed"), vec![row(3)]);

        let text = format!("{}\n{}\n", Row::csv_header(), row(1).to_csv().replacen("1", "x", 1));
        let error = format!("{:#}", parse_csv(&text).expect_err("not a number"));
        assert!(error.contains("line 2") && error.contains("minute"), "{error}");
        assert!(parse_csv("").is_err());
        assert!(parse_csv("minute\n1\n").is_err(), "missing columns");
    }

    #[test]
    fn table_lines_line_up_with_the_header() {
        let header = Row::table_header();
        let line = row(12).table_line();
        assert_eq!(header.len(), line.len(), "\n{header}\n{line}");
        let stuck = Row { converged: false, ..row(12) }.table_line();
        assert!(stuck.ends_with("NOT CONVERGED"), "{stuck}");
    }
}
