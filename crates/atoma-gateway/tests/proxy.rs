//! The gateway against simulated nodes on loopback (signed answers, plain and streamed, with
//! faults on demand) and an in-memory ledger: routing, failover, signature checks, 423, API-key
//! errors, and exact books (key charges = stack spend + margin).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use atoma_crypto::Keypair;
use atoma_crypto::signed_json::sign_json;
use atoma_gateway::keys::{KeyStore, Limits, margin_of};
use atoma_gateway::registry::Registry;
use atoma_gateway::routing::Policy;
use atoma_gateway::stacks::StackBook;
use atoma_gateway::{Gateway, GatewayConfig, router};
use atoma_ledger::{Address, Amount, Ledger, NewTask, SecurityLevel, SqliteLedger, TaskRole};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const NORMAL: u8 = 0;
const FAIL: u8 = 1;
const FORGE: u8 = 2;
const LOCKED: u8 = 3;
/// Streams 50 content chunks, one every 20 ms.
const SLOW: u8 = 4;

/// A simulated node: answers with 10 prompt + 5 completion tokens, signed by `key` (or by a
/// stranger when forging).
#[derive(Clone)]
struct FakeNode {
    key: Keypair,
    mode: Arc<AtomicU8>,
    /// Requests answered (not failed), and requests received.
    served: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    /// Status polls received.
    polls: Arc<AtomicUsize>,
    /// Set when a slow stream was dropped before its end (the gateway hung up).
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

/// Sets its flag when dropped before `done`.
struct Cancel {
    flag: Arc<std::sync::atomic::AtomicBool>,
    done: bool,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

fn slow_stream(
    signer: Keypair,
    flag: Arc<std::sync::atomic::AtomicBool>,
) -> axum::response::Response {
    let chunks = futures_util::stream::unfold(
        (0usize, Cancel { flag, done: false }),
        move |(i, mut cancel)| {
            let signer = signer.clone();
            async move {
                if i > 50 {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let data = if i == 50 {
                    cancel.done = true;
                    "data: [DONE]\n\n".to_string()
                } else {
                    let c = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
                        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]});
                    format!("data: {}\n\n", sign_json(&signer, c).0)
                };
                Some((Ok::<_, std::convert::Infallible>(data), (i + 1, cancel)))
            }
        },
    );
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn fake_chat(
    axum::extract::State(n): axum::extract::State<FakeNode>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    n.calls.fetch_add(1, Ordering::Relaxed);
    let mode = n.mode.load(Ordering::Relaxed);
    match mode {
        FAIL => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        LOCKED => return StatusCode::LOCKED.into_response(),
        _ => {}
    }
    n.served.fetch_add(1, Ordering::Relaxed);
    let signer = if mode == FORGE {
        Keypair::from_secret([66; 32])
    } else {
        n.key.clone()
    };
    let req: Value = serde_json::from_slice(&body).unwrap();
    if mode == SLOW {
        return slow_stream(signer, n.cancelled.clone());
    }
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15});
    if req["stream"] == true {
        let mut out = String::new();
        for t in ["a", "b", "c", "d", "e"] {
            let c = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]});
            out.push_str(&format!("data: {}\n\n", sign_json(&signer, c).0));
        }
        let u = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
                       "choices": [], "usage": usage});
        out.push_str(&format!(
            "data: {}\n\ndata: [DONE]\n\n",
            sign_json(&signer, u).0
        ));
        return ([("content-type", "text/event-stream")], out).into_response();
    }
    let answer = json!({"id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abcde"},
                     "finish_reason": "stop"}], "usage": usage});
    axum::Json(sign_json(&signer, answer).0).into_response()
}

async fn start(node: FakeNode) -> String {
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(fake_chat))
        .route(
            "/v1/completions",
            axum::routing::post(
                |axum::extract::State(n): axum::extract::State<FakeNode>| async move {
                    let a = json!({"id": "c", "object": "text_completion", "model": "m",
                        "choices": [{"index": 0, "text": "fghij", "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
                    axum::Json(sign_json(&n.key, a).0)
                },
            ),
        )
        .route(
            "/v1/embeddings",
            axum::routing::post(
                |axum::extract::State(n): axum::extract::State<FakeNode>| async move {
                    let a = json!({"object": "list", "model": "emb",
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
                        "usage": {"prompt_tokens": 4, "total_tokens": 4}});
                    axum::Json(sign_json(&n.key, a).0)
                },
            ),
        )
        .route(
            "/v1/node/status",
            axum::routing::get(
                |axum::extract::State(n): axum::extract::State<FakeNode>| async move {
                    n.polls.fetch_add(1, Ordering::Relaxed);
                    axum::Json(json!({"ready": true, "load": {"running": 0, "waiting": 0,
                        "kv_blocks_used": 0, "kv_blocks_total": 10}, "ttft_seconds": 0.1,
                        "tpot_seconds": 0.01}))
                },
            ),
        )
        .with_state(node);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

struct World {
    app: axum::Router,
    nodes: Vec<FakeNode>,
    keys: KeyStore,
    stacks: StackBook,
    secret: String,
    gw: Arc<Gateway>,
    _dir: tempfile::TempDir,
}

async fn world(policy: Policy) -> World {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(SqliteLedger::in_memory().unwrap());
    let admin: Address = "0x99".parse().unwrap();
    // Two tasks serve the model, as on the devnet (NoSecurity and SamplingConsensus), and
    // every node sells both: a node must still be one candidate, tried once per request.
    let tasks: Vec<_> = [SecurityLevel::NoSecurity, SecurityLevel::SamplingConsensus]
        .into_iter()
        .map(|security_level| {
            ledger
                .create_task(
                    admin,
                    &NewTask {
                        role: TaskRole::ChatCompletion,
                        model_name: Some("m".into()),
                        security_level,
                        minimum_reputation_score: 0,
                        is_public: true,
                        minimum_collateral: Amount(0),
                    },
                )
                .unwrap()
                .small_id
        })
        .collect();
    let embedding_task = ledger
        .create_task(
            admin,
            &NewTask {
                role: TaskRole::Embedding,
                model_name: Some("emb".into()),
                security_level: SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: Amount(0),
            },
        )
        .unwrap()
        .small_id;
    let mut nodes = Vec::new();
    for (i, price) in [1_000u64, 1_100, 1_300].into_iter().enumerate() {
        let key = Keypair::from_secret([i as u8 + 1; 32]);
        let who = Address(key.address());
        let id = ledger.register_node(who).unwrap().small_id;
        let n = FakeNode {
            key,
            mode: Arc::default(),
            served: Arc::default(),
            calls: Arc::default(),
            polls: Arc::default(),
            cancelled: Arc::default(),
        };
        let url = start(n.clone()).await;
        ledger.set_node_public_url(who, id, &url).unwrap();
        for &task in &tasks {
            ledger
                .subscribe_node_to_task(who, id, task, Amount(price))
                .unwrap();
        }
        if i == 1 {
            ledger
                .subscribe_node_to_task(who, id, embedding_task, Amount(price))
                .unwrap();
        }
        nodes.push(n);
    }
    let signer = Keypair::from_secret([9; 32]);
    ledger
        .faucet(Address(signer.address()), Amount(1_000_000_000))
        .unwrap();
    let keys = KeyStore::in_memory().unwrap();
    let (_, secret) = keys.create("alice", 1_000, Limits::default()).unwrap();
    let stacks = StackBook::in_memory(ledger.clone(), Address(signer.address()), 10_000).unwrap();
    let registry = Arc::new(Registry::new(ledger.clone()));
    registry.refresh_ledger().unwrap();
    let cfg = GatewayConfig {
        policy,
        ..GatewayConfig::default()
    };
    let gw = Arc::new(
        Gateway::new(
            cfg,
            keys.clone(),
            registry,
            stacks.clone(),
            signer,
            atoma_gateway::books::open(&dir.path().join("gw.db")).unwrap(),
        )
        .unwrap(),
    );
    World {
        app: router(gw.clone()),
        nodes,
        keys,
        stacks,
        secret,
        gw,
        _dir: dir,
    }
}

async fn call(w: &World, key: &str, body: Value) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = w.app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, bytes)
}

fn chat(stream: bool) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
           "stream": stream})
}

/// Σ key spend on nodes equals what the gateway's stacks used, and the books balance.
fn books_balance(w: &World) {
    let t = w.keys.totals().unwrap();
    assert!(t.is_conserved(), "{t:?}");
    assert_eq!(t.spent_node_micro, w.stacks.spend_micro().unwrap());
    assert_eq!(
        t.spent_margin_micro,
        u128::from(margin_of(t.spent_node_micro as u64, 100))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_streamed_answers_are_checked_routed_and_charged_exactly() {
    let w = world(Policy::Cheapest).await;
    let (status, headers, body) = call(&w, &w.secret, chat(false)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-atoma-node"], "1");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "abcde");
    assert_eq!(
        w.nodes[0].served.load(Ordering::Relaxed),
        1,
        "the cheapest node"
    );
    let (status, headers, body) = call(&w, &w.secret, chat(true)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-atoma-node"], "1");
    let text = String::from_utf8(body).unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    assert_eq!(
        data.len(),
        6,
        "5 content chunks, the usage chunk not asked for is dropped"
    );
    let key = &w.keys.list().unwrap()[0];
    // 2 requests × 15 units × 1 000 per million, plus 10%.
    assert_eq!(key.spent_node_micro, 30_000);
    assert_eq!(key.spent_margin_micro, 3_000);
    assert_eq!(key.held_micro, 0);
    books_balance(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_fail_over_and_forged_answers_never_reach_the_client() {
    let w = world(Policy::Cheapest).await;
    w.nodes[0].mode.store(FAIL, Ordering::Relaxed);
    let (status, _, _) = call(&w, &w.secret, chat(false)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        w.nodes[0].calls.load(Ordering::Relaxed),
        1,
        "a node is tried once per request, whatever number of tasks it sells"
    );
    assert_eq!(
        w.nodes[1].served.load(Ordering::Relaxed),
        1,
        "failed over to node 2"
    );
    // A forging node: its answer is refused, the node ejected at once, the next one answers.
    w.nodes[0].mode.store(NORMAL, Ordering::Relaxed);
    w.nodes[1].mode.store(FORGE, Ordering::Relaxed);
    let forger_before = w.nodes[1].served.load(Ordering::Relaxed);
    for stream in [false, true] {
        w.nodes[0].mode.store(FORGE, Ordering::Relaxed);
        let (status, _, body) = call(&w, &w.secret, chat(stream)).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("abcde") || text.contains("\"content\":\"a\""));
        w.nodes[0].mode.store(NORMAL, Ordering::Relaxed);
    }
    assert!(
        w.nodes[2].served.load(Ordering::Relaxed) >= 2,
        "node 3 answered"
    );
    assert_eq!(
        w.nodes[1].served.load(Ordering::Relaxed) - forger_before,
        1,
        "the forger got one request, then none: it is ejected"
    );
    let stats = w.gw.registry.stats();
    assert!(
        !stats[&1].available(std::time::Instant::now()),
        "the forger is ejected"
    );
    books_balance(&w);
    // Locked: the stack is retired and the next node answers.
    let w = world(Policy::Cheapest).await;
    w.nodes[0].mode.store(LOCKED, Ordering::Relaxed);
    let (status, _, _) = call(&w, &w.secret, chat(false)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        w.stacks
            .rows()
            .unwrap()
            .iter()
            .any(|r| r.node == 1 && r.retired)
    );
    // Every node failing: 503 with Retry-After, nothing charged.
    for n in &w.nodes {
        n.mode.store(FAIL, Ordering::Relaxed);
    }
    let before = w.keys.list().unwrap()[0].clone();
    let (status, headers, _) = call(&w, &w.secret, chat(false)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    let after = w.keys.list().unwrap()[0].clone();
    assert_eq!(before.balance_micro, after.balance_micro);
    books_balance(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_credit_limits_and_models_are_enforced() {
    let w = world(Policy::Balanced).await;
    let (status, _, _) = call(&w, "sk-atoma-nope", chat(false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (poor, poor_secret) = w.keys.create("poor", 0, Limits::default()).unwrap();
    let (status, _, body) = call(&w, &poor_secret, chat(false)).await;
    assert_eq!(
        status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    w.keys.revoke(poor.id).unwrap();
    let (status, _, _) = call(&w, &poor_secret, chat(false)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, limited) = w
        .keys
        .create(
            "limited",
            1_000,
            Limits {
                requests_per_minute: 2,
                tokens_per_minute: 0,
            },
        )
        .unwrap();
    for _ in 0..2 {
        assert_eq!(call(&w, &limited, chat(false)).await.0, StatusCode::OK);
    }
    let (status, headers, _) = call(&w, &limited, chat(false)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let mut bad = chat(false);
    bad["model"] = json!("nope");
    assert_eq!(call(&w, &w.secret, bad).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        call(&w, &w.secret, json!("not an object")).await.0,
        StatusCode::BAD_REQUEST
    );
    books_balance(&w);
}

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Random traffic (plain and streamed, every routing policy) over nodes that randomly work,
/// fail, forge or lock their stacks. After every request: the key paid exactly what the
/// answers the client got cost (15 units at the serving node's price, plus 10%), no hold is
/// left, the key's books are conserved, and its spend on nodes is what the gateway's stacks
/// used at their prices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_key_charges_equal_stack_spend_plus_margin() {
    for seed in [1u64, 2, 3] {
        let w = world(Policy::Balanced).await;
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let prices = [1_000u64, 1_100, 1_300];
        let (mut want_node, mut answered, mut refused) = (0u64, 0, 0);
        for step in 0..120 {
            let ctx = format!("seed {seed} step {step}");
            for n in &w.nodes {
                let mode = [NORMAL, NORMAL, NORMAL, FAIL, FORGE, LOCKED][rng.below(6) as usize];
                n.mode.store(mode, Ordering::Relaxed);
            }
            if rng.below(4) == 0 {
                // Forget ejections now and then, so that every node keeps being tried.
                for id in 1..=3 {
                    w.gw.registry
                        .with_stats(id, |s| *s = atoma_gateway::routing::NodeStats::default());
                }
            }
            let stream = rng.below(2) == 0;
            let policy = ["cheapest", "fastest", "balanced", "random"][rng.below(4) as usize];
            let req = Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {}", w.secret))
                .header("content-type", "application/json")
                .header("x-atoma-routing", policy)
                .body(Body::from(chat(stream).to_string()))
                .unwrap();
            let resp = w.app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let node = resp
                .headers()
                .get("x-atoma-node")
                .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8(body.to_vec()).unwrap();
            match status {
                StatusCode::OK => {
                    let node = node.unwrap_or_else(|| panic!("{ctx}: no X-Atoma-Node"));
                    assert!(
                        text.contains("abcde") || text.contains("\"content\":\"e\""),
                        "{ctx}: {text}"
                    );
                    assert!(!text.contains("\"error\""), "{ctx}: {text}");
                    want_node += 15 * prices[node - 1];
                    answered += 1;
                }
                StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                other => panic!("{ctx}: unexpected {other}: {text}"),
            }
            let key = &w.keys.list().unwrap()[0];
            assert_eq!(key.held_micro, 0, "{ctx}: a hold was left");
            assert_eq!(key.spent_node_micro, want_node, "{ctx}");
            assert_eq!(key.spent_margin_micro, want_node / 10, "{ctx}");
            books_balance(&w);
        }
        assert!(
            answered > 60 && refused > 0,
            "seed {seed}: {answered} answered, {refused} refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_nodes_are_polled_sparingly_and_forgers_not_until_their_backoff_ends() {
    use atoma_gateway::routing::{EJECT_AFTER, RESTING_POLL_EVERY};
    use std::time::Instant;
    let w = world(Policy::Cheapest).await;
    let timeout = std::time::Duration::from_secs(2);
    let polls = |i: usize| w.nodes[i].polls.load(Ordering::Relaxed);
    w.gw.registry.poll_nodes(timeout).await;
    assert!(w.nodes.iter().all(|n| n.polls.load(Ordering::Relaxed) == 1));
    assert_eq!(w.gw.registry.available(), w.nodes.len());
    // A bad signature ejects node 1 for a minute: no polls meanwhile.
    w.gw.registry
        .with_stats(1, |s| s.record_failure(true, Instant::now()));
    assert_eq!(w.gw.registry.available(), w.nodes.len() - 1);
    w.gw.registry.poll_nodes(timeout).await;
    assert_eq!(polls(0), 1, "resting");
    assert_eq!(polls(1), 2);
    // Its backoff over (statistics forgotten here), it is polled again.
    w.gw.registry
        .with_stats(1, |s| *s = atoma_gateway::routing::NodeStats::default());
    w.gw.registry.poll_nodes(timeout).await;
    assert_eq!(polls(0), 2);

    // Node 2 fails ordinarily until its backoff has grown to a minute (as a node that comes up
    // long after the gateway sees it): it is still polled, sparingly, and its first good
    // answer makes it available again at once.
    let long_ago = Instant::now() - 2 * RESTING_POLL_EVERY;
    w.gw.registry.with_stats(2, |s| {
        *s = atoma_gateway::routing::NodeStats::default();
        // Each failure after the last ejection ended: 3 to eject, then doubling to a minute.
        let mut t = Instant::now() - std::time::Duration::from_secs(900);
        for _ in 0..EJECT_AFTER + 11 {
            s.record_failure(false, t);
            t += std::time::Duration::from_secs(61);
        }
        s.record_failure(false, Instant::now());
        assert!(s.ejected_until().unwrap() > Instant::now() + RESTING_POLL_EVERY);
        s.record_health(false, Instant::now());
    });
    assert_eq!(w.gw.registry.available(), w.nodes.len() - 1);
    let before = polls(1);
    w.gw.registry.poll_nodes(timeout).await;
    assert_eq!(polls(1), before, "polled moments ago: resting");
    w.gw.registry
        .with_stats(2, |s| s.record_health(false, long_ago));
    w.gw.registry.poll_nodes(timeout).await;
    assert_eq!(
        polls(1),
        before + 1,
        "an ordinary ejection is polled every few seconds"
    );
    assert_eq!(
        w.gw.registry.available(),
        w.nodes.len(),
        "the good answer lifts it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_the_node_and_pays_for_what_it_got() {
    let w = world(Policy::Cheapest).await;
    w.nodes[0].mode.store(SLOW, Ordering::Relaxed);
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {}", w.secret))
        .header("content-type", "application/json")
        .body(Body::from(chat(true).to_string()))
        .unwrap();
    let resp = w.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut chunks = 0;
    while chunks < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            chunks += 1;
        }
    }
    drop(body);
    let t = std::time::Instant::now();
    while !w.nodes[0].cancelled.load(Ordering::SeqCst) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the node kept generating for a client that left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let key = &w.keys.list().unwrap()[0];
    assert_eq!(key.held_micro, 0);
    // One unit per content chunk the gateway relayed (no usage chunk came): the three the
    // client read, and at most one more already in flight.
    assert!(
        (3_000..=4_000).contains(&key.spent_node_micro),
        "{}",
        key.spent_node_micro
    );
    assert_eq!(key.spent_node_micro % 1_000, 0);
    books_balance(&w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_embeddings_and_models_go_through_too() {
    let w = world(Policy::Cheapest).await;
    let post = |path: &str, body: Value| {
        Request::post(path)
            .header("authorization", format!("Bearer {}", w.secret))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = w
        .app
        .clone()
        .oneshot(post(
            "/v1/completions",
            json!({"model": "m", "prompt": "hi", "max_tokens": 5}),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["choices"][0]["text"], "fghij");
    // Only node 2 serves embeddings (at 1 100 per million).
    let resp = w
        .app
        .clone()
        .oneshot(post(
            "/v1/embeddings",
            json!({"model": "emb", "input": "hi"}),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-atoma-node"], "2");
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["data"][0]["embedding"], json!([0.5, -0.5]));
    // A chat model asked for embeddings is unknown there.
    let resp = w
        .app
        .clone()
        .oneshot(post("/v1/embeddings", json!({"model": "m", "input": "hi"})))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let key = &w.keys.list().unwrap()[0];
    assert_eq!(key.spent_node_micro, 15 * 1_000 + 4 * 1_100);
    assert_eq!(key.held_micro, 0);
    books_balance(&w);
    let resp = w
        .app
        .clone()
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["emb", "m"]);
}
