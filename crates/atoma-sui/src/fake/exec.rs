//! Executing a signed transaction on the fake chain, as a Sui validator would up to the Move VM:
//! decode, check the signature against the sender, check every input object's owner, version
//! and digest (and the shared objects' initial versions), then run the `db` function on the
//! embedded ledger. A refusal before execution is an `InvalidArgument` status and changes
//! nothing; a Move abort is a failed transaction whose gas coin still moves to a new version.

use atoma_ledger::{
    Address, Amount, ComputeUnits, DisputeClaim, Hash32, Ledger, LedgerError, LedgerEvent,
    LedgerParams, NewTask, NodeSmallId, SecurityLevel, StackCommitment, StackRequest, StackSmallId,
    TaskRole, TaskSmallId,
};
use serde::de::DeserializeOwned;
use sui_crypto::SuiVerifier;
use sui_crypto::ed25519::Ed25519Verifier;
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_sdk_types::{Address as SuiAddress, SimpleSignature, Transaction, UserSignature};
use tonic::Status;

use super::state::{ObjKind, ObjOwner, REFERENCE_GAS_PRICE, State};
use crate::abort;
use crate::move_types::{Params, id_bytes};
use crate::tx::{Arg, Call, ObjRef, RANDOM_ID, decode_call};

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// What a `db` function created, to be given to the sender.
enum Created {
    None,
    Object(SuiAddress, ObjKind),
}

impl State {
    /// Executes (or returns the earlier result of) a transaction.
    pub fn execute(
        &mut self,
        req: &proto::ExecuteTransactionRequest,
    ) -> Result<proto::ExecutedTransaction, Status> {
        let ptx = req
            .transaction
            .as_ref()
            .ok_or_else(|| invalid("no transaction"))?;
        let tx = Transaction::try_from(ptx).map_err(|e| invalid(format!("transaction: {e}")))?;
        let digest = tx.digest().to_string();
        if let Some(done) = self.txs.get(&digest) {
            return Ok(done.clone());
        }
        self.check_signature(&tx, &req.signatures)?;
        let sender = tx.sender;

        // Gas: the sender's own SUI coins at their current versions.
        if tx.gas_payment.owner != sender {
            return Err(invalid("sponsored transactions are not supported"));
        }
        if tx.gas_payment.price < REFERENCE_GAS_PRICE {
            return Err(invalid(format!(
                "gas price {} is below the reference price {REFERENCE_GAS_PRICE}",
                tx.gas_payment.price
            )));
        }
        if tx.gas_payment.budget == 0 || tx.gas_payment.objects.is_empty() {
            return Err(invalid("no gas budget or no gas coin"));
        }
        let gas: Vec<ObjRef> = tx
            .gas_payment
            .objects
            .iter()
            .map(|r| ObjRef {
                id: *r.object_id(),
                version: r.version(),
                digest: *r.digest(),
            })
            .collect();
        for g in &gas {
            self.check_owned(g, sender, Some(&ObjKind::Gas))
                .inspect_err(|e| self.count_stale(e))?;
        }

        let decoded = decode_call(&tx, self.ids.package, self.ids.db).map_err(invalid)?;
        for (id, version, mutable) in &decoded.shared {
            let (want, must_mut) = if *id == self.ids.db {
                (self.ids.db_initial_shared_version, true)
            } else if *id == RANDOM_ID {
                (self.ids.random_initial_shared_version, false)
            } else {
                return Err(invalid(format!("unknown shared object {id}")));
            };
            if *version != want {
                return Err(invalid(format!(
                    "shared object {id}: initial shared version {version}, it is {want}"
                )));
            }
            if *mutable != must_mut {
                return Err(invalid(format!(
                    "shared object {id} passed with the wrong mutability"
                )));
            }
        }
        let owned: Vec<ObjRef> = decoded
            .call
            .args
            .iter()
            .filter_map(|a| match a {
                Arg::Object(r) => Some(*r),
                _ => None,
            })
            .chain(decoded.call.merge.iter().copied())
            .collect();
        for r in &owned {
            self.check_owned(r, sender, None)
                .inspect_err(|e| self.count_stale(e))?;
        }

        // Run it. The checkpoint is assigned now: one transaction per checkpoint.
        let checkpoint = self.checkpoint + 1;
        let who = Address(sender.into_inner());
        let result = self.dispatch(who, &decoded.call);
        let mut touched: Vec<SuiAddress> = gas.iter().map(|g| g.id).collect();
        let lamport = owned
            .iter()
            .chain(gas.iter())
            .map(|r| r.version)
            .chain(self.objects.get(&self.ids.db).map(|o| o.version))
            .max()
            .unwrap_or(0)
            + 1;
        let mut effects = proto::TransactionEffects::default();
        let mut status = proto::ExecutionStatus::default();
        let events = match result {
            Ok(created) => {
                touched.extend(owned.iter().map(|r| r.id));
                touched.push(self.ids.db);
                if let Created::Object(id, kind) = created {
                    self.insert(id, kind, ObjOwner::Address(sender), lamport);
                    effects.changed_objects.push(self.changed(&id, None));
                }
                status.success = Some(true);
                self.drain_events(sender, &digest, checkpoint)
            }
            Err(e) => {
                let code = abort::code_of(&e).ok_or_else(|| Status::internal(e.to_string()))?;
                let mut err = proto::ExecutionError::default();
                err.description = Some(e.to_string());
                err.command = Some(decoded.call.merge.len().min(1) as u64);
                err.kind = Some(proto::execution_error::ExecutionErrorKind::MoveAbort as i32);
                let mut ma = proto::MoveAbort::default();
                ma.abort_code = Some(code);
                let mut loc = proto::MoveLocation::default();
                loc.package = Some(self.ids.package.to_string());
                loc.module = Some("db".into());
                loc.function_name = Some(decoded.call.function.clone());
                ma.location = Some(loc);
                err.error_details = Some(proto::execution_error::ErrorDetails::Abort(ma));
                status.success = Some(false);
                status.error = Some(err);
                Vec::new()
            }
        };
        for id in &touched {
            let before = self.objects.get(id).map(|o| (o.version, o.digest));
            if let Some(o) = self.objects.get_mut(id) {
                o.version = lamport;
                o.digest = super::state::object_digest(id, lamport);
            }
            let ch = self.changed(id, before);
            if gas.iter().any(|g| g.id == *id) {
                effects.gas_object = Some(ch.clone());
            }
            effects.changed_objects.push(ch);
        }
        effects.status = Some(status);
        effects.lamport_version = Some(lamport);
        effects.transaction_digest = Some(digest.clone());
        effects.epoch = self.ledger.epoch().ok();

        let mut out = proto::ExecutedTransaction::default();
        out.digest = Some(digest.clone());
        out.transaction = Some(ptx.clone());
        out.signatures = req.signatures.clone();
        out.effects = Some(effects);
        let mut evs = proto::TransactionEvents::default();
        evs.events = events;
        out.events = Some(evs);
        out.checkpoint = Some(checkpoint);
        self.checkpoint = checkpoint;
        self.txs.insert(digest, out.clone());
        Ok(out)
    }

    fn count_stale(&mut self, e: &Status) {
        if e.code() == tonic::Code::FailedPrecondition {
            self.stale_refusals += 1;
        }
    }

    fn changed(
        &self,
        id: &SuiAddress,
        before: Option<(u64, sui_sdk_types::Digest)>,
    ) -> proto::ChangedObject {
        let mut c = proto::ChangedObject::default();
        c.object_id = Some(id.to_string());
        if let Some((v, d)) = before {
            c.input_version = Some(v);
            c.input_digest = Some(d.to_string());
        }
        if let Some(o) = self.objects.get(id) {
            c.output_version = Some(o.version);
            c.output_digest = Some(o.digest.to_string());
            c.object_type = Some(self.type_of(&o.kind));
            c.output_owner = Some(o.owner.to_proto());
        }
        c
    }

    fn check_signature(
        &self,
        tx: &Transaction,
        sigs: &[proto::UserSignature],
    ) -> Result<(), Status> {
        let [sig] = sigs else {
            return Err(invalid(format!("{} signatures; one is needed", sigs.len())));
        };
        let sig = UserSignature::try_from(sig).map_err(|e| invalid(format!("signature: {e}")))?;
        let UserSignature::Simple(SimpleSignature::Ed25519 { public_key, .. }) = &sig else {
            return Err(invalid(
                "only ed25519 signatures are supported by the test double",
            ));
        };
        if public_key.derive_address() != tx.sender {
            return Err(invalid("the signature's key is not the sender's"));
        }
        Ed25519Verifier::new()
            .verify_transaction(tx, &sig)
            .map_err(|e| invalid(format!("bad signature: {e}")))
    }

    /// An owned input: it exists, belongs to `sender`, and is passed at its current version
    /// and digest (a stale reference is refused, as a validator refuses it).
    fn check_owned(
        &self,
        r: &ObjRef,
        sender: SuiAddress,
        kind: Option<&ObjKind>,
    ) -> Result<(), Status> {
        let o = self
            .objects
            .get(&r.id)
            .ok_or_else(|| invalid(format!("object {} does not exist", r.id)))?;
        if o.owner != ObjOwner::Address(sender) {
            return Err(invalid(format!(
                "object {} is not owned by the sender",
                r.id
            )));
        }
        if o.version != r.version || o.digest != r.digest {
            return Err(Status::failed_precondition(format!(
                "object {} is at version {}, not {} (stale reference)",
                r.id, o.version, r.version
            )));
        }
        if let Some(k) = kind
            && &o.kind != k
        {
            return Err(invalid(format!(
                "object {} is not a {}",
                r.id,
                self.type_of(k)
            )));
        }
        Ok(())
    }

    fn badge(&self, args: &[Arg], i: usize) -> Result<u64, LedgerError> {
        match args.get(i) {
            Some(Arg::Object(r)) => match self.objects.get(&r.id).map(|o| &o.kind) {
                Some(ObjKind::NodeBadge(n) | ObjKind::TaskBadge(n) | ObjKind::StackBadge(n)) => {
                    Ok(*n)
                }
                _ => Err(LedgerError::Invalid(format!("argument {i} is not a badge"))),
            },
            _ => Err(LedgerError::Invalid(format!(
                "argument {i} is not an object"
            ))),
        }
    }

    fn kind_at(&self, args: &[Arg], i: usize) -> Option<&ObjKind> {
        match args.get(i) {
            Some(Arg::Object(r)) => self.objects.get(&r.id).map(|o| &o.kind),
            _ => None,
        }
    }

    /// Runs one `db` entry function on the embedded ledger. Argument type errors are Move
    /// aborts here (a real chain refuses them before execution; the effect for the client is
    /// the same: nothing changes).
    fn dispatch(&mut self, sender: Address, call: &Call) -> Result<Created, LedgerError> {
        let a = &call.args;
        let l = &self.ledger;
        let node = |s: &Self, i| s.badge(a, i).map(NodeSmallId);
        let need = |n: usize| {
            if a.len() == n {
                Ok(())
            } else {
                Err(LedgerError::Invalid(format!(
                    "{} takes {} arguments, got {}",
                    call.function,
                    n,
                    a.len()
                )))
            }
        };
        let is_node_badge = |s: &Self, i| matches!(s.kind_at(a, i), Some(ObjKind::NodeBadge(_)));
        match call.function.as_str() {
            "register_node_entry" => {
                need(1)?;
                let n = l.register_node(sender)?;
                let id = badge_address(&n.badge_id)?;
                return Ok(Created::Object(id, ObjKind::NodeBadge(n.small_id.0)));
            }
            "add_node_to_model" => {
                need(4)?;
                node_badge(is_node_badge(self, 1))?;
                let model: String = pure(a, 2)?;
                l.add_node_to_model(sender, node(self, 1)?, &model, pure(a, 3)?)?;
            }
            "create_task_entry" | "create_task_with_collateral" => {
                let with_collateral = call.function == "create_task_with_collateral";
                need(if with_collateral { 8 } else { 7 })?;
                if !matches!(self.kind_at(a, 1), Some(ObjKind::ManagerBadge)) {
                    return Err(LedgerError::Invalid(
                        "argument 1 is not the manager badge".into(),
                    ));
                }
                let role: u16 = pure(a, 2)?;
                let sec: Option<u16> = pure(a, 4)?;
                let rep: Option<u8> = pure(a, 5)?;
                let task = NewTask {
                    role: TaskRole::from_code(role)
                        .ok_or_else(|| LedgerError::Invalid(format!("task role {role}")))?,
                    model_name: pure(a, 3)?,
                    security_level: SecurityLevel::from_code(sec.unwrap_or(0))
                        .ok_or_else(|| LedgerError::Invalid(format!("security level {sec:?}")))?,
                    minimum_reputation_score: rep.unwrap_or(0),
                    is_public: pure(a, 6)?,
                    minimum_collateral: Amount(if with_collateral { pure(a, 7)? } else { 0 }),
                };
                let t = l.create_task(sender, &task)?;
                let task_id = self.task_object_id(t.small_id)?;
                return Ok(Created::Object(task_id, ObjKind::TaskBadge(t.small_id.0)));
            }
            "whitelist_nodes_for_task" => {
                need(4)?;
                if !matches!(self.kind_at(a, 1), Some(ObjKind::ManagerBadge)) {
                    return Err(LedgerError::Invalid(
                        "argument 1 is not the manager badge".into(),
                    ));
                }
                let nodes: Vec<u64> = pure(a, 3)?;
                let nodes: Vec<NodeSmallId> = nodes.into_iter().map(NodeSmallId).collect();
                l.whitelist_nodes_for_task(TaskSmallId(pure(a, 2)?), &nodes)?;
            }
            "deprecate_task" => {
                need(2)?;
                if !matches!(self.kind_at(a, 1), Some(ObjKind::TaskBadge(_))) {
                    return Err(LedgerError::Invalid(
                        "argument 1 is not a task badge".into(),
                    ));
                }
                l.deprecate_task(TaskSmallId(self.badge(a, 1)?))?;
            }
            "subscribe_node_to_task" | "update_node_subscription" => {
                need(4)?;
                node_badge(is_node_badge(self, 1))?;
                let (n, t, p) = (
                    node(self, 1)?,
                    TaskSmallId(pure(a, 2)?),
                    Amount(pure(a, 3)?),
                );
                if call.function == "subscribe_node_to_task" {
                    l.subscribe_node_to_task(sender, n, t, p)?;
                } else {
                    l.update_node_subscription(sender, n, t, p)?;
                }
            }
            "unsubscribe_node_from_task" => {
                need(3)?;
                node_badge(is_node_badge(self, 1))?;
                l.unsubscribe_node_from_task(sender, node(self, 1)?, TaskSmallId(pure(a, 2)?))?;
            }
            "acquire_new_stack_entry" => {
                need(6)?;
                if !matches!(self.kind_at(a, 1), Some(ObjKind::Usdc)) || a[5] != Arg::Random {
                    return Err(LedgerError::Invalid(
                        "expected (db, Coin<USDC>, u64, u64, u64, Random)".into(),
                    ));
                }
                let req = StackRequest {
                    task_small_id: TaskSmallId(pure(a, 2)?),
                    num_compute_units: ComputeUnits(pure(a, 3)?),
                    price_per_one_million_compute_units: Amount(pure(a, 4)?),
                };
                let s = l.acquire_stack(sender, &req)?;
                let id = badge_address(&s.stack_id)?;
                return Ok(Created::Object(id, ObjKind::StackBadge(s.small_id.0)));
            }
            "try_settle_stack" | "try_settle_stack_with_log" => {
                let with_log = call.function == "try_settle_stack_with_log";
                need(if with_log { 11 } else { 7 })?;
                node_badge(is_node_badge(self, 1))?;
                let proof = hash(pure(a, 4)?)?;
                let leaf = hash(pure(a, 5)?)?;
                if proof != leaf {
                    return Err(LedgerError::Invalid(
                        "the stack Merkle leaf must equal the committed proof".into(),
                    ));
                }
                let commitment = if with_log {
                    StackCommitment {
                        merkle_root: proof,
                        leaf_count: pure(a, 6)?,
                        blob_id: pure(a, 7)?,
                        blob_hash: hash(pure(a, 8)?)?,
                        blob_size: pure(a, 9)?,
                    }
                } else {
                    // The deployed contract records the root alone.
                    StackCommitment::root_only(proof)
                };
                l.try_settle_stack(
                    sender,
                    node(self, 1)?,
                    StackSmallId(pure(a, 2)?),
                    ComputeUnits(pure(a, 3)?),
                    &commitment,
                )?;
            }
            "submit_stack_settlement_attestation" => {
                need(5)?;
                node_badge(is_node_badge(self, 1))?;
                let proof = hash(pure(a, 3)?)?;
                l.submit_stack_settlement_attestation(
                    sender,
                    node(self, 1)?,
                    StackSmallId(pure(a, 2)?),
                    proof,
                )?;
            }
            "start_attestation_dispute" | "start_attestation_dispute_at" => {
                let at = call.function == "start_attestation_dispute_at";
                need(if at { 6 } else { 4 })?;
                node_badge(is_node_badge(self, 1))?;
                let claim = DisputeClaim {
                    attestation_commitment: hash(pure(a, 3)?)?,
                    record: if at { pure(a, 4)? } else { None },
                    position: if at { pure(a, 5)? } else { None },
                };
                l.start_attestation_dispute(
                    sender,
                    node(self, 1)?,
                    StackSmallId(pure(a, 2)?),
                    &claim,
                )?;
            }
            "claim_funds" => {
                need(3)?;
                node_badge(is_node_badge(self, 1))?;
                let stacks: Vec<u64> = pure(a, 2)?;
                let stacks: Vec<StackSmallId> = stacks.into_iter().map(StackSmallId).collect();
                l.claim_funds(sender, node(self, 1)?, &stacks)?;
            }
            "claim_funds_for_stacks" => {
                need(4)?;
                node_badge(is_node_badge(self, 1))?;
                let stacks: Vec<u64> = pure(a, 2)?;
                let units: Vec<u64> = pure(a, 3)?;
                if stacks.len() != units.len() {
                    return Err(LedgerError::Invalid(
                        "stack ids and compute units differ in length".into(),
                    ));
                }
                let claims: Vec<(StackSmallId, ComputeUnits)> = stacks
                    .into_iter()
                    .zip(units)
                    .map(|(s, u)| (StackSmallId(s), ComputeUnits(u)))
                    .collect();
                l.claim_funds_for_stacks(sender, node(self, 1)?, &claims)?;
            }
            // ---- the extended contract's functions ----
            "set_node_public_url" => {
                need(3)?;
                node_badge(is_node_badge(self, 1))?;
                let url: String = pure(a, 2)?;
                l.set_node_public_url(sender, node(self, 1)?, &url)?;
            }
            "deposit_collateral" => {
                need(4)?;
                node_badge(is_node_badge(self, 1))?;
                if !matches!(self.kind_at(a, 2), Some(ObjKind::Usdc)) {
                    return Err(LedgerError::Invalid(
                        "argument 2 is not a Coin<USDC>".into(),
                    ));
                }
                l.deposit_collateral(sender, node(self, 1)?, Amount(pure(a, 3)?))?;
            }
            "withdraw_collateral" => {
                need(3)?;
                node_badge(is_node_badge(self, 1))?;
                l.withdraw_collateral(sender, node(self, 1)?, Amount(pure(a, 2)?))?;
            }
            "resolve_attestation_dispute" => {
                need(4)?;
                node_badge(is_node_badge(self, 1))?;
                l.resolve_attestation_dispute(
                    sender,
                    node(self, 1)?,
                    StackSmallId(pure(a, 2)?),
                    pure(a, 3)?,
                )?;
            }
            "expire_dispute_oracle" => {
                need(2)?;
                l.expire_dispute_oracle(sender, StackSmallId(pure(a, 1)?))?;
            }
            "close_expired_stack" => {
                need(2)?;
                l.close_expired_stack(sender, StackSmallId(pure(a, 1)?))?;
            }
            "set_params" => {
                need(3)?;
                if !matches!(self.kind_at(a, 1), Some(ObjKind::ManagerBadge)) {
                    return Err(LedgerError::Invalid(
                        "argument 1 is not the manager badge".into(),
                    ));
                }
                let p: Params = pure(a, 2)?;
                l.set_params(sender, &LedgerParams::from(p))?;
            }
            other => {
                return Err(LedgerError::Invalid(format!(
                    "the db module has no entry function `{other}`"
                )));
            }
        }
        Ok(Created::None)
    }

    /// A task's object id: from its `TaskRegisteredEvent`, still in the ledger's new events.
    fn task_object_id(&self, task: TaskSmallId) -> Result<SuiAddress, LedgerError> {
        let evs = self
            .ledger
            .events_after(atoma_ledger::EventCursor(self.ledger_seq), usize::MAX >> 1)?;
        evs.iter()
            .find_map(|r| match &r.event {
                LedgerEvent::TaskRegisteredEvent {
                    task_id,
                    task_small_id,
                    ..
                } if *task_small_id == task => Some(task_id.clone()),
                _ => None,
            })
            .ok_or_else(|| LedgerError::Storage(format!("task {task} has no registration event")))
            .and_then(|id| badge_address(&id))
    }
}

fn node_badge(ok: bool) -> Result<(), LedgerError> {
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Invalid("argument 1 is not a NodeBadge".into()))
    }
}

fn badge_address(id: &str) -> Result<SuiAddress, LedgerError> {
    id_bytes(id)
        .map(SuiAddress::new)
        .map_err(|e| LedgerError::Storage(format!("object id {id}: {e}")))
}

fn pure<T: DeserializeOwned>(args: &[Arg], i: usize) -> Result<T, LedgerError> {
    match args.get(i) {
        Some(Arg::Pure(b)) => bcs::from_bytes(b).map_err(|e| {
            LedgerError::Invalid(format!("argument {i} does not decode as its type: {e}"))
        }),
        _ => Err(LedgerError::Invalid(format!(
            "argument {i} is not a pure value"
        ))),
    }
}

fn hash(v: Vec<u8>) -> Result<Hash32, LedgerError> {
    <[u8; 32]>::try_from(v.as_slice())
        .map(Hash32)
        .map_err(|_| LedgerError::Invalid(format!("a hash has {} bytes, not 32", v.len())))
}
