//! Choosing the next token: penalties, temperature, top-k, top-p, min-p, and a seeded RNG.
//!
//! Determinism is a protocol requirement (other nodes re-execute requests to verify them), so
//! the RNG is SplitMix64 written here rather than a crate whose stream could change with a
//! version bump, every sort breaks ties by token id, and the order of operations is fixed:
//! penalties → greedy or (temperature → top-k → top-p → min-p → draw).

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
    /// Log-probability of `token` under the model's raw distribution.
    pub logprob: f32,
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
}

impl Sampler {
    /// A sampler for one request.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// Records a generated token (for presence/frequency penalties).
    pub fn observe(&mut self, token: TokenId) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits`. `context` is prompt + output so far (for the
    /// repetition penalty); `top_n` alternatives are reported with their log-probabilities.
    pub fn sample(&mut self, logits: &[f32], context: &[TokenId], top_n: usize) -> Sampled {
        let raw_lse = log_sum_exp(logits);
        let mut l = logits.to_vec();
        self.apply_penalties(&mut l, context);
        let token = if self.params.temperature == 0.0 {
            argmax(&l)
        } else {
            self.draw(&l)
        };
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
            logprob: logits[token] - raw_lse,
            top,
        }
    }

    fn apply_penalties(&self, l: &mut [f32], context: &[TokenId]) {
        let p = &self.params;
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

    fn draw(&mut self, l: &[f32]) -> usize {
        let p = &self.params;
        let mut cand: Vec<(usize, f32)> = l
            .iter()
            .enumerate()
            .filter(|(_, x)| x.is_finite())
            .map(|(i, &x)| (i, x / p.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(l);
        }
        // Most likely first; ties by lower token id, so the order is fully determined.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && cand.len() > p.top_k {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                return cand[i].0;
            }
            u -= q;
        }
        cand[probs.len() - 1].0
    }
}

fn log_sum_exp(l: &[f32]) -> f32 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s: f64 = l.iter().map(|&x| f64::from(x - max).exp()).sum();
    max + s.ln() as f32
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(l: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best
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
        let r = s.sample(&[0.0, 2.0, 1.0], &[], 2);
        assert_eq!(r.token, 1);
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let p: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| (x - 2.0).exp()).sum();
        assert!((r.logprob + p.ln()).abs() < 1e-5);
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
                .map(|_| s.sample(&logits, &[], 0).token)
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
            assert_eq!(s.sample(&[0.1, 0.3, 0.2], &[], 0).token, 1);
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
                assert_eq!(s.sample(&logits, &[], 0).token, 0);
            }
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let mut s = sampler(|p| p.repetition_penalty = 2.0);
        assert_eq!(s.sample(&[1.0, 0.8], &[0], 0).token, 1);
        let mut s = sampler(|p| p.presence_penalty = 0.5);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.8], &[], 0).token, 1);
        // Frequency penalty grows with each occurrence: 1.0 - 0.04n against 0.9.
        let mut s = sampler(|p| p.frequency_penalty = 0.04);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.9], &[], 0).token, 0);
        s.observe(0);
        s.observe(0);
        assert_eq!(s.sample(&[1.0, 0.9], &[], 0).token, 1);
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
