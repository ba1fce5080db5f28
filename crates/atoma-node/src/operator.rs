//! The operator's view of a node: its stacks and where their settlement stands, pending
//! settlements and attestations, earnings, collateral and reputation. One report, served as
//! JSON at `GET /operator/status` to loopback clients only, and printed by `atoma node status`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use atoma_ledger::Ledger;
use atoma_state::meter::Meter;
use atoma_state::settlement::SettleState;

/// The status report (blocking: reads the state file and the ledger).
pub fn status_report(ledger: &dyn Ledger, state: &Meter) -> Result<Value, String> {
    let epoch = ledger.epoch().map_err(|e| e.to_string())?;
    let nodes: Vec<Value> = state
        .node_ids()
        .iter()
        .map(|id| match ledger.node(*id) {
            Ok(n) => json!({"small_id": id.0, "collateral": n.collateral.0,
                            "reputation_score": n.reputation_score, "record": n.record}),
            Err(e) => json!({"small_id": id.0, "error": e.to_string()}),
        })
        .collect();
    let stacks = state.settlements(true).map_err(|e| e.to_string())?;
    let pending = stacks
        .iter()
        .filter(|s| {
            !matches!(
                s.state,
                SettleState::Open | SettleState::Claimed | SettleState::Closed
            )
        })
        .count();
    let stacks: Vec<Value> = stacks
        .iter()
        .map(|s| {
            json!({
                "stack": s.stack.0, "node": s.selected_node_id.0, "task": s.task_small_id,
                "state": s.state.as_str(), "units_used": s.units_used,
                "num_compute_units": s.num_compute_units, "in_flight": s.in_flight,
                "requests": s.settled_requests, "claimed_units": s.claimed_units,
                "blob_id": s.commitment.as_ref().map(|c| c.blob_id.clone()),
                "merkle_root": s.commitment.as_ref().map(|c| c.merkle_root.to_string()),
                "claimable_from_epoch": s.window_end, "node_fee": s.node_fee,
            })
        })
        .collect();
    let attestations: Vec<Value> = state
        .attestation_jobs(true)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|j| {
            json!({"stack": j.stack.0, "node": j.node.0, "seller": j.selected_node_id.0,
                   "state": j.state, "detail": j.detail, "window_end": j.window_end})
        })
        .collect();
    let earnings = state.earnings().map_err(|e| e.to_string())?;
    let total = |role: &str| -> u64 { earnings.iter().filter(|e| e.2 == role).map(|e| e.3).sum() };
    Ok(json!({
        "epoch": epoch,
        "nodes": nodes,
        "pending_settlements": pending,
        "stacks": stacks,
        "attestations": attestations,
        "earnings": {"seller": total("seller"), "attestor": total("attestor")},
    }))
}

#[derive(Clone)]
pub(crate) struct OperatorState {
    pub ledger: Arc<dyn Ledger>,
    pub state: Meter,
}

/// `GET /operator/status`: the report, to loopback clients only.
pub(crate) async fn status(
    State(s): State<OperatorState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            Json(
                json!({"error": {"message": "the operator view answers loopback clients only",
                                  "type": "permission_error", "code": "FORBIDDEN"}}),
            ),
        )
            .into_response();
    }
    match tokio::task::spawn_blocking(move || status_report(s.ledger.as_ref(), &s.state)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": e, "type": "internal_error", "code": "INTERNAL_ERROR"}})),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
