//! Runs `atoma db` settlement verbs and `atoma log` on a temp home, without a node: a stack is
//! bought, settled, refused a claim inside its dispute window, claimed after it, and money is
//! conserved; a real request log is stored on a local DA directory, committed on the ledger, and
//! inclusion proofs of its requests are built, checked, and refused when tampered with.

mod common;

use std::path::Path;
use std::process::Output;

use atoma_crypto::signed_json::sign_json;
use atoma_crypto::{Keypair, blake2b256, merkle};
use atoma_da::{BlobStore, DirStore};
use atoma_ledger::{
    Address, Amount, ComputeUnits, Hash32, Ledger, NewTask, NodeSmallId, SecurityLevel,
    SqliteLedger, StackCommitment, StackRequest, StackSmallId, TaskRole, TaskSmallId,
};
use atoma_state::log::{LogRecord, ResponseRecord, SamplingRecord, StackLog};
use serde_json::{Value, json};

use common::atoma;

fn run(home: &Path, args: &[&str]) -> Output {
    atoma(home, args).output().unwrap()
}

/// Runs and requires success; returns stdout.
fn ok(home: &Path, args: &[&str]) -> String {
    let out = run(home, args);
    assert!(
        out.status.success(),
        "atoma {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and requires success; parses stdout as JSON.
fn ok_json(home: &Path, args: &[&str]) -> Value {
    let s = ok(home, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("atoma {args:?}: `{s}` is not JSON: {e}"))
}

/// Runs and requires exit code 1 with a one-line error containing `needle`; returns it.
fn fails(home: &Path, args: &[&str], needle: &str) -> String {
    let out = run(home, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "atoma {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "atoma {args:?}: expected `{needle}` in: {stderr}"
    );
    stderr
}

#[test]
fn settle_claim_and_collateral_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    ok(h, &["keys", "new", "node"]);
    ok(h, &["keys", "new", "user"]);
    assert_eq!(
        ok_json(h, &["db", "register-node", "--key", "node"])["small_id"],
        1
    );
    let task = ok_json(
        h,
        &[
            "db",
            "create-task",
            "--model",
            "m",
            "--security-level",
            "0",
            "--min-collateral",
            "1000",
        ],
    );
    assert_eq!(task["small_id"], 1);
    assert_eq!(task["minimum_collateral"], 1000);
    ok(h, &["db", "faucet", "--to", "node", "--amount", "1000000"]);
    ok(h, &["db", "faucet", "--to", "user", "--amount", "10000000"]);
    let dep = ok_json(
        h,
        &[
            "db",
            "deposit-collateral",
            "--node",
            "1",
            "--amount",
            "500000",
        ],
    );
    assert_eq!(dep, json!({"node": 1, "collateral": 500000}));
    ok(
        h,
        &[
            "db",
            "subscribe-node-to-task",
            "--node",
            "1",
            "--task",
            "1",
            "--price",
            "1000000",
        ],
    );
    let stack = ok_json(
        h,
        &[
            "db",
            "acquire-stack",
            "--task",
            "1",
            "--units",
            "100000",
            "--price",
            "1000000",
        ],
    );
    assert_eq!(stack["small_id"], 1);
    assert_eq!(stack["escrowed"], 100000);
    assert_eq!(ok_json(h, &["db", "ticket", "--stack", "1"]), Value::Null);

    let root = "ab".repeat(32);
    let blob_hash = format!("0x{}", "cd".repeat(32));
    let ticket = ok_json(
        h,
        &[
            "db",
            "settle",
            "--node",
            "1",
            "--stack",
            "1",
            "--units",
            "40000",
            "--root",
            &root,
            "--leaves",
            "3",
            "--blob-id",
            "made-up-blob",
            "--blob-hash",
            &blob_hash,
            "--blob-size",
            "123",
        ],
    );
    assert_eq!(ticket["num_claimed_compute_units"], 40000);
    assert_eq!(ticket["commitment"]["merkle_root"], root.as_str());
    assert_eq!(ticket["commitment"]["leaf_count"], 3);
    assert_eq!(ticket["created_at_epoch"], 0);
    assert_eq!(ticket["dispute_settled_at_epoch"], 1);
    assert_eq!(ok_json(h, &["db", "show", "ticket", "1"]), ticket);
    fails(
        h,
        &[
            "db",
            "settle",
            "--node",
            "1",
            "--stack",
            "1",
            "--units",
            "1",
            "--root",
            &root,
            "--leaves",
            "1",
            "--blob-id",
            "x",
            "--blob-hash",
            &blob_hash,
            "--blob-size",
            "1",
        ],
        "already has a settlement ticket",
    );

    // Inside the dispute window: no claim, and the collateral is locked.
    let e = fails(
        h,
        &["db", "claim", "--node", "1", "--stack", "1"],
        "can be claimed from epoch 1",
    );
    assert!(e.contains("it is epoch 0"), "{e}");
    fails(
        h,
        &["db", "withdraw-collateral", "--node", "1", "--amount", "1"],
        "collateral is locked",
    );
    assert_eq!(ok(h, &["db", "epoch"]).trim(), "0");
    assert_eq!(ok(h, &["db", "advance-epoch"]).trim(), "1");
    assert_eq!(ok(h, &["db", "epoch"]).trim(), "1");

    let claimed = ok_json(h, &["db", "claim", "--node", "1", "--stack", "1"]);
    let c = &claimed.as_array().unwrap()[0];
    assert_eq!(c["stack_small_id"], 1);
    assert_eq!(c["num_claimed_compute_units"], 40000);
    assert_eq!(c["node_fee"], 40000);
    assert_eq!(c["user_refund_amount"], 60000);
    assert_eq!(
        ok_json(h, &["db", "ticket", "--stack", "1"])["is_claimed"],
        true
    );
    fails(
        h,
        &["db", "claim", "--node", "1", "--stack", "1"],
        "already claimed",
    );

    let totals = ok_json(h, &["db", "totals"]);
    assert_eq!(totals["conserved"], true);
    assert_eq!(totals["minted"], 11_000_000);
    assert_eq!(totals["escrow"], 0);
    assert_eq!(totals["collateral"], 500_000);

    let left = ok_json(
        h,
        &[
            "db",
            "withdraw-collateral",
            "--node",
            "1",
            "--amount",
            "500000",
        ],
    );
    assert_eq!(left, json!({"node": 1, "collateral": 0}));
    assert_eq!(ok(h, &["db", "show", "balance", "node"]).trim(), "1040000");
    assert_eq!(ok(h, &["db", "show", "balance", "user"]).trim(), "9960000");
    assert_eq!(ok_json(h, &["db", "totals"])["conserved"], true);

    // Parameters: overrides only the given fields, keeps the rest.
    let before = ok_json(h, &["db", "params"]);
    let after = ok_json(
        h,
        &[
            "db",
            "set-params",
            "--dispute-window-epochs",
            "3",
            "--min-collateral",
            "7",
        ],
    );
    assert_eq!(after["dispute_window_epochs"], 3);
    assert_eq!(after["min_collateral"], 7);
    assert_eq!(after["stack_expiry_epochs"], before["stack_expiry_epochs"]);
    assert_eq!(ok_json(h, &["db", "params"]), after);
    fails(
        h,
        &["db", "set-params", "--dispute-window-epochs", "0"],
        "dispute_window_epochs must be at least 1",
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A log of three valid records (user key [2; 32], node key [1; 32]); record 1 is streamed.
fn make_log(stack: u64, node: u64) -> StackLog {
    let node_key = Keypair::from_secret([1; 32]);
    let user = Keypair::from_secret([2; 32]);
    let record = |i: u32| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"Hi {i}"}}],"seed":{i}}}"#
        );
        let sig = user.sign(&blake2b256(body.as_bytes()));
        let chunk = |t: &str| {
            sign_json(
                &node_key,
                json!({"id": format!("c-{i}"), "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"content": t}}]}),
            )
            .0
            .to_string()
        };
        let response = if i == 1 {
            ResponseRecord::Stream(vec![chunk("Hel"), chunk("lo")])
        } else {
            let (v, _) = sign_json(
                &node_key,
                json!({"id": format!("c-{i}"), "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                    "content": format!("Hello {i}")}, "finish_reason": "stop"}]}),
            );
            ResponseRecord::Json(v.to_string())
        };
        LogRecord {
            request_body: body.into_bytes(),
            request_signature: sig,
            response,
            prompt_tokens: vec![1, 2, 3],
            output_tokens: vec![4, 5],
            seed: 100 + u64::from(i),
            sampling: SamplingRecord {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                max_tokens: 16,
                stop: vec![],
                ignore_eos: false,
            },
            finish_reason: if i == 2 { "length" } else { "stop" }.into(),
            usage_prompt_tokens: 3,
            usage_completion_tokens: 2,
            model_sha256: [0xab; 32],
            determinism_class: "atoma-engine/1/cpu/kv-f16".into(),
            extra_choices: Vec::new(),
        }
    };
    StackLog {
        stack_small_id: stack,
        node_small_id: node,
        records: (0..3).map(record).collect(),
    }
}

/// Stores `log` in HOME/da and settles `stack` with its commitment (or with `root` instead of
/// the real Merkle root).
fn store_and_settle(
    l: &SqliteLedger,
    h: &Path,
    owner: Address,
    log: &StackLog,
    root: Option<Hash32>,
) {
    let blob = log.encode();
    let r = DirStore::open(h.join("da")).unwrap().put(&blob).unwrap();
    let leaves = log.leaves().unwrap();
    let commitment = StackCommitment {
        merkle_root: root.unwrap_or(Hash32(merkle::root(&leaves))),
        leaf_count: leaves.len() as u64,
        blob_id: r.blob_id,
        blob_hash: Hash32(blake2b256(&blob)),
        blob_size: blob.len() as u64,
    };
    l.try_settle_stack(
        owner,
        NodeSmallId(log.node_small_id),
        StackSmallId(log.stack_small_id),
        ComputeUnits(15),
        &commitment,
    )
    .unwrap();
}

#[test]
fn inclusion_proofs_of_a_settled_log() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let owner = Address([7; 32]);
    let buyer = Address([8; 32]);
    let log = make_log(1, 1);
    {
        let l = SqliteLedger::open(&h.join("ledger.db")).unwrap();
        let node = l.register_node(owner).unwrap().small_id;
        let task = l
            .create_task(
                owner,
                &NewTask {
                    role: TaskRole::ChatCompletion,
                    model_name: Some("m".into()),
                    security_level: SecurityLevel::NoSecurity,
                    minimum_reputation_score: 0,
                    is_public: true,
                    minimum_collateral: Amount(0),
                },
            )
            .unwrap()
            .small_id;
        assert_eq!((node, task), (NodeSmallId(1), TaskSmallId(1)));
        l.subscribe_node_to_task(owner, node, task, Amount(1_000_000))
            .unwrap();
        l.faucet(buyer, Amount(1_000_000)).unwrap();
        let req = StackRequest {
            task_small_id: task,
            num_compute_units: ComputeUnits(1000),
            price_per_one_million_compute_units: Amount(1_000_000),
        };
        for _ in 0..3 {
            l.acquire_stack(buyer, &req).unwrap();
        }
        store_and_settle(&l, h, owner, &log, None);
        // Stack 2 commits a root its log does not have.
        store_and_settle(&l, h, owner, &make_log(2, 1), Some(Hash32([9; 32])));
        // Stack 3 is not settled.
    }
    let hash = |i: usize| hex(&log.records[i].request_hash());
    let leaves = log.leaves().unwrap();
    let root = hex(&merkle::root(&leaves));
    let ledger = h.join("ledger.db");
    let ledger = ledger.to_str().unwrap();

    // Show: one line per record, then the root.
    let shown = ok(h, &["log", "show", "--stack", "1"]);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 5, "{shown}");
    assert!(lines[0].contains("3 records"), "{shown}");
    for i in 0..3 {
        assert!(lines[1 + i].contains(&hash(i)), "{shown}");
        assert!(
            lines[1 + i].contains(&format!("seed {}", 100 + i)),
            "{shown}"
        );
    }
    assert!(lines[3].contains("length"), "{shown}");
    assert!(lines[4].contains(&root), "{shown}");

    // Proof of record 1, to stdout and to a file.
    let p = ok_json(
        h,
        &["log", "proof", "--stack", "1", "--request-hash", &hash(1)],
    );
    assert_eq!(p["stack"], 1);
    assert_eq!(p["index"], 1);
    assert_eq!(p["leaf_count"], 3);
    assert_eq!(p["request_hash"], hash(1).as_str());
    let response_hash = |i: usize| hex(&log.records[i].response_hash().unwrap().0);
    assert_eq!(p["response_hash"], response_hash(1).as_str());
    assert_eq!(p["leaf"], hex(&leaves[1]).as_str());
    assert_eq!(p["merkle_root"], root.as_str());
    let path: Vec<String> = merkle::proof(&leaves, 1)
        .unwrap()
        .iter()
        .map(|d| hex(d))
        .collect();
    assert_eq!(p["path"], json!(path));
    let file = h.join("proof.json");
    let f = file.to_str().unwrap();
    let with_0x = format!("0x{}", hash(1));
    ok(
        h,
        &[
            "log",
            "proof",
            "--stack",
            "1",
            "--request-hash",
            &with_0x,
            "--out",
            f,
        ],
    );
    let from_file: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(from_file, p);

    // Verification: offline, with the response hash, against the ledger.
    let v = ok(h, &["log", "verify-proof", f]);
    assert!(
        v.starts_with(&format!(
            "ok: request {} is leaf 1 of 3 under root {root}",
            hash(1)
        )),
        "{v}"
    );
    let rh = response_hash(1);
    ok(
        h,
        &[
            "log",
            "verify-proof",
            f,
            "--response-hash",
            &rh,
            "--ledger",
            ledger,
        ],
    );
    let other = response_hash(0);
    fails(
        h,
        &["log", "verify-proof", f, "--response-hash", &other],
        "the proof is for response",
    );

    // Tampered proofs.
    let tampered = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut v = p.clone();
        edit(&mut v);
        let file = h.join(name);
        std::fs::write(&file, v.to_string()).unwrap();
        file.to_str().unwrap().to_owned()
    };
    let flip = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        b[0] = if b[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let bad_path = tampered("path.json", &|v| {
        v["path"][0] = json!(flip(v["path"][0].as_str().unwrap()));
    });
    fails(h, &["log", "verify-proof", &bad_path], "invalid proof");
    let bad_index = tampered("index.json", &|v| v["index"] = json!(2));
    fails(h, &["log", "verify-proof", &bad_index], "invalid proof");
    let bad_leaf = tampered("leaf.json", &|v| {
        v["response_hash"] = json!(response_hash(0));
    });
    fails(
        h,
        &["log", "verify-proof", &bad_leaf],
        "is not H(request_hash",
    );
    // A proof that holds for another root does not match the ledger's ticket.
    let other_root = tampered("root.json", &|v| v["stack"] = json!(2));
    fails(
        h,
        &["log", "verify-proof", &other_root, "--ledger", ledger],
        "the ledger commits root",
    );
    let not_json = h.join("garbage.json");
    std::fs::write(&not_json, "{").unwrap();
    fails(
        h,
        &["log", "verify-proof", not_json.to_str().unwrap()],
        "is not an inclusion proof",
    );

    // Requests and stacks that cannot be proven.
    let absent = hex(&blake2b256(b"never sent"));
    fails(
        h,
        &["log", "proof", "--stack", "1", "--request-hash", &absent],
        "is not in the log of stack 1",
    );
    let bad = run(
        h,
        &["log", "proof", "--stack", "1", "--request-hash", "xyz"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("64 hex digits"));
    fails(h, &["log", "show", "--stack", "2"], "the ticket commits");
    fails(h, &["log", "show", "--stack", "3"], "no settlement ticket");
    let empty = h.join("empty-da");
    fails(
        h,
        &[
            "log",
            "show",
            "--stack",
            "1",
            "--da-dir",
            empty.to_str().unwrap(),
        ],
        "not found",
    );
}
