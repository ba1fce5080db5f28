//! API keys and the gateway's own books, in one SQLite file (`gateway.db`, or memory for tests).
//!
//! A key is a secret `sk-atoma-…` shown once at creation; only its Blake2b-256 is stored. Each
//! key has a balance of credit in micro base units ("µ": 1 USDC base unit = 1_000_000 µ), so a
//! node's charge `units × price_per_million` is exact. A request first *holds* its maximum cost
//! (balance → held), then *settles* (held → spent on nodes + spent on margin, the rest back to
//! the balance) or *releases* (held → balance). Every movement is one `BEGIN IMMEDIATE`
//! transaction that also writes a double-entry row to `journal` (op, key, from-account,
//! to-account, amount), so replaying the journal gives the stored balances. Open holds are rows
//! of `holds`; those left by a crash are released when the file is opened. Amounts are `i64`
//! in the file with checked arithmetic: an operation that would overflow is refused.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// Micro units per USDC base unit.
pub const MICRO_PER_BASE_UNIT: u64 = 1_000_000;
/// What every secret starts with.
pub const SECRET_PREFIX: &str = "sk-atoma-";
/// Characters of the secret kept for display (`sk-atoma-` and three more).
const DISPLAY_PREFIX_LEN: usize = 12;
/// Longest key name accepted.
const MAX_NAME_LEN: usize = 100;

// Accounts of the journal; `grant` is the outside world credit comes from.
const ACC_GRANT: &str = "grant";
const ACC_BALANCE: &str = "balance";
const ACC_HELD: &str = "held";
const ACC_NODE: &str = "spent_node";
const ACC_MARGIN: &str = "spent_margin";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, prefix TEXT NOT NULL,
  secret_hash BLOB NOT NULL UNIQUE,
  granted INTEGER NOT NULL DEFAULT 0 CHECK (granted >= 0),
  balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
  held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
  spent_node INTEGER NOT NULL DEFAULT 0 CHECK (spent_node >= 0),
  spent_margin INTEGER NOT NULL DEFAULT 0 CHECK (spent_margin >= 0),
  revoked INTEGER NOT NULL DEFAULT 0,
  rpm INTEGER NOT NULL DEFAULT 0, tpm INTEGER NOT NULL DEFAULT 0,
  created_unix INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holds (
  id INTEGER PRIMARY KEY AUTOINCREMENT, key_id INTEGER NOT NULL REFERENCES keys(id),
  amount INTEGER NOT NULL CHECK (amount >= 0), opened_unix INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL,
  key_id INTEGER NOT NULL REFERENCES keys(id), hold_id INTEGER,
  from_account TEXT NOT NULL, to_account TEXT NOT NULL,
  amount INTEGER NOT NULL CHECK (amount > 0), at_unix INTEGER NOT NULL);
PRAGMA user_version = 1;
";

const KEY_COLUMNS: &str = "id, name, prefix, balance, held, spent_node, spent_margin, revoked, \
                           rpm, tpm, created_unix";

/// What the key store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown API key")]
    Unknown,
    #[error("the API key has been revoked")]
    Revoked,
    #[error("insufficient credit: the request may cost {need} µ, the key has {have} µ")]
    InsufficientCredit { need: u64, have: u64 },
    #[error("no API key with id {0}")]
    NotFound(KeyId),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("key storage: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for KeyError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// The id of an API key (its row in the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub i64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A key's rate limits; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// A key as shown to its operator (never the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: KeyId,
    pub name: String,
    /// The first 12 characters of the secret, for display.
    pub prefix: String,
    pub balance_micro: u64,
    pub held_micro: u64,
    pub spent_node_micro: u64,
    pub spent_margin_micro: u64,
    pub revoked: bool,
    pub limits: Limits,
    pub created_unix: u64,
}

/// Sums over all keys, for the conservation check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeyTotals {
    pub granted_micro: u128,
    pub balances_micro: u128,
    pub held_micro: u128,
    pub spent_node_micro: u128,
    pub spent_margin_micro: u128,
}

impl KeyTotals {
    /// Whether every µ ever granted is in a balance, a hold, or spent.
    pub fn is_conserved(&self) -> bool {
        self.granted_micro
            == self.balances_micro
                + self.held_micro
                + self.spent_node_micro
                + self.spent_margin_micro
    }
}

/// The margin on a node charge: `node_micro × margin_permille / 1000`, floored. Computed in
/// 128 bits, so it cannot wrap; a result beyond `u64` (only with a margin far above 100 %)
/// saturates, and settling caps any charge at its hold anyway.
pub fn margin_of(node_micro: u64, margin_permille: u64) -> u64 {
    let m = u128::from(node_micro) * u128::from(margin_permille) / 1000;
    u64::try_from(m).unwrap_or(u64::MAX)
}

/// The store of API keys and their books: a cloneable handle on one SQLite connection.
#[derive(Clone, Debug)]
pub struct KeyStore {
    conn: Arc<Mutex<Connection>>,
}

impl KeyStore {
    /// Opens (or creates) the store in the gateway's file at `path` (see [`crate::books`]),
    /// and releases the holds a crash left open.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        Self::on(crate::books::open(path)?)
    }

    /// A store in memory, for tests.
    pub fn in_memory() -> Result<Self, KeyError> {
        Self::on(crate::books::in_memory()?)
    }

    /// The store on the gateway's shared connection.
    pub fn on(conn: crate::books::Books) -> Result<Self, KeyError> {
        {
            let c = conn.lock().unwrap_or_else(|e| e.into_inner());
            c.execute_batch("PRAGMA foreign_keys = ON;")?;
            c.execute_batch(SCHEMA)?;
        }
        let store = Self { conn };
        store.release_stale_holds()?;
        Ok(store)
    }

    /// Releases every hold row: at open, any of them was left by a process that ended.
    fn release_stale_holds(&self) -> Result<(), KeyError> {
        let (count, micro) = self.with_tx(|tx| {
            let rows: Vec<(i64, i64, i64)> = tx
                .prepare("SELECT id, key_id, amount FROM holds ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut micro: u128 = 0;
            for &(hold_id, key_id, amount) in &rows {
                tx.execute(
                    "UPDATE keys SET held = held - ?2, balance = balance + ?2 WHERE id = ?1",
                    params![key_id, amount],
                )?;
                journal(
                    tx,
                    "recover",
                    key_id,
                    Some(hold_id),
                    ACC_HELD,
                    ACC_BALANCE,
                    amount,
                )?;
                micro += u128::try_from(amount).unwrap_or(0);
            }
            tx.execute("DELETE FROM holds", [])?;
            Ok((rows.len(), micro))
        })?;
        if count > 0 {
            tracing::warn!(
                count,
                micro,
                "released API-key holds left open by a previous run"
            );
        }
        Ok(())
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, KeyError> {
        self.conn
            .lock()
            .map_err(|_| KeyError::Storage("key store lock poisoned".into()))
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction: committed if it succeeds, else rolled back.
    fn with_tx<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Creates a key with `credit_base_units` of credit; returns its info and the secret, which
    /// is shown only this once: `sk-atoma-` + 43 characters of URL-safe base64 of 32 random
    /// bytes. Only the Blake2b-256 of the secret is stored.
    pub fn create(
        &self,
        name: &str,
        credit_base_units: u64,
        limits: Limits,
    ) -> Result<(KeyInfo, String), KeyError> {
        check_name(name)?;
        let credit = to_micro(credit_base_units)?;
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| KeyError::Storage(format!("no randomness for a new key: {e}")))?;
        let secret = format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        let hash = atoma_crypto::blake2b256(secret.as_bytes());
        let prefix: String = secret.chars().take(DISPLAY_PREFIX_LEN).collect();
        let info = self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO keys (name, prefix, secret_hash, rpm, tpm, created_unix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    prefix,
                    &hash[..],
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    to_i64(now_unix())?
                ],
            )?;
            let id = KeyId(tx.last_insert_rowid());
            if credit > 0 {
                grant(tx, id, credit)?;
            }
            read_key(tx, id)
        })?;
        Ok((info, secret))
    }

    /// All keys, by id.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY id"))?;
        let keys = stmt
            .query_map([], key_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(keys)
    }

    /// One key.
    pub fn get(&self, id: KeyId) -> Result<KeyInfo, KeyError> {
        let conn = self.lock()?;
        read_key(&conn, id)
    }

    /// Revokes a key (idempotent). Its holds still settle; it can neither authenticate, hold
    /// nor receive credit any more.
    pub fn revoke(&self, id: KeyId) -> Result<KeyInfo, KeyError> {
        self.with_tx(|tx| {
            read_key(tx, id)?;
            tx.execute("UPDATE keys SET revoked = 1 WHERE id = ?1", [id.0])?;
            read_key(tx, id)
        })
    }

    /// Adds `base_units` of credit to a key that is not revoked.
    pub fn credit(&self, id: KeyId, base_units: u64) -> Result<KeyInfo, KeyError> {
        if base_units == 0 {
            return Err(KeyError::Invalid("a credit must be positive".into()));
        }
        let micro = to_micro(base_units)?;
        self.with_tx(|tx| {
            if read_key(tx, id)?.revoked {
                return Err(KeyError::Revoked);
            }
            grant(tx, id, micro)?;
            read_key(tx, id)
        })
    }

    /// Replaces a key's rate limits.
    pub fn set_limits(&self, id: KeyId, limits: Limits) -> Result<KeyInfo, KeyError> {
        self.with_tx(|tx| {
            read_key(tx, id)?;
            tx.execute(
                "UPDATE keys SET rpm = ?2, tpm = ?3 WHERE id = ?1",
                params![id.0, limits.requests_per_minute, limits.tokens_per_minute],
            )?;
            read_key(tx, id)
        })
    }

    /// The key a presented secret belongs to: always one hash and one indexed lookup, whatever
    /// the input, so the work does not depend on how much of a guess is right.
    pub fn authenticate(&self, secret: &str) -> Result<KeyInfo, KeyError> {
        let hash = atoma_crypto::blake2b256(secret.as_bytes());
        let conn = self.lock()?;
        let info = conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE secret_hash = ?1"),
                [&hash[..]],
                key_from_row,
            )
            .optional()?
            .ok_or(KeyError::Unknown)?;
        if info.revoked {
            return Err(KeyError::Revoked);
        }
        Ok(info)
    }

    /// Reserves `max_micro` of the key's balance for one request (one transaction); refused
    /// with both numbers, and nothing changed, when the balance is short.
    pub fn hold(&self, id: KeyId, max_micro: u64) -> Result<Hold, KeyError> {
        let hold_id = self.with_tx(|tx| {
            let info = read_key(tx, id)?;
            if info.revoked {
                return Err(KeyError::Revoked);
            }
            if info.balance_micro < max_micro {
                return Err(KeyError::InsufficientCredit {
                    need: max_micro,
                    have: info.balance_micro,
                });
            }
            let amount = to_i64(max_micro)?;
            tx.execute(
                "INSERT INTO holds (key_id, amount, opened_unix) VALUES (?1, ?2, ?3)",
                params![id.0, amount, to_i64(now_unix())?],
            )?;
            let hold_id = tx.last_insert_rowid();
            tx.execute(
                "UPDATE keys SET balance = balance - ?2, held = held + ?2 WHERE id = ?1",
                params![id.0, amount],
            )?;
            journal(
                tx,
                "hold",
                id.0,
                Some(hold_id),
                ACC_BALANCE,
                ACC_HELD,
                amount,
            )?;
            Ok(hold_id)
        })?;
        Ok(Hold {
            store: self.clone(),
            hold_id,
            key: id,
            micro: max_micro,
            open: true,
        })
    }

    /// Sums over all keys (in 128 bits: no overflow however many keys).
    pub fn totals(&self) -> Result<KeyTotals, KeyError> {
        let conn = self.lock()?;
        let mut stmt =
            conn.prepare("SELECT granted, balance, held, spent_node, spent_margin FROM keys")?;
        let mut rows = stmt.query([])?;
        let mut t = KeyTotals::default();
        while let Some(r) = rows.next()? {
            t.granted_micro += u128::from(r.get::<_, u64>(0)?);
            t.balances_micro += u128::from(r.get::<_, u64>(1)?);
            t.held_micro += u128::from(r.get::<_, u64>(2)?);
            t.spent_node_micro += u128::from(r.get::<_, u64>(3)?);
            t.spent_margin_micro += u128::from(r.get::<_, u64>(4)?);
        }
        Ok(t)
    }

    /// Closes hold `hold_id` of `key` (`amount` µ): `node` and `margin` to the spent accounts,
    /// the rest back to the balance, in one transaction.
    fn close_hold(
        &self,
        hold_id: i64,
        key: KeyId,
        amount: u64,
        node: u64,
        margin: u64,
    ) -> Result<(), KeyError> {
        let (amount, node, margin) = (to_i64(amount)?, to_i64(node)?, to_i64(margin)?);
        let rest = amount - node - margin;
        let op = if node + margin > 0 {
            "settle"
        } else {
            "release"
        };
        self.with_tx(|tx| {
            let open = tx.execute(
                "DELETE FROM holds WHERE id = ?1 AND key_id = ?2 AND amount = ?3",
                params![hold_id, key.0, amount],
            )?;
            if open != 1 {
                return Err(KeyError::Invalid(format!(
                    "hold {hold_id} of key {key} is not open (released when the store was opened?)"
                )));
            }
            tx.execute(
                "UPDATE keys SET held = held - ?2, balance = balance + ?3,
                   spent_node = spent_node + ?4, spent_margin = spent_margin + ?5 WHERE id = ?1",
                params![key.0, amount, rest, node, margin],
            )?;
            journal(tx, op, key.0, Some(hold_id), ACC_HELD, ACC_NODE, node)?;
            journal(tx, op, key.0, Some(hold_id), ACC_HELD, ACC_MARGIN, margin)?;
            journal(tx, op, key.0, Some(hold_id), ACC_HELD, ACC_BALANCE, rest)?;
            Ok(())
        })
    }
}

/// Credit reserved for one request. Settle it with what the request cost, or release it; a
/// hold dropped unsettled gives itself back (errors are logged, never a panic).
#[derive(Debug)]
pub struct Hold {
    store: KeyStore,
    hold_id: i64,
    key: KeyId,
    micro: u64,
    open: bool,
}

impl Hold {
    /// The key the credit is held from.
    pub fn key(&self) -> KeyId {
        self.key
    }

    /// How much is held, in µ.
    pub fn micro(&self) -> u64 {
        self.micro
    }

    /// Charges `node_micro + margin_micro` and returns the rest to the balance, in one
    /// transaction; returns what was charged as (node, margin). A charge above the hold is
    /// capped at the hold (the node part first) and the excess logged as an error. If the
    /// transaction fails the hold stays open and is released on drop.
    pub fn settle(mut self, node_micro: u64, margin_micro: u64) -> Result<(u64, u64), KeyError> {
        let node = node_micro.min(self.micro);
        let margin = margin_micro.min(self.micro - node);
        if (node, margin) != (node_micro, margin_micro) {
            tracing::error!(
                key = %self.key, hold_micro = self.micro, node_micro, margin_micro,
                "charge exceeds its hold: capped at the hold"
            );
        }
        self.store
            .close_hold(self.hold_id, self.key, self.micro, node, margin)?;
        self.open = false;
        Ok((node, margin))
    }

    /// Gives everything back (the request failed).
    pub fn release(mut self) -> Result<(), KeyError> {
        self.store
            .close_hold(self.hold_id, self.key, self.micro, 0, 0)?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        if let Err(e) = self
            .store
            .close_hold(self.hold_id, self.key, self.micro, 0, 0)
        {
            tracing::error!(key = %self.key, hold = self.hold_id, error = %e, "releasing a dropped hold");
        }
    }
}

/// Adds `micro` to a key's granted credit and balance, with its journal row.
fn grant(tx: &Transaction<'_>, id: KeyId, micro: u64) -> Result<(), KeyError> {
    let amount = to_i64(micro)?;
    let granted: i64 = tx.query_row("SELECT granted FROM keys WHERE id = ?1", [id.0], |r| {
        r.get(0)
    })?;
    // Balance, held and spent never exceed granted, so this one check covers them all.
    if granted.checked_add(amount).is_none() {
        return Err(KeyError::Invalid(format!(
            "credit of {micro} µ would overflow key {id}'s books"
        )));
    }
    tx.execute(
        "UPDATE keys SET granted = granted + ?2, balance = balance + ?2 WHERE id = ?1",
        params![id.0, amount],
    )?;
    journal(tx, "grant", id.0, None, ACC_GRANT, ACC_BALANCE, amount)
}

/// One journal row (none for a zero amount).
fn journal(
    tx: &Transaction<'_>,
    op: &str,
    key_id: i64,
    hold_id: Option<i64>,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<(), KeyError> {
    if amount == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO journal (op, key_id, hold_id, from_account, to_account, amount, at_unix)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![op, key_id, hold_id, from, to, amount, to_i64(now_unix())?],
    )?;
    Ok(())
}

fn read_key(conn: &Connection, id: KeyId) -> Result<KeyInfo, KeyError> {
    conn.query_row(
        &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"),
        [id.0],
        key_from_row,
    )
    .optional()?
    .ok_or(KeyError::NotFound(id))
}

/// A `keys` row as a `KeyInfo` (amounts read as `u64`: a negative one is an error).
fn key_from_row(r: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: KeyId(r.get(0)?),
        name: r.get(1)?,
        prefix: r.get(2)?,
        balance_micro: r.get(3)?,
        held_micro: r.get(4)?,
        spent_node_micro: r.get(5)?,
        spent_margin_micro: r.get(6)?,
        revoked: r.get(7)?,
        limits: Limits {
            requests_per_minute: r.get(8)?,
            tokens_per_minute: r.get(9)?,
        },
        created_unix: r.get(10)?,
    })
}

fn to_i64(v: u64) -> Result<i64, KeyError> {
    i64::try_from(v).map_err(|_| KeyError::Invalid(format!("amount {v} is too large")))
}

fn to_micro(base_units: u64) -> Result<u64, KeyError> {
    base_units
        .checked_mul(MICRO_PER_BASE_UNIT)
        .filter(|&m| i64::try_from(m).is_ok())
        .ok_or_else(|| KeyError::Invalid(format!("credit of {base_units} base units is too large")))
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(KeyError::Invalid(format!(
            "a key name must be 1 to {MAX_NAME_LEN} bytes of printable text"
        )));
    }
    Ok(())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
