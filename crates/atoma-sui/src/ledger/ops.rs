//! `impl Ledger for SuiLedger`: each trait operation as the Move call (or read) it is on Sui.

use atoma_ledger::{
    Address, Amount, ClaimOutcome, ComputeUnits, Dispute, DisputeClaim, DisputeResolution,
    EventCursor, EventRecord, Hash32, Ledger, LedgerError, LedgerEvent, LedgerParams, MoneyTotals,
    NewTask, Node, NodeSmallId, Result, SettlementTicket, Stack, StackCommitment, StackRequest,
    StackSmallId, Subscription, Task, TaskSmallId,
};
use sui_rpc::proto::sui::rpc::v2 as proto;

use super::{Flavor, SuiLedger, lock};
use crate::abort::AbortContext;
use crate::move_types;
use crate::tx::Call;
use crate::view::View;

fn stack_cx(stack: StackSmallId) -> AbortContext {
    AbortContext {
        stack: Some(stack),
        ..AbortContext::default()
    }
}

impl Ledger for SuiLedger {
    fn stack_in_transaction(&self, digest: &str) -> Result<Option<Stack>> {
        self.stack_bought_in(digest)
    }

    fn register_node(&self, sender: Address) -> Result<Node> {
        let ev = self.submit(
            sender,
            AbortContext::default(),
            || Ok(Call::register_node()),
        )?;
        let id = ev
            .iter()
            .find_map(|e| match e {
                LedgerEvent::NodeRegisteredEvent { node_small_id, .. } => Some(*node_small_id),
                _ => None,
            })
            .ok_or_else(|| LedgerError::Unavailable("registration emitted no event".into()))?;
        self.after(&ev, |v| v.nodes.get(&id).cloned())
            .ok_or(LedgerError::NodeNotFound(id))
    }

    fn set_node_public_url(&self, sender: Address, node: NodeSmallId, url: &str) -> Result<()> {
        self.extended("a node's public URL")?;
        self.node_call(sender, node, AbortContext::default(), |b| {
            Call::set_node_public_url(b, url)
        })
        .map(drop)
    }

    fn nodes(&self) -> Result<Vec<Node>> {
        self.view(|v| v.nodes.values().cloned().collect())
    }

    fn tasks(&self) -> Result<Vec<Task>> {
        self.view(|v| v.tasks.values().cloned().collect())
    }

    fn add_node_to_model(
        &self,
        sender: Address,
        node: NodeSmallId,
        model_name: &str,
        echelon_id: u64,
    ) -> Result<()> {
        self.node_call(sender, node, AbortContext::default(), |b| {
            Call::add_node_to_model(b, model_name, echelon_id)
        })
        .map(drop)
    }

    fn create_task(&self, sender: Address, task: &NewTask) -> Result<Task> {
        if self.cfg.flavor == Flavor::Deployed && task.minimum_collateral.0 > 0 {
            return Err(LedgerError::NotSupported("a task's minimum collateral"));
        }
        let ev = self.submit(sender, AbortContext::default(), || {
            let mut call = Call::create_task(
                self.manager_badge(sender)?,
                task.role.code(),
                task.model_name.clone(),
                task.security_level.code(),
                task.minimum_reputation_score,
                task.is_public,
            );
            if task.minimum_collateral.0 > 0 {
                call = call.with_minimum_collateral(task.minimum_collateral.0);
            }
            Ok(call)
        })?;
        let id = ev
            .iter()
            .find_map(|e| match e {
                LedgerEvent::TaskRegisteredEvent { task_small_id, .. } => Some(*task_small_id),
                _ => None,
            })
            .ok_or_else(|| LedgerError::Unavailable("task creation emitted no event".into()))?;
        let mut t = self
            .after(&ev, |v| v.tasks.get(&id).cloned())
            .ok_or(LedgerError::TaskNotFound(id))?;
        // The chain's event does not say; the call did.
        t.is_public = task.is_public;
        t.minimum_collateral = task.minimum_collateral;
        Ok(t)
    }

    fn whitelist_nodes_for_task(&self, task: TaskSmallId, nodes: &[NodeSmallId]) -> Result<()> {
        let admin = self.cfg.admin.ok_or(LedgerError::NotSupported(
            "whitelisting without a configured admin (the AtomaManagerBadge holder)",
        ))?;
        let ids: Vec<u64> = nodes.iter().map(|n| n.0).collect();
        let cx = AbortContext {
            task: Some(task),
            ..AbortContext::default()
        };
        self.submit(admin, cx, || {
            Ok(Call::whitelist_nodes(
                self.manager_badge(admin)?,
                task.0,
                &ids,
            ))
        })
        .map(drop)
    }

    fn deprecate_task(&self, task: TaskSmallId) -> Result<()> {
        let creator = self
            .view(|v| v.task_creators.get(&task).copied())?
            .ok_or(LedgerError::TaskNotFound(task))?;
        let cx = AbortContext {
            task: Some(task),
            ..AbortContext::default()
        };
        self.submit(creator, cx, || {
            self.badge_of(creator, "TaskBadge", task.0)
                .map(Call::deprecate_task)
                .ok_or(LedgerError::TaskNotFound(task))
        })
        .map(drop)
    }

    fn subscribe_node_to_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        let cx = AbortContext {
            task: Some(task),
            ..AbortContext::default()
        };
        let ev = self.node_call(sender, node, cx, |b| Call::subscribe(b, task.0, price.0))?;
        self.after(&ev, |v| v.subscriptions.get(&(task, node)).cloned())
            .ok_or(LedgerError::NotSubscribed { task, node })
    }

    fn update_node_subscription(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        let cx = AbortContext {
            task: Some(task),
            ..AbortContext::default()
        };
        let ev = self.node_call(sender, node, cx, |b| {
            Call::update_subscription(b, task.0, price.0)
        })?;
        self.after(&ev, |v| v.subscriptions.get(&(task, node)).cloned())
            .ok_or(LedgerError::NotSubscribed { task, node })
    }

    fn unsubscribe_node_from_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
    ) -> Result<()> {
        let cx = AbortContext {
            task: Some(task),
            ..AbortContext::default()
        };
        self.node_call(sender, node, cx, |b| Call::unsubscribe(b, task.0))
            .map(drop)
    }

    fn acquire_stack(&self, buyer: Address, req: &StackRequest) -> Result<Stack> {
        let cx = AbortContext {
            task: Some(req.task_small_id),
            units: req.num_compute_units.0,
            price: req.price_per_one_million_compute_units.0,
            ..AbortContext::default()
        };
        let sent = self.submit(buyer, cx, || {
            let (coin, merge) = self.usdc(buyer)?;
            Ok(Call::acquire_stack(
                coin,
                &merge,
                req.task_small_id.0,
                req.num_compute_units.0,
                req.price_per_one_million_compute_units.0,
            ))
        });
        let ev = match sent {
            // The abort has no payload: what was needed and what there was, re-derived.
            Err(LedgerError::InsufficientBalance { .. }) => {
                let level = self.task(req.task_small_id)?.security_level;
                let needed = level
                    .stack_fee(
                        req.price_per_one_million_compute_units,
                        req.num_compute_units,
                    )
                    .map_or(u64::MAX, |a| a.0);
                return Err(LedgerError::InsufficientBalance {
                    needed,
                    available: self.balance(buyer)?.0,
                });
            }
            other => other?,
        };
        let id = ev
            .iter()
            .find_map(|e| match e {
                LedgerEvent::StackCreatedEvent { stack_small_id, .. } => Some(*stack_small_id),
                _ => None,
            })
            .ok_or_else(|| LedgerError::Unavailable("the purchase emitted no event".into()))?;
        self.after(&ev, |v| v.stacks.get(&id).cloned())
            .ok_or(LedgerError::StackNotFound(id))
    }

    fn faucet(&self, _to: Address, _amount: Amount) -> Result<Amount> {
        Err(LedgerError::NotSupported(
            "a faucet (USDC is bought, not minted)",
        ))
    }

    fn balance(&self, who: Address) -> Result<Amount> {
        let coins = self.owned(who, &self.usdc_coin_type())?;
        Ok(Amount(coins.iter().map(|c| c.balance.unwrap_or(0)).sum()))
    }

    fn fee_treasury(&self) -> Result<Amount> {
        Err(LedgerError::NotYet("reading AtomaDb's fee treasury"))
    }

    fn node(&self, id: NodeSmallId) -> Result<Node> {
        self.view(|v| v.nodes.get(&id).cloned())?
            .ok_or(LedgerError::NodeNotFound(id))
    }

    fn nodes_of(&self, owner: Address) -> Result<Vec<Node>> {
        self.view(|v| {
            v.nodes
                .values()
                .filter(|n| n.owner == owner)
                .cloned()
                .collect()
        })
    }

    fn task(&self, id: TaskSmallId) -> Result<Task> {
        self.view(|v| v.tasks.get(&id).cloned())?
            .ok_or(LedgerError::TaskNotFound(id))
    }

    fn stack(&self, id: StackSmallId) -> Result<Stack> {
        self.view(|v| v.stacks.get(&id).cloned())?
            .ok_or(LedgerError::StackNotFound(id))
    }

    fn subscriptions(&self, task: TaskSmallId) -> Result<Vec<Subscription>> {
        self.view(|v| {
            v.subscriptions
                .values()
                .filter(|s| s.task_small_id == task)
                .cloned()
                .collect()
        })
    }

    fn events_after(&self, cursor: EventCursor, limit: usize) -> Result<Vec<EventRecord>> {
        self.sync()?;
        lock(&self.index).events_after(cursor, limit)
    }

    fn epoch(&self) -> Result<u64> {
        let mut client = self.client.clone();
        self.block(async {
            let mut req = proto::GetEpochRequest::default();
            req.read_mask =
                Some(<prost_types::FieldMask as sui_rpc::field::FieldMaskUtil>::from_str("epoch"));
            client
                .ledger_client()
                .get_epoch(req)
                .await
                .map_err(|s| LedgerError::Unavailable(format!("GetEpoch: {}", s.message())))
                .map(|r| r.into_inner().epoch.and_then(|e| e.epoch).unwrap_or(0))
        })
    }

    fn advance_epoch(&self) -> Result<u64> {
        Err(LedgerError::NotSupported(
            "advancing the epoch (the chain's validators do)",
        ))
    }

    fn params(&self) -> Result<LedgerParams> {
        Err(LedgerError::NotYet("reading AtomaDb's parameters"))
    }

    fn set_params(&self, sender: Address, params: &LedgerParams) -> Result<()> {
        self.extended("setting the ledger's parameters")?;
        params.validate().map_err(LedgerError::Invalid)?;
        let p = move_types::Params::from(params);
        self.submit(sender, AbortContext::default(), || {
            Ok(Call::set_params(self.manager_badge(sender)?, &p))
        })
        .map(drop)
    }

    fn deposit_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount> {
        self.extended("collateral deposits")?;
        let ev = self.node_call(sender, node, AbortContext::default(), |b| {
            let (coin, merge) = self.usdc(sender).unwrap_or((b, Vec::new()));
            Call::deposit_collateral(b, coin, &merge, amount.0)
        })?;
        self.after(&ev, |v| v.nodes.get(&node).map(|n| n.collateral))
            .ok_or(LedgerError::NodeNotFound(node))
    }

    fn withdraw_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount> {
        self.extended("collateral withdrawals")?;
        let ev = self.node_call(sender, node, AbortContext::default(), |b| {
            Call::withdraw_collateral(b, amount.0)
        })?;
        self.after(&ev, |v| v.nodes.get(&node).map(|n| n.collateral))
            .ok_or(LedgerError::NodeNotFound(node))
    }

    fn try_settle_stack(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claimed: ComputeUnits,
        c: &StackCommitment,
    ) -> Result<SettlementTicket> {
        let cx = AbortContext {
            units: claimed.0,
            ..stack_cx(stack)
        };
        let root = c.merkle_root.0;
        let ev = match self.cfg.flavor {
            Flavor::Extended => self.node_call(sender, node, cx, |b| {
                Call::try_settle_with_log(
                    b,
                    stack.0,
                    claimed.0,
                    &root,
                    c.leaf_count,
                    &c.blob_id,
                    &c.blob_hash.0,
                    c.blob_size,
                )
            })?,
            Flavor::Deployed => self.node_call(sender, node, cx, |b| {
                Call::try_settle(b, stack.0, claimed.0, &root, &root)
            })?,
        };
        self.after(&ev, |v| v.tickets.get(&stack).cloned())
            .ok_or(LedgerError::NoTicket(stack))
    }

    fn submit_stack_settlement_attestation(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        proof: Hash32,
    ) -> Result<SettlementTicket> {
        let ev = self.node_call(sender, node, stack_cx(stack), |b| {
            Call::attest(b, stack.0, &proof.0, &proof.0)
        })?;
        self.after(&ev, |v| v.tickets.get(&stack).cloned())
            .ok_or(LedgerError::NoTicket(stack))
    }

    fn start_attestation_dispute(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claim: &DisputeClaim,
    ) -> Result<Dispute> {
        let commitment = claim.attestation_commitment.0;
        let ev = match self.cfg.flavor {
            Flavor::Extended => self.node_call(sender, node, stack_cx(stack), |b| {
                Call::dispute_at(b, stack.0, &commitment, claim.record, claim.position)
            })?,
            Flavor::Deployed => self.node_call(sender, node, stack_cx(stack), |b| {
                Call::dispute(b, stack.0, &commitment)
            })?,
        };
        self.after(&ev, |v| v.disputes.get(&stack).cloned())
            .ok_or(LedgerError::NoDispute(stack))
    }

    fn resolve_attestation_dispute(
        &self,
        sender: Address,
        oracle: NodeSmallId,
        stack: StackSmallId,
        node_was_honest: bool,
    ) -> Result<DisputeResolution> {
        self.extended("dispute resolution")?;
        let ev = self.node_call(sender, oracle, stack_cx(stack), |b| {
            Call::resolve_dispute(b, stack.0, node_was_honest)
        })?;
        ev.into_iter()
            .find_map(|e| match e {
                LedgerEvent::StackDisputeResolvedEvent {
                    stack_small_id,
                    outcome,
                    slashed_node_id,
                    slashed_amount,
                    oracle_share,
                    honest_share,
                    user_refund_amount,
                    ..
                } => Some(DisputeResolution {
                    stack_small_id,
                    outcome,
                    slashed: slashed_node_id.map(|n| (n, slashed_amount)),
                    oracle_share,
                    honest_share,
                    user_refund_amount,
                }),
                _ => None,
            })
            .ok_or_else(|| LedgerError::Unavailable("the resolution emitted no event".into()))
    }

    fn expire_dispute_oracle(&self, sender: Address, stack: StackSmallId) -> Result<Dispute> {
        self.extended("expiring a dispute's oracle")?;
        let ev = self.submit(sender, stack_cx(stack), || {
            Ok(Call::expire_dispute_oracle(stack.0))
        })?;
        self.after(&ev, |v| v.disputes.get(&stack).cloned())
            .ok_or(LedgerError::NoDispute(stack))
    }

    fn dispute(&self, stack: StackSmallId) -> Result<Option<Dispute>> {
        self.view(|v| v.disputes.get(&stack).cloned())
    }

    fn claim_funds(
        &self,
        sender: Address,
        node: NodeSmallId,
        stacks: &[StackSmallId],
    ) -> Result<Vec<ClaimOutcome>> {
        let ids: Vec<u64> = stacks.iter().map(|s| s.0).collect();
        let cx = stacks.first().map(|s| stack_cx(*s)).unwrap_or_default();
        let ev = self.node_call(sender, node, cx, |b| Call::claim_funds(b, &ids))?;
        self.view(|v| claims_of(v, &ev))
    }

    fn claim_funds_for_stacks(
        &self,
        sender: Address,
        node: NodeSmallId,
        claims: &[(StackSmallId, ComputeUnits)],
    ) -> Result<Vec<ClaimOutcome>> {
        let ids: Vec<u64> = claims.iter().map(|c| c.0.0).collect();
        let units: Vec<u64> = claims.iter().map(|c| c.1.0).collect();
        let cx = claims.first().map(|c| stack_cx(c.0)).unwrap_or_default();
        let ev = self.node_call(sender, node, cx, |b| {
            Call::claim_funds_for_stacks(b, &ids, &units)
        })?;
        self.view(|v| claims_of(v, &ev))
    }

    fn close_expired_stack(&self, sender: Address, stack: StackSmallId) -> Result<Amount> {
        self.extended("closing an expired stack")?;
        let ev = self.submit(sender, stack_cx(stack), || {
            Ok(Call::close_expired_stack(stack.0))
        })?;
        Ok(ev
            .iter()
            .find_map(|e| match e {
                LedgerEvent::StackExpiredEvent {
                    user_refund_amount, ..
                } => Some(*user_refund_amount),
                _ => None,
            })
            .unwrap_or(Amount(0)))
    }

    fn ticket(&self, stack: StackSmallId) -> Result<Option<SettlementTicket>> {
        self.view(|v| v.tickets.get(&stack).cloned())
    }

    fn open_tickets_of(&self, node: NodeSmallId) -> Result<Vec<SettlementTicket>> {
        self.view(|v| v.open_tickets_of(node))
    }

    fn totals(&self) -> Result<MoneyTotals> {
        Err(LedgerError::NotSupported(
            "money totals (the chain's supply is not the ledger's to count)",
        ))
    }
}

/// Claim outcomes from a claim transaction's events, in order: each stack's slashes come before
/// its claimed event; attestors who attested share the pool equally (`attestor_share` each); a
/// direct (ConfidentialCompute) claim's node fee is the task's fee on the claimed units.
fn claims_of(view: &View, ev: &[LedgerEvent]) -> Vec<ClaimOutcome> {
    let mut out = Vec::new();
    let mut slashed = Vec::new();
    for e in ev {
        match e {
            LedgerEvent::NodeSlashedEvent {
                node_small_id,
                amount,
                ..
            } => slashed.push((*node_small_id, *amount)),
            LedgerEvent::StackSettlementTicketClaimedEvent {
                stack_small_id,
                attestation_nodes,
                num_claimed_compute_units,
                user_refund_amount,
                node_fee,
                attestor_share,
                ..
            } => out.push(ClaimOutcome {
                stack_small_id: *stack_small_id,
                num_claimed_compute_units: *num_claimed_compute_units,
                node_fee: *node_fee,
                attestor_shares: attestation_nodes
                    .iter()
                    .map(|a| (*a, *attestor_share))
                    .collect(),
                user_refund_amount: *user_refund_amount,
                slashed: std::mem::take(&mut slashed),
            }),
            LedgerEvent::ClaimedStackEvent {
                stack_small_id,
                num_claimed_compute_units,
                user_refund_amount,
                ..
            } => {
                let node_fee = view
                    .stacks
                    .get(stack_small_id)
                    .and_then(|s| {
                        let level = view.tasks.get(&s.task_small_id)?.security_level;
                        level.node_fee(
                            s.price_per_one_million_compute_units,
                            *num_claimed_compute_units,
                        )
                    })
                    .unwrap_or(Amount(0));
                out.push(ClaimOutcome {
                    stack_small_id: *stack_small_id,
                    num_claimed_compute_units: *num_claimed_compute_units,
                    node_fee,
                    attestor_shares: Vec::new(),
                    user_refund_amount: *user_refund_amount,
                    slashed: std::mem::take(&mut slashed),
                });
            }
            _ => {}
        }
    }
    out
}
