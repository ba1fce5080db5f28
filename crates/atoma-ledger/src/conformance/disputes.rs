//! Conformance of disputes: an attestor's different commitment opens one with an oracle drawn
//! by the ledger; a cheating node loses its collateral and the user is refunded; an honest node
//! wins and is paid; silent oracles are replaced until nobody is left and the stack is void.
//! Run by `settlement::run_all`.

use super::addr;
use super::settlement::{
    COLLATERAL, Market, always_attest, buy, commitment, market, owner, refused,
};
use crate::settlement::{DisputeClaim, DisputeOutcome};
use crate::*;

/// A SamplingConsensus stack settled by node 1 with one attestor; returns (stack, attestor,
/// the third node: the only possible oracle).
fn disputed_market(l: &dyn Ledger) -> (Market, StackSmallId, NodeSmallId, NodeSmallId) {
    let m = market(l, SecurityLevel::SamplingConsensus);
    always_attest(l, 1);
    let s = buy(l, &m, 1_000_000).small_id;
    let t = l
        .try_settle_stack(
            owner(m.nodes[0]),
            m.nodes[0],
            s,
            ComputeUnits(500_000),
            &commitment(4),
        )
        .unwrap();
    let a = t.requested_attestation_nodes[0];
    let third = *m
        .nodes
        .iter()
        .find(|n| **n != a && **n != m.nodes[0])
        .unwrap();
    (m, s, a, third)
}

fn claim(record: u64) -> DisputeClaim {
    DisputeClaim {
        attestation_commitment: Hash32([0xee; 32]),
        record: Some(record),
        position: Some(3),
    }
}

pub fn a_different_commitment_opens_a_dispute(l: &dyn Ledger) {
    let (m, s, a, oracle) = disputed_market(l);
    // An attestation with another root is a dispute.
    let t = l
        .submit_stack_settlement_attestation(owner(a), a, s, Hash32([0xee; 32]))
        .unwrap();
    assert!(t.is_in_dispute);
    let d = l.dispute(s).unwrap().unwrap();
    assert_eq!(
        (d.attestor, d.oracle),
        (a, Some(oracle)),
        "the only node left"
    );
    assert_eq!(d.claim.record, None);
    let last = l.events_after(EventCursor(0), 10_000).unwrap();
    assert_eq!(
        last.last().unwrap().event.name(),
        "StackAttestationDisputeEvent"
    );
    l.advance_epoch().unwrap();
    refused(
        l,
        "claiming a disputed ticket",
        |e| matches!(e, LedgerError::InDispute(_)),
        || l.claim_funds(owner(m.nodes[0]), m.nodes[0], &[s]),
    );
    for (who, what) in [(a, "the attestor"), (oracle, "the oracle")] {
        refused(
            l,
            &format!("{what} withdrawing during a dispute"),
            |e| matches!(e, LedgerError::CollateralLocked { .. }),
            || l.withdraw_collateral(owner(who), who, Amount(1)),
        );
    }
    refused(
        l,
        "resolving by a node that is not the oracle",
        |e| matches!(e, LedgerError::NotTheOracle { .. }),
        || l.resolve_attestation_dispute(owner(a), a, s, false),
    );
}

pub fn a_cheating_node_loses_its_collateral_and_the_user_is_refunded(l: &dyn Ledger) {
    let (m, s, a, oracle) = disputed_market(l);
    let d = l
        .start_attestation_dispute(owner(a), a, s, &claim(7))
        .unwrap();
    assert_eq!(d.claim, claim(7));
    let seller = m.nodes[0];
    let before = |n: NodeSmallId| l.balance(owner(n)).unwrap().0;
    let (b_oracle, b_attestor, b_user) = (before(oracle), before(a), l.balance(m.user).unwrap().0);
    let r = l
        .resolve_attestation_dispute(owner(oracle), oracle, s, false)
        .unwrap();
    assert_eq!(r.outcome, DisputeOutcome::NodeCheated);
    assert_eq!(r.slashed, Some((seller, Amount(COLLATERAL))));
    assert_eq!(r.oracle_share, Amount(COLLATERAL / 10));
    assert_eq!(r.honest_share, Amount(COLLATERAL / 5));
    assert_eq!(r.user_refund_amount, Amount(1_212), "the whole escrow");
    assert_eq!(before(oracle), b_oracle + COLLATERAL / 10);
    assert_eq!(before(a), b_attestor + COLLATERAL / 5);
    assert_eq!(l.balance(m.user).unwrap().0, b_user + 1_212);
    let n = l.node(seller).unwrap();
    assert_eq!((n.collateral, n.record.disputes_lost), (Amount(0), 1));
    assert!(l.stack(s).unwrap().is_claimed);
    refused(
        l,
        "claiming a cheated stack",
        |e| matches!(e, LedgerError::StackAlreadyClaimed(_)),
        || l.claim_funds(owner(seller), seller, &[s]),
    );
    refused(
        l,
        "resolving twice",
        |e| matches!(e, LedgerError::NoDispute(_)),
        || l.resolve_attestation_dispute(owner(oracle), oracle, s, true),
    );
    let t = l.totals().unwrap();
    assert_eq!(
        t.treasury,
        u128::from(COLLATERAL - COLLATERAL / 10 - COLLATERAL / 5)
    );
    assert!(t.is_conserved());
    assert_eq!(
        l.dispute(s).unwrap().unwrap().outcome,
        Some(DisputeOutcome::NodeCheated)
    );
}

pub fn an_honest_node_wins_and_is_paid(l: &dyn Ledger) {
    let (m, s, a, oracle) = disputed_market(l);
    l.start_attestation_dispute(owner(a), a, s, &claim(0))
        .unwrap();
    let seller = m.nodes[0];
    let b_seller = l.balance(owner(seller)).unwrap().0;
    let r = l
        .resolve_attestation_dispute(owner(oracle), oracle, s, true)
        .unwrap();
    assert_eq!(r.outcome, DisputeOutcome::NodeHonest);
    assert_eq!(r.slashed, Some((a, Amount(COLLATERAL))));
    assert_eq!(r.user_refund_amount, Amount(0));
    assert_eq!(
        l.balance(owner(seller)).unwrap().0,
        b_seller + COLLATERAL / 5
    );
    assert_eq!(l.node(a).unwrap().record.disputes_lost, 1);
    // The ticket is claimable at once; the disputer earned no share.
    let out = l.claim_funds(owner(seller), seller, &[s]).unwrap();
    assert_eq!(out[0].node_fee, Amount(600));
    assert!(out[0].attestor_shares.is_empty());
    assert!(l.totals().unwrap().is_conserved());
}

pub fn silent_oracles_are_replaced_then_the_stack_is_void(l: &dyn Ledger) {
    let (m, s, a, oracle) = disputed_market(l);
    // A fourth node, in the echelon with collateral, subscribed: the replacement.
    let spare = l.register_node(addr(4)).unwrap().small_id;
    l.add_node_to_model(addr(4), spare, "m", 1).unwrap();
    l.faucet(addr(4), Amount(COLLATERAL)).unwrap();
    l.deposit_collateral(addr(4), spare, Amount(COLLATERAL))
        .unwrap();
    l.subscribe_node_to_task(addr(4), spare, m.task, Amount(5_000))
        .unwrap();
    let d = l
        .start_attestation_dispute(owner(a), a, s, &claim(1))
        .unwrap();
    let first = d.oracle.unwrap();
    assert!(first == oracle || first == spare);
    refused(
        l,
        "expiring before the deadline",
        |e| matches!(e, LedgerError::OracleDeadline { .. }),
        || l.expire_dispute_oracle(addr(77), s),
    );
    for _ in 0..d.deadline_epoch - l.epoch().unwrap() {
        l.advance_epoch().unwrap();
    }
    refused(
        l,
        "resolving after the deadline",
        |e| matches!(e, LedgerError::OracleDeadline { .. }),
        || l.resolve_attestation_dispute(owner(first), first, s, true),
    );
    let d = l.expire_dispute_oracle(addr(77), s).unwrap();
    let second = d.oracle.unwrap();
    assert_ne!(second, first);
    assert_eq!(d.oracles_drawn, vec![first, second]);
    let slashed = l.node(first).unwrap();
    assert_eq!(slashed.collateral, Amount(COLLATERAL - COLLATERAL / 10));
    assert_eq!(slashed.record.attestations_missed, 1);
    for _ in 0..d.deadline_epoch - l.epoch().unwrap() {
        l.advance_epoch().unwrap();
    }
    let b_user = l.balance(m.user).unwrap().0;
    let d = l.expire_dispute_oracle(addr(77), s).unwrap();
    assert_eq!(d.oracle, None);
    assert_eq!(d.outcome, Some(DisputeOutcome::NoOracle));
    assert_eq!(
        l.balance(m.user).unwrap().0,
        b_user + 1_212,
        "void: refunded"
    );
    assert_eq!(l.node(m.nodes[0]).unwrap().collateral, Amount(COLLATERAL));
    assert_eq!(l.node(a).unwrap().collateral, Amount(COLLATERAL));
    assert!(l.stack(s).unwrap().is_claimed);
    assert!(l.totals().unwrap().is_conserved());
}
