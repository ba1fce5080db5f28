//! The engine's error type: one enum, structured fields, causes kept.
//!
//! Every message is written to be shown to an operator as one line ("what is wrong, with what").

use std::path::PathBuf;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found: {}", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a GGUF file (it starts with {magic:02x?}, a GGUF file starts with \"GGUF\")", path.display())]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{} is truncated: tensor `{tensor}` ends at byte {needed} but the file has {actual} bytes", path.display())]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        actual: u64,
    },
    #[error("{} is a malformed GGUF file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "unsupported model architecture `{arch}` (supported: llama, mistral, qwen2, gemma3, phi3)"
    )]
    UnsupportedArchitecture { arch: String },
    #[error("tensor `{tensor}` uses quantization type {dtype}, which this engine cannot run")]
    UnsupportedQuantization { tensor: String, dtype: String },
    #[error("the model file has no metadata key `{key}`")]
    MissingMetadata { key: String },
    #[error("metadata key `{key}` is invalid: {reason}")]
    InvalidMetadata { key: String, reason: String },
    #[error("the model file has no tensor `{name}`")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt_tokens} tokens, the model's context holds {context} tokens")]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },
    #[error("the engine is overloaded: {capacity} requests are already waiting")]
    Overloaded { capacity: usize },
    #[error("the engine has shut down")]
    ShutDown,
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
