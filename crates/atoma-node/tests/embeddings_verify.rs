//! Re-executing an embeddings record: an honest record (the vectors the node computed, in
//! either encoding) agrees; a changed vector, other logged tokens or an embedding model the
//! verifier does not serve are caught (the last as "cannot check here", not a dispute).

use atoma_api::embeddings::{encode_vector, no_sampling};
use atoma_api::{EmbedInput, InferenceBackend};
use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{Architecture, Engine, EngineConfig, LoadOptions, LoadedModel};
use atoma_node::EngineBackend;
use atoma_node::reexec::RecordVerdict;
use atoma_state::log::{LogRecord, ResponseRecord};
use serde_json::json;

fn backend(dir: &std::path::Path, with_embedder: bool) -> EngineBackend {
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&gguf, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let eb = EngineBackend::new(
        Engine::start(lm, &EngineConfig::default()).unwrap(),
        "tiny",
        [7; 32],
    );
    if !with_embedder {
        return eb;
    }
    let edir = dir.join("embed");
    atoma_embed::testing::TinyModel::default()
        .write(&edir)
        .unwrap();
    let e = atoma_embed::Embedder::load(&edir).unwrap();
    eb.with_embedder(e, "tiny-embed")
}

/// The record an honest node writes for `body` (answer unsigned: the attestor checks
/// signatures before re-executing, not here).
fn record(b: &EngineBackend, body: serde_json::Value, base64: bool) -> LogRecord {
    let inputs: Vec<EmbedInput> = body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| EmbedInput::Text(s.as_str().unwrap().into()))
        .collect();
    let tokens = b.embed_tokenize("tiny-embed", &inputs).unwrap();
    let out = b.embed("tiny-embed", &tokens).unwrap();
    let data: Vec<_> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": encode_vector(v, base64)}))
        .collect();
    let prompt_tokens = tokens.concat();
    LogRecord {
        request_body: body.to_string().into_bytes(),
        request_signature: String::new(),
        response: ResponseRecord::Json(json!({"object": "list", "data": data}).to_string()),
        usage_prompt_tokens: prompt_tokens.len() as u64,
        prompt_tokens,
        output_tokens: Vec::new(),
        seed: 0,
        sampling: no_sampling(),
        finish_reason: "stop".into(),
        usage_completion_tokens: 0,
        model_sha256: out.model_sha256,
        determinism_class: out.determinism_class,
        extra_choices: Vec::new(),
    }
}

#[test]
fn embeddings_records_are_re_executed_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), true);
    for base64 in [false, true] {
        let mut body = json!({"model": "tiny-embed", "input": ["the cat sat", "a big red dog !"]});
        if base64 {
            body["encoding_format"] = json!("base64");
        }
        let honest = record(&b, body, base64);
        assert_eq!(b.reexecute_record(&honest).unwrap(), RecordVerdict::Agree);

        let mut changed = honest.clone();
        let mut answer: serde_json::Value = match &changed.response {
            ResponseRecord::Json(t) => serde_json::from_str(t).unwrap(),
            ResponseRecord::Stream(_) => unreachable!(),
        };
        answer["data"][1]["embedding"] = if base64 {
            encode_vector(&[0.5; 32], true)
        } else {
            let mut v = answer["data"][1]["embedding"].clone();
            v[3] = json!(0.25);
            v
        };
        changed.response = ResponseRecord::Json(answer.to_string());
        assert!(matches!(
            b.reexecute_record(&changed).unwrap(),
            RecordVerdict::Disagree { .. }
        ));

        let mut other_tokens = honest.clone();
        other_tokens.prompt_tokens[1] ^= 1;
        assert!(matches!(
            b.reexecute_record(&other_tokens).unwrap(),
            RecordVerdict::Disagree { .. }
        ));
    }
    // A verifier without the embedding model cannot check: an error (retry), not a verdict.
    let dir2 = tempfile::tempdir().unwrap();
    let body = json!({"model": "tiny-embed", "input": ["the cat"]});
    let rec = record(&b, body, false);
    assert!(backend(dir2.path(), false).reexecute_record(&rec).is_err());
}
