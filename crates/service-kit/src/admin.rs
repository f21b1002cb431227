//! The admin token both services' admin APIs check (`ADMIN_TOKEN`): each admin
//! call must carry `Authorization: Bearer <token>`, compared in constant time
//! (so the time an answer takes says nothing of how much of a guess was right).
//! A missing or wrong token is a 401 with the JSON error body both services
//! answer with, `{"error": "unauthorized", "message": ...}`.

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;

/// The token every admin call must carry. Its `Debug` hides it.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// `None` for an unset or empty `ADMIN_TOKEN`: the admin API is off.
    pub fn new(token: Option<&str>) -> Option<Self> {
        token.filter(|token| !token.is_empty()).map(|token| Self(token.to_owned()))
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }

    /// `Ok` when `headers` carry this token as a bearer token; else the refusal
    /// (logged), which answers 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(presented) if self.matches(presented) => Ok(()),
            Some(_) => Err(Refused::new("the admin token is wrong")),
            None => Err(Refused::new(
                "an admin call needs the header `Authorization: Bearer <ADMIN_TOKEN>`",
            )),
        }
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// An admin call without the right token: a 401 with the JSON error body and
/// `WWW-Authenticate: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(&'static str);

impl Refused {
    fn new(reason: &'static str) -> Self {
        tracing::warn!(reason, "an admin call was refused");
        Self(reason)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = json!({"error": "unauthorized", "message": self.0});
        let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().expect("a header value"));
        headers
    }

    #[test]
    fn only_the_token_itself_as_a_bearer_token_passes() {
        let token = AdminToken::new(Some("s3cret")).expect("a token");
        assert!(token.check(&headers("Bearer s3cret")).is_ok());
        for wrong in ["Bearer s3cre", "Bearer s3cret ", "Bearer S3CRET", "Basic s3cret", "s3cret"] {
            let refused = token.check(&headers(wrong)).expect_err(wrong).into_response();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{wrong}");
            assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer");
        }
        assert!(token.check(&HeaderMap::new()).is_err(), "no header");
        assert!(AdminToken::new(Some("")).is_none(), "an empty token turns the API off");
        assert!(AdminToken::new(None).is_none());
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }
}
