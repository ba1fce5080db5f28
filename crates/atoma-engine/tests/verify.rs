//! Verification by re-execution on every architecture: a served request (seeded sampling,
//! penalties, stop strings) verifies with one teacher-forced pass, and every kind of cheat is
//! caught at its first position: a swapped token, a truncated output that claims a natural
//! stop, another seed, an altered prompt, other sampling parameters, output past a stop. The
//! verification shares the engine with live traffic, in small chunks and under preemption, and
//! neither side's bits change; a verification after a prefix-cache hit agrees too.

use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{
    Architecture, Engine, EngineConfig, FinishReason, GenerateRequest, GenerationEvent,
    GenerationStream, GrammarSpec, LoadOptions, LoadedModel, SamplingParams, Verdict,
    VerifyRequest,
};

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 37 + seed * 101) % 250)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        presence_penalty: 0.3,
        frequency_penalty: 0.2,
        seed,
        ..SamplingParams::default()
    };
    r.ignore_eos = true;
    r.logprobs = true;
    r
}

struct Served {
    ids: Vec<u32>,
    logprob_bits: Vec<u32>,
    text: String,
    reason: FinishReason,
}

fn collect(mut s: GenerationStream) -> Served {
    let mut out = Served {
        ids: Vec::new(),
        logprob_bits: Vec::new(),
        text: String::new(),
        reason: FinishReason::Cancelled,
    };
    while let Some(e) = s.next_blocking() {
        match e {
            GenerationEvent::Token(t) => {
                out.ids.push(t.id);
                out.logprob_bits.push(t.logprob.map_or(0, f32::to_bits));
                out.text.push_str(&t.text);
            }
            GenerationEvent::Finished(f) => {
                out.text.push_str(&f.text);
                out.reason = f.reason;
                return out;
            }
            GenerationEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("no Finished event")
}

fn verify_req(r: &GenerateRequest, served: &Served) -> VerifyRequest {
    VerifyRequest {
        prompt: r.prompt.clone(),
        output: served.ids.clone(),
        max_tokens: r.max_tokens,
        sampling: r.sampling.clone(),
        stop: r.stop.clone(),
        stop_token_ids: r.stop_token_ids.clone(),
        ignore_eos: r.ignore_eos,
        finish: served.reason,
        grammar: r.grammar.clone(),
    }
}

fn engine(path: &std::path::Path, cfg: &EngineConfig) -> Engine {
    let lm = LoadedModel::load(path, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    Engine::start(lm, cfg).unwrap()
}

fn verdict(e: &Engine, v: VerifyRequest) -> Verdict {
    e.verify(v).unwrap().verdict_blocking().unwrap()
}

fn disagrees_at(v: &Verdict) -> Option<usize> {
    match v {
        Verdict::Disagree { position, .. } => Some(*position),
        Verdict::Agree { .. } => None,
    }
}

#[test]
fn served_requests_verify_and_every_cheat_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
        Architecture::Phi3,
    ] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        let e = engine(&path, &EngineConfig::default());
        let r = request(prompt(3, 30), 24, 77);
        let served = collect(e.submit(r.clone()).unwrap());
        assert_eq!(served.ids.len(), 24);
        let honest = verify_req(&r, &served);
        assert_eq!(
            verdict(&e, honest.clone()),
            Verdict::Agree {
                text: served.text.clone()
            },
            "{arch:?}: an honest log verifies, with the text the client got"
        );

        // (a) one output token swapped.
        let mut v = honest.clone();
        v.output[10] = (v.output[10] + 1) % 200 + 3;
        assert_eq!(
            disagrees_at(&verdict(&e, v)),
            Some(10),
            "{arch:?}: swapped token"
        );
        // (b) truncated output that claims a natural stop.
        let mut v = honest.clone();
        v.output.truncate(15);
        v.finish = FinishReason::Stop;
        assert_eq!(
            disagrees_at(&verdict(&e, v)),
            Some(15),
            "{arch:?}: truncated"
        );
        // ... or claims `length` although max_tokens allows more.
        let mut v = honest.clone();
        v.output.truncate(15);
        assert_eq!(
            disagrees_at(&verdict(&e, v)),
            Some(15),
            "{arch:?}: short length"
        );
        // A client that left after 15 tokens: the tokens it got check out.
        let mut v = honest.clone();
        v.output.truncate(15);
        v.finish = FinishReason::Cancelled;
        assert!(
            matches!(verdict(&e, v), Verdict::Agree { .. }),
            "{arch:?}: cancelled"
        );
        // (e) another seed than logged.
        let mut v = honest.clone();
        v.sampling.seed = 78;
        assert!(
            disagrees_at(&verdict(&e, v)).is_some(),
            "{arch:?}: other seed"
        );
        // (d) an altered prompt (a system turn injected in front).
        let mut v = honest.clone();
        v.prompt.splice(0..0, [5, 6, 7]);
        assert!(
            disagrees_at(&verdict(&e, v)).is_some(),
            "{arch:?}: altered prompt"
        );
        // Other sampling parameters than logged.
        let mut v = honest.clone();
        v.sampling.temperature = 0.5;
        assert!(
            disagrees_at(&verdict(&e, v)).is_some(),
            "{arch:?}: other temperature"
        );
        // Output past max_tokens.
        let mut v = honest.clone();
        v.max_tokens = 20;
        assert_eq!(
            disagrees_at(&verdict(&e, v)),
            Some(20),
            "{arch:?}: past max_tokens"
        );
    }
}

#[test]
fn constrained_requests_verify_and_an_unconstrained_log_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_tiny_gguf(&path, &TinySpec::new(Architecture::Llama)).unwrap();
    let e = engine(&path, &EngineConfig::default());
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                       "tag": {"enum": ["a", "b"]}},
        "required": ["n", "tag"], "additionalProperties": false
    });
    let mut r = request(prompt(4, 20), 40, 11);
    r.ignore_eos = false;
    r.grammar = Some(GrammarSpec::JsonSchema(schema));
    let served = collect(e.submit(r.clone()).unwrap());
    assert_eq!(served.reason, FinishReason::Stop, "{}", served.text);
    let honest = verify_req(&r, &served);
    assert_eq!(
        verdict(&e, honest.clone()),
        Verdict::Agree {
            text: served.text.clone()
        }
    );
    // The same log claimed without its grammar: the free sampler picks other tokens.
    let mut v = honest.clone();
    v.grammar = None;
    assert!(disagrees_at(&verdict(&e, v)).is_some(), "{}", served.text);
    // A token the grammar forbids (a letter where the JSON must begin).
    let mut v = honest;
    v.output[0] = e.model().tokenizer.encode("x", false, false)[0];
    assert_eq!(disagrees_at(&verdict(&e, v)), Some(0));
}

#[test]
fn stop_strings_and_stop_tokens_are_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_tiny_gguf(&path, &TinySpec::new(Architecture::Llama)).unwrap();
    let e = engine(&path, &EngineConfig::default());
    // Generate freely, then pick a token of the output as a stop token and replay with it.
    let mut r = request(prompt(9, 20), 30, 5);
    let free = collect(e.submit(r.clone()).unwrap());
    let stop = free.ids[12];
    r.stop_token_ids = vec![stop];
    let served = collect(e.submit(r.clone()).unwrap());
    assert_eq!(served.reason, FinishReason::Stop);
    let first = free.ids.iter().position(|&t| t == stop).unwrap();
    assert_eq!(served.ids.len(), first + 1);
    let honest = verify_req(&r, &served);
    assert!(matches!(verdict(&e, honest.clone()), Verdict::Agree { .. }));
    // A node that generated past the stop token and billed for it.
    let mut v = honest.clone();
    v.output = free.ids.clone();
    v.finish = FinishReason::Length;
    assert_eq!(disagrees_at(&verdict(&e, v)), Some(first + 1));
    // A log that hides the stop token from the request.
    let mut v = honest;
    v.stop_token_ids.clear();
    assert_eq!(disagrees_at(&verdict(&e, v)), Some(served.ids.len()));
}

#[test]
fn verification_amid_live_traffic_changes_no_bits() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Gemma3] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        // Reference answers, each alone.
        let alone = engine(&path, &EngineConfig::default());
        let live: Vec<GenerateRequest> = (0..6u32)
            .map(|i| request(prompt(20 + i, 8 + 7 * i as usize), 25, u64::from(i)))
            .collect();
        let reference: Vec<Served> = live
            .iter()
            .map(|r| collect(alone.submit(r.clone()).unwrap()))
            .collect();
        let logs: Vec<VerifyRequest> = (0..4u32)
            .map(|i| {
                let r = request(prompt(40 + i, 40 + 5 * i as usize), 30, 100 + u64::from(i));
                let served = collect(alone.submit(r.clone()).unwrap());
                verify_req(&r, &served)
            })
            .collect();

        // All at once on a small engine: 11-token steps, 2 logit rows per verification step,
        // 8-slot blocks and a pool that forces preemption; one log verified twice (the second
        // time its prompt's blocks are cached).
        let busy = engine(
            &path,
            &EngineConfig {
                max_num_batched_tokens: 11,
                max_num_seqs: 8,
                block_size: 8,
                kv_cache_blocks: Some(30),
                max_verify_rows: 2,
                ..EngineConfig::default()
            },
        );
        let mut checks: Vec<_> = logs
            .iter()
            .map(|v| busy.verify(v.clone()).unwrap())
            .collect();
        let streams: Vec<_> = live
            .iter()
            .map(|r| busy.submit(r.clone()).unwrap())
            .collect();
        checks.push(busy.verify(logs[0].clone()).unwrap());
        for (s, want) in streams.into_iter().zip(&reference) {
            let got = collect(s);
            assert_eq!(got.ids, want.ids, "{arch:?}: live tokens changed");
            assert_eq!(
                got.logprob_bits, want.logprob_bits,
                "{arch:?}: live logprobs changed"
            );
        }
        for c in checks {
            let v = c.verdict_blocking().unwrap();
            assert!(matches!(v, Verdict::Agree { .. }), "{arch:?}: {v:?}");
        }
        let stats = busy.stats().scheduler;
        assert!(stats.preemptions > 0, "{arch:?}: no preemption ({stats:?})");
        // Verified twice in a row: the second time the prompt's blocks come from the prefix
        // cache, and only the rows with logits are computed again.
        let again = logs[3].clone();
        assert!(matches!(
            verdict(&busy, again.clone()),
            Verdict::Agree { .. }
        ));
        let before = busy.stats().scheduler.prefix_hit_tokens;
        assert!(matches!(verdict(&busy, again), Verdict::Agree { .. }));
        let hits = busy.stats().scheduler.prefix_hit_tokens - before;
        assert!(hits >= 40, "{arch:?}: only {hits} prefix-hit tokens");
    }
}
