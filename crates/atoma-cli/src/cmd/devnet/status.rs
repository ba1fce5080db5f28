//! `atoma devnet status`: the devnet as the ledger sees it: each node (up or not, collateral,
//! reputation, balance), every stack with its settlement ticket, the user's balance, and
//! whether money is conserved.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use atoma_ledger::{Address, Ledger, LedgerError, NodeSmallId, SqliteLedger, StackSmallId};

use super::DevnetFile;

fn report(net: &DevnetFile) -> anyhow::Result<Value> {
    let l = SqliteLedger::open(&net.ledger)?;
    let mut nodes = Vec::new();
    for n in &net.nodes {
        let node = l.node(NodeSmallId(n.small_id))?;
        let up = ureq::get(&format!("{}/health", n.url))
            .timeout(Duration::from_millis(500))
            .call()
            .is_ok();
        nodes.push(json!({
            "small_id": n.small_id, "url": n.url, "up": up, "price": n.price,
            "collateral": node.collateral.0, "reputation_score": node.reputation_score,
            "record": node.record, "balance": l.balance(node.owner)?.0,
        }));
    }
    let mut stacks = Vec::new();
    for id in 1.. {
        let s = match l.stack(StackSmallId(id)) {
            Ok(s) => s,
            Err(LedgerError::StackNotFound(_)) => break,
            Err(e) => return Err(e.into()),
        };
        let t = l.ticket(s.small_id)?;
        let ticket = t.map(|t| {
            let state = if t.is_claimed {
                "claimed"
            } else if t.is_in_dispute {
                "in dispute"
            } else {
                "open"
            };
            json!({"state": state, "claimed_units": t.num_claimed_compute_units.0,
                   "requests": t.commitment.leaf_count,
                   "attestors": t.requested_attestation_nodes,
                   "attested": t.already_attested_nodes,
                   "claimable_from_epoch": t.dispute_settled_at_epoch,
                   "blob_id": t.commitment.blob_id})
        });
        stacks.push(json!({
            "small_id": id, "task": s.task_small_id.0, "node": s.selected_node_id.0,
            "units": s.num_compute_units.0, "escrowed": s.escrowed.0, "claimed": s.is_claimed,
            "ticket": ticket,
        }));
    }
    let user: Address = net.user.address.parse().map_err(anyhow::Error::msg)?;
    let totals = l.totals()?;
    Ok(json!({
        "epoch": l.epoch()?, "nodes": nodes, "stacks": stacks,
        "user": {"address": net.user.address, "balance": l.balance(user)?.0},
        "totals": totals, "conserved": totals.is_conserved(),
    }))
}

pub fn print(dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let net = DevnetFile::load(dir)?;
    let r = report(&net)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("epoch {}; money conserved: {}", r["epoch"], r["conserved"]);
    println!(
        "\n{:>5} {:<24} {:>4} {:>6} {:>11} {:>4} {:>12}",
        "node", "url", "up", "price", "collateral", "rep", "balance"
    );
    for n in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:>5} {:<24} {:>4} {:>6} {:>11} {:>4} {:>12}",
            n["small_id"],
            n["url"].as_str().unwrap_or(""),
            if n["up"] == true { "yes" } else { "no" },
            n["price"],
            n["collateral"],
            n["reputation_score"],
            n["balance"]
        );
    }
    println!(
        "\n{:>5} {:>4} {:>5} {:>9} {:>9} {:>11} {:>8} {:>9}",
        "stack", "task", "node", "units", "escrowed", "ticket", "claimed", "requests"
    );
    for s in r["stacks"].as_array().into_iter().flatten() {
        let t = &s["ticket"];
        println!(
            "{:>5} {:>4} {:>5} {:>9} {:>9} {:>11} {:>8} {:>9}",
            s["small_id"],
            s["task"],
            s["node"],
            s["units"],
            s["escrowed"],
            t["state"].as_str().unwrap_or("-"),
            if t.is_null() {
                "-".to_string()
            } else {
                t["claimed_units"].to_string()
            },
            if t.is_null() {
                "-".to_string()
            } else {
                t["requests"].to_string()
            }
        );
    }
    println!(
        "\nuser {}: balance {}",
        r["user"]["address"], r["user"]["balance"]
    );
    Ok(())
}
