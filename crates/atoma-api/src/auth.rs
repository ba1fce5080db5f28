//! Request authentication, as in the reference protocol: `X-Signature` is a Sui serialized
//! signature (base64 of flag ‖ signature ‖ public key) over the 32-byte Blake2b-256 of the
//! request body, and `X-Stack-Small-Id` names the stack to charge. We hash the body bytes exactly
//! as received (a client that signs the compact JSON it sends, as the reference clients do,
//! interoperates).
//!
//! Replay: the body hash is recorded in the stack's request log in the same transaction that
//! reserves compute units, so a captured request replayed by anyone spends nothing. An owner who
//! wants to send an identical prompt twice adds a fresh top-level `"nonce"` field (any JSON
//! value; ignored by inference), which `atoma chat` and `atoma sign` do.

use axum::http::HeaderMap;

use atoma_crypto::blake2b256;
use atoma_ledger::{Address, StackSmallId};

use crate::error::ApiError;

/// Header names of the protocol.
pub const SIGNATURE: &str = "x-signature";
pub const STACK_SMALL_ID: &str = "x-stack-small-id";
pub const REQUEST_ID: &str = "x-request-id";

/// A request whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The signer's Sui address.
    pub signer: Address,
    pub stack: StackSmallId,
    /// Blake2b-256 of the body: the signed message and the request-log key.
    pub request_hash: [u8; 32],
    /// The `X-Signature` header as sent (kept in the request log).
    pub signature: String,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    h.get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::Unauthorized(format!("header {name} is not ASCII")))
        })
        .transpose()
}

/// Checks the signature and parses the stack header.
pub fn authenticate(headers: &HeaderMap, body: &[u8]) -> Result<Signed, ApiError> {
    let sig = header(headers, SIGNATURE)?.ok_or_else(|| {
        ApiError::Unauthorized(
            "missing X-Signature header: sign the Blake2b-256 of the body with the key that owns \
             the stack (see `atoma sign`)"
                .into(),
        )
    })?;
    let stack = header(headers, STACK_SMALL_ID)?
        .ok_or_else(|| ApiError::Unauthorized("missing X-Stack-Small-Id header".into()))?;
    let stack = stack.trim().parse::<u64>().map_err(|_| {
        ApiError::Unauthorized(format!("X-Stack-Small-Id `{stack}` is not a stack number"))
    })?;
    let request_hash = blake2b256(body);
    let signer = atoma_crypto::verify(sig, &request_hash)
        .map_err(|e| ApiError::Unauthorized(format!("bad X-Signature: {e}")))?;
    Ok(Signed {
        signer: Address(signer),
        stack: StackSmallId(stack),
        request_hash,
        signature: sig.to_string(),
    })
}
