//! Composition of one Atoma node: the engine behind the API (`EngineBackend`), the ledger
//! follower that keeps the node's state in step with the ledger, the settlement and
//! attestation duties (`duties`), the operator's status view (`operator`), and `serve`, which
//! runs them all until shutdown. Configuration is read by the CLI, which passes the parts in.

pub mod duties;
mod engine_backend;
mod follower;
mod loading;
pub mod operator;
pub mod reexec;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atoma_api::{AppState, InferenceBackend};
use atoma_crypto::Keypair;
use atoma_da::BlobStore;
use atoma_ledger::Ledger;
use atoma_state::meter::Meter;

pub use duties::{Duties, SettlementPolicy};
pub use engine_backend::EngineBackend;
pub use follower::{follow, sync_blocking, sync_once};
pub use loading::LoadingBackend;
pub use reexec::{RecordVerdict, ReexecSlot, Reexecutor};

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("state: {0}")]
    State(#[from] atoma_state::meter::MeterError),
}

/// Everything a node needs to serve.
pub struct NodeParts {
    pub backend: Arc<dyn InferenceBackend>,
    pub ledger: Arc<dyn Ledger>,
    pub state: Meter,
    pub keys: Keypair,
    pub bind: SocketAddr,
    pub poll_interval: Duration,
    /// Where settled stacks' logs are stored; `None` runs no settlement or attestation duties.
    pub da: Option<Arc<dyn BlobStore>>,
    pub policy: SettlementPolicy,
    /// Re-executes logged requests for attestations and disputes (`None`: integrity checks
    /// only).
    pub reexec: Option<Arc<dyn Reexecutor>>,
}

impl std::fmt::Debug for NodeParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeParts")
            .field("bind", &self.bind)
            .finish_non_exhaustive()
    }
}

/// A bound, not yet serving node (binding first lets callers learn the port of `:0`).
pub struct BoundNode {
    parts: NodeParts,
    listener: tokio::net::TcpListener,
}

impl std::fmt::Debug for BoundNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundNode")
            .field("addr", &self.local_addr())
            .finish()
    }
}

/// Catches up with the ledger and binds the API's socket.
pub async fn bind(parts: NodeParts) -> Result<BoundNode, NodeError> {
    sync_once(parts.ledger.clone(), parts.state.clone()).await?;
    let listener = tokio::net::TcpListener::bind(parts.bind)
        .await
        .map_err(|source| NodeError::Bind {
            addr: parts.bind,
            source,
        })?;
    Ok(BoundNode { parts, listener })
}

impl BoundNode {
    /// The address the API listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes, following the ledger meanwhile; in-flight requests
    /// finish (graceful shutdown).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let p = self.parts;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let follower = tokio::spawn(follow(
            p.ledger.clone(),
            p.state.clone(),
            p.poll_interval,
            stop_rx,
        ));
        let duties = p.da.clone().map(|da| {
            tokio::spawn(
                Duties {
                    ledger: p.ledger.clone(),
                    state: p.state.clone(),
                    da,
                    keys: p.keys.clone(),
                    policy: p.policy.clone(),
                    reexec: p.reexec.clone(),
                }
                .run(stop_tx.subscribe()),
            )
        });
        let (ledger, state) = (p.ledger.clone(), p.state.clone());
        let refresh: atoma_api::Refresh = Arc::new(move |digest: Option<&str>| {
            if let Some(d) = digest {
                // The transaction itself, in case the ledger's event list lags behind it.
                match ledger.stack_in_transaction(d) {
                    Ok(Some(s)) => match state.admit_stack(&s) {
                        Ok(ours) => {
                            tracing::debug!(stack = %s.small_id, tx = d, ours,
                                            "stack read from its purchase");
                            if ours {
                                // The follower brings the rest in its own time.
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot record a stack"),
                    },
                    Ok(None) => tracing::debug!(tx = d, "the transaction bought no stack"),
                    Err(e) => tracing::warn!(tx = d, error = %e,
                                             "cannot read the purchase transaction"),
                }
            }
            if let Err(e) = sync_blocking(ledger.as_ref(), &state) {
                tracing::warn!(error = %e, "cannot sync with the ledger");
            }
        });
        let operator = axum::Router::new()
            .route("/operator/status", axum::routing::get(operator::status))
            .with_state(operator::OperatorState {
                ledger: p.ledger.clone(),
                state: p.state.clone(),
            });
        let app =
            atoma_api::router(AppState::new(p.backend, p.state, p.keys).with_refresh(refresh))
                .merge(operator);
        let res = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(NodeError::Serve);
        let _ = stop_tx.send(true);
        let _ = follower.await;
        if let Some(d) = duties {
            let _ = d.await;
        }
        res
    }
}
