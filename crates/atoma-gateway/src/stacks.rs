//! The stacks the gateway owns, in its own SQLite file: per stack its task, the node it was sold
//! to, its units and price, the units charged so far and those reserved by requests in flight.
//!
//! A request leases units on a stack sold to the node it is routed to; the lease is settled to
//! the units the node reports (or released on failure, and given back if dropped). When no
//! stack for that node has room, the gateway buys one with its ledger key. The ledger samples
//! the node among those subscribed at no more than the buyer's price, so the gateway buys at
//! the chosen node's own price: only it and cheaper nodes can be sampled, and a stack that
//! lands on another node is kept for that node. A node answering 423 has frozen the stack to
//! settle it: the stack is retired.
//!
//! Invariant (checked by tests): for every stack, `used + reserved <= units`, and the units
//! charged to API keys for a stack are exactly its `used`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use atoma_ledger::{
    Address, Amount, ComputeUnits, Ledger, LedgerError, StackRequest, StackSmallId, TaskSmallId,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Purchases one lease makes per node eligible at the chosen node's price: the ledger samples
/// uniformly among them, so `8 × eligible` purchases all miss with probability about `e^-8`.
pub const BUYS_PER_ELIGIBLE_NODE: usize = 8;
/// And never more than this many.
pub const MAX_BUYS: usize = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gw_stacks (
  small_id INTEGER PRIMARY KEY, task INTEGER NOT NULL, node INTEGER NOT NULL,
  units INTEGER NOT NULL, price INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0,
  reserved INTEGER NOT NULL DEFAULT 0, retired INTEGER NOT NULL DEFAULT 0,
  CHECK (used + reserved <= units AND used >= 0 AND reserved >= 0));
";

/// Why a lease could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("no stack could be bought on node {node} after {tries} purchases")]
    NotSold { node: u64, tries: usize },
    #[error("gateway storage: {0}")]
    Storage(String),
}

fn db(e: rusqlite::Error) -> StackError {
    StackError::Storage(e.to_string())
}

/// One of the gateway's stacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackRow {
    pub small_id: u64,
    pub task: u64,
    pub node: u64,
    pub units: u64,
    pub price: u64,
    pub used: u64,
    pub reserved: u64,
    pub retired: bool,
}

/// The gateway's stacks.
#[derive(Clone)]
pub struct StackBook {
    conn: Arc<Mutex<Connection>>,
    ledger: Arc<dyn Ledger>,
    owner: Address,
    stack_units: u64,
}

impl std::fmt::Debug for StackBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBook")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Units reserved on a stack for one request.
#[derive(Debug)]
pub struct Lease {
    book: StackBook,
    pub stack: StackSmallId,
    pub node: u64,
    /// The stack's price per million units: what the node is paid.
    pub price: u64,
    pub units: u64,
    done: bool,
}

impl StackBook {
    /// Opens the book in `path` (the gateway's file, see [`crate::books`]). Reservations left
    /// by a crash are released.
    pub fn open(
        path: &Path,
        ledger: Arc<dyn Ledger>,
        owner: Address,
        stack_units: u64,
    ) -> Result<Self, StackError> {
        Self::on(
            crate::books::open(path).map_err(db)?,
            ledger,
            owner,
            stack_units,
        )
    }

    /// A book in memory (tests).
    pub fn in_memory(
        ledger: Arc<dyn Ledger>,
        owner: Address,
        stack_units: u64,
    ) -> Result<Self, StackError> {
        Self::on(
            crate::books::in_memory().map_err(db)?,
            ledger,
            owner,
            stack_units,
        )
    }

    /// The book on the gateway's shared connection.
    pub fn on(
        conn: crate::books::Books,
        ledger: Arc<dyn Ledger>,
        owner: Address,
        stack_units: u64,
    ) -> Result<Self, StackError> {
        {
            let c = conn.lock().unwrap_or_else(|e| e.into_inner());
            c.execute_batch(SCHEMA).map_err(db)?;
            c.execute("UPDATE gw_stacks SET reserved = 0", [])
                .map_err(db)?;
        }
        Ok(Self {
            conn,
            ledger,
            owner,
            stack_units,
        })
    }

    fn with_tx<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StackError>,
    ) -> Result<T, StackError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let out = f(&tx)?;
        tx.commit().map_err(db)?;
        Ok(out)
    }

    /// Reserves `units` on a stack of `task` sold to `node` with room, if there is one.
    /// Reserves `units` on the cheapest stack of `task` sold to `node` at a price of at most
    /// `max_price`. Stacks bought dearer (for a dearer node, sold by the ledger to this one; or
    /// before the node lowered its price) are never used for it: the key would pay more than
    /// the node asks. They stay unused until they expire and their escrow comes back.
    fn reserve(
        &self,
        task: u64,
        node: u64,
        max_price: u64,
        units: u64,
    ) -> Result<Option<Lease>, StackError> {
        self.with_tx(|tx| {
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT small_id, price FROM gw_stacks WHERE task = ?1 AND node = ?2 \
                     AND retired = 0 AND price <= ?4 AND units - used - reserved >= ?3 \
                     ORDER BY price, small_id LIMIT 1",
                    params![task as i64, node as i64, units as i64, max_price as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db)?;
            let Some((id, price)) = row else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE gw_stacks SET reserved = reserved + ?1 WHERE small_id = ?2",
                params![units as i64, id],
            )
            .map_err(db)?;
            Ok(Some(Lease {
                book: self.clone(),
                stack: StackSmallId(id as u64),
                node,
                price: price as u64,
                units,
                done: false,
            }))
        })
    }

    /// A lease of `units` on a stack of `task` sold to `node`, buying stacks at `node_price`
    /// (blocking: ledger calls) when none has room; `eligible` nodes can be sampled at that
    /// price (the chosen one and any cheaper).
    pub fn lease(
        &self,
        task: TaskSmallId,
        node: u64,
        node_price: u64,
        units: u64,
        eligible: usize,
    ) -> Result<Lease, StackError> {
        if let Some(l) = self.reserve(task.0, node, node_price, units)? {
            return Ok(l);
        }
        let tries = (BUYS_PER_ELIGIBLE_NODE * eligible.max(1)).min(MAX_BUYS);
        for _ in 0..tries {
            let s = self.ledger.acquire_stack(
                self.owner,
                &StackRequest {
                    task_small_id: task,
                    num_compute_units: ComputeUnits(self.stack_units.max(units)),
                    price_per_one_million_compute_units: Amount(node_price),
                },
            )?;
            self.with_tx(|tx| {
                tx.execute(
                    "INSERT OR IGNORE INTO gw_stacks (small_id, task, node, units, price) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        s.small_id.0 as i64,
                        task.0 as i64,
                        s.selected_node_id.0 as i64,
                        s.num_compute_units.0 as i64,
                        s.price_per_one_million_compute_units.0 as i64
                    ],
                )
                .map_err(db)?;
                Ok(())
            })?;
            tracing::info!(stack = %s.small_id, node = %s.selected_node_id, wanted = node,
                           units = s.num_compute_units.0, "bought a stack");
            metrics::counter!("atoma_gateway_stacks_bought_total").increment(1);
            if let Some(l) = self.reserve(task.0, node, node_price, units)? {
                return Ok(l);
            }
        }
        Err(StackError::NotSold { node, tries })
    }

    /// Every stack of the book.
    pub fn rows(&self) -> Result<Vec<StackRow>, StackError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn
            .prepare(
                "SELECT small_id, task, node, units, price, used, reserved, retired \
                 FROM gw_stacks ORDER BY small_id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StackRow {
                    small_id: r.get::<_, i64>(0)? as u64,
                    task: r.get::<_, i64>(1)? as u64,
                    node: r.get::<_, i64>(2)? as u64,
                    units: r.get::<_, i64>(3)? as u64,
                    price: r.get::<_, i64>(4)? as u64,
                    used: r.get::<_, i64>(5)? as u64,
                    reserved: r.get::<_, i64>(6)? as u64,
                    retired: r.get(7)?,
                })
            })
            .map_err(db)?;
        rows.map(|r| r.map_err(db)).collect()
    }

    /// What the stacks' used units are worth to their nodes, in micro base units
    /// (`Σ used × price`).
    pub fn spend_micro(&self) -> Result<u128, StackError> {
        Ok(self
            .rows()?
            .iter()
            .map(|r| u128::from(r.used) * u128::from(r.price))
            .sum())
    }

    fn finish(&self, l: &Lease, used: Option<u64>, retire: bool) -> Result<(), StackError> {
        let used = used.unwrap_or(0).min(l.units);
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE gw_stacks SET reserved = reserved - ?1, used = used + ?2, \
                 retired = retired OR ?3 WHERE small_id = ?4",
                params![l.units as i64, used as i64, retire, l.stack.0 as i64],
            )
            .map_err(db)?;
            Ok(())
        })
    }
}

impl Lease {
    /// Charges `used` units (capped at the lease) and frees the rest.
    pub fn settle(mut self, used: u64) -> Result<u64, StackError> {
        self.done = true;
        self.book.finish(&self, Some(used), false)?;
        Ok(used.min(self.units))
    }

    /// Frees the lease: the request failed before the node charged anything.
    pub fn release(mut self) -> Result<(), StackError> {
        self.done = true;
        self.book.finish(&self, None, false)
    }

    /// The node refused the stack (423: it is settling it): never use it again.
    pub fn retire(mut self) -> Result<(), StackError> {
        self.done = true;
        self.book.finish(&self, None, true)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.book.finish(self, None, false)
        {
            tracing::error!(stack = %self.stack, error = %e, "cannot release a stack lease");
        }
    }
}
