//! Prometheus metrics of the API, prefixed `atoma_`: requests by route and status, prompt and
//! completion tokens, compute units served, latency and time-to-first-token histograms, and the
//! engine's queue depth.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed: render ours anyway (it only sees nothing).
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Counts a finished request.
pub fn request(route: &'static str, status: u16, seconds: f64) {
    metrics::counter!("atoma_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
    metrics::histogram!("atoma_request_latency_seconds", "route" => route).record(seconds);
}

/// Records the usage of a served request.
pub fn usage(prompt_tokens: u64, completion_tokens: u64) {
    metrics::counter!("atoma_prompt_tokens_total").increment(prompt_tokens);
    metrics::counter!("atoma_completion_tokens_total").increment(completion_tokens);
    metrics::counter!("atoma_compute_units_served_total")
        .increment(prompt_tokens + completion_tokens);
}

/// Recent latencies as exponentially weighted averages (weight 1/8 for each new sample), for
/// the node's status endpoint: gateways route by them.
struct Recent {
    ttft: std::sync::atomic::AtomicU64,
    tpot: std::sync::atomic::AtomicU64,
}

static RECENT: Recent = Recent {
    ttft: std::sync::atomic::AtomicU64::new(0),
    tpot: std::sync::atomic::AtomicU64::new(0),
};

fn ewma(cell: &std::sync::atomic::AtomicU64, sample: f64) {
    use std::sync::atomic::Ordering;
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
        let old = f64::from_bits(bits);
        let new = if bits == 0 {
            sample
        } else {
            old + (sample - old) / 8.0
        };
        Some(new.to_bits())
    });
}

/// Recent time to first token and time per output token, in seconds (0: nothing served yet).
pub fn recent_latency() -> (f64, f64) {
    use std::sync::atomic::Ordering;
    (
        f64::from_bits(RECENT.ttft.load(Ordering::Acquire)),
        f64::from_bits(RECENT.tpot.load(Ordering::Acquire)),
    )
}

/// Records the time to the first generated token.
pub fn time_to_first_token(seconds: f64) {
    metrics::histogram!("atoma_time_to_first_token_seconds").record(seconds);
    ewma(&RECENT.ttft, seconds);
}

/// Records the time per output token after the first (the decode pace) of a finished request.
pub fn time_per_output_token(seconds: f64) {
    metrics::histogram!("atoma_time_per_output_token_seconds").record(seconds);
    ewma(&RECENT.tpot, seconds);
}

/// Sets the engine queue depth gauge.
pub fn queue_depth(n: usize) {
    metrics::gauge!("atoma_queue_depth").set(n as f64);
}
