//! BCS mirrors of the Move structs of the contract's `db` module, and the codec between the
//! chain's events and the ledger's typed [`LedgerEvent`]s.
//!
//! BCS has no field names: a struct is its fields in declaration order, so each mirror lists the
//! Move fields in the order of `db.move` (atoma-network/atoma-contracts 9e53429). `ID` and
//! `address` are 32 raw bytes, `vector<u8>` and `ascii::String` a ULEB128 length and the bytes,
//! `Option<T>` a 0/1 tag then the value, small ids `{ inner: u64 }`.
//!
//! Two layouts share one event name:
//! - **deployed**: exactly what the deployed contract emits;
//! - **extended**: the deployed fields followed by what our ledger adds (where the stack's log
//!   is stored, the dispute's record and oracle, the fee split), as a contract that carries them
//!   would emit them; and events the deployed contract has no equivalent for (collateral,
//!   slashing, reputation, parameters, expiry, public URL).
//!
//! [`decode_event`] reads either (the extended layout first: a deployed payload is too short for
//! it, an extended one too long for the deployed layout, so the two never collide); fields a
//! deployed event lacks come back as explicit "unknown" values (empty blob id, zero hashes).
//! [`encode_event`] writes the extended layout; [`encode_deployed`] the deployed one where it
//! exists.

use atoma_ledger::{Address, Amount, DisputeOutcome, LedgerEvent, LedgerParams, NodeSmallId};
use serde::{Deserialize, Serialize};

/// Why an event's contents could not be turned into a [`LedgerEvent`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event `{0}` is not one of the `db` module's events")]
    UnknownEvent(String),
    #[error("event `{name}`: its BCS contents match neither layout: {error}")]
    Bcs { name: String, error: String },
    #[error("event `{name}`: {what}")]
    Invalid { name: String, what: String },
}

/// `NodeSmallId`, `TaskSmallId`, `StackSmallId`: `{ inner: u64 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmallId {
    pub inner: u64,
}

/// `TaskRole` and `SecurityLevel`: `{ inner: u16 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Code16 {
    pub inner: u16,
}

/// `NodeBadge`, `TaskBadge`, `StackBadge`: `{ id: UID, small_id }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Badge {
    pub id: [u8; 32],
    pub small_id: SmallId,
}

/// `Coin<T>`: `{ id: UID, balance: Balance<T> { value: u64 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coin {
    pub id: [u8; 32],
    pub value: u64,
}

mod decode;
pub use decode::decode_event;

fn sid(n: u64) -> SmallId {
    SmallId { inner: n }
}

fn sids(v: &[NodeSmallId]) -> Vec<SmallId> {
    v.iter().map(|x| sid(x.0)).collect()
}

/// A 32-byte id from the ledger's `0x…` string form.
pub fn id_bytes(id: &str) -> Result<[u8; 32], String> {
    id.parse::<Address>().map(|a| a.0)
}

/// The `0x…` string form of a 32-byte id.
pub fn id_string(id: &[u8; 32]) -> String {
    Address(*id).to_string()
}

macro_rules! mirrors {
    ($( $(#[$m:meta])* struct $name:ident { $($f:ident : $t:ty),* $(,)? } )*) => {
        $(
            $(#[$m])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $name { $(pub $f: $t),* }
        )*
    };
}

mirrors! {
    // ---- the deployed contract's events (db.move 9e53429, lines 167-395) ----
    struct NodeRegistered { badge_id: [u8; 32], node_small_id: SmallId }
    struct NodeSubscribedToModel { node_small_id: SmallId, model_name: String, echelon_id: u64 }
    struct NodeSubscribedToTask {
        task_small_id: SmallId, node_small_id: SmallId,
        price_per_one_million_compute_units: u64, max_num_compute_units: u64,
    }
    /// Node first here, unlike `NodeSubscribedToTaskEvent`.
    struct NodeSubscriptionUpdated {
        node_small_id: SmallId, task_small_id: SmallId,
        price_per_one_million_compute_units: u64, max_num_compute_units: u64,
    }
    struct NodeUnsubscribedFromTask { task_small_id: SmallId, node_small_id: SmallId }
    struct TaskRegistered {
        task_id: [u8; 32], task_small_id: SmallId, role: Code16, model_name: Option<String>,
        security_level: Code16, minimum_reputation_score: Option<u8>,
    }
    struct TaskDeprecation { task_id: [u8; 32], task_small_id: SmallId, epoch: u64 }
    struct StackCreated {
        stack_id: [u8; 32], stack_small_id: SmallId, owner: [u8; 32], task_small_id: SmallId,
        selected_node_id: SmallId, num_compute_units: u64, price_per_one_million_compute_units: u64,
    }
    struct ClaimedStack {
        stack_small_id: SmallId, selected_node_id: SmallId, num_claimed_compute_units: u64,
        user_refund_amount: u64,
    }
    struct StackTrySettle {
        stack_small_id: SmallId, selected_node_id: SmallId, requested_attestation_nodes: Vec<SmallId>,
        committed_stack_proof: Vec<u8>, stack_merkle_leaf: Vec<u8>, num_claimed_compute_units: u64,
    }
    struct NewStackSettlementAttestation {
        stack_small_id: SmallId, attestation_node_id: SmallId, committed_stack_proof: Vec<u8>,
        stack_merkle_leaf: Vec<u8>,
    }
    struct StackSettlementTicket {
        stack_small_id: SmallId, selected_node_id: SmallId, num_claimed_compute_units: u64,
        requested_attestation_nodes: Vec<SmallId>, dispute_settled_at_epoch: u64,
        committed_stack_proof: Vec<u8>,
    }
    struct StackSettlementTicketClaimed {
        stack_small_id: SmallId, selected_node_id: SmallId, attestation_nodes: Vec<SmallId>,
        num_claimed_compute_units: u64, user_refund_amount: u64,
    }
    struct StackAttestationDispute {
        stack_small_id: SmallId, attestation_commitment: Vec<u8>, attestation_node_id: SmallId,
        original_node_id: SmallId, original_commitment: Vec<u8>,
    }

    // ---- the extended layout: the deployed fields, then ours ----
    struct StackTrySettleExt {
        base: StackTrySettle, leaf_count: u64, blob_id: String, blob_hash: Vec<u8>, blob_size: u64,
        dispute_settled_at_epoch: u64, sample_seed: Vec<u8>,
    }
    struct StackSettlementTicketClaimedExt {
        base: StackSettlementTicketClaimed, node_fee: u64, attestor_share: u64,
    }
    struct StackAttestationDisputeExt {
        base: StackAttestationDispute, record: Option<u64>, position: Option<u64>,
        oracle_node_id: Option<SmallId>, deadline_epoch: u64,
    }

    // ---- events only the extended contract has ----
    struct DisputeOracleReassigned {
        stack_small_id: SmallId, previous_oracle_node_id: SmallId, oracle_node_id: Option<SmallId>,
        deadline_epoch: u64,
    }
    /// `outcome`: 0 node honest, 1 node cheated, 2 no oracle.
    struct StackDisputeResolved {
        stack_small_id: SmallId, oracle_node_id: Option<SmallId>, outcome: u8,
        slashed_node_id: Option<SmallId>, slashed_amount: u64, oracle_share: u64,
        honest_share: u64, user_refund_amount: u64,
    }
    struct StackExpired { stack_small_id: SmallId, owner: [u8; 32], user_refund_amount: u64 }
    struct NodeCollateral { node_small_id: SmallId, amount: u64, collateral: u64 }
    struct NodeSlashed { node_small_id: SmallId, amount: u64, reason: String }
    struct NodeReputationUpdated { node_small_id: SmallId, reputation_score: u8 }
    struct Params {
        epoch_ms: u64, dispute_window_epochs: u64, attestation_probability_permille: u16,
        attestation_nodes: u16, min_collateral: u64, timeout_slash_permille: u16,
        stack_expiry_epochs: u64, oracle_window_epochs: u64, oracle_share_permille: u16,
        honest_share_permille: u16,
    }
    struct LedgerParamsUpdated { params: Params }
    struct NodePublicUrlUpdated { node_small_id: SmallId, public_url: String }
}

impl From<&LedgerParams> for Params {
    fn from(p: &LedgerParams) -> Self {
        Self {
            epoch_ms: p.epoch_ms,
            dispute_window_epochs: p.dispute_window_epochs,
            attestation_probability_permille: p.attestation_probability_permille,
            attestation_nodes: p.attestation_nodes,
            min_collateral: p.min_collateral.0,
            timeout_slash_permille: p.timeout_slash_permille,
            stack_expiry_epochs: p.stack_expiry_epochs,
            oracle_window_epochs: p.oracle_window_epochs,
            oracle_share_permille: p.oracle_share_permille,
            honest_share_permille: p.honest_share_permille,
        }
    }
}

impl From<Params> for LedgerParams {
    fn from(p: Params) -> Self {
        Self {
            epoch_ms: p.epoch_ms,
            dispute_window_epochs: p.dispute_window_epochs,
            attestation_probability_permille: p.attestation_probability_permille,
            attestation_nodes: p.attestation_nodes,
            min_collateral: Amount(p.min_collateral),
            timeout_slash_permille: p.timeout_slash_permille,
            stack_expiry_epochs: p.stack_expiry_epochs,
            oracle_window_epochs: p.oracle_window_epochs,
            oracle_share_permille: p.oracle_share_permille,
            honest_share_permille: p.honest_share_permille,
        }
    }
}

fn outcome_code(o: DisputeOutcome) -> u8 {
    match o {
        DisputeOutcome::NodeHonest => 0,
        DisputeOutcome::NodeCheated => 1,
        DisputeOutcome::NoOracle => 2,
    }
}

fn bcs<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of integers, byte vectors and strings cannot fail (bcs fails only
    // on maps it cannot sort, sequences over 2^31 elements and nesting over 500 levels).
    bcs::to_bytes(v).unwrap_or_default()
}

fn id32(name: &str, what: &str, id: &str) -> Result<[u8; 32], DecodeError> {
    id_bytes(id).map_err(|e| DecodeError::Invalid {
        name: name.to_string(),
        what: format!("{what}: {e}"),
    })
}

/// The chain's name of an event and its contents in the **extended** layout (what the test
/// double emits). Fails only on an id that is not 32 bytes of hex, which the ledger never makes.
pub fn encode_event(event: &LedgerEvent) -> Result<(&'static str, Vec<u8>), DecodeError> {
    use LedgerEvent as E;
    let name = event.name();
    let bytes = match event {
        E::StackTrySettleEvent {
            leaf_count,
            blob_id,
            blob_hash,
            blob_size,
            dispute_settled_at_epoch,
            sample_seed,
            ..
        } => bcs(&StackTrySettleExt {
            base: try_settle_base(event),
            leaf_count: *leaf_count,
            blob_id: blob_id.clone(),
            blob_hash: blob_hash.0.to_vec(),
            blob_size: *blob_size,
            dispute_settled_at_epoch: *dispute_settled_at_epoch,
            sample_seed: sample_seed.0.to_vec(),
        }),
        E::StackSettlementTicketClaimedEvent {
            node_fee,
            attestor_share,
            ..
        } => bcs(&StackSettlementTicketClaimedExt {
            base: claimed_base(event),
            node_fee: node_fee.0,
            attestor_share: attestor_share.0,
        }),
        E::StackAttestationDisputeEvent {
            record,
            position,
            oracle_node_id,
            deadline_epoch,
            ..
        } => bcs(&StackAttestationDisputeExt {
            base: dispute_base(event),
            record: *record,
            position: *position,
            oracle_node_id: oracle_node_id.map(|n| sid(n.0)),
            deadline_epoch: *deadline_epoch,
        }),
        E::DisputeOracleReassignedEvent {
            stack_small_id,
            previous_oracle_node_id,
            oracle_node_id,
            deadline_epoch,
        } => bcs(&DisputeOracleReassigned {
            stack_small_id: sid(stack_small_id.0),
            previous_oracle_node_id: sid(previous_oracle_node_id.0),
            oracle_node_id: oracle_node_id.map(|n| sid(n.0)),
            deadline_epoch: *deadline_epoch,
        }),
        E::StackDisputeResolvedEvent {
            stack_small_id,
            oracle_node_id,
            outcome,
            slashed_node_id,
            slashed_amount,
            oracle_share,
            honest_share,
            user_refund_amount,
        } => bcs(&StackDisputeResolved {
            stack_small_id: sid(stack_small_id.0),
            oracle_node_id: oracle_node_id.map(|n| sid(n.0)),
            outcome: outcome_code(*outcome),
            slashed_node_id: slashed_node_id.map(|n| sid(n.0)),
            slashed_amount: slashed_amount.0,
            oracle_share: oracle_share.0,
            honest_share: honest_share.0,
            user_refund_amount: user_refund_amount.0,
        }),
        E::StackExpiredEvent {
            stack_small_id,
            owner,
            user_refund_amount,
        } => bcs(&StackExpired {
            stack_small_id: sid(stack_small_id.0),
            owner: owner.0,
            user_refund_amount: user_refund_amount.0,
        }),
        E::NodeCollateralDepositedEvent {
            node_small_id,
            amount,
            collateral,
        }
        | E::NodeCollateralWithdrawnEvent {
            node_small_id,
            amount,
            collateral,
        } => bcs(&NodeCollateral {
            node_small_id: sid(node_small_id.0),
            amount: amount.0,
            collateral: collateral.0,
        }),
        E::NodeSlashedEvent {
            node_small_id,
            amount,
            reason,
        } => bcs(&NodeSlashed {
            node_small_id: sid(node_small_id.0),
            amount: amount.0,
            reason: reason.clone(),
        }),
        E::NodeReputationUpdatedEvent {
            node_small_id,
            reputation_score,
        } => bcs(&NodeReputationUpdated {
            node_small_id: sid(node_small_id.0),
            reputation_score: *reputation_score,
        }),
        E::LedgerParamsUpdatedEvent { params } => bcs(&LedgerParamsUpdated {
            params: params.into(),
        }),
        E::NodePublicUrlUpdatedEvent {
            node_small_id,
            public_url,
        } => bcs(&NodePublicUrlUpdated {
            node_small_id: sid(node_small_id.0),
            public_url: public_url.clone(),
        }),
        _ => return encode_deployed(event).map(|o| o.expect("a deployed event")),
    };
    Ok((name, bytes))
}

fn try_settle_base(event: &LedgerEvent) -> StackTrySettle {
    let LedgerEvent::StackTrySettleEvent {
        stack_small_id,
        selected_node_id,
        requested_attestation_nodes,
        committed_stack_proof,
        stack_merkle_leaf,
        num_claimed_compute_units,
        ..
    } = event
    else {
        unreachable!("called with a StackTrySettleEvent")
    };
    StackTrySettle {
        stack_small_id: sid(stack_small_id.0),
        selected_node_id: sid(selected_node_id.0),
        requested_attestation_nodes: sids(requested_attestation_nodes),
        committed_stack_proof: committed_stack_proof.0.to_vec(),
        stack_merkle_leaf: stack_merkle_leaf.0.to_vec(),
        num_claimed_compute_units: num_claimed_compute_units.0,
    }
}

fn claimed_base(event: &LedgerEvent) -> StackSettlementTicketClaimed {
    let LedgerEvent::StackSettlementTicketClaimedEvent {
        stack_small_id,
        selected_node_id,
        attestation_nodes,
        num_claimed_compute_units,
        user_refund_amount,
        ..
    } = event
    else {
        unreachable!("called with a StackSettlementTicketClaimedEvent")
    };
    StackSettlementTicketClaimed {
        stack_small_id: sid(stack_small_id.0),
        selected_node_id: sid(selected_node_id.0),
        attestation_nodes: sids(attestation_nodes),
        num_claimed_compute_units: num_claimed_compute_units.0,
        user_refund_amount: user_refund_amount.0,
    }
}

fn dispute_base(event: &LedgerEvent) -> StackAttestationDispute {
    let LedgerEvent::StackAttestationDisputeEvent {
        stack_small_id,
        attestation_commitment,
        attestation_node_id,
        original_node_id,
        original_commitment,
        ..
    } = event
    else {
        unreachable!("called with a StackAttestationDisputeEvent")
    };
    StackAttestationDispute {
        stack_small_id: sid(stack_small_id.0),
        attestation_commitment: attestation_commitment.0.to_vec(),
        attestation_node_id: sid(attestation_node_id.0),
        original_node_id: sid(original_node_id.0),
        original_commitment: original_commitment.0.to_vec(),
    }
}

/// The event's contents in the **deployed** contract's layout, or `None` for an event the
/// deployed contract does not have. Our extra fields are dropped.
pub fn encode_deployed(
    event: &LedgerEvent,
) -> Result<Option<(&'static str, Vec<u8>)>, DecodeError> {
    use LedgerEvent as E;
    let name = event.name();
    let bytes = match event {
        E::NodeRegisteredEvent {
            badge_id,
            node_small_id,
            ..
        } => bcs(&NodeRegistered {
            badge_id: id32(name, "badge_id", badge_id)?,
            node_small_id: sid(node_small_id.0),
        }),
        E::NodeSubscribedToModelEvent {
            node_small_id,
            model_name,
            echelon_id,
        } => bcs(&NodeSubscribedToModel {
            node_small_id: sid(node_small_id.0),
            model_name: model_name.clone(),
            echelon_id: *echelon_id,
        }),
        E::TaskRegisteredEvent {
            task_id,
            task_small_id,
            role,
            model_name,
            security_level,
            minimum_reputation_score,
        } => bcs(&TaskRegistered {
            task_id: id32(name, "task_id", task_id)?,
            task_small_id: sid(task_small_id.0),
            role: Code16 { inner: role.code() },
            model_name: model_name.clone(),
            security_level: Code16 {
                inner: security_level.code(),
            },
            minimum_reputation_score: *minimum_reputation_score,
        }),
        E::TaskDeprecationEvent {
            task_id,
            task_small_id,
            epoch,
        } => bcs(&TaskDeprecation {
            task_id: id32(name, "task_id", task_id)?,
            task_small_id: sid(task_small_id.0),
            epoch: *epoch,
        }),
        E::NodeSubscribedToTaskEvent {
            task_small_id,
            node_small_id,
            price_per_one_million_compute_units,
            max_num_compute_units,
        } => bcs(&NodeSubscribedToTask {
            task_small_id: sid(task_small_id.0),
            node_small_id: sid(node_small_id.0),
            price_per_one_million_compute_units: price_per_one_million_compute_units.0,
            max_num_compute_units: max_num_compute_units.0,
        }),
        E::NodeSubscriptionUpdatedEvent {
            task_small_id,
            node_small_id,
            price_per_one_million_compute_units,
            max_num_compute_units,
        } => bcs(&NodeSubscriptionUpdated {
            node_small_id: sid(node_small_id.0),
            task_small_id: sid(task_small_id.0),
            price_per_one_million_compute_units: price_per_one_million_compute_units.0,
            max_num_compute_units: max_num_compute_units.0,
        }),
        E::NodeUnsubscribedFromTaskEvent {
            task_small_id,
            node_small_id,
        } => bcs(&NodeUnsubscribedFromTask {
            task_small_id: sid(task_small_id.0),
            node_small_id: sid(node_small_id.0),
        }),
        E::StackCreatedEvent {
            stack_id,
            stack_small_id,
            owner,
            task_small_id,
            selected_node_id,
            num_compute_units,
            price_per_one_million_compute_units,
        } => bcs(&StackCreated {
            stack_id: id32(name, "stack_id", stack_id)?,
            stack_small_id: sid(stack_small_id.0),
            owner: owner.0,
            task_small_id: sid(task_small_id.0),
            selected_node_id: sid(selected_node_id.0),
            num_compute_units: num_compute_units.0,
            price_per_one_million_compute_units: price_per_one_million_compute_units.0,
        }),
        E::ClaimedStackEvent {
            stack_small_id,
            selected_node_id,
            num_claimed_compute_units,
            user_refund_amount,
        } => bcs(&ClaimedStack {
            stack_small_id: sid(stack_small_id.0),
            selected_node_id: sid(selected_node_id.0),
            num_claimed_compute_units: num_claimed_compute_units.0,
            user_refund_amount: user_refund_amount.0,
        }),
        E::StackTrySettleEvent { .. } => bcs(&try_settle_base(event)),
        E::NewStackSettlementAttestationEvent {
            stack_small_id,
            attestation_node_id,
            committed_stack_proof,
            stack_merkle_leaf,
        } => bcs(&NewStackSettlementAttestation {
            stack_small_id: sid(stack_small_id.0),
            attestation_node_id: sid(attestation_node_id.0),
            committed_stack_proof: committed_stack_proof.0.to_vec(),
            stack_merkle_leaf: stack_merkle_leaf.0.to_vec(),
        }),
        E::StackSettlementTicketEvent {
            stack_small_id,
            selected_node_id,
            num_claimed_compute_units,
            requested_attestation_nodes,
            dispute_settled_at_epoch,
            committed_stack_proof,
        } => bcs(&StackSettlementTicket {
            stack_small_id: sid(stack_small_id.0),
            selected_node_id: sid(selected_node_id.0),
            num_claimed_compute_units: num_claimed_compute_units.0,
            requested_attestation_nodes: sids(requested_attestation_nodes),
            dispute_settled_at_epoch: *dispute_settled_at_epoch,
            committed_stack_proof: committed_stack_proof.0.to_vec(),
        }),
        E::StackSettlementTicketClaimedEvent { .. } => bcs(&claimed_base(event)),
        E::StackAttestationDisputeEvent { .. } => bcs(&dispute_base(event)),
        _ => return Ok(None),
    };
    Ok(Some((name, bytes)))
}

/// Events of the deployed contract that carry nothing the ledger trait reports (key rotation,
/// task removal, the publish event): a follower skips them.
pub const IGNORED_EVENTS: &[&str] = &[
    "PublishedEvent",
    "NewKeyRotationEvent",
    "NodePublicKeyCommittmentEvent",
    "TaskRemovedEvent",
];
