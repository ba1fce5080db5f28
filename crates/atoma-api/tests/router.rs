//! Router tests without sockets (`tower::ServiceExt::oneshot`) on a trivial backend: success,
//! bad input, bad auth, replay, wrong node, unknown model, exhausted stack, overload, readiness,
//! streaming, and a client that disconnects mid-stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use atoma_api::sign::verify_json;
use atoma_api::{
    AppState, BackendError, BackendEvent, FinishReason, InferenceBackend, InferenceRequest,
    Logprobs, Prepared, Prompt, TokenLogprob, router,
};
use atoma_crypto::{Keypair, blake2b256};
use atoma_ledger::{Address, Amount, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskSmallId};
use atoma_state::meter::Meter;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const REPLY: &[&str] = &["The", " capital", " of", " France", " is", " Paris", "."];

/// Replies with `REPLY`, one token at a time, `delay` apart.
struct Trivial {
    ready: AtomicBool,
    overloaded: AtomicBool,
    delay: Duration,
    /// Requests prepared (rendered and tokenized, for a real backend).
    prepared: AtomicUsize,
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
        };
        let prompt = text.split_whitespace().count() as u64 + 3;
        let overloaded = self.overloaded.load(Ordering::Relaxed);
        let delay = self.delay;
        let execution = atoma_api::Execution::from_request(&req);
        let echo = req.echo.then(|| text.clone());
        Ok(Prepared::new(prompt, execution, move || {
            reply(prompt, req.max_tokens, delay, overloaded, req.logprobs)
        })
        .with_echo(echo))
    }
}

/// The trivial backend's answer stream (or its overload refusal, at start as the engine does).
fn reply(
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

struct Fixture {
    app: axum::Router,
    user: Keypair,
    node: Keypair,
    backend: Arc<Trivial>,
    meter: Meter,
}

const ME: NodeSmallId = NodeSmallId(1);

fn fixture(delay_ms: u64) -> Fixture {
    fixture_with(delay_ms, |_| None)
}

/// A fixture whose router syncs with a "ledger" through `refresh` (given the meter).
fn fixture_with(
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

fn signed(f: &Fixture, path: &str, stack: u64, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("x-signature", f.user.sign(&blake2b256(body.as_bytes())))
        .header("x-stack-small-id", stack.to_string())
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(f: &Fixture, req: Request<Body>) -> (StatusCode, Value) {
    let resp = f.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn chat(nonce: u32, max_tokens: u32) -> String {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "capital of France?"}],
           "max_tokens": max_tokens, "nonce": nonce})
    .to_string()
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, needle: &str) {
    assert_eq!(status, expected, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{msg}");
    assert!(
        body["error"]["type"].is_string() && body["error"]["code"].is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn chat_completion_is_served_signed_and_metered() {
    let f = fixture(0);
    let (status, body) = send(&f, signed(&f, "/v1/chat/completions", 1, &chat(1, 16))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(verify_json(&body).unwrap(), f.node.address());
    let usage = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(
        usage.units_used,
        body["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage.units_reserved, 0);
    // Tampering with the body breaks the signature check.
    let mut forged = body.clone();
    forged["choices"][0]["message"]["content"] = json!("Lyon");
    assert!(verify_json(&forged).is_err());
}

#[tokio::test]
async fn completions_work_and_cap_at_max_tokens() {
    let f = fixture(0);
    let body = json!({"model": "tiny", "prompt": "Say it", "max_tokens": 3}).to_string();
    let (status, body) = send(&f, signed(&f, "/v1/completions", 1, &body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "The capital of");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["object"], "text_completion");
}

#[tokio::test]
async fn bad_input_is_400() {
    let f = fixture(0);
    for (body, needle) in [
        ("{not json", "invalid request body"),
        (
            r#"{"model": "tiny", "messages": "hi"}"#,
            "invalid request body",
        ),
        (
            r#"{"model": "tiny", "messages": [], "max_tokens": 5}"#,
            "must not be empty",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "x"}"#,
            "invalid request body",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}"#,
            "role",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}"#,
            "temperature",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}"#,
            "`n`",
        ),
    ] {
        let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, body)).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, needle);
    }
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        0,
        "nothing charged"
    );
    let huge = "x".repeat(atoma_api::MAX_BODY_BYTES + 10);
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &huge)).await;
    assert_error(status, &resp, StatusCode::PAYLOAD_TOO_LARGE, "exceeds");
}

#[tokio::test]
async fn auth_failures_are_401() {
    let f = fixture(0);
    let body = chat(1, 5);
    let plain = Request::post("/v1/chat/completions")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, resp) = send(&f, plain).await;
    assert_error(
        status,
        &resp,
        StatusCode::UNAUTHORIZED,
        "missing X-Signature",
    );
    // A signature over another body.
    let mut req = signed(&f, "/v1/chat/completions", 1, &chat(2, 5));
    *req.body_mut() = Body::from(body.clone());
    let (status, resp) = send(&f, req).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "bad X-Signature");
    // Someone else's key on the owner's stack.
    let mallory = Keypair::from_secret([9; 32]);
    let req = Request::post("/v1/chat/completions")
        .header("x-signature", mallory.sign(&blake2b256(body.as_bytes())))
        .header("x-stack-small-id", "1")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, resp) = send(&f, req).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "does not own");
    // A stack sold to another node.
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 2, &body)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "not to this node");
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 99, &body)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
}

#[tokio::test]
async fn replays_are_refused_but_fresh_nonces_work() {
    let f = fixture(0);
    let req = || signed(&f, "/v1/chat/completions", 1, &chat(7, 5));
    assert_eq!(send(&f, req()).await.0, StatusCode::OK);
    let used = f.meter.usage(StackSmallId(1)).unwrap().units_used;
    let (status, resp) = send(&f, req()).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "replay");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        used,
        "a replay spends nothing"
    );
    assert_eq!(
        send(&f, signed(&f, "/v1/chat/completions", 1, &chat(8, 5)))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_model_exhausted_stack_overload_and_readiness() {
    let f = fixture(0);
    let other =
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string();
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &other)).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "gpt-9");
    // Stack 3 has 20 units; this request reserves its prompt plus 30 output tokens.
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 3, &chat(1, 30))).await;
    assert_error(status, &resp, StatusCode::LOCKED, "compute units left");
    f.backend.overloaded.store(true, Ordering::Relaxed);
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &chat(2, 5)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        0,
        "refused work is not charged"
    );
    f.backend.ready.store(false, Ordering::Relaxed);
    let (status, _) = send(&f, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    f.backend.ready.store(true, Ordering::Relaxed);
    let (status, body) = send(&f, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (_, models) = send(&f, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(models["data"][0]["id"], "tiny");
    let resp = f
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("atoma_requests_total"), "{text}");
    let (status, resp) = send(&f, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "no such route");
}

fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn streaming_chunks_are_signed_and_usage_is_included() {
    let f = fixture(0);
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "stream_options": {"include_usage": true}, "max_tokens": 50})
        .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut content = String::new();
    for c in &chunks {
        assert_eq!(
            verify_json(c).unwrap(),
            f.node.address(),
            "every chunk is signed"
        );
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
    }
    assert_eq!(content, "The capital of France is Paris.");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 7);
    let u = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(u.units_used, usage["total_tokens"].as_u64().unwrap());
    assert_eq!(u.units_reserved, 0);
}

#[tokio::test]
async fn a_client_disconnecting_mid_stream_pays_only_what_was_generated() {
    let f = fixture(50);
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "max_tokens": 50})
        .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body))
        .await
        .unwrap();
    let mut stream = resp.into_body().into_data_stream();
    // Read two chunks, then go away.
    let mut seen = 0;
    while seen < 2 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += sse_data(std::str::from_utf8(&chunk).unwrap()).len();
    }
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let u = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(u.units_reserved, 0, "nothing stays reserved");
    let prompt = 1 + 3; // one word plus the trivial backend's 3 template tokens
    assert!(
        u.units_used >= prompt + 2 && u.units_used < prompt + 7,
        "charged {}",
        u.units_used
    );
    assert_eq!(u.settled_requests, 1);
}

/// 200 concurrent requests on a stack that affords about 50: the affordable ones are served,
/// the rest get 423, and the stack's used units equal exactly the sum of the served usages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_on_a_small_stack() {
    let f = fixture(1);
    // Each request: prompt 2 words + 3 template tokens = 5, max_tokens 7 → reserves 12, uses 12.
    // Stack 4 holds 600 units: 50 requests' worth.
    let owner: Address = atoma_crypto::address_hex(&f.user.address())
        .parse()
        .unwrap();
    f.meter
        .upsert_stack(&Stack {
            small_id: StackSmallId(4),
            stack_id: "0x4".into(),
            owner,
            task_small_id: TaskSmallId(1),
            selected_node_id: ME,
            num_compute_units: ComputeUnits(600),
            price_per_one_million_compute_units: Amount(1),
            escrowed: Amount(1),
            is_claimed: false,
            created_at_epoch: 0,
        })
        .unwrap();
    let f = Arc::new(f);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"model": "tiny", "messages": [{"role": "user", "content": "hi there"}],
                              "max_tokens": 7, "nonce": i})
                .to_string();
            send(&f, signed(&f, "/v1/chat/completions", 4, &body)).await
        }));
    }
    let (mut served, mut locked, mut used) = (0, 0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::OK => {
                served += 1;
                used += body["usage"]["total_tokens"].as_u64().unwrap();
            }
            StatusCode::LOCKED => locked += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let u = f.meter.usage(StackSmallId(4)).unwrap();
    assert_eq!(served + locked, 200);
    assert_eq!(served, 50, "exactly the affordable requests are served");
    assert_eq!(u.units_used, used, "used units = sum of served usage");
    assert_eq!((u.units_used, u.units_reserved), (600, 0));
}

/// Every charged request leaves a log record in the same transaction: the exact body and
/// signature, the answer as sent (JSON or every chunk), token ids and the seed returned to the
/// client; its leaf is recomputable from the record alone.
#[tokio::test]
async fn every_served_request_is_logged_with_verifiable_evidence() {
    use atoma_state::log::{LogRecord, ResponseRecord};
    let f = fixture(0);
    let plain = chat(1, 16);
    let (status, answer) = send(&f, signed(&f, "/v1/chat/completions", 1, &plain)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let streamed = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "stream": true, "max_tokens": 3, "seed": 42})
    .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &streamed))
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    let log = f.meter.frozen_log(StackSmallId(1)).unwrap();
    assert_eq!(
        log.units,
        f.meter.usage(StackSmallId(1)).unwrap().units_used
    );
    let records: Vec<LogRecord> = log
        .records
        .iter()
        .map(|r| LogRecord::decode(r).unwrap())
        .collect();
    assert_eq!(records.len(), 2);

    let (r0, r1) = (&records[0], &records[1]);
    assert_eq!(r0.request_body, plain.as_bytes());
    assert_eq!(r0.request_signer().unwrap(), f.user.address());
    let (hash, signer) = r0.response_hash().unwrap();
    assert_eq!(signer, Some(f.node.address()));
    assert_eq!(
        answer["response_hash"].as_str().unwrap(),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, hash)
    );
    assert_eq!(r0.output_tokens.len(), 7);
    assert_eq!(r0.finish_reason, "stop");
    assert_eq!(answer["seed"].as_u64(), Some(r0.seed));

    assert_eq!(r1.request_body, streamed.as_bytes());
    assert_eq!(r1.seed, 42);
    assert_eq!(r1.finish_reason, "length");
    assert_eq!((r1.usage_completion_tokens, r1.output_tokens.len()), (3, 3));
    match &r1.response {
        ResponseRecord::Stream(chunks) => {
            assert_eq!(
                chunks.as_slice(),
                &data[..data.len() - 1],
                "the chunks as sent"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(data[data.len() - 2].contains("\"seed\":42"));
    assert_eq!(r1.response_hash().unwrap().1, Some(f.node.address()));
    // The leaves the node commits to are the ones anyone recomputes from the records.
    assert_eq!(log.leaves, vec![r0.leaf().unwrap(), r1.leaf().unwrap()]);
}

#[tokio::test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
async fn authorization_comes_before_any_work() {
    let f = fixture(0);
    // 3.5 MB of prompt, signed by a key that owns no stack: refused before parsing or
    // tokenizing anything.
    let big = json!({"model": "tiny", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "word ".repeat(700_000)}]})
    .to_string();
    assert!(big.len() > 3_400_000);
    let stranger = Keypair::from_secret([9; 32]);
    let req = |stack: u64, body: &str, key: &Keypair| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-signature", key.sign(&blake2b256(body.as_bytes())))
            .header("x-stack-small-id", stack.to_string())
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let t = std::time::Instant::now();
    let (status, resp) = send(&f, req(1, &big, &stranger)).await;
    println!(
        "3.5 MB body from a key owning no stack: {status} in {:?}",
        t.elapsed()
    );
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "does not own");
    // A stack sold to another node, an unknown stack: 401, whatever the body.
    let (status, resp) = send(&f, req(2, &big, &f.user)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "not to this node");
    let (status, resp) = send(&f, req(77, "{not json", &f.user)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
    assert_eq!(
        f.backend.prepared.load(Ordering::Relaxed),
        0,
        "nothing rendered"
    );
    assert_eq!(f.meter.usage(StackSmallId(1)).unwrap().units_used, 0);
}

#[tokio::test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
async fn unknown_stacks_cause_few_ledger_syncs_and_new_stacks_are_found() {
    let syncs = Arc::new(AtomicUsize::new(0));
    let counter = syncs.clone();
    let f = fixture_with(0, move |_| {
        let hook: atoma_api::Refresh = Arc::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            // A ledger round trip.
            std::thread::sleep(Duration::from_millis(5));
        });
        Some(hook)
    });
    // The same unknown id, many times: one sync, then refused from memory.
    for i in 0..20 {
        let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 99, &chat(i, 4))).await;
        assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
    }
    assert_eq!(syncs.load(Ordering::Relaxed), 1);
    // Forty made-up ids at once: the syncs coalesce.
    let started = std::time::Instant::now();
    let reqs: Vec<_> = (0..40u64)
        .map(|i| {
            f.app
                .clone()
                .oneshot(signed(&f, "/v1/chat/completions", 1000 + i, &chat(0, 4)))
        })
        .collect();
    for r in futures_util::future::join_all(reqs).await {
        assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let n = syncs.load(Ordering::Relaxed) - 1;
    let gaps = (started.elapsed().as_millis() / 100) as usize + 2;
    println!(
        "40 concurrent unknown stacks: {n} syncs in {:?}",
        started.elapsed()
    );
    assert!(n <= gaps, "{n} syncs for 40 requests");
    assert_eq!(f.backend.prepared.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_stack_bought_a_moment_ago_is_found_by_one_sync() {
    let syncs = Arc::new(AtomicUsize::new(0));
    let counter = syncs.clone();
    let user = Keypair::from_secret([3; 32]);
    let owner: Address = atoma_crypto::address_hex(&user.address()).parse().unwrap();
    let f = fixture_with(0, move |meter| {
        let meter = meter.clone();
        let hook: atoma_api::Refresh = Arc::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            meter
                .upsert_stack(&Stack {
                    small_id: StackSmallId(50),
                    stack_id: "0x50".into(),
                    owner,
                    task_small_id: TaskSmallId(1),
                    selected_node_id: ME,
                    num_compute_units: ComputeUnits(1000),
                    price_per_one_million_compute_units: Amount(1),
                    escrowed: Amount(1),
                    is_claimed: false,
                    created_at_epoch: 0,
                })
                .unwrap();
        });
        Some(hook)
    });
    assert_eq!(f.user.address(), user.address());
    let (status, body) = send(&f, signed(&f, "/v1/chat/completions", 50, &chat(1, 4))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(syncs.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn unsupported_parameters_are_refused_by_name_and_harmless_ones_accepted() {
    let f = fixture(0);
    let refused = [
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("response_format", json!({"type": "regex", "regex": "a+"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("required")),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("web_search_options", json!({})),
        ("reasoning_effort", json!("low")),
        ("verbosity", json!("low")),
        ("store", json!(true)),
        ("n", json!(2)),
    ];
    for (i, (name, value)) in refused.iter().enumerate() {
        let mut body: Value = serde_json::from_str(&chat(i as u32, 4)).unwrap();
        body[*name] = value.clone();
        let (status, resp) =
            send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, &format!("`{name}`"));
    }
    let names: Vec<&str> = atoma_api::openai::UNSUPPORTED
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for (name, _) in &refused {
        assert!(
            names.contains(name),
            "{name} is missing from the README's table"
        );
    }
    for (name, value) in [("suffix", json!("tail")), ("best_of", json!(3))] {
        let mut body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 4});
        body[name] = value;
        let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, &format!("`{name}`"));
    }
    for (body, needle) in [
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "image_url",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}),
            "tool",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "a"}]}]}),
            "tool_calls",
        ),
        (
            json!({"model": "tiny", "prompt": ["a", "b"]}),
            "more than one prompt",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "echo": true, "logprobs": 1}),
            "echo",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logit_bias": {"5": 101}}),
            "logit_bias",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
            "logprobs",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "top_k": -5}),
            "top_k",
        ),
        (json!({"model": "tiny", "prompt": "a", "min_p": 2}), "min_p"),
    ] {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, resp) = send(&f, signed(&f, path, 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, needle);
    }
    // Harmless values pass.
    let body = json!({"model": "tiny", "messages": [{"role": "developer", "content": "be brief"},
                                                    {"role": "user", "content": "x"}],
                      "max_tokens": 4, "store": false, "modalities": ["text"], "user": "u-1",
                      "metadata": {"a": "b"}, "service_tier": "auto", "tool_choice": "none",
                      "response_format": {"type": "text"}, "parallel_tool_calls": true,
                      "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                      "logit_bias": {"3": -100, "4": 2.5}});
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        resp["usage"]["total_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn logprobs_echo_token_prompts_fingerprint_and_cached_tokens() {
    let f = fixture(0);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                      "logprobs": true, "top_logprobs": 2, "max_tokens": 16});
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let content = resp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 7);
    assert_eq!(content[1]["token"], " capital");
    assert_eq!(content[1]["bytes"], json!(" capital".as_bytes()));
    assert_eq!(content[1]["logprob"], -0.5);
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[1]["top_logprobs"][1]["logprob"], -1.5);
    assert!(
        resp["system_fingerprint"]
            .as_str()
            .unwrap()
            .contains("model-sha256:")
    );
    assert_eq!(resp["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(verify_json(&resp).unwrap(), f.node.address());

    // Streamed: every token's entry arrives once, with the chunk that carries its text.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                      "logprobs": true, "top_logprobs": 1, "max_tokens": 16, "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body.to_string()))
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut tokens = Vec::new();
    for c in &chunks {
        assert!(c["system_fingerprint"].is_string());
        if let Some(lp) = c["choices"]
            .get(0)
            .and_then(|ch| ch["logprobs"]["content"].as_array())
        {
            tokens.extend(lp.iter().map(|e| e["token"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(tokens.concat(), "The capital of France is Paris.");
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );

    // Completions: legacy shape, token-id prompts, echo.
    let body = json!({"model": "tiny", "prompt": "x y", "logprobs": 3, "max_tokens": 3});
    let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let lp = &resp["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["The", " capital", " of"]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5, -0.5]));
    assert_eq!(lp["text_offset"], json!([0, 3, 11]));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    for prompt in [json!([5, 6, 7]), json!([[5, 6, 7]])] {
        let body = json!({"model": "tiny", "prompt": prompt, "echo": true, "max_tokens": 2});
        let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["choices"][0]["text"], "<5><6><7>The capital");
        assert_eq!(resp["choices"][0]["logprobs"], Value::Null);
    }
}

#[tokio::test]
async fn tokenizer_routes_answer_in_llama_server_shapes() {
    let f = fixture(0);
    let post = |path: &str, body: String| {
        Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    // The trivial backend has no tokenizer: a clear 404 naming the model.
    let (status, resp) = send(&f, post("/tokenize", json!({"content": "hi"}).to_string())).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "tiny");
    let (status, resp) = send(
        &f,
        post(
            "/tokenize",
            json!({"content": "hi", "model": "gpt-9"}).to_string(),
        ),
    )
    .await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "gpt-9");
    let (status, resp) = send(&f, post("/detokenize", "{\"tokens\": \"x\"}".into())).await;
    assert_error(
        status,
        &resp,
        StatusCode::BAD_REQUEST,
        "invalid request body",
    );
    let big = json!({"content": "x".repeat(atoma_api::MAX_TOKENIZE_BYTES)}).to_string();
    let (status, resp) = send(&f, post("/tokenize", big)).await;
    assert_error(status, &resp, StatusCode::PAYLOAD_TOO_LARGE, "exceeds");
}
