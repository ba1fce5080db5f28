//! The durable rows of the node's settlement duties, so that each survives a crash at any step
//! and is never done twice.
//!
//! A stack the node sold moves `open → frozen → log_put → submitted → claimed` (or `closed`
//! when its owner closed it after expiry). Each step's outcome is recorded in the transaction
//! that advances the state, after the side effect it stands for (the freeze itself, the blob on
//! the DA store, the ticket on the ledger, the claim): a crash between a side effect and its
//! record makes the step run again, and every step is idempotent (the DA put of the same bytes
//! gives the same blob; the ledger holds at most one ticket and one claim per stack, which the
//! duty reads back before acting).
//!
//! Attestation jobs (a ticket naming this node) are rows too: `pending → attested | disputed`,
//! and so are oracle jobs (a dispute the ledger handed this node): `pending → resolved`.
//! Earnings (fees as seller, shares as attestor, oracle and honest party) are recorded from the
//! ledger's events.

use atoma_ledger::{Hash32, LedgerEvent, NodeSmallId, StackCommitment, StackSmallId};
use rusqlite::{Connection, OptionalExtension, params};

use crate::meter::{Meter, MeterError, now_ms};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attestations (
  stack_small_id INTEGER NOT NULL, node_small_id INTEGER NOT NULL,
  selected_node_id INTEGER NOT NULL, claimed_units INTEGER NOT NULL,
  merkle_root TEXT NOT NULL, leaf_count INTEGER NOT NULL, blob_id TEXT NOT NULL,
  blob_hash TEXT NOT NULL, blob_size INTEGER NOT NULL, window_end INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'attested', 'disputed', 'missed')),
  detail TEXT, PRIMARY KEY (stack_small_id, node_small_id));
CREATE TABLE IF NOT EXISTS oracle_jobs (
  stack_small_id INTEGER NOT NULL, node_small_id INTEGER NOT NULL, deadline INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending', detail TEXT,
  PRIMARY KEY (stack_small_id, node_small_id));
CREATE TABLE IF NOT EXISTS earnings (
  stack_small_id INTEGER NOT NULL, node_small_id INTEGER NOT NULL, role TEXT NOT NULL,
  amount INTEGER NOT NULL, PRIMARY KEY (stack_small_id, node_small_id, role));
";

fn db(e: rusqlite::Error) -> MeterError {
    MeterError::Storage(e.to_string())
}

/// Where a stack's settlement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleState {
    Open,
    Frozen,
    LogPut,
    Submitted,
    Claimed,
    Closed,
}

impl SettleState {
    fn from_column(s: Option<&str>) -> Result<Self, MeterError> {
        Ok(match s {
            None => Self::Open,
            Some("frozen") => Self::Frozen,
            Some("log_put") => Self::LogPut,
            Some("submitted") => Self::Submitted,
            Some("claimed") => Self::Claimed,
            Some("closed") => Self::Closed,
            Some(other) => {
                return Err(MeterError::Storage(format!(
                    "unknown settlement state `{other}`"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Frozen => "frozen",
            Self::LogPut => "log_put",
            Self::Submitted => "submitted",
            Self::Claimed => "claimed",
            Self::Closed => "closed",
        }
    }
}

/// One stack the node sold, as the settlement duty sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackSettlement {
    pub stack: StackSmallId,
    pub selected_node_id: NodeSmallId,
    pub task_small_id: u64,
    pub owner: String,
    pub price: u64,
    pub num_compute_units: u64,
    /// Units charged or reserved.
    pub units_used: u64,
    /// Of which reserved by requests still running.
    pub units_reserved: u64,
    /// Requests still running on it.
    pub in_flight: u64,
    pub settled_requests: u64,
    pub last_activity_ms: i64,
    pub settle_requested: bool,
    pub state: SettleState,
    /// Set from `log_put` on.
    pub claimed_units: Option<u64>,
    pub commitment: Option<StackCommitment>,
    /// The ledger's first claimable epoch, from `submitted` on.
    pub window_end: Option<u64>,
    /// What the claim paid the node, once `claimed`.
    pub node_fee: Option<u64>,
}

/// A frozen stack's log, ready to be stored and committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrozenLog {
    /// Encoded `LogRecord`s, in settlement order.
    pub records: Vec<Vec<u8>>,
    /// Their Merkle leaves.
    pub leaves: Vec<[u8; 32]>,
    /// Their total usage: the units to claim.
    pub units: u64,
}

/// An attestation this node was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationJob {
    pub stack: StackSmallId,
    pub node: NodeSmallId,
    pub selected_node_id: NodeSmallId,
    pub claimed_units: u64,
    pub commitment: StackCommitment,
    pub window_end: u64,
    pub state: String,
    pub detail: Option<String>,
    /// The ledger's seed for the sample of records to re-execute.
    pub sample_seed: Hash32,
}

/// A dispute this node must resolve as its oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleJob {
    pub stack: StackSmallId,
    pub node: NodeSmallId,
    pub deadline: u64,
    pub state: String,
    pub detail: Option<String>,
}

fn hash_of(v: Option<Vec<u8>>) -> Result<Option<Hash32>, MeterError> {
    v.map(|b| {
        b.try_into()
            .map(Hash32)
            .map_err(|_| MeterError::Storage("corrupt digest in the state file".into()))
    })
    .transpose()
}

const STACK_COLUMNS: &str = "s.small_id, s.selected_node_id, s.task_small_id, s.owner, s.price, \
     s.num_compute_units, s.units_used, s.last_activity_ms, s.settle_requested, s.settle_state, \
     s.claimed_units, s.merkle_root, s.leaf_count, s.blob_id, s.blob_hash, s.window_end, \
     s.node_fee, s.blob_size, \
     (SELECT COUNT(*) FROM requests r WHERE r.stack_small_id = s.small_id AND r.state = 'reserved'), \
     (SELECT COUNT(*) FROM requests r WHERE r.stack_small_id = s.small_id AND r.state = 'settled'), \
     (SELECT COALESCE(SUM(reserved), 0) FROM requests r WHERE r.stack_small_id = s.small_id \
      AND r.state = 'reserved')";

fn stack_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StackSettlement, MeterError>> {
    let state: Option<String> = r.get(9)?;
    let root = r.get::<_, Option<Vec<u8>>>(11)?;
    let leaves = r.get::<_, Option<i64>>(12)?;
    let blob_id = r.get::<_, Option<String>>(13)?;
    let blob_hash = r.get::<_, Option<Vec<u8>>>(14)?;
    let v = (
        r.get::<_, i64>(0)?,
        r.get::<_, i64>(1)?,
        r.get::<_, i64>(2)?,
        r.get::<_, String>(3)?,
        [
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, i64>(7)?,
        ],
        r.get::<_, bool>(8)?,
        r.get::<_, Option<i64>>(10)?,
        r.get::<_, Option<i64>>(15)?,
        r.get::<_, Option<i64>>(16)?,
        [
            r.get::<_, i64>(18)?,
            r.get::<_, i64>(19)?,
            r.get::<_, i64>(20)?,
        ],
        r.get::<_, Option<i64>>(17)?,
    );
    Ok((|| {
        let commitment = match (hash_of(root)?, leaves, blob_id, hash_of(blob_hash)?, v.10) {
            (Some(merkle_root), Some(leaf_count), Some(blob_id), Some(blob_hash), Some(size)) => {
                Some(StackCommitment {
                    merkle_root,
                    leaf_count: leaf_count as u64,
                    blob_id,
                    blob_hash,
                    blob_size: size as u64,
                })
            }
            _ => None,
        };
        Ok(StackSettlement {
            stack: StackSmallId(v.0 as u64),
            selected_node_id: NodeSmallId(v.1 as u64),
            task_small_id: v.2 as u64,
            owner: v.3,
            price: v.4[0] as u64,
            num_compute_units: v.4[1] as u64,
            units_used: v.4[2] as u64,
            last_activity_ms: v.4[3],
            settle_requested: v.5,
            state: SettleState::from_column(state.as_deref())?,
            claimed_units: v.6.map(|u| u as u64),
            commitment,
            window_end: v.7.map(|e| e as u64),
            node_fee: v.8.map(|f| f as u64),
            in_flight: v.9[0] as u64,
            settled_requests: v.9[1] as u64,
            units_reserved: v.9[2] as u64,
        })
    })())
}

fn set_state(
    tx: &Connection,
    stack: StackSmallId,
    from: &[SettleState],
    to: SettleState,
) -> Result<bool, MeterError> {
    let cur: Option<String> = tx
        .query_row(
            "SELECT settle_state FROM stacks WHERE small_id = ?1",
            [stack.0 as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?
        .ok_or(MeterError::UnknownStack(stack))?;
    if !from.contains(&SettleState::from_column(cur.as_deref())?) {
        return Ok(false);
    }
    tx.execute(
        "UPDATE stacks SET settle_state = ?1 WHERE small_id = ?2",
        params![to.as_str(), stack.0 as i64],
    )
    .map_err(db)?;
    Ok(true)
}

impl Meter {
    /// Every stack this node sold that is not finished (state below `claimed`/`closed`), plus
    /// finished ones when `all`.
    pub fn settlements(&self, all: bool) -> Result<Vec<StackSettlement>, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let filter = if all {
            ""
        } else {
            "AND COALESCE(s.settle_state, '') NOT IN ('claimed', 'closed') AND s.is_claimed = 0"
        };
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {STACK_COLUMNS} FROM stacks s WHERE 1 = 1 {filter} ORDER BY s.small_id"
            ))
            .map_err(db)?;
        let rows = stmt.query_map([], stack_row).map_err(db)?;
        let mut out = Vec::new();
        for r in rows {
            let s = r.map_err(db)??;
            if self.nodes.contains(&s.selected_node_id) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// One stack's settlement view.
    pub fn settlement(&self, stack: StackSmallId) -> Result<StackSettlement, MeterError> {
        self.settlements(true)?
            .into_iter()
            .find(|s| s.stack == stack)
            .ok_or(MeterError::UnknownStack(stack))
    }

    /// Asks the duty to settle `stack` at its next round (`atoma node settle`).
    pub fn request_settlement(&self, stack: StackSmallId) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            let n = tx
                .execute(
                    "UPDATE stacks SET settle_requested = 1 WHERE small_id = ?1",
                    [stack.0 as i64],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(MeterError::UnknownStack(stack));
            }
            Ok(())
        })
    }

    /// Stops new requests on `stack` (they get `Settling`). Returns whether it was open.
    pub fn freeze(&self, stack: StackSmallId) -> Result<bool, MeterError> {
        self.with_tx(|tx| set_state(tx, stack, &[SettleState::Open], SettleState::Frozen))
    }

    /// A frozen stack's log: its encoded records in settlement order, their leaves (from the
    /// request and response hashes recorded when each was charged, so nothing is re-verified
    /// here) and their total usage.
    pub fn frozen_log(&self, stack: StackSmallId) -> Result<FrozenLog, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let mut stmt = conn
            .prepare(
                "SELECT record, request_hash, response_hash, prompt_tokens + completion_tokens \
                 FROM requests WHERE stack_small_id = ?1 AND state = 'settled' \
                 ORDER BY settled_seq",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([stack.0 as i64], |r| {
                Ok((
                    r.get::<_, Option<Vec<u8>>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(db)?;
        let mut log = FrozenLog::default();
        let corrupt = |what: &str| MeterError::Storage(format!("stack {stack}: {what}"));
        for row in rows {
            let (rec, req, resp, used) = row.map_err(db)?;
            let req: [u8; 32] = req.try_into().map_err(|_| corrupt("bad request hash"))?;
            let resp: [u8; 32] = resp.try_into().map_err(|_| corrupt("bad response hash"))?;
            log.records
                .push(rec.ok_or_else(|| corrupt("a settled request has no log record"))?);
            log.leaves.push(atoma_crypto::merkle::leaf(&req, &resp));
            log.units += used as u64;
        }
        Ok(log)
    }

    /// Records that the log is on the DA store with this commitment.
    pub fn record_log_put(
        &self,
        stack: StackSmallId,
        commitment: &StackCommitment,
        claimed_units: u64,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            if set_state(tx, stack, &[SettleState::Frozen], SettleState::LogPut)? {
                tx.execute(
                    "UPDATE stacks SET merkle_root = ?1, leaf_count = ?2, blob_id = ?3, \
                     blob_hash = ?4, claimed_units = ?5, blob_size = ?7 WHERE small_id = ?6",
                    params![
                        &commitment.merkle_root.0[..],
                        commitment.leaf_count as i64,
                        commitment.blob_id,
                        &commitment.blob_hash.0[..],
                        claimed_units as i64,
                        stack.0 as i64,
                        commitment.blob_size as i64
                    ],
                )
                .map_err(db)?;
            }
            Ok(())
        })
    }

    /// Records that the ledger holds the ticket, claimable from `window_end`.
    pub fn record_submitted(&self, stack: StackSmallId, window_end: u64) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            set_state(tx, stack, &[SettleState::LogPut], SettleState::Submitted)?;
            tx.execute(
                "UPDATE stacks SET window_end = ?1 WHERE small_id = ?2",
                params![window_end as i64, stack.0 as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Records the claim (from the duty, or from the ledger's event; idempotent).
    pub fn record_claimed(&self, stack: StackSmallId, node_fee: u64) -> Result<(), MeterError> {
        self.with_tx(|tx| mark_claimed(tx, stack, node_fee))
    }
}

fn mark_claimed(tx: &Connection, stack: StackSmallId, node_fee: u64) -> Result<(), MeterError> {
    tx.execute(
        "UPDATE stacks SET settle_state = 'claimed', is_claimed = 1, node_fee = ?1 \
         WHERE small_id = ?2",
        params![node_fee as i64, stack.0 as i64],
    )
    .map_err(db)?;
    Ok(())
}

fn earn(
    tx: &Connection,
    stack: StackSmallId,
    node: NodeSmallId,
    role: &str,
    amount: u64,
) -> Result<(), MeterError> {
    tx.execute(
        "INSERT OR IGNORE INTO earnings VALUES (?1, ?2, ?3, ?4)",
        params![stack.0 as i64, node.0 as i64, role, amount as i64],
    )
    .map_err(db)?;
    Ok(())
}

/// Applies the settlement events that concern this node (called inside the follower's
/// transaction, which also advances the cursor).
pub(crate) fn apply_event(
    tx: &Connection,
    nodes: &[NodeSmallId],
    ev: &LedgerEvent,
) -> Result<(), MeterError> {
    use LedgerEvent as E;
    match ev {
        E::StackTrySettleEvent {
            stack_small_id,
            selected_node_id,
            requested_attestation_nodes,
            committed_stack_proof,
            num_claimed_compute_units,
            leaf_count,
            blob_id,
            blob_hash,
            blob_size,
            dispute_settled_at_epoch,
            sample_seed,
            ..
        } => {
            for n in requested_attestation_nodes
                .iter()
                .filter(|n| nodes.contains(n))
            {
                tx.execute(
                    "INSERT OR IGNORE INTO attestations (stack_small_id, node_small_id, \
                     selected_node_id, claimed_units, merkle_root, leaf_count, blob_id, \
                     blob_hash, window_end, blob_size, sample_seed) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        stack_small_id.0 as i64,
                        n.0 as i64,
                        selected_node_id.0 as i64,
                        num_claimed_compute_units.0 as i64,
                        committed_stack_proof.to_string(),
                        *leaf_count as i64,
                        blob_id,
                        blob_hash.to_string(),
                        *dispute_settled_at_epoch as i64,
                        *blob_size as i64,
                        sample_seed.to_string()
                    ],
                )
                .map_err(db)?;
            }
        }
        E::StackSettlementTicketClaimedEvent {
            stack_small_id,
            selected_node_id,
            attestation_nodes,
            node_fee,
            attestor_share,
            ..
        } => {
            if nodes.contains(selected_node_id) {
                mark_claimed(tx, *stack_small_id, node_fee.0)?;
                earn(tx, *stack_small_id, *selected_node_id, "seller", node_fee.0)?;
            }
            for a in attestation_nodes.iter().filter(|a| nodes.contains(a)) {
                earn(tx, *stack_small_id, *a, "attestor", attestor_share.0)?;
            }
        }
        E::ClaimedStackEvent {
            stack_small_id,
            selected_node_id,
            num_claimed_compute_units,
            ..
        } if nodes.contains(selected_node_id) => {
            // The fee is not in the event; the duty records it from the claim's outcome.
            let _ = num_claimed_compute_units;
            tx.execute(
                "UPDATE stacks SET settle_state = 'claimed', is_claimed = 1 WHERE small_id = ?1",
                [stack_small_id.0 as i64],
            )
            .map_err(db)?;
        }
        E::StackAttestationDisputeEvent {
            stack_small_id,
            oracle_node_id: Some(oracle),
            deadline_epoch,
            ..
        }
        | E::DisputeOracleReassignedEvent {
            stack_small_id,
            oracle_node_id: Some(oracle),
            deadline_epoch,
            ..
        } if nodes.contains(oracle) => {
            tx.execute(
                "INSERT OR IGNORE INTO oracle_jobs (stack_small_id, node_small_id, deadline) \
                 VALUES (?1, ?2, ?3)",
                params![
                    stack_small_id.0 as i64,
                    oracle.0 as i64,
                    *deadline_epoch as i64
                ],
            )
            .map_err(db)?;
        }
        E::StackDisputeResolvedEvent {
            stack_small_id,
            oracle_node_id,
            outcome,
            slashed_node_id,
            oracle_share,
            honest_share,
            ..
        } => {
            if let Some(o) = oracle_node_id.filter(|o| nodes.contains(o)) {
                earn(tx, *stack_small_id, o, "oracle", oracle_share.0)?;
            }
            // The winner is the party that was not slashed: the seller or the attestor.
            let seller: Option<i64> = tx
                .query_row(
                    "SELECT selected_node_id FROM stacks WHERE small_id = ?1",
                    [stack_small_id.0 as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let attestor: Option<i64> = tx
                .query_row(
                    "SELECT node_small_id FROM attestations WHERE stack_small_id = ?1 \
                     AND state = 'disputed'",
                    [stack_small_id.0 as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            for w in seller
                .into_iter()
                .chain(attestor)
                .map(|n| NodeSmallId(n as u64))
            {
                if nodes.contains(&w) && Some(w) != *slashed_node_id && honest_share.0 > 0 {
                    earn(tx, *stack_small_id, w, "dispute", honest_share.0)?;
                }
            }
            if *outcome != atoma_ledger::DisputeOutcome::NodeHonest
                && seller.is_some_and(|s| nodes.contains(&NodeSmallId(s as u64)))
            {
                // Cheated or void: nothing to claim.
                mark_claimed(tx, *stack_small_id, 0)?;
            }
        }
        E::StackExpiredEvent { stack_small_id, .. } => {
            tx.execute(
                "UPDATE stacks SET settle_state = 'closed', is_claimed = 1 WHERE small_id = ?1",
                [stack_small_id.0 as i64],
            )
            .map_err(db)?;
        }
        _ => {}
    }
    Ok(())
}

impl Meter {
    /// Attestation jobs (`pending` only unless `all`).
    pub fn attestation_jobs(&self, all: bool) -> Result<Vec<AttestationJob>, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT stack_small_id, node_small_id, selected_node_id, claimed_units, \
                 merkle_root, leaf_count, blob_id, blob_hash, window_end, state, detail, blob_size, \
                 sample_seed \
                 FROM attestations {} ORDER BY stack_small_id",
                if all { "" } else { "WHERE state = 'pending'" }
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    [
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ],
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, Option<String>>(10)?,
                    r.get::<_, i64>(11)?,
                    r.get::<_, String>(12)?,
                ))
            })
            .map_err(db)?;
        let corrupt = |e: String| MeterError::Storage(format!("attestation row: {e}"));
        rows.map(|row| {
            let (v, root, leaves, blob_id, blob_hash, window_end, state, detail, size, seed) =
                row.map_err(db)?;
            Ok(AttestationJob {
                stack: StackSmallId(v[0] as u64),
                node: NodeSmallId(v[1] as u64),
                selected_node_id: NodeSmallId(v[2] as u64),
                claimed_units: v[3] as u64,
                commitment: StackCommitment {
                    merkle_root: root.parse().map_err(corrupt)?,
                    leaf_count: leaves as u64,
                    blob_id,
                    blob_hash: blob_hash.parse().map_err(corrupt)?,
                    blob_size: size as u64,
                },
                window_end: window_end as u64,
                state,
                detail,
                sample_seed: seed.parse().unwrap_or_default(),
            })
        })
        .collect()
    }

    /// Records an attestation job's outcome (`attested`, `disputed` or `missed`).
    pub fn finish_attestation(
        &self,
        stack: StackSmallId,
        node: NodeSmallId,
        state: &str,
        detail: &str,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE attestations SET state = ?1, detail = ?2 WHERE stack_small_id = ?3 \
                 AND node_small_id = ?4 AND state = 'pending'",
                params![state, detail, stack.0 as i64, node.0 as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Oracle jobs (`pending` only unless `all`).
    pub fn oracle_jobs(&self, all: bool) -> Result<Vec<OracleJob>, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT stack_small_id, node_small_id, deadline, state, detail FROM oracle_jobs \
                 {} ORDER BY stack_small_id",
                if all { "" } else { "WHERE state = 'pending'" }
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(OracleJob {
                    stack: StackSmallId(r.get::<_, i64>(0)? as u64),
                    node: NodeSmallId(r.get::<_, i64>(1)? as u64),
                    deadline: r.get::<_, i64>(2)? as u64,
                    state: r.get(3)?,
                    detail: r.get(4)?,
                })
            })
            .map_err(db)?;
        rows.map(|r| r.map_err(db)).collect()
    }

    /// Records an oracle job's outcome (`resolved` or `missed`).
    pub fn finish_oracle_job(
        &self,
        stack: StackSmallId,
        node: NodeSmallId,
        state: &str,
        detail: &str,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE oracle_jobs SET state = ?1, detail = ?2 WHERE stack_small_id = ?3 \
                 AND node_small_id = ?4 AND state = 'pending'",
                params![state, detail, stack.0 as i64, node.0 as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Earnings recorded from claims: `(stack, node, role, amount)`.
    pub fn earnings(&self) -> Result<Vec<(StackSmallId, NodeSmallId, String, u64)>, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let mut stmt = conn
            .prepare(
                "SELECT stack_small_id, node_small_id, role, amount FROM earnings ORDER BY 1, 2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    StackSmallId(r.get::<_, i64>(0)? as u64),
                    NodeSmallId(r.get::<_, i64>(1)? as u64),
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)? as u64,
                ))
            })
            .map_err(db)?;
        rows.map(|r| r.map_err(db)).collect()
    }

    /// Records what a direct (ConfidentialCompute) claim paid, which its event does not carry.
    pub fn record_direct_claim(
        &self,
        stack: StackSmallId,
        node: NodeSmallId,
        node_fee: u64,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            mark_claimed(tx, stack, node_fee)?;
            earn(tx, stack, node, "seller", node_fee)
        })
    }

    /// Milliseconds since the epoch, as the state records activity.
    pub fn now_ms() -> i64 {
        now_ms()
    }
}
