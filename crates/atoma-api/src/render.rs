//! The OpenAI shapes of log-probabilities and usage, shared by plain and streamed answers.

use serde_json::{Map, Value, json};

use crate::backend::{Logprobs, TokenLogprob};
use crate::handlers::Kind;

fn token_text(t: &TokenLogprob) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

fn chat_entry(t: &TokenLogprob) -> Value {
    json!({"token": token_text(t), "logprob": t.logprob, "bytes": t.bytes})
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
                at += token_text(&l.chosen).chars().count();
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|l| {
                    let mut m = Map::new();
                    for t in &l.top {
                        m.entry(token_text(t)).or_insert(json!(t.logprob));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|l| token_text(&l.chosen)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|l| l.chosen.logprob).collect::<Vec<_>>(),
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
