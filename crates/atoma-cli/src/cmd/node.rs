//! `atoma node run --config FILE`: one node on the embedded ledger with one model, with its
//! settlement and attestation duties; `atoma node status` and `atoma node settle` for the
//! operator (`node_ops`).
//!
//! The config is TOML with a section per component (see `config/node.example.toml`); every key
//! can be overridden by an environment variable `ATOMA__<SECTION>__<KEY>` (for example
//! `ATOMA__API__BIND=0.0.0.0:3000`). Unknown keys are errors, so typos do not pass silently.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use atoma_engine::{Engine, EngineConfig, LoadOptions};
use atoma_ledger::NodeSmallId;
use atoma_models::ModelStore;
use atoma_node::{EngineBackend, LoadingBackend, NodeParts, SettlementPolicy};
use atoma_state::meter::Meter;

use crate::home::{Home, address_of, hex_of};
use crate::progress;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub ledger: LedgerSection,
    pub api: ApiSection,
    pub engine: EngineSection,
    pub embedding: EmbeddingSection,
    pub settlement: SettlementSection,
}

/// An optional sentence-embedding model, served at `/v1/embeddings` beside the chat model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingSection {
    /// Model reference: a catalog name (`minilm`), a cached folder name or a model directory
    /// (`config.json`, `tokenizer.json`, `model.safetensors`); empty: no embeddings.
    pub model: String,
    /// Name the API serves it under (must match the Embedding task's model); default from the
    /// catalog (`all-minilm-l6-v2`) or the folder name.
    pub name: Option<String>,
    /// Compute threads (0: every core).
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementSection {
    /// Run the settlement and attestation duties.
    pub enabled: bool,
    /// Walrus publisher (or `atoma da serve`) URL for the logs; empty: a local directory,
    /// `<home>/da`.
    pub da_url: String,
    /// Walrus aggregator URL to read logs from; empty: `da_url`.
    pub da_aggregator: String,
    /// Settle a stack once this share of its units is used (percent).
    pub threshold_percent: u64,
    /// Settle a used stack idle for this long (seconds).
    pub idle_secs: u64,
    /// Time between duty rounds (milliseconds).
    pub tick_ms: u64,
    /// Pause after each settlement step (milliseconds; for tests, 0 otherwise).
    pub step_pause_ms: u64,
    /// Records an attestor re-executes per log (0: all).
    pub verify_sample: usize,
    /// Other nodes' API URLs by node small id (`"3" = "http://10.0.0.3:8080"`), where an
    /// attestor fetches a seller's signed commitment when the ledger records only a
    /// settlement's root (the deployed Sui contract). A node missing here is looked up by its
    /// public URL on the ledger.
    pub peers: BTreeMap<String, String>,
}

impl Default for SettlementSection {
    fn default() -> Self {
        Self {
            enabled: true,
            da_url: String::new(),
            da_aggregator: String::new(),
            threshold_percent: 95,
            idle_secs: 3_600,
            tick_ms: 500,
            step_pause_ms: 0,
            verify_sample: 0,
            peers: BTreeMap::new(),
        }
    }
}

impl SettlementSection {
    /// The policy and the DA store, or `None` when the duties are off.
    pub fn build(
        &self,
        home: &Home,
    ) -> anyhow::Result<(Option<Arc<dyn atoma_da::BlobStore>>, SettlementPolicy)> {
        let mut peers = BTreeMap::new();
        for (id, url) in &self.peers {
            let n: u64 = id.parse().map_err(|_| {
                anyhow::anyhow!("[settlement] peers: `{id}` is not a node small id (a number)")
            })?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("[settlement] peers: node {n}'s URL `{url}` is not an http(s) URL");
            }
            peers.insert(n, url.clone());
        }
        let policy = SettlementPolicy {
            threshold_permille: self.threshold_percent * 10,
            idle: Duration::from_secs(self.idle_secs),
            tick: Duration::from_millis(self.tick_ms.max(10)),
            step_pause: Duration::from_millis(self.step_pause_ms),
            verify_sample: self.verify_sample,
            peers,
            ..SettlementPolicy::default()
        };
        if !self.enabled {
            return Ok((None, policy));
        }
        let da: Arc<dyn atoma_da::BlobStore> = if self.da_url.is_empty() {
            let dir = home.root.join("da");
            Arc::new(
                atoma_da::DirStore::open(&dir)
                    .with_context(|| format!("opening the log store {}", dir.display()))?,
            )
        } else {
            let mut cfg = atoma_da::WalrusConfig::with_url(self.da_url.clone());
            if !self.da_aggregator.is_empty() {
                cfg.aggregator = self.da_aggregator.clone();
            }
            Arc::new(atoma_da::WalrusClient::new(cfg))
        };
        Ok((Some(da), policy))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Name of the node's key in <home>/keys.
    pub key: String,
    /// Node small ids this node answers for; empty: every node the key registered.
    pub small_ids: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// `local` (embedded SQLite) or `sui` (the Atoma contract on Sui, over gRPC).
    pub backend: String,
    /// Ledger file (default <home>/ledger.db); `local` only.
    pub path: Option<PathBuf>,
    pub poll_interval_ms: u64,
    /// `sui`: the full node's gRPC URL, e.g. `https://fullnode.testnet.sui.io:443`.
    pub rpc_url: String,
    /// `sui`: the Atoma package calls go to (its latest version).
    pub package_id: String,
    /// `sui`: the package's original id, which names its event types (default: `package_id`).
    pub original_package_id: Option<String>,
    /// `sui`: the shared `AtomaDb` object.
    pub atoma_db: String,
    /// `sui`: the USDC coin type (`0x…::usdc::USDC`).
    pub usdc_type: String,
    /// `sui`: gas budget per transaction, in MIST.
    pub gas_budget: u64,
    /// `sui`: a Sui CLI keystore whose keys may sign besides the node's own key.
    pub keystore: Option<PathBuf>,
    /// `sui`: the local index of the chain's events (default <home>/sui-index.db).
    pub index_path: Option<PathBuf>,
    /// `sui`: `deployed` (the published contract) or `extended` (with our settlement
    /// additions, as the test double runs them).
    pub contract: String,
    /// `sui`: the AtomaManagerBadge holder's address, for whitelisting.
    pub admin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    pub bind: SocketAddr,
    /// Where users and gateways reach this node (`http(s)://host:port`); announced on the
    /// ledger at start when set.
    pub public_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Model reference: path, catalog name, cached name or hf:<org>/<repo>/<file>.gguf.
    pub model: String,
    /// Name the API serves it under (must match the task's model); default from the catalog.
    pub name: Option<String>,
    pub max_context: usize,
    /// Requests that may wait to start; one more gets HTTP 429.
    pub queue_capacity: usize,
    /// Requests generating at once (continuous batching).
    pub max_num_seqs: usize,
    /// Tokens per forward pass (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Paged KV cache memory in MiB (at least one full context is always allocated).
    pub kv_cache_mib: usize,
    /// Compute a prompt prefix shared by several requests once.
    pub prefix_caching: bool,
    /// KV cache element type: `f16` (half the memory and memory traffic) or `f32`.
    pub kv_dtype: atoma_engine::KvDtype,
    /// CPU kernel: `auto` (the best this CPU has), `avx512-vnni`, `avx2` or `scalar`; the same
    /// bits either way, only speed differs.
    pub kernel: atoma_engine::KernelChoice,
    /// Prompt tokens in a step that also decodes (0: no cap): a long prompt is cut into short
    /// chunks so that the running streams' next tokens are not held up.
    pub max_prefill_while_decoding: usize,
    /// Most choices one request may ask for (`n`, times the prompts of a completions list);
    /// they share the prompt's KV but each decodes.
    pub max_n: u32,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            key: "node".into(),
            small_ids: Vec::new(),
        }
    }
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            backend: "local".into(),
            path: None,
            poll_interval_ms: 250,
            rpc_url: String::new(),
            package_id: String::new(),
            original_package_id: None,
            atoma_db: String::new(),
            usdc_type: String::new(),
            gas_budget: 50_000_000,
            keystore: None,
            index_path: None,
            contract: "deployed".into(),
            admin: None,
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 3000)),
            public_url: None,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            model: "default".into(),
            name: None,
            max_context: 4096,
            queue_capacity: 64,
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            kv_cache_mib: 512,
            prefix_caching: true,
            kv_dtype: atoma_engine::KvDtype::default(),
            kernel: atoma_engine::KernelChoice::Auto,
            max_prefill_while_decoding: 32,
            max_n: atoma_api::openai::DEFAULT_MAX_N,
        }
    }
}

impl Config {
    /// Reads `path` (if given), applies `ATOMA__SECTION__KEY` overrides, validates.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let mut table: toml::Table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                text.parse()
                    .with_context(|| format!("{} is not valid TOML", p.display()))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in std::env::vars() {
            let Some(rest) = k.strip_prefix("ATOMA__") else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            let [section, key] = parts.as_slice() else {
                bail!("environment variable {k}: expected ATOMA__<SECTION>__<KEY>");
            };
            let value = format!("x = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or(toml::Value::String(v.clone()));
            table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("[{section}] is not a section"))?
                .insert(key.clone(), value);
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid node configuration")?;
        if !matches!(cfg.ledger.backend.as_str(), "local" | "sui") {
            bail!(
                "[ledger] backend = \"{}\": expected \"local\" (embedded SQLite) or \"sui\"",
                cfg.ledger.backend
            );
        }
        if cfg.ledger.backend == "sui" {
            for (what, v) in [
                ("rpc_url", &cfg.ledger.rpc_url),
                ("package_id", &cfg.ledger.package_id),
                ("atoma_db", &cfg.ledger.atoma_db),
                ("usdc_type", &cfg.ledger.usdc_type),
            ] {
                if v.is_empty() {
                    bail!("[ledger] backend = \"sui\" needs `{what}`");
                }
            }
            if !matches!(cfg.ledger.contract.as_str(), "deployed" | "extended") {
                bail!(
                    "[ledger] contract = \"{}\": expected \"deployed\" or \"extended\"",
                    cfg.ledger.contract
                );
            }
        }
        if cfg.engine.max_context < 16 || cfg.engine.queue_capacity == 0 {
            bail!("engine.max_context must be at least 16 and engine.queue_capacity at least 1");
        }
        if !(1..=atoma_api::openai::MAX_N).contains(&cfg.engine.max_n) {
            bail!(
                "engine.max_n must be between 1 and {}",
                atoma_api::openai::MAX_N
            );
        }
        if cfg.engine.max_num_seqs == 0 || cfg.engine.max_num_batched_tokens == 0 {
            bail!("engine.max_num_seqs and engine.max_num_batched_tokens must be at least 1");
        }
        if !(1..=100).contains(&cfg.settlement.threshold_percent) {
            bail!("settlement.threshold_percent must be between 1 and 100");
        }
        Ok(cfg)
    }

    /// The embedding model name served for this config, if any.
    pub fn served_embedding_name(&self) -> Option<String> {
        if self.embedding.model.is_empty() {
            return None;
        }
        Some(
            self.embedding
                .name
                .clone()
                .unwrap_or_else(|| served_name_of(&self.embedding.model)),
        )
    }

    /// The model name served for this config.
    pub fn served_name(&self) -> String {
        self.engine
            .name
            .clone()
            .unwrap_or_else(|| served_name_of(&self.engine.model))
    }
}

/// The API name of a model reference: a catalog model's short name, else the file stem.
pub fn served_name_of(reference: &str) -> String {
    if let Some(e) = atoma_models::find_in_catalog(reference) {
        return e.names.get(1).unwrap_or(&e.names[0]).to_string();
    }
    Path::new(reference).file_stem().map_or_else(
        || reference.to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Node configuration (TOML); defaults apply to missing keys.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Run the node: follow the ledger, serve the OpenAI-compatible API, settle and attest.
    Run(RunArgs),
    /// Show the node's stacks, pending settlements and attestations, earnings, collateral and
    /// reputation (reads the node's state file and the ledger; works while the node runs).
    Status(crate::cmd::node_ops::StatusArgs),
    /// Ask the running node to settle a stack now (it freezes, logs, and opens the ticket at
    /// its next round).
    Settle(crate::cmd::node_ops::SettleArgs),
}

pub fn run(home: &Home, store: &ModelStore, cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Run(a) => {
            let cfg = Config::load(a.config.as_deref())?;
            serve(home, store, &cfg)
        }
        NodeCommand::Status(a) => crate::cmd::node_ops::status(home, &a),
        NodeCommand::Settle(a) => crate::cmd::node_ops::settle(home, &a),
    }
}

/// The node's state file: `<home>/state.db` unless the config names a state directory.
pub fn state_path(home: &Home) -> PathBuf {
    home.state_path()
}

/// Loads the model, opens ledger and state, and serves until Ctrl-C.
pub fn serve(home: &Home, store: &ModelStore, cfg: &Config) -> anyhow::Result<()> {
    let key = home.key(&cfg.node.key)?;
    let ledger_path = cfg
        .ledger
        .path
        .clone()
        .unwrap_or_else(|| home.ledger_path());
    let ledger =
        crate::cmd::ledger::open(home, &cfg.ledger, &ledger_path, std::slice::from_ref(&key))?;
    let ids: Vec<NodeSmallId> = if cfg.node.small_ids.is_empty() {
        ledger
            .nodes_of(address_of(&key))?
            .into_iter()
            .map(|n| n.small_id)
            .collect()
    } else {
        cfg.node.small_ids.iter().map(|&i| NodeSmallId(i)).collect()
    };
    if ids.is_empty() {
        bail!(
            "key `{}` ({}) has no node on the ledger; run `atoma db register-node --key {}`",
            cfg.node.key,
            hex_of(&key),
            cfg.node.key
        );
    }
    let path = store.resolve(&cfg.engine.model)?;
    let opts = LoadOptions {
        max_context: Some(cfg.engine.max_context),
    };
    let name = cfg.served_name();
    let embedding = match cfg.served_embedding_name() {
        Some(ename) => Some((
            store
                .resolve(&cfg.embedding.model)
                .context("the embedding model")?,
            ename,
        )),
        None => None,
    };
    if let Some(url) = &cfg.api.public_url {
        for id in &ids {
            if ledger.node(*id)?.public_url.as_deref() != Some(url) {
                match ledger.set_node_public_url(address_of(&key), *id, url) {
                    Ok(_) => {}
                    Err(e @ atoma_ledger::LedgerError::NotSupported(_)) => tracing::warn!(
                        node = %id, error = %e,
                        "the ledger cannot record the node's public URL; attestors need it in \
                         their `[settlement] peers`"
                    ),
                    Err(e) => {
                        return Err(anyhow::Error::from(e)
                            .context(format!("announcing node {id}'s URL {url}")));
                    }
                }
            }
        }
    }
    let state = Meter::open(&state_path(home), ids.clone())?;
    let (da, policy) = cfg.settlement.build(home)?;
    // Bind first and answer 503 while the model loads on another thread.
    let backend = LoadingBackend::new(vec![name.clone()])
        .with_embedding_models(embedding.iter().map(|(_, n)| n.clone()).collect());
    let embed_threads = cfg.embedding.threads;
    let max_n = cfg.engine.max_n;
    let reexec = atoma_node::ReexecSlot::default();
    let parts = NodeParts {
        backend: Arc::new(backend.clone()),
        ledger,
        state,
        keys: key.clone(),
        bind: cfg.api.bind,
        poll_interval: Duration::from_millis(cfg.ledger.poll_interval_ms.max(10)),
        da,
        policy,
        reexec: Some(Arc::new(reexec.clone())),
    };
    let engine_cfg = EngineConfig {
        queue_capacity: cfg.engine.queue_capacity,
        max_num_seqs: cfg.engine.max_num_seqs,
        max_num_batched_tokens: cfg.engine.max_num_batched_tokens,
        kv_cache_mib: cfg.engine.kv_cache_mib,
        enable_prefix_caching: cfg.engine.prefix_caching,
        kv_dtype: cfg.engine.kv_dtype,
        kernel: cfg.engine.kernel,
        max_prefill_while_decoding: cfg.engine.max_prefill_while_decoding,
        ..EngineConfig::default()
    };
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let load_name = name.clone();
    let loader = move || {
        let res = progress::load_model(&path, &opts).and_then(|lm| {
            let info = format!(
                "{} ({:?}, {} layers)",
                lm.info.name, lm.info.config.arch, lm.info.config.n_layers
            );
            let digest = atoma_models::sha256_file(&path)?;
            let engine = Engine::start(lm, &engine_cfg)?;
            let mut eb =
                EngineBackend::new(engine, load_name.clone(), digest).with_max_choices(max_n);
            if let Some((dir, ename)) = &embedding {
                let opts = atoma_embed::EmbedOptions {
                    threads: (embed_threads > 0).then_some(embed_threads),
                    model_id: Some(ename.clone()),
                    ..atoma_embed::EmbedOptions::default()
                };
                let e = atoma_embed::Embedder::load_with(dir, &opts)
                    .with_context(|| format!("loading the embedding model {}", dir.display()))?;
                eprintln!(
                    "embedding model loaded: {ename} ({} dimensions, {} compute threads)",
                    e.dimensions(),
                    e.threads()
                );
                eb = eb.with_embedder(e, ename.clone());
            }
            let eb = Arc::new(eb);
            backend.set(eb.clone());
            reexec.set(eb);
            eprintln!(
                "model loaded: {info}, served as `{load_name}`, kernel {}",
                atoma_engine::cpu_matmul_kernel()
            );
            Ok(())
        });
        let _ = loaded_tx.send(res);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let bound = atoma_node::bind(parts).await?;
        let addr = bound.local_addr().context("no local address")?;
        std::thread::Builder::new()
            .name("model-loader".into())
            .spawn(loader)?;
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        eprintln!(
            "atoma node {} serving `{name}` on http://{addr} (node ids {}, signing key {})",
            env!("CARGO_PKG_VERSION"),
            ids.join(","),
            hex_of(&key)
        );
        let (load_failed_tx, load_failed) = tokio::sync::oneshot::channel::<anyhow::Error>();
        std::thread::spawn(move || {
            if let Ok(Err(e)) = loaded_rx.recv() {
                let _ = load_failed_tx.send(e);
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(bound.serve(async {
            let _ = stop_rx.await;
        }));
        let outcome = tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("shutting down: finishing requests in flight");
                Ok(())
            }
            Ok(e) = load_failed => Err(e.context("loading the model")),
        };
        let _ = stop_tx.send(());
        server.await.context("the server task failed")??;
        outcome
    })
}
