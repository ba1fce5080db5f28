//! A local data-availability server speaking the Walrus HTTP API over a [`DirStore`], so that
//! nodes and tests use one client ([`crate::WalrusClient`]) against local and production stores.
//!
//! - `PUT /v1/blobs[?epochs=N&deletable=…&send_object_to=…]`, body = the blob: 200 with
//!   Walrus's `newlyCreated` answer the first time, `alreadyCertified` after that (only `epochs`
//!   is used, echoed as the end epoch). Bodies over the limit: 413 with a JSON error.
//! - `GET /v1/blobs/{blob_id}`: 200 `application/octet-stream`, 404 (JSON error) if absent,
//!   400 for an invalid id.
//! - `GET /health`: 200 (not Walrus; for readiness checks).
//!
//! Errors are JSON in Walrus's shape: `{"error": {"status": "NOT_FOUND", "code": 404,
//! "message": "…"}}`. Object ids, storage ids and transaction digests are derived from the blob
//! id (there is no chain here); epochs start at 0.

use std::future::Future;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde_json::json;

use crate::{DaError, DirStore, hex};

/// Default request body limit of `PUT /v1/blobs`.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// A body over the limit is still read (and dropped) up to this many bytes, so that a client
/// that sends the whole body before reading the answer gets the 413 instead of a broken pipe.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
struct AppState {
    store: DirStore,
    body_limit: usize,
}

/// The router over `store`, refusing bodies over `body_limit` bytes with 413.
pub fn router(store: DirStore, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/blobs", put(put_blob))
        .route("/v1/blobs/{blob_id}", get(get_blob))
        .route("/health", get(health))
        .with_state(AppState { store, body_limit })
}

/// Serves `store` on `listener` with the default body limit until `shutdown` completes;
/// requests in flight finish (graceful shutdown).
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: DirStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limit(listener, store, DEFAULT_BODY_LIMIT, shutdown).await
}

/// [`serve`] with a body limit of `body_limit` bytes for `PUT /v1/blobs`.
pub async fn serve_with_limit(
    listener: tokio::net::TcpListener,
    store: DirStore,
    body_limit: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(store, body_limit))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
struct PutParams {
    epochs: Option<u32>,
    // Accepted for compatibility; a local store neither deletes nor transfers objects.
    #[allow(dead_code)]
    deletable: Option<String>,
    #[allow(dead_code)]
    send_object_to: Option<String>,
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    let status = match code {
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
        StatusCode::PAYLOAD_TOO_LARGE => "OUT_OF_RANGE",
        _ => "INTERNAL",
    };
    let body =
        json!({"error": {"status": status, "code": code.as_u16(), "message": message.into()}});
    (code, axum::Json(body)).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "DA server error");
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn health() -> &'static str {
    "ok"
}

async fn put_blob(
    State(app): State<AppState>,
    params: Result<Query<PutParams>, QueryRejection>,
    body: Body,
) -> Response {
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let body = match read_limited(body, app.body_limit).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let store = app.store;
    let epochs = params.epochs.unwrap_or(1);
    let size = body.len() as u64;
    let (blob_id, newly) = match tokio::task::spawn_blocking(move || store.write_raw(&body)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    tracing::debug!(%blob_id, size, newly, "PUT /v1/blobs");
    let answer = if newly {
        json!({"newlyCreated": {
            "blobObject": {
                "id": derived_object_id("blob-object", &blob_id),
                "registeredEpoch": 0,
                "blobId": blob_id,
                "size": size,
                "encodingType": "RS2",
                "certifiedEpoch": 0,
                "storage": {
                    "id": derived_object_id("storage", &blob_id),
                    "startEpoch": 0,
                    "endEpoch": epochs,
                    "storageSize": size,
                },
                "deletable": false,
            },
            "resourceOperation": {"registerFromScratch": {
                "encodedLength": size,
                "epochsAhead": epochs,
            }},
            "cost": 0,
        }})
    } else {
        json!({"alreadyCertified": {
            "blobId": blob_id,
            "event": {"txDigest": base58(&atoma_crypto::blake2b256(
                format!("tx:{blob_id}").as_bytes())), "eventSeq": "0"},
            "endEpoch": epochs,
        }})
    };
    axum::Json(answer).into_response()
}

/// The body if it has at most `limit` bytes, else a 413 answer (after draining the body up to
/// [`DRAIN_LIMIT`]).
async fn read_limited(mut body: Body, limit: usize) -> Result<Vec<u8>, Response> {
    let mut buf = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total <= limit as u64 {
            buf.extend_from_slice(&data);
        } else {
            buf = Vec::new();
            if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > limit as u64 {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the blob is larger than this server's limit of {limit} bytes"),
        ));
    }
    Ok(buf)
}

async fn get_blob(State(app): State<AppState>, Path(blob_id): Path<String>) -> Response {
    let store = app.store;
    if let Err(e) = crate::validate_blob_id(&blob_id) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let id = blob_id.clone();
    match tokio::task::spawn_blocking(move || store.read_raw(&id)).await {
        Ok(Ok(Some(bytes))) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            DaError::NotFound { blob_id }.to_string(),
        ),
        Ok(Err(e @ DaError::InvalidBlobId { .. })) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// A Sui-style object id (`0x` + 64 hex) derived from the blob id.
fn derived_object_id(kind: &str, blob_id: &str) -> String {
    format!(
        "0x{}",
        hex(&atoma_crypto::blake2b256(
            format!("{kind}:{blob_id}").as_bytes()
        ))
    )
}

/// Base58 (Bitcoin alphabet), the encoding of Sui transaction digests.
fn base58(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut digits: Vec<u8> = Vec::new(); // base-58 digits, least significant first
    for &b in bytes {
        let mut carry = u32::from(b);
        for d in &mut digits {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    std::iter::repeat_n('1', zeros)
        .chain(
            digits
                .iter()
                .rev()
                .map(|&d| ALPHABET[usize::from(d)] as char),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base58_matches_known_vectors() {
        assert_eq!(base58(b""), "");
        assert_eq!(base58(&[0, 0, 1]), "112");
        assert_eq!(base58(b"hello world"), "StV1DL6CwTryKyV");
    }
}
