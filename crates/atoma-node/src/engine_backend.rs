//! The engine behind the API: `InferenceBackend` for `atoma_engine::Engine`. Renders chat
//! messages with the model's template, tokenizes, maps sampling fields, and turns the engine's
//! event stream into the API's. Dropping the API's stream drops the engine's, which cancels the
//! request at the next token.

use std::sync::Arc;

use atoma_api::{
    BackendError, BackendEvent, EmbedInput, Embeddings, Execution, InferenceBackend,
    InferenceRequest, Logprobs, Prepared, Prompt, SamplingRecord, TokenLogprob,
};
use atoma_engine::grammar::Constraint;
use atoma_engine::tools::CallSplitter;
use atoma_engine::{
    ChatMessage, Engine, EngineError, FinishReason, GenerateRequest, GenerationEvent, GrammarSpec,
    Role, SamplingParams, ToolCall, ToolChoice, ToolDef, Tools,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

/// An engine serving one model under `name`, and optionally an embedding model.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    engine: Engine,
    name: String,
    model_sha256: [u8; 32],
    determinism_class: String,
    embedder: Option<Arc<ServedEmbedder>>,
    /// Most choices per request.
    max_choices: u32,
}

/// An embedding model and the name it is served under.
#[derive(Debug)]
struct ServedEmbedder {
    embedder: atoma_embed::Embedder,
    name: String,
}

/// The determinism class of embeddings: the vectors' bits depend on the embedding crate's
/// numerics (f32 on the CPU), not on the batch or the thread count. Bump the number whenever a
/// change to `atoma-embed` alters a bit of a vector, so logs of other numerics are never
/// compared.
pub const EMBED_DETERMINISM_CLASS: &str = "atoma-embed/numerics-1/cpu/f32";

impl EngineBackend {
    /// Serves `engine` as model `name`; `model_sha256` is the SHA-256 of the model file, which
    /// every log record names.
    pub fn new(engine: Engine, name: impl Into<String>, model_sha256: [u8; 32]) -> Self {
        let determinism_class = engine.determinism_class();
        Self {
            engine,
            name: name.into(),
            model_sha256,
            determinism_class,
            embedder: None,
            max_choices: atoma_api::openai::DEFAULT_MAX_N,
        }
    }

    /// Serves at most `max` choices (`n` × prompts) per request (1 to `openai::MAX_N`).
    pub fn with_max_choices(mut self, max: u32) -> Self {
        self.max_choices = max.clamp(1, atoma_api::openai::MAX_N);
        self
    }

    /// Also serves `embedder` under `name` (`/v1/embeddings`).
    pub fn with_embedder(
        mut self,
        embedder: atoma_embed::Embedder,
        name: impl Into<String>,
    ) -> Self {
        self.embedder = Some(Arc::new(ServedEmbedder {
            embedder,
            name: name.into(),
        }));
        self
    }

    fn embedder(&self, model: &str) -> Result<&atoma_embed::Embedder, BackendError> {
        match &self.embedder {
            Some(e) if e.name == model => Ok(&e.embedder),
            _ => Err(BackendError::UnknownModel(model.to_string())),
        }
    }

    /// The token ids of each of the request's prompts (one, unless a completions batch).
    pub(crate) fn prompts(&self, req: &InferenceRequest) -> Result<Vec<Vec<u32>>, BackendError> {
        let lm = self.engine.model();
        if let Some((t, _)) = req
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= lm.tokenizer.vocab_size())
        {
            return Err(BackendError::Invalid(format!(
                "`logit_bias` names token {t}, which is not in the model's vocabulary of {}",
                lm.tokenizer.vocab_size()
            )));
        }
        match &req.prompt {
            Prompt::Batch(prompts) => prompts.iter().map(|p| self.tokens_of(p, req)).collect(),
            one => Ok(vec![self.tokens_of(one, req)?]),
        }
    }

    fn tokens_of(&self, prompt: &Prompt, req: &InferenceRequest) -> Result<Vec<u32>, BackendError> {
        let lm = self.engine.model();
        let ids = match prompt {
            Prompt::Text(t) => lm.tokenize_prompt(t),
            Prompt::Tokens(ids) => {
                let vocab = lm.tokenizer.vocab_size();
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(BackendError::Invalid(format!(
                        "prompt token id {bad} is not in the model's vocabulary of {vocab}"
                    )));
                }
                ids.clone()
            }
            Prompt::Chat(turns) => {
                let msgs: Vec<ChatMessage> = turns.iter().map(chat_message).collect();
                let tools = req.tools.as_ref().map(engine_tools);
                let text = lm
                    .chat_prompt_with_tools(&msgs, tools.as_ref())
                    .map_err(map_err)?;
                lm.tokenize_prompt(&text)
            }
            Prompt::Batch(_) => {
                return Err(BackendError::Invalid(
                    "a prompt list inside a prompt list".into(),
                ));
            }
        };
        let context = lm.info.config.context;
        if ids.len() >= context {
            return Err(BackendError::Invalid(format!(
                "the prompt has {} tokens, the model's context holds {context}",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// The prompt's text as `echo` returns it.
    fn echo_text(&self, req: &InferenceRequest) -> Option<String> {
        if !req.echo {
            return None;
        }
        Some(match &req.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => self.engine.model().tokenizer.decode(ids),
            Prompt::Chat(_) | Prompt::Batch(_) => String::new(),
        })
    }

    fn check_model(&self, model: &str) -> Result<(), BackendError> {
        if model == self.name {
            Ok(())
        } else {
            Err(BackendError::UnknownModel(model.to_string()))
        }
    }
}

fn chat_message(t: &atoma_api::ChatTurn) -> ChatMessage {
    let role = match t.role {
        atoma_api::Role::System => Role::System,
        atoma_api::Role::Assistant => Role::Assistant,
        atoma_api::Role::User => Role::User,
        atoma_api::Role::Tool => Role::Tool,
    };
    let mut m = ChatMessage::new(role, t.content.clone());
    m.tool_calls = t
        .tool_calls
        .iter()
        .map(|c| ToolCall {
            id: c.id.clone(),
            name: c.name.clone(),
            arguments: c.arguments.clone(),
        })
        .collect();
    m.tool_call_id = t.tool_call_id.clone();
    m
}

/// The engine's view of a request's tools.
fn engine_tools(t: &atoma_api::Tools) -> Tools {
    Tools {
        defs: t
            .defs
            .iter()
            .map(|d| ToolDef {
                name: d.name.clone(),
                description: d.description.clone(),
                parameters: d.parameters.clone(),
            })
            .collect(),
        choice: match &t.choice {
            atoma_api::ToolChoice::Auto => ToolChoice::Auto,
            atoma_api::ToolChoice::Required => ToolChoice::Required,
            atoma_api::ToolChoice::Function(f) => ToolChoice::Function(f.clone()),
        },
        parallel: t.parallel,
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

fn embed_err(e: atoma_embed::EmbedError) -> BackendError {
    match e {
        atoma_embed::EmbedError::Tokenize { .. }
        | atoma_embed::EmbedError::TokenOutOfRange { .. }
        | atoma_embed::EmbedError::EmptyInput { .. }
        | atoma_embed::EmbedError::TooManyTokens { .. } => BackendError::Invalid(e.to_string()),
        other => BackendError::Internal(other.to_string()),
    }
}

impl InferenceBackend for EngineBackend {
    fn models(&self) -> Vec<String> {
        vec![self.name.clone()]
    }

    fn max_choices(&self) -> u32 {
        self.max_choices
    }

    fn embedding_models(&self) -> Vec<String> {
        self.embedder.iter().map(|e| e.name.clone()).collect()
    }

    fn embed_tokenize(
        &self,
        model: &str,
        inputs: &[EmbedInput],
    ) -> Result<Vec<Vec<u32>>, BackendError> {
        let e = self.embedder(model)?;
        let vocab = e.config().vocab_size;
        inputs
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                EmbedInput::Text(t) => e.tokenize(t).map_err(embed_err),
                EmbedInput::Tokens(ids) => {
                    if ids.len() > e.max_tokens() {
                        return Err(BackendError::Invalid(format!(
                            "input {i} has {} tokens; `{model}` reads at most {}",
                            ids.len(),
                            e.max_tokens()
                        )));
                    }
                    if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(BackendError::Invalid(format!(
                            "input {i}: token id {t} is not in the vocabulary of {vocab}"
                        )));
                    }
                    Ok(ids.clone())
                }
            })
            .collect()
    }

    fn embed(&self, model: &str, tokens: &[Vec<u32>]) -> Result<Embeddings, BackendError> {
        let e = self.embedder(model)?;
        let inputs: Vec<atoma_embed::EmbedInput<'_>> = tokens
            .iter()
            .map(|t| atoma_embed::EmbedInput::Tokens(t))
            .collect();
        let out = e.embed(&inputs).map_err(embed_err)?;
        Ok(Embeddings {
            vectors: out.into_iter().map(|x| x.vector).collect(),
            model_sha256: e.weights_sha256(),
            determinism_class: EMBED_DETERMINISM_CLASS.into(),
        })
    }

    fn ready(&self) -> bool {
        self.engine.is_alive()
    }

    fn queue_depth(&self) -> usize {
        self.engine.waiting()
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
        // A bad schema is refused here, before any unit is reserved. Each choice has its own
        // grammar state.
        let grammar = grammar_of(&req);
        let n_prompts = match &req.prompt {
            Prompt::Batch(v) => v.len() as u32,
            _ => 1,
        };
        let constraints = (0..req.n.max(1) * n_prompts)
            .map(|_| {
                self.engine
                    .model()
                    .compile_grammar(grammar.as_ref())
                    .map_err(map_err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompts = self.prompts(&req)?;
        let engine = self.engine.clone();
        let echo = self.echo_text(&req);
        let total = execution.prompt_token_ids.len() as u64;
        let choices = prompts.len() * req.n.max(1) as usize;
        Ok(Prepared::with_choices(total, choices, execution, move || {
            start(&engine, prompts, req, sampling, grammar, constraints)
        })
        .with_echo(echo))
    }

    fn tokenize(
        &self,
        model: &str,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>, BackendError> {
        self.check_model(model)?;
        let lm = self.engine.model();
        let ids = if add_special {
            lm.tokenize_prompt(text)
        } else {
            lm.tokenizer.encode(text, false, true)
        };
        Ok(ids
            .into_iter()
            .map(|id| (id, lm.tokenizer.token_bytes(id, true)))
            .collect())
    }

    fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, BackendError> {
        self.check_model(model)?;
        let tok = &self.engine.model().tokenizer;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= tok.vocab_size()) {
            return Err(BackendError::Invalid(format!(
                "token id {bad} is not in the model's vocabulary of {}",
                tok.vocab_size()
            )));
        }
        Ok(tok.decode(ids))
    }
}

impl EngineBackend {
    /// How `req` runs with `seed`: the rendered prompt's tokens and the sampling after defaults.
    fn execution(
        &self,
        req: &InferenceRequest,
        seed: u64,
    ) -> Result<(Execution, SamplingParams), BackendError> {
        let prompt = self.prompts(req)?.concat();
        let sampling = SamplingParams {
            temperature: req.temperature,
            top_k: req.top_k as usize,
            top_p: req.top_p,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed,
            logit_bias: req.logit_bias.clone(),
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
            logit_bias: sampling.logit_bias.clone(),
        };
        Ok((execution, sampling))
    }

    /// How a logged request must have run (re-execution): its execution, the sampler's
    /// parameters and the echoed prompt text, if any.
    pub(crate) fn prepare_logged(
        &self,
        req: &InferenceRequest,
        seed: u64,
    ) -> Result<(Execution, SamplingParams, Option<String>), BackendError> {
        let (e, s) = self.execution(req, seed)?;
        Ok((e, s, self.echo_text(req)))
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

/// The grammar a request's output must match: its tools' call format (with text, or JSON
/// matching `response_format`, as the alternative under `tool_choice: auto`), else its
/// `response_format` schema. A pure function of the request, so a verifier derives the same.
pub(crate) fn grammar_of(req: &InferenceRequest) -> Option<GrammarSpec> {
    match &req.tools {
        Some(t) => Some(engine_tools(t).grammar(req.json_schema.as_ref())),
        None => req.json_schema.clone().map(GrammarSpec::JsonSchema),
    }
}

/// The seed of choice `i` of a request seeded `seed` (documented in `docs/protocol.md` §1).
pub(crate) fn choice_seed(seed: u64, i: u32) -> u64 {
    seed.wrapping_add(u64::from(i))
}

/// Submits a tokenized request's choices to the engine as one group (the prompt is computed
/// once) and maps each choice's events to the API's.
fn start(
    engine: &Engine,
    prompts: Vec<Vec<u32>>,
    req: InferenceRequest,
    sampling: SamplingParams,
    grammar: Option<GrammarSpec>,
    constraints: Vec<Option<Constraint>>,
) -> Result<Vec<BoxStream<'static, BackendEvent>>, BackendError> {
    let n = req.n.max(1) as usize;
    let model = engine.model_arc();
    let tools = req.tools.is_some();
    let mut constraints = constraints.into_iter();
    let mut out = Vec::with_capacity(prompts.len() * n);
    for (p, prompt) in prompts.into_iter().enumerate() {
        let mut g = GenerateRequest::new(prompt, req.max_tokens as usize);
        g.stop = req.stop.clone();
        g.ignore_eos = req.ignore_eos;
        g.sampling = sampling.clone();
        g.grammar = grammar.clone();
        if let Some(k) = req.logprobs {
            g.logprobs = true;
            g.top_logprobs = usize::from(k);
        }
        let group = (0..n)
            .map(|j| {
                let mut r = g.clone();
                r.sampling.seed = choice_seed(sampling.seed, (p * n + j) as u32);
                (r, constraints.next().flatten())
            })
            .collect();
        let streams = engine.submit_group(group).map_err(map_err)?;
        out.extend(streams.into_iter().map(|s| events(s, model.clone(), tools)));
    }
    Ok(out)
}

/// One choice's engine events as the API's; with tools, the text is split into content and
/// calls as it arrives.
fn events(
    stream: atoma_engine::GenerationStream,
    model: std::sync::Arc<atoma_engine::LoadedModel>,
    tools: bool,
) -> BoxStream<'static, BackendEvent> {
    let splitter = tools.then(CallSplitter::default);
    let calls = |split: atoma_engine::tools::Split| {
        split
            .calls
            .into_iter()
            .map(|(name, arguments)| BackendEvent::ToolCall { name, arguments })
    };
    futures_util::stream::unfold(
        (stream, splitter, true),
        move |(mut s, mut splitter, open)| {
            let model = model.clone();
            async move {
                if !open {
                    return None;
                }
                let ev = match s.next().await {
                    Some(GenerationEvent::Token(t)) => {
                        let logprobs = t.logprob.map(|lp| {
                            let entry = |id: u32, logprob: f32| TokenLogprob {
                                id,
                                bytes: model.tokenizer.token_bytes(id, true),
                                logprob,
                            };
                            Logprobs {
                                chosen: entry(t.id, lp),
                                top: t.top_logprobs.iter().map(|&(i, l)| entry(i, l)).collect(),
                            }
                        });
                        let Some(sp) = splitter.as_mut() else {
                            let token = BackendEvent::Token {
                                id: t.id,
                                text: t.text,
                                logprobs,
                            };
                            return Some((vec![token], (s, splitter, true)));
                        };
                        let mut split = sp.push(&t.text);
                        let token = BackendEvent::Token {
                            id: t.id,
                            text: std::mem::take(&mut split.content),
                            logprobs,
                        };
                        let mut evs = vec![token];
                        evs.extend(calls(split));
                        return Some((evs, (s, splitter, true)));
                    }
                    Some(GenerationEvent::Finished(f)) => {
                        // The held-back tail, then the end.
                        let finish_reason = match f.reason {
                            FinishReason::Stop => atoma_api::FinishReason::Stop,
                            FinishReason::Length => atoma_api::FinishReason::Length,
                            FinishReason::Cancelled => atoma_api::FinishReason::Cancelled,
                        };
                        let done = BackendEvent::Done {
                            finish_reason,
                            prompt_tokens: f.usage.prompt_tokens as u64,
                            completion_tokens: f.usage.completion_tokens as u64,
                            cached_tokens: f.usage.cached_tokens as u64,
                        };
                        let mut evs = Vec::new();
                        match splitter.as_mut() {
                            None => evs.push(BackendEvent::Text(f.text)),
                            Some(sp) => {
                                let mut split = sp.push(&f.text);
                                let mut text = std::mem::take(&mut split.content);
                                text.push_str(&sp.finish());
                                evs.extend(calls(split));
                                evs.push(BackendEvent::Text(text));
                            }
                        }
                        evs.push(done);
                        return Some((evs, (s, splitter, false)));
                    }
                    Some(GenerationEvent::Error(e)) => BackendEvent::Error(e.to_string()),
                    None => return None,
                };
                Some((vec![ev], (s, splitter, true)))
            }
        },
    )
    .flat_map(futures_util::stream::iter)
    .boxed()
}
