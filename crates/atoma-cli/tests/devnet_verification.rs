//! Honest nodes are never disputed: on a 3-node devnet on the real default model, with
//! SamplingConsensus always attested and the attestors forced onto other CPU kernel levels than
//! the seller (`--kernels auto,avx2,scalar`), 1,000 requests over ten stacks (concurrency 1 to
//! 16 per stack; streaming and not; greedy, seeded and unseeded sampling; stop strings;
//! penalties) are settled, attested by re-executing a sample of 8 records per stack drawn from
//! the ledger's seed, and claimed, with no dispute. Each record re-executed on AVX2 or on the
//! scalar kernel gives the bits the seller's kernel gave.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atoma_crypto::{Keypair, blake2b256, read_keystore};
use atoma_ledger::{
    Address, Amount, ComputeUnits, EventCursor, Ledger, NodeSmallId, SqliteLedger, StackRequest,
    TaskSmallId,
};
use serde_json::{Value, json};

const STACKS: usize = 10;
const PER_STACK: usize = 100;
const CONCURRENCY: [usize; STACKS] = [1, 2, 4, 8, 16, 16, 8, 4, 2, 16];

struct Devnet(Child);

impl Drop for Devnet {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> (Devnet, Value) {
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
            "2000",
            "--dispute-window-epochs",
            "90",
        ])
        .args(["--kernels", "auto,avx2,scalar", "--verify-sample", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("devnet.out")).unwrap())
        .spawn()
        .unwrap();
    let mut d = Devnet(child);
    let t = Instant::now();
    loop {
        assert!(d.0.try_wait().unwrap().is_none(), "the devnet exited");
        if let Ok(text) = std::fs::read_to_string(dir.join("devnet.json")) {
            let net: Value = serde_json::from_str(&text).unwrap();
            if net["nodes"].as_array().unwrap().iter().all(|n| {
                ureq::get(&format!("{}/health", n["url"].as_str().unwrap()))
                    .call()
                    .is_ok()
            }) {
                return (d, net);
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "the devnet did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Request `i` of a stack: every fourth greedy, seeded, unseeded with penalties, or with a stop
/// string; every other one streamed. Returns the units charged.
fn request(url: &str, user: &Keypair, stack: u64, i: usize) -> u64 {
    let stream = i % 2 == 1;
    let mut body = json!({"model": "smollm2", "max_tokens": 12, "stream": stream,
        "stream_options": {"include_usage": true}, "nonce": i,
        "messages": [{"role": "user", "content": format!("Tell me about the number {i}.")}]});
    match i % 4 {
        0 => body["temperature"] = json!(0.0),
        1 => {
            body["temperature"] = json!(0.8);
            body["seed"] = json!(1000 + i);
        }
        2 => {
            body["temperature"] = json!(0.9);
            body["presence_penalty"] = json!(0.5);
            body["frequency_penalty"] = json!(0.3);
        }
        _ => {
            body["temperature"] = json!(0.7);
            body["seed"] = json!(i);
            body["stop"] = json!([".", "\n"]);
        }
    }
    let body = body.to_string();
    let text = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
        .set("X-Stack-Small-Id", &stack.to_string())
        .timeout(Duration::from_secs(300))
        .send_string(&body)
        .unwrap_or_else(|e| panic!("stack {stack} request {i}: {e}"))
        .into_string()
        .unwrap();
    let usage = if stream {
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .rfind(|d| *d != "[DONE]")
            .unwrap()
            .to_string();
        serde_json::from_str::<Value>(&last).unwrap()["usage"].clone()
    } else {
        serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
    };
    usage["total_tokens"].as_u64().unwrap()
}

#[test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
fn a_thousand_requests_attested_across_kernel_levels_without_a_dispute() {
    let dir = tempfile::tempdir().unwrap();
    let (_devnet, net) = start(dir.path());
    let ledger = SqliteLedger::open(Path::new(net["ledger"].as_str().unwrap())).unwrap();
    let user = read_keystore(Path::new(net["user"]["keystore"].as_str().unwrap()))
        .unwrap()
        .remove(0);
    let user_addr: Address = net["user"]["address"].as_str().unwrap().parse().unwrap();
    let seller = &net["nodes"][0];
    assert_eq!(seller["price"], 1_000, "node 1 is the cheapest");
    let url = seller["url"].as_str().unwrap().to_string();
    let task = TaskSmallId(net["tasks"]["sampling_consensus"].as_u64().unwrap());
    let t0 = Instant::now();
    let mut stacks = Vec::new();
    for (k, &conc) in CONCURRENCY.iter().enumerate() {
        // A price cap of 1 000 per million: only node 1 sells.
        let s = ledger
            .acquire_stack(
                user_addr,
                &StackRequest {
                    task_small_id: task,
                    num_compute_units: ComputeUnits(200_000),
                    price_per_one_million_compute_units: Amount(1_000),
                },
            )
            .unwrap();
        assert_eq!(s.selected_node_id, NodeSmallId(1));
        let charged: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..conc)
                .map(|w| {
                    let (url, user) = (&url, &user);
                    scope.spawn(move || {
                        (w..PER_STACK)
                            .step_by(conc)
                            .map(|i| request(url, user, s.small_id.0, k * PER_STACK + i))
                            .sum::<u64>()
                    })
                })
                .collect();
            workers.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let out = Command::new(env!("CARGO_BIN_EXE_atoma"))
            .args(["--home", seller["home"].as_str().unwrap(), "node", "settle"])
            .args(["--stack", &s.small_id.0.to_string()])
            .args(["--config", seller["config"].as_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stacks.push((s, charged));
    }
    let served = t0.elapsed();

    let t = Instant::now();
    while !stacks.iter().all(|(s, _)| {
        ledger
            .ticket(s.small_id)
            .unwrap()
            .is_some_and(|t| t.is_claimed)
    }) {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "not all claimed: {:?}",
            stacks
                .iter()
                .map(|(s, _)| ledger.ticket(s.small_id).unwrap())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let disputes = ledger
        .events_after(EventCursor(0), 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event.name() == "StackAttestationDisputeEvent")
        .count();
    assert_eq!(disputes, 0, "honest nodes are never disputed");
    let mut reexecuted_on = std::collections::BTreeMap::new();
    for (s, charged) in &stacks {
        let t = ledger.ticket(s.small_id).unwrap().unwrap();
        assert_eq!(t.num_claimed_compute_units, ComputeUnits(*charged));
        assert_eq!(t.commitment.leaf_count, PER_STACK as u64);
        assert_eq!(t.already_attested_nodes, t.requested_attestation_nodes);
        let a = t.already_attested_nodes[0];
        assert_ne!(a, NodeSmallId(1));
        let node = &net["nodes"][a.0 as usize - 1];
        let status: Value = ureq::get(&format!(
            "{}/operator/status",
            node["url"].as_str().unwrap()
        ))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
        let job = status["attestations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["stack"] == s.small_id.0)
            .unwrap()
            .clone();
        assert_eq!(
            job["detail"], "the log checks out; 8 of 100 records re-executed",
            "{job}"
        );
        *reexecuted_on.entry(a.0).or_insert(0) += 8;
    }
    // The attestors' kernels, as their nodes report them.
    for (n, want) in [(2u64, "avx2"), (3, "scalar")] {
        let log =
            std::fs::read_to_string(net["nodes"][n as usize - 1]["log"].as_str().unwrap()).unwrap();
        assert!(
            log.contains(&format!("kernel {want}")),
            "node {n} runs {want}"
        );
    }
    let seller_log = std::fs::read_to_string(seller["log"].as_str().unwrap()).unwrap();
    let seller_kernel = seller_log
        .lines()
        .find_map(|l| l.split("kernel ").nth(1))
        .unwrap_or("?")
        .to_string();
    assert!(ledger.totals().unwrap().is_conserved());
    println!(
        "{} requests served in {:.0} s by node 1 ({seller_kernel}); records re-executed by \
         node 2 (avx2) and 3 (scalar): {reexecuted_on:?}; 0 disputes",
        STACKS * PER_STACK,
        served.as_secs_f64()
    );
}
