//! `atoma bench --structured`: what constrained decoding (structured outputs) costs per output
//! token on the serving engine. The same prompts run at concurrency 1 and 16, once under a JSON
//! Schema that forces a long answer (an array of 30 integers) and once free, each free request
//! generating exactly as many tokens as its constrained twin did; the figure is the ratio of
//! the mean time per output token (TPOT, from each request's first token to its last),
//! constrained / free.

use std::time::Instant;

use anyhow::{Context, bail};
use atoma_engine::{
    ChatMessage, Engine, EngineConfig, GenerateRequest, GenerationEvent, GrammarSpec, LoadedModel,
    Role, SamplingParams,
};

/// The schema of the constrained runs: long enough to measure decode, bounded so it ends.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "numbers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                        "minItems": 30, "maxItems": 30},
            "label": {"enum": ["odd", "even", "mixed"]}
        },
        "required": ["numbers", "label"],
        "additionalProperties": false
    })
}

/// Runs `reqs` at once; returns each request's generated-token count and TPOT in seconds.
fn run_batch(engine: &Engine, reqs: &[GenerateRequest]) -> anyhow::Result<Vec<(usize, f64)>> {
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()))
        .collect::<Result<_, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> anyhow::Result<(usize, f64)> {
                let (mut n, mut first, mut last) = (0usize, None, None);
                loop {
                    match s.next_blocking().context("the stream ended early")? {
                        GenerationEvent::Token(_) => {
                            let now = Instant::now();
                            first.get_or_insert(now);
                            last = Some(now);
                            n += 1;
                        }
                        GenerationEvent::Finished(_) => break,
                        GenerationEvent::Error(e) => bail!("generation failed: {e}"),
                    }
                }
                let span = match (first, last) {
                    (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
                    _ => 0.0,
                };
                Ok((n, span / (n.max(2) - 1) as f64))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("a reader panicked"))?)
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Prints TPOT with and without the constraint at concurrency 1 and 16, and their ratio.
pub fn run(lm: LoadedModel, repetitions: usize) -> anyhow::Result<()> {
    let topics = [
        "prime numbers",
        "the weather",
        "a train timetable",
        "lottery draws",
        "page numbers",
        "room numbers",
        "test scores",
        "street numbers",
        "bus lines",
        "shoe sizes",
        "ages",
        "heights in cm",
        "years",
        "prices",
        "speeds",
        "temperatures",
    ];
    let prompts: Vec<Vec<u32>> = topics
        .iter()
        .map(|t| {
            let msg = ChatMessage::new(
                Role::User,
                format!("List 30 numbers about {t} as JSON with a label."),
            );
            lm.chat_prompt(&[msg])
                .map(|p| lm.tokenize_prompt(&p))
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<_>>()?;
    let engine = Engine::start(
        lm,
        &EngineConfig {
            max_num_seqs: 16,
            ..EngineConfig::default()
        },
    )?;
    let constrained = |i: usize, seed: u64| {
        let mut r = GenerateRequest::new(prompts[i % prompts.len()].clone(), 400);
        r.sampling = SamplingParams {
            temperature: 0.7,
            seed,
            ..SamplingParams::default()
        };
        r.grammar = Some(GrammarSpec::JsonSchema(schema()));
        r
    };
    // Warm-up: weights paged in, the grammar compiler built.
    run_batch(&engine, &[constrained(0, 1)])?;
    println!(
        "\nstructured outputs: time per output token (TPOT) under a JSON Schema (30 integers) vs free, same prompts and lengths, {repetitions} repetitions"
    );
    println!(
        "| {:>11} | {:>14} | {:>14} | {:>8} | {:>10} |",
        "concurrency", "TPOT free ms", "TPOT schema ms", "ratio", "tokens/req"
    );
    println!(
        "|{:->13}|{:->16}|{:->16}|{:->10}|{:->12}|",
        "", "", "", "", ""
    );
    for conc in [1usize, 16] {
        let (mut free, mut cons, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..repetitions {
            let reqs: Vec<GenerateRequest> = (0..conc)
                .map(|i| constrained(i, (rep * 100 + i) as u64))
                .collect();
            let c = run_batch(&engine, &reqs)?;
            // The same prompts, free, generating exactly as many tokens as their twins.
            let twins: Vec<GenerateRequest> = reqs
                .iter()
                .zip(&c)
                .map(|(r, &(n, _))| {
                    let mut f = r.clone();
                    f.grammar = None;
                    f.max_tokens = n.max(2);
                    f.ignore_eos = true;
                    f
                })
                .collect();
            let f = run_batch(&engine, &twins)?;
            cons.extend(c.iter().map(|x| x.1));
            free.extend(f.iter().map(|x| x.1));
            lens.extend(c.iter().map(|x| x.0 as f64));
        }
        let (tf, tc) = (mean(&free), mean(&cons));
        println!(
            "| {conc:>11} | {:>14.2} | {:>14.2} | {:>8.3} | {:>10.0} |",
            tf * 1e3,
            tc * 1e3,
            tc / tf,
            mean(&lens)
        );
    }
    Ok(())
}
