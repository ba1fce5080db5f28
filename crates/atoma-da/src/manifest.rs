//! The manifest of multi-part content: content larger than a store's part size is put as parts
//! (each its own blob) plus this manifest blob, whose id goes into the [`crate::BlobRef`].
//!
//! Encoding (byte-exact, little-endian, deterministic: one encoding per manifest):
//!
//! | field          | bytes | value                                  |
//! |----------------|-------|----------------------------------------|
//! | magic          | 16    | `b"ATOMADA-MANIFEST"`                  |
//! | version        | 2     | u16 LE = 1                             |
//! | total size     | 8     | u64 LE, size of the whole content      |
//! | content hash   | 32    | Blake2b-256 of the whole content       |
//! | part count     | 4     | u32 LE                                 |
//! | per part, in content order:                                     |
//! | part size      | 8     | u64 LE                                 |
//! | part hash      | 32    | Blake2b-256 of the part                |
//! | blob id length | 2     | u16 LE, 1..=65535                      |
//! | blob id        | n     | UTF-8 bytes of the part's blob id      |
//!
//! Nothing follows the last part. Decoding is strict: wrong magic or version, truncation,
//! trailing bytes, empty or non-UTF-8 ids, or part sizes not summing to the total are refused.

use crate::{DaError, Result};

/// First 16 bytes of every manifest.
pub const MAGIC: &[u8; 16] = b"ATOMADA-MANIFEST";
/// The only manifest version.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 16 + 2 + 8 + 32 + 4;
const PART_MIN_LEN: usize = 8 + 32 + 2 + 1;

/// One part of multi-part content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub size: u64,
    pub hash: [u8; 32],
    pub blob_id: String,
}

/// The parts of a piece of content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub total_size: u64,
    pub content_hash: [u8; 32],
    pub parts: Vec<Part>,
}

impl Manifest {
    /// The byte encoding (see the module doc).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let count = u32::try_from(self.parts.len())
            .map_err(|_| DaError::Malformed("too many parts for a manifest".into()))?;
        let mut out = Vec::with_capacity(
            HEADER_LEN
                + self
                    .parts
                    .iter()
                    .map(|p| PART_MIN_LEN + p.blob_id.len())
                    .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.total_size.to_le_bytes());
        out.extend_from_slice(&self.content_hash);
        out.extend_from_slice(&count.to_le_bytes());
        for p in &self.parts {
            let len = u16::try_from(p.blob_id.len())
                .ok()
                .filter(|&l| l > 0)
                .ok_or_else(|| {
                    DaError::Malformed(format!(
                        "part blob id of {} bytes cannot go in a manifest",
                        p.blob_id.len()
                    ))
                })?;
            out.extend_from_slice(&p.size.to_le_bytes());
            out.extend_from_slice(&p.hash);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(p.blob_id.as_bytes());
        }
        Ok(out)
    }

    /// Parses a manifest; anything but an exact encoding is `Malformed`.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        if r.take(16)? != MAGIC {
            return Err(bad("no manifest magic"));
        }
        let version = u16::from_le_bytes(r.array()?);
        if version != VERSION {
            return Err(DaError::Malformed(format!(
                "manifest version {version} (only {VERSION} is known)"
            )));
        }
        let total_size = u64::from_le_bytes(r.array()?);
        let content_hash: [u8; 32] = r.array()?;
        let count = u32::from_le_bytes(r.array()?) as usize;
        if count > r.0.len() / PART_MIN_LEN {
            return Err(bad("part count exceeds the manifest's length"));
        }
        let mut parts = Vec::with_capacity(count);
        let mut sum: u64 = 0;
        for _ in 0..count {
            let size = u64::from_le_bytes(r.array()?);
            let hash: [u8; 32] = r.array()?;
            let len = usize::from(u16::from_le_bytes(r.array()?));
            if len == 0 {
                return Err(bad("empty part blob id"));
            }
            let blob_id = std::str::from_utf8(r.take(len)?)
                .map_err(|_| bad("part blob id is not UTF-8"))?
                .to_owned();
            sum = sum
                .checked_add(size)
                .ok_or_else(|| bad("part sizes overflow"))?;
            parts.push(Part {
                size,
                hash,
                blob_id,
            });
        }
        if !r.0.is_empty() {
            return Err(bad("trailing bytes after the last part"));
        }
        if sum != total_size {
            return Err(DaError::Malformed(format!(
                "part sizes sum to {sum}, the manifest says {total_size}"
            )));
        }
        Ok(Self {
            total_size,
            content_hash,
            parts,
        })
    }
}

fn bad(what: &str) -> DaError {
    DaError::Malformed(format!("manifest: {what}"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            total_size: 15,
            content_hash: [7; 32],
            parts: vec![
                Part {
                    size: 10,
                    hash: [1; 32],
                    blob_id: "first-part_id".into(),
                },
                Part {
                    size: 5,
                    hash: [2; 32],
                    blob_id: "b".into(),
                },
            ],
        }
    }

    #[test]
    fn manifests_round_trip_byte_exactly() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(
            bytes.len(),
            HEADER_LEN + (8 + 32 + 2 + 13) + (8 + 32 + 2 + 1)
        );
        assert_eq!(&bytes[..16], b"ATOMADA-MANIFEST");
        assert_eq!(&bytes[16..18], &[1, 0]);
        assert_eq!(&bytes[18..26], &15u64.to_le_bytes());
        assert_eq!(&bytes[26..58], &[7; 32]);
        assert_eq!(&bytes[58..62], &2u32.to_le_bytes());
        assert_eq!(&bytes[62..70], &10u64.to_le_bytes());
        assert_eq!(&bytes[102..104], &13u16.to_le_bytes());
        assert_eq!(&bytes[104..117], b"first-part_id");
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.encode().unwrap(), bytes, "deterministic");
    }

    #[test]
    fn damaged_manifests_are_refused() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Manifest::decode(&long).is_err());
        let mut v2 = bytes.clone();
        v2[16] = 2;
        assert!(Manifest::decode(&v2).is_err());
        let mut wrong_total = bytes.clone();
        wrong_total[18] = 16;
        assert!(Manifest::decode(&wrong_total).is_err());
        let mut huge_count = bytes;
        huge_count[58..62].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&huge_count).is_err());
        assert!(
            Manifest {
                parts: vec![Part {
                    size: 0,
                    hash: [0; 32],
                    blob_id: String::new()
                }],
                total_size: 0,
                content_hash: [0; 32]
            }
            .encode()
            .is_err()
        );
    }
}
