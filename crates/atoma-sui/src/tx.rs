//! Programmable transactions calling the contract's `db` module: one [`Call`] per entry
//! function, with its exact argument list, built into a signed-ready [`Transaction`] with
//! explicit gas; and the reverse ([`decode_call`]) that the test double uses to read a
//! transaction back into the same [`Call`] shape.
//!
//! A transaction is a list of inputs (pure BCS values, owned object references, shared objects
//! with their initial shared version) and commands; ours are zero or more `MergeCoins` (joining a
//! buyer's USDC coins) followed by exactly one `MoveCall` to `<package>::db::<function>`.

use sui_sdk_types::{
    Address as SuiAddress, Argument, Command, Digest, Identifier, Input, ObjectReference,
    Transaction, TransactionKind,
};
use sui_transaction_builder::{Function, ObjectInput, TransactionBuilder};

/// Sui's `Random` object.
pub const RANDOM_ID: SuiAddress = SuiAddress::from_static("0x8");

/// An owned object's reference: id, version, digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjRef {
    pub id: SuiAddress,
    pub version: u64,
    pub digest: Digest,
}

impl ObjRef {
    pub fn to_sdk(self) -> ObjectReference {
        ObjectReference::new(self.id, self.version, self.digest)
    }
}

/// A shared object: id and initial shared version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRef {
    pub id: SuiAddress,
    pub initial_shared_version: u64,
}

/// One argument of a `db` entry function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// The shared `AtomaDb`, always `&mut`.
    Db,
    /// Sui's shared `Random` (0x8), immutable.
    Random,
    /// An owned object: a badge or a coin.
    Object(ObjRef),
    /// A pure value, already BCS.
    Pure(Vec<u8>),
}

impl Arg {
    /// A pure argument from any BCS-serializable value.
    pub fn pure<T: serde::Serialize>(v: &T) -> Self {
        // Plain integers, byte vectors, strings and options always serialize.
        Self::Pure(bcs::to_bytes(v).unwrap_or_default())
    }
}

/// A call of one `db` entry function: its name and arguments in signature order (the trailing
/// `&mut TxContext` is implicit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub function: String,
    pub args: Vec<Arg>,
    /// USDC coins merged into the first `Object` argument before the call (a buyer with several).
    pub merge: Vec<ObjRef>,
}

impl Call {
    fn new(function: &str, args: Vec<Arg>) -> Self {
        Self {
            function: function.to_string(),
            args,
            merge: Vec::new(),
        }
    }

    /// `register_node_entry(self)`.
    pub fn register_node() -> Self {
        Self::new("register_node_entry", vec![Arg::Db])
    }

    /// `add_node_to_model(self, &mut NodeBadge, model_name: ascii::String, echelon: u64)`.
    pub fn add_node_to_model(badge: ObjRef, model: &str, echelon: u64) -> Self {
        Self::new(
            "add_node_to_model",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&model.to_string()),
                Arg::pure(&echelon),
            ],
        )
    }

    /// `create_task_entry(self, &AtomaManagerBadge, role: u16, model_name: Option<ascii::String>,
    /// security_level: Option<u16>, minimum_reputation_score: Option<u8>, is_public: bool)`.
    pub fn create_task(
        manager: ObjRef,
        role: u16,
        model: Option<String>,
        security_level: u16,
        minimum_reputation_score: u8,
        is_public: bool,
    ) -> Self {
        Self::new(
            "create_task_entry",
            vec![
                Arg::Db,
                Arg::Object(manager),
                Arg::pure(&role),
                Arg::pure(&model),
                Arg::pure(&Some(security_level)),
                Arg::pure(&Some(minimum_reputation_score)),
                Arg::pure(&is_public),
            ],
        )
    }

    /// `whitelist_nodes_for_task(self, &AtomaManagerBadge, task_small_id: u64, nodes: vector<u64>)`.
    pub fn whitelist_nodes(manager: ObjRef, task: u64, nodes: &[u64]) -> Self {
        Self::new(
            "whitelist_nodes_for_task",
            vec![
                Arg::Db,
                Arg::Object(manager),
                Arg::pure(&task),
                Arg::pure(&nodes.to_vec()),
            ],
        )
    }

    /// `deprecate_task(self, &TaskBadge)`.
    pub fn deprecate_task(task_badge: ObjRef) -> Self {
        Self::new("deprecate_task", vec![Arg::Db, Arg::Object(task_badge)])
    }

    /// `subscribe_node_to_task(self, &mut NodeBadge, task_small_id: u64, price: u64)`.
    pub fn subscribe(badge: ObjRef, task: u64, price: u64) -> Self {
        Self::new(
            "subscribe_node_to_task",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&task),
                Arg::pure(&price),
            ],
        )
    }

    /// `update_node_subscription(self, &mut NodeBadge, task_small_id: u64, price: u64)`.
    pub fn update_subscription(badge: ObjRef, task: u64, price: u64) -> Self {
        let mut c = Self::subscribe(badge, task, price);
        c.function = "update_node_subscription".into();
        c
    }

    /// `unsubscribe_node_from_task(self, &mut NodeBadge, task_small_id: u64)`.
    pub fn unsubscribe(badge: ObjRef, task: u64) -> Self {
        Self::new(
            "unsubscribe_node_from_task",
            vec![Arg::Db, Arg::Object(badge), Arg::pure(&task)],
        )
    }

    /// `acquire_new_stack_entry(self, wallet: &mut Coin<USDC>, task_small_id: u64,
    /// num_compute_units: u64, price: u64, random: &Random)`. Further coins are merged into
    /// `wallet` first (a command that uses `Random` may be followed only by transfers and merges,
    /// so merges go before it).
    pub fn acquire_stack(
        wallet: ObjRef,
        merge: &[ObjRef],
        task: u64,
        units: u64,
        price: u64,
    ) -> Self {
        let mut c = Self::new(
            "acquire_new_stack_entry",
            vec![
                Arg::Db,
                Arg::Object(wallet),
                Arg::pure(&task),
                Arg::pure(&units),
                Arg::pure(&price),
                Arg::Random,
            ],
        );
        c.merge = merge.to_vec();
        c
    }

    /// `try_settle_stack(self, &NodeBadge, stack_small_id: u64, num_claimed_compute_units: u64,
    /// committed_stack_proof: vector<u8>, stack_merkle_leaf: vector<u8>, random: &Random)`.
    pub fn try_settle(badge: ObjRef, stack: u64, units: u64, proof: &[u8], leaf: &[u8]) -> Self {
        Self::new(
            "try_settle_stack",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stack),
                Arg::pure(&units),
                Arg::pure(&proof.to_vec()),
                Arg::pure(&leaf.to_vec()),
                Arg::Random,
            ],
        )
    }

    /// `submit_stack_settlement_attestation(self, &NodeBadge, stack_small_id: u64,
    /// committed_stack_proof: vector<u8>, stack_merkle_leaf: vector<u8>)`.
    pub fn attest(badge: ObjRef, stack: u64, proof: &[u8], leaf: &[u8]) -> Self {
        Self::new(
            "submit_stack_settlement_attestation",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stack),
                Arg::pure(&proof.to_vec()),
                Arg::pure(&leaf.to_vec()),
            ],
        )
    }

    /// `start_attestation_dispute(self, &NodeBadge, stack_small_id: u64,
    /// attestation_commitment: vector<u8>)`.
    pub fn dispute(badge: ObjRef, stack: u64, commitment: &[u8]) -> Self {
        Self::new(
            "start_attestation_dispute",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stack),
                Arg::pure(&commitment.to_vec()),
            ],
        )
    }

    /// `claim_funds(self, &NodeBadge, settled_ticket_ids: vector<u64>)`.
    pub fn claim_funds(badge: ObjRef, stacks: &[u64]) -> Self {
        Self::new(
            "claim_funds",
            vec![Arg::Db, Arg::Object(badge), Arg::pure(&stacks.to_vec())],
        )
    }

    /// `claim_funds_for_stacks(self, &NodeBadge, stack_small_ids: vector<u64>,
    /// num_compute_units_per_stack_to_claim: vector<u64>)`.
    pub fn claim_funds_for_stacks(badge: ObjRef, stacks: &[u64], units: &[u64]) -> Self {
        Self::new(
            "claim_funds_for_stacks",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stacks.to_vec()),
                Arg::pure(&units.to_vec()),
            ],
        )
    }
}

impl Call {
    // ---- the extended contract's entry functions (not in the deployed package) ----

    /// `create_task_with_collateral(…create_task_entry's arguments…, minimum_collateral: u64)`.
    pub fn with_minimum_collateral(mut self, minimum_collateral: u64) -> Self {
        self.function = "create_task_with_collateral".into();
        self.args.push(Arg::pure(&minimum_collateral));
        self
    }

    /// `set_node_public_url(self, &NodeBadge, url: ascii::String)`.
    pub fn set_node_public_url(badge: ObjRef, url: &str) -> Self {
        Self::new(
            "set_node_public_url",
            vec![Arg::Db, Arg::Object(badge), Arg::pure(&url.to_string())],
        )
    }

    /// `deposit_collateral(self, &mut NodeBadge, wallet: &mut Coin<USDC>, amount: u64)`.
    pub fn deposit_collateral(
        badge: ObjRef,
        wallet: ObjRef,
        merge: &[ObjRef],
        amount: u64,
    ) -> Self {
        let mut c = Self::new(
            "deposit_collateral",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::Object(wallet),
                Arg::pure(&amount),
            ],
        );
        c.merge = merge.to_vec();
        c
    }

    /// `withdraw_collateral(self, &mut NodeBadge, amount: u64)`.
    pub fn withdraw_collateral(badge: ObjRef, amount: u64) -> Self {
        Self::new(
            "withdraw_collateral",
            vec![Arg::Db, Arg::Object(badge), Arg::pure(&amount)],
        )
    }

    /// `try_settle_stack_with_log(self, &NodeBadge, stack_small_id, num_claimed_compute_units,
    /// committed_stack_proof, stack_merkle_leaf, leaf_count: u64, blob_id: ascii::String,
    /// blob_hash: vector<u8>, blob_size: u64, &Random)`: the deployed call plus where the log is.
    #[allow(clippy::too_many_arguments)]
    pub fn try_settle_with_log(
        badge: ObjRef,
        stack: u64,
        units: u64,
        root: &[u8],
        leaf_count: u64,
        blob_id: &str,
        blob_hash: &[u8],
        blob_size: u64,
    ) -> Self {
        Self::new(
            "try_settle_stack_with_log",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stack),
                Arg::pure(&units),
                Arg::pure(&root.to_vec()),
                Arg::pure(&root.to_vec()),
                Arg::pure(&leaf_count),
                Arg::pure(&blob_id.to_string()),
                Arg::pure(&blob_hash.to_vec()),
                Arg::pure(&blob_size),
                Arg::Random,
            ],
        )
    }

    /// `start_attestation_dispute_at(self, &NodeBadge, stack_small_id, attestation_commitment,
    /// record: Option<u64>, position: Option<u64>)`.
    pub fn dispute_at(
        badge: ObjRef,
        stack: u64,
        commitment: &[u8],
        record: Option<u64>,
        position: Option<u64>,
    ) -> Self {
        Self::new(
            "start_attestation_dispute_at",
            vec![
                Arg::Db,
                Arg::Object(badge),
                Arg::pure(&stack),
                Arg::pure(&commitment.to_vec()),
                Arg::pure(&record),
                Arg::pure(&position),
            ],
        )
    }

    /// `resolve_attestation_dispute(self, &NodeBadge (the oracle's), stack_small_id,
    /// node_was_honest: bool)`.
    pub fn resolve_dispute(oracle_badge: ObjRef, stack: u64, node_was_honest: bool) -> Self {
        Self::new(
            "resolve_attestation_dispute",
            vec![
                Arg::Db,
                Arg::Object(oracle_badge),
                Arg::pure(&stack),
                Arg::pure(&node_was_honest),
            ],
        )
    }

    /// `expire_dispute_oracle(self, stack_small_id)`.
    pub fn expire_dispute_oracle(stack: u64) -> Self {
        Self::new("expire_dispute_oracle", vec![Arg::Db, Arg::pure(&stack)])
    }

    /// `close_expired_stack(self, stack_small_id)`.
    pub fn close_expired_stack(stack: u64) -> Self {
        Self::new("close_expired_stack", vec![Arg::Db, Arg::pure(&stack)])
    }

    /// `set_params(self, &AtomaManagerBadge, params: Params)`.
    pub fn set_params(manager: ObjRef, params: &crate::move_types::Params) -> Self {
        Self::new(
            "set_params",
            vec![Arg::Db, Arg::Object(manager), Arg::pure(params)],
        )
    }
}

/// Where the contract lives: the package the calls go to, and the shared objects' initial
/// shared versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contract {
    pub package: SuiAddress,
    pub db: SharedRef,
    pub random_initial_shared_version: u64,
}

/// Gas for one transaction: the sender's SUI coin, the reference price, the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    pub coin: ObjRef,
    pub price: u64,
    pub budget: u64,
}

/// Builds the transaction of `call` for `sender` (offline: nothing is sent).
pub fn build(
    contract: &Contract,
    call: &Call,
    sender: SuiAddress,
    gas: &Gas,
) -> Result<Transaction, String> {
    let mut tx = TransactionBuilder::new();
    let mut args = Vec::with_capacity(call.args.len());
    let mut first_object = None;
    for a in &call.args {
        let arg = match a {
            Arg::Db => tx.object(ObjectInput::shared(
                contract.db.id,
                contract.db.initial_shared_version,
                true,
            )),
            Arg::Random => tx.object(ObjectInput::shared(
                RANDOM_ID,
                contract.random_initial_shared_version,
                false,
            )),
            Arg::Object(r) => {
                let arg = tx.object(ObjectInput::owned(r.id, r.version, r.digest));
                first_object.get_or_insert(arg);
                arg
            }
            Arg::Pure(bytes) => tx.pure_bytes(bytes.clone()),
        };
        args.push(arg);
    }
    if !call.merge.is_empty() {
        let into = first_object.ok_or("coins to merge but no coin argument")?;
        let coins = call
            .merge
            .iter()
            .map(|r| tx.object(ObjectInput::owned(r.id, r.version, r.digest)))
            .collect();
        tx.merge_coins(into, coins);
    }
    tx.move_call(
        Function::new(
            contract.package,
            Identifier::from_static("db"),
            Identifier::new(&call.function).map_err(|e| e.to_string())?,
        ),
        args,
    );
    tx.set_sender(sender);
    tx.set_gas_budget(gas.budget);
    tx.set_gas_price(gas.price);
    tx.add_gas_objects([ObjectInput::owned(
        gas.coin.id,
        gas.coin.version,
        gas.coin.digest,
    )]);
    tx.try_build().map_err(|e| e.to_string())
}

/// A transaction read back: the `db` function called, its arguments, and the coins merged
/// before it. Shared inputs come back as [`Arg::Db`] / [`Arg::Random`] only when their ids
/// match; their versions are returned for the caller to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCall {
    pub call: Call,
    /// Every shared input: (id, initial shared version, mutable).
    pub shared: Vec<(SuiAddress, u64, bool)>,
}

/// Reads a transaction back into the [`Call`] it makes: only the shapes [`build`] produces are
/// accepted (merges into one coin, then one `MoveCall` to `package::db`).
pub fn decode_call(
    tx: &Transaction,
    package: SuiAddress,
    db: SuiAddress,
) -> Result<DecodedCall, String> {
    let TransactionKind::ProgrammableTransaction(ptb) = &tx.kind else {
        return Err("not a programmable transaction".into());
    };
    let input = |a: &Argument| -> Result<&Input, String> {
        match a {
            Argument::Input(i) => ptb
                .inputs
                .get(usize::from(*i))
                .ok_or_else(|| format!("argument refers to input {i}, which does not exist")),
            other => Err(format!("argument {other:?} is not a transaction input")),
        }
    };
    let owned = |a: &Argument| -> Result<ObjRef, String> {
        match input(a)? {
            Input::ImmutableOrOwned(r) => Ok(ObjRef {
                id: *r.object_id(),
                version: r.version(),
                digest: *r.digest(),
            }),
            other => Err(format!("expected an owned object, got {other:?}")),
        }
    };
    let mut merge = Vec::new();
    let (last, before) = ptb.commands.split_last().ok_or("no command")?;
    for c in before {
        let Command::MergeCoins(m) = c else {
            return Err(format!("unexpected command before the call: {c:?}"));
        };
        for a in &m.coins_to_merge {
            merge.push(owned(a)?);
        }
    }
    let Command::MoveCall(mc) = last else {
        return Err("the last command is not a Move call".into());
    };
    if mc.package != package || mc.module.as_str() != "db" {
        return Err(format!(
            "call to {}::{}, not to the contract's db module",
            mc.package, mc.module
        ));
    }
    if !mc.type_arguments.is_empty() {
        return Err("db entry functions take no type arguments".into());
    }
    let mut shared = Vec::new();
    let mut args = Vec::with_capacity(mc.arguments.len());
    for a in &mc.arguments {
        args.push(match input(a)? {
            Input::Pure(bytes) => Arg::Pure(bytes.clone()),
            Input::ImmutableOrOwned(_) => Arg::Object(owned(a)?),
            Input::Shared(s) => {
                shared.push((s.object_id(), s.version(), s.mutability().is_mutable()));
                if s.object_id() == db {
                    Arg::Db
                } else if s.object_id() == RANDOM_ID {
                    Arg::Random
                } else {
                    return Err(format!("unknown shared object {}", s.object_id()));
                }
            }
            other => return Err(format!("unsupported input {other:?}")),
        });
    }
    Ok(DecodedCall {
        call: Call {
            function: mc.function.as_str().to_string(),
            args,
            merge,
        },
        shared,
    })
}
