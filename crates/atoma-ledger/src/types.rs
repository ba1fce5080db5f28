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

/// Starting reputation of a node (the contract never changes it yet).
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

    /// What a buyer pays for `units` at `price` per million units: SamplingConsensus pays
    /// 1.212× up front (1.2× for the node, 0.012× for attestors), as in the contract.
    pub fn stack_fee(self, price_per_million: Amount, units: ComputeUnits) -> Option<Amount> {
        let base = u128::from(price_per_million.0) * u128::from(units.0) / 1_000_000;
        let fee = match self {
            Self::SamplingConsensus => base * 1212 / 1000,
            _ => base,
        };
        u64::try_from(fee).ok().map(Amount)
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub small_id: NodeSmallId,
    /// The address that registered it and owns its badge.
    pub owner: Address,
    pub badge_id: String,
    pub reputation_score: u8,
    pub is_disabled: bool,
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
}

/// What a task creator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub role: TaskRole,
    pub model_name: Option<String>,
    pub security_level: SecurityLevel,
    pub minimum_reputation_score: u8,
    pub is_public: bool,
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
    pub is_claimed: bool,
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
