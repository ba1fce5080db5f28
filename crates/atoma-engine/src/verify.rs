//! Verification by re-execution: given a logged request (prompt tokens, the output tokens the
//! node claims, and how it sampled), one teacher-forced pass over prompt + output gives the
//! logits of every generation step at once, and replaying the seeded sampler over them must pick
//! exactly the logged token at each step, stop exactly where the log stops, for the logged
//! reason. This costs a prefill, not a generation.
//!
//! It is exact because the engine is: a row's logits are the same bits in a prefill chunk as in
//! a decode step, whatever else shares the pass and however the prompt is chunked, on every CPU
//! kernel level. The replay is the serving path's own `Generation` (sampler, penalties, stop
//! tokens, stop strings, `max_tokens`), fed the rows in order.

use crate::generate::{FinishReason, GenerateRequest, Generation};
use crate::grammar::{Constraint, GrammarSpec};
use crate::loaded::LoadedModel;
use crate::sampling::SamplingParams;
use crate::tokenizer::TokenId;

/// A logged request to re-execute.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    pub prompt: Vec<TokenId>,
    /// The tokens the node says it generated, in order.
    pub output: Vec<TokenId>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    /// The logged finish reason; `Cancelled` (the client left) checks the tokens only.
    pub finish: FinishReason,
    /// The grammar the request's output was constrained to, if any.
    pub grammar: Option<GrammarSpec>,
}

/// What re-execution found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every token is the sampler's choice and the generation ends as logged; `text` is the
    /// answer the client must have received.
    Agree { text: String },
    /// The first place the log departs from the re-execution.
    Disagree {
        /// Index in the output (0 = the first generated token).
        position: usize,
        /// The sampler's choice there, if the generation goes on.
        expected: Option<TokenId>,
        /// The logged token there, if the log goes on.
        logged: Option<TokenId>,
        reason: String,
    },
}

/// The replay of one request, fed logit rows in position order.
#[derive(Debug)]
pub(crate) struct VerifyState {
    generation: Generation,
    output: Vec<TokenId>,
    finish: FinishReason,
    /// Index of the next output token to check.
    next: usize,
    text: String,
    verdict: Option<Verdict>,
}

impl VerifyState {
    pub(crate) fn new(
        lm: &LoadedModel,
        req: &VerifyRequest,
        max_new: usize,
        constraint: Option<Constraint>,
    ) -> Self {
        let mut g = GenerateRequest::new(req.prompt.clone(), req.max_tokens);
        g.sampling = req.sampling.clone();
        g.stop = req.stop.clone();
        g.stop_token_ids = req.stop_token_ids.clone();
        g.ignore_eos = req.ignore_eos;
        let mut s = Self {
            generation: Generation::new(lm, &g, max_new).with_constraint(constraint),
            output: req.output.clone(),
            finish: req.finish,
            next: 0,
            text: String::new(),
            verdict: None,
        };
        if req.output.is_empty() {
            s.verdict = Some(if req.finish == FinishReason::Cancelled {
                Verdict::Agree {
                    text: String::new(),
                }
            } else {
                Verdict::Disagree {
                    position: 0,
                    expected: None,
                    logged: None,
                    reason: format!(
                        "the log has no output but finishes with `{}`",
                        req.finish.as_str()
                    ),
                }
            });
        }
        s
    }

    /// The tokens to run: the prompt, then every logged token but the last (whose successor
    /// nobody sampled).
    pub(crate) fn sequence(req: &VerifyRequest) -> Vec<TokenId> {
        let mut t = req.prompt.clone();
        if let Some((_, head)) = req.output.split_last() {
            t.extend_from_slice(head);
        }
        t
    }

    /// The verdict, once reached.
    pub(crate) fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    pub(crate) fn into_verdict(self) -> Option<Verdict> {
        self.verdict
    }

    /// Feeds the logits of output step `index` (the row at position `prompt + index - 1`).
    /// Steps already checked are skipped (a preempted sequence is recomputed from scratch).
    pub(crate) fn feed(&mut self, lm: &LoadedModel, index: usize, logits: &[f32]) {
        if self.verdict.is_some() || index != self.next {
            return;
        }
        let n = self.output.len();
        let (event, done) = self.generation.step(lm, logits);
        let logged = self.output[index];
        if event.id != logged {
            self.verdict = Some(Verdict::Disagree {
                position: index,
                expected: Some(event.id),
                logged: Some(logged),
                reason: "the logged token is not the sampler's choice".into(),
            });
            return;
        }
        self.text.push_str(&event.text);
        self.next += 1;
        let last = index + 1 == n;
        self.verdict = match (done, last) {
            (Some(reason), false) => Some(Verdict::Disagree {
                position: index + 1,
                expected: None,
                logged: Some(self.output[index + 1]),
                reason: format!(
                    "the generation ends here (`{}`) but the log goes on",
                    reason.as_str()
                ),
            }),
            (Some(reason), true) if reason == self.finish => Some(self.agree(reason)),
            (Some(reason), true) => Some(Verdict::Disagree {
                position: n,
                expected: None,
                logged: None,
                reason: format!(
                    "the log finishes with `{}`, the generation with `{}`",
                    self.finish.as_str(),
                    reason.as_str()
                ),
            }),
            (None, true) if self.finish == FinishReason::Cancelled => {
                Some(self.agree(FinishReason::Cancelled))
            }
            (None, true) => Some(Verdict::Disagree {
                position: n,
                expected: None,
                logged: None,
                reason: format!(
                    "the log ends with `{}` but the generation goes on",
                    self.finish.as_str()
                ),
            }),
            (None, false) => None,
        };
    }

    fn agree(&mut self, reason: FinishReason) -> Verdict {
        let mut text = std::mem::take(&mut self.text);
        // A cancelled answer ended with its last token: held-back text never reached the client.
        if reason != FinishReason::Cancelled {
            text.push_str(&self.generation.finish(reason).text);
        }
        Verdict::Agree { text }
    }
}
