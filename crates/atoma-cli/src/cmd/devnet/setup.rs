//! Setting a devnet up on the ledger and on disk (idempotent: a directory that already holds a
//! `devnet.json` is reused as it is, so `up` after a stop resumes the same network).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use atoma_sui::Flavor;
use atoma_sui::fake::{FakeBacked, FakeSui, default_ids};
use atoma_sui::keys::Signers;

use atoma_ledger::{
    Amount, ComputeUnits, Ledger, LedgerParams, NewTask, SecurityLevel, SqliteLedger, StackRequest,
    TaskRole,
};
use atoma_models::ModelStore;

use super::{DevnetFile, NodeEntry, StackEntry, Tasks, UpArgs, UserEntry};
use crate::cmd::client::Session;
use crate::cmd::node::{Config, LedgerSection, served_name_of};
use crate::home::{Home, address_of, hex_of};

/// What each node deposits as collateral (1 USDC) and the ledger requires (0.1 USDC).
const COLLATERAL: u64 = 1_000_000;
const MIN_COLLATERAL: u64 = 100_000;
/// What each node and the user get from the faucet.
const NODE_FUNDS: u64 = 10_000_000;
const USER_FUNDS: u64 = 1_000_000_000;
/// The user's price cap: above every node's price, so any node may be sampled.
const USER_PRICE_CAP: u64 = 10_000;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn port(a: &UpArgs, i: u16) -> anyhow::Result<u16> {
    if a.port_base == 0 {
        free_port()
    } else {
        a.port_base
            .checked_add(i)
            .context("--port-base is too high for this many nodes")
    }
}

/// Sets the devnet up in `dir`, or loads the one there; with `--ledger sui-fake` also returns
/// the running Sui test double (drop it to stop it).
pub fn set_up(
    dir: &Path,
    store: &ModelStore,
    a: &UpArgs,
) -> anyhow::Result<(DevnetFile, Option<Arc<FakeSui>>)> {
    if DevnetFile::path(dir).is_file() {
        let net = DevnetFile::load(dir)?;
        if net.ledger_config.is_some() || a.ledger == "sui-fake" {
            anyhow::bail!(
                "{} holds a devnet; a Sui test double's chain lives in memory and cannot be \
                 resumed: use a new --home",
                dir.display()
            );
        }
        eprintln!("reusing the devnet in {}", dir.display());
        return Ok((net, None));
    }
    if a.nodes == 0 {
        anyhow::bail!("a devnet needs at least one node (--nodes)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if atoma_models::find_in_catalog(&a.model).is_some() && store.resolve(&a.model).is_err() {
        eprintln!("pulling model `{}`…", a.model);
        store.pull(&a.model, &mut |_| {})?;
    }
    let model_path = std::fs::canonicalize(store.resolve(&a.model)?)?;
    let model = served_name_of(&a.model);
    let home = Home {
        root: dir.to_path_buf(),
    };
    let ledger_path = dir.join("ledger.db");
    let books = SqliteLedger::open_with(
        &ledger_path,
        &LedgerParams {
            epoch_ms: a.epoch_ms,
            dispute_window_epochs: a.dispute_window_epochs.max(1),
            attestation_probability_permille: 1000,
            attestation_nodes: 1,
            min_collateral: Amount(MIN_COLLATERAL),
            stack_expiry_epochs: 100_000,
            ..LedgerParams::default()
        },
    )?;
    let admin_key = home.key_or_new("admin")?;
    let admin = address_of(&admin_key);
    // Every key signs from the start (the Sui client is given its signers once).
    let node_homes: Vec<Home> = (1..=a.nodes)
        .map(|i| Home {
            root: dir.join("nodes").join(format!("node-{i}")),
        })
        .collect();
    let mut keys = vec![admin_key];
    for h in &node_homes {
        std::fs::create_dir_all(&h.root)?;
        keys.push(h.key_or_new("node")?);
    }
    let gw_key = home.key_or_new("gateway")?;
    let user_key = home.key_or_new("user")?;
    keys.extend([gw_key.clone(), user_key.clone()]);
    let (l, fake, sui): (Box<dyn Ledger>, _, _) = if a.ledger == "sui-fake" {
        let ids = default_ids(admin);
        let fake = Arc::new(
            FakeSui::start(ids.clone(), books, port(a, a.nodes as u16 + 2)?)
                .context("starting the Sui test double")?,
        );
        let mut signers = Signers::default();
        for k in &keys {
            signers.insert(k);
        }
        let client = FakeBacked::with_signers(
            fake.clone(),
            Flavor::Extended,
            Some(dir.join("sui-index.db")),
            signers,
        )?;
        let section = LedgerSection {
            backend: "sui".into(),
            rpc_url: fake.url(),
            package_id: ids.package.to_string(),
            atoma_db: ids.db.to_string(),
            usdc_type: ids.usdc_type.clone(),
            contract: a.contract.clone(),
            admin: Some(admin.to_string()),
            poll_interval_ms: 200,
            ..LedgerSection::default()
        };
        (Box::new(client), Some(fake), Some(section))
    } else {
        (Box::new(books), None, None)
    };
    // A config reaching the ledger, with its own event index, for `atoma db --config`.
    let with_index = |index: PathBuf| -> Option<Config> {
        let mut cfg = Config {
            ledger: sui.clone()?,
            ..Config::default()
        };
        cfg.ledger.index_path = Some(index);
        Some(cfg)
    };
    let ledger_config = match with_index(dir.join("cli-sui-index.db")) {
        Some(cfg) => {
            let p = dir.join("ledger.toml");
            std::fs::write(&p, toml::to_string_pretty(&cfg)?)?;
            std::fs::write(
                dir.join("gateway-ledger.toml"),
                toml::to_string_pretty(
                    &with_index(dir.join("gateway-sui-index.db")).expect("sui"),
                )?,
            )?;
            Some(p)
        }
        None => None,
    };
    let task = |level| -> anyhow::Result<u64> {
        Ok(l.create_task(
            admin,
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some(model.clone()),
                security_level: level,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: Amount(0),
            },
        )?
        .small_id
        .0)
    };
    let tasks = Tasks {
        no_security: task(SecurityLevel::NoSecurity)?,
        sampling_consensus: task(SecurityLevel::SamplingConsensus)?,
    };
    let da_port = port(a, 0)?;
    let urls = (1..=a.nodes)
        .map(|i| Ok(format!("http://127.0.0.1:{}", port(a, i as u16)?)))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let deployed = sui.as_ref().is_some_and(|s| s.contract == "deployed");
    let mut nodes = Vec::with_capacity(a.nodes);
    for ((i, node_home), url) in (1..=a.nodes).zip(&node_homes).zip(&urls) {
        let key = node_home.key("node")?;
        let who = address_of(&key);
        let id = l.register_node(who)?.small_id;
        l.add_node_to_model(who, id, &model, 1)?;
        l.faucet(who, Amount(NODE_FUNDS))?;
        l.deposit_collateral(who, id, Amount(COLLATERAL))?;
        let price = 1_000 + 250 * (i as u64 - 1);
        for t in [tasks.no_security, tasks.sampling_consensus] {
            l.subscribe_node_to_task(who, id, atoma_ledger::TaskSmallId(t), Amount(price))?;
        }
        let url = url.clone();
        let mut cfg = with_index(node_home.root.join("sui-index.db")).unwrap_or_default();
        if deployed {
            // The deployed contract keeps no URLs: the setup records them through the test
            // double's extended call (for the gateway); the peers tables come below.
            l.set_node_public_url(who, id, &url)?;
        }
        cfg.node.small_ids = vec![id.0];
        cfg.ledger.path = Some(ledger_path.clone());
        cfg.ledger.poll_interval_ms = 200;
        cfg.api.bind = url.trim_start_matches("http://").parse()?;
        cfg.api.public_url = Some(url.clone());
        cfg.engine.model = model_path.display().to_string();
        cfg.engine.name = Some(model.clone());
        cfg.engine.max_context = 2048;
        cfg.engine.kv_cache_mib = 64;
        cfg.engine.max_num_seqs = 16;
        cfg.settlement.da_url = format!("http://127.0.0.1:{da_port}");
        cfg.settlement.threshold_percent = a.threshold_percent;
        cfg.settlement.idle_secs = a.idle_secs;
        cfg.settlement.tick_ms = 200;
        cfg.settlement.verify_sample = a.verify_sample;
        if !a.kernels.is_empty() {
            cfg.engine.kernel = a.kernels[(i - 1) % a.kernels.len()];
        }
        let config = node_home.root.join("node.toml");
        std::fs::write(&config, toml::to_string_pretty(&cfg)?)?;
        nodes.push(NodeEntry {
            small_id: id.0,
            url,
            log: node_home.root.join("node.log"),
            home: node_home.root.clone(),
            config,
            key: "node".into(),
            address: hex_of(&key),
            price,
        });
    }
    if deployed {
        // Every node gets the others as `[settlement] peers`, where its attestations look
        // for a seller's signed commitment first.
        for n in &nodes {
            let mut cfg: Config = toml::from_str(&std::fs::read_to_string(&n.config)?)?;
            for m in nodes.iter().filter(|m| m.small_id != n.small_id) {
                cfg.settlement
                    .peers
                    .insert(m.small_id.to_string(), m.url.clone());
            }
            std::fs::write(&n.config, toml::to_string_pretty(&cfg)?)?;
        }
    }
    // The gateway: a ledger key with USDC to buy stacks, and one API key for the user.
    l.faucet(address_of(&gw_key), Amount(USER_FUNDS))?;
    let (_, api_key) = atoma_gateway::keys::KeyStore::open(&dir.join("gateway.db"))?.create(
        "devnet",
        100_000_000,
        atoma_gateway::keys::Limits::default(),
    )?;
    let gateway_url = format!("http://127.0.0.1:{}", port(a, a.nodes as u16 + 1)?);
    let user = address_of(&user_key);
    l.faucet(user, Amount(USER_FUNDS))?;
    let mut stacks = Vec::new();
    for t in [tasks.no_security, tasks.sampling_consensus] {
        let s = l.acquire_stack(
            user,
            &StackRequest {
                task_small_id: atoma_ledger::TaskSmallId(t),
                num_compute_units: ComputeUnits(a.stack_units),
                price_per_one_million_compute_units: Amount(USER_PRICE_CAP),
            },
        )?;
        let url = nodes
            .iter()
            .find(|n| n.small_id == s.selected_node_id.0)
            .map(|n| n.url.clone())
            .unwrap_or_default();
        stacks.push(StackEntry {
            small_id: s.small_id.0,
            task: t,
            selected_node: s.selected_node_id.0,
            units: a.stack_units,
            url,
        });
    }
    // `atoma --home DIR chat …` talks to the first stack's node.
    Session {
        url: stacks[0].url.clone(),
        key: "user".into(),
        stack: stacks[0].small_id,
        model: model.clone(),
    }
    .save(&home)?;
    let net = DevnetFile {
        ledger: ledger_path,
        da_url: format!("http://127.0.0.1:{da_port}"),
        da_dir: dir.join("da"),
        model,
        model_path,
        epoch_ms: a.epoch_ms,
        dispute_window_epochs: a.dispute_window_epochs.max(1),
        tasks,
        nodes,
        user: UserEntry {
            key: "user".into(),
            keystore: home.key_path("user"),
            address: hex_of(&user_key),
        },
        stacks,
        gateway_url,
        gateway_api_key: api_key,
        ledger_config,
    };
    net.save(dir)?;
    Ok((net, fake))
}

/// The table of what runs where and what to try.
pub fn print_summary(dir: &Path, net: &DevnetFile) {
    eprintln!(
        "\ndevnet in {} (ledger {}, DA {})",
        dir.display(),
        net.ledger.display(),
        net.da_url
    );
    eprintln!(
        "tasks: {} NoSecurity, {} SamplingConsensus (model `{}`); epoch {} ms, dispute window \
         {} epochs",
        net.tasks.no_security,
        net.tasks.sampling_consensus,
        net.model,
        net.epoch_ms,
        net.dispute_window_epochs
    );
    eprintln!("\n{:>5}  {:<24} {:>7}  address", "node", "url", "price");
    for n in &net.nodes {
        eprintln!(
            "{:>5}  {:<24} {:>7}  {}",
            n.small_id, n.url, n.price, n.address
        );
    }
    eprintln!(
        "\nuser {} ({}):",
        net.user.address,
        net.user.keystore.display()
    );
    for s in &net.stacks {
        eprintln!(
            "  stack {} on task {}: {} units, node {} at {}",
            s.small_id, s.task, s.units, s.selected_node, s.url
        );
    }
    eprintln!(
        "\ngateway {} (OpenAI-compatible; API key {})",
        net.gateway_url, net.gateway_api_key
    );
    let h = dir.display();
    eprintln!(
        "\ntry:\n  curl {}/v1/chat/completions -H 'Authorization: Bearer {}' \\\n    \
         -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'\n  \
         atoma --home {h} chat \"What is the capital of France?\"\n  \
         atoma --home {h} devnet status\n  \
         atoma --home {h} db acquire-stack --task {} --units 10000 --price {USER_PRICE_CAP}\n  \
         atoma --home {}/nodes/node-1 node status --config {}\n",
        net.gateway_url,
        net.gateway_api_key,
        net.model,
        net.tasks.sampling_consensus,
        h,
        net.nodes
            .first()
            .map_or_else(String::new, |n| n.config.display().to_string())
    );
}
