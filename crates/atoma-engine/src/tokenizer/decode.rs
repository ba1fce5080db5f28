//! Incremental detokenization that only ever emits complete UTF-8.
//!
//! A token can end in the middle of a multi-byte character (byte-fallback tokens, byte-level
//! BPE pieces of an emoji). `DecodeStream` keeps the incomplete tail until the next token
//! completes it; a sequence that can never become valid is emitted as U+FFFD.

use super::{TokenId, Tokenizer};

/// Turns a stream of token ids into a stream of valid UTF-8 text pieces.
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    pending: Vec<u8>,
}

impl DecodeStream {
    /// A fresh decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> String {
        self.pending.extend(tok.token_bytes(id, false));
        self.take_valid()
    }

    /// Adds raw bytes and returns the text that became complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_valid()
    }

    fn take_valid(&mut self) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: replace it and keep going.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Emits whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::DecodeStream;

    #[test]
    fn holds_incomplete_characters() {
        let mut d = DecodeStream::new();
        let euro = "€".as_bytes();
        assert_eq!(d.push_bytes(&euro[..1]), "");
        assert_eq!(d.push_bytes(&euro[1..2]), "");
        assert_eq!(d.push_bytes(&euro[2..]), "€");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn replaces_invalid_bytes_and_flushes() {
        let mut d = DecodeStream::new();
        assert_eq!(d.push_bytes(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(d.push_bytes(&[0xe2, 0x82]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
