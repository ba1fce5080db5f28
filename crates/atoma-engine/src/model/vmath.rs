//! Vectorized elementwise math with scalar twins that give the same bits: `exp`, and the
//! gated activations of the MLP (`silu(g) * u`, `gelu_tanh(g) * u`).
//!
//! Why by hand: candle 0.11.1 evaluates `tanh`/`exp` through libm one value at a time; on Gemma 3
//! a batched decode step spent about 8% of its time in `tanhf`/`expm1f`. The results must not
//! depend on the CPU's vector level or on where a value falls in a chunk, so every vector routine
//! has a scalar twin with the same operations (fused multiply-adds included).

use candle_core::Tensor;

use super::qmm::{Level, level};

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
    unsafe {
        let x = _mm256_min_ps(
            _mm256_max_ps(_mm256_loadu_ps(v.as_ptr()), _mm256_set1_ps(EXP_MIN)),
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
        _mm256_storeu_ps(v.as_mut_ptr(), _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
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
        let mut e = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), arg);
        exp8(&mut e);
        let den = _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_loadu_ps(e.as_ptr()));
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
pub(crate) fn gated_activation(
    kind: Gate,
    gate: &Tensor,
    up: &Tensor,
) -> candle_core::Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != candle_core::DType::F32 {
        let act = match kind {
            Gate::Silu => candle_nn::ops::silu(gate)?,
            Gate::GeluTanh => gate.gelu()?,
        };
        return act * up;
    }
    let g = gate.flatten_all()?.to_vec1::<f32>()?;
    let u = up.flatten_all()?.to_vec1::<f32>()?;
    if g.len() != u.len() {
        candle_core::bail!(
            "gated activation: {} gate values, {} up values",
            g.len(),
            u.len()
        );
    }
    let mut out = vec![0f32; g.len()];
    const CHUNK: usize = 8192;
    if g.len() <= CHUNK {
        gated_slice(kind, &g, &u, &mut out);
    } else {
        let base = super::OutPtr(out.as_mut_ptr());
        let n = g.len();
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(CHUNK), |range| {
            for c in range {
                let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                // SAFETY: chunk c owns out[a..b]; chunks are disjoint.
                let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(a), b - a) };
                gated_slice(kind, &g[a..b], &u[a..b], o);
            }
        });
    }
    Tensor::from_vec(out, gate.shape(), gate.device())
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
