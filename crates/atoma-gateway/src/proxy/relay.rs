//! Streams from a node to the client: the node's SSE bytes as `data:` payloads, each chunk's
//! signature checked against the node's key before it is relayed, and the settlement of the
//! key's hold and the stack's lease when the stream ends, however it ends (done, broken, or the
//! client gone).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use atoma_crypto::signed_json;
use atoma_ledger::Address;

use super::Gateway;
use crate::error::GatewayError;
use crate::keys::{Hold, KeyInfo, margin_of};
use crate::stacks::Lease;

/// Checks a node's signed JSON: the hash, and that the node's own key signed it.
pub(super) fn check_signed(v: &Value, owner: Address) -> Result<(), String> {
    let c = signed_json::check_json(v)?;
    if c.signer != owner.0 {
        return Err("signed by another key than the node's".into());
    }
    Ok(())
}

/// A node's SSE stream as `data:` payloads.
pub(super) fn sse_events(
    bytes: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
) -> impl Stream<Item = Result<String, String>> + Unpin {
    Box::pin(futures_util::stream::unfold(
        (
            bytes,
            String::new(),
            std::collections::VecDeque::<String>::new(),
        ),
        |(mut bytes, mut buf, mut ready)| async move {
            loop {
                if let Some(d) = ready.pop_front() {
                    return Some((Ok(d), (bytes, buf, ready)));
                }
                match bytes.next().await {
                    Some(Ok(b)) => {
                        buf.push_str(&String::from_utf8_lossy(&b));
                        while let Some(end) = buf.find("\n\n") {
                            let event: String = buf.drain(..end + 2).collect();
                            let data: Vec<&str> = event
                                .lines()
                                .filter_map(|l| l.strip_prefix("data:").map(str::trim_start))
                                .collect();
                            if !data.is_empty() {
                                ready.push_back(data.join("\n"));
                            }
                        }
                    }
                    Some(Err(e)) => return Some((Err(e.to_string()), (bytes, buf, ready))),
                    None => return None,
                }
            }
        },
    ))
}

/// Relays one verified stream to the client and settles it when it ends, however it ends.
pub(super) struct Relay {
    pub(super) gw: Arc<Gateway>,
    pub(super) key: KeyInfo,
    pub(super) node: u64,
    pub(super) owner: Address,
    pub(super) price: u64,
    pub(super) wants_usage: bool,
    pub(super) lease: Option<Lease>,
    pub(super) hold: Option<Hold>,
    pub(super) request_hash: [u8; 32],
    pub(super) kept: Vec<u8>,
    pub(super) usage: Option<u64>,
    pub(super) chunks: u64,
    pub(super) t0: Instant,
    pub(super) first_at: Option<Instant>,
    pub(super) done: bool,
}

impl Relay {
    /// One `data:` payload: `[DONE]`, or a chunk that must check out.
    pub(super) fn on_data(&mut self, data: &str) -> Result<Bytes, String> {
        if data == "[DONE]" {
            return Ok(self.end());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("chunk is not JSON: {e}"))?;
        if v.get("error").is_some() {
            return Err(format!(
                "the node failed mid-stream: {}",
                v["error"]["message"]
            ));
        }
        check_signed(&v, self.owner)?;
        self.first_at.get_or_insert_with(Instant::now);
        self.kept.extend_from_slice(data.as_bytes());
        self.kept.push(b'\n');
        if let Some(u) = v["usage"]["total_tokens"].as_u64() {
            self.usage = Some(u);
            if !self.wants_usage && v["choices"].as_array().is_some_and(Vec::is_empty) {
                return Ok(Bytes::new());
            }
        }
        if v["choices"][0]["delta"]["content"].is_string() || v["choices"][0]["text"].is_string() {
            self.chunks += 1;
        }
        Ok(Bytes::from(format!("data: {data}\n\n")))
    }

    /// The stream ended well.
    pub(super) fn end(&mut self) -> Bytes {
        self.finish(true);
        Bytes::from_static(b"data: [DONE]\n\n")
    }

    /// The stream broke after bytes reached the client: tell the client, eject on a bad chunk.
    pub(super) fn fail(&mut self, why: &str, severe: bool) -> Bytes {
        tracing::warn!(node = self.node, reason = why, "a stream broke midway");
        self.gw.registry.with_stats(self.node, |s| {
            s.record_failure(severe, Instant::now());
        });
        self.finish(false);
        let e = GatewayError::NoNode(format!("the node's stream broke: {why}"));
        Bytes::from(format!("data: {}\n\n", e.envelope()))
    }

    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let Some(lease) = self.lease.take() else {
            return;
        };
        self.gw
            .keep_evidence(&lease, &self.request_hash, &self.kept, ok);
        // Without a usage chunk (a broken stream) the key pays for the chunks it received.
        let used = lease.settle(self.usage.unwrap_or(self.chunks)).unwrap_or(0);
        let node_micro = used.saturating_mul(self.price);
        let margin = margin_of(node_micro, self.gw.cfg.margin_permille);
        if let Some(h) = self.hold.take()
            && let Err(e) = h.settle(node_micro, margin)
        {
            tracing::error!(error = %e, "cannot charge a key");
        }
        self.gw
            .limits
            .record_tokens(self.key.id, self.key.limits, used, Instant::now());
        let (ttft, now) = (
            self.first_at.map_or(self.t0.elapsed(), |f| f - self.t0),
            Instant::now(),
        );
        self.gw.registry.with_stats(self.node, |s| {
            s.in_flight_finished();
            if ok {
                let tpot = self
                    .first_at
                    .filter(|_| used > 1)
                    .map(|f| now.duration_since(f) / (self.chunks.max(2) - 1) as u32);
                s.record_success(ttft, tpot, now);
            }
        });
        metrics::counter!("atoma_gateway_key_charged_micro_total", "key" => self.key.name.clone())
            .increment(node_micro + margin);
    }
}

impl Drop for Relay {
    /// The client went away: dropping the upstream stream cancels the node's generation; the
    /// key pays what the node produced until then.
    fn drop(&mut self) {
        self.finish(false);
    }
}
