//! Opening the configured ledger: the embedded SQLite file, or the Atoma contract on Sui
//! (`[ledger] backend = "sui"`), signing with the node's key and any keys of a Sui CLI keystore.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use atoma_crypto::Keypair;
use atoma_ledger::{Address, Ledger, SqliteLedger};
use atoma_sui::keys::Signers;
use atoma_sui::{Flavor, SuiConfig, SuiLedger};

use crate::cmd::node::LedgerSection;
use crate::home::Home;

fn sui_id(what: &str, s: &str) -> anyhow::Result<atoma_sui::SuiAddress> {
    if s.is_empty() {
        bail!("[ledger] backend = \"sui\" needs `{what}`");
    }
    let a: Address = s
        .parse()
        .map_err(|e: String| anyhow::anyhow!("[ledger] {what}: {e}"))?;
    Ok(atoma_sui::SuiAddress::new(a.0))
}

/// The Sui configuration of a `[ledger]` section.
pub fn sui_config(home: &Home, l: &LedgerSection) -> anyhow::Result<SuiConfig> {
    if l.rpc_url.is_empty() {
        bail!("[ledger] backend = \"sui\" needs `rpc_url` (the full node's gRPC URL)");
    }
    if l.usdc_type.is_empty() {
        bail!("[ledger] backend = \"sui\" needs `usdc_type` (e.g. 0x…::usdc::USDC)");
    }
    let package_id = sui_id("package_id", &l.package_id)?;
    let flavor = match l.contract.as_str() {
        "deployed" => Flavor::Deployed,
        "extended" => Flavor::Extended,
        other => bail!("[ledger] contract = \"{other}\": expected \"deployed\" or \"extended\""),
    };
    Ok(SuiConfig {
        rpc_url: l.rpc_url.clone(),
        package_id,
        original_package_id: match &l.original_package_id {
            Some(o) => sui_id("original_package_id", o)?,
            None => package_id,
        },
        atoma_db: sui_id("atoma_db", &l.atoma_db)?,
        usdc_type: l.usdc_type.clone(),
        gas_budget: l.gas_budget,
        index_path: Some(
            l.index_path
                .clone()
                .unwrap_or_else(|| home.root.join("sui-index.db")),
        ),
        admin: match &l.admin {
            Some(a) => Some(
                a.parse::<Address>()
                    .map_err(|e| anyhow::anyhow!("[ledger] admin: {e}"))?,
            ),
            None => None,
        },
        flavor,
        timeout: std::time::Duration::from_secs(60),
    })
}

/// Opens the ledger the section names; `path` is the SQLite file of the local backend.
pub fn open(
    home: &Home,
    l: &LedgerSection,
    path: &Path,
    keys: &[Keypair],
) -> anyhow::Result<Arc<dyn Ledger>> {
    match l.backend.as_str() {
        "local" | "sqlite" => Ok(Arc::new(
            SqliteLedger::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        "sui" => {
            let cfg = sui_config(home, l)?;
            let mut signers = match &l.keystore {
                Some(p) => Signers::from_keystore(p)
                    .map_err(|e| anyhow::anyhow!("[ledger] keystore {}: {e}", p.display()))?,
                None => Signers::default(),
            };
            for k in keys {
                signers.insert(k);
            }
            let url = cfg.rpc_url.clone();
            Ok(Arc::new(SuiLedger::connect(cfg, signers).with_context(
                || format!("connecting to the Sui ledger at {url}"),
            )?))
        }
        other => bail!("[ledger] backend = \"{other}\": expected \"local\" or \"sui\""),
    }
}
