//! SIGKILL the node after each settlement step and restart it: the settlement completes exactly
//! once (one ticket, one claim), the claimed units are what the user was charged, and every
//! balance is exact. The node pauses after each recorded step (`settlement.step_pause_ms`), so
//! the kill lands between the step's record and the next step. Two more cases kill it after a
//! side effect that it had not recorded yet (the ticket, the claim), done here on its behalf:
//! on restart it must find them on the ledger and only record them.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use atoma_crypto::{blake2b256, read_keystore};
use atoma_engine::Architecture;
use atoma_ledger::{
    Amount, ComputeUnits, EventCursor, Hash32, Ledger, SqliteLedger, StackCommitment, StackRequest,
    StackSmallId,
};

fn start_node(home: &Path, url: &str, pause_ms: u64) -> Child {
    let child = common::atoma(
        home,
        &[
            "node",
            "run",
            "--config",
            home.join("node.toml").to_str().unwrap(),
        ],
    )
    .env("ATOMA__SETTLEMENT__STEP_PAUSE_MS", pause_ms.to_string())
    .env("ATOMA__SETTLEMENT__TICK_MS", "50")
    .stdin(Stdio::null())
    .stderr(std::fs::File::create(home.join(format!("node-{pause_ms}.log"))).unwrap())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while ureq::get(&format!("{url}/health")).call().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the node did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The stack's settlement state in the node's state file.
fn state_of(home: &Path, stack: StackSmallId) -> String {
    let c = rusqlite::Connection::open(home.join("state.db")).unwrap();
    c.query_row(
        "SELECT COALESCE(settle_state, 'open') FROM stacks WHERE small_id = ?1",
        [stack.0 as i64],
        |r| r.get(0),
    )
    .unwrap_or_else(|_| "unknown".into())
}

fn wait_state(home: &Path, stack: StackSmallId, want: &str) {
    let t = Instant::now();
    while state_of(home, stack) != want {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "stuck in `{}` waiting for `{want}`",
            state_of(home, stack)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill(mut node: Child) {
    node.kill().unwrap(); // SIGKILL
    node.wait().unwrap();
}

/// Sends a few signed requests on `stack`; returns the units charged.
fn serve(home: &Path, url: &str, stack: StackSmallId) -> u64 {
    let user = read_keystore(&home.join("keys/user.keystore"))
        .unwrap()
        .remove(0);
    (0..4)
        .map(|i| {
            let body = serde_json::json!({"model": "tiny", "max_tokens": 6, "nonce": i,
                "messages": [{"role": "user", "content": "hello"}]})
            .to_string();
            let v: serde_json::Value = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
                .set("X-Stack-Small-Id", &stack.0.to_string())
                .send_string(&body)
                .unwrap()
                .into_json()
                .unwrap();
            v["usage"]["total_tokens"].as_u64().unwrap()
        })
        .sum()
}

fn count(l: &SqliteLedger, name: &str) -> usize {
    l.events_after(EventCursor(0), 10_000)
        .unwrap()
        .iter()
        .filter(|e| e.event.name() == name)
        .count()
}

/// What to do between the kill and the restart.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// Kill once the node has recorded this step.
    After(&'static str),
    /// Kill after `log_put`, then open the ticket on the node's behalf (as if the node had died
    /// between the ledger call and its record).
    TicketUnrecorded,
    /// Kill after `submitted`, then claim on the node's behalf.
    ClaimUnrecorded,
}

fn run_case(case: Case) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Llama, 4096);
    let ledger = SqliteLedger::open(&home.join("ledger.db")).unwrap();
    // A stack at one base unit per compute unit, so that every unit shows in the balances.
    let up_stack = ledger.stack(StackSmallId(1)).unwrap();
    let stack = ledger
        .acquire_stack(
            up_stack.owner,
            &StackRequest {
                task_small_id: up_stack.task_small_id,
                num_compute_units: ComputeUnits(10_000),
                price_per_one_million_compute_units: Amount(1_000_000),
            },
        )
        .unwrap();
    let id = stack.small_id;
    let node_owner = ledger.node(stack.selected_node_id).unwrap().owner;
    let (user_before, node_before) = (
        ledger.balance(stack.owner).unwrap().0,
        ledger.balance(node_owner).unwrap().0,
    );

    let node = start_node(home, &url, 2_000);
    let charged = serve(home, &url, id);
    let out = common::atoma(
        home,
        &[
            "node",
            "settle",
            "--stack",
            &id.0.to_string(),
            "--config",
            home.join("node.toml").to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let step = match case {
        Case::After(s) => s,
        Case::TicketUnrecorded => "log_put",
        Case::ClaimUnrecorded => "submitted",
    };
    wait_state(home, id, step);
    kill(node);
    assert_eq!(
        state_of(home, id),
        step,
        "{case:?}: the kill landed in the pause"
    );

    match case {
        Case::TicketUnrecorded => {
            let c = rusqlite::Connection::open(home.join("state.db")).unwrap();
            let (root, leaves, blob_id, hash, size, units): (
                Vec<u8>,
                i64,
                String,
                Vec<u8>,
                i64,
                i64,
            ) = c
                .query_row(
                    "SELECT merkle_root, leaf_count, blob_id, blob_hash, blob_size, claimed_units \
                     FROM stacks WHERE small_id = ?1",
                    [id.0 as i64],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    },
                )
                .unwrap();
            let commitment = StackCommitment {
                merkle_root: Hash32(root.try_into().unwrap()),
                leaf_count: leaves as u64,
                blob_id,
                blob_hash: Hash32(hash.try_into().unwrap()),
                blob_size: size as u64,
            };
            ledger
                .try_settle_stack(
                    node_owner,
                    stack.selected_node_id,
                    id,
                    ComputeUnits(units as u64),
                    &commitment,
                )
                .unwrap();
        }
        Case::ClaimUnrecorded => {
            ledger.advance_epoch().unwrap();
            ledger
                .claim_funds(node_owner, stack.selected_node_id, &[id])
                .unwrap();
        }
        Case::After(_) => {}
    }

    let node = start_node(home, &url, 0);
    if !matches!(case, Case::ClaimUnrecorded) {
        wait_state(home, id, "submitted");
        ledger.advance_epoch().unwrap();
    }
    wait_state(home, id, "claimed");
    kill(node);

    // Exactly once, to the unit.
    let t = ledger.ticket(id).unwrap().unwrap();
    assert!(t.is_claimed);
    assert_eq!(
        t.num_claimed_compute_units,
        ComputeUnits(charged),
        "{case:?}"
    );
    assert_eq!(t.commitment.leaf_count, 4);
    assert_eq!(
        count(&ledger, "StackTrySettleEvent"),
        1,
        "{case:?}: one ticket"
    );
    assert_eq!(
        count(&ledger, "StackSettlementTicketClaimedEvent"),
        1,
        "{case:?}: one claim"
    );
    let blob = std::fs::read(home.join("da").join(&t.commitment.blob_id)).unwrap();
    assert_eq!(blake2b256(&blob), t.commitment.blob_hash.0);
    let level = ledger.task(stack.task_small_id).unwrap().security_level;
    let fee = level
        .node_fee(
            stack.price_per_one_million_compute_units,
            ComputeUnits(charged),
        )
        .unwrap()
        .0;
    assert_eq!(ledger.balance(node_owner).unwrap().0, node_before + fee);
    assert_eq!(
        ledger.balance(stack.owner).unwrap().0,
        user_before + stack.escrowed.0 - fee,
        "{case:?}: the user got back everything not charged"
    );
    assert!(
        fee >= charged,
        "{fee} base units for {charged} units: money moved"
    );
    assert!(ledger.totals().unwrap().is_conserved());
    let c = rusqlite::Connection::open(home.join("state.db")).unwrap();
    let recorded: i64 = c
        .query_row(
            "SELECT node_fee FROM stacks WHERE small_id = ?1",
            [id.0 as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recorded as u64, fee);
}

#[test]
fn killed_after_freezing() {
    run_case(Case::After("frozen"));
}

#[test]
fn killed_after_storing_the_log() {
    run_case(Case::After("log_put"));
}

#[test]
fn killed_after_opening_the_ticket() {
    run_case(Case::After("submitted"));
}

#[test]
fn killed_between_the_ticket_and_its_record() {
    run_case(Case::TicketUnrecorded);
}

#[test]
fn killed_between_the_claim_and_its_record() {
    run_case(Case::ClaimUnrecorded);
}
