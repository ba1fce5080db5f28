//! Differential test of the batched paged forward against the single-sequence reference model,
//! for every architecture (grouped-query attention and, on Gemma 3 and Phi-3, sliding windows):
//! several sequences of different lengths in each step, shuffled non-contiguous block tables,
//! chunk sizes that cut blocks anywhere, decodes mixed with prefill chunks in one pass, and a
//! sequence that reuses another's prefix blocks (a prefix-cache hit).

#![allow(clippy::print_stderr)]

use atoma_engine::sampling::Rng;
use atoma_engine::testing::{TinySpec, write_tiny_gguf};
use atoma_engine::{Architecture, BatchSeq, KvCache, KvDtype, LoadOptions, LoadedModel, PagedKv};

const BS: usize = 4;

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| 3 + (r.next_u64() % 280) as u32).collect()
}

struct Seq {
    tokens: Vec<u32>,
    done: usize,
    table: Vec<u32>,
    /// Reference logits at every position.
    reference: Vec<Vec<f32>>,
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn paged_batches_match_the_reference_model() {
    paged_batches_match(KvDtype::F32);
}

/// The default f16 pools: each key and value is rounded to half precision once, so the logits
/// move off the f32 reference by more than rounding flips, but must stay close.
#[test]
fn f16_paged_batches_stay_close_to_the_reference_model() {
    paged_batches_match(KvDtype::F16);
}

fn paged_batches_match(dtype: KvDtype) {
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
        Architecture::Phi3,
    ] {
        let path = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&path, &TinySpec::new(arch)).unwrap();
        let lm = LoadedModel::load(&path, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let model = &lm.model;
        let mut kv = PagedKv::with_dtype(model.config(), 96, BS, dtype);
        // A shuffled free list: tables are non-contiguous and out of order.
        let mut free: Vec<u32> = (0..96).collect();
        let mut rng = Rng::new(arch as u64 + 1);
        for i in (1..free.len()).rev() {
            free.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut seqs: Vec<Seq> = [(1, 3), (2, 9), (3, 14), (4, 37)]
            .into_iter()
            .map(|(seed, n)| Seq {
                tokens: tokens(seed, n),
                done: 0,
                table: Vec::new(),
                reference: Vec::new(),
            })
            .collect();
        // Sequence 5 shares sequence 4's first two blocks (8 tokens), then diverges.
        let mut shared = seqs[3].tokens[..8].to_vec();
        shared.extend(tokens(5, 11));
        seqs.push(Seq {
            tokens: shared,
            done: 0,
            table: Vec::new(),
            reference: Vec::new(),
        });
        for s in &mut seqs {
            let all = model
                .forward_all(&s.tokens, &mut KvCache::default())
                .unwrap();
            s.reference = all.to_vec2::<f32>().unwrap();
        }
        let mut step = 0;
        let mut worst = 0f32;
        let (mut compared, mut flipped) = (0usize, 0usize);
        while seqs.iter().any(|s| s.done < s.tokens.len()) {
            step += 1;
            // Sequence 5 starts once sequence 4 has computed its first 8 positions, by taking
            // over those two blocks instead of computing them.
            if seqs[4].done == 0 && seqs[3].done >= 8 {
                let prefix = seqs[3].table[..2].to_vec();
                seqs[4].table = prefix;
                seqs[4].done = 8;
            }
            let mut plan: Vec<(usize, usize)> = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate() {
                if s.done >= s.tokens.len() || (i == 4 && s.done == 0) {
                    continue;
                }
                // Chunk sizes 1..=5 varying by step and sequence: decodes (1) mix with chunks.
                let len = (1 + (step * 3 + i * 2) % 5).min(s.tokens.len() - s.done);
                while s.table.len() * BS < s.done + len {
                    s.table.push(free.pop().unwrap());
                }
                plan.push((i, len));
            }
            let batch: Vec<BatchSeq<'_>> = plan
                .iter()
                .map(|&(i, len)| {
                    let s = &seqs[i];
                    BatchSeq {
                        tokens: &s.tokens[s.done..s.done + len],
                        start: s.done,
                        block_table: &s.table,
                        logits: 1,
                    }
                })
                .collect();
            let logits = model
                .forward_paged(&batch, &mut kv)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, &(i, len)) in plan.iter().enumerate() {
                let s = &mut seqs[i];
                let pos = s.done + len - 1;
                // Relative to the logits' scale. The paged attention sums in a different
                // order than the reference's matmul; the last-bit differences almost always
                // vanish in the next projection's 8-bit activation rounding (most positions
                // match exactly), but now and then one value crosses a rounding step, which
                // moves the logits by about 1% of their scale.
                let scale = s.reference[pos].iter().fold(1f32, |m, x| m.max(x.abs()));
                let d = max_diff(&logits[row], &s.reference[pos]) / scale;
                worst = worst.max(d);
                compared += 1;
                if d > 1e-3 {
                    flipped += 1;
                }
                assert!(
                    d < 5e-2,
                    "{arch:?}: seq {i} position {pos} differs by {d} (step {step})"
                );
                s.done += len;
            }
        }
        assert!(step > 5, "several mixed steps ran");
        eprintln!(
            "{arch:?} {dtype:?}: {step} steps, worst relative logit difference {worst:e}, \
             {flipped} of {compared} sampled positions off by more than 1e-3"
        );
        // f16 pools move every position a little (printed above); the bound per position
        // still holds, which a wrong slot or table would break by far.
        assert!(
            dtype == KvDtype::F16 || flipped * 10 <= compared,
            "{arch:?}: {flipped} of {compared} positions differ (a real mismatch, not a rounding flip)"
        );
    }
}

#[test]
fn only_sampling_rows_are_returned_and_bad_tables_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_tiny_gguf(&path, &TinySpec::new(Architecture::Llama)).unwrap();
    let lm = LoadedModel::load(&path, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let mut kv = PagedKv::new(lm.model.config(), 8, BS);
    let (a, b) = (tokens(1, 6), tokens(2, 3));
    let batch = [
        BatchSeq {
            tokens: &a,
            start: 0,
            block_table: &[3, 1],
            logits: 0,
        },
        BatchSeq {
            tokens: &b,
            start: 0,
            block_table: &[5],
            logits: 1,
        },
    ];
    let out = lm.model.forward_paged(&batch, &mut kv).unwrap();
    assert_eq!(out.dims(), &[1, lm.tokenizer.vocab_size()]);
    let short = [BatchSeq {
        tokens: &a,
        start: 0,
        block_table: &[3],
        logits: 1,
    }];
    assert!(
        lm.model
            .forward_paged(&short, &mut kv)
            .unwrap_err()
            .to_string()
            .contains("does not cover")
    );
    let outside = [BatchSeq {
        tokens: &b,
        start: 0,
        block_table: &[99],
        logits: 1,
    }];
    assert!(
        lm.model
            .forward_paged(&outside, &mut kv)
            .unwrap_err()
            .to_string()
            .contains("outside the pool")
    );
}
