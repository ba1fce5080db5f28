//! The gateway end to end on the real default model (SmolLM2, pulled by `scripts/test.sh`): a
//! 3-node devnet at three prices (`atoma devnet up --no-run`, then every process started here so
//! one can be killed), the gateway with the `cheapest` policy, and the official `openai` Python
//! package with an API key as the client. Every answer the client gets is checked for a valid
//! node signature by a devnet node.
//!
//! 1. Plain and streamed answers, parsed by the SDK; all of them from the cheapest node.
//! 2. SIGKILL of the cheapest node while 30 plain requests run four at a time: every one of
//!    them succeeds, the ones after the kill from the next cheapest node (never the dearest).
//! 3. The next cheapest node starts forging (a test-only proxy between the gateway and the node
//!    rewrites the answers' text, keeping the node's signature): it is ejected after its first
//!    forged answer, the request is served by the dearest node, and no forged text reaches the
//!    client.
//! 4. A key past its rate limit gets 429 with `Retry-After`; a revoked key gets 401.
//! 5. The books: each key paid exactly Σ units × node price plus the margin for the answers it
//!    got; the gateway's stacks used exactly those units per node; the living nodes' own
//!    meters agree with the gateway to the unit (the forging node's also counts the units of
//!    the answers the gateway refused).
//! 6. SIGKILL of the gateway with requests in flight, and a restart: no hold or stack
//!    reservation stays, every unit granted to a key is kept or spent, every answer that
//!    got out was charged.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every child is killed when the test ends, however it ends.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, log: &Path, args: &[&str]) {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_atoma"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.0.push((name.to_string(), child));
    }

    fn kill(&mut self, name: &str) {
        let (_, c) = self.0.iter_mut().find(|(n, _)| n == name).unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A test-only HTTP proxy in front of one node. Passes everything through until `forge` is
/// set; then every successful `/v1/…` answer gets its text rewritten (the node's signature and
/// `response_hash` are kept, so they no longer match).
struct Forger {
    url: String,
    forge: Arc<AtomicBool>,
    /// Answers forged, and the units the node charged for them.
    forged: Arc<AtomicU64>,
    forged_units: Arc<AtomicU64>,
}

impl Forger {
    fn start(target: String) -> Forger {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let f = Forger {
            url,
            forge: Arc::default(),
            forged: Arc::default(),
            forged_units: Arc::default(),
        };
        let (forge, forged, units) = (f.forge.clone(), f.forged.clone(), f.forged_units.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (target, forge, forged, units) =
                    (target.clone(), forge.clone(), forged.clone(), units.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, &target, &forge, &forged, &units);
                });
            }
        });
        f
    }
}

/// One request on one connection (answered with `connection: close`).
fn relay(
    conn: TcpStream,
    target: &str,
    forge: &AtomicBool,
    forged: &AtomicU64,
    units: &AtomicU64,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let mut req =
        ureq::request(&method, &format!("{target}{path}")).timeout(Duration::from_secs(120));
    for (k, v) in &headers {
        if matches!(
            k.as_str(),
            "content-type" | "x-signature" | "x-stack-small-id" | "x-request-id"
        ) {
            req = req.set(k, v);
        }
    }
    let sent = if method == "POST" {
        req.send_bytes(&body)
    } else {
        req.call()
    };
    let (status, ctype, mut text) = match sent {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => (
            resp.status(),
            resp.content_type().to_string(),
            resp.into_string()?,
        ),
        Err(e) => (502, "text/plain".into(), e.to_string()),
    };
    if forge.load(Ordering::SeqCst) && status == 200 && path.starts_with("/v1/chat") {
        let rewritten = text.replace("\"content\":\"", "\"content\":\"FORGED ");
        if rewritten != text {
            forged.fetch_add(1, Ordering::SeqCst);
            if let Some(i) = text.rfind("\"total_tokens\":") {
                let n: String = text[i + 15..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                units.fetch_add(n.parse().unwrap_or(0), Ordering::SeqCst);
            }
            text = rewritten;
        }
    }
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )?;
    w.flush()
}

/// One finished request as the Python client reports it.
#[derive(Debug, Clone)]
struct Done {
    ok: bool,
    stream: bool,
    node: u64,
    total_tokens: u64,
    text: String,
    line: String,
}

fn parse(line: &str) -> Done {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    Done {
        ok: v["ok"] == true,
        stream: v["stream"] == true,
        node: v["node"].as_u64().unwrap_or(0),
        total_tokens: v["total_tokens"].as_u64().unwrap_or(0),
        text: v["text"].as_str().unwrap_or("").to_string(),
        line: line.to_string(),
    }
}

struct Client {
    py: PathBuf,
    script: PathBuf,
    url: String,
    nodes: String,
    model: String,
}

impl Client {
    fn command(&self, key: &str, mode: &[&str]) -> Command {
        let mut c = Command::new(&self.py);
        c.arg(&self.script)
            .args([&self.url, key, &self.nodes, &self.model])
            .args(mode);
        c
    }

    fn output(&self, key: &str, mode: &[&str]) -> String {
        let out = self.command(key, mode).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "client {mode:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn run(&self, key: &str, n: usize, concurrency: usize, kinds: &str) -> Vec<Done> {
        self.output(
            key,
            &["run", &n.to_string(), &concurrency.to_string(), kinds],
        )
        .lines()
        .map(parse)
        .collect()
    }
}

fn all_ok(phase: &str, done: &[Done]) {
    for d in done {
        assert!(d.ok, "{phase}: a request failed: {}", d.line);
        assert!(
            !d.text.contains("FORGED"),
            "{phase}: forged text reached the client"
        );
    }
}

/// The gateway's log lines about failovers and broken streams, for failure messages.
fn failovers(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("gateway.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("failing over") || l.contains("broke"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn atoma(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_atoma"))
        .arg("--home")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "atoma {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn keys(dir: &Path) -> HashMap<String, Value> {
    let list: Value = serde_json::from_str(&atoma(dir, &["gateway", "keys", "list"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap().to_string(), k.clone()))
        .collect()
}

#[test]
#[allow(clippy::print_stderr)] // the figures of the run, for the issue note
fn gateway_routes_fails_over_ejects_forgers_and_charges_exactly() {
    let py = common::python();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = dir.to_str().unwrap();
    atoma(
        dir,
        &[
            "devnet",
            "up",
            "--nodes",
            "3",
            "--port-base",
            "0",
            "--epoch-ms",
            "1000",
            "--no-run",
        ],
    );
    let net: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("devnet.json")).unwrap()).unwrap();
    let nodes = net["nodes"].as_array().unwrap().clone();
    let price: HashMap<u64, u64> = nodes
        .iter()
        .map(|n| {
            (
                n["small_id"].as_u64().unwrap(),
                n["price"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut by_price: Vec<u64> = price.keys().copied().collect();
    by_price.sort_by_key(|n| price[n]);
    let (cheap, middle, dear) = (by_price[0], by_price[1], by_price[2]);
    assert!(price[&cheap] < price[&middle] && price[&middle] < price[&dear]);
    let node = |id: u64| nodes.iter().find(|n| n["small_id"] == id).unwrap();
    let s = |v: &Value| v.as_str().unwrap().to_string();

    // The middle node announces the forging proxy as its public URL.
    let forger = Forger::start(s(&node(middle)["url"]));
    let cfg_path = PathBuf::from(s(&node(middle)["config"]));
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let announced = format!("public_url = \"{}\"", s(&node(middle)["url"]));
    assert!(cfg.contains(&announced), "{cfg}");
    std::fs::write(
        &cfg_path,
        cfg.replace(&announced, &format!("public_url = \"{}\"", forger.url)),
    )
    .unwrap();

    let mut procs = Procs::default();
    let da_url = s(&net["da_url"]);
    let da_dir = s(&net["da_dir"]);
    procs.spawn(
        "da",
        &dir.join("da.log"),
        &[
            "--home",
            d,
            "da",
            "serve",
            "--dir",
            &da_dir,
            "--bind",
            da_url.trim_start_matches("http://"),
        ],
    );
    for n in &nodes {
        procs.spawn(
            &format!("node {}", n["small_id"]),
            Path::new(&s(&n["log"])),
            &[
                "--home",
                &s(&n["home"]),
                "--threads",
                "1",
                "--log",
                "info",
                "node",
                "run",
                "--config",
                &s(&n["config"]),
            ],
        );
    }
    let gw_url = s(&net["gateway_url"]);
    std::fs::write(
        dir.join("gw.toml"),
        "[gateway]\npolicy = \"cheapest\"\npoll_ms = 500\nledger_poll_ms = 500\nstack_units = 3000\n",
    )
    .unwrap();
    let gw_toml = dir.join("gw.toml").display().to_string();
    let ledger = s(&net["ledger"]);
    let gw_args = [
        "--home",
        d,
        "--log",
        "info",
        "gateway",
        "serve",
        "--config",
        &gw_toml,
        "--bind",
        gw_url.trim_start_matches("http://"),
        "--ledger",
        &ledger,
    ];
    procs.spawn("gateway", &dir.join("gateway.log"), &gw_args);
    for n in &nodes {
        let u = s(&n["url"]);
        wait_for(&format!("node {u}"), Duration::from_secs(240), || {
            ureq::get(&format!("{u}/health")).call().is_ok()
        });
    }
    // The gateway knows the three nodes by their announced URLs, and has seen each answer (it
    // started before them: its polls failed until they were up).
    wait_for("gateway sees 3 nodes up", Duration::from_secs(60), || {
        ureq::get(&format!("{gw_url}/health"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["nodes"] == 3 && v["available"] == 3)
    });
    std::thread::sleep(Duration::from_millis(1500)); // a round of status polls

    let addresses: serde_json::Map<String, Value> = nodes
        .iter()
        .map(|n| (s(&n["address"]), n["small_id"].clone()))
        .collect();
    let client = Client {
        py,
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/gateway_client.py"),
        url: gw_url.clone(),
        nodes: Value::Object(addresses).to_string(),
        model: s(&net["model"]),
    };
    let key = s(&net["gateway_api_key"]);
    let credit0 = keys(dir)["devnet"]["balance_micro"].as_u64().unwrap();
    let mut paid: Vec<Done> = Vec::new();

    // 1. The SDK's own parsing, then plain and streamed answers: all from the cheapest node.
    let mut phase1: Vec<Done> = client.output(&key, &["sdk"]).lines().map(parse).collect();
    assert_eq!(phase1.len(), 2);
    phase1.extend(client.run(&key, 6, 2, "ps"));
    all_ok("phase 1", &phase1);
    assert_eq!(phase1.iter().filter(|d| d.stream).count(), 4);
    assert!(
        phase1.iter().all(|d| d.node == cheap),
        "cheapest routes to node {cheap}: {phase1:?}"
    );
    paid.extend(phase1);

    // 2. SIGKILL the cheapest node mid-run: every plain request still succeeds.
    let mut run = client
        .command(&key, &["run", "30", "4", "p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut phase2 = Vec::new();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        phase2.push(parse(&line.unwrap()));
        if phase2.len() == 4 {
            procs.kill(&format!("node {cheap}"));
        }
    }
    let status = run.wait().unwrap();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(phase2.len(), 30);
    all_ok("phase 2", &phase2);
    let served = |done: &[Done], n: u64| done.iter().filter(|d| d.node == n).count();
    assert!(served(&phase2, cheap) >= 4);
    assert!(served(&phase2, middle) >= 1, "failed over: {phase2:?}");
    assert_eq!(
        served(&phase2, dear),
        0,
        "the dearest node gets nothing while a cheaper one is healthy"
    );
    paid.extend(phase2);

    // 3. The middle node forges: ejected at its first forged answer, nothing forged delivered.
    forger.forge.store(true, Ordering::SeqCst);
    let mut phase3 = client.run(&key, 1, 1, "p");
    phase3.extend(client.run(&key, 8, 2, "ps"));
    all_ok("phase 3", &phase3);
    assert!(
        phase3.iter().all(|d| d.node == dear),
        "served by the dearest node: {phase3:?}"
    );
    assert_eq!(
        forger.forged.load(Ordering::SeqCst),
        1,
        "one forged answer, then the node is out; gateway: {}",
        failovers(dir)
    );
    let metrics = ureq::get(&format!("{gw_url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "atoma_gateway_failovers_total{{node=\"{middle}\"}}"
        )),
        "{metrics}"
    );
    paid.extend(phase3);

    // 4. Rate limit and revocation.
    let limited = atoma(
        dir,
        &[
            "gateway", "keys", "create", "--name", "limited", "--credit", "1000000", "--rpm", "2",
        ],
    );
    let out = client.output(limited.trim(), &["status", "429", "3"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let limited_paid: Vec<Done> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| parse(&r.to_string()))
        .filter(|d| d.ok)
        .collect();
    assert_eq!(limited_paid.len(), 2, "{out}");
    let gone = atoma(
        dir,
        &[
            "gateway", "keys", "create", "--name", "gone", "--credit", "1000000",
        ],
    );
    let gone_id = keys(dir)["gone"]["id"].as_i64().unwrap().to_string();
    atoma(dir, &["gateway", "keys", "revoke", &gone_id]);
    client.output(gone.trim(), &["status", "401", "1"]);

    // 5. The books.
    let margin = |micro: u64| micro * 100 / 1000;
    let bill = |done: &[Done]| {
        done.iter().fold((0u64, 0u64), |(n, m), d| {
            let micro = d.total_tokens * price[&d.node];
            (n + micro, m + margin(micro))
        })
    };
    let k = keys(dir);
    for (name, done) in [("devnet", &paid), ("limited", &limited_paid)] {
        let (node_micro, margin_micro) = bill(done);
        let info = &k[name];
        assert_eq!(
            info["spent_node_micro"].as_u64(),
            Some(node_micro),
            "{name}"
        );
        assert_eq!(
            info["spent_margin_micro"].as_u64(),
            Some(margin_micro),
            "{name}"
        );
        assert_eq!(info["held_micro"].as_u64(), Some(0), "{name}");
    }
    assert_eq!(
        k["devnet"]["balance_micro"].as_u64().unwrap(),
        credit0 - bill(&paid).0 - bill(&paid).1
    );
    assert_eq!(k["gone"]["spent_node_micro"].as_u64(), Some(0));

    let gw = rusqlite::Connection::open(dir.join("gateway.db")).unwrap();
    let gw_used = |n: u64| -> u64 {
        gw.query_row(
            "SELECT COALESCE(SUM(used), 0), COALESCE(SUM(reserved), 0) FROM gw_stacks WHERE node = ?1",
            [n as i64],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)?)),
        )
        .map(|(used, reserved)| {
            assert_eq!(reserved, 0, "a lease left open on node {n}");
            used
        })
        .unwrap()
    };
    let all_paid: Vec<Done> = paid.iter().chain(&limited_paid).cloned().collect();
    let units_to = |n: u64| -> u64 {
        all_paid
            .iter()
            .filter(|d| d.node == n)
            .map(|d| d.total_tokens)
            .sum()
    };
    for n in [cheap, middle, dear] {
        assert_eq!(gw_used(n), units_to(n), "gateway stacks on node {n}");
    }
    // Each node's meter, over the stacks of everyone but the devnet's user (the gateway's).
    let user = s(&net["user"]["address"]);
    let node_used = |n: u64| -> u64 {
        let c =
            rusqlite::Connection::open(Path::new(&s(&node(n)["home"])).join("state.db")).unwrap();
        c.query_row(
            "SELECT COALESCE(SUM(units_used), 0) FROM stacks WHERE owner <> ?1",
            [&user],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    };
    // The killed node, restarted, releases the reservations of the requests it was running;
    // then its meter holds exactly the requests it settled: those whose answers the gateway
    // kept (the units the clients were charged), and any it finished in the instant before
    // the kill without the answer getting out.
    let cheap_node = node(cheap);
    procs.spawn(
        "node restarted",
        &dir.join("restarted.log"),
        &[
            "--home",
            &s(&cheap_node["home"]),
            "--threads",
            "1",
            "node",
            "run",
            "--config",
            &s(&cheap_node["config"]),
        ],
    );
    let u = s(&cheap_node["url"]);
    wait_for("the restarted node", Duration::from_secs(240), || {
        ureq::get(&format!("{u}/health")).call().is_ok()
    });
    let (reserved, settled, kept_units) = {
        let c = rusqlite::Connection::open(Path::new(&s(&cheap_node["home"])).join("state.db"))
            .unwrap();
        let reserved: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM requests WHERE state = 'reserved'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let mut q = c
            .prepare(
                "SELECT stack_small_id, request_hash, prompt_tokens + completion_tokens \
                 FROM requests WHERE state = 'settled'",
            )
            .unwrap();
        let settled: Vec<(i64, Vec<u8>, i64)> = q
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let kept: i64 = settled
            .iter()
            .filter(|(stack, hash, _)| {
                gw.query_row(
                    "SELECT COUNT(*) FROM evidence WHERE verified = 1 AND stack = ?1 \
                     AND request_hash = ?2",
                    rusqlite::params![stack, hash],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap()
                    == 1
            })
            .map(|(_, _, u)| u)
            .sum();
        (reserved, settled, kept as u64)
    };
    assert_eq!(reserved, 0, "reservations left after the restart");
    assert_eq!(
        kept_units,
        units_to(cheap),
        "the killed node settled every answer the clients got"
    );
    let settled_units: u64 = settled.iter().map(|(_, _, u)| *u as u64).sum();
    assert_eq!(node_used(cheap), settled_units, "the killed node's meter");
    let stacks: i64 = gw
        .query_row("SELECT COUNT(*) FROM gw_stacks", [], |r| r.get(0))
        .unwrap();
    eprintln!(
        "requests paid: {} ({} streamed); units per node: {:?}; forged answers refused: {} \
         ({} units); stacks bought by the gateway: {stacks}; node meters: {:?}",
        all_paid.len(),
        all_paid.iter().filter(|d| d.stream).count(),
        [cheap, middle, dear].map(|n| (n, units_to(n))),
        forger.forged.load(Ordering::SeqCst),
        forger.forged_units.load(Ordering::SeqCst),
        [cheap, middle, dear].map(|n| (n, node_used(n))),
    );
    eprintln!(
        "the killed node settled {} requests, {} of them answers the gateway never got",
        settled.len(),
        settled.len() - all_paid.iter().filter(|d| d.node == cheap).count()
    );
    assert_eq!(
        node_used(middle),
        units_to(middle) + forger.forged_units.load(Ordering::SeqCst),
        "the forging node's meter: what it served plus what the gateway refused"
    );
    assert_eq!(node_used(dear), units_to(dear), "the dearest node's meter");

    // 6. SIGKILL the gateway with requests in flight, restart it: its holds and stack
    //    reservations are released, every unit granted to a key is in a balance or spent, and
    //    the key paid at least for every answer its clients got (an answer charged in the
    //    instant before the kill may not have got out; an answer that got out was charged).
    let spent = |k: &HashMap<String, Value>| {
        k["devnet"]["spent_node_micro"].as_u64().unwrap()
            + k["devnet"]["spent_margin_micro"].as_u64().unwrap()
    };
    let spent0 = spent(&keys(dir));
    let mut run = client
        .command(&key, &["run", "12", "4", "p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut phase6 = Vec::new();
    let mut in_flight = (0i64, 0i64);
    for line in BufReader::new(run.stdout.take().unwrap()).lines() {
        phase6.push(parse(&line.unwrap()));
        if phase6.len() == 3 {
            procs.kill("gateway");
            in_flight = gw
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM holds), \
                     (SELECT COALESCE(SUM(reserved), 0) FROM gw_stacks)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
        }
    }
    run.wait().unwrap();
    assert!(
        in_flight.0 > 0 && in_flight.1 > 0,
        "the kill hit requests in flight: {in_flight:?}"
    );
    procs.spawn("gateway restarted", &dir.join("gateway2.log"), &gw_args);
    wait_for("the restarted gateway", Duration::from_secs(60), || {
        ureq::get(&format!("{gw_url}/health")).call().is_ok()
    });
    let after = client.run(&key, 1, 1, "p");
    all_ok("after the restart", &after);
    let k = keys(dir);
    assert_eq!(k["devnet"]["held_micro"].as_u64(), Some(0));
    let (granted, balances, held, spent_all): (i64, i64, i64, i64) = gw
        .query_row(
            "SELECT SUM(granted), SUM(balance), SUM(held), SUM(spent_node + spent_margin) \
             FROM keys",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(held, 0);
    assert_eq!(
        granted,
        balances + spent_all,
        "every unit granted is kept or spent"
    );
    let reserved: i64 = gw
        .query_row(
            "SELECT COALESCE(SUM(reserved), 0) FROM gw_stacks",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reserved, 0, "stack reservations left after the restart");
    let delivered: Vec<Done> = phase6
        .iter()
        .chain(&after)
        .filter(|d| d.ok)
        .cloned()
        .collect();
    let (node_micro, margin_micro) = bill(&delivered);
    let paid6 = spent(&k) - spent0;
    assert!(
        paid6 >= node_micro + margin_micro,
        "answers delivered but not charged: paid {paid6}, delivered {}",
        node_micro + margin_micro
    );
    eprintln!(
        "gateway SIGKILL: {} holds and {} stack units reserved at the kill; {} answers got \
         out ({} µ), the key paid {paid6} µ",
        in_flight.0,
        in_flight.1,
        delivered.len(),
        node_micro + margin_micro
    );
}
