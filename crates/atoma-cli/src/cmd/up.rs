//! `atoma up`: one command from nothing to a serving node on one machine. It creates (or reuses)
//! the keys `node` and `user`, the local ledger, the node's registration and subscription to a
//! chat task for the model, funds the user, buys a stack, writes `<home>/node.toml` and
//! `<home>/session.json`, prints how to call the node, and runs it. Re-running reuses what exists.

use anyhow::Context;

use atoma_ledger::{
    Amount, ComputeUnits, EventCursor, Ledger, LedgerError, LedgerEvent, NewTask, SecurityLevel,
    SqliteLedger, StackRequest, StackSmallId, TaskRole,
};
use atoma_models::ModelStore;

use crate::cmd::client::Session;
use crate::cmd::node::{Config, served_name_of};
use crate::home::{Home, address_of};

/// Price of the local task: USDC base units per one million compute units.
const PRICE: u64 = 1_000;
/// Compute units per stack bought by `up`.
const STACK_UNITS: u64 = 100_000;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Model to serve (a catalog name pulls it if needed).
    #[arg(long, default_value = "default")]
    pub model: String,
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub bind: std::net::SocketAddr,
    /// Compute units of the stack bought for the user (when a new one is bought).
    #[arg(long, default_value_t = STACK_UNITS)]
    pub stack_units: u64,
    /// Set everything up but do not run the node.
    #[arg(long)]
    pub no_run: bool,
}

pub fn run(home: &Home, store: &ModelStore, a: &UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&home.root)
        .with_context(|| format!("creating {}", home.root.display()))?;
    if atoma_models::find_in_catalog(&a.model).is_some() && store.resolve(&a.model).is_err() {
        eprintln!("pulling model `{}`…", a.model);
        store.pull(&a.model, &mut |_| {})?;
    }
    let name = served_name_of(&a.model);
    let (node_key, user) = (home.key_or_new("node")?, home.key_or_new("user")?);
    let admin = home.key_or_new("admin")?;
    let l = SqliteLedger::open(&home.ledger_path())?;
    let node = match l.nodes_of(address_of(&node_key))?.first() {
        Some(n) => n.small_id,
        None => l.register_node(address_of(&node_key))?.small_id,
    };
    match l.add_node_to_model(address_of(&node_key), node, &name, 1) {
        Ok(()) | Err(LedgerError::AlreadyInEchelon { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let existing = l
        .events_after(EventCursor(0), 10_000)?
        .into_iter()
        .find_map(|e| match e.event {
            LedgerEvent::TaskRegisteredEvent {
                task_small_id,
                model_name: Some(m),
                ..
            } if m == name => Some(task_small_id),
            _ => None,
        });
    let task = match existing {
        Some(t) => t,
        None => {
            l.create_task(
                address_of(&admin),
                &NewTask {
                    role: TaskRole::ChatCompletion,
                    model_name: Some(name.clone()),
                    security_level: SecurityLevel::NoSecurity,
                    minimum_reputation_score: 0,
                    is_public: true,
                    minimum_collateral: atoma_ledger::Amount(0),
                },
            )?
            .small_id
        }
    };
    if !l
        .subscriptions(task)?
        .iter()
        .any(|s| s.node_small_id == node)
    {
        l.subscribe_node_to_task(address_of(&node_key), node, task, Amount(PRICE))?;
    }
    if l.balance(address_of(&user))?.0 < 1_000_000 {
        l.faucet(address_of(&user), Amount(100_000_000))?;
    }
    // A stack the node has started to settle (its ticket is open) takes no more requests.
    let reuse = Session::load(home).filter(|s| {
        s.model == name
            && l.stack(StackSmallId(s.stack))
                .is_ok_and(|st| st.selected_node_id == node && !st.is_claimed)
            && l.ticket(StackSmallId(s.stack)).is_ok_and(|t| t.is_none())
    });
    let stack = match reuse {
        Some(s) => s.stack,
        None => {
            l.acquire_stack(
                address_of(&user),
                &StackRequest {
                    task_small_id: task,
                    num_compute_units: ComputeUnits(a.stack_units),
                    price_per_one_million_compute_units: Amount(PRICE),
                },
            )?
            .small_id
            .0
        }
    };
    let url = format!("http://{}", a.bind);
    Session {
        url: url.clone(),
        key: "user".into(),
        stack,
        model: name.clone(),
    }
    .save(home)?;
    let mut cfg = Config::default();
    cfg.engine.model = a.model.clone();
    cfg.engine.name = Some(name.clone());
    cfg.api.bind = a.bind;
    // One user, one stack: settle it when it is nearly used up, or after a day of rest, so that
    // `atoma chat` keeps working between sessions (a settled stack takes no more requests).
    cfg.settlement.idle_secs = 86_400;
    let cfg_path = home.root.join("node.toml");
    std::fs::write(&cfg_path, toml::to_string_pretty(&cfg)?).context("writing node.toml")?;
    let home_flag = format!("--home {}", home.root.display());
    eprintln!(
        "\nlocal ledger ready: node {node} serves `{name}` on task {task}; user stack {stack} \
         ({} compute units)\n\
         config: {}\n\n\
         try, in another terminal:\n  \
         atoma {home_flag} chat \"What is the capital of France?\"\n  \
         eval \"$(atoma {home_flag} sign --curl {url}/v1/chat/completions --body \
         '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}')\"\n",
        l.stack(StackSmallId(stack))?.num_compute_units.0,
        cfg_path.display()
    );
    if a.no_run {
        return Ok(());
    }
    crate::cmd::node::serve(home, store, &cfg)
}
