//! The BERT encoder (Devlin et al. 2018) as Hugging Face's `BertModel` computes it, on sequences
//! packed one after another instead of padded to a common length.
//!
//! Every layer but attention works row by row, so the batch runs as one `[tokens, hidden]`
//! matrix and no padding rows are computed. The projections run on [`crate::matmul`]'s kernels,
//! which sum in one fixed order, so a token's row is the same bits whatever else is in the
//! batch; candle does the rest (embedding lookups, layer norms, GELU) row by row. Attention runs
//! per sequence on its own rows, so no mask is needed and a sequence's scores never see
//! another's keys. Weight names follow the checkpoint (`embeddings.*`, `encoder.layer.N.*`,
//! with or without a `bert.` prefix).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::config::BertConfig;
use crate::matmul::{Epilogue, Level, PackedLinear};

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
}

/// `y = x W^T + b` on packed weights (see [`crate::matmul`]).
#[derive(Debug)]
struct Dense {
    lin: PackedLinear,
    level: Level,
}

impl Dense {
    fn new(weight: &Tensor, bias: &Tensor, level: Level) -> Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        let w = weight.flatten_all()?.to_vec1::<f32>()?;
        let b = bias.to_vec1::<f32>()?;
        Ok(Self {
            lin: PackedLinear::new(&w, &b, outputs, inputs),
            level,
        })
    }

    fn load(vb: &VarBuilder, name: &str, out: usize, inp: usize, level: Level) -> Result<Self> {
        let vb = vb.pp(name);
        Self::new(&vb.get((out, inp), "weight")?, &vb.get(out, "bias")?, level)
    }

    /// `x W^T + b`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, false)
    }

    /// `gelu(x W^T + b)`.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, true)
    }

    /// `x W^T + b + residual`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(x, Some(residual), false)
    }

    fn run(&self, x: &Tensor, residual: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
        let (rows, cols) = x.dims2()?;
        if cols != self.lin.inputs() {
            candle_core::bail!("projection: {cols} inputs, expected {}", self.lin.inputs());
        }
        let out = with_f32(x, |x| match residual {
            Some(r) => {
                if r.dims2()? != (rows, self.lin.outputs()) {
                    candle_core::bail!("projection: residual of shape {:?}", r.dims());
                }
                with_f32(r, |r| {
                    Ok(self.lin.forward(x, Epilogue::Residual(r), self.level))
                })
            }
            None => {
                let ep = if gelu { Epilogue::Gelu } else { Epilogue::None };
                Ok(self.lin.forward(x, ep, self.level))
            }
        })?;
        Tensor::from_vec(out, (rows, self.lin.outputs()), &Device::Cpu)
    }
}

/// Calls `f` with the values of the CPU f32 tensor `t`, read in place when contiguous.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("projection: the input is not on the CPU");
    };
    let start = layout.start_offset();
    let data = cpu
        .as_slice::<f32>()?
        .get(start..start + t.elem_count())
        .ok_or_else(|| candle_core::Error::Msg("projection: layout outside the storage".into()))?;
    f(data)
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
    fn new(cfg: &BertConfig, vb: VarBuilder, level: Level) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attn = vb.pp("attention");
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for name in ["query", "key", "value"] {
            let vb = attn.pp("self").pp(name);
            weights.push(vb.get((h, h), "weight")?);
            biases.push(vb.get(h, "bias")?);
        }
        Ok(Self {
            qkv: Dense::new(&Tensor::cat(&weights, 0)?, &Tensor::cat(&biases, 0)?, level)?,
            attn_out: Dense::load(&attn.pp("output"), "dense", h, h, level)?,
            attn_norm: candle_nn::layer_norm(h, eps, attn.pp("output").pp("LayerNorm"))?,
            up: Dense::load(&vb.pp("intermediate"), "dense", i, h, level)?,
            down: Dense::load(&vb.pp("output"), "dense", h, i, level)?,
            out_norm: candle_nn::layer_norm(h, eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, spans: &[(usize, usize)], heads: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let ctx = attention(&qkv, spans, heads)?;
        let x = self
            .attn_norm
            .forward(&self.attn_out.forward_residual(&ctx, x)?)?;
        let y = self.down.forward_residual(&self.up.forward_gelu(&x)?, &x)?;
        self.out_norm.forward(&y)
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
        let level = Level::detect();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}")), level))
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
