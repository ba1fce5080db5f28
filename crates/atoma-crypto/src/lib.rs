//! Sui-compatible cryptography for requests and responses.
//!
//! - Keys: ed25519 (Sui flag 0x00). A Sui address is Blake2b-256(flag ‖ public key).
//! - Signatures in Sui's serialized form: flag ‖ 64-byte signature ‖ 32-byte public key, base64.
//! - Keystore files in Sui's format: a JSON array of base64(flag ‖ 32-byte private key).
//! - Hashes: Blake2b-256, as the reference protocol uses for request bodies (`X-Signature` signs
//!   the 32-byte hash itself, no intent wrapper) and responses (`response_hash`).

pub mod merkle;
pub mod signed_json;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use blake2::{Blake2b, Digest, digest::consts::U32};
use ed25519_dalek::{Signer, Verifier};

/// Sui's signature-scheme flag for ed25519.
pub const ED25519_FLAG: u8 = 0x00;
const SIG_LEN: usize = 1 + 64 + 32;

/// Errors of key handling and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("signature is not valid base64")]
    NotBase64,
    #[error(
        "signature has {0} bytes; a Sui ed25519 signature has 97 (flag, signature, public key)"
    )]
    BadLength(usize),
    #[error("signature scheme flag {0:#04x} is not supported (ed25519 = 0x00)")]
    UnsupportedScheme(u8),
    #[error("malformed public key")]
    BadPublicKey,
    #[error("the signature does not match the message")]
    Mismatch,
    #[error("keystore {path}: {reason}")]
    Keystore { path: String, reason: String },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// Result alias of this crate.
pub type Result<T, E = CryptoError> = std::result::Result<T, E>;

/// Blake2b-256 of `bytes`.
pub fn blake2b256(bytes: &[u8]) -> [u8; 32] {
    Blake2b::<U32>::digest(bytes).into()
}

/// The Sui address of an ed25519 public key.
pub fn sui_address(public_key: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update([ED25519_FLAG]);
    h.update(public_key);
    h.finalize().into()
}

/// Formats a 32-byte address as `0x` + 64 hex digits.
pub fn address_hex(a: &[u8; 32]) -> String {
    let mut s = String::with_capacity(66);
    s.push_str("0x");
    for b in a {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An ed25519 keypair.
#[derive(Clone)]
pub struct Keypair {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({})", address_hex(&self.address()))
    }
}

impl Keypair {
    /// A new random keypair from the operating system's randomness.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| CryptoError::Random(e.to_string()))?;
        Ok(Self::from_secret(seed))
    }

    /// The keypair of a 32-byte ed25519 secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(&secret),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The Sui address.
    pub fn address(&self) -> [u8; 32] {
        sui_address(&self.public_key())
    }

    /// Signs `message` (for requests and responses: a 32-byte Blake2b-256 hash) and returns the
    /// Sui serialized signature, base64.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig = self.key.sign(message);
        let mut out = Vec::with_capacity(SIG_LEN);
        out.push(ED25519_FLAG);
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(&self.public_key());
        B64.encode(out)
    }

    /// The keystore entry: base64(flag ‖ secret).
    pub fn to_keystore_entry(&self) -> String {
        let mut v = vec![ED25519_FLAG];
        v.extend_from_slice(&self.key.to_bytes());
        B64.encode(v)
    }

    /// Parses a keystore entry.
    pub fn from_keystore_entry(entry: &str) -> Result<Self> {
        let bad = |reason: &str| CryptoError::Keystore {
            path: String::new(),
            reason: reason.to_string(),
        };
        let raw = B64
            .decode(entry.trim())
            .map_err(|_| bad("an entry is not base64"))?;
        match raw.split_first() {
            Some((&ED25519_FLAG, secret)) if secret.len() == 32 => {
                let mut s = [0u8; 32];
                s.copy_from_slice(secret);
                Ok(Self::from_secret(s))
            }
            Some((&flag, _)) if flag != ED25519_FLAG => Err(CryptoError::UnsupportedScheme(flag)),
            _ => Err(bad("an entry has the wrong length")),
        }
    }
}

/// Verifies a Sui serialized signature over `message`; returns the signer's address.
pub fn verify(signature_b64: &str, message: &[u8]) -> Result<[u8; 32]> {
    let raw = B64
        .decode(signature_b64.trim())
        .map_err(|_| CryptoError::NotBase64)?;
    if raw.first().is_some_and(|&f| f != ED25519_FLAG) {
        return Err(CryptoError::UnsupportedScheme(raw[0]));
    }
    if raw.len() != SIG_LEN {
        return Err(CryptoError::BadLength(raw.len()));
    }
    let sig =
        ed25519_dalek::Signature::from_slice(&raw[1..65]).map_err(|_| CryptoError::Mismatch)?;
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&raw[65..]);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|_| CryptoError::BadPublicKey)?;
    vk.verify(message, &sig)
        .map_err(|_| CryptoError::Mismatch)?;
    Ok(sui_address(&pk))
}

/// Reads a Sui keystore file (JSON array of entries).
pub fn read_keystore(path: &Path) -> Result<Vec<Keypair>> {
    let err = |reason: String| CryptoError::Keystore {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let entries: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| err(format!("not a JSON array of strings: {e}")))?;
    entries
        .iter()
        .map(|e| {
            Keypair::from_keystore_entry(e).map_err(|e| match e {
                CryptoError::Keystore { reason, .. } => err(reason),
                other => err(other.to_string()),
            })
        })
        .collect()
}

/// Writes a Sui keystore file (created with mode 0600 on Unix).
pub fn write_keystore(path: &Path, keys: &[Keypair]) -> Result<()> {
    let err = |reason: String| CryptoError::Keystore {
        path: path.display().to_string(),
        reason,
    };
    let entries: Vec<String> = keys.iter().map(Keypair::to_keystore_entry).collect();
    let text = serde_json::to_string_pretty(&entries).map_err(|e| err(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let k = Keypair::from_secret([7; 32]);
        let h = blake2b256(br#"{"model":"m"}"#);
        let sig = k.sign(&h);
        assert_eq!(verify(&sig, &h).unwrap(), k.address());
        let other = blake2b256(br#"{"model":"n"}"#);
        assert!(matches!(verify(&sig, &other), Err(CryptoError::Mismatch)));
        assert!(matches!(verify("%%%", &h), Err(CryptoError::NotBase64)));
        assert!(matches!(
            verify(&B64.encode([0u8; 10]), &h),
            Err(CryptoError::BadLength(10))
        ));
        assert!(matches!(
            verify(&B64.encode([1u8; 98]), &h),
            Err(CryptoError::UnsupportedScheme(1))
        ));
        // Someone else's key in the signature: valid signature, different address.
        let mallory = Keypair::from_secret([8; 32]);
        assert_ne!(verify(&mallory.sign(&h), &h).unwrap(), k.address());
    }

    #[test]
    fn known_vectors() {
        // Blake2b-256 of the empty string (RFC 7693 reference implementation).
        assert_eq!(
            address_hex(&blake2b256(b"")),
            "0x0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
        );
        // Sui addresses of ed25519 public keys, as printed by the Sui CLI (public test vectors).
        for (pk, addr) in [
            (
                "UdGRWooy48vGTs0HBokIis5NK+DUjiWc9ENUlcfCCBE=",
                "0xd77a6cd55073e98d4029b1b0b8bd8d88f45f343dad2732fc9a7965094e635c55",
            ),
            (
                "0PTAfQmNiabgbak9U/stWZzKc5nsRqokda2qnV2DTfg=",
                "0x7e8fd489c3d3cd9cc7cbcc577dc5d6de831e654edd9997d95c412d013e6eea23",
            ),
            (
                "6L/l0uhGt//9cf6nLQ0+24Uv2qanX/R6tn7lWUJX1Xk=",
                "0x3a1b4410ebe9c3386a429c349ba7929aafab739c277f97f32622b971972a14a2",
            ),
        ] {
            let pk: [u8; 32] = B64.decode(pk).unwrap().try_into().unwrap();
            assert_eq!(address_hex(&sui_address(&pk)), addr);
        }
    }

    #[test]
    fn keystore_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sui.keystore");
        let keys = vec![Keypair::from_secret([1; 32]), Keypair::generate().unwrap()];
        write_keystore(&p, &keys).unwrap();
        let back = read_keystore(&p).unwrap();
        assert_eq!(
            back.iter().map(Keypair::address).collect::<Vec<_>>(),
            keys.iter().map(Keypair::address).collect::<Vec<_>>()
        );
        std::fs::write(&p, "{not json").unwrap();
        assert!(
            read_keystore(&p)
                .unwrap_err()
                .to_string()
                .contains("not a JSON array")
        );
        std::fs::write(&p, r#"["AQ=="]"#).unwrap();
        assert!(read_keystore(&p).is_err());
    }
}
