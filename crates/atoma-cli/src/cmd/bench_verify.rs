//! `atoma bench --verify N`: what verification by re-execution costs next to generation, on the
//! serving engine. N seeded, sampled requests (random prompts of `-p` tokens, `-n` new tokens,
//! end-of-sequence ignored) are generated, then their logs re-executed (`Engine::verify`: one
//! teacher-forced pass plus the sampler's replay), both one at a time and all N at once; the
//! ratio verify/generate is what an attestor spends per unit of a node's work. Every verdict
//! must agree, or the benchmark fails.

use std::time::Instant;

use anyhow::{Context, bail};
use atoma_engine::sampling::Rng;
use atoma_engine::{
    Engine, EngineConfig, FinishReason, GenerateRequest, GenerationEvent, LoadedModel,
    SamplingParams, Verdict, VerifyRequest,
};

fn request(vocab: usize, prompt: usize, new_tokens: usize, seed: u64) -> GenerateRequest {
    let mut rng = Rng::new(seed);
    let tokens = (0..prompt)
        .map(|_| 1 + (rng.next_u64() % (vocab as u64 - 1)) as u32)
        .collect();
    let mut r = GenerateRequest::new(tokens, new_tokens);
    r.sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed,
        ..SamplingParams::default()
    };
    r.ignore_eos = true;
    r
}

fn generate(engine: &Engine, reqs: &[GenerateRequest]) -> anyhow::Result<Vec<VerifyRequest>> {
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(reqs.len());
    for (r, mut s) in reqs.iter().zip(streams) {
        let mut ids = Vec::new();
        let finish = loop {
            match s.next_blocking().context("the stream ended early")? {
                GenerationEvent::Token(t) => ids.push(t.id),
                GenerationEvent::Finished(f) => break f.reason,
                GenerationEvent::Error(e) => bail!("generation failed: {e}"),
            }
        };
        out.push(VerifyRequest {
            prompt: r.prompt.clone(),
            output: ids,
            max_tokens: r.max_tokens,
            sampling: r.sampling.clone(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            finish,
            grammar: None,
        });
    }
    Ok(out)
}

fn verify(engine: &Engine, logs: &[VerifyRequest]) -> anyhow::Result<()> {
    let handles: Vec<_> = logs
        .iter()
        .map(|v| engine.verify(v.clone()))
        .collect::<Result<_, _>>()?;
    for h in handles {
        match h.verdict_blocking()? {
            Verdict::Agree { .. } => {}
            d => bail!("an honest log did not verify: {d:?}"),
        }
    }
    Ok(())
}

/// Prints the verify/generate times and ratios for `n` requests of `prompt` + `gen` tokens.
pub fn run(lm: LoadedModel, n: usize, prompt: usize, new_tokens: usize) -> anyhow::Result<()> {
    let vocab = lm.model.vocab_size();
    let engine = Engine::start(
        lm,
        &EngineConfig {
            max_num_seqs: n.max(1),
            ..EngineConfig::default()
        },
    )?;
    let reqs: Vec<GenerateRequest> = (0..n.max(1) as u64)
        .map(|i| request(vocab, prompt, new_tokens, 1_000 + i))
        .collect();
    // Warm-up (page in the weights).
    verify(&engine, &generate(&engine, &reqs[..1])?)?;
    let mut rows = Vec::new();
    for (label, batch) in [("one at a time", 1usize), ("all at once", reqs.len())] {
        let (mut t_gen, mut t_ver) = (0f64, 0f64);
        for chunk in reqs.chunks(batch) {
            let t = Instant::now();
            let logs = generate(&engine, chunk)?;
            t_gen += t.elapsed().as_secs_f64();
            debug_assert!(logs.iter().all(|l| l.finish == FinishReason::Length));
            let t = Instant::now();
            verify(&engine, &logs)?;
            t_ver += t.elapsed().as_secs_f64();
        }
        rows.push((label, batch, t_gen, t_ver));
    }
    println!(
        "\nverification by re-execution, {} requests of {prompt} prompt + {new_tokens} generated tokens",
        reqs.len()
    );
    println!(
        "| {:<14} | {:>10} | {:>10} | {:>14} |",
        "requests", "generate s", "verify s", "verify/generate"
    );
    println!("|{:-<16}|{:->12}|{:->12}|{:->16}|", "", "", "", "");
    for (label, _, g, v) in rows {
        println!("| {label:<14} | {g:>10.2} | {v:>10.2} | {:>14.3} |", v / g);
    }
    Ok(())
}
