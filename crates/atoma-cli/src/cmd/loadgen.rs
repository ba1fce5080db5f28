//! `atoma loadgen`: a serving benchmark against any OpenAI-compatible endpoint (an atoma node,
//! or llama.cpp's llama-server for the baseline).
//!
//! For each concurrency level, `concurrency` client threads send streaming requests with fixed
//! prompt and output lengths (`ignore_eos`, greedy) until `rounds x concurrency` requests are
//! done, and it reports time to first token (TTFT), inter-token latency (ITL, the gaps between
//! streamed tokens), time per output token after the first (TPOT), output tokens/s and
//! requests/s. Prompts are sized with the model's own tokenizer.
//!
//! Workloads:
//! - `random`: distinct prompts of `--prompt-tokens` tokens on `/v1/completions`;
//! - `shared-prefix`: one system prompt of `--system-tokens` tokens shared by every request, plus
//!   a short distinct user turn, on `/v1/chat/completions` (the case prefix caching is for).
//!
//! Requests to an atoma node are signed for a stack (`--sign`, with the session `atoma up` left
//! or `--key`/`--stack`). Results go to stdout as a markdown table and, with `--out`, as JSON
//! lines that `tools/plot-serving.py` turns into a table and a PNG.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use atoma_engine::gguf::GgufFile;
use atoma_engine::sampling::Rng;
use atoma_engine::tokenizer::Tokenizer;
use atoma_models::ModelStore;

use crate::cmd::client::{Session, sign_body};
use crate::home::Home;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Distinct prompts of --prompt-tokens tokens (completions endpoint).
    Random,
    /// A shared system prompt of --system-tokens tokens plus a short user turn (chat endpoint).
    SharedPrefix,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// Model name sent in requests (default: the server's first model).
    #[arg(long)]
    pub model: Option<String>,
    /// GGUF whose tokenizer sizes the prompts (path, catalog or cached name).
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    #[arg(long, value_enum, default_value_t = Workload::Random)]
    pub workload: Workload,
    /// Prompt tokens per request (random workload).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Shared system prompt tokens (shared-prefix workload).
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Output tokens per request (sent with ignore_eos).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub concurrency: Vec<usize>,
    /// Requests per level = rounds x concurrency (at least 4).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Sign requests as a stack owner (atoma nodes).
    #[arg(long)]
    pub sign: bool,
    /// Key that owns the stack (default: the session's).
    #[arg(long)]
    pub key: Option<String>,
    /// Stack to charge (default: the session's).
    #[arg(long)]
    pub stack: Option<u64>,
    /// Seed of the prompts. Prompts depend only on the seed, the level and the request index, so
    /// both engines get the same ones; change it to repeat a run against a server whose prefix
    /// cache still holds the previous run's prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Label of the engine in the results (e.g. atoma, llama-server).
    #[arg(long, default_value = "atoma")]
    pub label: String,
    /// Append results as JSON lines to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One request's timeline.
#[derive(Debug, Clone)]
struct Sample {
    ttft: Duration,
    e2e: Duration,
    /// Gaps between consecutive streamed tokens.
    gaps: Vec<Duration>,
    tokens: usize,
    prompt_tokens: usize,
}

fn words(rng: &mut Rng, n: usize) -> String {
    const W: &[&str] = &[
        "river", "market", "engine", "garden", "silver", "history", "window", "mountain", "paper",
        "signal", "harbor", "forest", "library", "orbit", "winter", "castle", "method", "planet",
        "copper", "journey", "theory", "bridge", "valley", "ancient", "network", "pattern",
        "quiet", "golden", "system", "island", "letter", "number", "question", "answer", "energy",
        "machine", "village", "music", "science", "ocean",
    ];
    (0..n)
        .map(|_| W[(rng.next_u64() % W.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text of about `n` tokens (exactly `n` where the tokenizer round-trips).
fn text_of(tok: &Tokenizer, rng: &mut Rng, n: usize) -> String {
    let ids = tok.encode(&words(rng, n * 2 + 8), false, false);
    tok.decode(&ids[..n.min(ids.len())])
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[i.min(xs.len() - 1)]
}

pub fn run(home: &Home, store: &ModelStore, a: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.max_tokens > 0, "--max-tokens must be at least 1");
    anyhow::ensure!(
        !a.concurrency.is_empty() && a.concurrency.iter().all(|&c| c > 0),
        "--concurrency takes positive numbers"
    );
    let tok = Tokenizer::from_gguf(&GgufFile::open(&store.resolve(&a.tokenizer)?)?)?;
    let base = a.url.trim_end_matches('/').to_string();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = ureq::get(&format!("{base}/v1/models"))
                .call()
                .with_context(|| format!("cannot reach {base}"))?
                .into_json()?;
            v["data"][0]["id"]
                .as_str()
                .context("the server lists no model")?
                .to_string()
        }
    };
    let signer = if a.sign {
        let session = Session::load(home);
        let key = a
            .key
            .clone()
            .or(session.as_ref().map(|s| s.key.clone()))
            .unwrap_or("user".into());
        let stack = a
            .stack
            .or(session.as_ref().map(|s| s.stack))
            .context("--sign needs --stack or a session from `atoma up`")?;
        Some((home.key(&key)?, stack))
    } else {
        None
    };
    let mut rng = Rng::new(42);
    let system = text_of(&tok, &mut rng, a.system_tokens);
    eprintln!(
        "loadgen: {} on {base} ({model}), workload {:?}, {} output tokens, levels {:?}",
        a.label, a.workload, a.max_tokens, a.concurrency
    );
    println!(
        "| engine | workload | conc | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms \
         | TPOT ms | output tok/s | req/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &c in &a.concurrency {
        let n = (a.rounds * c).max(4);
        // Distinct prompts per request (seeded, so both engines get the same ones).
        let bodies: Vec<(String, Value)> = (0..n)
            .map(|i| {
                let mut r = Rng::new(a.seed.wrapping_mul(1 << 32) + 1000 * c as u64 + i as u64);
                let mut body = match a.workload {
                    Workload::Random => (
                        "/v1/completions",
                        json!({"prompt": text_of(&tok, &mut r, a.prompt_tokens)}),
                    ),
                    Workload::SharedPrefix => (
                        "/v1/chat/completions",
                        json!({"messages": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": format!("Question {i}: {}?", words(&mut r, 12))},
                        ]}),
                    ),
                };
                let o = body.1.as_object_mut().expect("object");
                o.insert("model".into(), json!(model));
                o.insert("max_tokens".into(), json!(a.max_tokens));
                o.insert("temperature".into(), json!(0.0));
                o.insert("stream".into(), json!(true));
                o.insert("stream_options".into(), json!({"include_usage": true}));
                o.insert("ignore_eos".into(), json!(true));
                (body.0.to_string(), body.1)
            })
            .collect();
        let next = AtomicUsize::new(0);
        let samples = Mutex::new(Vec::with_capacity(n));
        let errors = Mutex::new(Vec::<String>::new());
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..c {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let (path, body) = &bodies[i];
                        match one(&format!("{base}{path}"), body, signer.as_ref()) {
                            Ok(x) => samples.lock().expect("lock").push(x),
                            Err(e) => errors.lock().expect("lock").push(format!("{e:#}")),
                        }
                    }
                });
            }
        });
        let wall = t0.elapsed().as_secs_f64();
        let samples = samples.into_inner().expect("lock");
        let errors = errors.into_inner().expect("lock");
        if let Some(e) = errors.first() {
            bail!(
                "{} of {n} requests failed at concurrency {c}; first: {e}",
                errors.len()
            );
        }
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let mut ttft: Vec<f64> = samples.iter().map(|s| ms(&s.ttft)).collect();
        let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.gaps.iter().map(ms)).collect();
        let tpot: Vec<f64> = samples
            .iter()
            .filter(|s| s.tokens > 1)
            .map(|s| (ms(&s.e2e) - ms(&s.ttft)) / (s.tokens - 1) as f64)
            .collect();
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let prompt: usize = samples.iter().map(|s| s.prompt_tokens).sum();
        let row = json!({
            "engine": a.label,
            "workload": format!("{:?}", a.workload),
            "concurrency": c,
            "requests": n,
            "prompt_tokens_mean": prompt as f64 / n as f64,
            "output_tokens_mean": tokens as f64 / n as f64,
            "ttft_p50_ms": percentile(&mut ttft, 50.0),
            "ttft_p99_ms": percentile(&mut ttft, 99.0),
            "itl_p50_ms": percentile(&mut itl, 50.0),
            "itl_p99_ms": percentile(&mut itl, 99.0),
            "tpot_mean_ms": tpot.iter().sum::<f64>() / tpot.len().max(1) as f64,
            "output_tok_s": tokens as f64 / wall,
            "req_s": n as f64 / wall,
            "wall_s": wall,
        });
        println!(
            "| {} | {:?} | {c} | {n} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            a.label,
            a.workload,
            row["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
            row["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
            row["itl_p50_ms"].as_f64().unwrap_or(f64::NAN),
            row["itl_p99_ms"].as_f64().unwrap_or(f64::NAN),
            row["tpot_mean_ms"].as_f64().unwrap_or(f64::NAN),
            row["output_tok_s"].as_f64().unwrap_or(f64::NAN),
            row["req_s"].as_f64().unwrap_or(f64::NAN),
        );
        std::io::stdout().flush()?;
        if let Some(out) = &a.out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out)
                .with_context(|| format!("opening {}", out.display()))?;
            writeln!(f, "{row}")?;
        }
    }
    Ok(())
}

/// Sends one streaming request and records its timeline.
fn one(
    url: &str,
    body: &Value,
    signer: Option<&(atoma_crypto::Keypair, u64)>,
) -> anyhow::Result<Sample> {
    let mut req = ureq::post(url)
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(1800));
    let text = match signer {
        Some((key, stack)) => {
            let (text, sig) = sign_body(key, body.clone())?;
            req = req
                .set("X-Signature", &sig)
                .set("X-Stack-Small-Id", &stack.to_string());
            text
        }
        None => serde_json::to_string(body)?,
    };
    let t0 = Instant::now();
    let resp = match req.send_string(&text) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let msg = r.into_string().unwrap_or_default();
            bail!("HTTP {code}: {msg}");
        }
        Err(e) => bail!("{e}"),
    };
    let mut first = None;
    let mut last = None;
    let mut gaps = Vec::new();
    let mut chunks = 0usize;
    let mut usage = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).context("a chunk is not JSON")?;
        if v.get("error").is_some() {
            bail!("error mid-stream: {}", v["error"]);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some((
                u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            ));
        }
        let choice = &v["choices"][0];
        let has_token = choice["text"].is_string() || choice["delta"]["content"].is_string();
        if has_token {
            let now = Instant::now();
            chunks += 1;
            if first.is_none() {
                first = Some(now - t0);
            }
            if let Some(prev) = last {
                gaps.push(now - prev);
            }
            last = Some(now);
        }
    }
    let e2e = t0.elapsed();
    let (tokens, prompt_tokens) = usage.unwrap_or((chunks, 0));
    Ok(Sample {
        ttft: first.context("the stream carried no token")?,
        e2e,
        gaps,
        tokens,
        prompt_tokens,
    })
}
