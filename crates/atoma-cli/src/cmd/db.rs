//! `atoma db …`: operations on the local (embedded SQLite) ledger, mirroring the contract's
//! entry points: register a node, put it in a model's echelon, create a task, subscribe a node
//! to a task, buy a stack, fund an address, show objects, tickets and events. The settlement
//! verbs (collateral, settle, attest, claim, parameters, epochs, totals) live in `db_settle.rs`
//! and are dispatched from here.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use atoma_ledger::{
    Amount, ComputeUnits, EventCursor, Ledger, NewTask, NodeSmallId, SecurityLevel, SqliteLedger,
    StackRequest, StackSmallId, TaskRole, TaskSmallId,
};

use crate::cmd::db_settle::{self, SettleCommand};
use crate::home::{Home, address_of};

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Ledger file (default: <home>/ledger.db).
    #[arg(long, global = true)]
    pub ledger: Option<PathBuf>,
    /// A node config whose `[ledger]` section names the ledger (for `backend = "sui"`: the
    /// chain, signing with this home's keys).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: DbCommand,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Register a node owned by KEY; prints its small id.
    RegisterNode {
        /// Key that will own the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
    },
    /// Put a node in an echelon of a model.
    AddNodeToModel {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The node's small id.
        #[arg(long)]
        node: u64,
        /// The model's name.
        #[arg(long)]
        model: String,
        /// The echelon's id.
        #[arg(long, default_value_t = 1)]
        echelon: u64,
    },
    /// Create a task for a model; prints it as JSON.
    CreateTask {
        /// The model's name.
        #[arg(long)]
        model: String,
        /// What the task does: `chat` (chat and text completions) or `embedding`
        /// (`/v1/embeddings`). A stack may use only its task's routes.
        #[arg(long, default_value = "chat", value_parser = ["chat", "embedding"])]
        role: String,
        /// 0 no security, 1 confidential compute, 2 sampling consensus.
        #[arg(long, default_value_t = 0)]
        security_level: u16,
        /// Reputation score (0–100) a node needs to subscribe.
        #[arg(long, default_value_t = 0)]
        min_reputation: u8,
        /// Collateral (USDC base units) a node needs to be sold stacks of the task or to attest.
        #[arg(long, default_value_t = 0)]
        min_collateral: u64,
        /// Only whitelisted nodes may subscribe.
        #[arg(long)]
        private: bool,
    },
    /// Subscribe a node to a task at a price (USDC base units per one million compute units).
    SubscribeNodeToTask {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The node's small id.
        #[arg(long)]
        node: u64,
        /// The task's small id.
        #[arg(long)]
        task: u64,
        /// USDC base units per one million compute units.
        #[arg(long)]
        price: u64,
    },
    /// Buy a stack of compute units for a task at a price cap; prints the stack.
    AcquireStack {
        /// Key of the buyer (pays from its balance, owns the stack).
        #[arg(long, default_value = "user")]
        key: String,
        /// The task's small id.
        #[arg(long)]
        task: u64,
        /// Compute units to buy.
        #[arg(long)]
        units: u64,
        /// Price cap: USDC base units per one million compute units.
        #[arg(long)]
        price: u64,
    },
    /// Credit an address (key name or 0x…) with USDC base units (local ledger only).
    Faucet {
        /// A key name or a 0x… address.
        #[arg(long)]
        to: String,
        /// USDC base units to credit.
        #[arg(long)]
        amount: u64,
    },
    /// Show a node, task, stack, stack's settlement ticket or balance as JSON.
    Show {
        /// What to show.
        #[arg(value_parser = ["node", "task", "stack", "ticket", "balance"])]
        what: String,
        /// The small id (a stack's for `ticket`; for `balance`, a key name or address).
        id: String,
    },
    /// Print ledger events as JSON lines.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    #[command(flatten)]
    Settle(SettleCommand),
}

fn id(s: &str) -> anyhow::Result<u64> {
    s.parse()
        .with_context(|| format!("`{s}` is not a small id"))
}

pub fn run(home: &Home, a: DbArgs) -> anyhow::Result<()> {
    let path = a.ledger.unwrap_or_else(|| home.ledger_path());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l: std::sync::Arc<dyn Ledger> = match &a.config {
        Some(c) => {
            let cfg = crate::cmd::node::Config::load(Some(c))?;
            let keys: Vec<_> = home
                .key_names()
                .iter()
                .filter_map(|n| home.key(n).ok())
                .collect();
            crate::cmd::ledger::open(home, &cfg.ledger, &path, &keys)?
        }
        None => std::sync::Arc::new(SqliteLedger::open(&path)?),
    };
    let l = l.as_ref();
    let json = |v: &dyn erased::Show| println!("{}", v.show());
    match a.command {
        DbCommand::RegisterNode { key } => {
            let n = l.register_node(address_of(&home.key(&key)?))?;
            json(&n);
        }
        DbCommand::AddNodeToModel {
            key,
            node,
            model,
            echelon,
        } => {
            l.add_node_to_model(
                address_of(&home.key(&key)?),
                NodeSmallId(node),
                &model,
                echelon,
            )?;
            println!("node {node} serves `{model}` in echelon {echelon}");
        }
        DbCommand::CreateTask {
            model,
            role,
            security_level,
            min_reputation,
            min_collateral,
            private,
        } => {
            let level = SecurityLevel::from_code(security_level)
                .with_context(|| format!("security level {security_level} is not 0, 1 or 2"))?;
            let t = l.create_task(
                address_of(&home.key_or_new("admin")?),
                &NewTask {
                    role: if role == "embedding" {
                        TaskRole::Embedding
                    } else {
                        TaskRole::ChatCompletion
                    },
                    model_name: Some(model),
                    security_level: level,
                    minimum_reputation_score: min_reputation,
                    is_public: !private,
                    minimum_collateral: Amount(min_collateral),
                },
            )?;
            json(&t);
        }
        DbCommand::SubscribeNodeToTask {
            key,
            node,
            task,
            price,
        } => {
            let s = l.subscribe_node_to_task(
                address_of(&home.key(&key)?),
                NodeSmallId(node),
                TaskSmallId(task),
                Amount(price),
            )?;
            json(&s);
        }
        DbCommand::AcquireStack {
            key,
            task,
            units,
            price,
        } => {
            let s = l.acquire_stack(
                address_of(&home.key(&key)?),
                &StackRequest {
                    task_small_id: TaskSmallId(task),
                    num_compute_units: ComputeUnits(units),
                    price_per_one_million_compute_units: Amount(price),
                },
            )?;
            json(&s);
        }
        DbCommand::Faucet { to, amount } => {
            let b = l.faucet(home.address(&to)?, Amount(amount))?;
            println!("balance of {to}: {}", b.0);
        }
        DbCommand::Show { what, id: raw } => match what.as_str() {
            "node" => json(&l.node(NodeSmallId(id(&raw)?))?),
            "task" => json(&l.task(TaskSmallId(id(&raw)?))?),
            "stack" => json(&l.stack(StackSmallId(id(&raw)?))?),
            "ticket" => json(&l.ticket(StackSmallId(id(&raw)?))?),
            _ => println!("{}", l.balance(home.address(&raw)?)?.0),
        },
        DbCommand::Events { after, limit } => {
            for e in l.events_after(EventCursor(after), limit)? {
                println!("{}", serde_json::to_string(&e)?);
            }
        }
        DbCommand::Settle(c) => db_settle::run(home, l, c)?,
    }
    Ok(())
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
