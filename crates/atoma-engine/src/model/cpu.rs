//! What the CPU kernels (`qmm`, `vmath`, `paged_attn`) share: the vector level they run at,
//! chosen once per process (`select_kernel`, from the engine's `KernelChoice`, or the best the
//! CPU has on first use), the compute thread count, the raw output pointer handed to the workers
//! of candle's thread pool, and in-place reads of a CPU tensor's `f32` storage.
//!
//! The level is process-wide (a `OnceLock`) because the kernels run deep inside candle ops, where
//! no configuration reaches; every level gives the same bits, so the choice only changes speed.

use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// Which CPU kernel the engine's quantized matmuls and vector math use.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum KernelChoice {
    /// The best this CPU has: AVX-512 VNNI, else AVX2, else scalar.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// AVX-512 VNNI (needs AVX-512 VNNI, AVX-512VL, AVX2 and FMA).
    #[serde(rename = "avx512-vnni")]
    Avx512Vnni,
    /// AVX2 (needs AVX2 and FMA).
    #[serde(rename = "avx2")]
    Avx2,
    /// Portable scalar code.
    #[serde(rename = "scalar")]
    Scalar,
}

impl KernelChoice {
    /// Every choice, in the order of their names in messages and help texts.
    pub const ALL: [Self; 4] = [Self::Auto, Self::Avx512Vnni, Self::Avx2, Self::Scalar];

    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Avx512Vnni => "avx512-vnni",
            Self::Avx2 => "avx2",
            Self::Scalar => "scalar",
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KernelChoice {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "unknown kernel `{s}` (expected auto, avx512-vnni, avx2 or scalar)"
                ))
            })
    }
}

/// The vector level a kernel runs at (tests pass it explicitly to compare levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Vnni,
    Avx2,
    Scalar,
}

impl Level {
    /// The kernel's name (for logs and benchmarks).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Vnni => "avx512-vnni",
            Level::Avx2 => "avx2",
            Level::Scalar => "scalar",
        }
    }

    /// Whether this CPU has the instructions of this level.
    pub(crate) fn available(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Vnni => {
                Level::Avx2.available()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Level::Avx2 | Level::Vnni => false,
        }
    }

    /// What this level needs, for the error when the CPU lacks it.
    fn needs(self) -> &'static str {
        match self {
            Level::Vnni => "AVX-512 VNNI, AVX-512VL, AVX2, FMA and F16C",
            Level::Avx2 => "AVX2, FMA and F16C",
            Level::Scalar => "nothing",
        }
    }

    /// The best level this CPU has.
    fn best() -> Level {
        [Level::Vnni, Level::Avx2]
            .into_iter()
            .find(|l| l.available())
            .unwrap_or(Level::Scalar)
    }
}

/// The level of this process, fixed by the first `select_kernel` or `level` call.
static LEVEL: OnceLock<Level> = OnceLock::new();

/// Fixes the CPU kernel of this process (once: the kernels run deep inside candle ops) and
/// returns its name. `Auto` keeps the level already fixed, or picks the best this CPU has. A
/// level the CPU lacks, or one other than the level already fixed, is an
/// `EngineError::InvalidRequest`; asking for the fixed level again is fine.
pub fn select_kernel(choice: KernelChoice) -> Result<&'static str> {
    let want = match choice {
        KernelChoice::Auto => None,
        KernelChoice::Avx512Vnni => Some(Level::Vnni),
        KernelChoice::Avx2 => Some(Level::Avx2),
        KernelChoice::Scalar => Some(Level::Scalar),
    };
    if let Some(w) = want
        && !w.available()
    {
        return Err(EngineError::InvalidRequest(format!(
            "the {} kernel needs a CPU with {}, which this one lacks (use `auto`)",
            w.name(),
            w.needs()
        )));
    }
    let fixed = *LEVEL.get_or_init(|| want.unwrap_or_else(Level::best));
    match want {
        Some(w) if w != fixed => Err(EngineError::InvalidRequest(format!(
            "the {} kernel was asked for, but this process already runs the {} kernel (the \
             kernel is chosen once per process)",
            w.name(),
            fixed.name()
        ))),
        _ => Ok(fixed.name()),
    }
}

/// The level of this process: the one `select_kernel` fixed, else (as `Auto`) the best this CPU
/// has.
pub(crate) fn level() -> Level {
    *LEVEL.get_or_init(Level::best)
}

/// Name of the kernel in use (for logs and benchmarks).
pub(crate) fn kernel_name() -> &'static str {
    level().name()
}

/// The CPU kernel the quantized matmuls use on this machine (`avx512-vnni`, `avx2` or `scalar`).
pub fn cpu_matmul_kernel() -> &'static str {
    kernel_name()
}

/// Compute threads (candle's count reads the environment and /proc on every call; once here).
pub(crate) fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// The f32 values of a CPU tensor's storage from its layout's start offset, read in place (the
/// caller indexes them by the layout's strides). `what` names the operation in the error.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{what}: the input is not on the CPU");
    };
    cpu.as_slice::<f32>()?
        .get(layout.start_offset()..)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: layout outside the storage")))
}

/// An output buffer's base pointer shared by the workers of one kernel call (`qmm`,
/// `paged_attn`); each worker writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the whole (`Sync`) wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f(r, row)` for every `n`-long row `r` of `out`: inline when there is little work (a
/// decode step's rows: waking the other threads would cost more than the arithmetic), else
/// spread over the compute threads (candle's persistent pool). Each row is computed the same
/// way either way, so the bits do not depend on the split.
pub(crate) fn for_rows(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 0 {
        return;
    }
    let rows = out.len() / n;
    /// Below this many values a step's rows run inline.
    const INLINE: usize = 1 << 14;
    if rows < 2 || out.len() < INLINE {
        for (r, row) in out.chunks_exact_mut(n).enumerate() {
            f(r, row);
        }
        return;
    }
    let base = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for r in range {
            // SAFETY: row r owns out[r*n..(r+1)*n]; rows are disjoint and inside `out`.
            let row = unsafe { std::slice::from_raw_parts_mut(base.get().add(r * n), n) };
            f(r, row);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_runs_once_inline_or_spread() {
        for rows in [1usize, 3, 40, 300] {
            let n = 64;
            let mut out = vec![0f32; rows * n];
            for_rows(&mut out, n, |r, row| {
                for (i, x) in row.iter_mut().enumerate() {
                    *x += (r * n + i) as f32;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
    }

    #[test]
    fn kernel_choice_names_round_trip() {
        for c in KernelChoice::ALL {
            assert_eq!(c.as_str().parse::<KernelChoice>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<KernelChoice>(&json).unwrap(), c);
        }
        assert_eq!(KernelChoice::default(), KernelChoice::Auto);
        let e = "avx512".parse::<KernelChoice>().unwrap_err().to_string();
        assert!(e.contains("unknown kernel `avx512`"), "{e}");
    }

    /// The other tests of this process use the `Auto` level, so it is the best one; asking for
    /// it again succeeds, asking for any other fails, and so does a level the CPU lacks.
    #[test]
    fn the_level_is_fixed_once() {
        let best = Level::best();
        assert_eq!(select_kernel(KernelChoice::Auto).unwrap(), best.name());
        assert_eq!(level(), best);
        assert_eq!(kernel_name(), best.name());
        for (choice, lvl) in [
            (KernelChoice::Avx512Vnni, Level::Vnni),
            (KernelChoice::Avx2, Level::Avx2),
            (KernelChoice::Scalar, Level::Scalar),
        ] {
            let got = select_kernel(choice);
            if lvl == best {
                assert_eq!(got.unwrap(), best.name());
            } else {
                let e = got.unwrap_err().to_string();
                let why = if lvl.available() {
                    "already runs"
                } else {
                    "which this one lacks"
                };
                assert!(e.contains(why), "{choice}: {e}");
            }
        }
        assert_eq!(level(), best);
    }
}
