//! Errors of the dashboard API: an HTTP status and a message, sent as
//! `{"error": MESSAGE}`.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chalk_engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let status = match &err {
            EngineError::NotFound { .. } | EngineError::NoXattr { .. } => StatusCode::NOT_FOUND,
            EngineError::AlreadyExists { .. }
            | EngineError::Conflict { .. }
            | EngineError::HeadMoved { .. }
            | EngineError::NotDirectory { .. }
            | EngineError::IsDirectory { .. }
            | EngineError::DirectoryNotEmpty { .. } => StatusCode::CONFLICT,
            EngineError::InvalidName { .. }
            | EngineError::NameTooLong { .. }
            | EngineError::InvalidPath { .. }
            | EngineError::InvalidArgument(_)
            | EngineError::TooManyLinks { .. } => StatusCode::BAD_REQUEST,
            EngineError::ReadOnly { .. } | EngineError::NotPermitted(_) => StatusCode::FORBIDDEN,
            EngineError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            EngineError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            EngineError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            EngineError::CorruptSegment { .. }
            | EngineError::CorruptObject { .. }
            | EngineError::ObjectStore { .. }
            | EngineError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, err.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(err: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("a dashboard worker task failed: {err}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "dashboard request failed");
        } else {
            tracing::debug!(status = %self.status, error = %self.message, "dashboard request rejected");
        }
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// Bytes of a plain-text rejection body kept as the JSON error message.
const REJECTION_BODY_MAX_BYTES: usize = 4096;

/// Middleware that turns the plain-text rejections of axum's extractors and
/// router (a missing query field, a body that is not multipart, a wrong
/// method) into `{"error": ...}` responses, so every API error is JSON.
/// A 416 of a download keeps its text body, because download bodies are
/// file bytes, not JSON.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;

    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !path.starts_with("/api/") || !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    if response.headers().contains_key(header::CONTENT_RANGE) {
        return response;
    }

    let allow = response.headers().get(header::ALLOW).cloned();
    let text = match axum::body::to_bytes(response.into_body(), REJECTION_BODY_MAX_BYTES).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = match (text.is_empty(), status) {
        (false, _) => format!("{method} {path}: {text}"),
        (true, StatusCode::METHOD_NOT_ALLOWED) => {
            let allowed = allow.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("the method the endpoint takes (GET, or POST for uploads)");
            format!("{method} is not allowed on {path}; use {allowed}")
        }
        (true, _) => format!("{method} {path} failed: {status}"),
    };

    let mut rewritten = ApiError::new(status, message).into_response();
    if let Some(allow) = allow {
        rewritten.headers_mut().insert(header::ALLOW, allow);
    }
    rewritten
}

/// Runs a blocking engine call on the blocking thread pool.
pub async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}
