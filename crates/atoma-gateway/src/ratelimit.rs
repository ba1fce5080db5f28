//! Per-key rate limits, in memory: requests per minute and tokens per minute.
//!
//! Each limit is a token bucket refilled continuously: capacity = the per-minute limit, rate =
//! limit / 60 per second; 0 means unlimited. A request takes one request token and needs a
//! non-negative token bucket; the tokens a finished request used are counted afterwards and may
//! push that bucket below zero, so later requests wait. Levels are integers scaled by the
//! nanoseconds in a minute, so a bucket of limit L refills exactly L scaled units per
//! nanosecond and nothing is rounded except the wait, which is rounded up to whole milliseconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::keys::{KeyId, Limits};

/// Scaled units per token: nanoseconds in a minute.
const SCALE: i128 = 60_000_000_000;
/// Level of a bucket whose limit is 0 (unlimited): any finite limit set later caps it to full.
const FULL: i128 = i128::MAX / 4;

/// Admits requests per key under its limits.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<KeyId, Buckets>>,
}

#[derive(Debug)]
struct Buckets {
    requests: i128,
    tokens: i128,
    last: Instant,
}

impl Buckets {
    fn new(now: Instant) -> Self {
        Self {
            requests: FULL,
            tokens: FULL,
            last: now,
        }
    }

    /// Refills both buckets for the time since the last call (none if `now` is earlier).
    fn refill(&mut self, limits: Limits, now: Instant) {
        let elapsed = i128::try_from(now.saturating_duration_since(self.last).as_nanos())
            .unwrap_or(i128::MAX);
        if now > self.last {
            self.last = now;
        }
        self.requests = refilled(self.requests, limits.requests_per_minute, elapsed);
        self.tokens = refilled(self.tokens, limits.tokens_per_minute, elapsed);
    }
}

/// A bucket's level after `elapsed_ns` at `limit` per minute, capped at its capacity.
fn refilled(level: i128, limit: u32, elapsed_ns: i128) -> i128 {
    if limit == 0 {
        return FULL;
    }
    let limit = i128::from(limit);
    level
        .saturating_add(elapsed_ns.saturating_mul(limit))
        .min(limit * SCALE)
}

/// Time for a bucket at `level` with `limit` per minute to reach `target`, in nanoseconds.
fn wait_ns(level: i128, limit: u32, target: i128) -> i128 {
    if limit == 0 || level >= target {
        return 0;
    }
    let limit = i128::from(limit);
    (target - level + limit - 1) / limit
}

impl RateLimiter {
    /// A limiter with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits one request for `key` under `limits` at `now`, or says how long to wait (until
    /// both a request token and a non-negative token bucket are available, rounded up to whole
    /// milliseconds).
    pub fn check(&self, key: KeyId, limits: Limits, now: Instant) -> Result<(), Duration> {
        if limits.requests_per_minute == 0 && limits.tokens_per_minute == 0 {
            return Ok(());
        }
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(key).or_insert_with(|| Buckets::new(now));
        b.refill(limits, now);
        let wait = wait_ns(b.requests, limits.requests_per_minute, SCALE).max(wait_ns(
            b.tokens,
            limits.tokens_per_minute,
            0,
        ));
        if wait > 0 {
            let ms = u64::try_from((wait + 999_999) / 1_000_000).unwrap_or(u64::MAX);
            return Err(Duration::from_millis(ms));
        }
        if limits.requests_per_minute > 0 {
            b.requests -= SCALE;
        }
        Ok(())
    }

    /// Counts `tokens` used by a finished request; the token bucket may go below zero, which
    /// makes later requests of the key wait.
    pub fn record_tokens(&self, key: KeyId, limits: Limits, tokens: u64, now: Instant) {
        if limits.tokens_per_minute == 0 || tokens == 0 {
            return;
        }
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(key).or_insert_with(|| Buckets::new(now));
        b.refill(limits, now);
        b.tokens = b
            .tokens
            .saturating_sub(i128::from(tokens).saturating_mul(SCALE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: KeyId = KeyId(1);
    const K2: KeyId = KeyId(2);

    fn rpm(n: u32) -> Limits {
        Limits {
            requests_per_minute: n,
            tokens_per_minute: 0,
        }
    }

    fn tpm(n: u32) -> Limits {
        Limits {
            requests_per_minute: 0,
            tokens_per_minute: n,
        }
    }

    #[test]
    fn sixty_per_minute_admits_sixty_then_waits_a_second() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..60 {
            assert_eq!(rl.check(K1, rpm(60), t0), Ok(()));
        }
        assert_eq!(rl.check(K1, rpm(60), t0), Err(Duration::from_secs(1)));
        // Half a second later the wait is half a second; a second later one more is admitted.
        let half = t0 + Duration::from_millis(500);
        assert_eq!(rl.check(K1, rpm(60), half), Err(Duration::from_millis(500)));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(rl.check(K1, rpm(60), later), Ok(()));
        assert!(rl.check(K1, rpm(60), later).is_err());
    }

    #[test]
    fn wait_is_rounded_up_to_whole_milliseconds() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        assert_eq!(rl.check(K1, rpm(1), t0), Ok(()));
        let t = t0 + Duration::from_nanos(59_999_999_999);
        assert_eq!(rl.check(K1, rpm(1), t), Err(Duration::from_millis(1)));
        assert_eq!(rl.check(K2, rpm(1), t0), Ok(()));
        let t = t0 + Duration::from_nanos(59_998_999_999);
        assert_eq!(rl.check(K2, rpm(1), t), Err(Duration::from_millis(2)));
    }

    #[test]
    fn tokens_over_the_limit_make_the_next_request_wait() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        assert_eq!(rl.check(K1, tpm(600), t0), Ok(()));
        rl.record_tokens(K1, tpm(600), 1000, t0);
        // 600 − 1000 = −400 tokens, refilled at 10 per second: 40 s.
        assert_eq!(rl.check(K1, tpm(600), t0), Err(Duration::from_secs(40)));
        let t = t0 + Duration::from_secs(39);
        assert_eq!(rl.check(K1, tpm(600), t), Err(Duration::from_secs(1)));
        assert_eq!(rl.check(K1, tpm(600), t0 + Duration::from_secs(40)), Ok(()));
    }

    #[test]
    fn both_limits_wait_for_the_later_one() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        let both = Limits {
            requests_per_minute: 1,
            tokens_per_minute: 60,
        };
        assert_eq!(rl.check(K1, both, t0), Ok(()));
        rl.record_tokens(K1, both, 90, t0);
        // Request bucket: 60 s; token bucket: −30 at 1 per second: 30 s.
        assert_eq!(rl.check(K1, both, t0), Err(Duration::from_secs(60)));
    }

    #[test]
    fn zero_is_unlimited() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(rl.check(K1, Limits::default(), t0), Ok(()));
        }
        rl.record_tokens(K1, Limits::default(), u64::MAX, t0);
        rl.record_tokens(K1, rpm(5), u64::MAX, t0);
        assert_eq!(rl.check(K1, rpm(5), t0), Ok(()));
    }

    #[test]
    fn keys_are_independent() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        assert_eq!(rl.check(K1, rpm(1), t0), Ok(()));
        assert!(rl.check(K1, rpm(1), t0).is_err());
        assert_eq!(rl.check(K2, rpm(1), t0), Ok(()));
        rl.record_tokens(K1, tpm(10), 1000, t0);
        assert_eq!(rl.check(K2, tpm(10), t0), Ok(()));
    }

    #[test]
    fn raising_a_limit_never_exceeds_the_new_capacity() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        assert_eq!(rl.check(K1, rpm(0), t0), Ok(()));
        // A key that was unlimited starts full at its new limit, not above it.
        for _ in 0..2 {
            assert_eq!(rl.check(K1, rpm(2), t0), Ok(()));
        }
        assert!(rl.check(K1, rpm(2), t0).is_err());
        // An earlier instant does not refill or panic.
        assert!(rl.check(K1, rpm(2), t0 - Duration::from_millis(1)).is_err());
    }
}
