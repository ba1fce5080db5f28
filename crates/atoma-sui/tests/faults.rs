//! The Sui backend under faults of the (test double) RPC server: unavailable for a while, slow,
//! an event stream that breaks mid-page, and a client restarted over its persisted index. The
//! node recovers, applies each event exactly once, and never executes a transaction twice.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atoma_ledger::{EventCursor, Ledger, SqliteLedger};
use atoma_sui::Flavor;
use atoma_sui::fake::{FakeBacked, FakeSui, actor, default_ids};

fn fake() -> Arc<FakeSui> {
    Arc::new(FakeSui::start(default_ids(actor(9)), SqliteLedger::in_memory().unwrap(), 0).unwrap())
}

fn assert_dense_once(l: &dyn Ledger, expected: usize) {
    let evs = l.events_after(EventCursor(0), usize::MAX >> 1).unwrap();
    assert_eq!(evs.len(), expected, "every chain event exactly once");
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "dense sequence numbers");
    }
}

#[test]
fn a_stream_broken_mid_page_resumes_without_loss_or_repeats() {
    let f = fake();
    f.register_nodes_directly(actor(1), 7).unwrap();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    f.faults().drop_events_after.store(3, Ordering::SeqCst);
    assert_dense_once(&l, 7);
    assert_eq!(
        f.faults().drop_events_after.load(Ordering::SeqCst),
        0,
        "the fault fired"
    );
}

#[test]
fn an_unavailable_then_slow_server_delays_a_write_but_it_happens_once() {
    let f = fake();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    f.faults().unavailable.store(true, Ordering::SeqCst);
    let f2 = f.clone();
    let heal = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        f2.faults().delay_ms.store(50, Ordering::SeqCst);
        f2.faults().unavailable.store(false, Ordering::SeqCst);
    });
    let node = l
        .register_node(actor(1))
        .expect("succeeds once the server is back");
    heal.join().unwrap();
    f.faults().delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(node.owner, actor(1));
    assert_eq!(
        f.with_ledger(|x| x.nodes().unwrap().len()),
        1,
        "executed once"
    );
    assert_dense_once(&l, 1);
}

#[test]
fn a_restarted_client_resumes_from_its_persisted_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("sui-index.sqlite");
    let f = fake();
    f.register_nodes_directly(actor(1), 5).unwrap();
    {
        let l = FakeBacked::connect(f.clone(), Flavor::Extended, Some(index.clone())).unwrap();
        assert_dense_once(&l, 5);
    }
    // While the client is down the chain moves on; a restart picks up from the stored cursor.
    f.register_nodes_directly(actor(2), 4).unwrap();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, Some(index)).unwrap();
    assert_dense_once(&l, 9);
    assert_eq!(l.nodes().unwrap().len(), 9);
    assert_eq!(l.nodes_of(actor(2)).unwrap().len(), 4);
}

#[test]
fn deployed_contract_lacks_are_named() {
    let f = fake();
    let l = FakeBacked::connect(f, Flavor::Deployed, None).unwrap();
    let n = l.register_node(actor(1)).unwrap().small_id;
    for e in [
        l.ledger
            .deposit_collateral(actor(1), n, atoma_ledger::Amount(1))
            .unwrap_err(),
        l.ledger
            .set_node_public_url(actor(1), n, "http://x")
            .unwrap_err(),
        l.ledger
            .close_expired_stack(actor(1), atoma_ledger::StackSmallId(1))
            .unwrap_err(),
        l.ledger
            .faucet(actor(1), atoma_ledger::Amount(1))
            .unwrap_err(),
    ] {
        assert!(
            matches!(e, atoma_ledger::LedgerError::NotSupported(_)),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("not supported by the deployed contract")
        );
    }
}

#[test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
fn ingesting_ten_thousand_events() {
    let f = fake();
    f.register_nodes_directly(actor(1), 10_000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let l = FakeBacked::connect(f, Flavor::Extended, Some(dir.path().join("i.sqlite"))).unwrap();
    let t = Instant::now();
    let n = l.ledger.sync().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(n, 10_000);
    println!(
        "ingested {n} events in {secs:.2} s ({:.0} events/s)",
        n as f64 / secs
    );
}

#[test]
fn the_ledger_may_be_used_and_dropped_inside_an_async_runtime() {
    let f = fake();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // No spawn_blocking: the ledger waits on a helper thread rather than panicking.
        let l = FakeBacked::connect(f, Flavor::Extended, None).unwrap();
        let n = l.register_node(actor(3)).unwrap();
        assert_eq!(l.node(n.small_id).unwrap().owner, actor(3));
        drop(l);
    });
}

#[test]
fn a_stale_object_version_from_a_lagging_server_is_refreshed_and_the_write_happens_once() {
    let f = fake();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    // Move the gas coin past version 1 so a stale read can lag behind it.
    l.register_node(actor(1)).unwrap();
    f.faults().stale_reads.store(1, Ordering::SeqCst);
    let n = l
        .register_node(actor(1))
        .expect("rebuilt from fresh references");
    assert_eq!(n.small_id.0, 2);
    assert_eq!(
        f.stale_refusals(),
        1,
        "the stale transaction was refused, not executed"
    );
    assert_eq!(
        f.with_ledger(|x| x.nodes().unwrap().len()),
        2,
        "each write once"
    );
    assert_dense_once(&l, 2);
}

#[test]
fn a_stack_is_found_by_its_purchase_transaction_digest() {
    let f = fake();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    let task = l
        .create_task(
            actor(9),
            &atoma_ledger::NewTask {
                role: atoma_ledger::TaskRole::ChatCompletion,
                model_name: Some("m".into()),
                security_level: atoma_ledger::SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: atoma_ledger::Amount(0),
            },
        )
        .unwrap()
        .small_id;
    let n = l.register_node(actor(1)).unwrap().small_id;
    l.subscribe_node_to_task(actor(1), n, task, atoma_ledger::Amount(1_000))
        .unwrap();
    f.faucet(actor(5), atoma_ledger::Amount(10_000)).unwrap();
    let bought = l
        .acquire_stack(
            actor(5),
            &atoma_ledger::StackRequest {
                task_small_id: task,
                num_compute_units: atoma_ledger::ComputeUnits(1_000_000),
                price_per_one_million_compute_units: atoma_ledger::Amount(1_000),
            },
        )
        .unwrap();
    // Another client (a node that has not followed the chain yet) looks the purchase up.
    let node_side = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    let digest = f.last_transaction_digest().unwrap();
    let found = node_side.ledger.stack_bought_in(&digest).unwrap();
    assert_eq!(found, Some(bought));
    // A transaction that bought nothing, and one that does not exist.
    l.register_node(actor(2)).unwrap();
    let digest = f.last_transaction_digest().unwrap();
    assert_eq!(node_side.ledger.stack_bought_in(&digest).unwrap(), None);
    assert!(
        node_side
            .ledger
            .stack_bought_in("11111111111111111111111111111111")
            .is_err()
    );
    // Through the trait (what a node's `X-Tx-Digest` lookup calls), while the chain's event
    // list is down: the purchase transaction alone shows the stack.
    f.faults()
        .list_events_unavailable
        .store(true, Ordering::SeqCst);
    let second = l
        .acquire_stack(
            actor(5),
            &atoma_ledger::StackRequest {
                task_small_id: task,
                num_compute_units: atoma_ledger::ComputeUnits(1_000),
                price_per_one_million_compute_units: atoma_ledger::Amount(1_000),
            },
        )
        .unwrap();
    let digest = f.last_transaction_digest().unwrap();
    let late = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    let via_trait: &dyn Ledger = &late;
    let t0 = Instant::now();
    let found = via_trait.stack_in_transaction(&digest).unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // This client never saw the task, so it cannot price the escrow; everything a node needs
    // to serve the stack is there.
    assert_eq!(
        (
            found.small_id,
            found.owner,
            found.selected_node_id,
            found.task_small_id
        ),
        (
            second.small_id,
            second.owner,
            second.selected_node_id,
            second.task_small_id
        )
    );
    assert_eq!(found.num_compute_units, second.num_compute_units);
    assert_eq!(
        found.price_per_one_million_compute_units,
        second.price_per_one_million_compute_units
    );
}

#[test]
fn a_write_that_executed_is_reported_done_even_if_the_events_cannot_be_listed_yet() {
    let f = fake();
    let l = FakeBacked::connect(f.clone(), Flavor::Extended, None).unwrap();
    f.faults()
        .list_events_unavailable
        .store(true, Ordering::SeqCst);
    // Executed on the chain; the index cannot catch up: still a success (else a caller would
    // register again), read from the transaction's own events.
    let node = l.register_node(actor(4)).expect("done, though unlisted");
    assert_eq!(node.owner, actor(4));
    assert_eq!(f.with_ledger(|x| x.nodes().unwrap().len()), 1);
    f.faults()
        .list_events_unavailable
        .store(false, Ordering::SeqCst);
    assert_dense_once(&l, 1);
    assert_eq!(l.node(node.small_id).unwrap(), node);
}
