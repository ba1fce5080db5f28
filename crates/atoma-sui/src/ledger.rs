//! `SuiLedger`: the `Ledger` trait over Sui. Writes are Move calls to the contract's `db` module,
//! built with the sender's current object references, signed with its key, executed and awaited
//! until checkpointed; reads come from the local index of the module's events (ingested in
//! order, with a durable cursor) folded into a [`View`], and from owned objects (balances).
//!
//! The trait is synchronous and sui-rpc is async: the ledger owns a small runtime and blocks on
//! it (from a blocking context; called from inside another runtime it waits on a scoped helper
//! thread instead of panicking).
//!
//! **Never double-submitted**: a transaction's digest is fixed once it is built and signed; a
//! transient failure (unavailable, timeout) resends the *same* signed transaction, which the
//! chain executes at most once. Only a refusal before execution (a stale object version) builds
//! a new one, and that one cannot conflict with the first: the first was never executed.
//! Transactions of one sender are serialized (on Sui, two transactions spending the same owned
//! object version equivocate).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use atoma_ledger::{
    Address, Amount, ClaimOutcome, ComputeUnits, Dispute, DisputeClaim, DisputeResolution,
    EventCursor, EventRecord, Hash32, Ledger, LedgerError, LedgerEvent, LedgerParams, MoneyTotals,
    NewTask, Node, NodeSmallId, Result, SettlementTicket, Stack, StackCommitment, StackRequest,
    StackSmallId, Subscription, Task, TaskSmallId,
};
use sui_rpc::Client;
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_sdk_types::Address as SuiAddress;
use tonic::Code;

use crate::abort::AbortContext;
use crate::index::{Index, Ingested};
use crate::keys::Signers;
use crate::move_types::{self, Badge};
use crate::rpc::{self, GAS_COIN_TYPE};
use crate::tx::{Call, Contract, Gas, ObjRef, RANDOM_ID, SharedRef, build};
use crate::view::View;

/// Which contract is on the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// The deployed Atoma package: operations it lacks return `NotSupported`.
    #[default]
    Deployed,
    /// The deployed functions plus ours (collateral, disputes' resolution, expiry, parameters,
    /// public URL, the log's location on tickets), as the test double runs them.
    Extended,
}

/// How to reach the contract.
#[derive(Debug, Clone)]
pub struct SuiConfig {
    /// gRPC endpoint, e.g. `https://fullnode.testnet.sui.io:443`.
    pub rpc_url: String,
    /// The package calls go to (the latest upgrade).
    pub package_id: SuiAddress,
    /// The package's original id: event types are named after it.
    pub original_package_id: SuiAddress,
    /// The shared `AtomaDb` object.
    pub atoma_db: SuiAddress,
    /// The USDC coin type, e.g. `0x…::usdc::USDC`.
    pub usdc_type: String,
    /// Gas budget per transaction, in MIST.
    pub gas_budget: u64,
    /// The event index (SQLite); `None`: in memory (tests).
    pub index_path: Option<PathBuf>,
    /// Holder of the `AtomaManagerBadge`, for whitelisting (which has no sender in the trait).
    pub admin: Option<Address>,
    pub flavor: Flavor,
    /// How long to wait for a transaction to be checkpointed.
    pub timeout: Duration,
}

/// Attempts for one transaction: resends of the same signed transaction on transient errors,
/// and rebuilds after a stale object version.
const MAX_ATTEMPTS: u32 = 8;
const EVENTS_PER_PAGE: u32 = 500;

pub struct SuiLedger {
    cfg: SuiConfig,
    /// Always `Some` until drop (which shuts it down without blocking, allowed anywhere).
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    contract: Contract,
    signers: Signers,
    index: Mutex<Index>,
    view: Mutex<View>,
    senders: Mutex<HashMap<Address, Arc<Mutex<()>>>>,
}

impl std::fmt::Debug for SuiLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuiLedger")
            .field("rpc_url", &self.cfg.rpc_url)
            .field("package", &self.contract.package)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn transient(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal | Code::Aborted
    )
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(6)).min(3_000))
}

impl SuiLedger {
    /// Connects, resolves the shared objects' initial versions and replays the local index.
    pub fn connect(cfg: SuiConfig, signers: Signers) -> Result<Self> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Building and blocking on a runtime inside another one panics: connect elsewhere.
            return std::thread::scope(|s| {
                s.spawn(|| Self::connect(cfg, signers))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("sui-ledger")
            .build()
            .map_err(|e| LedgerError::Storage(format!("runtime: {e}")))?;
        let client = rt
            .block_on(async { Client::new(cfg.rpc_url.as_str()) })
            .map_err(|e| LedgerError::Unavailable(format!("{}: {}", cfg.rpc_url, e.message())))?;
        let mut c = client.clone();
        let (db_isv, random_isv) = rt.block_on(async {
            let mut last = None;
            for attempt in 0..MAX_ATTEMPTS {
                match (
                    rpc::initial_shared_version(&mut c, cfg.atoma_db).await,
                    rpc::initial_shared_version(&mut c, RANDOM_ID).await,
                ) {
                    (Ok(a), Ok(b)) => return Ok((a, b)),
                    (Err(e @ LedgerError::Unavailable(_)), _)
                    | (_, Err(e @ LedgerError::Unavailable(_))) => last = Some(e),
                    (Err(e), _) | (_, Err(e)) => return Err(e),
                }
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(last.unwrap_or(LedgerError::Unavailable("no answer".into())))
        })?;
        let index = Index::open(cfg.index_path.as_deref())?;
        let mut view = View::default();
        for (seq, sender, e) in index.with_sender_after(0, usize::MAX)? {
            view.apply(seq, sender, &e);
        }
        let contract = Contract {
            package: cfg.package_id,
            db: SharedRef {
                id: cfg.atoma_db,
                initial_shared_version: db_isv,
            },
            random_initial_shared_version: random_isv,
        };
        Ok(Self {
            cfg,
            rt: Some(rt),
            client,
            contract,
            signers,
            index: Mutex::new(index),
            view: Mutex::new(view),
            senders: Mutex::new(HashMap::new()),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// Runs `f` to completion on the ledger's runtime. From inside another runtime (an async
    /// handler that forgot `spawn_blocking`), blocking would panic; there the wait happens on a
    /// scoped helper thread instead, so the ledger is safe to call from anywhere.
    fn block<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt().block_on(f);
        }
        std::thread::scope(|s| {
            s.spawn(|| self.rt().block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    pub fn config(&self) -> &SuiConfig {
        &self.cfg
    }

    fn extended(&self, what: &'static str) -> Result<()> {
        match self.cfg.flavor {
            Flavor::Extended => Ok(()),
            Flavor::Deployed => Err(LedgerError::NotSupported(what)),
        }
    }

    // ------------------------------------------------------------------ ingestion

    /// Ingests the chain's new `db` events into the index and the view. Each page is applied
    /// with the cursor after it in one transaction; a stream that breaks mid-page keeps the
    /// events before the break (with their cursor) and resumes after backing off.
    pub fn sync(&self) -> Result<u64> {
        let mut index = lock(&self.index);
        let mut added = 0u64;
        let mut failures = 0u32;
        loop {
            let after = index.cursor()?;
            let (page, cursor, done, error) = self.block(self.list_page(after));
            if let Some(cursor) = cursor {
                added += index.apply(&page, &cursor)? as u64;
                let mut view = lock(&self.view);
                for (seq, sender, e) in index.with_sender_after(view.seq, usize::MAX)? {
                    view.apply(seq, sender, &e);
                }
            }
            match error {
                None if done => return Ok(added),
                None => failures = 0,
                Some(e) => {
                    failures += 1;
                    if failures >= MAX_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::warn!("sui event ingestion: {e}; retrying");
                    std::thread::sleep(backoff(failures));
                }
            }
        }
    }

    /// One ListEvents page after `after`: the decoded events, the cursor after the last one
    /// (`None`: nothing new to store), whether the chain's tip was reached, and the error that
    /// broke the stream.
    async fn list_page(
        &self,
        after: Option<Vec<u8>>,
    ) -> (Vec<Ingested>, Option<Vec<u8>>, bool, Option<LedgerError>) {
        use futures_util::StreamExt;
        use sui_rpc::proto::sui::rpc::v2::filter;
        let mut req = proto::ListEventsRequest::default();
        let mut opts = proto::QueryOptions::default();
        opts.limit = Some(EVENTS_PER_PAGE);
        opts.after = after.map(Into::into);
        req.options = Some(opts);
        req.filter = Some(proto::EventFilter::matching(filter::event::emit_module(
            format!("{}::db", self.contract.package),
        )));
        let mut client = self.client.clone();
        let mut stream = match client.ledger_client().list_events(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                return (
                    Vec::new(),
                    None,
                    false,
                    Some(LedgerError::Unavailable(format!(
                        "ListEvents: {}",
                        s.message()
                    ))),
                );
            }
        };
        let mut page = Vec::new();
        let mut cursor = None;
        while let Some(frame) = stream.next().await {
            let frame = match frame {
                Ok(f) => f,
                Err(s) => {
                    return (
                        page,
                        cursor,
                        false,
                        Some(LedgerError::Unavailable(format!(
                            "ListEvents stream: {}",
                            s.message()
                        ))),
                    );
                }
            };
            let Some(w) = frame.watermark.as_ref().and_then(|w| w.cursor.clone()) else {
                return (
                    page,
                    cursor,
                    false,
                    Some(LedgerError::Unavailable(
                        "a ListEvents frame has no cursor".into(),
                    )),
                );
            };
            if let Some(e) = &frame.event {
                match self.ingest(e) {
                    Ok(Some(i)) => page.push(i),
                    Ok(None) => {}
                    Err(err) => return (page, cursor, false, Some(err)),
                }
            }
            cursor = Some(w.to_vec());
            if let Some(end) = frame.end {
                let tip = end.reason == Some(proto::QueryEndReason::LedgerTip as i32);
                return (page, cursor, tip, None);
            }
        }
        (
            page,
            cursor,
            false,
            Some(LedgerError::Unavailable(
                "the ListEvents stream ended without its end frame".into(),
            )),
        )
    }

    fn ingest(&self, e: &proto::Event) -> Result<Option<Ingested>> {
        let Some(raw) = rpc::raw_event(e) else {
            return Ok(None);
        };
        // Event types are named after the package's original id.
        let type_pkg = e
            .event_type
            .as_deref()
            .and_then(|t| t.split("::").next())
            .and_then(|p| p.parse::<SuiAddress>().ok());
        if type_pkg != Some(self.cfg.original_package_id)
            || move_types::IGNORED_EVENTS.contains(&raw.name.as_str())
        {
            return Ok(None);
        }
        let event = move_types::decode_event(&raw.name, &raw.contents, raw.sender)
            .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
        Ok(Some(Ingested {
            tx_digest: e.transaction_digest.clone().unwrap_or_default(),
            event_index: e.event_index.unwrap_or(0),
            checkpoint: e.checkpoint.unwrap_or(0),
            sender: raw.sender,
            event,
        }))
    }

    fn view<R>(&self, f: impl FnOnce(&View) -> R) -> Result<R> {
        self.sync()?;
        Ok(f(&lock(&self.view)))
    }

    // ------------------------------------------------------------------ object references

    fn owned(&self, owner: Address, type_: &str) -> Result<Vec<rpc::Owned>> {
        let mut last = None;
        for attempt in 0..MAX_ATTEMPTS {
            match self.block(rpc::owned(&self.client, SuiAddress::new(owner.0), type_)) {
                Ok(v) => return Ok(v),
                Err(e @ LedgerError::Unavailable(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
            std::thread::sleep(backoff(attempt));
        }
        Err(last.unwrap_or(LedgerError::Unavailable("no answer".into())))
    }

    fn type_name(&self, name: &str) -> String {
        format!("{}::db::{name}", self.cfg.original_package_id)
    }

    fn usdc_coin_type(&self) -> String {
        format!("0x2::coin::Coin<{}>", self.cfg.usdc_type)
    }

    /// The node's badge, which `sender` must own.
    fn node_badge(&self, sender: Address, node: NodeSmallId) -> Result<ObjRef> {
        if !self.view(|v| v.nodes.contains_key(&node))? {
            return Err(LedgerError::NodeNotFound(node));
        }
        self.badge_of(sender, "NodeBadge", node.0)
            .ok_or(LedgerError::NotNodeOwner { sender, node })
    }

    fn badge_of(&self, owner: Address, kind: &str, small_id: u64) -> Option<ObjRef> {
        self.owned(owner, &self.type_name(kind))
            .ok()?
            .into_iter()
            .find(|o| {
                bcs::from_bytes::<Badge>(&o.contents).is_ok_and(|b| b.small_id.inner == small_id)
            })
            .map(|o| o.obj)
    }

    fn manager_badge(&self, sender: Address) -> Result<ObjRef> {
        self.owned(sender, &self.type_name("AtomaManagerBadge"))?
            .first()
            .map(|o| o.obj)
            .ok_or_else(|| {
                LedgerError::Invalid(format!("{sender} does not hold the AtomaManagerBadge"))
            })
    }

    /// The sender's USDC coins, largest first: the first to pay with, the rest to merge in.
    fn usdc(&self, owner: Address) -> Result<(ObjRef, Vec<ObjRef>)> {
        let mut coins = self.owned(owner, &self.usdc_coin_type())?;
        coins.sort_by_key(|c| std::cmp::Reverse(c.balance.unwrap_or(0)));
        let mut it = coins.into_iter().map(|c| c.obj);
        let first = it.next().ok_or(LedgerError::InsufficientBalance {
            needed: 1,
            available: 0,
        })?;
        Ok((first, it.collect()))
    }

    // ------------------------------------------------------------------ submission

    /// Builds, signs and executes the call `make` returns for `sender`, once, however many
    /// times it must be sent; then ingests its events. `make` is re-run only after a refusal
    /// before execution (stale references).
    fn submit(
        &self,
        sender: Address,
        cx: AbortContext,
        make: impl Fn() -> Result<Call>,
    ) -> Result<Vec<LedgerEvent>> {
        let key = self
            .signers
            .get(sender)
            .ok_or_else(|| LedgerError::Invalid(format!("no key for {sender} in the keystore")))?
            .clone();
        let slot = lock(&self.senders).entry(sender).or_default().clone();
        let _serial = lock(&slot);
        let cx = AbortContext {
            sender: Some(sender),
            ..cx
        };
        let mut attempt = 0;
        let mut last_err = String::new();
        while attempt < MAX_ATTEMPTS {
            let call = make()?;
            let gas_coin = self
                .owned(sender, GAS_COIN_TYPE)?
                .into_iter()
                .max_by_key(|c| c.balance.unwrap_or(0))
                .ok_or_else(|| LedgerError::Invalid(format!("{sender} has no SUI for gas")))?;
            let mut client = self.client.clone();
            let price = self.block(rpc::gas_price(&mut client))?;
            let gas = Gas {
                coin: gas_coin.obj,
                price,
                budget: self.cfg.gas_budget,
            };
            let tx = build(&self.contract, &call, key.sui_address(), &gas)
                .map_err(LedgerError::Invalid)?;
            let sig = key.sign(&tx).map_err(LedgerError::Invalid)?;
            // Resend this exact transaction while the failure is transient.
            loop {
                attempt += 1;
                let sent = self.block(rpc::execute(&mut client, &tx, &sig, self.cfg.timeout));
                match sent {
                    Ok(done) => {
                        let out = rpc::outcome(&done, &cx);
                        self.sync()?;
                        return out;
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        tracing::debug!(digest = %tx.digest(), "stale object reference: {}", s.message());
                        last_err = s.message().to_string();
                        break;
                    }
                    Err(s) if transient(s.code()) && attempt < MAX_ATTEMPTS => {
                        tracing::warn!(digest = %tx.digest(), "sending again after: {}", s.message());
                        std::thread::sleep(backoff(attempt));
                    }
                    Err(s) if transient(s.code()) => {
                        return Err(LedgerError::Unavailable(format!(
                            "transaction {} not confirmed after {attempt} attempts: {}",
                            tx.digest(),
                            s.message()
                        )));
                    }
                    Err(s) => {
                        return Err(LedgerError::Invalid(format!(
                            "the chain refused the transaction: {}",
                            s.message()
                        )));
                    }
                }
            }
        }
        Err(LedgerError::Unavailable(format!(
            "gave up after {MAX_ATTEMPTS} attempts: {last_err}"
        )))
    }

    fn node_call(
        &self,
        sender: Address,
        node: NodeSmallId,
        cx: AbortContext,
        make: impl Fn(ObjRef) -> Call,
    ) -> Result<Vec<LedgerEvent>> {
        let cx = AbortContext {
            node: Some(node),
            ..cx
        };
        self.submit(sender, cx, || Ok(make(self.node_badge(sender, node)?)))
    }

    fn ticket_after(&self, stack: StackSmallId) -> Result<SettlementTicket> {
        self.ticket(stack)?.ok_or(LedgerError::NoTicket(stack))
    }
}

impl Drop for SuiLedger {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn stack_cx(stack: StackSmallId) -> AbortContext {
    AbortContext {
        stack: Some(stack),
        ..AbortContext::default()
    }
}

impl Ledger for SuiLedger {
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
        self.node(id)
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
        let mut t = self.task(id)?;
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
        self.node_call(sender, node, cx, |b| Call::subscribe(b, task.0, price.0))?;
        self.view(|v| v.subscriptions.get(&(task, node)).cloned())?
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
        self.node_call(sender, node, cx, |b| {
            Call::update_subscription(b, task.0, price.0)
        })?;
        self.view(|v| v.subscriptions.get(&(task, node)).cloned())?
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
        self.stack(id)
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
        self.node_call(sender, node, AbortContext::default(), |b| {
            let (coin, merge) = self.usdc(sender).unwrap_or((b, Vec::new()));
            Call::deposit_collateral(b, coin, &merge, amount.0)
        })?;
        Ok(self.node(node)?.collateral)
    }

    fn withdraw_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount> {
        self.extended("collateral withdrawals")?;
        self.node_call(sender, node, AbortContext::default(), |b| {
            Call::withdraw_collateral(b, amount.0)
        })?;
        Ok(self.node(node)?.collateral)
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
        match self.cfg.flavor {
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
        self.ticket_after(stack)
    }

    fn submit_stack_settlement_attestation(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        proof: Hash32,
    ) -> Result<SettlementTicket> {
        self.node_call(sender, node, stack_cx(stack), |b| {
            Call::attest(b, stack.0, &proof.0, &proof.0)
        })?;
        self.ticket_after(stack)
    }

    fn start_attestation_dispute(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claim: &DisputeClaim,
    ) -> Result<Dispute> {
        let commitment = claim.attestation_commitment.0;
        match self.cfg.flavor {
            Flavor::Extended => self.node_call(sender, node, stack_cx(stack), |b| {
                Call::dispute_at(b, stack.0, &commitment, claim.record, claim.position)
            })?,
            Flavor::Deployed => self.node_call(sender, node, stack_cx(stack), |b| {
                Call::dispute(b, stack.0, &commitment)
            })?,
        };
        self.dispute(stack)?.ok_or(LedgerError::NoDispute(stack))
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
        self.submit(sender, stack_cx(stack), || {
            Ok(Call::expire_dispute_oracle(stack.0))
        })?;
        self.dispute(stack)?.ok_or(LedgerError::NoDispute(stack))
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
