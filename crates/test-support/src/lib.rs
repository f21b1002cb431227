//! What the workspace's integration tests share: where the test services are,
//! polling for a condition, test logging (`TEST_LOG`), tearing a test's broker
//! topology down, the invariant every test that relays must end with, and a
//! TCP fault proxy for any service (pass, hold, reset, or break the
//! one connection that sends given bytes). A development
//! dependency only.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
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

/// The value of the sample `name` (with its labels, if any: `name{a="b"}`) in
/// the OpenMetrics text `metrics`.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// `GET <base>/metrics`, as text.
pub async fn scrape(base: &str) -> String {
    let response = reqwest::get(format!("{base}/metrics")).await.expect("GET /metrics");
    assert!(response.status().is_success(), "GET /metrics answered {}", response.status());
    response.text().await.expect("metrics text")
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

/// What a [`FaultProxy`] does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every byte passes, both ways.
    Pass,
    /// A partition: no byte passes either way, and nothing is closed. New
    /// connections are accepted and held too.
    Hold,
    /// Every proxied connection is closed, and new ones are refused, until the
    /// next [`Fault::Pass`].
    Reset,
}

/// What a [`FaultProxy`] does to the one connection whose client sends the
/// bytes it was armed with (see [`FaultProxy::arm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMatch {
    /// Passes the bytes on, throws away whatever the server answers, and closes
    /// that connection a moment later: the server acted, the client never
    /// learns what happened.
    LoseAnswer,
    /// Closes that connection without passing the bytes on: the server never
    /// sees them.
    Swallow,
    /// Passes the bytes on, then holds every connection (as [`Fault::Hold`]).
    HoldAll,
}

/// A TCP proxy in front of any service, for faults the code under test cannot
/// tell from real ones: a partition that holds every byte without closing
/// anything, a reset of every connection, or one connection broken right after
/// its client sent given bytes (a `COMMIT`, say). Stops with its last handle.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<ProxyState>,
    stop: CancellationToken,
}

struct ProxyState {
    fault: tokio::sync::watch::Sender<Fault>,
    armed: std::sync::Mutex<Option<(Vec<u8>, OnMatch)>>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(ProxyState {
            fault: tokio::sync::watch::channel(Fault::Pass).0,
            armed: std::sync::Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let (accept_state, accept_stop, target) = (state.clone(), stop.clone(), target.to_owned());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                if *accept_state.fault.borrow() == Fault::Reset {
                    continue; // dropping `inbound` refuses the connection
                }
                let (state, stop, target) =
                    (accept_state.clone(), accept_stop.clone(), target.clone());
                tokio::spawn(async move {
                    // A held connection is not even passed on until the hold ends.
                    let mut fault = state.fault.subscribe();
                    let held = wait_while_held(&mut fault);
                    let passed = tokio::select! {
                        passed = held => passed,
                        () = stop.cancelled() => false,
                    };
                    if !passed {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = proxy_connection(&state, inbound, outbound) => {}
                    }
                });
            }
        });
        Self { port, state, stop }
    }

    /// A proxy in front of the test broker (`AMQP_URL`).
    pub async fn broker() -> Self {
        Self::start(&host_and_port(&amqp_url(), 5672)).await
    }

    /// A proxy in front of the test database server (`DATABASE_URL`).
    pub async fn database() -> Self {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
        Self::start(&host_and_port(&url, 5432)).await
    }

    /// The test broker's URL through this proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Sets what happens to the bytes from now on, on every connection.
    pub fn set(&self, fault: Fault) {
        self.state.fault.send_replace(fault);
    }

    /// The next connection whose client sends `bytes` gets `then` (once).
    pub fn arm(&self, bytes: &[u8], then: OnMatch) {
        *self.state.armed.lock().expect("armed") = Some((bytes.to_vec(), then));
    }

    /// Whether the armed bytes were seen since [`FaultProxy::arm`].
    pub fn fired(&self) -> bool {
        self.state.armed.lock().expect("armed").is_none()
    }

    /// Closes every connection and refuses new ones (as [`Fault::Reset`]).
    pub async fn down(&self) {
        self.set(Fault::Reset);
    }

    /// Passes bytes again (as [`Fault::Pass`]).
    pub fn up(&self) {
        self.set(Fault::Pass);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn host_and_port(url: &str, default_port: u16) -> String {
    let url = url::Url::parse(url).expect("a service URL");
    format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(default_port))
}

/// Waits while the fault is [`Fault::Hold`]; false once it is [`Fault::Reset`].
async fn wait_while_held(fault: &mut tokio::sync::watch::Receiver<Fault>) -> bool {
    loop {
        match *fault.borrow_and_update() {
            Fault::Pass => return true,
            Fault::Reset => return false,
            Fault::Hold => {}
        }
        if fault.changed().await.is_err() {
            return false;
        }
    }
}

/// Carries one connection both ways until either side closes or a reset.
async fn proxy_connection(state: &ProxyState, inbound: TcpStream, outbound: TcpStream) {
    let (client_read, client_write) = inbound.into_split();
    let (server_read, server_write) = outbound.into_split();
    let lose_answer = CancellationToken::new();
    let closed = CancellationToken::new();
    let upstream = pump(state, client_read, server_write, Direction::Up(&lose_answer), &closed);
    let downstream = pump(state, server_read, client_write, Direction::Down(&lose_answer), &closed);
    let answer_lost = async {
        lose_answer.cancelled().await;
        // Long enough for the server to act on what it received.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
        () = answer_lost => {}
        () = closed.cancelled() => {}
    }
}

/// Which way a [`pump`] carries bytes, with the connection's "answer lost"
/// token: set upstream when the armed bytes pass, obeyed downstream.
#[derive(Clone, Copy)]
enum Direction<'a> {
    /// Client to server, where armed bytes are looked for.
    Up(&'a CancellationToken),
    /// Server to client, thrown away once the answer is to be lost.
    Down(&'a CancellationToken),
}

/// Copies `from` to `to`, holding while the fault says so. Cancels `closed`
/// when this connection is to end.
async fn pump(
    state: &ProxyState,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction<'_>,
    closed: &CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut fault = state.fault.subscribe();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = until_reset(&mut fault) => break,
            () = closed.cancelled() => break,
        };
        let Ok(n) = read else { break };
        if n == 0 {
            break;
        }
        if !wait_while_held(&mut fault).await {
            break;
        }
        let chunk = &buffer[..n];
        if let Direction::Up(lose_answer) = direction {
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(chunk);
            let matched = {
                let mut armed = state.armed.lock().expect("armed");
                // A match must end in this chunk: the tail only joins a match
                // split across two reads, it does not match again.
                let fresh = window.len() - chunk.len();
                let hit = armed.as_ref().is_some_and(|(bytes, _)| {
                    window
                        .windows(bytes.len())
                        .enumerate()
                        .any(|(at, part)| at + bytes.len() > fresh && part == bytes.as_slice())
                });
                if hit { armed.take().map(|(_, then)| then) } else { None }
            };
            tail = window[window.len().saturating_sub(64)..].to_vec();
            match matched {
                Some(OnMatch::Swallow) => break,
                Some(OnMatch::LoseAnswer) => {
                    if to.write_all(chunk).await.is_err() {
                        break;
                    }
                    lose_answer.cancel();
                    continue;
                }
                Some(OnMatch::HoldAll) => {
                    let _ = to.write_all(chunk).await;
                    state.fault.send_replace(Fault::Hold);
                    continue;
                }
                None => {}
            }
        } else if let Direction::Down(lost) = direction
            && lost.is_cancelled()
        {
            continue;
        }
        if to.write_all(chunk).await.is_err() {
            break;
        }
    }
    closed.cancel();
}

/// Returns once the fault becomes [`Fault::Reset`].
async fn until_reset(fault: &mut tokio::sync::watch::Receiver<Fault>) {
    loop {
        if *fault.borrow_and_update() == Fault::Reset || fault.changed().await.is_err() {
            return;
        }
    }
}
