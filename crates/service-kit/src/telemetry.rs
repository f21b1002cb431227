//! Structured logs through `tracing`, and OpenTelemetry traces.
//!
//! Logs, on stderr: `RUST_LOG` picks the levels (default `info`),
//! `RUST_LOG_FORMAT=json` switches to one JSON object per line.
//!
//! Traces: a real tracer provider is always installed, so spans have real ids and
//! the W3C trace context travels from the HTTP request through the outbox and the
//! broker to the consumer (see [`crate::trace_context`]) whether or not anything
//! collects the spans. They are exported to an OpenTelemetry collector (OTLP over
//! HTTP/protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The service
//! name is `OTEL_SERVICE_NAME`, else the executable's name.

use std::sync::OnceLock;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// Used when `RUST_LOG` is unset. Postgres notices (such as "relation already
/// exists, skipping" from every start-up migration check) are left out.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sets up logging and tracing for the process; call once, first thing in `main`.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // On stderr: stdout is for what a command prints (`reconcile --json`, say).
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("RUST_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource());
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        // The endpoint and its settings come from the standard OTEL_* variables.
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => {
                tracing::info!(endpoint = ?std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok(),
                    "exporting traces over OTLP/HTTP");
                provider = provider.with_batch_exporter(exporter);
            }
            Err(error) => tracing::error!(%error, "cannot export traces; they are not collected"),
        }
    }
    install(provider.build());
}

/// Makes `provider` the process's tracer provider (tests install one whose
/// exporter keeps the spans in memory).
pub fn install(provider: SdkTracerProvider) {
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.set(provider);
}

/// Exports the spans still buffered; call last thing in `main`.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(%error, "spans may not all have been exported");
    }
}

fn resource() -> Resource {
    let service = std::env::var("OTEL_SERVICE_NAME").ok().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.file_stem()?.to_string_lossy().into_owned())
    });
    Resource::builder().with_service_name(service.unwrap_or_else(|| "outbox".to_owned())).build()
}
