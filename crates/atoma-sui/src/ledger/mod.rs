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

use atoma_ledger::{Address, LedgerError, LedgerEvent, NodeSmallId, Result, Stack};
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

mod ops;

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

    /// The stack a purchase transaction created, read from the transaction itself (what the
    /// reference does with `X-Tx-Digest` when its event subscriber lags); `None` if that
    /// transaction created none. The event index is brought up to date too, so the stack is
    /// then known to every read.
    pub fn stack_bought_in(&self, digest: &str) -> Result<Option<Stack>> {
        let mut client = self.client.clone();
        let mut req = proto::GetTransactionRequest::default();
        req.digest = Some(digest.to_string());
        req.read_mask = Some(
            <prost_types::FieldMask as sui_rpc::field::FieldMaskUtil>::from_str(
                "digest,effects.status,events,checkpoint",
            ),
        );
        let t = self
            .block(async move { client.ledger_client().get_transaction(req).await })
            .map_err(|s| match s.code() {
                Code::NotFound | Code::InvalidArgument => {
                    LedgerError::Invalid(format!("transaction {digest}: {}", s.message()))
                }
                _ => LedgerError::Unavailable(format!("GetTransaction: {}", s.message())),
            })?
            .into_inner()
            .transaction
            .unwrap_or_default();
        let events = rpc::outcome(&t, &AbortContext::default())?;
        let Some(id) = events.iter().find_map(|e| match e {
            LedgerEvent::StackCreatedEvent { stack_small_id, .. } => Some(*stack_small_id),
            _ => None,
        }) else {
            return Ok(None);
        };
        // The index catching up is a bonus (one try, no backoff: a request waits on this):
        // when the event list is down or behind, the transaction's own events still show it.
        if let Err(e) = self.sync_with(1) {
            tracing::debug!(error = %e, "the event index cannot catch up; reading the transaction");
        }
        if let Some(s) = lock(&self.view).stacks.get(&id) {
            return Ok(Some(s.clone()));
        }
        // The chain's event list has not reached it yet: the transaction's own event says.
        let mut view = lock(&self.view).clone();
        for e in &events {
            view.apply(view.seq, Address([0; 32]), e);
        }
        Ok(view.stacks.get(&id).cloned())
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
        self.sync_with(MAX_ATTEMPTS)
    }

    /// `sync`, giving up after `attempts` failed pages in a row.
    fn sync_with(&self, attempts: u32) -> Result<u64> {
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
                    if failures >= attempts {
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
                        // The transaction is done: a failure to catch the index up now must not
                        // read as a failed operation (a caller would do it again).
                        if let Err(e) = self.sync() {
                            tracing::warn!(digest = %tx.digest(), "executed; the event index will catch up: {e}");
                        }
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

    /// What `f` reads after a transaction: from the view if the index caught up, else from
    /// the view with the transaction's own events applied (no read that can fail after a
    /// write that succeeded).
    fn after<T>(&self, events: &[LedgerEvent], f: impl Fn(&View) -> Option<T>) -> Option<T> {
        let view = lock(&self.view);
        if let Some(x) = f(&view) {
            return Some(x);
        }
        let mut v = view.clone();
        drop(view);
        for e in events {
            v.apply(v.seq, Address([0; 32]), e);
        }
        f(&v)
    }
}

impl Drop for SuiLedger {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
