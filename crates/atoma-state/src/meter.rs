//! Metering: the node's own, durable record of what each stack has spent.
//!
//! Before inference the node *reserves* the request's worst case (prompt tokens + max_tokens)
//! on the stack; afterwards it *settles* to the real usage, or *releases* everything on error.
//! Each of these is one SQLite transaction, so however many requests race on one stack, the
//! used units never exceed the stack's units, and the sum of settled usages is exactly what the
//! stack records. A `Reservation` that is dropped unsettled (client disconnect, panic, early
//! return) releases itself; a crash leaves rows in state `reserved`, which `recover` releases at
//! the next start, so no reservation stays stuck and no unit is counted twice.
//!
//! The same transaction that reserves also records the request's hash in the stack's request
//! log, keyed by (stack, hash): a captured signed request replayed by someone else finds its
//! hash taken and spends nothing. The transaction that settles stores the request's full log
//! record (`crate::log`), so a unit is charged if and only if its evidence is kept.
//!
//! A stack being settled is *frozen* (`crate::settlement`): reservations are refused from the
//! transaction that freezes it on, so its log is final once the requests in flight finish.

use std::path::Path;
use std::sync::{Arc, Mutex};

use atoma_ledger::{Address, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskRole};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stacks (
  small_id INTEGER PRIMARY KEY, owner TEXT NOT NULL, task_small_id INTEGER NOT NULL,
  selected_node_id INTEGER NOT NULL, num_compute_units INTEGER NOT NULL,
  price INTEGER NOT NULL, units_used INTEGER NOT NULL DEFAULT 0 CHECK (units_used >= 0),
  is_claimed INTEGER NOT NULL DEFAULT 0,
  CHECK (units_used <= num_compute_units));
CREATE TABLE IF NOT EXISTS tasks (small_id INTEGER PRIMARY KEY, model_name TEXT);
CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
INSERT OR IGNORE INTO cursor (id, seq) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS requests (
  stack_small_id INTEGER NOT NULL REFERENCES stacks(small_id), request_hash BLOB NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('reserved', 'settled')), reserved INTEGER NOT NULL,
  prompt_tokens INTEGER, completion_tokens INTEGER, response_hash BLOB,
  PRIMARY KEY (stack_small_id, request_hash));
";

/// Columns added after the first version, for state files written before them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("requests", "record", "BLOB"),
    ("requests", "settled_seq", "INTEGER"),
    ("stacks", "last_activity_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("stacks", "settle_state", "TEXT"),
    ("stacks", "settle_requested", "INTEGER NOT NULL DEFAULT 0"),
    ("stacks", "claimed_units", "INTEGER"),
    ("stacks", "merkle_root", "BLOB"),
    ("stacks", "leaf_count", "INTEGER"),
    ("stacks", "blob_id", "TEXT"),
    ("stacks", "blob_hash", "BLOB"),
    ("stacks", "blob_size", "INTEGER"),
    ("stacks", "window_end", "INTEGER"),
    ("stacks", "node_fee", "INTEGER"),
    ("attestations", "sample_seed", "TEXT NOT NULL DEFAULT ''"),
    // The task's role code (0: ChatCompletion, what every earlier task was).
    ("tasks", "role", "INTEGER NOT NULL DEFAULT 0"),
];

fn ensure_columns(conn: &Connection) -> Result<(), MeterError> {
    for (table, column, decl) in ADDED_COLUMNS {
        let present: bool = conn
            .query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"
                ),
                [column],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                .map_err(db)?;
        }
    }
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Why a reservation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeterError {
    #[error("stack {0} is unknown to this node")]
    UnknownStack(StackSmallId),
    #[error("the signer does not own stack {0}")]
    NotOwner(StackSmallId),
    #[error("stack {stack} was sold to node {selected}, not to this node")]
    WrongNode {
        stack: StackSmallId,
        selected: NodeSmallId,
    },
    #[error("stack {stack} is for model `{expected}`, not `{requested}`")]
    WrongModel {
        stack: StackSmallId,
        expected: String,
        requested: String,
    },
    #[error("stack {stack} was bought for a {role:?} task; {route} needs a {needed:?} task")]
    WrongRole {
        stack: StackSmallId,
        role: TaskRole,
        needed: TaskRole,
        route: String,
    },
    #[error("stack {0} is claimed")]
    Claimed(StackSmallId),
    #[error("stack {0} is being settled and takes no more requests; buy a new stack")]
    Settling(StackSmallId),
    #[error("stack {stack} has {left} compute units left, the request needs up to {needed}")]
    Exhausted {
        stack: StackSmallId,
        left: u64,
        needed: u64,
    },
    #[error("this signed request was already used on stack {0} (replay)")]
    Replay(StackSmallId),
    #[error("metering storage: {0}")]
    Storage(String),
}

/// Writes a stack's row: a new one as given; a known one keeps its row, except that
/// `claimed_follows` updates its claimed flag from `s`.
fn write_stack(
    tx: &rusqlite::Transaction<'_>,
    s: &Stack,
    claimed_follows: bool,
) -> Result<(), MeterError> {
    let conflict = if claimed_follows {
        "DO UPDATE SET is_claimed = excluded.is_claimed"
    } else {
        "DO NOTHING"
    };
    tx.execute(
        &format!(
            "INSERT INTO stacks (small_id, owner, task_small_id, selected_node_id, \
             num_compute_units, price, is_claimed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT(small_id) {conflict}"
        ),
        params![
            s.small_id.0 as i64,
            s.owner.to_string(),
            s.task_small_id.0 as i64,
            s.selected_node_id.0 as i64,
            s.num_compute_units.0 as i64,
            s.price_per_one_million_compute_units.0 as i64,
            s.is_claimed
        ],
    )
    .map_err(db)?;
    Ok(())
}

fn db(e: rusqlite::Error) -> MeterError {
    MeterError::Storage(e.to_string())
}

/// What `check_stack` reads.
struct StackRow {
    left: u64,
    task: StackTask,
}

/// The task a stack was bought for, as far as serving it matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTask {
    /// The task's model (`None`: any model the node serves).
    pub model: Option<String>,
    /// What the task does, which decides the routes a stack may use.
    pub role: TaskRole,
}

/// Per-stack accounting of one node, backed by SQLite.
#[derive(Debug, Clone)]
pub struct Meter {
    pub(crate) conn: Arc<Mutex<Connection>>,
    /// The node ids this node answers for.
    pub(crate) nodes: Arc<Vec<NodeSmallId>>,
}

/// A stack's current accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackUsage {
    pub num_compute_units: u64,
    pub units_used: u64,
    /// Units reserved by requests still running.
    pub units_reserved: u64,
    pub settled_requests: u64,
}

/// One entry of a stack's request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub request_hash: [u8; 32],
    pub response_hash: [u8; 32],
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Meter {
    /// Opens (creating) the metering store at `path`, releasing reservations left by a crash.
    pub fn open(path: &Path, nodes: Vec<NodeSmallId>) -> Result<Self, MeterError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        Self::init(conn, nodes)
    }

    /// Opens the store of a node that may be running (operator tools): no crash recovery, which
    /// would release the running node's reservations.
    pub fn attach(path: &Path, nodes: Vec<NodeSmallId>) -> Result<Self, MeterError> {
        if !path.is_file() {
            return Err(MeterError::Storage(format!(
                "{} does not exist (has the node run yet?)",
                path.display()
            )));
        }
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(crate::settlement::SCHEMA).map_err(db)?;
        ensure_columns(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            nodes: Arc::new(nodes),
        })
    }

    /// An in-memory store (tests).
    pub fn in_memory(nodes: Vec<NodeSmallId>) -> Result<Self, MeterError> {
        Self::init(Connection::open_in_memory().map_err(db)?, nodes)
    }

    fn init(conn: Connection, nodes: Vec<NodeSmallId>) -> Result<Self, MeterError> {
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(crate::settlement::SCHEMA).map_err(db)?;
        ensure_columns(&conn)?;
        let m = Self {
            conn: Arc::new(Mutex::new(conn)),
            nodes: Arc::new(nodes),
        };
        let released = m.recover()?;
        if released > 0 {
            tracing::warn!(
                released,
                "released reservations left by an unclean shutdown"
            );
        }
        Ok(m)
    }

    /// The node ids this node answers for.
    pub fn node_ids(&self) -> &[NodeSmallId] {
        &self.nodes
    }

    pub(crate) fn with_tx<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, MeterError>,
    ) -> Result<T, MeterError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let out = f(&tx)?;
        tx.commit().map_err(db)?;
        Ok(out)
    }

    /// The sequence number of the last ledger event applied.
    pub fn cursor(&self) -> Result<atoma_ledger::EventCursor, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let seq: i64 = conn
            .query_row("SELECT seq FROM cursor WHERE id = 0", [], |r| r.get(0))
            .map_err(db)?;
        Ok(atoma_ledger::EventCursor(seq as u64))
    }

    /// Applies ledger events (tasks, stacks sold to this node, claims) and advances the cursor,
    /// all in one transaction: after a crash the node resumes exactly after the last event it
    /// applied. Returns the new cursor.
    pub fn apply_ledger_events(
        &self,
        events: &[atoma_ledger::EventRecord],
    ) -> Result<atoma_ledger::EventCursor, MeterError> {
        use atoma_ledger::LedgerEvent as E;
        self.with_tx(|tx| {
            let mut seq: i64 = tx
                .query_row("SELECT seq FROM cursor WHERE id = 0", [], |r| r.get(0))
                .map_err(db)?;
            for rec in events {
                if rec.seq as i64 <= seq {
                    continue;
                }
                match &rec.event {
                    E::TaskRegisteredEvent {
                        task_small_id,
                        model_name,
                        role,
                        ..
                    } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO tasks (small_id, model_name, role) \
                             VALUES (?1, ?2, ?3)",
                            params![task_small_id.0 as i64, model_name, role.code()],
                        )
                        .map_err(db)?;
                    }
                    E::StackCreatedEvent {
                        stack_id: _,
                        stack_small_id,
                        owner,
                        task_small_id,
                        selected_node_id,
                        num_compute_units,
                        price_per_one_million_compute_units,
                    } if self.nodes.contains(selected_node_id) => {
                        tx.execute(
                            "INSERT OR IGNORE INTO stacks (small_id, owner, task_small_id, \
                             selected_node_id, num_compute_units, price) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![
                                stack_small_id.0 as i64,
                                owner.to_string(),
                                task_small_id.0 as i64,
                                selected_node_id.0 as i64,
                                num_compute_units.0 as i64,
                                price_per_one_million_compute_units.0 as i64
                            ],
                        )
                        .map_err(db)?;
                    }
                    other => crate::settlement::apply_event(tx, &self.nodes, other)?,
                }
                seq = rec.seq as i64;
            }
            tx.execute("UPDATE cursor SET seq = ?1 WHERE id = 0", [seq])
                .map_err(db)?;
            Ok(atoma_ledger::EventCursor(seq as u64))
        })
    }

    /// Records a stack sold to one of this node's ids that the ledger showed directly (the
    /// transaction that bought it) before its event reached the follower. Idempotent, and the
    /// same row the `StackCreatedEvent` would write (which is then ignored). Returns whether
    /// the stack is this node's.
    pub fn admit_stack(&self, s: &Stack) -> Result<bool, MeterError> {
        if !self.nodes.contains(&s.selected_node_id) {
            return Ok(false);
        }
        self.with_tx(|tx| write_stack(tx, s, false))?;
        Ok(true)
    }

    /// Records a ChatCompletion task's model learnt from the ledger (idempotent).
    pub fn upsert_task(
        &self,
        task: atoma_ledger::TaskSmallId,
        model_name: Option<&str>,
    ) -> Result<(), MeterError> {
        self.upsert_task_with_role(task, model_name, TaskRole::ChatCompletion)
    }

    /// Records a task's model and role learnt from the ledger (idempotent).
    pub fn upsert_task_with_role(
        &self,
        task: atoma_ledger::TaskSmallId,
        model_name: Option<&str>,
        role: TaskRole,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO tasks (small_id, model_name, role) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(small_id) DO UPDATE SET model_name = excluded.model_name, \
                 role = excluded.role",
                params![task.0 as i64, model_name, role.code()],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Records a stack learnt from the ledger (idempotent: events may be seen twice).
    pub fn upsert_stack(&self, s: &Stack) -> Result<(), MeterError> {
        self.with_tx(|tx| write_stack(tx, s, true))
    }

    /// Checks, reading only, that `signer` may spend `stack` on this node: the stack is known,
    /// owned by the signer, sold to this node, neither claimed nor being settled, and has units
    /// left. Returns the stack's task (its model, if it names one, and its role). The API calls
    /// this before it renders or tokenizes anything, so a key that owns no stack costs the node
    /// one indexed read, whatever the body; `reserve` checks everything again atomically.
    pub fn authorize(
        &self,
        stack: StackSmallId,
        signer: &Address,
    ) -> Result<StackTask, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let row = self.check_stack(&conn, stack, signer, None)?;
        if row.left == 0 {
            return Err(MeterError::Exhausted {
                stack,
                left: 0,
                needed: 1,
            });
        }
        Ok(row.task)
    }

    /// The stack's row after the checks every spend needs (owner, node, model, claimed,
    /// settling).
    fn check_stack(
        &self,
        conn: &Connection,
        stack: StackSmallId,
        signer: &Address,
        model: Option<&str>,
    ) -> Result<StackRow, MeterError> {
        let (owner, selected, total, used, claimed, task_model, settling, role) = conn
            .query_row(
                "SELECT s.owner, s.selected_node_id, s.num_compute_units, s.units_used, \
                 s.is_claimed, t.model_name, s.settle_state, t.role FROM stacks s \
                 LEFT JOIN tasks t ON t.small_id = s.task_small_id WHERE s.small_id = ?1",
                [stack.0 as i64],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, bool>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<u16>>(7)?,
                    ))
                },
            )
            .optional()
            .map_err(db)?
            .ok_or(MeterError::UnknownStack(stack))?;
        if owner.parse::<Address>().ok().as_ref() != Some(signer) {
            return Err(MeterError::NotOwner(stack));
        }
        let selected = NodeSmallId(selected as u64);
        if !self.nodes.contains(&selected) {
            return Err(MeterError::WrongNode { stack, selected });
        }
        if let (Some(expected), Some(requested)) = (&task_model, model)
            && expected != requested
        {
            return Err(MeterError::WrongModel {
                stack,
                expected: expected.clone(),
                requested: requested.to_string(),
            });
        }
        if claimed {
            return Err(MeterError::Claimed(stack));
        }
        if settling.is_some() {
            return Err(MeterError::Settling(stack));
        }
        // A task this node never heard of serves chat (as before roles were kept).
        let role = role
            .and_then(TaskRole::from_code)
            .unwrap_or(TaskRole::ChatCompletion);
        Ok(StackRow {
            left: (total - used) as u64,
            task: StackTask {
                model: task_model,
                role,
            },
        })
    }

    /// Reserves `units` on `stack` for the request whose signed body hashes to `request_hash`,
    /// signed by `signer`, asking for `model` (`None`: no check).
    pub fn reserve(
        &self,
        stack: StackSmallId,
        signer: &Address,
        request_hash: [u8; 32],
        units: ComputeUnits,
        model: Option<&str>,
    ) -> Result<Reservation, MeterError> {
        let units = units.0;
        self.with_tx(|tx| {
            let StackRow { left, .. } = self.check_stack(tx, stack, signer, model)?;
            if units > left {
                return Err(MeterError::Exhausted {
                    stack,
                    left,
                    needed: units,
                });
            }
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO requests (stack_small_id, request_hash, state, reserved) \
                     VALUES (?1, ?2, 'reserved', ?3)",
                    params![stack.0 as i64, &request_hash[..], units as i64],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(MeterError::Replay(stack));
            }
            tx.execute(
                "UPDATE stacks SET units_used = units_used + ?1, last_activity_ms = ?3 \
                 WHERE small_id = ?2",
                params![units as i64, stack.0 as i64, now_ms()],
            )
            .map_err(db)?;
            Ok(())
        })?;
        Ok(Reservation {
            meter: self.clone(),
            stack,
            request_hash,
            units,
            done: false,
        })
    }

    /// Current accounting of `stack`.
    pub fn usage(&self, stack: StackSmallId) -> Result<StackUsage, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let (total, used): (i64, i64) = conn
            .query_row(
                "SELECT num_compute_units, units_used FROM stacks WHERE small_id = ?1",
                [stack.0 as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?
            .ok_or(MeterError::UnknownStack(stack))?;
        let (reserved, settled): (i64, i64) = conn
            .query_row(
                "SELECT COALESCE(SUM(CASE WHEN state = 'reserved' THEN reserved END), 0), \
                 COUNT(CASE WHEN state = 'settled' THEN 1 END) FROM requests \
                 WHERE stack_small_id = ?1",
                [stack.0 as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db)?;
        Ok(StackUsage {
            num_compute_units: total as u64,
            units_used: used as u64,
            units_reserved: reserved as u64,
            settled_requests: settled as u64,
        })
    }

    /// The settled requests of `stack`, for settlement and attestation.
    pub fn request_log(&self, stack: StackSmallId) -> Result<Vec<LoggedRequest>, MeterError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| MeterError::Storage("a previous user panicked".into()))?;
        let mut stmt = conn
            .prepare(
                "SELECT request_hash, response_hash, prompt_tokens, completion_tokens FROM requests \
                 WHERE stack_small_id = ?1 AND state = 'settled' ORDER BY settled_seq",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([stack.0 as i64], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(db)?;
        rows.map(|r| {
            let (req, resp, p, c) = r.map_err(db)?;
            let arr = |v: Vec<u8>| -> Result<[u8; 32], MeterError> {
                v.try_into()
                    .map_err(|_| MeterError::Storage("corrupt hash in the request log".into()))
            };
            Ok(LoggedRequest {
                request_hash: arr(req)?,
                response_hash: arr(resp)?,
                prompt_tokens: p as u64,
                completion_tokens: c as u64,
            })
        })
        .collect()
    }

    /// Releases every reservation still open (after a crash). Returns how many.
    pub fn recover(&self) -> Result<usize, MeterError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE stacks SET units_used = units_used - (SELECT COALESCE(SUM(reserved), 0) \
                 FROM requests WHERE requests.stack_small_id = stacks.small_id \
                 AND state = 'reserved')",
                [],
            )
            .map_err(db)?;
            tx.execute("DELETE FROM requests WHERE state = 'reserved'", [])
                .map_err(db)
        })
    }

    fn finish(
        &self,
        stack: StackSmallId,
        request_hash: [u8; 32],
        reserved: u64,
        outcome: Option<Settled>,
    ) -> Result<(), MeterError> {
        self.with_tx(|tx| match outcome {
            Some(Settled {
                prompt_tokens: prompt,
                completion_tokens: completion,
                response_hash,
                record,
            }) => {
                let used = (prompt + completion).min(reserved);
                tx.execute(
                    "UPDATE stacks SET units_used = units_used - ?1, last_activity_ms = ?3 \
                     WHERE small_id = ?2",
                    params![(reserved - used) as i64, stack.0 as i64, now_ms()],
                )
                .map_err(db)?;
                tx.execute(
                    "UPDATE requests SET state = 'settled', reserved = ?1, prompt_tokens = ?2, \
                     completion_tokens = ?3, response_hash = ?4, record = ?7, settled_seq = \
                     (SELECT COALESCE(MAX(settled_seq), 0) + 1 FROM requests \
                      WHERE stack_small_id = ?5) \
                     WHERE stack_small_id = ?5 AND request_hash = ?6 AND state = 'reserved'",
                    params![
                        used as i64,
                        prompt as i64,
                        completion as i64,
                        &response_hash[..],
                        stack.0 as i64,
                        &request_hash[..],
                        record
                    ],
                )
                .map_err(db)?;
                Ok(())
            }
            None => {
                let n = tx
                    .execute(
                        "DELETE FROM requests WHERE stack_small_id = ?1 AND request_hash = ?2 \
                         AND state = 'reserved'",
                        params![stack.0 as i64, &request_hash[..]],
                    )
                    .map_err(db)?;
                if n == 1 {
                    tx.execute(
                        "UPDATE stacks SET units_used = units_used - ?1 WHERE small_id = ?2",
                        params![reserved as i64, stack.0 as i64],
                    )
                    .map_err(db)?;
                }
                Ok(())
            }
        })
    }
}

/// What a finished request is charged and logged with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub response_hash: [u8; 32],
    /// The encoded `LogRecord`.
    pub record: Vec<u8>,
}

/// Units reserved for one running request. Settle it with the real usage, or drop it to give
/// everything back.
#[derive(Debug)]
pub struct Reservation {
    meter: Meter,
    stack: StackSmallId,
    request_hash: [u8; 32],
    units: u64,
    done: bool,
}

impl Reservation {
    /// Units reserved.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Charges the real usage (capped at the reservation), logs the response hash and the
    /// request's encoded log record (`crate::log::LogRecord::encode`), and returns the rest to
    /// the stack, all in one transaction.
    pub fn settle(mut self, settled: Settled) -> Result<(), MeterError> {
        self.done = true;
        self.meter
            .finish(self.stack, self.request_hash, self.units, Some(settled))
    }

    /// Gives every reserved unit back (the request failed before producing anything billable).
    pub fn release(mut self) -> Result<(), MeterError> {
        self.done = true;
        self.meter
            .finish(self.stack, self.request_hash, self.units, None)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self
                .meter
                .finish(self.stack, self.request_hash, self.units, None)
        {
            tracing::error!(stack = %self.stack, error = %e, "cannot release a reservation; it will be released at the next start");
        }
    }
}
