//! SIGKILL a process using the Sui backend (the `atoma` binary, `[ledger] backend = "sui"`,
//! talking to the Sui test double over gRPC) in the middle of ingesting events and in the
//! middle of a transaction, then run it again: every chain event is in its index exactly once,
//! no transaction ran twice, and the books are exact.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atoma_crypto::Keypair;
use atoma_ledger::{Address, Amount, Ledger, SqliteLedger};
use atoma_sui::Flavor;
use atoma_sui::fake::{FakeBacked, FakeSui, actor, default_ids};

fn fake() -> Arc<FakeSui> {
    Arc::new(FakeSui::start(default_ids(actor(9)), SqliteLedger::in_memory().unwrap(), 0).unwrap())
}

/// A home whose `ledger.toml` reaches `fake`, with its event index at `HOME/index.db`.
fn config(home: &Path, fake: &FakeSui) -> PathBuf {
    let ids = fake.ids();
    let cfg = format!(
        "[ledger]\nbackend = \"sui\"\nrpc_url = \"{}\"\npackage_id = \"{}\"\natoma_db = \"{}\"\n\
         usdc_type = \"{}\"\ncontract = \"extended\"\nindex_path = \"{}\"\n",
        fake.url(),
        ids.package,
        ids.db,
        ids.usdc_type,
        home.join("index.db").display()
    );
    let p = home.join("ledger.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn killed_mid_ingestion_the_index_resumes_with_every_event_once() {
    const EVENTS: u64 = 40_000;
    let home = tempfile::tempdir().unwrap();
    let f = fake();
    f.register_nodes_directly(actor(1), EVENTS as usize)
        .unwrap();
    let cfg = config(home.path(), &f);
    let cfg = cfg.to_str().unwrap();
    let mut kills = 0;
    // Kill while pages are being applied (some, not all, events indexed), a few times.
    for _ in 0..3 {
        let mut child = common::atoma(
            home.path(),
            &["db", "--config", cfg, "events", "--limit", "1"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let before = common::indexed(&home.path().join("index.db")).0;
        let t = Instant::now();
        loop {
            let n = common::indexed(&home.path().join("index.db")).0;
            if n > before && n < EVENTS {
                common::kill(&mut child);
                kills += 1;
                break;
            }
            if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.wait();
    }
    assert!(kills >= 1, "no kill landed mid-ingestion");
    let out = common::atoma(
        home.path(),
        &[
            "db",
            "--config",
            cfg,
            "events",
            "--after",
            &(EVENTS - 1).to_string(),
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        common::indexed(&home.path().join("index.db")),
        (EVENTS, 1, EVENTS),
        "every event once, dense"
    );
    let last: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(last["seq"], EVENTS);
}

#[test]
fn killed_mid_transaction_nothing_runs_twice_and_the_books_are_exact() {
    let home = tempfile::tempdir().unwrap();
    let f = fake();
    // A market: actor 9 (admin) makes a task, actor 1's node serves it.
    {
        let admin = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
        let task = admin
            .create_task(
                actor(9),
                &atoma_ledger::NewTask {
                    role: atoma_ledger::TaskRole::ChatCompletion,
                    model_name: Some("m".into()),
                    security_level: atoma_ledger::SecurityLevel::NoSecurity,
                    minimum_reputation_score: 0,
                    is_public: true,
                    minimum_collateral: Amount(0),
                },
            )
            .unwrap();
        let n = admin.register_node(actor(1)).unwrap().small_id;
        admin
            .subscribe_node_to_task(actor(1), n, task.small_id, Amount(1_000))
            .unwrap();
    }
    let user = Keypair::from_secret([77; 32]);
    atoma_crypto::write_keystore(
        &home.path().join("keys").join("user.keystore"),
        std::slice::from_ref(&user),
    )
    .unwrap();
    let who = Address(user.address());
    const FUNDS: u64 = 1_000_000;
    f.faucet(who, Amount(FUNDS)).unwrap();
    let cfg = config(home.path(), &f);
    let buy = |home: &Path| {
        common::atoma(
            home,
            &[
                "db",
                "--config",
                cfg.to_str().unwrap(),
                "acquire-stack",
                "--key",
                "user",
                "--task",
                "1",
                "--units",
                "100000",
                "--price",
                "2000",
            ],
        )
    };
    let books_exact = |f: &FakeSui| -> usize {
        f.with_ledger(|l| {
            let stacks: Vec<_> = (1..=10)
                .filter_map(|i| l.stack(atoma_ledger::StackSmallId(i)).ok())
                .filter(|s| s.owner == who)
                .collect();
            let escrow: u64 = stacks.iter().map(|s| s.escrowed.0).sum();
            assert_eq!(
                l.balance(who).unwrap().0 + escrow,
                FUNDS,
                "the user's money is all accounted"
            );
            assert!(l.totals().unwrap().is_conserved());
            stacks.len()
        })
    };

    // The chain holds the transaction for a while; the client is killed while it waits.
    f.faults().execute_delay_ms.store(1_500, Ordering::SeqCst);
    let mut child = buy(home.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while f.faults().executes_received.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the purchase never reached the chain"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the client ended before sending"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    common::kill(&mut child);
    std::thread::sleep(Duration::from_millis(2_000));
    f.faults().execute_delay_ms.store(0, Ordering::SeqCst);
    let after_kill = books_exact(&f);
    assert!(after_kill <= 1, "a killed purchase ran at most once");

    // Run again: one more purchase, executed once, books still exact.
    let out = buy(home.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(books_exact(&f), after_kill + 1);
}
