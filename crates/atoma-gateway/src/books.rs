//! The gateway's SQLite file (`gateway.db`): API keys and their journal, the stacks it owns,
//! kept answers. One connection serves all of them.
//!
//! Why one connection and not one per part: every request writes to keys and stacks a few
//! times; separate connections on one file contend for SQLite's write lock, and a connection
//! that finds it taken sleeps in the busy handler for a millisecond or more. Measured with
//! `cargo bench -p atoma-gateway --bench overhead`: 1,270 requests/s with three connections,
//! over 3,000 with one. Our own mutex serializes the (tens of µs) writes instead.
//!
//! Durability: WAL with `synchronous = NORMAL`: a commit survives the process dying (SIGKILL)
//! without an fsync per commit; only a power loss can roll back the last few, which costs the
//! gateway (an answer not charged), never a user. WAL checkpoints (which do fsync) run on a
//! background thread with their own connection, so no request waits for one.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::Connection;

/// The shared connection.
pub type Books = Arc<Mutex<Connection>>;

/// How often the background thread checkpoints the WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Opens (or creates) the gateway's file, and starts its checkpointer (which ends when the
/// last handle is dropped).
pub fn open(path: &Path) -> rusqlite::Result<Books> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let books = Arc::new(Mutex::new(conn));
    let checkpointer = Connection::open(path)?;
    checkpointer.busy_timeout(Duration::from_secs(30))?;
    let weak: Weak<Mutex<Connection>> = Arc::downgrade(&books);
    std::thread::Builder::new()
        .name("gateway-checkpoint".into())
        .spawn(move || {
            while weak.strong_count() > 0 {
                std::thread::sleep(CHECKPOINT_EVERY);
                // PASSIVE: copies what it can without blocking writers; the rest next time.
                if let Err(e) =
                    checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %e, "gateway.db checkpoint failed");
                }
            }
            let _ = checkpointer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        })
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    Ok(books)
}

/// A file-less set of books (tests).
pub fn in_memory() -> rusqlite::Result<Books> {
    Ok(Arc::new(Mutex::new(Connection::open_in_memory()?)))
}
