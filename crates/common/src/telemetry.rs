//! Structured logs through `tracing`: `RUST_LOG` picks the levels (default
//! `info`), `RUST_LOG_FORMAT=json` switches to one JSON object per line.

/// Used when `RUST_LOG` is unset. Postgres notices (such as "relation already
/// exists, skipping" from every start-up migration check) are left out.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("RUST_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}
