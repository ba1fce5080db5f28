//! Following the ledger: read events after the state's durable cursor and apply them (tasks,
//! stacks sold to this node, claims), polling until told to stop.

use std::sync::Arc;
use std::time::Duration;

use atoma_ledger::Ledger;
use atoma_state::meter::Meter;

use crate::NodeError;

const PAGE: usize = 1000;

/// Applies every event the state has not seen yet, blocking. Returns how many were read.
pub fn sync_blocking(ledger: &dyn Ledger, state: &Meter) -> Result<usize, NodeError> {
    let mut total = 0;
    loop {
        let cursor = state.cursor()?;
        let events = ledger
            .events_after(cursor, PAGE)
            .map_err(|e| NodeError::Ledger(e.to_string()))?;
        if events.is_empty() {
            return Ok(total);
        }
        total += events.len();
        state.apply_ledger_events(&events)?;
    }
}

/// `sync_blocking` off the async threads.
pub async fn sync_once(ledger: Arc<dyn Ledger>, state: Meter) -> Result<usize, NodeError> {
    tokio::task::spawn_blocking(move || sync_blocking(ledger.as_ref(), &state))
        .await
        .map_err(|e| NodeError::Ledger(format!("follower task failed: {e}")))?
}

/// Polls the ledger every `every` until `stop` turns true. Errors are logged and retried.
pub async fn follow(
    ledger: Arc<dyn Ledger>,
    state: Meter,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match sync_once(ledger.clone(), state.clone()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "applied ledger events"),
            Err(e) => tracing::warn!(error = %e, "cannot follow the ledger; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
