//! The inference-backend contract the API is written against. The node plugs the engine in;
//! tests plug in a trivial backend. Nothing here knows about HTTP.

use futures_util::stream::BoxStream;

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
    Token(String),
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

/// A request the backend has validated and tokenized but not started: the API reserves compute
/// units for `prompt_tokens` in between, and the prompt is tokenized only once.
pub struct Prepared {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u64,
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
    /// A prepared request whose generation `start` begins.
    pub fn new(
        prompt_tokens: u64,
        start: impl FnOnce() -> Result<BoxStream<'static, BackendEvent>, BackendError> + Send + 'static,
    ) -> Self {
        Self {
            prompt_tokens,
            start: Box::new(start),
        }
    }

    /// Starts generating. Dropping the stream cancels the request.
    pub fn start(self) -> Result<BoxStream<'static, BackendEvent>, BackendError> {
        (self.start)()
    }
}

/// An inference engine as the API sees it.
pub trait InferenceBackend: Send + Sync + 'static {
    /// Names of the models served.
    fn models(&self) -> Vec<String>;
    /// Whether the models are loaded and requests can be served.
    fn ready(&self) -> bool;
    /// Requests waiting for the engine.
    fn queue_depth(&self) -> usize;
    /// Validates and tokenizes `req`, ready to start.
    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError>;
}
