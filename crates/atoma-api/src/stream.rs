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

struct State {
    events: BoxStream<'static, BackendEvent>,
    reservation: Option<Reservation>,
    keys: Keypair,
    meta: Meta,
    include_usage: bool,
    completion_tokens: u64,
    hash: RunningHash,
    /// Every chunk as sent, and the generated token ids, for the log record.
    chunks: Vec<String>,
    output_ids: Vec<u32>,
    log: RequestLog,
    pending: VecDeque<Event>,
    /// Log-probabilities of tokens whose text is not sent yet (held back or incomplete UTF-8):
    /// they go with the next chunk that carries text.
    logprobs: Vec<Logprobs>,
    /// Characters of completion text sent so far (for `text_offset`).
    sent_chars: usize,
    /// Tool calls sent so far.
    tool_calls: usize,
    started: Instant,
    first_token_at: Option<Instant>,
    finished: bool,
}

impl State {
    fn chunk(
        &mut self,
        delta: Option<&str>,
        finish: Option<FinishReason>,
        usage: Option<Value>,
    ) -> Event {
        self.chunk_with(delta, None, finish, usage)
    }

    /// A chunk with a tool call in its delta (chat only).
    fn call_chunk(&mut self, name: &str, arguments: &str) -> Event {
        let index = self.tool_calls;
        self.tool_calls += 1;
        let id = render::tool_call_id(&self.meta.id, index);
        let call = render::tool_call(id, name, arguments, Some(index));
        self.chunk_with(None, Some(call), None, None)
    }

    fn chunk_with(
        &mut self,
        delta: Option<&str>,
        call: Option<Value>,
        finish: Option<FinishReason>,
        usage: Option<Value>,
    ) -> Event {
        let lp = if self.meta.logprobs && usage.is_none() {
            let l = render::logprobs(
                self.meta.kind,
                &std::mem::take(&mut self.logprobs),
                self.sent_chars,
            );
            self.sent_chars += delta.map_or(0, |d| d.chars().count());
            l
        } else {
            Value::Null
        };
        let finish = finish.map(FinishReason::as_str);
        let choices = match (usage.is_some(), self.meta.kind) {
            (true, _) => json!([]),
            (false, Kind::Chat) => {
                let delta = match (delta, call) {
                    (_, Some(c)) => json!({"role": "assistant", "tool_calls": [c]}),
                    (Some(t), None) => json!({"role": "assistant", "content": t}),
                    (None, None) => json!({}),
                };
                json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}])
            }
            (false, Kind::Completion) => {
                json!([{"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": lp}])
            }
        };
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
        if finish.is_some() {
            body["seed"] = json!(self.meta.seed);
        }
        let (body, h) = sign_json(&self.keys, body);
        self.hash.push(h);
        let text = atoma_crypto::signed_json::canonical(&body);
        let event = Event::default().data(&text);
        self.chunks.push(text);
        event
    }

    fn on_event(&mut self, ev: BackendEvent) {
        match ev {
            BackendEvent::Token {
                id,
                text: t,
                logprobs,
            } => {
                self.completion_tokens += 1;
                self.output_ids.push(id);
                self.logprobs.extend(logprobs);
                if self.first_token_at.is_none() {
                    self.first_token_at = Some(Instant::now());
                    metrics::time_to_first_token(self.started.elapsed().as_secs_f64());
                }
                if !t.is_empty() {
                    let e = self.chunk(Some(&t), None, None);
                    self.pending.push_back(e);
                }
            }
            BackendEvent::Text(t) => {
                if !t.is_empty() {
                    let e = self.chunk(Some(&t), None, None);
                    self.pending.push_back(e);
                }
            }
            BackendEvent::ToolCall { name, arguments } => {
                let e = self.call_chunk(&name, &arguments);
                self.pending.push_back(e);
            }
            BackendEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                // Tool calls are how the answer ends on the wire; the log keeps the
                // generation's own reason.
                let wire = render::wire_finish(finish_reason, self.tool_calls > 0);
                let e = self.chunk(None, Some(wire), None);
                self.pending.push_back(e);
                if self.include_usage {
                    let usage = render::usage(prompt_tokens, completion_tokens, cached_tokens);
                    let e = self.chunk(None, None, Some(usage));
                    self.pending.push_back(e);
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.settle(prompt_tokens, completion_tokens, finish_reason);
                self.finished = true;
            }
            BackendEvent::Error(msg) => {
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
        }
    }

    fn settle(&mut self, prompt: u64, completion: u64, finish_reason: FinishReason) {
        if let Some(first) = self.first_token_at
            && completion > 1
        {
            metrics::time_per_output_token(first.elapsed().as_secs_f64() / (completion - 1) as f64);
        }
        if let Some(r) = self.reservation.take() {
            let settled = self.log.settled(
                ResponseRecord::Stream(std::mem::take(&mut self.chunks)),
                self.hash.finish(),
                std::mem::take(&mut self.output_ids),
                finish_reason,
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
            let (p, c) = (self.meta.prompt_tokens, self.completion_tokens);
            tracing::info!(id = %self.meta.id, completion_tokens = c, "client disconnected mid-stream");
            self.settle(p, c, FinishReason::Cancelled);
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
                Some(ev) => st.on_event(ev),
                None => {
                    st.on_event(BackendEvent::Error(
                        "the backend stopped without finishing".into(),
                    ));
                }
            }
        }
    })
}

pub(crate) fn sse(
    s: AppState,
    meta: Meta,
    backend_events: BoxStream<'static, BackendEvent>,
    reservation: Reservation,
    include_usage: bool,
    log: RequestLog,
) -> Response {
    let keys = s.inner.keys.clone();
    let echo = meta.echo.clone();
    let mut state = State {
        events: backend_events,
        reservation: Some(reservation),
        keys,
        meta,
        include_usage,
        completion_tokens: 0,
        hash: RunningHash::default(),
        chunks: Vec::new(),
        output_ids: Vec::new(),
        log,
        pending: VecDeque::new(),
        logprobs: Vec::new(),
        sent_chars: 0,
        tool_calls: 0,
        started: Instant::now(),
        first_token_at: None,
        finished: false,
    };
    if let Some(text) = echo.filter(|t| !t.is_empty()) {
        let e = state.chunk(Some(&text), None, None);
        state.pending.push_back(e);
    }
    Sse::new(events(state))
        .keep_alive(KeepAlive::default())
        .into_response()
}
