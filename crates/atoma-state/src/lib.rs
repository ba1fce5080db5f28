//! A node's durable local state, in one SQLite file: per-stack metering of compute units with
//! the request log used for settlement (`meter`), the log's record and blob format with its
//! Merkle commitment (`log`), and the settlement state machine's rows (`settlement`). Written by
//! the API, the ledger follower and the settlement duties; knows nothing of HTTP or inference.

pub mod log;
pub mod meter;
pub mod settlement;
