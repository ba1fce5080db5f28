//! Settlement on the embedded ledger: a stack's node opens a ticket with its log's commitment;
//! for SamplingConsensus tasks the ledger may sample attestors (without replacement, never the
//! settling node, same echelon, subscribed with enough capacity, collateral and reputation);
//! attestors confirm or dispute before the window ends; after it the node claims (its fee,
//! the attestors' pool, slashes for silent attestors, the owner's refund). Also the
//! ConfidentialCompute direct claim, the owner's close of an expired stack, and the reputation
//! counters these outcomes move.

use rusqlite::{Connection, OptionalExtension, params};

use super::market::{get_node, get_stack, get_task, ids, owned_node, required_collateral};
use super::money::{Account, transfer};
use super::{current_epoch, db_err, draw, emit, load_params, to_i64};
use crate::events::LedgerEvent;
use crate::settlement::*;
use crate::types::*;
use crate::{LedgerError, Result};

fn hash_col(s: String) -> Result<Hash32> {
    s.parse()
        .map_err(|e: String| LedgerError::Storage(format!("corrupt ticket digest: {e}")))
}

pub(super) fn get_ticket(c: &Connection, stack: StackSmallId) -> Result<Option<SettlementTicket>> {
    let row = c
        .query_row(
            "SELECT selected_node_id, claimed_units, merkle_root, leaf_count, blob_id, blob_hash, \
             created_epoch, window_end, in_dispute, claimed, blob_size, sample_seed FROM tickets \
             WHERE stack_small_id = ?1",
            [stack.0 as i64],
            |r| {
                Ok((
                    [r.get::<_, i64>(0)?, r.get::<_, i64>(1)?],
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    [r.get::<_, i64>(6)?, r.get::<_, i64>(7)?],
                    r.get::<_, bool>(8)?,
                    r.get::<_, bool>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, String>(11)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?;
    let Some((v, root, leaves, blob_id, blob_hash, epochs, in_dispute, claimed, size, seed)) = row
    else {
        return Ok(None);
    };
    let requested = ids(
        c,
        "SELECT node_small_id FROM ticket_attestors WHERE stack_small_id = ?1 ORDER BY position",
        [stack.0 as i64],
    )?;
    let attested = ids(
        c,
        "SELECT node_small_id FROM ticket_attestors WHERE stack_small_id = ?1 \
         AND attested_seq IS NOT NULL ORDER BY attested_seq",
        [stack.0 as i64],
    )?;
    Ok(Some(SettlementTicket {
        stack_small_id: stack,
        selected_node_id: NodeSmallId(v[0] as u64),
        num_claimed_compute_units: ComputeUnits(v[1] as u64),
        commitment: StackCommitment {
            merkle_root: hash_col(root)?,
            leaf_count: leaves as u64,
            blob_id,
            blob_hash: hash_col(blob_hash)?,
            blob_size: size as u64,
        },
        requested_attestation_nodes: requested.into_iter().map(NodeSmallId).collect(),
        already_attested_nodes: attested.into_iter().map(NodeSmallId).collect(),
        created_at_epoch: epochs[0] as u64,
        dispute_settled_at_epoch: epochs[1] as u64,
        is_in_dispute: in_dispute,
        is_claimed: claimed,
        sample_seed: hash_col(seed)?,
    }))
}

pub(super) fn ticket_of(c: &Connection, stack: StackSmallId) -> Result<SettlementTicket> {
    get_ticket(c, stack)?.ok_or(LedgerError::NoTicket(stack))
}

pub(super) fn open_tickets_of(c: &Connection, node: NodeSmallId) -> Result<Vec<SettlementTicket>> {
    ids(
        c,
        "SELECT stack_small_id FROM tickets WHERE claimed = 0 AND (selected_node_id = ?1 \
         OR stack_small_id IN (SELECT stack_small_id FROM ticket_attestors \
         WHERE node_small_id = ?1 AND attested_seq IS NULL) \
         OR stack_small_id IN (SELECT stack_small_id FROM disputes \
         WHERE oracle = ?1 AND outcome IS NULL)) ORDER BY stack_small_id",
        [node.0 as i64],
    )?
    .into_iter()
    .map(|s| ticket_of(c, StackSmallId(s)))
    .collect()
}

/// Adds one to a node's reputation counter and emits the new score if it changed.
pub(super) fn bump(c: &Connection, node: NodeSmallId, counter: &str) -> Result<()> {
    let before = get_node(c, node)?.reputation_score;
    // `counter` is one of our own column names, never input.
    c.execute(
        &format!("UPDATE nodes SET {counter} = {counter} + 1 WHERE small_id = ?1"),
        [node.0 as i64],
    )
    .map_err(db_err)?;
    let after = get_node(c, node)?.reputation_score;
    c.execute(
        "UPDATE nodes SET reputation = ?1 WHERE small_id = ?2",
        params![i64::from(after), node.0 as i64],
    )
    .map_err(db_err)?;
    if after != before {
        emit(
            c,
            &LedgerEvent::NodeReputationUpdatedEvent {
                node_small_id: node,
                reputation_score: after,
            },
        )?;
    }
    Ok(())
}

/// The echelon `n` serves the task's model in (-1: none, or the task names no model).
pub(super) fn echelon_of(c: &Connection, task: &Task, n: NodeSmallId) -> Result<i64> {
    let Some(model) = &task.model_name else {
        return Ok(-1);
    };
    Ok(c.query_row(
        "SELECT echelon_id FROM node_models WHERE node_small_id = ?1 AND model_name = ?2",
        params![n.0 as i64, model],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map_err(db_err)?
    .unwrap_or(-1))
}

/// Samples the attestors of a SamplingConsensus settlement: a roll against the probability,
/// then `attestation_nodes` distinct nodes by a partial Fisher–Yates shuffle.
fn sample_attestors(
    c: &Connection,
    stack: &Stack,
    task: &Task,
    params: &LedgerParams,
) -> Result<Vec<NodeSmallId>> {
    let roll = draw(c, "attestation-roll", &[stack.small_id.0])? % 1000 + 1;
    if roll > u64::from(params.attestation_probability_permille) || params.attestation_nodes == 0 {
        return Ok(Vec::new());
    }
    let echelon = |n: NodeSmallId| echelon_of(c, task, n);
    let mut pool = ids(
        c,
        "SELECT s.node_small_id FROM subscriptions s JOIN nodes n ON n.small_id = s.node_small_id \
         WHERE s.task_small_id = ?1 AND s.max_units >= ?2 AND n.disabled = 0 \
         AND n.collateral >= ?3 AND n.reputation >= ?4 AND n.small_id != ?5 \
         ORDER BY s.node_small_id",
        params![
            task.small_id.0 as i64,
            stack.num_compute_units.0 as i64,
            to_i64(required_collateral(c, task)?, "collateral")?,
            i64::from(task.minimum_reputation_score),
            stack.selected_node_id.0 as i64
        ],
    )?;
    let wanted = echelon(stack.selected_node_id)?;
    let mut same = Vec::with_capacity(pool.len());
    for n in pool.drain(..) {
        if echelon(NodeSmallId(n))? == wanted {
            same.push(n);
        }
    }
    let k = usize::from(params.attestation_nodes).min(same.len());
    for i in 0..k {
        let r = draw(c, "attestor", &[stack.small_id.0, i as u64])?;
        let j = i + (r % (same.len() - i) as u64) as usize;
        same.swap(i, j);
    }
    same.truncate(k);
    Ok(same.into_iter().map(NodeSmallId).collect())
}

pub(super) fn try_settle_stack(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    stack_id: StackSmallId,
    claimed: ComputeUnits,
    commitment: &StackCommitment,
) -> Result<SettlementTicket> {
    owned_node(c, sender, node)?;
    let stack = get_stack(c, stack_id)?;
    if stack.selected_node_id != node {
        return Err(LedgerError::NodeNotSelectedForStack {
            stack: stack_id,
            node,
            selected: stack.selected_node_id,
        });
    }
    if stack.is_claimed {
        return Err(LedgerError::StackAlreadyClaimed(stack_id));
    }
    if claimed > stack.num_compute_units {
        return Err(LedgerError::TooManyComputeUnits {
            stack: stack_id,
            claimed: claimed.0,
            units: stack.num_compute_units.0,
        });
    }
    if get_ticket(c, stack_id)?.is_some() {
        return Err(LedgerError::TicketExists(stack_id));
    }
    let task = get_task(c, stack.task_small_id)?;
    if task.security_level == SecurityLevel::ConfidentialCompute {
        return Err(LedgerError::WrongSecurityLevel {
            stack: stack_id,
            level: task.security_level,
            needed: "a settlement ticket; ConfidentialCompute stacks use claim_funds_for_stacks",
        });
    }
    // A root-only commitment is the deployed Sui contract's shape (the test double runs it
    // here); any other must say where its log is.
    let id = &commitment.blob_id;
    if (id.is_empty() && !commitment.is_root_only())
        || id.len() > MAX_BLOB_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(LedgerError::Invalid(format!(
            "blob id `{id}` must be 1 to {MAX_BLOB_ID_LEN} printable ASCII characters"
        )));
    }
    let p = load_params(c)?;
    let epoch = current_epoch(c)?;
    let window_end = epoch.saturating_add(p.dispute_window_epochs);
    let sample_seed = {
        let mut h = [0u8; 32];
        for (i, chunk) in h.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&draw(c, "sample-seed", &[stack_id.0, i as u64])?.to_le_bytes());
        }
        Hash32(h)
    };
    let attestors = match task.security_level {
        SecurityLevel::SamplingConsensus => sample_attestors(c, &stack, &task, &p)?,
        _ => Vec::new(),
    };
    c.execute(
        "INSERT INTO tickets (stack_small_id, selected_node_id, claimed_units, merkle_root, \
         leaf_count, blob_id, blob_hash, created_epoch, window_end, blob_size, sample_seed) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            stack_id.0 as i64,
            node.0 as i64,
            claimed.0 as i64,
            commitment.merkle_root.to_string(),
            to_i64(commitment.leaf_count, "leaf count")?,
            commitment.blob_id,
            commitment.blob_hash.to_string(),
            to_i64(epoch, "epoch")?,
            to_i64(window_end, "epoch")?,
            to_i64(commitment.blob_size, "blob size")?,
            sample_seed.to_string()
        ],
    )
    .map_err(db_err)?;
    for (i, a) in attestors.iter().enumerate() {
        c.execute(
            "INSERT INTO ticket_attestors (stack_small_id, node_small_id, position) \
             VALUES (?1, ?2, ?3)",
            params![stack_id.0 as i64, a.0 as i64, i as i64],
        )
        .map_err(db_err)?;
    }
    emit(
        c,
        &LedgerEvent::StackTrySettleEvent {
            stack_small_id: stack_id,
            selected_node_id: node,
            requested_attestation_nodes: attestors,
            committed_stack_proof: commitment.merkle_root,
            stack_merkle_leaf: commitment.merkle_root,
            num_claimed_compute_units: claimed,
            leaf_count: commitment.leaf_count,
            blob_id: commitment.blob_id.clone(),
            blob_hash: commitment.blob_hash,
            blob_size: commitment.blob_size,
            dispute_settled_at_epoch: window_end,
            sample_seed,
        },
    )?;
    ticket_of(c, stack_id)
}

/// Checks shared by attestations and disputes: a requested attestor that has not attested yet,
/// on an open SamplingConsensus ticket, before its window ends.
fn attestor_may_act(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    stack: StackSmallId,
) -> Result<SettlementTicket> {
    owned_node(c, sender, node)?;
    let t = ticket_of(c, stack)?;
    if t.is_claimed {
        return Err(LedgerError::StackAlreadyClaimed(stack));
    }
    let task = get_task(c, get_stack(c, stack)?.task_small_id)?;
    if task.security_level != SecurityLevel::SamplingConsensus {
        return Err(LedgerError::WrongSecurityLevel {
            stack,
            level: task.security_level,
            needed: "SamplingConsensus for attestations and disputes",
        });
    }
    if !t.requested_attestation_nodes.contains(&node) {
        return Err(LedgerError::NotRequestedAttestor { stack, node });
    }
    if t.already_attested_nodes.contains(&node) {
        return Err(LedgerError::AlreadyAttested { stack, node });
    }
    if t.is_in_dispute {
        return Err(LedgerError::InDispute(stack));
    }
    let epoch = current_epoch(c)?;
    if epoch >= t.dispute_settled_at_epoch {
        return Err(LedgerError::DisputeWindowClosed {
            stack,
            until: t.dispute_settled_at_epoch,
            epoch,
        });
    }
    Ok(t)
}

pub(super) fn attest(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    stack: StackSmallId,
    proof: Hash32,
) -> Result<SettlementTicket> {
    let t = attestor_may_act(c, sender, node, stack)?;
    if proof != t.commitment.merkle_root {
        let claim = DisputeClaim {
            attestation_commitment: proof,
            record: None,
            position: None,
        };
        super::dispute::open(c, &t, node, &claim)?;
        return ticket_of(c, stack);
    }
    let seq: i64 = c
        .query_row(
            "SELECT COALESCE(MAX(attested_seq), 0) + 1 FROM ticket_attestors \
             WHERE stack_small_id = ?1",
            [stack.0 as i64],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    c.execute(
        "UPDATE ticket_attestors SET attested_seq = ?1 WHERE stack_small_id = ?2 \
         AND node_small_id = ?3",
        params![seq, stack.0 as i64, node.0 as i64],
    )
    .map_err(db_err)?;
    bump(c, node, "attestations_made")?;
    emit(
        c,
        &LedgerEvent::NewStackSettlementAttestationEvent {
            stack_small_id: stack,
            attestation_node_id: node,
            committed_stack_proof: proof,
            stack_merkle_leaf: proof,
        },
    )?;
    let t = ticket_of(c, stack)?;
    if t.already_attested_nodes.len() == t.requested_attestation_nodes.len() {
        // Everyone agreed: no dispute can come, the node may claim now.
        let epoch = current_epoch(c)?;
        c.execute(
            "UPDATE tickets SET window_end = ?1 WHERE stack_small_id = ?2",
            params![to_i64(epoch, "epoch")?, stack.0 as i64],
        )
        .map_err(db_err)?;
        emit(
            c,
            &LedgerEvent::StackSettlementTicketEvent {
                stack_small_id: stack,
                selected_node_id: t.selected_node_id,
                num_claimed_compute_units: t.num_claimed_compute_units,
                requested_attestation_nodes: t.requested_attestation_nodes.clone(),
                dispute_settled_at_epoch: epoch,
                committed_stack_proof: t.commitment.merkle_root,
            },
        )?;
        return ticket_of(c, stack);
    }
    Ok(t)
}

pub(super) fn start_dispute(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    stack: StackSmallId,
    claim: &DisputeClaim,
) -> Result<Dispute> {
    let t = attestor_may_act(c, sender, node, stack)?;
    super::dispute::open(c, &t, node, claim)
}

/// Pays out one settled ticket; the caller checked who claims.
fn pay_out(c: &Connection, t: &SettlementTicket) -> Result<ClaimOutcome> {
    let stack = get_stack(c, t.stack_small_id)?;
    let task = get_task(c, stack.task_small_id)?;
    let level = task.security_level;
    let price = stack.price_per_one_million_compute_units;
    let claimed = t.num_claimed_compute_units;
    let overflow = || LedgerError::Invalid("a fee overflows".into());
    let node_fee = level.node_fee(price, claimed).ok_or_else(overflow)?;
    let node = get_node(c, t.selected_node_id)?;
    let op = "claim_funds";
    transfer(
        c,
        op,
        Account::Escrow(stack.small_id),
        Account::Balance(node.owner),
        node_fee.0,
    )?;
    let mut shares = Vec::new();
    if !t.already_attested_nodes.is_empty() {
        let pool = level.attestor_pool(price, claimed).ok_or_else(overflow)?;
        let each = pool.0 / t.already_attested_nodes.len() as u64;
        for a in &t.already_attested_nodes {
            let owner = get_node(c, *a)?.owner;
            transfer(
                c,
                op,
                Account::Escrow(stack.small_id),
                Account::Balance(owner),
                each,
            )?;
            shares.push((*a, Amount(each)));
        }
    }
    let permille = u128::from(load_params(c)?.timeout_slash_permille);
    let mut slashed = Vec::new();
    for a in &t.requested_attestation_nodes {
        if t.already_attested_nodes.contains(a) {
            continue;
        }
        let have = u128::from(get_node(c, *a)?.collateral.0);
        let cut = (have * permille).div_ceil(1000) as u64;
        transfer(
            c,
            "slash_attestation_timeout",
            Account::Collateral(*a),
            Account::Treasury,
            cut,
        )?;
        bump(c, *a, "attestations_missed")?;
        emit(
            c,
            &LedgerEvent::NodeSlashedEvent {
                node_small_id: *a,
                amount: Amount(cut),
                reason: "attestation_timeout".into(),
            },
        )?;
        slashed.push((*a, Amount(cut)));
    }
    let refund = refund_rest(c, &stack, op)?;
    c.execute(
        "UPDATE stacks SET is_claimed = 1 WHERE small_id = ?1",
        [stack.small_id.0 as i64],
    )
    .map_err(db_err)?;
    bump(c, t.selected_node_id, "settled_on_time")?;
    Ok(ClaimOutcome {
        stack_small_id: stack.small_id,
        num_claimed_compute_units: claimed,
        node_fee,
        attestor_shares: shares,
        user_refund_amount: refund,
        slashed,
    })
}

/// Returns what is left of a stack's escrow to its owner.
pub(super) fn refund_rest(c: &Connection, stack: &Stack, op: &str) -> Result<Amount> {
    let left: i64 = c
        .query_row(
            "SELECT escrow_left FROM stacks WHERE small_id = ?1",
            [stack.small_id.0 as i64],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    transfer(
        c,
        op,
        Account::Escrow(stack.small_id),
        Account::Balance(stack.owner),
        left as u64,
    )?;
    Ok(Amount(left as u64))
}

pub(super) fn claim_funds(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    stacks: &[StackSmallId],
) -> Result<Vec<ClaimOutcome>> {
    owned_node(c, sender, node)?;
    if stacks.is_empty() {
        return Err(LedgerError::Invalid("no stacks to claim".into()));
    }
    let epoch = current_epoch(c)?;
    let mut out = Vec::with_capacity(stacks.len());
    for &stack in stacks {
        let t = ticket_of(c, stack)?;
        if t.selected_node_id != node {
            return Err(LedgerError::NodeNotSelectedForStack {
                stack,
                node,
                selected: t.selected_node_id,
            });
        }
        if t.is_claimed {
            return Err(LedgerError::StackAlreadyClaimed(stack));
        }
        if t.is_in_dispute {
            return Err(LedgerError::InDispute(stack));
        }
        if epoch < t.dispute_settled_at_epoch {
            return Err(LedgerError::DisputeWindowOpen {
                stack,
                from: t.dispute_settled_at_epoch,
                epoch,
            });
        }
        let o = pay_out(c, &t)?;
        c.execute(
            "UPDATE tickets SET claimed = 1 WHERE stack_small_id = ?1",
            [stack.0 as i64],
        )
        .map_err(db_err)?;
        emit(
            c,
            &LedgerEvent::StackSettlementTicketClaimedEvent {
                stack_small_id: stack,
                selected_node_id: node,
                attestation_nodes: t.already_attested_nodes.clone(),
                num_claimed_compute_units: t.num_claimed_compute_units,
                user_refund_amount: o.user_refund_amount,
                node_fee: o.node_fee,
                attestor_share: o.attestor_shares.first().map_or(Amount(0), |s| s.1),
            },
        )?;
        out.push(o);
    }
    Ok(out)
}

pub(super) fn claim_confidential(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    claims: &[(StackSmallId, ComputeUnits)],
) -> Result<Vec<ClaimOutcome>> {
    owned_node(c, sender, node)?;
    if claims.is_empty() {
        return Err(LedgerError::Invalid("no stacks to claim".into()));
    }
    let mut out = Vec::with_capacity(claims.len());
    for &(stack_id, claimed) in claims {
        let stack = get_stack(c, stack_id)?;
        let task = get_task(c, stack.task_small_id)?;
        if task.security_level != SecurityLevel::ConfidentialCompute {
            return Err(LedgerError::WrongSecurityLevel {
                stack: stack_id,
                level: task.security_level,
                needed: "ConfidentialCompute for a direct claim (others settle with a ticket)",
            });
        }
        if stack.selected_node_id != node {
            return Err(LedgerError::NodeNotSelectedForStack {
                stack: stack_id,
                node,
                selected: stack.selected_node_id,
            });
        }
        if stack.is_claimed {
            return Err(LedgerError::StackAlreadyClaimed(stack_id));
        }
        if claimed > stack.num_compute_units {
            return Err(LedgerError::TooManyComputeUnits {
                stack: stack_id,
                claimed: claimed.0,
                units: stack.num_compute_units.0,
            });
        }
        let node_fee = task
            .security_level
            .node_fee(stack.price_per_one_million_compute_units, claimed)
            .ok_or_else(|| LedgerError::Invalid("a fee overflows".into()))?;
        let owner = get_node(c, node)?.owner;
        let op = "claim_funds_for_stacks";
        transfer(
            c,
            op,
            Account::Escrow(stack_id),
            Account::Balance(owner),
            node_fee.0,
        )?;
        let refund = refund_rest(c, &stack, op)?;
        c.execute(
            "UPDATE stacks SET is_claimed = 1 WHERE small_id = ?1",
            [stack_id.0 as i64],
        )
        .map_err(db_err)?;
        bump(c, node, "settled_on_time")?;
        emit(
            c,
            &LedgerEvent::ClaimedStackEvent {
                stack_small_id: stack_id,
                selected_node_id: node,
                num_claimed_compute_units: claimed,
                user_refund_amount: refund,
            },
        )?;
        out.push(ClaimOutcome {
            stack_small_id: stack_id,
            num_claimed_compute_units: claimed,
            node_fee,
            attestor_shares: Vec::new(),
            user_refund_amount: refund,
            slashed: Vec::new(),
        });
    }
    Ok(out)
}

pub(super) fn close_expired_stack(
    c: &Connection,
    sender: Address,
    stack_id: StackSmallId,
) -> Result<Amount> {
    let stack = get_stack(c, stack_id)?;
    if stack.owner != sender {
        return Err(LedgerError::NotStackOwner {
            sender,
            stack: stack_id,
        });
    }
    if stack.is_claimed {
        return Err(LedgerError::StackAlreadyClaimed(stack_id));
    }
    if get_ticket(c, stack_id)?.is_some() {
        return Err(LedgerError::TicketExists(stack_id));
    }
    let p = load_params(c)?;
    let epoch = current_epoch(c)?;
    let at = if p.stack_expiry_epochs == 0 {
        u64::MAX
    } else {
        stack.created_at_epoch.saturating_add(p.stack_expiry_epochs)
    };
    if epoch < at {
        return Err(LedgerError::NotExpired {
            stack: stack_id,
            at,
            epoch,
        });
    }
    let refund = refund_rest(c, &stack, "close_expired_stack")?;
    c.execute(
        "UPDATE stacks SET is_claimed = 1 WHERE small_id = ?1",
        [stack_id.0 as i64],
    )
    .map_err(db_err)?;
    emit(
        c,
        &LedgerEvent::StackExpiredEvent {
            stack_small_id: stack_id,
            owner: sender,
            user_refund_amount: refund,
        },
    )?;
    Ok(refund)
}
