//! One module per subcommand.

pub mod bench;
pub mod bench_grammar;
pub mod bench_mem;
pub mod bench_verify;
pub mod client;
pub mod da;
pub mod db;
pub mod db_settle;
pub mod devnet;
pub mod gateway;
pub mod generate;
pub mod keys;
pub mod ledger;
pub mod loadgen;
pub mod log;
pub mod model;
pub mod node;
pub mod node_ops;
pub mod sui_fake;
pub mod up;
