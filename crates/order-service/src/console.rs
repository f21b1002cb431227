//! `/console`: the operator's page, served by order-service itself (the page
//! and its script are embedded in the binary; nothing is fetched from
//! elsewhere). On only with `ADMIN_TOKEN`, like the admin API it calls.
//!
//! A login form takes the token; a right one starts a session: a random id in
//! a cookie that scripts cannot read (`HttpOnly`), that other sites' requests
//! do not carry (`SameSite=Strict`) and that travels only over HTTPS when the
//! page was reached over it (`Secure`, from `X-Forwarded-Proto: https`). A
//! session lasts [`SESSION_LIFETIME`] and lives in this process: a restart, or
//! another replica, asks for the token again. The session also holds a CSRF
//! token, written into the page; a state-changing admin call made with the
//! session must send it back in `X-CSRF-Token` (a call with the bearer token
//! needs neither).
//!
//! With `CONSUMER_ADMIN_URL`, the console also shows inventory-consumer's
//! dead-letter queue: `/console/dlq` and `/console/dlq/{message_id}/replay`
//! take the session (and, for the replay, its CSRF token) and call the
//! consumer's admin API with the admin token, answering what it answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::{Form, Json};
use service_kit::admin::constant_time_eq;
use tokio::time::Instant;
use uuid::Uuid;

use crate::admin::Admin;
use crate::error::{ApiError, ErrorBody};
use crate::routes::AppState;

/// How long a console session lasts after its login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// The session cookie's name.
pub const COOKIE: &str = "outbox_console";

/// The header a state-changing call made with a session carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

const PAGE: &str = include_str!("console/index.html");
const LOGIN: &str = include_str!("console/login.html");

struct Session {
    csrf: String,
    expires: Instant,
}

/// The console's sessions, by id. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Session>>>);

impl Sessions {
    /// A new session; its id and CSRF token.
    fn start(&self) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let mut sessions = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        sessions.retain(|_, session| session.expires > now);
        sessions
            .insert(id.clone(), Session { csrf: csrf.clone(), expires: now + SESSION_LIFETIME });
        (id, csrf)
    }

    /// The CSRF token of the live session `headers` carry in their cookie.
    pub fn csrf_of(&self, headers: &HeaderMap) -> Option<String> {
        let id = session_id(headers)?;
        let sessions = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let session = sessions.get(id)?;
        (session.expires > Instant::now()).then(|| session.csrf.clone())
    }

    fn end(&self, headers: &HeaderMap) {
        if let Some(id) = session_id(headers) {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
        }
    }
}

/// 244 random bits as 64 hex digits (two version-4 UUIDs).
fn random_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|cookie| cookie.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether `presented` is the CSRF token `expected`, in constant time.
pub fn csrf_matches(expected: &str, headers: &HeaderMap) -> bool {
    headers
        .get(CSRF_HEADER)
        .is_some_and(|presented| constant_time_eq(expected.as_bytes(), presented.as_bytes()))
}

/// `GET /console`: the console for a session, the login form otherwise.
pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.admin_token.is_none() {
        return ApiError::NotFound("route").into_response();
    }
    match state.sessions.csrf_of(&headers) {
        Some(csrf) => no_store(Html(PAGE.replace("{{csrf}}", &csrf)).into_response()),
        None => no_store(Html(LOGIN.replace("{{error}}", "")).into_response()),
    }
}

#[derive(serde::Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /console/login` (a form with `token`): a right token starts a session
/// and goes to the console; a wrong one is the login form again, 401.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(token) = &state.admin_token else {
        return ApiError::NotFound("route").into_response();
    };
    let presented = form.map(|Form(login)| login.token).unwrap_or_default();
    if !token.matches(presented.as_bytes()) {
        tracing::warn!("a console login with a wrong token was refused");
        let page =
            LOGIN.replace("{{error}}", "<p class=\"error\">That is not the admin token.</p>");
        return no_store((StatusCode::UNAUTHORIZED, Html(page)).into_response());
    }
    let (id, _) = state.sessions.start();
    tracing::info!(who = "admin token", "a console session started");
    let https = headers.get("x-forwarded-proto").is_some_and(|proto| proto == "https");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if https { "; Secure" } else { "" }
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/console")]).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `POST /console/logout`: ends the session (needs its CSRF token).
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.admin_token.is_none() {
        return ApiError::NotFound("route").into_response();
    }
    if let Some(csrf) = state.sessions.csrf_of(&headers)
        && csrf_matches(&csrf, &headers)
    {
        state.sessions.end(&headers);
    }
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page loads nothing from elsewhere, and no other site may frame it.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             frame-ancestors 'none'",
        ),
    );
    response
}

/// inventory-consumer's admin API, as the console calls it.
#[derive(Clone)]
pub struct ConsumerAdmin {
    url: reqwest::Url,
    token: String,
    client: reqwest::Client,
}

impl ConsumerAdmin {
    /// How long a call to the consumer may take.
    const TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(url: reqwest::Url, token: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Self::TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { url, token, client }
    }

    /// The consumer's answer to `method` on `/admin/<segments>`, passed on
    /// as it came; 502 `consumer_unreachable` when there is none.
    async fn call(&self, method: reqwest::Method, segments: &[&str]) -> Response {
        let mut url = self.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("admin").extend(segments);
        }
        let sent = self.client.request(method, url.clone()).bearer_auth(&self.token).send().await;
        let answer = match sent {
            Ok(response) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                response.bytes().await.map(|body| (status, body))
            }
            Err(error) => Err(error),
        };
        match answer {
            Ok((status, body)) => {
                ([(header::CONTENT_TYPE, "application/json")], (status, body)).into_response()
            }
            Err(error) => {
                tracing::warn!(%url, error = %error, "the console could not reach inventory-consumer");
                let body = ErrorBody {
                    error: "consumer_unreachable".to_owned(),
                    message: format!("inventory-consumer at {} did not answer: {error}", self.url),
                };
                (StatusCode::BAD_GATEWAY, Json(body)).into_response()
            }
        }
    }
}

/// The DLQ calls' answer without `CONSUMER_ADMIN_URL`.
fn consumer_admin_off() -> Response {
    let body = ErrorBody {
        error: "consumer_admin_off".to_owned(),
        message: "set CONSUMER_ADMIN_URL to inventory-consumer's HTTP address to see its \
                  dead-letter queue here"
            .to_owned(),
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// `GET /console/dlq`: inventory-consumer's dead letters (its `GET /admin/dlq`).
pub async fn dead_letters(_: Admin, State(state): State<AppState>) -> Response {
    match &state.consumer_admin {
        Some(consumer) => consumer.call(reqwest::Method::GET, &["dlq"]).await,
        None => consumer_admin_off(),
    }
}

/// `POST /console/dlq/{message_id}/replay`: that dead letter back to the
/// consumer's queue (its `POST /admin/dlq/{message_id}/replay`).
pub async fn replay_dead_letter(
    _: Admin,
    State(state): State<AppState>,
    Path(message_id): Path<String>,
) -> Response {
    let Some(consumer) = &state.consumer_admin else {
        return consumer_admin_off();
    };
    let answer = consumer.call(reqwest::Method::POST, &["dlq", &message_id, "replay"]).await;
    tracing::info!(who = "console session", %message_id, status = answer.status().as_u16(),
        "asked inventory-consumer to replay a dead letter");
    answer
}
