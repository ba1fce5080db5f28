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

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
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
        })
    }

    /// A built-in family template.
    pub fn builtin(family: TemplateFamily, bos: &str, eos: &str) -> Result<Self> {
        Self::new(family.source(), &format!("{family:?}"), bos, eos)
    }

    /// Renders the prompt for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest("no messages".into()));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| EngineError::ChatTemplate(format!("cannot render: {e}")))
    }
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
}
