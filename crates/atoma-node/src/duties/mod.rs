//! The node's settlement and attestation duties, run in rounds beside the API.
//!
//! Settlement (`settle`): a stack the node sold is settled when its use passes a threshold
//! (default 95%), when it has been idle for a while, or when the operator asks
//! (`atoma node settle`). Each step is a state in the node's state file, recorded after its
//! side effect (freeze, log on the DA store, ticket on the ledger, claim after the window), and
//! each is idempotent, so a node killed at any point finishes the settlement exactly once after
//! it restarts.
//!
//! Attestation (`attest`): when a ticket names this node, it fetches the log from the DA store
//! (the content hash is checked by the store client), checks the Merkle root and leaf count
//! against the ticket, every record's user signature and node signature, and that the claimed
//! units are the sum of the records' usage, re-executes the records (all, or a sample drawn from
//! the ticket's ledger seed) on its own engine (`crate::reexec`), then attests or opens a
//! dispute naming the record and token before the window ends.
//!
//! When the ledger records only a settlement's Merkle root (the deployed Sui contract), the log's
//! location comes from the seller's signed commitment at its API (`locate`), checked against
//! that root before anything is fetched.
//!
//! Oracle (`oracle`): when the ledger hands this node a dispute, it checks the log the same way,
//! re-executes the disputed record (or all of them), and resolves the dispute before its
//! deadline. Parties to a dispute whose oracle stays silent past the deadline have it replaced.

mod attest;
mod locate;
mod oracle;
mod settle;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use atoma_crypto::Keypair;
use atoma_da::BlobStore;
use atoma_ledger::{Address, Ledger};
use atoma_state::meter::Meter;

pub use attest::Claimed;
pub use locate::Located;

use crate::reexec::Reexecutor;

/// When to settle and how fast to go round.
#[derive(Debug, Clone)]
pub struct SettlementPolicy {
    /// Settle a stack once this share of its units is used, in permille (950 = 95%).
    pub threshold_permille: u64,
    /// Settle a stack that has been used and then idle this long.
    pub idle: Duration,
    /// Time between rounds.
    pub tick: Duration,
    /// A pause after each recorded step (0 in production; tests use it to kill a node between
    /// steps).
    pub step_pause: Duration,
    /// Records an attestor re-executes per log (0: all of them).
    pub verify_sample: usize,
    /// Sellers' API URLs by node small id, for ledgers that record only a settlement's root
    /// (the deployed Sui contract): an attestor fetches the seller's signed commitment there
    /// (`locate`). A node missing here is looked up by its public URL on the ledger.
    pub peers: BTreeMap<u64, String>,
    /// Time limit of one request to a seller.
    pub peer_timeout: Duration,
}

impl Default for SettlementPolicy {
    fn default() -> Self {
        Self {
            threshold_permille: 950,
            idle: Duration::from_secs(3_600),
            tick: Duration::from_millis(500),
            step_pause: Duration::ZERO,
            verify_sample: 0,
            peers: BTreeMap::new(),
            peer_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything the duties need.
#[derive(Clone)]
pub struct Duties {
    pub ledger: Arc<dyn Ledger>,
    pub state: Meter,
    pub da: Arc<dyn BlobStore>,
    pub keys: Keypair,
    pub policy: SettlementPolicy,
    /// Re-executes logged requests (`None`: integrity checks only).
    pub reexec: Option<Arc<dyn Reexecutor>>,
}

impl std::fmt::Debug for Duties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duties")
            .field("da", &self.da)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Why a duty step could not run this round (it is retried next round).
#[derive(Debug, thiserror::Error)]
pub enum DutyError {
    #[error("ledger: {0}")]
    Ledger(#[from] atoma_ledger::LedgerError),
    #[error("data-availability store: {0}")]
    Da(#[from] atoma_da::DaError),
    #[error("state: {0}")]
    State(#[from] atoma_state::meter::MeterError),
    #[error("re-execution could not run: {0}")]
    Reexec(String),
    /// The ledger's ticket records only the root (the deployed Sui contract) and the seller's
    /// signed commitment cannot be had yet: no URL for it, unreachable, not answering, or
    /// signed by someone else. Not the seller's provable fault, so never a dispute.
    #[error("stack {stack}: the ledger records only the log's root and {reason}")]
    NoLogLocation {
        stack: atoma_ledger::StackSmallId,
        reason: String,
    },
}

impl Duties {
    /// The ledger address the node signs with.
    pub fn sender(&self) -> Address {
        Address(self.keys.address())
    }

    /// One round of both duties (blocking). Errors are per stack and logged; the round goes on.
    pub fn round(&self) {
        if let Err(e) = self.settle_round() {
            tracing::warn!(error = %e, "settlement round failed; retrying");
        }
        if let Err(e) = self.attest_round() {
            tracing::warn!(error = %e, "attestation round failed; retrying");
        }
        if let Err(e) = self.oracle_round() {
            tracing::warn!(error = %e, "oracle round failed; retrying");
        }
    }

    fn pause(&self) {
        if !self.policy.step_pause.is_zero() {
            std::thread::sleep(self.policy.step_pause);
        }
    }

    /// Runs rounds every `policy.tick` until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let d = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || d.round()).await {
                tracing::error!(error = %e, "a duty round panicked");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.policy.tick) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
