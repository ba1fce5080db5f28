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
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / QA];
    let simd = lvl != Level::Scalar;
    for (bi, (xb, qb)) in x.chunks_exact(QA).zip(qs.chunks_exact_mut(QA)).enumerate() {
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
        d[bi] = f16::from_f32(scale).to_f32();
    }
    let sums: Vec<i32> = qs
        .chunks_exact(sb)
        .map(|c| c.iter().map(|&v| i32::from(v)).sum())
        .collect();
    QuantRows {
        k,
        corr: sums.iter().map(|&s| -zero * s).collect(),
        sum: sums.iter().map(|&s| s as f32).collect(),
        qs,
        d,
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
