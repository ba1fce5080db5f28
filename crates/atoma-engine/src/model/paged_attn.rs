//! CPU paged attention: each query row reads its keys and values straight from the block pools
//! through its sequence's block table, with no gather copy.
//!
//! The arithmetic of one (query token, head) pair is a fixed sequence of operations over that
//! pair's own keys: dot products in 8 lanes folded in a fixed order, a max-subtracted softmax,
//! and the weighted sum of values in key order. Nothing depends on how many other rows, heads or
//! sequences are in the step, or on how a prompt was chunked, so a request's attention output is
//! bit-identical whatever batch it runs in. (A BLAS-style matmul does not promise this: its
//! blocking, and so its summation order, changes with the matrix shape.)
//!
//! Work is split across candle's compute threads by (token, head) pairs; each pair writes its
//! own output slice.

use super::OutPtr;

/// The geometry shared by all rows of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// `1/sqrt(d)` or the model's own scale.
    pub scale: f32,
    /// Keys older than `window` positions are invisible (sliding-window layers).
    pub window: Option<usize>,
}

/// One query row: its position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryRow<'a> {
    pub pos: usize,
    pub table: &'a [u32],
}

/// Per-thread buffers of one (token, head) pair.
#[derive(Default)]
struct Scratch {
    offsets: Vec<usize>,
    scores: Vec<f32>,
}

/// Dot product in 8 independent lanes, folded pairwise: the same order on every call.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x.mul_add(*y, acc[l]);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `out += w * v`.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o = w.mul_add(*x, *o);
    }
}

/// Attention for `rows.len()` query tokens.
///
/// - `q`: `[H, T, D]` (head-major, as the projection produces it), already scaled by nothing;
/// - `k_pool`, `v_pool`: one layer's pools, `[slots, Hkv * D]`;
/// - `out`: `[T, H * D]`.
///
/// Each row attends to positions `max(0, pos + 1 - window) ..= pos` of its own sequence.
pub(crate) fn paged_attention(
    shape: &AttnShape,
    q: &[f32],
    rows: &[QueryRow<'_>],
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        block_size,
        scale,
        window,
    } = *shape;
    let t = rows.len();
    let group = n_heads / n_kv_heads;
    let kv_row = n_kv_heads * d;
    debug_assert_eq!(q.len(), n_heads * t * d);
    debug_assert_eq!(out.len(), t * n_heads * d);
    let pair = |idx: usize, o: &mut [f32], scratch: &mut Scratch| {
        let (ti, h) = (idx / n_heads, idx % n_heads);
        let row = rows[ti];
        let g = h / group;
        let qh = &q[(h * t + ti) * d..(h * t + ti + 1) * d];
        let first = window.map_or(0, |w| (row.pos + 1).saturating_sub(w));
        // Offsets of this head's K/V rows, walked block by block (one division per block).
        let offsets = &mut scratch.offsets;
        offsets.clear();
        let mut p = first;
        while p <= row.pos {
            let bi = p / block_size;
            let base = row.table[bi] as usize * block_size;
            let end = ((bi + 1) * block_size).min(row.pos + 1);
            offsets.extend((p..end).map(|pp| (base + pp - bi * block_size) * kv_row + g * d));
            p = end;
        }
        let scores = &mut scratch.scores;
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for &s in offsets.iter() {
            let x = dot(qh, &k_pool[s..s + d]) * scale;
            max = max.max(x);
            scores.push(x);
        }
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (&s, &w) in offsets.iter().zip(scores.iter()) {
            axpy(o, w * inv, &v_pool[s..s + d]);
        }
    };
    let pairs = t * n_heads;
    // Below a few pairs of short rows, threads cost more than they save.
    let work: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * n_heads * d;
    if pairs == 1 || work < 1 << 15 {
        let mut scratch = Scratch::default();
        for (idx, o) in out.chunks_mut(d).enumerate() {
            pair(idx, o, &mut scratch);
        }
    } else {
        // candle's persistent pool (cheap to wake for the many small calls of a decode step).
        let base = OutPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(pairs, |range| {
            let mut scratch = Scratch::default();
            for idx in range {
                // SAFETY: pair `idx` owns out[idx*d..(idx+1)*d]; ranges are disjoint.
                let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(idx * d), d) };
                pair(idx, o, &mut scratch);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f32> = k
            .iter()
            .map(|kk| q.iter().zip(kk).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut o = vec![0.0; q.len()];
        for (w, vv) in e.iter().zip(v) {
            for (oo, x) in o.iter_mut().zip(vv) {
                *oo += w / z * x;
            }
        }
        o
    }

    #[test]
    fn matches_naive_attention_through_a_shuffled_table() {
        let (h, hkv, d, bs) = (4, 2, 12, 4);
        let table = [5u32, 2, 7, 0];
        let slots = 8 * bs;
        let val = |i: usize| ((i * 7919 % 113) as f32 / 113.0) - 0.5;
        let k_pool: Vec<f32> = (0..slots * hkv * d).map(val).collect();
        let v_pool: Vec<f32> = (0..slots * hkv * d).map(|i| val(i + 31)).collect();
        let positions = [3usize, 9, 13];
        let t = positions.len();
        let q: Vec<f32> = (0..h * t * d).map(|i| val(i + 5)).collect();
        for window in [None, Some(5)] {
            let shape = AttnShape {
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: d,
                block_size: bs,
                scale: 0.3,
                window,
            };
            let rows: Vec<QueryRow<'_>> = positions
                .iter()
                .map(|&pos| QueryRow { pos, table: &table })
                .collect();
            let mut out = vec![0.0; t * h * d];
            paged_attention(&shape, &q, &rows, &k_pool, &v_pool, &mut out);
            for (ti, &pos) in positions.iter().enumerate() {
                for hh in 0..h {
                    let g = hh / (h / hkv);
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let at = |pool: &[f32], p: usize| {
                        let s = table[p / bs] as usize * bs + p % bs;
                        pool[s * hkv * d + g * d..s * hkv * d + (g + 1) * d].to_vec()
                    };
                    let ks: Vec<Vec<f32>> = (first..=pos).map(|p| at(&k_pool, p)).collect();
                    let vs: Vec<Vec<f32>> = (first..=pos).map(|p| at(&v_pool, p)).collect();
                    let qh = &q[(hh * t + ti) * d..(hh * t + ti + 1) * d];
                    let want = naive(qh, &ks, &vs, 0.3);
                    let got = &out[(ti * h + hh) * d..(ti * h + hh + 1) * d];
                    for (a, b) in want.iter().zip(got) {
                        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                    }
                }
            }
        }
    }
}
