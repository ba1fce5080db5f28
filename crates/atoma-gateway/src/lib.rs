//! The gateway: one OpenAI-compatible endpoint with API keys in front of the network.
//!
//! Users call it with an API key instead of holding a ledger key and signing requests. The
//! gateway holds its own ledger key: it buys stacks per (task, node) as needed and signs
//! requests to nodes as their owner; it discovers nodes and their prices from the ledger, polls
//! their health and load, routes each request by price, measured speed, load, errors and
//! reputation, fails over to the next candidate, and checks every node signature before
//! passing an answer on. Each key's credit is charged the node's price plus a margin, exactly.
//!
//! Modules: `keys` (API keys, credits, holds: the gateway's own books), `ratelimit` (per-key
//! requests and tokens per minute), `routing` (node statistics, ejection, policies and
//! ranking), `registry` (nodes from the ledger, health and status polling), `stacks` (the stacks
//! the gateway owns and their spend), `proxy` (the HTTP surface, forwarding, failover,
//! signature checks), `books` (the one SQLite connection they share), `config`.

pub mod books;
pub mod config;
pub mod error;
pub mod keys;
pub mod proxy;
pub mod ratelimit;
pub mod registry;
pub mod routing;
pub mod stacks;

pub use config::GatewayConfig;
pub use error::GatewayError;
pub use proxy::{Gateway, router};

/// The process-wide Prometheus recorder, installed once (a second install in the same process,
/// as in tests with a node, renders an empty registry rather than failing).
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            match builder.install_recorder() {
                Ok(h) => h,
                Err(_) => metrics_exporter_prometheus::PrometheusBuilder::new()
                    .build_recorder()
                    .handle(),
            }
        })
        .clone()
}

/// Serves the gateway on `listener` until `shutdown` completes, keeping the registry fresh
/// meanwhile.
pub async fn serve(
    gw: std::sync::Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let registry = tokio::spawn(gw.registry.clone().run(
        std::time::Duration::from_millis(gw.cfg.ledger_poll_ms.max(50)),
        std::time::Duration::from_millis(gw.cfg.poll_ms.max(50)),
        stop_rx,
    ));
    let res = axum::serve(listener, router(gw))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = registry.await;
    res
}
