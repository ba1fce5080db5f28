//! OpenAI wire types for `/v1/chat/completions` and `/v1/completions`, and their validation into
//! an `InferenceRequest` (parse, don't validate: handlers only see checked values).
//!
//! No parameter is silently ignored: a recognised OpenAI parameter this node does not implement
//! is refused with a 400 that names it (`UNSUPPORTED`, listed in the README), since a request
//! that sets a parameter we drop is worse than one we refuse: its sender believes they got what
//! they asked for. Harmless bookkeeping fields (`user`, `metadata`, `store: false`,
//! `service_tier`, the protocol's `nonce`) are accepted; other unknown fields are ignored, as
//! OpenAI clients send many.

use serde::Deserialize;
use serde_json::Value;

use crate::backend::{
    ChatTurn, InferenceRequest, Prompt, Role, ToolCall, ToolChoice, ToolDef, Tools,
};
use crate::error::ApiError;

/// Output tokens reserved when a request gives no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Largest `max_tokens` accepted.
pub const MAX_MAX_TOKENS: u32 = 32_768;
/// Most alternatives per position in `top_logprobs` (chat) or `logprobs` (completions).
pub const MAX_TOP_LOGPROBS: u8 = 20;
/// Most entries in `logit_bias`.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Most functions in `tools` (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Most choices (`n`) a request may ask for anywhere (OpenAI's limit). A node serves at most
/// its configured maximum (`DEFAULT_MAX_N` unless set), checked when it serves, not here: a
/// verifier must accept any request some node could have served.
pub const MAX_N: u32 = 128;
/// Choices per request a node serves unless configured otherwise.
pub const DEFAULT_MAX_N: u32 = 8;
/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 128;

/// Recognised OpenAI parameters this node refuses, with why (the README's table).
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("audio", "audio output is not supported"),
    (
        "modalities",
        "only text output is supported (`modalities: [\"text\"]` is accepted)",
    ),
    ("prediction", "predicted outputs are not supported"),
    (
        "response_format",
        "the type must be `text`, `json_object` or `json_schema`",
    ),
    (
        "functions",
        "the legacy `functions` field is not supported: send `tools`",
    ),
    (
        "function_call",
        "the legacy `function_call` field is not supported: send `tool_choice` (`\"none\"` is accepted)",
    ),
    ("web_search_options", "web search is not supported"),
    (
        "reasoning_effort",
        "the served models do not reason; reasoning effort cannot be set",
    ),
    ("verbosity", "output verbosity cannot be set"),
    (
        "store",
        "this node stores nothing for later retrieval (`store: false` is accepted)",
    ),
    (
        "best_of",
        "`best_of` must be 1 or equal to `n`: server-side best-of sampling is not supported",
    ),
    (
        "suffix",
        "the served models have no fill-in-the-middle tokens, so `suffix` cannot be honoured",
    ),
];

fn unsupported(name: &str) -> ApiError {
    let why = UNSUPPORTED
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("not supported", |(_, w)| w);
    ApiError::InvalidRequest(format!("unsupported parameter `{name}`: {why}"))
}

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
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// An assistant turn's call, as clients send it back.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

fn function_type() -> String {
    "function".into()
}

/// `tools[]`.
#[derive(Debug, Deserialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Option<FunctionIn>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    /// Calls always match the schema here (they are generated under it), strict or not.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// A field that must be absent, or have one harmless value.
type Probe = Option<Value>;
/// Whether a probed field's value is the harmless one.
type Harmless = fn(&Value) -> bool;

/// Sampling fields shared by both endpoints, and the recognised fields this node refuses.
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
    /// Extensions as vLLM names them: `top_k` (0 or -1: off), `min_p`, `repetition_penalty`.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Extension (as in vLLM and llama.cpp): keep generating past end-of-sequence tokens, for
    /// benchmarks with fixed output lengths.
    #[serde(default)]
    pub ignore_eos: bool,
    // Refused unless harmless (see `UNSUPPORTED`).
    pub audio: Probe,
    pub modalities: Probe,
    pub prediction: Probe,
    pub response_format: Probe,
    pub tools: Probe,
    pub tool_choice: Probe,
    pub functions: Probe,
    pub function_call: Probe,
    pub web_search_options: Probe,
    pub reasoning_effort: Probe,
    pub verbosity: Probe,
    pub store: Probe,
    pub parallel_tool_calls: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u8>,
    #[serde(flatten)]
    pub common: Common,
}

/// A completion prompt: text, token ids, or a list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Tokens(Vec<u32>),
    Many(Vec<String>),
    ManyTokens(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    /// Alternatives per position (0: the chosen token's log-probability only).
    pub logprobs: Option<u8>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Probe,
    pub best_of: Option<u32>,
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

/// Refuses every recognised parameter we do not implement, unless it has its harmless value.
fn refuse_unsupported(c: &Common) -> Result<(), ApiError> {
    let probes: [(&str, &Probe, Harmless); 9] = [
        ("audio", &c.audio, |_| false),
        ("modalities", &c.modalities, |v| {
            v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
        }),
        ("prediction", &c.prediction, |_| false),
        ("functions", &c.functions, |v| {
            v.as_array().is_some_and(Vec::is_empty)
        }),
        ("function_call", &c.function_call, |v| v == "none"),
        ("web_search_options", &c.web_search_options, |_| false),
        ("reasoning_effort", &c.reasoning_effort, |_| false),
        ("verbosity", &c.verbosity, |_| false),
        ("store", &c.store, |v| v == false),
    ];
    for (name, probe, harmless) in probes {
        if let Some(v) = probe
            && !v.is_null()
            && !harmless(v)
        {
            return Err(unsupported(name));
        }
    }
    Ok(())
}

/// The JSON Schema a `response_format` asks for (`None`: free text).
fn response_format(v: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(serde_json::json!({"type": "object"}))),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| {
                bad("`response_format.json_schema` is required for type `json_schema`")
            })?;
            if !spec.is_object() {
                return Err(bad("`response_format.json_schema` must be an object"));
            }
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(serde_json::json!({}))),
                Some(s @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(s.clone())),
                Some(_) => Err(bad(
                    "`response_format.json_schema.schema` must be a JSON Schema object",
                )),
            }
        }
        _ => Err(unsupported("response_format")),
    }
}

/// Whether `name` is a valid function name (OpenAI: a-z, A-Z, 0-9, underscores and dashes, at
/// most 64).
fn function_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tools a chat request offers (`None`: none, or `tool_choice: "none"`).
fn tools(c: &Common) -> Result<Option<Tools>, ApiError> {
    let list = match c.tools.as_ref().filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<ToolIn>>(v.clone())
            .map_err(|e| bad(format!("`tools`: {e}")))?,
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(format!("`tools` takes at most {MAX_TOOLS} functions")));
    }
    let mut defs: Vec<ToolDef> = Vec::with_capacity(list.len());
    for (i, t) in list.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(format!(
                "tools[{i}].type `{}` is not supported (only `function`)",
                t.kind
            )));
        }
        let f = t
            .function
            .ok_or_else(|| bad(format!("tools[{i}].function is missing")))?;
        if !function_name_ok(&f.name) {
            return Err(bad(format!(
                "tools[{i}].function.name `{}` must be 1 to 64 of a-z, A-Z, 0-9, `_` and `-`",
                f.name
            )));
        }
        if defs.iter().any(|d| d.name == f.name) {
            return Err(bad(format!(
                "tools[{i}]: function `{}` is declared twice",
                f.name
            )));
        }
        let parameters = match f.parameters {
            None | Some(Value::Null) => Value::Null,
            Some(p @ Value::Object(_)) => p,
            Some(_) => {
                return Err(bad(format!(
                    "tools[{i}].function.parameters must be a JSON Schema object"
                )));
            }
        };
        defs.push(ToolDef {
            name: f.name,
            description: f.description,
            parameters,
        });
    }
    let choice = match c.tool_choice.as_ref().filter(|v| !v.is_null()) {
        None => Some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => {
                return Err(bad(format!(
                    "`tool_choice` `{other}` is not one of none, auto, required or a function"
                )));
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").is_none_or(|t| t == "function"))
                .ok_or_else(|| {
                    bad("`tool_choice` must be a string or {\"type\": \"function\", \"function\": {\"name\": …}}")
                })?;
            if !defs.iter().any(|d| d.name == name) {
                return Err(bad(format!(
                    "`tool_choice` names function `{name}`, which `tools` does not declare"
                )));
            }
            Some(ToolChoice::Function(name.to_string()))
        }
    };
    match choice {
        None => Ok(None),
        Some(_) if defs.is_empty() => {
            if c.tool_choice.as_ref().is_some_and(|v| !v.is_null()) {
                Err(bad("`tool_choice` needs `tools`"))
            } else {
                Ok(None)
            }
        }
        Some(choice) => Ok(Some(Tools {
            defs,
            choice,
            parallel: c.parallel_tool_calls.unwrap_or(true),
        })),
    }
}

fn check_common(
    model: String,
    prompt: Prompt,
    c: Common,
    logprobs: Option<u8>,
    echo: bool,
    tools: Option<Tools>,
) -> Result<Checked, ApiError> {
    if model.trim().is_empty() {
        return Err(bad("`model` must not be empty"));
    }
    refuse_unsupported(&c)?;
    let json_schema = response_format(c.response_format.as_ref())?;
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
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if (1..=i64::from(u32::MAX)).contains(&k) => k as u32,
        k => {
            return Err(bad(format!(
                "`top_k` must be -1 or 0 (off) or a positive count, got {k}"
            )));
        }
    };
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(bad("`min_p` must be in [0, 1]"));
    }
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(bad("`repetition_penalty` must be in (0, 10]"));
    }
    let mut logit_bias = Vec::new();
    if let Some(map) = c.logit_bias {
        if map.len() > MAX_LOGIT_BIAS {
            return Err(bad(format!(
                "`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens"
            )));
        }
        for (k, b) in map {
            let id = k
                .trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("`logit_bias` key `{k}` is not a token id")))?;
            if !(-100.0..=100.0).contains(&b) {
                return Err(bad(format!(
                    "`logit_bias` of token {id} must be in [-100, 100], got {b}"
                )));
            }
            logit_bias.push((id, b));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
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
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(bad(format!("`n` must be between 1 and {MAX_N}")));
    }
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
            top_k,
            min_p,
            repetition_penalty,
            logit_bias,
            logprobs,
            echo,
            json_schema,
            tools,
            n,
        },
        stream: c.stream,
        include_usage,
    })
}

fn role(i: usize, m: &MessageIn) -> Result<Role, ApiError> {
    match m.role.as_str() {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        "function" => Err(bad(format!(
            "messages[{i}]: the legacy role `function` is not supported: send `tool` messages"
        ))),
        other => Err(bad(format!(
            "messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"
        ))),
    }
}

impl ChatCompletionRequest {
    /// Validates into a checked request.
    pub fn check(self) -> Result<Checked, ApiError> {
        if self.messages.is_empty() {
            return Err(bad("`messages` must not be empty"));
        }
        let tools = tools(&self.common)?;
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = role(i, &m)?;
            let mut tool_calls = Vec::new();
            for (j, c) in m.tool_calls.into_iter().flatten().enumerate() {
                if role != Role::Assistant {
                    return Err(bad(format!(
                        "messages[{i}]: only assistant turns carry `tool_calls`"
                    )));
                }
                if c.kind != "function" {
                    return Err(bad(format!(
                        "messages[{i}].tool_calls[{j}].type `{}` is not `function`",
                        c.kind
                    )));
                }
                if !serde_json::from_str::<Value>(&c.function.arguments)
                    .is_ok_and(|v| v.is_object())
                {
                    return Err(bad(format!(
                        "messages[{i}].tool_calls[{j}].function.arguments must be a JSON object in a string"
                    )));
                }
                tool_calls.push(ToolCall {
                    id: c.id,
                    name: c.function.name,
                    arguments: c.function.arguments,
                });
            }
            let tool_call_id = match (role, m.tool_call_id) {
                (Role::Tool, Some(id)) => Some(id),
                (Role::Tool, None) => {
                    return Err(bad(format!(
                        "messages[{i}]: a `tool` message needs `tool_call_id`"
                    )));
                }
                (_, _) => None,
            };
            let content = match m.content {
                Some(Content::Text(t)) => t,
                None if role == Role::Assistant => String::new(),
                None => return Err(bad(format!("messages[{i}]: `content` is missing"))),
                Some(Content::Parts(parts)) => {
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
            turns.push(ChatTurn {
                role,
                content,
                tool_calls,
                tool_call_id,
            });
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None | Some(0)) => None,
            (false, Some(_)) => {
                return Err(bad("`top_logprobs` needs `logprobs: true`"));
            }
            (true, k) => {
                let k = k.unwrap_or(0);
                if k > MAX_TOP_LOGPROBS {
                    return Err(bad(format!(
                        "`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"
                    )));
                }
                Some(k)
            }
        };
        check_common(
            self.model,
            Prompt::Chat(turns),
            self.common,
            logprobs,
            false,
            tools,
        )
    }
}

impl CompletionRequest {
    /// Validates into a checked request.
    pub fn check(self) -> Result<Checked, ApiError> {
        if self
            .suffix
            .as_ref()
            .is_some_and(|s| !s.is_null() && s != "")
        {
            return Err(unsupported("suffix"));
        }
        if self
            .best_of
            .is_some_and(|b| b != 1 && b != self.common.n.unwrap_or(1))
        {
            return Err(unsupported("best_of"));
        }
        let prompt = match self.prompt {
            PromptIn::One(s) => Prompt::Text(s),
            PromptIn::Tokens(t) => Prompt::Tokens(t),
            PromptIn::Many(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
            PromptIn::ManyTokens(mut v) if v.len() == 1 => Prompt::Tokens(v.remove(0)),
            PromptIn::Many(v) => Prompt::Batch(v.into_iter().map(Prompt::Text).collect()),
            PromptIn::ManyTokens(v) => Prompt::Batch(v.into_iter().map(Prompt::Tokens).collect()),
        };
        let parts = match &prompt {
            Prompt::Batch(v) => v.iter().collect(),
            one => vec![one],
        };
        if parts.is_empty() || parts.len() > MAX_PROMPTS {
            return Err(bad(format!(
                "`prompt` must hold between 1 and {MAX_PROMPTS} prompts"
            )));
        }
        for p in &parts {
            match p {
                Prompt::Text(t) if t.is_empty() => return Err(bad("`prompt` must not be empty")),
                Prompt::Tokens(t) if t.is_empty() => {
                    return Err(bad("`prompt` must not be empty"));
                }
                _ => {}
            }
        }
        let choices = parts.len() as u64 * u64::from(self.common.n.unwrap_or(1));
        if choices > u64::from(MAX_N) {
            return Err(bad(format!(
                "{} prompts × `n` = {choices} choices; at most {MAX_N} per request",
                parts.len()
            )));
        }
        if self.echo && parts.len() > 1 {
            return Err(bad(
                "`echo` with a list of prompts is not supported: send the prompts one by one",
            ));
        }
        if let Some(k) = self.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(bad(format!(
                "`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"
            )));
        }
        if self.echo && self.logprobs.is_some() {
            return Err(bad(
                "`echo` with `logprobs` is not supported: prompt log-probabilities are not computed",
            ));
        }
        let c = &self.common;
        if c.tools
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &serde_json::json!([]))
            || c.tool_choice
                .as_ref()
                .is_some_and(|v| !v.is_null() && v != "none")
        {
            return Err(bad("`tools` and `tool_choice` are for chat completions"));
        }
        check_common(
            self.model,
            prompt,
            self.common,
            self.logprobs,
            self.echo,
            None,
        )
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
