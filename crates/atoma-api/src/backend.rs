//! The inference-backend contract the API is written against. The node plugs the engine in;
//! tests plug in a trivial backend. Nothing here knows about HTTP.

use futures_util::stream::BoxStream;

pub use atoma_state::log::SamplingRecord;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Messages, rendered by the model's chat template.
    Chat(Vec<ChatTurn>),
    /// Raw text (completions).
    Text(String),
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
}

/// What a backend reports while generating: one `Token` per generated token (its text may be
/// empty while held back), then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    Token {
        id: u32,
        text: String,
    },
    /// Text that completes without a new token (e.g. released when generation ends).
    Text(String),
    Done {
        finish_reason: String,
        prompt_tokens: u64,
        completion_tokens: u64,
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

type Start = Box<dyn FnOnce() -> Result<BoxStream<'static, BackendEvent>, BackendError> + Send>;

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
                top_k: 0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                presence_penalty: req.presence_penalty,
                frequency_penalty: req.frequency_penalty,
                max_tokens: req.max_tokens,
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
            },
            model_sha256: [0; 32],
            determinism_class: String::new(),
        }
    }
}

/// A request the backend has validated and tokenized but not started: the API reserves compute
/// units for `prompt_tokens` in between, and the prompt is tokenized only once.
pub struct Prepared {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u64,
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
        Self {
            prompt_tokens,
            execution,
            start: Box::new(start),
        }
    }

    /// Starts generating. Dropping the stream cancels the request.
    pub fn start(self) -> Result<BoxStream<'static, BackendEvent>, BackendError> {
        (self.start)()
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

/// An inference engine as the API sees it.
pub trait InferenceBackend: Send + Sync + 'static {
    /// How busy it is (by default: the queue depth as waiting requests).
    fn load(&self) -> BackendLoad {
        BackendLoad {
            waiting: self.queue_depth(),
            ..BackendLoad::default()
        }
    }
    /// Names of the models served.
    fn models(&self) -> Vec<String>;
    /// Whether the models are loaded and requests can be served.
    fn ready(&self) -> bool;
    /// Requests waiting for the engine.
    fn queue_depth(&self) -> usize;
    /// Validates and tokenizes `req`, ready to start.
    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError>;
}
