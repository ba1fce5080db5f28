//! The crate's one error type: every message is one readable line naming the file, input or
//! token at fault.

use std::path::{Path, PathBuf};

/// Errors of loading a model directory and of embedding inputs.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file the model needs is not in its directory.
    #[error("{} is missing (a model directory needs config.json, tokenizer.json and model.safetensors)", path.display())]
    MissingFile { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the directory is malformed or describes a model this crate cannot run.
    #[error("{}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    #[error("tokenizer {}: {reason}", path.display())]
    BadTokenizer { path: PathBuf, reason: String },
    /// A tensor is missing, misnamed or of the wrong shape.
    #[error("weights {}: {reason}", path.display())]
    BadWeights { path: PathBuf, reason: String },
    #[error("cannot tokenize input {index}: {reason}")]
    Tokenize { index: usize, reason: String },
    /// An input given as token ids holds an id the vocabulary does not have.
    #[error("input {index}: token id {token} is out of the vocabulary (ids are below {vocab})")]
    TokenOutOfRange {
        index: usize,
        token: u32,
        vocab: usize,
    },
    /// An input given as token ids is empty.
    #[error("input {index} has no tokens")]
    EmptyInput { index: usize },
    /// An input given as token ids is longer than the model takes (text is truncated instead).
    #[error("input {index} has {tokens} tokens, more than the model's {max}")]
    TooManyTokens {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("cannot start {threads} compute threads: {reason}")]
    Threads { threads: usize, reason: String },
    /// The forward pass failed (a bug or an allocation failure, never bad input).
    #[error("forward pass: {0}")]
    Compute(#[from] candle_core::Error),
}

impl EmbedError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = EmbedError> = std::result::Result<T, E>;
