//! The access token and the security headers of every response.
//!
//! A request is accepted when it carries the token in one of three places,
//! checked in this order: the `token` query parameter, an
//! `Authorization: Bearer` header, or the dashboard's cookie. A page request
//! with a valid `?token=` gets the cookie and a redirect to the same URL
//! without the token, so the token does not stay in the address bar or the
//! history. A request without a token gets 401; one with a wrong token, 403.


use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;

use super::error::ApiError;
use super::SharedState;

/// Policy of the app's own pages: scripts, styles and images only from this
/// server, no inline script, no framing, no plugins.
const APP_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
                       connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Policy of responses that carry file bytes: opened on their own, they get
/// an opaque origin and may run nothing.
pub const FILE_CSP: &str = "sandbox; default-src 'none'; img-src 'self'; frame-ancestors 'none'";

const LOGIN_HTML: &str = include_str!("assets/login.html");

/// Makes a token of 32 random bytes from the OS generator, as 64 hex digits.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares in time that does not depend on where the strings differ.
fn token_matches(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    if given.len() != expected.len() {
        return false;
    }
    given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Splits the `token` parameter out of a query string: the token, and the
/// query without it.
fn split_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("token", value)) => token = Some(value.to_owned()),
            _ if pair == "token" => token = Some(String::new()),
            _ => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

fn cookie_token(headers: &HeaderMap, cookie_name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie_name)
        .map(|(_, value)| value.to_owned())
}

fn wants_html(request: &Request) -> bool {
    request.method() == Method::GET
        && !request.uri().path().starts_with("/api/")
        && request.uri().path() != "/metrics"
        && request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"))
}

fn reject(state: &SharedState, request: &Request, status: StatusCode, message: &str) -> Response {
    state.metrics.rejected_requests.inc();
    if wants_html(request) {
        let page = LOGIN_HTML.replace("{{MESSAGE}}", message);
        return (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response();
    }
    ApiError::new(status, message).into_response()
}

/// Checks that a request which changes the store comes from the dashboard's
/// own pages. `SameSite=Strict` does not stop other ports of 127.0.0.1: they
/// are the same site, so a page served on another port could post a form
/// with the cookie. Browsers send `Origin` on every cross-origin POST, and
/// clients such as curl send none and authenticate with the bearer header.
fn foreign_origin(request: &Request) -> Option<String> {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let origin = request.headers().get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("(not text)");
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    // An HTTPS proxy in front of the dashboard makes the page's origin https://HOST.
    let own = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")).is_some_and(|rest| rest == host);
    (!own).then(|| origin.to_owned())
}

/// Middleware that admits only requests carrying the access token.
pub async fn require_token(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if let Some(origin) = foreign_origin(&request) {
        tracing::warn!(origin, method = %request.method(), path = request.uri().path(), "rejected a request from another origin");
        let message = format!(
            "rejected a {} request from origin {origin}: only the dashboard's own pages may change volumes; \
             scripts should send no Origin header and use `Authorization: Bearer TOKEN`",
            request.method()
        );
        return reject(&state, &request, StatusCode::FORBIDDEN, &message);
    }

    let (query_token, rest) = split_token(request.uri().query().unwrap_or(""));
    let given = query_token
        .clone()
        .or_else(|| bearer_token(request.headers()))
        .or_else(|| cookie_token(request.headers(), &state.cookie_name));
    let Some(given) = given else {
        let message = "missing access token: open the URL that `chalk dashboard` printed (it ends in ?token=...), \
                       or send the header `Authorization: Bearer TOKEN`";
        return reject(&state, &request, StatusCode::UNAUTHORIZED, message);
    };
    if !token_matches(&given, &state.token) {
        let message = "invalid access token: the token changes every time `chalk dashboard` starts; \
                       use the URL it printed last";
        return reject(&state, &request, StatusCode::FORBIDDEN, message);
    }
    state.metrics.requests.inc();

    let Some(_) = query_token else {
        return next.run(request).await;
    };
    let cookie = format!("{}={}; Path=/; HttpOnly; SameSite=Strict", state.cookie_name, state.token);
    let cookie = HeaderValue::from_str(&cookie).expect("the cookie name and a hex token are valid header text");
    let mut response = if request.method() == Method::GET && !request.uri().path().starts_with("/api/") {
        let location = if rest.is_empty() { request.uri().path().to_owned() } else { format!("{}?{rest}", request.uri().path()) };
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, location)
            .body(Body::empty())
            .expect("valid redirect")
    } else {
        next.run(request).await
    };
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

/// Adds the security headers to every response; a response that set its own
/// content security policy keeps it.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(APP_CSP));
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_64_hex_digits() {
        let token = generate_token();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token, generate_token());
    }

    #[test]
    fn token_comparison_needs_equal_strings() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
        assert!(!token_matches("", "abc"));
    }

    #[test]
    fn split_token_keeps_other_parameters() {
        assert_eq!(split_token("token=t1&x=1&y=2"), (Some("t1".into()), "x=1&y=2".into()));
        assert_eq!(split_token("x=1"), (None, "x=1".into()));
        assert_eq!(split_token("token"), (Some(String::new()), String::new()));
    }
}
