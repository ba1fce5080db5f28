//! Activation rows quantized to 8 bits per 32 values (`scale = amax / 127`, rounded through
//! f16 as in ggml's Q8_0), with the per-sub-block sums the tiles start their dot products from;
//! the AVX2 and scalar quantizers give the same bytes.

use half::f16;

use super::QA;
use crate::model::cpu::Level;

/// Activations quantized to 8 bits per 32 values, with per-sub-block sums.
pub(super) struct QuantRows {
    pub(super) k: usize,
    /// `[m][k]` quantized values.
    pub(super) qs: Vec<i8>,
    /// `[m][k / 32]` scales (f16-rounded, as ggml's Q8_0).
    pub(super) d: Vec<f32>,
    /// `[m][k / sb]`: `-zero * sum(qa)` over each weight sub-block (the zero-point correction
    /// that starts the integer dot product).
    pub(super) corr: Vec<i32>,
    /// `[m][k / sb]`: `sum(qa)` as f32 (for weight offsets).
    pub(super) sum: Vec<f32>,
}

pub(super) fn quantize_rows(lvl: Level, x: &[f32], k: usize, sb: usize, zero: i32) -> QuantRows {
    let m = x.len() / k.max(1);
    let (nq, ns) = (k / QA, k / sb);
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; m * nq];
    let mut corr = vec![0i32; m * ns];
    let mut sum = vec![0f32; m * ns];
    let row = |r: usize, qs: &mut [i8], d: &mut [f32], corr: &mut [i32], sum: &mut [f32]| {
        quantize_row(lvl, &x[r * k..(r + 1) * k], sb, zero, qs, d, corr, sum)
    };
    // A prompt chunk's rows on the compute threads (each row alone, so the same bytes); a
    // decode's row inline. This ran on the engine thread while the others waited: some 5% of a
    // Gemma 3 pp128 step.
    if m >= 4 && x.len() >= 1 << 14 {
        struct Ptrs(*mut i8, *mut f32, *mut i32, *mut f32);
        // SAFETY: used only to hand each row its disjoint parts of the four buffers below.
        unsafe impl Sync for Ptrs {}
        let p = Ptrs(
            qs.as_mut_ptr(),
            d.as_mut_ptr(),
            corr.as_mut_ptr(),
            sum.as_mut_ptr(),
        );
        let p = &p;
        candle_core::utils::barrier_pool().execute_chunked(m, |range| {
            for r in range {
                // SAFETY: row r owns these ranges of each buffer (sized m x per-row above);
                // rows are disjoint.
                unsafe {
                    row(
                        r,
                        std::slice::from_raw_parts_mut(p.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(p.1.add(r * nq), nq),
                        std::slice::from_raw_parts_mut(p.2.add(r * ns), ns),
                        std::slice::from_raw_parts_mut(p.3.add(r * ns), ns),
                    )
                };
            }
        });
    } else {
        for r in 0..m {
            row(
                r,
                &mut qs[r * k..(r + 1) * k],
                &mut d[r * nq..(r + 1) * nq],
                &mut corr[r * ns..(r + 1) * ns],
                &mut sum[r * ns..(r + 1) * ns],
            );
        }
    }
    QuantRows {
        k,
        qs,
        d,
        corr,
        sum,
    }
}

/// One row of `quantize_rows`.
#[allow(clippy::too_many_arguments)]
fn quantize_row(
    lvl: Level,
    x: &[f32],
    sb: usize,
    zero: i32,
    qs: &mut [i8],
    d: &mut [f32],
    corr: &mut [i32],
    sum: &mut [f32],
) {
    let simd = lvl != Level::Scalar;
    for ((xb, qb), db) in x
        .chunks_exact(QA)
        .zip(qs.chunks_exact_mut(QA))
        .zip(d.iter_mut())
    {
        let scale = if simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 was detected (`level`); both blocks hold 32 values.
            unsafe {
                quantize_block_avx2(xb, qb)
            }
            #[cfg(not(target_arch = "x86_64"))]
            quantize_block(xb, qb)
        } else {
            quantize_block(xb, qb)
        };
        *db = f16::from_f32(scale).to_f32();
    }
    for ((c, s), q) in corr.iter_mut().zip(sum.iter_mut()).zip(qs.chunks_exact(sb)) {
        let t: i32 = q.iter().map(|&v| i32::from(v)).sum();
        *c = -zero * t;
        *s = t as f32;
    }
}

/// Quantizes 32 values to bytes (`round(v / (amax / 127))`, ties to even); returns the scale.
/// The AVX2 version below gives the same bytes (tested).
pub(super) fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in qb.iter_mut().zip(xb) {
        *q = (v * inv).round_ties_even() as i8;
    }
    scale
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block_avx2(xb: &[f32], qb: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    assert!(xb.len() == QA && qb.len() == QA);
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xb.as_ptr().add(8 * j)));
        let sign = _mm256_set1_ps(-0.0);
        let abs = |x: __m256| _mm256_andnot_ps(sign, x);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let amax = _mm_cvtss_f32(m);
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        // cvtps rounds to nearest, ties to even (the default MXCSR mode).
        let q: [__m256i; 4] = std::array::from_fn(|j| _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)));
        // Pack 32 i32 to 32 i8; the packs interleave 128-bit lanes, the permute restores order.
        let w01 = _mm256_packs_epi32(q[0], q[1]);
        let w23 = _mm256_packs_epi32(q[2], q[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, b);
        scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt chunk's rows, quantized on the compute threads, are each the bytes, scales and
    /// sums of that row quantized alone (inline), on every level.
    #[test]
    fn rows_quantized_together_equal_each_row_alone() {
        let (m, k) = (40, 640);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1 + i % 5) as f32)
            .collect();
        for lvl in [Level::Vnni, Level::Avx2, Level::Scalar] {
            if !lvl.available() {
                continue;
            }
            for (sb, zero) in [(32, 0), (16, 8)] {
                let all = quantize_rows(lvl, &x, k, sb, zero);
                for r in 0..m {
                    let one = quantize_rows(lvl, &x[r * k..(r + 1) * k], k, sb, zero);
                    assert_eq!(one.qs[..], all.qs[r * k..(r + 1) * k]);
                    let (nq, ns) = (k / QA, k / sb);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&one.d), bits(&all.d[r * nq..(r + 1) * nq]));
                    assert_eq!(one.corr[..], all.corr[r * ns..(r + 1) * ns]);
                    assert_eq!(bits(&one.sum), bits(&all.sum[r * ns..(r + 1) * ns]));
                }
            }
        }
    }
}
