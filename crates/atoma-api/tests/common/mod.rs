//! What the router tests share: a trivial backend, a fixture with a metered stack, signing
//! and sending helpers.
#![allow(dead_code)] // each test file uses part of it

pub use std::sync::Arc;
pub use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
pub use std::time::Duration;

pub use atoma_api::sign::verify_json;
pub use atoma_api::{
    AppState, BackendError, BackendEvent, FinishReason, InferenceBackend, InferenceRequest,
    Logprobs, Prepared, Prompt, TokenLogprob, router,
};
pub use atoma_crypto::{Keypair, blake2b256};
pub use atoma_ledger::{
    Address, Amount, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskSmallId,
};
pub use atoma_state::meter::Meter;
pub use axum::body::Body;
pub use axum::http::{Request, StatusCode};
pub use futures_util::StreamExt;
pub use futures_util::stream::BoxStream;
pub use http_body_util::BodyExt;
pub use serde_json::{Value, json};
pub use tower::ServiceExt;

pub const REPLY: &[&str] = &["The", " capital", " of", " France", " is", " Paris", "."];

/// Replies with `REPLY`, one token at a time, `delay` apart.
pub struct Trivial {
    pub ready: AtomicBool,
    pub overloaded: AtomicBool,
    pub delay: Duration,
    /// Requests prepared (rendered and tokenized, for a real backend).
    pub prepared: AtomicUsize,
}

impl InferenceBackend for Trivial {
    fn models(&self) -> Vec<String> {
        vec!["tiny".into()]
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn queue_depth(&self) -> usize {
        0
    }
    fn tokenize(
        &self,
        model: &str,
        _text: &str,
        _add_special: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>, BackendError> {
        Err(BackendError::UnknownModel(model.to_string()))
    }
    fn detokenize(&self, model: &str, _ids: &[u32]) -> Result<String, BackendError> {
        Err(BackendError::UnknownModel(model.to_string()))
    }
    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError> {
        self.prepared.fetch_add(1, Ordering::Relaxed);
        let text = match &req.prompt {
            Prompt::Chat(turns) => turns
                .iter()
                .map(|t| t.content.clone())
                .collect::<Vec<_>>()
                .join(" "),
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => ids.iter().map(|i| format!("<{i}>")).collect(),
            Prompt::Batch(v) => format!("{} prompts", v.len()),
        };
        let prompt = text.split_whitespace().count() as u64 + 3;
        let overloaded = self.overloaded.load(Ordering::Relaxed);
        let delay = self.delay;
        let execution = atoma_api::Execution::from_request(&req);
        let echo = req.echo.then(|| text.clone());
        let choices = req.n as usize
            * match &req.prompt {
                Prompt::Batch(v) => v.len(),
                _ => 1,
            };
        Ok(Prepared::with_choices(prompt, choices, execution, move || {
            (0..choices)
                .map(|_| reply(prompt, req.max_tokens, delay, overloaded, req.logprobs))
                .collect()
        })
        .with_echo(echo))
    }
}

/// The trivial backend's answer stream (or its overload refusal, at start as the engine does).
pub fn reply(
    prompt: u64,
    max_tokens: u32,
    delay: Duration,
    overloaded: bool,
    logprobs: Option<u8>,
) -> Result<BoxStream<'static, BackendEvent>, BackendError> {
    if overloaded {
        return Err(BackendError::Overloaded);
    }
    let n = (max_tokens as usize).min(REPLY.len());
    let reason = if n == REPLY.len() {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };
    let tokens =
        futures_util::stream::iter(REPLY[..n].iter().enumerate()).then(move |(i, t)| async move {
            tokio::time::sleep(delay).await;
            let entry = |id: u32, logprob: f32| TokenLogprob {
                id,
                bytes: REPLY[id as usize % REPLY.len()].as_bytes().to_vec(),
                logprob,
            };
            BackendEvent::Token {
                id: i as u32,
                text: t.to_string(),
                logprobs: logprobs.map(|k| Logprobs {
                    chosen: entry(i as u32, -0.5),
                    top: (0..u32::from(k))
                        .map(|j| entry(i as u32 + j, -0.5 - j as f32))
                        .collect(),
                }),
            }
        });
    let done = futures_util::stream::once(async move {
        BackendEvent::Done {
            finish_reason: reason,
            prompt_tokens: prompt,
            completion_tokens: n as u64,
            cached_tokens: 0,
        }
    });
    Ok(tokens.chain(done).boxed())
}

pub struct Fixture {
    pub app: axum::Router,
    pub user: Keypair,
    pub node: Keypair,
    pub backend: Arc<Trivial>,
    pub meter: Meter,
}

pub const ME: NodeSmallId = NodeSmallId(1);

pub fn fixture(delay_ms: u64) -> Fixture {
    fixture_with(delay_ms, |_| None)
}

/// A fixture whose router syncs with a "ledger" through `refresh` (given the meter).
pub fn fixture_with(
    delay_ms: u64,
    refresh: impl FnOnce(&Meter) -> Option<atoma_api::Refresh>,
) -> Fixture {
    let user = Keypair::from_secret([3; 32]);
    let node = Keypair::from_secret([4; 32]);
    let meter = Meter::in_memory(vec![ME]).unwrap();
    let owner: Address = atoma_crypto::address_hex(&user.address()).parse().unwrap();
    let stack = |id, units, node| Stack {
        small_id: StackSmallId(id),
        stack_id: format!("0x{id}"),
        owner,
        task_small_id: TaskSmallId(1),
        selected_node_id: node,
        num_compute_units: ComputeUnits(units),
        price_per_one_million_compute_units: Amount(1),
        escrowed: Amount(1),
        is_claimed: false,
        created_at_epoch: 0,
    };
    meter.upsert_task(TaskSmallId(1), Some("tiny")).unwrap();
    meter.upsert_stack(&stack(1, 10_000, ME)).unwrap();
    meter
        .upsert_stack(&stack(2, 10_000, NodeSmallId(2)))
        .unwrap();
    meter.upsert_stack(&stack(3, 20, ME)).unwrap();
    let backend = Arc::new(Trivial {
        ready: AtomicBool::new(true),
        overloaded: AtomicBool::new(false),
        delay: Duration::from_millis(delay_ms),
        prepared: AtomicUsize::new(0),
    });
    let mut state = AppState::new(backend.clone(), meter.clone(), node.clone());
    if let Some(r) = refresh(&meter) {
        state = state.with_refresh(r);
    }
    Fixture {
        app: router(state),
        user,
        node,
        backend,
        meter,
    }
}

pub fn signed(f: &Fixture, path: &str, stack: u64, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-signature", f.user.sign(&blake2b256(body.as_bytes())))
        .header("x-stack-small-id", stack.to_string())
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub async fn send(f: &Fixture, req: Request<Body>) -> (StatusCode, Value) {
    let resp = f.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub fn chat(nonce: u32, max_tokens: u32) -> String {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "capital of France?"}],
           "max_tokens": max_tokens, "nonce": nonce})
    .to_string()
}

pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, needle: &str) {
    assert_eq!(status, expected, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{msg}");
    assert!(
        body["error"]["type"].is_string() && body["error"]["code"].is_string(),
        "{body}"
    );
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}
