//! The request log: what a node keeps of every served request, the blob a stack's log is
//! stored as on the data-availability store, and the commitment built from it.
//!
//! A `LogRecord` holds everything a verifier needs to check the answer without trusting the
//! node: the exact signed request body and the user's signature, the node's signed response
//! (the JSON, or every streamed chunk in order), prompt and output token ids, the seed used,
//! the sampling parameters after defaults, finish reason, usage, the model file's SHA-256 and
//! the engine's determinism class. Its Merkle leaf is derived from it, never stored beside it.
//!
//! Encoding (version 1, `docs/protocol.md`): little-endian integers; `bytes` is a u32 length
//! then the bytes; `str` is `bytes` holding UTF-8; `list<T>` is a u32 count then the items.
//! A request with `n` > 1 appends its other choices (`list<(list<u32>, str)>`, never empty).
//! Decoding is strict (no trailing bytes, lengths within the input, valid UTF-8, flags 0 or 1),
//! so one blob has exactly one meaning and re-encoding a decoded blob gives the same bytes.

use atoma_crypto::merkle::{self, Digest};
use atoma_crypto::{blake2b256, signed_json};

/// Magic bytes at the start of a stack log blob.
pub const LOG_MAGIC: &[u8; 8] = b"ATOMALOG";
/// The blob format version this code writes and reads.
pub const LOG_VERSION: u16 = 1;

/// The node's signed answer, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseRecord {
    /// A JSON body (with `response_hash` and `signature`).
    Json(String),
    /// Every SSE `data:` JSON chunk in order (each signed; `[DONE]` is not a chunk).
    Stream(Vec<String>),
}

/// Sampling parameters after defaults, as the engine ran them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRecord {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// One served request.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// The request body bytes exactly as received (what the user signed the hash of).
    pub request_body: Vec<u8>,
    /// The `X-Signature` header (base64 Sui signature).
    pub request_signature: String,
    pub response: ResponseRecord,
    pub prompt_tokens: Vec<u32>,
    pub output_tokens: Vec<u32>,
    /// The seed the sampler used (drawn by the node when the request gave none).
    pub seed: u64,
    pub sampling: SamplingRecord,
    /// `stop`, `length`, `cancelled`, …
    pub finish_reason: String,
    pub usage_prompt_tokens: u64,
    pub usage_completion_tokens: u64,
    pub model_sha256: [u8; 32],
    pub determinism_class: String,
    /// Choices 1.. of a request with `n` > 1 (choice 0 is `output_tokens` and
    /// `finish_reason`); choice `i` samples with seed `seed + i` (wrapping).
    pub extra_choices: Vec<ChoiceRecord>,
}

/// One more choice of a request with `n` > 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceRecord {
    pub output_tokens: Vec<u32>,
    pub finish_reason: String,
}

/// Why a log or record is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("malformed log: {0}")]
    Malformed(String),
    #[error("record {index}: {reason}")]
    BadRecord { index: usize, reason: String },
}

impl LogRecord {
    /// Blake2b-256 of the request body: the signed message.
    pub fn request_hash(&self) -> Digest {
        blake2b256(&self.request_body)
    }

    /// The response hash as the protocol defines it: a JSON body's `response_hash`; for a
    /// stream, Blake2b-256 over the concatenated hashes of its chunks, in order. Recomputed
    /// from the signed bodies (and checked against their claimed hashes and signatures).
    /// Returns the hash and the signer of every part (all must be the node; `None` for a
    /// stream cut off before its first chunk, whose hash is `H("")`).
    pub fn response_hash(&self) -> Result<(Digest, Option<[u8; 32]>), String> {
        let check = |text: &str| -> Result<signed_json::CheckedJson, String> {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("response is not JSON: {e}"))?;
            signed_json::check_json(&v)
        };
        match &self.response {
            ResponseRecord::Json(text) => {
                let c = check(text)?;
                Ok((c.hash, Some(c.signer)))
            }
            ResponseRecord::Stream(chunks) => {
                let mut signer = None;
                let mut cat = Vec::with_capacity(32 * chunks.len());
                for (i, text) in chunks.iter().enumerate() {
                    let c = check(text).map_err(|e| format!("chunk {i}: {e}"))?;
                    if *signer.get_or_insert(c.signer) != c.signer {
                        return Err(format!("chunk {i} is signed by another key"));
                    }
                    cat.extend_from_slice(&c.hash);
                }
                Ok((stream_hash(&cat), signer))
            }
        }
    }

    /// Checks the user's signature over the request; returns the signer's address.
    pub fn request_signer(&self) -> Result<[u8; 32], String> {
        atoma_crypto::verify(&self.request_signature, &self.request_hash())
            .map_err(|e| e.to_string())
    }

    /// Tokens generated over all choices (what `usage_completion_tokens` must be).
    pub fn generated_tokens(&self) -> u64 {
        let extra: usize = self
            .extra_choices
            .iter()
            .map(|c| c.output_tokens.len())
            .sum();
        (self.output_tokens.len() + extra) as u64
    }

    /// The Merkle leaf `Blake2b-256(request_hash ‖ response_hash)`.
    pub fn leaf(&self) -> Result<Digest, String> {
        Ok(merkle::leaf(&self.request_hash(), &self.response_hash()?.0))
    }

    /// The record's bytes (version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(self.request_body.len() + 1024));
        w.bytes(&self.request_body);
        w.str(&self.request_signature);
        match &self.response {
            ResponseRecord::Json(t) => {
                w.u8(0);
                w.str(t);
            }
            ResponseRecord::Stream(chunks) => {
                w.u8(1);
                w.u32(chunks.len() as u32);
                for c in chunks {
                    w.str(c);
                }
            }
        }
        w.tokens(&self.prompt_tokens);
        w.tokens(&self.output_tokens);
        w.u64(self.seed);
        let s = &self.sampling;
        for f in [s.temperature, s.top_p] {
            w.f32(f);
        }
        w.u32(s.top_k);
        for f in [
            s.min_p,
            s.repetition_penalty,
            s.presence_penalty,
            s.frequency_penalty,
        ] {
            w.f32(f);
        }
        w.u32(s.max_tokens);
        w.u32(s.stop.len() as u32);
        for st in &s.stop {
            w.str(st);
        }
        w.u8(u8::from(s.ignore_eos));
        w.str(&self.finish_reason);
        w.u64(self.usage_prompt_tokens);
        w.u64(self.usage_completion_tokens);
        w.0.extend_from_slice(&self.model_sha256);
        w.str(&self.determinism_class);
        // Present only for n > 1 (so records of one choice keep their bytes).
        if !self.extra_choices.is_empty() {
            w.u32(self.extra_choices.len() as u32);
            for c in &self.extra_choices {
                w.tokens(&c.output_tokens);
                w.str(&c.finish_reason);
            }
        }
        w.0
    }

    /// Parses a record (version 1), strictly.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let request_body = r.bytes()?.to_vec();
        let request_signature = r.str()?;
        let response = match r.u8()? {
            0 => ResponseRecord::Json(r.str()?),
            1 => {
                let n = r.count(4)?;
                ResponseRecord::Stream((0..n).map(|_| r.str()).collect::<Result<_, _>>()?)
            }
            k => return Err(format!("unknown response kind {k}")),
        };
        let prompt_tokens = r.tokens()?;
        let output_tokens = r.tokens()?;
        let seed = r.u64()?;
        let (temperature, top_p) = (r.f32()?, r.f32()?);
        let top_k = r.u32()?;
        let (min_p, repetition_penalty, presence_penalty, frequency_penalty) =
            (r.f32()?, r.f32()?, r.f32()?, r.f32()?);
        let max_tokens = r.u32()?;
        let n = r.count(4)?;
        let stop = (0..n).map(|_| r.str()).collect::<Result<_, _>>()?;
        let ignore_eos = r.flag()?;
        let finish_reason = r.str()?;
        let usage_prompt_tokens = r.u64()?;
        let usage_completion_tokens = r.u64()?;
        let model_sha256 = r.array()?;
        let determinism_class = r.str()?;
        let mut extra_choices = Vec::new();
        if !r.0.is_empty() {
            let n = r.count(8)?;
            if n == 0 {
                return Err("an empty list of extra choices (it is omitted instead)".into());
            }
            for _ in 0..n {
                extra_choices.push(ChoiceRecord {
                    output_tokens: r.tokens()?,
                    finish_reason: r.str()?,
                });
            }
        }
        if !r.0.is_empty() {
            return Err(format!("{} trailing bytes", r.0.len()));
        }
        Ok(Self {
            request_body,
            request_signature,
            response,
            prompt_tokens,
            output_tokens,
            seed,
            sampling: SamplingRecord {
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                max_tokens,
                stop,
                ignore_eos,
            },
            finish_reason,
            usage_prompt_tokens,
            usage_completion_tokens,
            model_sha256,
            determinism_class,
            extra_choices,
        })
    }
}

/// The response hash of a stream from its chunks' concatenated hashes.
pub fn stream_hash(concatenated_chunk_hashes: &[u8]) -> Digest {
    blake2b256(concatenated_chunk_hashes)
}

/// A stack's log: the blob a node stores on the DA store when it settles the stack.
#[derive(Debug, Clone, PartialEq)]
pub struct StackLog {
    pub stack_small_id: u64,
    pub node_small_id: u64,
    pub records: Vec<LogRecord>,
}

impl StackLog {
    /// The blob (version 1): magic, version, stack, node, record count, then each record as
    /// `bytes`.
    pub fn encode(&self) -> Vec<u8> {
        let encoded: Vec<Vec<u8>> = self.records.iter().map(LogRecord::encode).collect();
        Self::assemble(self.stack_small_id, self.node_small_id, &encoded)
    }

    /// A blob from records already encoded (as the node stores them).
    pub fn assemble(stack: u64, node: u64, encoded_records: &[Vec<u8>]) -> Vec<u8> {
        let size: usize = encoded_records.iter().map(|r| r.len() + 4).sum();
        let mut w = Writer(Vec::with_capacity(30 + size));
        w.0.extend_from_slice(LOG_MAGIC);
        w.u16(LOG_VERSION);
        w.u64(stack);
        w.u64(node);
        w.u32(encoded_records.len() as u32);
        for r in encoded_records {
            w.bytes(r);
        }
        w.0
    }

    /// Parses a blob, strictly.
    pub fn decode(blob: &[u8]) -> Result<Self, LogError> {
        let bad = LogError::Malformed;
        let mut r = Reader(blob);
        if r.take(8).map_err(bad)? != LOG_MAGIC {
            return Err(bad("not an Atoma stack log (bad magic)".into()));
        }
        let version = r.u16().map_err(bad)?;
        if version != LOG_VERSION {
            return Err(bad(format!("log version {version} is not supported")));
        }
        let stack_small_id = r.u64().map_err(bad)?;
        let node_small_id = r.u64().map_err(bad)?;
        let n = r.count(4).map_err(bad)?;
        let mut records = Vec::with_capacity(n);
        for index in 0..n {
            let bytes = r.bytes().map_err(bad)?;
            records.push(
                LogRecord::decode(bytes).map_err(|reason| LogError::BadRecord { index, reason })?,
            );
        }
        if !r.0.is_empty() {
            return Err(bad(format!("{} trailing bytes", r.0.len())));
        }
        Ok(Self {
            stack_small_id,
            node_small_id,
            records,
        })
    }

    /// The records' leaves, in order.
    pub fn leaves(&self) -> Result<Vec<Digest>, LogError> {
        self.records
            .iter()
            .enumerate()
            .map(|(index, rec)| {
                rec.leaf()
                    .map_err(|reason| LogError::BadRecord { index, reason })
            })
            .collect()
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn tokens(&mut self, t: &[u32]) {
        self.u32(t.len() as u32);
        for v in t {
            self.u32(*v);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: {n} bytes needed, {} left",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, String> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("flag {v} is not 0 or 1")),
        }
    }
    /// A count of items of at least `min_item` bytes each, bounded by what is left.
    fn count(&mut self, min_item: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(format!("count {n} exceeds the input"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn tokens(&mut self) -> Result<Vec<u32>, String> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
}
