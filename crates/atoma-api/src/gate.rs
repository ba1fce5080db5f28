//! Authorization before work: the read-only check that a signer may spend a stack on this node,
//! run after the signature and before the body is parsed, rendered or tokenized, so a key that
//! owns no stack costs the node a hash and one indexed read, however large its body.
//!
//! A request may name a stack bought a moment ago, which the node's ledger follower has not
//! applied yet; the gate then catches up with the ledger once. Catching up is the expensive
//! part, so a flood of made-up stack ids must not cause one sync per request:
//! - an id found unknown *after* a sync is remembered for `UNKNOWN_TTL` and refused at once;
//! - syncs run one at a time, at most one per `REFRESH_GAP`, and a request whose arrival
//!   precedes the start of the latest sync is covered by it (the stack it names was bought
//!   before the request was signed, so that sync saw it) and does not start another.
//!
//! A request may also name the transaction that bought its stack (`X-Tx-Digest`, as the
//! reference node reads it): the catch-up then reads that transaction too, which finds the
//! stack even when the ledger's event list lags behind it. Such a request is not covered by an
//! earlier sync nor refused by the memory of unknown ids, but it still waits its turn, one
//! catch-up per `REFRESH_GAP`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use atoma_ledger::{Address, StackSmallId};
use atoma_state::meter::{Meter, MeterError, StackTask};

use crate::Refresh;

/// How long a stack id unknown after a sync is refused without another.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(2);
/// Least time between two ledger syncs caused by requests.
pub const REFRESH_GAP: Duration = Duration::from_millis(100);
/// Most unknown ids remembered (older ones are forgotten first when full).
const MAX_REMEMBERED: usize = 10_000;

pub(crate) struct Gate {
    meter: Meter,
    refresh: Option<Refresh>,
    /// Start of the latest sync; held while a sync runs, so syncs never overlap.
    last_refresh: Mutex<Option<Instant>>,
    unknown: Mutex<HashMap<StackSmallId, Instant>>,
}

impl Gate {
    pub(crate) fn new(meter: Meter, refresh: Option<Refresh>) -> Self {
        Self {
            meter,
            refresh,
            last_refresh: Mutex::new(None),
            unknown: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `signer` may spend `stack` here (blocking); the stack's task model on success.
    pub(crate) fn authorize(
        &self,
        stack: StackSmallId,
        signer: &Address,
        tx_digest: Option<&str>,
    ) -> Result<StackTask, MeterError> {
        let arrived = Instant::now();
        let Some(refresh) = &self.refresh else {
            return self.meter.authorize(stack, signer);
        };
        match self.meter.authorize(stack, signer) {
            Err(MeterError::UnknownStack(_)) => {}
            other => return other,
        }
        if tx_digest.is_none() && self.recently_unknown(stack, arrived) {
            return Err(MeterError::UnknownStack(stack));
        }
        self.refresh_since(refresh, arrived, tx_digest);
        let res = self.meter.authorize(stack, signer);
        if matches!(res, Err(MeterError::UnknownStack(_))) {
            self.remember_unknown(stack);
        }
        res
    }

    fn recently_unknown(&self, stack: StackSmallId, now: Instant) -> bool {
        let Ok(mut map) = self.unknown.lock() else {
            return false;
        };
        match map.get(&stack) {
            Some(t) if now.duration_since(*t) < UNKNOWN_TTL => true,
            Some(_) => {
                map.remove(&stack);
                false
            }
            None => false,
        }
    }

    fn remember_unknown(&self, stack: StackSmallId) {
        let Ok(mut map) = self.unknown.lock() else {
            return;
        };
        let now = Instant::now();
        if map.len() >= MAX_REMEMBERED {
            map.retain(|_, t| now.duration_since(*t) < UNKNOWN_TTL);
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
        }
        map.insert(stack, now);
    }

    /// Syncs with the ledger unless a sync that started after `arrived` already ran (and no
    /// transaction is named).
    fn refresh_since(&self, refresh: &Refresh, arrived: Instant, tx_digest: Option<&str>) {
        let Ok(mut last) = self.last_refresh.lock() else {
            return;
        };
        if let Some(t) = *last {
            if t >= arrived && tx_digest.is_none() {
                return;
            }
            let next = t + REFRESH_GAP;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        *last = Some(Instant::now());
        refresh(tx_digest);
    }
}
