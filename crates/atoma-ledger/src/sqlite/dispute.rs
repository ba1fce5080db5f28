//! Disputes on the embedded ledger: opened by an attestor, resolved by an oracle the ledger
//! draws (a node of the seller's echelon, subscribed to the task with capacity, collateral and
//! reputation, neither the seller nor the disputing attestor nor an oracle that already failed
//! this dispute), with a deadline.
//!
//! Outcomes: the loser's whole collateral is confiscated; the oracle gets
//! `⌈C × oracle_share⌉`, the honest party `⌊C × honest_share⌋`, the treasury the rest. A cheated
//! stack's owner gets the whole escrow back; an honest node's ticket becomes claimable at once.
//! A silent oracle loses its timeout share and is replaced; with nobody left to draw, the stack
//! is void: its owner is refunded and nobody is slashed.

use rusqlite::{Connection, OptionalExtension, params};

use super::market::{get_node, get_stack, get_task, ids, owned_node, required_collateral};
use super::money::{Account, transfer};
use super::settle::{bump, refund_rest, ticket_of};
use super::{current_epoch, db_err, draw, emit, load_params, to_i64};
use crate::events::LedgerEvent;
use crate::settlement::*;
use crate::types::*;
use crate::{LedgerError, Result};

fn hash_col(s: &str) -> Result<Hash32> {
    s.parse()
        .map_err(|e: String| LedgerError::Storage(format!("corrupt dispute digest: {e}")))
}

fn outcome_col(s: Option<String>) -> Result<Option<DisputeOutcome>> {
    Ok(match s.as_deref() {
        None => None,
        Some("node_honest") => Some(DisputeOutcome::NodeHonest),
        Some("node_cheated") => Some(DisputeOutcome::NodeCheated),
        Some("no_oracle") => Some(DisputeOutcome::NoOracle),
        Some(o) => return Err(LedgerError::Storage(format!("unknown outcome `{o}`"))),
    })
}

fn outcome_str(o: DisputeOutcome) -> &'static str {
    match o {
        DisputeOutcome::NodeHonest => "node_honest",
        DisputeOutcome::NodeCheated => "node_cheated",
        DisputeOutcome::NoOracle => "no_oracle",
    }
}

pub(super) fn get_dispute(c: &Connection, stack: StackSmallId) -> Result<Option<Dispute>> {
    let row = c
        .query_row(
            "SELECT attestor, commitment, opened_epoch, record, position, oracle, drawn, \
             deadline, outcome FROM disputes WHERE stack_small_id = ?1",
            [stack.0 as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?;
    let Some((attestor, commitment, opened, record, position, oracle, drawn, deadline, outcome)) =
        row
    else {
        return Ok(None);
    };
    Ok(Some(Dispute {
        stack_small_id: stack,
        attestor: NodeSmallId(attestor as u64),
        claim: DisputeClaim {
            attestation_commitment: hash_col(&commitment)?,
            record: record.map(|v| v as u64),
            position: position.map(|v| v as u64),
        },
        oracle: oracle.map(|v| NodeSmallId(v as u64)),
        oracles_drawn: serde_json::from_str(&drawn)
            .map_err(|e| LedgerError::Storage(format!("corrupt oracle list: {e}")))?,
        opened_at_epoch: opened as u64,
        deadline_epoch: deadline as u64,
        outcome: outcome_col(outcome)?,
    }))
}

fn open_dispute_of(c: &Connection, stack: StackSmallId) -> Result<Dispute> {
    get_dispute(c, stack)?
        .filter(|d| d.outcome.is_none())
        .ok_or(LedgerError::NoDispute(stack))
}

/// Draws an oracle for `t`'s dispute, excluding the seller, the attestor and `excluded`.
fn draw_oracle(
    c: &Connection,
    t: &SettlementTicket,
    attestor: NodeSmallId,
    excluded: &[NodeSmallId],
) -> Result<Option<NodeSmallId>> {
    let stack = get_stack(c, t.stack_small_id)?;
    let task = get_task(c, stack.task_small_id)?;
    let candidates = ids(
        c,
        "SELECT s.node_small_id FROM subscriptions s JOIN nodes n ON n.small_id = s.node_small_id \
         WHERE s.task_small_id = ?1 AND s.max_units >= ?2 AND n.disabled = 0 \
         AND n.collateral >= ?3 AND n.reputation >= ?4 ORDER BY s.node_small_id",
        params![
            task.small_id.0 as i64,
            stack.num_compute_units.0 as i64,
            to_i64(required_collateral(c, &task)?, "collateral")?,
            i64::from(task.minimum_reputation_score)
        ],
    )?;
    let seller_echelon = super::settle::echelon_of(c, &task, t.selected_node_id)?;
    let mut pool = Vec::new();
    for n in candidates.into_iter().map(NodeSmallId) {
        if n == t.selected_node_id || n == attestor || excluded.contains(&n) {
            continue;
        }
        if super::settle::echelon_of(c, &task, n)? == seller_echelon {
            pool.push(n);
        }
    }
    if pool.is_empty() {
        return Ok(None);
    }
    let r = draw(c, "oracle", &[t.stack_small_id.0, excluded.len() as u64])?;
    Ok(Some(pool[(r % pool.len() as u64) as usize]))
}

/// Opens a dispute on `t` for `attestor`'s `claim` (checks done by the caller).
pub(super) fn open(
    c: &Connection,
    t: &SettlementTicket,
    attestor: NodeSmallId,
    claim: &DisputeClaim,
) -> Result<Dispute> {
    let stack = t.stack_small_id;
    let epoch = current_epoch(c)?;
    let deadline = epoch.saturating_add(load_params(c)?.oracle_window_epochs);
    let oracle = draw_oracle(c, t, attestor, &[])?;
    c.execute(
        "UPDATE tickets SET in_dispute = 1 WHERE stack_small_id = ?1",
        [stack.0 as i64],
    )
    .map_err(db_err)?;
    let drawn: Vec<NodeSmallId> = oracle.into_iter().collect();
    c.execute(
        "INSERT INTO disputes (stack_small_id, attestor, commitment, opened_epoch, record, \
         position, oracle, drawn, deadline) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            stack.0 as i64,
            attestor.0 as i64,
            claim.attestation_commitment.to_string(),
            to_i64(epoch, "epoch")?,
            claim.record.map(|v| v as i64),
            claim.position.map(|v| v as i64),
            oracle.map(|o| o.0 as i64),
            serde_json::to_string(&drawn).map_err(|e| LedgerError::Storage(e.to_string()))?,
            to_i64(deadline, "epoch")?
        ],
    )
    .map_err(db_err)?;
    emit(
        c,
        &LedgerEvent::StackAttestationDisputeEvent {
            stack_small_id: stack,
            attestation_commitment: claim.attestation_commitment,
            attestation_node_id: attestor,
            original_node_id: t.selected_node_id,
            original_commitment: t.commitment.merkle_root,
            record: claim.record,
            position: claim.position,
            oracle_node_id: oracle,
            deadline_epoch: deadline,
        },
    )?;
    if oracle.is_none() {
        settle_void(c, t, None)?;
    }
    get_dispute(c, stack)?.ok_or(LedgerError::NoDispute(stack))
}

/// Ends a dispute nobody can resolve: the owner is refunded, nobody is slashed or paid.
fn settle_void(
    c: &Connection,
    t: &SettlementTicket,
    last_oracle: Option<NodeSmallId>,
) -> Result<DisputeResolution> {
    let stack = get_stack(c, t.stack_small_id)?;
    let refund = refund_rest(c, &stack, "dispute_void")?;
    close(c, t.stack_small_id, DisputeOutcome::NoOracle)?;
    let r = DisputeResolution {
        stack_small_id: t.stack_small_id,
        outcome: DisputeOutcome::NoOracle,
        slashed: None,
        oracle_share: Amount(0),
        honest_share: Amount(0),
        user_refund_amount: refund,
    };
    emit_resolved(c, &r, last_oracle)?;
    Ok(r)
}

fn close(c: &Connection, stack: StackSmallId, outcome: DisputeOutcome) -> Result<()> {
    c.execute(
        "UPDATE disputes SET outcome = ?1 WHERE stack_small_id = ?2",
        params![outcome_str(outcome), stack.0 as i64],
    )
    .map_err(db_err)?;
    if outcome != DisputeOutcome::NodeHonest {
        // The stack is over: nothing left to claim.
        c.execute(
            "UPDATE tickets SET claimed = 1, in_dispute = 0 WHERE stack_small_id = ?1",
            [stack.0 as i64],
        )
        .map_err(db_err)?;
        c.execute(
            "UPDATE stacks SET is_claimed = 1 WHERE small_id = ?1",
            [stack.0 as i64],
        )
        .map_err(db_err)?;
    }
    Ok(())
}

fn emit_resolved(c: &Connection, r: &DisputeResolution, oracle: Option<NodeSmallId>) -> Result<()> {
    emit(
        c,
        &LedgerEvent::StackDisputeResolvedEvent {
            stack_small_id: r.stack_small_id,
            oracle_node_id: oracle,
            outcome: r.outcome,
            slashed_node_id: r.slashed.map(|s| s.0),
            slashed_amount: r.slashed.map_or(Amount(0), |s| s.1),
            oracle_share: r.oracle_share,
            honest_share: r.honest_share,
            user_refund_amount: r.user_refund_amount,
        },
    )
}

pub(super) fn resolve(
    c: &Connection,
    sender: Address,
    oracle: NodeSmallId,
    stack_id: StackSmallId,
    node_was_honest: bool,
) -> Result<DisputeResolution> {
    owned_node(c, sender, oracle)?;
    let d = open_dispute_of(c, stack_id)?;
    if d.oracle != Some(oracle) {
        return Err(LedgerError::NotTheOracle {
            stack: stack_id,
            node: oracle,
        });
    }
    let epoch = current_epoch(c)?;
    if epoch >= d.deadline_epoch {
        return Err(LedgerError::OracleDeadline {
            stack: stack_id,
            deadline: d.deadline_epoch,
            epoch,
        });
    }
    let t = ticket_of(c, stack_id)?;
    let (loser, winner, outcome) = if node_was_honest {
        (d.attestor, t.selected_node_id, DisputeOutcome::NodeHonest)
    } else {
        (t.selected_node_id, d.attestor, DisputeOutcome::NodeCheated)
    };
    let p = load_params(c)?;
    let confiscated = get_node(c, loser)?.collateral.0;
    let oracle_share =
        (u128::from(confiscated) * u128::from(p.oracle_share_permille)).div_ceil(1000) as u64;
    let honest_share =
        (u128::from(confiscated) * u128::from(p.honest_share_permille) / 1000) as u64;
    let oracle_owner = get_node(c, oracle)?.owner;
    let winner_owner = get_node(c, winner)?.owner;
    let op = "dispute_slash";
    transfer(
        c,
        op,
        Account::Collateral(loser),
        Account::Balance(oracle_owner),
        oracle_share,
    )?;
    transfer(
        c,
        op,
        Account::Collateral(loser),
        Account::Balance(winner_owner),
        honest_share,
    )?;
    transfer(
        c,
        op,
        Account::Collateral(loser),
        Account::Treasury,
        confiscated - oracle_share - honest_share,
    )?;
    bump(c, loser, "disputes_lost")?;
    emit(
        c,
        &LedgerEvent::NodeSlashedEvent {
            node_small_id: loser,
            amount: Amount(confiscated),
            reason: "dispute_lost".into(),
        },
    )?;
    let user_refund_amount = if node_was_honest {
        // The ticket goes on: claimable now, as if every attestor had agreed.
        c.execute(
            "UPDATE tickets SET in_dispute = 0, window_end = ?1 WHERE stack_small_id = ?2",
            params![to_i64(epoch, "epoch")?, stack_id.0 as i64],
        )
        .map_err(db_err)?;
        Amount(0)
    } else {
        refund_rest(c, &get_stack(c, stack_id)?, "dispute_refund")?
    };
    close(c, stack_id, outcome)?;
    let r = DisputeResolution {
        stack_small_id: stack_id,
        outcome,
        slashed: Some((loser, Amount(confiscated))),
        oracle_share: Amount(oracle_share),
        honest_share: Amount(honest_share),
        user_refund_amount,
    };
    emit_resolved(c, &r, Some(oracle))?;
    Ok(r)
}

pub(super) fn expire_oracle(
    c: &Connection,
    _sender: Address,
    stack_id: StackSmallId,
) -> Result<Dispute> {
    let d = open_dispute_of(c, stack_id)?;
    let epoch = current_epoch(c)?;
    let Some(silent) = d.oracle else {
        return Err(LedgerError::NoDispute(stack_id));
    };
    if epoch < d.deadline_epoch {
        return Err(LedgerError::OracleDeadline {
            stack: stack_id,
            deadline: d.deadline_epoch,
            epoch,
        });
    }
    let p = load_params(c)?;
    let have = u128::from(get_node(c, silent)?.collateral.0);
    let cut = (have * u128::from(p.timeout_slash_permille)).div_ceil(1000) as u64;
    transfer(
        c,
        "slash_oracle_timeout",
        Account::Collateral(silent),
        Account::Treasury,
        cut,
    )?;
    bump(c, silent, "attestations_missed")?;
    emit(
        c,
        &LedgerEvent::NodeSlashedEvent {
            node_small_id: silent,
            amount: Amount(cut),
            reason: "oracle_timeout".into(),
        },
    )?;
    let t = ticket_of(c, stack_id)?;
    let next = draw_oracle(c, &t, d.attestor, &d.oracles_drawn)?;
    let deadline = epoch.saturating_add(p.oracle_window_epochs);
    let mut drawn = d.oracles_drawn.clone();
    drawn.extend(next);
    c.execute(
        "UPDATE disputes SET oracle = ?1, drawn = ?2, deadline = ?3 WHERE stack_small_id = ?4",
        params![
            next.map(|o| o.0 as i64),
            serde_json::to_string(&drawn).map_err(|e| LedgerError::Storage(e.to_string()))?,
            to_i64(deadline, "epoch")?,
            stack_id.0 as i64
        ],
    )
    .map_err(db_err)?;
    emit(
        c,
        &LedgerEvent::DisputeOracleReassignedEvent {
            stack_small_id: stack_id,
            previous_oracle_node_id: silent,
            oracle_node_id: next,
            deadline_epoch: deadline,
        },
    )?;
    if next.is_none() {
        settle_void(c, &t, Some(silent))?;
    }
    get_dispute(c, stack_id)?.ok_or(LedgerError::NoDispute(stack_id))
}
