//! A Sui **test double** on loopback: a gRPC server built on `sui-rpc`'s generated server
//! traits that accepts real signed transactions, checks their signatures and input objects as a
//! validator would, executes the `db` entry functions on the embedded ledger's semantics, bumps
//! object versions, and emits the module's events in their on-chain BCS layout (extended).
//!
//! It is not a Sui node: no Move VM, no consensus, no gas charged, one transaction per
//! checkpoint. Its value is that everything on our side of the wire (transaction building,
//! signing, object resolution, effects and event decoding, the durable cursor) is the real
//! client talking the real protocol.
//!
//! Faults can be injected ([`Faults`]): unavailability, slowness, an event stream dropped
//! mid-page, and test-only operations (faucet, epoch) are direct calls ([`FakeSui`]).

mod backed;
mod exec;
mod service;
pub mod state;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};

use atoma_ledger::{Address, Amount, Ledger, MoneyTotals, SqliteLedger};
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_rpc::proto::sui::rpc::v2::ledger_service_server::LedgerServiceServer;
use sui_rpc::proto::sui::rpc::v2::state_service_server::StateServiceServer;
use sui_rpc::proto::sui::rpc::v2::subscription_service_server::SubscriptionServiceServer;
use sui_rpc::proto::sui::rpc::v2::transaction_execution_service_server::TransactionExecutionServiceServer;
use sui_sdk_types::Address as SuiAddress;
use tokio::sync::{broadcast, oneshot};

pub use backed::{FakeBacked, actor, actor_key};
pub use state::ChainIds;
use state::State;

/// Faults the test double injects on request.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every call answers `Unavailable`.
    pub unavailable: AtomicBool,
    /// Every call waits this long first.
    pub delay_ms: AtomicU64,
    /// The next ListEvents stream breaks (`Unavailable`) after this many events (0: never).
    pub drop_events_after: AtomicUsize,
    /// The next this many ListOwnedObjects answers report every object one version behind (a
    /// lagging full node): a transaction built from them is refused as stale.
    pub stale_reads: AtomicUsize,
    /// ExecuteTransaction waits this long before executing (to kill a client mid-transaction).
    pub execute_delay_ms: AtomicU64,
    /// ExecuteTransaction requests received so far.
    pub executes_received: AtomicUsize,
    /// ListEvents answers `Unavailable` while set (an indexer that lags behind execution).
    pub list_events_unavailable: AtomicBool,
}

#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    checkpoints: broadcast::Sender<proto::Checkpoint>,
    pub faults: Faults,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a half-applied step; the test has failed anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn ledger_epoch(&self) -> Option<u64> {
        self.ledger.epoch().ok()
    }
}

/// The running test double.
#[derive(Debug)]
pub struct FakeSui {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Deterministic ids for the fake chain's fixed objects.
pub fn default_ids(admin: Address) -> ChainIds {
    let id = |tag: &str| SuiAddress::new(atoma_crypto::blake2b256(tag.as_bytes()));
    ChainIds {
        package: id("atoma test double: package"),
        db: id("atoma test double: AtomaDb"),
        db_initial_shared_version: 3,
        random_initial_shared_version: 1,
        manager_badge: id("atoma test double: AtomaManagerBadge"),
        admin: SuiAddress::new(admin.0),
        usdc_type: format!("{}::usdc::USDC", id("atoma test double: usdc")),
        chain_id: "atoma-test-double".into(),
    }
}

impl FakeSui {
    /// Starts the test double on `127.0.0.1:port` (0: any free port) with its own runtime
    /// thread, over `ledger` (the state the `db` functions act on).
    pub fn start(ids: ChainIds, ledger: SqliteLedger, port: u16) -> std::io::Result<Self> {
        let (tx, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(ids, ledger)),
            checkpoints: tx,
            faults: Faults::default(),
        });
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = service::Service(shared.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("sui-fake")
            .build()?;
        let thread = std::thread::Builder::new()
            .name("sui-fake".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("sui test double: {e}");
                            return;
                        }
                    };
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let served = tonic::transport::Server::builder()
                        .add_service(LedgerServiceServer::new(svc.clone()))
                        .add_service(StateServiceServer::new(svc.clone()))
                        .add_service(TransactionExecutionServiceServer::new(svc.clone()))
                        .add_service(SubscriptionServiceServer::new(svc))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stop_rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!("sui test double stopped: {e}");
                    }
                });
            })?;
        Ok(Self {
            addr,
            shared,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The URL a client connects to (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ids(&self) -> ChainIds {
        self.shared.lock().ids.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Test-only: mints USDC to `to` (its coin's value follows).
    pub fn faucet(&self, to: Address, amount: Amount) -> atoma_ledger::Result<Amount> {
        let mut s = self.shared.lock();
        s.ensure_account(SuiAddress::new(to.0));
        s.ledger.faucet(to, amount)
    }

    /// Test-only: the next epoch.
    pub fn advance_epoch(&self) -> atoma_ledger::Result<u64> {
        self.shared.lock().ledger.advance_epoch()
    }

    /// Test-only: the money on the books.
    pub fn totals(&self) -> atoma_ledger::Result<MoneyTotals> {
        self.shared.lock().ledger.totals()
    }

    /// Runs `f` on the embedded ledger (for checks a test makes behind the wire).
    pub fn with_ledger<R>(&self, f: impl FnOnce(&SqliteLedger) -> R) -> R {
        f(&self.shared.lock().ledger)
    }

    /// Test-only: registers `n` nodes for `owner` straight on the embedded ledger and puts
    /// their events on the chain as one synthetic transaction (for ingestion benchmarks).
    pub fn register_nodes_directly(&self, owner: Address, n: usize) -> atoma_ledger::Result<()> {
        let mut s = self.shared.lock();
        for _ in 0..n {
            s.ledger.register_node(owner)?;
        }
        let cp = s.checkpoint + 1;
        let digest = sui_sdk_types::Digest::new(atoma_crypto::blake2b256(&cp.to_le_bytes()));
        s.drain_events(SuiAddress::new(owner.0), &digest.to_string(), cp);
        s.checkpoint = cp;
        Ok(())
    }

    /// Test-only: gives `to` an `AtomaManagerBadge` (as the package's publisher does with
    /// `create_manager_badge_entry` and a transfer).
    pub fn issue_manager_badge(&self, to: Address) {
        let mut seed = b"atoma test double: manager badge of ".to_vec();
        seed.extend_from_slice(&to.0);
        let id = SuiAddress::new(atoma_crypto::blake2b256(&seed));
        let mut s = self.shared.lock();
        if !s.objects.contains_key(&id) {
            s.insert(
                id,
                state::ObjKind::ManagerBadge,
                state::ObjOwner::Address(SuiAddress::new(to.0)),
                1,
            );
        }
    }

    /// Transactions refused because an input object's version was stale.
    pub fn stale_refusals(&self) -> u64 {
        self.shared.lock().stale_refusals
    }

    /// The digest of the transaction executed last.
    pub fn last_transaction_digest(&self) -> Option<String> {
        let s = self.shared.lock();
        s.txs
            .iter()
            .max_by_key(|(_, t)| t.checkpoint)
            .map(|(d, _)| d.clone())
    }

    /// Number of events on the chain.
    pub fn event_count(&self) -> usize {
        self.shared.lock().events.len()
    }
}

impl Drop for FakeSui {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
