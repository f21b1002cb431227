//! The console in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver) by fantoccini, against an order-service with ADMIN_TOKEN and
//! CONSUMER_ADMIN_URL and an inventory-consumer with the same token. A wrong
//! token is refused; the right one shows, while orders flow, the broker up, the
//! publish rate, the lag, a dead event and a dead letter this test made; each
//! is replayed with its button, leaves its list and its order is decided;
//! signing out shows the login form again. The page, full of data,
//! is saved as `target/console.png` (and as `docs/console.png`, the README's
//! picture, when UPDATE_CONSOLE_SCREENSHOT is set).
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver` packages, which scripts/test.sh installs). Without them
//! the test says loudly that it skipped, unless OUTBOX_REQUIRE_BROWSER is set
//! (scripts/test.sh sets it): then it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use inventory_consumer::message::Message;
use serde_json::json;
use sqlx::PgPool;
use test_support::eventually;
use tokio_util::sync::CancellationToken;

use crate::dlq::{create_orders, dead_letter, messages_for_missing_orders};
use crate::helpers::{TestApi, TestBroker, TestConsumer, order_status};

const TOKEN: &str = "console-admin-token-0123456789abcdef";
const WITHIN: Duration = Duration::from_secs(15);

/// chromedriver on a free port, killed when dropped.
struct Chromedriver {
    url: String,
    _process: tokio::process::Child,
}

impl Chromedriver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let process = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        let ready = eventually(WITHIN, || async {
            reqwest::get(&status).await.is_ok_and(|answer| answer.status().is_success())
        })
        .await;
        assert!(ready, "chromedriver answers on {url}");
        Self { url, _process: process }
    }

    /// A headless Chromium session with a laptop-sized window.
    async fn browser(&self) -> Client {
        let options = json!({
            "binary": chromium().expect("chromium").to_string_lossy(),
            // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,840", "--hide-scrollbars"],
        });
        let capabilities = json!({ "browserName": "chrome", "goog:chromeOptions": options });
        let serde_json::Value::Object(capabilities) = capabilities else { unreachable!() };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|file| file.is_file())
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].into_iter().find_map(on_path)
}

/// The text of the first element `css` selects, or "" when there is none.
async fn text_of(browser: &Client, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn present(browser: &Client, css: &str) -> bool {
    browser.find_all(Locator::Css(css)).await.is_ok_and(|found| !found.is_empty())
}

async fn sign_in(browser: &Client, token: &str) {
    let field = browser.wait().at_most(WITHIN).for_element(Locator::Id("token")).await;
    field.expect("the login form").send_keys(token).await.expect("typed");
    let submit = browser.find(Locator::Css("button[type=submit]")).await.expect("button");
    submit.click().await.expect("submitted");
}

/// Clicks the Replay button of the row `row` selects and waits until the row
/// has left its list.
async fn replay_row(browser: &Client, row: &str) {
    let button = browser.find(Locator::Css(&format!("{row} button.replay"))).await;
    button.expect("a Replay button").click().await.expect("clicked");
    let gone = eventually(WITHIN, || async { !present(browser, row).await }).await;
    assert!(gone, "{row} left its list after its replay");
}

/// Orders placed through the API, a few every 50 ms, until `stop` is
/// cancelled: traffic for the charts.
fn load(address: String, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut n = 0;
        while !stop.is_cancelled() {
            for _ in 0..3 {
                n += 1;
                let order = json!({"customer_id": format!("console-{n}"),
                                   "items": [{"sku": "SKU-004", "quantity": 1}]});
                let placed = client.post(format!("{address}/orders")).json(&order).send().await;
                assert_eq!(placed.expect("an answer").status(), 201);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Events the relay parked dead after the broker refused them, written by
/// hand: `messages`, for PENDING orders that exist.
async fn dead_events(db: &PgPool, messages: &[Message]) {
    create_orders(db, messages).await;
    for message in messages {
        sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,
                                 state, attempts, last_error)
             VALUES ($1, 'order', $2, 'OrderPlaced', $3, 'dead', 10,
                     'the broker refused it: NOT_FOUND - no exchange ''orders''')",
        )
        .bind(message.id)
        .bind(message.event.order_id().to_string())
        .bind(serde_json::to_value(&message.event).expect("json"))
        .execute(db)
        .await
        .expect("a dead event");
    }
}

fn save_screenshot(png: &[u8]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut targets = vec![root.join("target/console.png")];
    if std::env::var_os("UPDATE_CONSOLE_SCREENSHOT").is_some() {
        targets.push(root.join("docs/console.png"));
    }
    for target in targets {
        std::fs::write(&target, png).expect("the screenshot written");
        eprintln!("the console's screenshot: {}", target.display());
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_operator_signs_in_sees_the_dead_and_replays_them_in_a_real_browser(db: PgPool) {
    if chromium().is_none() || on_path("chromedriver").is_none() {
        assert!(
            std::env::var_os("OUTBOX_REQUIRE_BROWSER").is_none(),
            "OUTBOX_REQUIRE_BROWSER is set and chromium or chromedriver is not installed \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "!! SKIPPED an_operator_signs_in_sees_the_dead_and_replays_them_in_a_real_browser: \
             chromium or chromedriver is not installed (apt-get install chromium \
             chromium-driver); the console was NOT tested in a browser"
        );
        return;
    }
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &["--admin-token", TOKEN]).await;
    let api_args = ["--admin-token", TOKEN, "--consumer-admin-url", &consumer.address];
    let api = TestApi::spawn(&db, &broker.config, &api_args).await;
    let stop_load = CancellationToken::new();
    let traffic = load(api.address.clone(), stop_load.clone());
    let events = messages_for_missing_orders(2);
    dead_events(&db, &events).await;
    let letters = messages_for_missing_orders(2);
    dead_letter(&broker, &consumer, &letters).await;

    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/console", api.address)).await.expect("the console");
    sign_in(&browser, "not-the-token").await;
    let refused = eventually(WITHIN, || async {
        text_of(&browser, ".error").await.contains("not the admin token")
    });
    assert!(refused.await, "a wrong token is refused");
    assert!(!present(&browser, "#dead-events").await, "and shows no console");

    sign_in(&browser, TOKEN).await;
    let event_row = format!("tr[data-id='{}']", events[0].id);
    let letter_row = format!("tr[data-message-id='{}']", letters[0].id);
    let shown = eventually(WITHIN, || async {
        present(&browser, &event_row).await
            && present(&browser, &letter_row).await
            && text_of(&browser, "#transport").await == "up"
            && text_of(&browser, "#lag").await.ends_with(" ms")
            && text_of(&browser, "#throughput").await.parse::<f64>().is_ok_and(|rate| rate > 0.0)
    });
    assert!(
        shown.await,
        "the console shows the broker up, the lag, the rate, a dead event and letter"
    );
    let error = text_of(&browser, &format!("{event_row} td.error")).await;
    assert!(error.contains("NOT_FOUND"), "with its error: {error:?}");
    let reason = text_of(&browser, &format!("{letter_row} td.error")).await;
    assert!(reason.contains("does not exist"), "and its reason: {reason:?}");
    // More ticks, so that the charts have lines.
    tokio::time::sleep(Duration::from_secs(8)).await;
    save_screenshot(&browser.screenshot().await.expect("a screenshot"));
    stop_load.cancel();
    traffic.await.expect("the load ran");

    replay_row(&browser, &event_row).await;
    assert!(text_of(&browser, "#message").await.contains("pending again"));
    assert!(present(&browser, &format!("tr[data-id='{}']", events[1].id)).await, "the other stays");
    let order = events[0].event.order_id();
    let completed = eventually(WITHIN, || async { order_status(&db, order).await == "COMPLETED" });
    assert!(completed.await, "the replayed event was published and applied");

    create_orders(&db, &letters[..1]).await;
    replay_row(&browser, &letter_row).await;
    assert!(text_of(&browser, "#dlq-message").await.contains("back in the queue"));
    let order = letters[0].event.order_id();
    let completed = eventually(WITHIN, || async { order_status(&db, order).await == "COMPLETED" });
    assert!(completed.await, "the replayed dead letter was applied");
    assert_eq!(broker.dead_letter_depth().await, 1, "the other dead letter stays");

    browser.find(Locator::Id("logout")).await.expect("Sign out").click().await.expect("clicked");
    let signed_out = browser.wait().at_most(WITHIN).for_element(Locator::Id("token")).await;
    assert!(signed_out.is_ok(), "signing out shows the login form");

    browser.close().await.expect("the browser closes");
    api.stop_with_dead(1).await;
    consumer.stop().await;
    broker.delete().await;
}
