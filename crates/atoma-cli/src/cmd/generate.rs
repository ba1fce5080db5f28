//! `atoma generate`: run one prompt through a model and stream the text to stdout; statistics
//! (load time, prompt and decode tokens/s) go to stderr.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use atoma_engine::{
    ChatMessage, FinishReason, GenerateRequest, GenerationEvent, LoadOptions, Role, SamplingParams,
    run_generation,
};
use atoma_models::ModelStore;

use crate::progress;

/// System message of `--chat` when none is given (as llama.cpp's conversation mode does).
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a GGUF path, a catalog or cached name, or hf:<org>/<repo>/<file>.gguf.
    #[arg(long, short, default_value = "default")]
    pub model: String,
    /// The prompt (`-` reads it from stdin).
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message (implies --chat). Default with --chat: "You are a helpful assistant.";
    /// pass `--system ""` to send none and let the model's template apply its own default.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Sampling flags shared by commands that generate.
#[derive(Debug, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the best one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty over the last 64 tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// OpenAI presence penalty.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// RNG seed: the same prompt and seed give the same text (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: 64,
            seed: self.seed.unwrap_or_else(random_seed),
            logit_bias: Vec::new(),
        }
    }
}

/// Model loading flags.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Largest context to serve (caps RoPE tables and KV memory).
    #[arg(long, default_value_t = 8192)]
    pub max_context: usize,
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            max_context: Some(self.max_context),
        }
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

pub fn run(store: &ModelStore, a: &Args, threads: usize) -> anyhow::Result<()> {
    let prompt = if a.prompt == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?
    } else {
        a.prompt.clone()
    };
    let path = store.resolve(&a.model)?;
    let lm = progress::load_model(&path, &a.load.options())?;
    let info = &lm.info;
    eprintln!(
        "loaded {} ({:?}, {} layers, context {}) in {:.2} s, {threads} threads",
        info.name,
        info.config.arch,
        info.config.n_layers,
        info.config.context,
        info.load_time.as_secs_f64()
    );
    let text = if a.chat || a.system.is_some() {
        let mut msgs = Vec::new();
        let system = a.system.as_deref().unwrap_or(DEFAULT_SYSTEM);
        if !system.is_empty() {
            msgs.push(ChatMessage::new(Role::System, system));
        }
        msgs.push(ChatMessage::new(Role::User, prompt));
        lm.chat_prompt(&msgs)?
    } else {
        prompt
    };
    let tokens = lm.tokenize_prompt(&text);
    let mut req = GenerateRequest::new(tokens, a.max_tokens);
    req.sampling = a.sampling.params();
    req.stop = a.stop.clone();
    req.ignore_eos = a.ignore_eos;
    let mut out = std::io::stdout().lock();
    let mut finished = None;
    let mut write_err = None;
    let mut emit = |e: GenerationEvent| {
        let text = match &e {
            GenerationEvent::Token(t) => t.text.as_str(),
            GenerationEvent::Finished(f) => f.text.as_str(),
            GenerationEvent::Error(_) => "",
        };
        if let Err(err) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            write_err = Some(err);
            return false;
        }
        if let GenerationEvent::Finished(f) = e {
            finished = Some(f);
        }
        true
    };
    run_generation(
        &lm,
        &req,
        &AtomicBool::new(false),
        Duration::ZERO,
        &mut emit,
    )?;
    if let Some(e) = write_err {
        // A closed pipe (e.g. `| head`) is not an error worth reporting.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
    }
    let _ = writeln!(out);
    let f = finished.context("generation ended without a result")?;
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let decoded = f.usage.completion_tokens.saturating_sub(1);
    eprintln!(
        "prompt: {} tokens at {:.1} tok/s | generated: {} tokens, decode {:.1} tok/s | finish: {} | seed {}",
        f.usage.prompt_tokens,
        rate(f.usage.prompt_tokens, f.timings.prefill),
        f.usage.completion_tokens,
        rate(decoded, f.timings.decode),
        match f.reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        },
        f.seed
    );
    Ok(())
}
