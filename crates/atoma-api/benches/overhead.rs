//! What the node's request path costs on top of inference: signature check, body validation,
//! compute-unit reservation and settlement (SQLite, fsync'd), response hashing and signing.
//!
//! 1. In process: the full router (`oneshot`) against the same trivial backend called directly;
//!    the difference of the latency percentiles is the added latency.
//! 2. Over TCP on 127.0.0.1: requests/s the API sustains with that backend, 16 client threads.
//!
//! Run: `cargo bench -p atoma-api --bench overhead`. Prints a markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoma_api::{
    AppState, BackendError, BackendEvent, InferenceBackend, InferenceRequest, Prepared, router,
};
use atoma_crypto::{Keypair, address_hex, blake2b256};
use atoma_ledger::{Amount, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskSmallId};
use atoma_state::meter::Meter;
use axum::body::Body;
use axum::http::Request;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Answers "ok" in one token, instantly.
struct Trivial;

impl InferenceBackend for Trivial {
    fn models(&self) -> Vec<String> {
        vec!["tiny".into()]
    }
    fn ready(&self) -> bool {
        true
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
        Ok(Prepared::new(
            8,
            atoma_api::Execution::from_request(&req),
            || {
                Ok(futures_util::stream::iter([
                    BackendEvent::Token {
                        id: 1,
                        text: "ok".into(),
                        logprobs: None,
                    },
                    BackendEvent::Done {
                        finish_reason: atoma_api::FinishReason::Stop,
                        prompt_tokens: 8,
                        completion_tokens: 1,
                        cached_tokens: 0,
                    },
                ])
                .boxed())
            },
        ))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn body(i: u64) -> String {
    format!(
        r#"{{"model":"tiny","messages":[{{"role":"user","content":"hello"}}],"max_tokens":4,"nonce":{i}}}"#
    )
}

#[allow(clippy::print_stdout)]
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let user = Keypair::from_secret([3; 32]);
    let meter = Meter::open(&dir.path().join("state.db"), vec![NodeSmallId(1)]).unwrap();
    meter
        .upsert_stack(&Stack {
            small_id: StackSmallId(1),
            stack_id: "0x1".into(),
            owner: address_hex(&user.address()).parse().unwrap(),
            task_small_id: TaskSmallId(1),
            selected_node_id: NodeSmallId(1),
            num_compute_units: ComputeUnits(1_000_000_000),
            price_per_one_million_compute_units: Amount(1),
            escrowed: Amount(1),
            is_claimed: false,
            created_at_epoch: 0,
        })
        .unwrap();
    let app = router(AppState::new(
        Arc::new(Trivial),
        meter,
        Keypair::from_secret([4; 32]),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = 2000u64;
    let (full, bare) = rt.block_on(async {
        let (mut full, mut bare) = (Vec::new(), Vec::new());
        for i in 0..n + 100 {
            let text = body(i);
            let req = Request::post("/v1/chat/completions")
                .header("x-signature", user.sign(&blake2b256(text.as_bytes())))
                .header("x-stack-small-id", "1")
                .body(Body::from(text))
                .unwrap();
            let t = Instant::now();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert!(resp.status().is_success());
            resp.into_body().collect().await.unwrap();
            let dt_full = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            let req = InferenceRequest {
                model: "tiny".into(),
                prompt: atoma_api::Prompt::Text("hello".into()),
                max_tokens: 4,
                temperature: 1.0,
                top_p: 1.0,
                seed: None,
                stop: vec![],
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ignore_eos: false,
                top_k: 0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                logit_bias: vec![],
                logprobs: None,
                echo: false,
                json_schema: None,
                tools: None,
                n: 1,
            };
            let _events: Vec<_> = Trivial
                .prepare(req)
                .unwrap()
                .start()
                .unwrap()
                .collect()
                .await;
            let dt_bare = t.elapsed().as_secs_f64() * 1e6;
            if i >= 100 {
                full.push(dt_full);
                bare.push(dt_bare);
            }
        }
        full.sort_by(f64::total_cmp);
        bare.sort_by(f64::total_cmp);
        (full, bare)
    });
    println!("## Request-path overhead (trivial backend, {n} sequential requests, in process)\n");
    println!("| path | p50 µs | p99 µs |\n| --- | --- | --- |");
    println!(
        "| backend alone | {:.1} | {:.1} |",
        percentile(&bare, 0.5),
        percentile(&bare, 0.99)
    );
    println!(
        "| full router (auth + validation + metering + signing) | {:.1} | {:.1} |",
        percentile(&full, 0.5),
        percentile(&full, 0.99)
    );
    println!(
        "| **added** | **{:.1}** | **{:.1}** |\n",
        percentile(&full, 0.5) - percentile(&bare, 0.5),
        percentile(&full, 0.99) - percentile(&bare, 0.99)
    );

    // Throughput over TCP.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let clients = 16;
    let secs = 5.0;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let user = user.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                let mut ok = 0u64;
                let mut i = 0u64;
                while t0.elapsed().as_secs_f64() < secs {
                    let text = body(1_000_000 * (c + 1) + i);
                    i += 1;
                    let r = agent
                        .post(&format!("http://{addr}/v1/chat/completions"))
                        .set("X-Signature", &user.sign(&blake2b256(text.as_bytes())))
                        .set("X-Stack-Small-Id", "1")
                        .send_string(&text);
                    if r.is_ok_and(|r| r.into_string().is_ok()) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "## Throughput over TCP (127.0.0.1, {clients} client threads, {secs} s, fsync'd SQLite metering)\n"
    );
    println!("| requests | seconds | requests/s |\n| --- | --- | --- |");
    println!("| {total} | {elapsed:.1} | {:.0} |", total as f64 / elapsed);
}
