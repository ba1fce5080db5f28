//! The embedded ledger on SQLite: one file in the node's data directory (or memory for tests).
//!
//! Every operation is one `BEGIN IMMEDIATE` transaction, so concurrent writers (threads here, or
//! several devnet processes on one file, through WAL and a busy timeout) serialize and a refused
//! operation leaves no trace. The "randomness" that samples a stack's node and its attestors is
//! Blake2b-256 of a per-ledger secret and the object's id: unpredictable to buyers and nodes,
//! reproducible from the file.
//!
//! Submodules: `market` (nodes, tasks, subscriptions, stacks), `money` (accounts, transfers,
//! collateral, totals), `settle` (tickets, attestations, claims, expiry, reputation), `dispute`
//! (oracles, resolution, slashing and shares, oracle timeouts).

mod dispute;
mod market;
mod money;
mod settle;

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Mutex;

use blake2::{Blake2b, Digest, digest::consts::U32};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::events::{EventCursor, EventRecord, LedgerEvent};
use crate::settlement::*;
use crate::types::*;
use crate::{Ledger, LedgerError, Result};

/// Schema version in `PRAGMA user_version`; files of versions 1 (before settlement) and 2
/// (before public URLs) migrate.
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, badge_id TEXT NOT NULL,
  reputation INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,
  collateral INTEGER NOT NULL DEFAULT 0 CHECK (collateral >= 0),
  settled_on_time INTEGER NOT NULL DEFAULT 0, attestations_made INTEGER NOT NULL DEFAULT 0,
  attestations_missed INTEGER NOT NULL DEFAULT 0, disputes_lost INTEGER NOT NULL DEFAULT 0,
  public_url TEXT);
CREATE TABLE IF NOT EXISTS node_models (
  node_small_id INTEGER NOT NULL REFERENCES nodes(small_id), model_name TEXT NOT NULL,
  echelon_id INTEGER NOT NULL, PRIMARY KEY (node_small_id, model_name));
CREATE TABLE IF NOT EXISTS tasks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, role INTEGER NOT NULL,
  model_name TEXT, security_level INTEGER NOT NULL, min_reputation INTEGER NOT NULL,
  is_public INTEGER NOT NULL, is_deprecated INTEGER NOT NULL DEFAULT 0,
  whitelist TEXT NOT NULL DEFAULT '[]', min_collateral INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS subscriptions (
  task_small_id INTEGER NOT NULL REFERENCES tasks(small_id),
  node_small_id INTEGER NOT NULL REFERENCES nodes(small_id),
  price INTEGER NOT NULL, max_units INTEGER NOT NULL, PRIMARY KEY (task_small_id, node_small_id));
CREATE TABLE IF NOT EXISTS stacks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, stack_id TEXT NOT NULL, owner TEXT NOT NULL,
  task_small_id INTEGER NOT NULL REFERENCES tasks(small_id),
  selected_node_id INTEGER NOT NULL REFERENCES nodes(small_id),
  num_compute_units INTEGER NOT NULL, price INTEGER NOT NULL, escrowed INTEGER NOT NULL,
  is_claimed INTEGER NOT NULL DEFAULT 0,
  escrow_left INTEGER NOT NULL DEFAULT 0 CHECK (escrow_left >= 0),
  created_epoch INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS balances (
  address TEXT PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount >= 0));
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (
  stack_small_id INTEGER PRIMARY KEY REFERENCES stacks(small_id),
  selected_node_id INTEGER NOT NULL, claimed_units INTEGER NOT NULL,
  merkle_root TEXT NOT NULL, leaf_count INTEGER NOT NULL, blob_id TEXT NOT NULL,
  blob_hash TEXT NOT NULL, blob_size INTEGER NOT NULL, created_epoch INTEGER NOT NULL,
  window_end INTEGER NOT NULL,
  in_dispute INTEGER NOT NULL DEFAULT 0, claimed INTEGER NOT NULL DEFAULT 0,
  sample_seed TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS ticket_attestors (
  stack_small_id INTEGER NOT NULL REFERENCES tickets(stack_small_id),
  node_small_id INTEGER NOT NULL, position INTEGER NOT NULL, attested_seq INTEGER,
  PRIMARY KEY (stack_small_id, node_small_id));
CREATE TABLE IF NOT EXISTS disputes (
  stack_small_id INTEGER PRIMARY KEY REFERENCES tickets(stack_small_id),
  attestor INTEGER NOT NULL, commitment TEXT NOT NULL, opened_epoch INTEGER NOT NULL,
  record INTEGER, position INTEGER, oracle INTEGER, drawn TEXT NOT NULL DEFAULT '[]',
  deadline INTEGER NOT NULL DEFAULT 0, outcome TEXT);
CREATE TABLE IF NOT EXISTS journal (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, debit TEXT NOT NULL,
  credit TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0));
";

/// Columns added by version 2, for files written before it.
const MIGRATE_V1: &[&str] = &[
    "ALTER TABLE nodes ADD COLUMN collateral INTEGER NOT NULL DEFAULT 0 CHECK (collateral >= 0)",
    "ALTER TABLE nodes ADD COLUMN settled_on_time INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE nodes ADD COLUMN attestations_made INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE nodes ADD COLUMN attestations_missed INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE nodes ADD COLUMN disputes_lost INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN min_collateral INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE stacks ADD COLUMN escrow_left INTEGER NOT NULL DEFAULT 0 CHECK (escrow_left >= 0)",
    "ALTER TABLE stacks ADD COLUMN created_epoch INTEGER NOT NULL DEFAULT 0",
    "UPDATE stacks SET escrow_left = escrowed WHERE is_claimed = 0",
    "INSERT OR REPLACE INTO meta (key, value) SELECT 'minted', \
     COALESCE((SELECT SUM(amount) FROM balances), 0) + COALESCE((SELECT SUM(escrow_left) FROM stacks), 0)",
    "DELETE FROM meta WHERE key = 'fee_treasury'",
];

/// The embedded SQLite ledger.
#[derive(Debug)]
pub struct SqliteLedger {
    conn: Mutex<Connection>,
}

pub(super) fn db_err(e: rusqlite::Error) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

pub(super) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| LedgerError::Invalid(format!("{what} {v} is too large")))
}

impl SqliteLedger {
    /// Opens (creating if needed) the ledger file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| LedgerError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        Self::init(conn)
    }

    /// A fresh ledger in memory (tests).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(db_err)?)
    }

    /// Opens `path` and, if the ledger is new, sets `params` (an existing ledger keeps its own).
    pub fn open_with(path: &Path, params: &LedgerParams) -> Result<Self> {
        let l = Self::open(path)?;
        l.write(|tx| {
            let set: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM config WHERE key = 'params')",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if !set {
                store_params(tx, params)?;
            }
            Ok(())
        })?;
        Ok(l)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err)?;
        let old: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'stacks')",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if old && version < 3 {
            tx.execute_batch("ALTER TABLE nodes ADD COLUMN public_url TEXT")
                .map_err(|e| LedgerError::Storage(format!("migrating the ledger file: {e}")))?;
        }
        if old && version < 2 {
            for stmt in MIGRATE_V1 {
                tx.execute_batch(stmt)
                    .map_err(|e| LedgerError::Storage(format!("migrating the ledger file: {e}")))?;
            }
        }
        tx.execute_batch(SCHEMA).map_err(db_err)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err)?;
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('seed', ?1), ('minted', 0), \
             ('treasury', 0), ('epoch_offset', 0), ('epoch_base_ms', ?2)",
            params![seed as i64, now_ms()],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` in one immediate transaction, committed only if it succeeds.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| LedgerError::Storage("a previous writer panicked".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let out = f(&tx)?;
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| LedgerError::Storage("a previous writer panicked".into()))?;
        f(&conn)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A uniform-enough 64-bit draw for `label` and `ids`, from the ledger's secret seed.
pub(super) fn draw(c: &Connection, label: &str, ids: &[u64]) -> Result<u64> {
    let seed = meta(c, "seed")?;
    let mut bytes = Vec::with_capacity(8 * (ids.len() + 1));
    bytes.extend_from_slice(&seed.to_le_bytes());
    for i in ids {
        bytes.extend_from_slice(&i.to_le_bytes());
    }
    let d = digest(&[label.as_bytes(), &bytes]);
    Ok(u64::from_le_bytes(d[..8].try_into().unwrap_or_default()))
}

pub(super) fn object_id(tx: &Connection, kind: &str, n: u64) -> Result<String> {
    let seed = meta(tx, "seed")?;
    let d = digest(&[kind.as_bytes(), &n.to_le_bytes(), &seed.to_le_bytes()]);
    Ok(Address(d).to_string())
}

pub(super) fn meta(c: &Connection, key: &str) -> Result<i64> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(db_err)
}

pub(super) fn set_meta(c: &Connection, key: &str, value: i64) -> Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn emit(tx: &Connection, ev: &LedgerEvent) -> Result<()> {
    let body = serde_json::to_string(ev).map_err(|e| LedgerError::Storage(e.to_string()))?;
    tx.execute(
        "INSERT INTO events (name, body) VALUES (?1, ?2)",
        params![ev.name(), body],
    )
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn load_params(c: &Connection) -> Result<LedgerParams> {
    let text: Option<String> = c
        .query_row("SELECT value FROM config WHERE key = 'params'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db_err)?;
    match text {
        None => Ok(LedgerParams::default()),
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| LedgerError::Storage(format!("corrupt ledger parameters: {e}"))),
    }
}

fn store_params(c: &Connection, p: &LedgerParams) -> Result<()> {
    p.validate().map_err(LedgerError::Invalid)?;
    let text = serde_json::to_string(p).map_err(|e| LedgerError::Storage(e.to_string()))?;
    c.execute(
        "INSERT INTO config (key, value) VALUES ('params', ?1) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [text],
    )
    .map_err(db_err)?;
    Ok(())
}

/// The epoch: explicit advances plus, when `epoch_ms > 0`, whole epochs of wall-clock time
/// since the clock was last rebased.
pub(super) fn current_epoch(c: &Connection) -> Result<u64> {
    let p = load_params(c)?;
    let offset = meta(c, "epoch_offset")? as u64;
    if p.epoch_ms == 0 {
        return Ok(offset);
    }
    let base = meta(c, "epoch_base_ms")?;
    let elapsed = (now_ms() - base).max(0) as u64;
    Ok(offset + elapsed / p.epoch_ms)
}

impl Ledger for SqliteLedger {
    fn register_node(&self, sender: Address) -> Result<Node> {
        self.write(|tx| market::register_node(tx, sender))
    }

    fn add_node_to_model(
        &self,
        sender: Address,
        node: NodeSmallId,
        model_name: &str,
        echelon_id: u64,
    ) -> Result<()> {
        self.write(|tx| market::add_node_to_model(tx, sender, node, model_name, echelon_id))
    }

    fn set_node_public_url(&self, sender: Address, node: NodeSmallId, url: &str) -> Result<()> {
        self.write(|tx| market::set_node_public_url(tx, sender, node, url))
    }

    fn nodes(&self) -> Result<Vec<Node>> {
        self.read(|c| {
            market::ids(c, "SELECT small_id FROM nodes ORDER BY small_id", [])?
                .into_iter()
                .map(|id| market::get_node(c, NodeSmallId(id)))
                .collect()
        })
    }

    fn tasks(&self) -> Result<Vec<Task>> {
        self.read(|c| {
            market::ids(c, "SELECT small_id FROM tasks ORDER BY small_id", [])?
                .into_iter()
                .map(|id| market::get_task(c, TaskSmallId(id)))
                .collect()
        })
    }

    fn create_task(&self, _sender: Address, t: &NewTask) -> Result<Task> {
        self.write(|tx| market::create_task(tx, t))
    }

    fn whitelist_nodes_for_task(&self, task: TaskSmallId, nodes: &[NodeSmallId]) -> Result<()> {
        self.write(|tx| market::whitelist_nodes_for_task(tx, task, nodes))
    }

    fn deprecate_task(&self, task: TaskSmallId) -> Result<()> {
        self.write(|tx| market::deprecate_task(tx, task))
    }

    fn subscribe_node_to_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        self.write(|tx| market::subscribe_node_to_task(tx, sender, node, task, price))
    }

    fn update_node_subscription(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        self.write(|tx| market::update_node_subscription(tx, sender, node, task, price))
    }

    fn unsubscribe_node_from_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
    ) -> Result<()> {
        self.write(|tx| market::unsubscribe_node_from_task(tx, sender, node, task))
    }

    fn acquire_stack(&self, buyer: Address, req: &StackRequest) -> Result<Stack> {
        self.write(|tx| market::acquire_stack(tx, buyer, req))
    }

    fn faucet(&self, to: Address, amount: Amount) -> Result<Amount> {
        self.write(|tx| money::faucet(tx, to, amount))
    }

    fn balance(&self, who: Address) -> Result<Amount> {
        self.read(|c| money::balance_of(c, who).map(Amount))
    }

    fn fee_treasury(&self) -> Result<Amount> {
        self.read(|c| money::totals(c).map(|t| Amount(t.escrow as u64)))
    }

    fn node(&self, id: NodeSmallId) -> Result<Node> {
        self.read(|c| market::get_node(c, id))
    }

    fn nodes_of(&self, owner: Address) -> Result<Vec<Node>> {
        self.read(|c| market::nodes_of(c, owner))
    }

    fn task(&self, id: TaskSmallId) -> Result<Task> {
        self.read(|c| market::get_task(c, id))
    }

    fn stack(&self, id: StackSmallId) -> Result<Stack> {
        self.read(|c| market::get_stack(c, id))
    }

    fn subscriptions(&self, task: TaskSmallId) -> Result<Vec<Subscription>> {
        self.read(|c| market::subscriptions(c, task))
    }

    fn events_after(&self, cursor: EventCursor, limit: usize) -> Result<Vec<EventRecord>> {
        self.read(|c| {
            let mut stmt = c
                .prepare("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .map_err(db_err)?;
            let rows: Vec<(i64, String)> = stmt
                .query_map(
                    params![to_i64(cursor.0, "cursor")?, limit.min(10_000) as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(db_err)?
                .collect::<std::result::Result<_, _>>()
                .map_err(db_err)?;
            rows.into_iter()
                .map(|(seq, body)| {
                    Ok(EventRecord {
                        seq: seq as u64,
                        event: serde_json::from_str(&body)
                            .map_err(|e| LedgerError::Storage(format!("event {seq}: {e}")))?,
                    })
                })
                .collect()
        })
    }

    fn epoch(&self) -> Result<u64> {
        self.read(current_epoch)
    }

    fn advance_epoch(&self) -> Result<u64> {
        self.write(|tx| {
            tx.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'epoch_offset'",
                [],
            )
            .map_err(db_err)?;
            current_epoch(tx)
        })
    }

    fn params(&self) -> Result<LedgerParams> {
        self.read(load_params)
    }

    fn set_params(&self, _sender: Address, p: &LedgerParams) -> Result<()> {
        self.write(|tx| {
            let old = load_params(tx)?;
            if old.epoch_ms != p.epoch_ms {
                // Keep the current epoch; count the new length from now.
                let now = current_epoch(tx)?;
                set_meta(tx, "epoch_offset", to_i64(now, "epoch")?)?;
                set_meta(tx, "epoch_base_ms", now_ms())?;
            }
            store_params(tx, p)?;
            emit(
                tx,
                &LedgerEvent::LedgerParamsUpdatedEvent { params: p.clone() },
            )
        })
    }

    fn deposit_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount> {
        self.write(|tx| money::deposit_collateral(tx, sender, node, amount))
    }

    fn withdraw_collateral(
        &self,
        sender: Address,
        node: NodeSmallId,
        amount: Amount,
    ) -> Result<Amount> {
        self.write(|tx| money::withdraw_collateral(tx, sender, node, amount))
    }

    fn try_settle_stack(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claimed: ComputeUnits,
        commitment: &StackCommitment,
    ) -> Result<SettlementTicket> {
        self.write(|tx| settle::try_settle_stack(tx, sender, node, stack, claimed, commitment))
    }

    fn submit_stack_settlement_attestation(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        proof: Hash32,
    ) -> Result<SettlementTicket> {
        self.write(|tx| settle::attest(tx, sender, node, stack, proof))
    }

    fn start_attestation_dispute(
        &self,
        sender: Address,
        node: NodeSmallId,
        stack: StackSmallId,
        claim: &DisputeClaim,
    ) -> Result<Dispute> {
        self.write(|tx| settle::start_dispute(tx, sender, node, stack, claim))
    }

    fn resolve_attestation_dispute(
        &self,
        sender: Address,
        oracle: NodeSmallId,
        stack: StackSmallId,
        node_was_honest: bool,
    ) -> Result<DisputeResolution> {
        self.write(|tx| dispute::resolve(tx, sender, oracle, stack, node_was_honest))
    }

    fn expire_dispute_oracle(&self, sender: Address, stack: StackSmallId) -> Result<Dispute> {
        self.write(|tx| dispute::expire_oracle(tx, sender, stack))
    }

    fn dispute(&self, stack: StackSmallId) -> Result<Option<Dispute>> {
        self.read(|c| dispute::get_dispute(c, stack))
    }

    fn claim_funds(
        &self,
        sender: Address,
        node: NodeSmallId,
        stacks: &[StackSmallId],
    ) -> Result<Vec<ClaimOutcome>> {
        self.write(|tx| settle::claim_funds(tx, sender, node, stacks))
    }

    fn claim_funds_for_stacks(
        &self,
        sender: Address,
        node: NodeSmallId,
        claims: &[(StackSmallId, ComputeUnits)],
    ) -> Result<Vec<ClaimOutcome>> {
        self.write(|tx| settle::claim_confidential(tx, sender, node, claims))
    }

    fn close_expired_stack(&self, sender: Address, stack: StackSmallId) -> Result<Amount> {
        self.write(|tx| settle::close_expired_stack(tx, sender, stack))
    }

    fn ticket(&self, stack: StackSmallId) -> Result<Option<SettlementTicket>> {
        self.read(|c| settle::get_ticket(c, stack))
    }

    fn open_tickets_of(&self, node: NodeSmallId) -> Result<Vec<SettlementTicket>> {
        self.read(|c| settle::open_tickets_of(c, node))
    }

    fn totals(&self) -> Result<MoneyTotals> {
        self.read(money::totals)
    }
}
