//! Signed JSON bodies, as the reference node signs its responses: `response_hash` =
//! base64(Blake2b-256 of the compact JSON without the two fields) and `signature` = the node's
//! Sui signature over that hash, both added to the object. Keys are serialized sorted
//! (serde_json's map), so re-serializing a parsed body gives back the hashed bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::{Keypair, blake2b256};

/// Adds `response_hash` and `signature` to `body`; returns it and the raw hash.
pub fn sign_json(keys: &Keypair, mut body: Value) -> (Value, [u8; 32]) {
    let hash = blake2b256(body.to_string().as_bytes());
    if let Value::Object(map) = &mut body {
        map.insert("response_hash".into(), Value::String(B64.encode(hash)));
        map.insert("signature".into(), Value::String(keys.sign(&hash)));
    }
    (body, hash)
}

/// A signed body that checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedJson {
    /// Blake2b-256 of the body without the two fields.
    pub hash: [u8; 32],
    /// The signer's Sui address.
    pub signer: [u8; 32],
}

/// Recomputes the hash of a signed body without the two fields, compares it with the claimed
/// `response_hash`, and verifies the signature over it.
pub fn check_json(body: &Value) -> Result<CheckedJson, String> {
    let mut v = body.clone();
    let map = v.as_object_mut().ok_or("not a JSON object")?;
    let sig = map
        .remove("signature")
        .and_then(|s| s.as_str().map(str::to_string))
        .ok_or("no signature")?;
    let claimed = map
        .remove("response_hash")
        .and_then(|s| s.as_str().map(str::to_string))
        .ok_or("no response_hash")?;
    let hash = blake2b256(v.to_string().as_bytes());
    if B64.encode(hash) != claimed {
        return Err("response_hash does not match the body".into());
    }
    let signer = crate::verify(&sig, &hash).map_err(|e| e.to_string())?;
    Ok(CheckedJson { hash, signer })
}

/// `check_json`, returning the signer's address.
pub fn verify_json(body: &Value) -> Result<[u8; 32], String> {
    check_json(body).map(|c| c.signer)
}
