//! Tool calling: how tools are shown to a model, how its calls are written and constrained, and
//! how they are read back out of its text.
//!
//! One wire format is used for every family served: each call is a JSON object
//! `{"name": …, "arguments": {…}}` between `<tool_call>\n` and `\n</tool_call>`, calls separated
//! by a newline (the format Qwen 2.5 and the Hermes fine-tunes were trained on, and the one
//! most small instruction models follow when shown it). A template that knows this format
//! (its source mentions `<tool_call>`) is rendered natively with `tools` and the messages'
//! `tool_calls`; any other template gets the tools described in the system turn, earlier calls
//! written into the assistant's text and tool results as `<tool_response>` blocks in a user
//! turn.
//!
//! Calls are generated under a grammar (`Tools::grammar`): the name must be a declared
//! function and the arguments must match its JSON Schema, so a call always parses. With
//! `tool_choice: auto` the model may instead answer in text, which is then any text that does
//! not open a call. The grammar is a pure function of the request, so a tool-calling request
//! is as reproducible and verifiable as any other.

use serde_json::{Value, json};

use crate::grammar::GrammarSpec;

/// Opens a call in the model's text.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closes a call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// Whether and which tool must be called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides: text, or calls.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tools of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub defs: Vec<ToolDef>,
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A call made by the model (in a message, or parsed out of generated text).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The call's id (`tool_call_id` of the answer's tool message).
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// JSON layout of calls: compact with the separators models write (as for structured outputs).
fn layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl ToolDef {
    /// The arguments schema, `{"type": "object"}`-shaped even when the tool declared none.
    fn arguments_schema(&self) -> Value {
        match &self.parameters {
            Value::Null => json!({"type": "object", "properties": {}}),
            Value::Object(m) if m.is_empty() => json!({"type": "object", "properties": {}}),
            other => other.clone(),
        }
    }

    /// The OpenAI shape (`{"type": "function", "function": {…}}`) templates and prompts use.
    pub fn openai_json(&self) -> Value {
        let mut f = json!({"name": self.name});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        f["parameters"] = self.arguments_schema();
        json!({"type": "function", "function": f})
    }
}

impl Tools {
    /// The declared functions a call may name under this choice.
    fn callable(&self) -> Vec<&ToolDef> {
        match &self.choice {
            ToolChoice::Function(name) => self.defs.iter().filter(|d| &d.name == name).collect(),
            _ => self.defs.iter().collect(),
        }
    }

    /// The JSON Schema of one call: `{"name": <a callable function>, "arguments": <its schema>}`.
    fn call_schema(&self) -> Value {
        let alternatives: Vec<Value> = self
            .callable()
            .into_iter()
            .map(|d| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": d.name}, "arguments": d.arguments_schema()},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = if alternatives.len() == 1 {
            alternatives.into_iter().next().unwrap_or_default()
        } else {
            json!({"anyOf": alternatives})
        };
        schema["x-guidance"] = layout();
        schema
    }

    /// The grammar of an answer: calls only (`required`, a named function), or text or calls
    /// (`auto`); with `content_schema`, text answers must be JSON matching it.
    pub fn grammar(&self, content_schema: Option<&Value>) -> GrammarSpec {
        let call = format!(
            "call: \"<tool_call>\\n\" %json {} \"\\n</tool_call>\"\n",
            self.call_schema()
        );
        let calls = if self.parallel {
            "calls: call (\"\\n\" call)*\n"
        } else {
            "calls: call\n"
        };
        let start = match (&self.choice, content_schema) {
            (ToolChoice::Auto, None) => {
                // Text is anything that does not open a call.
                "start: TEXT | calls\nTEXT: ~(/<tool_call>[\\s\\S]*/)\n".to_string()
            }
            (ToolChoice::Auto, Some(schema)) => {
                let mut schema = schema.clone();
                if let Some(m) = schema.as_object_mut() {
                    m.entry("x-guidance").or_insert_with(layout);
                }
                format!("start: content | calls\ncontent: %json {schema}\n")
            }
            _ => "start: calls\n".to_string(),
        };
        GrammarSpec::Lark(format!("{start}{calls}{call}"))
    }

    /// The system-turn text that shows the tools to a model whose template does not.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou can call functions to help answer the user. The functions are \
             described by their JSON signatures inside <tools></tools>:\n<tools>\n",
        );
        for d in &self.defs {
            s.push_str(&spaced_json(&d.openai_json()));
            s.push('\n');
        }
        s.push_str(
            "</tools>\n\nTo call a function, write a JSON object with its name and arguments \
             inside <tool_call></tool_call>:\n<tool_call>\n{\"name\": <function name>, \
             \"arguments\": <arguments object>}\n</tool_call>",
        );
        s
    }
}

/// A call as the model writes it.
pub fn render_call(name: &str, arguments: &str) -> String {
    let args: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!(arguments));
    format!(
        "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
        spaced_json(&json!({"name": name, "arguments": args}))
    )
}

/// JSON on one line with the separators `", "` and `": "`: the layout constrained calls are
/// generated in, so calls shown in prompts look like the ones the model writes.
pub fn spaced_json(v: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    // Writing a `Value` into memory cannot fail.
    let _ = serde::Serialize::serialize(v, &mut ser);
    String::from_utf8(out).unwrap_or_default()
}

/// Parses one call's JSON body (the text between the tags): `(name, arguments as JSON text)`.
fn parse_call(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").cloned().unwrap_or_else(|| json!({}));
    if !args.is_object() {
        return None;
    }
    Some((name, args.to_string()))
}

/// Splits generated text into content and calls as it arrives, for streaming: text that opens
/// with `<tool_call>` is held back and comes out as calls, each when its closing tag arrives;
/// any other text passes through as content.
#[derive(Debug, Default)]
pub struct CallSplitter {
    buffer: String,
    mode: Mode,
    calls: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Mode {
    /// Nothing decided yet: the text so far could still open a call.
    #[default]
    Undecided,
    /// Plain content: text passes through.
    Content,
    /// Calls: text is held until each call closes.
    Calls,
}

/// What a piece of generated text turned into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Content to send now.
    pub content: String,
    /// Calls completed now: `(name, arguments as JSON text)`.
    pub calls: Vec<(String, String)>,
}

impl CallSplitter {
    /// Calls completed so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds generated text.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        if self.mode == Mode::Content {
            out.content.push_str(text);
            return out;
        }
        self.buffer.push_str(text);
        if self.mode == Mode::Undecided {
            let lead = self.buffer.trim_start();
            if lead.starts_with(CALL_OPEN) {
                self.mode = Mode::Calls;
            } else if lead.is_empty() || CALL_OPEN.starts_with(lead) {
                return out;
            } else {
                self.mode = Mode::Content;
                out.content = std::mem::take(&mut self.buffer);
                return out;
            }
        }
        while let Some(end) = self.buffer.find(CALL_CLOSE) {
            let block: String = self.buffer.drain(..end + CALL_CLOSE.len()).collect();
            let body = block
                .trim_start()
                .strip_prefix(CALL_OPEN)
                .and_then(|b| b.strip_suffix(CALL_CLOSE));
            match body.and_then(parse_call) {
                Some(call) => {
                    self.calls += 1;
                    out.calls.push(call);
                }
                // Not a call after all: give the text back as content, and stop parsing.
                None => {
                    self.mode = Mode::Content;
                    out.content = block + &std::mem::take(&mut self.buffer);
                    return out;
                }
            }
        }
        out
    }

    /// The end of generation: whatever is still held (an unfinished call, or text that only
    /// looked like the start of one) comes back as content.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.buffer);
        if self.mode == Mode::Calls && rest.trim().is_empty() {
            return String::new();
        }
        rest
    }
}

/// Parses a whole answer: `(content, calls)`.
pub fn split_answer(text: &str) -> (String, Vec<(String, String)>) {
    let mut s = CallSplitter::default();
    let mut split = s.push(text);
    split.content.push_str(&s.finish());
    (split.content, split.calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        Tools {
            defs: vec![
                ToolDef {
                    name: "get_weather".into(),
                    description: Some("Weather in a city".into()),
                    parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"]}),
                },
                ToolDef {
                    name: "now".into(),
                    description: None,
                    parameters: Value::Null,
                },
            ],
            choice: ToolChoice::Auto,
            parallel: true,
        }
    }

    #[test]
    fn calls_are_split_out_of_text_in_any_chunking() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 3, 7, text.len()] {
            let mut s = CallSplitter::default();
            let mut calls = Vec::new();
            let mut content = String::new();
            let bytes: Vec<char> = text.chars().collect();
            for piece in bytes.chunks(step) {
                let out = s.push(&piece.iter().collect::<String>());
                content.push_str(&out.content);
                calls.extend(out.calls);
            }
            content.push_str(&s.finish());
            assert_eq!(content, "", "step {step}");
            assert_eq!(
                calls,
                vec![
                    ("get_weather".to_string(), "{\"city\":\"Oslo\"}".to_string()),
                    ("now".to_string(), "{}".to_string())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn text_that_is_not_a_call_passes_through() {
        let (content, calls) = split_answer("<tool is not a call");
        assert_eq!((content.as_str(), calls.len()), ("<tool is not a call", 0));
        let (content, calls) = split_answer("<tool_call>\n{broken\n</tool_call>");
        assert_eq!(content, "<tool_call>\n{broken\n</tool_call>");
        assert!(calls.is_empty());
        // Cut short by max_tokens: the unfinished call comes back as text.
        let (content, calls) = split_answer("<tool_call>\n{\"name\": \"now\"");
        assert_eq!(content, "<tool_call>\n{\"name\": \"now\"");
        assert!(calls.is_empty());
    }

    #[test]
    fn grammars_compile_for_every_choice() {
        let mut t = weather();
        for (choice, parallel) in [
            (ToolChoice::Auto, true),
            (ToolChoice::Required, false),
            (ToolChoice::Function("now".into()), true),
        ] {
            t.choice = choice;
            t.parallel = parallel;
            let GrammarSpec::Lark(g) = t.grammar(None) else {
                panic!("lark expected")
            };
            assert!(g.contains("%json"), "{g}");
        }
        t.choice = ToolChoice::Auto;
        let GrammarSpec::Lark(g) = t.grammar(Some(&json!({"type": "object"}))) else {
            panic!("lark expected")
        };
        assert!(g.starts_with("start: content | calls"), "{g}");
    }

    #[test]
    fn a_rendered_call_parses_back() {
        let text = render_call("get_weather", "{\"city\": \"Rome\"}");
        let (content, calls) = split_answer(&text);
        assert_eq!(content, "");
        assert_eq!(calls[0].0, "get_weather");
        assert_eq!(calls[0].1, "{\"city\":\"Rome\"}");
    }
}
