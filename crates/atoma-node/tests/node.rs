//! A whole node on 127.0.0.1 with a tiny random model: the embedded ledger sells a stack to it,
//! the follower picks the stack up, and signed requests over TCP are served, signed and metered.

use std::sync::Arc;
use std::time::Duration;

use atoma_crypto::{Keypair, address_hex, blake2b256};
use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{Architecture, Engine, EngineConfig, LoadOptions, LoadedModel};
use atoma_ledger::{
    Address, Amount, ComputeUnits, Ledger, NewTask, NodeSmallId, SecurityLevel, SqliteLedger,
    StackRequest, TaskRole, TaskSmallId,
};
use atoma_node::{EngineBackend, NodeParts, bind};
use atoma_state::meter::Meter;
use serde_json::{Value, json};

fn addr(k: &Keypair) -> Address {
    address_hex(&k.address()).parse().unwrap()
}

/// A node serving in the background until `stop`.
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), atoma_node::NodeError>>,
}

impl Running {
    async fn start(parts: NodeParts) -> Self {
        let bound = bind(parts).await.unwrap();
        let addr = bound.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        Self { addr, stop, server }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

/// A node of `node_key` registered and subscribed to a chat task for model `tiny`, and a funded
/// `user`. Returns (node, task).
fn market(ledger: &SqliteLedger, node_key: &Keypair, user: &Keypair) -> (NodeSmallId, TaskSmallId) {
    let node = ledger.register_node(addr(node_key)).unwrap().small_id;
    let task = ledger
        .create_task(
            addr(node_key),
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some("tiny".into()),
                security_level: SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: atoma_ledger::Amount(0),
            },
        )
        .unwrap()
        .small_id;
    ledger
        .subscribe_node_to_task(addr(node_key), node, task, Amount(1_000))
        .unwrap();
    ledger.faucet(addr(user), Amount(1_000_000)).unwrap();
    (node, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_a_stack_bought_on_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (node_key, user) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
    let ledger = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db")).unwrap());
    let (node, task) = market(ledger.as_ref(), &node_key, &user);
    let stack = ledger
        .acquire_stack(
            addr(&user),
            &StackRequest {
                task_small_id: task,
                num_compute_units: ComputeUnits(5_000),
                price_per_one_million_compute_units: Amount(1_000),
            },
        )
        .unwrap();

    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&gguf, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let engine = Engine::start(lm, &EngineConfig::default()).unwrap();
    let state = Meter::open(&dir.path().join("state.db"), vec![node]).unwrap();
    let node = Running::start(NodeParts {
        backend: Arc::new(EngineBackend::new(engine, "tiny", [0; 32])),
        ledger: ledger.clone(),
        state: state.clone(),
        keys: node_key.clone(),
        bind: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_millis(50),
        da: None,
        policy: atoma_node::SettlementPolicy::default(),
        reexec: None,
    })
    .await;
    let base = node.base_url();
    let url = base;

    let post = |body: Value| {
        let (url, user) = (url.clone(), user.clone());
        tokio::task::spawn_blocking(move || {
            let text = body.to_string();
            let resp = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("Content-Type", "application/json")
                .set("X-Signature", &user.sign(&blake2b256(text.as_bytes())))
                .set("X-Stack-Small-Id", &stack.small_id.0.to_string())
                .send_string(&text);
            match resp {
                Ok(r) => (r.status(), r.into_string().unwrap()),
                Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
                Err(e) => panic!("{e}"),
            }
        })
    };
    let (status, text) = post(
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                                      "max_tokens": 8, "seed": 1, "nonce": 1}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        atoma_api::sign::verify_json(&body).unwrap(),
        node_key.address()
    );
    let total = body["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(state.usage(stack.small_id).unwrap().units_used, total);

    let (status, text) = post(
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                                      "max_tokens": 8, "stream": true, "nonce": 2,
                                      "stream_options": {"include_usage": true}}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let (status, text) =
        post(json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}))
            .await
            .unwrap();
    assert_eq!(status, 404, "{text}");

    node.stop().await;
}

/// The node answers 503 while its model loads, then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(SqliteLedger::in_memory().unwrap());
    let loading = atoma_node::LoadingBackend::new(vec!["tiny".into()]);
    let node = Running::start(NodeParts {
        backend: Arc::new(loading.clone()),
        ledger,
        state: Meter::in_memory(vec![]).unwrap(),
        keys: Keypair::from_secret([1; 32]),
        bind: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_millis(50),
        da: None,
        policy: atoma_node::SettlementPolicy::default(),
        reexec: None,
    })
    .await;
    let base = node.base_url();
    let url = format!("{base}/health");
    let status = |url: String| {
        tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        })
    };
    assert_eq!(status(url.clone()).await.unwrap(), 503);
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&gguf, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let engine = Engine::start(lm, &EngineConfig::default()).unwrap();
    loading.set(Arc::new(EngineBackend::new(engine, "tiny", [0; 32])));
    assert_eq!(status(url).await.unwrap(), 200);
    node.stop().await;
}

/// A stack bought after the node's last ledger poll is found at once (sync on miss), without
/// waiting for the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_bought_a_moment_ago_is_served_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (node_key, user) = (Keypair::from_secret([5; 32]), Keypair::from_secret([6; 32]));
    let ledger = Arc::new(SqliteLedger::in_memory().unwrap());
    let (node, task) = market(ledger.as_ref(), &node_key, &user);
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&gguf, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let node = Running::start(NodeParts {
        backend: Arc::new(EngineBackend::new(
            Engine::start(lm, &EngineConfig::default()).unwrap(),
            "tiny",
            [0; 32],
        )),
        ledger: ledger.clone(),
        state: Meter::in_memory(vec![node]).unwrap(),
        keys: node_key,
        bind: "127.0.0.1:0".parse().unwrap(),
        // The follower would take an hour to notice.
        poll_interval: Duration::from_secs(3600),
        da: None,
        policy: atoma_node::SettlementPolicy::default(),
        reexec: None,
    })
    .await;
    let base = node.base_url();
    let url = format!("{base}/v1/chat/completions");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stack = ledger
        .acquire_stack(
            addr(&user),
            &StackRequest {
                task_small_id: task,
                num_compute_units: ComputeUnits(5_000),
                price_per_one_million_compute_units: Amount(1_000),
            },
        )
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let text = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string();
        match ureq::post(&url)
            .set("X-Signature", &user.sign(&blake2b256(text.as_bytes())))
            .set("X-Stack-Small-Id", &stack.small_id.0.to_string())
            .send_string(&text)
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, r)) => panic!("{c}: {}", r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    node.stop().await;
}
