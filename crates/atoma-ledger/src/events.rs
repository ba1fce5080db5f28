//! The ledger's events: one closed enum, variant and field names as the Atoma contract emits
//! them (module `db`), so a Sui backend and the embedded one feed the node the same values.
//!
//! Every event has a sequence number; a follower reads `events_after(cursor)` and stores the last
//! sequence it handled, so it can resume after a restart without missing or repeating events.

use serde::{Deserialize, Serialize};

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
    ClaimedStackEvent {
        stack_small_id: StackSmallId,
        selected_node_id: NodeSmallId,
        num_claimed_compute_units: ComputeUnits,
        user_refund_amount: Amount,
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
        }
    }
}
