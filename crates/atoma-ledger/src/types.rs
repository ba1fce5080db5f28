//! Domain values of the ledger: small ids, addresses, amounts, compute units, tasks' roles and
//! security levels. Newtypes over integers; money and counts are never floats.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! small_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("Sequential id of a ", $what, " (starts at 1; 0 is reserved).")]
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

small_id!(NodeSmallId, "node");
small_id!(TaskSmallId, "task");
small_id!(StackSmallId, "stack");

/// USDC base units (6 decimals): 1_000_000 = 1 USDC.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Amount(pub u64);

/// Compute units (for text models: prompt + completion tokens).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ComputeUnits(pub u64);

/// The hard-coded capacity a node offers per stack, as in the contract.
pub const COMPUTE_UNITS_PER_STACK: ComputeUnits = ComputeUnits(1_000_000);

/// Starting reputation of a node.
pub const REPUTATION_SCORE_START: u8 = 50;

/// A 32-byte Sui address, written `0x` + 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 32]);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix("0x").unwrap_or(s);
        if hex.is_empty() || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "`{s}` is not a Sui address (0x + up to 64 hex digits)"
            ));
        }
        let padded = format!("{hex:0>64}");
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&padded[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a task does (`TaskRole`, valid values 0..=7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskRole {
    ChatCompletion = 0,
    Embedding = 1,
    Vision = 2,
    ImageGen = 3,
    TextToSpeech = 4,
    SpeechToText = 5,
    FineTuning = 6,
    Training = 7,
}

impl TaskRole {
    /// The on-chain `u16`.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// From the on-chain `u16`.
    pub fn from_code(c: u16) -> Option<Self> {
        use TaskRole::*;
        [
            ChatCompletion,
            Embedding,
            Vision,
            ImageGen,
            TextToSpeech,
            SpeechToText,
            FineTuning,
            Training,
        ]
        .get(usize::from(c))
        .copied()
    }
}

/// How a task's results are secured (the contract's constants: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityLevel {
    NoSecurity = 0,
    ConfidentialCompute = 1,
    SamplingConsensus = 2,
}

impl SecurityLevel {
    /// The on-chain `u16`.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// From the on-chain `u16`.
    pub fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(Self::NoSecurity),
            1 => Some(Self::ConfidentialCompute),
            2 => Some(Self::SamplingConsensus),
            _ => None,
        }
    }

    /// What a buyer pays into escrow for `units` at `price` per million units: SamplingConsensus
    /// pays 1.212× up front (1.2× for the node, 0.012× for attestors), as in the contract. One
    /// floor over the whole product, so that the node's fee and the attestors' pool on any
    /// claimed part never exceed it (`floor(a) + floor(b) <= floor(a + b)`).
    pub fn stack_fee(self, price_per_million: Amount, units: ComputeUnits) -> Option<Amount> {
        let permille = match self {
            Self::SamplingConsensus => SAMPLING_CONSENSUS_NODE_PERMILLE + ATTESTOR_POOL_PERMILLE,
            _ => 1000,
        };
        permille_of_price(price_per_million, units, permille)
    }

    /// The selected node's fee for `claimed` units: 1.2× the price for SamplingConsensus (the
    /// contract's `calculate_stack_fee_amount`), the price otherwise.
    pub fn node_fee(self, price_per_million: Amount, claimed: ComputeUnits) -> Option<Amount> {
        let permille = match self {
            Self::SamplingConsensus => SAMPLING_CONSENSUS_NODE_PERMILLE,
            _ => 1000,
        };
        permille_of_price(price_per_million, claimed, permille)
    }

    /// The pool shared by the attestors that attested `claimed` units (0.012× the price;
    /// SamplingConsensus only).
    pub fn attestor_pool(self, price_per_million: Amount, claimed: ComputeUnits) -> Option<Amount> {
        match self {
            Self::SamplingConsensus => {
                permille_of_price(price_per_million, claimed, ATTESTOR_POOL_PERMILLE)
            }
            _ => Some(Amount(0)),
        }
    }
}

/// What SamplingConsensus pays the selected node, in permille of the price.
pub const SAMPLING_CONSENSUS_NODE_PERMILLE: u64 = 1200;
/// What SamplingConsensus sets aside for attestors, in permille of the price.
pub const ATTESTOR_POOL_PERMILLE: u64 = 12;

/// `floor(price × units × permille / (10^6 × 1000))`, or `None` if it does not fit in a u64.
fn permille_of_price(price: Amount, units: ComputeUnits, permille: u64) -> Option<Amount> {
    let v = u128::from(price.0) * u128::from(units.0) * u128::from(permille) / 1_000_000_000;
    u64::try_from(v).ok().map(Amount)
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub small_id: NodeSmallId,
    /// The address that registered it and owns its badge.
    pub owner: Address,
    pub badge_id: String,
    /// 0–100, derived from `record` (`Reputation::score`).
    pub reputation_score: u8,
    pub is_disabled: bool,
    /// Collateral locked by the node: what a timeout or a lost dispute costs it.
    pub collateral: Amount,
    /// What settlement outcomes have recorded about the node.
    pub record: Reputation,
    /// Where the node serves its API (`set_node_public_url`), for gateways and users.
    pub public_url: Option<String>,
}

/// Per-node counters that settlement outcomes update, and the score derived from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reputation {
    /// Stacks the node settled and claimed without dispute.
    pub settled_on_time: u64,
    /// Attestations it submitted when asked, within the window.
    pub attestations_made: u64,
    /// Attestations it was asked for and did not submit in time.
    pub attestations_missed: u64,
    /// Disputes decided against it.
    pub disputes_lost: u64,
}

impl Reputation {
    /// The 0–100 score: `REPUTATION_SCORE_START` (50) for a new node, rising towards 100 with
    /// good outcomes (`+50 × good / (good + 20)`, so twenty of them are worth +25) and falling
    /// by 10 per missed attestation and by 40 per lost dispute.
    pub fn score(&self) -> u8 {
        let good = u128::from(self.settled_on_time) + u128::from(self.attestations_made);
        let bonus = 50 * good / (good + 20);
        let penalty =
            10 * u128::from(self.attestations_missed) + 40 * u128::from(self.disputes_lost);
        let s = (u128::from(REPUTATION_SCORE_START) + bonus).saturating_sub(penalty);
        s.min(100) as u8
    }
}

/// A task: role, optional model, security level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub small_id: TaskSmallId,
    pub role: TaskRole,
    pub model_name: Option<String>,
    pub security_level: SecurityLevel,
    pub minimum_reputation_score: u8,
    pub is_public: bool,
    pub is_deprecated: bool,
    /// Nodes allowed to subscribe when the task is not public.
    pub whitelist: Vec<NodeSmallId>,
    /// Collateral a node needs to be sold stacks of this task or to attest them (the ledger's
    /// `min_collateral` applies too; the larger wins).
    pub minimum_collateral: Amount,
}

/// What a task creator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub role: TaskRole,
    pub model_name: Option<String>,
    pub security_level: SecurityLevel,
    pub minimum_reputation_score: u8,
    pub is_public: bool,
    /// See `Task::minimum_collateral`.
    pub minimum_collateral: Amount,
}

/// A node's offer on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub task_small_id: TaskSmallId,
    pub node_small_id: NodeSmallId,
    pub price_per_one_million_compute_units: Amount,
    pub max_num_compute_units: ComputeUnits,
}

/// Prepaid compute units of one buyer for one task, sold to one sampled node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    pub small_id: StackSmallId,
    pub stack_id: String,
    pub owner: Address,
    pub task_small_id: TaskSmallId,
    pub selected_node_id: NodeSmallId,
    pub num_compute_units: ComputeUnits,
    /// The buyer's price cap; the stack is charged and paid at this price, as in the contract.
    pub price_per_one_million_compute_units: Amount,
    /// What the buyer paid into escrow.
    pub escrowed: Amount,
    /// Claimed by its node, or closed by its owner after expiry: no more service.
    pub is_claimed: bool,
    /// The epoch it was bought in (expiry counts from it).
    pub created_at_epoch: u64,
}

/// What a stack buyer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackRequest {
    pub task_small_id: TaskSmallId,
    pub num_compute_units: ComputeUnits,
    pub price_per_one_million_compute_units: Amount,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_pad() {
        let a: Address = "0x2a".parse().unwrap();
        assert_eq!(a.0[31], 0x2a);
        assert_eq!(a.to_string().len(), 66);
        assert_eq!(a.to_string().parse::<Address>().unwrap(), a);
        assert!("0xzz".parse::<Address>().is_err());
        assert!("".parse::<Address>().is_err());
    }

    #[test]
    fn fees_follow_the_contract() {
        let p = Amount(2_000_000);
        assert_eq!(
            SecurityLevel::NoSecurity.stack_fee(p, ComputeUnits(500_000)),
            Some(Amount(1_000_000))
        );
        assert_eq!(
            SecurityLevel::SamplingConsensus.stack_fee(p, ComputeUnits(500_000)),
            Some(Amount(1_212_000))
        );
        assert_eq!(TaskRole::from_code(7), Some(TaskRole::Training));
        assert_eq!(TaskRole::from_code(8), None);
    }
}
