//! Attesting other nodes' settlements: fetch the committed log, check it, attest or dispute.
//!
//! Checked here: the blob's content hash and size (by the store client), that it decodes as a
//! log of the right stack and node, the leaf count and Merkle root against the ticket, every
//! record's user signature against the stack's owner and the node's signature on every answer
//! or chunk, that each record's usage matches its token ids and that the units claimed are the
//! sum of the records' usage. Re-executing each record on the engine (the "Verification" work)
//! extends `check_log`.

use atoma_crypto::merkle;
use atoma_da::BlobRef;
use atoma_ledger::{Hash32, LedgerError, NodeSmallId, StackSmallId};
use atoma_state::log::StackLog;
use atoma_state::settlement::AttestationJob;

use super::{Duties, DutyError};

/// What checking a log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The log holds up; attest with this root.
    Agree(Hash32),
    /// It does not: dispute with the root we computed (zero if the log was unreadable).
    Disagree { root: Hash32, reason: String },
}

impl Duties {
    /// Works through pending attestation jobs.
    pub fn attest_round(&self) -> Result<(), DutyError> {
        let jobs = self.state.attestation_jobs(false)?;
        if jobs.is_empty() {
            return Ok(());
        }
        let epoch = self.ledger.epoch()?;
        for job in jobs {
            if epoch >= job.window_end {
                self.state.finish_attestation(
                    job.stack,
                    job.node,
                    "missed",
                    &format!("the window closed at epoch {}", job.window_end),
                )?;
                tracing::warn!(stack = %job.stack, "attestation window missed");
                continue;
            }
            if let Err(e) = self.attest_one(&job) {
                tracing::warn!(stack = %job.stack, error = %e, "attestation failed; retrying");
            }
        }
        Ok(())
    }

    fn attest_one(&self, job: &AttestationJob) -> Result<(), DutyError> {
        let c = &job.commitment;
        let fetched = self.da.get(&BlobRef {
            blob_id: c.blob_id.clone(),
            content_hash: c.blob_hash.0,
            size: c.blob_size,
        });
        let verdict = match fetched {
            Ok(blob) => self.check_log(job, &blob)?,
            Err(
                e @ (atoma_da::DaError::HashMismatch { .. }
                | atoma_da::DaError::SizeMismatch { .. }
                | atoma_da::DaError::NotFound { .. }),
            ) => Verdict::Disagree {
                root: Hash32::default(),
                reason: format!("the committed log cannot be had: {e}"),
            },
            // Unavailable for now: try again next round, while the window is open.
            Err(e) => return Err(e.into()),
        };
        self.submit(job.stack, job.node, verdict)
    }

    /// Checks a fetched log against the ticket (see the module doc).
    pub fn check_log(&self, job: &AttestationJob, blob: &[u8]) -> Result<Verdict, DutyError> {
        let disagree = |root: Hash32, reason: String| Ok(Verdict::Disagree { root, reason });
        let log = match StackLog::decode(blob) {
            Ok(l) => l,
            Err(e) => return disagree(Hash32::default(), e.to_string()),
        };
        if log.stack_small_id != job.stack.0 || log.node_small_id != job.selected_node_id.0 {
            return disagree(
                Hash32::default(),
                format!(
                    "the log is stack {} of node {}",
                    log.stack_small_id, log.node_small_id
                ),
            );
        }
        let owner = self.ledger.stack(job.stack)?.owner;
        let node_owner = self.ledger.node(job.selected_node_id)?.owner;
        let mut leaves = Vec::with_capacity(log.records.len());
        let mut units = 0u64;
        for (i, r) in log.records.iter().enumerate() {
            let user = match r.request_signer() {
                Ok(a) => a,
                Err(e) => return disagree(Hash32::default(), format!("record {i}: request: {e}")),
            };
            if user != owner.0 {
                return disagree(
                    Hash32::default(),
                    format!("record {i} is not signed by the stack's owner"),
                );
            }
            let (response_hash, signer) = match r.response_hash() {
                Ok(v) => v,
                Err(e) => return disagree(Hash32::default(), format!("record {i}: response: {e}")),
            };
            if signer.is_some_and(|s| s != node_owner.0) {
                return disagree(
                    Hash32::default(),
                    format!("record {i}'s answer is not signed by the node"),
                );
            }
            if r.usage_prompt_tokens != r.prompt_tokens.len() as u64
                || r.usage_completion_tokens != r.output_tokens.len() as u64
            {
                return disagree(
                    Hash32::default(),
                    format!("record {i}'s usage does not match its tokens"),
                );
            }
            units += r.usage_prompt_tokens + r.usage_completion_tokens;
            leaves.push(merkle::leaf(&r.request_hash(), &response_hash));
        }
        let root = Hash32(merkle::root(&leaves));
        if leaves.len() as u64 != job.commitment.leaf_count || root != job.commitment.merkle_root {
            return disagree(root, "the Merkle root or leaf count differs".into());
        }
        if units != job.claimed_units {
            return disagree(
                root,
                format!(
                    "{} units claimed, the log accounts for {units}",
                    job.claimed_units
                ),
            );
        }
        Ok(Verdict::Agree(root))
    }

    fn submit(
        &self,
        stack: StackSmallId,
        node: NodeSmallId,
        verdict: Verdict,
    ) -> Result<(), DutyError> {
        let sender = self.sender();
        match verdict {
            Verdict::Agree(root) => {
                match self
                    .ledger
                    .submit_stack_settlement_attestation(sender, node, stack, root)
                {
                    Ok(_) | Err(LedgerError::AlreadyAttested { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.state
                    .finish_attestation(stack, node, "attested", "the log checks out")?;
                tracing::info!(stack = %stack, "attested");
                metrics::counter!("atoma_attestations_total", "outcome" => "attested").increment(1);
            }
            Verdict::Disagree { root, reason } => {
                match self
                    .ledger
                    .start_attestation_dispute(sender, node, stack, root)
                {
                    Ok(()) | Err(LedgerError::InDispute(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                self.state
                    .finish_attestation(stack, node, "disputed", &reason)?;
                tracing::warn!(stack = %stack, reason, "disputed a settlement");
                metrics::counter!("atoma_attestations_total", "outcome" => "disputed").increment(1);
            }
        }
        Ok(())
    }
}
