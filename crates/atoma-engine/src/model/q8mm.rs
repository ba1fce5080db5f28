//! `x @ W^T` for Q8_0 weights on the CPU, tiled so that each weight block is loaded once per
//! tile of activation rows instead of once per row.
//!
//! Why by hand: candle 0.11.1's CPU path for Q8_0 computes one dot product per (row, column
//! quad), re-decoding every weight block for every row, and its repacked VNNI kernel only runs
//! when the inner dimension is a multiple of 256 (SmolLM2's 576 and Gemma 3's 640 are not).
//! With a batch of decodes the weights are the same for every row, so a register tile of
//! `RM x RN` (rows x weight rows) accumulators turns one weight load into `RM` multiply-adds.
//! Q4_1, Q5_0 and Q5_1 weights are requantized to Q8_0 at load (see `weights`), so they run here
//! too.
//!
//! Activations are quantized per row to Q8_0 exactly as ggml and candle do (scale = amax/127,
//! stored as f16, round to nearest). Each output element is the same sequence of operations
//! whatever the tile, the batch size or the thread split (per 32-value block: one exact integer
//! dot product in 8 lanes, then a fused multiply-add by the product of the scales; a fixed lane
//! fold at the end), so a row's result never depends on the other rows. That sequence is also
//! the one of candle's x86 Q8_0 dot product, so results are bit-identical to candle's (tested):
//! a single row (a lone decode) can go through candle, which streams a matrix from memory faster
//! for one row, without changing any result.
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd` on 256-bit registers, weights offset to unsigned with the
//! offset corrected through per-lane activation sums), AVX2/FMA (`maddubs` with the sign
//! trick), and a portable scalar fallback. The choice is made once at run time.

use std::sync::OnceLock;

use half::f16;

use super::OutPtr;

/// Values per Q8_0 block.
pub(crate) const QK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 2 + QK;

/// Rows of activations per register tile.
const RM: usize = 4;
/// Weight rows (output columns) per register tile.
const RN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Vnni,
    Avx2,
    Scalar,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var("ATOMA_KERNEL").as_deref() == Ok("scalar") {
                return Level::Scalar;
            }
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2
                && std::env::var("ATOMA_KERNEL").as_deref() != Ok("avx2")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Level::Vnni;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Scalar
    })
}

/// Whether candle 0.11.1 runs a Q8_0 `[n, k]` matmul through its repacked VNNI tiles (for any
/// number of rows), which beat this kernel there.
pub(crate) fn candle_repacks_q8_0(n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = (is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512f"))
            || is_x86_feature_detected!("avxvnni");
        vnni && k.is_multiple_of(256) && n.is_multiple_of(16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, k);
        false
    }
}

/// Compute threads (candle's count reads the environment and /proc on every call; once here).
fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Name of the kernel in use (for logs and benchmarks).
pub(crate) fn kernel_name() -> &'static str {
    match level() {
        Level::Vnni => "avx512-vnni",
        Level::Avx2 => "avx2",
        Level::Scalar => "scalar",
    }
}

/// Activations quantized to Q8_0: values, f32 scales (f16-rounded, as in ggml), and for the
/// VNNI kernel `-128 x` the sum of each group of 4 values (the unsigned-offset correction).
struct QuantRows {
    qs: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<[i32; 8]>,
}

fn quantize_rows(x: &[f32], k: usize) -> QuantRows {
    let m = x.len() / k;
    let nb = k / QK;
    let mut qs = vec![0i8; m * k];
    let mut d = vec![0f32; m * nb];
    let mut corr = vec![[0i32; 8]; m * nb];
    for (bi, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
        d[bi] = f16::from_f32(scale).to_f32();
        for (l, c) in corr[bi].iter_mut().enumerate() {
            *c = -128
                * qb[4 * l..4 * l + 4]
                    .iter()
                    .map(|&v| i32::from(v))
                    .sum::<i32>();
        }
    }
    QuantRows { qs, d, corr }
}

/// `out[m, n] = x[m, k] @ W^T` where `w` holds `n` rows of `k / 32` raw Q8_0 blocks.
pub(crate) fn matmul(w: &[u8], n: usize, k: usize, x: &[f32], out: &mut [f32]) {
    assert!(k.is_multiple_of(QK), "k must be a multiple of 32");
    let nb = k / QK;
    assert_eq!(w.len(), n * nb * BLOCK_BYTES, "weight size");
    assert!(x.len().is_multiple_of(k), "activation size");
    let m = x.len() / k;
    assert_eq!(out.len(), m * n, "output size");
    let a = quantize_rows(x, k);
    let lvl = level();
    let ptr = OutPtr(out.as_mut_ptr());
    // Column chunks of whole tiles; enough chunks to balance threads, few enough to amortize.
    let tiles = n.div_ceil(RN);
    let chunks = (threads() * 8).min(tiles).max(1);
    let per = tiles.div_ceil(chunks);
    let run = |c: usize| {
        let c0 = c * per * RN;
        let c1 = ((c + 1) * per * RN).min(n);
        let mut j = c0;
        while j < c1 {
            let rn = RN.min(c1 - j);
            let mut i = 0;
            while i < m {
                let rm = RM.min(m - i);
                // SAFETY: tile (i..i+rm, j..j+rn) is written by this call only.
                unsafe { tile(lvl, w, &a, nb, k, n, i, rm, j, rn, ptr.get()) };
                i += rm;
            }
            j += rn;
        }
    };
    // candle's persistent spinning pool: waking it costs far less than a rayon fork-join,
    // which matters for the many small matmuls of a single-token decode.
    if chunks == 1 {
        run(0);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| range.for_each(run));
    }
}

/// Computes one tile of up to `RM x RN` outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    lvl: Level,
    w: &[u8],
    a: &QuantRows,
    nb: usize,
    k: usize,
    n: usize,
    i: usize,
    rm: usize,
    j: usize,
    rn: usize,
    out: *mut f32,
) {
    macro_rules! dispatch {
        ($f:ident) => {
            match (rm, rn) {
                (4, 4) => $f::<4, 4>(w, a, nb, k, n, i, j, out),
                (4, 3) => $f::<4, 3>(w, a, nb, k, n, i, j, out),
                (4, 2) => $f::<4, 2>(w, a, nb, k, n, i, j, out),
                (4, 1) => $f::<4, 1>(w, a, nb, k, n, i, j, out),
                (3, 4) => $f::<3, 4>(w, a, nb, k, n, i, j, out),
                (3, 3) => $f::<3, 3>(w, a, nb, k, n, i, j, out),
                (3, 2) => $f::<3, 2>(w, a, nb, k, n, i, j, out),
                (3, 1) => $f::<3, 1>(w, a, nb, k, n, i, j, out),
                (2, 4) => $f::<2, 4>(w, a, nb, k, n, i, j, out),
                (2, 3) => $f::<2, 3>(w, a, nb, k, n, i, j, out),
                (2, 2) => $f::<2, 2>(w, a, nb, k, n, i, j, out),
                (2, 1) => $f::<2, 1>(w, a, nb, k, n, i, j, out),
                (1, 4) => $f::<1, 4>(w, a, nb, k, n, i, j, out),
                (1, 3) => $f::<1, 3>(w, a, nb, k, n, i, j, out),
                (1, 2) => $f::<1, 2>(w, a, nb, k, n, i, j, out),
                _ => $f::<1, 1>(w, a, nb, k, n, i, j, out),
            }
        };
    }
    unsafe {
        match lvl {
            #[cfg(target_arch = "x86_64")]
            Level::Vnni => dispatch!(tile_vnni),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => dispatch!(tile_avx2),
            _ => dispatch!(tile_scalar),
        }
    }
}

#[inline(always)]
fn w_block(w: &[u8], nb: usize, col: usize, b: usize) -> &[u8] {
    let o = (col * nb + b) * BLOCK_BYTES;
    &w[o..o + BLOCK_BYTES]
}

#[inline(always)]
fn w_scale(blk: &[u8]) -> f32 {
    f16::from_le_bytes([blk[0], blk[1]]).to_f32()
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile_scalar<const M: usize, const N: usize>(
    w: &[u8],
    a: &QuantRows,
    nb: usize,
    k: usize,
    n: usize,
    i: usize,
    j: usize,
    out: *mut f32,
) {
    let mut acc = [[0f32; N]; M];
    for b in 0..nb {
        for c in 0..N {
            let blk = w_block(w, nb, j + c, b);
            let dw = w_scale(blk);
            for (r, row_acc) in acc.iter_mut().enumerate() {
                let aq = &a.qs[(i + r) * k + b * QK..(i + r) * k + (b + 1) * QK];
                let dot: i32 = blk[2..]
                    .iter()
                    .zip(aq)
                    .map(|(&wq, &av)| i32::from(wq as i8) * i32::from(av))
                    .sum();
                // The order of candle's portable loop: (dot * d_w) * d_a.
                row_acc[c] += dot as f32 * dw * a.d[(i + r) * nb + b];
            }
        }
    }
    for (r, row_acc) in acc.iter().enumerate() {
        for (c, v) in row_acc.iter().enumerate() {
            unsafe { *out.add((i + r) * n + j + c) = *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Fixed-order horizontal sum of 8 lanes.
    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn tile_vnni<const M: usize, const N: usize>(
    w: &[u8],
    a: &QuantRows,
    nb: usize,
    k: usize,
    n: usize,
    i: usize,
    j: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let flip = _mm256_set1_epi8(-128);
        for b in 0..nb {
            let mut wv = [_mm256_setzero_si256(); N];
            let mut dw = [0f32; N];
            for c in 0..N {
                let blk = w_block(w, nb, j + c, b);
                dw[c] = w_scale(blk);
                // Signed weights + 128 = unsigned operand of vpdpbusd.
                wv[c] = _mm256_xor_si256(
                    _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i),
                    flip,
                );
            }
            for r in 0..M {
                let row = i + r;
                let av = _mm256_loadu_si256(a.qs.as_ptr().add(row * k + b * QK) as *const __m256i);
                let corr = _mm256_loadu_si256(a.corr.as_ptr().add(row * nb + b) as *const __m256i);
                let da = a.d[row * nb + b];
                for c in 0..N {
                    let p = _mm256_dpbusd_epi32(corr, wv[c], av);
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dw[c] * da),
                        acc[r][c],
                    );
                }
            }
        }
        for r in 0..M {
            for c in 0..N {
                *out.add((i + r) * n + j + c) = x86::hsum(acc[r][c]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const M: usize, const N: usize>(
    w: &[u8],
    a: &QuantRows,
    nb: usize,
    k: usize,
    n: usize,
    i: usize,
    j: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let ones = _mm256_set1_epi16(1);
        for b in 0..nb {
            let mut wv = [_mm256_setzero_si256(); N];
            let mut wabs = [_mm256_setzero_si256(); N];
            let mut dw = [0f32; N];
            for c in 0..N {
                let blk = w_block(w, nb, j + c, b);
                dw[c] = w_scale(blk);
                wv[c] = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
                wabs[c] = _mm256_sign_epi8(wv[c], wv[c]);
            }
            for r in 0..M {
                let row = i + r;
                let av = _mm256_loadu_si256(a.qs.as_ptr().add(row * k + b * QK) as *const __m256i);
                let da = a.d[row * nb + b];
                for c in 0..N {
                    // |w| * (a with w's sign) = w * a, as unsigned x signed pairs.
                    let s = _mm256_sign_epi8(av, wv[c]);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[c], s), ones);
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dw[c] * da),
                        acc[r][c],
                    );
                }
            }
        }
        for r in 0..M {
            for c in 0..N {
                *out.add((i + r) * n + j + c) = x86::hsum(acc[r][c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 blocks of `rows x k` values from a deterministic pattern.
    fn weights(rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut raw = Vec::new();
        let mut deq = Vec::new();
        for r in 0..rows {
            for b in 0..k / QK {
                let d = f16::from_f32(0.01 + 0.001 * ((r * 7 + b) % 13) as f32);
                raw.extend_from_slice(&d.to_le_bytes());
                for e in 0..QK {
                    let q = (((r * 31 + b * 17 + e * 5) % 255) as i32 - 127) as i8;
                    raw.push(q as u8);
                    deq.push(d.to_f32() * f32::from(q));
                }
            }
        }
        (raw, deq)
    }

    #[test]
    fn every_tile_shape_matches_the_dequantized_product_and_rows_are_independent() {
        let (n, k) = (11, 96);
        let (raw, deq) = weights(n, k);
        for m in [1usize, 2, 3, 5, 9] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 211) as f32 / 211.0 - 0.5) * 3.0)
                .collect();
            let mut out = vec![0f32; m * n];
            matmul(&raw, n, k, &x, &mut out);
            for r in 0..m {
                for c in 0..n {
                    let want: f32 = (0..k).map(|e| x[r * k + e] * deq[c * k + e]).sum();
                    let got = out[r * n + c];
                    // Activation quantization error: about 1% of the magnitude.
                    let tol = 0.02
                        * (0..k)
                            .map(|e| (x[r * k + e] * deq[c * k + e]).abs())
                            .sum::<f32>();
                    assert!(
                        (want - got).abs() <= tol,
                        "m={m} ({r},{c}): {want} vs {got}"
                    );
                }
                // The same row alone gives the same bits.
                let mut alone = vec![0f32; n];
                matmul(&raw, n, k, &x[r * k..(r + 1) * k], &mut alone);
                assert_eq!(
                    alone,
                    out[r * n..(r + 1) * n],
                    "row {r} of {m} depends on its batch"
                );
            }
        }
    }
}
