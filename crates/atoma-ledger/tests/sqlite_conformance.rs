//! The embedded SQLite ledger passes the backend conformance suite, in memory and on a file, and
//! a file-backed ledger keeps its state and event log across reopening.

use atoma_ledger::conformance::run_all;
use atoma_ledger::{Address, Amount, EventCursor, Ledger, SqliteLedger};

#[test]
fn in_memory_sqlite_conforms() {
    run_all(&|| Box::new(SqliteLedger::in_memory().unwrap()));
}

#[test]
fn file_sqlite_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    run_all(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(SqliteLedger::open(&dir.path().join(format!("l{i}.db"))).unwrap())
    });
}

#[test]
fn a_reopened_file_keeps_state_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let who: Address = "0x7".parse().unwrap();
    {
        let l = SqliteLedger::open(&path).unwrap();
        l.register_node(who).unwrap();
        l.faucet(who, Amount(42)).unwrap();
    }
    let l = SqliteLedger::open(&path).unwrap();
    assert_eq!(l.balance(who).unwrap(), Amount(42));
    assert_eq!(l.events_after(EventCursor(0), 10).unwrap().len(), 1);
    assert_eq!(l.register_node(who).unwrap().small_id.0, 2);
}

/// The schema of ledger files written before settlement existed.
const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE nodes (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, badge_id TEXT NOT NULL,
  reputation INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE node_models (node_small_id INTEGER NOT NULL, model_name TEXT NOT NULL,
  echelon_id INTEGER NOT NULL, PRIMARY KEY (node_small_id, model_name));
CREATE TABLE tasks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, role INTEGER NOT NULL,
  model_name TEXT, security_level INTEGER NOT NULL, min_reputation INTEGER NOT NULL,
  is_public INTEGER NOT NULL, is_deprecated INTEGER NOT NULL DEFAULT 0,
  whitelist TEXT NOT NULL DEFAULT '[]');
CREATE TABLE subscriptions (task_small_id INTEGER NOT NULL, node_small_id INTEGER NOT NULL,
  price INTEGER NOT NULL, max_units INTEGER NOT NULL, PRIMARY KEY (task_small_id, node_small_id));
CREATE TABLE stacks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, stack_id TEXT NOT NULL, owner TEXT NOT NULL,
  task_small_id INTEGER NOT NULL, selected_node_id INTEGER NOT NULL,
  num_compute_units INTEGER NOT NULL, price INTEGER NOT NULL, escrowed INTEGER NOT NULL,
  is_claimed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE balances (address TEXT PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount >= 0));
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, body TEXT NOT NULL);
INSERT INTO meta VALUES ('seed', 7), ('fee_treasury', 1000);
INSERT INTO nodes (owner, badge_id, reputation) VALUES
  ('0x0000000000000000000000000000000000000000000000000000000000000001', 'b', 50);
INSERT INTO tasks (task_id, role, model_name, security_level, min_reputation, is_public)
  VALUES ('t', 0, 'm', 0, 0, 1);
INSERT INTO stacks (stack_id, owner, task_small_id, selected_node_id, num_compute_units, price,
  escrowed) VALUES ('s', '0x0000000000000000000000000000000000000000000000000000000000000007',
  1, 1, 1000000, 1000, 1000);
INSERT INTO balances VALUES
  ('0x0000000000000000000000000000000000000000000000000000000000000007', 500);
";

#[test]
fn a_file_from_before_settlement_migrates_and_settles() {
    use atoma_ledger::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(SCHEMA_V1)
        .unwrap();
    let l = SqliteLedger::open(&path).unwrap();
    let t = l.totals().unwrap();
    assert!(t.is_conserved(), "{t:?}");
    assert_eq!((t.minted, t.escrow), (1_500, 1_000));
    let node_owner: Address = "0x1".parse().unwrap();
    let commitment = StackCommitment {
        merkle_root: Hash32([1; 32]),
        leaf_count: 1,
        blob_id: "b".into(),
        blob_hash: Hash32([2; 32]),
        blob_size: 10,
    };
    l.try_settle_stack(
        node_owner,
        NodeSmallId(1),
        StackSmallId(1),
        ComputeUnits(400_000),
        &commitment,
    )
    .unwrap();
    l.advance_epoch().unwrap();
    let out = l
        .claim_funds(node_owner, NodeSmallId(1), &[StackSmallId(1)])
        .unwrap();
    assert_eq!(out[0].node_fee, Amount(400));
    assert_eq!(l.balance("0x7".parse().unwrap()).unwrap(), Amount(1_100));
    assert!(l.totals().unwrap().is_conserved());
}
