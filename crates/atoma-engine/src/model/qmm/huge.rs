//! Packed weights in memory that the kernel may back with 2 MiB pages.
//!
//! A decode step streams every weight once; on 4 KiB pages the Gemma 3 head alone spans some
//! 46,000 pages, and the TLB misses of that walk cost part of the bandwidth. Transparent huge
//! pages are usually enabled in `madvise` mode, so the buffer is allocated 2 MiB-aligned and
//! advised with `MADV_HUGEPAGE` *before* it is first written (the kernel picks the page size
//! when a page is first touched). Where that is refused or not Linux, it is plain memory. Only
//! where bytes come from changes, never which bytes: the values are a copy of the packed ones.

use std::alloc::Layout;
use std::ops::Deref;
use std::ptr::NonNull;

/// Huge-page size (x86-64 and aarch64 Linux with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// An immutable, 2 MiB-aligned copy of a slice of plain values.
pub(crate) struct Streamed<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    layout: Option<Layout>,
}

// SAFETY: the buffer is owned, never mutated after construction, and `T` is plain data.
unsafe impl<T: Copy + Send> Send for Streamed<T> {}
// SAFETY: as above; shared references only read.
unsafe impl<T: Copy + Sync> Sync for Streamed<T> {}

impl<T: Copy> Streamed<T> {
    pub(crate) fn new(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        // Small buffers gain nothing (and would waste most of a 2 MiB alignment).
        if bytes < HUGE {
            return Self::boxed(values);
        }
        let Ok(layout) = Layout::from_size_align(bytes.next_multiple_of(HUGE), HUGE) else {
            return Self::boxed(values);
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        advise_huge(raw, layout.size());
        // SAFETY: the new buffer holds at least `values.len()` Ts (same size, T's alignment
        // divides 2 MiB) and does not overlap `values`.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr.as_ptr(), values.len()) };
        Self {
            ptr,
            len: values.len(),
            layout: Some(layout),
        }
    }

    fn boxed(values: &[T]) -> Self {
        let b: Box<[T]> = values.into();
        let len = b.len();
        let ptr = NonNull::new(Box::into_raw(b).cast::<T>()).unwrap_or(NonNull::dangling());
        Self {
            ptr,
            len,
            layout: None,
        }
    }
}

impl<T: Copy> Deref for Streamed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialized values owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for Streamed<T> {
    fn drop(&mut self) {
        match self.layout {
            // SAFETY: allocated in `new` with this layout.
            Some(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            None => {
                let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                // SAFETY: made by `Box::into_raw` of a `Box<[T]>` of this length in `boxed`.
                drop(unsafe { Box::from_raw(slice) });
            }
        }
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for Streamed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Streamed({} values)", self.len)
    }
}

/// Per-(panel, sub-block, column) scales or offsets, stored in the fewest bytes that give back
/// the very same f32 values (the kernels widen them; the arithmetic and its bits do not change):
/// - `F16` when every value is an f16 exactly (the legacy types' `d` and `m` are f16 in the
///   file): half the bytes of f32;
/// - `Factored` for the K-quants, whose values are `d * sc` (or `-(dmin * m)`) with an f16 `d`
///   per super-block of 256 weights and a small integer `sc` per sub-block, as the file keeps
///   them: one signed byte per sub-block and an f16 per super-block, against four bytes per
///   sub-block in f32. The product of an f16 and an 8-bit integer has at most 19 significant
///   bits, so it is exact in f32 and the kernel's `sup * sub` is bit for bit the packer's value;
/// - `F32` otherwise.
#[derive(Debug)]
pub(crate) enum Scales {
    F32(Streamed<f32>),
    F16(Streamed<u16>),
    Factored {
        /// `[panel][super-block][column]` f16 bits.
        sup: Streamed<u16>,
        /// `[panel][sub-block][column]`.
        sub: Streamed<i8>,
        /// log2 of the sub-blocks per super-block.
        shift: u32,
        /// The values are `-(sup * sub)` (the K-quants' offsets).
        neg: bool,
    },
}

/// Raw pointers to one `Scales` for the kernels (which branch on them once per sub-block; the
/// branch never changes within a product).
#[derive(Clone, Copy)]
pub(crate) struct ScalePtrs {
    f32s: *const f32,
    /// f16 values, or for `Factored` the super-block factors.
    f16s: *const u16,
    /// `Factored`: the sub-block factors; else null.
    sub: *const i8,
    shift: u32,
    neg: bool,
}

impl Scales {
    pub(crate) fn new(values: &[f32]) -> Self {
        let exact = |v: &f32| half::f16::from_f32(*v).to_f32().to_bits() == v.to_bits();
        if !values.is_empty() && values.iter().all(exact) {
            let bits: Vec<u16> = values
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            Self::F16(Streamed::new(&bits))
        } else {
            Self::F32(Streamed::new(values))
        }
    }

    /// `values` (`[panel][sub-block][column]`, 8 columns a panel) given as the product of
    /// `sup` (`[panel][super-block][column]`, each super-block `1 << shift` sub-blocks) and
    /// `sub`, negated when `neg`. Kept factored only if every value comes back bit for bit
    /// (sign of zero included) and every `sup` is an f16; else as `new` keeps it.
    pub(crate) fn factored(values: &[f32], sup: &[f32], sub: &[i8], shift: u32, neg: bool) -> Self {
        let sup16: Vec<u16> = sup
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let fits = sub.len() == values.len()
            && values.len().is_multiple_of(super::PANEL)
            && sup.len() == values.len() >> shift
            && sup16
                .iter()
                .zip(sup)
                .all(|(h, v)| half::f16::from_bits(*h).to_f32().to_bits() == v.to_bits())
            && values
                .iter()
                .enumerate()
                .all(|(o, v)| factored_value(&sup16, sub, shift, neg, o).to_bits() == v.to_bits());
        if !fits || values.is_empty() {
            return Self::new(values);
        }
        Self::Factored {
            sup: Streamed::new(&sup16),
            sub: Streamed::new(sub),
            shift,
            neg,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::F16(s) => s.len(),
            Self::Factored { sub, .. } => sub.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(s) => 4 * s.len(),
            Self::F16(s) => 2 * s.len(),
            Self::Factored { sup, sub, .. } => 2 * sup.len() + sub.len(),
        }
    }

    /// Value `o` as f32 (exactly the value packed).
    #[inline(always)]
    pub(crate) fn get(&self, o: usize) -> f32 {
        match self {
            Self::F32(s) => s[o],
            Self::F16(s) => half::f16::from_bits(s[o]).to_f32(),
            Self::Factored {
                sup,
                sub,
                shift,
                neg,
            } => factored_value(sup, sub, *shift, *neg, o),
        }
    }

    /// Raw pointers for the kernels.
    pub(crate) fn ptrs(&self) -> ScalePtrs {
        let none = ScalePtrs {
            f32s: std::ptr::null(),
            f16s: std::ptr::null(),
            sub: std::ptr::null(),
            shift: 0,
            neg: false,
        };
        match self {
            Self::F32(s) => ScalePtrs {
                f32s: s.as_ptr(),
                ..none
            },
            Self::F16(s) => ScalePtrs {
                f16s: s.as_ptr(),
                ..none
            },
            Self::Factored {
                sup,
                sub,
                shift,
                neg,
            } => ScalePtrs {
                f16s: sup.as_ptr(),
                sub: sub.as_ptr(),
                shift: *shift,
                neg: *neg,
                ..none
            },
        }
    }
}

/// The super-block factor's index for value `o` (`[panel][sub-block][column]`).
#[inline(always)]
fn super_index(o: usize, shift: u32) -> usize {
    let (row, c) = (o / super::PANEL, o % super::PANEL);
    (row >> shift) * super::PANEL + c
}

/// `sup * sub` (negated when `neg`) for value `o`: what `load8` computes, one lane.
#[inline(always)]
fn factored_value(sup: &[u16], sub: &[i8], shift: u32, neg: bool, o: usize) -> f32 {
    let v = half::f16::from_bits(sup[super_index(o, shift)]).to_f32() * f32::from(sub[o]);
    if neg { -v } else { v }
}

/// `Scales` kinds for the kernels' `SC` parameter, so that a product's inner loop has no branch
/// on its scales' storage: every value f16, every value factored, or either (`ANY`, branching
/// per load: f32 fallbacks, and a matrix whose scales and offsets are kept differently).
pub(crate) const SC_F16: u8 = 0;
pub(crate) const SC_FACTORED: u8 = 1;
pub(crate) const SC_ANY: u8 = 2;

impl Scales {
    /// The kernels' `SC` for these values alone.
    pub(crate) fn kind(&self) -> u8 {
        match self {
            Self::F16(_) => SC_F16,
            Self::Factored { .. } => SC_FACTORED,
            Self::F32(_) => SC_ANY,
        }
    }
}

/// Eight scales at `o` (a multiple of 8: one panel's columns), as f32: loaded, widened from
/// f16 (exact), or multiplied out of their factors (exact, see `Scales`).
///
/// # Safety
/// `p` comes from a live `Scales` of kind `SC` (or any, for `SC_ANY`) holding 8 values at `o`;
/// F16C is available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn load8<const SC: u8>(p: ScalePtrs, o: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe {
        let factored = || {
            let sup = _mm256_cvtph_ps(_mm_loadu_si128(p.f16s.add(super_index(o, p.shift)).cast()));
            let sub =
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.sub.add(o).cast())));
            let v = _mm256_mul_ps(sup, sub);
            if p.neg {
                _mm256_xor_ps(v, _mm256_set1_ps(-0.0))
            } else {
                v
            }
        };
        let f16 = || _mm256_cvtph_ps(_mm_loadu_si128(p.f16s.add(o).cast()));
        match SC {
            SC_F16 => f16(),
            SC_FACTORED => factored(),
            _ => {
                if !p.sub.is_null() {
                    factored()
                } else if p.f16s.is_null() {
                    _mm256_loadu_ps(p.f32s.add(o))
                } else {
                    f16()
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, len: usize) {
    // SAFETY: the range is one allocation of ours; madvise only changes how it is backed.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for weights");
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: *mut u8, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_f16_only_when_every_value_is_one_exactly() {
        let exact = [0.5f32, -0.0, 3.0, 65504.0, 1.0 / 1024.0];
        let s = Scales::new(&exact);
        assert!(matches!(s, Scales::F16(_)));
        assert_eq!(s.bytes(), 10);
        for (i, v) in exact.iter().enumerate() {
            assert_eq!(s.get(i).to_bits(), v.to_bits());
        }
        let s = Scales::new(&[0.5, 0.1]);
        assert!(matches!(s, Scales::F32(_)));
        assert_eq!(s.get(1), 0.1);
        assert!(Scales::new(&[]).is_empty());
    }

    #[test]
    fn a_copy_holds_the_same_values_small_or_large() {
        for len in [0usize, 1, 1000, (3 << 20) + 7] {
            let v: Vec<u32> = (0..len as u32)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            let s = Streamed::new(&v);
            assert_eq!(&s[..], &v[..]);
            if len * 4 >= HUGE {
                assert_eq!(s.as_ptr() as usize % HUGE, 0, "2 MiB-aligned");
            }
        }
    }
}
