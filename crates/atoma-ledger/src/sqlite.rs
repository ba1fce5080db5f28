//! The embedded ledger on SQLite: one file in the node's data directory (or memory for tests).
//!
//! Every operation is one `BEGIN IMMEDIATE` transaction, so concurrent writers (threads here, or
//! several devnet processes on one file, through WAL and a busy timeout) serialize and a refused
//! operation leaves no trace. The "randomness" that samples a stack's node is Blake2b-256 of a
//! per-ledger secret and the stack id: unpredictable to buyers, reproducible from the file.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Mutex;

use blake2::{Blake2b, Digest, digest::consts::U32};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::events::{EventCursor, EventRecord, LedgerEvent};
use crate::types::*;
use crate::{Ledger, LedgerError, Result};

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, badge_id TEXT NOT NULL,
  reputation INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS node_models (
  node_small_id INTEGER NOT NULL REFERENCES nodes(small_id), model_name TEXT NOT NULL,
  echelon_id INTEGER NOT NULL, PRIMARY KEY (node_small_id, model_name));
CREATE TABLE IF NOT EXISTS tasks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, role INTEGER NOT NULL,
  model_name TEXT, security_level INTEGER NOT NULL, min_reputation INTEGER NOT NULL,
  is_public INTEGER NOT NULL, is_deprecated INTEGER NOT NULL DEFAULT 0,
  whitelist TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS subscriptions (
  task_small_id INTEGER NOT NULL REFERENCES tasks(small_id),
  node_small_id INTEGER NOT NULL REFERENCES nodes(small_id),
  price INTEGER NOT NULL, max_units INTEGER NOT NULL, PRIMARY KEY (task_small_id, node_small_id));
CREATE TABLE IF NOT EXISTS stacks (
  small_id INTEGER PRIMARY KEY AUTOINCREMENT, stack_id TEXT NOT NULL, owner TEXT NOT NULL,
  task_small_id INTEGER NOT NULL REFERENCES tasks(small_id),
  selected_node_id INTEGER NOT NULL REFERENCES nodes(small_id),
  num_compute_units INTEGER NOT NULL, price INTEGER NOT NULL, escrowed INTEGER NOT NULL,
  is_claimed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS balances (
  address TEXT PRIMARY KEY, amount INTEGER NOT NULL CHECK (amount >= 0));
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, body TEXT NOT NULL);
";

/// The embedded SQLite ledger.
#[derive(Debug)]
pub struct SqliteLedger {
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| LedgerError::Invalid(format!("{what} {v} is too large")))
}

impl SqliteLedger {
    /// Opens (creating if needed) the ledger file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| LedgerError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        Self::init(conn)
    }

    /// A fresh ledger in memory (tests).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(db_err)?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('seed', ?1), ('fee_treasury', 0)",
            params![seed as i64],
        )
        .map_err(db_err)?;
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

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn object_id(tx: &Connection, kind: &str, n: u64) -> Result<String> {
    let seed = meta(tx, "seed")?;
    let d = digest(&[kind.as_bytes(), &n.to_le_bytes(), &seed.to_le_bytes()]);
    Ok(Address(d).to_string())
}

fn meta(c: &Connection, key: &str) -> Result<i64> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(db_err)
}

fn emit(tx: &Connection, ev: &LedgerEvent) -> Result<()> {
    let body = serde_json::to_string(ev).map_err(|e| LedgerError::Storage(e.to_string()))?;
    tx.execute(
        "INSERT INTO events (name, body) VALUES (?1, ?2)",
        params![ev.name(), body],
    )
    .map_err(db_err)?;
    Ok(())
}

fn get_node(c: &Connection, id: NodeSmallId) -> Result<Node> {
    c.query_row(
        "SELECT owner, badge_id, reputation, disabled FROM nodes WHERE small_id = ?1",
        [id.0 as i64],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
            ))
        },
    )
    .optional()
    .map_err(db_err)?
    .map(|(owner, badge_id, rep, disabled)| {
        Ok(Node {
            small_id: id,
            owner: owner.parse().map_err(LedgerError::Storage)?,
            badge_id,
            reputation_score: u8::try_from(rep).unwrap_or(0),
            is_disabled: disabled,
        })
    })
    .ok_or(LedgerError::NodeNotFound(id))?
}

fn owned_node(c: &Connection, sender: Address, id: NodeSmallId) -> Result<Node> {
    let node = get_node(c, id)?;
    if node.owner != sender {
        return Err(LedgerError::NotNodeOwner { sender, node: id });
    }
    Ok(node)
}

fn get_task(c: &Connection, id: TaskSmallId) -> Result<Task> {
    let row = c
        .query_row(
            "SELECT role, model_name, security_level, min_reputation, is_public, is_deprecated, \
             whitelist FROM tasks WHERE small_id = ?1",
            [id.0 as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?
        .ok_or(LedgerError::TaskNotFound(id))?;
    let bad = |what: &str| LedgerError::Storage(format!("task {id}: corrupt {what}"));
    Ok(Task {
        small_id: id,
        role: TaskRole::from_code(row.0 as u16).ok_or_else(|| bad("role"))?,
        model_name: row.1,
        security_level: SecurityLevel::from_code(row.2 as u16).ok_or_else(|| bad("level"))?,
        minimum_reputation_score: row.3 as u8,
        is_public: row.4,
        is_deprecated: row.5,
        whitelist: serde_json::from_str(&row.6).map_err(|_| bad("whitelist"))?,
    })
}

fn get_subscription(
    c: &Connection,
    task: TaskSmallId,
    node: NodeSmallId,
) -> Result<Option<Subscription>> {
    c.query_row(
        "SELECT price, max_units FROM subscriptions WHERE task_small_id = ?1 AND node_small_id = ?2",
        params![task.0 as i64, node.0 as i64],
        |r| {
            Ok(Subscription {
                task_small_id: task,
                node_small_id: node,
                price_per_one_million_compute_units: Amount(r.get::<_, i64>(0)? as u64),
                max_num_compute_units: ComputeUnits(r.get::<_, i64>(1)? as u64),
            })
        },
    )
    .optional()
    .map_err(db_err)
}

fn balance_of(c: &Connection, who: Address) -> Result<u64> {
    Ok(c.query_row(
        "SELECT amount FROM balances WHERE address = ?1",
        [who.to_string()],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map_err(db_err)?
    .unwrap_or(0) as u64)
}

impl Ledger for SqliteLedger {
    fn register_node(&self, sender: Address) -> Result<Node> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO nodes (owner, badge_id, reputation) VALUES (?1, '', ?2)",
                params![sender.to_string(), i64::from(REPUTATION_SCORE_START)],
            )
            .map_err(db_err)?;
            let id = NodeSmallId(tx.last_insert_rowid() as u64);
            let badge_id = object_id(tx, "node-badge", id.0)?;
            tx.execute(
                "UPDATE nodes SET badge_id = ?1 WHERE small_id = ?2",
                params![badge_id, id.0 as i64],
            )
            .map_err(db_err)?;
            emit(
                tx,
                &LedgerEvent::NodeRegisteredEvent {
                    badge_id,
                    node_small_id: id,
                    sender,
                },
            )?;
            get_node(tx, id)
        })
    }

    fn add_node_to_model(
        &self,
        sender: Address,
        node: NodeSmallId,
        model_name: &str,
        echelon_id: u64,
    ) -> Result<()> {
        if model_name.is_empty() {
            return Err(LedgerError::Invalid("the model name is empty".into()));
        }
        self.write(|tx| {
            owned_node(tx, sender, node)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO node_models VALUES (?1, ?2, ?3)",
                    params![node.0 as i64, model_name, to_i64(echelon_id, "echelon")?],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(LedgerError::AlreadyInEchelon {
                    node,
                    model: model_name.to_string(),
                });
            }
            emit(
                tx,
                &LedgerEvent::NodeSubscribedToModelEvent {
                    node_small_id: node,
                    model_name: model_name.to_string(),
                    echelon_id,
                },
            )
        })
    }

    fn create_task(&self, _sender: Address, t: &NewTask) -> Result<Task> {
        if t.minimum_reputation_score > 100 {
            return Err(LedgerError::Invalid(
                "minimum reputation score must be at most 100".into(),
            ));
        }
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tasks (task_id, role, model_name, security_level, min_reputation, \
                 is_public) VALUES ('', ?1, ?2, ?3, ?4, ?5)",
                params![
                    t.role.code(),
                    t.model_name,
                    t.security_level.code(),
                    t.minimum_reputation_score,
                    t.is_public
                ],
            )
            .map_err(db_err)?;
            let id = TaskSmallId(tx.last_insert_rowid() as u64);
            let task_id = object_id(tx, "task", id.0)?;
            tx.execute(
                "UPDATE tasks SET task_id = ?1 WHERE small_id = ?2",
                params![task_id, id.0 as i64],
            )
            .map_err(db_err)?;
            emit(
                tx,
                &LedgerEvent::TaskRegisteredEvent {
                    task_id,
                    task_small_id: id,
                    role: t.role,
                    model_name: t.model_name.clone(),
                    security_level: t.security_level,
                    minimum_reputation_score: Some(t.minimum_reputation_score),
                },
            )?;
            get_task(tx, id)
        })
    }

    fn whitelist_nodes_for_task(&self, task: TaskSmallId, nodes: &[NodeSmallId]) -> Result<()> {
        self.write(|tx| {
            let mut t = get_task(tx, task)?;
            if t.is_public {
                return Err(LedgerError::Invalid(format!(
                    "task {task} is public; whitelists apply to private tasks"
                )));
            }
            for n in nodes {
                get_node(tx, *n)?;
                if !t.whitelist.contains(n) {
                    t.whitelist.push(*n);
                }
            }
            let list = serde_json::to_string(&t.whitelist)
                .map_err(|e| LedgerError::Storage(e.to_string()))?;
            tx.execute(
                "UPDATE tasks SET whitelist = ?1 WHERE small_id = ?2",
                params![list, task.0 as i64],
            )
            .map_err(db_err)?;
            Ok(())
        })
    }

    fn deprecate_task(&self, task: TaskSmallId) -> Result<()> {
        self.write(|tx| {
            get_task(tx, task)?;
            tx.execute(
                "UPDATE tasks SET is_deprecated = 1 WHERE small_id = ?1",
                [task.0 as i64],
            )
            .map_err(db_err)?;
            let task_id: String = tx
                .query_row(
                    "SELECT task_id FROM tasks WHERE small_id = ?1",
                    [task.0 as i64],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            emit(
                tx,
                &LedgerEvent::TaskDeprecationEvent {
                    task_id,
                    task_small_id: task,
                    epoch: 0,
                },
            )
        })
    }

    fn subscribe_node_to_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        if price.0 == 0 {
            return Err(LedgerError::Invalid("the price must be positive".into()));
        }
        self.write(|tx| {
            let n = owned_node(tx, sender, node)?;
            let t = get_task(tx, task)?;
            if t.is_deprecated {
                return Err(LedgerError::TaskDeprecated(task));
            }
            if n.reputation_score < t.minimum_reputation_score {
                return Err(LedgerError::ReputationTooLow {
                    node,
                    task,
                    have: n.reputation_score,
                    need: t.minimum_reputation_score,
                });
            }
            if !t.is_public && !t.whitelist.contains(&node) {
                return Err(LedgerError::NotWhitelisted { task, node });
            }
            if get_subscription(tx, task, node)?.is_some() {
                return Err(LedgerError::AlreadySubscribed { task, node });
            }
            let sub = Subscription {
                task_small_id: task,
                node_small_id: node,
                price_per_one_million_compute_units: price,
                max_num_compute_units: COMPUTE_UNITS_PER_STACK,
            };
            tx.execute(
                "INSERT INTO subscriptions VALUES (?1, ?2, ?3, ?4)",
                params![
                    task.0 as i64,
                    node.0 as i64,
                    to_i64(price.0, "price")?,
                    sub.max_num_compute_units.0 as i64
                ],
            )
            .map_err(db_err)?;
            emit(
                tx,
                &LedgerEvent::NodeSubscribedToTaskEvent {
                    task_small_id: task,
                    node_small_id: node,
                    price_per_one_million_compute_units: price,
                    max_num_compute_units: sub.max_num_compute_units,
                },
            )?;
            Ok(sub)
        })
    }

    fn update_node_subscription(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
        price: Amount,
    ) -> Result<Subscription> {
        if price.0 == 0 {
            return Err(LedgerError::Invalid("the price must be positive".into()));
        }
        self.write(|tx| {
            owned_node(tx, sender, node)?;
            let mut sub =
                get_subscription(tx, task, node)?.ok_or(LedgerError::NotSubscribed { task, node })?;
            sub.price_per_one_million_compute_units = price;
            tx.execute(
                "UPDATE subscriptions SET price = ?1 WHERE task_small_id = ?2 AND node_small_id = ?3",
                params![to_i64(price.0, "price")?, task.0 as i64, node.0 as i64],
            )
            .map_err(db_err)?;
            emit(
                tx,
                &LedgerEvent::NodeSubscriptionUpdatedEvent {
                    task_small_id: task,
                    node_small_id: node,
                    price_per_one_million_compute_units: price,
                    max_num_compute_units: sub.max_num_compute_units,
                },
            )?;
            Ok(sub)
        })
    }

    fn unsubscribe_node_from_task(
        &self,
        sender: Address,
        node: NodeSmallId,
        task: TaskSmallId,
    ) -> Result<()> {
        self.write(|tx| {
            owned_node(tx, sender, node)?;
            let n = tx
                .execute(
                    "DELETE FROM subscriptions WHERE task_small_id = ?1 AND node_small_id = ?2",
                    params![task.0 as i64, node.0 as i64],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(LedgerError::NotSubscribed { task, node });
            }
            emit(
                tx,
                &LedgerEvent::NodeUnsubscribedFromTaskEvent {
                    task_small_id: task,
                    node_small_id: node,
                },
            )
        })
    }

    fn acquire_stack(&self, buyer: Address, req: &StackRequest) -> Result<Stack> {
        let units = req.num_compute_units;
        if units.0 == 0 {
            return Err(LedgerError::Invalid(
                "a stack needs at least one compute unit".into(),
            ));
        }
        if req.price_per_one_million_compute_units.0 == 0 {
            return Err(LedgerError::Invalid("the price must be positive".into()));
        }
        self.write(|tx| {
            let task = get_task(tx, req.task_small_id)?;
            if task.is_deprecated {
                return Err(LedgerError::TaskDeprecated(task.small_id));
            }
            let price = req.price_per_one_million_compute_units;
            let fee = task
                .security_level
                .stack_fee(price, units)
                .ok_or_else(|| LedgerError::Invalid("the stack's fee overflows".into()))?;
            let mut stmt = tx
                .prepare(
                    "SELECT s.node_small_id FROM subscriptions s JOIN nodes n \
                     ON n.small_id = s.node_small_id WHERE s.task_small_id = ?1 \
                     AND s.price <= ?2 AND s.max_units >= ?3 AND n.disabled = 0 \
                     ORDER BY s.node_small_id",
                )
                .map_err(db_err)?;
            let eligible: Vec<u64> = stmt
                .query_map(
                    params![
                        task.small_id.0 as i64,
                        to_i64(price.0, "price")?,
                        to_i64(units.0, "units")?
                    ],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(db_err)?
                .map(|r| r.map(|v| v as u64))
                .collect::<std::result::Result<_, _>>()
                .map_err(db_err)?;
            if eligible.is_empty() {
                return Err(LedgerError::NoEligibleNodes {
                    task: task.small_id,
                    units: units.0,
                    price: price.0,
                });
            }
            let available = balance_of(tx, buyer)?;
            if available < fee.0 {
                return Err(LedgerError::InsufficientBalance {
                    needed: fee.0,
                    available,
                });
            }
            tx.execute(
                "UPDATE balances SET amount = amount - ?1 WHERE address = ?2",
                params![fee.0 as i64, buyer.to_string()],
            )
            .map_err(db_err)?;
            tx.execute(
                "UPDATE meta SET value = value + ?1 WHERE key = 'fee_treasury'",
                [fee.0 as i64],
            )
            .map_err(db_err)?;
            let next: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(small_id), 0) + 1 FROM stacks",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            let seed = meta(tx, "seed")?;
            let roll = digest(&[b"stack-node", &next.to_le_bytes(), &seed.to_le_bytes()]);
            let pick = u64::from_le_bytes(roll[..8].try_into().unwrap_or_default());
            let selected = NodeSmallId(eligible[(pick % eligible.len() as u64) as usize]);
            let stack_id = object_id(tx, "stack", next as u64)?;
            tx.execute(
                "INSERT INTO stacks (small_id, stack_id, owner, task_small_id, selected_node_id, \
                 num_compute_units, price, escrowed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    next,
                    stack_id,
                    buyer.to_string(),
                    task.small_id.0 as i64,
                    selected.0 as i64,
                    units.0 as i64,
                    price.0 as i64,
                    fee.0 as i64
                ],
            )
            .map_err(db_err)?;
            let stack = Stack {
                small_id: StackSmallId(next as u64),
                stack_id: stack_id.clone(),
                owner: buyer,
                task_small_id: task.small_id,
                selected_node_id: selected,
                num_compute_units: units,
                price_per_one_million_compute_units: price,
                escrowed: fee,
                is_claimed: false,
            };
            emit(
                tx,
                &LedgerEvent::StackCreatedEvent {
                    stack_id,
                    stack_small_id: stack.small_id,
                    owner: buyer,
                    task_small_id: task.small_id,
                    selected_node_id: selected,
                    num_compute_units: units,
                    price_per_one_million_compute_units: price,
                },
            )?;
            Ok(stack)
        })
    }

    fn faucet(&self, to: Address, amount: Amount) -> Result<Amount> {
        let add = to_i64(amount.0, "amount")?;
        self.write(|tx| {
            let now = balance_of(tx, to)?;
            let new = now
                .checked_add(amount.0)
                .filter(|v| i64::try_from(*v).is_ok())
                .ok_or_else(|| LedgerError::Invalid("the balance would overflow".into()))?;
            tx.execute(
                "INSERT INTO balances (address, amount) VALUES (?1, ?2) \
                 ON CONFLICT(address) DO UPDATE SET amount = amount + ?2",
                params![to.to_string(), add],
            )
            .map_err(db_err)?;
            Ok(Amount(new))
        })
    }

    fn balance(&self, who: Address) -> Result<Amount> {
        self.read(|c| balance_of(c, who).map(Amount))
    }

    fn fee_treasury(&self) -> Result<Amount> {
        self.read(|c| meta(c, "fee_treasury").map(|v| Amount(v as u64)))
    }

    fn node(&self, id: NodeSmallId) -> Result<Node> {
        self.read(|c| get_node(c, id))
    }

    fn nodes_of(&self, owner: Address) -> Result<Vec<Node>> {
        self.read(|c| {
            let mut stmt = c
                .prepare("SELECT small_id FROM nodes WHERE owner = ?1 ORDER BY small_id")
                .map_err(db_err)?;
            let ids: Vec<i64> = stmt
                .query_map([owner.to_string()], |r| r.get(0))
                .map_err(db_err)?
                .collect::<std::result::Result<_, _>>()
                .map_err(db_err)?;
            ids.into_iter()
                .map(|id| get_node(c, NodeSmallId(id as u64)))
                .collect()
        })
    }

    fn task(&self, id: TaskSmallId) -> Result<Task> {
        self.read(|c| get_task(c, id))
    }

    fn stack(&self, id: StackSmallId) -> Result<Stack> {
        self.read(|c| {
            c.query_row(
                "SELECT stack_id, owner, task_small_id, selected_node_id, num_compute_units, \
                 price, escrowed, is_claimed FROM stacks WHERE small_id = ?1",
                [id.0 as i64],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, bool>(7)?,
                    ))
                },
            )
            .optional()
            .map_err(db_err)?
            .ok_or(LedgerError::StackNotFound(id))
            .and_then(|r| {
                Ok(Stack {
                    small_id: id,
                    stack_id: r.0,
                    owner: r.1.parse().map_err(LedgerError::Storage)?,
                    task_small_id: TaskSmallId(r.2 as u64),
                    selected_node_id: NodeSmallId(r.3 as u64),
                    num_compute_units: ComputeUnits(r.4 as u64),
                    price_per_one_million_compute_units: Amount(r.5 as u64),
                    escrowed: Amount(r.6 as u64),
                    is_claimed: r.7,
                })
            })
        })
    }

    fn subscriptions(&self, task: TaskSmallId) -> Result<Vec<Subscription>> {
        self.read(|c| {
            get_task(c, task)?;
            let mut stmt = c
                .prepare(
                    "SELECT node_small_id FROM subscriptions WHERE task_small_id = ?1 \
                     ORDER BY node_small_id",
                )
                .map_err(db_err)?;
            let nodes: Vec<i64> = stmt
                .query_map([task.0 as i64], |r| r.get(0))
                .map_err(db_err)?
                .collect::<std::result::Result<_, _>>()
                .map_err(db_err)?;
            nodes
                .into_iter()
                .filter_map(|n| get_subscription(c, task, NodeSmallId(n as u64)).transpose())
                .collect()
        })
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
}
