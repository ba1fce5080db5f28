//! Operator commands on a node's state: `atoma node status` (stacks and their settlement,
//! pending attestations, earnings, collateral, reputation) and `atoma node settle --stack N`.
//! Both read the node's state file and the ledger directly, so they work whether the node runs
//! or not, and never touch a running node's reservations.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use atoma_ledger::{Ledger, NodeSmallId, StackSmallId};
use atoma_state::meter::Meter;

use crate::cmd::node::{Config, state_path};
use crate::home::{Home, address_of};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The node's configuration (for its key, ledger and node ids).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the report as JSON (the same as `GET /operator/status`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SettleArgs {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The stack to settle.
    #[arg(long)]
    pub stack: u64,
}

fn open(home: &Home, config: Option<&std::path::Path>) -> anyhow::Result<(Arc<dyn Ledger>, Meter)> {
    let cfg = Config::load(config)?;
    let ledger_path = cfg
        .ledger
        .path
        .clone()
        .unwrap_or_else(|| home.ledger_path());
    let key = home.key(&cfg.node.key)?;
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
    let state = Meter::attach(&state_path(home), ids).context("opening the node's state")?;
    Ok((ledger, state))
}

pub fn status(home: &Home, a: &StatusArgs) -> anyhow::Result<()> {
    let (ledger, state) = open(home, a.config.as_deref())?;
    let r =
        atoma_node::operator::status_report(ledger.as_ref(), &state).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("epoch {}", r["epoch"]);
    for n in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "node {}: collateral {}, reputation {} (settled {}, attested {}, missed {}, disputes lost {})",
            n["small_id"],
            n["collateral"],
            n["reputation_score"],
            n["record"]["settled_on_time"],
            n["record"]["attestations_made"],
            n["record"]["attestations_missed"],
            n["record"]["disputes_lost"]
        );
    }
    println!(
        "earnings: {} as seller, {} as attestor (USDC base units); {} settlement(s) pending",
        r["earnings"]["seller"], r["earnings"]["attestor"], r["pending_settlements"]
    );
    println!(
        "\n{:>6} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
        "stack", "node", "state", "used", "units", "requests", "claimable", "fee"
    );
    let dash = |v: &serde_json::Value| {
        if v.is_null() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    for s in r["stacks"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
            s["stack"],
            s["node"],
            s["state"].as_str().unwrap_or("?"),
            s["units_used"],
            s["num_compute_units"],
            s["requests"],
            dash(&s["claimable_from_epoch"]),
            dash(&s["node_fee"])
        );
    }
    let jobs = r["attestations"].as_array().cloned().unwrap_or_default();
    if !jobs.is_empty() {
        println!("\nattestations:");
        for j in jobs {
            println!(
                "  stack {} (seller {}): {} {}",
                j["stack"],
                j["seller"],
                j["state"].as_str().unwrap_or("?"),
                j["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

pub fn settle(home: &Home, a: &SettleArgs) -> anyhow::Result<()> {
    let (_, state) = open(home, a.config.as_deref())?;
    let stack = StackSmallId(a.stack);
    let s = state
        .settlement(stack)
        .with_context(|| format!("stack {stack} is not one this node sold"))?;
    if s.units_used == 0 {
        anyhow::bail!("stack {stack} has no usage to settle");
    }
    state.request_settlement(stack)?;
    eprintln!(
        "stack {stack} ({} of {} units used) will be settled at the node's next round; \
         follow it with `atoma node status`",
        s.units_used, s.num_compute_units
    );
    Ok(())
}
