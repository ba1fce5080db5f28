//! What the gateway adds per request, and how many requests per second it sustains, against a
//! trivial node: a loopback HTTP server that answers every chat completion at once with a
//! signed answer (signed once, up front, so the node costs as little as a node can).
//!
//! Every request through the gateway does its real work: API-key lookup (hash, SQLite), rate
//! limits, a credit hold, routing, a stack lease, a fresh nonce, signing the body as the stack
//! owner, the upstream call, the check of the node's `response_hash` and signature, keeping the
//! answer as evidence, settling the lease and charging the key (SQLite files on disk, WAL).
//!
//! Each of the three parts (trivial node, gateway, client) runs on its own Tokio runtime, as
//! three processes would; the client keeps its connections alive.
//!
//! 1. Latency: one request at a time, straight to the node, then through the gateway; the
//!    difference of the percentiles is what the gateway adds.
//! 2. Throughput: 32 requests in flight for a few seconds, straight and through the gateway.
//!
//! Run: `cargo bench -p atoma-gateway --bench overhead`. Prints a markdown table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atoma_crypto::Keypair;
use atoma_crypto::signed_json::sign_json;
use atoma_gateway::keys::{KeyStore, Limits};
use atoma_gateway::registry::Registry;
use atoma_gateway::routing::Policy;
use atoma_gateway::stacks::StackBook;
use atoma_gateway::{Gateway, GatewayConfig};
use atoma_ledger::{Address, Amount, Ledger, NewTask, SecurityLevel, SqliteLedger, TaskRole};
use serde_json::json;

const LATENCY_REQUESTS: usize = 3_000;
const WARMUP: usize = 300;
const CONCURRENCY: usize = 32;
const THROUGHPUT_SECS: u64 = 5;

fn runtime(name: &str, threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// The trivial node: a presigned answer for every chat completion; its status and health.
fn start_node(rt: &tokio::runtime::Runtime, key: &Keypair) -> String {
    let answer = json!({"id": "chatcmpl-bench", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}});
    let body = Arc::new(serde_json::to_vec(&sign_json(key, answer).0).unwrap());
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let body = body.clone();
                async move {
                    (
                        [("content-type", "application/json")],
                        body.as_ref().clone(),
                    )
                }
            }),
        )
        .route(
            "/v1/node/status",
            axum::routing::get(|| async {
                axum::Json(json!({"ready": true, "load": {"running": 0, "waiting": 0,
                    "kv_blocks_used": 0, "kv_blocks_total": 100}, "ttft_seconds": 0.001,
                    "tpot_seconds": 0.001}))
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }));
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    })
}

/// The gateway, on files in `dir`, in front of the node at `node_url`. Returns its URL and an
/// API key.
fn start_gateway(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    node_key: &Keypair,
    node_url: &str,
) -> (String, String) {
    let ledger = Arc::new(SqliteLedger::open(&dir.join("ledger.db")).unwrap());
    let admin: Address = "0x99".parse().unwrap();
    let task = ledger
        .create_task(
            admin,
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some("m".into()),
                security_level: SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: Amount(0),
            },
        )
        .unwrap()
        .small_id;
    let who = Address(node_key.address());
    let id = ledger.register_node(who).unwrap().small_id;
    ledger.set_node_public_url(who, id, node_url).unwrap();
    ledger
        .subscribe_node_to_task(who, id, task, Amount(1_000))
        .unwrap();
    let signer = Keypair::from_secret([9; 32]);
    ledger
        .faucet(Address(signer.address()), Amount(1_000_000_000_000))
        .unwrap();
    let books = atoma_gateway::books::open(&dir.join("gateway.db")).unwrap();
    let keys = KeyStore::on(books.clone()).unwrap();
    let (_, secret) = keys
        .create("bench", 1_000_000_000_000, Limits::default())
        .unwrap();
    let stacks = StackBook::on(
        books.clone(),
        ledger.clone(),
        Address(signer.address()),
        1_000_000,
    )
    .unwrap();
    let registry = Arc::new(Registry::new(ledger));
    registry.refresh_ledger().unwrap();
    let cfg = GatewayConfig {
        policy: Policy::Balanced,
        ..GatewayConfig::default()
    };
    let gw = Arc::new(Gateway::new(cfg, keys, registry, stacks, signer, books).unwrap());
    let url = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(atoma_gateway::serve(gw, l, std::future::pending()));
        url
    });
    (url, secret)
}

struct Target {
    url: String,
    key: String,
}

async fn one(client: &reqwest::Client, t: &Target, body: &str) -> Duration {
    let t0 = Instant::now();
    let resp = client
        .post(format!("{}/v1/chat/completions", t.url))
        .header("authorization", format!("Bearer {}", t.key))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    t0.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 in milliseconds of `LATENCY_REQUESTS` sequential requests.
async fn latency(client: &reqwest::Client, t: &Target, body: &str) -> (f64, f64) {
    for _ in 0..WARMUP {
        one(client, t, body).await;
    }
    let mut ms: Vec<f64> = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        ms.push(one(client, t, body).await.as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.50), percentile(&ms, 0.99))
}

/// Requests per second with `CONCURRENCY` in flight.
async fn throughput(client: &reqwest::Client, t: Arc<Target>, body: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, t, body, done) =
                (client.clone(), t.clone(), body.to_string(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    one(&client, &t, &body).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

#[allow(clippy::print_stdout)] // the bench's report
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let node_key = Keypair::from_secret([7; 32]);
    let node_rt = runtime("node", 1);
    let gateway_rt = runtime("gateway", 2);
    let client_rt = runtime("client", 1);
    let node_url = start_node(&node_rt, &node_key);
    let (gw_url, secret) = start_gateway(&gateway_rt, dir.path(), &node_key, &node_url);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "Say something."}],
                      "max_tokens": 8})
    .to_string();
    let direct = Arc::new(Target {
        url: node_url,
        key: String::new(),
    });
    let gateway = Arc::new(Target {
        url: gw_url,
        key: secret,
    });
    // Let the registry poll the node once.
    std::thread::sleep(Duration::from_millis(1_200));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let (d50, d99, g50, g99, d_rps, g_rps) = client_rt.block_on(async {
        let (d50, d99) = latency(&client, &direct, &body).await;
        let (g50, g99) = latency(&client, &gateway, &body).await;
        let d_rps = throughput(&client, direct.clone(), &body).await;
        let g_rps = throughput(&client, gateway.clone(), &body).await;
        (d50, d99, g50, g99, d_rps, g_rps)
    });
    println!(
        "gateway overhead, trivial node on loopback, {LATENCY_REQUESTS} sequential requests \
         (latency) and {CONCURRENCY} in flight for {THROUGHPUT_SECS} s (throughput)\n"
    );
    println!("| path | p50 ms | p99 ms | requests/s |");
    println!("|---|---|---|---|");
    println!("| client → node | {d50:.3} | {d99:.3} | {d_rps:.0} |");
    println!("| client → gateway → node | {g50:.3} | {g99:.3} | {g_rps:.0} |");
    println!(
        "| **added by the gateway** | **{:.3}** | **{:.3}** | |",
        g50 - d50,
        g99 - d99
    );
    println!("\ntargets: p50 ≤ 1 ms and p99 ≤ 3 ms added, ≥ 2000 requests/s through the gateway");
}
