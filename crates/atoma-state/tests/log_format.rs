//! The request-log format and commitment: round trips, strict decoding, tamper detection, and
//! the test vectors of `docs/protocol.md` (the test fails if the document and the code differ).

use atoma_crypto::merkle;
use atoma_crypto::signed_json::{canonical, sign_json};
use atoma_crypto::{Keypair, blake2b256};
use atoma_state::log::{ChoiceRecord, LogRecord, ResponseRecord, SamplingRecord, StackLog};
use serde_json::json;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The fixed log of the vectors: user key = ed25519 secret [2; 32], node key = [1; 32];
/// record 0 a JSON answer, record 1 a two-chunk stream, record 2 a JSON answer with stop
/// strings and penalties.
fn vector_log() -> StackLog {
    let node = Keypair::from_secret([1; 32]);
    let user = Keypair::from_secret([2; 32]);
    let record = |i: u32, stream: bool| {
        let body = format!(
            r#"{{"model":"smollm2","messages":[{{"role":"user","content":"Hi {i}"}}],"max_tokens":4,"seed":{i}}}"#
        );
        let sig = user.sign(&blake2b256(body.as_bytes()));
        let response = if stream {
            let chunks = ["Hel", "lo"]
                .iter()
                .map(|t| {
                    sign_json(
                        &node,
                        json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion.chunk",
                        "created": 1_700_000_000u64, "model": "smollm2",
                        "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}),
                    )
                    .0
                })
                .map(|v| canonical(&v))
                .collect();
            ResponseRecord::Stream(chunks)
        } else {
            let (v, _) = sign_json(
                &node,
                json!({"id": format!("chatcmpl-{i}"), "object": "chat.completion",
                "created": 1_700_000_000u64, "model": "smollm2",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}),
            );
            ResponseRecord::Json(canonical(&v))
        };
        LogRecord {
            request_body: body.into_bytes(),
            request_signature: sig,
            response,
            prompt_tokens: (1..=9).map(|t| t * 100 + i).collect(),
            output_tokens: vec![19556, 2],
            seed: u64::from(i),
            sampling: SamplingRecord {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                presence_penalty: if i == 2 { 0.5 } else { 0.0 },
                frequency_penalty: 0.0,
                max_tokens: 4,
                stop: if i == 2 {
                    vec!["\n".into(), "END".into()]
                } else {
                    vec![]
                },
                ignore_eos: false,
            },
            finish_reason: "stop".into(),
            usage_prompt_tokens: 9,
            usage_completion_tokens: 2,
            model_sha256: [0xab; 32],
            determinism_class: "atoma-engine/1/cpu/kv-f16".into(),
            extra_choices: Vec::new(),
        }
    };
    StackLog {
        stack_small_id: 7,
        node_small_id: 3,
        records: vec![record(0, false), record(1, true), record(2, false)],
    }
}

/// The vectors, as printed in `docs/protocol.md`.
fn vectors() -> Vec<(&'static str, String)> {
    let log = vector_log();
    let blob = log.encode();
    let leaves = log.leaves().unwrap();
    let root = merkle::root(&leaves);
    let proof = merkle::proof(&leaves, 1).unwrap();
    vec![
        ("record 0 request_hash", hex(&log.records[0].request_hash())),
        (
            "record 0 response_hash",
            hex(&log.records[0].response_hash().unwrap().0),
        ),
        ("record 0 leaf", hex(&leaves[0])),
        (
            "record 1 response_hash (stream)",
            hex(&log.records[1].response_hash().unwrap().0),
        ),
        ("record 1 leaf", hex(&leaves[1])),
        ("record 2 leaf", hex(&leaves[2])),
        (
            "record 0 encoding, Blake2b-256",
            hex(&blake2b256(&log.records[0].encode())),
        ),
        ("blob size", blob.len().to_string()),
        ("blob_hash", hex(&blake2b256(&blob))),
        ("merkle_root", hex(&root)),
        ("proof of record 1, path[0]", hex(&proof[0])),
        ("proof of record 1, path[1]", hex(&proof[1])),
        ("empty tree root", hex(&merkle::root(&[]))),
    ]
}

#[test]
fn the_documented_vectors_hold() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/protocol.md"
    ))
    .expect("docs/protocol.md");
    let mut missing = Vec::new();
    for (name, value) in vectors() {
        let line = format!("| {name} | `{value}` |");
        if !doc.contains(&line) {
            missing.push(line);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/protocol.md lacks (or has other values for) these rows:\n{}",
        missing.join("\n")
    );
}

#[test]
fn logs_round_trip_and_re_encode_identically() {
    let log = vector_log();
    let blob = log.encode();
    let back = StackLog::decode(&blob).unwrap();
    assert_eq!(back, log);
    assert_eq!(back.encode(), blob);
    let parts: Vec<Vec<u8>> = log.records.iter().map(LogRecord::encode).collect();
    assert_eq!(StackLog::assemble(7, 3, &parts), blob);
}

#[test]
fn the_other_choices_of_n_round_trip_and_one_choice_keeps_its_bytes() {
    let mut rec = vector_log().records[0].clone();
    let single = rec.encode();
    rec.extra_choices = vec![
        ChoiceRecord {
            output_tokens: vec![5, 6, 7],
            finish_reason: "length".into(),
        },
        ChoiceRecord {
            output_tokens: vec![],
            finish_reason: "stop".into(),
        },
    ];
    let bytes = rec.encode();
    assert_eq!(
        &bytes[..single.len()],
        &single[..],
        "a trailer, nothing else"
    );
    assert_eq!(LogRecord::decode(&bytes).unwrap(), rec);
    // An empty trailer has another encoding (none): refused, so bytes have one meaning.
    let mut empty = single.clone();
    empty.extend_from_slice(&0u32.to_le_bytes());
    assert!(LogRecord::decode(&empty).is_err());
}

#[test]
fn signatures_and_proofs_check_out() {
    let log = vector_log();
    let node = Keypair::from_secret([1; 32]).address();
    let user = Keypair::from_secret([2; 32]).address();
    let leaves = log.leaves().unwrap();
    let root = merkle::root(&leaves);
    for (i, r) in log.records.iter().enumerate() {
        assert_eq!(r.request_signer().unwrap(), user);
        assert_eq!(r.response_hash().unwrap().1, Some(node));
        let p = merkle::proof(&leaves, i).unwrap();
        assert!(merkle::verify(&root, &leaves[i], i as u64, 3, &p));
    }
}

#[test]
fn tampering_is_detected() {
    let log = vector_log();
    // A changed answer no longer matches its signed hash.
    let mut bad = log.records[0].clone();
    if let ResponseRecord::Json(t) = &mut bad.response {
        *t = t.replace("Hello", "Hellp");
    }
    assert!(bad.response_hash().is_err());
    // A changed request no longer matches the user's signature.
    let mut bad = log.records[0].clone();
    bad.request_body[10] ^= 1;
    assert!(bad.request_signer().is_err());
    // A stream chunk signed by someone else.
    let mut bad = log.records[1].clone();
    if let ResponseRecord::Stream(chunks) = &mut bad.response {
        let other = Keypair::from_secret([9; 32]);
        chunks[1] = canonical(&sign_json(&other, json!({"x": 1})).0);
    }
    assert!(bad.response_hash().unwrap_err().contains("another key"));
}

#[test]
fn decoding_is_strict() {
    let blob = vector_log().encode();
    assert!(
        StackLog::decode(&blob[..blob.len() - 1]).is_err(),
        "truncated"
    );
    let mut longer = blob.clone();
    longer.push(0);
    assert!(StackLog::decode(&longer).is_err(), "trailing byte");
    let mut magic = blob.clone();
    magic[0] = b'X';
    assert!(StackLog::decode(&magic).is_err());
    let mut version = blob.clone();
    version[8] = 2;
    assert!(StackLog::decode(&version).is_err());
    // A count far larger than the input is refused before anything is allocated.
    let mut count = blob.clone();
    count[26..30].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(StackLog::decode(&count).is_err());
    // Random cuts and flips never panic.
    for i in (0..blob.len()).step_by(7) {
        let _ = StackLog::decode(&blob[..i]);
        let mut b = blob.clone();
        b[i] ^= 0x55;
        let _ = StackLog::decode(&b);
    }
}

#[test]
#[ignore = "prints the vector table for docs/protocol.md"]
#[allow(clippy::print_stdout)]
fn print_vectors() {
    for (name, value) in vectors() {
        println!("| {name} | `{value}` |");
    }
}
