//! The batching engine: a request's output does not depend on its company. A seeded, sampled
//! request gives bit-identical tokens and log-probabilities alone and amid 15 other requests of
//! different lengths — with its prompt chunked differently, sharing cached prefix blocks with
//! another request, and with a KV pool small enough to force preemption — on every
//! architecture (grouped-query attention everywhere, sliding windows on Gemma 3 and Phi-3).

use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{
    Architecture, Engine, EngineConfig, FinishReason, GenerateRequest, GenerationEvent,
    GenerationStream, GrammarSpec, LoadOptions, LoadedModel, SamplingParams,
};

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 37 + seed * 101) % 250)
        .collect()
}

fn sampled(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed,
        ..SamplingParams::default()
    };
    r.ignore_eos = true;
    r.top_logprobs = 2;
    r
}

/// Tokens and log-probabilities (as bits) of a finished stream.
fn collect(mut s: GenerationStream) -> (Vec<u32>, Vec<u32>, FinishReason) {
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    while let Some(e) = s.next_blocking() {
        match e {
            GenerationEvent::Token(t) => {
                ids.push(t.id);
                lps.push(t.logprob.expect("asked for").to_bits());
            }
            GenerationEvent::Finished(f) => return (ids, lps, f.reason),
            GenerationEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("the stream ended without a Finished event")
}

fn engine(path: &std::path::Path, cfg: &EngineConfig) -> Engine {
    let lm = LoadedModel::load(path, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    Engine::start(lm, cfg).unwrap()
}

/// Runs `target` alone and amid 15 other requests (small prefill chunks, a shared cached
/// prefix, a KV pool small enough to force preemption) and checks the two runs give the same
/// tokens and log-probability bits; returns the reference run.
fn identical_alone_and_amid_others(
    path: &std::path::Path,
    arch: Architecture,
    target: &GenerateRequest,
) -> (Vec<u32>, Vec<u32>, FinishReason) {
    // Alone, with a large budget: one prefill chunk, then single-row decodes.
    let alone = engine(path, &EngineConfig::default());
    let reference = collect(alone.submit(target.clone()).unwrap());

    // Amid 15 others, with small chunks (the prompt is cut at other places), a shared
    // prefix (request 0 carries the target's first 32 tokens, so the target starts from
    // cached blocks) and 24 blocks of 8 slots for 16 requests of up to ~110 tokens, so
    // sequences get preempted and recomputed.
    let busy = engine(
        path,
        &EngineConfig {
            max_num_batched_tokens: 13,
            max_num_seqs: 16,
            block_size: 8,
            kv_cache_blocks: Some(24),
            ..EngineConfig::default()
        },
    );
    let mut others = Vec::new();
    let mut shared = target.prompt[..32].to_vec();
    shared.extend(prompt(99, 5));
    others.push(busy.submit(sampled(shared, 20, 1)).unwrap());
    // Let the shared prefix be computed and cached before the target arrives.
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 1..8u32 {
        let r = sampled(
            prompt(i, 3 + 9 * i as usize),
            10 + 4 * i as usize,
            u64::from(i),
        );
        others.push(busy.submit(r).unwrap());
    }
    let mine = busy.submit(target.clone()).unwrap();
    for i in 8..15u32 {
        let r = sampled(prompt(i, 2 + 5 * i as usize), 30, u64::from(i));
        others.push(busy.submit(r).unwrap());
    }
    let amid = collect(mine);
    assert_eq!(
        amid.0, reference.0,
        "{arch:?}: tokens differ amid other requests"
    );
    assert_eq!(amid.1, reference.1, "{arch:?}: log-probabilities differ");
    assert_eq!(amid.2, reference.2, "{arch:?}: finish reasons differ");
    for s in others {
        assert_eq!(collect(s).2, FinishReason::Length);
    }
    let stats = busy.stats().scheduler;
    assert!(stats.preemptions > 0, "{arch:?}: no preemption happened");
    assert!(
        stats.prefix_hit_tokens >= 32,
        "{arch:?}: the target did not reuse the cached prefix ({stats:?})"
    );
    reference
}

#[test]
fn a_seeded_request_is_identical_alone_and_amid_fifteen_others() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
        Architecture::Phi3,
    ] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        let target = sampled(prompt(7, 45), 40, 1234);
        let reference = identical_alone_and_amid_others(&path, arch, &target);
        assert_eq!(reference.0.len(), 40);
        assert_eq!(reference.2, FinishReason::Length);
    }
}

/// A small schema the tiny models can complete in a few dozen tokens.
fn small_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "blue", "green"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"}
        },
        "required": ["color", "n", "ok"],
        "additionalProperties": false
    })
}

#[test]
fn a_constrained_request_is_valid_and_identical_alone_and_amid_fifteen_others() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Gemma3] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        let mut target = sampled(prompt(7, 45), 60, 77);
        target.ignore_eos = false;
        target.grammar = Some(GrammarSpec::JsonSchema(small_schema()));
        let reference = identical_alone_and_amid_others(&path, arch, &target);
        let lm = LoadedModel::load(&path, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let text = lm.tokenizer.decode(&reference.0);
        assert_eq!(
            reference.2,
            FinishReason::Stop,
            "{arch:?}: `{text}` did not end"
        );
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{arch:?}: `{text}` is not JSON: {e}"));
        assert!(
            ["red", "blue", "green"].contains(&v["color"].as_str().unwrap()),
            "{v}"
        );
        assert!(v["n"].as_u64().unwrap() <= 99, "{v}");
        assert!(v["ok"].is_boolean(), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    }
}

/// OpenAI's `n`: four choices of one prompt (45 tokens: the last of its 16-slot blocks is
/// partly filled, so forking copies it) submitted as a group. Each choice is bit-identical to
/// the same request alone, on a quiet engine and amid 15 other requests with preemption; and
/// the prompt is computed once, as the engine's counters show.
#[test]
fn a_group_of_four_prefills_its_prompt_once_and_each_choice_is_what_it_would_be_alone() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Gemma3] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        let choices: Vec<GenerateRequest> = (0..4)
            .map(|i| sampled(prompt(7, 45), 30, 500 + i))
            .collect();
        let quiet = EngineConfig {
            enable_prefix_caching: false,
            block_size: 16,
            ..EngineConfig::default()
        };
        let alone: Vec<_> = choices
            .iter()
            .map(|c| collect(engine(&path, &quiet).submit(c.clone()).unwrap()))
            .collect();
        assert!(
            alone.iter().any(|a| a.0 != alone[0].0),
            "{arch:?}: different seeds should give different choices"
        );

        let e = engine(&path, &quiet);
        let group = choices.iter().map(|c| (c.clone(), None)).collect();
        let got: Vec<_> = e
            .submit_group(group)
            .unwrap()
            .into_iter()
            .map(collect)
            .collect();
        assert_eq!(
            got, alone,
            "{arch:?}: a choice differs from its request alone"
        );
        let stats = e.stats().scheduler;
        assert_eq!(
            (stats.prefill_tokens, stats.forks),
            (45, 3),
            "{arch:?}: the prompt must be computed once and shared by 3 forks ({stats:?})"
        );

        // Amid 15 others, with small chunks and a pool small enough to preempt.
        let busy = engine(
            &path,
            &EngineConfig {
                max_num_batched_tokens: 13,
                max_num_seqs: 20,
                block_size: 8,
                kv_cache_blocks: Some(40),
                ..EngineConfig::default()
            },
        );
        let mut others = Vec::new();
        for i in 1..8u32 {
            let r = sampled(
                prompt(i, 3 + 9 * i as usize),
                10 + 4 * i as usize,
                u64::from(i),
            );
            others.push(busy.submit(r).unwrap());
        }
        let group = choices.iter().map(|c| (c.clone(), None)).collect();
        let mine = busy.submit_group(group).unwrap();
        for i in 8..16u32 {
            let r = sampled(prompt(i, 2 + 5 * i as usize), 30, u64::from(i));
            others.push(busy.submit(r).unwrap());
        }
        let amid: Vec<_> = mine.into_iter().map(collect).collect();
        assert_eq!(
            amid, alone,
            "{arch:?}: a choice differs amid other requests"
        );
        for s in others {
            assert_eq!(collect(s).2, FinishReason::Length);
        }
        let stats = busy.stats().scheduler;
        assert!(stats.forks >= 3, "{arch:?}: {stats:?}");
        assert!(stats.preemptions > 0, "{arch:?}: no preemption happened");
    }
}

#[test]
fn a_bad_schema_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_tiny_gguf(&path, &TinySpec::new(Architecture::Llama)).unwrap();
    let e = engine(&path, &EngineConfig::default());
    let mut r = sampled(prompt(1, 5), 5, 1);
    r.grammar = Some(GrammarSpec::JsonSchema(
        serde_json::json!({"type": "no-such-type"}),
    ));
    let Err(err) = e.submit(r) else {
        panic!("a bad schema must be refused")
    };
    assert!(err.to_string().contains("grammar"), "{err}");
}

#[test]
fn cancelling_frees_the_request_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_tiny_gguf(&path, &TinySpec::new(Architecture::Llama)).unwrap();
    let e = engine(&path, &EngineConfig::default());
    let a = e.submit(sampled(prompt(1, 10), 200, 1)).unwrap();
    let mut b = e.submit(sampled(prompt(2, 10), 200, 2)).unwrap();
    let c = e.submit(sampled(prompt(3, 10), 20, 3)).unwrap();
    drop(a); // a client that disconnects
    // Wait for b's first token, then cancel it.
    assert!(matches!(b.next_blocking(), Some(GenerationEvent::Token(_))));
    b.cancel();
    let (_, _, reason) = collect(b);
    assert_eq!(reason, FinishReason::Cancelled);
    let (ids, _, reason) = collect(c);
    assert_eq!((ids.len(), reason), (20, FinishReason::Length));
    assert_eq!(e.waiting(), 0);
}
