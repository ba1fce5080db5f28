//! SIGKILL `atoma node run` on the Sui backend (the node talks gRPC to the Sui test double):
//! once while it ingests 40,000 chain events at start, once while its settlement transaction
//! is held by the chain. After each restart every chain event is in the node's index exactly
//! once (dense sequence numbers, the node's own cursor at the end), the settlement ticket
//! exists once, the node finishes the settlement it started, and the money on the books is
//! conserved.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atoma_crypto::{Keypair, blake2b256, read_keystore};
use atoma_engine::Architecture;
use atoma_ledger::{
    Address, Amount, ComputeUnits, EventCursor, Ledger, NewTask, SecurityLevel, SqliteLedger,
    StackRequest, StackSmallId, TaskRole,
};
use atoma_state::meter::Meter;
use atoma_sui::Flavor;
use atoma_sui::fake::{FakeBacked, FakeSui, actor, default_ids};
use atoma_sui::keys::Signers;

const EVENTS: usize = 40_000;

fn key(home: &Path, name: &str) -> Keypair {
    read_keystore(&home.join(format!("keys/{name}.keystore")))
        .unwrap()
        .remove(0)
}

fn addr(k: &Keypair) -> Address {
    Address(k.address())
}

/// Points the home's node.toml at the test double, with the node's event index in the home.
fn use_fake(home: &Path, fake: &FakeSui, node: u64) {
    let path = home.join("node.toml");
    let mut cfg: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let ids = fake.ids();
    let ledger: toml::Table = toml::from_str(&format!(
        "backend = \"sui\"\nrpc_url = \"{}\"\npackage_id = \"{}\"\natoma_db = \"{}\"\n\
         usdc_type = \"{}\"\ncontract = \"extended\"\nindex_path = \"{}\"\npoll_interval_ms = 100\n",
        fake.url(),
        ids.package,
        ids.db,
        ids.usdc_type,
        home.join("sui-index.db").display()
    ))
    .unwrap();
    cfg.insert("ledger".into(), ledger.into());
    cfg["node"]["small_ids"] = toml::Value::Array(vec![toml::Value::Integer(node as i64)]);
    cfg["settlement"]["tick_ms"] = 50.into();
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
}

fn spawn_node(home: &Path, n: usize) -> Child {
    common::atoma(
        home,
        &[
            "node",
            "run",
            "--config",
            home.join("node.toml").to_str().unwrap(),
        ],
    )
    .stdin(Stdio::null())
    .stderr(std::fs::File::create(home.join(format!("node-{n}.log"))).unwrap())
    .spawn()
    .unwrap()
}

fn wait_healthy(home: &Path, url: &str, child: &mut Child) {
    let t = Instant::now();
    while ureq::get(&format!("{url}/health")).call().is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the node exited: {}",
            std::fs::read_to_string(home.join("node-1.log")).unwrap_or_default()
        );
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the node did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Events named `name` on the books (read page by page: a read returns at most 10,000).
fn count(l: &SqliteLedger, name: &str) -> usize {
    let (mut n, mut after) = (0, EventCursor(0));
    loop {
        let page = l.events_after(after, 10_000).unwrap();
        let Some(last) = page.last() else {
            return n;
        };
        after = EventCursor(last.seq);
        n += page.iter().filter(|e| e.event.name() == name).count();
    }
}

#[test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
fn a_node_killed_mid_ingestion_and_mid_settlement_resumes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Llama, 4096);
    let (node_key, user_key) = (key(home, "node"), key(home, "user"));

    // The chain: a task for the tiny model, the node, a stack for the user; then 40,000 more
    // events for the node to ingest when it starts.
    let fake = Arc::new(
        FakeSui::start(default_ids(actor(9)), SqliteLedger::in_memory().unwrap(), 0).unwrap(),
    );
    let mut signers = Signers::default();
    for k in [&node_key, &user_key] {
        signers.insert(k);
    }
    signers.insert(&Keypair::from_secret([9; 32]));
    let admin = FakeBacked::with_signers(fake.clone(), Flavor::Extended, None, signers).unwrap();
    let task = admin
        .create_task(
            actor(9),
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some("tiny".into()),
                security_level: SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: Amount(0),
            },
        )
        .unwrap()
        .small_id;
    let node = admin.register_node(addr(&node_key)).unwrap().small_id;
    admin
        .add_node_to_model(addr(&node_key), node, "tiny", 1)
        .unwrap();
    admin
        .subscribe_node_to_task(addr(&node_key), node, task, Amount(1_000_000))
        .unwrap();
    fake.faucet(addr(&user_key), Amount(1_000_000)).unwrap();
    let stack = admin
        .acquire_stack(
            addr(&user_key),
            &StackRequest {
                task_small_id: task,
                num_compute_units: ComputeUnits(10_000),
                price_per_one_million_compute_units: Amount(1_000_000),
            },
        )
        .unwrap();
    assert_eq!(stack.selected_node_id, node);
    fake.register_nodes_directly(actor(3), EVENTS).unwrap();
    let on_chain = fake.event_count() as u64;
    assert!(on_chain > EVENTS as u64);
    use_fake(home, &fake, node.0);

    // 1. Killed while ingesting (part of the events indexed), a few times.
    let mut kills = 0;
    for n in 1..=3 {
        let mut child = spawn_node(home, n);
        let before = common::indexed(&home.join("sui-index.db")).0;
        let t = Instant::now();
        loop {
            let i = common::indexed(&home.join("sui-index.db")).0;
            if i > before && i < on_chain {
                common::kill(&mut child);
                kills += 1;
                break;
            }
            if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            common::kill(&mut child);
        }
    }
    assert!(kills >= 1, "no kill landed mid-ingestion");
    let mut child = spawn_node(home, 9);
    wait_healthy(home, &url, &mut child);
    let t = Instant::now();
    while common::indexed(&home.join("sui-index.db")) != (on_chain, 1, on_chain) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "index {:?} of {on_chain}",
            common::indexed(&home.join("sui-index.db"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = Meter::open(&home.join("state.db"), vec![node]).unwrap();
    let t = Instant::now();
    while state.cursor().unwrap() != EventCursor(on_chain) {
        assert!(t.elapsed() < Duration::from_secs(60), "the node's cursor");
        std::thread::sleep(Duration::from_millis(20));
    }

    // 2. Serve the stack, ask for its settlement, kill the node while the chain holds its
    // settlement transaction.
    let mut charged = 0;
    for i in 0..3 {
        let body = serde_json::json!({"model": "tiny", "max_tokens": 5, "nonce": i,
            "messages": [{"role": "user", "content": "hello"}]})
        .to_string();
        let v: serde_json::Value = ureq::post(&format!("{url}/v1/chat/completions"))
            .set("X-Signature", &user_key.sign(&blake2b256(body.as_bytes())))
            .set("X-Stack-Small-Id", &stack.small_id.0.to_string())
            .send_string(&body)
            .unwrap()
            .into_json()
            .unwrap();
        charged += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    let sent = fake.faults().executes_received.load(Ordering::SeqCst);
    fake.faults()
        .execute_delay_ms
        .store(1_500, Ordering::SeqCst);
    state.request_settlement(stack.small_id).unwrap();
    let t = Instant::now();
    while fake.faults().executes_received.load(Ordering::SeqCst) == sent {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the settlement never reached the chain"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    common::kill(&mut child);
    std::thread::sleep(Duration::from_millis(2_000));
    fake.faults().execute_delay_ms.store(0, Ordering::SeqCst);
    let tickets = fake.with_ledger(|l| count(l, "StackTrySettleEvent"));
    assert!(tickets <= 1, "the killed settlement ran at most once");
    println!(
        "{kills} kills mid-ingestion of {on_chain} events; killed mid-settlement with the \
         transaction at the chain ({tickets} ticket after the kill)"
    );

    // Restarted, the node finishes it: one ticket, claimed after the window, for exactly the
    // units the user was charged.
    let mut child = spawn_node(home, 10);
    wait_healthy(home, &url, &mut child);
    let t = Instant::now();
    loop {
        let s = state.settlement(stack.small_id).unwrap();
        if s.state.as_str() == "claimed" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stuck in {}",
            s.state.as_str()
        );
        // The dispute window passes as the test says.
        fake.advance_epoch().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    common::kill(&mut child);
    fake.with_ledger(|l| {
        assert_eq!(count(l, "StackTrySettleEvent"), 1, "one ticket");
        let t = l.ticket(StackSmallId(stack.small_id.0)).unwrap().unwrap();
        assert_eq!(t.num_claimed_compute_units, ComputeUnits(charged));
        assert!(t.is_claimed);
        assert!(l.totals().unwrap().is_conserved());
    });
}
