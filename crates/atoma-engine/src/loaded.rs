//! A model ready to serve: weights, tokenizer and chat template loaded from one GGUF file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::chat::{ChatMessage, ChatTemplate, TemplateFamily};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::grammar::{Constraint, GrammarCompiler, GrammarSpec};
use crate::model::{LoadOptions, Model, ModelConfig};
use crate::tokenizer::{TokenId, Tokenizer};

/// What an operator wants to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// `general.name`, or the file stem.
    pub name: String,
    pub config: ModelConfig,
    pub vocab_size: usize,
    pub file_bytes: u64,
    pub load_time: Duration,
    /// "gguf" when the file's own chat template is used, else the built-in family.
    pub chat_template: String,
}

/// Weights, tokenizer and chat template of one model.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub info: ModelInfo,
    /// Built at the first constrained request (it indexes the whole vocabulary).
    grammar: OnceLock<std::result::Result<GrammarCompiler, String>>,
}

impl LoadedModel {
    /// Loads everything from `path`; `progress(done, total)` is called per tensor.
    pub fn load(
        path: &Path,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let t0 = Instant::now();
        let mut gguf = GgufFile::open(path)?;
        // Fail on an unsupported architecture or tokenizer before reading any weight.
        ModelConfig::from_gguf(&gguf, opts.max_context)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let name = gguf
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let template_src = gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let model = Model::load(&mut gguf, opts, &Device::Cpu, progress)?;
        if model.vocab_size() < tokenizer.vocab_size() {
            return Err(EngineError::Malformed {
                path: path.to_path_buf(),
                reason: format!(
                    "the output head has {} rows but the tokenizer has {} tokens",
                    model.vocab_size(),
                    tokenizer.vocab_size()
                ),
            });
        }
        let text_of = |id: Option<TokenId>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or_default()
                .to_string()
        };
        let (bos, eos) = (
            text_of(tokenizer.special().bos),
            text_of(tokenizer.special().eos),
        );
        let template = match template_src {
            Some(src) => match ChatTemplate::new(&src, "gguf", &bos, &eos) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "the model's chat template does not compile; using the built-in one");
                    builtin(&model, &bos, &eos)?
                }
            },
            None => builtin(&model, &bos, &eos)?,
        };
        let info = ModelInfo {
            path: path.to_path_buf(),
            name,
            config: model.config().clone(),
            vocab_size: tokenizer.vocab_size(),
            file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            load_time: t0.elapsed(),
            chat_template: template.origin.clone(),
        };
        Ok(Self {
            model,
            tokenizer,
            template,
            info,
            grammar: OnceLock::new(),
        })
    }

    /// The grammar compiler of this model's vocabulary (built at the first call).
    pub fn grammar(&self) -> Result<&GrammarCompiler> {
        self.grammar
            .get_or_init(|| GrammarCompiler::new(&self.tokenizer).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| EngineError::InvalidRequest(e.clone()))
    }

    /// A fresh constraint for `spec`, if any.
    pub fn compile_grammar(&self, spec: Option<&GrammarSpec>) -> Result<Option<Constraint>> {
        spec.map(|g| self.grammar()?.compile(g)).transpose()
    }

    /// Renders `messages` with the chat template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        self.template.render(messages)
    }

    /// Renders `messages` with `tools` offered (`crate::tools`).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&crate::tools::Tools>,
    ) -> Result<String> {
        self.template.render_with_tools(messages, tools)
    }

    /// Tokenizes a prompt the way generation does: BOS per the model's metadata unless the
    /// text already starts with it, special-token texts parsed as tokens.
    pub fn tokenize_prompt(&self, text: &str) -> Vec<TokenId> {
        let special = self.tokenizer.special();
        let starts_with_bos = special
            .bos
            .and_then(|b| self.tokenizer.token_text(b))
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        self.tokenizer.encode(text, !starts_with_bos, true)
    }
}

fn builtin(model: &Model, bos: &str, eos: &str) -> Result<ChatTemplate> {
    ChatTemplate::builtin(
        TemplateFamily::for_architecture(model.config().arch),
        bos,
        eos,
    )
}
