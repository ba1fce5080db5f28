//! SentencePiece-style BPE over token scores with byte fallback: a port of llama.cpp's
//! `llm_tokenizer_spm` (Gemma, Llama 2, Mistral vocabularies).
//!
//! The text (spaces escaped to `▁`) starts as one symbol per UTF-8 character. Adjacent pairs
//! whose concatenation is a vocabulary entry go into a max-heap ordered by that entry's score
//! (ties: leftmost first); the best pair is merged and its neighbours re-examined until no pair
//! is left. A final symbol missing from the vocabulary is split back along the merges that built
//! it, and characters that are not tokens fall back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{TokenId, Vocab};

#[derive(Debug)]
pub(crate) struct Spm {
    add_space_prefix: bool,
    byte_tokens: [Option<TokenId>; 256],
    unk: Option<TokenId>,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The byte a `<0xXX>` token stands for.
pub(crate) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

impl Spm {
    pub fn new(vocab: &Vocab, add_space_prefix: bool) -> Self {
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>")).or_else(|| {
                // Fall back to the byte as a one-character string, as llama.cpp does.
                std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| vocab.id(s))
            });
        }
        let unk = vocab
            .kinds
            .iter()
            .position(|k| *k == super::TokenKind::Unknown)
            .map(|i| i as TokenId);
        Self {
            add_space_prefix,
            byte_tokens,
            unk,
        }
    }

    /// Tokenizes one plain-text fragment (special tokens already split out).
    pub fn encode(&self, vocab: &Vocab, raw: &str, prev_special: bool, out: &mut Vec<TokenId>) {
        let mut text = String::with_capacity(raw.len() + 3);
        if self.add_space_prefix && prev_special {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', "\u{2581}");
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let mut rev_merge: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
        let try_add = |l: Option<usize>,
                       r: Option<usize>,
                       symbols: &[Symbol],
                       heap: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<(usize, usize), (usize, usize)>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let s = &symbols[l];
            let size = s.len + symbols[r].len;
            let piece = &text[s.start..s.start + size];
            if let Some(id) = vocab.id(piece) {
                heap.push(Bigram {
                    score: vocab.scores[id as usize],
                    left: l,
                    right: r,
                    size,
                });
                rev.insert((s.start, size), (l, r));
            }
        };
        for i in 1..symbols.len() {
            try_add(Some(i - 1), Some(i), &symbols, &mut heap, &mut rev_merge);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != bg.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            let (prev, next) = (symbols[l].prev, symbols[l].next);
            try_add(prev, Some(l), &symbols, &mut heap, &mut rev_merge);
            try_add(Some(l), next, &symbols, &mut heap, &mut rev_merge);
        }
        let mut i = Some(0);
        while let Some(idx) = i {
            self.resegment(vocab, &text, &symbols, &rev_merge, symbols[idx], out);
            i = symbols[idx].next;
        }
    }

    fn resegment(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        rev: &HashMap<(usize, usize), (usize, usize)>,
        sym: Symbol,
        out: &mut Vec<TokenId>,
    ) {
        let piece = &text[sym.start..sym.start + sym.len];
        if let Some(id) = vocab.id(piece) {
            out.push(id);
            return;
        }
        match rev.get(&(sym.start, sym.len)) {
            Some(&(l, r)) => {
                // The merged symbols keep their original starts; rebuild their extents.
                let left = Symbol {
                    len: symbols[r].start - symbols[l].start,
                    ..symbols[l]
                };
                let right = Symbol {
                    start: symbols[r].start,
                    len: sym.start + sym.len - symbols[r].start,
                    ..symbols[r]
                };
                self.resegment(vocab, text, symbols, rev, left, out);
                self.resegment(vocab, text, symbols, rev, right, out);
            }
            None => {
                for &b in piece.as_bytes() {
                    if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                        out.push(id);
                    }
                }
            }
        }
    }
}
