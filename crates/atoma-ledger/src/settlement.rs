//! Values of settlement: the commitment a node submits for a stack (a Merkle root over its
//! request log and where the log is stored), the ticket the ledger keeps until the stack is
//! claimed, disputes (what an attestor claims is wrong, the oracle the ledger drew, the
//! outcome), the ledger's parameters (epochs, dispute window, attestation sampling, collateral,
//! slashing, oracles, expiry), what a claim paid, and the money totals the conservation check
//! reads.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::types::{Amount, ComputeUnits, NodeSmallId, StackSmallId};

/// A 32-byte digest (Blake2b-256 here), written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({self})")
    }
}

impl FromStr for Hash32 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("0x").unwrap_or(s);
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{s}` is not a 32-byte digest (64 hex digits)"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a node commits to when it settles a stack: the Merkle root over its request log's
/// leaves (`docs/protocol.md`), how many leaves, and where the log blob lives on the
/// data-availability store with the Blake2b-256 of its bytes and its size (blob ids are opaque;
/// the hash is what makes a fetched blob trustworthy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackCommitment {
    pub merkle_root: Hash32,
    pub leaf_count: u64,
    pub blob_id: String,
    pub blob_hash: Hash32,
    /// The blob's size in bytes (a reader never downloads more).
    pub blob_size: u64,
}

impl StackCommitment {
    /// A commitment to the Merkle root alone, which is all the deployed Sui contract's
    /// `try_settle_stack` records: no leaf count, no log location. Attestors then find the log
    /// off-chain (the seller publishes a signed commitment at its API, `GET
    /// /v1/settlements/{stack}`) and check it against this root.
    pub fn root_only(merkle_root: Hash32) -> Self {
        Self {
            merkle_root,
            leaf_count: 0,
            blob_id: String::new(),
            blob_hash: Hash32::default(),
            blob_size: 0,
        }
    }

    /// Whether the ledger recorded only the root (`root_only`): the log's location must be
    /// found off-chain.
    pub fn is_root_only(&self) -> bool {
        *self == Self::root_only(self.merkle_root)
    }
}

/// Longest blob id a commitment may carry (Walrus ids are 43 characters).
pub const MAX_BLOB_ID_LEN: usize = 256;

/// A stack's settlement, from `try_settle_stack` until it is claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementTicket {
    pub stack_small_id: StackSmallId,
    pub selected_node_id: NodeSmallId,
    pub num_claimed_compute_units: ComputeUnits,
    pub commitment: StackCommitment,
    /// Nodes the ledger sampled to attest (SamplingConsensus), never the selected node.
    pub requested_attestation_nodes: Vec<NodeSmallId>,
    /// Requested nodes that have attested, in order.
    pub already_attested_nodes: Vec<NodeSmallId>,
    /// The epoch the ticket was opened in.
    pub created_at_epoch: u64,
    /// The first epoch the node may claim in; attestations and disputes are accepted before it.
    /// Set to the current epoch when every requested node has attested.
    pub dispute_settled_at_epoch: u64,
    pub is_in_dispute: bool,
    pub is_claimed: bool,
    /// Ledger randomness drawn when the ticket was opened, after the commitment: attestors
    /// that re-execute a sample of the records derive the sample from it, so the node could
    /// not know which records would be checked.
    pub sample_seed: Hash32,
}

/// The ledger's tunable parameters. `Default` gives the contract's values where it has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerParams {
    /// Length of an epoch in milliseconds of wall-clock time; 0 = the epoch only moves when
    /// `advance_epoch` is called (tests).
    pub epoch_ms: u64,
    /// Epochs after `try_settle_stack` during which attestations and disputes are accepted
    /// (`STACK_DISPUTE_SETTLEMENT_DELAY`, 1 in the contract).
    pub dispute_window_epochs: u64,
    /// Chance, in permille, that a SamplingConsensus settlement is attested (1000 = always).
    pub attestation_probability_permille: u16,
    /// How many attestation nodes are sampled (without replacement) when it is.
    pub attestation_nodes: u16,
    /// Collateral every node needs to be sold stacks or to attest.
    pub min_collateral: Amount,
    /// Share of its collateral a requested attestor loses when it does not attest in time.
    pub timeout_slash_permille: u16,
    /// Epochs after purchase after which an unsettled stack may be closed by its owner for a
    /// full refund (0 = never).
    pub stack_expiry_epochs: u64,
    /// Epochs an oracle has to resolve a dispute before it is slashed and replaced.
    pub oracle_window_epochs: u64,
    /// Share of a dispute loser's confiscated collateral paid to the oracle (permille).
    pub oracle_share_permille: u16,
    /// Share paid to the honest party (permille); the rest goes to the treasury.
    pub honest_share_permille: u16,
}

impl Default for LedgerParams {
    fn default() -> Self {
        Self {
            epoch_ms: 0,
            dispute_window_epochs: 1,
            attestation_probability_permille: 10,
            attestation_nodes: 1,
            min_collateral: Amount(0),
            timeout_slash_permille: 100,
            stack_expiry_epochs: 30,
            oracle_window_epochs: 2,
            oracle_share_permille: 100,
            honest_share_permille: 200,
        }
    }
}

impl LedgerParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.attestation_probability_permille > 1000 {
            return Err("attestation_probability_permille must be at most 1000".into());
        }
        if self.timeout_slash_permille > 1000 {
            return Err("timeout_slash_permille must be at most 1000".into());
        }
        if self.dispute_window_epochs == 0 {
            return Err("dispute_window_epochs must be at least 1".into());
        }
        if self.oracle_window_epochs == 0 {
            return Err("oracle_window_epochs must be at least 1".into());
        }
        if u32::from(self.oracle_share_permille) + u32::from(self.honest_share_permille) > 1000 {
            return Err(
                "oracle_share_permille + honest_share_permille must be at most 1000".into(),
            );
        }
        Ok(())
    }
}

/// What an attestor says is wrong with a settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisputeClaim {
    /// The attestor's own Merkle root over the log (zero when the log could not be had).
    pub attestation_commitment: Hash32,
    /// The record it found wrong (`None`: the log itself is bad: missing, other bytes, another
    /// root, a bad signature).
    pub record: Option<u64>,
    /// The first wrong output token of that record, when the fault is in the output.
    pub position: Option<u64>,
}

/// How a dispute ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeOutcome {
    /// The oracle's re-execution agreed with the node: the attestor lost.
    NodeHonest,
    /// It agreed with the attestor: the node lost and the user is refunded.
    NodeCheated,
    /// No eligible oracle was left: the stack is void, the user refunded, nobody slashed.
    NoOracle,
}

/// A dispute over a settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispute {
    pub stack_small_id: StackSmallId,
    /// The attestor that disputed.
    pub attestor: NodeSmallId,
    pub claim: DisputeClaim,
    /// The oracle that must resolve it now (`None` once resolved without one).
    pub oracle: Option<NodeSmallId>,
    /// Every oracle drawn so far, in order (silent ones were slashed and replaced).
    pub oracles_drawn: Vec<NodeSmallId>,
    pub opened_at_epoch: u64,
    /// The current oracle must resolve it before this epoch.
    pub deadline_epoch: u64,
    pub outcome: Option<DisputeOutcome>,
}

/// What one dispute resolution moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisputeResolution {
    pub stack_small_id: StackSmallId,
    pub outcome: DisputeOutcome,
    /// The loser and its confiscated collateral.
    pub slashed: Option<(NodeSmallId, Amount)>,
    pub oracle_share: Amount,
    pub honest_share: Amount,
    /// Escrow returned to the stack's owner now (a cheated or void stack); an honest node's
    /// stack is claimed as usual afterwards.
    pub user_refund_amount: Amount,
}

/// What one claim moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOutcome {
    pub stack_small_id: StackSmallId,
    pub num_claimed_compute_units: ComputeUnits,
    /// Paid to the selected node's owner.
    pub node_fee: Amount,
    /// Paid to each attestor that attested (`(node, amount)`).
    pub attestor_shares: Vec<(NodeSmallId, Amount)>,
    /// Returned to the stack's owner: escrow minus everything above.
    pub user_refund_amount: Amount,
    /// Collateral taken from requested attestors that did not attest (`(node, amount)`).
    pub slashed: Vec<(NodeSmallId, Amount)>,
}

/// The money on the ledger, by kind of account. Conservation: `minted` equals the sum of the
/// rest after every operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MoneyTotals {
    /// Everything the faucet ever created.
    pub minted: u128,
    /// All addresses' spendable balances.
    pub balances: u128,
    /// Stack fees held until their stacks are claimed or closed.
    pub escrow: u128,
    /// All nodes' collateral.
    pub collateral: u128,
    /// The protocol's treasury (slashed collateral).
    pub treasury: u128,
}

impl MoneyTotals {
    /// Whether nothing was created or lost.
    pub fn is_conserved(&self) -> bool {
        self.minted == self.balances + self.escrow + self.collateral + self.treasury
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_only_commitment_is_the_root_and_nothing_else() {
        let c = StackCommitment::root_only(Hash32([3; 32]));
        assert!(c.is_root_only());
        for other in [
            StackCommitment {
                leaf_count: 1,
                ..c.clone()
            },
            StackCommitment {
                blob_id: "b".into(),
                ..c.clone()
            },
            StackCommitment {
                blob_hash: Hash32([1; 32]),
                ..c.clone()
            },
            StackCommitment {
                blob_size: 1,
                ..c.clone()
            },
        ] {
            assert!(!other.is_root_only(), "{other:?}");
        }
    }

    #[test]
    fn digests_round_trip_as_hex() {
        let h = Hash32([0xab; 32]);
        assert_eq!(h.to_string().len(), 64);
        assert_eq!(h.to_string().parse::<Hash32>().unwrap(), h);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<Hash32>(&json).unwrap(), h);
        assert!("abc".parse::<Hash32>().is_err());
    }

    #[test]
    fn parameters_are_checked() {
        assert!(LedgerParams::default().validate().is_ok());
        let bad = LedgerParams {
            attestation_probability_permille: 1001,
            ..LedgerParams::default()
        };
        assert!(bad.validate().is_err());
    }
}
