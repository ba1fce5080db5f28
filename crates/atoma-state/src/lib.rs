//! A node's durable local state, in one SQLite file: per-stack metering of compute units with
//! the request log used for settlement (`meter`), the log's record and blob format with its
//! Merkle commitment (`log`), the settlement state machine's rows (`settlement`) and the signed
//! commitment a seller publishes for a root-only ledger (`published`). Written by
//! the API, the ledger follower and the settlement duties; knows nothing of HTTP or inference.

pub mod log;
pub mod meter;
pub mod published;
pub mod settlement;
