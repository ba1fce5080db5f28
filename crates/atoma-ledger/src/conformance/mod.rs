//! The conformance suite every `Ledger` backend must pass: the contract's rules for nodes,
//! tasks, subscriptions and stacks, exact balances under concurrent purchases, an event log
//! that a follower can read in order and resume from a cursor (this file); settlement,
//! attestation, claims, collateral, expiry and reputation with every refusal leaving the state
//! unchanged (`settlement`); and conservation of money under random operation sequences
//! (`conservation`).
//!
//! Use: `atoma_ledger::conformance::run_all(&|| Box::new(MyLedger::new()))`.

pub mod conservation;
pub mod disputes;
pub mod settlement;

use std::collections::BTreeSet;

use crate::*;

/// A fresh, empty ledger per call.
pub type Factory<'a> = &'a (dyn Fn() -> Box<dyn Ledger> + Sync);

static ACTORS: std::sync::OnceLock<fn(u8) -> Address> = std::sync::OnceLock::new();

/// Makes the suite act as `actors(n)` instead of the plain address `0x…0n`, for backends that
/// must sign as each actor (Sui: key-derived addresses). Once per process; later calls with
/// another function are ignored.
pub fn use_actors(actors: fn(u8) -> Address) {
    let _ = ACTORS.set(actors);
}

/// The suite's actor `n`.
pub fn addr(n: u8) -> Address {
    if let Some(f) = ACTORS.get() {
        return f(n);
    }
    let mut a = [0u8; 32];
    a[31] = n;
    Address(a)
}

pub(crate) fn chat_task(model: &str) -> NewTask {
    NewTask {
        role: TaskRole::ChatCompletion,
        model_name: Some(model.to_string()),
        security_level: SecurityLevel::NoSecurity,
        minimum_reputation_score: 0,
        is_public: true,
        minimum_collateral: Amount(0),
    }
}

/// Runs every check on fresh ledgers from `make`.
pub fn run_all(make: Factory<'_>) {
    ids_are_sequential_from_one(make().as_ref());
    node_operations_need_the_badge_owner(make().as_ref());
    subscription_rules(make().as_ref());
    stacks_sample_only_eligible_nodes(make().as_ref());
    failed_purchases_change_nothing(make().as_ref());
    concurrent_purchases_keep_balances_exact(make().as_ref());
    events_follow_with_a_cursor(make().as_ref());
    settlement::run_all(make);
    conservation::random_sequences_conserve_money(make, 0..16, 150);
}

pub fn ids_are_sequential_from_one(l: &dyn Ledger) {
    for i in 1..=3 {
        assert_eq!(l.register_node(addr(1)).unwrap().small_id, NodeSmallId(i));
    }
    assert_eq!(
        l.create_task(addr(9), &chat_task("m")).unwrap().small_id,
        TaskSmallId(1)
    );
    assert!(matches!(
        l.node(NodeSmallId(4)),
        Err(LedgerError::NodeNotFound(_))
    ));
    assert!(matches!(
        l.task(TaskSmallId(2)),
        Err(LedgerError::TaskNotFound(_))
    ));
    assert!(matches!(
        l.stack(StackSmallId(1)),
        Err(LedgerError::StackNotFound(_))
    ));
}

pub fn node_operations_need_the_badge_owner(l: &dyn Ledger) {
    let n = l.register_node(addr(1)).unwrap();
    let t = l.create_task(addr(9), &chat_task("m")).unwrap();
    assert_eq!(n.owner, addr(1));
    assert!(matches!(
        l.subscribe_node_to_task(addr(2), n.small_id, t.small_id, Amount(10)),
        Err(LedgerError::NotNodeOwner { .. })
    ));
    assert!(matches!(
        l.add_node_to_model(addr(2), n.small_id, "m", 1),
        Err(LedgerError::NotNodeOwner { .. })
    ));
    l.add_node_to_model(addr(1), n.small_id, "m", 1).unwrap();
    assert!(matches!(
        l.add_node_to_model(addr(1), n.small_id, "m", 2),
        Err(LedgerError::AlreadyInEchelon { .. })
    ));
    // The public URL: the owner only, an http(s) URL only.
    assert!(matches!(
        l.set_node_public_url(addr(2), n.small_id, "http://127.0.0.1:3000"),
        Err(LedgerError::NotNodeOwner { .. })
    ));
    for bad in ["ftp://x", "127.0.0.1:3000", "http://a b"] {
        assert!(matches!(
            l.set_node_public_url(addr(1), n.small_id, bad),
            Err(LedgerError::Invalid(_))
        ));
    }
    assert_eq!(l.node(n.small_id).unwrap().public_url, None);
    l.set_node_public_url(addr(1), n.small_id, "https://node.example:8443")
        .unwrap();
    assert_eq!(
        l.node(n.small_id).unwrap().public_url.as_deref(),
        Some("https://node.example:8443")
    );
    let all = l.nodes().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].small_id, n.small_id);
    assert_eq!(l.tasks().unwrap(), vec![l.task(t.small_id).unwrap()]);
    let last = l.events_after(EventCursor(0), 100).unwrap();
    assert_eq!(
        last.last().unwrap().event.name(),
        "NodePublicUrlUpdatedEvent"
    );
}

pub fn subscription_rules(l: &dyn Ledger) {
    let n = l.register_node(addr(1)).unwrap().small_id;
    let t = l.create_task(addr(9), &chat_task("m")).unwrap().small_id;
    assert!(matches!(
        l.subscribe_node_to_task(addr(1), n, t, Amount(0)),
        Err(LedgerError::Invalid(_))
    ));
    let s = l
        .subscribe_node_to_task(addr(1), n, t, Amount(100))
        .unwrap();
    assert_eq!(s.max_num_compute_units, COMPUTE_UNITS_PER_STACK);
    assert!(matches!(
        l.subscribe_node_to_task(addr(1), n, t, Amount(100)),
        Err(LedgerError::AlreadySubscribed { .. })
    ));
    l.update_node_subscription(addr(1), n, t, Amount(50))
        .unwrap();
    assert_eq!(
        l.subscriptions(t).unwrap()[0].price_per_one_million_compute_units,
        Amount(50)
    );
    l.unsubscribe_node_from_task(addr(1), n, t).unwrap();
    assert!(l.subscriptions(t).unwrap().is_empty());
    assert!(matches!(
        l.unsubscribe_node_from_task(addr(1), n, t),
        Err(LedgerError::NotSubscribed { .. })
    ));
    // Private tasks need a whitelist; demanding tasks a reputation; deprecated ones nothing.
    let private = l
        .create_task(
            addr(9),
            &NewTask {
                is_public: false,
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    assert!(matches!(
        l.subscribe_node_to_task(addr(1), n, private, Amount(1)),
        Err(LedgerError::NotWhitelisted { .. })
    ));
    l.whitelist_nodes_for_task(private, &[n]).unwrap();
    l.subscribe_node_to_task(addr(1), n, private, Amount(1))
        .unwrap();
    let picky = l
        .create_task(
            addr(9),
            &NewTask {
                minimum_reputation_score: 90,
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    assert!(matches!(
        l.subscribe_node_to_task(addr(1), n, picky, Amount(1)),
        Err(LedgerError::ReputationTooLow { .. })
    ));
    l.deprecate_task(t).unwrap();
    assert!(matches!(
        l.subscribe_node_to_task(addr(1), n, t, Amount(1)),
        Err(LedgerError::TaskDeprecated(_))
    ));
}

pub fn stacks_sample_only_eligible_nodes(l: &dyn Ledger) {
    let t = l.create_task(addr(9), &chat_task("m")).unwrap().small_id;
    let other = l
        .create_task(addr(9), &chat_task("other"))
        .unwrap()
        .small_id;
    let cheap = l.register_node(addr(1)).unwrap().small_id;
    let pricey = l.register_node(addr(2)).unwrap().small_id;
    let elsewhere = l.register_node(addr(3)).unwrap().small_id;
    l.subscribe_node_to_task(addr(1), cheap, t, Amount(100))
        .unwrap();
    l.subscribe_node_to_task(addr(2), pricey, t, Amount(1_000))
        .unwrap();
    l.subscribe_node_to_task(addr(3), elsewhere, other, Amount(1))
        .unwrap();
    l.faucet(addr(7), Amount(1_000_000)).unwrap();
    let req = |price| StackRequest {
        task_small_id: t,
        num_compute_units: ComputeUnits(10_000),
        price_per_one_million_compute_units: Amount(price),
    };
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let s = l.acquire_stack(addr(7), &req(500)).unwrap();
        assert_eq!(
            s.selected_node_id, cheap,
            "only the node within the price cap"
        );
        assert_eq!(s.escrowed, Amount(5), "10 000 units at 500 per million");
        let s = l.acquire_stack(addr(7), &req(1_000)).unwrap();
        assert_ne!(
            s.selected_node_id, elsewhere,
            "never a node of another task"
        );
        seen.insert(s.selected_node_id);
    }
    assert_eq!(seen.len(), 2, "both eligible nodes get sampled");
    assert!(matches!(
        l.acquire_stack(addr(7), &req(50)),
        Err(LedgerError::NoEligibleNodes { .. })
    ));
    let too_big = StackRequest {
        num_compute_units: ComputeUnits(COMPUTE_UNITS_PER_STACK.0 + 1),
        ..req(1_000)
    };
    assert!(matches!(
        l.acquire_stack(addr(7), &too_big),
        Err(LedgerError::NoEligibleNodes { .. })
    ));
    let s = l.acquire_stack(addr(7), &req(1_000)).unwrap();
    assert_eq!(l.stack(s.small_id).unwrap(), s);
    assert_eq!(s.owner, addr(7));
}

pub fn failed_purchases_change_nothing(l: &dyn Ledger) {
    let t = l.create_task(addr(9), &chat_task("m")).unwrap().small_id;
    let n = l.register_node(addr(1)).unwrap().small_id;
    l.subscribe_node_to_task(addr(1), n, t, Amount(1_000_000))
        .unwrap();
    l.faucet(addr(7), Amount(999)).unwrap();
    let before = l.events_after(EventCursor(0), 1000).unwrap().len();
    let req = StackRequest {
        task_small_id: t,
        num_compute_units: ComputeUnits(1_000),
        price_per_one_million_compute_units: Amount(1_000_000),
    };
    assert!(matches!(
        l.acquire_stack(addr(7), &req),
        Err(LedgerError::InsufficientBalance {
            needed: 1_000,
            available: 999
        })
    ));
    assert_eq!(l.balance(addr(7)).unwrap(), Amount(999));
    assert_eq!(l.fee_treasury().unwrap(), Amount(0));
    assert_eq!(l.events_after(EventCursor(0), 1000).unwrap().len(), before);
    assert!(matches!(
        l.stack(StackSmallId(1)),
        Err(LedgerError::StackNotFound(_))
    ));
    // SamplingConsensus charges 1.212x.
    let sc = l
        .create_task(
            addr(9),
            &NewTask {
                security_level: SecurityLevel::SamplingConsensus,
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    l.subscribe_node_to_task(addr(1), n, sc, Amount(1_000))
        .unwrap();
    l.faucet(addr(8), Amount(10_000)).unwrap();
    let s = l
        .acquire_stack(
            addr(8),
            &StackRequest {
                task_small_id: sc,
                num_compute_units: ComputeUnits(1_000_000),
                price_per_one_million_compute_units: Amount(1_000),
            },
        )
        .unwrap();
    assert_eq!(s.escrowed, Amount(1_212));
    assert_eq!(l.balance(addr(8)).unwrap(), Amount(10_000 - 1_212));
    assert_eq!(l.fee_treasury().unwrap(), Amount(1_212));
}

pub fn concurrent_purchases_keep_balances_exact(l: &dyn Ledger) {
    let t = l.create_task(addr(9), &chat_task("m")).unwrap().small_id;
    let n = l.register_node(addr(1)).unwrap().small_id;
    l.subscribe_node_to_task(addr(1), n, t, Amount(1_000_000))
        .unwrap();
    // 25 stacks of 1 000 units at 1 USDC per million units = 1 000 base units each;
    // the buyer affords 10 of them. 8 threads race.
    l.faucet(addr(7), Amount(10_500)).unwrap();
    let req = StackRequest {
        task_small_id: t,
        num_compute_units: ComputeUnits(1_000),
        price_per_one_million_compute_units: Amount(1_000_000),
    };
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..4 {
                    match l.acquire_stack(addr(7), &req) {
                        Ok(_) => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(LedgerError::InsufficientBalance { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    assert_eq!(ok.into_inner(), 10);
    assert_eq!(l.balance(addr(7)).unwrap(), Amount(500));
    assert_eq!(l.fee_treasury().unwrap(), Amount(10_000));
}

pub fn events_follow_with_a_cursor(l: &dyn Ledger) {
    let n = l.register_node(addr(1)).unwrap().small_id;
    let t = l.create_task(addr(9), &chat_task("m")).unwrap().small_id;
    l.subscribe_node_to_task(addr(1), n, t, Amount(10)).unwrap();
    l.faucet(addr(7), Amount(100)).unwrap();
    let s = l
        .acquire_stack(
            addr(7),
            &StackRequest {
                task_small_id: t,
                num_compute_units: ComputeUnits(1_000),
                price_per_one_million_compute_units: Amount(10),
            },
        )
        .unwrap();
    let all = l.events_after(EventCursor(0), 100).unwrap();
    let names: Vec<&str> = all.iter().map(|e| e.event.name()).collect();
    assert_eq!(
        names,
        [
            "NodeRegisteredEvent",
            "TaskRegisteredEvent",
            "NodeSubscribedToTaskEvent",
            "StackCreatedEvent"
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    // Reading in pages from a saved cursor yields each event once.
    let first = l.events_after(EventCursor(0), 2).unwrap();
    let rest = l.events_after(EventCursor(first[1].seq), 100).unwrap();
    assert_eq!([first, rest].concat(), all);
    match &all[3].event {
        LedgerEvent::StackCreatedEvent {
            stack_small_id,
            owner,
            selected_node_id,
            num_compute_units,
            ..
        } => {
            assert_eq!(*stack_small_id, s.small_id);
            assert_eq!(*owner, addr(7));
            assert_eq!(*selected_node_id, n);
            assert_eq!(*num_compute_units, ComputeUnits(1_000));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        l.events_after(EventCursor(all[3].seq), 10)
            .unwrap()
            .is_empty()
    );
}
