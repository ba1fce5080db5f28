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
//! Work is split across candle's compute threads by (token, KV head) tasks, which load each key
//! and value once for all the query heads that share it (grouped-query attention), or by
//! (token, head) when there are too few tasks to keep the threads busy; each task writes its own
//! output slice, and the per-head arithmetic is the same either way.

use super::cpu::{Level, OutPtr, level, threads};
use super::vmath::exp;
#[cfg(target_arch = "x86_64")]
use super::vmath::exp8;

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

/// A stored key/value element: `f32`, or `f16` (half the memory and half the bytes each step
/// reads; the conversion to `f32` is exact, so every path sees the same values).
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Eight elements at `p` widened to f32.
    ///
    /// # Safety
    /// `p` is valid for 8 reads; the CPU has AVX2 (and F16C for `f16`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// Whether the vector paths can run: AVX2/FMA (the kernels' level) and F16C, which they are
/// compiled with for either element type.
fn vector_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        level() != Level::Scalar && *F16C.get_or_init(|| is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Per-thread buffers of one task.
#[derive(Default)]
struct Scratch {
    offsets: Vec<usize>,
    /// `[head of the task][key]`.
    scores: Vec<f32>,
}

/// Dot product in 8 independent lanes, folded pairwise: the same order on every call.
#[inline(always)]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l].to_f32(), acc[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x.mul_add(y.to_f32(), acc[l]);
    }
    // The fold of the transposing reduction in `dots8` below: neighbours, then pairs, then halves.
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// `dot` on AVX2/FMA for lengths that are a multiple of 8: the same lanes, the same fold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot8<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(8));
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                T::load8(b.as_ptr().add(i)),
                acc,
            );
        }
        // (a0+a1, a2+a3, .., a4+a5, a6+a7, ..), then ((a0+a1)+(a2+a3), .., (a4+a5)+(a6+a7), ..).
        let h = _mm256_hadd_ps(acc, acc);
        let h = _mm256_hadd_ps(h, h);
        let s = _mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_cvtss_f32(s)
    }
}

/// Eight dot products of `q` with the keys at `k_pool[offsets[j]..]`, `d` long, returned in
/// one register: 8 independent FMA chains (one per key) instead of one dependent chain per key,
/// and one transposing reduction for all eight (the fold of `dot`, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8<T: KvElem>(
    q: &[f32],
    k_pool: &[T],
    offsets: &[usize; 8],
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let d = q.len();
    debug_assert!(d.is_multiple_of(8));
    debug_assert!(offsets.iter().all(|&s| s + d <= k_pool.len()));
    unsafe {
        let kp = k_pool.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..d).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(c));
            for (a, &s) in acc.iter_mut().zip(offsets) {
                *a = _mm256_fmadd_ps(qv, T::load8(kp.add(s + c)), *a);
            }
        }
        // Lane pairs of keys (0,1), (2,3): per 128-bit half [k0 a01, k0 a23, k1 a01, k1 a23].
        let t01 = _mm256_hadd_ps(acc[0], acc[1]);
        let t23 = _mm256_hadd_ps(acc[2], acc[3]);
        let t45 = _mm256_hadd_ps(acc[4], acc[5]);
        let t67 = _mm256_hadd_ps(acc[6], acc[7]);
        // Per half: [k0, k1, k2, k3] (a01+a23 in the low half, a45+a67 in the high one).
        let u0 = _mm256_hadd_ps(t01, t23);
        let u1 = _mm256_hadd_ps(t45, t67);
        // Low halves + high halves: keys 0-3 from u0, 4-7 from u1.
        _mm256_add_ps(
            _mm256_permute2f128_ps(u0, u1, 0x20),
            _mm256_permute2f128_ps(u0, u1, 0x31),
        )
    }
}

/// `scores[h * nk + j] = dot(qs[h], key j) * scale` for all keys of a task and every query head
/// of its group, eight keys at a time: the heads take turns on each block of eight keys, so a key
/// comes from memory once for the whole group and stays in L1 for the others.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores8<T: KvElem>(
    qs: &[&[f32]],
    k_pool: &[T],
    offsets: &[usize],
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nk = offsets.len();
    debug_assert_eq!(qs.len() * nk, scores.len());
    unsafe {
        let sv = _mm256_set1_ps(scale);
        let mut blocks = offsets.chunks_exact(8);
        let mut j = 0;
        for b in &mut blocks {
            let b: &[usize; 8] = b.try_into().expect("8 offsets");
            for (hh, q) in qs.iter().enumerate() {
                let v = _mm256_mul_ps(dots8(q, k_pool, b), sv);
                _mm256_storeu_ps(scores.as_mut_ptr().add(hh * nk + j), v);
            }
            j += 8;
        }
        for &s in blocks.remainder() {
            for (hh, q) in qs.iter().enumerate() {
                scores[hh * nk + j] = dot8(q, &k_pool[s..s + q.len()]) * scale;
            }
            j += 1;
        }
    }
}

/// `v[i] = exp(v[i] - max)` in place.
fn softmax_numerators(v: &mut [f32], max: f32) {
    v.iter_mut().for_each(|x| *x -= max);
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Scalar {
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: AVX2 and FMA were detected; the chunk holds 8 values.
            unsafe { exp8(c) };
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = exp(*x));
        return;
    }
    v.iter_mut().for_each(|x| *x = exp(*x));
}

/// `out += w * v`.
#[inline(always)]
fn axpy<T: KvElem>(out: &mut [f32], w: f32, v: &[T]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o = w.mul_add(x.to_f32(), *o);
    }
}

/// `o = sum_j w[j] * v_pool[offsets[j]..][..d]` with AVX2/FMA, keys in order: the same
/// operations per element as repeated `axpy` from zero, with 64 outputs held in registers
/// across the keys instead of stored and reloaded for every key.
///
/// With `resume`, the sums continue from the values already in `o` (the keys so far): the same
/// sequence of operations as one call over all the keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum8<T: KvElem>(
    o: &mut [f32],
    offsets: &[usize],
    w: &[f32],
    v_pool: &[T],
    resume: bool,
) {
    use std::arch::x86_64::*;
    let d = o.len();
    debug_assert!(d.is_multiple_of(8) && offsets.len() == w.len());
    let vp = v_pool.as_ptr();
    unsafe {
        let mut c0 = 0;
        while c0 + 64 <= d {
            let mut acc = [_mm256_setzero_ps(); 8];
            if resume {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(o.as_ptr().add(c0 + 8 * r));
                }
            }
            for (&s, &wj) in offsets.iter().zip(w) {
                let wv = _mm256_set1_ps(wj);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, T::load8(vp.add(s + c0 + 8 * r)), *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * r), *a);
            }
            c0 += 64;
        }
        while c0 < d {
            let mut a = if resume {
                _mm256_loadu_ps(o.as_ptr().add(c0))
            } else {
                _mm256_setzero_ps()
            };
            for (&s, &wj) in offsets.iter().zip(w) {
                a = _mm256_fmadd_ps(_mm256_set1_ps(wj), T::load8(vp.add(s + c0)), a);
            }
            _mm256_storeu_ps(o.as_mut_ptr().add(c0), a);
            c0 += 8;
        }
    }
}

/// Attention for `rows.len()` query tokens.
///
/// - `q`: `[T, H * D]` (token-major, as the projection produces it), not yet scaled;
/// - `k_pool`, `v_pool`: one layer's pools, `[slots, Hkv * D]`;
/// - `out`: `[T, H * D]`.
///
/// Each row attends to positions `max(0, pos + 1 - window) ..= pos` of its own sequence.
pub(crate) fn paged_attention<T: KvElem>(
    shape: &AttnShape,
    q: &[f32],
    rows: &[QueryRow<'_>],
    k_pool: &[T],
    v_pool: &[T],
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
    // Same layout for both pools: a key's bounds check covers its value (see `weighted_sum8`).
    assert_eq!(k_pool.len(), v_pool.len(), "K and V pools differ in size");
    let group = n_heads / n_kv_heads;
    let kv_row = n_kv_heads * d;
    debug_assert_eq!(q.len(), n_heads * t * d);
    debug_assert_eq!(out.len(), t * n_heads * d);
    let threads = threads();
    // Heads per task: a whole KV group (each key and value loaded once for the group) when
    // there are enough tasks for the threads, else one head.
    let hpt = if t * n_kv_heads >= 4 * threads {
        group
    } else {
        1
    };
    let tasks_per_token = n_heads / hpt;
    let task = |idx: usize, o: &mut [f32], scratch: &mut Scratch| {
        let (ti, h0) = (idx / tasks_per_token, (idx % tasks_per_token) * hpt);
        let row = rows[ti];
        let g = h0 / group;
        let first = window.map_or(0, |w| (row.pos + 1).saturating_sub(w));
        // Offsets of this KV head's rows, walked block by block (one division per block).
        let offsets = &mut scratch.offsets;
        offsets.clear();
        let mut p = first;
        while p <= row.pos {
            let bi = p / block_size;
            let base = row.table[bi] as usize * block_size;
            // The whole block lies inside the pools, so every offset below does (the vector
            // paths read through raw pointers).
            assert!(
                (base + block_size) * kv_row <= k_pool.len(),
                "block outside the pool"
            );
            let end = ((bi + 1) * block_size).min(row.pos + 1);
            offsets.extend((p..end).map(|pp| (base + pp - bi * block_size) * kv_row + g * d));
            p = end;
        }
        let nk = offsets.len();
        let scores = &mut scratch.scores;
        scores.clear();
        scores.resize(hpt * nk, 0.0);
        let qs: Vec<&[f32]> = (h0..h0 + hpt)
            .map(|h| &q[(ti * n_heads + h) * d..(ti * n_heads + h + 1) * d])
            .collect();
        #[cfg(target_arch = "x86_64")]
        let simd = d.is_multiple_of(8) && vector_ok();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        if simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2/FMA/F16C detected; d is a multiple of 8; every offset + d is inside
            // both pools (checked block by block where the offsets are made).
            unsafe {
                scores8(&qs, k_pool, offsets, scale, scores)
            };
        } else {
            for (qh, sc) in qs.iter().zip(scores.chunks_exact_mut(nk.max(1))) {
                for (x, &s) in sc.iter_mut().zip(offsets.iter()) {
                    *x = dot(qh, &k_pool[s..s + d]) * scale;
                }
            }
        }
        let mut inv = [0f32; 16];
        let mut inv_vec = Vec::new();
        let inv: &mut [f32] = if hpt <= 16 {
            &mut inv[..hpt]
        } else {
            inv_vec.resize(hpt, 0.0);
            &mut inv_vec
        };
        for (hh, sc) in scores.chunks_exact_mut(nk).enumerate() {
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            softmax_numerators(sc, max);
            let sum: f32 = sc.iter().fold(0f32, |a, x| a + x);
            inv[hh] = 1.0 / sum;
        }
        if simd {
            // The weights first (the same products as below), then register-held passes over
            // blocks of keys, the heads taking turns on each block so that its values come from
            // memory once for the group.
            for (hh, sc) in scores.chunks_exact_mut(nk.max(1)).enumerate() {
                sc.iter_mut().for_each(|x| *x *= inv[hh]);
            }
            debug_assert!(offsets.iter().all(|&s| s + d <= v_pool.len()));
            const KEYS: usize = 64;
            for k0 in (0..nk).step_by(KEYS) {
                let k1 = (k0 + KEYS).min(nk);
                for (hh, oh) in o.chunks_exact_mut(d).enumerate() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2/FMA detected; every offset + d is inside the pools (checked
                    // block by block where the offsets are made; both pools have the same size).
                    unsafe {
                        weighted_sum8(
                            oh,
                            &offsets[k0..k1],
                            &scores[hh * nk + k0..hh * nk + k1],
                            v_pool,
                            k0 > 0,
                        )
                    };
                }
            }
            return;
        }
        o.fill(0.0);
        for (j, &s) in offsets.iter().enumerate() {
            let value = &v_pool[s..s + d];
            for (hh, oh) in o.chunks_exact_mut(d).enumerate() {
                axpy(oh, scores[hh * nk + j] * inv[hh], value);
            }
        }
    };
    let tasks = t * tasks_per_token;
    let span = hpt * d;
    // Below a few tasks of short rows, threads cost more than they save.
    let work: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * n_heads * d;
    if tasks == 1 || work < 1 << 15 {
        let mut scratch = Scratch::default();
        for (idx, o) in out.chunks_mut(span).enumerate() {
            task(idx, o, &mut scratch);
        }
    } else {
        // candle's persistent pool (cheap to wake for the many small calls of a decode step).
        let base = OutPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
            let mut scratch = Scratch::default();
            for idx in range {
                // SAFETY: task `idx` owns out[idx*span..(idx+1)*span]; ranges are disjoint.
                let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(idx * span), span) };
                task(idx, o, &mut scratch);
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
        // d = 12: the scalar path; d = 64: the vector path where the CPU has it (keys in blocks
        // of 8 with a tail, values in blocks of 64 keys, so up to 200 keys cross both).
        // Both pool types: f16 values are widened exactly, so the same 1e-5 bound holds against
        // a naive attention over the stored (rounded) values.
        for (d, bs, nb) in [(12usize, 4usize, 8usize), (64, 16, 13)] {
            matches_naive::<f32>(d, bs, nb);
            matches_naive::<half::f16>(d, bs, nb);
        }
    }

    fn matches_naive<T: KvElem>(d: usize, bs: usize, nb: usize) {
        let (h, hkv) = (6, 2);
        let table: Vec<u32> = (0..nb).map(|b| ((b * 5 + 3) % nb) as u32).collect();
        let slots = nb * bs;
        let val = |i: usize| ((i * 7919 % 113) as f32 / 113.0) - 0.5;
        let k_pool: Vec<T> = (0..slots * hkv * d).map(|i| T::from_f32(val(i))).collect();
        let v_pool: Vec<T> = (0..slots * hkv * d)
            .map(|i| T::from_f32(val(i + 31)))
            .collect();
        // Few rows (a task per head) and many (a task per KV group).
        let few = vec![3usize, 9, slots - 1];
        let many: Vec<usize> = (0..24).map(|i| (i * 37 + 5) % slots).collect();
        for (positions, window) in [
            (&few, None),
            (&few, Some(5)),
            (&many, None),
            (&many, Some(7)),
            (&many, Some(90)),
        ] {
            let t = positions.len();
            let q: Vec<f32> = (0..h * t * d).map(|i| val(i + 5)).collect();
            {
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
                // Alone, each row gives the same bits (nothing depends on the other rows).
                for (ti, row) in rows.iter().enumerate() {
                    let q1 = q[ti * h * d..(ti + 1) * h * d].to_vec();
                    let mut o1 = vec![0.0; h * d];
                    paged_attention(
                        &shape,
                        &q1,
                        std::slice::from_ref(row),
                        &k_pool,
                        &v_pool,
                        &mut o1,
                    );
                    let got = &out[ti * h * d..(ti + 1) * h * d];
                    assert!(o1.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                for (ti, &pos) in positions.iter().enumerate() {
                    for hh in 0..h {
                        let g = hh / (h / hkv);
                        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                        let at = |pool: &[T], p: usize| {
                            let s = table[p / bs] as usize * bs + p % bs;
                            pool[s * hkv * d + g * d..s * hkv * d + (g + 1) * d]
                                .iter()
                                .map(|x| x.to_f32())
                                .collect::<Vec<f32>>()
                        };
                        let ks: Vec<Vec<f32>> = (first..=pos).map(|p| at(&k_pool, p)).collect();
                        let vs: Vec<Vec<f32>> = (first..=pos).map(|p| at(&v_pool, p)).collect();
                        let qh = &q[(ti * h + hh) * d..(ti * h + hh + 1) * d];
                        let want = naive(qh, &ks, &vs, 0.3);
                        let got = &out[(ti * h + hh) * d..(ti * h + hh + 1) * d];
                        for (a, b) in want.iter().zip(got) {
                            assert!((a - b).abs() < 1e-5, "d {d}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// One layer of SmolLM2-shaped decode attention at a long context, f32 and f16 pools
    /// (`cargo test --release -p atoma-engine paged_attn::tests::timings -- --ignored
    /// --nocapture`); prints only. The pools of 30 layers are cycled through, as in a real step,
    /// so they come from memory rather than cache.
    #[test]
    #[ignore = "benchmark: prints figures"]
    fn timings() {
        timings_of::<f32>("f32");
        timings_of::<half::f16>("f16");
    }

    #[allow(clippy::print_stderr)]
    fn timings_of<T: KvElem>(name: &str) {
        let (h, hkv, d, bs, layers) = (9, 3, 64, 16, 30);
        for (t, ctx) in [(1usize, 1100usize), (16, 200), (16, 1100)] {
            let blocks = t * ctx.div_ceil(bs);
            let pools: Vec<(Vec<T>, Vec<T>)> = (0..layers)
                .map(|l| {
                    let p = |o: usize| {
                        (0..blocks * bs * hkv * d)
                            .map(|i| T::from_f32(((i + o) % 13) as f32 * 0.01))
                            .collect::<Vec<T>>()
                    };
                    (p(l), p(l + 5))
                })
                .collect();
            let tables: Vec<Vec<u32>> = (0..t)
                .map(|s| {
                    (0..ctx.div_ceil(bs))
                        .map(|b| (s * ctx.div_ceil(bs) + b) as u32)
                        .collect()
                })
                .collect();
            let rows: Vec<QueryRow<'_>> = tables
                .iter()
                .map(|tb| QueryRow {
                    pos: ctx - 1,
                    table: tb,
                })
                .collect();
            let q: Vec<f32> = (0..h * t * d).map(|i| (i % 7) as f32 * 0.1).collect();
            let shape = AttnShape {
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: d,
                block_size: bs,
                scale: 0.125,
                window: None,
            };
            let mut out = vec![0f32; t * h * d];
            for (k, v) in &pools {
                paged_attention(&shape, &q, &rows, k, v, &mut out);
            }
            let reps = 10;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                for (k, v) in &pools {
                    paged_attention(&shape, &q, &rows, k, v, &mut out);
                }
            }
            let dt = start.elapsed().as_secs_f64() / (reps * layers) as f64;
            let macs = (t * h * ctx * d * 2) as f64;
            eprintln!(
                "{name} t={t:<3} ctx={ctx:<5} {:>8.1} us per layer  {:>5.1} GMAC/s",
                dt * 1e6,
                macs / dt / 1e9
            );
        }
    }

    /// One prompt chunk's attention (128 tokens of one sequence, causal), the shapes of SmolLM2
    /// (9 heads over 3 KV heads of 64) and Gemma 3 270M (4 over 1 of 256), f16 pools, best of
    /// many runs (`cargo test --release -p atoma-engine paged_attn::tests::prefill_timings --
    /// --ignored --nocapture`); prints only.
    #[test]
    #[ignore = "benchmark: prints figures"]
    #[allow(clippy::print_stderr)]
    fn prefill_timings() {
        for (h, hkv, d) in [(9usize, 3usize, 64usize), (4, 1, 256)] {
            let (t, bs) = (128usize, 16usize);
            let pool = |o: usize| -> Vec<half::f16> {
                (0..t * hkv * d)
                    .map(|i| half::f16::from_f32(((i * 7 + o) % 13) as f32 * 0.01 - 0.06))
                    .collect()
            };
            let (k, v) = (pool(0), pool(5));
            let table: Vec<u32> = (0..(t / bs) as u32).collect();
            let rows: Vec<QueryRow<'_>> =
                (0..t).map(|pos| QueryRow { pos, table: &table }).collect();
            let q: Vec<f32> = (0..h * t * d).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
            let shape = AttnShape {
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: d,
                block_size: bs,
                scale: 0.125,
                window: None,
            };
            let mut out = vec![0f32; t * h * d];
            let mut best = f64::MAX;
            for _ in 0..200 {
                let start = std::time::Instant::now();
                paged_attention(&shape, &q, &rows, &k, &v, &mut out);
                best = best.min(start.elapsed().as_secs_f64());
            }
            let macs = (h * t * (t + 1) / 2 * d * 2) as f64;
            let sum: f64 = out.iter().map(|&x| f64::from(x)).sum();
            eprintln!(
                "heads {h}/{hkv} x {d}: {:>7.1} us per layer, {:>5.1} GMAC/s (output sum {sum:.6})",
                best * 1e6,
                macs / best / 1e9
            );
        }
    }

    #[test]
    fn vector_dot_is_the_scalar_dot() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            for len in [8usize, 64, 128, 256] {
                let a: Vec<f32> = (0..len)
                    .map(|i| ((i * 7919 % 113) as f32 - 56.0) * 0.37)
                    .collect();
                let b: Vec<f32> = (0..len)
                    .map(|i| ((i * 104729 % 97) as f32 - 48.0) * 1.3e-2)
                    .collect();
                // SAFETY: AVX2 and FMA detected.
                let v = unsafe { dot8(&a, &b) };
                assert_eq!(v.to_bits(), dot(&a, &b).to_bits(), "len {len}");
            }
            // Eight keys at a time plus a tail, scattered through a pool (f32 and f16).
            for (d, nk) in [(8usize, 3usize), (64, 8), (64, 21), (256, 17)] {
                let pool: Vec<f32> = (0..64 * d)
                    .map(|i| ((i * 7919 % 113) as f32 - 56.0) * 0.037)
                    .collect();
                let q: Vec<f32> = (0..d)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.21)
                    .collect();
                let offsets: Vec<usize> = (0..nk).map(|j| (j * 37 % 64) * d).collect();
                let mut got = vec![0f32; nk];
                // SAFETY: AVX2 and FMA detected; every offset + d is inside the pool.
                unsafe { scores8(&[&q], &pool, &offsets, 0.125, &mut got) };
                for (j, &s) in offsets.iter().enumerate() {
                    let want = dot(&q, &pool[s..s + d]) * 0.125;
                    assert_eq!(got[j].to_bits(), want.to_bits(), "d {d} key {j}");
                }
                let pool16: Vec<half::f16> = pool.iter().map(|&x| half::f16::from_f32(x)).collect();
                // SAFETY: AVX2, FMA and F16C detected; every offset + d is inside the pool.
                unsafe { scores8(&[&q], &pool16, &offsets, 0.125, &mut got) };
                for (j, &s) in offsets.iter().enumerate() {
                    let want = dot(&q, &pool16[s..s + d]) * 0.125;
                    assert_eq!(got[j].to_bits(), want.to_bits(), "f16 d {d} key {j}");
                }
            }
        }
    }
}
