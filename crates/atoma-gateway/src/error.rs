//! The gateway's errors and their one mapping to HTTP: the OpenAI error envelope
//! `{"error": {"message", "type", "code"}}`, with `Retry-After` on 429 and 503.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Everything a gateway request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    InsufficientCredit(String),
    #[error("model `{0}` is not served by any node on the network")]
    UnknownModel(String),
    #[error("rate limit: {message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("no node could serve the request: {0}")]
    NoNode(String),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "INVALID_BODY",
            ),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "INVALID_API_KEY",
            ),
            Self::InsufficientCredit(_) => (
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_quota",
                "INSUFFICIENT_CREDIT",
            ),
            Self::UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "MODEL_NOT_FOUND",
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "RATE_LIMITED",
            ),
            Self::NoNode(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "NO_NODE_AVAILABLE",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "INTERNAL_ERROR",
            ),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The envelope's JSON, also sent as a stream's last event when a stream fails midway.
    pub fn envelope(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "code": code}})
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "gateway request failed");
        }
        let retry = match &self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::NoNode(_) => Some(1),
            _ => None,
        };
        let mut resp = (status, Json(self.envelope())).into_response();
        if let Some(secs) = retry
            && let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string())
        {
            resp.headers_mut().insert("retry-after", v);
        }
        resp
    }
}
