//! Re-executing a logged request on this node's engine, as an attestor or an oracle does.
//!
//! Nothing in the record is taken on trust that can be recomputed: the model digest and the
//! determinism class must be this node's; the signed request body is parsed again, rendered
//! with this node's chat template and tokenized, and must give the logged prompt tokens (a node
//! that injected a system turn is caught here); the logged sampling parameters must be the
//! body's after defaults (and its seed, if the body names one); then the engine replays the
//! seeded sampler over one teacher-forced pass (`atoma_engine::verify`), and the text it
//! produces must be the text of the signed answer, its finish reason the answer's.

use std::sync::{Arc, OnceLock};

use atoma_api::InferenceRequest;
use atoma_engine::{FinishReason, Verdict, VerifyRequest};
use atoma_state::log::{LogRecord, ResponseRecord};
use serde_json::Value;

use crate::EngineBackend;

/// What re-executing one record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordVerdict {
    Agree,
    /// The record is wrong; `position` is the first bad output token, when the fault is in
    /// the output.
    Disagree {
        position: Option<usize>,
        reason: String,
    },
}

fn disagree(position: Option<usize>, reason: impl Into<String>) -> RecordVerdict {
    RecordVerdict::Disagree {
        position,
        reason: reason.into(),
    }
}

/// Something that can re-execute logged requests. An `Err` means it could not run now (the
/// model is loading, the engine is busy): retry, do not dispute.
pub trait Reexecutor: Send + Sync {
    fn reexecute(&self, record: &LogRecord) -> Result<RecordVerdict, String>;
}

/// A re-executor that exists before the model is loaded (`Err` until `set`).
#[derive(Clone, Default)]
pub struct ReexecSlot(Arc<OnceLock<Arc<dyn Reexecutor>>>);

impl std::fmt::Debug for ReexecSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReexecSlot(ready: {})", self.0.get().is_some())
    }
}

impl ReexecSlot {
    pub fn set(&self, r: Arc<dyn Reexecutor>) {
        let _ = self.0.set(r);
    }
}

impl Reexecutor for ReexecSlot {
    fn reexecute(&self, record: &LogRecord) -> Result<RecordVerdict, String> {
        self.0
            .get()
            .ok_or_else(|| "the model is still loading".to_string())?
            .reexecute(record)
    }
}

/// A signed answer as the client got it.
#[derive(Debug, Default)]
struct Answer {
    text: String,
    /// Tool calls, `(name, arguments)`, in order.
    calls: Vec<(String, String)>,
    finish: Option<String>,
}

/// The text, tool calls and finish reason of each choice of a signed answer as the client got
/// it, by choice index.
fn answer_text(response: &ResponseRecord) -> Result<Vec<Answer>, String> {
    let parse = |t: &str| serde_json::from_str::<Value>(t).map_err(|e| e.to_string());
    let piece = |c: &Value| -> String {
        c["message"]["content"]
            .as_str()
            .or_else(|| c["delta"]["content"].as_str())
            .or_else(|| c["text"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut answers: Vec<Answer> = Vec::new();
    let bodies = match response {
        ResponseRecord::Json(t) => vec![parse(t)?],
        ResponseRecord::Stream(chunks) => {
            chunks.iter().map(|c| parse(c)).collect::<Result<_, _>>()?
        }
    };
    for b in &bodies {
        for c in b["choices"].as_array().into_iter().flatten() {
            let index = c["index"].as_u64().unwrap_or(0) as usize;
            if index > 1024 {
                return Err(format!("choice index {index}"));
            }
            if answers.len() <= index {
                answers.resize_with(index + 1, Answer::default);
            }
            let answer = &mut answers[index];
            answer.text.push_str(&piece(c));
            let calls = c["message"]["tool_calls"]
                .as_array()
                .or_else(|| c["delta"]["tool_calls"].as_array());
            for call in calls.into_iter().flatten() {
                let f = &call["function"];
                answer.calls.push((
                    f["name"].as_str().unwrap_or_default().to_string(),
                    f["arguments"].as_str().unwrap_or_default().to_string(),
                ));
            }
            if let Some(f) = c["finish_reason"].as_str() {
                answer.finish = Some(f.to_string());
            }
        }
    }
    Ok(answers)
}

fn finish_of(s: &str) -> Option<FinishReason> {
    match s {
        "stop" => Some(FinishReason::Stop),
        "length" => Some(FinishReason::Length),
        "cancelled" => Some(FinishReason::Cancelled),
        _ => None,
    }
}

impl EngineBackend {
    /// The re-execution of `rec` (blocking: it waits for the engine's verdict).
    pub fn reexecute_record(&self, rec: &LogRecord) -> Result<RecordVerdict, String> {
        if is_embeddings_body(&rec.request_body) {
            return self.reexecute_embeddings(rec);
        }
        if rec.model_sha256 != self.model_sha256() {
            return Ok(disagree(
                None,
                "the record names another model file than the task's",
            ));
        }
        if rec.determinism_class != self.determinism_class() {
            return Ok(disagree(
                None,
                format!(
                    "the record's determinism class `{}` is not this echelon's `{}`",
                    rec.determinism_class,
                    self.determinism_class()
                ),
            ));
        }
        // The signed body, parsed and prepared as a serving node would.
        let checked = match atoma_api::openai::parse_logged(&rec.request_body) {
            Ok(c) => c,
            Err(e) => {
                return Ok(disagree(
                    None,
                    format!("the signed body is not a valid request: {e}"),
                ));
            }
        };
        let req: InferenceRequest = checked.inference;
        if req.seed.is_some_and(|s| s != rec.seed) {
            return Ok(disagree(
                None,
                "the logged seed is not the one the user asked for",
            ));
        }
        let (prepared, sampling, echo) = match self.prepare_logged(&req, rec.seed) {
            Ok(e) => e,
            Err(e) => {
                return Ok(disagree(
                    None,
                    format!("the signed body cannot be served: {e}"),
                ));
            }
        };
        if prepared.prompt_token_ids != rec.prompt_tokens {
            return Ok(disagree(
                None,
                "the logged prompt is not the signed request's rendered prompt",
            ));
        }
        if prepared.sampling != rec.sampling {
            return Ok(disagree(
                None,
                "the logged sampling parameters are not the signed request's",
            ));
        }
        let choices: Vec<(&[u32], &str)> =
            std::iter::once((rec.output_tokens.as_slice(), rec.finish_reason.as_str()))
                .chain(
                    rec.extra_choices
                        .iter()
                        .map(|c| (c.output_tokens.as_slice(), c.finish_reason.as_str())),
                )
                .collect();
        // The prompts' own token ids (their concatenation was checked to be the logged ones).
        let prompts = match self.prompts(&req) {
            Ok(p) => p,
            Err(e) => {
                return Ok(disagree(
                    None,
                    format!("the signed body cannot be served: {e}"),
                ));
            }
        };
        let n = req.n.max(1) as usize;
        if choices.len() != n * prompts.len() {
            return Ok(disagree(
                None,
                format!(
                    "the log holds {} choices, the request asked for {}",
                    choices.len(),
                    n * prompts.len()
                ),
            ));
        }
        if rec.usage_prompt_tokens != rec.prompt_tokens.len() as u64
            || rec.usage_completion_tokens != rec.generated_tokens()
        {
            return Ok(disagree(None, "the usage does not match the token ids"));
        }
        let answers = match answer_text(&rec.response) {
            Ok(v) => v,
            Err(e) => return Ok(disagree(None, format!("the answer is not JSON: {e}"))),
        };
        if answers.len() > choices.len() {
            return Ok(disagree(None, "the answer has more choices than the log"));
        }
        // Each choice is re-executed with its own seed; a disagreeing position counts the
        // tokens of the choices before it (positions run over the choices in order).
        let mut offset = 0;
        for (i, &(output, finish_reason)) in choices.iter().enumerate() {
            let answer = answers.get(i);
            if let Some(v) = self.reexecute_choice(
                &req,
                rec,
                &sampling,
                echo.as_deref(),
                (i, &prompts[i / n], output, finish_reason),
                answer,
            )? {
                return Ok(match v {
                    RecordVerdict::Disagree {
                        position: Some(p),
                        reason,
                    } => disagree(Some(offset + p), reason),
                    other => other,
                });
            }
            offset += output.len();
        }
        Ok(RecordVerdict::Agree)
    }

    /// Re-executes choice `i` of a record: `None` if it agrees, else the disagreement
    /// (its position within the choice).
    fn reexecute_choice(
        &self,
        req: &InferenceRequest,
        rec: &LogRecord,
        sampling: &atoma_engine::SamplingParams,
        echo: Option<&str>,
        (i, prompt, output, finish_reason): (usize, &[u32], &[u32], &str),
        answer: Option<&Answer>,
    ) -> Result<Option<RecordVerdict>, String> {
        let choice = |r: &str| {
            if rec.extra_choices.is_empty() {
                r.to_string()
            } else {
                format!("choice {i}: {r}")
            }
        };
        let Some(finish) = finish_of(finish_reason) else {
            return Ok(Some(disagree(
                None,
                choice(&format!("unknown finish reason `{finish_reason}`")),
            )));
        };
        let mut sampling = sampling.clone();
        sampling.seed = crate::engine_backend::choice_seed(rec.seed, i as u32);
        // The sampler as the signed body configures it; its record fields were checked equal
        // to the logged ones (the logit bias is the body's alone).
        let verdict = self
            .engine()
            .verify(VerifyRequest {
                prompt: prompt.to_vec(),
                output: output.to_vec(),
                max_tokens: rec.sampling.max_tokens as usize,
                sampling,
                stop: rec.sampling.stop.clone(),
                stop_token_ids: Vec::new(),
                ignore_eos: rec.sampling.ignore_eos,
                finish,
                grammar: crate::engine_backend::grammar_of(req),
            })
            .map_err(|e| e.to_string())?
            .verdict_blocking()
            .map_err(|e| e.to_string())?;
        let text = match verdict {
            Verdict::Disagree {
                position,
                expected,
                logged,
                reason,
            } => {
                return Ok(Some(disagree(
                    Some(position),
                    choice(&format!(
                        "{reason} (sampler: {expected:?}, log: {logged:?})"
                    )),
                )));
            }
            Verdict::Agree { text } => text,
        };
        let empty = Answer::default();
        let answer = answer.unwrap_or(&empty);
        // With tools, the output is split into content and calls exactly as the node does.
        let (text, calls) = if req.tools.is_some() {
            atoma_engine::tools::split_answer(&text)
        } else {
            (text, Vec::new())
        };
        if answer.calls != calls {
            return Ok(Some(disagree(
                None,
                choice("the answer's tool calls are not the ones in the detokenized output"),
            )));
        }
        let expected_finish = if !calls.is_empty() && finish == FinishReason::Stop {
            "tool_calls"
        } else {
            finish_reason
        };
        let Some(answered) = answer.text.strip_prefix(echo.unwrap_or("")) else {
            return Ok(Some(disagree(
                None,
                choice("the answer does not begin with the echoed prompt"),
            )));
        };
        if answered != text {
            return Ok(Some(disagree(
                None,
                choice("the answer's text is not the detokenized output"),
            )));
        }
        if finish != FinishReason::Cancelled && answer.finish.as_deref() != Some(expected_finish) {
            return Ok(Some(disagree(
                None,
                choice("the answer's finish reason is not the logged one"),
            )));
        }
        Ok(None)
    }
}

/// Whether a logged body is an embeddings request (`input`, neither `messages` nor `prompt`).
fn is_embeddings_body(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("input").is_some() && v.get("messages").is_none() && v.get("prompt").is_none()
    })
}

impl EngineBackend {
    /// Re-executes an embeddings record: the inputs tokenized again must be the logged tokens,
    /// and the vectors computed again must be the answer's, bit for bit (as encoded).
    fn reexecute_embeddings(&self, rec: &LogRecord) -> Result<RecordVerdict, String> {
        use atoma_api::InferenceBackend;
        let req = match atoma_api::embeddings::parse_logged(&rec.request_body) {
            Ok(r) => r,
            Err(e) => {
                return Ok(disagree(
                    None,
                    format!("the signed body is not a valid request: {e}"),
                ));
            }
        };
        if !self.embedding_models().contains(&req.model) {
            // Not something this node can check: retry later (or never), do not dispute.
            return Err(format!(
                "this node does not serve embedding model `{}`",
                req.model
            ));
        }
        let tokens = match self.embed_tokenize(&req.model, &req.inputs) {
            Ok(t) => t,
            Err(e) => {
                return Ok(disagree(
                    None,
                    format!("the signed body cannot be served: {e}"),
                ));
            }
        };
        let out = self.embed(&req.model, &tokens).map_err(|e| e.to_string())?;
        if rec.model_sha256 != out.model_sha256 {
            return Ok(disagree(
                None,
                "the record names other embedding weights than the task's",
            ));
        }
        if rec.determinism_class != out.determinism_class {
            return Ok(disagree(
                None,
                "the record's determinism class is not this node's",
            ));
        }
        if tokens.concat() != rec.prompt_tokens {
            return Ok(disagree(
                None,
                "the logged tokens are not the signed inputs' tokens",
            ));
        }
        if rec.usage_prompt_tokens != rec.prompt_tokens.len() as u64
            || rec.usage_completion_tokens != 0
            || !rec.output_tokens.is_empty()
            || !rec.extra_choices.is_empty()
        {
            return Ok(disagree(None, "the usage does not match the token ids"));
        }
        let ResponseRecord::Json(text) = &rec.response else {
            return Ok(disagree(None, "an embeddings answer is one JSON body"));
        };
        let answer: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Ok(disagree(None, format!("the answer is not JSON: {e}"))),
        };
        let data = answer["data"].as_array().cloned().unwrap_or_default();
        if data.len() != out.vectors.len() {
            return Ok(disagree(
                None,
                "the answer does not hold one vector per input",
            ));
        }
        for (i, (d, v)) in data.iter().zip(&out.vectors).enumerate() {
            let expected = atoma_api::embeddings::encode_vector(v, req.base64);
            if d["index"] != i || d["embedding"] != expected {
                return Ok(disagree(
                    None,
                    format!("vector {i} is not the embedding of its input"),
                ));
            }
        }
        Ok(RecordVerdict::Agree)
    }
}

impl Reexecutor for EngineBackend {
    fn reexecute(&self, record: &LogRecord) -> Result<RecordVerdict, String> {
        self.reexecute_record(record)
    }
}
