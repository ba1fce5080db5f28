//! The Sui backend of the Atoma ledger.
//!
//! The real network keeps the contract's state on Sui: writes are Move calls to the deployed
//! package's `db` module, signed with the operator's Sui key and executed through Sui's gRPC API
//! (`sui.rpc.v2`, Mysten's `sui-rpc` client); reads are the module's events, ingested in order
//! with a durable cursor, and objects. This crate is the only one that links the Sui SDK.
//!
//! - [`move_types`]: BCS mirrors of the contract's structs and events, and the codec to the
//!   ledger's typed events (deployed and extended layouts).
//! - [`abort`]: Move abort codes to and from the ledger's named errors.
//! - [`tx`]: one programmable transaction per entry function, and its reverse.
//! - [`keys`]: the Sui CLI keystore and per-address signers.
//! - [`rpc`]: owned objects, gas, execute-and-wait, effects to events or named errors.
//! - [`ledger`]: `SuiLedger`, the `Ledger` trait over all of the above; [`index`] and [`view`]:
//!   the durable event index and the read model folded from it (`ledger/ops.rs`: the trait, call by call).
//! - `fake` (feature `fake`): a loopback Sui test double that executes real signed transactions
//!   on the embedded ledger's semantics. It is a test double, not a Sui node.

pub mod abort;
#[cfg(feature = "fake")]
pub mod fake;
pub mod index;
pub mod keys;
mod ledger;
pub mod move_types;
pub mod rpc;
pub mod tx;
pub mod view;

pub use ledger::{Flavor, SuiConfig, SuiLedger};
/// Sui's 32-byte address type, for callers that configure the backend.
pub use sui_sdk_types::Address as SuiAddress;
