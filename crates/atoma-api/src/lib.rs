//! The node's OpenAI-compatible HTTP API.
//!
//! Routes: `POST /v1/chat/completions` and `POST /v1/completions` (JSON or SSE), `GET /v1/models`,
//! `POST /tokenize` and `/detokenize` (llama-server's shapes; unsigned, small bodies),
//! `GET /health` (503 until the backend is ready or once its engine died), `GET /metrics`
//! (Prometheus), `GET /v1/settlements/{stack}` (the signed commitment of a stack this node
//! settled, for attestors on a root-only ledger). Every inference
//! request is authenticated (`auth`), metered on its stack (`atoma_state::meter`: reserve the worst
//! case, settle to the real usage, release on failure or disconnect) and answered with a signed,
//! hash-committed body (`sign`), every streamed chunk included. The API depends on the
//! `InferenceBackend` trait, not on the engine.

pub mod auth;
pub mod backend;
pub mod embeddings;
pub mod error;
mod gate;
mod handlers;
pub mod metrics;
pub mod openai;
mod record;
mod render;
pub mod sign;
mod stream;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use atoma_crypto::Keypair;
use atoma_state::meter::Meter;

pub use backend::{
    BackendError, BackendEvent, BackendLoad, ChatTurn, EmbedInput, Embeddings, Execution,
    FinishReason, InferenceBackend, InferenceRequest, Logprobs, Prepared, Prompt, Role,
    SamplingRecord, TokenLogprob, ToolCall, ToolChoice, ToolDef, Tools,
};
pub use error::ApiError;

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest body of the unsigned `/tokenize` and `/detokenize` routes (bytes).
pub const MAX_TOKENIZE_BYTES: usize = 256 * 1024;

/// Shared state of the router. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// Catches the node's state up with the ledger (blocking); called when a request names a stack
/// the node does not know yet (for example one bought a moment ago), with the digest of the
/// transaction that bought it when the request names one (`X-Tx-Digest`).
pub type Refresh = Arc<dyn Fn(Option<&str>) + Send + Sync>;

struct Inner {
    backend: Arc<dyn InferenceBackend>,
    meter: Meter,
    keys: Keypair,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    gate: Arc<gate::Gate>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("node_key", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State for a node that serves `backend`, meters with `meter` and signs with `keys`.
    pub fn new(backend: Arc<dyn InferenceBackend>, meter: Meter, keys: Keypair) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                keys,
                metrics: metrics::install(),
                gate: Arc::new(gate::Gate::new(meter.clone(), None)),
                meter,
            }),
        }
    }

    /// Adds the hook that syncs with the ledger when a request names an unknown stack.
    pub fn with_refresh(self, refresh: Refresh) -> Self {
        let i = &self.inner;
        Self {
            inner: Arc::new(Inner {
                backend: i.backend.clone(),
                meter: i.meter.clone(),
                keys: i.keys.clone(),
                metrics: i.metrics.clone(),
                gate: Arc::new(gate::Gate::new(i.meter.clone(), Some(refresh))),
            }),
        }
    }
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(handlers::models))
        .route("/v1/node/status", get(handlers::status))
        .route("/v1/settlements/{stack}", get(handlers::settlement))
        .route(
            "/tokenize",
            post(handlers::tokenize).layer(DefaultBodyLimit::max(MAX_TOKENIZE_BYTES)),
        )
        .route(
            "/detokenize",
            post(handlers::detokenize).layer(DefaultBodyLimit::max(MAX_TOKENIZE_BYTES)),
        )
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn(echo_request_id))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Copies the client's `X-Request-Id` onto the response, so logs on both sides correlate.
async fn echo_request_id(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let id = req.headers().get(auth::REQUEST_ID).cloned();
    let mut resp = next.run(req).await;
    if let Some(id) = id {
        resp.headers_mut().insert(auth::REQUEST_ID, id);
    }
    resp
}
