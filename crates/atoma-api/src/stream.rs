//! Server-sent events for `stream: true`: one signed JSON chunk per piece of text, a final chunk
//! with the finish reason, an optional usage chunk (`stream_options.include_usage`), then
//! `[DONE]`. The stack is settled when the stream ends, with the request's log record (every
//! chunk as sent); if the client goes away first, dropping the stream cancels generation and
//! charges only the tokens generated so far, logging the chunks that were produced.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

use atoma_crypto::Keypair;
use atoma_state::log::{ResponseRecord, stream_hash};
use atoma_state::meter::Reservation;

use crate::backend::{BackendEvent, FinishReason, Logprobs};
use crate::error::ApiError;
use crate::handlers::Kind;
use crate::record::RequestLog;
use crate::sign::sign_json;
use crate::{AppState, metrics, render};

/// Identity of one response.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    pub prompt_tokens: u64,
    /// The sampler's seed, returned to the client.
    pub seed: u64,
    /// `system_fingerprint` (`Execution::fingerprint`).
    pub fingerprint: String,
    /// Whether the request asked for log-probabilities.
    pub logprobs: bool,
    /// The prompt's text, sent first, when the request asked for it back.
    pub echo: Option<String>,
    /// Choices in the answer (`n` × prompts), and per prompt (`n`).
    pub choices: usize,
    pub per_prompt: usize,
}

/// Hash of a whole stream, for the request log: Blake2b-256 over the concatenated hashes of its
/// chunks, in order (`atoma_state::log::stream_hash`).
#[derive(Debug, Default)]
struct RunningHash(Vec<u8>);

impl RunningHash {
    fn push(&mut self, h: [u8; 32]) {
        self.0.extend_from_slice(&h);
    }

    fn finish(&self) -> [u8; 32] {
        stream_hash(&self.0)
    }
}

/// One choice's progress in a stream.
#[derive(Debug, Default)]
struct ChoiceState {
    completion_tokens: u64,
    output_ids: Vec<u32>,
    /// Log-probabilities of tokens whose text is not sent yet (held back or incomplete UTF-8):
    /// they go with the next chunk that carries text.
    logprobs: Vec<Logprobs>,
    /// Characters of completion text sent so far (for `text_offset`).
    sent_chars: usize,
    /// Tool calls sent so far.
    tool_calls: usize,
    /// How it ended, once it has.
    finish: Option<FinishReason>,
}

struct State {
    events: BoxStream<'static, (usize, BackendEvent)>,
    reservation: Option<Reservation>,
    keys: Keypair,
    meta: Meta,
    include_usage: bool,
    hash: RunningHash,
    /// Every chunk as sent, for the log record.
    chunks: Vec<String>,
    choices: Vec<ChoiceState>,
    /// Choices per prompt (`n`).
    per_prompt: usize,
    /// Prefix-cache hits so far, over the prompts.
    cached: u64,
    log: RequestLog,
    pending: VecDeque<Event>,
    started: Instant,
    first_token_at: Option<Instant>,
    finished: bool,
}

/// What a chunk carries for its choice.
enum Delta<'a> {
    Text(&'a str),
    Call(Value),
    End(FinishReason),
}

impl State {
    fn completion_tokens(&self) -> u64 {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }

    /// A chunk of choice `index`.
    fn chunk(&mut self, index: usize, delta: Delta<'_>) -> Event {
        let kind = self.meta.kind;
        let wants_lp = self.meta.logprobs;
        let ch = &mut self.choices[index];
        let lp = if wants_lp {
            let l = render::logprobs(kind, &std::mem::take(&mut ch.logprobs), ch.sent_chars);
            if let Delta::Text(t) = &delta {
                ch.sent_chars += t.chars().count();
            }
            l
        } else {
            Value::Null
        };
        let (text, call, finish) = match delta {
            Delta::Text(t) => (Some(t), None, None),
            Delta::Call(c) => (None, Some(c), None),
            Delta::End(f) => (None, None, Some(f.as_str())),
        };
        let choice = match kind {
            Kind::Chat => {
                let delta = match (text, call) {
                    (_, Some(c)) => json!({"role": "assistant", "tool_calls": [c]}),
                    (Some(t), None) => json!({"role": "assistant", "content": t}),
                    (None, None) => json!({}),
                };
                json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp})
            }
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": lp})
            }
        };
        let seed = finish.is_some().then_some(self.meta.seed);
        self.signed(json!([choice]), None, seed)
    }

    /// A chunk with a tool call of choice `index` in its delta (chat only).
    fn call_chunk(&mut self, index: usize, name: &str, arguments: &str) -> Event {
        let ch = &mut self.choices[index];
        let k = ch.tool_calls;
        ch.tool_calls += 1;
        let id = render::tool_call_id(&self.meta.id, index, k);
        let call = render::tool_call(id, name, arguments, Some(k));
        self.chunk(index, Delta::Call(call))
    }

    /// Signs and records a chunk with `choices` (and `usage`, and the seed on a final chunk).
    fn signed(&mut self, choices: Value, usage: Option<Value>, seed: Option<u64>) -> Event {
        let mut body = json!({
            "id": self.meta.id,
            "object": if self.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": self.meta.fingerprint,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        if let Some(seed) = seed {
            body["seed"] = json!(seed);
        }
        let (body, h) = sign_json(&self.keys, body);
        self.hash.push(h);
        let text = atoma_crypto::signed_json::canonical(&body);
        let event = Event::default().data(&text);
        self.chunks.push(text);
        event
    }

    fn on_event(&mut self, index: usize, ev: BackendEvent) {
        if index >= self.choices.len() {
            self.on_error(format!("the backend sent choice {index}"));
            return;
        }
        match ev {
            BackendEvent::Token {
                id,
                text: t,
                logprobs,
            } => {
                let ch = &mut self.choices[index];
                ch.completion_tokens += 1;
                ch.output_ids.push(id);
                ch.logprobs.extend(logprobs);
                if self.first_token_at.is_none() {
                    self.first_token_at = Some(Instant::now());
                    metrics::time_to_first_token(self.started.elapsed().as_secs_f64());
                }
                if !t.is_empty() {
                    let e = self.chunk(index, Delta::Text(&t));
                    self.pending.push_back(e);
                }
            }
            BackendEvent::Text(t) => {
                if !t.is_empty() {
                    let e = self.chunk(index, Delta::Text(&t));
                    self.pending.push_back(e);
                }
            }
            BackendEvent::ToolCall { name, arguments } => {
                let e = self.call_chunk(index, &name, &arguments);
                self.pending.push_back(e);
            }
            BackendEvent::Done {
                finish_reason,
                prompt_tokens: _,
                completion_tokens,
                cached_tokens,
            } => {
                // Usage counts every prompt once (a batch's together), and the prefix-cache
                // hits of each prompt's first choice (the others share its KV).
                let prompt_tokens = self.meta.prompt_tokens;
                if index.is_multiple_of(self.per_prompt) {
                    self.cached += cached_tokens;
                }
                let cached_tokens = self.cached;
                let ch = &mut self.choices[index];
                ch.finish = Some(finish_reason);
                ch.completion_tokens = completion_tokens;
                // Tool calls are how the answer ends on the wire; the log keeps the
                // generation's own reason.
                let wire = render::wire_finish(finish_reason, ch.tool_calls > 0);
                let e = self.chunk(index, Delta::End(wire));
                self.pending.push_back(e);
                if self.choices.iter().all(|c| c.finish.is_some()) {
                    let completion = self.completion_tokens();
                    if self.include_usage {
                        let usage = render::usage(prompt_tokens, completion, cached_tokens);
                        let e = self.signed(json!([]), Some(usage), None);
                        self.pending.push_back(e);
                    }
                    self.pending.push_back(Event::default().data("[DONE]"));
                    self.settle(prompt_tokens, completion);
                    self.finished = true;
                }
            }
            BackendEvent::Error(msg) => self.on_error(msg),
        }
    }

    fn on_error(&mut self, msg: String) {
        tracing::warn!(error = %msg, "generation failed mid-stream");
        let body = ApiError::Internal(msg).envelope();
        self.pending
            .push_back(Event::default().data(body.to_string()));
        // Nothing billable was delivered completely: give the units back.
        if let Some(r) = self.reservation.take()
            && let Err(e) = r.release()
        {
            tracing::error!(error = %e, "cannot release a reservation");
        }
        self.finished = true;
    }

    /// Charges the stack and logs the request; unfinished choices count as cancelled.
    fn settle(&mut self, prompt: u64, completion: u64) {
        if let Some(first) = self.first_token_at
            && completion > 1
        {
            metrics::time_per_output_token(first.elapsed().as_secs_f64() / (completion - 1) as f64);
        }
        if let Some(r) = self.reservation.take() {
            let outputs = self
                .choices
                .iter_mut()
                .map(|c| {
                    let f = c.finish.unwrap_or(FinishReason::Cancelled);
                    (std::mem::take(&mut c.output_ids), f)
                })
                .collect();
            let settled = self.log.settled(
                ResponseRecord::Stream(std::mem::take(&mut self.chunks)),
                self.hash.finish(),
                outputs,
                (prompt, completion),
            );
            match r.settle(settled) {
                Ok(()) => metrics::usage(prompt, completion),
                Err(e) => tracing::error!(error = %e, "cannot settle a stream's usage"),
            }
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The client went away before the end: charge what was generated, release the rest.
        if self.reservation.is_some() {
            let (p, c) = (self.meta.prompt_tokens, self.completion_tokens());
            tracing::info!(id = %self.meta.id, completion_tokens = c, "client disconnected mid-stream");
            self.settle(p, c);
        }
    }
}

fn events(state: State) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.finished {
                return None;
            }
            match st.events.next().await {
                Some((i, ev)) => st.on_event(i, ev),
                None => st.on_error("the backend stopped without finishing".into()),
            }
        }
    })
}

pub(crate) fn sse(
    s: AppState,
    meta: Meta,
    backend_events: BoxStream<'static, (usize, BackendEvent)>,
    reservation: Reservation,
    include_usage: bool,
    log: RequestLog,
) -> Response {
    let (n, per_prompt) = (meta.choices, meta.per_prompt);
    let keys = s.inner.keys.clone();
    let echo = meta.echo.clone();
    let mut state = State {
        events: backend_events,
        reservation: Some(reservation),
        keys,
        meta,
        include_usage,
        hash: RunningHash::default(),
        chunks: Vec::new(),
        choices: (0..n).map(|_| ChoiceState::default()).collect(),
        per_prompt: per_prompt.max(1),
        cached: 0,
        log,
        pending: VecDeque::new(),
        started: Instant::now(),
        first_token_at: None,
        finished: false,
    };
    if let Some(text) = echo.filter(|t| !t.is_empty()) {
        for i in 0..n {
            let e = state.chunk(i, Delta::Text(&text));
            state.pending.push_back(e);
        }
    }
    Sse::new(events(state))
        .keep_alive(KeepAlive::default())
        .into_response()
}
