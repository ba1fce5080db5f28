//! Constrained decoding: the output must match a grammar (a JSON Schema, or a Lark grammar),
//! enforced by masking the logits of every token that cannot continue a match, with
//! `llguidance` (the Earley-parser + lexer engine the large inference servers use).
//!
//! Determinism: the mask at a step is a pure function of the grammar and the tokens generated
//! so far (llguidance's work limits are counted in fuel, not time), and masking happens before
//! the seeded sampler draws, so a constrained request is as reproducible as any other, and the
//! verifier's replay (`crate::verify`) applies the very same masks. Log-probabilities stay
//! those of the model's raw distribution.
//!
//! The tokenizer is given to llguidance as a token trie built once per model: each token's
//! bytes, with control tokens marked as special (they never match grammar text), and the
//! model's end-of-generation token as the token that ends a complete match.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::error::{EngineError, Result};
use crate::tokenizer::{TokenId, Tokenizer};

/// What a constrained output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON Schema (`{"type": "object"}`: any JSON object).
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// A token trie over the model's vocabulary (llguidance's view of the tokenizer).
struct TrieEnv(TokTrie);

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.0
    }

    /// Greedy longest-match tokenization over the trie: used by llguidance only to split
    /// literal grammar text into tokens, never for prompts.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.0.greedy_tokenize(s)
    }
}

/// Compiles grammars for one model. Built once per model (it indexes the whole vocabulary).
pub struct GrammarCompiler {
    factory: ParserFactory,
    /// Every token that ends a generation: allowed wherever the grammar's end token is.
    end_of_generation: Vec<TokenId>,
    eos: TokenId,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let special = tokenizer.special();
        let eos = special
            .end_of_generation
            .first()
            .copied()
            .or(special.eos)
            .ok_or_else(|| {
                EngineError::InvalidRequest(
                    "the model names no end-of-generation token, so constrained output cannot end"
                        .into(),
                )
            })?;
        let vocab = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab as TokenId)
            .map(|id| {
                if tokenizer.is_control(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tokenizer.token_bytes(id, true));
                    w
                } else {
                    tokenizer.token_bytes(id, false)
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(TrieEnv(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::InvalidRequest(format!("grammar engine: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            end_of_generation: special.end_of_generation.clone(),
            eos,
        })
    }

    /// A fresh matcher for `spec` (an invalid schema or grammar is an `InvalidRequest` naming
    /// the problem).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_layout(schema.clone()))
            }
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| EngineError::InvalidRequest(format!("invalid grammar: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!("invalid grammar: {e}")));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos,
            end_of_generation: self.end_of_generation.clone(),
        })
    }
}

/// The JSON layout constrained answers use unless the schema's `x-guidance` says otherwise:
/// no free whitespace (a model could otherwise spend its whole budget on newlines before a
/// value) and the separators `", "` and `": "`, which models write naturally.
fn with_layout(schema: serde_json::Value) -> serde_json::Value {
    let mut schema = match schema {
        serde_json::Value::Bool(true) => serde_json::json!({}),
        other => other,
    };
    if let Some(map) = schema.as_object_mut() {
        map.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    eos: TokenId,
    end_of_generation: Vec<TokenId>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next, as a bit set over token ids (bit `i % 32` of word `i / 32`);
    /// the end-of-generation tokens are allowed exactly where the match is complete.
    pub fn mask(&mut self) -> Result<Vec<u32>> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| EngineError::InvalidRequest(format!("grammar: {e}")))?;
        let mut words = vob.as_slice().to_vec();
        if vob.is_allowed(self.eos) {
            for &t in &self.end_of_generation {
                if let Some(w) = words.get_mut(t as usize / 32) {
                    *w |= 1 << (t % 32);
                }
            }
        }
        Ok(words)
    }

    /// Advances past `token` (end-of-generation tokens end the match and are not fed).
    pub fn consume(&mut self, token: TokenId) -> Result<()> {
        if self.end_of_generation.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| EngineError::InvalidRequest(format!("grammar: {e}")))
    }
}
