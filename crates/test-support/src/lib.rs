//! What the workspace's integration tests share: where the test services are,
//! polling for a condition, test logging (`TEST_LOG`), tearing a test's broker
//! topology down, the invariant every test that relays must end with, and a
//! TCP proxy that can take RabbitMQ away and bring it back. A development
//! dependency only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The broker the tests use: `AMQP_URL`, else the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The URL of the database `db` is connected to: `DATABASE_URL` with the
/// database name replaced, for a child process to use a `#[sqlx::test]` database.
pub async fn database_url_of(db: &sqlx::PgPool) -> String {
    let name: String =
        sqlx::query_scalar("SELECT current_database()").fetch_one(db).await.expect("database name");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// Sequential scans of `table` made so far by the transaction `tx` (from
/// `pg_stat_xact_user_tables`, which counts the current transaction only): how
/// tests tell that a statement used an index.
pub async fn seq_scans(tx: &mut sqlx::PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(seq_scan), 0)::int8 FROM pg_stat_xact_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(tx)
    .await
    .expect("pg_stat_xact_user_tables")
}

/// Logs of the code under test, on the test's output, when `TEST_LOG` is set
/// (to a filter such as `debug` or `outbox=trace,info`; `1` means `info`).
/// Silent otherwise. Safe to call from every test: the first call installs.
pub fn init_logging() {
    let Ok(filter) = std::env::var("TEST_LOG") else { return };
    let filter = if filter == "1" || filter.is_empty() { "info".to_owned() } else { filter };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// Deletes a test's queues and exchanges (best effort: a test that failed
/// half-way may not have declared them all).
pub async fn delete_topology(amqp_url: &str, queues: &[&str], exchanges: &[&str]) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let properties = lapin::ConnectionProperties::default();
    let Ok(connection) = lapin::Connection::connect(amqp_url, properties).await else { return };
    if let Ok(channel) = connection.create_channel().await {
        for queue in queues {
            let _ = channel.queue_delete((*queue).into(), QueueDeleteOptions::default()).await;
        }
        for exchange in exchanges {
            let _ =
                channel.exchange_delete((*exchange).into(), ExchangeDeleteOptions::default()).await;
        }
    }
    let _ = connection.close(200, "test done".into()).await;
}

/// The invariant a test that relays ends with: within `within`, the outbox has
/// no pending event left (everything accepted was published), and exactly
/// `dead` dead events (0 unless the test made some on purpose).
pub async fn assert_outbox_settled(db: &sqlx::PgPool, dead: i64, within: Duration) {
    let count = |state: &'static str| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE state = $1")
            .bind(state)
            .fetch_one(db)
            .await
            .expect("outbox count")
    };
    let drained = eventually(within, || async { count("pending").await == 0 }).await;
    assert!(drained, "{} events are still pending in the outbox", count("pending").await);
    assert_eq!(count("dead").await, dead, "dead events in the outbox");
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    check().await
}

/// A TCP proxy in front of RabbitMQ. `down()` cuts every proxied connection and
/// refuses new ones until `up()`: an outage the relay cannot tell from a real one.
pub struct BrokerProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl BrokerProxy {
    pub async fn start() -> Self {
        let broker = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        let target = format!(
            "{}:{}",
            broker.host_str().unwrap_or("127.0.0.1"),
            broker.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (accept_up, accept_connections, accept_stop) =
            (up.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else { continue };
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropping `inbound` refuses the connection
                }
                let cut = accept_connections.lock().await.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, up, connections, stop }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut connections = self.connections.lock().await;
        connections.cancel();
        *connections = CancellationToken::new();
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
