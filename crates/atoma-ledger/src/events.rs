//! The ledger's events: one closed enum, variant and field names as the Atoma contract emits
//! them (module `db`), so a Sui backend and the embedded one feed the node the same values.
//!
//! Events the contract does not have (collateral, slashing, reputation, expiry, parameters) get
//! names in the same style; the settlement events carry, after the contract's fields, where the
//! stack's log is stored (`docs/protocol.md`).
//!
//! Every event has a sequence number; a follower reads `events_after(cursor)` and stores the last
//! sequence it handled, so it can resume after a restart without missing or repeating events.

use serde::{Deserialize, Serialize};

use crate::settlement::{DisputeOutcome, Hash32, LedgerParams};
use crate::types::{
    Address, Amount, ComputeUnits, NodeSmallId, SecurityLevel, StackSmallId, TaskRole, TaskSmallId,
};

/// Position in the event log: the sequence number of the last event a follower handled
/// (`EventCursor(0)` = before the first event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventCursor(pub u64);

/// An event with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub event: LedgerEvent,
}

/// Events of the task/stack protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "fields")]
pub enum LedgerEvent {
    NodeRegisteredEvent {
        badge_id: String,
        node_small_id: NodeSmallId,
        /// The registering address (the node records the transaction sender).
        sender: Address,
    },
    NodeSubscribedToModelEvent {
        node_small_id: NodeSmallId,
        model_name: String,
        echelon_id: u64,
    },
    TaskRegisteredEvent {
        task_id: String,
        task_small_id: TaskSmallId,
        role: TaskRole,
        model_name: Option<String>,
        security_level: SecurityLevel,
        minimum_reputation_score: Option<u8>,
    },
    TaskDeprecationEvent {
        task_id: String,
        task_small_id: TaskSmallId,
        epoch: u64,
    },
    NodeSubscribedToTaskEvent {
        task_small_id: TaskSmallId,
        node_small_id: NodeSmallId,
        price_per_one_million_compute_units: Amount,
        max_num_compute_units: ComputeUnits,
    },
    NodeSubscriptionUpdatedEvent {
        task_small_id: TaskSmallId,
        node_small_id: NodeSmallId,
        price_per_one_million_compute_units: Amount,
        max_num_compute_units: ComputeUnits,
    },
    NodeUnsubscribedFromTaskEvent {
        task_small_id: TaskSmallId,
        node_small_id: NodeSmallId,
    },
    StackCreatedEvent {
        stack_id: String,
        stack_small_id: StackSmallId,
        owner: Address,
        task_small_id: TaskSmallId,
        selected_node_id: NodeSmallId,
        num_compute_units: ComputeUnits,
        price_per_one_million_compute_units: Amount,
    },
    /// A ConfidentialCompute stack claimed directly (`claim_funds_for_stacks`).
    ClaimedStackEvent {
        stack_small_id: StackSmallId,
        selected_node_id: NodeSmallId,
        num_claimed_compute_units: ComputeUnits,
        user_refund_amount: Amount,
    },
    /// `try_settle_stack`: a ticket opened. `committed_stack_proof` and `stack_merkle_leaf` are
    /// both the log's Merkle root (attestors re-derive the same root; there is no per-attestor
    /// leaf); then where the log is, until when it may be disputed, and the seed attestors draw
    /// their sample of records from.
    StackTrySettleEvent {
        stack_small_id: StackSmallId,
        selected_node_id: NodeSmallId,
        requested_attestation_nodes: Vec<NodeSmallId>,
        committed_stack_proof: Hash32,
        stack_merkle_leaf: Hash32,
        num_claimed_compute_units: ComputeUnits,
        leaf_count: u64,
        blob_id: String,
        blob_hash: Hash32,
        blob_size: u64,
        dispute_settled_at_epoch: u64,
        sample_seed: Hash32,
    },
    NewStackSettlementAttestationEvent {
        stack_small_id: StackSmallId,
        attestation_node_id: NodeSmallId,
        committed_stack_proof: Hash32,
        stack_merkle_leaf: Hash32,
    },
    /// Every requested node attested: the ticket may be claimed from `dispute_settled_at_epoch`.
    StackSettlementTicketEvent {
        stack_small_id: StackSmallId,
        selected_node_id: NodeSmallId,
        num_claimed_compute_units: ComputeUnits,
        requested_attestation_nodes: Vec<NodeSmallId>,
        dispute_settled_at_epoch: u64,
        committed_stack_proof: Hash32,
    },
    /// `claim_funds`: the node was paid, attestors shared their pool, the owner was refunded.
    StackSettlementTicketClaimedEvent {
        stack_small_id: StackSmallId,
        selected_node_id: NodeSmallId,
        attestation_nodes: Vec<NodeSmallId>,
        num_claimed_compute_units: ComputeUnits,
        user_refund_amount: Amount,
        node_fee: Amount,
        attestor_share: Amount,
    },
    /// The contract's fields, then which record and token the attestor says are wrong, the
    /// oracle the ledger drew (none: no eligible node) and its deadline.
    StackAttestationDisputeEvent {
        stack_small_id: StackSmallId,
        attestation_commitment: Hash32,
        attestation_node_id: NodeSmallId,
        original_node_id: NodeSmallId,
        original_commitment: Hash32,
        record: Option<u64>,
        position: Option<u64>,
        oracle_node_id: Option<NodeSmallId>,
        deadline_epoch: u64,
    },
    /// A silent oracle was slashed and replaced (`oracle_node_id: None`: none left).
    DisputeOracleReassignedEvent {
        stack_small_id: StackSmallId,
        previous_oracle_node_id: NodeSmallId,
        oracle_node_id: Option<NodeSmallId>,
        deadline_epoch: u64,
    },
    /// A dispute ended: who lost, what was confiscated and shared, the owner's refund.
    StackDisputeResolvedEvent {
        stack_small_id: StackSmallId,
        oracle_node_id: Option<NodeSmallId>,
        outcome: DisputeOutcome,
        slashed_node_id: Option<NodeSmallId>,
        slashed_amount: Amount,
        oracle_share: Amount,
        honest_share: Amount,
        user_refund_amount: Amount,
    },
    /// An unsettled stack closed by its owner after expiry, fully refunded.
    StackExpiredEvent {
        stack_small_id: StackSmallId,
        owner: Address,
        user_refund_amount: Amount,
    },
    NodeCollateralDepositedEvent {
        node_small_id: NodeSmallId,
        amount: Amount,
        collateral: Amount,
    },
    NodeCollateralWithdrawnEvent {
        node_small_id: NodeSmallId,
        amount: Amount,
        collateral: Amount,
    },
    /// Collateral taken into the treasury (`reason`: `attestation_timeout`).
    NodeSlashedEvent {
        node_small_id: NodeSmallId,
        amount: Amount,
        reason: String,
    },
    NodeReputationUpdatedEvent {
        node_small_id: NodeSmallId,
        reputation_score: u8,
    },
    LedgerParamsUpdatedEvent {
        params: LedgerParams,
    },
    /// A node announced where it serves its API.
    NodePublicUrlUpdatedEvent {
        node_small_id: NodeSmallId,
        public_url: String,
    },
}

impl LedgerEvent {
    /// The contract's event name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NodeRegisteredEvent { .. } => "NodeRegisteredEvent",
            Self::NodeSubscribedToModelEvent { .. } => "NodeSubscribedToModelEvent",
            Self::TaskRegisteredEvent { .. } => "TaskRegisteredEvent",
            Self::TaskDeprecationEvent { .. } => "TaskDeprecationEvent",
            Self::NodeSubscribedToTaskEvent { .. } => "NodeSubscribedToTaskEvent",
            Self::NodeSubscriptionUpdatedEvent { .. } => "NodeSubscriptionUpdatedEvent",
            Self::NodeUnsubscribedFromTaskEvent { .. } => "NodeUnsubscribedFromTaskEvent",
            Self::StackCreatedEvent { .. } => "StackCreatedEvent",
            Self::ClaimedStackEvent { .. } => "ClaimedStackEvent",
            Self::StackTrySettleEvent { .. } => "StackTrySettleEvent",
            Self::NewStackSettlementAttestationEvent { .. } => "NewStackSettlementAttestationEvent",
            Self::StackSettlementTicketEvent { .. } => "StackSettlementTicketEvent",
            Self::StackSettlementTicketClaimedEvent { .. } => "StackSettlementTicketClaimedEvent",
            Self::StackAttestationDisputeEvent { .. } => "StackAttestationDisputeEvent",
            Self::StackExpiredEvent { .. } => "StackExpiredEvent",
            Self::DisputeOracleReassignedEvent { .. } => "DisputeOracleReassignedEvent",
            Self::StackDisputeResolvedEvent { .. } => "StackDisputeResolvedEvent",
            Self::NodeCollateralDepositedEvent { .. } => "NodeCollateralDepositedEvent",
            Self::NodeCollateralWithdrawnEvent { .. } => "NodeCollateralWithdrawnEvent",
            Self::NodeSlashedEvent { .. } => "NodeSlashedEvent",
            Self::NodeReputationUpdatedEvent { .. } => "NodeReputationUpdatedEvent",
            Self::LedgerParamsUpdatedEvent { .. } => "LedgerParamsUpdatedEvent",
            Self::NodePublicUrlUpdatedEvent { .. } => "NodePublicUrlUpdatedEvent",
        }
    }
}
