//! `POST /v1/embeddings`: OpenAI's embeddings route, paid from stacks of Embedding tasks.
//!
//! The steps of every metered route: body limit, readiness, signature, authorization (the
//! stack's task must be an Embedding task) before the body is parsed; then the inputs are
//! tokenized, their tokens reserved on the stack, embedded in one batch, and the signed answer
//! logged with the charge. Vectors go out as JSON numbers (`float`: shortest f32 decimals,
//! magnitudes under 1e-4 written as 0, so the signed JSON re-serializes to the same bytes in any
//! language) or as base64 of the little-endian f32 bits (`base64`: exact).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use atoma_ledger::{ComputeUnits, TaskRole};
use atoma_state::log::{ResponseRecord, SamplingRecord};
use atoma_state::meter::MeterError;

use crate::backend::{EmbedInput, Execution, FinishReason};
use crate::error::ApiError;
use crate::record::RequestLog;
use crate::sign::sign_json;
use crate::{AppState, handlers, metrics, render};

/// The route, for metrics and errors.
pub const ROUTE: &str = "/v1/embeddings";
/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// `input`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InputIn {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: InputIn,
    /// `float` (the default) or `base64`.
    pub encoding_format: Option<String>,
    /// Only the model's own size is served (no truncated embeddings).
    pub dimensions: Option<u32>,
}

/// A checked embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedEmbedding {
    pub model: String,
    pub inputs: Vec<EmbedInput>,
    pub base64: bool,
    pub dimensions: Option<u32>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(msg.into())
}

impl EmbeddingRequest {
    /// Validates into a checked request.
    pub fn check(self) -> Result<CheckedEmbedding, ApiError> {
        if self.model.trim().is_empty() {
            return Err(bad("`model` must not be empty"));
        }
        let inputs: Vec<EmbedInput> = match self.input {
            InputIn::One(s) => vec![EmbedInput::Text(s)],
            InputIn::Many(v) => v.into_iter().map(EmbedInput::Text).collect(),
            InputIn::Tokens(t) => vec![EmbedInput::Tokens(t)],
            InputIn::ManyTokens(v) => v.into_iter().map(EmbedInput::Tokens).collect(),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(bad(format!(
                "`input` must hold between 1 and {MAX_INPUTS} inputs"
            )));
        }
        for (i, x) in inputs.iter().enumerate() {
            let empty = match x {
                EmbedInput::Text(t) => t.is_empty(),
                EmbedInput::Tokens(t) => t.is_empty(),
            };
            if empty {
                return Err(bad(format!("input {i} is empty")));
            }
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(bad(format!(
                    "`encoding_format` `{other}` is not `float` or `base64`"
                )));
            }
        };
        Ok(CheckedEmbedding {
            model: self.model,
            inputs,
            base64,
            dimensions: self.dimensions,
        })
    }
}

/// Parses a logged embeddings body as a node parsed it when it served it.
pub fn parse_logged(body: &[u8]) -> Result<CheckedEmbedding, ApiError> {
    serde_json::from_slice::<EmbeddingRequest>(body)
        .map_err(|e| bad(format!("invalid request body: {e}")))?
        .check()
}

/// A vector as the answer carries it.
pub fn encode_vector(v: &[f32], base64: bool) -> Value {
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        Value::Array(v.iter().map(|&x| render::logprob(x)).collect())
    }
}

/// The sampling fields of an embeddings record: nothing is sampled.
pub fn no_sampling() -> SamplingRecord {
    SamplingRecord {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        max_tokens: 0,
        stop: Vec::new(),
        ignore_eos: false,
    }
}

pub(crate) async fn embeddings(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = std::time::Instant::now();
    let resp = serve(s, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    metrics::request(ROUTE, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn serve(
    s: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (body, signed, task) =
        handlers::admit(&s, &headers, body, TaskRole::Embedding, ROUTE).await?;
    let req = serde_json::from_slice::<EmbeddingRequest>(&body)
        .map_err(|e| bad(format!("invalid request body: {e}")))?
        .check()?;
    let backend = s.inner.backend.clone();
    if !backend.embedding_models().contains(&req.model) {
        return Err(ApiError::UnknownModel(req.model));
    }
    if let Some(expected) = task.model
        && expected != req.model
    {
        return Err(MeterError::WrongModel {
            stack: signed.stack,
            expected,
            requested: req.model,
        }
        .into());
    }
    let (model, inputs) = (req.model.clone(), req.inputs.clone());
    let tokens = tokio::task::spawn_blocking(move || backend.embed_tokenize(&model, &inputs))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizing task failed: {e}")))??;
    let total: u64 = tokens.iter().map(|t| t.len() as u64).sum();
    let meter = s.inner.meter.clone();
    let model = req.model.clone();
    let (stack, signer, hash) = (signed.stack, signed.signer, signed.request_hash);
    let reservation = tokio::task::spawn_blocking(move || {
        meter.reserve(stack, &signer, hash, ComputeUnits(total), Some(&model))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("metering task failed: {e}")))??;
    let backend = s.inner.backend.clone();
    let model = req.model.clone();
    let embedded = tokio::task::spawn_blocking(move || {
        let out = backend.embed(&model, &tokens);
        (out, tokens)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("embedding task failed: {e}")))?;
    let (out, tokens) = match embedded {
        (Ok(out), tokens) => (out, tokens),
        (Err(e), _) => {
            // Nothing was delivered: the units go back.
            if let Err(e) = reservation.release() {
                tracing::error!(error = %e, "cannot release a reservation");
            }
            return Err(e.into());
        }
    };
    let dims = out.vectors.first().map_or(0, Vec::len);
    if let Some(d) = req.dimensions
        && d as usize != dims
    {
        if let Err(e) = reservation.release() {
            tracing::error!(error = %e, "cannot release a reservation");
        }
        return Err(bad(format!(
            "`dimensions` {d} is not served: `{}` gives {dims}-dimensional embeddings",
            req.model
        )));
    }
    let execution = Execution {
        prompt_token_ids: tokens.concat(),
        seed: 0,
        sampling: no_sampling(),
        model_sha256: out.model_sha256,
        determinism_class: out.determinism_class.clone(),
        logit_bias: Vec::new(),
    };
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({"object": "embedding", "index": i, "embedding": encode_vector(v, req.base64)})
        })
        .collect();
    let body_json = json!({
        "id": format!("embd-{}", &atoma_crypto::address_hex(&signed.request_hash)[2..26]),
        "object": "list",
        "created": handlers::unix_now(),
        "model": req.model,
        "system_fingerprint": execution.fingerprint(),
        "data": data,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    });
    let (body_json, response_hash) = sign_json(&s.inner.keys, body_json);
    let text = atoma_crypto::signed_json::canonical(&body_json);
    let log = RequestLog {
        body,
        signature: signed.signature,
        execution,
    };
    let settled = log.settled(
        ResponseRecord::Json(text.clone()),
        response_hash,
        vec![(Vec::new(), FinishReason::Stop)],
        (total, 0),
    );
    tokio::task::spawn_blocking(move || reservation.settle(settled))
        .await
        .map_err(|e| ApiError::Internal(format!("metering task failed: {e}")))??;
    metrics::usage(total, 0);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        text,
    )
        .into_response())
}
