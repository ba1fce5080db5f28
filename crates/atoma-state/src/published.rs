//! The commitment a seller publishes for a stack it settled, for ledgers that record only the
//! Merkle root (the deployed Sui contract's `try_settle_stack`).
//!
//! The node answers `GET /v1/settlements/{stack}` with this body, signed as its responses are
//! (`atoma_crypto::signed_json`: `response_hash` and `signature` over the canonical JSON). An
//! attestor that finds a root-only ticket fetches it from the seller, checks that the signer
//! is the seller's owner address and that the root equals the ledger's, and then reads the log
//! from the DA store with the blob id, hash and size given here. The root binds the log (it is
//! recomputed from the fetched records), so a forged pointer cannot make a wrong log pass; the
//! signature makes sure that a pointer which leads nowhere is the seller's own doing, so an
//! attestor only disputes a seller over what the seller itself said.

use atoma_crypto::Keypair;
use atoma_crypto::signed_json::{check_json, sign_json};
use atoma_ledger::{NodeSmallId, StackCommitment, StackSmallId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `object` field of the published body.
pub const OBJECT: &str = "settlement.commitment";

/// A seller's statement of where a settled stack's log is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedCommitment {
    pub object: String,
    pub stack_small_id: u64,
    pub node_small_id: u64,
    /// The units the seller claims (the log's total usage).
    pub claimed_units: u64,
    #[serde(flatten)]
    pub commitment: StackCommitment,
}

impl PublishedCommitment {
    pub fn new(
        stack: StackSmallId,
        node: NodeSmallId,
        claimed_units: u64,
        commitment: StackCommitment,
    ) -> Self {
        Self {
            object: OBJECT.into(),
            stack_small_id: stack.0,
            node_small_id: node.0,
            claimed_units,
            commitment,
        }
    }

    /// The body signed with the node's key.
    pub fn to_signed_json(&self, keys: &Keypair) -> Value {
        let body = serde_json::to_value(self).unwrap_or(Value::Null);
        sign_json(keys, body).0
    }

    /// Parses a signed body and checks its hash and signature; returns it with the signer's
    /// address (the caller compares that with the seller's owner).
    pub fn from_signed_json(v: &Value) -> Result<(Self, [u8; 32]), String> {
        let checked = check_json(v)?;
        let mut body = v.clone();
        if let Some(map) = body.as_object_mut() {
            map.remove("response_hash");
            map.remove("signature");
        }
        let p: Self = serde_json::from_value(body)
            .map_err(|e| format!("not a settlement commitment: {e}"))?;
        if p.object != OBJECT {
            return Err(format!("`object` is `{}`, not `{OBJECT}`", p.object));
        }
        Ok((p, checked.signer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoma_ledger::Hash32;

    fn sample() -> PublishedCommitment {
        PublishedCommitment::new(
            StackSmallId(7),
            NodeSmallId(3),
            1234,
            StackCommitment {
                merkle_root: Hash32([1; 32]),
                leaf_count: 5,
                blob_id: "blob-abc".into(),
                blob_hash: Hash32([2; 32]),
                blob_size: 999,
            },
        )
    }

    /// The test vector of `docs/protocol.md` §12.
    #[test]
    fn the_signed_text_is_the_canonical_json() {
        let v = serde_json::to_value(sample()).unwrap();
        let text = atoma_crypto::signed_json::canonical(&v);
        assert_eq!(
            text,
            format!(
                "{{\"blob_hash\":\"{}\",\"blob_id\":\"blob-abc\",\"blob_size\":999,\
                 \"claimed_units\":1234,\"leaf_count\":5,\"merkle_root\":\"{}\",\
                 \"node_small_id\":3,\"object\":\"settlement.commitment\",\"stack_small_id\":7}}",
                "02".repeat(32),
                "01".repeat(32)
            )
        );
        assert_eq!(
            Hash32(atoma_crypto::blake2b256(text.as_bytes())).to_string(),
            "308b110cdc0a5ce75e6ef9b0bd458a516ea5004ba017b1ba5cb68db4e1f833a9"
        );
    }

    #[test]
    fn a_signed_commitment_round_trips_and_names_its_signer() {
        let keys = Keypair::from_secret([9; 32]);
        let v = sample().to_signed_json(&keys);
        assert_eq!(v["object"], OBJECT);
        assert_eq!(v["merkle_root"], Hash32([1; 32]).to_string());
        let (p, signer) = PublishedCommitment::from_signed_json(&v).unwrap();
        assert_eq!(p, sample());
        assert_eq!(signer, keys.address());
    }

    #[test]
    fn a_changed_field_or_a_foreign_object_is_refused() {
        let keys = Keypair::from_secret([9; 32]);
        let v = sample().to_signed_json(&keys);
        let mut moved = v.clone();
        moved["blob_id"] = "elsewhere".into();
        let e = PublishedCommitment::from_signed_json(&moved).unwrap_err();
        assert!(e.contains("response_hash"), "{e}");
        let mut other = sample();
        other.object = "chat.completion".into();
        let e = PublishedCommitment::from_signed_json(&other.to_signed_json(&keys)).unwrap_err();
        assert!(e.contains("not `settlement.commitment`"), "{e}");
        let e = PublishedCommitment::from_signed_json(&serde_json::json!({"a": 1})).unwrap_err();
        assert!(e.contains("signature"), "{e}");
    }
}
