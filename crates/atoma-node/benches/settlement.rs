//! What the request log costs: `cargo bench -p atoma-node --bench settlement`.
//!
//! Builds 1,000 realistic log records (a ~128-token chat prompt; a 64-token answer, as one JSON
//! body for half of them and as 64 signed SSE chunks for the other half), charges them to a
//! stack in the node's state file as the API does, then times what settlement does with them
//! (read the frozen log, assemble the blob, the Merkle root, store it on the DA store: a local
//! directory, and our Walrus-API server through the Walrus client) and what an attestor does
//! (fetch, decode, check every signature, recompute the root). Prints bytes per request too.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use atoma_crypto::signed_json::sign_json;
use atoma_crypto::{Keypair, blake2b256, merkle};
use atoma_da::{BlobStore, DirStore, WalrusClient, WalrusConfig};
use atoma_ledger::{Address, Amount, ComputeUnits, NodeSmallId, Stack, StackSmallId, TaskSmallId};
use atoma_state::log::{LogRecord, ResponseRecord, SamplingRecord, StackLog};
use atoma_state::meter::{Meter, Settled};
use serde_json::json;

const N: usize = 1_000;
const ANSWER_TOKENS: usize = 64;

fn record(i: usize, user: &Keypair, node: &Keypair, stream: bool) -> (LogRecord, [u8; 32]) {
    let prompt = "Summarise the following passage about the history of the printing press \
        in Europe, paying attention to dates and names. "
        .repeat(5);
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": ANSWER_TOKENS, "stream": stream, "nonce": i})
    .to_string();
    let words: Vec<String> = (0..ANSWER_TOKENS).map(|t| format!(" word{t}")).collect();
    let (response, hash) = if stream {
        let mut cat = Vec::new();
        let chunks = words
            .iter()
            .map(|w| {
                let (v, h) = sign_json(
                    node,
                    json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion.chunk",
                           "created": 1_700_000_000u64, "model": "smollm2",
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": w},
                                        "finish_reason": null, "logprobs": null}]}),
                );
                cat.extend_from_slice(&h);
                v.to_string()
            })
            .collect();
        (ResponseRecord::Stream(chunks), blake2b256(&cat))
    } else {
        let (v, h) = sign_json(
            node,
            json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion",
                   "created": 1_700_000_000u64, "model": "smollm2",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()},
                                "finish_reason": "length", "logprobs": null}],
                   "usage": {"prompt_tokens": 128, "completion_tokens": ANSWER_TOKENS,
                             "total_tokens": 128 + ANSWER_TOKENS}, "seed": i}),
        );
        (ResponseRecord::Json(v.to_string()), h)
    };
    let rec = LogRecord {
        request_signature: user.sign(&blake2b256(body.as_bytes())),
        request_body: body.into_bytes(),
        response,
        prompt_tokens: (0..128).collect(),
        output_tokens: (0..ANSWER_TOKENS as u32).collect(),
        seed: i as u64,
        sampling: SamplingRecord {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: ANSWER_TOKENS as u32,
            stop: vec![],
            ignore_eos: false,
        },
        finish_reason: "length".into(),
        usage_prompt_tokens: 128,
        usage_completion_tokens: ANSWER_TOKENS as u64,
        model_sha256: [7; 32],
        determinism_class: "atoma-engine/numerics-1/cpu/kv-f16".into(),
        extra_choices: Vec::new(),
    };
    (rec, hash)
}

fn main() {
    let (user, node) = (Keypair::from_secret([2; 32]), Keypair::from_secret([1; 32]));
    let dir = tempfile::tempdir().unwrap();
    let meter = Meter::open(&dir.path().join("state.db"), vec![NodeSmallId(1)]).unwrap();
    let owner = Address(user.address());
    meter
        .upsert_stack(&Stack {
            small_id: StackSmallId(1),
            stack_id: "s".into(),
            owner,
            task_small_id: TaskSmallId(1),
            selected_node_id: NodeSmallId(1),
            num_compute_units: ComputeUnits(1_000_000),
            price_per_one_million_compute_units: Amount(1_000),
            escrowed: Amount(1_000),
            is_claimed: false,
            created_at_epoch: 0,
        })
        .unwrap();
    let records: Vec<(LogRecord, [u8; 32])> = (0..N)
        .map(|i| record(i, &user, &node, i % 2 == 1))
        .collect();
    let encoded: Vec<Vec<u8>> = records.iter().map(|(r, _)| r.encode()).collect();
    let bytes = |stream: usize| -> usize {
        encoded
            .iter()
            .skip(stream)
            .step_by(2)
            .map(Vec::len)
            .sum::<usize>()
            / (N / 2)
    };
    let t = Instant::now();
    for ((rec, response_hash), encoded) in records.iter().zip(encoded.iter()) {
        meter
            .reserve(
                StackSmallId(1),
                &owner,
                rec.request_hash(),
                ComputeUnits(200),
                None,
            )
            .unwrap()
            .settle(Settled {
                prompt_tokens: 128,
                completion_tokens: ANSWER_TOKENS as u64,
                response_hash: *response_hash,
                record: encoded.clone(),
            })
            .unwrap();
    }
    let charge_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "log bytes per request: {} (JSON answer), {} (64-chunk stream); charging and logging \
         {N} requests took {charge_ms:.0} ms ({:.2} ms each: the reservation and the settlement, \
         two synchronous SQLite transactions)",
        bytes(0),
        bytes(1),
        charge_ms / N as f64
    );

    // Settlement: what the node does once the stack is frozen.
    let dir_store: Arc<dyn BlobStore> = Arc::new(DirStore::open(dir.path().join("da")).unwrap());
    let server_dir = DirStore::open(dir.path().join("server")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(atoma_da::server::serve(
        listener,
        server_dir,
        std::future::pending(),
    ));
    let walrus: Arc<dyn BlobStore> = Arc::new(WalrusClient::new(WalrusConfig::with_url(&url)));
    for (name, store) in [
        ("local directory", &dir_store),
        ("Walrus API (loopback)", &walrus),
    ] {
        let t = Instant::now();
        let log = meter.frozen_log(StackSmallId(1)).unwrap();
        let t_read = t.elapsed();
        let blob = StackLog::assemble(1, 1, &log.records);
        let root = merkle::root(&log.leaves);
        let t_build = t.elapsed();
        let stored = store.put(&blob).unwrap();
        let total = t.elapsed();
        println!(
            "settle {N} requests to {name}: {:.0} ms (read log {:.0} ms, blob + root {:.0} ms, \
             put {:.0} ms); blob {:.2} MiB stored as {} blob(s), root {}",
            total.as_secs_f64() * 1e3,
            t_read.as_secs_f64() * 1e3,
            (t_build - t_read).as_secs_f64() * 1e3,
            (total - t_build).as_secs_f64() * 1e3,
            blob.len() as f64 / (1024.0 * 1024.0),
            if name.starts_with("Walrus") {
                blob.len().div_ceil(10 << 20) + 1
            } else {
                1
            },
            &atoma_da::hex(&root)[..16]
        );
        // The attestor's side: fetch, decode, check every signature, recompute the root.
        let t = Instant::now();
        let fetched = store.get(&stored).unwrap();
        let t_get = t.elapsed();
        let decoded = StackLog::decode(&fetched).unwrap();
        let mut leaves = Vec::with_capacity(N);
        for r in &decoded.records {
            assert_eq!(r.request_signer().unwrap(), user.address());
            let (h, signer) = r.response_hash().unwrap();
            assert_eq!(signer, Some(node.address()));
            leaves.push(merkle::leaf(&r.request_hash(), &h));
        }
        assert_eq!(merkle::root(&leaves), root);
        println!(
            "attest {N} requests from {name}: {:.0} ms (get {:.0} ms; decode and check {} \
             signatures {:.0} ms)",
            t.elapsed().as_secs_f64() * 1e3,
            t_get.as_secs_f64() * 1e3,
            N + N / 2 + (N / 2) * ANSWER_TOKENS,
            (t.elapsed() - t_get).as_secs_f64() * 1e3
        );
    }
}
