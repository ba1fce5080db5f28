//! Data availability for settled stacks' request logs. A node puts a log (a byte blob, possibly
//! larger than 10 MiB) on a data-availability store and commits its [`BlobRef`] (blob id,
//! Blake2b-256 content hash, size) on the ledger; readers fetch it by blob id and every
//! [`BlobStore::get`] checks the content hash and size, so wrong bytes are an error, never data.
//!
//! This file owns the shared vocabulary: [`BlobRef`], the [`BlobStore`] trait, [`DaError`], blob
//! id validation and hex helpers. Stores: [`DirStore`] (a content-addressed directory, `dir`),
//! [`WalrusClient`] (the Walrus HTTP API with retries and multi-part blobs, `walrus`, manifest
//! format in `manifest`); `server` serves a `DirStore` over the Walrus HTTP API. Every store must
//! pass `conformance::run_all` (feature `test-support`).

pub mod dir;
pub mod manifest;
pub mod server;
pub mod walrus;

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;

pub use dir::DirStore;
pub use manifest::Manifest;
pub use walrus::{WalrusClient, WalrusConfig};

use serde::{Deserialize, Serialize};

/// Errors of data-availability stores.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaError {
    /// The store does not hold the blob.
    #[error("blob {blob_id} not found")]
    NotFound { blob_id: String },
    /// The bytes obtained for the blob do not have the committed content hash.
    #[error("blob {blob_id}: content hash mismatch (expected {expected}, got {got})")]
    HashMismatch {
        blob_id: String,
        expected: String,
        got: String,
    },
    /// The bytes obtained for the blob have the committed hash but not the committed size.
    #[error("blob {blob_id}: size mismatch (expected {expected} bytes, got {got})")]
    SizeMismatch {
        blob_id: String,
        expected: u64,
        got: u64,
    },
    /// Gave up after retrying connection errors, timeouts, 5xx or 429 answers.
    #[error("{url} unavailable after {attempts} attempts: {reason}")]
    Unavailable {
        url: String,
        attempts: u32,
        reason: String,
    },
    /// The server refused the request (a 4xx other than 404 on get and 429).
    #[error("request rejected with status {status}: {body}")]
    Rejected { status: u16, body: String },
    /// An answer or manifest that does not parse.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A blob id that is not 1..=128 characters of `[A-Za-z0-9_-]`.
    #[error("invalid blob id {blob_id:?}: expected 1 to 128 characters of A-Z a-z 0-9 _ -")]
    InvalidBlobId { blob_id: String },
    /// Local file-system errors.
    #[error("i/o: {0}")]
    Io(String),
}

/// Result alias of this crate.
pub type Result<T, E = DaError> = std::result::Result<T, E>;

/// What the ledger commits for a blob: where to fetch it and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// The store's id of the blob (for multi-part content, the manifest's id). Opaque.
    pub blob_id: String,
    /// Blake2b-256 of the whole content (64 hex digits in JSON).
    #[serde(with = "hex32")]
    pub content_hash: [u8; 32],
    /// Size of the whole content in bytes.
    pub size: u64,
}

impl BlobRef {
    /// The content hash as 64 lowercase hex digits.
    pub fn content_hash_hex(&self) -> String {
        hex(&self.content_hash)
    }
}

/// A data-availability store. Blocking: async callers use `spawn_blocking`.
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Stores `bytes`; the same bytes give the same blob id.
    fn put(&self, bytes: &[u8]) -> Result<BlobRef>;
    /// The content of `blob`, checked against its content hash and size.
    fn get(&self, blob: &BlobRef) -> Result<Vec<u8>>;
}

/// Longest accepted blob id.
pub const MAX_BLOB_ID_LEN: usize = 128;

/// Checks that `blob_id` is 1..=128 characters of `[A-Za-z0-9_-]`, so that it is safe as a file
/// name and as a URL path segment.
pub fn validate_blob_id(blob_id: &str) -> Result<()> {
    let ok = !blob_id.is_empty()
        && blob_id.len() <= MAX_BLOB_ID_LEN
        && blob_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DaError::InvalidBlobId {
            blob_id: blob_id.chars().take(MAX_BLOB_ID_LEN + 8).collect(),
        })
    }
}

/// The content-addressed blob id of `bytes` used by [`DirStore`] and the local server:
/// URL-safe base64 without padding of the Blake2b-256 (43 characters, shaped like Walrus ids).
pub fn content_blob_id(bytes: &[u8]) -> String {
    blob_id_of_hash(&atoma_crypto::blake2b256(bytes))
}

/// The blob id for a content hash (see [`content_blob_id`]).
pub fn blob_id_of_hash(hash: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Parses 64 hex digits (an optional `0x` prefix allowed) into 32 bytes.
pub fn parse_hash_hex(s: &str) -> Result<[u8; 32]> {
    let t = s.strip_prefix("0x").unwrap_or(s);
    let bad = || DaError::Malformed(format!("{s:?} is not 64 hex digits"));
    if t.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in t.as_bytes().chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

/// Checks `bytes` against `blob`'s content hash and size.
pub(crate) fn check_content(blob: &BlobRef, bytes: &[u8]) -> Result<()> {
    let got = atoma_crypto::blake2b256(bytes);
    if got != blob.content_hash {
        return Err(DaError::HashMismatch {
            blob_id: blob.blob_id.clone(),
            expected: hex(&blob.content_hash),
            got: hex(&got),
        });
    }
    if bytes.len() as u64 != blob.size {
        return Err(DaError::SizeMismatch {
            blob_id: blob.blob_id.clone(),
            expected: blob.size,
            got: bytes.len() as u64,
        });
    }
    Ok(())
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::parse_hash_hex(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_ids_that_could_escape_a_directory_are_refused() {
        for bad in [
            "", "../x", "..", ".", "a/b", "a\\b", "/etc", "a.b", "a b", "a%2F", "é",
        ] {
            assert!(
                matches!(validate_blob_id(bad), Err(DaError::InvalidBlobId { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_blob_id(&"a".repeat(129)).is_err());
        for good in ["a", "A-z_09", &"a".repeat(128)] {
            validate_blob_id(good).unwrap();
        }
        let id = content_blob_id(b"hello");
        assert_eq!(id.len(), 43);
        validate_blob_id(&id).unwrap();
    }

    #[test]
    fn blob_refs_serialize_the_hash_as_hex() {
        let r = BlobRef {
            blob_id: "x".into(),
            content_hash: [0xab; 32],
            size: 7,
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["content_hash"], "ab".repeat(32));
        assert_eq!(serde_json::from_value::<BlobRef>(j).unwrap(), r);
        assert!(parse_hash_hex("zz").is_err());
        assert_eq!(
            parse_hash_hex(&format!("0x{}", "01".repeat(32))).unwrap(),
            [1; 32]
        );
    }
}
