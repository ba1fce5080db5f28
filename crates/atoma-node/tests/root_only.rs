//! Settlements on a ledger that records only the Merkle root (the deployed Sui contract's
//! `try_settle_stack`): the attestor gets the log's location from the seller's signed
//! commitment at `GET /v1/settlements/{stack}` and checks it against the ledger's root.
//!
//! A tiny model serves two requests on a SamplingConsensus stack; the seller stores its log and
//! records its full commitment, and the ticket on the (embedded) ledger holds the root alone.
//! Then: found through `[settlement] peers` and through the ledger's public URL; no URL, an
//! unreachable seller, a body signed by someone else and a tampered body are retried with the
//! reason named and never disputed; a body the seller signed with another root is disputed;
//! an honest seller is attested.

mod common;

use std::sync::Arc;
use std::time::Duration;

use atoma_crypto::{Keypair, blake2b256, merkle};
use atoma_da::{BlobStore, DirStore};
use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{Architecture, Engine, EngineConfig, LoadOptions, LoadedModel};
use atoma_ledger::{
    Amount, ComputeUnits, Hash32, Ledger, NodeSmallId, SqliteLedger, StackCommitment, StackRequest,
    StackSmallId,
};
use atoma_node::duties::{Claimed, DutyError, Located};
use atoma_node::{Duties, EngineBackend, NodeParts, SettlementPolicy, bind, sync_blocking};
use atoma_state::log::StackLog;
use atoma_state::meter::Meter;
use atoma_state::published::PublishedCommitment;
use common::{NodeSpec, addr};
use serde_json::{Value, json};

struct World {
    _dir: tempfile::TempDir,
    ledger: Arc<SqliteLedger>,
    da: Arc<dyn BlobStore>,
    seller: (Keypair, NodeSmallId),
    attestor: (Keypair, NodeSmallId),
    stack: StackSmallId,
    /// What the seller committed to (the ticket holds its root alone).
    full: StackCommitment,
    claimed: u64,
    seller_url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl World {
    fn duties(&self, peers: &[(u64, &str)]) -> (Duties, Meter) {
        let state = Meter::in_memory(vec![self.attestor.1]).unwrap();
        let d = Duties {
            ledger: self.ledger.clone(),
            state: state.clone(),
            da: self.da.clone(),
            keys: self.attestor.0.clone(),
            policy: SettlementPolicy {
                peers: peers.iter().map(|(n, u)| (*n, u.to_string())).collect(),
                peer_timeout: Duration::from_secs(2),
                ..SettlementPolicy::default()
            },
            reexec: None,
        };
        sync_blocking(self.ledger.as_ref(), &state).unwrap();
        (d, state)
    }

    fn locate(&self, peers: &[(u64, &str)]) -> Result<Located, DutyError> {
        let ticket = self.ledger.ticket(self.stack).unwrap().unwrap();
        let (d, _) = self.duties(peers);
        d.locate(&Claimed {
            stack: self.stack,
            seller: self.seller.1,
            claimed_units: ticket.num_claimed_compute_units.0,
            commitment: &ticket.commitment,
        })
    }
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, task, nodes) = common::market(
        dir.path(),
        common::attest_all(5),
        &[
            NodeSpec {
                secret: 1,
                price: 1_000_000,
                collateral: 0,
            },
            NodeSpec {
                secret: 3,
                price: 5_000_000,
                collateral: 0,
            },
        ],
    );
    let user = Keypair::from_secret([2; 32]);
    ledger.faucet(addr(&user), Amount(10_000_000)).unwrap();
    let stack = ledger
        .acquire_stack(
            addr(&user),
            &StackRequest {
                task_small_id: task,
                num_compute_units: ComputeUnits(100_000),
                price_per_one_million_compute_units: Amount(1_000_000),
            },
        )
        .unwrap();
    assert_eq!(stack.selected_node_id, nodes[0].1);

    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&model, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let backend = EngineBackend::new(
        Engine::start(lm, &EngineConfig::default()).unwrap(),
        "tiny",
        [7; 32],
    );
    let da: Arc<dyn BlobStore> = Arc::new(DirStore::open(dir.path().join("da")).unwrap());
    let seller_state = Meter::open(&dir.path().join("seller.db"), vec![nodes[0].1]).unwrap();
    let bound = bind(NodeParts {
        backend: Arc::new(backend),
        ledger: ledger.clone(),
        state: seller_state.clone(),
        keys: nodes[0].0.clone(),
        bind: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_millis(20),
        da: None,
        policy: SettlementPolicy::default(),
        reexec: None,
    })
    .await
    .unwrap();
    let url = format!("http://{}", bound.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    let (u, sid, base) = (user.clone(), stack.small_id, url.clone());
    tokio::task::spawn_blocking(move || {
        // Not settled yet: the seller says so by name.
        let e = ureq::get(&format!("{base}/v1/settlements/{}", sid.0))
            .call()
            .unwrap_err();
        let ureq::Error::Status(404, r) = e else {
            panic!("{e}")
        };
        assert!(r.into_string().unwrap().contains("not settled yet"));
        for (path, code, says) in [
            ("abc", 400, "not a stack small id"),
            ("999", 404, "did not sell"),
        ] {
            let e = ureq::get(&format!("{base}/v1/settlements/{path}"))
                .call()
                .unwrap_err();
            let ureq::Error::Status(c, r) = e else {
                panic!("{e}")
            };
            let text = r.into_string().unwrap();
            assert_eq!(c, code, "{text}");
            assert!(text.contains(says), "{text}");
        }
        for i in 0..2 {
            let body = json!({"model": "tiny", "max_tokens": 4, "seed": i,
                "messages": [{"role": "user", "content": format!("q{i}")}]})
            .to_string();
            ureq::post(&format!("{base}/v1/chat/completions"))
                .set("X-Signature", &u.sign(&blake2b256(body.as_bytes())))
                .set("X-Stack-Small-Id", &sid.0.to_string())
                .send_string(&body)
                .unwrap();
        }
    })
    .await
    .unwrap();

    // The seller's settlement, the way a node on the deployed contract does it.
    assert!(seller_state.freeze(stack.small_id).unwrap());
    let log = seller_state.frozen_log(stack.small_id).unwrap();
    let blob = StackLog::assemble(stack.small_id.0, nodes[0].1.0, &log.records);
    let stored = da.put(&blob).unwrap();
    let full = StackCommitment {
        merkle_root: Hash32(merkle::root(&log.leaves)),
        leaf_count: log.leaves.len() as u64,
        blob_id: stored.blob_id,
        blob_hash: Hash32(stored.content_hash),
        blob_size: stored.size,
    };
    seller_state
        .record_log_put(stack.small_id, &full, log.units)
        .unwrap();
    let ticket = ledger
        .try_settle_stack(
            addr(&nodes[0].0),
            nodes[0].1,
            stack.small_id,
            ComputeUnits(log.units),
            &StackCommitment::root_only(full.merkle_root),
        )
        .unwrap();
    assert!(ticket.commitment.is_root_only());
    assert_eq!(ticket.requested_attestation_nodes, vec![nodes[1].1]);
    World {
        _dir: dir,
        ledger,
        da,
        seller: nodes[0].clone(),
        attestor: nodes[1].clone(),
        stack: stack.small_id,
        full,
        claimed: log.units,
        seller_url: url,
        _stop: stop,
    }
}

/// A server that answers every GET with `body`.
async fn serve_json(body: Value) -> String {
    let app = axum::Router::new().fallback(move || {
        let b = body.clone();
        async move { axum::Json(b) }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

fn retried(r: Result<Located, DutyError>, says: &str) {
    match r {
        Err(e @ DutyError::NoLogLocation { .. }) => {
            assert!(e.to_string().contains(says), "`{e}` should say `{says}`")
        }
        other => panic!("expected a retry saying `{says}`, got {other:?}"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seller_publishes_where_its_log_is_and_lies_are_told_from_faults() {
    let w = Arc::new(world().await);
    let seller = w.seller.1.0;
    let found = Located::Found(w.full.clone());

    // Through `[settlement] peers`.
    let (ww, url) = (w.clone(), w.seller_url.clone());
    assert_eq!(
        blocking(move || ww.locate(&[(seller, &url)]))
            .await
            .unwrap(),
        found
    );
    // No URL anywhere.
    let ww = w.clone();
    retried(
        blocking(move || ww.locate(&[])).await,
        "add it to `[settlement] peers`",
    );
    // Through the public URL on the ledger.
    w.ledger
        .set_node_public_url(addr(&w.seller.0), w.seller.1, &format!("{}/", w.seller_url))
        .unwrap();
    let ww = w.clone();
    assert_eq!(blocking(move || ww.locate(&[])).await.unwrap(), found);
    // The peers table comes first: an unreachable address is retried.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let ww = w.clone();
    retried(
        blocking(move || ww.locate(&[(seller, &dead)])).await,
        "cannot be reached",
    );
    // Another node's answer (here: the right body, signed by the attestor's key).
    let published = PublishedCommitment::new(w.stack, w.seller.1, w.claimed, w.full.clone());
    let foreign = serve_json(published.to_signed_json(&w.attestor.0)).await;
    let ww = w.clone();
    retried(
        blocking(move || ww.locate(&[(seller, &foreign)])).await,
        "not by node",
    );
    // The seller's body changed on the way.
    let mut tampered = published.to_signed_json(&w.seller.0);
    tampered["blob_id"] = json!("elsewhere");
    let tampered = serve_json(tampered).await;
    let ww = w.clone();
    retried(
        blocking(move || ww.locate(&[(seller, &tampered)])).await,
        "response_hash",
    );
    // Another stack's commitment, signed by the seller: its own word, so a fault.
    let mut other = published.clone();
    other.stack_small_id += 1;
    let other = serve_json(other.to_signed_json(&w.seller.0)).await;
    let ww = w.clone();
    let r = blocking(move || ww.locate(&[(seller, &other)]))
        .await
        .unwrap();
    assert!(
        matches!(&r, Located::Contradicts(m) if m.contains("stack 2")),
        "{r:?}"
    );
    // Nothing was disputed or attested by looking.
    let t = w.ledger.ticket(w.stack).unwrap().unwrap();
    assert!(!t.is_in_dispute && t.already_attested_nodes.is_empty());

    // The attestor's round: an honest seller is attested.
    let (d, state) = w.duties(&[(seller, &w.seller_url)]);
    blocking(move || d.round()).await;
    let t = w.ledger.ticket(w.stack).unwrap().unwrap();
    assert_eq!(t.already_attested_nodes, vec![w.attestor.1]);
    let job = state.attestation_jobs(true).unwrap().remove(0);
    assert_eq!(job.state, "attested", "{job:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seller_that_signs_another_root_is_disputed_and_an_unreachable_one_is_not() {
    let w = Arc::new(world().await);
    let seller = w.seller.1.0;
    // Unreachable: rounds go by, no dispute, the job waits.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (d, state) = w.duties(&[(seller, &dead)]);
    for _ in 0..2 {
        let d = d.clone();
        blocking(move || d.round()).await;
    }
    assert!(!w.ledger.ticket(w.stack).unwrap().unwrap().is_in_dispute);
    assert_eq!(
        state.attestation_jobs(false).unwrap().len(),
        1,
        "still pending"
    );

    // The seller signs a commitment to another root than the one on the ledger.
    let lie = StackCommitment {
        merkle_root: Hash32([0xab; 32]),
        ..w.full.clone()
    };
    let liar = serve_json(
        PublishedCommitment::new(w.stack, w.seller.1, w.claimed, lie).to_signed_json(&w.seller.0),
    )
    .await;
    let (d, state) = w.duties(&[(seller, &liar)]);
    blocking(move || d.round()).await;
    let dispute = w.ledger.dispute(w.stack).unwrap().expect("disputed");
    assert_eq!(dispute.attestor, w.attestor.1);
    let job = state.attestation_jobs(true).unwrap().remove(0);
    assert_eq!(job.state, "disputed", "{job:?}");
    assert!(
        job.detail
            .as_deref()
            .unwrap_or("")
            .contains("published root"),
        "{job:?}"
    );
}
