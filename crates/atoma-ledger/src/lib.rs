//! The Atoma contract semantics behind one trait: nodes and their badges, models with echelons,
//! tasks, node subscriptions to tasks, stacks (prepaid compute units sold to one sampled node),
//! collateral, settlement (tickets with a committed request log, attestations, claims, stack
//! expiry), reputation, an epoch clock, balances and fees in integer base units, and a typed,
//! sequenced event log.
//!
//! Money is double-entry: every movement debits one account (a balance, a stack's escrow, a
//! node's collateral, the treasury, or the faucet) and credits another in the same transaction,
//! so `totals().is_conserved()` holds after every operation, refused ones included.
//!
//! Backends: `SqliteLedger` (embedded; one machine, tests, a local devnet) here, and a Sui
//! backend later. Every backend must pass `conformance::run_all`. Ledger calls are rare (buying a
//! stack, settling it), so the trait is synchronous; async callers use `spawn_blocking`.
//! Per-request metering is not the ledger's job: the node keeps it in its own store.
//!
//! Fixed from the reference contract: a stack's node is sampled only among nodes subscribed to
//! its task at a price within the buyer's cap, with enough capacity, collateral and reputation;
//! attestors are sampled without replacement and never include the settling node, with the
//! probability roll the right way round; attestors are paid from the 0.012× pool the buyer paid
//! for them, not from other stacks' escrow; a failed operation changes nothing (every operation
//! is one transaction).

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod events;
pub mod settlement;
mod sqlite;
pub mod types;

pub use events::{EventCursor, EventRecord, LedgerEvent};
pub use settlement::{
    ClaimOutcome, Dispute, DisputeClaim, DisputeOutcome, DisputeResolution, Hash32, LedgerParams,
    MoneyTotals, SettlementTicket, StackCommitment,
};
pub use sqlite::SqliteLedger;
pub use types::{
    Address, Amount, COMPUTE_UNITS_PER_STACK, ComputeUnits, NewTask, Node, NodeSmallId,
    REPUTATION_SCORE_START, Reputation, SecurityLevel, Stack, StackRequest, StackSmallId,
    Subscription, Task, TaskRole, TaskSmallId,
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
    #[error("node {node} has {have} collateral, {need} needed")]
    InsufficientCollateral {
        node: NodeSmallId,
        have: u64,
        need: u64,
    },
    #[error("node {node}'s collateral is locked: {reason}")]
    CollateralLocked { node: NodeSmallId, reason: String },
    #[error("{sender} does not own stack {stack}")]
    NotStackOwner {
        sender: Address,
        stack: StackSmallId,
    },
    #[error("stack {stack} was sold to node {selected}, not node {node}")]
    NodeNotSelectedForStack {
        stack: StackSmallId,
        node: NodeSmallId,
        selected: NodeSmallId,
    },
    #[error("claiming {claimed} compute units of stack {stack}, which has {units}")]
    TooManyComputeUnits {
        stack: StackSmallId,
        claimed: u64,
        units: u64,
    },
    #[error("stack {0} already has a settlement ticket")]
    TicketExists(StackSmallId),
    #[error("stack {0} has no settlement ticket")]
    NoTicket(StackSmallId),
    #[error("stack {0} is already claimed")]
    StackAlreadyClaimed(StackSmallId),
    #[error("stack {stack}'s task has security level {level:?}; this needs {needed}")]
    WrongSecurityLevel {
        stack: StackSmallId,
        level: SecurityLevel,
        needed: &'static str,
    },
    #[error("stack {stack} can be claimed from epoch {from}, it is epoch {epoch}")]
    DisputeWindowOpen {
        stack: StackSmallId,
        from: u64,
        epoch: u64,
    },
    #[error("stack {stack}'s dispute window closed before epoch {until}, it is epoch {epoch}")]
    DisputeWindowClosed {
        stack: StackSmallId,
        until: u64,
        epoch: u64,
    },
    #[error("node {node} was not asked to attest stack {stack}")]
    NotRequestedAttestor {
        stack: StackSmallId,
        node: NodeSmallId,
    },
    #[error("node {node} already attested stack {stack}")]
    AlreadyAttested {
        stack: StackSmallId,
        node: NodeSmallId,
    },
    #[error("stack {0}'s settlement is in dispute")]
    InDispute(StackSmallId),
    #[error("stack {stack} expires at epoch {at}, it is epoch {epoch}")]
    NotExpired {
        stack: StackSmallId,
        at: u64,
        epoch: u64,
    },
    #[error("{0} is not available yet")]
    NotYet(&'static str),
    #[error("stack {0} has no open dispute")]
    NoDispute(StackSmallId),
    #[error("node {node} is not the oracle of stack {stack}'s dispute")]
    NotTheOracle {
        stack: StackSmallId,
        node: NodeSmallId,
    },
    #[error("stack {stack}'s oracle has until epoch {deadline}, it is epoch {epoch}")]
    OracleDeadline {
        stack: StackSmallId,
        deadline: u64,
        epoch: u64,
    },
    #[error("ledger storage: {0}")]
    Storage(String),
    /// A backend whose contract has no such operation (the deployed Sui contract has no
    /// collateral deposits, dispute resolution, stack expiry or DA pointer on tickets:
    /// `docs/protocol.md` has the table).
    #[error("{0} is not supported by the deployed contract")]
    NotSupported(&'static str),
    /// The chain could not be reached or answered out of protocol (after the backend's retries).
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

/// Result alias of the ledger.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// The contract's operations. `sender` is the address that signs the transaction.
pub trait Ledger: Send + Sync {
    /// Registers a node; its badge belongs to `sender`. Emits `NodeRegisteredEvent`.
    fn register_node(&self, sender: Address) -> Result<Node>;
    /// Announces where a node serves its API (`http://` or `https://`, at most 512 characters).
    /// Emits `NodePublicUrlUpdatedEvent`.
    fn set_node_public_url(&self, sender: Address, node: NodeSmallId, url: &str) -> Result<()>;
    /// Every registered node, by id.
    fn nodes(&self) -> Result<Vec<Node>>;
    /// Tasks by id (deprecated ones included).
    fn tasks(&self) -> Result<Vec<Task>>;
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
    /// The stack the transaction `digest` created, read from that transaction itself, for a
    /// node whose event reads lag behind a purchase the user just made (the `X-Tx-Digest`
    /// request header). `None`: the transaction created no stack. A ledger without
    /// transaction digests (the embedded one, where every event is read at once) finds none.
    /// `escrowed` reads 0 when the backend has not yet seen the stack's task.
    fn stack_in_transaction(&self, digest: &str) -> Result<Option<Stack>> {
        let _ = digest;
        Ok(None)
    }

    // --- epochs and parameters ---

    /// The current epoch.
    fn epoch(&self) -> Result<u64>;
    /// Moves the clock one epoch forward (local ledgers and test doubles). Returns the new epoch.
    fn advance_epoch(&self) -> Result<u64>;
    fn params(&self) -> Result<LedgerParams>;
    /// Replaces the parameters (the ledger's administrator). Changing `epoch_ms` keeps the
    /// current epoch and counts from now.
    fn set_params(&self, sender: Address, params: &LedgerParams) -> Result<()>;

    // --- collateral ---

    /// Moves `amount` from the owner's balance into the node's collateral. Returns the new total.
    fn deposit_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount>;
    /// Moves `amount` of collateral back to the owner's balance; refused while the node has an
    /// open ticket, as seller or as requested attestor, or a dispute. Returns what is left.
    fn withdraw_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount>;

    // --- settlement ---

    /// Opens the stack's settlement ticket: by its selected node only, `claimed` at most the
    /// stack's units, one ticket per stack, not for ConfidentialCompute stacks. For
    /// SamplingConsensus tasks it may sample attestation nodes. Emits `StackTrySettleEvent`.
    fn try_settle_stack(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claimed: ComputeUnits,
        commitment: &StackCommitment,
    ) -> Result<SettlementTicket>;
    /// A requested attestor confirms the commitment, before the window ends. Once all have,
    /// the ticket is claimable at once. A different commitment opens a dispute instead.
    fn submit_stack_settlement_attestation(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        committed_stack_proof: Hash32,
    ) -> Result<SettlementTicket>;
    /// A requested attestor disputes the settlement (it found a different result), before the
    /// window ends. The ledger draws an oracle (same echelon, neither the seller nor the
    /// attestor) with a deadline; the ticket cannot be claimed until the dispute is resolved.
    fn start_attestation_dispute(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claim: &DisputeClaim,
    ) -> Result<Dispute>;
    /// The drawn oracle's verdict from its own re-execution, before its deadline. The loser's
    /// collateral is confiscated and shared between the oracle, the honest party and the
    /// treasury; a cheated stack's owner is refunded in full; an honest node's ticket becomes
    /// claimable at once.
    fn resolve_attestation_dispute(
        &self,
        sender: Address,
        oracle: NodeSmallId,
        stack: StackSmallId,
        node_was_honest: bool,
    ) -> Result<DisputeResolution>;
    /// After the deadline (anyone may call it): the silent oracle loses its timeout share and
    /// another is drawn; with none left, the stack is void and its owner refunded.
    fn expire_dispute_oracle(&self, sender: Address, stack: StackSmallId) -> Result<Dispute>;
    /// The stack's dispute, if one was opened (kept after resolution).
    fn dispute(&self, stack: StackSmallId) -> Result<Option<Dispute>>;
    /// The selected node claims settled tickets after their window: it is paid its fee,
    /// attestors that attested share their pool, requested attestors that did not are slashed,
    /// and the owner is refunded the rest of the escrow. All stacks or none.
    fn claim_funds(
        &self,
        sender: Address,
        node: NodeSmallId,
        stacks: &[StackSmallId],
    ) -> Result<Vec<ClaimOutcome>>;
    /// ConfidentialCompute stacks: claim `claimed` units directly, without ticket or window.
    fn claim_funds_for_stacks(
        &self,
        sender: Address,
        node: NodeSmallId,
        claims: &[(StackSmallId, ComputeUnits)],
    ) -> Result<Vec<ClaimOutcome>>;
    /// The owner closes a stack nobody settled within `stack_expiry_epochs`: full refund.
    fn close_expired_stack(&self, sender: Address, stack: StackSmallId) -> Result<Amount>;
    /// The stack's settlement ticket, if one was opened (kept after the claim).
    fn ticket(&self, stack: StackSmallId) -> Result<Option<SettlementTicket>>;
    /// Open tickets (not claimed) that name `node` as seller, as an attestor that has not attested
    /// yet, or as the oracle of their open dispute.
    fn open_tickets_of(&self, node: NodeSmallId) -> Result<Vec<SettlementTicket>>;

    // --- money ---

    /// Totals by kind of account, for the conservation check.
    fn totals(&self) -> Result<MoneyTotals>;
}
