//! A node's durable local state, in one SQLite file: per-stack metering of compute units and the
//! request log used for settlement (`meter`). Written by the API and the ledger follower; knows
//! nothing of HTTP or inference.

pub mod meter;
