//! The BERT encoder (Devlin et al. 2018) as Hugging Face's `BertModel` computes it, on sequences
//! packed one after another instead of padded to a common length.
//!
//! Every layer but attention works row by row, so the batch runs as one `[tokens, hidden]`
//! matrix: no padding rows are computed, and a token's row goes through the same matrix
//! products whatever else is in the batch. Attention runs per sequence on its own rows, so no
//! mask is needed and a sequence's scores never see another's keys. Weight names follow the
//! checkpoint (`embeddings.*`, `encoder.layer.N.*`, with or without a `bert.` prefix).
//!
//! Row independence of the projections rests on gemm's ordinary tiled kernel, whose sum over
//! `k` for an output does not depend on the row count. Two other gemm paths sum differently:
//! the dot-product kernel it takes for tiny products (`m * n <= 256`) when the right-hand
//! side's rows are contiguous, and matrix-vector code for a single row. So weights are stored
//! transposed (`[in, out]`, row-major), which rules out the first, and [`Packed`] always has
//! at least two rows (`Packed::ensure_rows`), which rules out the second.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::config::BertConfig;

/// Token ids of several sequences laid end to end, with each token's position in its own
/// sequence and each sequence's `(first row, length)`.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub spans: Vec<(usize, usize)>,
}

impl Packed {
    /// Adds one sequence.
    pub fn push(&mut self, ids: &[u32]) {
        self.spans.push((self.ids.len(), ids.len()));
        self.ids.extend_from_slice(ids);
        // Positions are below max_position_embeddings (checked by the caller), so they fit.
        self.positions.extend((0..ids.len()).map(|p| p as u32));
    }

    /// A batch of a single token gets a second, throw-away sequence (a copy of it), so that no
    /// projection runs as a matrix-vector product. Returns the number of real sequences.
    pub fn ensure_rows(&mut self) -> usize {
        let real = self.spans.len();
        if self.ids.len() == 1 {
            let id = self.ids[0];
            self.push(&[id]);
        }
        real
    }
}

/// `y = x W^T + b` with `W^T` stored row-major (`[in, out]`), see the module docs.
#[derive(Debug)]
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(weight: &Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    fn load(vb: &VarBuilder, name: &str, out: usize, inp: usize) -> Result<Self> {
        let vb = vb.pp(name);
        Self::new(&vb.get((out, inp), "weight")?, vb.get(out, "bias")?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

#[derive(Debug)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    /// Row 0 of the token-type table: every token is of segment A.
    token_type: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: vb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position: vb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: vb
                .get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?
                .get(0)?,
            norm: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, batch: &Packed) -> Result<Tensor> {
        let dev = self.word.device();
        let n = batch.ids.len();
        let ids = Tensor::from_slice(&batch.ids, n, dev)?;
        let positions = Tensor::from_slice(&batch.positions, n, dev)?;
        // The order of BertEmbeddings: words + token types, then + positions.
        let x = self
            .word
            .index_select(&ids, 0)?
            .broadcast_add(&self.token_type)?;
        let x = (x + self.position.index_select(&positions, 0)?)?;
        self.norm.forward(&x)
    }
}

#[derive(Debug)]
struct Layer {
    /// Query, key and value projections as one `[3 * hidden, hidden]` matrix.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    up: Dense,
    down: Dense,
    out_norm: LayerNorm,
}

impl Layer {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attn = vb.pp("attention");
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for name in ["query", "key", "value"] {
            let vb = attn.pp("self").pp(name);
            weights.push(vb.get((h, h), "weight")?);
            biases.push(vb.get(h, "bias")?);
        }
        Ok(Self {
            qkv: Dense::new(&Tensor::cat(&weights, 0)?, Tensor::cat(&biases, 0)?)?,
            attn_out: Dense::load(&attn.pp("output"), "dense", h, h)?,
            attn_norm: candle_nn::layer_norm(h, eps, attn.pp("output").pp("LayerNorm"))?,
            up: Dense::load(&vb.pp("intermediate"), "dense", i, h)?,
            down: Dense::load(&vb.pp("output"), "dense", h, i)?,
            out_norm: candle_nn::layer_norm(h, eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, spans: &[(usize, usize)], heads: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let ctx = attention(&qkv, spans, heads)?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let y = self.down.forward(&self.up.forward(&x)?.gelu_erf()?)?;
        self.out_norm.forward(&(y + x)?)
    }
}

/// Scaled dot-product attention of each sequence over its own rows of `qkv`
/// (`[tokens, 3 * hidden]`, query | key | value); returns `[tokens, hidden]`.
fn attention(qkv: &Tensor, spans: &[(usize, usize)], heads: usize) -> Result<Tensor> {
    let hidden = qkv.dim(1)? / 3;
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut outs = Vec::with_capacity(spans.len());
    for &(start, len) in spans {
        // [len, 3, heads, head_dim] -> [3, heads, len, head_dim]
        let s = qkv
            .narrow(0, start, len)?
            .reshape((len, 3, heads, head_dim))?
            .permute((1, 2, 0, 3))?
            .contiguous()?;
        let (q, k, v) = (s.get(0)?, s.get(1)?, s.get(2)?);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?; // [heads, len, head_dim]
        outs.push(ctx.transpose(0, 1)?.reshape((len, hidden))?);
    }
    Tensor::cat(&outs, 0)
}

/// The encoder: embeddings and the transformer layers, no pooler (sentence-transformers
/// pools the last hidden states itself).
#[derive(Debug)]
pub(crate) struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    heads: usize,
}

impl Bert {
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            heads: cfg.num_attention_heads,
        })
    }

    /// The last hidden states of every packed token, `[tokens, hidden]`, f32.
    pub fn forward(&self, batch: &Packed) -> Result<Tensor> {
        let mut x = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            x = layer.forward(&x, &batch.spans, self.heads)?;
        }
        x.to_dtype(DType::F32)
    }
}
