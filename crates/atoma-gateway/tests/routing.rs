//! Routing: policies, ejection and backoff, the load model, and a small queueing simulation
//! showing that `Balanced` moves traffic off an overloaded cheap node while `Cheapest` does
//! not. Deterministic: every `Instant` is one base plus an offset; no network, no sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use atoma_gateway::routing::{
    Candidate, EJECT_AFTER, MAX_BACKOFF, NodeStats, Policy, RouteOptions, RoutingError, rank,
};

fn ms(base: Instant, offset: u64) -> Instant {
    base + Duration::from_millis(offset)
}

fn opts(policy: Policy, max_candidates: usize) -> RouteOptions {
    RouteOptions {
        policy,
        max_candidates,
        expected_out_tokens: 100,
        seed: 7,
    }
}

fn cand(node: u64, price: u64, reputation: u8, stats: &NodeStats) -> Candidate<'_> {
    Candidate {
        node,
        price_per_million: price,
        reputation,
        stats,
    }
}

/// An idle node that reported `ttft_s` and `tpot_s` and has `waiting` requests queued.
fn reported(waiting: u32, ttft_s: f64, tpot_s: f64, now: Instant) -> NodeStats {
    let mut s = NodeStats::new();
    s.record_status(0, waiting, 0.1, ttft_s, tpot_s, now);
    s
}

fn eject(stats: &mut NodeStats, now: Instant) {
    for _ in 0..EJECT_AFTER {
        stats.record_failure(false, now);
    }
}

#[test]
fn policy_names_round_trip() {
    for p in [
        Policy::Cheapest,
        Policy::Fastest,
        Policy::Balanced,
        Policy::Random,
    ] {
        assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        assert_eq!(p.to_string(), p.as_str());
    }
    assert_eq!(" Fastest ".parse::<Policy>(), Ok(Policy::Fastest));
    assert_eq!(
        "priciest".parse::<Policy>(),
        Err(RoutingError::UnknownPolicy("priciest".into()))
    );
    assert_eq!(Policy::default(), Policy::Balanced);
}

#[test]
fn cheapest_picks_lowest_price() {
    let now = Instant::now();
    let a = reported(0, 0.1, 0.01, now);
    let b = reported(5, 0.5, 0.05, now);
    let c = reported(0, 0.05, 0.005, now);
    let cands = [
        cand(1, 1200, 100, &a),
        cand(2, 900, 100, &b),
        cand(3, 1000, 100, &c),
    ];
    assert_eq!(rank(&cands, &opts(Policy::Cheapest, 3), now), vec![2, 3, 1]);
    // Equal prices: the faster first.
    let cands = [cand(1, 1000, 100, &a), cand(3, 1000, 100, &c)];
    assert_eq!(rank(&cands, &opts(Policy::Cheapest, 3), now), vec![3, 1]);
}

#[test]
fn three_consecutive_failures_eject() {
    let t0 = Instant::now();
    let mut s = NodeStats::new();
    s.record_failure(false, t0);
    s.record_failure(false, t0);
    // A success in between resets the count.
    s.record_success(Duration::from_millis(100), None, t0);
    s.record_failure(false, t0);
    s.record_failure(false, t0);
    assert!(s.available(t0));
    assert_eq!(s.ejected_until(), None);
    s.record_failure(false, t0);
    assert!(!s.available(t0));
    assert_eq!(s.ejected_until(), Some(ms(t0, 1_000)));
}

#[test]
fn ejected_node_is_skipped_until_backoff_ends_then_probed_back() {
    let t0 = Instant::now();
    let mut cheap = reported(0, 0.1, 0.01, t0);
    let dear = reported(0, 0.1, 0.01, t0);
    eject(&mut cheap, t0);
    let o = opts(Policy::Cheapest, 3);
    let ranked = |cheap: &NodeStats, at| {
        rank(
            &[cand(1, 900, 100, cheap), cand(2, 1000, 100, &dear)],
            &o,
            at,
        )
    };

    assert_eq!(ranked(&cheap, ms(t0, 999)), vec![2]);
    // The backoff has ended: on probation, one request may probe it.
    assert_eq!(ranked(&cheap, ms(t0, 1_000)), vec![1, 2]);
    cheap.in_flight_started();
    assert_eq!(
        ranked(&cheap, ms(t0, 1_001)),
        vec![2],
        "one probe at a time"
    );
    cheap.in_flight_finished();
    cheap.record_success(Duration::from_millis(100), None, ms(t0, 1_200));
    assert_eq!(cheap.ejected_until(), None);
    cheap.in_flight_started();
    assert_eq!(
        ranked(&cheap, ms(t0, 1_300)),
        vec![1, 2],
        "back in good standing"
    );
}

#[test]
fn backoff_doubles_and_caps_at_60_s() {
    let t0 = Instant::now();
    let mut s = NodeStats::new();
    eject(&mut s, t0);
    let mut now = t0;
    let mut seen = Vec::new();
    for _ in 0..9 {
        let until = s.ejected_until().expect("ejected");
        seen.push((until - now).as_secs());
        // Failures of requests sent earlier, during the ejection, do not extend it.
        s.record_failure(false, until - Duration::from_millis(1));
        assert_eq!(s.ejected_until(), Some(until));
        // The probe after the backoff fails: ejected again, for twice as long.
        now = until;
        assert!(s.available(now));
        s.record_failure(false, now);
    }
    assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(MAX_BACKOFF, Duration::from_secs(60));
    // A successful probe resets the backoff.
    let until = s.ejected_until().unwrap();
    s.record_success(Duration::from_millis(100), None, until);
    eject(&mut s, until);
    assert_eq!(s.ejected_until(), Some(until + Duration::from_secs(1)));
}

#[test]
fn severe_failure_ejects_at_once_for_the_cap() {
    let t0 = Instant::now();
    let mut s = NodeStats::new();
    s.record_failure(true, t0);
    assert_eq!(s.ejected_until(), Some(t0 + MAX_BACKOFF));
    assert!(!s.available(ms(t0, 59_999)));
    // A health poll does not lift it (the node may answer /health and still sign wrongly),
    // nor does a success of a request sent earlier.
    s.record_health(true, ms(t0, 1_000));
    s.record_success(Duration::from_millis(100), None, ms(t0, 2_000));
    assert!(!s.available(ms(t0, 59_999)));
    assert!(s.available(t0 + MAX_BACKOFF));
}

#[test]
fn health_ok_ends_an_ejection_and_health_failures_count() {
    let t0 = Instant::now();
    let mut s = NodeStats::new();
    for _ in 0..EJECT_AFTER {
        s.record_health(false, t0);
    }
    assert!(!s.available(ms(t0, 10)));
    s.record_health(true, ms(t0, 100));
    assert!(s.available(ms(t0, 100)));
    assert_eq!(s.ejected_until(), None);
    // Still on probation: one failure ejects it again, with the doubled backoff.
    s.record_failure(false, ms(t0, 200));
    assert_eq!(s.ejected_until(), Some(ms(t0, 2_200)));
}

#[test]
fn fastest_picks_lowest_latency() {
    let now = Instant::now();
    let slow = reported(0, 1.0, 0.05, now);
    let quick = reported(0, 0.1, 0.01, now);
    let busy_quick = reported(10, 0.1, 0.01, now);
    let cands = [
        cand(1, 500, 100, &slow),
        cand(2, 2000, 100, &quick),
        cand(3, 900, 100, &busy_quick),
    ];
    assert_eq!(rank(&cands, &opts(Policy::Fastest, 3), now), vec![2, 3, 1]);
    assert!(quick.expected_seconds(100) < busy_quick.expected_seconds(100));
}

#[test]
fn load_model_and_priors() {
    let now = Instant::now();
    let mut fresh = NodeStats::new();
    // Priors: 0.5 s TTFT + 100 × 50 ms.
    assert!((fresh.expected_seconds(100) - 5.5).abs() < 1e-9);
    // Before any status report the gateway's own in-flight requests count (2% each).
    for _ in 0..10 {
        fresh.in_flight_started();
    }
    assert!((fresh.expected_seconds(100) - 5.5 * 1.2).abs() < 1e-9);
    // A queue ten deep: 3.5× idle.
    let idle = reported(0, 0.1, 0.004, now);
    let queued = reported(10, 0.1, 0.004, now);
    let ratio = queued.expected_seconds(100) / idle.expected_seconds(100);
    assert!((ratio - 3.5).abs() < 1e-9, "{ratio}");
    // A nearly full KV cache counts as waiting requests.
    let mut full = NodeStats::new();
    full.record_status(0, 0, 1.0, 0.1, 0.004, now);
    assert!(full.expected_seconds(100) > idle.expected_seconds(100) * 1.4);
}

#[test]
fn balanced_overloaded_cheap_node_loses_to_slightly_dearer_idle_one() {
    let now = Instant::now();
    let overloaded = reported(10, 0.1, 0.004, now);
    let idle = reported(0, 0.1, 0.004, now);
    assert!(overloaded.expected_seconds(100) >= 3.0 * idle.expected_seconds(100));
    let cands = [cand(1, 1000, 100, &overloaded), cand(2, 1100, 100, &idle)];
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 3), now), vec![2, 1]);
    // The reference gateway's behaviour, for contrast.
    assert_eq!(rank(&cands, &opts(Policy::Cheapest, 3), now), vec![1, 2]);
}

#[test]
fn balanced_equal_load_prefers_cheaper() {
    let now = Instant::now();
    let a = reported(0, 0.1, 0.004, now);
    let b = reported(0, 0.1, 0.004, now);
    let cands = [cand(1, 1100, 100, &a), cand(2, 1000, 100, &b)];
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 3), now), vec![2, 1]);
    // Equally busy: still the cheaper.
    let a = reported(4, 0.1, 0.004, now);
    let b = reported(4, 0.1, 0.004, now);
    let cands = [cand(1, 1100, 100, &a), cand(2, 1000, 100, &b)];
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 3), now), vec![2, 1]);
    // Brand-new nodes (priors) too.
    let (a, b) = (NodeStats::new(), NodeStats::new());
    let cands = [cand(1, 1100, 100, &a), cand(2, 1000, 100, &b)];
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 3), now), vec![2, 1]);
}

#[test]
fn balanced_errors_lose_to_healthy_at_same_price() {
    let now = Instant::now();
    let mut flaky = reported(0, 0.1, 0.004, now);
    let healthy = reported(0, 0.1, 0.004, now);
    for i in 0..6 {
        if i % 3 == 0 {
            flaky.record_failure(false, now);
        } else {
            flaky.record_success(Duration::from_millis(100), None, now);
        }
    }
    assert!(flaky.available(now));
    assert!(flaky.error_rate() > 0.1);
    let cands = [cand(1, 1000, 100, &flaky), cand(2, 1000, 100, &healthy)];
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 3), now), vec![2, 1]);
}

#[test]
fn balanced_reputation_breaks_near_ties() {
    let now = Instant::now();
    let a = reported(0, 0.1, 0.004, now);
    let b = reported(0, 0.1, 0.004, now);
    let o = opts(Policy::Balanced, 3);
    // Same price: the better reputation first.
    assert_eq!(
        rank(&[cand(1, 1000, 50, &a), cand(2, 1000, 90, &b)], &o, now),
        vec![2, 1]
    );
    // 1% dearer with a full reputation beats a reputation of 0.
    assert_eq!(
        rank(&[cand(1, 1000, 0, &a), cand(2, 1010, 100, &b)], &o, now),
        vec![2, 1]
    );
    // But reputation does not outweigh a 10% price difference.
    assert_eq!(
        rank(&[cand(1, 1000, 0, &a), cand(2, 1100, 100, &b)], &o, now),
        vec![1, 2]
    );
}

#[test]
fn max_candidates_truncates_and_unavailable_are_excluded() {
    let t0 = Instant::now();
    let stats: Vec<NodeStats> = (0..5).map(|_| reported(0, 0.1, 0.004, t0)).collect();
    let mut ejected = reported(0, 0.01, 0.001, t0);
    eject(&mut ejected, t0);
    let mut cands: Vec<Candidate<'_>> = stats
        .iter()
        .enumerate()
        .map(|(i, s)| cand(i as u64, 1000 + 10 * i as u64, 100, s))
        .collect();
    cands.push(cand(99, 1, 100, &ejected));
    for p in [
        Policy::Cheapest,
        Policy::Fastest,
        Policy::Balanced,
        Policy::Random,
    ] {
        let all = rank(&cands, &opts(p, 10), t0);
        assert_eq!(all.len(), 5, "{p}");
        assert!(!all.contains(&99), "{p}: ejected node ranked");
        assert_eq!(rank(&cands, &opts(p, 2), t0), all[..2].to_vec(), "{p}");
        assert!(rank(&cands, &opts(p, 0), t0).is_empty());
    }
    assert_eq!(rank(&cands, &opts(Policy::Balanced, 2), t0), vec![0, 1]);
    assert!(rank(&[], &opts(Policy::Balanced, 3), t0).is_empty());
}

#[test]
fn order_is_total_and_deterministic_even_with_bad_inputs() {
    let now = Instant::now();
    let mut nan = NodeStats::new();
    nan.record_status(3, 2, f32::NAN, f64::NAN, f64::INFINITY, now);
    let mut neg = NodeStats::new();
    neg.record_status(0, 0, -4.0, -1.0, f64::NEG_INFINITY, now);
    let mut zero = NodeStats::new();
    zero.record_success(Duration::ZERO, Some(Duration::ZERO), now);
    let huge = reported(u32::MAX, 1e300, 1e300, now);
    let plain = reported(0, 0.1, 0.004, now);
    for s in [&nan, &neg, &zero, &huge, &plain] {
        let e = s.expected_seconds(u32::MAX);
        assert!(e.is_finite() && e > 0.0, "{e}");
    }
    let cands = [
        cand(5, 0, 0, &nan),
        cand(4, u64::MAX, 255, &neg),
        cand(3, 1000, 100, &zero),
        cand(2, 1000, 100, &huge),
        cand(1, 1000, 100, &plain),
        cand(0, 1000, 100, &plain),
    ];
    let mut reversed = cands;
    reversed.reverse();
    for p in [
        Policy::Cheapest,
        Policy::Fastest,
        Policy::Balanced,
        Policy::Random,
    ] {
        for out in [0, 100, u32::MAX] {
            let o = RouteOptions {
                expected_out_tokens: out,
                ..opts(p, 10)
            };
            let r = rank(&cands, &o, now);
            let mut sorted = r.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4, 5], "{p}: a permutation");
            assert_eq!(rank(&cands, &o, now), r, "{p}: deterministic");
            if p != Policy::Random {
                assert_eq!(
                    rank(&reversed, &o, now),
                    r,
                    "{p}: independent of input order"
                );
            }
        }
    }
}

#[test]
fn random_spreads_evenly_and_is_deterministic() {
    let now = Instant::now();
    let stats: Vec<NodeStats> = (0..3).map(|_| NodeStats::new()).collect();
    let cands: Vec<Candidate<'_>> = stats
        .iter()
        .enumerate()
        .map(|(i, s)| cand(i as u64, 1000 * (i as u64 + 1), 100, s))
        .collect();
    let mut firsts = [0u32; 3];
    for seed in 0..3000 {
        let o = RouteOptions {
            seed,
            ..opts(Policy::Random, 3)
        };
        let r = rank(&cands, &o, now);
        assert_eq!(r.len(), 3);
        assert_eq!(rank(&cands, &o, now), r);
        firsts[r[0] as usize] += 1;
    }
    for n in firsts {
        assert!((850..=1150).contains(&n), "{firsts:?}");
    }
}

// --- Simulation -----------------------------------------------------------------------------

/// A simulated node: `SLOTS` requests run side by side for `SERVICE_MS` each (TTFT plus
/// `OUT_TOKENS` × TPOT), so it completes `SLOTS / SERVICE_MS` requests per ms; the rest wait
/// in FIFO order.
struct SimNode {
    price: u64,
    stats: NodeStats,
    waiting: VecDeque<u64>,
    /// (arrival, start) of each running request.
    running: Vec<(u64, u64)>,
    last_ttft_s: f64,
}

const SLOTS: usize = 4;
const TTFT_MS: u64 = 100;
const TPOT_MS: u64 = 4;
const OUT_TOKENS: u64 = 100;
const SERVICE_MS: u64 = TTFT_MS + OUT_TOKENS * TPOT_MS;
const ARRIVAL_EVERY_MS: u64 = 50;
const STATUS_EVERY_MS: u64 = 100;
const REQUESTS: usize = 2_000;

/// Feeds `REQUESTS` arrivals (20 per second; each node completes 8 per second) through `rank`
/// and returns which node (0, 1, 2 with prices 1000, 1100, 1300) got each one, and the cheap
/// node's largest queue.
fn simulate(policy: Policy) -> (Vec<usize>, usize) {
    let base = Instant::now();
    let mut nodes: Vec<SimNode> = [1000, 1100, 1300]
        .into_iter()
        .map(|price| SimNode {
            price,
            stats: NodeStats::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            last_ttft_s: 0.0,
        })
        .collect();
    let mut assigned = Vec::with_capacity(REQUESTS);
    let mut cheap_max_queue = 0;
    let mut t = 0u64;
    while assigned.len() < REQUESTS {
        let now = ms(base, t);
        for n in &mut nodes {
            // Completions: the measured TTFT includes the time spent waiting.
            let (done, still): (Vec<_>, Vec<_>) = n
                .running
                .iter()
                .partition(|&&(_, start)| start + SERVICE_MS <= t);
            n.running = still;
            for (arrival, start) in done {
                let ttft = Duration::from_millis(start - arrival + TTFT_MS);
                n.last_ttft_s = ttft.as_secs_f64();
                n.stats
                    .record_success(ttft, Some(Duration::from_millis(TPOT_MS)), now);
                n.stats.in_flight_finished();
            }
            if t.is_multiple_of(STATUS_EVERY_MS) {
                let running = n.running.len() as u32;
                let waiting = n.waiting.len() as u32;
                let kv = running as f32 / SLOTS as f32 * 0.8;
                let tpot = TPOT_MS as f64 / 1000.0;
                n.stats
                    .record_status(running, waiting, kv, n.last_ttft_s, tpot, now);
            }
        }
        if t.is_multiple_of(ARRIVAL_EVERY_MS) {
            let cands: Vec<Candidate<'_>> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| cand(i as u64, n.price, 100, &n.stats))
                .collect();
            let o = RouteOptions {
                expected_out_tokens: OUT_TOKENS as u32,
                ..opts(policy, 3)
            };
            let pick = rank(&cands, &o, now)[0] as usize;
            nodes[pick].waiting.push_back(t);
            nodes[pick].stats.in_flight_started();
            assigned.push(pick);
        }
        for n in &mut nodes {
            while n.running.len() < SLOTS {
                let Some(arrival) = n.waiting.pop_front() else {
                    break;
                };
                n.running.push((arrival, t));
            }
        }
        cheap_max_queue = cheap_max_queue.max(nodes[0].waiting.len());
        t += 10;
    }
    (assigned, cheap_max_queue)
}

fn share(assigned: &[usize], node: usize) -> f64 {
    assigned.iter().filter(|&&n| n == node).count() as f64 / assigned.len() as f64
}

#[test]
fn simulation_balanced_spills_off_the_saturated_cheap_node() {
    let (assigned, cheap_max_queue) = simulate(Policy::Balanced);
    // While it has free slots, the cheap node takes the traffic.
    assert_eq!(share(&assigned[..6], 0), 1.0, "{:?}", &assigned[..40]);
    // Once it saturates (it serves 8 of the 20 requests a second), its share falls to about
    // its capacity and the dearer nodes pick up the rest, the 1100 one before the 1300 one.
    let steady = &assigned[200..];
    let (cheap, mid, dear) = (share(steady, 0), share(steady, 1), share(steady, 2));
    assert!(cheap < share(&assigned[..10], 0), "{cheap}");
    assert!((0.3..0.5).contains(&cheap), "cheap share {cheap}");
    assert!(mid > dear && dear > 0.1, "{cheap} {mid} {dear}");
    assert!(
        cheap_max_queue < 20,
        "cheap queue stayed bounded: {cheap_max_queue}"
    );
}

#[test]
fn simulation_cheapest_sends_everything_to_the_cheap_node() {
    let (assigned, cheap_max_queue) = simulate(Policy::Cheapest);
    assert_eq!(share(&assigned, 0), 1.0);
    // 20 arrivals a second against 8 served: the queue grows without bound.
    assert!(cheap_max_queue > 1_000, "{cheap_max_queue}");
}
