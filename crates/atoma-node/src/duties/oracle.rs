//! The oracle's duty and the parties' watch over disputes.
//!
//! An oracle job is a dispute the ledger handed this node. The oracle checks the committed log
//! as an attestor does (hash, root, signatures, usage) and re-executes the disputed record, or
//! every record when the attestor named none: any fault found means the node cheated; a log
//! that holds up means the attestor lied. It resolves before its deadline; a job whose deadline
//! passed is recorded as missed (the ledger slashes and replaces the oracle).
//!
//! The seller and the disputing attestor both want a silent oracle replaced: once a dispute
//! they are party to is past its deadline, they ask the ledger to expire the oracle.

use atoma_ledger::{LedgerError, StackSmallId};
use atoma_state::settlement::OracleJob;

use super::attest::{Claimed, Verdict};
use super::{Duties, DutyError};

impl Duties {
    /// Resolves pending oracle jobs and expires silent oracles of disputes this node is party to.
    pub fn oracle_round(&self) -> Result<(), DutyError> {
        let jobs = self.state.oracle_jobs(false)?;
        let parties = self.disputes_as_party()?;
        if jobs.is_empty() && parties.is_empty() {
            return Ok(());
        }
        let epoch = self.ledger.epoch()?;
        for job in jobs {
            if epoch >= job.deadline {
                self.state.finish_oracle_job(
                    job.stack,
                    job.node,
                    "missed",
                    &format!("the deadline passed at epoch {}", job.deadline),
                )?;
                tracing::warn!(stack = %job.stack, "oracle deadline missed");
                continue;
            }
            if let Err(e) = self.resolve_one(&job) {
                tracing::warn!(stack = %job.stack, error = %e, "oracle work failed; retrying");
            }
        }
        for stack in parties {
            let Some(d) = self.ledger.dispute(stack)? else {
                continue;
            };
            if d.outcome.is_none() && d.oracle.is_some() && epoch >= d.deadline_epoch {
                match self.ledger.expire_dispute_oracle(self.sender(), stack) {
                    Ok(d) => tracing::warn!(stack = %stack, next = ?d.oracle,
                                            "the dispute's oracle was silent; replaced"),
                    Err(LedgerError::NoDispute(_) | LedgerError::OracleDeadline { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Stacks in dispute where this node is the seller or the disputing attestor.
    fn disputes_as_party(&self) -> Result<Vec<StackSmallId>, DutyError> {
        let mut out: Vec<StackSmallId> = self
            .state
            .attestation_jobs(true)?
            .into_iter()
            .filter(|j| j.state == "disputed")
            .map(|j| j.stack)
            .collect();
        for s in self.state.settlements(false)? {
            if s.state == atoma_state::settlement::SettleState::Submitted
                && self
                    .ledger
                    .ticket(s.stack)?
                    .is_some_and(|t| t.is_in_dispute)
            {
                out.push(s.stack);
            }
        }
        Ok(out)
    }

    fn resolve_one(&self, job: &OracleJob) -> Result<(), DutyError> {
        let Some(dispute) = self.ledger.dispute(job.stack)? else {
            return Ok(());
        };
        if dispute.outcome.is_some() || dispute.oracle != Some(job.node) {
            self.state
                .finish_oracle_job(job.stack, job.node, "resolved", "no longer ours")?;
            return Ok(());
        }
        let ticket = self
            .ledger
            .ticket(job.stack)?
            .ok_or(LedgerError::NoTicket(job.stack))?;
        let claimed = Claimed {
            stack: job.stack,
            seller: ticket.selected_node_id,
            claimed_units: ticket.num_claimed_compute_units.0,
            commitment: &ticket.commitment,
        };
        // The disputed record, or all of them when the attestor named none.
        let named = dispute.claim.record;
        let verdict = self.fetch_and_check(&claimed, |n| match named {
            Some(i) if (i as usize) < n => vec![i as usize],
            _ => (0..n).collect(),
        })?;
        let (honest, why) = match &verdict {
            Verdict::Agree { reexecuted, .. } => (
                true,
                format!("the log re-executes as committed ({reexecuted} records)"),
            ),
            Verdict::Disagree { reason, .. } => (false, reason.clone()),
        };
        match self
            .ledger
            .resolve_attestation_dispute(self.sender(), job.node, job.stack, honest)
        {
            Ok(r) => {
                tracing::info!(stack = %job.stack, outcome = ?r.outcome, why, "dispute resolved");
                metrics::counter!("atoma_disputes_resolved_total",
                                  "node_honest" => honest.to_string())
                .increment(1);
            }
            Err(LedgerError::NoDispute(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.state.finish_oracle_job(
            job.stack,
            job.node,
            "resolved",
            &format!("node honest: {honest}; {why}"),
        )?;
        Ok(())
    }
}
