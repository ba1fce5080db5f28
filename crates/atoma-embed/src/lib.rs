//! Sentence embeddings on candle, as sentence-transformers computes them: a BERT encoder
//! (all-MiniLM-L6-v2 and its kin), mean pooling over the tokens, L2 normalisation.
//!
//! [`Embedder::load`] reads a sentence-transformers model directory (`config.json`,
//! `tokenizer.json`, `model.safetensors`, and when present `modules.json`,
//! `sentence_bert_config.json`, `1_Pooling/config.json`); [`Embedder::embed`] turns texts or
//! token ids into unit vectors, many inputs per forward pass.
//!
//! Deterministic: sequences are packed end to end, never padded, attention runs per sequence,
//! and the projections run on our own kernels (`matmul`), which sum in one fixed order on every
//! CPU vector level; so an input's vector is the same bits alone, amid any other inputs, in any
//! batch split and with any thread count (tested). Like the engine, this crate knows nothing of
//! HTTP, environment variables or where models are cached: it is given a directory.

mod bert;
mod config;
mod error;
mod matmul;
#[cfg(feature = "test-support")]
pub mod testing;
mod tokenize;

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::bert::{Bert, Packed};
use crate::config::ModelConfig;
use crate::tokenize::TextTokenizer;

pub use crate::config::BertConfig;
pub use crate::error::{EmbedError, Result};

/// One input to embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedInput<'a> {
    /// Text, tokenized by the model's tokenizer ([CLS] and [SEP] added) and truncated to
    /// [`Embedder::max_tokens`] as sentence-transformers does.
    Text(&'a str),
    /// The complete token sequence, taken as given: [`Embedder::tokenize`]'s output embeds to
    /// the same vector as its text. Never truncated: longer than [`Embedder::max_tokens`] is an
    /// error, as are ids outside the vocabulary and an empty sequence.
    Tokens(&'a [u32]),
}

impl<'a> From<&'a str> for EmbedInput<'a> {
    fn from(text: &'a str) -> Self {
        Self::Text(text)
    }
}

impl<'a> From<&'a [u32]> for EmbedInput<'a> {
    fn from(ids: &'a [u32]) -> Self {
        Self::Tokens(ids)
    }
}

/// One input's embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// [`Embedder::dimensions`] values; of unit length when the model's pipeline normalises.
    pub vector: Vec<f32>,
    /// Tokens the model read, [CLS] and [SEP] included (what usage counts).
    pub tokens: usize,
    /// The text was longer than [`Embedder::max_tokens`] and its end was not read.
    pub truncated: bool,
}

/// How to run a model.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Threads of the model's own pool, which runs the projections and attention (nearly all
    /// the work); `None`: rayon's default (`RAYON_NUM_THREADS`, else every core). candle's
    /// element-wise kernels (GELU, additions) keep candle's global pool, sized by
    /// `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the physical cores. No count
    /// changes any bit of the result.
    pub threads: Option<usize>,
    /// Most tokens in one forward pass; larger requests are split (same bits, less memory).
    pub max_batch_tokens: usize,
    /// The model's name; `None`: the directory's name.
    pub model_id: Option<String>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            threads: None,
            max_batch_tokens: 8192,
            model_id: None,
        }
    }
}

/// A loaded embedding model. `Send + Sync`: share it behind an `Arc` and call
/// [`embed`](Self::embed) from blocking threads; concurrent calls share its compute threads.
#[derive(Debug)]
pub struct Embedder {
    model: Bert,
    tokenizer: TextTokenizer,
    config: ModelConfig,
    pool: rayon::ThreadPool,
    max_batch_tokens: usize,
    model_id: String,
    weights_sha256: [u8; 32],
}

impl Embedder {
    /// Loads the model directory `dir` with the default options.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &EmbedOptions::default())
    }

    /// Loads the model directory `dir`.
    pub fn load_with(dir: &Path, opts: &EmbedOptions) -> Result<Self> {
        for name in ["config.json", "tokenizer.json", "model.safetensors"] {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(EmbedError::MissingFile { path });
            }
        }
        let config = ModelConfig::read(dir)?;
        let tokenizer = TextTokenizer::load(
            &dir.join("tokenizer.json"),
            config.max_tokens,
            config.lowercase,
            config.bert.vocab_size,
        )?;
        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| EmbedError::io(&weights_path, e))?;
        let weights_sha256 = Sha256::digest(&bytes).into();
        let bad_weights = |e: candle_core::Error| EmbedError::BadWeights {
            path: weights_path.clone(),
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        };
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(bad_weights)?;
        drop(bytes);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = Bert::new(&config.bert, vb).map_err(bad_weights)?;
        let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("atoma-embed-{i}"));
        if let Some(n) = opts.threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build().map_err(|e| EmbedError::Threads {
            threads: opts.threads.unwrap_or(0),
            reason: e.to_string(),
        })?;
        let model_id = opts.model_id.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| "embedding-model".into(), |n| n.to_string_lossy().into())
        });
        Ok(Self {
            model,
            tokenizer,
            max_batch_tokens: opts.max_batch_tokens.max(config.max_tokens),
            config,
            pool,
            model_id,
            weights_sha256,
        })
    }

    /// Token ids of `text`, [CLS] and [SEP] included, truncated to [`max_tokens`](Self::max_tokens).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(0, text)?.ids)
    }

    /// The embeddings of `inputs`, in order. Inputs are checked and tokenized first (an error
    /// names the input's index and nothing is computed), then run in forward passes of at most
    /// `max_batch_tokens` tokens.
    pub fn embed(&self, inputs: &[EmbedInput<'_>]) -> Result<Vec<Embedding>> {
        let seqs = self.prepare(inputs)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut first = 0;
        while first < seqs.len() {
            let mut batch = Packed::default();
            let mut end = first;
            while end < seqs.len()
                && (end == first || batch.ids.len() + seqs[end].0.len() <= self.max_batch_tokens)
            {
                batch.push(&seqs[end].0);
                end += 1;
            }
            let vectors = self.pool.install(|| self.forward(&batch))?;
            out.extend(vectors.into_iter().zip(&seqs[first..end]).map(
                |(vector, (ids, truncated))| Embedding {
                    vector,
                    tokens: ids.len(),
                    truncated: *truncated,
                },
            ));
            first = end;
        }
        Ok(out)
    }

    /// Width of the vectors.
    pub fn dimensions(&self) -> usize {
        self.config.bert.hidden_size
    }

    /// Most tokens of one input, [CLS] and [SEP] included: sentence-transformers'
    /// `max_seq_length` (256 for all-MiniLM-L6-v2), at most the position embeddings.
    pub fn max_tokens(&self) -> usize {
        self.config.max_tokens
    }

    /// The model's name.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// SHA-256 of `model.safetensors`, the weights' identity for a fingerprint.
    pub fn weights_sha256(&self) -> [u8; 32] {
        self.weights_sha256
    }

    /// The encoder's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config.bert
    }

    /// Compute threads of this model.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn prepare(&self, inputs: &[EmbedInput<'_>]) -> Result<Vec<(Vec<u32>, bool)>> {
        let vocab = self.config.bert.vocab_size;
        let max = self.config.max_tokens;
        inputs
            .iter()
            .enumerate()
            .map(|(index, input)| match *input {
                EmbedInput::Text(text) => {
                    let t = self.tokenizer.encode(index, text)?;
                    if t.ids.is_empty() {
                        return Err(EmbedError::EmptyInput { index });
                    }
                    Ok((t.ids, t.truncated))
                }
                EmbedInput::Tokens(ids) => {
                    if ids.is_empty() {
                        return Err(EmbedError::EmptyInput { index });
                    }
                    if ids.len() > max {
                        return Err(EmbedError::TooManyTokens {
                            index,
                            tokens: ids.len(),
                            max,
                        });
                    }
                    if let Some(&token) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(EmbedError::TokenOutOfRange {
                            index,
                            token,
                            vocab,
                        });
                    }
                    Ok((ids.to_vec(), false))
                }
            })
            .collect()
    }

    /// One forward pass and the pooled vectors of its sequences.
    fn forward(&self, batch: &Packed) -> Result<Vec<Vec<f32>>> {
        let hidden = self.model.forward(batch)?;
        let width = hidden.dim(1)?;
        let rows = hidden.flatten_all()?.to_vec1::<f32>()?;
        Ok(batch
            .spans
            .iter()
            .map(|&(start, len)| {
                let mut v = mean_rows(&rows[start * width..(start + len) * width], width);
                if self.config.normalize {
                    normalize(&mut v);
                }
                v
            })
            .collect())
    }
}

/// The mean of the rows of `rows` (row-major, `width` wide), summed in row order.
fn mean_rows(rows: &[f32], width: usize) -> Vec<f32> {
    let mut sum = vec![0f32; width];
    let n = rows.len() / width;
    for row in rows.chunks_exact(width) {
        for (s, x) in sum.iter_mut().zip(row) {
            *s += x;
        }
    }
    // sentence-transformers divides by the token count clamped to at least 1e-9.
    let count = (n as f32).max(1e-9);
    sum.iter_mut().for_each(|s| *s /= count);
    sum
}

/// Scales `v` to unit length as `torch.nn.functional.normalize` does (norm clamped to 1e-12).
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}
