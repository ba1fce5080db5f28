//! One request's generation loop on the reference model: prefill, then sample / check stops /
//! decode until a finish reason, reporting every token as an event.
//!
//! Stop strings are matched on the decoded text; text that could be the start of a stop string
//! is held back until it is known not to be, so a stop string never leaks into the output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::grammar::{Constraint, GrammarSpec};
use crate::loaded::LoadedModel;
use crate::model::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{DecodeStream, TokenId};

/// Prompt tokens fed to the model per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 512;

/// A generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<TokenId>,
    /// Maximum number of generated tokens (the context length also caps it).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Generation stops after any of these tokens (in addition to end-of-generation tokens).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report each token's log-probability (`TokenEvent::logprob`). Off by default: on a
    /// 262,144-token vocabulary it is a pass of `exp` over every logit, per token.
    pub logprobs: bool,
    /// Number of top alternatives to report per token (0 = none; more than 0 implies `logprobs`).
    pub top_logprobs: usize,
    /// The output must match this grammar (constrained decoding, `crate::grammar`).
    pub grammar: Option<GrammarSpec>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens.
    pub fn new(prompt: Vec<TokenId>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            grammar: None,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller cancelled.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (the batching engine only).
    pub cached_tokens: usize,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Waiting in the engine queue.
    pub queued: Duration,
    /// Prompt processing, up to the first sampled token.
    pub prefill: Duration,
    /// Everything after the first token.
    pub decode: Duration,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: TokenId,
    /// Text that became final with this token (may be empty: incomplete UTF-8, or held back
    /// while it could still turn into a stop string).
    pub text: String,
    /// Log-probability under the model's raw distribution, when the request asked for it.
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    /// Held-back text released at the end (appended after the last token's text).
    pub text: String,
    pub usage: Usage,
    pub timings: Timings,
    /// The seed the sampler used.
    pub seed: u64,
}

/// What a generation reports, in order: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug)]
pub enum GenerationEvent {
    Token(TokenEvent),
    Finished(Finished),
    Error(EngineError),
}

/// The per-request state between forward passes: sampler, stop matching, incremental
/// detokenization, counts and timings. The reference loop (`run_generation`) and the batching
/// engine both drive it, so a request behaves the same in either.
#[derive(Debug)]
pub(crate) struct Generation {
    sampler: Sampler,
    stops: StopMatcher,
    decoder: DecodeStream,
    /// Prompt and generated tokens (for penalties).
    context_ids: Vec<TokenId>,
    eog: Vec<TokenId>,
    stop_token_ids: Vec<TokenId>,
    ignore_eos: bool,
    logprobs: bool,
    top_logprobs: usize,
    max_new: usize,
    usage: Usage,
    seed: u64,
    started: Instant,
    queued: Duration,
    first_token_at: Option<Instant>,
    /// The grammar the output must match, if any.
    constraint: Option<Constraint>,
}

impl Generation {
    /// State for `req`, which may generate at most `max_new` tokens.
    pub(crate) fn new(lm: &LoadedModel, req: &GenerateRequest, max_new: usize) -> Self {
        Self {
            sampler: Sampler::new(req.sampling.clone()),
            stops: StopMatcher::new(req.stop.clone()),
            decoder: DecodeStream::new(),
            context_ids: req.prompt.clone(),
            eog: lm.tokenizer.special().end_of_generation.clone(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs || req.top_logprobs > 0,
            top_logprobs: req.top_logprobs,
            max_new: max_new.min(req.max_tokens),
            usage: Usage {
                prompt_tokens: req.prompt.len(),
                completion_tokens: 0,
                cached_tokens: 0,
            },
            seed: req.sampling.seed,
            started: Instant::now(),
            queued: Duration::ZERO,
            first_token_at: None,
            constraint: None,
        }
    }

    /// The prompt's tokens.
    pub(crate) fn prompt(&self) -> &[TokenId] {
        &self.context_ids[..self.usage.prompt_tokens]
    }

    /// Constrains the output to a compiled grammar.
    pub(crate) fn with_constraint(mut self, c: Option<Constraint>) -> Self {
        self.constraint = c;
        self
    }

    /// Marks the start of computation, after `queued` in the queue.
    pub(crate) fn start(&mut self, queued: Duration) {
        self.started = Instant::now();
        self.queued = queued;
    }

    /// Samples the next token from `logits`; returns its event and, when the request is done,
    /// why.
    pub(crate) fn step(
        &mut self,
        lm: &LoadedModel,
        logits: &[f32],
    ) -> (TokenEvent, Option<FinishReason>) {
        let mask = match self.constraint.as_mut().map(Constraint::mask).transpose() {
            Ok(m) => m,
            Err(e) => {
                // Cannot happen for a grammar that compiled (every mask allows something);
                // ending the request is better than drawing unconstrained.
                tracing::error!(error = %e, "grammar mask failed");
                return (
                    TokenEvent {
                        id: self.eog.first().copied().unwrap_or(0),
                        text: String::new(),
                        logprob: None,
                        top_logprobs: Vec::new(),
                    },
                    Some(FinishReason::Stop),
                );
            }
        };
        let s = self.sampler.sample_masked(
            logits,
            &self.context_ids,
            self.logprobs,
            self.top_logprobs,
            mask.as_deref(),
        );
        if let Some(c) = self.constraint.as_mut()
            && let Err(e) = c.consume(s.token)
        {
            tracing::error!(error = %e, "grammar refused a token its own mask allowed");
        }
        self.first_token_at.get_or_insert_with(Instant::now);
        self.sampler.observe(s.token);
        self.context_ids.push(s.token);
        self.usage.completion_tokens += 1;
        let is_stop_token = (!self.ignore_eos && self.eog.contains(&s.token))
            || self.stop_token_ids.contains(&s.token);
        let piece = if is_stop_token {
            String::new()
        } else {
            self.decoder.push(&lm.tokenizer, s.token)
        };
        let (text, hit) = self.stops.push(&piece);
        let reason = if is_stop_token || hit {
            Some(FinishReason::Stop)
        } else if self.usage.completion_tokens >= self.max_new {
            Some(FinishReason::Length)
        } else {
            None
        };
        let event = TokenEvent {
            id: s.token,
            text,
            logprob: s.logprob,
            top_logprobs: s.top,
        };
        (event, reason)
    }

    /// Records how many prompt tokens came from the prefix cache (reported in `Usage`).
    pub(crate) fn set_cached_tokens(&mut self, n: usize) {
        self.usage.cached_tokens = n;
    }

    /// The closing event: releases held-back text (unless a stop string cut it).
    pub(crate) fn finish(&mut self, reason: FinishReason) -> Finished {
        let text = if reason == FinishReason::Stop && self.stops.hit {
            String::new()
        } else {
            let rest = self.decoder.finish();
            self.stops.push(&rest);
            self.stops.flush()
        };
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        Finished {
            reason,
            text,
            usage: self.usage,
            timings: Timings {
                queued: self.queued,
                prefill: first.duration_since(self.started),
                decode: first.elapsed(),
            },
            seed: self.seed,
        }
    }
}

/// Runs `req` to completion on `lm` with the single-sequence reference model, calling `emit`
/// for each event. `emit` returns false when nobody listens any more; generation then stops
/// without a `Finished` event. Setting `cancel` ends it with `FinishReason::Cancelled`.
pub fn run_generation(
    lm: &LoadedModel,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    queued: Duration,
    emit: &mut dyn FnMut(GenerationEvent) -> bool,
) -> Result<()> {
    let context = lm.model.config().context;
    validate(req, context)?;
    let constraint = lm.compile_grammar(req.grammar.as_ref())?;
    let mut generation =
        Generation::new(lm, req, context - req.prompt.len()).with_constraint(constraint);
    generation.start(queued);
    let mut cache = KvCache::default();
    let mut logits = None;
    for chunk in req.prompt.chunks(PREFILL_CHUNK) {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        logits = Some(lm.model.forward(chunk, &mut cache)?);
    }
    let reason = loop {
        let Some(l) = logits.take() else {
            break FinishReason::Cancelled;
        };
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        let (event, done) = generation.step(lm, &l.to_vec1::<f32>()?);
        let token = event.id;
        if !emit(GenerationEvent::Token(event)) {
            return Ok(());
        }
        if let Some(reason) = done {
            break reason;
        }
        logits = Some(lm.model.forward(&[token], &mut cache)?);
    };
    emit(GenerationEvent::Finished(generation.finish(reason)));
    Ok(())
}

pub(crate) fn validate(req: &GenerateRequest, context: usize) -> Result<()> {
    if req.prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if req.prompt.len() >= context {
        return Err(EngineError::PromptTooLong {
            prompt_tokens: req.prompt.len(),
            context,
        });
    }
    if req.max_tokens == 0 {
        return Err(EngineError::InvalidRequest(
            "max_tokens must be at least 1".into(),
        ));
    }
    if req.stop.iter().any(String::is_empty) {
        return Err(EngineError::InvalidRequest(
            "stop strings must not be empty".into(),
        ));
    }
    req.sampling.validate()
}

/// Finds stop strings in streamed text, holding back what could still become one.
#[derive(Debug)]
struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    held: String,
    hit: bool,
}

impl StopMatcher {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            hit: false,
        }
    }

    /// Adds `piece`; returns the text safe to release and whether a stop string was found
    /// (the text before it is released, the rest dropped).
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.hit {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.hit = true;
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .take(1)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(stops);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
    }

    #[test]
    fn false_alarm_is_released() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(stops);
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.push("X"), ("EX".to_string(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.flush(), "EN");
    }
}
