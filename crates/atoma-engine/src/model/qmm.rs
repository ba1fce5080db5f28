//! `x @ W^T` for quantized weights on the CPU: weights repacked once at load into column panels
//! of 8-bit integers, multiplied by tiles of activation rows so each weight byte loaded serves
//! every row of the tile.
//!
//! Why by hand: candle 0.11.1's CPU `QMatMul` computes one dot product per (row, column),
//! re-decoding every weight block for every row of a batch, so a batch of 16 decodes costs
//! nearly 16 single decodes. Its repacked VNNI tiles only exist for Q8_0/Q4_0 with an inner
//! dimension that is a multiple of 256, and it takes different code paths (which round
//! differently) for one row and for several, which breaks batch invariance.
//!
//! Format. Every supported GGML type is an affine map of small integers per sub-block of 16 or
//! 32 values: `w = s * (q - z) + mn`, with `q` an unsigned byte, `z` a zero point fixed per type,
//! `s` a scale and `mn` an offset (only Q4_1, Q5_1 and the K-quants have one). `s` and `mn` are
//! exact in f32 (an f16 times a 6- or 8-bit integer), so the repacked matrix holds *exactly* the
//! weights of the file: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K. The bytes of 8
//! consecutive output columns are interleaved in groups of 4 (`[group][column][4]`), so one
//! 32-byte load holds 4 consecutive weights of 8 columns and a VNNI `vpdpbusd` with 4 broadcast
//! activation bytes adds one 4-term dot product into each of 8 column lanes. Types whose codes
//! have 4 bits (Q4_0, Q4_1, Q4_K) store two groups per 32-byte load, one in each nibble: a
//! single decode streams every weight from memory once, so bytes per weight set its speed. The
//! price is memory for the others: one byte per weight, and for all 4 (or 8) bytes of f32
//! scales per sub-block.
//!
//! Activations are quantized per row to 8 bits per 32 values (`scale = amax / 127`, rounded
//! through f16 as in ggml's Q8_0). For each output the kernel computes, per weight sub-block, the
//! exact integer `sum((q - z) * qa)` and then `acc = fma(float(dot), s * da, acc)` (and
//! `acc = fma(float(sum qa), mn * da, acc)` where there is an offset), one f32 lane per column,
//! sub-blocks in order. That sequence does not depend on the tile, the number of rows, the
//! thread split or the instruction set (AVX-512 VNNI, AVX2, scalar give the same bits; tested),
//! so a request's logits never depend on what else is in the batch.

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::OutPtr;

/// Activation quantization block (values per activation scale).
const QA: usize = 32;
/// Output columns per panel (lanes of one 256-bit register of f32).
const PANEL: usize = 8;
/// Activation rows per register tile.
const RM: usize = 4;
/// Panels per register tile.
const RP: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Vnni,
    Avx2,
    Scalar,
}

pub(crate) fn level() -> Level {
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

/// Name of the kernel in use (for logs and benchmarks).
pub(crate) fn kernel_name() -> &'static str {
    match level() {
        Level::Vnni => "avx512-vnni",
        Level::Avx2 => "avx2",
        Level::Scalar => "scalar",
    }
}

/// Compute threads (candle's count reads the environment and /proc on every call; once here).
pub(crate) fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// A weight matrix `[n, k]` repacked into 8-column panels of bytes (see the module doc).
pub(crate) struct PackedMatrix {
    n: usize,
    k: usize,
    /// Values per sub-block (one scale): 16 or 32.
    sb: usize,
    /// Zero point subtracted from every stored byte.
    zero: i32,
    /// `[panel][sub-block][group of 4][column][4]` bytes, or for 4-bit types (`nib`)
    /// `[panel][sub-block][pair of groups][column][4]` bytes holding group `2h` in the low
    /// nibble and group `2h + 1` in the high one.
    q: Vec<u8>,
    /// Codes are 4-bit (Q4_0, Q4_1, Q4_K): two per byte, half the memory traffic.
    nib: bool,
    /// `[panel][sub-block][column]` scales.
    scale: Vec<f32>,
    /// `[panel][sub-block][column]` offsets; empty for types without one.
    min: Vec<f32>,
    dtype: GgmlDType,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("dtype", &self.dtype)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// One row of a matrix unpacked: bytes, and a scale and offset per sub-block.
struct RowCodes {
    q: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
}

/// Layout of a GGML type in the packed format: `(sub-block, zero point, has offset)`.
fn format_of(dtype: GgmlDType) -> Option<(usize, i32, bool)> {
    Some(match dtype {
        GgmlDType::Q8_0 => (32, 128, false),
        GgmlDType::Q4_0 => (32, 8, false),
        GgmlDType::Q5_0 => (32, 16, false),
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => (32, 0, true),
        GgmlDType::Q4K | GgmlDType::Q5K => (32, 0, true),
        GgmlDType::Q6K => (16, 32, false),
        _ => return None,
    })
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Code `l` of column `c` in group `g` of one packed sub-block `qb` (its bytes, halved for
/// nibbles): the layout of `PackedMatrix::q`, read one value at a time.
#[inline(always)]
fn code_at(qb: &[u8], nib: bool, g: usize, c: usize, l: usize) -> u8 {
    if nib {
        let b = qb[g / 2 * 4 * PANEL + c * 4 + l];
        if g.is_multiple_of(2) { b & 0xF } else { b >> 4 }
    } else {
        qb[g * 4 * PANEL + c * 4 + l]
    }
}

/// Whether `dtype`'s codes fit in 4 bits (stored two per byte).
fn nibbles(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K)
}

/// Decodes one row of raw GGML blocks into bytes and per-sub-block scales and offsets.
fn unpack_row(dtype: GgmlDType, raw: &[u8], k: usize) -> RowCodes {
    let (sb, _, has_min) = format_of(dtype).expect("supported type");
    let mut q = vec![0u8; k];
    let mut scale = vec![0f32; k / sb];
    let mut min = if has_min {
        vec![0f32; k / sb]
    } else {
        Vec::new()
    };
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    for (bi, b) in raw.chunks_exact(ts).enumerate() {
        let q = &mut q[bi * bs..(bi + 1) * bs];
        let s0 = bi * bs / sb;
        match dtype {
            GgmlDType::Q8_0 => {
                scale[s0] = f16_at(b, 0);
                for (d, &v) in q.iter_mut().zip(&b[2..34]) {
                    *d = (v as i8 as i32 + 128) as u8;
                }
            }
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                scale[s0] = f16_at(b, 0);
                let qs = if dtype == GgmlDType::Q4_1 {
                    min[s0] = f16_at(b, 2);
                    &b[4..20]
                } else {
                    &b[2..18]
                };
                for (j, &v) in qs.iter().enumerate() {
                    q[j] = v & 0xF;
                    q[j + 16] = v >> 4;
                }
            }
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                scale[s0] = f16_at(b, 0);
                let o = if dtype == GgmlDType::Q5_1 {
                    min[s0] = f16_at(b, 2);
                    4
                } else {
                    2
                };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                for (j, &v) in b[o + 4..o + 20].iter().enumerate() {
                    q[j] = (v & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                    q[j + 16] = (v >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
            }
            GgmlDType::Q4K | GgmlDType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if dtype == GgmlDType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                for c in 0..4 {
                    for h in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + h, scales);
                        scale[s0 + 2 * c + h] = d * f32::from(sc);
                        min[s0 + 2 * c + h] = -(dmin * f32::from(m));
                        for l in 0..32 {
                            let nib = if h == 0 {
                                qs[32 * c + l] & 0xF
                            } else {
                                qs[32 * c + l] >> 4
                            };
                            let hi = qh.map_or(0, |qh| ((qh[l] >> (2 * c + h)) & 1) << 4);
                            q[64 * c + 32 * h + l] = nib | hi;
                        }
                    }
                }
            }
            GgmlDType::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for (i, &s) in sc.iter().enumerate() {
                    scale[s0 + i] = d * f32::from(s as i8);
                }
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let q = &mut q[128 * half..];
                    for l in 0..32 {
                        q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
            }
            _ => unreachable!("checked by format_of"),
        }
    }
    RowCodes { q, scale, min }
}

impl PackedMatrix {
    /// Whether `dtype` weights of inner size `k` can be packed.
    pub(crate) fn supports(dtype: GgmlDType, k: usize) -> bool {
        format_of(dtype).is_some() && k.is_multiple_of(dtype.block_size()) && k > 0
    }

    /// Repacks `n` rows of raw GGML blocks of type `dtype` (each row `k` values).
    pub(crate) fn pack(dtype: GgmlDType, raw: &[u8], n: usize, k: usize) -> Self {
        assert!(Self::supports(dtype, k), "cannot pack {dtype:?} with k={k}");
        let (sb, zero, has_min) = format_of(dtype).expect("supported");
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        assert_eq!(raw.len(), n * row_bytes, "weight size");
        let panels = n.div_ceil(PANEL);
        let nsb = k / sb;
        // Padding columns: byte `zero` with scale 0 (their outputs are never stored).
        let mut q = vec![zero as u8; panels * k * PANEL];
        let mut scale = vec![0f32; panels * nsb * PANEL];
        let mut min = if has_min {
            vec![0f32; panels * nsb * PANEL]
        } else {
            Vec::new()
        };
        for col in 0..n {
            let codes = unpack_row(dtype, &raw[col * row_bytes..(col + 1) * row_bytes], k);
            debug_assert!(!nibbles(dtype) || codes.q.iter().all(|&b| b < 16));
            let (p, c) = (col / PANEL, col % PANEL);
            for t in 0..nsb {
                let o = (p * nsb + t) * PANEL + c;
                scale[o] = codes.scale[t];
                if has_min {
                    min[o] = codes.min[t];
                }
                for g in 0..sb / 4 {
                    let dst = (p * nsb + t) * sb * PANEL + g * 4 * PANEL + c * 4;
                    let src = t * sb + g * 4;
                    q[dst..dst + 4].copy_from_slice(&codes.q[src..src + 4]);
                }
            }
        }
        let nib = nibbles(dtype);
        if nib {
            // Each sub-block's 8 groups of 32 bytes become 4 pairs: low nibble = group 2h,
            // high nibble = group 2h + 1.
            let half = 4 * PANEL;
            q = q
                .chunks_exact(sb * PANEL)
                .flat_map(|blk| {
                    blk.chunks_exact(2 * half)
                        .flat_map(|pair| (0..half).map(move |j| pair[j] | (pair[half + j] << 4)))
                })
                .collect();
        }
        Self {
            n,
            k,
            sb,
            zero,
            q,
            nib,
            scale,
            min,
            dtype,
        }
    }

    pub(crate) fn n(&self) -> usize {
        self.n
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Row `col` of the weight matrix, dequantized (exact).
    #[cfg(test)]
    pub(crate) fn dequantize_row(&self, col: usize) -> Vec<f32> {
        let nsb = self.k / self.sb;
        let (p, c) = (col / PANEL, col % PANEL);
        let mut out = vec![0f32; self.k];
        for t in 0..nsb {
            let o = (p * nsb + t) * PANEL + c;
            for e in 0..self.sb {
                let (g, l) = (e / 4, e % 4);
                let blk = (p * nsb + t) * self.sb * PANEL;
                let qb = if self.nib {
                    &self.q[blk / 2..]
                } else {
                    &self.q[blk..]
                };
                let byte = code_at(qb, self.nib, g, c, l);
                let mut v = self.scale[o] * (i32::from(byte) - self.zero) as f32;
                if !self.min.is_empty() {
                    v += self.min[o];
                }
                out[t * self.sb + e] = v;
            }
        }
        out
    }

    /// `out[m, n] = x[m, k] @ W^T`.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_with(level(), x, out);
    }

    #[cfg(test)]
    pub(crate) fn matmul_with(&self, lvl: Level, x: &[f32], out: &mut [f32]) {
        assert!(x.len().is_multiple_of(self.k), "activation size");
        assert_eq!(out.len(), x.len() / self.k * self.n, "output size");
        // SAFETY: `out` holds the m x n outputs (checked above).
        unsafe { self.matmul_raw(lvl, x, out.as_mut_ptr()) }
    }

    /// `x @ W^T` into a new vector, without zeroing it first: the tiles store every output
    /// (zeroing a prefill step's outputs was a serial memset on the engine thread while the other
    /// compute threads waited).
    pub(crate) fn matmul_vec(&self, x: &[f32]) -> Vec<f32> {
        assert!(x.len().is_multiple_of(self.k), "activation size");
        let len = x.len() / self.k * self.n;
        let mut out = Vec::<f32>::with_capacity(len);
        // SAFETY: the buffer holds `len` = m x n values; `matmul_raw` stores every one of them
        // (every row block times every panel, the last panel cut at column n), so all `len`
        // elements are initialized before `set_len`.
        unsafe {
            self.matmul_raw(level(), x, out.as_mut_ptr());
            out.set_len(len);
        }
        out
    }

    /// # Safety
    /// `out` must be valid for writes of `x.len() / k * n` values. Every one of them is written.
    unsafe fn matmul_raw(&self, lvl: Level, x: &[f32], out: *mut f32) {
        let (n, k) = (self.n, self.k);
        assert!(x.len().is_multiple_of(k), "activation size");
        let m = x.len() / k;
        if m == 0 {
            return;
        }
        let a = quantize_rows(lvl, x, k, self.sb, self.zero);
        let ptr = OutPtr(out);
        let tiles = n.div_ceil(PANEL * RP);
        // Enough chunks to balance the threads, few enough to amortize waking them.
        let chunks = (threads() * 4).min(tiles).max(1);
        let per = tiles.div_ceil(chunks);
        let run = |c: usize| {
            let p0 = c * per * RP;
            let p1 = ((c + 1) * per * RP).min(n.div_ceil(PANEL));
            let mut p = p0;
            while p < p1 {
                let np = RP.min(p1 - p);
                let mut i = 0;
                while i < m {
                    let rm = RM.min(m - i);
                    // SAFETY: outputs (i..i+rm, panels p..p+np) are written by this call only;
                    // sizes were checked above.
                    unsafe { self.tile(lvl, &a, i, rm, p, np, ptr.get()) };
                    i += rm;
                }
                p += np;
            }
        };
        if chunks == 1 {
            run(0);
        } else {
            // candle's persistent spinning pool: waking it costs far less than a rayon
            // fork-join, which matters for the many small matmuls of a decode step.
            candle_core::utils::barrier_pool().execute_chunked(chunks, |range| range.for_each(run));
        }
    }

    /// One tile: rows `i..i+rm`, panels `p..p+np`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        lvl: Level,
        a: &QuantRows,
        i: usize,
        rm: usize,
        p: usize,
        np: usize,
        out: *mut f32,
    ) {
        macro_rules! go {
            ($f:ident, $sb:literal, $min:literal, $nib:literal) => {
                match (rm, np) {
                    (4, 2) => $f::<4, 2, $sb, $min, $nib>(self, a, i, p, out),
                    (3, 2) => $f::<3, 2, $sb, $min, $nib>(self, a, i, p, out),
                    (2, 2) => $f::<2, 2, $sb, $min, $nib>(self, a, i, p, out),
                    (1, 2) => $f::<1, 2, $sb, $min, $nib>(self, a, i, p, out),
                    (4, _) => $f::<4, 1, $sb, $min, $nib>(self, a, i, p, out),
                    (3, _) => $f::<3, 1, $sb, $min, $nib>(self, a, i, p, out),
                    (2, _) => $f::<2, 1, $sb, $min, $nib>(self, a, i, p, out),
                    _ => $f::<1, 1, $sb, $min, $nib>(self, a, i, p, out),
                }
            };
        }
        macro_rules! by_format {
            ($f:ident) => {
                match (self.sb, self.min.is_empty(), self.nib) {
                    (32, true, true) => go!($f, 32, false, true),
                    (32, false, true) => go!($f, 32, true, true),
                    (32, true, false) => go!($f, 32, false, false),
                    (32, false, false) => go!($f, 32, true, false),
                    (16, true, _) => go!($f, 16, false, false),
                    _ => go!($f, 16, true, false),
                }
            };
        }
        unsafe {
            match lvl {
                #[cfg(target_arch = "x86_64")]
                Level::Vnni => by_format!(tile_vnni),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => by_format!(tile_avx2),
                _ => by_format!(tile_scalar),
            }
        }
    }
}

/// Activations quantized to 8 bits per 32 values, with per-sub-block sums.
struct QuantRows {
    k: usize,
    /// `[m][k]` quantized values.
    qs: Vec<i8>,
    /// `[m][k / 32]` scales (f16-rounded, as ggml's Q8_0).
    d: Vec<f32>,
    /// `[m][k / sb]`: `-zero * sum(qa)` over each weight sub-block (the zero-point correction
    /// that starts the integer dot product).
    corr: Vec<i32>,
    /// `[m][k / sb]`: `sum(qa)` as f32 (for weight offsets).
    sum: Vec<f32>,
}

fn quantize_rows(lvl: Level, x: &[f32], k: usize, sb: usize, zero: i32) -> QuantRows {
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
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
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
unsafe fn quantize_block_avx2(xb: &[f32], qb: &mut [i8]) -> f32 {
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

#[allow(clippy::needless_range_loop)]
unsafe fn tile_scalar<
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
                    *v = (dot as f32).mul_add(w.scale[base + c] * da, *v);
                    if MIN {
                        *v = a.sum[row * nsb + t].mul_add(w.min[base + c] * da, *v);
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
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn tile_vnni<
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
    let (wq, ws, wm) = (w.q.as_ptr(), w.scale.as_ptr(), w.min.as_ptr());
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
                sv[pp] = _mm256_loadu_ps(ws.add(o));
                if MIN {
                    mv[pp] = _mm256_loadu_ps(wm.add(o));
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
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<
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
    let (wq, ws, wm) = (w.q.as_ptr(), w.scale.as_ptr(), w.min.as_ptr());
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
                sv[pp] = _mm256_loadu_ps(ws.add(o));
                if MIN {
                    mv[pp] = _mm256_loadu_ps(wm.add(o));
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    const TYPES: [GgmlDType; 8] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn pattern(len: usize, seed: usize, amp: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 2654435761 + seed * 40503) % 1009) as f32 / 1009.0 - 0.5) * amp)
            .collect()
    }

    fn quantized(dtype: GgmlDType, n: usize, k: usize) -> QTensor {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pattern(n * k, 7, 0.4), (n, k), &dev).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The repacked weights are exactly candle's dequantized weights, for every type.
    #[test]
    fn packing_is_exact() {
        let (n, k) = (11, 512);
        for dtype in TYPES {
            let qt = quantized(dtype, n, k);
            let deq = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let packed = PackedMatrix::pack(dtype, &qt.data().unwrap(), n, k);
            for (col, want) in deq.iter().enumerate() {
                let got = packed.dequantize_row(col);
                for (e, (g, w)) in got.iter().zip(want).enumerate() {
                    // Identical up to the rounding of candle's `d * sc * q - m` (one f32 op
                    // apart at most).
                    assert!(
                        (g - w).abs() <= w.abs() * 2e-7 + 1e-9,
                        "{dtype:?} [{col},{e}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Every type, tile shape and kernel level: close to the exact product with the
    /// dequantized weights, the same bits on every level, and each row's bits independent of
    /// the other rows.
    #[test]
    fn every_type_tile_and_level_agree_and_rows_are_independent() {
        let (n, k) = (21, 512);
        let mut levels = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Level::Avx2);
            }
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                levels.push(Level::Vnni);
            }
        }
        for dtype in TYPES {
            let qt = quantized(dtype, n, k);
            let packed = PackedMatrix::pack(dtype, &qt.data().unwrap(), n, k);
            let deq: Vec<Vec<f32>> = (0..n).map(|c| packed.dequantize_row(c)).collect();
            for m in [1usize, 2, 5, 9] {
                let x = pattern(m * k, m, 3.0);
                let mut first: Option<Vec<f32>> = None;
                for &lvl in &levels {
                    let mut out = vec![0f32; m * n];
                    packed.matmul_with(lvl, &x, &mut out);
                    for r in 0..m {
                        for c in 0..n {
                            let xr = &x[r * k..(r + 1) * k];
                            let want: f32 = xr.iter().zip(&deq[c]).map(|(a, b)| a * b).sum();
                            let mag: f32 = xr.iter().zip(&deq[c]).map(|(a, b)| (a * b).abs()).sum();
                            let got = out[r * n + c];
                            // Activation quantization: about 1% of the magnitude.
                            assert!(
                                (want - got).abs() <= 0.02 * mag + 1e-6,
                                "{dtype:?} {lvl:?} m={m} ({r},{c}): {want} vs {got}"
                            );
                        }
                        let mut alone = vec![0f32; n];
                        packed.matmul_with(lvl, &x[r * k..(r + 1) * k], &mut alone);
                        assert_eq!(
                            alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            out[r * n..(r + 1) * n]
                                .iter()
                                .map(|v| v.to_bits())
                                .collect::<Vec<_>>(),
                            "{dtype:?} {lvl:?}: row {r} of {m} depends on its batch"
                        );
                    }
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert_eq!(
                            f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{dtype:?} m={m}: {lvl:?} differs from the scalar kernel"
                        ),
                    }
                }
            }
        }
    }

    /// The vectorized activation quantization gives the scalar one's bytes and scale.
    #[test]
    fn activation_quantization_is_the_same_on_every_level() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            for seed in 0..50 {
                let mut xb = pattern(QA, seed, 10.0 + seed as f32);
                // Ties: values exactly half-way between two steps after scaling.
                xb[0] = 127.0;
                xb[1] = 0.5;
                xb[2] = -2.5;
                xb[3] = 3.5;
                if seed == 7 {
                    xb.iter_mut().for_each(|v| *v = 0.0);
                }
                let (mut a, mut b) = ([0i8; QA], [0i8; QA]);
                let sa = quantize_block(&xb, &mut a);
                // SAFETY: AVX2 detected above.
                let sb = unsafe { quantize_block_avx2(&xb, &mut b) };
                assert_eq!(a, b, "seed {seed}");
                assert_eq!(sa.to_bits(), sb.to_bits());
            }
        }
    }

    /// Kernel timings on the shapes of SmolLM2 and Gemma 3 (`cargo test --release -p
    /// atoma-engine qmm::tests::timings -- --ignored --nocapture`); prints, asserts nothing.
    #[test]
    #[ignore = "benchmark: prints figures"]
    #[allow(clippy::print_stderr)]
    fn timings() {
        let shapes = [
            (GgmlDType::Q8_0, 576usize, 576usize),
            (GgmlDType::Q8_0, 1536, 576),
            (GgmlDType::Q8_0, 49152, 576),
            (GgmlDType::Q5_0, 2048, 640),
            (GgmlDType::Q4K, 640, 1024),
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 4608, 576),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q8_0, 262144, 640),
        ];
        for (dtype, n, k) in shapes {
            let qt = quantized(dtype, n, k);
            let packed = PackedMatrix::pack(dtype, &qt.data().unwrap(), n, k);
            for m in [1usize, 4, 16, 64] {
                let x = pattern(m * k, 3, 2.0);
                let mut out = vec![0f32; m * n];
                packed.matmul(&x, &mut out);
                let reps = (2_000_000_000 / (m * n * k)).clamp(3, 2000);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    packed.matmul(&x, &mut out);
                }
                let dt = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!(
                    "{dtype:?} {n:>6}x{k:<4} m={m:<3} {:>9.1} us  {:>6.1} GMAC/s",
                    dt * 1e6,
                    (m * n * k) as f64 / dt / 1e9
                );
            }
        }
    }
}
