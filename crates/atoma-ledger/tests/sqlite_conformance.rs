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
