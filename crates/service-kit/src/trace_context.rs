//! W3C trace context (`traceparent`, `tracestate`) from an HTTP request, through
//! the outbox row's headers and the AMQP message, to the consumer.
//!
//! order-service continues the request's trace (or starts one when the request
//! has none, or an invalid one), opens a producer span for the order's event and
//! stores that span's context in the event's headers; the relay copies them into
//! the message's AMQP headers; the consumer opens its span as a child of the
//! producer's. Log lines of both spans carry the trace id.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The header names, as HTTP, the outbox and AMQP carry them.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The context that `get` (a header lookup) carries; an empty context when it
/// carries none or an invalid one, so that a new trace starts.
pub fn extract(get: impl Fn(&str) -> Option<String>) -> Context {
    let carrier: HashMap<String, String> = [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), get(name)?)))
        .collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// The headers (`traceparent`, and `tracestate` when it is not empty) that carry
/// `cx`'s span to the next hop.
pub fn inject(cx: &Context) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.retain(|_, value: &mut String| !value.is_empty());
    carrier
}

/// Starts a span of `kind` as a child of `parent`'s span (or of nothing: a new
/// trace) and returns the context holding it. The span ends when
/// [`end`] is called or the last clone of the context is dropped.
pub fn start(
    name: &'static str,
    kind: SpanKind,
    parent: &Context,
    attributes: Vec<KeyValue>,
) -> Context {
    let tracer = global::tracer("outbox");
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    parent.with_span(span)
}

/// Ends `cx`'s span, recording `error` on it if there is one.
pub fn end(cx: &Context, error: Option<&str>) {
    let span = cx.span();
    if let Some(error) = error {
        span.set_status(opentelemetry::trace::Status::error(error.to_owned()));
    }
    span.end();
}

/// The trace id of `cx`'s span in hex, for log lines.
pub fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}
