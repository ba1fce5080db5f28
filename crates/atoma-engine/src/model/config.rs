//! Model hyper-parameters read from GGUF metadata, and the per-architecture differences.
//!
//! The supported architectures are one decoder-only transformer with a few switches: how RoPE
//! pairs dimensions, whether Q/K get their own RMSNorm, extra post-norms, the MLP activation,
//! sliding-window layers and embedding scaling. `Architecture` holds those switches so the model
//! code has no per-architecture branches beyond reading them.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// GGUF architectures this engine runs (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral, TinyLlama, SmolLM (GGUF arch `llama`, also `mistral`).
    Llama,
    /// Qwen 2 / 2.5: Llama plus Q/K/V biases and NeoX RoPE.
    Qwen2,
    /// Gemma 3 (text): GELU, Q/K norms, post-norms, scaled embeddings, sliding-window layers.
    Gemma3,
    /// Phi-3: fused QKV and gate/up projections, NeoX RoPE.
    Phi3,
}

impl Architecture {
    /// Parses `general.architecture`.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "gemma3" => Ok(Self::Gemma3),
            "phi3" => Ok(Self::Phi3),
            other => Err(EngineError::UnsupportedArchitecture {
                arch: other.to_string(),
            }),
        }
    }

    /// Name as written in GGUF files (the metadata key prefix).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }

    /// Whether RoPE rotates the two halves of each head (NeoX) rather than adjacent pairs.
    /// llama.cpp's converter permutes Llama's Q/K weights so that adjacent pairs are rotated.
    pub fn rope_neox(self) -> bool {
        !matches!(self, Self::Llama)
    }

    /// The MLP activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }
}

/// MLP gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Hyper-parameters of a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Context length the model was trained for (`{arch}.context_length`).
    pub trained_context: usize,
    /// Context length this engine serves (positions beyond it are refused).
    pub context: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers, when it differs (Gemma 3: 10 000).
    pub rope_local_base: Option<f32>,
    /// Sliding-window size in tokens (a query sees keys at distance < window).
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer is global; the others use the sliding window. `None`: all layers use
    /// the window when there is one.
    pub global_layer_every: Option<usize>,
    /// Multiply embeddings by √hidden (Gemma).
    pub scale_embeddings: bool,
    /// Attention logit scale denominator: scores are multiplied by 1/√(this).
    pub attn_scale_dim: usize,
}

impl ModelConfig {
    /// Reads the hyper-parameters from GGUF metadata. `max_context` caps the served context
    /// (RoPE tables and KV caches are sized by it).
    pub fn from_gguf(gguf: &GgufFile, max_context: Option<usize>) -> Result<Self> {
        let arch = Architecture::from_gguf_name(gguf.string("general.architecture")?)?;
        let p = |k: &str| format!("{}.{k}", arch.gguf_name());
        let hidden_size = gguf.usize(&p("embedding_length"))?;
        let n_layers = gguf.usize(&p("block_count"))?;
        let n_heads = gguf.usize(&p("attention.head_count"))?;
        let n_kv_heads = gguf
            .opt_usize(&p("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::InvalidMetadata {
                key: p("attention.head_count_kv"),
                reason: format!("{n_heads} heads cannot be grouped over {n_kv_heads} KV heads"),
            });
        }
        let head_dim = match gguf.opt_usize(&p("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / n_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(EngineError::InvalidMetadata {
                key: p("attention.key_length"),
                reason: format!("head dimension {head_dim} must be even and non-zero"),
            });
        }
        if let Some(rope_dims) = gguf.opt_usize(&p("rope.dimension_count"))?
            && rope_dims != head_dim
        {
            return Err(EngineError::InvalidMetadata {
                key: p("rope.dimension_count"),
                reason: format!("partial RoPE ({rope_dims} of {head_dim} dims) is not supported"),
            });
        }
        let trained_context = gguf.opt_usize(&p("context_length"))?.unwrap_or(4096);
        let context = max_context.map_or(trained_context, |m| m.min(trained_context));
        let rms_eps = f64::from(
            gguf.opt_f32(&p("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
        );
        let default_base = if arch == Architecture::Gemma3 {
            1_000_000.0
        } else {
            10_000.0
        };
        let rope_base = gguf.opt_f32(&p("rope.freq_base"))?.unwrap_or(default_base);
        let sliding_window = gguf
            .opt_usize(&p("attention.sliding_window"))?
            .filter(|&w| w > 0);
        let (rope_local_base, global_layer_every, sliding_window) = match arch {
            Architecture::Gemma3 => (
                Some(
                    gguf.opt_f32(&p("rope.local_freq_base"))?
                        .unwrap_or(10_000.0),
                ),
                Some(
                    gguf.opt_usize(&p("attention.sliding_window_type"))?
                        .unwrap_or(6),
                ),
                sliding_window,
            ),
            Architecture::Phi3 => (None, None, sliding_window),
            // llama.cpp ignores `sliding_window` for these architectures; so do we.
            Architecture::Llama | Architecture::Qwen2 => (None, None, None),
        };
        Ok(Self {
            arch,
            hidden_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            trained_context,
            context,
            rms_eps,
            rope_base,
            rope_local_base,
            sliding_window,
            global_layer_every,
            scale_embeddings: arch == Architecture::Gemma3,
            attn_scale_dim: head_dim,
        })
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn layer_is_sliding(&self, i: usize) -> bool {
        match (self.sliding_window, self.global_layer_every) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(every)) => every == 0 || !(i + 1).is_multiple_of(every),
        }
    }

    /// The window of layer `i`, if it is a sliding-window layer.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.layer_is_sliding(i)
            .then_some(self.sliding_window)
            .flatten()
    }

    /// RoPE base of layer `i`.
    pub fn layer_rope_base(&self, i: usize) -> f32 {
        match self.rope_local_base {
            Some(local) if self.layer_is_sliding(i) => local,
            _ => self.rope_base,
        }
    }
}
