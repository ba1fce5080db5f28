//! Conformance of settlement: tickets, attestations, claims and their money (disputes in
//! `disputes`, run from here too), the
//! ConfidentialCompute direct claim, stack expiry, collateral and reputation. Every refusal is
//! a named error and leaves balances, totals and the event log exactly as they were.

use std::collections::BTreeSet;

use super::{Factory, addr, chat_task};
use crate::*;

pub use super::disputes::{
    a_cheating_node_loses_its_collateral_and_the_user_is_refunded,
    a_different_commitment_opens_a_dispute, an_honest_node_wins_and_is_paid,
    silent_oracles_are_replaced_then_the_stack_is_void,
};

/// One task, three registered nodes with collateral in echelon 1 of model `m`, a funded user.
/// Node 1 subscribes at 1 000 per million, nodes 2 and 3 at 5 000, so a buyer capping the
/// price at 1 000 always gets node 1; any of them may be sampled to attest.
pub(crate) struct Market {
    pub task: TaskSmallId,
    pub nodes: [NodeSmallId; 3],
    pub user: Address,
}

pub(crate) const COLLATERAL: u64 = 10_000;

pub(crate) fn owner(n: NodeSmallId) -> Address {
    addr(n.0 as u8)
}

pub(crate) fn market(l: &dyn Ledger, level: SecurityLevel) -> Market {
    let task = l
        .create_task(
            addr(99),
            &NewTask {
                security_level: level,
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    let mut nodes = [NodeSmallId(0); 3];
    for (i, n) in nodes.iter_mut().enumerate() {
        let who = addr(i as u8 + 1);
        *n = l.register_node(who).unwrap().small_id;
        assert_eq!(owner(*n), who, "node ids start at 1 on a fresh ledger");
        l.add_node_to_model(who, *n, "m", 1).unwrap();
        l.faucet(who, Amount(COLLATERAL)).unwrap();
        l.deposit_collateral(who, *n, Amount(COLLATERAL)).unwrap();
        let price = if i == 0 { 1_000 } else { 5_000 };
        l.subscribe_node_to_task(who, *n, task, Amount(price))
            .unwrap();
    }
    let user = addr(50);
    l.faucet(user, Amount(1_000_000)).unwrap();
    Market { task, nodes, user }
}

pub(crate) fn buy(l: &dyn Ledger, m: &Market, units: u64) -> Stack {
    l.acquire_stack(
        m.user,
        &StackRequest {
            task_small_id: m.task,
            num_compute_units: ComputeUnits(units),
            price_per_one_million_compute_units: Amount(1_000),
        },
    )
    .unwrap()
}

pub(crate) fn commitment(tag: u8) -> StackCommitment {
    StackCommitment {
        merkle_root: Hash32([tag; 32]),
        leaf_count: 3,
        blob_id: format!("blob-{tag}"),
        blob_hash: Hash32([tag ^ 0xff; 32]),
        blob_size: 1_000 + u64::from(tag),
    }
}

pub(crate) fn always_attest(l: &dyn Ledger, nodes: u16) {
    l.set_params(
        addr(99),
        &LedgerParams {
            attestation_probability_permille: 1000,
            attestation_nodes: nodes,
            ..l.params().unwrap()
        },
    )
    .unwrap();
}

/// Everything a refusal must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    totals: MoneyTotals,
    events: usize,
    balances: Vec<Amount>,
}

fn snapshot(l: &dyn Ledger) -> Snapshot {
    let who = (1..=3).chain([50, 51]).map(addr);
    Snapshot {
        totals: l.totals().unwrap(),
        events: l.events_after(EventCursor(0), 10_000).unwrap().len(),
        balances: who.map(|a| l.balance(a).unwrap()).collect(),
    }
}

/// Asserts that `op` is refused with an error `ok` accepts and that nothing changed.
pub(crate) fn refused<T: std::fmt::Debug>(
    l: &dyn Ledger,
    what: &str,
    ok: impl Fn(&LedgerError) -> bool,
    op: impl FnOnce() -> Result<T>,
) {
    let before = snapshot(l);
    match op() {
        Err(e) if ok(&e) => {}
        other => panic!("{what}: expected a named refusal, got {other:?}"),
    }
    assert_eq!(snapshot(l), before, "{what}: a refusal changed the ledger");
}

/// Runs every settlement check on fresh ledgers from `make`.
pub fn run_all(make: Factory<'_>) {
    epochs_advance_and_survive_a_new_length(make().as_ref());
    sampling_consensus_pays_node_attestors_and_owner(make().as_ref());
    settlement_refusals_change_nothing(make().as_ref());
    attestors_are_distinct_and_never_the_seller(make().as_ref());
    silent_attestors_are_slashed(make().as_ref());
    a_different_commitment_opens_a_dispute(make().as_ref());
    a_cheating_node_loses_its_collateral_and_the_user_is_refunded(make().as_ref());
    an_honest_node_wins_and_is_paid(make().as_ref());
    silent_oracles_are_replaced_then_the_stack_is_void(make().as_ref());
    confidential_stacks_claim_directly(make().as_ref());
    expired_stacks_refund_their_owner(make().as_ref());
    collateral_and_reputation_gate_sampling(make().as_ref());
}

pub fn epochs_advance_and_survive_a_new_length(l: &dyn Ledger) {
    assert_eq!(l.epoch().unwrap(), 0);
    assert_eq!(l.advance_epoch().unwrap(), 1);
    assert_eq!(l.epoch().unwrap(), 1);
    let p = LedgerParams {
        epoch_ms: 3_600_000,
        ..l.params().unwrap()
    };
    l.set_params(addr(99), &p).unwrap();
    assert_eq!(l.params().unwrap(), p);
    assert_eq!(l.epoch().unwrap(), 1, "a new epoch length keeps the epoch");
    refused(
        l,
        "bad params",
        |e| matches!(e, LedgerError::Invalid(_)),
        || {
            l.set_params(
                addr(99),
                &LedgerParams {
                    attestation_probability_permille: 1001,
                    ..p.clone()
                },
            )
        },
    );
}

pub fn sampling_consensus_pays_node_attestors_and_owner(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::SamplingConsensus);
    always_attest(l, 2);
    let s = buy(l, &m, 1_000_000);
    assert_eq!(s.selected_node_id, m.nodes[0]);
    assert_eq!(s.escrowed, Amount(1_212), "1.212 x 1 000 per million");
    let t = l
        .try_settle_stack(
            owner(m.nodes[0]),
            m.nodes[0],
            s.small_id,
            ComputeUnits(500_000),
            &commitment(1),
        )
        .unwrap();
    assert_eq!(t.commitment, commitment(1));
    let asked: BTreeSet<_> = t.requested_attestation_nodes.iter().copied().collect();
    assert_eq!(asked, BTreeSet::from([m.nodes[1], m.nodes[2]]));
    assert_eq!(t.dispute_settled_at_epoch, l.epoch().unwrap() + 1);
    assert_eq!(l.ticket(s.small_id).unwrap(), Some(t.clone()));
    assert_eq!(l.open_tickets_of(m.nodes[1]).unwrap(), vec![t.clone()]);
    for n in &t.requested_attestation_nodes {
        l.submit_stack_settlement_attestation(owner(*n), *n, s.small_id, Hash32([1; 32]))
            .unwrap();
        assert!(l.open_tickets_of(*n).unwrap().is_empty());
    }
    let t = l.ticket(s.small_id).unwrap().unwrap();
    assert_eq!(t.already_attested_nodes.len(), 2);
    assert_eq!(
        t.dispute_settled_at_epoch,
        l.epoch().unwrap(),
        "all attested: claimable at once"
    );
    let (b1, b2, b3, bu) = (
        l.balance(owner(m.nodes[0])).unwrap(),
        l.balance(owner(m.nodes[1])).unwrap(),
        l.balance(owner(m.nodes[2])).unwrap(),
        l.balance(m.user).unwrap(),
    );
    let out = l
        .claim_funds(owner(m.nodes[0]), m.nodes[0], &[s.small_id])
        .unwrap();
    // Node: 500 000 units x 1 000 per million x 1.2 = 600; pool 6, 3 per attestor; the rest back.
    assert_eq!(out[0].node_fee, Amount(600));
    assert_eq!(out[0].user_refund_amount, Amount(1_212 - 600 - 6));
    assert_eq!(l.balance(owner(m.nodes[0])).unwrap().0, b1.0 + 600);
    assert_eq!(l.balance(owner(m.nodes[1])).unwrap().0, b2.0 + 3);
    assert_eq!(l.balance(owner(m.nodes[2])).unwrap().0, b3.0 + 3);
    assert_eq!(l.balance(m.user).unwrap().0, bu.0 + 606);
    assert!(l.stack(s.small_id).unwrap().is_claimed);
    assert!(l.ticket(s.small_id).unwrap().unwrap().is_claimed);
    assert_eq!(l.fee_treasury().unwrap(), Amount(0), "no escrow left");
    assert!(l.totals().unwrap().is_conserved());
    let node = l.node(m.nodes[0]).unwrap();
    assert_eq!(node.record.settled_on_time, 1);
    assert!(node.reputation_score > REPUTATION_SCORE_START);
    assert_eq!(l.node(m.nodes[1]).unwrap().record.attestations_made, 1);
    let names: Vec<&str> = l
        .events_after(EventCursor(0), 10_000)
        .unwrap()
        .iter()
        .map(|e| e.event.name())
        .collect();
    for want in [
        "StackTrySettleEvent",
        "NewStackSettlementAttestationEvent",
        "StackSettlementTicketEvent",
        "StackSettlementTicketClaimedEvent",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

pub fn settlement_refusals_change_nothing(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::SamplingConsensus);
    always_attest(l, 1);
    let (n1, n2, n3) = (m.nodes[0], m.nodes[1], m.nodes[2]);
    let s = buy(l, &m, 10_000).small_id;
    let settle = |who: NodeSmallId, units: u64| {
        l.try_settle_stack(owner(who), who, s, ComputeUnits(units), &commitment(7))
    };
    refused(
        l,
        "settling someone else's stack",
        |e| matches!(e, LedgerError::NodeNotSelectedForStack { .. }),
        || settle(n2, 10),
    );
    refused(
        l,
        "settling with another owner's key",
        |e| matches!(e, LedgerError::NotNodeOwner { .. }),
        || l.try_settle_stack(owner(n2), n1, s, ComputeUnits(1), &commitment(7)),
    );
    refused(
        l,
        "claiming more than the stack holds",
        |e| matches!(e, LedgerError::TooManyComputeUnits { .. }),
        || settle(n1, 10_001),
    );
    refused(
        l,
        "an empty blob id",
        |e| matches!(e, LedgerError::Invalid(_)),
        || {
            let mut c = commitment(7);
            c.blob_id.clear();
            l.try_settle_stack(owner(n1), n1, s, ComputeUnits(1), &c)
        },
    );
    refused(
        l,
        "claiming before settling",
        |e| matches!(e, LedgerError::NoTicket(_)),
        || l.claim_funds(owner(n1), n1, &[s]),
    );
    let t = settle(n1, 9_000).unwrap();
    let attestor = t.requested_attestation_nodes[0];
    let bystander = if attestor == n2 { n3 } else { n2 };
    refused(
        l,
        "a second ticket",
        |e| matches!(e, LedgerError::TicketExists(_)),
        || settle(n1, 9_000),
    );
    refused(
        l,
        "claiming before the window",
        |e| matches!(e, LedgerError::DisputeWindowOpen { .. }),
        || l.claim_funds(owner(n1), n1, &[s]),
    );
    refused(
        l,
        "attesting when not requested",
        |e| matches!(e, LedgerError::NotRequestedAttestor { .. }),
        || l.submit_stack_settlement_attestation(owner(bystander), bystander, s, Hash32([7; 32])),
    );
    refused(
        l,
        "the seller attesting itself",
        |e| matches!(e, LedgerError::NotRequestedAttestor { .. }),
        || l.submit_stack_settlement_attestation(owner(n1), n1, s, Hash32([7; 32])),
    );
    refused(
        l,
        "withdrawing collateral with an open ticket (seller)",
        |e| matches!(e, LedgerError::CollateralLocked { .. }),
        || l.withdraw_collateral(owner(n1), n1, Amount(1)),
    );
    refused(
        l,
        "withdrawing collateral with an open ticket (attestor)",
        |e| matches!(e, LedgerError::CollateralLocked { .. }),
        || l.withdraw_collateral(owner(attestor), attestor, Amount(1)),
    );
    refused(
        l,
        "a direct claim of a SamplingConsensus stack",
        |e| matches!(e, LedgerError::WrongSecurityLevel { .. }),
        || l.claim_funds_for_stacks(owner(n1), n1, &[(s, ComputeUnits(1))]),
    );
    refused(
        l,
        "closing an unexpired stack",
        |e| matches!(e, LedgerError::TicketExists(_)),
        || l.close_expired_stack(m.user, s),
    );
    refused(
        l,
        "resolving a dispute that was never opened",
        |e| matches!(e, LedgerError::NoDispute(_)),
        || l.resolve_attestation_dispute(owner(n2), n2, s, true),
    );
    l.advance_epoch().unwrap();
    refused(
        l,
        "attesting after the window",
        |e| matches!(e, LedgerError::DisputeWindowClosed { .. }),
        || l.submit_stack_settlement_attestation(owner(attestor), attestor, s, Hash32([7; 32])),
    );
    refused(
        l,
        "claiming someone else's ticket",
        |e| matches!(e, LedgerError::NodeNotSelectedForStack { .. }),
        || l.claim_funds(owner(n2), n2, &[s]),
    );
    refused(
        l,
        "claiming a stack twice in one call",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || l.claim_funds(owner(n1), n1, &[s, s]),
    );
    l.claim_funds(owner(n1), n1, &[s]).unwrap();
    refused(
        l,
        "claiming twice",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || l.claim_funds(owner(n1), n1, &[s]),
    );
    refused(
        l,
        "settling a claimed stack",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || settle(n1, 1),
    );
    // Closed ticket: the collateral is free again.
    l.withdraw_collateral(owner(n1), n1, Amount(1)).unwrap();
    assert!(l.totals().unwrap().is_conserved());
}

pub fn attestors_are_distinct_and_never_the_seller(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::SamplingConsensus);
    always_attest(l, 5);
    // Two more subscribers that must never be asked: another echelon, and no collateral
    // under a ledger minimum.
    let other_echelon = l.register_node(addr(4)).unwrap().small_id;
    l.add_node_to_model(addr(4), other_echelon, "m", 2).unwrap();
    let poor = l.register_node(addr(5)).unwrap().small_id;
    l.add_node_to_model(addr(5), poor, "m", 1).unwrap();
    for (who, n) in [(addr(4), other_echelon), (addr(5), poor)] {
        l.faucet(who, Amount(COLLATERAL)).unwrap();
        if n == other_echelon {
            l.deposit_collateral(who, n, Amount(COLLATERAL)).unwrap();
        }
        l.subscribe_node_to_task(who, n, m.task, Amount(5_000))
            .unwrap();
    }
    l.set_params(
        addr(99),
        &LedgerParams {
            min_collateral: Amount(1),
            ..l.params().unwrap()
        },
    )
    .unwrap();
    for i in 0..10u8 {
        let s = buy(l, &m, 1_000).small_id;
        let t = l
            .try_settle_stack(
                owner(m.nodes[0]),
                m.nodes[0],
                s,
                ComputeUnits(1),
                &commitment(i),
            )
            .unwrap();
        let asked = &t.requested_attestation_nodes;
        let distinct: BTreeSet<_> = asked.iter().collect();
        assert_eq!(distinct.len(), asked.len(), "without replacement");
        assert_eq!(
            distinct,
            BTreeSet::from([&m.nodes[1], &m.nodes[2]]),
            "only the eligible nodes, never the seller, another echelon or a poor node"
        );
    }
    // Probability 0: never attested.
    l.set_params(
        addr(99),
        &LedgerParams {
            attestation_probability_permille: 0,
            ..l.params().unwrap()
        },
    )
    .unwrap();
    let s = buy(l, &m, 1_000).small_id;
    let t = l
        .try_settle_stack(
            owner(m.nodes[0]),
            m.nodes[0],
            s,
            ComputeUnits(1),
            &commitment(9),
        )
        .unwrap();
    assert!(t.requested_attestation_nodes.is_empty());
}

pub fn silent_attestors_are_slashed(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::SamplingConsensus);
    always_attest(l, 1);
    let s = buy(l, &m, 1_000_000);
    let t = l
        .try_settle_stack(
            owner(m.nodes[0]),
            m.nodes[0],
            s.small_id,
            ComputeUnits(1_000_000),
            &commitment(3),
        )
        .unwrap();
    let silent = t.requested_attestation_nodes[0];
    l.advance_epoch().unwrap();
    let bu = l.balance(m.user).unwrap();
    let out = l
        .claim_funds(owner(m.nodes[0]), m.nodes[0], &[s.small_id])
        .unwrap();
    assert_eq!(out[0].node_fee, Amount(1_200));
    assert!(out[0].attestor_shares.is_empty());
    assert_eq!(
        out[0].slashed,
        vec![(silent, Amount(COLLATERAL / 10))],
        "10% of its collateral"
    );
    assert_eq!(
        l.balance(m.user).unwrap().0,
        bu.0 + 12,
        "the unearned pool goes back"
    );
    let n = l.node(silent).unwrap();
    assert_eq!(n.collateral, Amount(COLLATERAL - COLLATERAL / 10));
    assert_eq!(n.record.attestations_missed, 1);
    assert!(n.reputation_score < REPUTATION_SCORE_START);
    let t = l.totals().unwrap();
    assert_eq!(t.treasury, u128::from(COLLATERAL / 10));
    assert!(t.is_conserved());
}

pub fn confidential_stacks_claim_directly(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::ConfidentialCompute);
    let s = buy(l, &m, 100_000).small_id;
    let n1 = m.nodes[0];
    refused(
        l,
        "a ticket for a confidential stack",
        |e| matches!(e, LedgerError::WrongSecurityLevel { .. }),
        || l.try_settle_stack(owner(n1), n1, s, ComputeUnits(1), &commitment(5)),
    );
    refused(
        l,
        "a direct claim of too many units",
        |e| matches!(e, LedgerError::TooManyComputeUnits { .. }),
        || l.claim_funds_for_stacks(owner(n1), n1, &[(s, ComputeUnits(100_001))]),
    );
    let bu = l.balance(m.user).unwrap();
    let out = l
        .claim_funds_for_stacks(owner(n1), n1, &[(s, ComputeUnits(40_000))])
        .unwrap();
    assert_eq!(out[0].node_fee, Amount(40));
    assert_eq!(out[0].user_refund_amount, Amount(60));
    assert_eq!(l.balance(m.user).unwrap().0, bu.0 + 60);
    refused(
        l,
        "a second direct claim",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || l.claim_funds_for_stacks(owner(n1), n1, &[(s, ComputeUnits(1))]),
    );
    assert!(l.totals().unwrap().is_conserved());
}

pub fn expired_stacks_refund_their_owner(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::NoSecurity);
    l.set_params(
        addr(99),
        &LedgerParams {
            stack_expiry_epochs: 2,
            ..l.params().unwrap()
        },
    )
    .unwrap();
    let s = buy(l, &m, 50_000);
    l.advance_epoch().unwrap();
    refused(
        l,
        "closing before expiry",
        |e| matches!(e, LedgerError::NotExpired { .. }),
        || l.close_expired_stack(m.user, s.small_id),
    );
    l.advance_epoch().unwrap();
    refused(
        l,
        "closing someone else's stack",
        |e| matches!(e, LedgerError::NotStackOwner { .. }),
        || l.close_expired_stack(addr(51), s.small_id),
    );
    let before = l.balance(m.user).unwrap();
    assert_eq!(
        l.close_expired_stack(m.user, s.small_id).unwrap(),
        s.escrowed
    );
    assert_eq!(l.balance(m.user).unwrap().0, before.0 + s.escrowed.0);
    assert!(l.stack(s.small_id).unwrap().is_claimed);
    refused(
        l,
        "settling a closed stack",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || {
            l.try_settle_stack(
                owner(m.nodes[0]),
                m.nodes[0],
                s.small_id,
                ComputeUnits(1),
                &commitment(6),
            )
        },
    );
    assert!(l.totals().unwrap().is_conserved());
}

pub fn collateral_and_reputation_gate_sampling(l: &dyn Ledger) {
    let m = market(l, SecurityLevel::NoSecurity);
    let picky = l
        .create_task(
            addr(99),
            &NewTask {
                minimum_collateral: Amount(COLLATERAL + 1),
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    let n1 = m.nodes[0];
    l.subscribe_node_to_task(owner(n1), n1, picky, Amount(1_000))
        .unwrap();
    let req = StackRequest {
        task_small_id: picky,
        num_compute_units: ComputeUnits(1_000),
        price_per_one_million_compute_units: Amount(1_000),
    };
    refused(
        l,
        "buying from a node below the task's collateral",
        |e| matches!(e, LedgerError::NoEligibleNodes { .. }),
        || l.acquire_stack(m.user, &req),
    );
    l.faucet(owner(n1), Amount(1)).unwrap();
    assert_eq!(
        l.deposit_collateral(owner(n1), n1, Amount(1)).unwrap(),
        Amount(COLLATERAL + 1)
    );
    assert_eq!(l.acquire_stack(m.user, &req).unwrap().selected_node_id, n1);
    refused(
        l,
        "depositing more than the balance",
        |e| matches!(e, LedgerError::InsufficientBalance { .. }),
        || l.deposit_collateral(owner(n1), n1, Amount(u64::from(u32::MAX))),
    );
    refused(
        l,
        "withdrawing more than the collateral",
        |e| matches!(e, LedgerError::InsufficientCollateral { .. }),
        || l.withdraw_collateral(owner(m.nodes[1]), m.nodes[1], Amount(COLLATERAL + 1)),
    );
    // The score gates tasks that name a minimum: a node with a good record qualifies.
    let demanding = l
        .create_task(
            addr(99),
            &NewTask {
                minimum_reputation_score: 51,
                ..chat_task("m")
            },
        )
        .unwrap()
        .small_id;
    refused(
        l,
        "subscribing below the task's reputation",
        |e| matches!(e, LedgerError::ReputationTooLow { .. }),
        || l.subscribe_node_to_task(owner(n1), n1, demanding, Amount(1_000)),
    );
    let s = buy(l, &m, 1_000).small_id;
    l.try_settle_stack(owner(n1), n1, s, ComputeUnits(500), &commitment(8))
        .unwrap();
    l.advance_epoch().unwrap();
    l.claim_funds(owner(n1), n1, &[s]).unwrap();
    assert!(l.node(n1).unwrap().reputation_score >= 51);
    l.subscribe_node_to_task(owner(n1), n1, demanding, Amount(1_000))
        .unwrap();
    assert!(l.totals().unwrap().is_conserved());
}
