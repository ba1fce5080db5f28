//! Decoding the chain's event contents into `LedgerEvent`s: extended layout first, then the
//! deployed one; fields a deployed event lacks come back as explicit "unknown" values.

use atoma_ledger::{
    Address, Amount, ComputeUnits, DisputeOutcome, Hash32, LedgerEvent, NodeSmallId, SecurityLevel,
    StackSmallId, TaskRole, TaskSmallId,
};
use serde::de::DeserializeOwned;

use super::*;

fn de<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, DecodeError> {
    bcs::from_bytes(bytes).map_err(|e| DecodeError::Bcs {
        name: name.to_string(),
        error: e.to_string(),
    })
}

/// Extended layout first, then the deployed one.
fn de2<X: DeserializeOwned, D: DeserializeOwned>(
    name: &str,
    bytes: &[u8],
) -> Result<Result<X, D>, DecodeError> {
    match bcs::from_bytes::<X>(bytes) {
        Ok(x) => Ok(Ok(x)),
        Err(_) => de::<D>(name, bytes).map(Err),
    }
}

fn hash(name: &str, field: &str, v: Vec<u8>) -> Result<Hash32, DecodeError> {
    <[u8; 32]>::try_from(v.as_slice())
        .map(Hash32)
        .map_err(|_| DecodeError::Invalid {
            name: name.to_string(),
            what: format!("{field} has {} bytes, not 32", v.len()),
        })
}

fn nodes(v: Vec<SmallId>) -> Vec<NodeSmallId> {
    v.into_iter().map(|s| NodeSmallId(s.inner)).collect()
}

/// Decodes an event of the `db` module from its struct name (the last part of its type) and
/// BCS contents. `sender` is the transaction's sender (the chain records it beside the event).
pub fn decode_event(name: &str, bytes: &[u8], sender: Address) -> Result<LedgerEvent, DecodeError> {
    use LedgerEvent as E;
    let bad = |what: String| DecodeError::Invalid {
        name: name.to_string(),
        what,
    };
    Ok(match name {
        "NodeRegisteredEvent" => {
            let e: NodeRegistered = de(name, bytes)?;
            E::NodeRegisteredEvent {
                badge_id: id_string(&e.badge_id),
                node_small_id: NodeSmallId(e.node_small_id.inner),
                sender,
            }
        }
        "NodeSubscribedToModelEvent" => {
            let e: NodeSubscribedToModel = de(name, bytes)?;
            E::NodeSubscribedToModelEvent {
                node_small_id: NodeSmallId(e.node_small_id.inner),
                model_name: e.model_name,
                echelon_id: e.echelon_id,
            }
        }
        "TaskRegisteredEvent" => {
            let e: TaskRegistered = de(name, bytes)?;
            E::TaskRegisteredEvent {
                task_id: id_string(&e.task_id),
                task_small_id: TaskSmallId(e.task_small_id.inner),
                role: TaskRole::from_code(e.role.inner)
                    .ok_or_else(|| bad(format!("role {} is not a TaskRole", e.role.inner)))?,
                model_name: e.model_name,
                security_level: SecurityLevel::from_code(e.security_level.inner)
                    .ok_or_else(|| bad(format!("security level {}", e.security_level.inner)))?,
                minimum_reputation_score: e.minimum_reputation_score,
            }
        }
        "TaskDeprecationEvent" => {
            let e: TaskDeprecation = de(name, bytes)?;
            E::TaskDeprecationEvent {
                task_id: id_string(&e.task_id),
                task_small_id: TaskSmallId(e.task_small_id.inner),
                epoch: e.epoch,
            }
        }
        "NodeSubscribedToTaskEvent" => {
            let e: NodeSubscribedToTask = de(name, bytes)?;
            E::NodeSubscribedToTaskEvent {
                task_small_id: TaskSmallId(e.task_small_id.inner),
                node_small_id: NodeSmallId(e.node_small_id.inner),
                price_per_one_million_compute_units: Amount(e.price_per_one_million_compute_units),
                max_num_compute_units: ComputeUnits(e.max_num_compute_units),
            }
        }
        "NodeSubscriptionUpdatedEvent" => {
            let e: NodeSubscriptionUpdated = de(name, bytes)?;
            E::NodeSubscriptionUpdatedEvent {
                task_small_id: TaskSmallId(e.task_small_id.inner),
                node_small_id: NodeSmallId(e.node_small_id.inner),
                price_per_one_million_compute_units: Amount(e.price_per_one_million_compute_units),
                max_num_compute_units: ComputeUnits(e.max_num_compute_units),
            }
        }
        "NodeUnsubscribedFromTaskEvent" => {
            let e: NodeUnsubscribedFromTask = de(name, bytes)?;
            E::NodeUnsubscribedFromTaskEvent {
                task_small_id: TaskSmallId(e.task_small_id.inner),
                node_small_id: NodeSmallId(e.node_small_id.inner),
            }
        }
        "StackCreatedEvent" => {
            let e: StackCreated = de(name, bytes)?;
            E::StackCreatedEvent {
                stack_id: id_string(&e.stack_id),
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                owner: Address(e.owner),
                task_small_id: TaskSmallId(e.task_small_id.inner),
                selected_node_id: NodeSmallId(e.selected_node_id.inner),
                num_compute_units: ComputeUnits(e.num_compute_units),
                price_per_one_million_compute_units: Amount(e.price_per_one_million_compute_units),
            }
        }
        "ClaimedStackEvent" => {
            let e: ClaimedStack = de(name, bytes)?;
            E::ClaimedStackEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                selected_node_id: NodeSmallId(e.selected_node_id.inner),
                num_claimed_compute_units: ComputeUnits(e.num_claimed_compute_units),
                user_refund_amount: Amount(e.user_refund_amount),
            }
        }
        "StackTrySettleEvent" => {
            // A deployed event has no log pointer: an empty blob id and zero hashes say so.
            let (b, leaf_count, blob_id, blob_hash, blob_size, window, seed) =
                match de2::<StackTrySettleExt, StackTrySettle>(name, bytes)? {
                    Ok(x) => (
                        x.base,
                        x.leaf_count,
                        x.blob_id,
                        hash(name, "blob_hash", x.blob_hash)?,
                        x.blob_size,
                        x.dispute_settled_at_epoch,
                        hash(name, "sample_seed", x.sample_seed)?,
                    ),
                    Err(d) => (d, 0, String::new(), Hash32([0; 32]), 0, 0, Hash32([0; 32])),
                };
            E::StackTrySettleEvent {
                stack_small_id: StackSmallId(b.stack_small_id.inner),
                selected_node_id: NodeSmallId(b.selected_node_id.inner),
                requested_attestation_nodes: nodes(b.requested_attestation_nodes),
                committed_stack_proof: hash(
                    name,
                    "committed_stack_proof",
                    b.committed_stack_proof,
                )?,
                stack_merkle_leaf: hash(name, "stack_merkle_leaf", b.stack_merkle_leaf)?,
                num_claimed_compute_units: ComputeUnits(b.num_claimed_compute_units),
                leaf_count,
                blob_id,
                blob_hash,
                blob_size,
                dispute_settled_at_epoch: window,
                sample_seed: seed,
            }
        }
        "NewStackSettlementAttestationEvent" => {
            let e: NewStackSettlementAttestation = de(name, bytes)?;
            E::NewStackSettlementAttestationEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                attestation_node_id: NodeSmallId(e.attestation_node_id.inner),
                committed_stack_proof: hash(
                    name,
                    "committed_stack_proof",
                    e.committed_stack_proof,
                )?,
                stack_merkle_leaf: hash(name, "stack_merkle_leaf", e.stack_merkle_leaf)?,
            }
        }
        "StackSettlementTicketEvent" => {
            let e: StackSettlementTicket = de(name, bytes)?;
            E::StackSettlementTicketEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                selected_node_id: NodeSmallId(e.selected_node_id.inner),
                num_claimed_compute_units: ComputeUnits(e.num_claimed_compute_units),
                requested_attestation_nodes: nodes(e.requested_attestation_nodes),
                dispute_settled_at_epoch: e.dispute_settled_at_epoch,
                committed_stack_proof: hash(
                    name,
                    "committed_stack_proof",
                    e.committed_stack_proof,
                )?,
            }
        }
        "StackSettlementTicketClaimedEvent" => {
            let (b, node_fee, attestor_share) =
                match de2::<StackSettlementTicketClaimedExt, StackSettlementTicketClaimed>(
                    name, bytes,
                )? {
                    Ok(x) => (x.base, x.node_fee, x.attestor_share),
                    Err(d) => (d, 0, 0),
                };
            E::StackSettlementTicketClaimedEvent {
                stack_small_id: StackSmallId(b.stack_small_id.inner),
                selected_node_id: NodeSmallId(b.selected_node_id.inner),
                attestation_nodes: nodes(b.attestation_nodes),
                num_claimed_compute_units: ComputeUnits(b.num_claimed_compute_units),
                user_refund_amount: Amount(b.user_refund_amount),
                node_fee: Amount(node_fee),
                attestor_share: Amount(attestor_share),
            }
        }
        "StackAttestationDisputeEvent" => {
            let (b, record, position, oracle, deadline) =
                match de2::<StackAttestationDisputeExt, StackAttestationDispute>(name, bytes)? {
                    Ok(x) => (
                        x.base,
                        x.record,
                        x.position,
                        x.oracle_node_id,
                        x.deadline_epoch,
                    ),
                    Err(d) => (d, None, None, None, 0),
                };
            E::StackAttestationDisputeEvent {
                stack_small_id: StackSmallId(b.stack_small_id.inner),
                attestation_commitment: hash(
                    name,
                    "attestation_commitment",
                    b.attestation_commitment,
                )?,
                attestation_node_id: NodeSmallId(b.attestation_node_id.inner),
                original_node_id: NodeSmallId(b.original_node_id.inner),
                original_commitment: hash(name, "original_commitment", b.original_commitment)?,
                record,
                position,
                oracle_node_id: oracle.map(|s| NodeSmallId(s.inner)),
                deadline_epoch: deadline,
            }
        }
        "DisputeOracleReassignedEvent" => {
            let e: DisputeOracleReassigned = de(name, bytes)?;
            E::DisputeOracleReassignedEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                previous_oracle_node_id: NodeSmallId(e.previous_oracle_node_id.inner),
                oracle_node_id: e.oracle_node_id.map(|s| NodeSmallId(s.inner)),
                deadline_epoch: e.deadline_epoch,
            }
        }
        "StackDisputeResolvedEvent" => {
            let e: StackDisputeResolved = de(name, bytes)?;
            E::StackDisputeResolvedEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                oracle_node_id: e.oracle_node_id.map(|s| NodeSmallId(s.inner)),
                outcome: match e.outcome {
                    0 => DisputeOutcome::NodeHonest,
                    1 => DisputeOutcome::NodeCheated,
                    2 => DisputeOutcome::NoOracle,
                    o => return Err(bad(format!("outcome {o} is not 0, 1 or 2"))),
                },
                slashed_node_id: e.slashed_node_id.map(|s| NodeSmallId(s.inner)),
                slashed_amount: Amount(e.slashed_amount),
                oracle_share: Amount(e.oracle_share),
                honest_share: Amount(e.honest_share),
                user_refund_amount: Amount(e.user_refund_amount),
            }
        }
        "StackExpiredEvent" => {
            let e: StackExpired = de(name, bytes)?;
            E::StackExpiredEvent {
                stack_small_id: StackSmallId(e.stack_small_id.inner),
                owner: Address(e.owner),
                user_refund_amount: Amount(e.user_refund_amount),
            }
        }
        "NodeCollateralDepositedEvent" | "NodeCollateralWithdrawnEvent" => {
            let e: NodeCollateral = de(name, bytes)?;
            let (node_small_id, amount, collateral) = (
                NodeSmallId(e.node_small_id.inner),
                Amount(e.amount),
                Amount(e.collateral),
            );
            if name == "NodeCollateralDepositedEvent" {
                E::NodeCollateralDepositedEvent {
                    node_small_id,
                    amount,
                    collateral,
                }
            } else {
                E::NodeCollateralWithdrawnEvent {
                    node_small_id,
                    amount,
                    collateral,
                }
            }
        }
        "NodeSlashedEvent" => {
            let e: NodeSlashed = de(name, bytes)?;
            E::NodeSlashedEvent {
                node_small_id: NodeSmallId(e.node_small_id.inner),
                amount: Amount(e.amount),
                reason: e.reason,
            }
        }
        "NodeReputationUpdatedEvent" => {
            let e: NodeReputationUpdated = de(name, bytes)?;
            E::NodeReputationUpdatedEvent {
                node_small_id: NodeSmallId(e.node_small_id.inner),
                reputation_score: e.reputation_score,
            }
        }
        "LedgerParamsUpdatedEvent" => {
            let e: LedgerParamsUpdated = de(name, bytes)?;
            E::LedgerParamsUpdatedEvent {
                params: e.params.into(),
            }
        }
        "NodePublicUrlUpdatedEvent" => {
            let e: NodePublicUrlUpdated = de(name, bytes)?;
            E::NodePublicUrlUpdatedEvent {
                node_small_id: NodeSmallId(e.node_small_id.inner),
                public_url: e.public_url,
            }
        }
        other => return Err(DecodeError::UnknownEvent(other.to_string())),
    })
}
