//! The Atoma contract semantics behind one trait: nodes and their badges, models with echelons,
//! tasks, node subscriptions to tasks, stacks (prepaid compute units sold to one sampled node),
//! balances and fees in integer base units, and a typed, sequenced event log.
//!
//! Backends: `SqliteLedger` (embedded; one machine, tests, a local devnet) here, and a Sui
//! backend later. Every backend must pass `conformance::run_all`. Ledger calls are rare (buying a
//! stack, settling it), so the trait is synchronous; async callers use `spawn_blocking`.
//! Per-request metering is not the ledger's job: the node keeps it in its own store.
//!
//! Fixed from the reference contract: a stack's node is sampled only among nodes subscribed to
//! its task at a price within the buyer's cap and with enough capacity, and a failed purchase
//! changes nothing (the whole operation is one transaction).

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod events;
mod sqlite;
pub mod types;

pub use events::{EventCursor, EventRecord, LedgerEvent};
pub use sqlite::SqliteLedger;
pub use types::{
    Address, Amount, COMPUTE_UNITS_PER_STACK, ComputeUnits, NewTask, Node, NodeSmallId,
    SecurityLevel, Stack, StackRequest, StackSmallId, Subscription, Task, TaskRole, TaskSmallId,
};

/// Why a ledger operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("node {0} does not exist")]
    NodeNotFound(NodeSmallId),
    #[error("task {0} does not exist")]
    TaskNotFound(TaskSmallId),
    #[error("stack {0} does not exist")]
    StackNotFound(StackSmallId),
    #[error("{sender} does not own node {node}'s badge")]
    NotNodeOwner { sender: Address, node: NodeSmallId },
    #[error("task {0} is deprecated")]
    TaskDeprecated(TaskSmallId),
    #[error("node {node} has reputation {have}, task {task} requires {need}")]
    ReputationTooLow {
        node: NodeSmallId,
        task: TaskSmallId,
        have: u8,
        need: u8,
    },
    #[error("task {task} is private and node {node} is not whitelisted")]
    NotWhitelisted {
        task: TaskSmallId,
        node: NodeSmallId,
    },
    #[error("node {node} is already subscribed to task {task}")]
    AlreadySubscribed {
        task: TaskSmallId,
        node: NodeSmallId,
    },
    #[error("node {node} is not subscribed to task {task}")]
    NotSubscribed {
        task: TaskSmallId,
        node: NodeSmallId,
    },
    #[error("node {node} already serves model `{model}` in another echelon")]
    AlreadyInEchelon { node: NodeSmallId, model: String },
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error(
        "no node subscribed to task {task} offers {units} compute units at a price of at most {price} per million"
    )]
    NoEligibleNodes {
        task: TaskSmallId,
        units: u64,
        price: u64,
    },
    #[error("insufficient balance: {needed} needed, {available} available")]
    InsufficientBalance { needed: u64, available: u64 },
    #[error("ledger storage: {0}")]
    Storage(String),
}

/// Result alias of the ledger.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// The contract's operations. `sender` is the address that signs the transaction.
pub trait Ledger: Send + Sync {
    /// Registers a node; its badge belongs to `sender`. Emits `NodeRegisteredEvent`.
    fn register_node(&self, sender: Address) -> Result<Node>;
    /// Puts a node in an echelon of a model (at most one echelon per model).
    fn add_node_to_model(
        &self,
        sender: Address,
        node: NodeSmallId,
        model_name: &str,
        echelon_id: u64,
    ) -> Result<()>;
    /// Creates a task. Emits `TaskRegisteredEvent`.
    fn create_task(&self, sender: Address, task: &NewTask) -> Result<Task>;
    /// Allows nodes to subscribe to a private task.
    fn whitelist_nodes_for_task(&self, task: TaskSmallId, nodes: &[NodeSmallId]) -> Result<()>;
    /// Marks a task deprecated: no new subscriptions or stacks.
    fn deprecate_task(&self, task: TaskSmallId) -> Result<()>;
    /// Subscribes a node to a task at a price per one million compute units.
    fn subscribe_node_to_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price_per_one_million_compute_units: Amount,
    ) -> Result<Subscription>;
    /// Changes a subscription's price (existing stacks keep theirs).
    fn update_node_subscription(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price_per_one_million_compute_units: Amount,
    ) -> Result<Subscription>;
    /// Ends a subscription.
    fn unsubscribe_node_from_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
    ) -> Result<()>;
    /// Buys a stack: samples one eligible node uniformly, escrows the fee from `buyer`'s balance.
    fn acquire_stack(&self, buyer: Address, req: &StackRequest) -> Result<Stack>;
    /// Credits `amount` to `to` (local ledgers only). Returns the new balance.
    fn faucet(&self, to: Address, amount: Amount) -> Result<Amount>;
    /// `who`'s balance.
    fn balance(&self, who: Address) -> Result<Amount>;
    /// Fees held in escrow by the protocol.
    fn fee_treasury(&self) -> Result<Amount>;
    fn node(&self, id: NodeSmallId) -> Result<Node>;
    /// Nodes whose badge `owner` holds, by id.
    fn nodes_of(&self, owner: Address) -> Result<Vec<Node>>;
    fn task(&self, id: TaskSmallId) -> Result<Task>;
    fn stack(&self, id: StackSmallId) -> Result<Stack>;
    /// Current subscriptions of a task, by node id.
    fn subscriptions(&self, task: TaskSmallId) -> Result<Vec<Subscription>>;
    /// Up to `limit` events after `cursor`, oldest first.
    fn events_after(&self, cursor: EventCursor, limit: usize) -> Result<Vec<EventRecord>>;
}
