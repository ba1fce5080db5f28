//! Attesting other nodes' settlements: fetch the committed log, check it, attest or dispute.
//!
//! Checked here: the blob's content hash and size (by the store client), that it decodes as a
//! log of the right stack and node, the leaf count and Merkle root against the ticket, every
//! record's user signature against the stack's owner and the node's signature on every answer
//! or chunk, that each record's usage matches its token ids and that the units claimed are the
//! sum of the records' usage; then each record of the sample is re-executed on this node's
//! engine (`crate::reexec`). The oracle uses the same checks (`fetch_and_check`). A ticket that
//! holds only the root gets the rest of its commitment from the seller first (`super::locate`).

use atoma_crypto::merkle;
use atoma_da::BlobRef;
use atoma_ledger::{DisputeClaim, Hash32, LedgerError, NodeSmallId, StackCommitment, StackSmallId};
use atoma_state::log::StackLog;
use atoma_state::settlement::AttestationJob;

use super::locate::Located;
use super::{Duties, DutyError};
use crate::reexec::RecordVerdict;

/// What checking a log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The log holds up; attest with this root. `reexecuted` records were re-executed.
    Agree {
        root: Hash32,
        reexecuted: usize,
        of: usize,
    },
    /// It does not: dispute with the root we computed (zero if the log was unreadable), the
    /// record and token found wrong, and why.
    Disagree {
        root: Hash32,
        record: Option<u64>,
        position: Option<u64>,
        reason: String,
    },
}

/// What a settlement claims, as a checker needs it.
#[derive(Debug, Clone)]
pub struct Claimed<'a> {
    pub stack: StackSmallId,
    pub seller: NodeSmallId,
    pub claimed_units: u64,
    pub commitment: &'a StackCommitment,
}

/// Which records to re-execute: all of them (`k == 0` or `k >= n`), or `k` distinct indices
/// drawn from `seed` (a SplitMix64 stream over a partial Fisher–Yates shuffle), in order.
pub fn sample_indices(n: usize, k: usize, seed: &Hash32) -> Vec<usize> {
    if k == 0 || k >= n {
        return (0..n).collect();
    }
    let mut state = u64::from_le_bytes(seed.0[..8].try_into().unwrap_or_default());
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (next() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut out = idx[..k].to_vec();
    out.sort_unstable();
    out
}

fn log_fault(root: Hash32, reason: String) -> Verdict {
    Verdict::Disagree {
        root,
        record: None,
        position: None,
        reason,
    }
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
        let claimed = Claimed {
            stack: job.stack,
            seller: job.selected_node_id,
            claimed_units: job.claimed_units,
            commitment: &job.commitment,
        };
        let k = self.policy.verify_sample;
        let verdict = self.fetch_and_check(&claimed, |n| sample_indices(n, k, &job.sample_seed))?;
        self.submit(job.stack, job.node, verdict)
    }

    /// Fetches the committed log and checks it, re-executing the records `pick` chooses.
    /// An `Err` means the check could not run now (the store or the engine is unavailable).
    pub(crate) fn fetch_and_check(
        &self,
        claimed: &Claimed<'_>,
        pick: impl Fn(usize) -> Vec<usize>,
    ) -> Result<Verdict, DutyError> {
        let located;
        let full;
        let claimed = if claimed.commitment.is_root_only() {
            // The ledger holds the root alone: the seller says where the log is.
            match self.locate(claimed)? {
                Located::Found(c) => {
                    located = c;
                    full = Claimed {
                        commitment: &located,
                        ..claimed.clone()
                    };
                    &full
                }
                Located::Contradicts(reason) => return Ok(log_fault(Hash32::default(), reason)),
            }
        } else {
            claimed
        };
        let c = claimed.commitment;
        let fetched = self.da.get(&BlobRef {
            blob_id: c.blob_id.clone(),
            content_hash: c.blob_hash.0,
            size: c.blob_size,
        });
        match fetched {
            Ok(blob) => self.check_log(claimed, &blob, pick),
            Err(
                e @ (atoma_da::DaError::HashMismatch { .. }
                | atoma_da::DaError::SizeMismatch { .. }
                | atoma_da::DaError::NotFound { .. }),
            ) => Ok(log_fault(
                Hash32::default(),
                format!("the committed log cannot be had: {e}"),
            )),
            // Unavailable for now: try again next round, while there is time.
            Err(e) => Err(e.into()),
        }
    }

    /// Checks a fetched log against the settlement (see the module doc).
    pub(crate) fn check_log(
        &self,
        job: &Claimed<'_>,
        blob: &[u8],
        pick: impl Fn(usize) -> Vec<usize>,
    ) -> Result<Verdict, DutyError> {
        let zero = Hash32::default();
        let log = match StackLog::decode(blob) {
            Ok(l) => l,
            Err(e) => return Ok(log_fault(zero, e.to_string())),
        };
        if log.stack_small_id != job.stack.0 || log.node_small_id != job.seller.0 {
            return Ok(log_fault(
                zero,
                format!(
                    "the log is stack {} of node {}",
                    log.stack_small_id, log.node_small_id
                ),
            ));
        }
        let owner = self.ledger.stack(job.stack)?.owner;
        let node_owner = self.ledger.node(job.seller)?.owner;
        let mut leaves = Vec::with_capacity(log.records.len());
        let mut units = 0u64;
        for (i, r) in log.records.iter().enumerate() {
            let bad = |reason: String| {
                Ok(Verdict::Disagree {
                    root: zero,
                    record: Some(i as u64),
                    position: None,
                    reason: format!("record {i}: {reason}"),
                })
            };
            match r.request_signer() {
                Ok(a) if a == owner.0 => {}
                Ok(_) => return bad("not signed by the stack's owner".into()),
                Err(e) => return bad(format!("request: {e}")),
            }
            let (response_hash, signer) = match r.response_hash() {
                Ok(v) => v,
                Err(e) => return bad(format!("response: {e}")),
            };
            if signer.is_some_and(|s| s != node_owner.0) {
                return bad("the answer is not signed by the node".into());
            }
            if r.usage_prompt_tokens != r.prompt_tokens.len() as u64
                || r.usage_completion_tokens != r.generated_tokens()
            {
                return bad("the usage does not match the token ids".into());
            }
            units += r.usage_prompt_tokens + r.usage_completion_tokens;
            leaves.push(merkle::leaf(&r.request_hash(), &response_hash));
        }
        let root = Hash32(merkle::root(&leaves));
        if leaves.len() as u64 != job.commitment.leaf_count || root != job.commitment.merkle_root {
            return Ok(log_fault(
                root,
                "the Merkle root or leaf count differs".into(),
            ));
        }
        if units != job.claimed_units {
            return Ok(log_fault(
                root,
                format!(
                    "{} units claimed, the log accounts for {units}",
                    job.claimed_units
                ),
            ));
        }
        let mut reexecuted = 0;
        if let Some(r) = &self.reexec {
            for i in pick(log.records.len()) {
                match r
                    .reexecute(&log.records[i])
                    .map_err(|e| DutyError::Reexec(format!("record {i}: {e}")))?
                {
                    RecordVerdict::Agree => reexecuted += 1,
                    RecordVerdict::Disagree { position, reason } => {
                        return Ok(Verdict::Disagree {
                            root,
                            record: Some(i as u64),
                            position: position.map(|p| p as u64),
                            reason: format!("record {i}: {reason}"),
                        });
                    }
                }
            }
        }
        Ok(Verdict::Agree {
            root,
            reexecuted,
            of: log.records.len(),
        })
    }

    fn submit(
        &self,
        stack: StackSmallId,
        node: NodeSmallId,
        verdict: Verdict,
    ) -> Result<(), DutyError> {
        let sender = self.sender();
        match verdict {
            Verdict::Agree {
                root,
                reexecuted,
                of,
            } => {
                match self
                    .ledger
                    .submit_stack_settlement_attestation(sender, node, stack, root)
                {
                    Ok(_) | Err(LedgerError::AlreadyAttested { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                let detail =
                    format!("the log checks out; {reexecuted} of {of} records re-executed");
                self.state
                    .finish_attestation(stack, node, "attested", &detail)?;
                tracing::info!(stack = %stack, "attested");
                metrics::counter!("atoma_attestations_total", "outcome" => "attested").increment(1);
            }
            Verdict::Disagree {
                root,
                record,
                position,
                reason,
            } => {
                let claim = DisputeClaim {
                    attestation_commitment: root,
                    record,
                    position,
                };
                match self
                    .ledger
                    .start_attestation_dispute(sender, node, stack, &claim)
                {
                    Ok(_) | Err(LedgerError::InDispute(_)) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_distinct_ordered_and_seeded() {
        let seed = Hash32([7; 32]);
        assert_eq!(sample_indices(5, 0, &seed), vec![0, 1, 2, 3, 4]);
        assert_eq!(sample_indices(5, 9, &seed), vec![0, 1, 2, 3, 4]);
        let s = sample_indices(100, 10, &seed);
        assert_eq!(s.len(), 10);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, sample_indices(100, 10, &seed));
        assert_ne!(s, sample_indices(100, 10, &Hash32([8; 32])));
    }
}
