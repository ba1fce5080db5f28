//! The inference-backend contract the API is written against. The node plugs the engine in;
//! tests plug in a trivial backend. Nothing here knows about HTTP.

use futures_util::stream::BoxStream;

pub use atoma_state::log::SamplingRecord;

/// Who speaks a chat turn (OpenAI's `developer` is a `System` turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (`tool_call_id` names the call it answers).
    Tool,
}

impl Role {
    /// The role's name in chat templates and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
    /// An assistant turn's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn: the call it answers.
    pub tool_call_id: Option<String>,
}

impl ChatTurn {
    /// A plain turn.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function call, as an assistant turn carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// A function the model may call (`tools[].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments (`Null`: none).
    pub parameters: serde_json::Value,
}

/// `tool_choice` other than `none` (which drops the tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    Required,
    /// This function must be called.
    Function(String),
}

/// The tools a chat request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub defs: Vec<ToolDef>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): several calls in one answer.
    pub parallel: bool,
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Messages, rendered by the model's chat template.
    Chat(Vec<ChatTurn>),
    /// Raw text (completions).
    Text(String),
    /// Token ids, used as given (completions).
    Tokens(Vec<u32>),
    /// Several completion prompts (each `Text` or `Tokens`), run together: `n` choices each,
    /// choice `p × n + j` being prompt `p`'s `j`-th.
    Batch(Vec<Prompt>),
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context's end.
    Length,
    /// The client went away (logged only; never sent).
    Cancelled,
    /// The answer is tool calls (sent only: the log keeps the generation's own reason, `Stop`).
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::ToolCalls => "tool_calls",
        }
    }

    /// The reason named `s` on the wire.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" => Some(Self::Stop),
            "length" => Some(Self::Length),
            "cancelled" => Some(Self::Cancelled),
            "tool_calls" => Some(Self::ToolCalls),
            _ => None,
        }
    }
}

/// One token with its log-probability under the model's raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's bytes (a piece of UTF-8 text, possibly incomplete; special tokens as text).
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    /// Most likely first; as many as the request's `top_logprobs`.
    pub top: Vec<TokenLogprob>,
}

/// A validated inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Generate past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Keep the k most likely tokens (0: off).
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` × the most likely (0: off).
    pub min_p: f32,
    /// Repetition penalty over the last 64 tokens (1: off).
    pub repetition_penalty: f32,
    /// Added to the named tokens' logits, in token-id order.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report log-probabilities: `Some(k)` gives the chosen token's and the `k` most likely.
    pub logprobs: Option<u8>,
    /// Completions: the prompt's text comes back before the generated text.
    pub echo: bool,
    /// Structured output: the answer must be JSON matching this JSON Schema
    /// (`response_format`; `{"type": "object"}` for `json_object`).
    pub json_schema: Option<serde_json::Value>,
    /// Tools offered (chat; `None` also for `tool_choice: none`).
    pub tools: Option<Tools>,
    /// Choices to generate (OpenAI's `n`); choice `i` samples with seed `seed + i`.
    pub n: u32,
}

/// What a backend reports while generating: one `Token` per generated token (its text may be
/// empty while held back), then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    Token {
        id: u32,
        text: String,
        /// When the request asked for log-probabilities.
        logprobs: Option<Logprobs>,
    },
    /// Text that completes without a new token (e.g. released when generation ends).
    Text(String),
    /// A complete tool call out of the generated text (whose tokens came as `Token`s with
    /// empty text); the answer's finish reason is then `tool_calls`.
    ToolCall {
        name: String,
        arguments: String,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u64,
        completion_tokens: u64,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: u64,
    },
    Error(String),
}

/// Why a backend refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("model `{0}` is not served by this node")]
    UnknownModel(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the node is overloaded, retry later")]
    Overloaded,
    #[error("inference failed: {0}")]
    Internal(String),
}

type Start =
    Box<dyn FnOnce() -> Result<Vec<BoxStream<'static, BackendEvent>>, BackendError> + Send>;

/// How a request will run, as its log record keeps it for verification by re-execution:
/// the prompt's token ids, the seed (drawn by the backend when the request gave none), the
/// sampling parameters after defaults, the model file's digest and the engine's determinism
/// class (what a verifier's build and device must match to reproduce the bits).
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub prompt_token_ids: Vec<u32>,
    pub seed: u64,
    pub sampling: SamplingRecord,
    pub model_sha256: [u8; 32],
    pub determinism_class: String,
    /// The request's `logit_bias` as the sampler applies it (part of the signed body, so not
    /// kept in the record's sampling parameters: a verifier reads it from the body).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Execution {
    /// An execution with nothing known but the request's own fields (backends that cannot
    /// say more, such as test doubles).
    pub fn from_request(req: &InferenceRequest) -> Self {
        Self {
            prompt_token_ids: Vec::new(),
            seed: req.seed.unwrap_or(0),
            sampling: SamplingRecord {
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k,
                min_p: req.min_p,
                repetition_penalty: req.repetition_penalty,
                presence_penalty: req.presence_penalty,
                frequency_penalty: req.frequency_penalty,
                max_tokens: req.max_tokens,
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
            },
            model_sha256: [0; 32],
            determinism_class: String::new(),
            logit_bias: req.logit_bias.clone(),
        }
    }

    /// `system_fingerprint`: what a verifier must match to reproduce the answer bit for bit:
    /// the engine's determinism class and the model file's SHA-256.
    pub fn fingerprint(&self) -> String {
        let mut hex = String::with_capacity(64);
        for b in self.model_sha256 {
            hex.push_str(&format!("{b:02x}"));
        }
        format!("{}/model-sha256:{hex}", self.determinism_class)
    }
}

/// A request the backend has validated and tokenized but not started: the API reserves compute
/// units for `prompt_tokens` in between, and the prompt is tokenized only once.
pub struct Prepared {
    /// Tokens of the rendered prompt (of all prompts, for a batch).
    pub prompt_tokens: u64,
    /// Choices the request generates (its `n`, times its prompts).
    pub choices: usize,
    /// The prompt's text, when the request asked for it back (`echo`).
    pub echo: Option<String>,
    /// How it will run (for the request log).
    pub execution: Execution,
    start: Start,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("prompt_tokens", &self.prompt_tokens)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// A prepared request whose generation `start` begins, run as `execution` says; the
    /// prompt's token count is `prompt_tokens` (for backends without token ids, the ids in
    /// `execution` may be empty).
    pub fn new(
        prompt_tokens: u64,
        execution: Execution,
        start: impl FnOnce() -> Result<BoxStream<'static, BackendEvent>, BackendError> + Send + 'static,
    ) -> Self {
        Self::with_choices(prompt_tokens, 1, execution, move || {
            start().map(|s| vec![s])
        })
    }

    /// A prepared request of several choices (`n`): `start` gives one event stream per choice,
    /// in choice order.
    pub fn with_choices(
        prompt_tokens: u64,
        choices: usize,
        execution: Execution,
        start: impl FnOnce() -> Result<Vec<BoxStream<'static, BackendEvent>>, BackendError>
        + Send
        + 'static,
    ) -> Self {
        Self {
            prompt_tokens,
            choices,
            echo: None,
            execution,
            start: Box::new(start),
        }
    }

    /// The same, echoing `text` before the output.
    pub fn with_echo(mut self, text: Option<String>) -> Self {
        self.echo = text;
        self
    }

    /// The same request with every event of choice `i` passed through `f(i, event)` (for
    /// wrappers such as fault injection in tests).
    pub fn map_events(
        self,
        f: impl FnMut(usize, BackendEvent) -> BackendEvent + Clone + Send + 'static,
    ) -> Self {
        use futures_util::StreamExt;
        let start = self.start;
        Self {
            start: Box::new(move || {
                let streams = start()?;
                Ok(streams
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let mut f = f.clone();
                        s.map(move |e| f(i, e)).boxed()
                    })
                    .collect())
            }),
            ..self
        }
    }

    /// Starts generating: the events of every choice, tagged with the choice's index (each
    /// choice's in order; choices interleave). Dropping the stream cancels the request.
    pub fn start(self) -> Result<BoxStream<'static, (usize, BackendEvent)>, BackendError> {
        use futures_util::StreamExt;
        let streams = (self.start)()?;
        Ok(futures_util::stream::select_all(
            streams
                .into_iter()
                .enumerate()
                .map(|(i, s)| s.map(move |e| (i, e)).boxed()),
        )
        .boxed())
    }
}

/// How busy a backend is, for the node's status endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct BackendLoad {
    /// Requests generating now.
    pub running: usize,
    /// Requests waiting to start.
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
}

/// One input of an embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenized (and truncated to the model's length) as the model's pipeline does.
    Text(String),
    /// A complete token sequence, taken as given.
    Tokens(Vec<u32>),
}

/// Embeddings computed for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// SHA-256 of the model's weights (for the fingerprint and the log).
    pub model_sha256: [u8; 32],
    /// What the bits depend on (`system_fingerprint`'s first part).
    pub determinism_class: String,
}

/// An inference engine as the API sees it.
pub trait InferenceBackend: Send + Sync + 'static {
    /// Names of the embedding models served (`/v1/embeddings`); none by default.
    fn embedding_models(&self) -> Vec<String> {
        Vec::new()
    }
    /// Tokenizes embeddings inputs for `model` as embedding them will (for metering first).
    fn embed_tokenize(
        &self,
        model: &str,
        _inputs: &[EmbedInput],
    ) -> Result<Vec<Vec<u32>>, BackendError> {
        Err(BackendError::UnknownModel(model.to_string()))
    }
    /// Embeds token sequences (from `embed_tokenize`) with `model`; blocking.
    fn embed(&self, model: &str, _tokens: &[Vec<u32>]) -> Result<Embeddings, BackendError> {
        Err(BackendError::UnknownModel(model.to_string()))
    }
    /// How busy it is (by default: the queue depth as waiting requests).
    fn load(&self) -> BackendLoad {
        BackendLoad {
            waiting: self.queue_depth(),
            ..BackendLoad::default()
        }
    }
    /// Names of the models served.
    fn models(&self) -> Vec<String>;
    /// Most choices (`n` × prompts) one request may ask for here.
    fn max_choices(&self) -> u32 {
        crate::openai::DEFAULT_MAX_N
    }
    /// Whether the models are loaded and requests can be served.
    fn ready(&self) -> bool;
    /// Requests waiting for the engine.
    fn queue_depth(&self) -> usize;
    /// Validates and tokenizes `req`, ready to start.
    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError>;
    /// Tokenizes `text` for `model` as a completion prompt would be (`add_special`: with the
    /// model's start-of-text token), with each token's bytes.
    fn tokenize(
        &self,
        model: &str,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>, BackendError>;
    /// The text of `ids` for `model`.
    fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, BackendError>;
}
