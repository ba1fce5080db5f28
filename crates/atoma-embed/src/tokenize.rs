//! Text to token ids with the model's own `tokenizer.json` (the Hugging Face `tokenizers`
//! crate, built without C dependencies), set up the way sentence-transformers calls it: no
//! padding, truncation to `max_seq_length` tokens counting [CLS] and [SEP], the text
//! lower-cased first when `sentence_bert_config.json` asks.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::{EmbedError, Result};

/// The token ids of one text and whether its end was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tokenized {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

#[derive(Debug)]
pub(crate) struct TextTokenizer {
    inner: Tokenizer,
    lowercase: bool,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, replacing whatever padding and truncation it carries (the file of
    /// all-MiniLM-L6-v2 pads and truncates to 128, which sentence-transformers overrides).
    pub fn load(path: &Path, max_tokens: usize, lowercase: bool, vocab: usize) -> Result<Self> {
        let bad = |reason: String| EmbedError::BadTokenizer {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(EmbedError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| bad(e.to_string()))?;
        let size = inner.get_vocab_size(true);
        if size > vocab {
            return Err(bad(format!(
                "{size} tokens, more than the model's vocab_size {vocab}"
            )));
        }
        Ok(Self { inner, lowercase })
    }

    /// Token ids of `text` (input number `index`, for errors), [CLS] and [SEP] included.
    pub fn encode(&self, index: usize, text: &str) -> Result<Tokenized> {
        let lowered;
        let text = if self.lowercase {
            lowered = text.to_lowercase();
            lowered.as_str()
        } else {
            text
        };
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| EmbedError::Tokenize {
                index,
                reason: e.to_string(),
            })?;
        Ok(Tokenized {
            truncated: !enc.get_overflowing().is_empty(),
            ids: enc.get_ids().to_vec(),
        })
    }
}
