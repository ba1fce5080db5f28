//! Signing responses as the reference node does (`response_hash` and `signature` added to the
//! JSON); the implementation lives in `atoma_crypto::signed_json`, shared with the request log
//! and its verifiers.

pub use atoma_crypto::signed_json::{check_json, sign_json, verify_json};
