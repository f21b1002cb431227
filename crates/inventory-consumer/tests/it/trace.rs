//! W3C trace context end to end: the request's trace reaches the consumer's span
//! through the outbox row and the AMQP message.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestApi, TestBroker, TestConsumer};

/// The spans every test of this binary finishes, kept in memory. The tracer
/// provider is process-wide, so it is installed once.
fn exported() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        service_kit::telemetry::install(
            SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build(),
        );
        exporter
    })
}

fn spans_of(trace: TraceId) -> Vec<SpanData> {
    let spans = exported().get_finished_spans().expect("finished spans");
    spans.into_iter().filter(|span| span.span_context.trace_id() == trace).collect()
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_consumer_span_continues_the_request_trace(db: PgPool) {
    exported();
    let broker = TestBroker::new().await;
    let api = TestApi::spawn(&db, &broker.config, &[]).await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
    let caller = SpanId::from_hex("00f067aa0ba902b7").expect("span id");

    let response = reqwest::Client::new()
        .post(format!("{}/orders", api.address))
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .json(&json!({"customer_id": "traced", "items": [{"sku": "SKU-001", "quantity": 1}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    consumer.wait_settled(1, Duration::from_secs(20)).await;

    // The consumer ends its span once the message is settled, just after the count.
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = spans_of(trace);
        if spans.iter().any(|span| span.span_kind == SpanKind::Consumer) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let producer = spans
        .iter()
        .find(|span| span.span_kind == SpanKind::Producer)
        .unwrap_or_else(|| panic!("a producer span in the request's trace: {spans:#?}"));
    assert_eq!(producer.parent_span_id, caller, "the producer span is the caller's child");
    let consumer_span = spans
        .iter()
        .find(|span| span.span_kind == SpanKind::Consumer)
        .unwrap_or_else(|| panic!("a consumer span in the request's trace: {spans:#?}"));
    assert_eq!(
        consumer_span.parent_span_id,
        producer.span_context.span_id(),
        "the consumer span is the producer span's child"
    );

    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_request_without_valid_trace_context_starts_a_trace(db: PgPool) {
    exported();
    let broker = TestBroker::new().await;
    let api = TestApi::spawn(&db, &broker.config, &["--relay-workers", "0"]).await;

    let response = reqwest::Client::new()
        .post(format!("{}/orders", api.address))
        .header("traceparent", "00-not-a-trace-01")
        .json(&json!({"customer_id": "untraced", "items": [{"sku": "SKU-001", "quantity": 1}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);

    let headers: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM outbox").fetch_one(&db).await.expect("event");
    let traceparent = headers["traceparent"].as_str().expect("a traceparent is stored");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "W3C version 00");
    let trace = TraceId::from_hex(parts[1]).expect("hex trace id");
    assert_ne!(trace, TraceId::INVALID, "a new, valid trace");
    let producer = spans_of(trace);
    assert!(
        producer.iter().any(|span| span.span_kind == SpanKind::Producer
            && span.parent_span_id == SpanId::INVALID
            && span.span_context.span_id().to_string() == parts[2]),
        "the stored traceparent names a root producer span: {producer:#?}"
    );

    api.stop().await;
    broker.delete().await;
}
