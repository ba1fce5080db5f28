//! `atoma sui-fake`: serve the Sui **test double** (`atoma_sui::fake`) on loopback: a gRPC
//! server speaking `sui.rpc.v2` that executes real signed transactions of the Atoma contract's
//! `db` module on the embedded ledger's semantics. For trying the Sui backend without a Sui
//! network; it is not a Sui node (no Move VM, no consensus, its chain lives in memory).

use std::path::PathBuf;

use anyhow::Context;
use atoma_ledger::{Amount, LedgerParams, SqliteLedger};
use atoma_sui::fake::{FakeSui, default_ids};

use crate::cmd::node::{Config, LedgerSection};
use crate::home::Home;

#[derive(Debug, clap::Args)]
pub struct SuiFakeArgs {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
    /// Holder of the AtomaManagerBadge: a key name in the home (created if missing) or an
    /// address.
    #[arg(long, default_value = "admin")]
    pub admin: String,
    /// Epoch length in milliseconds (0: epochs advance only when told).
    #[arg(long, default_value_t = 0)]
    pub epoch_ms: u64,
    /// Fund an address (or a key of the home) with USDC base units at start: `WHO=AMOUNT`.
    #[arg(long, value_name = "WHO=AMOUNT")]
    pub fund: Vec<String>,
    /// Write a node config whose `[ledger]` section points at this test double.
    #[arg(long)]
    pub config_out: Option<PathBuf>,
}

pub fn run(home: &Home, a: &SuiFakeArgs) -> anyhow::Result<()> {
    let admin = if a.admin.starts_with("0x") {
        home.address(&a.admin)?
    } else {
        crate::home::address_of(&home.key_or_new(&a.admin)?)
    };
    let params = LedgerParams {
        epoch_ms: a.epoch_ms,
        ..LedgerParams::default()
    };
    let dir = tempfile_dir()?;
    let ledger = SqliteLedger::open_with(&dir.join("ledger.db"), &params)?;
    let ids = default_ids(admin);
    let fake = FakeSui::start(ids.clone(), ledger, a.port)
        .with_context(|| format!("binding 127.0.0.1:{}", a.port))?;
    for f in &a.fund {
        let (who, amount) = f
            .split_once('=')
            .with_context(|| format!("--fund `{f}`: expected WHO=AMOUNT"))?;
        let amount: u64 = amount
            .parse()
            .with_context(|| format!("--fund `{f}`: the amount is not an integer"))?;
        let who = home.address(who)?;
        fake.faucet(who, Amount(amount))?;
        eprintln!("funded {who} with {amount}");
    }
    let section = LedgerSection {
        backend: "sui".into(),
        rpc_url: fake.url(),
        package_id: ids.package.to_string(),
        atoma_db: ids.db.to_string(),
        usdc_type: ids.usdc_type.clone(),
        contract: "extended".into(),
        admin: Some(admin.to_string()),
        ..LedgerSection::default()
    };
    let snippet = toml::to_string_pretty(&toml::Table::from_iter([(
        "ledger".to_string(),
        toml::Value::try_from(&section)?,
    )]))?;
    if let Some(out) = &a.config_out {
        let cfg = Config {
            ledger: section,
            ..Config::default()
        };
        std::fs::write(out, toml::to_string_pretty(&cfg)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{snippet}");
    eprintln!(
        "Sui test double (not a Sui node) serving sui.rpc.v2 at {}; admin {admin}. Ctrl-C stops it; its chain is in memory.",
        fake.url()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(tokio::signal::ctrl_c())?;
    drop(fake);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A private directory for the test double's embedded ledger.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("atoma-sui-fake-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
