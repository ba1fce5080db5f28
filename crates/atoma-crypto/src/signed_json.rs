//! Signed JSON bodies, as the reference node signs its responses: `response_hash` =
//! base64(Blake2b-256 of the compact JSON without the two fields) and `signature` = the node's
//! Sui signature over that hash, both added to the object. The hashed form is `canonical`:
//! compact, object keys sorted by their UTF-8 bytes (what Python's `json.dumps(sort_keys=True,
//! separators=(",", ":"), ensure_ascii=False)` writes), so re-serializing a parsed body gives
//! back the hashed bytes in any language. It sorts by itself rather than rely on serde_json's
//! map order, which a dependency enabling serde_json's `preserve_order` feature (llguidance
//! does) silently turns into insertion order for the whole build.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::{Keypair, blake2b256};

/// The canonical text of `v`: compact, every object's keys sorted.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Adds `response_hash` and `signature` to `body`; returns it and the raw hash.
pub fn sign_json(keys: &Keypair, mut body: Value) -> (Value, [u8; 32]) {
    let hash = blake2b256(canonical(&body).as_bytes());
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
    let hash = blake2b256(canonical(&v).as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_at_every_depth_whatever_the_insertion_order() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), Value::from(1));
        inner.insert("a".into(), Value::from("é\u{1}"));
        let mut outer = serde_json::Map::new();
        outer.insert("list".into(), Value::Array(vec![Value::Object(inner)]));
        outer.insert("b".into(), Value::Null);
        outer.insert("A".into(), Value::from(-0.5));
        assert_eq!(
            canonical(&Value::Object(outer)),
            r#"{"A":-0.5,"b":null,"list":[{"a":"é\u0001","z":1}]}"#
        );
    }
}
