//! The conformance suite on RabbitMQ: this test's own exchange and exclusive
//! queue (bound to `conformance.#`), publisher confirms, `mandatory`.

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::AMQPValue;
use outbox::rabbitmq::RabbitMq;
use test_support::FaultProxy;

use super::{DEADLINE, Harness, Received, conformance};
use crate::helpers::{TestBroker, message_id};

pub struct RabbitMqHarness {
    broker: TestBroker,
}

impl Harness for RabbitMqHarness {
    type Transport = RabbitMq;

    async fn new() -> Self {
        Self { broker: TestBroker::new(&[&format!("{}.#", super::ROUTABLE)]).await }
    }

    fn transport(&self) -> RabbitMq {
        self.broker.transport()
    }

    fn transport_through(&self, proxy: &FaultProxy) -> RabbitMq {
        self.broker.transport_at(&proxy.url()).confirm_timeout(DEADLINE).expect("a deadline")
    }

    async fn proxy(&self) -> FaultProxy {
        FaultProxy::broker().await
    }

    /// A routing key over AMQP's 255 bytes (a short string).
    fn poison(&self) -> outbox::NewEvent {
        outbox::NewEvent {
            aggregate_type: super::ROUTABLE.to_owned(),
            aggregate_id: "poison".to_owned(),
            event_type: "x".repeat(300),
            payload: serde_json::json!({}),
            headers: serde_json::Map::new(),
        }
    }

    async fn received(&mut self, count: usize, within: Duration) -> Vec<Received> {
        let mut deliveries = self.broker.receive(count, within).await;
        deliveries.extend(self.broker.receive_rest(Duration::from_millis(200)).await);
        deliveries
            .iter()
            .map(|delivery| {
                let headers: HashMap<String, String> = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .filter_map(|(name, value)| match value {
                                AMQPValue::LongString(text) => {
                                    Some((name.to_string(), text.to_string()))
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Received {
                    id: message_id(delivery),
                    aggregate_id: headers.get("aggregate_id").cloned().unwrap_or_default(),
                    event_type: delivery
                        .properties
                        .kind()
                        .as_ref()
                        .map(|kind| kind.to_string())
                        .unwrap_or_default(),
                    headers,
                    payload: serde_json::from_slice(&delivery.data).expect("a JSON payload"),
                }
            })
            .collect()
    }

    async fn finish(self) {
        self.broker.delete().await;
    }
}

conformance!(RabbitMqHarness);
