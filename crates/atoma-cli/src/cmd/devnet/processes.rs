//! Running a devnet's processes: the DA server and one `atoma node run` per node, each logging
//! to a file in its directory. `up` waits until every node answers `/health`, then watches: a
//! child that dies stops the devnet with its log's path; Ctrl-C or SIGTERM stops every child
//! with SIGINT (graceful shutdown: requests in flight finish) and waits for it, escalating to
//! SIGKILL after a grace period.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{DevnetFile, UpArgs};

struct Proc {
    name: String,
    log: std::path::PathBuf,
    child: Child,
}

fn spawn(name: &str, log: &Path, args: &[&str], envs: &[(&str, String)]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the atoma binary")?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(exe)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        log: log.to_path_buf(),
        child,
    })
}

fn interrupt(p: &Proc) {
    // SAFETY: `kill` with a child's pid and SIGINT has no memory effects.
    unsafe {
        libc::kill(p.child.id() as libc::pid_t, libc::SIGINT);
    }
}

fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        interrupt(p);
    }
    let t = Instant::now();
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if t.elapsed() > Duration::from_secs(20) => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn healthy(url: &str) -> bool {
    ureq::get(&format!("{url}/health"))
        .timeout(Duration::from_secs(2))
        .call()
        .is_ok()
}

pub fn run(dir: &Path, net: &DevnetFile, a: &UpArgs) -> anyhow::Result<()> {
    let mut procs = Vec::new();
    let da_bind = net.da_url.trim_start_matches("http://").to_string();
    let res = (|| -> anyhow::Result<()> {
        procs.push(spawn(
            "DA server",
            &dir.join("da.log"),
            &[
                "--home",
                &dir.display().to_string(),
                "da",
                "serve",
                "--dir",
                &net.da_dir.display().to_string(),
                "--bind",
                &da_bind,
            ],
            &[],
        )?);
        for n in &net.nodes {
            procs.push(spawn(
                &format!("node {}", n.small_id),
                &n.log,
                &[
                    "--home",
                    &n.home.display().to_string(),
                    "--threads",
                    &a.node_threads.to_string(),
                    "--log",
                    "info",
                    "node",
                    "run",
                    "--config",
                    &n.config.display().to_string(),
                ],
                &[],
            )?);
        }
        // Over the Sui test double the gateway reaches it like the nodes do.
        let gw_ledger: Vec<String> = match &net.ledger_config {
            Some(_) => vec![
                "--ledger-config".into(),
                dir.join("gateway-ledger.toml").display().to_string(),
            ],
            None => Vec::new(),
        };
        let gw_config = dir.join("gateway.toml");
        std::fs::write(
            &gw_config,
            format!(
                "[gateway]\npolicy = \"{}\"\npoll_ms = 500\nledger_poll_ms = 500\n",
                a.gateway_policy
            ),
        )?;
        procs.push(spawn(
            "gateway",
            &dir.join("gateway.log"),
            &[
                "--home",
                &dir.display().to_string(),
                "--log",
                "info",
                "gateway",
                "serve",
                "--config",
                &gw_config.display().to_string(),
                "--bind",
                net.gateway_url.trim_start_matches("http://"),
                "--ledger",
                &net.ledger.display().to_string(),
            ]
            .into_iter()
            .chain(gw_ledger.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &[],
        )?);
        let t = Instant::now();
        let mut waiting: Vec<&str> = [net.da_url.as_str(), net.gateway_url.as_str()]
            .into_iter()
            .chain(net.nodes.iter().map(|n| n.url.as_str()))
            .collect();
        while !waiting.is_empty() {
            check_alive(&mut procs)?;
            if t.elapsed() > Duration::from_secs(300) {
                bail!("not up after 5 minutes: {}", waiting.join(", "));
            }
            waiting.retain(|u| !healthy(u));
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "devnet up: DA server, {} node(s) and the gateway ({}) serving; Ctrl-C stops them",
            net.nodes.len(),
            net.gateway_url
        );
        wait_for_signal(&mut procs)
    })();
    stop_all(&mut procs);
    eprintln!("devnet stopped");
    res
}

fn check_alive(procs: &mut [Proc]) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        if let Some(status) = p.child.try_wait()? {
            bail!("{} exited ({status}); see {}", p.name, p.log.display());
        }
    }
    Ok(())
}

/// Blocks until Ctrl-C or SIGTERM, or a child dies.
fn wait_for_signal(procs: &mut [Proc]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => check_alive(procs)?,
            }
        }
    })
}
