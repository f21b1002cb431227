//! The dead-letter queue: poison arrives there with its reason, `dlq list` shows
//! it without taking it, and `dlq replay` moves it back, acking it from the
//! dead-letter queue only once the broker confirmed its copy.
//!
//! A message whose order does not exist is poison until the order appears: the
//! tests dead-letter such messages, write their orders, then replay them.

use std::time::Duration;

use inventory_consumer::dead_letter::{REASON_HEADER, Replayed, Selection};
use inventory_consumer::message::Message;
use inventory_consumer::{Command, Config, dlq};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use order_events::{OrderPlaced, OrderPlacedLine};
use serde_json::Value;
use sqlx::PgPool;
use test_support::eventually;
use uuid::Uuid;

use crate::helpers::{TestBroker, TestConsumer, insert_orders, order_status, processed_count};

const WITHIN: Duration = Duration::from_secs(10);

/// OrderPlaced messages for orders that are not (yet) in the database.
pub(crate) fn messages_for_missing_orders(count: usize) -> Vec<Message> {
    (0..count)
        .map(|_| Message {
            id: Uuid::now_v7(),
            event: OrderPlaced {
                order_id: Uuid::now_v7(),
                customer_id: "test".to_owned(),
                lines: vec![OrderPlacedLine { sku: "SKU-011".to_owned(), quantity: 1 }],
                total_cents: 0,
            }
            .into(),
        })
        .collect()
}

/// Writes the PENDING orders `messages` name, so that a replay can apply them.
pub(crate) async fn create_orders(db: &PgPool, messages: &[Message]) {
    for message in messages {
        let event = &message.event;
        sqlx::query("INSERT INTO orders (id, customer_id, total_cents) VALUES ($1, 'test', 0)")
            .bind(event.order_id())
            .execute(db)
            .await
            .expect("insert order");
        for line in event.lines() {
            sqlx::query(
                "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
                 VALUES ($1, $2, $3, 0)",
            )
            .bind(event.order_id())
            .bind(&line.sku)
            .bind(line.quantity)
            .execute(db)
            .await
            .expect("insert line");
        }
    }
}

/// Publishes `messages` (whose orders do not exist) to a running consumer and
/// waits until all are in the dead-letter queue.
pub(crate) async fn dead_letter(
    broker: &TestBroker,
    consumer: &TestConsumer,
    messages: &[Message],
) {
    let poison_before = consumer.metrics.count("poison");
    for message in messages {
        broker.publish(message).await;
    }
    let expected = poison_before + messages.len() as u64;
    let dead = eventually(WITHIN, || async { consumer.metrics.count("poison") >= expected }).await;
    assert!(dead, "{} of {expected} dead-lettered", consumer.metrics.count("poison"));
    let depth = messages.len() as u32 + poison_before as u32;
    let there = eventually(WITHIN, || async { broker.dead_letter_depth().await == depth }).await;
    assert!(there, "{} in the dead-letter queue, not {depth}", broker.dead_letter_depth().await);
}

fn ids(letters: &[inventory_consumer::dead_letter::DeadLetter]) -> Vec<String> {
    letters.iter().map(|letter| letter.message_id.clone().unwrap_or_default()).collect()
}

fn header_text(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_its_batch_applied_once(db: PgPool) {
    let broker = TestBroker::new().await;
    let good = insert_orders(&db, &[vec![("SKU-010", 1)], vec![("SKU-010", 2)]]).await;
    let [missing] = messages_for_missing_orders(1).try_into().expect("one");
    let untyped = Uuid::now_v7().to_string();
    let body = serde_json::to_vec(&good[0].event).expect("json");
    broker.publish(&good[0]).await;
    broker.publish_raw(Some(&untyped), None, &body).await; // poison when decoded
    broker.publish(&missing).await; // poison when applied
    broker.publish(&good[1]).await;
    // Started after publishing, so that the four share a batch if they can.
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &["--concurrency", "1"]).await;
    consumer.wait_settled(4, WITHIN).await;

    assert_eq!(consumer.metrics.count("completed"), 2);
    assert_eq!(consumer.metrics.count("poison"), 2);
    assert_eq!(processed_count(&db).await, 2, "each good message applied once");
    for message in &good {
        assert_eq!(order_status(&db, message.event.order_id()).await, "COMPLETED");
    }
    assert_eq!(broker.ready_messages().await, 0, "nothing is left unsettled");

    let missing_reason = format!("order {} does not exist", missing.event.order_id());
    let dead = broker.dead_letters(2, WITHIN).await;
    assert_eq!(dead.len(), 2);
    let (decoded, applied) = (&dead[0], &dead[1]);
    assert_eq!(decoded.properties.message_id().as_ref().map(|id| id.to_string()), Some(untyped));
    assert_eq!(decoded.data, body, "the body travels as it was");
    assert_eq!(header_text(decoded, REASON_HEADER).as_deref(), Some("the message has no type"));
    assert_eq!(
        applied.properties.message_id().as_ref().map(|id| id.to_string()),
        Some(missing.id.to_string())
    );
    assert_eq!(
        applied.properties.kind().as_ref().map(|kind| kind.to_string()).as_deref(),
        Some("OrderPlaced")
    );
    assert_eq!(header_text(applied, REASON_HEADER), Some(missing_reason));
    assert_eq!(
        header_text(applied, "x-original-routing-key").as_deref(),
        Some(broker.config.inventory_binding.as_str())
    );
    assert_eq!(applied.properties.delivery_mode(), &Some(2), "still persistent");
    assert!(broker.dead_letters(1, Duration::from_millis(200)).await.is_empty(), "no copies");
    consumer.stop().await;
    broker.delete().await;
}

/// Poison the dead-letter exchange cannot take (it has no queue bound, so the
/// mandatory copy comes back) is handed back to the queue, not acked; the worker
/// reconnects, declares its topology afresh, and dead-letters it then.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn poison_the_dead_letter_exchange_does_not_confirm_goes_back_to_the_queue(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &["--concurrency", "1"]).await;
    let client = reqwest::Client::new();
    let readyz = format!("{}/readyz", consumer.address);
    let consuming = eventually(WITHIN, || async {
        client.get(&readyz).send().await.is_ok_and(|response| response.status() == 200)
    })
    .await;
    assert!(consuming, "the worker has declared its topology and consumes");
    let config = &broker.config;
    broker
        .channel()
        .queue_unbind(
            config.dead_letter_queue.as_str().into(),
            config.dead_letter_exchange.as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");

    let [missing] = messages_for_missing_orders(1).try_into().expect("one");
    dead_letter(&broker, &consumer, std::slice::from_ref(&missing)).await;

    assert!(consumer.metrics.dead_letter_failures.get() >= 1, "it was handed back first");
    assert_eq!(consumer.metrics.count("poison"), 1);
    let dead = broker.dead_letters(2, Duration::from_millis(500)).await;
    assert_eq!(dead.len(), 1, "one copy in the dead-letter queue");
    assert_eq!(
        header_text(&dead[0], REASON_HEADER),
        Some(format!("order {} does not exist", missing.event.order_id()))
    );
    assert_eq!(broker.ready_messages().await, 0);
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn listing_shows_both_kinds_of_dead_letter_and_leaves_the_queue_as_it_was(db: PgPool) {
    let broker = TestBroker::new_with(|config| config.delivery_limit = 1).await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let by_consumer = messages_for_missing_orders(2);
    dead_letter(&broker, &consumer, &by_consumer).await;
    let by_broker = insert_orders(&db, &[vec![("SKU-012", 1)], vec![("SKU-012", 1)]]).await;
    consumer.stop().await;

    // Dead-lettered by the broker: one rejected without requeue, one that
    // reached the delivery limit (delivered twice, never acked).
    let channel = broker.channel();
    let queue = broker.config.inventory_queue.as_str();
    broker.publish(&by_broker[0]).await;
    let got = channel.basic_get(queue.into(), BasicGetOptions::default()).await.expect("get");
    let got = got.expect("the message");
    got.delivery.reject(BasicRejectOptions { requeue: false }).await.expect("reject");
    broker.publish(&by_broker[1]).await;
    while let Some(got) =
        channel.basic_get(queue.into(), BasicGetOptions::default()).await.expect("get")
    {
        got.delivery.reject(BasicRejectOptions { requeue: true }).await.expect("requeue");
    }
    let four = eventually(WITHIN, || async { broker.dead_letter_depth().await == 4 }).await;
    assert!(four, "four dead letters");

    let before = broker.dead_letter_depth().await;
    let listed = dlq::list(&broker.config, 100).await.expect("list");
    assert_eq!(broker.dead_letter_depth().await, before, "listing removes nothing");

    let expected_ids: Vec<String> =
        by_consumer.iter().chain(&by_broker).map(|message| message.id.to_string()).collect();
    assert_eq!(ids(&listed), expected_ids, "oldest first");
    let reasons: Vec<&str> = listed.iter().map(|letter| letter.reason.as_str()).collect();
    let missing =
        |index: usize| format!("order {} does not exist", by_consumer[index].event.order_id());
    assert_eq!(reasons, [missing(0).as_str(), missing(1).as_str(), "rejected", "delivery_limit"]);
    for letter in &listed {
        assert_eq!(letter.deaths, 1, "{letter:?}");
        let first = letter.first_death_at.expect("first death time");
        let age = chrono::Utc::now() - first;
        assert!(
            age < chrono::TimeDelta::minutes(1) && age > chrono::TimeDelta::seconds(-5),
            "{first}"
        );
        assert_eq!(letter.kind.as_deref(), Some("OrderPlaced"));
        assert_eq!(letter.routing_key.as_deref(), Some(broker.config.inventory_binding.as_str()));
    }

    // A second pass sees the same messages in the same order; a limit takes the oldest.
    assert_eq!(dlq::list(&broker.config, 100).await.expect("list"), listed);
    assert_eq!(dlq::list(&broker.config, 2).await.expect("list"), listed[..2]);
    assert_eq!(broker.dead_letter_depth().await, before);
    let again = dlq::list(&broker.config, 100).await.expect("list");
    assert_eq!(again, listed, "a limited listing does not rotate the queue");
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn replaying_one_message_moves_exactly_it_back_and_the_consumer_applies_it(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let messages = messages_for_missing_orders(3);
    dead_letter(&broker, &consumer, &messages).await;
    create_orders(&db, &messages).await; // the cause is fixed

    let chosen = &messages[1];
    let done =
        dlq::replay(&broker.config, &Selection::Id(chosen.id.to_string())).await.expect("replay");

    assert_eq!(done, Replayed { replayed: 1, failed: 0 });
    consumer.wait_settled(4, WITHIN).await;
    assert_eq!(consumer.metrics.count("completed"), 1);
    assert_eq!(order_status(&db, chosen.event.order_id()).await, "COMPLETED");
    for other in [&messages[0], &messages[2]] {
        assert_eq!(order_status(&db, other.event.order_id()).await, "PENDING");
    }
    assert_eq!(broker.dead_letter_depth().await, 2);
    let left = dlq::list(&broker.config, 100).await.expect("list");
    assert_eq!(ids(&left), [messages[0].id.to_string(), messages[2].id.to_string()]);
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn replaying_all_moves_every_message_back(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let messages = messages_for_missing_orders(5);
    dead_letter(&broker, &consumer, &messages).await;
    // Two are fixed; the other three die again and go back to the dead-letter
    // queue during the replay, which takes each message once all the same.
    create_orders(&db, &messages[..2]).await;

    let done = dlq::replay(&broker.config, &Selection::All).await.expect("replay");

    assert_eq!(done, Replayed { replayed: 5, failed: 0 });
    consumer.wait_settled(10, WITHIN).await;
    assert_eq!(consumer.metrics.count("completed"), 2);
    let back = eventually(WITHIN, || async { broker.dead_letter_depth().await == 3 }).await;
    assert!(back, "the three unfixed ones died again: {}", broker.dead_letter_depth().await);
    let dead = dlq::list(&broker.config, 100).await.expect("list");
    // In the order the consumer's workers dead-lettered them again.
    let mut dead_ids = ids(&dead);
    dead_ids.sort();
    let mut expected = ids_of(&messages[2..]);
    expected.sort();
    assert_eq!(dead_ids, expected);
    for letter in &dead {
        assert_eq!(letter.deaths, 2, "the second death is counted: {letter:?}");
    }

    // The cause fixed, a second replay empties the queue.
    create_orders(&db, &messages[2..]).await;
    let done = dlq::replay(&broker.config, &Selection::All).await.expect("replay");
    assert_eq!(done, Replayed { replayed: 3, failed: 0 });
    consumer.wait_settled(13, WITHIN).await;
    assert_eq!(consumer.metrics.count("completed"), 5);
    assert_eq!(broker.dead_letter_depth().await, 0);
    consumer.stop().await;
    broker.delete().await;
}

fn ids_of(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|message| message.id.to_string()).collect()
}

/// The command as a user types it: an unknown id is an error (exit 1) and
/// leaves every message where it was.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn replaying_an_unknown_id_is_an_error_and_changes_nothing(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let messages = messages_for_missing_orders(2);
    dead_letter(&broker, &consumer, &messages).await;
    let before = dlq::list(&broker.config, 100).await.expect("list");

    let unknown = Uuid::now_v7().to_string();
    let (config, command) = parse(&broker, &["dlq", "replay", "--id", &unknown]);
    let mut out = Vec::new();
    let error = dlq::run(&config.broker, &command, &mut out).await.expect_err("an error");

    assert!(format!("{error:#}").contains(&format!("no message with id {unknown}")), "{error:#}");
    assert_eq!(
        String::from_utf8(out).expect("utf-8").trim(),
        format!("0 message(s) replayed to {:?}", broker.config.inventory_queue)
    );
    assert_eq!(broker.dead_letter_depth().await, 2);
    assert_eq!(dlq::list(&broker.config, 100).await.expect("list"), before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(consumer.settled(), 2, "nothing was replayed");
    consumer.stop().await;
    broker.delete().await;
}

/// A replay the broker does not confirm (here: no such target queue, so the
/// mandatory copy comes back) leaves the message in the dead-letter queue.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_whose_replay_is_not_confirmed_stays_in_the_dead_letter_queue(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let messages = messages_for_missing_orders(2);
    dead_letter(&broker, &consumer, &messages).await;
    consumer.stop().await;
    let before = dlq::list(&broker.config, 100).await.expect("list");

    let mut elsewhere = broker.config.clone();
    elsewhere.inventory_queue = format!("test.no-such-queue.{}", Uuid::new_v4().simple());
    let done = dlq::replay(&elsewhere, &Selection::All).await.expect("replay");

    assert_eq!(done, Replayed { replayed: 0, failed: 2 });
    assert_eq!(broker.dead_letter_depth().await, 2);
    assert_eq!(dlq::list(&broker.config, 100).await.expect("list"), before);
    let (config, command) = parse(&broker, &["dlq", "replay", "--all"]);
    let mut config = config;
    config.broker.inventory_queue = elsewhere.inventory_queue.clone();
    let error = dlq::run(&config.broker, &command, &mut Vec::new()).await.expect_err("exit 1");
    assert!(format!("{error:#}").contains("did not confirm 2 message(s)"), "{error:#}");
    assert_eq!(broker.dead_letter_depth().await, 2);
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_dlq_command_lists_text_or_json_lines_and_checks_its_arguments(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let messages = messages_for_missing_orders(3);
    dead_letter(&broker, &consumer, &messages).await;
    consumer.stop().await;

    let (config, command) = parse(&broker, &["dlq", "list", "--limit", "2", "--json"]);
    let mut out = Vec::new();
    dlq::run(&config.broker, &command, &mut out).await.expect("list");
    let lines: Vec<Value> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["message_id"], messages[0].id.to_string());
    assert_eq!(
        lines[0]["reason"],
        format!("order {} does not exist", messages[0].event.order_id())
    );
    assert_eq!(lines[0]["deaths"], 1);
    assert!(lines[0]["first_death_at"].is_string());

    let (config, command) = parse(&broker, &["dlq", "list"]);
    let mut out = Vec::new();
    dlq::run(&config.broker, &command, &mut out).await.expect("list");
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(text.lines().count(), 3, "{text}");
    let first = text.lines().next().expect("a line");
    assert!(
        first.starts_with(&format!("{}  deaths=1  first_death_at=", messages[0].id)),
        "{first}"
    );
    assert!(
        first.ends_with(&format!(
            "reason=\"order {} does not exist\"",
            messages[0].event.order_id()
        ))
    );
    assert_eq!(broker.dead_letter_depth().await, 3);

    // Settings before or after the subcommand; replay needs --id or --all, not both.
    let after = Config::try_parse_command_line([
        "inventory-consumer",
        "dlq",
        "list",
        "--dead-letter-queue",
        "after",
    ])
    .expect("parses");
    assert_eq!(after.broker.dead_letter_queue, "after");
    let before = Config::try_parse_command_line([
        "inventory-consumer",
        "--dead-letter-queue",
        "before",
        "dlq",
        "list",
    ])
    .expect("parses");
    assert_eq!(before.broker.dead_letter_queue, "before");
    for wrong in [&["dlq", "replay"][..], &["dlq", "replay", "--id", "x", "--all"]] {
        let args = std::iter::once("inventory-consumer").chain(wrong.iter().copied());
        assert!(Config::try_parse_command_line(args).is_err(), "{wrong:?} is refused");
    }
    broker.delete().await;
}

/// The command line for `args` against `broker`'s topology, as a user would type it.
fn parse(broker: &TestBroker, args: &[&str]) -> (Config, inventory_consumer::DlqCommand) {
    let config = &broker.config;
    let mut line = vec!["inventory-consumer"];
    line.extend_from_slice(args);
    line.extend([
        "--amqp-url",
        &config.amqp_url,
        "--inventory-queue",
        &config.inventory_queue,
        "--dead-letter-queue",
        &config.dead_letter_queue,
    ]);
    let parsed = Config::try_parse_command_line(line).expect("parses");
    let Some(Command::Dlq(command)) = parsed.command.clone() else { panic!("a dlq command") };
    (parsed, command)
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_admin_api_lists_and_replays_dead_letters_only_with_the_token(db: PgPool) {
    const TOKEN: &str = "consumer-admin-token-0123456789";
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &["--admin-token", TOKEN]).await;
    let messages = messages_for_missing_orders(2);
    dead_letter(&broker, &consumer, &messages).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", consumer.address);

    for token in [None, Some("wrong")] {
        let mut request = client.get(url("/admin/dlq"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("answer");
        assert_eq!(response.status(), 401, "{token:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "unauthorized");
    }
    let listed: Value = client
        .get(url("/admin/dlq"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    let listed: Vec<&str> = listed["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|letter| letter["message_id"].as_str().expect("id"))
        .collect();
    let expected: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
    assert_eq!(listed, expected, "oldest first, left in place");
    assert_eq!(broker.dead_letter_depth().await, 2);

    // Its order written, one replayed message is applied.
    create_orders(&db, &messages[..1]).await;
    let path = format!("/admin/dlq/{}/replay", messages[0].id);
    let response = client.post(url(&path)).bearer_auth(TOKEN).send().await.expect("answer");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["replayed"], 1);
    let applied = eventually(WITHIN, || async {
        order_status(&db, messages[0].event.order_id()).await == "COMPLETED"
    })
    .await;
    assert!(applied, "the replayed message was applied");
    assert_eq!(broker.dead_letter_depth().await, 1, "the other stays");
    let response = client.post(url(&path)).bearer_auth(TOKEN).send().await.expect("answer");
    assert_eq!(response.status(), 404, "no longer there");
    let metrics = reqwest::get(url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("inventory_admin_replayed_messages_total 1"), "counted");

    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn without_admin_token_the_consumers_admin_api_is_not_there(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db, &broker.config, &[]).await;
    let response = reqwest::Client::new()
        .get(format!("{}/admin/dlq", consumer.address))
        .bearer_auth("anything")
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"], "not_found");
    consumer.stop().await;
    broker.delete().await;
}
