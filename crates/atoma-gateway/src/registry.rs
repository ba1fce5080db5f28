//! Nodes as the gateway knows them.
//!
//! From the ledger (re-read every `ledger_poll_ms`): registered nodes with a public URL, tasks
//! and the model each serves, and every node's subscription price per task. From the nodes
//! themselves (every `poll_ms`): `GET /v1/node/status` (readiness, running and waiting requests,
//! KV use, recent TTFT and TPOT); a failed poll counts against the node. From the gateway's own
//! requests: measured latencies and failures (`routing::NodeStats`, one per node, behind one
//! lock held only for short, synchronous updates).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use atoma_ledger::{Address, Ledger, SecurityLevel, TaskRole, TaskSmallId};

use crate::routing::NodeStats;

/// A node the gateway may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub small_id: u64,
    /// Base URL without a trailing slash.
    pub url: String,
    /// Its signing address (every answer must be signed by it).
    pub owner: Address,
    pub reputation: u8,
}

/// A node's offer on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub task: TaskSmallId,
    pub node: u64,
    pub price_per_million: u64,
}

/// One reading of the ledger.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: HashMap<u64, NodeInfo>,
    /// Usable tasks per model name and role (ConfidentialCompute tasks need end-to-end
    /// encryption the gateway does not do; deprecated tasks sell no stacks).
    pub tasks: HashMap<(String, TaskRole), Vec<TaskSmallId>>,
    pub offers: HashMap<TaskSmallId, Vec<Offer>>,
}

impl Snapshot {
    /// Model names served, by role.
    pub fn models(&self) -> Vec<(String, TaskRole)> {
        let mut m: Vec<_> = self
            .tasks
            .keys()
            .filter(|k| {
                self.tasks[*k]
                    .iter()
                    .any(|t| self.offers.get(t).is_some_and(|o| !o.is_empty()))
            })
            .cloned()
            .collect();
        m.sort_by(|a, b| a.0.cmp(&b.0));
        m
    }

    /// The offers that can serve `model` in `role` at no more than `price_cap`, from nodes with a
    /// known URL.
    pub fn offers_for(
        &self,
        model: &str,
        role: TaskRole,
        price_cap: u64,
    ) -> Vec<(Offer, &NodeInfo)> {
        let Some(tasks) = self.tasks.get(&(model.to_string(), role)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in tasks {
            for o in self.offers.get(t).into_iter().flatten() {
                if o.price_per_million <= price_cap
                    && let Some(n) = self.nodes.get(&o.node)
                {
                    out.push((*o, n));
                }
            }
        }
        out
    }
}

/// The registry: the latest ledger snapshot and every node's statistics.
pub struct Registry {
    ledger: Arc<dyn Ledger>,
    snapshot: RwLock<Arc<Snapshot>>,
    stats: Mutex<HashMap<u64, NodeStats>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("nodes", &self.snapshot().nodes.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
        Self {
            ledger,
            snapshot: RwLock::default(),
            stats: Mutex::default(),
            http: reqwest::Client::new(),
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Re-reads the ledger (blocking).
    pub fn refresh_ledger(&self) -> Result<(), atoma_ledger::LedgerError> {
        let mut snap = Snapshot::default();
        for n in self.ledger.nodes()? {
            if n.is_disabled {
                continue;
            }
            if let Some(url) = n.public_url {
                snap.nodes.insert(
                    n.small_id.0,
                    NodeInfo {
                        small_id: n.small_id.0,
                        url: url.trim_end_matches('/').to_string(),
                        owner: n.owner,
                        reputation: n.reputation_score,
                    },
                );
            }
        }
        for t in self.ledger.tasks()? {
            let usable = !t.is_deprecated && t.security_level != SecurityLevel::ConfidentialCompute;
            let Some(model) = t.model_name.clone().filter(|_| usable) else {
                continue;
            };
            snap.tasks
                .entry((model, t.role))
                .or_default()
                .push(t.small_id);
            let offers = self
                .ledger
                .subscriptions(t.small_id)?
                .into_iter()
                .map(|s| Offer {
                    task: t.small_id,
                    node: s.node_small_id.0,
                    price_per_million: s.price_per_one_million_compute_units.0,
                })
                .collect();
            snap.offers.insert(t.small_id, offers);
        }
        if let Ok(mut s) = self.snapshot.write() {
            *s = Arc::new(snap);
        }
        Ok(())
    }

    /// Runs `f` on `node`'s statistics.
    pub fn with_stats<R>(&self, node: u64, f: impl FnOnce(&mut NodeStats) -> R) -> R {
        let mut all = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(node).or_default())
    }

    /// How many nodes of the snapshot may be tried now (not ejected, or on probation).
    pub fn available(&self) -> usize {
        let snap = self.snapshot();
        let stats = self.stats();
        let now = Instant::now();
        snap.nodes
            .keys()
            .filter(|id| stats.get(id).is_none_or(|s| s.available(now)))
            .count()
    }

    /// A copy of every node's statistics.
    pub fn stats(&self) -> HashMap<u64, NodeStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Polls every node's `/v1/node/status` once, concurrently, except nodes resting
    /// ([`NodeStats::poll_due`]): a node under an ordinary ejection is polled every
    /// [`crate::routing::RESTING_POLL_EVERY`] whatever its backoff, one ejected for a bad
    /// signature not until its backoff ends.
    pub async fn poll_nodes(&self, timeout: Duration) {
        let snap = self.snapshot();
        let now = Instant::now();
        let stats = self.stats();
        let resting = |id: u64| stats.get(&id).is_some_and(|s| !s.poll_due(now));
        let polls = snap
            .nodes
            .values()
            .filter(|n| !resting(n.small_id))
            .map(|n| {
                let url = format!("{}/v1/node/status", n.url);
                let id = n.small_id;
                async move {
                    let res = self.http.get(&url).timeout(timeout).send().await;
                    let body = match res {
                        Ok(r) if r.status().is_success() => {
                            r.json::<serde_json::Value>().await.ok()
                        }
                        _ => None,
                    };
                    (id, body)
                }
            });
        let results = futures_util::future::join_all(polls).await;
        let now = Instant::now();
        for (id, body) in results {
            self.with_stats(id, |s| match body {
                Some(b) if b["ready"] == true => {
                    let load = &b["load"];
                    let used = load["kv_blocks_used"].as_f64().unwrap_or(0.0);
                    let total = load["kv_blocks_total"].as_f64().unwrap_or(0.0);
                    let kv = if total > 0.0 { used / total } else { 0.0 };
                    s.record_health(true, now);
                    s.record_status(
                        load["running"].as_u64().unwrap_or(0) as u32,
                        load["waiting"].as_u64().unwrap_or(0) as u32,
                        kv as f32,
                        b["ttft_seconds"].as_f64().unwrap_or(0.0),
                        b["tpot_seconds"].as_f64().unwrap_or(0.0),
                        now,
                    );
                }
                _ => s.record_health(false, now),
            });
        }
    }

    /// Keeps the snapshot and the statistics fresh until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        ledger_every: Duration,
        poll_every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_ledger = None::<Instant>;
        loop {
            if last_ledger.is_none_or(|t| t.elapsed() >= ledger_every) {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.refresh_ledger()).await {
                    Ok(Ok(())) => last_ledger = Some(Instant::now()),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the ledger; retrying"),
                    Err(e) => tracing::error!(error = %e, "ledger refresh panicked"),
                }
            }
            self.poll_nodes(poll_every.max(Duration::from_millis(200)))
                .await;
            tokio::select! {
                _ = tokio::time::sleep(poll_every) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
