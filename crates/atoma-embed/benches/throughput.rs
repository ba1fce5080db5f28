//! Embeddings per second of all-MiniLM-L6-v2 on the CPU: the first 160 sentences of
//! `bench/sentences.txt` (license texts, 5 to 60 words) in batches of 32, one `embed` call per
//! batch, at the machine's thread count (or `--threads N`); and one sentence per call for the
//! latency of a lone request. `bench/st_bench.py` measures sentence-transformers on PyTorch
//! the same way, on the same files and sentences.
//!
//! Run: `cargo bench -p atoma-embed --bench throughput [-- --threads N --seconds S]`.
//! Needs the model in the cache (`atoma model pull minilm`). Prints a markdown table.

#![allow(clippy::print_stdout)] // the figures of the run, for the issue note

use std::path::PathBuf;
use std::time::{Duration, Instant};

use atoma_embed::{EmbedInput, EmbedOptions, Embedder};
use atoma_models::ModelStore;

const SENTENCES: usize = 160;
const BATCH: usize = 32;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// CPU seconds this process has used, all threads together.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// What [`measure`] found.
struct Figures {
    /// Sentences per second of wall time.
    rate: f64,
    /// Median wall seconds of one call.
    median: f64,
    /// Sentences per CPU second (all threads): steadier than wall time on a shared machine.
    per_cpu_second: f64,
}

/// Runs `pass` (which embeds `per_pass` sentences in `calls_per_pass` calls) until `seconds`
/// have passed, at least three times.
fn measure(
    seconds: f64,
    per_pass: usize,
    calls_per_pass: usize,
    mut pass: impl FnMut(),
) -> Figures {
    pass(); // warm-up
    let mut times = Vec::new();
    let start = Instant::now();
    let cpu = cpu_seconds();
    while times.len() < 3 || start.elapsed() < Duration::from_secs_f64(seconds) {
        let t = Instant::now();
        pass();
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds() - cpu;
    let total: f64 = times.iter().sum();
    let done = (times.len() * per_pass) as f64;
    times.sort_by(f64::total_cmp);
    Figures {
        rate: done / total,
        median: times[times.len() / 2] / calls_per_pass as f64,
        per_cpu_second: done / cpu,
    }
}

fn main() {
    let store = ModelStore::new(ModelStore::default_root());
    let dir = match store.resolve("minilm") {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED: {e}");
            return;
        }
    };
    let threads = arg("--threads")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let seconds: f64 = arg("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let m = Embedder::load_with(
        &dir,
        &EmbedOptions {
            threads: Some(threads),
            ..EmbedOptions::default()
        },
    )
    .expect("load all-MiniLM-L6-v2");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/sentences.txt");
    let text = std::fs::read_to_string(&path).expect("bench/sentences.txt");
    let sentences: Vec<&str> = text.lines().take(SENTENCES).collect();
    assert_eq!(sentences.len(), SENTENCES);
    let inputs: Vec<EmbedInput<'_>> = sentences.iter().map(|s| EmbedInput::Text(s)).collect();
    let tokens: usize = m.embed(&inputs).unwrap().iter().map(|e| e.tokens).sum();

    let batched = measure(seconds, SENTENCES, SENTENCES / BATCH, || {
        for batch in inputs.chunks(BATCH) {
            std::hint::black_box(m.embed(batch).unwrap());
        }
    });
    let single = measure(seconds / 2.0, SENTENCES, SENTENCES, || {
        for input in &inputs {
            std::hint::black_box(m.embed(std::slice::from_ref(input)).unwrap());
        }
    });
    println!(
        "atoma-embed, all-MiniLM-L6-v2, {threads} threads, {SENTENCES} sentences ({tokens} tokens, {:.1} per sentence)\n",
        tokens as f64 / SENTENCES as f64
    );
    println!("| calls | embeddings/s | median ms per call | embeddings per CPU-second |");
    println!("|---|---:|---:|---:|");
    for (name, f) in [
        (format!("batches of {BATCH}"), &batched),
        ("one sentence".into(), &single),
    ] {
        println!(
            "| {name} | {:.1} | {:.2} | {:.1} |",
            f.rate,
            f.median * 1e3,
            f.per_cpu_second
        );
    }
}
