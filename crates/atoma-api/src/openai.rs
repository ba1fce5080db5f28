//! OpenAI wire types for `/v1/chat/completions` and `/v1/completions`, and their validation into
//! an `InferenceRequest` (parse, don't validate: handlers only see checked values). Unknown
//! fields are accepted and ignored, as OpenAI clients send many.

use serde::Deserialize;

use crate::backend::{ChatTurn, InferenceRequest, Prompt};
use crate::error::ApiError;

/// Output tokens reserved when a request gives no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Largest `max_tokens` accepted.
pub const MAX_MAX_TOKENS: u32 = 32_768;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Content,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Extension (as in vLLM and llama.cpp): keep generating past end-of-sequence tokens, for
    /// benchmarks with fixed output lengths.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    #[serde(flatten)]
    pub common: Common,
}

/// A checked request plus the streaming choices.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub inference: InferenceRequest,
    pub stream: bool,
    pub include_usage: bool,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(msg.into())
}

fn check_common(model: String, prompt: Prompt, c: Common) -> Result<Checked, ApiError> {
    if model.trim().is_empty() {
        return Err(bad("`model` must not be empty"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad(
            "`n` must be 1: this node returns one choice per request",
        ));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_MAX_TOKENS {
        return Err(bad(format!(
            "`max_tokens` must be between 1 and {MAX_MAX_TOKENS}"
        )));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("`temperature` must be between 0 and 2"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("`top_p` must be in (0, 1]"));
    }
    let presence_penalty = c.presence_penalty.unwrap_or(0.0);
    let frequency_penalty = c.frequency_penalty.unwrap_or(0.0);
    if !(-2.0..=2.0).contains(&presence_penalty) || !(-2.0..=2.0).contains(&frequency_penalty) {
        return Err(bad("penalties must be between -2 and 2"));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("`stop` takes up to 4 non-empty strings"));
    }
    let include_usage = c.stream_options.unwrap_or_default().include_usage;
    Ok(Checked {
        inference: InferenceRequest {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed: c.seed,
            stop,
            presence_penalty,
            frequency_penalty,
            ignore_eos: c.ignore_eos,
        },
        stream: c.stream,
        include_usage,
    })
}

impl ChatCompletionRequest {
    /// Validates into a checked request.
    pub fn check(self) -> Result<Checked, ApiError> {
        if self.messages.is_empty() {
            return Err(bad("`messages` must not be empty"));
        }
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(bad(format!(
                    "messages[{i}].role `{}` is not one of system, user, assistant",
                    m.role
                )));
            }
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(bad(format!(
                                    "messages[{i}]: content part `{kind}` is not supported (text only)"
                                )));
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role
            };
            turns.push(ChatTurn { role, content });
        }
        check_common(self.model, Prompt::Chat(turns), self.common)
    }
}

impl CompletionRequest {
    /// Validates into a checked request.
    pub fn check(self) -> Result<Checked, ApiError> {
        let prompt = match self.prompt {
            PromptIn::One(s) => s,
            PromptIn::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptIn::Many(_) => return Err(bad("`prompt` must be one string")),
        };
        if prompt.is_empty() {
            return Err(bad("`prompt` must not be empty"));
        }
        check_common(self.model, Prompt::Text(prompt), self.common)
    }
}

/// Parses a logged request body of either endpoint (`messages`: chat; `prompt`: completions),
/// as a node parsed it when it served it.
pub fn parse_logged(body: &[u8]) -> Result<Checked, ApiError> {
    let invalid = |e: serde_json::Error| bad(format!("invalid request body: {e}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
    if v.get("messages").is_some() {
        serde_json::from_value::<ChatCompletionRequest>(v)
            .map_err(invalid)?
            .check()
    } else {
        serde_json::from_value::<CompletionRequest>(v)
            .map_err(invalid)?
            .check()
    }
}
