//! Choosing the next token: penalties, temperature, top-k, top-p, min-p, and a seeded RNG.
//!
//! Determinism is a protocol requirement (other nodes re-execute requests to verify them), so
//! the RNG is SplitMix64 written here rather than a crate whose stream could change with a
//! version bump, every sort breaks ties by token id, and the order of operations is fixed:
//! logit bias → penalties → greedy or (temperature → top-k → top-p → min-p → draw).

use crate::error::{EngineError, Result};
use crate::tokenizer::TokenId;

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens seen in the last
    /// `penalty_last_n` tokens of prompt and output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of tokens already generated.
    pub frequency_penalty: f32,
    /// Window of the repetition penalty (0 = the whole context).
    pub penalty_last_n: usize,
    /// RNG seed. The same request with the same seed yields the same tokens.
    pub seed: u64,
    /// Added to the logits of the named tokens before anything else (OpenAI `logit_bias`,
    /// -100..=100; -100 effectively bans a token). Applied in the order given.
    pub logit_bias: Vec<(TokenId, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks ranges; returns a readable error for the first bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(format!(
                "logit_bias of token {t} must be in [-100, 100], got {b}"
            ));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and its output for a seed is fixed forever.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A chosen token with its log-probability under the model and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// Log-probability of `token` under the model's raw distribution, when asked for.
    pub logprob: Option<f32>,
    /// The `n` most likely tokens under the raw distribution, most likely first.
    pub top: Vec<(TokenId, f32)>,
}

/// Per-request sampler state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Counts of generated tokens, for presence and frequency penalties.
    counts: std::collections::HashMap<TokenId, u32>,
    /// A vocabulary-sized buffer reused across calls.
    scratch: Vec<f32>,
}

impl Sampler {
    /// A sampler for one request.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            counts: Default::default(),
            scratch: Vec::new(),
        }
    }

    /// Records a generated token (for presence/frequency penalties).
    pub fn observe(&mut self, token: TokenId) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits`. `context` is prompt + output so far (for the
    /// repetition penalty); with `logprob` (implied by `top_n > 0`) the token's log-probability
    /// is reported, and `top_n` alternatives with theirs.
    ///
    /// Cost matters here: Gemma 3 has 262,144 logits per row and the engine samples every
    /// running request after each step, so nothing below sorts the whole vocabulary. Greedy is
    /// one pass, plain temperature sampling two (vectorized `exp`, a fixed-order sum) plus the
    /// walk, top-k a partial selection, top-p a growing partial selection of the head.
    pub fn sample(
        &mut self,
        logits: &[f32],
        context: &[TokenId],
        logprob: bool,
        top_n: usize,
    ) -> Sampled {
        self.sample_masked(logits, context, logprob, top_n, None)
    }

    /// `sample`, drawing only among the tokens `mask` allows (a bit set over token ids: bit
    /// `i % 32` of word `i / 32`; tokens past its end are not allowed). The mask is applied
    /// after the penalties, as `-inf` logits; log-probabilities stay the raw distribution's.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        context: &[TokenId],
        logprob: bool,
        top_n: usize,
        mask: Option<&[u32]>,
    ) -> Sampled {
        let penalized;
        let l: &[f32] = if self.has_penalties() || mask.is_some() {
            let mut v = logits.to_vec();
            self.apply_penalties(&mut v, context);
            if let Some(mask) = mask {
                for (i, x) in v.iter_mut().enumerate() {
                    let allowed = mask.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1);
                    if !allowed {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            penalized = v;
            &penalized
        } else {
            logits
        };
        let token = if self.params.temperature == 0.0 {
            argmax(l)
        } else {
            self.draw(l)
        };
        if !logprob && top_n == 0 {
            return Sampled {
                token: token as TokenId,
                logprob: None,
                top: Vec::new(),
            };
        }
        let raw_lse = log_sum_exp(logits);
        let top = if top_n > 0 {
            top_indices(logits, top_n)
                .into_iter()
                .map(|i| (i as TokenId, logits[i] - raw_lse))
                .collect()
        } else {
            Vec::new()
        };
        Sampled {
            token: token as TokenId,
            logprob: Some(logits[token] - raw_lse),
            top,
        }
    }

    fn has_penalties(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || ((p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
                && !self.counts.is_empty())
    }

    fn apply_penalties(&self, l: &mut [f32], context: &[TokenId]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let window = if p.penalty_last_n == 0 {
                context
            } else {
                &context[context.len().saturating_sub(p.penalty_last_n)..]
            };
            let mut seen: Vec<TokenId> = window.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Temperature → top-k → top-p → min-p → one draw. The candidates are walked most likely
    /// first (ties by lower id) once top-k or top-p has ordered them, in token-id order
    /// otherwise; either order is fixed, so a seed always gives the same token.
    fn draw(&mut self, l: &[f32]) -> usize {
        let p = &self.params;
        let t = p.temperature;
        let max = crate::model::max_f32(l);
        if !max.is_finite() {
            return argmax(l);
        }
        // Division by t > 0 is monotone, so max / t is the largest scaled logit.
        let m = max / t;
        let prob = |i: u32| crate::model::exp_scalar(l[i as usize] / t - m);

        // (candidate ids, their unnormalized probabilities, whether ordered most likely first)
        let (mut ids, mut probs, mut sorted): (Vec<u32>, Vec<f32>, bool);
        if p.top_k > 0 && p.top_k < l.len() {
            ids = most_likely(l, p.top_k);
            probs = ids.iter().map(|&i| prob(i)).collect();
            sorted = true;
        } else {
            let e = &mut self.scratch;
            crate::model::exp_scaled(l, t, m, e);
            ids = Vec::new();
            probs = std::mem::take(e);
            sorted = false;
        }

        if p.top_p < 1.0 {
            let total = sum(&probs);
            let target = total * f64::from(p.top_p);
            if !sorted {
                // The smallest most-likely-first prefix reaching top_p of the mass: order a
                // growing head of the vocabulary until its cumulative mass gets there.
                let mut k = 64;
                loop {
                    let head = most_likely(l, k);
                    let mut acc = 0.0;
                    let reached = head.iter().any(|&i| {
                        acc += f64::from(probs[i as usize]);
                        acc >= target
                    });
                    if reached || head.len() < k {
                        ids = head;
                        break;
                    }
                    k *= 8;
                }
                let full = std::mem::take(&mut probs);
                probs = ids.iter().map(|&i| full[i as usize]).collect();
                self.scratch = full;
                sorted = true;
            }
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += f64::from(q);
                    acc >= target
                })
                .map_or(probs.len(), |i| i + 1);
            ids.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            // The most likely token has probability exp(0) = 1 before normalization.
            let floor = p.min_p;
            if sorted {
                let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
                ids.truncate(keep);
                probs.truncate(keep);
            } else {
                probs
                    .iter_mut()
                    .filter(|q| **q < floor)
                    .for_each(|q| *q = 0.0);
            }
        }
        let id_at = |j: usize| if sorted { ids[j] as usize } else { j };
        // Inverse-CDF draw over blocks of 256 (their sums have independent add chains; the
        // walk's serial subtractions then touch one block), then inside the chosen block.
        const BLOCK: usize = 256;
        let blocks: Vec<f64> = probs.chunks(BLOCK).map(sum).collect();
        let mut u = self.rng.next_f64() * blocks.iter().sum::<f64>();
        let mut chosen = None;
        for (b, &mass) in blocks.iter().enumerate() {
            if u >= mass {
                u -= mass;
                continue;
            }
            for (j, &q) in probs.iter().enumerate().skip(b * BLOCK).take(BLOCK) {
                if q <= 0.0 {
                    continue;
                }
                // Rounding can leave u at the block's end: its last candidate takes it.
                chosen = Some(j);
                if u < f64::from(q) {
                    break;
                }
                u -= f64::from(q);
            }
            break;
        }
        // Past every block by rounding: the last candidate with any mass.
        let chosen = chosen.or_else(|| probs.iter().rposition(|&q| q > 0.0));
        let token = chosen.map_or_else(|| argmax(l), id_at);
        self.give_back(probs, sorted, token)
    }

    /// Keeps the full-vocabulary buffer for the next call.
    fn give_back(&mut self, probs: Vec<f32>, sorted: bool, token: usize) -> usize {
        if !sorted {
            self.scratch = probs;
        }
        token
    }
}

/// The `k` most likely finite tokens, most likely first, ties by lower id: one pass that keeps
/// the best `k` in a heap (almost every token is turned away by one comparison with the heap's
/// least), then a sort of those `k`.
fn most_likely(l: &[f32], k: usize) -> Vec<u32> {
    #[derive(PartialEq)]
    struct Key(f32, u32);
    impl Eq for Key {}
    impl PartialOrd for Key {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Key {
        /// Greater means more likely.
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
        }
    }
    let more_likely = |a: &u32, b: &u32| Key(l[*b as usize], *b).cmp(&Key(l[*a as usize], *a));
    if k >= l.len() / 8 {
        // Most of the vocabulary: one sort is cheaper than a large heap.
        let mut all: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize].is_finite())
            .collect();
        if k < all.len() {
            all.select_nth_unstable_by(k, more_likely);
            all.truncate(k);
        }
        all.sort_unstable_by(more_likely);
        return all;
    }
    let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
    // Once the heap is full, a value at or below its least cannot get in (ties lose to the
    // lower id already there): one float comparison turns almost every token away.
    let mut floor = f32::NEG_INFINITY;
    for (i, &x) in l.iter().enumerate() {
        if !x.is_finite() || (heap.len() == k && x <= floor) {
            continue;
        }
        let key = Key(x, i as u32);
        if heap.len() < k {
            heap.push(std::cmp::Reverse(key));
        } else if let Some(mut least) = heap.peek_mut()
            && key > least.0
        {
            *least = std::cmp::Reverse(key);
        }
        if heap.len() == k
            && let Some(least) = heap.peek()
        {
            floor = least.0.0;
        }
    }
    heap.into_sorted_vec().into_iter().map(|r| r.0.1).collect()
}

/// A fixed-order sum: four interleaved f64 lanes, then the lanes left to right.
fn sum(v: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = v.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += f64::from(x);
    }
    acc[0] + acc[1] + acc[2] + acc[3]
}

/// `ln Σ exp(l)` (vectorized `exp`, fixed-order sum).
fn log_sum_exp(l: &[f32]) -> f32 {
    let max = crate::model::max_f32(l);
    if !max.is_finite() {
        return max;
    }
    max + crate::model::sum_exp(l, max).ln() as f32
}

/// Index of the largest value; the lowest index wins ties (NaNs are never chosen unless
/// nothing else is there).
pub fn argmax(l: &[f32]) -> usize {
    let max = crate::model::max_f32(l);
    let mut base = 0;
    for c in l.chunks(64) {
        if c.iter().fold(false, |hit, &x| hit | (x == max)) {
            return base + c.iter().position(|&x| x == max).unwrap_or(0);
        }
        base += c.len();
    }
    0
}

fn top_indices(l: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..l.len()).collect();
    let n = n.min(l.len());
    idx.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| {
        l[b].total_cmp(&l[a]).then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(p)
    }

    #[test]
    fn greedy_picks_the_max_and_reports_logprobs() {
        let mut s = sampler(|_| {});
        let r = s.sample(&[0.0, 2.0, 1.0], &[], true, 2);
        assert_eq!(r.token, 1);
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let p: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| (x - 2.0).exp()).sum();
        assert!((r.logprob.unwrap() + p.ln()).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(|p| {
                p.temperature = 1.0;
                p.seed = seed;
            });
            (0..40)
                .map(|_| s.sample(&logits, &[], false, 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = sampler(|p| {
            p.temperature = 5.0;
            p.top_k = 1;
            p.seed = 3;
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 0.3, 0.2], &[], false, 0).token, 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probs ≈ [0.84, 0.11, 0.04, ...]: top_p 0.5 and min_p 0.5 both keep only token 0.
        let logits = [3.0, 1.0, 0.0, -1.0];
        for f in [
            (|p: &mut SamplingParams| p.top_p = 0.5) as fn(&mut SamplingParams),
            |p| p.min_p = 0.5,
        ] {
            let mut s = sampler(|p| {
                p.temperature = 1.0;
                f(p);
            });
            for seed in 0..20 {
                s.rng = Rng::new(seed);
                assert_eq!(s.sample(&logits, &[], false, 0).token, 0);
            }
        }
    }

    #[test]
    fn most_likely_is_the_head_of_the_full_order() {
        let mut r = Rng::new(9);
        // Few distinct values, so ties are common; a NaN and an -inf are never chosen.
        let mut l: Vec<f32> = (0..5000)
            .map(|_| (r.next_u64() % 50) as f32 * 0.5)
            .collect();
        l[3] = f32::NAN;
        l[4] = f32::NEG_INFINITY;
        let mut full: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize].is_finite())
            .collect();
        full.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        for k in [1, 7, 64, 4998, 6000] {
            assert_eq!(most_likely(&l, k), full[..k.min(full.len())], "k = {k}");
        }
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        // A long, peaked vocabulary: the nucleus of 0.9 takes many heap rounds to find.
        let l: Vec<f32> = (0..20_000)
            .map(|i| -((i % 9_973) as f32).sqrt() * 0.05)
            .collect();
        let z: Vec<f64> = l.iter().map(|&x| f64::from(x)).collect();
        let total: f64 = z.iter().map(|x| x.exp()).sum();
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let mut acc = 0.0;
        let n = order.iter().take_while(|&&i| {
            let before = acc;
            acc += z[i].exp() / total;
            before < 0.9
        });
        let nucleus: std::collections::HashSet<usize> = n.copied().collect();
        assert!(nucleus.len() > 512, "{}", nucleus.len());
        let mut s = sampler(|p| {
            p.temperature = 1.0;
            p.top_p = 0.9;
        });
        let mut seen = std::collections::HashSet::new();
        for seed in 0..300 {
            s.rng = Rng::new(seed);
            let t = s.sample(&l, &[], false, 0).token as usize;
            assert!(nucleus.contains(&t), "token {t} is outside the nucleus");
            seen.insert(t);
        }
        assert!(seen.len() > 50, "draws should spread over the nucleus");
    }

    #[test]
    fn plain_temperature_draws_follow_the_distribution() {
        // p ∝ exp([2, 1, 0, -inf, NaN]): about 0.665, 0.245, 0.090, 0, 0.
        let l = [2.0, 1.0, 0.0, f32::NEG_INFINITY, f32::NAN];
        let mut s = sampler(|p| p.temperature = 1.0);
        let mut counts = [0usize; 5];
        for _ in 0..20_000 {
            counts[s.sample(&l, &[], false, 0).token as usize] += 1;
        }
        assert_eq!(counts[3] + counts[4], 0);
        for (c, p) in counts.iter().zip([0.665, 0.245, 0.090]) {
            let f = *c as f64 / 20_000.0;
            assert!((f - p).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let mut s = sampler(|p| p.repetition_penalty = 2.0);
        assert_eq!(s.sample(&[1.0, 0.8], &[0], false, 0).token, 1);
        let mut s = sampler(|p| p.presence_penalty = 0.5);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.8], &[], false, 0).token, 1);
        // Frequency penalty grows with each occurrence: 1.0 - 0.04n against 0.9.
        let mut s = sampler(|p| p.frequency_penalty = 0.04);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.9], &[], false, 0).token, 0);
        s.observe(0);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.9], &[], false, 0).token, 1);
    }

    /// Per-row sampling cost on a Gemma-3-sized vocabulary:
    /// `cargo test --release -p atoma-engine --lib sampling::tests::timings -- --ignored --nocapture`
    #[test]
    #[ignore]
    #[allow(clippy::print_stderr)]
    fn timings() {
        let mut r = Rng::new(1);
        let logits: Vec<f32> = (0..262_144)
            .map(|_| (r.next_f64() * 20.0 - 10.0) as f32)
            .collect();
        type Case = (&'static str, fn(&mut SamplingParams));
        let cases: [Case; 5] = [
            ("greedy", |_| {}),
            ("temperature 1", |p| p.temperature = 1.0),
            ("top_k 40", |p| {
                p.temperature = 0.8;
                p.top_k = 40;
            }),
            ("top_p 0.9", |p| {
                p.temperature = 1.0;
                p.top_p = 0.9;
            }),
            ("repetition 1.1", |p| p.repetition_penalty = 1.1),
        ];
        // Zipf-like (p ∝ rank^-1.3) with ranks scattered over the ids, nearer to a model's
        // distribution than uniform noise, whose top-p nucleus is most of the vocabulary.
        let zipf: Vec<f32> = (0..262_144u64)
            .map(|i| -1.3 * (1.0 + ((i * 40_503) % 262_144) as f32).ln())
            .collect();
        let mut s = sampler(|p| {
            p.temperature = 1.0;
            p.top_p = 0.9;
        });
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(s.sample(&zipf, &[], false, 0));
        }
        eprintln!(
            "top_p 0.9 (zipf): {:8.1} us per row",
            t0.elapsed().as_secs_f64() * 1e6 / 20.0
        );
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(argmax(std::hint::black_box(&logits)));
        }
        eprintln!("argmax {:.1} us", t0.elapsed().as_secs_f64() * 1e6 / 20.0);
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(log_sum_exp(std::hint::black_box(&logits)));
        }
        eprintln!("lse {:.1} us", t0.elapsed().as_secs_f64() * 1e6 / 20.0);
        for (name, f) in cases {
            let mut s = sampler(f);
            let n = 20;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(s.sample(&logits, &[1, 2, 3], false, 0));
            }
            eprintln!(
                "{name:>16}: {:8.1} us per row",
                t0.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
    }
}
