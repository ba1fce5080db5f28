//! One request's generation loop on the reference model: prefill, then sample / check stops /
//! decode until a finish reason, reporting every token as an event.
//!
//! Stop strings are matched on the decoded text; text that could be the start of a stop string
//! is held back until it is known not to be, so a stop string never leaks into the output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
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
    /// Number of top alternatives to report per token (0 = none).
    pub top_logprobs: usize,
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
            top_logprobs: 0,
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
    pub logprob: f32,
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

/// Runs `req` to completion on `lm`, calling `emit` for each event. `emit` returns false when
/// nobody listens any more; generation then stops without a `Finished` event. Setting `cancel`
/// ends it with `FinishReason::Cancelled`.
pub fn run_generation(
    lm: &LoadedModel,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    queued: Duration,
    emit: &mut dyn FnMut(GenerationEvent) -> bool,
) -> Result<()> {
    let context = lm.model.config().context;
    validate(req, context)?;
    let t0 = Instant::now();
    let mut timings = Timings {
        queued,
        ..Default::default()
    };
    let mut cache = KvCache::default();
    let mut logits = None;
    for chunk in req.prompt.chunks(PREFILL_CHUNK) {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        logits = Some(lm.model.forward(chunk, &mut cache)?);
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut stops = StopMatcher::new(&req.stop);
    let mut decoder = DecodeStream::new();
    let mut context_ids = req.prompt.clone();
    let eog = &lm.tokenizer.special().end_of_generation;
    let max_new = req.max_tokens.min(context - req.prompt.len());
    let mut usage = Usage {
        prompt_tokens: req.prompt.len(),
        completion_tokens: 0,
    };
    let mut first_token_at = None;
    let reason = loop {
        let Some(l) = logits.take() else {
            break FinishReason::Cancelled;
        };
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        let l = l.to_vec1::<f32>()?;
        let s = sampler.sample(&l, &context_ids, req.top_logprobs);
        first_token_at.get_or_insert_with(Instant::now);
        sampler.observe(s.token);
        context_ids.push(s.token);
        usage.completion_tokens += 1;
        let is_stop_token =
            (!req.ignore_eos && eog.contains(&s.token)) || req.stop_token_ids.contains(&s.token);
        let piece = if is_stop_token {
            String::new()
        } else {
            decoder.push(&lm.tokenizer, s.token)
        };
        let (text, hit) = stops.push(&piece);
        let alive = emit(GenerationEvent::Token(TokenEvent {
            id: s.token,
            text,
            logprob: s.logprob,
            top_logprobs: s.top,
        }));
        if !alive {
            return Ok(());
        }
        if is_stop_token || hit {
            break FinishReason::Stop;
        }
        if usage.completion_tokens >= max_new {
            break FinishReason::Length;
        }
        logits = Some(lm.model.forward(&[s.token], &mut cache)?);
    };
    let tail = if reason == FinishReason::Stop && stops.hit {
        String::new()
    } else {
        let rest = decoder.finish();
        stops.push(&rest);
        stops.flush()
    };
    let first = first_token_at.unwrap_or_else(Instant::now);
    timings.prefill = first.duration_since(t0);
    timings.decode = first.elapsed();
    emit(GenerationEvent::Finished(Finished {
        reason,
        text: tail,
        usage,
        timings,
        seed: req.sampling.seed,
    }));
    Ok(())
}

fn validate(req: &GenerateRequest, context: usize) -> Result<()> {
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
struct StopMatcher<'a> {
    stops: &'a [String],
    /// Text received but not yet released.
    held: String,
    hit: bool,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
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
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
    }

    #[test]
    fn false_alarm_is_released() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.push("X"), ("EX".to_string(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.flush(), "EN");
    }
}
