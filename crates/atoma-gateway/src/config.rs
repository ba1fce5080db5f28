//! The gateway's settings (the `[gateway]` TOML the CLI reads; every key has a default).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::routing::Policy;

/// Gateway settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the OpenAI-compatible API.
    pub bind: SocketAddr,
    /// How nodes are ranked when the request does not say (`X-Atoma-Routing`).
    pub policy: Policy,
    /// Nodes tried per request, in ranked order, before giving up (failover).
    pub max_candidates: usize,
    /// What the gateway adds to the node's price, in permille (100 = 10%).
    pub margin_permille: u64,
    /// Compute units of each stack the gateway buys.
    pub stack_units: u64,
    /// The most the gateway pays per million compute units (nodes asking more are not used).
    pub price_cap: u64,
    /// Output tokens assumed for a request that gives no `max_tokens` (credit hold).
    pub default_max_tokens: u64,
    /// How often nodes' `/health` and `/v1/node/status` are polled (milliseconds).
    pub poll_ms: u64,
    /// How often the ledger is read for nodes, tasks, subscriptions and prices (milliseconds).
    pub ledger_poll_ms: u64,
    /// Time allowed for a node to answer (and, when streaming, between chunks), in seconds.
    pub node_timeout_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 4100)),
            policy: Policy::Balanced,
            max_candidates: 3,
            margin_permille: 100,
            stack_units: 100_000,
            price_cap: 10_000,
            default_max_tokens: 512,
            poll_ms: 1_000,
            ledger_poll_ms: 1_000,
            node_timeout_secs: 300,
        }
    }
}

impl GatewayConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_candidates == 0 {
            return Err("max_candidates must be at least 1".into());
        }
        if self.stack_units == 0 || self.price_cap == 0 {
            return Err("stack_units and price_cap must be positive".into());
        }
        if self.margin_permille > 10_000 {
            return Err("margin_permille must be at most 10000 (100x)".into());
        }
        Ok(())
    }
}
