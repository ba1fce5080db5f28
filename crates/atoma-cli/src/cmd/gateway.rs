//! `atoma gateway`: run the users' front door (`serve`) and manage its API keys (`keys`).
//!
//! The gateway's data lives under `--home`: its ledger key (`keys/gateway.keystore`, which
//! owns the stacks it buys and must hold USDC on the ledger), and `gateway.db` (API keys with
//! only their hashes, credits and holds, its stacks and their spend, kept answers). Settings
//! come from a TOML file (`[gateway]` keys, see `atoma_gateway::GatewayConfig`) and flags.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use atoma_gateway::keys::{KeyId, KeyStore, Limits};
use atoma_gateway::registry::Registry;
use atoma_gateway::stacks::StackBook;
use atoma_gateway::{Gateway, GatewayConfig};
use atoma_ledger::{Ledger, SqliteLedger};

use crate::home::{Home, address_of};

#[derive(Debug, clap::Subcommand)]
pub enum GatewayCommand {
    /// Serve the OpenAI-compatible API with API keys, routing requests to the network's nodes.
    Serve(ServeArgs),
    /// Manage API keys: create, list, revoke, credit, limits.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Settings (TOML with a `[gateway]` section); defaults apply to missing keys.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides the config).
    #[arg(long)]
    pub bind: Option<std::net::SocketAddr>,
    /// The gateway's ledger key (in <home>/keys).
    #[arg(long, default_value = "gateway")]
    pub key: String,
    /// Ledger file (default <home>/ledger.db).
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// A node config whose `[ledger]` section names the ledger (e.g. `backend = "sui"`); the
    /// gateway signs with `--key`.
    #[arg(long)]
    pub ledger_config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once (only a hash is stored).
    Create {
        #[arg(long)]
        name: String,
        /// Credit in USDC base units (1 000 000 = 1 USDC).
        #[arg(long, default_value_t = 0)]
        credit: u64,
        /// Requests per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rpm: u32,
        /// Tokens per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        tpm: u32,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key: it gets 401 from now on.
    Revoke { id: i64 },
    /// Add credit (USDC base units).
    Credit {
        id: i64,
        #[arg(long)]
        amount: u64,
    },
    /// Set a key's rate limits.
    Limits {
        id: i64,
        #[arg(long, default_value_t = 0)]
        rpm: u32,
        #[arg(long, default_value_t = 0)]
        tpm: u32,
    },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct File {
    gateway: GatewayConfig,
}

fn db_path(home: &Home) -> PathBuf {
    home.root.join("gateway.db")
}

pub fn run(home: &Home, cmd: GatewayCommand) -> anyhow::Result<()> {
    match cmd {
        GatewayCommand::Serve(a) => serve(home, &a),
        GatewayCommand::Keys(k) => keys(home, k),
    }
}

fn keys(home: &Home, cmd: KeysCommand) -> anyhow::Result<()> {
    std::fs::create_dir_all(&home.root)?;
    let store = KeyStore::open(&db_path(home)).context("opening the gateway's key store")?;
    let show = |v: &dyn erased::Show| println!("{}", v.show());
    match cmd {
        KeysCommand::Create {
            name,
            credit,
            rpm,
            tpm,
        } => {
            let limits = Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            };
            let (info, secret) = store.create(&name, credit, limits)?;
            eprintln!("API key `{name}` (shown once; only its hash is kept):");
            println!("{secret}");
            eprintln!("{}", serde_json::to_string_pretty(&info)?);
        }
        KeysCommand::List => show(&store.list()?),
        KeysCommand::Revoke { id } => show(&store.revoke(KeyId(id))?),
        KeysCommand::Credit { id, amount } => show(&store.credit(KeyId(id), amount)?),
        KeysCommand::Limits { id, rpm, tpm } => show(&store.set_limits(
            KeyId(id),
            Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            },
        )?),
    }
    Ok(())
}

fn serve(home: &Home, a: &ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<File>(&text)
                .with_context(|| format!("{} is not a valid gateway configuration", p.display()))?
                .gateway
        }
        None => GatewayConfig::default(),
    };
    if let Some(b) = a.bind {
        cfg.bind = b;
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    let signer = home.key(&a.key)?;
    let ledger_path = a.ledger.clone().unwrap_or_else(|| home.ledger_path());
    let ledger: Arc<dyn Ledger> = match &a.ledger_config {
        Some(c) => {
            let cfg = crate::cmd::node::Config::load(Some(c))?;
            crate::cmd::ledger::open(
                home,
                &cfg.ledger,
                &ledger_path,
                std::slice::from_ref(&signer),
            )?
        }
        None => Arc::new(SqliteLedger::open(&ledger_path)?),
    };
    let owner = address_of(&signer);
    let balance = ledger.balance(owner)?;
    let db = db_path(home);
    let books =
        atoma_gateway::books::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let keys = KeyStore::on(books.clone()).context("opening the gateway's key store")?;
    let stacks = StackBook::on(books.clone(), ledger.clone(), owner, cfg.stack_units)?;
    let registry = Arc::new(Registry::new(ledger));
    registry.refresh_ledger()?;
    let gw = Arc::new(Gateway::new(
        cfg.clone(),
        keys,
        registry,
        stacks,
        signer,
        books,
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.bind)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.bind))?;
        eprintln!(
            "atoma gateway on http://{} (ledger key {owner}, balance {} USDC base units, policy {:?})",
            listener.local_addr()?,
            balance.0,
            cfg.policy
        );
        if balance.0 == 0 {
            eprintln!(
                "warning: the gateway's ledger key holds no USDC, so it cannot buy stacks; fund \
                 {owner} (on a local ledger: `atoma db faucet --to {owner} --amount …`)"
            );
        }
        atoma_gateway::serve(gw, listener, async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down: finishing requests in flight");
        })
        .await
        .context("the gateway stopped")
    })
}

/// Pretty JSON of anything serializable, through a trait object.
mod erased {
    pub trait Show {
        fn show(&self) -> String;
    }

    impl<T: serde::Serialize> Show for T {
        fn show(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("<{e}>"))
        }
    }
}
