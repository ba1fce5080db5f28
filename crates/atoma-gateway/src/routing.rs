//! Routing: what the gateway knows about each node (`NodeStats`: measured latency, reported
//! load, errors, ejection with exponential backoff), the routing `Policy`, and `rank`, which
//! turns the nodes serving a model into an ordered failover list.
//!
//! # Why hand-rolled rather than `tower::balance::p2c`
//!
//! tower's power-of-two-choices balancer picks *one* service by comparing a single `Load`
//! measure (pending requests or peak EWMA latency). The gateway needs more than that:
//!
//! * price and on-chain reputation are part of the decision, and neither is a load: a user
//!   choosing `cheapest` wants the lowest price, not the least busy node, and `balanced` trades
//!   price against expected latency;
//! * the proxy needs an *ordered list* of candidates to fail over through (try the best, then
//!   the next on a connection error, a 5xx, a 429 or a bad signature), not one random pick;
//! * ejection must follow the node's protocol (a bad signature ejects at once; the node's own
//!   `/v1/node/status` report of its queue is the leading load signal), and ranking must be
//!   deterministic in tests.
//!
//! # Model
//!
//! [`NodeStats::expected_seconds`] estimates the time to serve a request now:
//! `(TTFT + out_tokens × TPOT) × (1 + QUEUE_WEIGHT × (waiting + kv_pressure) + RUNNING_WEIGHT ×
//! concurrency)`. TTFT and TPOT are EWMAs of what the gateway measured and what the node reports
//! (neutral priors while unknown, so new nodes get tried). `waiting` is the node's reported
//! queue, the leading overload signal: each request waiting ahead adds a quarter of a service
//! time (a continuous-batching engine admits it when a slot frees, not after the whole queue),
//! so a queue ten deep makes a node 3.5× slower than idle. `kv_pressure` counts a nearly full
//! KV cache as up to two more waiting requests. `concurrency` is the node's reported running
//! requests plus the gateway's requests sent since that report (before any report, the
//! gateway's own in-flight count); each adds 2%, because a batching engine runs them side by
//! side — counting them as queued would push traffic off a cheap node that still has free slots.
//!
//! The `Balanced` policy's score is an *effective price*:
//! `price × (1 + ERROR_WEIGHT × error_rate) × (expected / median expected)^LATENCY_EXPONENT ×
//! reputation_factor`, lowest first. Because it is a product, units cancel: only ratios
//! matter. With `LATENCY_EXPONENT = 0.5` a node must be 4× slower to justify paying 2×, so
//! idle nodes of similar speed go to the cheapest, but an overloaded cheap node (3× slower ⇒
//! factor 1.73) loses to one priced 10% more that is idle. Reputation scales the score by at
//! most 2%, enough to break near-ties and no more.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How candidates are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Cheapest,
    Fastest,
    #[default]
    Balanced,
    Random,
}

/// Routing errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("unknown routing policy `{0}` (expected cheapest, fastest, balanced or random)")]
    UnknownPolicy(String),
}

impl Policy {
    /// The policy's name, as in the config and the `X-Atoma-Routing` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cheapest => "cheapest",
            Self::Fastest => "fastest",
            Self::Balanced => "balanced",
            Self::Random => "random",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = RoutingError;

    /// Parses `cheapest|fastest|balanced|random` (ASCII case-insensitive, surrounding
    /// whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        [Self::Cheapest, Self::Fastest, Self::Balanced, Self::Random]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| RoutingError::UnknownPolicy(t.to_string()))
    }
}

/// Consecutive failures after which a node is ejected.
pub const EJECT_AFTER: u32 = 3;
/// The first ejection's length; each further one (without a success between) doubles it.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// The longest ejection, and the length of a severe one (a bad signature).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a node under an ordinary ejection is still health-polled: a node that comes up (or
/// back) is found within this, however long its backoff has grown while it was down.
pub const RESTING_POLL_EVERY: Duration = Duration::from_secs(5);
/// TTFT assumed while nothing is known (seconds).
pub const PRIOR_TTFT_S: f64 = 0.5;
/// TPOT assumed while nothing is known (seconds per output token).
pub const PRIOR_TPOT_S: f64 = 0.05;
/// Share of one service time that each request waiting ahead adds.
pub const QUEUE_WEIGHT: f64 = 0.25;
/// Share of one service time that each request running beside a new one adds.
pub const RUNNING_WEIGHT: f64 = 0.02;
/// `Balanced`: how much each unit of error rate multiplies the effective price (50% errors ⇒ 3×).
pub const ERROR_WEIGHT: f64 = 4.0;
/// `Balanced`: exponent on the relative expected time.
pub const LATENCY_EXPONENT: f64 = 0.5;
/// `Balanced`: the largest penalty for a low reputation (reputation 0 ⇒ +2%).
pub const REPUTATION_WEIGHT: f64 = 0.02;

/// Weight of a new outcome in the error-rate EWMA.
const ERROR_ALPHA: f64 = 0.1;
/// Weight of a new sample in the latency EWMAs.
const LATENCY_ALPHA: f64 = 0.3;
/// KV-cache use above which the node is treated as about to queue or preempt.
const KV_PRESSURE_FROM: f64 = 0.9;
/// Waiting requests a completely full KV cache counts as.
const KV_FULL_QUEUE: f64 = 2.0;
/// Floor of any expected time (seconds), so ratios never divide by zero.
const MIN_SECONDS: f64 = 1e-3;

/// What the gateway knows about one node. Owned by the registry; the caller holds it in a mutex.
#[derive(Debug, Clone)]
pub struct NodeStats {
    /// EWMA of TTFT (seconds), `None` while unknown.
    ttft_s: Option<f64>,
    /// EWMA of TPOT (seconds per output token), `None` while unknown.
    tpot_s: Option<f64>,
    running: u32,
    waiting: u32,
    kv_use: f64,
    /// When the node last reported its status.
    status_at: Option<Instant>,
    /// The gateway's requests now at the node.
    in_flight: u32,
    /// Requests the gateway sent since the node's last status report (not in its counts).
    started_since_status: u32,
    error_rate: f64,
    consecutive_failures: u32,
    /// The last ejection's length; zero while in good standing. Non-zero after an ejection
    /// until a request succeeds: the node is on probation and one failure ejects it again.
    backoff: Duration,
    ejected_until: Option<Instant>,
    /// The current ejection is for a bad signature: health polls do not lift it.
    severe: bool,
    last_success: Option<Instant>,
    /// When the gateway last polled the node's health (answered or not).
    polled_at: Option<Instant>,
}

impl Default for NodeStats {
    fn default() -> Self {
        Self::new()
    }
}

/// A finite, positive number of seconds, or `None` for unknown.
fn known(s: f64) -> Option<f64> {
    (s.is_finite() && s > 0.0).then_some(s)
}

fn ewma(old: Option<f64>, sample: f64, alpha: f64) -> f64 {
    old.map_or(sample, |o| o + alpha * (sample - o))
}

impl NodeStats {
    /// A node nothing is known about: available, priors for latency, no errors.
    pub fn new() -> Self {
        Self {
            ttft_s: None,
            tpot_s: None,
            running: 0,
            waiting: 0,
            kv_use: 0.0,
            status_at: None,
            in_flight: 0,
            started_since_status: 0,
            error_rate: 0.0,
            consecutive_failures: 0,
            backoff: Duration::ZERO,
            ejected_until: None,
            severe: false,
            last_success: None,
            polled_at: None,
        }
    }

    fn blend_latency(&mut self, ttft_s: f64, tpot_s: Option<f64>) {
        if let Some(t) = known(ttft_s) {
            self.ttft_s = Some(ewma(self.ttft_s, t, LATENCY_ALPHA));
        }
        if let Some(t) = tpot_s.and_then(known) {
            self.tpot_s = Some(ewma(self.tpot_s, t, LATENCY_ALPHA));
        }
    }

    fn ejected_at(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    fn eject(&mut self, now: Instant, backoff: Duration, severe: bool) {
        let until = now + backoff;
        let keep_severe = self.severe && self.ejected_at(now);
        self.ejected_until = Some(match self.ejected_until {
            Some(old) if keep_severe && old > until => old,
            _ => until,
        });
        self.backoff = backoff;
        self.severe = severe || keep_severe;
        self.consecutive_failures = 0;
    }

    /// A request the gateway sent finished well: TTFT and per-output-token time it measured.
    ///
    /// Ends probation (the backoff resets). A success that arrives while the node is still
    /// ejected (a request sent before the ejection) does not lift the ejection.
    pub fn record_success(&mut self, ttft: Duration, tpot: Option<Duration>, now: Instant) {
        self.blend_latency(ttft.as_secs_f64(), tpot.map(|d| d.as_secs_f64()));
        self.error_rate = ewma(Some(self.error_rate), 0.0, ERROR_ALPHA);
        self.consecutive_failures = 0;
        self.last_success = Some(now);
        if !self.ejected_at(now) {
            self.ejected_until = None;
            self.backoff = Duration::ZERO;
            self.severe = false;
        }
    }

    /// A request failed at the node (connection error, 5xx, 429, 423, a bad signature).
    ///
    /// After [`EJECT_AFTER`] consecutive failures the node is ejected for 1 s, then 2 s, 4 s …
    /// up to [`MAX_BACKOFF`] for each further ejection without a success between; on probation
    /// (after an ejection, before a success) a single failure ejects it again. A `severe`
    /// failure (bad signature) ejects at once for [`MAX_BACKOFF`]. Failures of requests sent
    /// before an ejection, arriving while it lasts, count in the error rate only.
    pub fn record_failure(&mut self, severe: bool, now: Instant) {
        self.error_rate = ewma(Some(self.error_rate), 1.0, ERROR_ALPHA);
        if severe {
            self.eject(now, MAX_BACKOFF, true);
            return;
        }
        if self.ejected_at(now) {
            return;
        }
        self.consecutive_failures += 1;
        let on_probation = !self.backoff.is_zero();
        if on_probation || self.consecutive_failures >= EJECT_AFTER {
            let next = if on_probation {
                (self.backoff * 2).min(MAX_BACKOFF)
            } else {
                BASE_BACKOFF
            };
            self.eject(now, next, false);
        }
    }

    /// The node's own report (its `/v1/node/status`): running and waiting requests, KV-cache
    /// use in `0..=1`, its recent TTFT and TPOT in seconds (0 = unknown). Known latencies are
    /// blended into the same EWMAs as the gateway's measurements, so a node that stopped
    /// getting traffic while overloaded does not keep its old latency forever.
    pub fn record_status(
        &mut self,
        running: u32,
        waiting: u32,
        kv_use: f32,
        ttft_s: f64,
        tpot_s: f64,
        now: Instant,
    ) {
        self.running = running;
        self.waiting = waiting;
        let kv = f64::from(kv_use);
        self.kv_use = if kv.is_finite() {
            kv.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.blend_latency(ttft_s, Some(tpot_s));
        self.status_at = Some(now);
        self.started_since_status = 0;
    }

    /// A health poll failed (counts like `record_failure(false)`) or succeeded (ends an
    /// ordinary ejection early: the node becomes available again, still on probation). A
    /// severe ejection is not lifted by a health poll: a node that answers `/health` may still
    /// sign wrongly, so it serves its full [`MAX_BACKOFF`].
    pub fn record_health(&mut self, ok: bool, now: Instant) {
        self.polled_at = Some(now);
        if !ok {
            self.record_failure(false, now);
        } else if !(self.severe && self.ejected_at(now)) {
            self.ejected_until = None;
            self.severe = false;
            self.consecutive_failures = 0;
        }
    }

    /// Whether the node's health should be polled now: always while it is not ejected; under an
    /// ordinary ejection every [`RESTING_POLL_EVERY`] (a success lifts the ejection, so a node
    /// that was down while its backoff grew to a minute is back within seconds of coming up);
    /// never during a severe one (a node that forged a signature serves its full backoff).
    pub fn poll_due(&self, now: Instant) -> bool {
        if !self.ejected_at(now) {
            return true;
        }
        !self.severe
            && self
                .polled_at
                .is_none_or(|t| now.saturating_duration_since(t) >= RESTING_POLL_EVERY)
    }

    /// The gateway sent a request to the node.
    pub fn in_flight_started(&mut self) {
        self.in_flight = self.in_flight.saturating_add(1);
        self.started_since_status = self.started_since_status.saturating_add(1);
    }

    /// A request the gateway sent to the node ended (in any way).
    pub fn in_flight_finished(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.started_since_status = self.started_since_status.min(self.in_flight);
    }

    /// The gateway's requests now at the node.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether the node may be tried now: not ejected, or its backoff has expired and no
    /// request of the gateway is at it (it is on probation and one request may probe it).
    pub fn available(&self, now: Instant) -> bool {
        match self.ejected_until {
            None => true,
            Some(until) => now >= until && self.in_flight == 0,
        }
    }

    /// When the current (or last, unprobed) ejection ends.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// When the node last reported its status.
    pub fn status_at(&self) -> Option<Instant> {
        self.status_at
    }

    /// When a request to the node last succeeded.
    pub fn last_success(&self) -> Option<Instant> {
        self.last_success
    }

    /// The load multiplier of [`Self::expected_seconds`] (1 = idle).
    fn load_factor(&self) -> f64 {
        let unreported = self.started_since_status.min(self.in_flight);
        let (waiting, concurrency) = match self.status_at {
            Some(_) => (self.waiting, self.running.saturating_add(unreported)),
            None => (0, self.in_flight),
        };
        let kv_pressure =
            ((self.kv_use - KV_PRESSURE_FROM) / (1.0 - KV_PRESSURE_FROM)).clamp(0.0, 1.0);
        1.0 + QUEUE_WEIGHT * (f64::from(waiting) + KV_FULL_QUEUE * kv_pressure)
            + RUNNING_WEIGHT * f64::from(concurrency)
    }

    /// Expected seconds to serve a request of `out_tokens` output tokens now:
    /// `(TTFT + out × TPOT) × (1 + QUEUE_WEIGHT × (waiting + kv_pressure) + RUNNING_WEIGHT ×
    /// concurrency)` (the module docs explain the terms). TTFT and TPOT fall back to
    /// [`PRIOR_TTFT_S`] and [`PRIOR_TPOT_S`] while unknown, so new nodes are tried. Always
    /// finite and positive.
    pub fn expected_seconds(&self, out_tokens: u32) -> f64 {
        let ttft = self.ttft_s.unwrap_or(PRIOR_TTFT_S);
        let tpot = self.tpot_s.unwrap_or(PRIOR_TPOT_S);
        let base = (ttft + f64::from(out_tokens) * tpot).max(MIN_SECONDS);
        let s = base * self.load_factor();
        if s.is_finite() { s } else { f64::MAX }
    }

    /// EWMA of request outcomes, 1 = failure, in `0..=1`.
    pub fn error_rate(&self) -> f64 {
        self.error_rate
    }

    /// Requests the node reported running.
    pub fn running(&self) -> u32 {
        self.running
    }
}

/// One node that serves the requested model, as `rank` sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub node: u64,
    /// The node's price per million compute units.
    pub price_per_million: u64,
    /// On-chain reputation score, `0..=100`.
    pub reputation: u8,
    pub stats: &'a NodeStats,
}

/// How to rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOptions {
    pub policy: Policy,
    /// The longest list returned (nodes tried before giving up).
    pub max_candidates: usize,
    /// Output tokens the request is expected to produce (its `max_tokens` or a default).
    pub expected_out_tokens: u32,
    /// Seed of the `Random` policy.
    pub seed: u64,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            policy: Policy::Balanced,
            max_candidates: 3,
            expected_out_tokens: 256,
            seed: 0,
        }
    }
}

/// One available candidate with what the policies compare.
struct Scored {
    node: u64,
    price: u64,
    reputation: u8,
    expected: f64,
    error_rate: f64,
    cost: f64,
}

/// Compares floats totally, NaN last.
fn cmp_f64(a: f64, b: f64) -> Ordering {
    let fix = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
    fix(a).total_cmp(&fix(b))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| cmp_f64(*a, *b));
    let n = values.len();
    match n {
        0 => 1.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The `Balanced` effective price (lower is better); see the module docs.
fn balanced_cost(price: u64, reputation: u8, error_rate: f64, relative_time: f64) -> f64 {
    // A zero price would zero the product whatever the load; floor it at one unit.
    let price = price.max(1) as f64;
    let errors = 1.0 + ERROR_WEIGHT * error_rate.clamp(0.0, 1.0);
    let latency = relative_time.max(0.0).powf(LATENCY_EXPONENT);
    let missing_rep = f64::from(100 - reputation.min(100)) / 100.0;
    price * errors * latency * (1.0 + REPUTATION_WEIGHT * missing_rep)
}

/// SplitMix64: a tiny, well-mixed deterministic generator for the `Random` policy.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; `n` is tiny, the bias negligible).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// The nodes to try, best first (at most `max_candidates`), skipping unavailable ones.
///
/// * `Cheapest`: lowest price; ties by expected time, then node id.
/// * `Fastest`: lowest expected time; ties by price, then node id.
/// * `Balanced`: lowest effective price (module docs); ties by reputation (higher first),
///   price, node id.
/// * `Random`: a uniform shuffle of the available nodes, determined by `seed`.
///
/// Every order is total (NaN sorts last), so the result is deterministic.
pub fn rank(cands: &[Candidate<'_>], opts: &RouteOptions, now: Instant) -> Vec<u64> {
    let out = opts.expected_out_tokens;
    let mut scored: Vec<Scored> = cands
        .iter()
        .filter(|c| c.stats.available(now))
        .map(|c| Scored {
            node: c.node,
            price: c.price_per_million,
            reputation: c.reputation,
            expected: c.stats.expected_seconds(out),
            error_rate: c.stats.error_rate(),
            cost: 0.0,
        })
        .collect();
    match opts.policy {
        Policy::Cheapest => scored.sort_by(|a, b| {
            a.price
                .cmp(&b.price)
                .then(cmp_f64(a.expected, b.expected))
                .then(a.node.cmp(&b.node))
        }),
        Policy::Fastest => scored.sort_by(|a, b| {
            cmp_f64(a.expected, b.expected)
                .then(a.price.cmp(&b.price))
                .then(a.node.cmp(&b.node))
        }),
        Policy::Balanced => {
            let mut times: Vec<f64> = scored.iter().map(|s| s.expected).collect();
            let mid = median(&mut times).max(MIN_SECONDS);
            for s in &mut scored {
                s.cost = balanced_cost(s.price, s.reputation, s.error_rate, s.expected / mid);
            }
            scored.sort_by(|a, b| {
                cmp_f64(a.cost, b.cost)
                    .then(b.reputation.cmp(&a.reputation))
                    .then(a.price.cmp(&b.price))
                    .then(a.node.cmp(&b.node))
            });
        }
        Policy::Random => {
            let mut rng = SplitMix64(opts.seed);
            for i in (1..scored.len()).rev() {
                let j = rng.below(i + 1);
                scored.swap(i, j);
            }
        }
    }
    scored.truncate(opts.max_candidates);
    scored.into_iter().map(|s| s.node).collect()
}
