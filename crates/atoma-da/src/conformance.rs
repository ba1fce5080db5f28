//! The conformance suite every [`BlobStore`] must pass: round trips of empty, small and large
//! content (multi-part for stores that split at or below 64 KiB, e.g. a `WalrusClient` with a
//! small `part_size`), content that looks like a manifest, idempotent puts, and refusals: a wrong
//! content hash is `HashMismatch`, a wrong size an error, an unknown blob id `NotFound`.
//!
//! Use: `atoma_da::conformance::run_all(&store)`.

use crate::manifest::{Manifest, Part};
use crate::{BlobRef, BlobStore, DaError};

/// Deterministic pseudo-random bytes (SplitMix64), so that parts differ from one another.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs every check against `store`.
pub fn run_all(store: &dyn BlobStore) {
    round_trips(store);
    manifest_lookalikes_round_trip(store);
    puts_are_idempotent(store);
    wrong_hash_is_a_mismatch(store);
    wrong_size_is_an_error(store);
    unknown_blobs_are_not_found(store);
}

/// Content of many sizes comes back byte for byte with the committed hash and size.
pub fn round_trips(store: &dyn BlobStore) {
    for (i, len) in [0usize, 1, 17, 999, 1000, 1001, 2000, 4096, 10_007, 65_539]
        .into_iter()
        .enumerate()
    {
        let bytes = pattern(len, i as u64);
        let r = store
            .put(&bytes)
            .unwrap_or_else(|e| panic!("put {len} bytes: {e}"));
        assert_eq!(r.size, len as u64, "size of {len} bytes");
        assert_eq!(r.content_hash, atoma_crypto::blake2b256(&bytes));
        let back = store
            .get(&r)
            .unwrap_or_else(|e| panic!("get {len} bytes: {e}"));
        assert!(back == bytes, "{len} bytes came back different");
    }
}

/// Content that is itself a valid manifest is returned as is, not followed.
pub fn manifest_lookalikes_round_trip(store: &dyn BlobStore) {
    let inner = pattern(3000, 99);
    let fake = Manifest {
        total_size: inner.len() as u64,
        content_hash: atoma_crypto::blake2b256(&inner),
        parts: vec![Part {
            size: inner.len() as u64,
            hash: atoma_crypto::blake2b256(&inner),
            blob_id: "nonexistentpart".into(),
        }],
    }
    .encode()
    .unwrap();
    let r = store.put(&fake).unwrap();
    assert_eq!(store.get(&r).unwrap(), fake);
}

/// The same bytes give the same blob id.
pub fn puts_are_idempotent(store: &dyn BlobStore) {
    for len in [5usize, 5000] {
        let bytes = pattern(len, 7);
        let a = store.put(&bytes).unwrap();
        let b = store.put(&bytes).unwrap();
        assert_eq!(a, b, "putting {len} bytes twice");
        assert_ne!(a.blob_id, store.put(&pattern(len, 8)).unwrap().blob_id);
    }
}

/// A `BlobRef` whose hash is not that of the stored content is `HashMismatch`.
pub fn wrong_hash_is_a_mismatch(store: &dyn BlobStore) {
    for len in [10usize, 5000] {
        let mut r = store.put(&pattern(len, 11)).unwrap();
        r.content_hash[0] ^= 1;
        match store.get(&r) {
            Err(DaError::HashMismatch { blob_id, .. }) => assert!(!blob_id.is_empty()),
            other => panic!("wrong hash ({len} bytes): {other:?}"),
        }
    }
}

/// A `BlobRef` whose size is not that of the stored content is an error.
pub fn wrong_size_is_an_error(store: &dyn BlobStore) {
    for len in [10usize, 5000] {
        let r = store.put(&pattern(len, 13)).unwrap();
        for size in [r.size - 1, r.size + 1] {
            let bad = BlobRef { size, ..r.clone() };
            assert!(
                store.get(&bad).is_err(),
                "wrong size {size} for {len} bytes"
            );
        }
    }
}

/// A blob id never put is `NotFound`.
pub fn unknown_blobs_are_not_found(store: &dyn BlobStore) {
    let bytes = b"never stored in any conformance run";
    let r = BlobRef {
        blob_id: crate::content_blob_id(bytes),
        content_hash: atoma_crypto::blake2b256(bytes),
        size: bytes.len() as u64,
    };
    match store.get(&r) {
        Err(DaError::NotFound { blob_id }) => assert_eq!(blob_id, r.blob_id),
        other => panic!("unknown blob: {other:?}"),
    }
}
