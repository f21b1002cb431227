//! The admin API: off (404) without ADMIN_TOKEN; with it, every call needs the
//! bearer token (401 otherwise); dead events are listed newest first, a page
//! at a time, and replayed one by one or by a filter.

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app, spawn_with_args};

const TOKEN: &str = "admin-token-for-the-test-0123456789";

async fn admin_app(db: PgPool) -> TestApp {
    spawn_with_args(db, &["--relay-workers", "0", "--admin-token", TOKEN]).await
}

/// Places `count` orders and parks their OrderPlaced events dead, as the relay
/// would after the broker refused them; their ids, oldest first.
async fn dead_events(app: &TestApp, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for n in 0..count {
        let order = json!({"customer_id": format!("c-{n}"),
                           "items": [{"sku": "SKU-001", "quantity": 1}]});
        assert_eq!(app.post_order(&order).await.status(), 201);
    }
    let rows: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE outbox SET state = 'dead', attempts = 10, last_error = 'refused by the broker'
         WHERE state = 'pending' RETURNING id",
    )
    .fetch_all(&app.db)
    .await
    .expect("parked");
    ids.extend(rows);
    ids.sort_unstable(); // UUIDv7: in the order written
    ids
}

async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = app.client.request(method, format!("{}{path}", app.address));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

async fn state_of(db: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT state FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("row")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn without_admin_token_the_admin_routes_and_the_console_are_not_there(db: PgPool) {
    let app = spawn_app(db).await;
    let ids = dead_events(&app, 1).await;
    for (method, path) in [
        (reqwest::Method::GET, "/admin/summary".to_owned()),
        (reqwest::Method::GET, "/admin/outbox/dead".to_owned()),
        (reqwest::Method::POST, format!("/admin/outbox/dead/{}/replay", ids[0])),
        (reqwest::Method::GET, "/console".to_owned()),
    ] {
        let (status, body, _) = call(&app, method, &path, Some(TOKEN)).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], "not_found", "{path}");
    }
    assert_eq!(state_of(&app.db, ids[0]).await, "dead", "nothing replayed");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_missing_or_wrong_token_is_refused_and_the_right_one_lists_and_replays(db: PgPool) {
    let app = admin_app(db).await;
    let ids = dead_events(&app, 1).await;
    let dead = ids[0];

    for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
        let (status, body, headers) =
            call(&app, reqwest::Method::GET, "/admin/outbox/dead", token).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let path = format!("/admin/outbox/dead/{dead}/replay");
        let (status, _, _) = call(&app, reqwest::Method::POST, &path, token).await;
        assert_eq!(status, 401);
    }
    // A token sent another way than as a bearer token is no token.
    let basic = app
        .client
        .get(format!("{}/admin/outbox/dead", app.address))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(basic.status(), 401);
    assert_eq!(state_of(&app.db, dead).await, "dead", "nothing replayed");

    let (status, page, _) =
        call(&app, reqwest::Method::GET, "/admin/outbox/dead", Some(TOKEN)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["id"], dead.to_string());
    assert_eq!(page["events"][0]["event_type"], "OrderPlaced");
    assert_eq!(page["events"][0]["last_error"], "refused by the broker");
    assert_eq!(page["next"], Value::Null);
    let (status, summary, _) =
        call(&app, reqwest::Method::GET, "/admin/summary", Some(TOKEN)).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(
        (summary["outbox_dead"].as_i64(), summary["outbox_pending"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(summary["transport"], "off", "no relay here");

    let path = format!("/admin/outbox/dead/{dead}/replay");
    let (status, replayed, _) = call(&app, reqwest::Method::POST, &path, Some(TOKEN)).await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], 1);
    assert_eq!(state_of(&app.db, dead).await, "pending", "pending again once answered");
    let (status, again, _) = call(&app, reqwest::Method::POST, &path, Some(TOKEN)).await;
    assert_eq!((status, again["error"].as_str()), (404, Some("dead_event_not_found")));
    assert!(
        app.metrics().await.contains("outbox_admin_replayed_events_total 1"),
        "the replay is counted"
    );
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn dead_events_come_newest_first_a_page_at_a_time_and_replay_by_filter(db: PgPool) {
    let app = admin_app(db).await;
    let ids = dead_events(&app, 5).await;

    let mut listed = Vec::new();
    let mut path = "/admin/outbox/dead?limit=2".to_owned();
    loop {
        let (status, page, _) = call(&app, reqwest::Method::GET, &path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().expect("events");
        assert!(events.len() <= 2);
        listed.extend(events.iter().map(|event| event["id"].as_str().expect("id").to_owned()));
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/outbox/dead?limit=2&before={next}"),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().map(Uuid::to_string).collect();
    assert_eq!(listed, newest_first);
    for bad in ["limit=0", "limit=501", "before=not-a-uuid"] {
        let path = format!("/admin/outbox/dead?{bad}");
        let (status, body, _) = call(&app, reqwest::Method::GET, &path, Some(TOKEN)).await;
        assert_eq!((status, body["error"].as_str()), (422, Some("invalid_query")), "{bad}");
    }

    let path = "/admin/outbox/dead/replay?event_type=Order%00Placed";
    let (status, body, _) = call(&app, reqwest::Method::POST, path, Some(TOKEN)).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_query")), "a NUL");
    let path = "/admin/outbox/dead/replay?event_type=OrderCancelled";
    let (status, none, _) = call(&app, reqwest::Method::POST, path, Some(TOKEN)).await;
    assert_eq!((status, none["replayed"].as_u64()), (200, Some(0)), "no dead cancel");
    let path = "/admin/outbox/dead/replay?aggregate_type=order&event_type=OrderPlaced";
    let (status, all, _) = call(&app, reqwest::Method::POST, path, Some(TOKEN)).await;
    assert_eq!((status, all["replayed"].as_u64()), (200, Some(5)));
    for id in ids {
        assert_eq!(state_of(&app.db, id).await, "pending");
    }
}

/// The login form's POST, as a browser sends it (the tokens here need no escaping).
fn login(client: &reqwest::Client, url: &str, token: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
}

/// The console's session: a login form, a cookie scripts cannot read and other
/// sites do not send, and a CSRF token that a replay made with the session
/// must carry.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_console_signs_in_with_the_token_and_replays_only_with_its_csrf_token(db: PgPool) {
    let app = admin_app(db).await;
    let dead = dead_events(&app, 1).await[0];
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = |path: &str| format!("{}{path}", app.address);

    let login_page = client.get(url("/console")).send().await.expect("answer");
    assert_eq!(login_page.status(), 200);
    assert_eq!(login_page.headers()["cache-control"], "no-store");
    assert!(login_page.text().await.expect("html").contains("action=\"/console/login\""));

    let wrong = login(&client, &url("/console/login"), "wrong").send().await;
    let wrong = wrong.expect("answer");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none(), "no session");

    let signed_in = login(&client, &url("/console/login"), TOKEN).send().await;
    let signed_in = signed_in.expect("answer");
    assert_eq!(signed_in.status(), 303);
    assert_eq!(signed_in.headers()["location"], "/console");
    let set_cookie = signed_in.headers()["set-cookie"].to_str().expect("text").to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP here: {set_cookie}");
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let behind_https = login(&client, &url("/console/login"), TOKEN)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("answer");
    assert!(behind_https.headers()["set-cookie"].to_str().expect("text").contains("; Secure"));

    let page = client.get(url("/console")).header("cookie", &cookie).send().await.expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().expect("text").to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let page = page.text().await.expect("html");
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    assert_eq!(csrf.len(), 64, "{csrf}");

    // Reading needs only the session.
    let listed = client.get(url("/admin/outbox/dead")).header("cookie", &cookie).send().await;
    assert_eq!(listed.expect("answer").status(), 200);
    // A replay without the CSRF token, or with another, changes nothing.
    let replay = url(&format!("/admin/outbox/dead/{dead}/replay"));
    for header in [None, Some("0".repeat(64))] {
        let mut request = client.post(&replay).header("cookie", &cookie);
        if let Some(token) = &header {
            request = request.header("x-csrf-token", token);
        }
        let refused = request.send().await.expect("answer");
        assert_eq!(refused.status(), 403, "{header:?}");
        let body: Value = refused.json().await.expect("json");
        assert_eq!(body["error"], "invalid_csrf_token");
    }
    assert_eq!(state_of(&app.db, dead).await, "dead");
    let replayed = client
        .post(&replay)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("answer");
    assert_eq!(replayed.status(), 200);
    assert_eq!(state_of(&app.db, dead).await, "pending");

    // Signed out, the cookie opens nothing.
    let out = client
        .post(url("/console/logout"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .expect("answer");
    assert_eq!(out.status(), 204);
    let after = client.get(url("/admin/summary")).header("cookie", &cookie).send().await;
    assert_eq!(after.expect("answer").status(), 401);
    let page = client.get(url("/console")).header("cookie", &cookie).send().await.expect("page");
    assert!(page.text().await.expect("html").contains("action=\"/console/login\""), "login again");
}

/// The console's DLQ panel asks inventory-consumer (whose admin API is tested
/// with it, in inventory-consumer's console test): without CONSUMER_ADMIN_URL
/// it says how to turn it on; a consumer that does not answer is a 502 that
/// names it. Either way the token is needed first.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_consoles_dead_letter_panel_says_when_it_cannot_reach_the_consumer(db: PgPool) {
    let (status, _, _) =
        call(&admin_app(db.clone()).await, reqwest::Method::GET, "/console/dlq", None).await;
    assert_eq!(status, 401, "the token first");
    let off = admin_app(db.clone()).await;
    let (status, body, _) = call(&off, reqwest::Method::GET, "/console/dlq", Some(TOKEN)).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("consumer_admin_off")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("CONSUMER_ADMIN_URL")));

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let nowhere = format!("http://{}", closed.local_addr().expect("address"));
    drop(closed);
    let args = ["--relay-workers", "0", "--admin-token", TOKEN, "--consumer-admin-url", &nowhere];
    let unreachable = spawn_with_args(db, &args).await;
    for (method, path) in
        [(reqwest::Method::GET, "/console/dlq"), (reqwest::Method::POST, "/console/dlq/m-1/replay")]
    {
        let (status, body, _) = call(&unreachable, method, path, Some(TOKEN)).await;
        assert_eq!((status, body["error"].as_str()), (502, Some("consumer_unreachable")), "{path}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains(&nowhere)), "{body}");
    }
}
