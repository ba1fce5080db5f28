//! The register tiles: `M` activation rows times `NP` panels of 8 columns, one sub-block at a
//! time, in AVX-512 VNNI (`vpdpbusd`), AVX2 (`maddubs` with sign tricks) and scalar code. All
//! three compute the same exact integer dot product per sub-block and the same f32 fused
//! multiply-adds in the same order, so they give the same bits.

#[cfg(target_arch = "x86_64")]
use super::huge::load8;
use super::quant::QuantRows;
use super::{PANEL, PackedMatrix, QA, code_at};

#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn tile_scalar<
    const M: usize,
    const NP: usize,
    const SB: usize,
    const MIN: bool,
    const NIB: bool,
>(
    w: &PackedMatrix,
    a: &QuantRows,
    i: usize,
    p: usize,
    out: *mut f32,
) {
    let k = a.k;
    let nsb = k / SB;
    let mut acc = [[[0f32; PANEL]; NP]; M];
    for t in 0..nsb {
        for pp in 0..NP {
            let base = ((p + pp) * nsb + t) * PANEL;
            let blk = ((p + pp) * nsb + t) * SB * PANEL;
            let qb = if NIB {
                &w.q[blk / 2..][..SB * PANEL / 2]
            } else {
                &w.q[blk..][..SB * PANEL]
            };
            let byte = |g: usize, c: usize, l: usize| code_at(qb, NIB, g, c, l);
            for r in 0..M {
                let row = i + r;
                let aq = &a.qs[row * k + t * SB..][..SB];
                let da = a.d[row * (k / QA) + t * SB / QA];
                for c in 0..PANEL {
                    let mut dot = a.corr[row * nsb + t];
                    for g in 0..SB / 4 {
                        for l in 0..4 {
                            dot += i32::from(byte(g, c, l)) * i32::from(aq[g * 4 + l]);
                        }
                    }
                    let v = &mut acc[r][pp][c];
                    *v = (dot as f32).mul_add(w.scale.get(base + c) * da, *v);
                    if MIN {
                        *v = a.sum[row * nsb + t].mul_add(w.min.get(base + c) * da, *v);
                    }
                }
            }
        }
    }
    for r in 0..M {
        for pp in 0..NP {
            for c in 0..PANEL {
                let col = (p + pp) * PANEL + c;
                if col < w.n {
                    unsafe { *out.add((i + r) * w.n + col) = acc[r][pp][c] };
                }
            }
        }
    }
}

/// The 32 bytes of group `g` (4 weights of 8 columns) of the sub-block whose unpacked bytes
/// start at `blk`: one load, or for nibbles one load of the pair and a mask (or shift and mask).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_group<const SB: usize, const NIB: bool>(
    wq: *const u8,
    blk: usize,
    g: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    unsafe {
        if NIB {
            let v = _mm256_loadu_si256(wq.add(blk / 2 + g / 2 * 4 * PANEL) as *const __m256i);
            let v = if g.is_multiple_of(2) {
                v
            } else {
                _mm256_srli_epi16(v, 4)
            };
            _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
        } else {
            _mm256_loadu_si256(wq.add(blk + g * 4 * PANEL) as *const __m256i)
        }
    }
}

/// Stores a tile's accumulators, skipping the padding columns of the last panel.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn store_tile<const M: usize, const NP: usize>(
    w: &PackedMatrix,
    acc: &[[std::arch::x86_64::__m256; NP]; M],
    i: usize,
    p: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    unsafe {
        for r in 0..M {
            for pp in 0..NP {
                let col = (p + pp) * PANEL;
                let dst = out.add((i + r) * w.n + col);
                if col + PANEL <= w.n {
                    _mm256_storeu_ps(dst, acc[r][pp]);
                } else {
                    let mut tmp = [0f32; PANEL];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r][pp]);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, w.n - col);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn tile_vnni<
    const M: usize,
    const NP: usize,
    const SB: usize,
    const MIN: bool,
    const NIB: bool,
>(
    w: &PackedMatrix,
    a: &QuantRows,
    i: usize,
    p: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let k = a.k;
    let nsb = k / SB;
    let nqa = k / QA;
    // Raw pointers: `matmul` checked every size, and slice indexing would cost a bounds check
    // per load in the innermost loop.
    let (wq, ws, wm) = (w.q.as_ptr(), w.scale.ptrs(), w.min.ptrs());
    let (aq, ad, ac, asum) = (a.qs.as_ptr(), a.d.as_ptr(), a.corr.as_ptr(), a.sum.as_ptr());
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NP]; M];
        for t in 0..nsb {
            let mut ia = [[_mm256_setzero_si256(); NP]; M];
            for r in 0..M {
                let c = _mm256_set1_epi32(*ac.add((i + r) * nsb + t));
                for pp in 0..NP {
                    ia[r][pp] = c;
                }
            }
            for g in 0..SB / 4 {
                let mut wv = [_mm256_setzero_si256(); NP];
                for pp in 0..NP {
                    wv[pp] = load_group::<SB, NIB>(wq, ((p + pp) * nsb + t) * SB * PANEL, g);
                }
                for r in 0..M {
                    let av = _mm256_set1_epi32(std::ptr::read_unaligned(
                        aq.add((i + r) * k + t * SB + g * 4) as *const i32,
                    ));
                    for pp in 0..NP {
                        ia[r][pp] = _mm256_dpbusd_epi32(ia[r][pp], wv[pp], av);
                    }
                }
            }
            let mut sv = [_mm256_setzero_ps(); NP];
            let mut mv = [_mm256_setzero_ps(); NP];
            for pp in 0..NP {
                let o = ((p + pp) * nsb + t) * PANEL;
                sv[pp] = load8(ws, o);
                if MIN {
                    mv[pp] = load8(wm, o);
                }
            }
            for r in 0..M {
                let da = _mm256_set1_ps(*ad.add((i + r) * nqa + t * SB / QA));
                for pp in 0..NP {
                    acc[r][pp] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(ia[r][pp]),
                        _mm256_mul_ps(sv[pp], da),
                        acc[r][pp],
                    );
                }
                if MIN {
                    let s = _mm256_set1_ps(*asum.add((i + r) * nsb + t));
                    for pp in 0..NP {
                        acc[r][pp] = _mm256_fmadd_ps(s, _mm256_mul_ps(mv[pp], da), acc[r][pp]);
                    }
                }
            }
        }
        store_tile(w, &acc, i, p, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<
    const M: usize,
    const NP: usize,
    const SB: usize,
    const MIN: bool,
    const NIB: bool,
>(
    w: &PackedMatrix,
    a: &QuantRows,
    i: usize,
    p: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let k = a.k;
    let nsb = k / SB;
    let nqa = k / QA;
    let (wq, ws, wm) = (w.q.as_ptr(), w.scale.ptrs(), w.min.ptrs());
    let (aq, ad, asum) = (a.qs.as_ptr(), a.d.as_ptr(), a.sum.as_ptr());
    unsafe {
        let zero = _mm256_set1_epi8(w.zero as i8);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NP]; M];
        for t in 0..nsb {
            let mut ia = [[_mm256_setzero_si256(); NP]; M];
            for g in 0..SB / 4 {
                let mut wv = [_mm256_setzero_si256(); NP];
                let mut wabs = [_mm256_setzero_si256(); NP];
                for pp in 0..NP {
                    // q - zero fits in i8 for every format (-128..=127).
                    let raw = load_group::<SB, NIB>(wq, ((p + pp) * nsb + t) * SB * PANEL, g);
                    wv[pp] = _mm256_sub_epi8(raw, zero);
                    wabs[pp] = _mm256_sign_epi8(wv[pp], wv[pp]);
                }
                for r in 0..M {
                    let av = _mm256_set1_epi32(std::ptr::read_unaligned(
                        aq.add((i + r) * k + t * SB + g * 4) as *const i32,
                    ));
                    for pp in 0..NP {
                        // |w| * (a with w's sign) = w * a; at most 2 * 128 * 127 per pair, so
                        // the 16-bit sums never saturate.
                        let s = _mm256_sign_epi8(av, wv[pp]);
                        let d = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[pp], s), ones);
                        ia[r][pp] = _mm256_add_epi32(ia[r][pp], d);
                    }
                }
            }
            let mut sv = [_mm256_setzero_ps(); NP];
            let mut mv = [_mm256_setzero_ps(); NP];
            for pp in 0..NP {
                let o = ((p + pp) * nsb + t) * PANEL;
                sv[pp] = load8(ws, o);
                if MIN {
                    mv[pp] = load8(wm, o);
                }
            }
            for r in 0..M {
                let da = _mm256_set1_ps(*ad.add((i + r) * nqa + t * SB / QA));
                for pp in 0..NP {
                    acc[r][pp] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(ia[r][pp]),
                        _mm256_mul_ps(sv[pp], da),
                        acc[r][pp],
                    );
                }
                if MIN {
                    let s = _mm256_set1_ps(*asum.add((i + r) * nsb + t));
                    for pp in 0..NP {
                        acc[r][pp] = _mm256_fmadd_ps(s, _mm256_mul_ps(mv[pp], da), acc[r][pp]);
                    }
                }
            }
        }
        store_tile(w, &acc, i, p, out);
    }
}
