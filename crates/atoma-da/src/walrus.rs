//! [`WalrusClient`]: a blocking client of the Walrus HTTP API (publisher `PUT /v1/blobs`,
//! aggregator `GET /v1/blobs/<id>`), usable against Mysten's services or our own server.
//!
//! - Retries with exponential backoff (initial `backoff`, doubling, capped at 5 s) on connection
//!   errors, timeouts, 5xx and 429 (a `Retry-After` in seconds is honoured, capped at 30 s);
//!   never on other 4xx. 404 on get is [`DaError::NotFound`] at once. After `1 + retries`
//!   attempts: [`DaError::Unavailable`] naming the URL, the attempts and the last reason.
//! - Content larger than `part_size` (default 10 MiB, the public services' limit) is put as
//!   parts of `part_size` bytes, each its own blob, then a manifest blob; the [`BlobRef`] holds
//!   the manifest's blob id with the Blake2b-256 and size of the whole content.
//! - Manifest format (byte-exact, little-endian; implemented in [`crate::manifest`]):
//!   magic `b"ATOMADA-MANIFEST"` (16 bytes), version u16 = 1, total size u64, content hash
//!   (32 bytes), part count u32, then per part: part size u64, part Blake2b-256 (32 bytes), blob
//!   id length u16, blob id UTF-8 bytes. Nothing follows; the encoding is deterministic, so the
//!   same content always gives the same manifest id.
//! - get: the blob is fetched; if it hashes to the `content_hash` it is the content (a small
//!   blob, or content that merely looks like a manifest). Otherwise it must parse as a manifest
//!   with the `BlobRef`'s total size and content hash; every part is fetched and checked (size
//!   and hash), and the concatenation is checked again. Anything else is
//!   [`DaError::HashMismatch`]: a lying server is always caught.

use std::io::Read as _;
use std::time::Duration;

use crate::manifest::{Manifest, Part};
use crate::{BlobRef, BlobStore, DaError, Result, check_content, hex};

/// Longest wait between attempts computed from `backoff`.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The most bytes read for a blob that may be a manifest when the content is smaller.
const MANIFEST_READ_LIMIT: u64 = 16 * 1024 * 1024;
/// Error bodies quoted in [`DaError::Rejected`] are cut to this many characters.
const ERROR_BODY_LIMIT: usize = 512;

/// Where and how to reach Walrus.
#[derive(Debug, Clone)]
pub struct WalrusConfig {
    /// Base URL of the publisher (puts), e.g. `https://publisher.walrus-testnet.walrus.space`.
    pub publisher: String,
    /// Base URL of the aggregator (gets).
    pub aggregator: String,
    /// Storage epochs asked for on put.
    pub epochs: u32,
    /// Timeout of one HTTP request, body included.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Wait before the first retry; doubles after each, capped at 5 s.
    pub backoff: Duration,
    /// Largest blob put as one; larger content is split into parts of this size.
    pub part_size: usize,
}

impl Default for WalrusConfig {
    fn default() -> Self {
        Self {
            publisher: "http://127.0.0.1:4000".into(),
            aggregator: "http://127.0.0.1:4000".into(),
            epochs: 1,
            timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(200),
            part_size: 10 * 1024 * 1024,
        }
    }
}

impl WalrusConfig {
    /// Defaults with one base URL as both publisher and aggregator.
    pub fn with_url(url: impl Into<String>) -> Self {
        let url = url.into();
        Self {
            publisher: url.clone(),
            aggregator: url,
            ..Self::default()
        }
    }
}

/// A [`BlobStore`] over the Walrus HTTP API.
#[derive(Debug, Clone)]
pub struct WalrusClient {
    cfg: WalrusConfig,
    agent: ureq::Agent,
}

/// How one attempt ended, for the retry loop.
enum Failure {
    /// Worth another attempt; `Some` wait if the server said how long.
    Retry(String, Option<Duration>),
    /// Final.
    Fatal(DaError),
}

impl WalrusClient {
    /// A client for `cfg` (trailing slashes of the URLs are ignored; a zero part size counts
    /// as 1).
    pub fn new(mut cfg: WalrusConfig) -> Self {
        cfg.publisher = cfg.publisher.trim_end_matches('/').to_owned();
        cfg.aggregator = cfg.aggregator.trim_end_matches('/').to_owned();
        cfg.part_size = cfg.part_size.max(1);
        let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
        Self { cfg, agent }
    }

    /// The configuration in use.
    pub fn config(&self) -> &WalrusConfig {
        &self.cfg
    }

    /// Runs `attempt` up to `1 + retries` times with backoff.
    fn with_retries<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T> {
        let attempts = self.cfg.retries.saturating_add(1);
        let mut wait = self.cfg.backoff;
        let mut last = String::new();
        for n in 1..=attempts {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason, retry_after)) => {
                    tracing::debug!(%url, attempt = n, %reason, "DA request failed");
                    last = reason;
                    if n < attempts {
                        let pause = retry_after.map_or(wait, |d| d.min(MAX_RETRY_AFTER));
                        std::thread::sleep(pause);
                        wait = (wait * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        tracing::debug!(%url, attempts, reason = %last, "DA store unavailable");
        Err(DaError::Unavailable {
            url: url.to_owned(),
            attempts,
            reason: last,
        })
    }

    /// Puts one blob (no splitting) and returns its id.
    fn put_one(&self, bytes: &[u8]) -> Result<String> {
        let url = format!("{}/v1/blobs?epochs={}", self.cfg.publisher, self.cfg.epochs);
        let answer = self.with_retries(&url, || {
            let resp = self
                .agent
                .put(&url)
                .set("Content-Type", "application/octet-stream")
                .send_bytes(bytes)
                .map_err(|e| classify(e, None))?;
            resp.into_string()
                .map_err(|e| Failure::Retry(format!("reading the answer: {e}"), None))
        })?;
        let blob_id = blob_id_of_answer(&answer)?;
        crate::validate_blob_id(&blob_id).map_err(|_| {
            DaError::Malformed(format!(
                "the publisher answered an unusable blob id {blob_id:?}"
            ))
        })?;
        tracing::debug!(%blob_id, size = bytes.len(), "blob put");
        Ok(blob_id)
    }

    /// Fetches one blob's bytes, unchecked, reading at most `limit` bytes.
    fn get_one(&self, blob_id: &str, limit: u64) -> Result<Vec<u8>> {
        crate::validate_blob_id(blob_id)?;
        let url = format!("{}/v1/blobs/{blob_id}", self.cfg.aggregator);
        let bytes = self.with_retries(&url, || {
            let resp = self
                .agent
                .get(&url)
                .call()
                .map_err(|e| classify(e, Some(blob_id)))?;
            let mut buf = Vec::new();
            resp.into_reader()
                .take(limit.saturating_add(1))
                .read_to_end(&mut buf)
                .map_err(|e| Failure::Retry(format!("reading the blob: {e}"), None))?;
            Ok(buf)
        })?;
        if bytes.len() as u64 > limit {
            return Err(DaError::Malformed(format!(
                "blob {blob_id}: the aggregator sent more than the expected {limit} bytes"
            )));
        }
        Ok(bytes)
    }

    fn get_parts(&self, blob: &BlobRef, manifest: &Manifest) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(blob.size).unwrap_or(0));
        for part in &manifest.parts {
            let bytes = self.get_one(&part.blob_id, part.size)?;
            check_content(
                &BlobRef {
                    blob_id: part.blob_id.clone(),
                    content_hash: part.hash,
                    size: part.size,
                },
                &bytes,
            )?;
            out.extend_from_slice(&bytes);
        }
        check_content(blob, &out)?;
        Ok(out)
    }
}

impl BlobStore for WalrusClient {
    fn put(&self, bytes: &[u8]) -> Result<BlobRef> {
        let content_hash = atoma_crypto::blake2b256(bytes);
        let size = bytes.len() as u64;
        if bytes.len() <= self.cfg.part_size {
            return Ok(BlobRef {
                blob_id: self.put_one(bytes)?,
                content_hash,
                size,
            });
        }
        let mut parts = Vec::with_capacity(bytes.len().div_ceil(self.cfg.part_size));
        for chunk in bytes.chunks(self.cfg.part_size) {
            parts.push(Part {
                size: chunk.len() as u64,
                hash: atoma_crypto::blake2b256(chunk),
                blob_id: self.put_one(chunk)?,
            });
        }
        let manifest = Manifest {
            total_size: size,
            content_hash,
            parts,
        }
        .encode()?;
        let blob_id = self.put_one(&manifest)?;
        tracing::debug!(%blob_id, size, parts = bytes.len().div_ceil(self.cfg.part_size), "multi-part blob put");
        Ok(BlobRef {
            blob_id,
            content_hash,
            size,
        })
    }

    fn get(&self, blob: &BlobRef) -> Result<Vec<u8>> {
        let bytes = self.get_one(&blob.blob_id, blob.size.max(MANIFEST_READ_LIMIT))?;
        let got = atoma_crypto::blake2b256(&bytes);
        if got == blob.content_hash {
            check_content(blob, &bytes)?;
            return Ok(bytes);
        }
        if let Ok(m) = Manifest::decode(&bytes)
            && m.total_size == blob.size
            && m.content_hash == blob.content_hash
        {
            return self.get_parts(blob, &m);
        }
        Err(DaError::HashMismatch {
            blob_id: blob.blob_id.clone(),
            expected: hex(&blob.content_hash),
            got: hex(&got),
        })
    }
}

/// Sorts a ureq error into retry or final. `get_id` is the blob id of a get (404 → NotFound).
fn classify(e: ureq::Error, get_id: Option<&str>) -> Failure {
    match e {
        ureq::Error::Status(status, resp) => {
            let retry_after = resp
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body: String = resp
                .into_string()
                .unwrap_or_default()
                .chars()
                .take(ERROR_BODY_LIMIT)
                .collect();
            match (status, get_id) {
                (404, Some(id)) => Failure::Fatal(DaError::NotFound {
                    blob_id: id.to_owned(),
                }),
                (429, _) | (500..=599, _) => {
                    Failure::Retry(format!("status {status}: {body}"), retry_after)
                }
                _ => Failure::Fatal(DaError::Rejected { status, body }),
            }
        }
        ureq::Error::Transport(t) => Failure::Retry(transport_reason(&t), None),
    }
}

/// A transport error without the URL (the caller names it once).
fn transport_reason(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s.push_str(": ");
        s.push_str(m);
    }
    if let Some(src) = std::error::Error::source(t) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s
}

/// The blob id in a publisher's answer: `newlyCreated.blobObject.blobId` or
/// `alreadyCertified.blobId`.
fn blob_id_of_answer(answer: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(answer).map_err(|e| {
        DaError::Malformed(format!(
            "the publisher's answer is not JSON ({e}): {}",
            cut(answer)
        ))
    })?;
    let id = v
        .pointer("/newlyCreated/blobObject/blobId")
        .or_else(|| v.pointer("/alreadyCertified/blobId"))
        .and_then(serde_json::Value::as_str);
    match id {
        Some(id) => Ok(id.to_owned()),
        None => Err(DaError::Malformed(format!(
            "the publisher's answer has neither newlyCreated.blobObject.blobId nor \
             alreadyCertified.blobId: {}",
            cut(answer)
        ))),
    }
}

fn cut(s: &str) -> String {
    s.chars().take(ERROR_BODY_LIMIT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_answers_are_read_in_both_shapes() {
        let new = r#"{"newlyCreated":{"blobObject":{"blobId":"abc","size":3}}}"#;
        assert_eq!(blob_id_of_answer(new).unwrap(), "abc");
        let old = r#"{"alreadyCertified":{"blobId":"def","endEpoch":3}}"#;
        assert_eq!(blob_id_of_answer(old).unwrap(), "def");
        for bad in [
            "",
            "{}",
            "[1]",
            r#"{"newlyCreated":{"blobObject":{"blobId":7}}}"#,
        ] {
            assert!(
                matches!(blob_id_of_answer(bad), Err(DaError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
