//! The encoder's projections `y = x W^T + b` on the CPU, with `W` packed once at load and one
//! fixed order of arithmetic: each output is a chain of fused multiply-adds over the input
//! index in order, starting from zero, then plus the bias, then (the [`Epilogue`]) GELU or plus
//! a residual, fused into the store so that no separate pass over the output is needed.
//!
//! The AVX-512, AVX2 and scalar kernels all compute exactly that chain, so an output row is the
//! same bits whatever the number of rows, the tile it falls in, the thread count or the CPU's
//! vector level (tested). candle's matmul (the gemm crate) does not promise this: it sums in
//! blocks sized from the cache sizes, takes a dot-product kernel for tiny products and
//! matrix-vector code for single rows; and on CPUs with AVX-512 it still runs 8-lane AVX2.
//!
//! Layout: the weights are cut into panels of [`PANEL`] output features; a panel holds, for each
//! input index in order, its 16 weights (zero past the last feature), so a kernel streams one
//! panel with unit stride while broadcasting one input value per row. Work is split into tiles
//! of rows × panels run on the calling rayon pool.

use rayon::prelude::*;

/// Output features per panel: one AVX-512 register, two AVX2 registers.
pub(crate) const PANEL: usize = 16;

/// Rows of one parallel task.
const BLOCK_ROWS: usize = 48;

/// The vector instructions a kernel uses; every level gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// The best level this CPU has.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Self::Avx512.available() {
                return Self::Avx512;
            }
            if Self::Avx2.available() {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Whether this CPU can run the level.
    pub fn available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => is_x86_feature_detected!("avx512f"),
        }
    }
}

/// What happens to `x W^T + b` on its way to the output.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// Nothing.
    None,
    /// GELU, exact (erf) form: `0.5 v (1 + erf(v / sqrt 2))`, as candle and PyTorch define it.
    Gelu,
    /// Plus this residual, `[rows, outputs]`.
    Residual(&'a [f32]),
}

/// A linear layer's weights in panels, and its bias.
#[derive(Debug)]
pub(crate) struct PackedLinear {
    inputs: usize,
    outputs: usize,
    /// `outputs.div_ceil(PANEL)` panels of `inputs * PANEL` values.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedLinear {
    /// Packs `weight` (`[outputs, inputs]`, row-major, as checkpoints store it) and `bias`.
    pub fn new(weight: &[f32], bias: &[f32], outputs: usize, inputs: usize) -> Self {
        assert_eq!(weight.len(), outputs * inputs, "weight shape");
        assert_eq!(bias.len(), outputs, "bias shape");
        let n_panels = outputs.div_ceil(PANEL);
        let mut panels = vec![0f32; n_panels * inputs * PANEL];
        for (o, row) in weight.chunks_exact(inputs).enumerate() {
            let panel = &mut panels[(o / PANEL) * inputs * PANEL..][..inputs * PANEL];
            for (i, w) in row.iter().enumerate() {
                panel[i * PANEL + o % PANEL] = *w;
            }
        }
        Self {
            inputs,
            outputs,
            panels,
            bias: bias.to_vec(),
        }
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `x W^T + b`, then `epilogue`, for the `x.len() / inputs` rows of `x` (row-major), on
    /// the current rayon pool's threads.
    pub fn forward(&self, x: &[f32], epilogue: Epilogue<'_>, level: Level) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        assert_eq!(rows * self.inputs, x.len(), "input shape");
        if let Epilogue::Residual(res) = epilogue {
            assert_eq!(res.len(), rows * self.outputs, "residual shape");
        }
        let mut out = vec![0f32; rows * self.outputs];
        if rows == 0 {
            return out;
        }
        let n_panels = self.outputs.div_ceil(PANEL);
        let row_blocks = rows.div_ceil(BLOCK_ROWS);
        // Enough tasks to keep every thread busy; whole panel pairs per task.
        let threads = rayon::current_num_threads();
        let chunks = (4 * threads)
            .div_ceil(row_blocks)
            .clamp(1, n_panels.div_ceil(2));
        let panels_per_chunk = n_panels.div_ceil(chunks).next_multiple_of(2);
        let col_chunks = n_panels.div_ceil(panels_per_chunk);
        let dst = Dst {
            ptr: out.as_mut_ptr(),
            epilogue,
        };
        (0..row_blocks * col_chunks)
            .into_par_iter()
            .for_each(|task| {
                let (rb, cc) = (task / col_chunks, task % col_chunks);
                let r0 = rb * BLOCK_ROWS;
                let tile = Tile {
                    r0,
                    r1: (r0 + BLOCK_ROWS).min(rows),
                    p0: cc * panels_per_chunk,
                    p1: ((cc + 1) * panels_per_chunk).min(n_panels),
                };
                // SAFETY: tasks write disjoint tiles of `out`, which outlives the parallel loop.
                unsafe { self.tile(x, &tile, dst, level) };
            });
        out
    }

    /// Computes rows `r0..r1` × panels `p0..p1` into `dst` (`rows × outputs`, row-major).
    ///
    /// # Safety
    /// `dst` must point to the output of `x`'s row count, and no other thread may write this
    /// tile's elements meanwhile.
    unsafe fn tile(&self, x: &[f32], t: &Tile, dst: Dst<'_>, level: Level) {
        match level {
            Level::Scalar => {
                for p in t.p0..t.p1 {
                    for r in t.r0..t.r1 {
                        let mut acc = [0f32; PANEL];
                        let xr = &x[r * self.inputs..][..self.inputs];
                        let panel = &self.panels[p * self.inputs * PANEL..][..self.inputs * PANEL];
                        for (xv, w) in xr.iter().zip(panel.chunks_exact(PANEL)) {
                            for (a, w) in acc.iter_mut().zip(w) {
                                *a = xv.mul_add(*w, *a);
                            }
                        }
                        // SAFETY: row r, panel p are inside this tile (caller's contract).
                        unsafe { self.store(dst, r, p, &acc) };
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level was checked available; the rest is the caller's contract.
            Level::Avx2 => unsafe { x86::tile_avx2(self, x, t, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { x86::tile_avx512(self, x, t, dst) },
        }
    }

    /// Writes one row's sums of panel `p` plus the bias, through the epilogue (the features
    /// that exist).
    ///
    /// # Safety
    /// As for [`tile`](Self::tile): the element range must be this thread's to write.
    #[inline(always)]
    unsafe fn store(&self, dst: Dst<'_>, row: usize, p: usize, acc: &[f32; PANEL]) {
        let c0 = p * PANEL;
        let n = PANEL.min(self.outputs - c0);
        let at = row * self.outputs + c0;
        for (j, a) in acc[..n].iter().enumerate() {
            let v = a + self.bias[c0 + j];
            let v = match dst.epilogue {
                Epilogue::None => v,
                Epilogue::Gelu => gelu(v),
                Epilogue::Residual(res) => v + res[at + j],
            };
            // SAFETY: row < rows and c0 + j < outputs, inside the output (caller's contract).
            unsafe { *dst.ptr.add(at + j) = v };
        }
    }
}

/// Rows `r0..r1` and panels `p0..p1` of one task.
#[derive(Debug)]
struct Tile {
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
}

/// GELU as candle computes it (its `erf`, a port of Boost's, is deterministic Rust).
#[inline(always)]
pub(crate) fn gelu(v: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
}

/// The output's base pointer and epilogue, shared by the tasks of one product; each writes its
/// own tile.
#[derive(Clone, Copy)]
struct Dst<'a> {
    ptr: *mut f32,
    epilogue: Epilogue<'a>,
}
// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them; the
// epilogue only reads.
unsafe impl Send for Dst<'_> {}
// SAFETY: as above.
unsafe impl Sync for Dst<'_> {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector kernels: `R` rows × one or two panels of register accumulators, one input
    //! index per step (a broadcast per row, a load per 8 or 16 weights, a fused multiply-add).

    use std::arch::x86_64::*;

    use super::{Dst, PANEL, PackedLinear, Tile};

    /// # Safety
    /// AVX2 and FMA must be available; see [`PackedLinear::tile`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(lin: &PackedLinear, x: &[f32], t: &Tile, dst: Dst<'_>) {
        for p in t.p0..t.p1 {
            let mut r = t.r0;
            while r < t.r1 {
                let n = (t.r1 - r).min(6);
                // SAFETY: rows r..r+n and panel p are inside the tile.
                unsafe {
                    match n {
                        6 => avx2::<6>(lin, x, r, p, dst),
                        5 => avx2::<5>(lin, x, r, p, dst),
                        4 => avx2::<4>(lin, x, r, p, dst),
                        3 => avx2::<3>(lin, x, r, p, dst),
                        2 => avx2::<2>(lin, x, r, p, dst),
                        _ => avx2::<1>(lin, x, r, p, dst),
                    }
                }
                r += n;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize>(
        lin: &PackedLinear,
        x: &[f32],
        r: usize,
        p: usize,
        dst: Dst<'_>,
    ) {
        let k = lin.inputs;
        let xs = &x[r * k..(r + R) * k];
        let panel = &lin.panels[p * k * PANEL..(p + 1) * k * PANEL];
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for i in 0..k {
            // SAFETY: the panel holds k * PANEL values, i < k.
            let (w0, w1) = unsafe {
                let w = panel.as_ptr().add(i * PANEL);
                (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)))
            };
            for (row, a) in acc.iter_mut().enumerate() {
                let v = _mm256_set1_ps(xs[row * k + i]);
                a[0] = _mm256_fmadd_ps(v, w0, a[0]);
                a[1] = _mm256_fmadd_ps(v, w1, a[1]);
            }
        }
        for (row, a) in acc.iter().enumerate() {
            let mut sums = [0f32; PANEL];
            // SAFETY: `sums` holds 16 values.
            unsafe {
                _mm256_storeu_ps(sums.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(sums.as_mut_ptr().add(8), a[1]);
                lin.store(dst, r + row, p, &sums);
            }
        }
    }

    /// # Safety
    /// AVX-512F must be available; see [`PackedLinear::tile`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(lin: &PackedLinear, x: &[f32], t: &Tile, dst: Dst<'_>) {
        let mut p = t.p0;
        while p < t.p1 {
            let pair = p + 1 < t.p1;
            let mut r = t.r0;
            while r < t.r1 {
                let n = (t.r1 - r).min(8);
                // SAFETY: rows r..r+n and panels p (and p + 1 when `pair`) are in the tile.
                unsafe {
                    match (n, pair) {
                        (8, true) => avx512::<8, 2>(lin, x, r, p, dst),
                        (7, true) => avx512::<7, 2>(lin, x, r, p, dst),
                        (6, true) => avx512::<6, 2>(lin, x, r, p, dst),
                        (5, true) => avx512::<5, 2>(lin, x, r, p, dst),
                        (4, true) => avx512::<4, 2>(lin, x, r, p, dst),
                        (3, true) => avx512::<3, 2>(lin, x, r, p, dst),
                        (2, true) => avx512::<2, 2>(lin, x, r, p, dst),
                        (_, true) => avx512::<1, 2>(lin, x, r, p, dst),
                        (8, false) => avx512::<8, 1>(lin, x, r, p, dst),
                        (4..=7, false) => avx512::<4, 1>(lin, x, r, p, dst),
                        (_, false) => avx512::<1, 1>(lin, x, r, p, dst),
                    }
                }
                r += match (n, pair) {
                    (4..=7, false) => 4,
                    (1..=3, false) => 1,
                    _ => n,
                };
            }
            p += if pair { 2 } else { 1 };
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize, const P: usize>(
        lin: &PackedLinear,
        x: &[f32],
        r: usize,
        p: usize,
        dst: Dst<'_>,
    ) {
        let k = lin.inputs;
        let xs = &x[r * k..(r + R) * k];
        let panels = &lin.panels[p * k * PANEL..(p + P) * k * PANEL];
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for i in 0..k {
            let mut w = [_mm512_setzero_ps(); P];
            for (j, w) in w.iter_mut().enumerate() {
                // SAFETY: panel j holds k * PANEL values, i < k.
                *w = unsafe { _mm512_loadu_ps(panels.as_ptr().add(j * k * PANEL + i * PANEL)) };
            }
            for (row, a) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(xs[row * k + i]);
                for (a, w) in a.iter_mut().zip(&w) {
                    *a = _mm512_fmadd_ps(v, *w, *a);
                }
            }
        }
        for (row, a) in acc.iter().enumerate() {
            for (j, a) in a.iter().enumerate() {
                let mut sums = [0f32; PANEL];
                // SAFETY: `sums` holds 16 values; row and panel are in the tile.
                unsafe {
                    _mm512_storeu_ps(sums.as_mut_ptr(), *a);
                    lin.store(dst, r + row, p + j, &sums);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn levels() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        v.extend(
            [Level::Avx2, Level::Avx512]
                .into_iter()
                .filter(|l| l.available()),
        );
        v
    }

    #[test]
    fn every_level_row_count_and_thread_count_gives_the_same_bits() {
        // Output counts off the panel grid, odd panel counts, row counts off every tile.
        for (outputs, inputs) in [(37, 19), (64, 32), (48, 7), (5, 3)] {
            let w = values(outputs * inputs, 1);
            let b = values(outputs, 2);
            let lin = PackedLinear::new(&w, &b, outputs, inputs);
            let rows = 2 * BLOCK_ROWS + 13;
            let x = values(rows * inputs, 3);
            let want: Vec<f32> = (0..rows * outputs)
                .map(|e| {
                    let (r, o) = (e / outputs, e % outputs);
                    let mut acc = 0f32;
                    for i in 0..inputs {
                        acc = x[r * inputs + i].mul_add(w[o * inputs + i], acc);
                    }
                    acc + b[o]
                })
                .collect();
            let residual = values(rows * outputs, 4);
            let epilogues = [
                (Epilogue::None, want.clone()),
                (
                    Epilogue::Gelu,
                    want.iter().map(|v| gelu(*v)).collect::<Vec<_>>(),
                ),
                (
                    Epilogue::Residual(&residual),
                    want.iter().zip(&residual).map(|(v, r)| v + r).collect(),
                ),
            ];
            for level in levels() {
                for (ep, want) in &epilogues {
                    for threads in [1, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let all = pool.install(|| lin.forward(&x, *ep, level));
                        assert_eq!(
                            &all, want,
                            "{level:?} {ep:?} {outputs}x{inputs}, {threads} threads"
                        );
                    }
                    // Each row alone, and in a slice that starts elsewhere in a tile.
                    let rows_of = |r0: usize, r1: usize| match ep {
                        Epilogue::Residual(_) => {
                            Epilogue::Residual(&residual[r0 * outputs..r1 * outputs])
                        }
                        other => *other,
                    };
                    for r in [0, 1, 7, rows - 1] {
                        let one =
                            lin.forward(&x[r * inputs..(r + 1) * inputs], rows_of(r, r + 1), level);
                        assert_eq!(
                            one,
                            want[r * outputs..(r + 1) * outputs],
                            "{level:?} row {r}"
                        );
                    }
                    let some = lin.forward(&x[5 * inputs..16 * inputs], rows_of(5, 16), level);
                    assert_eq!(some, want[5 * outputs..16 * outputs], "{level:?}");
                }
            }
        }
    }
}
