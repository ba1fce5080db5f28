//! Byte-level BPE with merges: a port of llama.cpp's `llm_tokenizer_bpe` (Llama 3, Qwen2,
//! SmolLM, GPT-2 vocabularies).
//!
//! Text is split into words by the pre-tokenizer regexes of the vocabulary's `pre` type (each
//! regex splits the pieces of the previous one, keeping both matches and gaps), every byte of a
//! word is mapped to its GPT-2 printable character, then the lowest-ranked adjacent pair is
//! merged until no pair has a rank.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use super::{TokenId, Vocab};
use crate::error::{EngineError, Result};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug)]
pub(crate) struct Bpe {
    regexes: Vec<Regex>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(TokenId, TokenId), (u32, TokenId)>,
    ignore_merges: bool,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

#[derive(Debug, PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    merged: TokenId,
}

impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        // Max-heap: the lowest rank (then leftmost) must compare greatest.
        o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    map
}

impl Bpe {
    pub fn new(vocab: &Vocab, merges: &[String], pre: &str) -> Result<Self> {
        let (patterns, ignore_merges): (&[&str], bool) = match pre {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (&[LLAMA3], true),
            "qwen2" | "deepseek-r1-qwen" => (&[QWEN2], false),
            "smollm" | "starcoder" | "refact" | "codeshell" => (&[r"\p{N}", GPT2], false),
            "gpt-2" | "gpt2" | "default" => (&[GPT2], false),
            other => {
                tracing::warn!(
                    pre = other,
                    "unknown BPE pre-tokenizer, using GPT-2's regex"
                );
                (&[GPT2], false)
            }
        };
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first character (which may itself be a space).
            let first = m.chars().next().map_or(0, char::len_utf8);
            let Some(split) = m[first..].find(' ').map(|i| i + first) else {
                continue;
            };
            let (a, b) = (&m[..split], &m[split + 1..]);
            if let (Some(ia), Some(ib), Some(im)) =
                (vocab.id(a), vocab.id(b), vocab.id(&format!("{a}{b}")))
            {
                merge_map.entry((ia, ib)).or_insert((rank as u32, im));
            }
        }
        let byte_to_char = bytes_to_chars();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Self {
            regexes,
            merges: merge_map,
            ignore_merges,
            byte_to_char,
            char_to_byte,
        })
    }

    fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece).flatten() {
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Tokenizes one plain-text fragment (special tokens already split out).
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<TokenId>) {
        for word in self.pre_tokenize(text) {
            let mapped: String = word
                .bytes()
                .map(|b| self.byte_to_char[b as usize])
                .collect();
            if self.ignore_merges
                && let Some(id) = vocab.id(&mapped)
            {
                out.push(id);
                continue;
            }
            self.merge_word(vocab, &mapped, out);
        }
    }

    fn merge_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<TokenId>) {
        // Each symbol: (byte range in `word`, token id if the range is a token, prev, next).
        struct Sym {
            start: usize,
            len: usize,
            id: Option<TokenId>,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = word
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Sym {
                start,
                len: c.len_utf8(),
                id: vocab.id(&word[start..start + c.len_utf8()]),
                prev: i.checked_sub(1),
                next: None,
            })
            .collect();
        let n = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut heap = BinaryHeap::new();
        let pair =
            |syms: &[Sym], l: Option<usize>, r: Option<usize>, heap: &mut BinaryHeap<Bigram>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                if let (Some(a), Some(b)) = (syms[l].id, syms[r].id)
                    && let Some(&(rank, merged)) = self.merges.get(&(a, b))
                {
                    heap.push(Bigram {
                        rank,
                        left: l,
                        right: r,
                        merged,
                    });
                }
            };
        for i in 1..n {
            pair(&syms, Some(i - 1), Some(i), &mut heap);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            // Skip stale pairs: one side already merged away or changed since it was queued.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].next != Some(r) {
                continue;
            }
            let (Some(a), Some(b)) = (syms[l].id, syms[r].id) else {
                continue;
            };
            if self.merges.get(&(a, b)).map(|m| m.1) != Some(bg.merged) {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[l].id = Some(bg.merged);
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(nx) = syms[r].next {
                syms[nx].prev = Some(l);
            }
            let (prev, next) = (syms[l].prev, syms[l].next);
            pair(&syms, prev, Some(l), &mut heap);
            pair(&syms, Some(l), next, &mut heap);
        }
        let mut i = if n > 0 { Some(0) } else { None };
        while let Some(idx) = i {
            let s = &syms[idx];
            match s.id {
                Some(id) => out.push(id),
                None => {
                    // As llama.cpp: look up each byte of the piece as a one-byte token.
                    let piece = &word[s.start..s.start + s.len];
                    for b in piece.bytes() {
                        if let Some(id) = std::str::from_utf8(&[b]).ok().and_then(|t| vocab.id(t)) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    /// The bytes a byte-level token text stands for.
    pub fn decode_text(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.char_to_byte.get(&c) {
                Some(b) => out.push(*b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out
    }
}
