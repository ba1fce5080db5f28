//! The register tiles: `M` activation rows times `NP` panels of 8 columns, one sub-block at a
//! time, in AVX-512 VNNI (`vpdpbusd`), AVX2 (`maddubs` with sign tricks) and scalar code. All
//! three compute the same exact integer dot product per sub-block and the same f32 fused
//! multiply-adds in the same order, so they give the same bits.

#[cfg(target_arch = "x86_64")]
use super::huge::load8;
use super::quant::QuantRows;
use super::{Codes, NIB, NIB5, PANEL, PackedMatrix, QA, code_at, packed_len};

#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn tile_scalar<
    const M: usize,
    const NP: usize,
    const SB: usize,
    const MIN: bool,
    const CODES: u8,
    const SC: u8,
>(
    w: &PackedMatrix,
    src: Codes,
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
            let blk = ((p + pp - src.p0) * nsb + t) * SB * PANEL;
            // SAFETY: `src` holds panels p0.. in the `CODES` layout (the caller's contract).
            let qb = unsafe {
                std::slice::from_raw_parts(
                    src.q.add(packed_len(CODES, blk)),
                    packed_len(CODES, SB * PANEL),
                )
            };
            let byte = |g: usize, c: usize, l: usize| code_at(qb, CODES, SB, g, c, l);
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
/// start at `blk`: one load; for nibbles one load of the pair and a mask (or shift and mask);
/// for 5-bit codes that, or-ed with the fifth bits shifted out of the sub-block's plane (one
/// load per sub-block once the loop over `g` is unrolled: the same address every time).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_group<const SB: usize, const CODES: u8>(
    wq: *const u8,
    blk: usize,
    g: usize,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    unsafe {
        if CODES == NIB || CODES == NIB5 {
            let base = wq.add(packed_len(CODES, blk));
            let v = _mm256_loadu_si256(base.add(g / 2 * 4 * PANEL) as *const __m256i);
            let v = if g.is_multiple_of(2) {
                v
            } else {
                _mm256_srli_epi16(v, 4)
            };
            let low = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
            if CODES == NIB {
                return low;
            }
            // Bit g of each plane byte to bit 4 (16-bit shifts move bits across bytes, but the
            // mask keeps bit 4 of each byte, which comes from the same byte for g in 0..8).
            let plane = _mm256_loadu_si256(base.add(SB * PANEL / 2) as *const __m256i);
            let hi = match g {
                0 => _mm256_slli_epi16(plane, 4),
                1 => _mm256_slli_epi16(plane, 3),
                2 => _mm256_slli_epi16(plane, 2),
                3 => _mm256_slli_epi16(plane, 1),
                4 => plane,
                5 => _mm256_srli_epi16(plane, 1),
                6 => _mm256_srli_epi16(plane, 2),
                _ => _mm256_srli_epi16(plane, 3),
            };
            _mm256_or_si256(low, _mm256_and_si256(hi, _mm256_set1_epi8(0x10)))
        } else {
            _mm256_loadu_si256(wq.add(blk + g * 4 * PANEL) as *const __m256i)
        }
    }
}

/// `blocks` packed 5-bit sub-blocks of 32 codes per column from `src` to a byte per code at
/// `dst` (the `BYTES` layout), 32 bytes a group.
///
/// # Safety
/// AVX2 is available; `src` holds `blocks` packed sub-blocks and `dst` room for their bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn expand_nib5_avx2(src: *const u8, blocks: usize, dst: *mut u8) {
    use std::arch::x86_64::*;
    const BLK: usize = 32 * PANEL;
    for b in 0..blocks {
        for g in 0..8 {
            unsafe {
                let v = load_group::<32, NIB5>(src, b * BLK, g);
                _mm256_storeu_si256(dst.add(b * BLK + g * 4 * PANEL) as *mut __m256i, v);
            }
        }
    }
}

/// Asks for sub-block `t` of the next tile's panels (`NP` panels on) while this tile reads its
/// own: at one row a tile is a few kB, and each new tile starts streams that the hardware
/// prefetchers would otherwise find only after a few misses. A hint: it never faults, and the
/// address may lie past the matrix (`wrapping_add`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead<const SB: usize, const CODES: u8, const NP: usize>(
    wq: *const u8,
    p: usize,
    nsb: usize,
    t: usize,
) {
    use std::arch::x86_64::*;
    let len = packed_len(CODES, SB * PANEL);
    for pp in 0..NP {
        let at = wq.wrapping_add(packed_len(CODES, ((p + NP + pp) * nsb + t) * SB * PANEL));
        let mut o = 0;
        while o < len {
            // SAFETY: prefetching is a hint and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(o).cast()) };
            o += 64;
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
    const CODES: u8,
    const SC: u8,
>(
    w: &PackedMatrix,
    src: Codes,
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
    let (wq, ws, wm) = (src.q, w.scale.ptrs(), w.min.ptrs());
    let (aq, ad, ac, asum) = (a.qs.as_ptr(), a.d.as_ptr(), a.corr.as_ptr(), a.sum.as_ptr());
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NP]; M];
        for t in 0..nsb {
            if M == 1 {
                prefetch_ahead::<SB, CODES, NP>(wq, p - src.p0, nsb, t);
            }
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
                    wv[pp] =
                        load_group::<SB, CODES>(wq, ((p + pp - src.p0) * nsb + t) * SB * PANEL, g);
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
                sv[pp] = load8::<SC>(ws, o);
                if MIN {
                    mv[pp] = load8::<SC>(wm, o);
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
    const CODES: u8,
    const SC: u8,
>(
    w: &PackedMatrix,
    src: Codes,
    a: &QuantRows,
    i: usize,
    p: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let k = a.k;
    let nsb = k / SB;
    let nqa = k / QA;
    let (wq, ws, wm) = (src.q, w.scale.ptrs(), w.min.ptrs());
    let (aq, ad, asum) = (a.qs.as_ptr(), a.d.as_ptr(), a.sum.as_ptr());
    unsafe {
        let zero = _mm256_set1_epi8(w.zero as i8);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NP]; M];
        for t in 0..nsb {
            if M == 1 {
                prefetch_ahead::<SB, CODES, NP>(wq, p - src.p0, nsb, t);
            }
            let mut ia = [[_mm256_setzero_si256(); NP]; M];
            for g in 0..SB / 4 {
                let mut wv = [_mm256_setzero_si256(); NP];
                let mut wabs = [_mm256_setzero_si256(); NP];
                for pp in 0..NP {
                    // q - zero fits in i8 for every format (-128..=127).
                    let raw =
                        load_group::<SB, CODES>(wq, ((p + pp - src.p0) * nsb + t) * SB * PANEL, g);
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
                sv[pp] = load8::<SC>(ws, o);
                if MIN {
                    mv[pp] = load8::<SC>(wm, o);
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
