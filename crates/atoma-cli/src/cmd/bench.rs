//! `atoma bench`: prompt-processing (pp) and token-generation (tg) speed of the engine on a
//! model, measured like llama-bench (random prompt tokens in one batch; single-token decodes from
//! an empty cache) on the serving path (batched forward over the paged KV cache), plus aggregate
//! decode speed with several sequences per pass; the weight bytes a decoded token reads and the
//! share of the machine's memory bandwidth (measured here) that decode reaches; and llama.cpp's
//! and ik_llama.cpp's llama-bench on the same file and thread count when they are found.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use atoma_engine::sampling::Rng;
use atoma_engine::{BatchSeq, PagedKv};
use atoma_models::ModelStore;

use crate::cmd::generate::LoadArgs;
use crate::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a GGUF path, a catalog or cached name, or hf:<org>/<repo>/<file>.gguf.
    #[arg(long, short, default_value = "default")]
    pub model: String,
    /// Prompt tokens per prompt-processing run.
    #[arg(long, short = 'p', default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens per generation run.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub gen_tokens: usize,
    /// Also measure aggregate decode speed with this many sequences per pass (1: skip).
    #[arg(long, short = 'b', default_value_t = 16)]
    pub batch: usize,
    /// Measured repetitions (after one warm-up).
    #[arg(long, short, default_value_t = 3)]
    pub repetitions: usize,
    /// llama-bench binary (default: $LLAMA_BENCH, ~/.cache/llama-baseline/bin, then PATH).
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// ik_llama.cpp's llama-bench (default: $IK_LLAMA_BENCH, then
    /// ~/.cache/ik-llama-baseline/bin; build it with ../shared/tools/build-ik-llama.sh).
    #[arg(long)]
    pub ik_llama_bench: Option<PathBuf>,
    /// Do not run the baselines even if they are found.
    #[arg(long)]
    pub no_baseline: bool,
    /// Skip measuring the memory bandwidth (three reads of 1 GiB beside each decode run, five
    /// after each baseline; the decode's share of it is then not printed).
    #[arg(long)]
    pub no_bandwidth: bool,
    /// Instead: the cost of verifying N logged requests by re-execution next to generating
    /// them (`-p` prompt and `-n` generated tokens each), one at a time and all at once.
    #[arg(long, value_name = "N")]
    pub verify: Option<usize>,
    /// Instead: time per output token under a JSON-Schema constraint vs free, at concurrency
    /// 1 and 16 (structured outputs' cost).
    #[arg(long)]
    pub structured: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

struct Stat {
    mean: f64,
    std: f64,
    /// The fastest repetition: on a shared machine whose speed moves by half within minutes,
    /// the figure that best compares two builds run one after the other.
    best: f64,
}

/// The median (sorts `xs`).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn stat(xs: &[f64]) -> Stat {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Stat {
        mean,
        std: var.sqrt(),
        best: xs.iter().copied().fold(0.0, f64::max),
    }
}

pub fn run(store: &ModelStore, a: &Args, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.prompt_tokens > 0 && a.gen_tokens > 0,
        "token counts must be positive"
    );
    let path = store.resolve(&a.model)?;
    let lm = progress::load_model(&path, &a.load.options())?;
    if let Some(n) = a.verify {
        eprintln!(
            "atoma bench --verify: {} ({}), {threads} threads, kernel {}",
            lm.info.name,
            path.display(),
            atoma_engine::cpu_matmul_kernel()
        );
        return crate::cmd::bench_verify::run(lm, n, a.prompt_tokens, a.gen_tokens);
    }
    if a.structured {
        eprintln!(
            "atoma bench --structured: {} ({}), {threads} threads, kernel {}",
            lm.info.name,
            path.display(),
            atoma_engine::cpu_matmul_kernel()
        );
        return crate::cmd::bench_grammar::run(lm, a.repetitions.max(1));
    }
    let model = &lm.model;
    anyhow::ensure!(
        a.prompt_tokens.max(a.gen_tokens) < model.config().context,
        "the model's context ({}) is too small for this benchmark",
        model.config().context
    );
    let vocab = lm.tokenizer.vocab_size() as u64;
    let mut rng = Rng::new(1234);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };
    eprintln!(
        "atoma bench: {} ({}), {threads} threads, quantized-matmul kernel {}, pp{} tg{}, {} repetitions + 1 \
         warm-up",
        lm.info.name,
        path.display(),
        atoma_engine::cpu_matmul_kernel(),
        a.prompt_tokens,
        a.gen_tokens,
        a.repetitions
    );
    // The serving path: the batched forward over the paged KV cache, as the node runs it.
    let block = 16;
    let per_seq_blocks = (a.prompt_tokens.max(a.gen_tokens) + 1).div_ceil(block);
    let batch = a.batch.max(1);
    let mut kv = PagedKv::new(model.config(), per_seq_blocks * batch, block);
    let table = |seq: usize| -> Vec<u32> {
        ((seq * per_seq_blocks) as u32..((seq + 1) * per_seq_blocks) as u32).collect()
    };
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut btg = Vec::new();
    let mut probes = Vec::new();
    for rep in 0..=a.repetitions {
        let prompt = tokens(a.prompt_tokens);
        let t0 = table(0);
        let t = Instant::now();
        model.forward_paged(
            &[BatchSeq {
                tokens: &prompt,
                start: 0,
                block_table: &t0,
                logits: 1,
            }],
            &mut kv,
        )?;
        let pp_rate = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let decode_ids = tokens(a.gen_tokens);
        let t = Instant::now();
        for (pos, tok) in decode_ids.iter().enumerate() {
            let one = [*tok];
            model.forward_paged(
                &[BatchSeq {
                    tokens: &one,
                    start: pos,
                    block_table: &t0,
                    logits: 1,
                }],
                &mut kv,
            )?;
        }
        let tg_rate = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        // The bandwidth right beside each measured decode run: on a shared machine it moves
        // by half within minutes, so a single probe at the end could flatter or wrong the share.
        if rep > 0 && !a.no_bandwidth {
            probes.push(crate::cmd::bench_mem::read_bandwidth(threads, 3));
        }
        // Aggregate decode: `batch` sequences advancing one token each per pass.
        let mut btg_rate = 0.0;
        if batch > 1 {
            let tables: Vec<Vec<u32>> = (0..batch).map(table).collect();
            let ids: Vec<Vec<u32>> = (0..batch).map(|_| tokens(a.gen_tokens)).collect();
            let t = Instant::now();
            for pos in 0..a.gen_tokens {
                let step: Vec<BatchSeq<'_>> = (0..batch)
                    .map(|s| BatchSeq {
                        tokens: &ids[s][pos..pos + 1],
                        start: pos,
                        block_table: &tables[s],
                        logits: 1,
                    })
                    .collect();
                model.forward_paged(&step, &mut kv)?;
            }
            btg_rate = (a.gen_tokens * batch) as f64 / t.elapsed().as_secs_f64();
        }
        if rep > 0 {
            pp.push(pp_rate);
            tg.push(tg_rate);
            btg.push(btg_rate);
        }
    }
    let (pp, tg, btg) = (stat(&pp), stat(&tg), stat(&btg));
    let bytes = model.decode_weight_bytes();
    let bandwidth = (!probes.is_empty()).then(|| median(&mut probes));
    println!("| engine | test | tokens/s |");
    println!("| --- | --- | --- |");
    println!(
        "| atoma | pp{} | {:.1} ± {:.1} (best {:.1}) |",
        a.prompt_tokens, pp.mean, pp.std, pp.best
    );
    println!(
        "| atoma | tg{} | {:.1} ± {:.1} (best {:.1}) |",
        a.gen_tokens, tg.mean, tg.std, tg.best
    );
    if batch > 1 {
        println!(
            "| atoma | tg{} x {batch} sequences (aggregate) | {:.1} ± {:.1} ({:.2}x single) |",
            a.gen_tokens,
            btg.mean,
            btg.std,
            btg.mean / tg.mean
        );
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "weights read per decoded token: {:.1} MB in our layout ({:.1} MB in the GGUF's blocks)",
        mb(bytes.streamed),
        mb(bytes.file)
    );
    if let Some(bw) = bandwidth {
        let ceiling = bw / bytes.streamed as f64;
        println!(
            "memory read bandwidth ({threads} threads, reads of 1 GiB beside each decode run, median {:.1} GB/s, \
             range {:.1}-{:.1}): tg{} streams {:.1} GB/s = {:.0}% of it (ceiling {:.0} tokens/s in our layout, \
             {:.0} in the file's)",
            bw / 1e9,
            probes[0] / 1e9,
            probes[probes.len() - 1] / 1e9,
            a.gen_tokens,
            tg.mean * bytes.streamed as f64 / 1e9,
            100.0 * tg.mean / ceiling,
            ceiling,
            bw / bytes.file as f64
        );
    }
    if a.no_baseline {
        return Ok(());
    }
    let baselines = [
        (
            "llama.cpp",
            find_bench(
                a.llama_bench.as_ref(),
                "LLAMA_BENCH",
                ".cache/llama-baseline/bin",
                true,
            ),
            "../shared/tools/build-llama-server.sh",
        ),
        (
            "ik_llama.cpp",
            find_bench(
                a.ik_llama_bench.as_ref(),
                "IK_LLAMA_BENCH",
                ".cache/ik-llama-baseline/bin",
                false,
            ),
            "../shared/tools/build-ik-llama.sh",
        ),
    ];
    for (name, bin, build) in baselines {
        let Some(bin) = bin else {
            eprintln!("{name}'s llama-bench not found (build it with {build}); no {name} baseline");
            continue;
        };
        let (lpp, ltg) = llama_bench(&bin, &path, a, threads)
            .with_context(|| format!("{name} ({})", bin.display()))?;
        println!("| {name} | pp{} | {lpp:.1} |", a.prompt_tokens);
        print!("| {name} | tg{} | {ltg:.1} |", a.gen_tokens);
        if bandwidth.is_some() {
            // Probed again right after this engine's runs, for the same reason as ours.
            let bw = crate::cmd::bench_mem::read_bandwidth(threads, 5);
            println!(
                " {:.0}% of the bandwidth ({:.1} GB/s just after; reading the file's {:.1} MB per token)",
                100.0 * ltg * bytes.file as f64 / bw,
                bw / 1e9,
                mb(bytes.file)
            );
        } else {
            println!();
        }
        println!(
            "ratio atoma/{name}: pp {:.2}x, tg {:.2}x",
            pp.mean / lpp,
            tg.mean / ltg
        );
    }
    Ok(())
}

/// A llama-bench binary: the flag, then `$env`, then `~/<cache>/llama-bench`, then (for
/// mainline llama.cpp only) PATH.
fn find_bench(explicit: Option<&PathBuf>, env: &str, cache: &str, path: bool) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let home = dirs_home().join(cache).join("llama-bench");
    if home.is_file() {
        return Some(home);
    }
    if !path {
        return None;
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("llama-bench"))
            .find(|p| p.is_file())
    })
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// Runs llama-bench and returns its (pp, tg) tokens/s.
fn llama_bench(
    bin: &PathBuf,
    model: &std::path::Path,
    a: &Args,
    threads: usize,
) -> anyhow::Result<(f64, f64)> {
    // The build scripts leave the shared libraries beside the binary.
    let libs = bin
        .parent()
        .map(|d| d.as_os_str().to_owned())
        .unwrap_or_default();
    let out = Command::new(bin)
        .env("LD_LIBRARY_PATH", libs)
        .arg("-m")
        .arg(model)
        .args(["-p", &a.prompt_tokens.to_string()])
        .args(["-n", &a.gen_tokens.to_string()])
        .args(["-t", &threads.to_string()])
        .args(["-r", &a.repetitions.max(1).to_string()])
        .args(["-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "llama-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench's JSON output")?;
    let rate = |pp: bool| {
        rows.iter()
            .find(|r| {
                let np = r["n_prompt"].as_u64().unwrap_or(0);
                let ng = r["n_gen"].as_u64().unwrap_or(0);
                if pp {
                    np > 0 && ng == 0
                } else {
                    ng > 0 && np == 0
                }
            })
            .and_then(|r| r["avg_ts"].as_f64())
            .context("llama-bench printed no result for this test")
    };
    Ok((rate(true)?, rate(false)?))
}
