//! The gateway's HTTP surface and forwarding.
//!
//! A request's life: the API key (`Authorization: Bearer …`) is checked, then its rate limits;
//! the body's model names the tasks and so the offers; credit for the worst case (the body's
//! size as an upper bound of the prompt's tokens, plus `max_tokens`, at the dearest candidate's
//! price plus the margin) is held; the candidates are ranked (`routing`, policy from the config
//! or the `X-Atoma-Routing` header); for each in turn the gateway leases units on a stack it
//! owns on that node (buying one if needed), adds a fresh `nonce`, signs the body as the
//! stack's owner and sends it. Connection failures, timeouts, 5xx, 429 and 423 move on to the
//! next candidate (a stream only while nothing has reached the client). Every answer and every
//! chunk must carry a valid `response_hash` and the node's own signature: a node that fails
//! this is ejected and the answer never reaches the client. The key is charged exactly what the
//! node charged the stack (`units × price` micro base units) plus the margin; the rest of the
//! hold goes back. Signed answers are kept as evidence (`evidence` table).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

use atoma_crypto::{Keypair, blake2b256};
use atoma_ledger::{Address, TaskRole};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::keys::{Hold, KeyInfo, KeyStore, margin_of};
use crate::ratelimit::RateLimiter;
use crate::registry::{NodeInfo, Offer, Registry};
use crate::routing::{Candidate, Policy, RouteOptions, rank};
use crate::stacks::{Lease, StackBook};

mod relay;

use relay::{Relay, check_signed, sse_events};

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Everything the gateway's handlers share.
pub struct Gateway {
    pub cfg: GatewayConfig,
    pub keys: KeyStore,
    pub limits: RateLimiter,
    pub registry: Arc<Registry>,
    pub stacks: StackBook,
    /// The gateway's ledger key: owner of its stacks, signer of its requests.
    pub signer: Keypair,
    pub http: reqwest::Client,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    evidence: crate::books::Books,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over its parts; kept answers go to `books` (the `evidence` table), normally
    /// the connection `keys` and `stacks` share (see [`crate::books`]).
    pub fn new(
        cfg: GatewayConfig,
        keys: KeyStore,
        registry: Arc<Registry>,
        stacks: StackBook,
        signer: Keypair,
        books: crate::books::Books,
    ) -> Result<Self, GatewayError> {
        books
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS evidence (
                   id INTEGER PRIMARY KEY AUTOINCREMENT, stack INTEGER NOT NULL,
                   node INTEGER NOT NULL, request_hash BLOB NOT NULL, response BLOB NOT NULL,
                   verified INTEGER NOT NULL, at INTEGER NOT NULL);",
            )
            .map_err(|e| GatewayError::Internal(format!("evidence store: {e}")))?;
        Ok(Self {
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| GatewayError::Internal(e.to_string()))?,
            metrics: crate::metrics_handle(),
            cfg,
            keys,
            limits: RateLimiter::default(),
            registry,
            stacks,
            signer,
            evidence: books,
        })
    }

    fn keep_evidence(&self, lease: &Lease, request_hash: &[u8; 32], response: &[u8], ok: bool) {
        let conn = self.evidence.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Err(e) = conn.execute(
            "INSERT INTO evidence (stack, node, request_hash, response, verified, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                lease.stack.0 as i64,
                lease.node as i64,
                &request_hash[..],
                response,
                ok,
                now
            ],
        ) {
            tracing::error!(error = %e, "cannot keep a signed answer as evidence");
        }
    }
}

/// The gateway's router.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            GatewayError::InvalidRequest(
                "no such route; see /v1/chat/completions, /v1/completions, /v1/embeddings, \
                 /v1/models"
                    .into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gw)
}

async fn chat(State(gw): State<Arc<Gateway>>, h: HeaderMap, body: Bytes) -> Response {
    serve(
        gw,
        h,
        body,
        "/v1/chat/completions",
        TaskRole::ChatCompletion,
    )
    .await
}

async fn completions(State(gw): State<Arc<Gateway>>, h: HeaderMap, body: Bytes) -> Response {
    serve(gw, h, body, "/v1/completions", TaskRole::ChatCompletion).await
}

async fn embeddings(State(gw): State<Arc<Gateway>>, h: HeaderMap, body: Bytes) -> Response {
    serve(gw, h, body, "/v1/embeddings", TaskRole::Embedding).await
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let data: Vec<Value> = gw
        .registry
        .snapshot()
        .models()
        .into_iter()
        .map(|(m, _)| json!({"id": m, "object": "model", "created": 0, "owned_by": "atoma"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let nodes = gw.registry.snapshot().nodes.len();
    let available = gw.registry.available();
    axum::Json(json!({"status": "ok", "nodes": nodes, "available": available})).into_response()
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        gw.metrics.render(),
    )
        .into_response()
}

async fn serve(
    gw: Arc<Gateway>,
    h: HeaderMap,
    body: Bytes,
    path: &'static str,
    role: TaskRole,
) -> Response {
    let t0 = Instant::now();
    let resp = match forward(&gw, &h, body, path, role).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    metrics::counter!("atoma_gateway_requests_total", "route" => path,
                      "status" => resp.status().as_u16().to_string())
    .increment(1);
    metrics::histogram!("atoma_gateway_request_seconds", "route" => path)
        .record(t0.elapsed().as_secs_f64());
    resp
}

fn api_key(h: &HeaderMap) -> Result<&str, GatewayError> {
    let v = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            GatewayError::Unauthorized("missing `Authorization: Bearer <API key>`".into())
        })?;
    v.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            GatewayError::Unauthorized("the Authorization header must be `Bearer <API key>`".into())
        })
}

/// What the gateway needs to know of a request body.
struct Shape {
    model: String,
    stream: bool,
    wants_usage: bool,
    max_tokens: u64,
}

fn shape(v: &Value, cfg: &GatewayConfig, role: TaskRole) -> Result<Shape, GatewayError> {
    let model = v["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| GatewayError::InvalidRequest("`model` must be a non-empty string".into()))?
        .to_string();
    let max_tokens = match role {
        TaskRole::Embedding => 0,
        _ => v["max_completion_tokens"]
            .as_u64()
            .or_else(|| v["max_tokens"].as_u64())
            .unwrap_or(cfg.default_max_tokens),
    };
    Ok(Shape {
        model,
        stream: v["stream"] == true,
        wants_usage: v["stream_options"]["include_usage"] == true,
        max_tokens,
    })
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// Why one attempt at one node did not give an answer.
enum Attempt {
    /// Try the next candidate.
    Next(String),
    /// The node refused the request itself (a 4xx other than 423/429): pass it on.
    Refused(Response),
}

async fn forward(
    gw: &Arc<Gateway>,
    h: &HeaderMap,
    body: Bytes,
    path: &'static str,
    role: TaskRole,
) -> Result<Response, GatewayError> {
    let secret = api_key(h)?.to_string();
    let keys = gw.keys.clone();
    let key = tokio::task::spawn_blocking(move || keys.authenticate(&secret))
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::Unauthorized(format!("invalid API key: {e}")))?;
    if let Err(wait) = gw.limits.check(key.id, key.limits, Instant::now()) {
        return Err(GatewayError::RateLimited {
            message: format!("key `{}` is over its limits", key.name),
            retry_after_secs: wait.as_secs_f64().ceil() as u64,
        });
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::InvalidRequest(format!("invalid request body: {e}")))?;
    if !v.is_object() {
        return Err(GatewayError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    let s = shape(&v, &gw.cfg, role)?;
    let snap = gw.registry.snapshot();
    let offers = snap.offers_for(&s.model, role, gw.cfg.price_cap);
    if offers.is_empty() {
        return Err(if snap.tasks.contains_key(&(s.model.clone(), role)) {
            GatewayError::NoNode(format!(
                "no node offers `{}` at a price the gateway pays",
                s.model
            ))
        } else {
            GatewayError::UnknownModel(s.model)
        });
    }
    // The prompt has at most as many tokens as its text has bytes; templates add a few.
    let units = body.len() as u64 + 64 + s.max_tokens;
    let dearest = offers
        .iter()
        .map(|(o, _)| o.price_per_million)
        .max()
        .unwrap_or(0);
    let node_max = u128::from(units) * u128::from(dearest);
    let hold_micro = u64::try_from(
        node_max
            + u128::from(margin_of(
                node_max.min(u64::MAX as u128) as u64,
                gw.cfg.margin_permille,
            )),
    )
    .map_err(|_| GatewayError::InvalidRequest("the request is too large to price".into()))?;
    let keys = gw.keys.clone();
    let id = key.id;
    let hold = tokio::task::spawn_blocking(move || keys.hold(id, hold_micro))
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::InsufficientCredit(format!("key `{}`: {e}", key.name)))?;
    let policy = h
        .get("x-atoma-routing")
        .and_then(|v| v.to_str().ok())
        .and_then(|p| p.parse::<Policy>().ok())
        .unwrap_or(gw.cfg.policy);
    let stats = gw.registry.stats();
    let idle = crate::routing::NodeStats::default();
    // One candidate per node (a node may sell the model in several tasks): its cheapest
    // offer, so a node is never tried twice for one request.
    let mut best: Vec<&(Offer, &NodeInfo)> = Vec::new();
    for entry in &offers {
        let (o, _) = entry;
        match best.iter_mut().find(|(b, _)| b.node == o.node) {
            Some(b) if (o.price_per_million, o.task.0) < (b.0.price_per_million, b.0.task.0) => {
                *b = entry;
            }
            Some(_) => {}
            None => best.push(entry),
        }
    }
    let cands: Vec<Candidate<'_>> = best
        .iter()
        .map(|(o, n)| Candidate {
            node: o.node,
            price_per_million: o.price_per_million,
            reputation: n.reputation,
            stats: stats.get(&o.node).unwrap_or(&idle),
        })
        .collect();
    let order = rank(
        &cands,
        &RouteOptions {
            policy,
            max_candidates: gw.cfg.max_candidates,
            expected_out_tokens: s.max_tokens.min(u64::from(u32::MAX)) as u32,
            seed: random_u64(),
        },
        Instant::now(),
    );
    let request_id = h
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| format!("gw-{:016x}", random_u64()), str::to_string);
    let mut last = String::from("no candidate was available");
    let mut hold = Some(hold);
    for node in order {
        let Some((offer, info)) = best.iter().find(|(o, _)| o.node == node) else {
            continue;
        };
        let ctx = Ctx {
            gw,
            key: &key,
            path,
            request_id: &request_id,
            node_url: &info.url,
            node_owner: info.owner,
            node,
            task: offer.task,
            price: offer.price_per_million,
            units,
            eligible: offers
                .iter()
                .filter(|(o, _)| {
                    o.task == offer.task && o.price_per_million <= offer.price_per_million
                })
                .count(),
            shape: &s,
        };
        match ctx.attempt(&v, &mut hold).await {
            Ok(mut resp) => {
                // Which node served: the signature inside says it too, this saves a lookup.
                resp.headers_mut()
                    .insert("x-atoma-node", HeaderValue::from(node));
                return Ok(resp);
            }
            Err(Attempt::Refused(resp)) => return Ok(resp),
            Err(Attempt::Next(why)) => {
                tracing::info!(node, reason = %why, "failing over to the next node");
                metrics::counter!("atoma_gateway_failovers_total", "node" => node.to_string())
                    .increment(1);
                last = format!("node {node}: {why}");
            }
        }
    }
    Err(GatewayError::NoNode(last))
}

/// One attempt at one node.
struct Ctx<'a> {
    gw: &'a Arc<Gateway>,
    key: &'a KeyInfo,
    path: &'static str,
    request_id: &'a str,
    node_url: &'a str,
    node_owner: Address,
    node: u64,
    task: atoma_ledger::TaskSmallId,
    price: u64,
    units: u64,
    /// Nodes the ledger may sample for a stack bought at `price` (the chosen one and cheaper).
    eligible: usize,
    shape: &'a Shape,
}

impl Ctx<'_> {
    async fn attempt(&self, v: &Value, hold: &mut Option<Hold>) -> Result<Response, Attempt> {
        let gw = self.gw;
        let (stacks, task, node, price, units, eligible) = (
            gw.stacks.clone(),
            self.task,
            self.node,
            self.price,
            self.units,
            self.eligible,
        );
        let lease =
            tokio::task::spawn_blocking(move || stacks.lease(task, node, price, units, eligible))
                .await
                .map_err(|e| Attempt::Next(e.to_string()))?
                .map_err(|e| Attempt::Next(format!("no stack: {e}")))?;
        let mut upstream = v.clone();
        upstream["nonce"] = json!(random_u64());
        if self.shape.stream {
            upstream["stream_options"]["include_usage"] = json!(true);
        }
        let text = upstream.to_string();
        let request_hash = blake2b256(text.as_bytes());
        gw.registry.with_stats(node, |s| s.in_flight_started());
        let t0 = Instant::now();
        let sent = gw
            .http
            .post(format!("{}{}", self.node_url, self.path))
            .header("content-type", "application/json")
            .header("x-signature", gw.signer.sign(&request_hash))
            .header("x-stack-small-id", lease.stack.0.to_string())
            .header("x-request-id", self.request_id)
            .timeout(Duration::from_secs(gw.cfg.node_timeout_secs))
            .body(text)
            .send()
            .await;
        let failed = |severe: bool, why: String| {
            gw.registry.with_stats(node, |s| {
                s.in_flight_finished();
                s.record_failure(severe, Instant::now());
            });
            Attempt::Next(why)
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let _ = lease.release();
                return Err(failed(false, format!("unreachable: {e}")));
            }
        };
        let status = resp.status();
        if status == StatusCode::LOCKED {
            // The node is settling this stack: never use it again; try the next node.
            let _ = lease.retire();
            gw.registry.with_stats(node, |s| s.in_flight_finished());
            return Err(Attempt::Next("stack locked (423)".into()));
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let _ = lease.release();
            return Err(failed(false, format!("answered {status}")));
        }
        if !status.is_success() {
            let _ = lease.release();
            gw.registry.with_stats(node, |s| s.in_flight_finished());
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return Err(Attempt::Refused(r));
        }
        if self.shape.stream {
            return self.stream(resp, lease, request_hash, hold, t0).await;
        }
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let _ = lease.release();
                return Err(failed(false, format!("answer cut: {e}")));
            }
        };
        let answer: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                let _ = lease.release();
                return Err(failed(true, format!("answer is not JSON: {e}")));
            }
        };
        let units_used = answer["usage"]["total_tokens"].as_u64().unwrap_or(0);
        if let Err(why) = check_signed(&answer, self.node_owner) {
            // The node served (and charged the stack) but its answer cannot be trusted: it
            // never reaches the client, the units are kept as evidence, the node is ejected.
            gw.keep_evidence(&lease, &request_hash, &bytes, false);
            let _ = lease.settle(0);
            return Err(failed(true, format!("bad signature: {why}")));
        }
        let ttft = t0.elapsed();
        gw.registry.with_stats(node, |s| {
            s.in_flight_finished();
            s.record_success(ttft, None, Instant::now());
        });
        gw.keep_evidence(&lease, &request_hash, &bytes, true);
        self.charge(hold, lease, units_used);
        Ok(json_response(bytes))
    }

    /// Charges the key what the node charged the stack, plus the margin.
    fn charge(&self, hold: &mut Option<Hold>, lease: Lease, units_used: u64) {
        // At the stack's price: what the node is paid for these units (at most its asking
        // price, see `StackBook::lease`).
        let price = lease.price;
        let used = lease.settle(units_used).unwrap_or(0);
        let node_micro = used.saturating_mul(price);
        let margin = margin_of(node_micro, self.gw.cfg.margin_permille);
        if let Some(h) = hold.take()
            && let Err(e) = h.settle(node_micro, margin)
        {
            tracing::error!(error = %e, "cannot charge a key");
        }
        self.gw
            .limits
            .record_tokens(self.key.id, self.key.limits, used, Instant::now());
        metrics::counter!("atoma_gateway_key_charged_micro_total", "key" => self.key.name.clone())
            .increment(node_micro + margin);
        metrics::counter!("atoma_gateway_node_units_total", "node" => self.node.to_string())
            .increment(used);
    }

    async fn stream(
        &self,
        resp: reqwest::Response,
        lease: Lease,
        request_hash: [u8; 32],
        hold: &mut Option<Hold>,
        t0: Instant,
    ) -> Result<Response, Attempt> {
        let gw = self.gw;
        let node = self.node;
        let mut events = sse_events(resp.bytes_stream().boxed());
        // Nothing reaches the client before the first chunk checks out: until then a bad or
        // missing chunk fails over.
        let first = match events.next().await {
            Some(Ok(data)) => data,
            other => {
                let _ = lease.release();
                gw.registry.with_stats(node, |s| {
                    s.in_flight_finished();
                    s.record_failure(false, Instant::now());
                });
                return Err(Attempt::Next(format!(
                    "stream ended before its first chunk: {:?}",
                    other.map(|r| r.err())
                )));
            }
        };
        let mut relay = Relay {
            gw: gw.clone(),
            key: self.key.clone(),
            node,
            owner: self.node_owner,
            price: lease.price,
            wants_usage: self.shape.wants_usage,
            lease: Some(lease),
            hold: hold.take(),
            request_hash,
            kept: Vec::new(),
            usage: None,
            chunks: 0,
            t0,
            first_at: None,
            done: false,
        };
        let head = match relay.on_data(&first) {
            Ok(out) => out,
            Err(why) => {
                *hold = relay.hold.take();
                relay.done = true;
                if let Some(l) = relay.lease.take() {
                    gw.keep_evidence(&l, &request_hash, first.as_bytes(), false);
                    let _ = l.settle(0);
                }
                gw.registry.with_stats(node, |s| {
                    s.in_flight_finished();
                    s.record_failure(true, Instant::now());
                });
                return Err(Attempt::Next(format!("bad first chunk: {why}")));
            }
        };
        let body = futures_util::stream::once(async move { head })
            .chain(futures_util::stream::unfold(
                (events, relay),
                |(mut events, mut relay)| async move {
                    if relay.done {
                        return None;
                    }
                    let out = match events.next().await {
                        Some(Ok(data)) => match relay.on_data(&data) {
                            Ok(out) => out,
                            Err(why) => relay.fail(&why, true),
                        },
                        Some(Err(e)) => relay.fail(&e, false),
                        None => relay.end(),
                    };
                    Some((out, (events, relay)))
                },
            ))
            .map(Ok::<_, Infallible>);
        let mut r = Response::new(Body::from_stream(body));
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        Ok(r)
    }
}

fn json_response(bytes: Bytes) -> Response {
    let mut r = Response::new(Body::from(bytes));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}
