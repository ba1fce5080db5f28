//! The node's local index of the chain's `db` events: every event in chain order with a dense
//! sequence number (the trait's `EventCursor`), and the chain's opaque cursor after the last
//! event applied. A page of events and the cursor that follows it are written in **one** SQLite
//! transaction, so a crash never loses an event nor applies one twice: the cursor is persisted
//! only with the events it covers, and `(tx_digest, event_index)` is unique besides.

use std::path::Path;

use atoma_ledger::{Address, EventCursor, EventRecord, LedgerError, LedgerEvent};
use rusqlite::{Connection, OptionalExtension, params};

/// An event as ingested.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub tx_digest: String,
    pub event_index: u32,
    pub checkpoint: u64,
    pub sender: Address,
    pub event: LedgerEvent,
}

pub struct Index {
    conn: Connection,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Index")
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("sui index: {e}"))
}

impl Index {
    /// Opens (creating) the index at `path`; `None`: in memory.
    pub fn open(path: Option<&Path>) -> Result<Self, LedgerError> {
        let conn = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(storage)?;
                }
                Connection::open(p)
            }
            None => Connection::open_in_memory(),
        }
        .map_err(storage)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS events(
                 seq INTEGER PRIMARY KEY,
                 tx_digest TEXT NOT NULL,
                 event_index INTEGER NOT NULL,
                 checkpoint INTEGER NOT NULL,
                 sender BLOB NOT NULL,
                 name TEXT NOT NULL,
                 json TEXT NOT NULL,
                 UNIQUE(tx_digest, event_index));
             CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )
        .map_err(storage)?;
        Ok(Self { conn })
    }

    /// The chain cursor after the last event applied (`None`: from the start).
    pub fn cursor(&self) -> Result<Option<Vec<u8>>, LedgerError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(storage)
    }

    /// Applies a page: its events in order, then the cursor after them, atomically. An event
    /// already present (same transaction and index) is skipped, never doubled.
    pub fn apply(&mut self, events: &[Ingested], cursor: &[u8]) -> Result<usize, LedgerError> {
        let tx = self.conn.transaction().map_err(storage)?;
        let mut added = 0;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO events(tx_digest, event_index, checkpoint, sender, name, json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(storage)?;
            for e in events {
                let json = serde_json::to_string(&e.event).map_err(storage)?;
                added += ins
                    .execute(params![
                        e.tx_digest,
                        e.event_index,
                        e.checkpoint as i64,
                        e.sender.0.to_vec(),
                        e.event.name(),
                        json
                    ])
                    .map_err(storage)?;
            }
        }
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('cursor', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![cursor],
        )
        .map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(added)
    }

    /// Events after `cursor`, at most `limit`.
    pub fn events_after(
        &self,
        cursor: EventCursor,
        limit: usize,
    ) -> Result<Vec<EventRecord>, LedgerError> {
        Ok(self
            .with_sender_after(cursor.0, limit)?
            .into_iter()
            .map(|(seq, _, event)| EventRecord { seq, event })
            .collect())
    }

    /// Events after `seq` with their transaction's sender.
    pub fn with_sender_after(
        &self,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Address, LedgerEvent)>, LedgerError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, sender, json FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(storage)?;
        let rows = st
            .query_map(
                params![seq as i64, limit.min(i64::MAX as usize) as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .map_err(storage)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, sender, json) = row.map_err(storage)?;
            let sender = <[u8; 32]>::try_from(sender.as_slice())
                .map(Address)
                .map_err(|_| storage("a sender is not 32 bytes"))?;
            let event = serde_json::from_str(&json).map_err(storage)?;
            out.push((seq as u64, sender, event));
        }
        Ok(out)
    }

    /// Number of events indexed.
    pub fn len(&self) -> Result<u64, LedgerError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(storage)
    }

    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        self.len().map(|n| n == 0)
    }
}
