//! The single-sequence reference decoder for every supported architecture.
//!
//! One transformer, switched by `ModelConfig`: token embedding → N × (RMSNorm, attention with
//! RoPE and a KV cache, [post-norm], residual, RMSNorm, gated MLP, [post-norm], residual) → final
//! norm → output head on the last position only. The KV cache lives outside the weights in
//! `KvCache`, so one loaded `Model` can serve many sequences one after another.
//!
//! Correctness notes (each one a bug of candle 0.11.1's `quantized_*` models that we avoid):
//! the attention mask is built from absolute positions, so a prompt can be fed in chunks at any
//! offset; RoPE tables are sized by the served context, not 131 072 positions; sliding-window
//! layers apply their window during decode too; Gemma's MLP uses GELU-tanh.

pub mod config;
mod cpu;
mod paged;
mod paged_attn;
mod qmm;
mod vmath;
pub(crate) use vmath::{exp as exp_scalar, exp_scaled, max as max_f32, sum_exp};
mod weights;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{D, DType, Device, Module, Tensor};

pub use config::{Activation, Architecture, ModelConfig};
pub use cpu::{KernelChoice, cpu_matmul_kernel, select_kernel};
pub use paged::{BatchSeq, KvDtype, PagedKv};
pub use weights::WeightBytes;
use weights::{Linear, WeightLoader};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Cap on the served context length (default: 8192 or the model's, whichever is smaller).
    pub max_context: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_context: Some(8192),
        }
    }
}

struct Attention {
    /// Either separate Q, K, V projections or one fused QKV projection (Phi-3).
    qkv: Projection,
    bias: Option<(Tensor, Tensor, Tensor)>,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

enum Projection {
    Separate(Linear, Linear, Linear),
    Fused(Linear),
}

enum Mlp {
    Separate {
        gate: Linear,
        up: Linear,
    },
    /// Phi-3: one `ffn_up` whose first half is the gate.
    FusedGateUp(Linear),
}

struct Layer {
    attn_norm: Tensor,
    attn: Attention,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    mlp: Mlp,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    rope: usize,
    window: Option<usize>,
    /// The vectors above as plain values, for the batched step.
    host: LayerVectors,
}

/// A layer's norm weights and biases as host values: the batched step (`forward_paged`) works
/// on plain buffers, without a tensor per operation.
struct LayerVectors {
    attn_norm: Vec<f32>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    post_ffn_norm: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    bias: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl LayerVectors {
    fn of(
        attn_norm: &Tensor,
        post_attn_norm: Option<&Tensor>,
        ffn_norm: &Tensor,
        post_ffn_norm: Option<&Tensor>,
        attn: &Attention,
    ) -> Result<Self> {
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        let opt = |t: Option<&Tensor>| t.map(v).transpose();
        Ok(Self {
            attn_norm: v(attn_norm)?,
            post_attn_norm: opt(post_attn_norm)?,
            ffn_norm: v(ffn_norm)?,
            post_ffn_norm: opt(post_ffn_norm)?,
            q_norm: opt(attn.q_norm.as_ref())?,
            k_norm: opt(attn.k_norm.as_ref())?,
            bias: match &attn.bias {
                Some((q, k, vv)) => Some((v(q)?, v(k)?, v(vv)?)),
                None => None,
            },
        })
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// A loaded model's weights. Stateless between calls: the KV cache is passed in.
pub struct Model {
    cfg: ModelConfig,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `norm` as plain values, for the batched step.
    norm_host: Vec<f32>,
    output: Linear,
    ropes: Vec<Rope>,
    device: Device,
    vocab_size: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

/// Per-sequence KV cache of the reference model: per layer `[n_kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }
}

impl Model {
    /// Loads a model from an open GGUF file. `on_tensor(done, total)` reports progress.
    pub fn load(
        gguf: &mut GgufFile,
        opts: &LoadOptions,
        device: &Device,
        on_tensor: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = ModelConfig::from_gguf(gguf, opts.max_context)?;
        let mut w = WeightLoader {
            gguf,
            device,
            loaded: 0,
            on_tensor,
        };
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let embed = Arc::new(w.qtensor("token_embd.weight")?);
        let (vocab_size, embed_dim) = embed.shape().dims2()?;
        weights::check_shape("token_embd.weight", &[embed_dim], &[h])?;
        let output = if w.has("output.weight") {
            w.matmul("output.weight", vocab_size, h)?
        } else {
            // Tied embeddings: the output head shares the embedding's quantized matrix.
            Linear::new(embed.clone())?
        };
        let norm = w.vector("output_norm.weight", h)?;
        let mut ropes: Vec<(f32, Rope)> = Vec::new();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let qkv = if w.has(&p("attn_qkv.weight")) {
                Projection::Fused(w.matmul(&p("attn_qkv.weight"), (nh + 2 * nkv) * hd, h)?)
            } else {
                Projection::Separate(
                    w.matmul(&p("attn_q.weight"), nh * hd, h)?,
                    w.matmul(&p("attn_k.weight"), nkv * hd, h)?,
                    w.matmul(&p("attn_v.weight"), nkv * hd, h)?,
                )
            };
            let bias = match (
                w.opt_vector(&p("attn_q.bias"), nh * hd)?,
                w.opt_vector(&p("attn_k.bias"), nkv * hd)?,
                w.opt_vector(&p("attn_v.bias"), nkv * hd)?,
            ) {
                (Some(q), Some(k), Some(v)) => Some((q, k, v)),
                _ => None,
            };
            let attn = Attention {
                qkv,
                bias,
                o: w.matmul(&p("attn_output.weight"), h, nh * hd)?,
                q_norm: w.opt_vector(&p("attn_q_norm.weight"), hd)?,
                k_norm: w.opt_vector(&p("attn_k_norm.weight"), hd)?,
            };
            let ffn_down = w.qtensor(&p("ffn_down.weight"))?;
            let ffn_dim = ffn_down.shape().dims2()?.1;
            weights::check_shape(
                &p("ffn_down.weight"),
                ffn_down.shape().dims(),
                &[h, ffn_dim],
            )?;
            let mlp = if w.has(&p("ffn_gate.weight")) {
                Mlp::Separate {
                    gate: w.matmul(&p("ffn_gate.weight"), ffn_dim, h)?,
                    up: w.matmul(&p("ffn_up.weight"), ffn_dim, h)?,
                }
            } else {
                Mlp::FusedGateUp(w.matmul(&p("ffn_up.weight"), 2 * ffn_dim, h)?)
            };
            let base = cfg.layer_rope_base(i);
            let rope = match ropes.iter().position(|(b, _)| *b == base) {
                Some(idx) => idx,
                None => {
                    let freqs = if w.has("rope_freqs.weight") {
                        Some(w.vector("rope_freqs.weight", hd / 2)?)
                    } else {
                        None
                    };
                    ropes.push((base, Rope::new(&cfg, base, freqs.as_ref(), device)?));
                    ropes.len() - 1
                }
            };
            let attn_norm = w.vector(&p("attn_norm.weight"), h)?;
            let post_attn_norm = w.opt_vector(&p("post_attention_norm.weight"), h)?;
            let ffn_norm = w.vector(&p("ffn_norm.weight"), h)?;
            let post_ffn_norm = w.opt_vector(&p("post_ffw_norm.weight"), h)?;
            let host = LayerVectors::of(
                &attn_norm,
                post_attn_norm.as_ref(),
                &ffn_norm,
                post_ffn_norm.as_ref(),
                &attn,
            )?;
            layers.push(Layer {
                attn_norm,
                attn,
                post_attn_norm,
                ffn_norm,
                mlp,
                down: Linear::new(Arc::new(ffn_down))?,
                post_ffn_norm,
                rope,
                window: cfg.layer_window(i),
                host,
            });
        }
        Ok(Self {
            cfg,
            embed,
            layers,
            norm_host: norm.to_dtype(DType::F32)?.to_vec1()?,
            norm,
            output,
            ropes: ropes.into_iter().map(|(_, r)| r).collect(),
            device: device.clone(),
            vocab_size,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The matrix weights one decode step reads (every layer's projections and the output
    /// head; the norms and the one embedding row are left out, under 0.1% here).
    pub fn decode_weight_bytes(&self) -> WeightBytes {
        let mut total = self.output.weight_bytes();
        for l in &self.layers {
            total = total
                + match &l.attn.qkv {
                    Projection::Separate(q, k, v) => {
                        q.weight_bytes() + k.weight_bytes() + v.weight_bytes()
                    }
                    Projection::Fused(qkv) => qkv.weight_bytes(),
                }
                + l.attn.o.weight_bytes()
                + match &l.mlp {
                    Mlp::Separate { gate, up } => gate.weight_bytes() + up.weight_bytes(),
                    Mlp::FusedGateUp(gu) => gu.weight_bytes(),
                }
                + l.down.weight_bytes();
        }
        total
    }

    /// Number of rows of the output head.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one
    /// (`[vocab]`, f32). Appends their keys and values to `cache`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let logits = self.forward_rows(tokens, cache, true)?;
        Ok(logits.squeeze(0)?)
    }

    /// Like `forward`, but returns the logits of every position (`[tokens, vocab]`), as a
    /// verifier needs when it checks a whole output in one pass.
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.forward_rows(tokens, cache, false)
    }

    fn forward_rows(&self, tokens: &[u32], cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(EngineError::InvalidRequest("no tokens to run".into()));
        }
        let start = cache.len;
        if start + t > self.cfg.context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: start + t,
                context: self.cfg.context,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        if self.cfg.scale_embeddings {
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = self.layer_forward(layer, &x, &mut |l, h| self.attention(l, h, start, kv))?;
        }
        cache.len += t;
        let x = if last_only { x.narrow(0, t - 1, 1)? } else { x };
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm, self.cfg.rms_eps as f32)?;
        Ok(self.output.forward(&x)?)
    }

    /// One transformer block; `attn` computes attention for the normed input.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        attn: &mut dyn FnMut(&Layer, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let mut a = attn(layer, &h)?;
        if let Some(n) = &layer.post_attn_norm {
            a = candle_nn::ops::rms_norm(&a, n, eps)?;
        }
        let x = (x + a)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let (gate, up) = match &layer.mlp {
            Mlp::Separate { gate, up } => {
                let [g, u] = <[Tensor; 2]>::try_from(Linear::forward_many(&[gate, up], &h)?)
                    .map_err(|_| candle_core::Error::Msg("gate and up: two products".into()))?;
                (g, u)
            }
            Mlp::FusedGateUp(w) => {
                let gu = w.forward(&h)?;
                let half = gu.dim(D::Minus1)? / 2;
                (
                    gu.narrow(D::Minus1, 0, half)?,
                    gu.narrow(D::Minus1, half, half)?,
                )
            }
        };
        let kind = match self.cfg.arch.activation() {
            Activation::Silu => vmath::Gate::Silu,
            Activation::GeluTanh => vmath::Gate::GeluTanh,
        };
        let mut m = layer
            .down
            .forward(&vmath::gated_activation(kind, &gate, &up)?)?;
        if let Some(n) = &layer.post_ffn_norm {
            m = candle_nn::ops::rms_norm(&m, n, eps)?;
        }
        Ok((x + m)?)
    }

    /// Q, K, V of `x` (`[T, hidden]`) with biases, Q/K norms and RoPE applied by the per-token
    /// `cos`/`sin` rows (`[T, D/2]`): q `[1, H, T, D]`, k and v `[1, Hkv, T, D]`.
    fn project_qkv(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (mut q, mut k, mut v) = match &layer.attn.qkv {
            Projection::Separate(wq, wk, wv) => {
                let [q, k, v] = <[Tensor; 3]>::try_from(Linear::forward_many(&[wq, wk, wv], x)?)
                    .map_err(|_| candle_core::Error::Msg("Q, K, V: three products".into()))?;
                (q, k, v)
            }
            Projection::Fused(w) => {
                let qkv = w.forward(x)?;
                (
                    qkv.narrow(1, 0, nh * hd)?,
                    qkv.narrow(1, nh * hd, nkv * hd)?,
                    qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        if let Some((bq, bk, bv)) = &layer.attn.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        // [T, H*D] -> [1, H, T, D]
        let to_heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let mut q = to_heads(q, nh)?;
        let mut k = to_heads(k, nkv)?;
        let v = to_heads(v, nkv)?;
        if let Some(n) = &layer.attn.q_norm {
            q = candle_nn::ops::rms_norm(&q, n, cfg.rms_eps as f32)?;
        }
        if let Some(n) = &layer.attn.k_norm {
            k = candle_nn::ops::rms_norm(&k, n, cfg.rms_eps as f32)?;
        }
        let interleaved = !cfg.arch.rope_neox();
        let q = vmath::rope(&q, cos, sin, interleaved)?;
        let k = vmath::rope(&k, cos, sin, interleaved)?;
        Ok((q, k, v))
    }

    /// Attention of `t` queries (`q`: `[1, H, t, D]`, positions `start..start+t`) over the
    /// keys and values `[Hkv, Lk, D]` at positions `key_start..key_start+Lk`; returns `[t, H*D]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        key_start: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let t = q.dim(2)?;
        let lk = k.dim(1)?;
        // Group the query heads that share a KV head: [1, H, T, D] -> [Hkv, G*T, D].
        let g = nh / nkv;
        let q = (q.reshape((nkv, g * t, hd))? * (1.0 / (cfg.attn_scale_dim as f64).sqrt()))?;
        let scores = q.matmul(&k.t()?)?; // [Hkv, G*T, Lk]
        let scores = match attention_mask(t, start, key_start, lk, window) {
            None => scores,
            Some(mask) => {
                let mask = Tensor::from_vec(mask, (1, t, lk), &self.device)?;
                scores
                    .reshape((nkv, g, t, lk))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, g * t, lk))?
            }
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?; // [Hkv, G*T, D]
        Ok(out
            .reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))?)
    }

    /// Single-sequence attention: appends this chunk's K/V to the cache and attends.
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        start: usize,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let rope = &self.ropes[layer.rope];
        let cos = rope.cos.narrow(0, start, t)?;
        let sin = rope.sin.narrow(0, start, t)?;
        let (q, k, v) = self.project_qkv(layer, x, &cos, &sin)?;
        let (k_all, v_all) = match kv.take() {
            None => (k, v),
            Some((kc, vc)) => (Tensor::cat(&[&kc, &k], 2)?, Tensor::cat(&[&vc, &v], 2)?),
        };
        *kv = Some((k_all.clone(), v_all.clone()));
        let total = start + t;
        // Keys a query can see: [key_start, its own position], further limited by the window.
        let key_start = layer.window.map_or(0, |w| (start + 1).saturating_sub(w));
        let k_vis = k_all.narrow(2, key_start, total - key_start)?.squeeze(0)?;
        let v_vis = v_all.narrow(2, key_start, total - key_start)?.squeeze(0)?;
        let out = self.attend(&q, &k_vis, &v_vis, start, key_start, layer.window)?;
        Ok(layer.attn.o.forward(&out)?)
    }
}

/// Additive mask `[T, Lk]` (0 or -inf) for queries at positions `start..start+T` over keys at
/// positions `key_start..key_start+Lk`, or `None` when every query sees every key.
fn attention_mask(
    t: usize,
    start: usize,
    key_start: usize,
    lk: usize,
    window: Option<usize>,
) -> Option<Vec<f32>> {
    let visible = |qp: usize, kp: usize| kp <= qp && window.is_none_or(|w| qp - kp < w);
    let all_visible = (0..t).all(|i| {
        let qp = start + i;
        visible(qp, key_start) && visible(qp, key_start + lk - 1)
    });
    if all_visible {
        return None;
    }
    let mut mask = Vec::with_capacity(t * lk);
    for i in 0..t {
        let qp = start + i;
        for j in 0..lk {
            mask.push(if visible(qp, key_start + j) {
                0.0
            } else {
                f32::NEG_INFINITY
            });
        }
    }
    Some(mask)
}

impl Rope {
    fn new(cfg: &ModelConfig, base: f32, factors: Option<&Tensor>, dev: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        if let Some(f) = factors {
            for (x, f) in inv.iter_mut().zip(f.to_vec1::<f32>()?) {
                *x /= f;
            }
        }
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, cfg.context as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: angles.cos()?.contiguous()?,
            sin: angles.sin()?.contiguous()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::attention_mask;

    #[test]
    fn causal_mask_only_when_needed() {
        // A single decode token sees every cached key.
        assert!(attention_mask(1, 5, 0, 6, None).is_none());
        // A 2-token chunk at position 3 hides the second token from the first.
        let m = attention_mask(2, 3, 0, 5, None).unwrap();
        assert_eq!(m[3], 0.0);
        assert!(m[4].is_infinite());
        assert_eq!(m[5 + 4], 0.0);
    }

    #[test]
    fn window_hides_old_keys() {
        // window 2, query at position 4 sees positions 3 and 4 only.
        let m = attention_mask(1, 4, 2, 3, Some(2)).unwrap();
        assert!(m[0].is_infinite());
        assert_eq!(&m[1..], &[0.0, 0.0]);
    }
}
