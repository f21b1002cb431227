//! Dead letters that say why they died, and the operator's tools for a
//! dead-letter queue: list it without consuming it, and replay its messages.
//!
//! A consumer that meets a poison message could `basic.reject` it and let the
//! broker dead-letter it, but the broker records only *that* it was rejected
//! (`x-death`), not why. [`publish`] instead republishes the message, with its
//! body and properties, to the dead-letter exchange with the reason in a header
//! ([`REASON_HEADER`]) and publisher confirms; the consumer acks the original
//! only once the broker confirmed the copy. A message is thus never lost between
//! the two queues; if a confirm or an ack is lost it is in both, a duplicate that
//! consumers deduplicating by message id absorb.
//!
//! The broker still dead-letters on its own what exceeds a quorum queue's
//! delivery limit: such a message has no reason header but an `x-death` entry,
//! whose `reason` (`delivery_limit`, `rejected`, ...) [`DeadLetter`] reports.
//!
//! A message's history survives replays: [`COUNT_HEADER`] and
//! [`FIRST_DEATH_HEADER`] sum up its earlier deaths, while the reason and the
//! broker's `x-death` describe the last one only and are dropped when it is
//! replayed (see [`replay_properties`]).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;

/// Why the consumer dead-lettered the message (text). Absent from messages the
/// broker dead-lettered itself.
pub const REASON_HEADER: &str = "x-dead-letter-reason";
/// How many times the message was dead-lettered by a consumer, plus the
/// deaths of earlier rounds carried over by a replay (integer).
pub const COUNT_HEADER: &str = "x-dead-letter-count";
/// When the message was first dead-lettered (RFC 3339, UTC, milliseconds).
pub const FIRST_DEATH_HEADER: &str = "x-first-death-at";
/// The exchange the message was first published to.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-original-exchange";
/// The routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";

/// The broker's own dead-lettering and redelivery headers. Dropped when a
/// message is dead-lettered by a consumer or replayed, once folded into
/// [`COUNT_HEADER`] and [`FIRST_DEATH_HEADER`].
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// Longest reason kept in the header: a reason may quote the message (a SKU,
/// say), and a message's headers must fit in one AMQP frame.
const MAX_REASON_BYTES: usize = 1024;

/// Messages replayed per round of publisher confirms.
const REPLAY_CHUNK: usize = 100;

/// Longest wait for messages handed back to be ready again (see [`list`]).
const HAND_BACK_WAIT: Duration = Duration::from_secs(5);

/// One message of a dead-letter queue, as the list tool shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The message id (`None` when the message has none: that may be why it died).
    pub message_id: Option<String>,
    /// The consumer's reason ([`REASON_HEADER`]), else the reason of the
    /// broker's last `x-death` entry (`delivery_limit`, `rejected`, `expired`,
    /// `maxlen`), else `unknown`.
    pub reason: String,
    /// Times the message was dead-lettered, counting earlier rounds before replays.
    pub deaths: u64,
    /// When it was first dead-lettered, if the headers say.
    pub first_death_at: Option<DateTime<Utc>>,
    /// The event type (the AMQP `type` property).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The routing key it was first published with, if known.
    pub routing_key: Option<String>,
}

impl DeadLetter {
    /// Reads a message of a dead-letter queue: its id, type and route, and why and
    /// how often it died, from the consumer's headers or else the broker's `x-death`.
    pub fn from_delivery(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let headers = properties.headers().as_ref();
        let deaths = x_deaths(headers);
        let history = history(headers);
        let reason = header_text(headers, REASON_HEADER)
            .or_else(|| deaths.first().and_then(|death| table_text(death, "reason")))
            .unwrap_or_else(|| "unknown".to_owned());
        // x-death lists the newest death first; the oldest names the first route.
        let routing_key = header_text(headers, ORIGINAL_ROUTING_KEY_HEADER)
            .or_else(|| deaths.last().and_then(|death| first_routing_key(death)))
            .or_else(|| Some(delivery.routing_key.as_str().to_owned()));
        Self {
            message_id: properties.message_id().as_ref().map(|id| id.as_str().to_owned()),
            reason,
            deaths: history.deaths,
            first_death_at: history.first_death_at,
            kind: properties.kind().as_ref().map(|kind| kind.as_str().to_owned()),
            routing_key,
        }
    }
}

/// A message's deaths so far, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    /// Times the message was dead-lettered, earlier rounds included.
    pub deaths: u64,
    /// When it was first dead-lettered, if the headers say.
    pub first_death_at: Option<DateTime<Utc>>,
}

/// The deaths recorded in `headers`: [`COUNT_HEADER`] plus the counts of the
/// broker's `x-death` entries; the earliest of [`FIRST_DEATH_HEADER`] and their times.
pub fn history(headers: Option<&FieldTable>) -> History {
    let mut deaths = header(headers, COUNT_HEADER).and_then(integer).unwrap_or(0);
    let mut first_death_at = header(headers, FIRST_DEATH_HEADER).and_then(time);
    for death in x_deaths(headers) {
        deaths += death.inner().get("count").and_then(integer).unwrap_or(1);
        if let Some(at) = death.inner().get("time").and_then(time) {
            first_death_at = Some(first_death_at.map_or(at, |first| first.min(at)));
        }
    }
    History { deaths, first_death_at }
}

/// The properties to dead-letter `delivery` with: its own, the broker's death
/// headers folded into the history, and the reason.
pub fn dead_letter_properties(
    delivery: &Delivery,
    reason: &str,
    now: DateTime<Utc>,
) -> BasicProperties {
    let properties = &delivery.properties;
    let old = properties.headers().as_ref();
    let before = history(old);
    let letter = DeadLetter::from_delivery(delivery);
    let mut headers = without_death_headers(old);
    headers.insert(REASON_HEADER.into(), text_value(truncate(reason, MAX_REASON_BYTES)));
    headers.insert(COUNT_HEADER.into(), AMQPValue::LongLongInt(count_value(before.deaths + 1)));
    headers.insert(
        FIRST_DEATH_HEADER.into(),
        text_value(&rfc3339(before.first_death_at.unwrap_or(now))),
    );
    headers
        .entry(ORIGINAL_EXCHANGE_HEADER.into())
        .or_insert_with(|| text_value(delivery.exchange.as_str()));
    if let Some(routing_key) = letter.routing_key {
        headers
            .entry(ORIGINAL_ROUTING_KEY_HEADER.into())
            .or_insert_with(|| text_value(&routing_key));
    }
    properties.clone().with_headers(FieldTable::from(headers))
}

/// The properties to replay `delivery` with: its own, without the reason and
/// the broker's `x-death` (they describe the death being undone, and the list
/// tool would report a stale reason if the message died again), but with its
/// history ([`COUNT_HEADER`], [`FIRST_DEATH_HEADER`], the original route).
pub fn replay_properties(delivery: &Delivery) -> BasicProperties {
    let properties = &delivery.properties;
    let old = properties.headers().as_ref();
    let before = history(old);
    let letter = DeadLetter::from_delivery(delivery);
    let mut headers = without_death_headers(old);
    headers.remove(REASON_HEADER);
    if before.deaths > 0 {
        headers.insert(COUNT_HEADER.into(), AMQPValue::LongLongInt(count_value(before.deaths)));
    }
    if let Some(first) = before.first_death_at {
        headers.insert(FIRST_DEATH_HEADER.into(), text_value(&rfc3339(first)));
    }
    if let Some(routing_key) = letter.routing_key {
        headers
            .entry(ORIGINAL_ROUTING_KEY_HEADER.into())
            .or_insert_with(|| text_value(&routing_key));
    }
    properties.clone().with_headers(FieldTable::from(headers))
}

/// Publishes each of `letters` (a delivery and the reason it is poison) to
/// `exchange`, mandatory and persistent as it came, and waits up to `timeout` for
/// the broker's confirms. `channel` must be in confirm mode. Returns, in order,
/// whether each was confirmed (acked and not returned): only those may be acked
/// from the queue they came from.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    letters: &[(&Delivery, &str)],
    timeout: Duration,
) -> Vec<bool> {
    let now = Utc::now();
    let mut confirms = Vec::with_capacity(letters.len());
    for (delivery, reason) in letters {
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    delivery.routing_key.clone(),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &delivery.data,
                    dead_letter_properties(delivery, reason, now),
                )
                .await,
        );
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut confirmed = Vec::with_capacity(confirms.len());
    for confirm in confirms {
        confirmed.push(match confirm {
            Ok(confirm) => is_delivered(tokio::time::timeout_at(deadline, confirm).await),
            Err(_) => false,
        });
    }
    confirmed
}

/// Whether a publisher confirm says the message is in a queue: acked and not
/// returned as unroutable (a returned mandatory message is acked too).
fn is_delivered<E>(confirm: Result<lapin::Result<Confirmation>, E>) -> bool {
    matches!(confirm, Ok(Ok(Confirmation::Ack(None))))
}

/// Up to `limit` messages of `queue`, oldest first, without removing any.
///
/// One pass: every message present at the start is taken with `basic.get` and
/// held unacked (so none is seen twice, whatever comes and goes meanwhile), the
/// first `limit` are read, and all are handed back together (`basic.nack` with
/// requeue; were it lost, closing the channel hands them back too). All of them,
/// not only the `limit` listed: a quorum queue puts what is handed back behind
/// the messages it still holds, so handing back only the oldest would rotate the
/// queue and the next listing would show others. A quorum queue also takes them
/// back asynchronously, so this waits (a little) until it holds as many as before.
pub async fn list(channel: &Channel, queue: &str, limit: usize) -> lapin::Result<Vec<DeadLetter>> {
    let present = queue_depth(channel, queue).await?;
    let mut letters = Vec::new();
    let mut last_tag = None;
    let taken = async {
        for _ in 0..present {
            let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await?;
            let Some(got) = got else { break };
            last_tag = Some(got.delivery.delivery_tag);
            if letters.len() < limit {
                letters.push(DeadLetter::from_delivery(&got.delivery));
            }
        }
        Ok(())
    }
    .await;
    if let Some(tag) = last_tag {
        channel.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true }).await?;
        wait_for_depth(channel, queue, present).await?;
    }
    taken.map(|()| letters)
}

/// Waits until `queue` holds at least `depth` ready messages, for a few seconds
/// at most (others may be taking messages meanwhile): messages handed back to a
/// quorum queue are ready again only once its log has applied the return, so a
/// command run right after this one would otherwise not see them all.
async fn wait_for_depth(channel: &Channel, queue: &str, depth: u32) -> lapin::Result<()> {
    let deadline = tokio::time::Instant::now() + HAND_BACK_WAIT;
    while queue_depth(channel, queue).await? < depth && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Which messages to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message with this message id (a message dead-lettered twice is
    /// there twice; both copies go).
    Id(String),
    /// Every message in the queue when the replay starts.
    All,
}

impl Selection {
    fn matches(&self, delivery: &Delivery) -> bool {
        match self {
            Self::All => true,
            Self::Id(id) => {
                delivery.properties.message_id().as_ref().is_some_and(|m| m.as_str() == id)
            }
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replayed {
    /// Republished, confirmed, and removed from the dead-letter queue.
    pub replayed: usize,
    /// Selected but not confirmed by the broker: left in the dead-letter queue.
    /// The replay stops after the first round of confirms with such a message.
    pub failed: usize,
}

/// Moves the selected messages of `dead_letter_queue` to `target_queue`, through
/// the default exchange so that only that queue gets them (not every queue
/// bound to the events exchange, whose consumers did not fail on them).
///
/// One pass over the messages present at the start: each is taken with
/// `basic.get` and held; a selected one is republished ([`replay_properties`])
/// with publisher confirms and acked from the dead-letter queue only once its
/// copy is confirmed; the others, and any the broker did not confirm, are handed
/// back together at the end, so the queue keeps its order (see [`list`]). An
/// error leaves what was not yet acked in the queue.
pub async fn replay(
    channel: &Channel,
    dead_letter_queue: &str,
    target_queue: &str,
    selection: &Selection,
    confirm_timeout: Duration,
) -> anyhow::Result<Replayed> {
    use anyhow::Context;

    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("cannot switch the channel to publisher confirms")?;
    let present = queue_depth(channel, dead_letter_queue)
        .await
        .with_context(|| format!("cannot find the dead-letter queue {dead_letter_queue:?}"))?;
    let mut done = Replayed::default();
    // The highest tag of what is held to be handed back; every delivery is acked
    // or held, so one multiple nack up to it returns exactly the held ones.
    let mut hand_back = None;
    let mut taken = 0;
    let outcome: anyhow::Result<()> = async {
        while taken < present && done.failed == 0 {
            let mut chunk = Vec::new();
            let mut exhausted = false;
            while chunk.len() < REPLAY_CHUNK && taken < present {
                let got = channel
                    .basic_get(dead_letter_queue.into(), BasicGetOptions { no_ack: false })
                    .await
                    .context("cannot read the dead-letter queue")?;
                let Some(got) = got else {
                    exhausted = true;
                    break;
                };
                taken += 1;
                if selection.matches(&got.delivery) {
                    chunk.push(got.delivery);
                } else {
                    hand_back = hand_back.max(Some(got.delivery.delivery_tag));
                }
            }
            let mut confirms = Vec::with_capacity(chunk.len());
            for delivery in &chunk {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        target_queue.into(),
                        BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                        &delivery.data,
                        replay_properties(delivery),
                    )
                    .await
                    .context("cannot publish a replayed message")?;
                confirms.push(confirm);
            }
            let deadline = tokio::time::Instant::now() + confirm_timeout;
            for (delivery, confirm) in chunk.iter().zip(confirms) {
                if is_delivered(tokio::time::timeout_at(deadline, confirm).await) {
                    channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: false })
                        .await
                        .context("cannot ack a replayed message from the dead-letter queue")?;
                    done.replayed += 1;
                } else {
                    done.failed += 1;
                    hand_back = hand_back.max(Some(delivery.delivery_tag));
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(())
    }
    .await;
    if let Some(tag) = hand_back {
        channel
            .basic_nack(tag, BasicNackOptions { multiple: true, requeue: true })
            .await
            .context("cannot hand messages back to the dead-letter queue")?;
        let left =
            u32::try_from(done.replayed).map_or(0, |replayed| present.saturating_sub(replayed));
        wait_for_depth(channel, dead_letter_queue, left)
            .await
            .context("cannot read the dead-letter queue")?;
    }
    outcome.with_context(|| format!("after replaying {} message(s)", done.replayed))?;
    Ok(done)
}

/// Messages ready in `queue` (not counting those delivered and unacked), by a
/// passive declaration: it fails, closing the channel, if the queue does not exist.
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    Ok(channel.queue_declare(queue.into(), passive, FieldTable::default()).await?.message_count())
}

fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers.and_then(|headers| headers.inner().get(name))
}

/// A header's text, when `headers` has it as a string (long or short).
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    header(headers, name).and_then(text)
}

fn table_text(table: &FieldTable, name: &str) -> Option<String> {
    table.inner().get(name).and_then(text)
}

/// The broker's `x-death` entries, newest first.
fn x_deaths(headers: Option<&FieldTable>) -> Vec<&FieldTable> {
    match header(headers, "x-death") {
        Some(AMQPValue::FieldArray(entries)) => entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(table) => Some(table),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn first_routing_key(death: &FieldTable) -> Option<String> {
    match death.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(text),
        _ => None,
    }
}

fn without_death_headers(headers: Option<&FieldTable>) -> BTreeMap<ShortString, AMQPValue> {
    let mut headers = headers.map(|headers| headers.inner().clone()).unwrap_or_default();
    for name in BROKER_HEADERS {
        headers.remove(name);
    }
    headers
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<u64> {
    let number = match *value {
        AMQPValue::ShortShortInt(n) => i64::from(n),
        AMQPValue::ShortShortUInt(n) => i64::from(n),
        AMQPValue::ShortInt(n) => i64::from(n),
        AMQPValue::ShortUInt(n) => i64::from(n),
        AMQPValue::LongInt(n) => i64::from(n),
        AMQPValue::LongUInt(n) => i64::from(n),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    };
    u64::try_from(number).ok()
}

/// A time header: an AMQP timestamp (whole seconds, as in `x-death`) or RFC 3339 text.
fn time(value: &AMQPValue) -> Option<DateTime<Utc>> {
    match value {
        AMQPValue::Timestamp(seconds) => DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0),
        other => {
            DateTime::parse_from_rfc3339(text(other)?.trim()).ok().map(|at| at.with_timezone(&Utc))
        }
    }
}

fn text_value(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn count_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn delivery(headers: FieldTable) -> Delivery {
        with_properties(
            BasicProperties::default()
                .with_message_id("m-1".into())
                .with_type("OrderPlaced".into())
                .with_headers(headers),
        )
    }

    fn with_properties(properties: BasicProperties) -> Delivery {
        let mut delivery =
            Delivery::mock(1, "orders".into(), "order.OrderPlaced".into(), false, b"{}".to_vec());
        delivery.properties = properties;
        delivery
    }

    fn x_death(reason: &str, count: i64, time: u64) -> AMQPValue {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text_value(reason));
        death.insert("count".into(), AMQPValue::LongLongInt(count));
        death.insert("time".into(), AMQPValue::Timestamp(time));
        death.insert("queue".into(), text_value("inventory"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text_value("order.OrderPlaced")])),
        );
        AMQPValue::FieldTable(death)
    }

    fn with_x_death(entries: Vec<AMQPValue>) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(entries)));
        headers.insert("x-first-death-reason".into(), text_value("delivery_limit"));
        headers
    }

    #[test]
    fn a_broker_dead_letter_reports_the_reason_of_its_last_death() {
        let headers =
            with_x_death(vec![x_death("rejected", 1, 2_000), x_death("delivery_limit", 2, 1_000)]);
        let letter = DeadLetter::from_delivery(&delivery(headers));
        assert_eq!(letter.reason, "rejected");
        assert_eq!(letter.deaths, 3);
        assert_eq!(letter.first_death_at, DateTime::from_timestamp(1_000, 0));
        assert_eq!(letter.message_id.as_deref(), Some("m-1"));
        assert_eq!(letter.routing_key.as_deref(), Some("order.OrderPlaced"));
    }

    #[test]
    fn a_consumer_dead_letter_carries_its_reason_and_history() {
        let now = DateTime::from_timestamp(5_000, 0).expect("time");
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), text_value("00-abc-def-01"));
        let first = delivery(headers);
        let dead = with_properties(dead_letter_properties(&first, "the message has no type", now));
        let letter = DeadLetter::from_delivery(&dead);
        assert_eq!(letter.reason, "the message has no type");
        assert_eq!(letter.deaths, 1);
        assert_eq!(letter.first_death_at, Some(now));
        let headers = dead.properties.headers().clone().expect("headers");
        assert!(headers.contains_key("traceparent"), "the message's own headers are kept");
        assert_eq!(
            header_text(Some(&headers), ORIGINAL_EXCHANGE_HEADER).as_deref(),
            Some("orders")
        );

        // Replayed, it loses the reason but keeps its history; dying again, it counts 2.
        let replayed = with_properties(replay_properties(&dead));
        let headers = replayed.properties.headers().clone().expect("headers");
        assert!(!headers.contains_key(REASON_HEADER));
        assert_eq!(history(Some(&headers)), History { deaths: 1, first_death_at: Some(now) });
        let later = DateTime::from_timestamp(9_000, 0).expect("time");
        let again = with_properties(dead_letter_properties(&replayed, "again", later));
        let letter = DeadLetter::from_delivery(&again);
        assert_eq!((letter.reason.as_str(), letter.deaths), ("again", 2));
        assert_eq!(letter.first_death_at, Some(now), "the first death stays the first");
    }

    #[test]
    fn a_replay_folds_the_brokers_deaths_into_the_history() {
        let headers = with_x_death(vec![x_death("delivery_limit", 1, 1_000)]);
        let dead = delivery(headers);
        let properties = replay_properties(&dead);
        let headers = properties.headers().clone().expect("headers");
        for name in BROKER_HEADERS {
            assert!(!headers.contains_key(name), "{name} dropped");
        }
        assert_eq!(
            history(Some(&headers)),
            History { deaths: 1, first_death_at: DateTime::from_timestamp(1_000, 0) }
        );
        assert_eq!(
            header_text(Some(&headers), ORIGINAL_ROUTING_KEY_HEADER).as_deref(),
            Some("order.OrderPlaced")
        );
        assert_eq!(properties.message_id(), dead.properties.message_id());
        assert_eq!(properties.kind(), dead.properties.kind());
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let cut = truncate(&reason, MAX_REASON_BYTES);
        assert_eq!(cut.len(), MAX_REASON_BYTES);
        assert!(truncate(&reason, MAX_REASON_BYTES - 1).len() < MAX_REASON_BYTES);
        assert_eq!(truncate("short", 10), "short");
    }
}
