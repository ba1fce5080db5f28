//! The memory-read bandwidth `atoma bench` measures for itself, to report how close decode
//! comes to the limit: single-stream decode must read every weight once per token, so
//! `bytes per token × tokens/s ÷ bandwidth` is the fraction of the ceiling reached.

use std::hint::black_box;
use std::time::Instant;

/// Bytes the probe reads per pass: far above any cache.
const PROBE_BYTES: usize = 1 << 30;

/// The median of `passes` parallel reads of a 1 GiB buffer with `threads` threads (each its own
/// contiguous share, as a matrix-vector product reads its rows), in bytes per second. The
/// median, not the best: on a shared virtual machine one pass now and then reads far faster
/// than the machine sustains (50 GB/s among 30s here), which would understate every fraction.
pub fn read_bandwidth(threads: usize, passes: usize) -> f64 {
    let words = PROBE_BYTES / 8;
    // Written once so every page is really backed (a never-touched buffer reads the zero page).
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let share = words.div_ceil(threads);
    let mut rates: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for part in buf.chunks(share) {
                    s.spawn(move || black_box(sum(part)));
                }
            });
            PROBE_BYTES as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Eight independent lanes so the loop vectorizes and is limited by memory, not by adds.
fn sum(xs: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, x| a.wrapping_add(*x));
    acc.iter().fold(tail, |a, x| a.wrapping_add(*x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sum_is_exact() {
        let xs: Vec<u64> = (0..1001).collect();
        assert_eq!(super::sum(&xs), 1000 * 1001 / 2);
    }
}
