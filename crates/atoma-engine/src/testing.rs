//! Writers of tiny GGUF files with random weights, one per supported architecture, so tests
//! exercise loading, tokenizing and the forward pass without downloading anything.
//!
//! Compiled for this crate's tests and, through the `test-support` feature, for other crates'.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::Architecture;
use crate::sampling::Rng;

/// What tiny model to write.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Architecture,
    /// Quantization of the matrices (norms stay F32).
    pub dtype: GgmlDType,
    pub seed: u64,
    pub layers: usize,
    pub context: usize,
    /// Write a separate `output.weight` instead of tying it to the embeddings.
    pub untied_output: bool,
    pub chat_template: Option<String>,
}

impl TinySpec {
    /// A 3-layer model of `arch` with Q8_0 weights.
    pub fn new(arch: Architecture) -> Self {
        Self {
            arch,
            dtype: GgmlDType::Q8_0,
            seed: 42,
            layers: 3,
            context: 256,
            untied_output: arch != Architecture::Gemma3,
            chat_template: None,
        }
    }
}

/// Hidden size, heads, KV heads, head dim and FFN size of every tiny model.
pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const FFN: usize = 96;
/// Sliding window of the tiny Gemma 3 and Phi-3 models, small so that tests cross it.
pub const WINDOW: usize = 8;

struct Writer {
    rng: Rng,
    tensors: Vec<(String, QTensor)>,
    dtype: GgmlDType,
}

impl Writer {
    fn values(&mut self, n: usize, center: f32, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|_| center + spread * (2.0 * self.rng.next_f64() as f32 - 1.0))
            .collect()
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<()> {
        let spread = 1.0 / (cols as f32).sqrt() * 1.7;
        let v = self.values(rows * cols, 0.0, spread);
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
        self.tensors
            .push((name.to_string(), QTensor::quantize(&t, self.dtype)?));
        Ok(())
    }

    fn vector(&mut self, name: &str, len: usize, center: f32, spread: f32) -> Result<()> {
        let v = self.values(len, center, spread);
        let t = Tensor::from_vec(v, len, &Device::Cpu)?;
        self.tensors
            .push((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    }
}

/// The tiny SentencePiece vocabulary: `<unk> <s> </s>`, 256 byte tokens, then word pieces.
pub fn spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁",
        "a",
        "b",
        "c",
        "d",
        "e",
        "h",
        "l",
        "o",
        "r",
        "w",
        "t",
        "▁t",
        "▁h",
        "he",
        "ll",
        "▁he",
        "▁hell",
        "▁hello",
        "▁w",
        "or",
        "▁wor",
        "▁world",
        "ld",
        "▁the",
        "th",
        "▁a",
        "▁c",
        "at",
        "▁cat",
        "<start_of_turn>",
        "<end_of_turn>",
    ];
    let mut scores = vec![0.0; tokens.len()];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push((*p).to_string());
        scores.push(-(i as f32));
        types.push(if p.starts_with("<") { 3 } else { 1 });
    }
    (tokens, scores, types)
}

/// Writes a tiny random model of `spec` to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let arch = spec.arch.gguf_name();
    let (tokens, scores, types) = spm_vocab();
    let vocab = tokens.len();
    let mut w = Writer {
        rng: Rng::new(spec.seed),
        tensors: Vec::new(),
        dtype: spec.dtype,
    };
    w.matrix("token_embd.weight", vocab, HIDDEN)?;
    if spec.untied_output {
        w.matrix("output.weight", vocab, HIDDEN)?;
    }
    w.vector("output_norm.weight", HIDDEN, 1.0, 0.1)?;
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for i in 0..spec.layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        w.vector(&p("attn_norm.weight"), HIDDEN, 1.0, 0.1)?;
        w.vector(&p("ffn_norm.weight"), HIDDEN, 1.0, 0.1)?;
        if spec.arch == Architecture::Phi3 {
            w.matrix(&p("attn_qkv.weight"), q + 2 * kv, HIDDEN)?;
            w.matrix(&p("ffn_up.weight"), 2 * FFN, HIDDEN)?;
        } else {
            w.matrix(&p("attn_q.weight"), q, HIDDEN)?;
            w.matrix(&p("attn_k.weight"), kv, HIDDEN)?;
            w.matrix(&p("attn_v.weight"), kv, HIDDEN)?;
            w.matrix(&p("ffn_gate.weight"), FFN, HIDDEN)?;
            w.matrix(&p("ffn_up.weight"), FFN, HIDDEN)?;
        }
        w.matrix(&p("attn_output.weight"), HIDDEN, q)?;
        w.matrix(&p("ffn_down.weight"), HIDDEN, FFN)?;
        if spec.arch == Architecture::Qwen2 {
            w.vector(&p("attn_q.bias"), q, 0.0, 0.2)?;
            w.vector(&p("attn_k.bias"), kv, 0.0, 0.2)?;
            w.vector(&p("attn_v.bias"), kv, 0.0, 0.2)?;
        }
        if spec.arch == Architecture::Gemma3 {
            w.vector(&p("attn_q_norm.weight"), HEAD_DIM, 1.0, 0.1)?;
            w.vector(&p("attn_k_norm.weight"), HEAD_DIM, 1.0, 0.1)?;
            w.vector(&p("post_attention_norm.weight"), HIDDEN, 1.0, 0.1)?;
            w.vector(&p("post_ffw_norm.weight"), HIDDEN, 1.0, 0.1)?;
        }
    }
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("tiny-{arch}"))),
        (k("context_length"), u(spec.context)),
        (k("embedding_length"), u(HIDDEN)),
        (k("block_count"), u(spec.layers)),
        (k("feed_forward_length"), u(FFN)),
        (k("attention.head_count"), u(HEADS)),
        (k("attention.head_count_kv"), u(KV_HEADS)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (k("rope.freq_base"), Value::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.unknown_token_id".into(), u(0)),
    ];
    if spec.arch == Architecture::Gemma3 {
        md.push((k("attention.key_length"), u(HEAD_DIM)));
        md.push((k("attention.value_length"), u(HEAD_DIM)));
        md.push((k("attention.sliding_window"), u(WINDOW)));
        md.push((k("attention.sliding_window_type"), u(3)));
        md.push((k("rope.freq_base"), Value::F32(1_000_000.0)));
        md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    }
    if spec.arch == Architecture::Phi3 {
        md.push((k("attention.sliding_window"), u(WINDOW)));
    }
    if let Some(t) = &spec.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    // Later entries override earlier ones with the same key.
    let mut dedup: Vec<(String, Value)> = Vec::new();
    for (key, v) in md {
        dedup.retain(|(k2, _)| *k2 != key);
        dedup.push((key, v));
    }
    let md_refs: Vec<(&str, &Value)> = dedup.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = w.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).map_err(|source| crate::EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}
