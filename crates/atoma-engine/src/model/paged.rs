//! The batched forward over a paged KV cache: several sequences at different positions in one
//! pass, each with its own block table.
//!
//! The batch is flattened to `[T, hidden]`; RoPE takes per-token positions (rows gathered from
//! the tables); each token's K/V row is written to its slot (`block * block_size + pos %
//! block_size`) of the per-layer pools; each sequence then attends over the rows its block table
//! points to. Only the rows that sample go through the output head.
//!
//! The step runs on plain host buffers, not a tensor per operation: at one or two rows the
//! tensor glue (allocations, shape checks, copies to make views contiguous) took longer than the
//! norms and RoPE themselves, serially, while the other compute thread waited for the next
//! product. The arithmetic is the reference model's to the operation (the products are the same
//! kernels; norms, RoPE and the gated activation the same expressions, in the same order), so a
//! differential test against `Model::forward` checks exactly the paging, and the logits are the
//! same bits as when this step was built from candle's operations
//! (`tests/real_models.rs::paged_logits_digest`).
//!
//! The pools live in host memory as `f16` rows by default (as llama.cpp's KV cache; half the
//! memory, and half the bytes every decode step streams from memory, which is what attention
//! at 16 concurrent sequences waits on) or `f32` (`KvDtype::F32`, exact against the reference
//! model). Attention (`paged_attn`) reads each sequence's keys and values in place through its
//! block table, in a fixed order per query row, so a sequence's output does not depend on the
//! rest of the batch; a row is rounded to f16 once, when it is written, so every reader sees
//! the same values.

use candle_core::Tensor;
use half::f16;

use super::config::Activation;
use super::cpu::{cpu_f32, for_rows};
use super::paged_attn::{AttnShape, KvElem, QueryRow, paged_attention};
use super::vmath::{Gate, gated_rows, rms_row, rms_row_in_place, rope_head};
use super::weights::Linear;
use super::{Mlp, Model, ModelConfig, Projection};
use crate::error::{EngineError, Result};

/// Element type of the KV pools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Half precision (the default): half the memory and memory traffic of `f32`.
    #[default]
    F16,
    /// Single precision: the reference model's own values.
    F32,
}

impl KvDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Per-layer pools of one element type: `k[layer]`, `v[layer]`.
#[derive(Debug, Clone)]
enum Pools {
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
}

/// Per-layer K and V pools: `[num_blocks * block_size, n_kv_heads * head_dim]` rows.
#[derive(Debug, Clone)]
pub struct PagedKv {
    block_size: usize,
    num_blocks: usize,
    row: usize,
    dtype: KvDtype,
    pools: Pools,
}

impl PagedKv {
    /// Pools of `num_blocks` blocks of `block_size` slots for every layer of `cfg`, in the
    /// default element type (f16).
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        Self::with_dtype(cfg, num_blocks, block_size, KvDtype::default())
    }

    /// Pools of `num_blocks` blocks of `block_size` slots, holding `dtype` values.
    pub fn with_dtype(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Self {
        let row = cfg.n_kv_heads * cfg.head_dim;
        let n = num_blocks * block_size * row;
        let layers = cfg.n_layers;
        let pools = match dtype {
            KvDtype::F16 => Pools::F16 {
                k: vec![vec![f16::ZERO; n]; layers],
                v: vec![vec![f16::ZERO; n]; layers],
            },
            KvDtype::F32 => Pools::F32 {
                k: vec![vec![0.0; n]; layers],
                v: vec![vec![0.0; n]; layers],
            },
        };
        Self {
            block_size,
            num_blocks,
            row,
            dtype,
            pools,
        }
    }

    /// Element type of the pools.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes of K and V, over all layers, for one token of `cfg` stored as `dtype`.
    pub fn token_bytes(cfg: &ModelConfig, dtype: KvDtype) -> usize {
        2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.size()
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of KV memory held.
    pub fn bytes(&self) -> usize {
        let layers = match &self.pools {
            Pools::F16 { k, .. } => k.len(),
            Pools::F32 { k, .. } => k.len(),
        };
        2 * layers * self.num_blocks * self.block_size * self.row * self.dtype.size()
    }

    /// Copies block `src`'s K and V slots, in every layer, into block `dst` (copy-on-write of
    /// a partly filled block shared by a forked sequence): bit-exact, so the fork computes
    /// exactly what its parent would.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize, dst as usize);
        if src >= self.num_blocks || dst >= self.num_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "block copy {src} → {dst} is outside the pool of {}",
                self.num_blocks
            )));
        }
        let len = self.block_size * self.row;
        let (from, to) = (src * len, dst * len);
        fn copy<T: Copy>(pools: &mut [Vec<T>], from: usize, to: usize, len: usize) {
            for p in pools {
                p.copy_within(from..from + len, to);
            }
        }
        match &mut self.pools {
            Pools::F16 { k, v } => {
                copy(k, from, to, len);
                copy(v, from, to, len);
            }
            Pools::F32 { k, v } => {
                copy(k, from, to, len);
                copy(v, from, to, len);
            }
        }
        Ok(())
    }

    fn slot(&self, table: &[u32], pos: usize) -> Result<usize> {
        let block = *table.get(pos / self.block_size).ok_or_else(|| {
            EngineError::InvalidRequest(format!("the block table does not cover position {pos}"))
        })? as usize;
        if block >= self.num_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "block {block} is outside the pool"
            )));
        }
        Ok(block * self.block_size + pos % self.block_size)
    }
}

/// One sequence's part of a batched step.
#[derive(Debug, Clone, Copy)]
pub struct BatchSeq<'a> {
    /// Tokens at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Blocks covering positions `0..start + tokens.len()`.
    pub block_table: &'a [u32],
    /// Return the logits of this many trailing tokens (1: the last, to sample the next token;
    /// more: a teacher-forced pass that checks logged tokens; 0: none).
    pub logits: usize,
}

impl Model {
    /// Runs one batched step; returns the logits `[Σ logits rows, vocab]` in batch order (each
    /// sequence's rows in position order). Every row is computed the same way whatever else is
    /// in the pass, so a row's logits are the same bits in a teacher-forced chunk as in a decode.
    pub fn forward_paged(&self, batch: &[BatchSeq<'_>], kv: &mut PagedKv) -> Result<Tensor> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for s in batch {
            if s.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a batch entry has no tokens".into(),
                ));
            }
            if s.logits > s.tokens.len() {
                return Err(EngineError::InvalidRequest(format!(
                    "{} logit rows asked of a batch entry of {} tokens",
                    s.logits,
                    s.tokens.len()
                )));
            }
            if s.start + s.tokens.len() > cfg.context {
                return Err(EngineError::PromptTooLong {
                    prompt_tokens: s.start + s.tokens.len(),
                    context: cfg.context,
                });
            }
            if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= kv.num_blocks) {
                return Err(EngineError::InvalidRequest(format!(
                    "block {b} is outside the pool"
                )));
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= self.vocab_size {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {t} is outside the vocabulary"
                    )));
                }
                ids.push(t);
                positions.push((s.start + i) as u32);
                slots.push(kv.slot(s.block_table, s.start + i)?);
            }
        }
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("empty batch".into()));
        }
        let t = ids.len();
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let eps = cfg.rms_eps as f32;
        // The embedding rows (and Gemma's scaling) through candle once per step, then every
        // layer on plain buffers: at one or two rows a tensor per operation (allocation, shape
        // checks, a copy to make it contiguous) cost more than the arithmetic, and it was
        // serial time while the other compute thread waited for the next product.
        let mut x = self
            .embed
            .embedding(&Tensor::new(ids.as_slice(), &self.device)?)?;
        if cfg.scale_embeddings {
            x = (x * (h as f64).sqrt())?;
        }
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        // The RoPE tables, read in place.
        let guards: Vec<_> = self
            .ropes
            .iter()
            .map(|r| (r.cos.storage_and_layout(), r.sin.storage_and_layout()))
            .collect();
        let tables: Vec<(&[f32], &[f32])> = guards
            .iter()
            .map(|((cs, cl), (ss, sl))| Ok((cpu_f32(cs, cl, "rope")?, cpu_f32(ss, sl, "rope")?)))
            .collect::<candle_core::Result<_>>()?;
        let rows: Vec<QueryRow<'_>> = batch
            .iter()
            .flat_map(|s| {
                (s.start..s.start + s.tokens.len()).map(|pos| QueryRow {
                    pos,
                    table: s.block_table,
                })
            })
            .collect();
        let interleaved = !cfg.arch.rope_neox();
        let half = hd / 2;
        let scale = 1.0 / (cfg.attn_scale_dim as f32).sqrt();
        let gate_kind = match cfg.arch.activation() {
            Activation::Silu => Gate::Silu,
            Activation::GeluTanh => Gate::GeluTanh,
        };
        let mut hn = vec![0f32; t * h];
        for (li, layer) in self.layers.iter().enumerate() {
            let v = &layer.host;
            for_rows(&mut hn, h, |r, o| {
                rms_row(&x[r * h..(r + 1) * h], &v.attn_norm, eps, o)
            });
            let (mut q, mut k, mut vv) = match &layer.attn.qkv {
                Projection::Separate(wq, wk, wv) => {
                    let [q, k, v] =
                        <[Vec<f32>; 3]>::try_from(Linear::apply_many(&[wq, wk, wv], &hn, t)?)
                            .map_err(|_| {
                                candle_core::Error::Msg("Q, K, V: three products".into())
                            })?;
                    (q, k, v)
                }
                Projection::Fused(w) => {
                    let qkv = w.apply(&hn, t)?;
                    let w = (nh + 2 * nkv) * hd;
                    let part = |from: usize, len: usize| -> Vec<f32> {
                        qkv.chunks_exact(w)
                            .flat_map(|r| &r[from..from + len])
                            .copied()
                            .collect()
                    };
                    (
                        part(0, nh * hd),
                        part(nh * hd, nkv * hd),
                        part((nh + nkv) * hd, nkv * hd),
                    )
                }
            };
            if let Some((bq, bk, bv)) = &v.bias {
                for (xs, b) in [(&mut q, bq), (&mut k, bk), (&mut vv, bv)] {
                    for row in xs.chunks_exact_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
            // Per token and head: the Q/K norm, then RoPE at the token's position.
            let (cos, sin) = tables[layer.rope];
            let finish = |xs: &mut Vec<f32>, heads: usize, norm: &Option<Vec<f32>>| {
                for_rows(xs, heads * hd, |r, row| {
                    let at = rows[r].pos * half;
                    let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                    for head in row.chunks_exact_mut(hd) {
                        if let Some(n) = norm {
                            rms_row_in_place(head, n, eps);
                        }
                        rope_head(head, c, s, interleaved);
                    }
                })
            };
            finish(&mut q, nh, &v.q_norm);
            finish(&mut k, nkv, &v.k_norm);
            let shape = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                block_size: kv.block_size,
                scale,
                window: layer.window,
            };
            let mut att = vec![0f32; t * nh * hd];
            let row = kv.row;
            match &mut kv.pools {
                Pools::F16 { k: kp, v: vp } => store_and_attend(
                    &mut kp[li],
                    &mut vp[li],
                    row,
                    &k,
                    &vv,
                    &slots,
                    &shape,
                    &q,
                    &rows,
                    &mut att,
                ),
                Pools::F32 { k: kp, v: vp } => store_and_attend(
                    &mut kp[li],
                    &mut vp[li],
                    row,
                    &k,
                    &vv,
                    &slots,
                    &shape,
                    &q,
                    &rows,
                    &mut att,
                ),
            }
            let mut a = layer.attn.o.apply(&att, t)?;
            // [post-norm], residual, then the MLP's norm.
            if let Some(n) = &v.post_attn_norm {
                for_rows(&mut a, h, |_, ar| rms_row_in_place(ar, n, eps));
            }
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            for_rows(&mut hn, h, |r, o| {
                rms_row(&x[r * h..(r + 1) * h], &v.ffn_norm, eps, o)
            });
            let act = match &layer.mlp {
                Mlp::Separate { gate, up } => {
                    let [g, u] =
                        <[Vec<f32>; 2]>::try_from(Linear::apply_many(&[gate, up], &hn, t)?)
                            .map_err(|_| {
                                candle_core::Error::Msg("gate and up: two products".into())
                            })?;
                    let n = g.len() / t;
                    gated_rows(gate_kind, &g, n, &u, n, t, n)
                }
                Mlp::FusedGateUp(w) => {
                    let gu = w.apply(&hn, t)?;
                    let n = gu.len() / t / 2;
                    gated_rows(gate_kind, &gu, 2 * n, &gu[n..], 2 * n, t, n)
                }
            };
            let mut m = layer.down.apply(&act, t)?;
            if let Some(n) = &v.post_ffn_norm {
                for_rows(&mut m, h, |_, mr| rms_row_in_place(mr, n, eps));
            }
            x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        }
        // The rows that sample, through the final norm and the output head.
        let mut out_rows = Vec::new();
        let mut end = 0;
        for s in batch {
            end += s.tokens.len();
            out_rows.extend(end - s.logits..end);
        }
        if out_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.vocab_size),
                candle_core::DType::F32,
                &self.device,
            )?);
        }
        let mut xn = vec![0f32; out_rows.len() * h];
        for_rows(&mut xn, h, |i, o| {
            let r = out_rows[i];
            rms_row(&x[r * h..(r + 1) * h], &self.norm_host, eps, o)
        });
        let logits = self.output.apply(&xn, out_rows.len())?;
        Ok(Tensor::from_vec(
            logits,
            (out_rows.len(), self.vocab_size),
            &self.device,
        )?)
    }
}

/// One layer's pools of either element type: this step's K/V rows (`[T, Hkv * D]`) into their
/// slots, then the attention of every query row.
#[allow(clippy::too_many_arguments)]
fn store_and_attend<T: KvElem>(
    k_pool: &mut [T],
    v_pool: &mut [T],
    row: usize,
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    shape: &AttnShape,
    q: &[f32],
    rows: &[QueryRow<'_>],
    out: &mut [f32],
) {
    write_rows(k_pool, k, slots, row);
    write_rows(v_pool, v, slots, row);
    paged_attention(shape, q, rows, k_pool, v_pool, out);
}

/// Writes the token rows of `src` (`row` values each) into `pool` at `slots`, rounded to the
/// pool's element type once.
fn write_rows<T: KvElem>(pool: &mut [T], src: &[f32], slots: &[usize], row: usize) {
    for (s, &slot) in src.chunks_exact(row).zip(slots) {
        for (d, &x) in pool[slot * row..(slot + 1) * row].iter_mut().zip(s) {
            *d = T::from_f32(x);
        }
    }
}
