//! Vectorized elementwise math with scalar twins that give the same bits: `exp`, and the
//! gated activations of the MLP (`silu(g) * u`, `gelu_tanh(g) * u`).
//!
//! Why by hand: candle 0.11.1 evaluates `tanh`/`exp` through libm one value at a time; on Gemma 3
//! a batched decode step spent about 8% of its time in `tanhf`/`expm1f`. The results must not
//! depend on the CPU's vector level or on where a value falls in a chunk, so every vector routine
//! has a scalar twin with the same operations (fused multiply-adds included).

use candle_core::Tensor;

use super::cpu::{Level, OutPtr, cpu_f32, level};

/// `exp(x)`, clamped to `[-87, 88]` (softmax numerators, GELU, SiLU): Cephes' single-precision polynomial with fused
/// multiply-adds, about 1 ulp. Written out so that the 8-lane version below gives the same bits
/// (libm's `expf` is a function call per value, a visible share of decode-step time).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp` on 8 lanes (AVX2/FMA), the same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(v: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(v.len() >= 8);
    // SAFETY: 8 values are there to load and store.
    unsafe { _mm256_storeu_ps(v.as_mut_ptr(), exp_ps(_mm256_loadu_ps(v.as_ptr()))) }
}

/// `exp` of one register of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp_ps(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)),
        _mm256_set1_ps(EXP_MAX),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_P[0]);
    for c in &EXP_P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// `dst = exp(src / t - m)` elementwise, with NaN and infinite inputs giving 0 (sampling
/// weights at temperature `t`, `m` the largest scaled logit). Same bits with or without AVX2.
pub(crate) fn exp_scaled(src: &[f32], t: f32, m: f32, dst: &mut Vec<f32>) {
    dst.clear();
    dst.resize(src.len(), 0.0);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Scalar {
        done = src.len() / 8 * 8;
        // SAFETY: AVX2/FMA detected; both slices hold `done` values.
        unsafe { exp_scaled8(&src[..done], t, m, &mut dst[..done]) };
    }
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = if x.is_finite() { exp(x / t - m) } else { 0.0 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_scaled8(src: &[f32], t: f32, m: f32, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let (tv, mv) = (_mm256_set1_ps(t), _mm256_set1_ps(m));
    let inf = _mm256_set1_ps(f32::INFINITY);
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        // SAFETY: 8 values to load and store.
        unsafe {
            let x = _mm256_loadu_ps(s.as_ptr());
            let e = exp_ps(_mm256_sub_ps(_mm256_div_ps(x, tv), mv));
            // Finite: |x| < inf (false for NaN).
            let finite = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0), x), inf, _CMP_LT_OQ);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_and_ps(e, finite));
        }
    }
}

/// The largest value of `v` (NaNs ignored; `-inf` for none): eight running maxima, which the
/// compiler keeps in one vector register.
pub(crate) fn max(v: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in m.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    for &x in tail {
        m[0] = if x > m[0] { x } else { m[0] };
    }
    m.into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// `Σ exp(x - shift)` over the finite and `+inf` values of `x` (NaN and `-inf` add nothing),
/// accumulated in f64 on eight lanes (lane `j` takes the elements at `j mod 8`), then the lanes
/// in order: the same bits with or without AVX2.
pub(crate) fn sum_exp(x: &[f32], shift: f32) -> f64 {
    let n8 = x.len() / 8 * 8;
    let mut lanes = [0f64; 8];
    #[cfg(target_arch = "x86_64")]
    let vector = level() != Level::Scalar;
    #[cfg(not(target_arch = "x86_64"))]
    let vector = false;
    if vector {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA detected.
        unsafe {
            sum_exp8(&x[..n8], shift, &mut lanes)
        };
    } else {
        for c in x[..n8].chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += exp_term(v, shift);
            }
        }
    }
    for (l, &v) in lanes.iter_mut().zip(&x[n8..]) {
        *l += exp_term(v, shift);
    }
    lanes.iter().sum()
}

#[inline(always)]
fn exp_term(v: f32, shift: f32) -> f64 {
    if v.is_nan() || v == f32::NEG_INFINITY {
        0.0
    } else {
        f64::from(exp(v - shift))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp8(x: &[f32], shift: f32, lanes: &mut [f64; 8]) {
    use std::arch::x86_64::*;
    unsafe {
        let (mut lo, mut hi) = (
            _mm256_loadu_pd(lanes.as_ptr()),
            _mm256_loadu_pd(lanes.as_ptr().add(4)),
        );
        let s = _mm256_set1_ps(shift);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in x.chunks_exact(8) {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp_ps(_mm256_sub_ps(v, s));
            // Keep lanes that are neither NaN (unordered with itself) nor -inf.
            let keep = _mm256_and_ps(
                _mm256_cmp_ps(v, v, _CMP_ORD_Q),
                _mm256_cmp_ps(v, neg_inf, _CMP_NEQ_OQ),
            );
            let ev = _mm256_and_ps(e, keep);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(ev)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(ev, 1)));
        }
        _mm256_storeu_pd(lanes.as_mut_ptr(), lo);
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4), hi);
    }
}

/// The MLP's gated activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// `silu(g) = g / (1 + exp(-g))`.
    Silu,
    /// `gelu_tanh(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3)))`, computed as the identical
    /// `g / (1 + exp(-2 c (g + 0.044715 g^3)))`.
    GeluTanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The argument of `exp` for one gate value.
#[inline(always)]
fn gate_arg(kind: Gate, g: f32) -> f32 {
    match kind {
        Gate::Silu => -g,
        Gate::GeluTanh => (-2.0 * SQRT_2_OVER_PI) * (0.044_715 * g * g).mul_add(g, g),
    }
}

/// `act(g) * u` for one value.
#[inline(always)]
fn gated(kind: Gate, g: f32, u: f32) -> f32 {
    g / (1.0 + exp(gate_arg(kind, g))) * u
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated8(kind: Gate, g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    unsafe {
        let gv = _mm256_loadu_ps(g.as_ptr());
        let arg = match kind {
            Gate::Silu => _mm256_sub_ps(_mm256_setzero_ps(), gv),
            Gate::GeluTanh => {
                let g2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044_715), gv), gv);
                _mm256_mul_ps(
                    _mm256_set1_ps(-2.0 * SQRT_2_OVER_PI),
                    _mm256_fmadd_ps(g2, gv, gv),
                )
            }
        };
        let den = _mm256_add_ps(_mm256_set1_ps(1.0), exp_ps(arg));
        let y = _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u.as_ptr()));
        _mm256_storeu_ps(out.as_mut_ptr(), y);
    }
}

/// `out[i] = act(g[i]) * u[i]`.
fn gated_slice(kind: Gate, g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Scalar {
        let n8 = g.len() / 8 * 8;
        for ((gc, uc), oc) in g[..n8]
            .chunks_exact(8)
            .zip(u[..n8].chunks_exact(8))
            .zip(out[..n8].chunks_exact_mut(8))
        {
            // SAFETY: AVX2/FMA detected; every chunk holds 8 values.
            unsafe { gated8(kind, gc, uc, oc) };
        }
        for i in n8..g.len() {
            out[i] = gated(kind, g[i], u[i]);
        }
        return;
    }
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = gated(kind, gv, uv);
    }
}

/// `act(gate) * up` for two `[rows, n]` f32 tensors on the CPU; other devices and dtypes go
/// through candle's ops.
///
/// The rows are read in place from the tensors' storage (the gate and up halves of a fused
/// projection are column ranges of one `[rows, 2n]` tensor, so neither is contiguous): this runs
/// on every layer of every step, and the copies it used to make were serial work while the other
/// compute threads waited.
pub(crate) fn gated_activation(
    kind: Gate,
    gate: &Tensor,
    up: &Tensor,
) -> candle_core::Result<Tensor> {
    let rows_of = |t: &Tensor| -> Option<(usize, usize, usize)> {
        // (rows, n, row stride) for a row-major tensor with unit column stride.
        let (rows, n) = t.dims2().ok()?;
        let st = t.layout().stride();
        (st[1] == 1 || n <= 1).then_some((rows, n, st[0]))
    };
    let plain = gate.device().is_cpu() && gate.dtype() == candle_core::DType::F32;
    let (Some((rows, n, gs)), Some((rows_u, n_u, us)), true) = (
        rows_of(gate),
        rows_of(up),
        plain && up.dtype() == candle_core::DType::F32,
    ) else {
        let act = match kind {
            Gate::Silu => candle_nn::ops::silu(gate)?,
            Gate::GeluTanh => gate.gelu()?,
        };
        return act * up;
    };
    if (rows, n) != (rows_u, n_u) {
        candle_core::bail!("gated activation: gate {rows}x{n}, up {rows_u}x{n_u}");
    }
    let (gst, gl) = gate.storage_and_layout();
    let (ust, ul) = up.storage_and_layout();
    let gv = cpu_f32(&gst, gl, "gated activation")?;
    let uv = cpu_f32(&ust, ul, "gated activation")?;
    // Check every row once here, so the parallel part below cannot fail.
    let fits = |len: usize, stride: usize| rows == 0 || (rows - 1) * stride + n <= len;
    if !fits(gv.len(), gs) || !fits(uv.len(), us) {
        candle_core::bail!("gated activation: rows outside the storage");
    }
    let len = rows * n;
    let mut out = vec![0f32; len];
    let base = OutPtr(out.as_mut_ptr());
    // Work items: (row, chunk of CHUNK columns).
    const CHUNK: usize = 8192;
    let per_row = n.div_ceil(CHUNK).max(1);
    let item = |i: usize| {
        let (r, c) = (i / per_row, i % per_row);
        let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
        let gr = &gv[r * gs..][a..b];
        let ur = &uv[r * us..][a..b];
        // SAFETY: item i owns out[r*n + a .. r*n + b]; items are disjoint and inside `len`.
        let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(r * n + a), b - a) };
        gated_slice(kind, gr, ur, o);
    };
    let items = rows * per_row;
    if len <= CHUNK {
        (0..items).for_each(item);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(item));
    }
    Tensor::from_vec(out, (rows, n), gate.device())
}

/// RMS norm of one row into `dst`: candle's `rms_norm` arithmetic to the operation (a
/// sequential f32 sum of squares, `sqrt(sum / n + eps)`, then `x / rms * w`), so the batched
/// step and the reference model, which runs candle's, give the same bits.
#[inline]
pub(crate) fn rms_row(src: &[f32], w: &[f32], eps: f32, dst: &mut [f32]) {
    let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / src.len() as f32 + eps).sqrt();
    for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
        *d = s / m * a;
    }
}

/// `rms_row` in place.
#[inline]
pub(crate) fn rms_row_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for (d, &a) in x.iter_mut().zip(w) {
        *d = *d / m * a;
    }
}

/// Rotates one head's `d` values in place by the angles whose cosines and sines are `c` and
/// `s` (`d / 2` each): pairs `(2i, 2i+1)` when `interleaved`, else `(i, i + d/2)`. candle's
/// expressions, so the same bits; `rope` below (the reference path) runs it too.
#[inline]
pub(crate) fn rope_head(x: &mut [f32], c: &[f32], s: &[f32], interleaved: bool) {
    let half = x.len() / 2;
    for i in 0..half {
        let (i1, i2) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (a, b) = (x[i1], x[i2]);
        x[i1] = a * c[i] - b * s[i];
        x[i2] = a * s[i] + b * c[i];
    }
}

/// `act(g) * u` for `rows` rows of `n` values read at row strides `gs` and `us` (the gate and
/// up halves of a fused projection share rows), into a new `[rows, n]` buffer; large inputs run
/// on the compute threads. The arithmetic of `gated_activation`, so the same bits.
pub(crate) fn gated_rows(
    kind: Gate,
    g: &[f32],
    gs: usize,
    u: &[f32],
    us: usize,
    rows: usize,
    n: usize,
) -> Vec<f32> {
    assert!(rows == 0 || ((rows - 1) * gs + n <= g.len() && (rows - 1) * us + n <= u.len()));
    let mut out = vec![0f32; rows * n];
    super::cpu::for_rows(&mut out, n, |r, o| {
        gated_slice(kind, &g[r * gs..r * gs + n], &u[r * us..r * us + n], o)
    });
    out
}

/// Rotary position embedding of `x` (`[1, H, T, D]`) by the per-token `cos`/`sin` rows
/// (`[T, D/2]`): pairs `(2i, 2i+1)` when `interleaved`, else `(i, i + D/2)` (GPT-NeoX). The
/// same expressions as candle's `rope_i`/`rope`, so the same bits; but candle forks its rayon
/// pool for every call, which on a 2-core box competes with the spinning compute threads and
/// costs more than the arithmetic of a decode step. Small inputs run inline; large ones on the
/// compute threads, a head per work item.
pub(crate) fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let fallback = || {
        if interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    };
    if !(f32_cpu(x) && f32_cpu(cos) && f32_cpu(sin)) {
        return fallback();
    }
    let (b, h, t, d) = x.dims4()?;
    if b != 1 || !d.is_multiple_of(2) || cos.dims2()? != (t, d / 2) || sin.dims2()? != (t, d / 2) {
        return fallback();
    }
    // All three read in place (`contiguous` is free for the contiguous tensors we get).
    let (xs, cs, ss) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (xst, xl) = xs.storage_and_layout();
    let (cst, cl) = cs.storage_and_layout();
    let (sst, sl) = ss.storage_and_layout();
    let half = d / 2;
    let src = &cpu_f32(&xst, xl, "rope")?[..h * t * d];
    let cv = &cpu_f32(&cst, cl, "rope")?[..t * half];
    let sv = &cpu_f32(&sst, sl, "rope")?[..t * half];
    let mut out = vec![0f32; h * t * d];
    let head = |hi: usize, o: &mut [f32]| {
        let xh = &src[hi * t * d..(hi + 1) * t * d];
        for ti in 0..t {
            let (c, s) = (
                &cv[ti * half..(ti + 1) * half],
                &sv[ti * half..(ti + 1) * half],
            );
            let or = &mut o[ti * d..(ti + 1) * d];
            or.copy_from_slice(&xh[ti * d..(ti + 1) * d]);
            rope_head(or, c, s, interleaved);
        }
    };
    if h * t * d < 1 << 16 {
        for (hi, o) in out.chunks_mut(t * d).enumerate() {
            head(hi, o);
        }
    } else {
        let base = OutPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(h, |range| {
            for hi in range {
                // SAFETY: head hi owns out[hi*t*d..(hi+1)*t*d]; heads are disjoint.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(hi * t * d), t * d) };
                head(hi, o);
            }
        });
    }
    Tensor::from_vec(out, (1, h, t, d), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_the_same_on_8_lanes() {
        let xs: Vec<f32> = (0..4000)
            .map(|i| -(i as f32) * 0.0237)
            .chain([0.0, -87.5, -200.0, 3.5, 40.0, 88.0])
            .collect();
        for &x in &xs {
            let (a, b) = (exp(x), x.exp());
            assert!((a - b).abs() <= b * 3e-7 + 1e-37, "exp({x}): {a} vs {b}");
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            for c in xs.chunks_exact(8) {
                let mut v = c.to_vec();
                // SAFETY: AVX2 and FMA detected.
                unsafe { exp8(&mut v) };
                for (x, e) in c.iter().zip(&v) {
                    assert_eq!(e.to_bits(), exp(*x).to_bits(), "exp({x})");
                }
            }
        }
    }

    #[test]
    fn max_and_sum_exp_match_their_definitions_on_every_level() {
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.31 - 15.0)
            .collect();
        x[5] = f32::NAN;
        x[17] = f32::NEG_INFINITY;
        x[1001] = f32::NEG_INFINITY;
        let m = max(&x);
        assert_eq!(
            m,
            x.iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f32::NEG_INFINITY, f32::max)
        );
        let want: f64 = x
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| f64::from(v - m).exp())
            .sum();
        let got = sum_exp(&x, m);
        assert!((got - want).abs() <= want * 1e-6, "{got} vs {want}");
        // The scalar lanes give the same bits as the vector path.
        let mut lanes = [0f64; 8];
        for (i, &v) in x.iter().enumerate() {
            lanes[i % 8] += exp_term(v, m);
        }
        assert_eq!(got.to_bits(), lanes.iter().sum::<f64>().to_bits());
        let mut e = Vec::new();
        exp_scaled(&x, 0.7, m / 0.7, &mut e);
        for (i, (&v, &got)) in x.iter().zip(&e).enumerate() {
            let want = if v.is_finite() {
                exp(v / 0.7 - m / 0.7)
            } else {
                0.0
            };
            assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
    }

    #[test]
    fn rope_gives_candles_bits_both_layouts_small_and_large() {
        let dev = candle_core::Device::Cpu;
        // t = 3 runs inline, t = 300 on the compute threads.
        for (h, t, d) in [(3usize, 3usize, 8usize), (4, 300, 64)] {
            let x: Vec<f32> = (0..h * t * d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                .collect();
            let x = Tensor::from_vec(x, (1, h, t, d), &dev).unwrap();
            let ang: Vec<f32> = (0..t * d / 2).map(|i| i as f32 * 0.011).collect();
            let ang = Tensor::from_vec(ang, (t, d / 2), &dev).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            for interleaved in [true, false] {
                let got = rope(&x, &cos, &sin, interleaved).unwrap();
                let want = if interleaved {
                    candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap()
                } else {
                    candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap()
                };
                let (g, w) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(
                    g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{h}x{t}x{d} {interleaved}"
                );
            }
        }
    }

    #[test]
    fn gated_activations_match_their_definitions_on_every_level() {
        let g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.173).collect();
        let u: Vec<f32> = (0..203).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for kind in [Gate::Silu, Gate::GeluTanh] {
            let mut fast = vec![0f32; g.len()];
            gated_slice(kind, &g, &u, &mut fast);
            for i in 0..g.len() {
                let x = g[i];
                let want = match kind {
                    Gate::Silu => x / (1.0 + (-x).exp()),
                    Gate::GeluTanh => {
                        0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
                    }
                } * u[i];
                assert!(
                    (fast[i] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{kind:?}({x})"
                );
                // The vector path (chunks of 8) and the scalar twin agree bit for bit.
                assert_eq!(
                    fast[i].to_bits(),
                    gated(kind, g[i], u[i]).to_bits(),
                    "{kind:?}({x})"
                );
            }
        }
    }
}
