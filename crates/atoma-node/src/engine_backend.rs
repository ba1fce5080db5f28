//! The engine behind the API: `InferenceBackend` for `atoma_engine::Engine`. Renders chat
//! messages with the model's template, tokenizes, maps sampling fields, and turns the engine's
//! event stream into the API's. Dropping the API's stream drops the engine's, which cancels the
//! request at the next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use atoma_api::{
    BackendError, BackendEvent, Execution, InferenceBackend, InferenceRequest, Prepared, Prompt,
    SamplingRecord,
};
use atoma_engine::{
    ChatMessage, Engine, EngineError, GenerateRequest, GenerationEvent, Role, SamplingParams,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

/// An engine serving one model under `name`.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    engine: Engine,
    name: String,
    in_flight: Arc<AtomicUsize>,
    model_sha256: [u8; 32],
    determinism_class: String,
}

impl EngineBackend {
    /// Serves `engine` as model `name`; `model_sha256` is the SHA-256 of the model file, which
    /// every log record names.
    pub fn new(engine: Engine, name: impl Into<String>, model_sha256: [u8; 32]) -> Self {
        let determinism_class = engine.determinism_class();
        Self {
            engine,
            name: name.into(),
            in_flight: Arc::default(),
            model_sha256,
            determinism_class,
        }
    }

    fn tokens(&self, req: &InferenceRequest) -> Result<Vec<u32>, BackendError> {
        let lm = self.engine.model();
        let text = match &req.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(turns) => {
                let msgs: Vec<ChatMessage> = turns
                    .iter()
                    .map(|t| {
                        let role = match t.role.as_str() {
                            "system" => Role::System,
                            "assistant" => Role::Assistant,
                            _ => Role::User,
                        };
                        ChatMessage::new(role, t.content.clone())
                    })
                    .collect();
                lm.chat_prompt(&msgs).map_err(map_err)?
            }
        };
        let ids = lm.tokenize_prompt(&text);
        let context = lm.info.config.context;
        if ids.len() >= context {
            return Err(BackendError::Invalid(format!(
                "the prompt has {} tokens, the model's context holds {context}",
                ids.len()
            )));
        }
        Ok(ids)
    }
}

fn map_err(e: EngineError) -> BackendError {
    match e {
        EngineError::Overloaded { .. } => BackendError::Overloaded,
        EngineError::InvalidRequest(_)
        | EngineError::PromptTooLong { .. }
        | EngineError::ChatTemplate(_) => BackendError::Invalid(e.to_string()),
        other => BackendError::Internal(other.to_string()),
    }
}

/// A seed for a request that gave none, from the operating system's randomness (the node
/// returns and logs it, so the answer stays reproducible).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ 0x9E37_79B9_7F4A_7C15;
    }
    u64::from_le_bytes(b)
}

impl InferenceBackend for EngineBackend {
    fn models(&self) -> Vec<String> {
        vec![self.name.clone()]
    }

    fn ready(&self) -> bool {
        true
    }

    fn queue_depth(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn load(&self) -> atoma_api::BackendLoad {
        let s = self.engine.stats();
        atoma_api::BackendLoad {
            running: s.running,
            waiting: self.engine.waiting(),
            kv_blocks_used: s.kv_blocks_used,
            kv_blocks_total: s.kv_blocks_total,
        }
    }

    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError> {
        let seed = req.seed.unwrap_or_else(random_seed);
        let (execution, sampling) = self.execution(&req, seed)?;
        let prompt = execution.prompt_token_ids.clone();
        let (engine, in_flight) = (self.engine.clone(), self.in_flight.clone());
        Ok(Prepared::new(prompt.len() as u64, execution, move || {
            start(&engine, &in_flight, prompt, req, sampling)
        }))
    }
}

impl EngineBackend {
    /// How `req` runs with `seed`: the rendered prompt's tokens and the sampling after defaults.
    fn execution(
        &self,
        req: &InferenceRequest,
        seed: u64,
    ) -> Result<(Execution, SamplingParams), BackendError> {
        let prompt = self.tokens(req)?;
        let sampling = SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed,
            ..SamplingParams::default()
        };
        let execution = Execution {
            prompt_token_ids: prompt,
            seed,
            sampling: SamplingRecord {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k as u32,
                min_p: sampling.min_p,
                repetition_penalty: sampling.repetition_penalty,
                presence_penalty: sampling.presence_penalty,
                frequency_penalty: sampling.frequency_penalty,
                max_tokens: req.max_tokens,
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
            },
            model_sha256: self.model_sha256,
            determinism_class: self.determinism_class.clone(),
        };
        Ok((execution, sampling))
    }

    /// How a logged request must have run (re-execution).
    pub(crate) fn prepare_logged(
        &self,
        req: InferenceRequest,
        seed: u64,
    ) -> Result<Execution, BackendError> {
        self.execution(&req, seed).map(|(e, _)| e)
    }

    /// The SHA-256 of the served model file.
    pub fn model_sha256(&self) -> [u8; 32] {
        self.model_sha256
    }

    /// The engine's determinism class.
    pub fn determinism_class(&self) -> &str {
        &self.determinism_class
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Submits a tokenized request to the engine and maps its events to the API's.
fn start(
    engine: &Engine,
    in_flight: &Arc<AtomicUsize>,
    prompt: Vec<u32>,
    req: InferenceRequest,
    sampling: SamplingParams,
) -> Result<BoxStream<'static, BackendEvent>, BackendError> {
    let mut g = GenerateRequest::new(prompt, req.max_tokens as usize);
    g.stop = req.stop;
    g.ignore_eos = req.ignore_eos;
    g.sampling = sampling;
    let stream = engine.submit(g).map_err(map_err)?;
    let in_flight = in_flight.clone();
    in_flight.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight(in_flight);
    Ok(
        futures_util::stream::unfold((stream, Some(guard)), |(mut s, guard)| async move {
            let guard = guard?;
            let ev = match s.next().await {
                Some(GenerationEvent::Token(t)) => BackendEvent::Token {
                    id: t.id,
                    text: t.text,
                },
                Some(GenerationEvent::Finished(f)) => {
                    // The held-back tail, then the end (two events from one).
                    let done = BackendEvent::Done {
                        finish_reason: f.reason.as_str().to_string(),
                        prompt_tokens: f.usage.prompt_tokens as u64,
                        completion_tokens: f.usage.completion_tokens as u64,
                    };
                    return Some((vec![BackendEvent::Text(f.text), done], (s, None)));
                }
                Some(GenerationEvent::Error(e)) => BackendEvent::Error(e.to_string()),
                None => return None,
            };
            Some((vec![ev], (s, Some(guard))))
        })
        .flat_map(futures_util::stream::iter)
        .boxed(),
    )
}

/// Counts a request as in flight until its stream ends or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
