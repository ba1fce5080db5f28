//! Route handlers. Inference requests go: readiness → signature (`auth`) → body validation
//! (`openai`) → model → reserve compute units → generate → sign → settle. Each step fails with an
//! `ApiError`, which is turned into the OpenAI envelope in one place.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use atoma_ledger::{ComputeUnits, StackSmallId, TaskRole};
use atoma_state::log::ResponseRecord;
use atoma_state::meter::{MeterError, StackTask};
use atoma_state::published::PublishedCommitment;

use crate::auth::authenticate;
use crate::backend::{BackendEvent, FinishReason};
use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, Checked, CompletionRequest};
use crate::record::RequestLog;
use crate::sign::sign_json;
use crate::{AppState, metrics, render, stream};

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub(crate) fn route(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completion => "/v1/completions",
        }
    }
}

pub(crate) async fn chat_completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    timed(Kind::Chat, serve(s, headers, body, Kind::Chat)).await
}

pub(crate) async fn completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    timed(Kind::Completion, serve(s, headers, body, Kind::Completion)).await
}

async fn timed(kind: Kind, f: impl Future<Output = Result<Response, ApiError>>) -> Response {
    let t0 = Instant::now();
    let resp = f.await.unwrap_or_else(IntoResponse::into_response);
    metrics::request(
        kind.route(),
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse(kind: Kind, body: &[u8]) -> Result<Checked, ApiError> {
    let invalid =
        |e: serde_json::Error| ApiError::InvalidRequest(format!("invalid request body: {e}"));
    match kind {
        Kind::Chat => serde_json::from_slice::<ChatCompletionRequest>(body)
            .map_err(invalid)?
            .check(),
        Kind::Completion => serde_json::from_slice::<CompletionRequest>(body)
            .map_err(invalid)?
            .check(),
    }
}

/// The steps every metered route takes before looking at the body: the body within its limit,
/// the backend ready, the signature, and (read-only) that the signer may spend the stack here on
/// a task of `role`. Nothing is parsed, rendered or tokenized before this passes.
pub(crate) async fn admit(
    s: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    role: TaskRole,
    route: &str,
) -> Result<(Bytes, crate::auth::Signed, StackTask), ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body exceeds {} bytes",
                crate::MAX_BODY_BYTES
            ))
        } else {
            ApiError::InvalidRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    if !s.inner.backend.ready() {
        return Err(ApiError::NotReady);
    }
    let signed = authenticate(headers, &body)?;
    let digest = tx_digest(headers)?;
    let gate = s.inner.gate.clone();
    let (stack, signer) = (signed.stack, signed.signer);
    let task =
        tokio::task::spawn_blocking(move || gate.authorize(stack, &signer, digest.as_deref()))
            .await
            .map_err(|e| ApiError::Internal(format!("metering task failed: {e}")))??;
    if task.role != role {
        return Err(MeterError::WrongRole {
            stack,
            role: task.role,
            needed: role,
            route: route.into(),
        }
        .into());
    }
    Ok((body, signed, task))
}

/// The `X-Tx-Digest` header: the digest of the transaction that bought the request's stack
/// (a Sui digest is 32 bytes in base58, 43 or 44 characters).
fn tx_digest(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-tx-digest") else {
        return Ok(None);
    };
    const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    match v.to_str() {
        Ok(d) if (32..=64).contains(&d.len()) && d.chars().all(|c| BASE58.contains(c)) => {
            Ok(Some(d.to_string()))
        }
        _ => Err(ApiError::InvalidRequest(
            "X-Tx-Digest must be a transaction digest (base58, 32 to 64 characters)".into(),
        )),
    }
}

async fn serve(
    s: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let (body, signed, task) =
        admit(&s, &headers, body, TaskRole::ChatCompletion, kind.route()).await?;
    let backend = &s.inner.backend;
    let stack = signed.stack;
    let checked = parse(kind, &body)?;
    let req = checked.inference;
    let prompts = match &req.prompt {
        crate::backend::Prompt::Batch(v) => v.len() as u64,
        _ => 1,
    };
    let max_n = backend.max_choices();
    if prompts * u64::from(req.n) > u64::from(max_n) {
        return Err(ApiError::InvalidRequest(format!(
            "{} choices asked (`n` {} × {prompts} prompts): this node serves at most {} choices per request",
            prompts * u64::from(req.n),
            req.n,
            max_n
        )));
    }
    if !backend.models().contains(&req.model) {
        return Err(ApiError::UnknownModel(req.model));
    }
    if let Some(expected) = task.model
        && expected != req.model
    {
        return Err(MeterError::WrongModel {
            stack,
            expected,
            requested: req.model,
        }
        .into());
    }
    let prepared = backend.prepare(req.clone())?;
    let prompt_tokens = prepared.prompt_tokens;
    let log = RequestLog {
        body: body.clone(),
        signature: signed.signature.clone(),
        execution: prepared.execution.clone(),
    };
    let choices = prepared.choices;
    let units = ComputeUnits(prompt_tokens + choices as u64 * u64::from(req.max_tokens));
    let meter = s.inner.meter.clone();
    let model = req.model.clone();
    let reservation = tokio::task::spawn_blocking(move || {
        meter.reserve(
            signed.stack,
            &signed.signer,
            signed.request_hash,
            units,
            Some(&model),
        )
    })
    .await
    .map_err(|e| ApiError::Internal(format!("metering task failed: {e}")))??;
    metrics::queue_depth(backend.queue_depth());
    let meta = stream::Meta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            &atoma_crypto::address_hex(&signed.request_hash)[2..26]
        ),
        created: unix_now(),
        model: req.model,
        kind,
        prompt_tokens,
        seed: log.execution.seed,
        fingerprint: log.execution.fingerprint(),
        logprobs: req.logprobs.is_some(),
        echo: prepared.echo.clone(),
        choices,
        per_prompt: req.n.max(1) as usize,
    };
    let events = prepared.start()?;
    if checked.stream {
        return Ok(stream::sse(
            s,
            meta,
            events,
            reservation,
            checked.include_usage,
            log,
        ));
    }
    let t0 = Instant::now();
    let mut events = events;
    let echo = meta.echo.clone().unwrap_or_default();
    let echoed = echo.chars().count();
    let mut choices: Vec<Choice> = (0..choices).map(|_| Choice::new(&echo)).collect();
    let mut first_token_at: Option<Instant> = None;
    // Usage counts every prompt once (a batch's prompts together), and the prefix-cache hits
    // of each prompt's first choice (the others share its KV).
    let (prompt, mut cached) = (prompt_tokens, 0);
    let per_prompt = req.n.max(1) as usize;
    while let Some((i, ev)) = events.next().await {
        let Some(ch) = choices.get_mut(i) else {
            return Err(ApiError::Internal(format!("the backend sent choice {i}")));
        };
        match ev {
            BackendEvent::Token {
                id,
                text: t,
                logprobs: l,
            } => {
                if first_token_at.is_none() {
                    first_token_at = Some(Instant::now());
                    metrics::time_to_first_token(t0.elapsed().as_secs_f64());
                }
                ch.output_ids.push(id);
                ch.text.push_str(&t);
                ch.logprobs.extend(l);
            }
            BackendEvent::Text(t) => ch.text.push_str(&t),
            BackendEvent::ToolCall { name, arguments } => {
                let id = render::tool_call_id(&meta.id, i, ch.tool_calls.len());
                ch.tool_calls
                    .push(render::tool_call(id, &name, &arguments, None));
            }
            BackendEvent::Done {
                finish_reason,
                prompt_tokens: _,
                completion_tokens,
                cached_tokens,
            } => {
                ch.done = Some((finish_reason, completion_tokens));
                if i.is_multiple_of(per_prompt) {
                    cached += cached_tokens;
                }
            }
            BackendEvent::Error(e) => return Err(ApiError::Internal(e)),
        }
    }
    let mut completion = 0;
    for ch in &choices {
        let Some((_, c)) = ch.done else {
            return Err(ApiError::Internal(
                "the backend stopped without finishing".into(),
            ));
        };
        completion += c;
    }
    if let Some(first) = first_token_at
        && completion > 1
    {
        metrics::time_per_output_token(first.elapsed().as_secs_f64() / (completion - 1) as f64);
    }
    let (p, c) = (prompt, completion);
    let wire: Vec<Value> = choices
        .iter_mut()
        .enumerate()
        .map(|(i, ch)| ch.wire(kind, i, meta.logprobs, echoed))
        .collect();
    let body = json!({
        "id": meta.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": wire,
        "usage": render::usage(p, c, cached),
        "seed": meta.seed,
    });
    let (body, hash) = sign_json(&s.inner.keys, body);
    // The bytes sent are the canonical form (keys sorted), the same whatever serde_json's
    // map order.
    let text = atoma_crypto::signed_json::canonical(&body);
    let outputs = choices
        .into_iter()
        .map(|ch| {
            (
                ch.output_ids,
                ch.done.map_or(FinishReason::Cancelled, |d| d.0),
            )
        })
        .collect();
    let settled = log.settled(ResponseRecord::Json(text.clone()), hash, outputs, (p, c));
    tokio::task::spawn_blocking(move || reservation.settle(settled))
        .await
        .map_err(|e| ApiError::Internal(format!("metering task failed: {e}")))??;
    metrics::usage(p, c);
    // The bytes logged are the bytes sent.
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        text,
    )
        .into_response())
}

/// One choice of a plain (non-streamed) answer, as it is collected.
struct Choice {
    text: String,
    output_ids: Vec<u32>,
    logprobs: Vec<crate::backend::Logprobs>,
    tool_calls: Vec<Value>,
    /// Finish reason and completion tokens.
    done: Option<(FinishReason, u64)>,
}

impl Choice {
    fn new(echo: &str) -> Self {
        Self {
            text: echo.to_string(),
            output_ids: Vec::new(),
            logprobs: Vec::new(),
            tool_calls: Vec::new(),
            done: None,
        }
    }

    /// The choice in OpenAI's shape (`message` for chat, `text` for completions).
    fn wire(&mut self, kind: Kind, index: usize, logprobs: bool, echoed: usize) -> Value {
        let finish = self.done.map_or(FinishReason::Cancelled, |d| d.0);
        let lp = if logprobs {
            render::logprobs(kind, &self.logprobs, echoed)
        } else {
            Value::Null
        };
        // Tool calls are how the answer ends on the wire; the log keeps the generation's reason.
        let wire_finish = render::wire_finish(finish, !self.tool_calls.is_empty());
        match kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": self.text});
                if !self.tool_calls.is_empty() {
                    if self.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = Value::Array(std::mem::take(&mut self.tool_calls));
                }
                json!({"index": index, "message": message,
                       "finish_reason": wire_finish.as_str(), "logprobs": lp})
            }
            Kind::Completion => json!({"index": index, "text": self.text,
                                       "finish_reason": wire_finish.as_str(), "logprobs": lp}),
        }
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct TokenizeIn {
    content: String,
    model: Option<String>,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

#[derive(serde::Deserialize)]
pub(crate) struct DetokenizeIn {
    tokens: Vec<u32>,
    model: Option<String>,
}

/// The model a tokenizer route names, or the node's first.
fn tokenizer_model(s: &AppState, model: Option<String>) -> Result<String, ApiError> {
    let served = s.inner.backend.models();
    match model {
        Some(m) if served.contains(&m) => Ok(m),
        Some(m) => Err(ApiError::UnknownModel(m)),
        None => served.into_iter().next().ok_or(ApiError::NotReady),
    }
}

fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body exceeds {} bytes",
                crate::MAX_TOKENIZE_BYTES
            ))
        } else {
            ApiError::InvalidRequest(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid request body: {e}")))
}

/// `POST /tokenize` (llama-server's shape): `{"content", "add_special", "with_pieces"}` →
/// `{"tokens": [id, …]}`, or `[{"id", "piece"}, …]` with pieces (a string when the piece is
/// valid UTF-8, else its bytes). Unsigned and free, so its body limit is small.
pub(crate) async fn tokenize(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: TokenizeIn = json_body(body)?;
        if !s.inner.backend.ready() {
            return Err(ApiError::NotReady);
        }
        let model = tokenizer_model(&s, req.model)?;
        let backend = s.inner.backend.clone();
        let tokens = tokio::task::spawn_blocking(move || {
            backend.tokenize(&model, &req.content, req.add_special)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))??;
        let tokens: Vec<Value> = if req.with_pieces {
            tokens
                .into_iter()
                .map(|(id, bytes)| match String::from_utf8(bytes) {
                    Ok(p) => json!({"id": id, "piece": p}),
                    Err(e) => json!({"id": id, "piece": e.into_bytes()}),
                })
                .collect()
        } else {
            tokens.into_iter().map(|(id, _)| json!(id)).collect()
        };
        Ok(Json(json!({ "tokens": tokens })).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /detokenize` (llama-server's shape): `{"tokens": [id, …]}` → `{"content"}`.
pub(crate) async fn detokenize(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: DetokenizeIn = json_body(body)?;
        if !s.inner.backend.ready() {
            return Err(ApiError::NotReady);
        }
        let model = tokenizer_model(&s, req.model)?;
        let content = s.inner.backend.detokenize(&model, &req.tokens)?;
        Ok(Json(json!({ "content": content })).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn models(State(s): State<AppState>) -> Response {
    let b = &s.inner.backend;
    let data: Vec<_> = b
        .models()
        .into_iter()
        .chain(b.embedding_models())
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "atoma"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/node/status`: what a gateway routes by: the models, readiness, load and recent
/// latencies.
pub(crate) async fn status(State(s): State<AppState>) -> Response {
    let b = &s.inner.backend;
    let (ttft, tpot) = metrics::recent_latency();
    Json(json!({
        "models": b.models(),
        "ready": b.ready(),
        "load": b.load(),
        "ttft_seconds": ttft,
        "tpot_seconds": tpot,
    }))
    .into_response()
}

/// `GET /v1/settlements/{stack}`: the signed commitment of a stack this node settled
/// (`atoma_state::published`), for attestors on a ledger that records only the root. Public:
/// it points at a public blob and is bound by the root on the ledger.
pub(crate) async fn settlement(
    State(s): State<AppState>,
    axum::extract::Path(stack): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = stack.parse::<u64>() else {
        return ApiError::InvalidRequest(format!("`{stack}` is not a stack small id"))
            .into_response();
    };
    let meter = s.inner.meter.clone();
    let row = tokio::task::spawn_blocking(move || meter.settlement(StackSmallId(id))).await;
    let row = match row {
        Ok(Ok(r)) => r,
        Ok(Err(MeterError::UnknownStack(_))) => {
            return ApiError::NotFound(format!("this node did not sell stack {id}"))
                .into_response();
        }
        Ok(Err(e)) => return ApiError::Internal(e.to_string()).into_response(),
        Err(e) => return ApiError::Internal(e.to_string()).into_response(),
    };
    let (Some(c), Some(units)) = (row.commitment, row.claimed_units) else {
        return ApiError::NotFound(format!(
            "stack {id} is not settled yet (its log is not stored; state `{}`)",
            row.state.as_str()
        ))
        .into_response();
    };
    let body = PublishedCommitment::new(row.stack, row.selected_node_id, units, c);
    Json(body.to_signed_json(&s.inner.keys)).into_response()
}

pub(crate) async fn health(State(s): State<AppState>) -> Response {
    if s.inner.backend.ready() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}

pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    metrics::queue_depth(s.inner.backend.queue_depth());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.inner.metrics.render(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    let mut resp = ApiError::InvalidRequest(
        "no such route; see /v1/chat/completions, /v1/completions, /v1/models, /tokenize, \
         /detokenize"
            .into(),
    )
    .into_response();
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}
