//! A database made by the migrations of 2026-11-24, when the application's
//! migrations still created the outbox's tables, upgrades to the outbox crate's
//! own migrations without losing an event or a processed message, and ends with
//! the schema a new database gets.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use service_kit::broker::BrokerConfig;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::helpers::spawn_app_with_relay;
use crate::relay::delete_topology;

/// `migrations/` as it was on 2026-11-24, frozen.
static EARLIER: Migrator = sqlx::migrate!("tests/fixtures/migrations-2026-11-24");

#[sqlx::test(migrations = false)]
async fn a_database_of_the_earlier_migrations_upgrades_without_losing_anything(db: PgPool) {
    EARLIER.run(&db).await.expect("the earlier migrations");
    let pending: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    let dead = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, state, attempts, last_error)
         SELECT id, 'order', id::text, 'OrderPlaced', '{}', state, attempts, error
         FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[]) AS t(id, state, attempts, error)",
    )
    .bind([pending[0], pending[1], dead])
    .bind(["pending", "pending", "dead"])
    .bind([0, 3, 10])
    .bind([None, Some("nacked by the broker"), Some("nacked by the broker")])
    .execute(&db)
    .await
    .expect("outbox rows");
    let processed: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id) SELECT 'inventory', unnest($1::uuid[])",
    )
    .bind(&processed)
    .execute(&db)
    .await
    .expect("processed messages");

    service_kit::MIGRATOR.run(&db).await.expect("the upgrade");
    service_kit::MIGRATOR.run(&db).await.expect("a second run changes nothing");

    let upgraded = schema_of(&db).await;
    assert!(upgraded.iter().any(|line| line.contains("outbox_due_idx")), "{upgraded:#?}");
    assert!(!upgraded.iter().any(|line| line.contains("orders_status_idx")), "{upgraded:#?}");
    assert_eq!(upgraded, schema_of_a_new_database(&db).await);
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_messages WHERE message_id = ANY($1)")
            .bind(&processed)
            .fetch_one(&db)
            .await
            .expect("count");
    assert_eq!(kept, 3, "every processed message is kept");
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM outbox WHERE id = $1")
            .bind(dead)
            .fetch_one(&db)
            .await
            .expect("the dead event is kept");
    assert_eq!((state.as_str(), attempts), ("dead", 10));

    // The pending events are published by today's relay.
    let broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    let _app = spawn_app_with_relay(db.clone(), &broker).await;
    let connection = outbox::amqp::connect(&broker.amqp_url, "upgrade-test").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    // Declared as the relay does, so the queue can be read before it connects.
    broker.inventory_topology().declare(&channel).await.expect("inventory queue");
    let mut arrived = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while arrived.len() < 2 && tokio::time::Instant::now() < deadline {
        match channel
            .basic_get(broker.inventory_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            Some(message) => {
                let id = message.delivery.properties.message_id().as_ref().expect("message id");
                arrived.push(id.as_str().parse::<Uuid>().expect("a UUID"));
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    arrived.sort();
    assert_eq!(arrived, pending, "both pending events arrived");
    let left: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM outbox").fetch_all(&db).await.expect("outbox");
    assert_eq!(left, vec![dead], "only the dead event is left, for an operator to replay");
    let _ = connection.close(200, "done".into()).await;
    delete_topology(&broker).await;
}

/// Tables, columns, indexes, constraints, triggers and storage options of
/// `db`'s public schema, as sorted lines.
async fn schema_of(db: &PgPool) -> Vec<String> {
    let mut connection = db.acquire().await.expect("connection");
    schema_on(&mut connection).await
}

async fn schema_on(connection: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('column %s.%s %s %s %s', table_name, column_name, data_type, is_nullable,
                       coalesce(column_default, ''))
         FROM information_schema.columns WHERE table_schema = 'public'
         UNION ALL
         SELECT format('index %s', indexdef) FROM pg_indexes WHERE schemaname = 'public'
         UNION ALL
         SELECT format('constraint %s %s', conrelid::regclass, pg_get_constraintdef(oid))
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace
         UNION ALL
         SELECT format('trigger %s', pg_get_triggerdef(oid)) FROM pg_trigger
         WHERE NOT tgisinternal
         UNION ALL
         SELECT format('options %s %s', relname, reloptions) FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL
         ORDER BY 1",
    )
    .fetch_all(connection)
    .await
    .expect("schema")
}

/// The schema `service_kit::MIGRATOR` gives a new database on the same server.
async fn schema_of_a_new_database(db: &PgPool) -> Vec<String> {
    let name = format!("upgrade_fresh_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(db).await.expect("create");
    let options = (*db.connect_options()).clone().database(&name);
    let mut fresh = PgConnection::connect_with(&options).await.expect("connect");
    service_kit::MIGRATOR.run(&mut fresh).await.expect("a new database");
    let schema = schema_on(&mut fresh).await;
    fresh.close().await.expect("close");
    sqlx::query(&format!("DROP DATABASE {name}")).execute(db).await.expect("drop");
    schema
}
