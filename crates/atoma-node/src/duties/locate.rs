//! Finding the log of a settlement whose ticket holds only the Merkle root (the deployed Sui
//! contract's `try_settle_stack` records nothing else).
//!
//! The seller publishes a signed commitment at `GET /v1/settlements/{stack}`
//! (`atoma_state::published`). Its URL comes from `[settlement] peers` or else from the seller's
//! public URL on the ledger. The body must be signed by the seller's owner address; from then
//! on it is the seller's own word, so a signed commitment that contradicts the ledger (another
//! root, stack, node or unit count, or no log at all) is a fault to dispute. Anything short of
//! a body signed by the seller (no URL, unreachable, an error status, a bad or foreign
//! signature) proves nothing against the seller: the attestor retries next round with the
//! reason named, and never disputes over it.

use atoma_crypto::address_hex;
use atoma_ledger::StackCommitment;
use atoma_state::published::PublishedCommitment;

use super::attest::Claimed;
use super::{Duties, DutyError};

/// The most of an error body quoted in a message.
const QUOTE: usize = 300;

/// What the seller's published commitment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// The full commitment, its root equal to the ledger's.
    Found(StackCommitment),
    /// The seller signed something that contradicts the ledger.
    Contradicts(String),
}

impl Duties {
    /// Asks the seller of a root-only settlement for its signed commitment and checks it.
    pub fn locate(&self, claimed: &Claimed<'_>) -> Result<Located, DutyError> {
        let stack = claimed.stack;
        let miss = |reason: String| DutyError::NoLogLocation { stack, reason };
        let seller = self.ledger.node(claimed.seller)?;
        let base = match self.policy.peers.get(&claimed.seller.0) {
            Some(u) => u.clone(),
            None => seller
                .public_url
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    miss(format!(
                        "no URL is known for its seller, node {}: add it to `[settlement] peers`",
                        claimed.seller
                    ))
                })?,
        };
        let url = format!("{}/v1/settlements/{}", base.trim_end_matches('/'), stack.0);
        let agent = ureq::AgentBuilder::new()
            .timeout(self.policy.peer_timeout)
            .build();
        let body: serde_json::Value = match agent.get(&url).call() {
            Ok(r) => r
                .into_json()
                .map_err(|e| miss(format!("{url} answered something else than JSON: {e}")))?,
            Err(ureq::Error::Status(code, r)) => {
                let text: String = r.into_string().unwrap_or_default();
                let text: String = text.chars().take(QUOTE).collect();
                return Err(miss(format!("{url} answered {code}: {text}")));
            }
            Err(e) => return Err(miss(format!("the seller cannot be reached: {e}"))),
        };
        let (p, signer) = PublishedCommitment::from_signed_json(&body)
            .map_err(|e| miss(format!("{url}: {e}")))?;
        if signer != seller.owner.0 {
            return Err(miss(format!(
                "{url} is signed by {}, not by node {}'s owner {}",
                address_hex(&signer),
                claimed.seller,
                seller.owner
            )));
        }
        // Signed by the seller from here on.
        let contradicts = |what: String| Ok(Located::Contradicts(format!("the seller {what}")));
        if p.stack_small_id != stack.0 || p.node_small_id != claimed.seller.0 {
            return contradicts(format!(
                "published stack {} of node {} for stack {stack}",
                p.stack_small_id, p.node_small_id
            ));
        }
        if p.commitment.merkle_root != claimed.commitment.merkle_root {
            return contradicts(format!(
                "published root {}; the ledger holds {}",
                p.commitment.merkle_root, claimed.commitment.merkle_root
            ));
        }
        if p.claimed_units != claimed.claimed_units {
            return contradicts(format!(
                "published {} units claimed; the ledger holds {}",
                p.claimed_units, claimed.claimed_units
            ));
        }
        if p.commitment.is_root_only() {
            return contradicts("published no log location".into());
        }
        Ok(Located::Found(p.commitment))
    }
}
