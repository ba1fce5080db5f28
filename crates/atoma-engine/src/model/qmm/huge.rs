//! Packed weights in memory that the kernel may back with 2 MiB pages.
//!
//! A decode step streams every weight once; on 4 KiB pages the Gemma 3 head alone spans some
//! 46,000 pages, and the TLB misses of that walk cost part of the bandwidth; the hardware
//! prefetchers also stop at every 4 KiB page boundary. Transparent huge pages are usually
//! enabled in `madvise` mode, so memory is allocated 2 MiB-aligned and advised with
//! `MADV_HUGEPAGE` *before* it is first written (the kernel picks the page size when a page is
//! first touched). A buffer of a huge page or more gets its own allocation; smaller ones (a
//! small model's layers: Gemma 3's are about 1 MB each) are placed one after another in shared
//! 2 MiB blocks, in the order they are packed, which is the order a step reads them. Where the
//! advice is refused or not Linux, it is plain memory. Only where bytes come from changes,
//! never which bytes: the values are a copy of the packed ones.

use std::alloc::Layout;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Huge-page size (x86-64 and aarch64 Linux with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Buffers below this stay on the ordinary heap (tiny test models, per-matrix odds and ends):
/// too small to gain, and they would only fragment the shared blocks.
const SHARED_MIN: usize = 16 << 10;

/// A 2 MiB-aligned allocation advised for huge pages: one large buffer's, or a block shared by
/// small ones (freed when the last of them and the allocator let go of it).
struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region is plain bytes; writers hold it exclusively (see `Streamed::new`), readers
// only read.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(bytes: usize) -> Option<Self> {
        let layout = Layout::from_size_align(bytes.next_multiple_of(HUGE), HUGE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        advise_huge(raw, layout.size());
        Some(Self { ptr, layout })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Shared blocks with room left, and the bytes of each taken. Weak, so a block is freed with
/// its last buffer; the allocator holds it only while it is being filled.
static OPEN_BLOCKS: Mutex<Vec<(std::sync::Weak<Region>, usize)>> = Mutex::new(Vec::new());

/// Blocks kept open for later small buffers: the first that fits takes each (so a small scale
/// array fills the tail a matrix's codes left), a new block when none does.
const OPEN_MAX: usize = 8;

/// Room for `bytes` (< 2 MiB) at a 64-byte boundary of a shared block: the block and the offset.
fn shared_place(bytes: usize) -> Option<(Arc<Region>, usize)> {
    let mut open = OPEN_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|(b, _)| b.strong_count() > 0);
    for (b, used) in open.iter_mut() {
        let Some(block) = b.upgrade() else { continue };
        let at = used.next_multiple_of(64);
        if at + bytes <= block.layout.size() {
            *used = at + bytes;
            return Some((block, at));
        }
    }
    let block = Arc::new(Region::new(HUGE)?);
    if open.len() == OPEN_MAX {
        // Give up on the fullest block.
        let fullest = (0..open.len()).max_by_key(|&i| open[i].1).unwrap_or(0);
        open.swap_remove(fullest);
    }
    open.push((Arc::downgrade(&block), bytes));
    Some((block, 0))
}

/// An immutable, huge-page-backed copy of a slice of plain values.
pub(crate) struct Streamed<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    /// The region holding the values, or `None` for an ordinary boxed slice.
    region: Option<Arc<Region>>,
}

// SAFETY: the buffer is owned (or a disjoint part of a shared region), never mutated after
// construction, and `T` is plain data.
unsafe impl<T: Copy + Send> Send for Streamed<T> {}
// SAFETY: as above; shared references only read.
unsafe impl<T: Copy + Sync> Sync for Streamed<T> {}

impl<T: Copy> Streamed<T> {
    pub(crate) fn new(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        debug_assert!(std::mem::align_of::<T>() <= 64);
        let placed = if bytes < SHARED_MIN {
            None
        } else if bytes < HUGE {
            shared_place(bytes)
        } else {
            Region::new(bytes).map(|r| (Arc::new(r), 0))
        };
        let Some((region, at)) = placed else {
            return Self::boxed(values);
        };
        // SAFETY: `at + bytes` lies inside the region (checked where it was placed), no other
        // buffer is given those bytes, and `at` is 64-byte aligned, enough for any T here.
        let ptr = unsafe { NonNull::new_unchecked(region.ptr.as_ptr().add(at).cast::<T>()) };
        // SAFETY: the destination holds `values.len()` Ts and does not overlap `values`.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr.as_ptr(), values.len()) };
        Self {
            ptr,
            len: values.len(),
            region: Some(region),
        }
    }

    fn boxed(values: &[T]) -> Self {
        let b: Box<[T]> = values.into();
        let len = b.len();
        let ptr = NonNull::new(Box::into_raw(b).cast::<T>()).unwrap_or(NonNull::dangling());
        Self {
            ptr,
            len,
            region: None,
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
        // A region is freed with its last holder (the `Arc` field); only a boxed slice is ours
        // to free here.
        if self.region.is_none() {
            let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: made by `Box::into_raw` of a `Box<[T]>` of this length in `boxed`.
            drop(unsafe { Box::from_raw(slice) });
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

    /// Buffers under a huge page share blocks without overlapping, each keeps its values after
    /// its neighbours are dropped, and one that does not fit the open block starts a new one.
    #[test]
    fn small_buffers_share_huge_blocks_without_overlap() {
        let sizes = [
            20_000usize,
            300_000,
            1_000_000,
            700_000,
            65_536,
            1_500_000,
            17_000,
        ];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        let mut bufs: Vec<Option<Streamed<u8>>> =
            data.iter().map(|d| Some(Streamed::new(d))).collect();
        let spans: Vec<(usize, usize)> = bufs
            .iter()
            .flatten()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.len()))
            .collect();
        for (i, a) in spans.iter().enumerate() {
            assert_eq!(a.0 % 64, 0, "64-byte aligned");
            for b in &spans[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "overlap {a:?} {b:?}");
            }
        }
        for i in [1, 3, 5] {
            bufs[i] = None;
        }
        for (b, d) in bufs.iter().zip(&data) {
            if let Some(b) = b {
                assert_eq!(&b[..], &d[..]);
            }
        }
        // Tiny buffers stay on the ordinary heap.
        assert!(Streamed::new(&[1u8; 100]).region.is_none());
        assert!(bufs[0].as_ref().unwrap().region.is_some());
    }
}
