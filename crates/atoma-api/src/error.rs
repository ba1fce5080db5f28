//! The API's error type and its one mapping to HTTP: the OpenAI error envelope
//! `{"error": {"message", "type", "code"}}` with the status codes of the protocol
//! (400, 401, 404, 413, 423, 429, 500, 503).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use atoma_state::meter::MeterError;

use crate::backend::BackendError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("model `{0}` is not served by this node")]
    UnknownModel(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    StackExhausted(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("the model is still loading")]
    NotReady,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "INVALID_BODY",
            ),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "PAYLOAD_TOO_LARGE",
            ),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "AUTH_ERROR",
            ),
            Self::UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "MODEL_NOT_FOUND",
            ),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "NOT_FOUND"),
            Self::StackExhausted(_) => (StatusCode::LOCKED, "stack_error", "LOCKED_STACK_ERROR"),
            Self::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded_error",
                "TOO_MANY_REQUESTS",
            ),
            Self::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "NOT_READY",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "INTERNAL_ERROR",
            ),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }
}

impl ApiError {
    /// The OpenAI error envelope of this error (also sent as an SSE event when a stream fails
    /// midway).
    pub fn envelope(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = self.envelope();
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::UnknownModel(m) => Self::UnknownModel(m),
            BackendError::Invalid(m) => Self::InvalidRequest(m),
            BackendError::Overloaded => Self::Overloaded(e.to_string()),
            BackendError::Internal(m) => Self::Internal(m),
        }
    }
}

impl From<MeterError> for ApiError {
    fn from(e: MeterError) -> Self {
        match e {
            MeterError::Exhausted { .. } | MeterError::Claimed(_) | MeterError::Settling(_) => {
                Self::StackExhausted(e.to_string())
            }
            MeterError::Replay(_) => Self::Unauthorized(format!(
                "{e}; to send the same body again, give it a fresh \"nonce\" field"
            )),
            MeterError::Storage(_) => Self::Internal(e.to_string()),
            MeterError::UnknownStack(_)
            | MeterError::NotOwner(_)
            | MeterError::WrongNode { .. }
            | MeterError::WrongModel { .. }
            | MeterError::WrongRole { .. } => Self::Unauthorized(e.to_string()),
        }
    }
}
