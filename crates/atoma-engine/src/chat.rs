//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! When the GGUF carries `tokenizer.chat_template` we render that Jinja template (minijinja with
//! Python-compatible string methods), exactly as Hugging Face's `apply_chat_template` would.
//! Otherwise we use a built-in template of the model's family: Gemma turns, Llama 3, ChatML,
//! Mistral `[INST]` or Phi-3, chosen by architecture.

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::model::Architecture;
use crate::tools::{CALL_OPEN, ToolCall, Tools, render_call};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// An assistant turn's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result.
    Tool,
}

/// The built-in template families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFamily {
    Gemma,
    Llama3,
    ChatMl,
    Mistral,
    Phi3,
}

const GEMMA: &str = "{{ bos_token }}{% set ns = namespace(sys='') %}\
{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = ns.sys ~ m.content ~ '\\n\\n' %}\
{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n\
{% if m.role == 'user' and ns.sys %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}\
{{ m.content | trim }}<end_of_turn>\n{% endif %}{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

const LLAMA3: &str = "{{ bos_token }}{% for m in messages %}\
<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const MISTRAL: &str = "{{ bos_token }}{% set ns = namespace(sys='') %}\
{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content ~ '\\n\\n' %}\
{% elif m.role == 'user' %}[INST] {{ ns.sys }}{{ m.content }} [/INST]{% set ns.sys = '' %}\
{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";

const PHI3: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}\
{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

impl TemplateFamily {
    /// The family used for an architecture whose GGUF has no template.
    pub fn for_architecture(arch: Architecture) -> Self {
        match arch {
            Architecture::Gemma3 => Self::Gemma,
            Architecture::Llama => Self::Llama3,
            Architecture::Qwen2 => Self::ChatMl,
            Architecture::Phi3 => Self::Phi3,
        }
    }

    fn source(self) -> &'static str {
        match self {
            Self::Gemma => GEMMA,
            Self::Llama3 => LLAMA3,
            Self::ChatMl => CHATML,
            Self::Mistral => MISTRAL,
            Self::Phi3 => PHI3,
        }
    }
}

/// A compiled chat template with the special-token texts it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from: "gguf" or the built-in family's name.
    pub origin: String,
    bos: String,
    eos: String,
    /// The template renders `tools` and `tool_calls` itself, in our call format.
    native_tools: bool,
}

impl ChatTemplate {
    /// Compiles `source` (a Hugging Face Jinja chat template).
    pub fn new(source: &str, origin: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::ChatTemplate(format!("cannot compile: {e}")))?;
        Ok(Self {
            env,
            origin: origin.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            native_tools: source.contains(CALL_OPEN) && source.contains("tools"),
        })
    }

    /// A built-in family template.
    pub fn builtin(family: TemplateFamily, bos: &str, eos: &str) -> Result<Self> {
        Self::new(family.source(), &format!("{family:?}"), bos, eos)
    }

    /// Renders the prompt for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_with_tools(messages, None)
    }

    /// Renders the prompt for `messages` with `tools` offered (`crate::tools`): natively when
    /// the template knows the call format, else with the tools described in the system turn
    /// and tool turns rewritten as text.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Tools>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest("no messages".into()));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let uses_tools = tools.is_some()
            || messages
                .iter()
                .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
        let rendered = if !uses_tools {
            tmpl.render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
        } else if self.native_tools {
            let tools: Option<Vec<serde_json::Value>> =
                tools.map(|t| t.defs.iter().map(|d| d.openai_json()).collect());
            tmpl.render(context! {
                messages => messages.iter().map(native_message).collect::<Vec<_>>(),
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
        } else {
            tmpl.render(context! {
                messages => as_plain_turns(messages, tools),
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
        };
        rendered.map_err(|e| EngineError::ChatTemplate(format!("cannot render: {e}")))
    }
}

/// A message as Hugging Face tool-aware templates expect it: calls as
/// `{"id", "type": "function", "function": {"name", "arguments": <object>}}`.
fn native_message(m: &ChatMessage) -> serde_json::Value {
    let mut v = serde_json::json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let args: serde_json::Value = serde_json::from_str(&c.arguments)
                    .unwrap_or_else(|_| serde_json::json!(c.arguments));
                serde_json::json!({"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": args}})
            })
            .collect();
        v["tool_calls"] = serde_json::json!(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = serde_json::json!(id);
    }
    v
}

/// The conversation in system / user / assistant turns only, for templates that know no
/// tools: the tools described at the end of the system turn, calls written into the
/// assistant's text as the model writes them, and consecutive tool results gathered into one
/// user turn of `<tool_response>` blocks.
fn as_plain_turns(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools {
        let block = t.system_prompt();
        match messages.first() {
            Some(m) if m.role == Role::System => {
                out.push(ChatMessage::new(
                    Role::System,
                    format!("{}\n\n{block}", m.content),
                ));
            }
            _ => out.push(ChatMessage::new(Role::System, block)),
        }
    }
    let skip =
        usize::from(tools.is_some() && messages.first().is_some_and(|m| m.role == Role::System));
    let mut last_was_tool = false;
    for m in &messages[skip..] {
        match m.role {
            Role::Tool => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(prev) if last_was_tool => {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new(Role::User, block)),
                }
                last_was_tool = true;
                continue;
            }
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for c in &m.tool_calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&render_call(&c.name, &c.arguments));
                }
                out.push(ChatMessage::new(Role::Assistant, text));
            }
            _ => out.push(ChatMessage::new(m.role, m.content.clone())),
        }
        last_was_tool = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Hi"),
        ]
    }

    fn check(family: TemplateFamily, expected: &str) {
        let t = ChatTemplate::builtin(family, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&msgs()).unwrap(), expected);
    }

    #[test]
    fn builtin_families() {
        check(
            TemplateFamily::ChatMl,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        );
        check(
            TemplateFamily::Gemma,
            "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
        );
        check(
            TemplateFamily::Llama3,
            "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        );
        check(TemplateFamily::Mistral, "<s>[INST] Be brief.\n\nHi [/INST]");
        check(
            TemplateFamily::Phi3,
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
        );
    }

    #[test]
    fn hf_template_with_python_methods() {
        let src =
            "{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }}|{% endfor %}";
        let t = ChatTemplate::new(src, "gguf", "", "").unwrap();
        assert_eq!(t.render(&msgs()).unwrap(), "SYSTEM:Be brief.|USER:Hi|");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system') }}", "gguf", "", "").unwrap();
        assert!(matches!(
            t.render(&msgs()),
            Err(EngineError::ChatTemplate(_))
        ));
    }

    fn tool_conversation() -> (Vec<ChatMessage>, Tools) {
        let tools = Tools {
            defs: vec![crate::tools::ToolDef {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: serde_json::json!({"type": "object",
                    "properties": {"city": {"type": "string"}}}),
            }],
            choice: crate::tools::ToolChoice::Auto,
            parallel: true,
        };
        let mut call = ChatMessage::new(Role::Assistant, "");
        call.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\": \"Oslo\"}".into(),
        });
        let mut result = ChatMessage::new(Role::Tool, "{\"temp\": -3}");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Weather in Oslo?"),
            call,
            result,
        ];
        (msgs, tools)
    }

    #[test]
    fn templates_without_tools_get_them_in_the_system_turn_and_calls_as_text() {
        let t = ChatTemplate::builtin(TemplateFamily::ChatMl, "", "").unwrap();
        let (msgs, tools) = tool_conversation();
        let p = t.render_with_tools(&msgs, Some(&tools)).unwrap();
        assert!(
            p.starts_with("<|im_start|>system\nBe brief.\n\n# Tools"),
            "{p}"
        );
        assert!(p.contains("\"name\": \"get_weather\""), "{p}");
        assert!(p.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>"), "{p}");
        assert!(p.contains("<|im_start|>user\n<tool_response>\n{\"temp\": -3}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), "{p}");
        // No tools, no tool turns: exactly the plain rendering.
        assert_eq!(
            t.render_with_tools(&super::tests::msgs(), None).unwrap(),
            t.render(&super::tests::msgs()).unwrap()
        );
    }

    #[test]
    fn tool_aware_templates_render_tools_and_calls_themselves() {
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}\
{% for m in messages %}{{ m.role }}:{{ m.content }}\
{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}\
{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src, "gguf", "", "").unwrap();
        let (msgs, tools) = tool_conversation();
        assert_eq!(
            t.render_with_tools(&msgs, Some(&tools)).unwrap(),
            "TOOLS:get_weather;|system:Be brief.|user:Weather in Oslo?|assistant:<tool_call>get_weather(Oslo)|tool:{\"temp\": -3}[call_1]|"
        );
    }
}
