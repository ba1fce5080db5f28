//! `atoma devnet`: a local network on one machine. `up` makes one embedded ledger (a short
//! epoch, SamplingConsensus always attested), one `atoma da serve`, and N node processes on
//! loopback, each with its own key, home and collateral, registered and subscribed to a
//! NoSecurity and a SamplingConsensus task at different prices, a funded user with a stack on
//! each task, and a gateway (its own funded ledger key, an API key with credit); it writes
//! `DIR/devnet.json` for scripts and tests, prints what runs where, and stops every child
//! cleanly on Ctrl-C (or SIGTERM). `status` shows nodes, stacks, tickets and
//! balances from the ledger.
//!
//! Layout of `DIR` (`--home`, default `<home>/devnet`): `ledger.db`, `da/`, `keys/` (user and
//! admin), `nodes/node-<i>/` (each node's home: key, state, config, log), `devnet.json`.

mod processes;
mod setup;
mod status;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::home::Home;

#[derive(Debug, clap::Subcommand)]
pub enum DevnetCommand {
    /// Set up (or reuse) and run a local network: ledger, DA server, N nodes.
    Up(UpArgs),
    /// Show the devnet's nodes, stacks, tickets and balances.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Model every node serves (a catalog name is pulled if needed).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// First loopback port: the DA server takes it, node i takes the next ones
    /// (0: free ports chosen by the system).
    #[arg(long, default_value_t = 3100)]
    pub port_base: u16,
    /// Length of a ledger epoch in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub epoch_ms: u64,
    /// Epochs after a settlement during which attestors may attest or dispute. Attestors
    /// re-execute the stack's requests in that time, and a ticket opened late in an epoch has
    /// one epoch less, so leave room.
    #[arg(long, default_value_t = 5)]
    pub dispute_window_epochs: u64,
    /// Compute units of each stack bought for the user.
    #[arg(long, default_value_t = 100_000)]
    pub stack_units: u64,
    /// Compute threads per node.
    #[arg(long, default_value_t = 1)]
    pub node_threads: usize,
    /// Settle a stack once this share of its units is used (percent).
    #[arg(long, default_value_t = 95)]
    pub threshold_percent: u64,
    /// CPU kernel of each node, cycled (e.g. `auto,avx2,scalar`: attestors on other vector
    /// levels than the seller; outputs are the same bits on every level).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub kernels: Vec<atoma_engine::KernelChoice>,
    /// Records an attestor re-executes per stack log (0: all).
    #[arg(long, default_value_t = 0)]
    pub verify_sample: usize,
    /// Settle a used stack idle for this long (seconds).
    #[arg(long, default_value_t = 3_600)]
    pub idle_secs: u64,
    /// Routing policy of the gateway: cheapest, fastest, balanced or random.
    #[arg(long, default_value = "balanced")]
    pub gateway_policy: String,
    /// Set everything up and write devnet.json, but start nothing.
    #[arg(long)]
    pub no_run: bool,
    /// The ledger: `local` (one embedded SQLite file) or `sui-fake` (the Sui test double in
    /// this process, over the same books: nodes, gateway and scripts talk Sui's gRPC wire).
    #[arg(long, default_value = "local", value_parser = ["local", "sui-fake"])]
    pub ledger: String,
    /// With `--ledger sui-fake`: the contract the nodes call. `deployed` sends only the
    /// published package's calls (a settlement records its root alone; attestors fetch the
    /// seller's signed commitment from the `[settlement] peers` each node is given); `extended`
    /// adds ours (collateral, dispute resolution, the log's location on the ticket). The
    /// devnet's own setup (funds, collateral, URLs) uses the test double's extended calls.
    #[arg(long, default_value = "extended", value_parser = ["extended", "deployed"])]
    pub contract: String,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `DIR/devnet.json`: everything a script needs to drive the devnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevnetFile {
    /// The shared ledger file.
    pub ledger: PathBuf,
    pub da_url: String,
    /// The DA server's blob directory.
    pub da_dir: PathBuf,
    /// The model name the API serves and the tasks name.
    pub model: String,
    /// The GGUF every node loads.
    pub model_path: PathBuf,
    pub epoch_ms: u64,
    pub dispute_window_epochs: u64,
    pub tasks: Tasks,
    pub nodes: Vec<NodeEntry>,
    pub user: UserEntry,
    pub stacks: Vec<StackEntry>,
    /// The gateway's OpenAI-compatible URL and an API key with credit.
    pub gateway_url: String,
    pub gateway_api_key: String,
    /// `--ledger sui-fake`: a config whose `[ledger]` section reaches the test double, for
    /// `atoma db --config` and scripts (the `ledger` file above stays the double's books).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_config: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tasks {
    pub no_security: u64,
    pub sampling_consensus: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub small_id: u64,
    pub url: String,
    /// The node's own home (keys, state, config, log).
    pub home: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Key name within the node's home.
    pub key: String,
    pub address: String,
    /// USDC base units per million compute units, on both tasks.
    pub price: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserEntry {
    /// Key name within the devnet's home (`DIR/keys/<key>.keystore`).
    pub key: String,
    pub keystore: PathBuf,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackEntry {
    pub small_id: u64,
    pub task: u64,
    pub selected_node: u64,
    pub units: u64,
    /// The selected node's URL.
    pub url: String,
}

impl DevnetFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("devnet.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            anyhow::anyhow!(
                "no devnet in {} ({e}); start one with `atoma devnet up`",
                dir.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join("devnet.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, Self::path(dir))?;
        Ok(())
    }
}

/// The devnet's directory: `--home` as given, else `<home>/devnet` … `--home` is global, so a
/// devnet always lives in the home the user names.
fn devnet_dir(home: &Home) -> PathBuf {
    home.root.clone()
}

pub fn run(
    home: &Home,
    store: &atoma_models::ModelStore,
    cmd: DevnetCommand,
) -> anyhow::Result<()> {
    let dir = devnet_dir(home);
    match cmd {
        DevnetCommand::Up(a) => {
            if a.contract != "extended" && a.ledger != "sui-fake" {
                anyhow::bail!("--contract {} needs --ledger sui-fake", a.contract);
            }
            if a.no_run && a.ledger == "sui-fake" {
                anyhow::bail!(
                    "--ledger sui-fake runs the Sui test double inside `devnet up`; drop --no-run"
                );
            }
            // The test double (if any) lives until the devnet stops.
            let (net, _fake) = setup::set_up(&dir, store, &a)?;
            setup::print_summary(&dir, &net);
            if a.no_run {
                return Ok(());
            }
            processes::run(&dir, &net, &a)
        }
        DevnetCommand::Status(a) => status::print(&dir, a.json),
    }
}
