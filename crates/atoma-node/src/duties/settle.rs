//! Settling the stacks this node sold: decide, freeze, store the log, open the ticket, claim.
//! Every step reads the ledger's view back before acting, so a step repeated after a crash
//! finds its effect already there and only records it.

use std::collections::HashMap;

use atoma_crypto::{blake2b256, merkle};
use atoma_ledger::{
    ComputeUnits, Hash32, LedgerError, SecurityLevel, StackCommitment, StackSmallId, TaskSmallId,
};
use atoma_state::log::StackLog;
use atoma_state::meter::Meter;
use atoma_state::settlement::{SettleState, StackSettlement};

use super::{Duties, DutyError};

impl Duties {
    /// Moves every unfinished stack one step or more along.
    pub fn settle_round(&self) -> Result<(), DutyError> {
        let stacks = self.state.settlements(false)?;
        if stacks.is_empty() {
            return Ok(());
        }
        let epoch = self.ledger.epoch()?;
        let mut levels: HashMap<u64, SecurityLevel> = HashMap::new();
        for s in stacks {
            let level = match levels.get(&s.task_small_id) {
                Some(l) => *l,
                None => {
                    let l = self
                        .ledger
                        .task(TaskSmallId(s.task_small_id))?
                        .security_level;
                    levels.insert(s.task_small_id, l);
                    l
                }
            };
            if let Err(e) = self.advance(&s, level, epoch) {
                tracing::warn!(stack = %s.stack, state = s.state.as_str(), error = %e,
                               "settlement step failed; retrying next round");
            }
        }
        Ok(())
    }

    fn due(&self, s: &StackSettlement) -> Option<&'static str> {
        if s.units_used == 0 {
            return None;
        }
        if s.settle_requested {
            return Some("requested by the operator");
        }
        // Settled usage only: requests in flight would freeze the stack before its last one.
        let settled = s.units_used - s.units_reserved.min(s.units_used);
        if settled * 1000 >= self.policy.threshold_permille * s.num_compute_units {
            return Some("use threshold reached");
        }
        let idle_ms = Meter::now_ms() - s.last_activity_ms;
        if s.in_flight == 0 && idle_ms >= self.policy.idle.as_millis() as i64 {
            return Some("idle");
        }
        None
    }

    /// Runs the steps due for one stack, in order, within this round.
    fn advance(
        &self,
        s: &StackSettlement,
        level: SecurityLevel,
        epoch: u64,
    ) -> Result<(), DutyError> {
        let mut state = s.state;
        if state == SettleState::Open {
            let Some(why) = self.due(s) else {
                return Ok(());
            };
            if self.state.freeze(s.stack)? {
                tracing::info!(stack = %s.stack, reason = why, "settling: stack frozen");
                metrics::counter!("atoma_settlement_steps_total", "step" => "frozen").increment(1);
            }
            self.pause();
            state = SettleState::Frozen;
        }
        if state == SettleState::Frozen {
            // Requests in flight finish first; the log is final after them.
            if self.state.settlement(s.stack)?.in_flight > 0 {
                return Ok(());
            }
            self.put_log(s)?;
            self.pause();
            state = SettleState::LogPut;
        }
        let s = self.state.settlement(s.stack)?;
        if state == SettleState::LogPut {
            if level == SecurityLevel::ConfidentialCompute {
                return self.claim_direct(&s);
            }
            self.open_ticket(&s)?;
            self.pause();
            state = SettleState::Submitted;
        }
        if state == SettleState::Submitted {
            self.claim(&s, level, epoch)?;
        }
        Ok(())
    }

    fn put_log(&self, s: &StackSettlement) -> Result<(), DutyError> {
        let t0 = std::time::Instant::now();
        let log = self.state.frozen_log(s.stack)?;
        let blob = StackLog::assemble(s.stack.0, s.selected_node_id.0, &log.records);
        let blob_hash = blake2b256(&blob);
        let stored = self.da.put(&blob)?;
        if stored.content_hash != blob_hash || stored.size != blob.len() as u64 {
            return Err(DutyError::Da(atoma_da::DaError::Malformed(format!(
                "the store reports hash {} and size {} for a blob of hash {} and size {}",
                stored.content_hash_hex(),
                stored.size,
                atoma_da::hex(&blob_hash),
                blob.len()
            ))));
        }
        let commitment = StackCommitment {
            merkle_root: Hash32(merkle::root(&log.leaves)),
            leaf_count: log.leaves.len() as u64,
            blob_id: stored.blob_id,
            blob_hash: Hash32(blob_hash),
            blob_size: blob.len() as u64,
        };
        self.state.record_log_put(s.stack, &commitment, log.units)?;
        tracing::info!(stack = %s.stack, requests = log.leaves.len(), bytes = blob.len(),
                       blob_id = %commitment.blob_id, ms = t0.elapsed().as_millis() as u64,
                       "settling: log stored");
        metrics::counter!("atoma_settlement_steps_total", "step" => "log_put").increment(1);
        metrics::counter!("atoma_settlement_log_bytes_total").increment(blob.len() as u64);
        Ok(())
    }

    fn open_ticket(&self, s: &StackSettlement) -> Result<(), DutyError> {
        let (Some(c), Some(claimed)) = (&s.commitment, s.claimed_units) else {
            return Err(DutyError::State(atoma_state::meter::MeterError::Storage(
                format!("stack {}: log_put without a commitment", s.stack),
            )));
        };
        let ticket = match self.ledger.ticket(s.stack)? {
            // Opened before a crash: record it.
            Some(t) => t,
            None => match self.ledger.try_settle_stack(
                self.sender(),
                s.selected_node_id,
                s.stack,
                ComputeUnits(claimed),
                c,
            ) {
                Ok(t) => t,
                Err(LedgerError::StackAlreadyClaimed(_)) => {
                    // Closed by its owner after expiry: nothing left to settle.
                    tracing::warn!(stack = %s.stack, "the stack was closed before it was settled");
                    return Ok(self.state.record_claimed(s.stack, 0)?);
                }
                Err(e) => return Err(e.into()),
            },
        };
        // A root-only ledger (the deployed Sui contract) keeps the root alone; the rest is
        // published at `GET /v1/settlements/{stack}` from this node's own rows.
        let same = if ticket.commitment.is_root_only() {
            ticket.commitment.merkle_root == c.merkle_root
        } else {
            ticket.commitment == *c
        };
        if !same {
            tracing::error!(stack = %s.stack, "the ledger's ticket commits to another log than ours");
        }
        self.state
            .record_submitted(s.stack, ticket.dispute_settled_at_epoch)?;
        tracing::info!(stack = %s.stack, claimed, attestors = ?ticket.requested_attestation_nodes,
                       claimable_from = ticket.dispute_settled_at_epoch, "settling: ticket opened");
        metrics::counter!("atoma_settlement_steps_total", "step" => "submitted").increment(1);
        Ok(())
    }

    fn claim(
        &self,
        s: &StackSettlement,
        level: SecurityLevel,
        epoch: u64,
    ) -> Result<(), DutyError> {
        let Some(t) = self.ledger.ticket(s.stack)? else {
            return Ok(());
        };
        let node_fee = |claimed| level.node_fee(atoma_ledger::Amount(s.price), claimed);
        if t.is_claimed {
            // Claimed by us before a crash, or closed by a dispute this node lost.
            let lost = self
                .ledger
                .dispute(s.stack)?
                .and_then(|d| d.outcome)
                .is_some_and(|o| o != atoma_ledger::DisputeOutcome::NodeHonest);
            let fee = if lost {
                0
            } else {
                node_fee(t.num_claimed_compute_units).map_or(0, |a| a.0)
            };
            return Ok(self.state.record_claimed(s.stack, fee)?);
        }
        if t.is_in_dispute || epoch < t.dispute_settled_at_epoch {
            return Ok(());
        }
        let out = self
            .ledger
            .claim_funds(self.sender(), s.selected_node_id, &[s.stack])?;
        let fee = out.first().map_or(0, |o| o.node_fee.0);
        self.state.record_claimed(s.stack, fee)?;
        tracing::info!(stack = %s.stack, fee, "settled: funds claimed");
        metrics::counter!("atoma_settlement_steps_total", "step" => "claimed").increment(1);
        metrics::counter!("atoma_earnings_base_units_total", "role" => "seller").increment(fee);
        Ok(())
    }

    /// ConfidentialCompute stacks are claimed directly once their log is stored.
    fn claim_direct(&self, s: &StackSettlement) -> Result<(), DutyError> {
        let stack = self.ledger.stack(s.stack)?;
        let claimed = ComputeUnits(s.claimed_units.unwrap_or(0));
        let fee = if stack.is_claimed {
            SecurityLevel::ConfidentialCompute
                .node_fee(stack.price_per_one_million_compute_units, claimed)
                .map_or(0, |a| a.0)
        } else {
            let out = self.ledger.claim_funds_for_stacks(
                self.sender(),
                s.selected_node_id,
                &[(StackSmallId(s.stack.0), claimed)],
            )?;
            out.first().map_or(0, |o| o.node_fee.0)
        };
        self.state
            .record_direct_claim(s.stack, s.selected_node_id, fee)?;
        metrics::counter!("atoma_settlement_steps_total", "step" => "claimed").increment(1);
        metrics::counter!("atoma_earnings_base_units_total", "role" => "seller").increment(fee);
        Ok(())
    }
}
