//! Settlement end to end on the real default model (SmolLM2, pulled by `scripts/test.sh`): a
//! 3-node devnet (`atoma devnet up`, each node its own process with one thread); the user buys a
//! NoSecurity and a SamplingConsensus stack on the shared ledger file and sends 40 requests per
//! stack, streaming and not, four at a time; the nodes settle on their own at the 95% threshold,
//! SamplingConsensus stacks are attested by another node, and the nodes claim after the window.
//! At the end every balance is exact to the base unit: each stack's claimed units are what the
//! user was charged in the answers, the node got its fee, the attestor its share, the user the
//! rest of the escrow back, nobody else moved, and the ledger's totals are conserved.
//!
//! The same run twice: on the embedded ledger, and with `--ledger sui-fake`, where the nodes,
//! the gateway and the user's purchases all go through Sui's gRPC wire (signed Move calls,
//! events ingested with a cursor) to the Sui test double; the books are then read from the
//! test double's own ledger file; and a third time over the wire with only the deployed
//! contract's calls, whose settlements record the Merkle root alone (the attestor gets the
//! log's location from the seller's signed commitment at `GET /v1/settlements/{stack}`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoma_crypto::{Keypair, blake2b256, read_keystore};
use atoma_ledger::{
    Address, Amount, ComputeUnits, Ledger, NodeSmallId, SecurityLevel, SqliteLedger, Stack,
    StackRequest, TaskSmallId,
};
use atoma_state::published::PublishedCommitment;
use serde_json::{Value, json};

const MAX_TOKENS: u64 = 8;
const PRICE_CAP: u64 = 10_000;

struct Devnet {
    child: Child,
    net: Value,
}

impl Drop for Devnet {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, ledger: &str, contract: &str) -> Devnet {
    let child = Command::new(env!("CARGO_BIN_EXE_atoma"))
        .args([
            "--home",
            dir.to_str().unwrap(),
            "devnet",
            "up",
            "--nodes",
            "3",
        ])
        .args([
            "--port-base",
            "0",
            "--epoch-ms",
            "1000",
            "--stack-units",
            "1000",
            // Room for an attestor re-executing 40 requests on one thread while the other
            // devnets of this file share the machine's two cores.
            "--dispute-window-epochs",
            "12",
            "--ledger",
            ledger,
            "--contract",
            contract,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("devnet.out")).unwrap())
        .spawn()
        .unwrap();
    let mut d = Devnet {
        child,
        net: Value::Null,
    };
    let t = Instant::now();
    loop {
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "devnet exited: {}\n{}",
            std::fs::read_to_string(dir.join("devnet.out")).unwrap_or_default(),
            node_log_tails(dir)
        );
        if let Ok(text) = std::fs::read_to_string(dir.join("devnet.json")) {
            let net: Value = serde_json::from_str(&text).unwrap();
            let up = net["nodes"].as_array().unwrap().iter().all(|n| {
                ureq::get(&format!("{}/health", n["url"].as_str().unwrap()))
                    .call()
                    .is_ok()
            });
            if up {
                d.net = net;
                return d;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "the devnet did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn request(url: &str, user: &Keypair, stack: u64, nonce: u64, stream: bool) -> u64 {
    let body = json!({"model": "smollm2",
                      "messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": MAX_TOKENS, "ignore_eos": true, "temperature": 0.7,
                      "stream": stream, "stream_options": {"include_usage": true},
                      "nonce": nonce})
    .to_string();
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
        .set("X-Stack-Small-Id", &stack.to_string())
        .timeout(Duration::from_secs(120))
        .send_string(&body)
        .unwrap_or_else(|e| panic!("stack {stack} request {nonce}: {e}"))
        .into_string()
        .unwrap();
    let usage = if stream {
        let last = resp
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .rfind(|d| *d != "[DONE]")
            .unwrap()
            .to_string();
        serde_json::from_str::<Value>(&last).unwrap()["usage"].clone()
    } else {
        serde_json::from_str::<Value>(&resp).unwrap()["usage"].clone()
    };
    assert_eq!(usage["completion_tokens"].as_u64(), Some(MAX_TOKENS));
    usage["total_tokens"].as_u64().unwrap()
}

fn url_of(net: &Value, node: NodeSmallId) -> String {
    net["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["small_id"] == node.0)
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Buys a stack as the user: on the ledger file, or over the Sui wire with `atoma db --config`.
fn buy(dir: &Path, net: &Value, ledger: &SqliteLedger, user: Address, req: &StackRequest) -> Stack {
    let Some(config) = net["ledger_config"].as_str() else {
        return ledger.acquire_stack(user, req).unwrap();
    };
    let out = Command::new(env!("CARGO_BIN_EXE_atoma"))
        .args(["--home", dir.to_str().unwrap(), "db", "--config", config])
        .args(["acquire-stack", "--key", "user"])
        .args(["--task", &req.task_small_id.0.to_string()])
        .args(["--units", &req.num_compute_units.0.to_string()])
        .args([
            "--price",
            &req.price_per_one_million_compute_units.0.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn three_nodes_settle_attest_and_claim_to_the_unit() {
    settle_attest_and_claim("local", "extended");
}

#[test]
fn the_same_over_the_sui_wire_with_the_test_double() {
    settle_attest_and_claim("sui-fake", "extended");
}

/// The nodes call only the published package's functions: a settlement records its root alone,
/// and the attestor finds the log through the seller's signed commitment (`[settlement] peers`).
#[test]
fn the_same_with_the_deployed_contracts_calls() {
    settle_attest_and_claim("sui-fake", "deployed");
}

fn settle_attest_and_claim(ledger_kind: &str, contract: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), ledger_kind, contract);
    let net = &d.net;
    let ledger = Arc::new(SqliteLedger::open(Path::new(net["ledger"].as_str().unwrap())).unwrap());
    let user = read_keystore(Path::new(net["user"]["keystore"].as_str().unwrap()))
        .unwrap()
        .remove(0);
    let user_addr: Address = net["user"]["address"].as_str().unwrap().parse().unwrap();

    // One request on the devnet's own stack tells the units a request costs.
    let first = &net["stacks"][0];
    let per_request = request(
        first["url"].as_str().unwrap(),
        &user,
        first["small_id"].as_u64().unwrap(),
        0,
        false,
    );
    // 40 requests use 40/42 = 95.2% of the stack: the threshold is crossed by the last one.
    let units = 42 * per_request;

    let owners: Vec<(NodeSmallId, Address)> = (1..=3)
        .map(|i| (NodeSmallId(i), ledger.node(NodeSmallId(i)).unwrap().owner))
        .collect();
    let balances = |l: &SqliteLedger| -> Vec<u64> {
        owners
            .iter()
            .map(|(_, a)| l.balance(*a).unwrap().0)
            .chain([l.balance(user_addr).unwrap().0])
            .collect()
    };
    let before = balances(&ledger);
    let tasks = [
        net["tasks"]["no_security"].as_u64().unwrap(),
        net["tasks"]["sampling_consensus"].as_u64().unwrap(),
    ];
    let stacks: Vec<_> = tasks
        .iter()
        .map(|t| {
            buy(
                dir.path(),
                net,
                &ledger,
                user_addr,
                &StackRequest {
                    task_small_id: TaskSmallId(*t),
                    num_compute_units: ComputeUnits(units),
                    price_per_one_million_compute_units: Amount(PRICE_CAP),
                },
            )
        })
        .collect();

    // 40 requests per stack, four threads per stack, streaming and not.
    let charged: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = stacks
            .iter()
            .map(|st| {
                let url = url_of(net, st.selected_node_id);
                let user = &user;
                s.spawn(move || {
                    let workers: Vec<_> = (0..4u64)
                        .map(|w| {
                            let url = url.clone();
                            let stack = st.small_id.0;
                            std::thread::spawn({
                                let user = user.clone();
                                move || {
                                    (0..10u64)
                                        .map(|i| {
                                            request(&url, &user, stack, 1 + w * 10 + i, i % 2 == 0)
                                        })
                                        .sum::<u64>()
                                }
                            })
                        })
                        .collect();
                    workers.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for c in &charged {
        assert_eq!(*c, 40 * per_request);
    }

    // The nodes settle, attest and claim on their own.
    let t = Instant::now();
    let settled = |s: &atoma_ledger::Stack| {
        ledger
            .ticket(s.small_id)
            .unwrap()
            .is_some_and(|t| t.is_claimed)
    };
    while !stacks.iter().all(settled) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not claimed in time: {:?}",
            stacks
                .iter()
                .map(|s| ledger.ticket(s.small_id).unwrap())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Exact books.
    let mut expect: Vec<i128> = before.iter().map(|b| i128::from(*b)).collect();
    let user_i = expect.len() - 1;
    for (st, charged) in stacks.iter().zip(&charged) {
        let t = ledger.ticket(st.small_id).unwrap().unwrap();
        assert_eq!(t.num_claimed_compute_units, ComputeUnits(*charged));
        let seller_url = url_of(net, st.selected_node_id);
        let published: Value = ureq::get(&format!("{seller_url}/v1/settlements/{}", st.small_id.0))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let (p, signer) = PublishedCommitment::from_signed_json(&published).unwrap();
        assert_eq!(signer, ledger.node(st.selected_node_id).unwrap().owner.0);
        assert_eq!(p.commitment.merkle_root, t.commitment.merkle_root);
        assert_eq!(p.commitment.leaf_count, 40);
        assert_eq!(p.claimed_units, *charged);
        if contract == "deployed" {
            assert!(t.commitment.is_root_only(), "{:?}", t.commitment);
        } else {
            assert_eq!(t.commitment, p.commitment);
        }
        let level = ledger.task(st.task_small_id).unwrap().security_level;
        let price = st.price_per_one_million_compute_units;
        let fee = level.node_fee(price, ComputeUnits(*charged)).unwrap().0;
        let seller = st.selected_node_id.0 as usize - 1;
        expect[user_i] -= i128::from(st.escrowed.0);
        expect[seller] += i128::from(fee);
        let mut shares = 0;
        if level == SecurityLevel::SamplingConsensus {
            assert_eq!(t.requested_attestation_nodes.len(), 1);
            assert_eq!(t.already_attested_nodes, t.requested_attestation_nodes);
            assert_ne!(t.requested_attestation_nodes[0], st.selected_node_id);
            let pool = level
                .attestor_pool(price, ComputeUnits(*charged))
                .unwrap()
                .0;
            let a = t.already_attested_nodes[0].0 as usize - 1;
            expect[a] += i128::from(pool);
            shares = pool;
        } else {
            assert!(t.requested_attestation_nodes.is_empty());
        }
        expect[user_i] += i128::from(st.escrowed.0 - fee - shares);
        // Each node's own view agrees (once it has recorded the claim the ledger shows: over
        // the Sui wire the ledger's books can be read a moment before the node's call returns).
        let waited = Instant::now();
        let row = loop {
            let status: Value = ureq::get(&format!(
                "{}/operator/status",
                url_of(net, st.selected_node_id)
            ))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
            let row = status["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["stack"] == st.small_id.0)
                .unwrap()
                .clone();
            if row["state"] == "claimed" || waited.elapsed() > Duration::from_secs(20) {
                break row;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(row["state"], "claimed", "{row}");
        assert_eq!(row["node_fee"], fee);
        // The attestor re-executed every record on its own engine before attesting.
        if let Some(a) = t.already_attested_nodes.first() {
            let status: Value = ureq::get(&format!("{}/operator/status", url_of(net, *a)))
                .call()
                .unwrap()
                .into_json()
                .unwrap();
            let job = status["attestations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["stack"] == st.small_id.0)
                .unwrap()
                .clone();
            assert_eq!(job["state"], "attested", "{job}");
            assert_eq!(
                job["detail"], "the log checks out; 40 of 40 records re-executed",
                "{job}"
            );
        }
    }
    let after: Vec<i128> = balances(&ledger).iter().map(|b| i128::from(*b)).collect();
    assert_eq!(after, expect, "balances of nodes 1-3 and the user");
    let totals = ledger.totals().unwrap();
    assert!(totals.is_conserved(), "{totals:?}");
    for (n, _) in &owners {
        assert_eq!(
            ledger.node(*n).unwrap().collateral,
            Amount(1_000_000),
            "nobody slashed"
        );
    }
    // `atoma devnet status` reads the same books.
    let out = Command::new(env!("CARGO_BIN_EXE_atoma"))
        .args([
            "--home",
            dir.path().to_str().unwrap(),
            "devnet",
            "status",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["conserved"], true);
    drop(d);
}

/// The last lines of every node's log under a devnet home, for a failure message (a node that
/// exits at start-up says why only there).
fn node_log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for i in 1..=8 {
        let log = dir.join(format!("nodes/node-{i}/node.log"));
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        out.push_str(&format!("--- {} (last 20 lines)\n{tail}\n", log.display()));
    }
    out
}
