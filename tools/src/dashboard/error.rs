//! Errors of the dashboard API: an HTTP status and a message, sent as
//! `{"error": MESSAGE}`.

use axum::http::StatusCode;
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

/// Runs a blocking engine call on the blocking thread pool.
pub async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}
