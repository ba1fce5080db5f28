//! The OpenAI shapes of log-probabilities and usage, shared by plain and streamed answers.

use serde_json::{Map, Value, json};

use crate::backend::{FinishReason, Logprobs, TokenLogprob};
use crate::handlers::Kind;

/// A token's text as OpenAI writes it: the text when its bytes are valid UTF-8, else
/// `bytes:\xNN…` (a piece of a multi-byte character), so distinct tokens stay distinct.
fn token_text(t: &TokenLogprob) -> String {
    match std::str::from_utf8(&t.bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut out = String::from("bytes:");
            for b in &t.bytes {
                out.push_str(&format!("\\x{b:02x}"));
            }
            out
        }
    }
}

/// A log-probability as signed answers carry it. Whoever checks an answer's `response_hash`
/// parses the JSON and serializes it again, in any language, so the number must come back as
/// the same text: the value is the f32's shortest decimal (at most 9 significant digits, which
/// every JSON parser reads exactly), and magnitudes under 1e-4, which serde_json and Python
/// write differently (`0.00001` vs `1e-05`), are sent as 0 (a probability above 0.9999).
pub(crate) fn logprob(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    if x.abs() < 1e-4 {
        return json!(0.0);
    }
    let shortest: f64 = x.to_string().parse().unwrap_or(f64::from(x));
    json!(shortest)
}

fn chat_entry(t: &TokenLogprob) -> Value {
    json!({"token": token_text(t), "logprob": logprob(t.logprob), "bytes": t.bytes})
}

/// A choice's `logprobs` for `tokens` (chat: `{"content": [...]}`; completions: the legacy
/// parallel lists, `text_offset` counted in characters from `offset`).
pub(crate) fn logprobs(kind: Kind, tokens: &[Logprobs], offset: usize) -> Value {
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|l| {
                    let mut e = chat_entry(&l.chosen);
                    e["top_logprobs"] = l.top.iter().map(chat_entry).collect();
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Kind::Completion => {
            let mut text_offset = Vec::with_capacity(tokens.len());
            let mut at = offset;
            for l in tokens {
                text_offset.push(at);
                at += String::from_utf8_lossy(&l.chosen.bytes).chars().count();
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|l| {
                    let mut m = Map::new();
                    for t in &l.top {
                        m.entry(token_text(t)).or_insert(logprob(t.logprob));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|l| token_text(&l.chosen)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|l| logprob(l.chosen.logprob)).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": text_offset,
            })
        }
    }
}

/// The `usage` object.
pub(crate) fn usage(prompt: u64, completion: u64, cached: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// The id of choice `choice`'s `index`-th tool call: derived from the response id (itself from
/// the request's hash), so a re-executed answer has the same ids.
pub(crate) fn tool_call_id(response_id: &str, choice: usize, index: usize) -> String {
    let tail = response_id.rsplit('-').next().unwrap_or(response_id);
    if choice == 0 {
        format!("call_{tail}_{index}")
    } else {
        format!("call_{tail}_{choice}_{index}")
    }
}

/// A tool call in OpenAI's shape; `index` is set in stream deltas.
pub(crate) fn tool_call(id: String, name: &str, arguments: &str, index: Option<usize>) -> Value {
    let mut v = json!({"id": id, "type": "function",
                       "function": {"name": name, "arguments": arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// The finish reason sent: `tool_calls` when the answer made calls and ended on its own.
pub(crate) fn wire_finish(finish: FinishReason, called: bool) -> FinishReason {
    if called && finish == FinishReason::Stop {
        FinishReason::ToolCalls
    } else {
        finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_survive_a_parse_and_reserialize_round_trip_as_the_same_text() {
        let mut x = -40.0f32;
        while x < 0.0 {
            let v = logprob(x);
            let text = v.to_string();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_string(), text, "{x}");
            assert!(
                !text.contains('e'),
                "{text}: exponent notation differs across languages"
            );
            x = x * 0.93 + 1e-7;
        }
        assert_eq!(logprob(-5e-5), json!(0.0));
        assert_eq!(logprob(-5.832).to_string(), "-5.832");
        assert_eq!(logprob(f32::NEG_INFINITY), Value::Null);
    }
}
