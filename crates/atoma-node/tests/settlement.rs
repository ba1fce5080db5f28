//! Settlement end to end in one process, on a tiny random model: a SamplingConsensus stack is
//! served, settled by its node on request (frozen, log on the DA store, ticket), attested by a
//! second node's duty (which fetches and checks the log), and claimed; every balance comes out
//! exact and the claimed units equal what the user was charged in the responses. A DA store
//! that hands the attestor other bytes gets the settlement disputed, not attested. The
//! attestor re-executes every record on its own engine.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoma_crypto::{Keypair, blake2b256};
use atoma_da::{BlobStore, DirStore};
use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{Architecture, Engine, EngineConfig, LoadOptions, LoadedModel};
use atoma_ledger::{
    Amount, ComputeUnits, Ledger, LedgerParams, NodeSmallId, SqliteLedger, StackRequest,
    StackSmallId,
};
use atoma_node::{Duties, EngineBackend, NodeParts, SettlementPolicy, bind, sync_blocking};
use atoma_state::meter::Meter;
use atoma_state::settlement::SettleState;
use common::{NodeSpec, addr};
use serde_json::{Value, json};

struct World {
    dir: tempfile::TempDir,
    ledger: Arc<SqliteLedger>,
    seller: (Keypair, NodeSmallId),
    attestor: (Keypair, NodeSmallId),
    user: Keypair,
    stack: StackSmallId,
}

/// Two nodes in one echelon with collateral, a SamplingConsensus task that is always attested
/// by one node, and a stack sold to the seller (the attestor asks a higher price).
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, task, mut nodes) = common::market(
        dir.path(),
        LedgerParams {
            attestation_probability_permille: 1000,
            attestation_nodes: 1,
            min_collateral: Amount(100),
            ..LedgerParams::default()
        },
        &[(1, 1_000), (3, 5_000)].map(|(secret, price)| NodeSpec {
            secret,
            price,
            collateral: 1_000,
        }),
    );
    let user = Keypair::from_secret([2; 32]);
    ledger.faucet(addr(&user), Amount(1_000_000)).unwrap();
    let stack = ledger
        .acquire_stack(
            addr(&user),
            &StackRequest {
                task_small_id: task,
                num_compute_units: ComputeUnits(900_000),
                price_per_one_million_compute_units: Amount(1_000),
            },
        )
        .unwrap();
    let attestor = nodes.pop().unwrap();
    let seller = nodes.pop().unwrap();
    assert_eq!(stack.selected_node_id, seller.1);
    World {
        dir,
        ledger,
        seller,
        attestor,
        user,
        stack: stack.small_id,
    }
}

fn fast_policy() -> SettlementPolicy {
    SettlementPolicy {
        tick: Duration::from_millis(20),
        idle: Duration::from_secs(3600),
        ..SettlementPolicy::default()
    }
}

/// Starts the seller's node; returns its URL and its state.
async fn start_seller(
    w: &World,
    da: Arc<dyn BlobStore>,
) -> (String, Meter, tokio::sync::oneshot::Sender<()>) {
    let gguf = w.dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&gguf, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let engine = Engine::start(lm, &EngineConfig::default()).unwrap();
    let state = Meter::open(&w.dir.path().join("seller.db"), vec![w.seller.1]).unwrap();
    let bound = bind(NodeParts {
        backend: Arc::new(EngineBackend::new(engine, "tiny", [7; 32])),
        ledger: w.ledger.clone(),
        state: state.clone(),
        keys: w.seller.0.clone(),
        bind: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_millis(20),
        da: Some(da),
        policy: fast_policy(),
        reexec: None,
    })
    .await
    .unwrap();
    let url = format!("http://{}", bound.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    (url, state, stop)
}

/// Sends `n` signed requests (every other one streamed); returns the units charged in them.
async fn serve_requests(w: &World, url: &str, n: u32) -> u64 {
    let (user, stack, url) = (w.user.clone(), w.stack, url.to_string());
    tokio::task::spawn_blocking(move || {
        let mut charged = 0;
        for i in 0..n {
            let stream = i % 2 == 1;
            let body =
                json!({"model": "tiny", "messages": [{"role": "user", "content": format!("q{i}")}],
                              "max_tokens": 5, "stream": stream,
                              "stream_options": {"include_usage": true}})
                .to_string();
            let text = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
                .set("X-Stack-Small-Id", &stack.0.to_string())
                .send_string(&body)
                .unwrap()
                .into_string()
                .unwrap();
            let usage: Value = if stream {
                let last = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .rfind(|d| *d != "[DONE]")
                    .unwrap()
                    .to_string();
                serde_json::from_str::<Value>(&last).unwrap()["usage"].clone()
            } else {
                serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
            };
            charged += usage["total_tokens"].as_u64().unwrap();
        }
        charged
    })
    .await
    .unwrap()
}

/// The attestor's duties, driven by hand: follow the ledger, then one round. It re-executes
/// on its own engine, loaded from the same tiny model file (same digest as the seller's).
fn attestor_duties(w: &World, da: Arc<dyn BlobStore>) -> (Duties, Meter) {
    let state = Meter::in_memory(vec![w.attestor.1]).unwrap();
    let lm = LoadedModel::load(
        &w.dir.path().join("tiny.gguf"),
        &LoadOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let engine = Engine::start(lm, &EngineConfig::default()).unwrap();
    let backend = EngineBackend::new(engine, "tiny", [7; 32]);
    let d = Duties {
        ledger: w.ledger.clone(),
        state: state.clone(),
        da,
        keys: w.attestor.0.clone(),
        policy: fast_policy(),
        reexec: Some(Arc::new(backend)),
    };
    (d, state)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_is_settled_attested_and_claimed_to_the_unit() {
    let w = world();
    let da: Arc<dyn BlobStore> = Arc::new(DirStore::open(w.dir.path().join("da")).unwrap());
    let (url, seller_state, stop) = start_seller(&w, da.clone()).await;
    let charged = serve_requests(&w, &url, 6).await;
    let before = |k: &Keypair| w.ledger.balance(addr(k)).unwrap().0;
    let (b_seller, b_attestor, b_user) =
        (before(&w.seller.0), before(&w.attestor.0), before(&w.user));

    seller_state.request_settlement(w.stack).unwrap();
    until("the ticket", || w.ledger.ticket(w.stack).unwrap().is_some()).await;
    // The stack is frozen: a new request is refused with 423.
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "late"}]}).to_string();
    let late = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("X-Signature", &w.user.sign(&blake2b256(body.as_bytes())))
        .set("X-Stack-Small-Id", &w.stack.0.to_string())
        .send_string(&body);
    assert!(matches!(late, Err(ureq::Error::Status(423, _))), "{late:?}");

    let ticket = w.ledger.ticket(w.stack).unwrap().unwrap();
    assert_eq!(ticket.requested_attestation_nodes, vec![w.attestor.1]);
    assert_eq!(ticket.num_claimed_compute_units, ComputeUnits(charged));
    assert_eq!(ticket.commitment.leaf_count, 6);
    let (duties, att_state) = attestor_duties(&w, da.clone());
    sync_blocking(w.ledger.as_ref(), &att_state).unwrap();
    tokio::task::spawn_blocking(move || duties.round())
        .await
        .unwrap();
    let job = &att_state.attestation_jobs(true).unwrap()[0];
    assert_eq!(job.state, "attested", "{:?}", job.detail);

    until("the claim", || {
        seller_state.settlement(w.stack).unwrap().state == SettleState::Claimed
    })
    .await;
    let fee = 900_000u64.min(charged) * 1_000 * 1_200 / 1_000_000_000;
    let pool = charged * 1_000 * 12 / 1_000_000_000;
    assert_eq!(
        w.ledger.balance(addr(&w.seller.0)).unwrap().0,
        b_seller + fee
    );
    assert_eq!(
        w.ledger.balance(addr(&w.attestor.0)).unwrap().0,
        b_attestor + pool
    );
    let escrow = 900_000 * 1_000 * 1_212 / 1_000_000_000;
    assert_eq!(
        w.ledger.balance(addr(&w.user)).unwrap().0,
        b_user + escrow - fee - pool
    );
    assert!(w.ledger.totals().unwrap().is_conserved());
    assert_eq!(
        seller_state.settlement(w.stack).unwrap().node_fee,
        Some(fee)
    );

    // The operator's view, from loopback.
    let status: Value = ureq::get(&format!("{url}/operator/status"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(status["stacks"][0]["state"], "claimed", "{status}");
    assert_eq!(status["nodes"][0]["record"]["settled_on_time"], 1);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_bytes_from_the_store_get_the_settlement_disputed() {
    let w = world();
    let dir_store: Arc<dyn BlobStore> = Arc::new(DirStore::open(w.dir.path().join("da")).unwrap());
    let (url, seller_state, stop) = start_seller(&w, dir_store.clone()).await;
    serve_requests(&w, &url, 2).await;
    seller_state.request_settlement(w.stack).unwrap();
    until("the ticket", || w.ledger.ticket(w.stack).unwrap().is_some()).await;
    // The attestor reads the blob file tampered on disk, through the real store's hash check.
    let t = w.ledger.ticket(w.stack).unwrap().unwrap();
    let path = w.dir.path().join("da").join(&t.commitment.blob_id);
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, t.commitment.blob_size);
    bytes[40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (duties, att_state) = attestor_duties(&w, dir_store.clone());
    sync_blocking(w.ledger.as_ref(), &att_state).unwrap();
    tokio::task::spawn_blocking(move || duties.round())
        .await
        .unwrap();
    let job = &att_state.attestation_jobs(true).unwrap()[0];
    assert_eq!(job.state, "disputed");
    assert!(
        job.detail.as_deref().unwrap_or("").contains("hash"),
        "{job:?}"
    );
    // With only the seller and the attestor in the echelon nobody can be the oracle: the stack
    // is void at once, its owner refunded, nobody slashed.
    let d = w.ledger.dispute(w.stack).unwrap().unwrap();
    assert_eq!(d.claim.record, None, "the log itself is at fault");
    assert_eq!(d.outcome, Some(atoma_ledger::DisputeOutcome::NoOracle));
    assert!(w.ledger.stack(w.stack).unwrap().is_claimed);
    assert!(w.ledger.totals().unwrap().is_conserved());
    let _ = stop.send(());
}
