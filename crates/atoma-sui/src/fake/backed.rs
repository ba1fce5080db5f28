//! `FakeBacked`: a [`SuiLedger`] talking to a [`FakeSui`] over loopback gRPC, with the test-only
//! operations (faucet, epochs, money totals, parameters) answered by the test double directly,
//! so the ledger conformance suite can run against the real client.

use std::sync::Arc;

use atoma_crypto::Keypair;
use atoma_ledger::*;

use super::{FakeSui, default_ids};
use crate::keys::Signers;
use crate::{Flavor, SuiConfig, SuiLedger};

/// The key of actor `n` in tests: the secret `[n; 32]` (never for real money).
pub fn actor_key(n: u8) -> Keypair {
    Keypair::from_secret([n.max(1); 32])
}

/// Actor `n`'s address (`conformance::use_actors`).
pub fn actor(n: u8) -> Address {
    Address(actor_key(n).address())
}

#[derive(Debug)]
pub struct FakeBacked {
    pub ledger: SuiLedger,
    pub fake: Arc<FakeSui>,
}

impl FakeBacked {
    /// A fresh test double (admins: actors 9 and 99, as the conformance suite creates tasks
    /// and sets parameters as them) and a client holding the keys of actors 1..=255, its index
    /// in memory.
    pub fn start(flavor: Flavor) -> Result<Self> {
        let fake = FakeSui::start(default_ids(actor(9)), SqliteLedger::in_memory()?, 0)
            .map_err(|e| LedgerError::Storage(e.to_string()))?;
        fake.issue_manager_badge(actor(99));
        Self::connect(Arc::new(fake), flavor, None)
    }

    /// A client of a running test double, its index at `index_path` (`None`: in memory),
    /// holding the keys of actors 1..=255.
    pub fn connect(
        fake: Arc<FakeSui>,
        flavor: Flavor,
        index_path: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let mut signers = Signers::default();
        for n in 1..=255u8 {
            signers.insert(&actor_key(n));
        }
        Self::with_signers(fake, flavor, index_path, signers)
    }

    /// A client of a running test double signing with `signers`.
    pub fn with_signers(
        fake: Arc<FakeSui>,
        flavor: Flavor,
        index_path: Option<std::path::PathBuf>,
        signers: Signers,
    ) -> Result<Self> {
        let ids = fake.ids();
        let cfg = SuiConfig {
            rpc_url: fake.url(),
            package_id: ids.package,
            original_package_id: ids.package,
            atoma_db: ids.db,
            usdc_type: ids.usdc_type.clone(),
            gas_budget: 50_000_000,
            index_path,
            admin: Some(Address(ids.admin.into_inner())),
            flavor,
            timeout: std::time::Duration::from_secs(10),
        };
        let ledger = SuiLedger::connect(cfg, signers)?;
        Ok(Self { ledger, fake })
    }
}

impl Ledger for FakeBacked {
    fn register_node(&self, s: Address) -> Result<Node> {
        self.ledger.register_node(s)
    }
    fn set_node_public_url(&self, s: Address, n: NodeSmallId, url: &str) -> Result<()> {
        self.ledger.set_node_public_url(s, n, url)
    }
    fn nodes(&self) -> Result<Vec<Node>> {
        self.ledger.nodes()
    }
    fn tasks(&self) -> Result<Vec<Task>> {
        self.ledger.tasks()
    }
    fn add_node_to_model(&self, s: Address, n: NodeSmallId, m: &str, e: u64) -> Result<()> {
        self.ledger.add_node_to_model(s, n, m, e)
    }
    fn create_task(&self, s: Address, t: &NewTask) -> Result<Task> {
        self.ledger.create_task(s, t)
    }
    fn whitelist_nodes_for_task(&self, t: TaskSmallId, n: &[NodeSmallId]) -> Result<()> {
        self.ledger.whitelist_nodes_for_task(t, n)
    }
    fn deprecate_task(&self, t: TaskSmallId) -> Result<()> {
        self.ledger.deprecate_task(t)
    }
    fn subscribe_node_to_task(
        &self,
        s: Address,
        n: NodeSmallId,
        t: TaskSmallId,
        p: Amount,
    ) -> Result<Subscription> {
        self.ledger.subscribe_node_to_task(s, n, t, p)
    }
    fn update_node_subscription(
        &self,
        s: Address,
        n: NodeSmallId,
        t: TaskSmallId,
        p: Amount,
    ) -> Result<Subscription> {
        self.ledger.update_node_subscription(s, n, t, p)
    }
    fn unsubscribe_node_from_task(&self, s: Address, n: NodeSmallId, t: TaskSmallId) -> Result<()> {
        self.ledger.unsubscribe_node_from_task(s, n, t)
    }
    fn acquire_stack(&self, b: Address, r: &StackRequest) -> Result<Stack> {
        self.ledger.acquire_stack(b, r)
    }
    fn faucet(&self, to: Address, amount: Amount) -> Result<Amount> {
        self.fake.faucet(to, amount)
    }
    fn balance(&self, who: Address) -> Result<Amount> {
        self.ledger.balance(who)
    }
    fn fee_treasury(&self) -> Result<Amount> {
        self.fake.with_ledger(|l| l.fee_treasury())
    }
    fn node(&self, id: NodeSmallId) -> Result<Node> {
        self.ledger.node(id)
    }
    fn nodes_of(&self, owner: Address) -> Result<Vec<Node>> {
        self.ledger.nodes_of(owner)
    }
    fn task(&self, id: TaskSmallId) -> Result<Task> {
        self.ledger.task(id)
    }
    fn stack(&self, id: StackSmallId) -> Result<Stack> {
        self.ledger.stack(id)
    }
    fn subscriptions(&self, t: TaskSmallId) -> Result<Vec<Subscription>> {
        self.ledger.subscriptions(t)
    }
    fn events_after(&self, c: EventCursor, limit: usize) -> Result<Vec<EventRecord>> {
        self.ledger.events_after(c, limit)
    }
    fn stack_in_transaction(&self, digest: &str) -> Result<Option<Stack>> {
        self.ledger.stack_in_transaction(digest)
    }
    fn epoch(&self) -> Result<u64> {
        self.ledger.epoch()
    }
    fn advance_epoch(&self) -> Result<u64> {
        self.fake.advance_epoch()
    }
    fn params(&self) -> Result<LedgerParams> {
        self.fake.with_ledger(|l| l.params())
    }
    fn set_params(&self, s: Address, p: &LedgerParams) -> Result<()> {
        self.ledger.set_params(s, p)
    }
    fn deposit_collateral(&self, s: Address, n: NodeSmallId, a: Amount) -> Result<Amount> {
        self.ledger.deposit_collateral(s, n, a)
    }
    fn withdraw_collateral(&self, s: Address, n: NodeSmallId, a: Amount) -> Result<Amount> {
        self.ledger.withdraw_collateral(s, n, a)
    }
    fn try_settle_stack(
        &self,
        s: Address,
        n: NodeSmallId,
        st: StackSmallId,
        u: ComputeUnits,
        c: &StackCommitment,
    ) -> Result<SettlementTicket> {
        self.ledger.try_settle_stack(s, n, st, u, c)
    }
    fn submit_stack_settlement_attestation(
        &self,
        s: Address,
        n: NodeSmallId,
        st: StackSmallId,
        p: Hash32,
    ) -> Result<SettlementTicket> {
        self.ledger.submit_stack_settlement_attestation(s, n, st, p)
    }
    fn start_attestation_dispute(
        &self,
        s: Address,
        n: NodeSmallId,
        st: StackSmallId,
        c: &DisputeClaim,
    ) -> Result<Dispute> {
        self.ledger.start_attestation_dispute(s, n, st, c)
    }
    fn resolve_attestation_dispute(
        &self,
        s: Address,
        o: NodeSmallId,
        st: StackSmallId,
        honest: bool,
    ) -> Result<DisputeResolution> {
        self.ledger.resolve_attestation_dispute(s, o, st, honest)
    }
    fn expire_dispute_oracle(&self, s: Address, st: StackSmallId) -> Result<Dispute> {
        self.ledger.expire_dispute_oracle(s, st)
    }
    fn dispute(&self, st: StackSmallId) -> Result<Option<Dispute>> {
        self.ledger.dispute(st)
    }
    fn claim_funds(
        &self,
        s: Address,
        n: NodeSmallId,
        st: &[StackSmallId],
    ) -> Result<Vec<ClaimOutcome>> {
        self.ledger.claim_funds(s, n, st)
    }
    fn claim_funds_for_stacks(
        &self,
        s: Address,
        n: NodeSmallId,
        c: &[(StackSmallId, ComputeUnits)],
    ) -> Result<Vec<ClaimOutcome>> {
        self.ledger.claim_funds_for_stacks(s, n, c)
    }
    fn close_expired_stack(&self, s: Address, st: StackSmallId) -> Result<Amount> {
        self.ledger.close_expired_stack(s, st)
    }
    fn ticket(&self, st: StackSmallId) -> Result<Option<SettlementTicket>> {
        self.ledger.ticket(st)
    }
    fn open_tickets_of(&self, n: NodeSmallId) -> Result<Vec<SettlementTicket>> {
        self.ledger.open_tickets_of(n)
    }
    fn totals(&self) -> Result<MoneyTotals> {
        self.fake.totals()
    }
}
