//! Ledger operations per second on one SQLite file shared by several processes, as a devnet's
//! nodes and users share it: `cargo bench -p atoma-ledger --bench ledger_ops`.
//!
//! The benchmark re-runs its own executable as the worker processes. Each worker repeats a mix
//! of what the network does: writes (a faucet, a stack purchase, a settlement) and reads (a
//! balance, a ticket, the epoch); the parent prints operations per second for 1, 2,
//! 4 and 8 processes, and checks that the books balance afterwards.

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use atoma_ledger::*;

const OPS_PER_ROUND: u64 = 5;

fn addr(n: u64) -> Address {
    let mut a = [0u8; 32];
    a[24..].copy_from_slice(&n.to_be_bytes());
    Address(a)
}

fn setup(path: &Path, workers: u64) {
    let l = SqliteLedger::open(path).unwrap();
    let task = l
        .create_task(
            addr(0),
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
    // One node per worker, so that each worker settles its own stacks.
    for w in 0..workers {
        let n = l.register_node(addr(1_000 + w)).unwrap().small_id;
        l.subscribe_node_to_task(addr(1_000 + w), n, task, Amount(1_000))
            .unwrap();
    }
}

/// One worker: `rounds` rounds of the operation mix on the node `w + 1`.
fn worker(path: &Path, w: u64, rounds: u64) {
    let l = SqliteLedger::open(path).unwrap();
    let user = addr(10_000 + w);
    let node_owner = addr(1_000 + w);
    let node = NodeSmallId(w + 1);
    for i in 0..rounds {
        l.faucet(user, Amount(1_000_000)).unwrap();
        // Any node may be sampled; the worker settles the stacks sold to its own node and
        // reads the others' tickets.
        let s = l
            .acquire_stack(
                user,
                &StackRequest {
                    task_small_id: TaskSmallId(1),
                    num_compute_units: ComputeUnits(10_000),
                    price_per_one_million_compute_units: Amount(1_000),
                },
            )
            .unwrap();
        l.balance(user).unwrap();
        if s.selected_node_id == node {
            let c = StackCommitment {
                merkle_root: Hash32([i as u8; 32]),
                leaf_count: 1,
                blob_id: format!("b{w}-{i}"),
                blob_hash: Hash32([1; 32]),
                blob_size: 1,
            };
            l.try_settle_stack(node_owner, node, s.small_id, ComputeUnits(5_000), &c)
                .unwrap();
        } else {
            l.ticket(s.small_id).unwrap();
        }
        l.epoch().unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--worker") {
        let path = Path::new(&args[pos + 1]);
        let w: u64 = args[pos + 2].parse().unwrap();
        let rounds: u64 = args[pos + 3].parse().unwrap();
        worker(path, w, rounds);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let rounds = 300u64;
    println!(
        "processes  ops/s   (each op one transaction or read; {OPS_PER_ROUND} per round, {rounds} rounds per process)"
    );
    for procs in [1u64, 2, 4, 8] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        setup(&path, procs);
        let t = Instant::now();
        let children: Vec<_> = (0..procs)
            .map(|w| {
                Command::new(&exe)
                    .args([
                        "--worker",
                        path.to_str().unwrap(),
                        &w.to_string(),
                        &rounds.to_string(),
                    ])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let secs = t.elapsed().as_secs_f64();
        let ops = procs * rounds * OPS_PER_ROUND;
        let l = SqliteLedger::open(&path).unwrap();
        let totals = l.totals().unwrap();
        assert!(totals.is_conserved(), "{totals:?}");
        println!(
            "{procs:>9}  {:>6.0}   ({ops} ops in {secs:.2} s; books balance)",
            ops as f64 / secs
        );
    }
}
