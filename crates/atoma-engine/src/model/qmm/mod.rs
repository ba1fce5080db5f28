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
//! have 4 bits (Q4_0, Q4_1, Q4_K) store two groups per 32-byte load, one in each nibble; 5-bit
//! types (Q5_0, Q5_1, Q5_K) the same nibbles plus a 32-byte plane of fifth bits per sub-block: a
//! single decode streams every weight from memory once, so bytes per weight set its speed.
//! Scales stream as the file keeps them (f16; the K-quants' as a byte per sub-block and an f16
//! per super-block, `huge::Scales`), so every type but Q6_K (a byte per code) streams exactly
//! the file's bytes. Prefill expands 5-bit codes to bytes once per panel (`expand_panels`);
//! decode expands them in registers and reads each thread's grabs as sequential streams
//! (one-panel tiles, the next tile prefetched: `matmul_raw`, `tiles::prefetch_ahead`).
//!
//! Activations are quantized per row to 8 bits per 32 values (`scale = amax / 127`, rounded
//! through f16 as in ggml's Q8_0). For each output the kernel computes, per weight sub-block, the
//! exact integer `sum((q - z) * qa)` and then `acc = fma(float(dot), s * da, acc)` (and
//! `acc = fma(float(sum qa), mn * da, acc)` where there is an offset), one f32 lane per column,
//! sub-blocks in order. That sequence does not depend on the tile, the number of rows, the
//! thread split or the instruction set (AVX-512 VNNI, AVX2, scalar give the same bits; tested),
//! so a request's logits never depend on what else is in the batch.
//!
//! Files: this one holds `PackedMatrix`, its layout and the dispatch of a product over tiles and
//! threads; `pack` repacks each GGUF type exactly into that layout; `quant` quantizes the
//! activation rows; `tiles` holds the register tiles of each level (VNNI, AVX2, scalar).

mod huge;
mod pack;
mod quant;
mod tiles;

use candle_core::quantized::GgmlDType;

use super::cpu::{Level, OutPtr, level, threads};
use huge::{SC_ANY, SC_F16, SC_FACTORED, Scales, Streamed};
use quant::{QuantRows, quantize_rows};
use tiles::tile_scalar;
#[cfg(target_arch = "x86_64")]
use tiles::{tile_avx2, tile_vnni};

/// Activation quantization block (values per activation scale).
const QA: usize = 32;
/// Output columns per panel (lanes of one 256-bit register of f32).
const PANEL: usize = 8;
/// Activation rows per register tile.
const RM: usize = 4;
/// Panels per register tile of a prompt product, by level: VNNI has 32 vector registers, room
/// for 4 x 3 accumulators and as many integer sums (6-10% faster per thread than 4 x 2 on every
/// type here, `tests::prefill_costs`); AVX2 has 16, enough for 4 x 2.
fn tile_panels(lvl: Level) -> usize {
    if lvl == Level::Vnni { 3 } else { 2 }
}

/// How a matrix stores its codes (`PackedMatrix::codes`, the tiles' `CODES` parameter).
/// One byte per code.
const BYTES: u8 = 0;
/// 4-bit codes, two per byte: group `2h` in the low nibbles, `2h + 1` in the high ones.
const NIB: u8 = 1;
/// 5-bit codes: the low 4 bits as `NIB`, then per sub-block a 32-byte plane of the fifth bits
/// (bit `g` of plane byte `j` is the fifth bit of byte `j` of group `g`): the file's 5.5 bits
/// per weight instead of 8.5.
const NIB5: u8 = 2;

/// Bytes of one packed sub-block of one panel, given its unpacked size `bytes` (`sb * PANEL`).
#[inline(always)]
const fn packed_len(codes: u8, bytes: usize) -> usize {
    match codes {
        NIB => bytes / 2,
        NIB5 => bytes / 8 * 5,
        _ => bytes,
    }
}

/// Where a tile reads its codes: the matrix's own storage (`p0` = 0), or panels expanded for a
/// chunk (`p0` = the first panel held).
#[derive(Clone, Copy)]
pub(super) struct Codes {
    pub(super) q: *const u8,
    pub(super) p0: usize,
    pub(super) codes: u8,
}

/// Hands the units `bounds[0]..bounds[last]` (segments `bounds[j]..bounds[j + 1]`, one per
/// product) to the compute threads as ranges `run(start, end)` that never cross a segment end:
/// each grab takes a `1 / (2 × threads)` share of what is left, at least `min` units (guided
/// self-scheduling). The first grabs are long, so each thread reads long sequential streams of
/// weights, as the prefetchers like; the last are short, so the threads finish together. (Fixed
/// chunks left one thread waiting for up to a whole chunk whenever the two ran at different
/// speeds: on the Gemma 3 head an eighth of 168 MB, most of a millisecond.) Prompt products too:
/// their units are tiles of a few panels times all the rows, and fixed chunks (4 per thread)
/// could leave a thread idle for up to a chunk at the end of every product (`tests::
/// prefill_costs` compares a product on all threads with its tiles on one). Which thread runs a
/// tile never changes its arithmetic, so the bits do not depend on the split.
fn guided(bounds: &[usize], min: usize, run: impl Fn(usize, usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (Some(&first), Some(&total)) = (bounds.first(), bounds.last()) else {
        return;
    };
    if total <= first {
        return;
    }
    let share = 2 * threads();
    let grab = |cursor: &AtomicUsize| -> Option<(usize, usize)> {
        let mut cur = cursor.load(Ordering::Relaxed);
        loop {
            if cur >= total {
                return None;
            }
            let seg_end = bounds[bounds.partition_point(|b| *b <= cur)];
            let size = ((total - cur) / share).max(min);
            let end = (cur + size).min(seg_end);
            match cursor.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some((cur, end)),
                Err(now) => cur = now,
            }
        }
    };
    let cursor = AtomicUsize::new(first);
    if total - first <= min {
        // Too little to share: inline, one segment at a time.
        for s in bounds.windows(2).filter(|s| s[0] < s[1]) {
            run(s[0], s[1]);
        }
        return;
    }
    candle_core::utils::barrier_pool().execute(|_| {
        while let Some((a, b)) = grab(&cursor) {
            run(a, b);
        }
    });
}

/// A weight matrix `[n, k]` repacked into 8-column panels of bytes (see the module doc).
pub(crate) struct PackedMatrix {
    n: usize,
    k: usize,
    /// Values per sub-block (one scale): 16 or 32.
    sb: usize,
    /// Zero point subtracted from every stored byte.
    zero: i32,
    /// `[panel][sub-block][group of 4][column][4]` bytes (`BYTES`); for 4-bit types (`NIB`)
    /// `[panel][sub-block][pair of groups][column][4]` bytes holding group `2h` in the low
    /// nibble and group `2h + 1` in the high one; for 5-bit types (`NIB5`) each sub-block's
    /// nibbles followed by its plane of fifth bits.
    q: Streamed<u8>,
    /// `BYTES`, `NIB` (Q4_0, Q4_1, Q4_K) or `NIB5` (Q5_0, Q5_1, Q5_K).
    codes: u8,
    /// `[panel][sub-block][column]` scales.
    scale: Scales,
    /// `[panel][sub-block][column]` offsets; empty for types without one.
    min: Scales,
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

/// Code `l` of column `c` in group `g` of one packed sub-block `qb` (its bytes, as `codes`
/// stores them): the layout of `PackedMatrix::q`, read one value at a time.
#[inline(always)]
fn code_at(qb: &[u8], codes: u8, sb: usize, g: usize, c: usize, l: usize) -> u8 {
    let j = c * 4 + l;
    if codes == BYTES {
        return qb[g * 4 * PANEL + j];
    }
    let b = qb[g / 2 * 4 * PANEL + j];
    let low = if g.is_multiple_of(2) { b & 0xF } else { b >> 4 };
    if codes == NIB5 {
        low | (((qb[sb * PANEL / 2 + j] >> g) & 1) << 4)
    } else {
        low
    }
}

impl PackedMatrix {
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Bytes a product streams from memory: the packed codes, scales and offsets.
    pub(crate) fn bytes(&self) -> usize {
        self.q.len() + self.scale.bytes() + self.min.bytes()
    }

    /// Bytes of the same weights in the GGUF file's own blocks.
    pub(crate) fn file_bytes(&self) -> usize {
        self.n * self.k / self.dtype.block_size() * self.dtype.type_size()
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
                let qb = &self.q[packed_len(self.codes, blk)..];
                let byte = code_at(qb, self.codes, self.sb, g, c, l);
                let mut v = self.scale.get(o) * (i32::from(byte) - self.zero) as f32;
                if !self.min.is_empty() {
                    v += self.min.get(o);
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

    /// Several products of the same input `x` (`[m, k]`): Q, K and V, or gate and up. The input
    /// is quantized once per weight format (sub-block size and zero point), and the threads are
    /// woken once for all the products' tiles instead of once per product: at batch 1 a
    /// dispatch costs about as much as a small product's arithmetic. Every output is the same
    /// bits as `matmul_vec` gives (each tile's arithmetic does not depend on who runs it).
    pub(crate) fn matmul_many(ws: &[&PackedMatrix], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = ws.first() else {
            return Vec::new();
        };
        let k = first.k;
        assert!(ws.iter().all(|w| w.k == k), "one input for every product");
        assert!(x.len().is_multiple_of(k), "activation size");
        let m = x.len() / k;
        let lvl = level();
        let mut quantized: Vec<(usize, i32, QuantRows)> = Vec::new();
        let which: Vec<usize> = ws
            .iter()
            .map(|w| {
                match quantized
                    .iter()
                    .position(|(sb, z, _)| (*sb, *z) == (w.sb, w.zero))
                {
                    Some(i) => i,
                    None => {
                        quantized.push((w.sb, w.zero, quantize_rows(lvl, x, k, w.sb, w.zero)));
                        quantized.len() - 1
                    }
                }
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
        let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
        if m > 0 {
            // Units of every product in one sequence (tiles of `rp` panels), handed out largest
            // first (see `guided`); a grab never crosses from one product into the next.
            let rp = if m <= 2 { 1 } else { tile_panels(lvl) };
            let mut bounds = Vec::with_capacity(ws.len() + 1);
            let mut units = 0;
            for w in ws {
                bounds.push(units);
                units += w.n.div_ceil(PANEL * rp);
            }
            bounds.push(units);
            let min = if m <= 2 { first.min_grab() } else { 1 };
            guided(&bounds, min, |u0, u1| {
                let j = bounds.partition_point(|b| *b <= u0) - 1;
                let panels = ws[j].n.div_ceil(PANEL);
                // SAFETY: each output buffer holds m x n values (capacity above); the grab
                // covers panels of product j only, and grabs are disjoint.
                unsafe {
                    ws[j].run_panels(
                        lvl,
                        &quantized[which[j]].2,
                        m,
                        rp,
                        (u0 - bounds[j]) * rp,
                        ((u1 - bounds[j]) * rp).min(panels),
                        ptrs[j].get(),
                    )
                };
            });
        }
        for (o, w) in outs.iter_mut().zip(ws) {
            // SAFETY: every unit of every product ran, and together they store all m x n
            // outputs of their product (see `matmul_raw`).
            unsafe { o.set_len(m * w.n) };
        }
        outs
    }

    /// The fewest panels a decode thread takes at once: about 16 KiB of codes, so even the last
    /// grabs of a product stream a while between two updates of the shared cursor.
    fn min_grab(&self) -> usize {
        let panel = packed_len(self.codes, PANEL * self.k).max(1);
        (16usize << 10).div_ceil(panel).max(1)
    }

    /// Panels `p0..p1` (tiles of `rp` panels), all rows.
    ///
    /// # Safety
    /// `out` must be valid for writes of `m * n` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_panels(
        &self,
        lvl: Level,
        a: &QuantRows,
        m: usize,
        rp: usize,
        p0: usize,
        p1: usize,
        out: *mut f32,
    ) {
        // 5-bit codes for several row tiles: each tile's panels are first expanded to a byte
        // per code (in L1), so the expansion is paid once per panel instead of once per row
        // tile; one row tile expands in registers. Same codes either way, so the same bits.
        let expand = self.codes == NIB5 && m > RM;
        let mut scratch = Vec::new();
        let mut p = p0;
        while p < p1 {
            let np = rp.min(p1 - p);
            let src = if expand {
                self.expand_panels(p, np, &mut scratch);
                Codes {
                    q: scratch.as_ptr(),
                    p0: p,
                    codes: BYTES,
                }
            } else {
                Codes {
                    q: self.q.as_ptr(),
                    p0: 0,
                    codes: self.codes,
                }
            };
            let mut i = 0;
            while i < m {
                let rm = RM.min(m - i);
                // SAFETY: outputs (i..i+rm, panels p..p+np) are written by this call only; the
                // caller gives room for all m x n; `src` holds panels p..p+np.
                unsafe { self.tile(lvl, a, i, rm, p, np, src, out) };
                i += rm;
            }
            p += np;
        }
    }

    /// Panels `p..p + np` with a byte per code (`BYTES` layout, panel `p` first) into `buf`.
    fn expand_panels(&self, p: usize, np: usize, buf: &mut Vec<u8>) {
        let nsb = self.k / self.sb;
        let blk = self.sb * PANEL;
        buf.clear();
        buf.resize(np * nsb * blk, 0);
        #[cfg(target_arch = "x86_64")]
        if self.codes == NIB5 && self.sb == 32 && level() != Level::Scalar {
            // SAFETY: AVX2 is available on every level but scalar; `buf` holds the np * nsb
            // expanded sub-blocks and the matrix the packed ones from panel p on.
            unsafe {
                tiles::expand_nib5_avx2(
                    self.q.as_ptr().add(packed_len(NIB5, p * nsb * blk)),
                    np * nsb,
                    buf.as_mut_ptr(),
                )
            };
            return;
        }
        for (b, dst) in buf.chunks_exact_mut(blk).enumerate() {
            let src = &self.q[packed_len(self.codes, (p * nsb + b) * blk)..];
            for (j, d) in dst.iter_mut().enumerate() {
                let (g, cl) = (j / (4 * PANEL), j % (4 * PANEL));
                *d = code_at(src, self.codes, self.sb, g, cl / 4, cl % 4);
            }
        }
    }

    /// # Safety
    /// `out` must be valid for writes of `x.len() / k * n` values. Every one of them is written.
    unsafe fn matmul_raw(&self, lvl: Level, x: &[f32], out: *mut f32) {
        let k = self.k;
        assert!(x.len().is_multiple_of(k), "activation size");
        let m = x.len() / k;
        if m == 0 {
            return;
        }
        let a = quantize_rows(lvl, x, k, self.sb, self.zero);
        let ptr = OutPtr(out);
        // Decode (one or two rows): one-panel tiles, so each thread reads its grabs as single
        // sequential streams, as the prefetchers like; a panel's bytes are contiguous (the
        // Gemma 3 head went from ~22 to ~30 GB/s on 2 threads here, against two-panel tiles
        // that restart two streams every tile). More rows: the widest tile the level has, so
        // each activation load serves more columns. A column's arithmetic is the same in any
        // tile, so the bits are too.
        let rp = if m <= 2 { 1 } else { tile_panels(lvl) };
        let panels = self.n.div_ceil(PANEL);
        let min = if m <= 2 { self.min_grab() } else { 1 };
        // SAFETY: the caller gives room for m x n outputs; grabs write disjoint panels.
        guided(&[0, panels.div_ceil(rp)], min, |u0, u1| unsafe {
            self.run_panels(lvl, &a, m, rp, u0 * rp, (u1 * rp).min(panels), ptr.get())
        });
    }

    /// One tile: rows `i..i+rm`, panels `p..p+np`, codes read from `src`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        lvl: Level,
        a: &QuantRows,
        i: usize,
        rm: usize,
        p: usize,
        np: usize,
        src: Codes,
        out: *mut f32,
    ) {
        macro_rules! go {
            ($f:ident, $sb:literal, $min:literal, $codes:expr, $sc:expr) => {
                match (rm, np) {
                    (4, 2) => $f::<4, 2, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (3, 2) => $f::<3, 2, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (2, 2) => $f::<2, 2, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (1, 2) => $f::<1, 2, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (4, _) => $f::<4, 1, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (3, _) => $f::<3, 1, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (2, _) => $f::<2, 1, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    _ => $f::<1, 1, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                }
            };
        }
        // Three-panel tiles exist on VNNI only (`tile_panels`).
        #[cfg(target_arch = "x86_64")]
        macro_rules! go3 {
            ($f:ident, $sb:literal, $min:literal, $codes:expr, $sc:expr) => {
                match (rm, np) {
                    (4, 3) => $f::<4, 3, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (3, 3) => $f::<3, 3, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (2, 3) => $f::<2, 3, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    (1, 3) => $f::<1, 3, $sb, $min, $codes, $sc>(self, src, a, i, p, out),
                    _ => go!($f, $sb, $min, $codes, $sc),
                }
            };
        }
        macro_rules! by_codes {
            ($go:ident, $f:ident, $sc:expr) => {
                match (self.sb, self.min.is_empty(), src.codes) {
                    (32, true, NIB) => $go!($f, 32, false, { NIB }, $sc),
                    (32, false, NIB) => $go!($f, 32, true, { NIB }, $sc),
                    (32, true, NIB5) => $go!($f, 32, false, { NIB5 }, $sc),
                    (32, false, NIB5) => $go!($f, 32, true, { NIB5 }, $sc),
                    (32, true, _) => $go!($f, 32, false, { BYTES }, $sc),
                    (32, false, _) => $go!($f, 32, true, { BYTES }, $sc),
                    (16, true, _) => $go!($f, 16, false, { BYTES }, $sc),
                    _ => $go!($f, 16, true, { BYTES }, $sc),
                }
            };
        }
        // One kind for the scales and offsets, or the kernel that branches per load.
        let sc = match self.scale.kind() {
            k if self.min.is_empty() || self.min.kind() == k => k,
            _ => SC_ANY,
        };
        macro_rules! by_format {
            ($go:ident, $f:ident) => {
                match sc {
                    SC_F16 => by_codes!($go, $f, { SC_F16 }),
                    SC_FACTORED => by_codes!($go, $f, { SC_FACTORED }),
                    _ => by_codes!($go, $f, { SC_ANY }),
                }
            };
        }
        unsafe {
            match lvl {
                #[cfg(target_arch = "x86_64")]
                Level::Vnni => by_format!(go3, tile_vnni),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => by_format!(go, tile_avx2),
                _ => by_format!(go, tile_scalar),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quant::quantize_block;
    #[cfg(target_arch = "x86_64")]
    use super::quant::quantize_block_avx2;
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
        // 21 columns: one partial panel; 61: eight panels, so tiles of 3, 2 and 1 panels.
        let k = 512;
        let mut levels = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                levels.push(Level::Avx2);
            }
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                levels.push(Level::Vnni);
            }
        }
        for (dtype, n) in TYPES.into_iter().flat_map(|d| [(d, 21usize), (d, 61)]) {
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

    /// The legacy types' scales (and Q4_1's offsets) are f16 in the file and are kept as f16:
    /// Q8_0, Q4_0, Q4_1 and (nibbles plus a plane of fifth bits) Q5_0 stream exactly the file's
    /// bytes.
    #[test]
    fn legacy_scales_stream_as_f16() {
        let (n, k) = (16, 512);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
        ] {
            let p = PackedMatrix::pack(dtype, &quantized(dtype, n, k).data().unwrap(), n, k);
            assert!(matches!(p.scale, Scales::F16(_)), "{dtype:?}");
            let codes = packed_len(p.codes, n * k);
            assert_eq!(
                p.bytes(),
                codes + 2 * (n * k / 32) * (1 + usize::from(p.dtype == GgmlDType::Q4_1))
            );
            assert_eq!(p.bytes(), p.file_bytes(), "{dtype:?}");
        }
    }

    /// The K-quants' scales and offsets stream as the file keeps them (a byte per sub-block and
    /// an f16 per super-block), and give back exactly the f32 values of `d * sc` and
    /// `-(dmin * m)`.
    #[test]
    fn k_quant_scales_stream_factored() {
        let (n, k) = (19, 512);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let raw = quantized(dtype, n, k).data().unwrap().to_vec();
            let p = PackedMatrix::pack(dtype, &raw, n, k);
            assert!(
                matches!(p.scale, Scales::Factored { neg: false, .. }),
                "{dtype:?}"
            );
            let cols = n.div_ceil(PANEL) * PANEL;
            let (subs, supers) = (cols * k / p.sb, cols * k / 256);
            assert_eq!(p.scale.bytes(), subs + 2 * supers, "{dtype:?}");
            if dtype == GgmlDType::Q6K {
                assert!(p.min.is_empty());
            } else {
                assert!(
                    matches!(p.min, Scales::Factored { neg: true, .. }),
                    "{dtype:?}"
                );
                assert_eq!(p.min.bytes(), subs + 2 * supers);
            }
        }
        // Kept factored only where every value comes back bit for bit: an inexact product, or a
        // +0.0 where `-(sup * 0)` gives -0.0, keeps the plain values.
        let s = Scales::factored(&[0.1; 8], &[1.0; 8], &[1; 8], 0, false);
        assert!(matches!(s, Scales::F32(_)));
        let neg = [-0.0, -1.5, -0.0, -0.0, -3.0, -0.0, -0.0, -0.0];
        let sub = [0, 1, 0, 0, 2, 0, 0, 0];
        let s = Scales::factored(&neg, &[1.5; 8], &sub, 0, true);
        assert!(matches!(s, Scales::Factored { .. }));
        for (o, v) in neg.iter().enumerate() {
            assert_eq!(s.get(o).to_bits(), v.to_bits());
        }
        let mut plus = neg;
        plus[2] = 0.0;
        let s = Scales::factored(&plus, &[1.5; 8], &sub, 0, true);
        assert!(matches!(s, Scales::F16(_)));
        assert_eq!(s.get(2).to_bits(), 0f32.to_bits());
    }

    /// Several products of one input in one dispatch (`matmul_many`: Q/K/V, gate/up), with
    /// mixed formats (so some share the input's quantization and some do not), give each
    /// product's bits alone.
    #[test]
    fn products_sharing_an_input_give_each_ones_bits() {
        let k = 512;
        // Enough panels for the threads to share, and (second) so few that one thread runs
        // them all inline, product by product.
        let large = [
            (GgmlDType::Q5_0, 40),
            (GgmlDType::Q8_0, 16),
            (GgmlDType::Q5_0, 16),
            (GgmlDType::Q4K, 3),
            (GgmlDType::Q4_1, 200),
        ];
        let small = [
            (GgmlDType::Q8_0, 8),
            (GgmlDType::Q5_0, 5),
            (GgmlDType::Q4K, 11),
        ];
        for set in [&large[..], &small[..]] {
            products_share_bits(k, set);
        }
        assert!(PackedMatrix::matmul_many(&[], &[]).is_empty());
    }

    fn products_share_bits(k: usize, set: &[(GgmlDType, usize)]) {
        let mats: Vec<PackedMatrix> = set
            .iter()
            .map(|&(t, n)| PackedMatrix::pack(t, &quantized(t, n, k).data().unwrap(), n, k))
            .collect();
        let refs: Vec<&PackedMatrix> = mats.iter().collect();
        for m in [1usize, 3, 6] {
            let x = pattern(m * k, 11 + m, 2.0);
            let many = PackedMatrix::matmul_many(&refs, &x);
            assert_eq!(many.len(), mats.len());
            for (w, got) in mats.iter().zip(&many) {
                let alone = w.matmul_vec(&x);
                assert_eq!(
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{:?} n={} m={m}",
                    w.dtype,
                    w.n
                );
            }
        }
    }

    /// Guided grabs cover every unit of every segment exactly once and never cross a segment's
    /// end, whether the work is shared or small enough to run inline.
    #[test]
    fn guided_grabs_tile_each_segment() {
        for (bounds, min) in [
            (vec![0usize, 40, 40, 56, 59, 3000], 7usize),
            (vec![0, 3, 3, 5, 6], 16),
            (vec![10, 10], 1),
            (vec![0, 100_000], 1),
        ] {
            let got = std::sync::Mutex::new(Vec::new());
            guided(&bounds, min, |a, b| got.lock().unwrap().push((a, b)));
            let mut got = got.into_inner().unwrap();
            got.sort();
            let mut at = bounds[0];
            for &(a, b) in &got {
                assert_eq!(a, at, "{bounds:?}: gap or overlap at {a}");
                assert!(a < b);
                let seg_end = bounds[bounds.partition_point(|x| *x <= a)];
                assert!(b <= seg_end, "{bounds:?}: ({a}, {b}) crosses {seg_end}");
                at = b;
            }
            assert_eq!(at, *bounds.last().unwrap());
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

    /// Single-row products streamed from memory, as a decode step runs them: enough copies of
    /// each shape of SmolLM2 and Gemma 3 to overflow the last-level cache, taken in turn, so
    /// every product reads its weights from DRAM. Prints µs per product and GB/s of our bytes
    /// and of the file's (`cargo test --release -p atoma-engine qmm::tests::streaming -- --ignored
    /// --nocapture`); asserts nothing.
    #[test]
    #[ignore = "benchmark: prints figures"]
    #[allow(clippy::print_stderr)]
    fn streaming() {
        let shapes = [
            (GgmlDType::Q4_1, 576usize, 576usize),
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q8_0, 49152, 576),
            (GgmlDType::Q5_0, 1024, 640),
            (GgmlDType::Q5_0, 2048, 640),
            (GgmlDType::Q8_0, 256, 640),
            (GgmlDType::Q4K, 640, 1024),
            (GgmlDType::Q4K, 640, 2048),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q8_0, 262144, 640),
        ];
        const SPAN: usize = 160 << 20;
        for (dtype, n, k) in shapes {
            let qt = quantized(dtype, n, k);
            let data = qt.data().unwrap();
            let one = PackedMatrix::pack(dtype, &data, n, k);
            let copies = SPAN.div_ceil(one.bytes()).max(1);
            let mats: Vec<PackedMatrix> = (0..copies)
                .map(|_| PackedMatrix::pack(dtype, &data, n, k))
                .collect();
            let x = pattern(k, 3, 2.0);
            let mut out = vec![0f32; n];
            for w in &mats {
                w.matmul(&x, &mut out);
            }
            let rounds = (2 * SPAN / (copies * one.bytes())).max(2);
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                for w in &mats {
                    w.matmul(&x, &mut out);
                }
            }
            let dt = t.elapsed().as_secs_f64() / (rounds * copies) as f64;
            eprintln!(
                "{dtype:?} {n:>6}x{k:<4} {:>8.1} us  ours {:>7.3} MB {:>5.1} GB/s  file {:>7.3} MB {:>5.1} GB/s",
                dt * 1e6,
                one.bytes() as f64 / 1e6,
                one.bytes() as f64 / dt / 1e9,
                one.file_bytes() as f64 / 1e6,
                one.file_bytes() as f64 / dt / 1e9,
            );
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
    /// Where a prompt product's time goes (`cargo test --release -p atoma-engine
    /// qmm::tests::prefill_costs -- --ignored --nocapture`): the activation quantization, the
    /// tiles on one thread with two and with three panels (best of many runs, so the figures
    /// hold on a noisy machine), and the whole product on all threads; prints, asserts nothing.
    #[test]
    #[ignore = "benchmark: prints figures"]
    #[allow(clippy::print_stderr)]
    fn prefill_costs() {
        let lvl = level();
        let shapes = [
            (GgmlDType::Q4_1, 576usize, 576usize),
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q5_0, 1024, 640),
            (GgmlDType::Q4K, 640, 1024),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q5_0, 2048, 640),
            (GgmlDType::Q8_0, 256, 640),
        ];
        let m = 128;
        for (dtype, n, k) in shapes {
            let qt = quantized(dtype, n, k);
            let w = PackedMatrix::pack(dtype, &qt.data().unwrap(), n, k);
            let x = pattern(m * k, 3, 2.0);
            let a = quantize_rows(lvl, &x, k, w.sb, w.zero);
            let mut out = vec![0f32; m * n];
            let dst = OutPtr(out.as_mut_ptr());
            let panels = n.div_ceil(PANEL);
            let mut best = [f64::MAX; 4];
            for _ in 0..100 {
                let mut runs: [&mut dyn FnMut(); 4] = [
                    &mut || {
                        std::hint::black_box(quantize_rows(lvl, &x, k, w.sb, w.zero));
                    },
                    &mut || unsafe { w.run_panels(lvl, &a, m, 2, 0, panels, dst.get()) },
                    &mut || unsafe { w.run_panels(lvl, &a, m, 3, 0, panels, dst.get()) },
                    &mut || unsafe { w.matmul_raw(lvl, &x, dst.get()) },
                ];
                for (b, run) in best.iter_mut().zip(runs.iter_mut()) {
                    let t = std::time::Instant::now();
                    run();
                    *b = b.min(t.elapsed().as_secs_f64());
                }
            }
            let gmac = |dt: f64| (m * n * k) as f64 / dt / 1e9;
            eprintln!(
                "{dtype:?} {n:>4}x{k:<4} m={m}: quantize {:5.1} us | one thread: 4x2 {:5.1}, 4x3 {:5.1} GMAC/s | \
                 {} threads {:5.1} GMAC/s ({:.0}% of quantize + one-thread tiles / threads)",
                best[0] * 1e6,
                gmac(best[1]),
                gmac(best[2]),
                threads(),
                gmac(best[3]),
                100.0 * (best[0] + best[1].min(best[2]) / threads() as f64) / best[3],
            );
        }
    }
}
