//! Metering invariants: refusals, replay, release on drop, exact accounting under a 200-way
//! race on one stack, and recovery after a crash that left reservations open.

use atoma_ledger::{Address, Amount, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskSmallId};
use atoma_state::meter::{Meter, MeterError, Settled};
use atoma_state::settlement::SettleState;

const ME: NodeSmallId = NodeSmallId(1);

fn owner() -> Address {
    "0x77".parse().unwrap()
}

fn stack(id: u64, units: u64, node: NodeSmallId) -> Stack {
    Stack {
        small_id: StackSmallId(id),
        stack_id: format!("0x{id}"),
        owner: owner(),
        task_small_id: TaskSmallId(1),
        selected_node_id: node,
        num_compute_units: ComputeUnits(units),
        price_per_one_million_compute_units: Amount(1_000),
        escrowed: Amount(1),
        is_claimed: false,
        created_at_epoch: 0,
    }
}

/// A finished request's outcome; the record bytes name the response so order is visible.
fn done(prompt: u64, completion: u64, response_hash: [u8; 32]) -> Settled {
    Settled {
        prompt_tokens: prompt,
        completion_tokens: completion,
        response_hash,
        record: response_hash[..8].to_vec(),
    }
}

fn hash(n: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&n.to_le_bytes());
    h
}

#[test]
fn reserve_settle_and_refusals() {
    let m = Meter::in_memory(vec![ME]).unwrap();
    m.upsert_stack(&stack(1, 100, ME)).unwrap();
    m.upsert_stack(&stack(2, 100, NodeSmallId(9))).unwrap();
    let me = owner();
    let r = m
        .reserve(StackSmallId(1), &me, hash(1), ComputeUnits(60), None)
        .unwrap();
    assert_eq!(m.usage(StackSmallId(1)).unwrap().units_reserved, 60);
    assert_eq!(
        m.reserve(StackSmallId(1), &me, hash(2), ComputeUnits(41), None)
            .unwrap_err(),
        MeterError::Exhausted {
            stack: StackSmallId(1),
            left: 40,
            needed: 41
        }
    );
    r.settle(done(10, 15, hash(100))).unwrap();
    let u = m.usage(StackSmallId(1)).unwrap();
    assert_eq!(
        (u.units_used, u.units_reserved, u.settled_requests),
        (25, 0, 1)
    );
    assert_eq!(
        m.request_log(StackSmallId(1)).unwrap()[0].response_hash,
        hash(100)
    );
    // Replaying the same signed request spends nothing.
    assert_eq!(
        m.reserve(StackSmallId(1), &me, hash(1), ComputeUnits(5), None)
            .unwrap_err(),
        MeterError::Replay(StackSmallId(1))
    );
    assert_eq!(
        m.reserve(
            StackSmallId(1),
            &"0x78".parse::<Address>().unwrap(),
            hash(3),
            ComputeUnits(5),
            None
        )
        .unwrap_err(),
        MeterError::NotOwner(StackSmallId(1))
    );
    assert!(matches!(
        m.reserve(StackSmallId(2), &me, hash(3), ComputeUnits(5), None),
        Err(MeterError::WrongNode { .. })
    ));
    assert_eq!(
        m.reserve(StackSmallId(3), &me, hash(3), ComputeUnits(5), None)
            .unwrap_err(),
        MeterError::UnknownStack(StackSmallId(3))
    );
    // A dropped reservation gives its units back and frees its hash for a retry.
    drop(
        m.reserve(StackSmallId(1), &me, hash(4), ComputeUnits(70), None)
            .unwrap(),
    );
    assert_eq!(m.usage(StackSmallId(1)).unwrap().units_used, 25);
    m.reserve(StackSmallId(1), &me, hash(4), ComputeUnits(70), None)
        .unwrap()
        .release()
        .unwrap();
    m.upsert_task(TaskSmallId(1), Some("smollm2")).unwrap();
    assert!(matches!(
        m.reserve(
            StackSmallId(1),
            &me,
            hash(6),
            ComputeUnits(1),
            Some("gemma3")
        ),
        Err(MeterError::WrongModel { .. })
    ));
    m.reserve(
        StackSmallId(1),
        &me,
        hash(6),
        ComputeUnits(1),
        Some("smollm2"),
    )
    .unwrap()
    .release()
    .unwrap();
    let mut claimed = stack(1, 100, ME);
    claimed.is_claimed = true;
    m.upsert_stack(&claimed).unwrap();
    assert_eq!(
        m.reserve(StackSmallId(1), &me, hash(5), ComputeUnits(1), None)
            .unwrap_err(),
        MeterError::Claimed(StackSmallId(1))
    );
}

/// 200 requests race on a stack that affords about 50 of them (each reserves 20 units of 1 000
/// and then uses between 10 and 20): the used units equal exactly the sum of the settled usages
/// and never exceed the stack.
#[test]
fn a_200_way_race_never_overspends() {
    let m = Meter::in_memory(vec![ME]).unwrap();
    m.upsert_stack(&stack(1, 1_000, ME)).unwrap();
    let me = owner();
    let results: Vec<Option<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200u64)
            .map(|i| {
                let (m, me) = (m.clone(), me);
                s.spawn(move || {
                    match m.reserve(StackSmallId(1), &me, hash(i), ComputeUnits(20), None) {
                        Ok(r) => {
                            let used = 10 + i % 11;
                            r.settle(done(used / 2, used - used / 2, hash(1_000 + i)))
                                .unwrap();
                            Some(used)
                        }
                        Err(MeterError::Exhausted { .. }) => None,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served: u64 = results.iter().flatten().sum();
    let n = results.iter().flatten().count();
    let u = m.usage(StackSmallId(1)).unwrap();
    assert_eq!(u.units_used, served, "used units = sum of served usage");
    assert_eq!(u.settled_requests, n as u64);
    assert!(u.units_used <= 1_000);
    assert!((50..=100).contains(&n), "{n} served");
    assert_eq!(u.units_reserved, 0);
}

/// A crash (reservations never finished) followed by a restart: open reservations are released,
/// settled ones stay counted once, and replays of settled requests are still refused.
#[test]
fn restart_after_a_crash_releases_open_reservations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meter.db");
    let me = owner();
    {
        let m = Meter::open(&path, vec![ME]).unwrap();
        m.upsert_stack(&stack(1, 1_000, ME)).unwrap();
        m.reserve(StackSmallId(1), &me, hash(1), ComputeUnits(100), None)
            .unwrap()
            .settle(done(30, 40, hash(11)))
            .unwrap();
        for i in 2..5 {
            // Simulate the process dying mid-request: the guard never runs.
            std::mem::forget(
                m.reserve(StackSmallId(1), &me, hash(i), ComputeUnits(100), None)
                    .unwrap(),
            );
        }
        assert_eq!(m.usage(StackSmallId(1)).unwrap().units_used, 370);
    }
    let m = Meter::open(&path, vec![ME]).unwrap();
    let u = m.usage(StackSmallId(1)).unwrap();
    assert_eq!(
        (u.units_used, u.units_reserved, u.settled_requests),
        (70, 0, 1)
    );
    assert_eq!(
        m.reserve(StackSmallId(1), &me, hash(1), ComputeUnits(1), None)
            .unwrap_err(),
        MeterError::Replay(StackSmallId(1))
    );
    // The interrupted requests may be retried.
    m.reserve(StackSmallId(1), &me, hash(2), ComputeUnits(100), None)
        .unwrap()
        .release()
        .unwrap();
}

/// Following a real (embedded) ledger: only stacks sold to this node are recorded, the cursor
/// survives a restart, and re-applying old events changes nothing.
#[test]
fn follows_the_ledger_from_a_durable_cursor() {
    use atoma_ledger::{
        EventCursor, Ledger, NewTask, SecurityLevel, SqliteLedger, StackRequest, TaskRole,
    };
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::in_memory().unwrap();
    let op: Address = "0x1".parse().unwrap();
    let n1 = ledger.register_node(op).unwrap().small_id;
    let n2 = ledger.register_node(op).unwrap().small_id;
    let t = ledger
        .create_task(
            op,
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some("smollm2".into()),
                security_level: SecurityLevel::NoSecurity,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: atoma_ledger::Amount(0),
            },
        )
        .unwrap()
        .small_id;
    ledger
        .subscribe_node_to_task(op, n1, t, Amount(10))
        .unwrap();
    ledger.faucet(owner(), Amount(1_000_000)).unwrap();
    let buy = || {
        ledger
            .acquire_stack(
                owner(),
                &StackRequest {
                    task_small_id: t,
                    num_compute_units: ComputeUnits(1_000),
                    price_per_one_million_compute_units: Amount(10),
                },
            )
            .unwrap()
    };
    let s1 = buy();
    let path = dir.path().join("state.db");
    {
        let m = Meter::open(&path, vec![n1]).unwrap();
        let evs = ledger.events_after(m.cursor().unwrap(), 100).unwrap();
        let c = m.apply_ledger_events(&evs).unwrap();
        assert_eq!(c, EventCursor(evs.last().unwrap().seq));
        let me = owner();
        m.reserve(s1.small_id, &me, hash(1), ComputeUnits(10), Some("smollm2"))
            .unwrap()
            .settle(done(4, 6, hash(2)))
            .unwrap();
        // Old events again: idempotent.
        m.apply_ledger_events(&evs).unwrap();
        assert_eq!(m.usage(s1.small_id).unwrap().units_used, 10);
    }
    // A node-2 subscription and a stack sold to node 2 after the restart.
    ledger
        .subscribe_node_to_task(op, n2, t, Amount(10))
        .unwrap();
    ledger.unsubscribe_node_from_task(op, n1, t).unwrap();
    let s2 = buy();
    assert_eq!(s2.selected_node_id, n2);
    let m = Meter::open(&path, vec![n1]).unwrap();
    let evs = ledger.events_after(m.cursor().unwrap(), 100).unwrap();
    assert_eq!(
        evs.len(),
        3,
        "only the events after the saved cursor (subscribe, unsubscribe, stack)"
    );
    m.apply_ledger_events(&evs).unwrap();
    assert!(
        matches!(m.usage(s2.small_id), Err(MeterError::UnknownStack(_))),
        "not ours"
    );
    assert_eq!(m.usage(s1.small_id).unwrap().units_used, 10);
}

/// Settlement rows: a frozen stack refuses new requests while the one in flight finishes; its
/// log lists the settled records in settlement order with their total usage; the state only
/// moves forward, and replaying a step's record changes nothing.
#[test]
fn freezing_and_settlement_steps() {
    use atoma_ledger::{Hash32, StackCommitment};
    let m = Meter::in_memory(vec![ME]).unwrap();
    m.upsert_stack(&stack(1, 1_000, ME)).unwrap();
    m.reserve(StackSmallId(1), &owner(), hash(1), ComputeUnits(50), None)
        .unwrap()
        .settle(done(20, 10, hash(101)))
        .unwrap();
    let in_flight = m
        .reserve(StackSmallId(1), &owner(), hash(2), ComputeUnits(50), None)
        .unwrap();
    assert!(m.freeze(StackSmallId(1)).unwrap());
    assert!(!m.freeze(StackSmallId(1)).unwrap(), "only once");
    assert_eq!(
        m.reserve(StackSmallId(1), &owner(), hash(3), ComputeUnits(5), None)
            .unwrap_err(),
        MeterError::Settling(StackSmallId(1))
    );
    let s = m.settlement(StackSmallId(1)).unwrap();
    assert_eq!(
        (s.state, s.in_flight, s.settled_requests),
        (SettleState::Frozen, 1, 1)
    );
    in_flight.settle(done(5, 5, hash(102))).unwrap();
    let log = m.frozen_log(StackSmallId(1)).unwrap();
    assert_eq!(
        log.records,
        vec![hash(101)[..8].to_vec(), hash(102)[..8].to_vec()]
    );
    assert_eq!(log.units, 40);
    assert_eq!(
        log.leaves,
        vec![
            atoma_crypto::merkle::leaf(&hash(1), &hash(101)),
            atoma_crypto::merkle::leaf(&hash(2), &hash(102))
        ]
    );
    let c = StackCommitment {
        merkle_root: Hash32([1; 32]),
        leaf_count: 2,
        blob_id: "b".into(),
        blob_hash: Hash32([2; 32]),
        blob_size: 5,
    };
    m.record_submitted(StackSmallId(1), 9).unwrap();
    assert_eq!(
        m.settlement(StackSmallId(1)).unwrap().state,
        SettleState::Frozen,
        "no skipping a step"
    );
    m.record_log_put(StackSmallId(1), &c, 40).unwrap();
    m.record_log_put(StackSmallId(1), &c, 41).unwrap();
    let s = m.settlement(StackSmallId(1)).unwrap();
    assert_eq!(
        (s.state, s.claimed_units, s.commitment),
        (SettleState::LogPut, Some(40), Some(c))
    );
    m.record_submitted(StackSmallId(1), 9).unwrap();
    m.record_claimed(StackSmallId(1), 12).unwrap();
    let s = m.settlement(StackSmallId(1)).unwrap();
    assert_eq!(
        (s.state, s.node_fee, s.window_end),
        (SettleState::Claimed, Some(12), Some(9))
    );
    assert!(m.settlements(false).unwrap().is_empty());
    assert_eq!(
        m.reserve(StackSmallId(1), &owner(), hash(4), ComputeUnits(5), None)
            .unwrap_err(),
        MeterError::Claimed(StackSmallId(1))
    );
}
