//! The read model the backend answers queries from: the `db` module's events folded in order
//! (what a Sui indexer does). Values the chain's events do not carry are explicit defaults, and
//! listed in `docs/protocol.md`: a task's `is_public` and `minimum_collateral` and whitelist, a
//! stack's creation epoch, a node's reputation record.

use std::collections::BTreeMap;

use atoma_ledger::{
    Address, Amount, Dispute, DisputeClaim, LedgerEvent, Node, NodeSmallId, REPUTATION_SCORE_START,
    Reputation, SettlementTicket, Stack, StackCommitment, StackSmallId, Subscription, Task,
    TaskSmallId,
};

#[derive(Debug, Default, Clone)]
pub struct View {
    /// Last event sequence folded in.
    pub seq: u64,
    pub nodes: BTreeMap<NodeSmallId, Node>,
    pub tasks: BTreeMap<TaskSmallId, Task>,
    pub subscriptions: BTreeMap<(TaskSmallId, NodeSmallId), Subscription>,
    pub stacks: BTreeMap<StackSmallId, Stack>,
    pub tickets: BTreeMap<StackSmallId, SettlementTicket>,
    pub disputes: BTreeMap<StackSmallId, Dispute>,
    /// Who created each task (its badge's owner), for calls that need the task badge.
    pub task_creators: BTreeMap<TaskSmallId, Address>,
}

impl View {
    /// Folds one event (sequence `seq`, sent by `sender`) in.
    pub fn apply(&mut self, seq: u64, sender: Address, e: &LedgerEvent) {
        use LedgerEvent as E;
        self.seq = seq;
        match e {
            E::NodeRegisteredEvent {
                badge_id,
                node_small_id,
                sender,
            } => {
                self.nodes.insert(
                    *node_small_id,
                    Node {
                        small_id: *node_small_id,
                        owner: *sender,
                        badge_id: badge_id.clone(),
                        reputation_score: REPUTATION_SCORE_START,
                        is_disabled: false,
                        collateral: Amount(0),
                        record: Reputation::default(),
                        public_url: None,
                    },
                );
            }
            E::TaskRegisteredEvent {
                task_small_id,
                role,
                model_name,
                security_level,
                minimum_reputation_score,
                ..
            } => {
                self.task_creators.insert(*task_small_id, sender);
                self.tasks.insert(
                    *task_small_id,
                    Task {
                        small_id: *task_small_id,
                        role: *role,
                        model_name: model_name.clone(),
                        security_level: *security_level,
                        minimum_reputation_score: minimum_reputation_score.unwrap_or(0),
                        is_public: true,
                        is_deprecated: false,
                        whitelist: Vec::new(),
                        minimum_collateral: Amount(0),
                    },
                );
            }
            E::TaskDeprecationEvent { task_small_id, .. } => {
                if let Some(t) = self.tasks.get_mut(task_small_id) {
                    t.is_deprecated = true;
                }
            }
            E::NodeSubscribedToTaskEvent {
                task_small_id,
                node_small_id,
                price_per_one_million_compute_units,
                max_num_compute_units,
            }
            | E::NodeSubscriptionUpdatedEvent {
                task_small_id,
                node_small_id,
                price_per_one_million_compute_units,
                max_num_compute_units,
            } => {
                self.subscriptions.insert(
                    (*task_small_id, *node_small_id),
                    Subscription {
                        task_small_id: *task_small_id,
                        node_small_id: *node_small_id,
                        price_per_one_million_compute_units: *price_per_one_million_compute_units,
                        max_num_compute_units: *max_num_compute_units,
                    },
                );
            }
            E::NodeUnsubscribedFromTaskEvent {
                task_small_id,
                node_small_id,
            } => {
                self.subscriptions.remove(&(*task_small_id, *node_small_id));
            }
            E::StackCreatedEvent {
                stack_id,
                stack_small_id,
                owner,
                task_small_id,
                selected_node_id,
                num_compute_units,
                price_per_one_million_compute_units,
            } => {
                let escrowed = self
                    .tasks
                    .get(task_small_id)
                    .and_then(|t| {
                        t.security_level
                            .stack_fee(*price_per_one_million_compute_units, *num_compute_units)
                    })
                    .unwrap_or(Amount(0));
                self.stacks.insert(
                    *stack_small_id,
                    Stack {
                        small_id: *stack_small_id,
                        stack_id: stack_id.clone(),
                        owner: *owner,
                        task_small_id: *task_small_id,
                        selected_node_id: *selected_node_id,
                        num_compute_units: *num_compute_units,
                        price_per_one_million_compute_units: *price_per_one_million_compute_units,
                        escrowed,
                        is_claimed: false,
                        created_at_epoch: 0,
                    },
                );
            }
            E::ClaimedStackEvent {
                stack_small_id,
                selected_node_id,
                ..
            } => {
                self.record(*selected_node_id, |r| r.settled_on_time += 1);
                self.close_stack(*stack_small_id);
            }
            E::StackExpiredEvent { stack_small_id, .. } => {
                self.close_stack(*stack_small_id);
            }
            E::StackTrySettleEvent {
                stack_small_id,
                selected_node_id,
                requested_attestation_nodes,
                committed_stack_proof,
                num_claimed_compute_units,
                leaf_count,
                blob_id,
                blob_hash,
                blob_size,
                dispute_settled_at_epoch,
                sample_seed,
                ..
            } => {
                self.tickets.insert(
                    *stack_small_id,
                    SettlementTicket {
                        stack_small_id: *stack_small_id,
                        selected_node_id: *selected_node_id,
                        num_claimed_compute_units: *num_claimed_compute_units,
                        commitment: StackCommitment {
                            merkle_root: *committed_stack_proof,
                            leaf_count: *leaf_count,
                            blob_id: blob_id.clone(),
                            blob_hash: *blob_hash,
                            blob_size: *blob_size,
                        },
                        requested_attestation_nodes: requested_attestation_nodes.clone(),
                        already_attested_nodes: Vec::new(),
                        created_at_epoch: 0,
                        dispute_settled_at_epoch: *dispute_settled_at_epoch,
                        is_in_dispute: false,
                        is_claimed: false,
                        sample_seed: *sample_seed,
                    },
                );
            }
            E::NewStackSettlementAttestationEvent {
                stack_small_id,
                attestation_node_id,
                ..
            } => {
                self.record(*attestation_node_id, |r| r.attestations_made += 1);
                if let Some(t) = self.tickets.get_mut(stack_small_id)
                    && !t.already_attested_nodes.contains(attestation_node_id)
                {
                    t.already_attested_nodes.push(*attestation_node_id);
                }
            }
            E::StackSettlementTicketEvent {
                stack_small_id,
                dispute_settled_at_epoch,
                ..
            } => {
                if let Some(t) = self.tickets.get_mut(stack_small_id) {
                    t.dispute_settled_at_epoch = *dispute_settled_at_epoch;
                }
            }
            E::StackSettlementTicketClaimedEvent {
                stack_small_id,
                selected_node_id,
                ..
            } => {
                self.record(*selected_node_id, |r| r.settled_on_time += 1);
                if let Some(t) = self.tickets.get_mut(stack_small_id) {
                    t.is_claimed = true;
                }
                self.close_stack(*stack_small_id);
            }
            E::StackAttestationDisputeEvent {
                stack_small_id,
                attestation_commitment,
                attestation_node_id,
                record,
                position,
                oracle_node_id,
                deadline_epoch,
                ..
            } => {
                if let Some(t) = self.tickets.get_mut(stack_small_id) {
                    t.is_in_dispute = true;
                }
                self.disputes.insert(
                    *stack_small_id,
                    Dispute {
                        stack_small_id: *stack_small_id,
                        attestor: *attestation_node_id,
                        claim: DisputeClaim {
                            attestation_commitment: *attestation_commitment,
                            record: *record,
                            position: *position,
                        },
                        oracle: *oracle_node_id,
                        oracles_drawn: oracle_node_id.iter().copied().collect(),
                        opened_at_epoch: 0,
                        deadline_epoch: *deadline_epoch,
                        outcome: None,
                    },
                );
            }
            E::DisputeOracleReassignedEvent {
                stack_small_id,
                oracle_node_id,
                deadline_epoch,
                ..
            } => {
                if let Some(d) = self.disputes.get_mut(stack_small_id) {
                    d.oracle = *oracle_node_id;
                    d.oracles_drawn.extend(oracle_node_id.iter().copied());
                    d.deadline_epoch = *deadline_epoch;
                }
            }
            E::StackDisputeResolvedEvent {
                stack_small_id,
                outcome,
                ..
            } => {
                if let Some(d) = self.disputes.get_mut(stack_small_id) {
                    d.outcome = Some(*outcome);
                }
                if let Some(t) = self.tickets.get_mut(stack_small_id) {
                    t.is_in_dispute = false;
                    t.is_claimed = true;
                }
                self.close_stack(*stack_small_id);
            }
            E::NodeCollateralDepositedEvent {
                node_small_id,
                collateral,
                ..
            }
            | E::NodeCollateralWithdrawnEvent {
                node_small_id,
                collateral,
                ..
            } => {
                if let Some(n) = self.nodes.get_mut(node_small_id) {
                    n.collateral = *collateral;
                }
            }
            E::NodeSlashedEvent {
                node_small_id,
                amount,
                reason,
            } => {
                if let Some(n) = self.nodes.get_mut(node_small_id) {
                    n.collateral = Amount(n.collateral.0.saturating_sub(amount.0));
                }
                match reason.as_str() {
                    "attestation_timeout" | "oracle_timeout" => {
                        self.record(*node_small_id, |r| r.attestations_missed += 1)
                    }
                    "dispute_lost" => self.record(*node_small_id, |r| r.disputes_lost += 1),
                    _ => {}
                }
            }
            E::NodeReputationUpdatedEvent {
                node_small_id,
                reputation_score,
            } => {
                if let Some(n) = self.nodes.get_mut(node_small_id) {
                    n.reputation_score = *reputation_score;
                }
            }
            E::NodePublicUrlUpdatedEvent {
                node_small_id,
                public_url,
            } => {
                if let Some(n) = self.nodes.get_mut(node_small_id) {
                    n.public_url = Some(public_url.clone());
                }
            }
            E::NodeSubscribedToModelEvent { .. } | E::LedgerParamsUpdatedEvent { .. } => {}
        }
    }

    /// The node's reputation counters, which the embedded ledger bumps on the same events:
    /// an attestation made, a ticket or stack claimed (settled on time), a slash for a silent
    /// attestor or oracle (missed) or a lost dispute.
    fn record(&mut self, node: NodeSmallId, f: impl FnOnce(&mut Reputation)) {
        if let Some(n) = self.nodes.get_mut(&node) {
            f(&mut n.record);
        }
    }

    /// Open tickets that name `node` as seller, as an attestor yet to attest, or as the oracle
    /// of their open dispute.
    pub fn open_tickets_of(&self, node: NodeSmallId) -> Vec<SettlementTicket> {
        self.tickets
            .values()
            .filter(|t| !t.is_claimed)
            .filter(|t| {
                t.selected_node_id == node
                    || (t.requested_attestation_nodes.contains(&node)
                        && !t.already_attested_nodes.contains(&node))
                    || self
                        .disputes
                        .get(&t.stack_small_id)
                        .is_some_and(|d| d.outcome.is_none() && d.oracle == Some(node))
            })
            .cloned()
            .collect()
    }

    fn close_stack(&mut self, id: StackSmallId) {
        if let Some(s) = self.stacks.get_mut(&id) {
            s.is_claimed = true;
            s.escrowed = Amount(0);
        }
    }
}
