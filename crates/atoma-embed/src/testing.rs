//! A tiny BERT embedding model with seeded random weights, written as a sentence-transformers
//! directory (`config.json`, `tokenizer.json`, `model.safetensors`, `modules.json`,
//! `sentence_bert_config.json`, `1_Pooling/config.json`), for hermetic tests here and in the
//! crates that serve embeddings. Feature `test-support`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

/// The tiny model's shape.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    /// sentence-transformers' `max_seq_length`.
    pub max_seq_length: usize,
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            hidden: 32,
            heads: 4,
            layers: 2,
            intermediate: 64,
            max_positions: 64,
            max_seq_length: 16,
            seed: 7,
        }
    }
}

/// The vocabulary: ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK], then these words and pieces.
pub const WORDS: &[&str] = &[
    "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "is", "big", "small", "red",
    "blue", ".", ",", "!", "?", "un", "##believ", "##able", "##s", "##ed",
];

/// Ids of the special tokens.
pub const PAD: u32 = 0;
pub const UNK: u32 = 1;
pub const CLS: u32 = 2;
pub const SEP: u32 = 3;

impl TinyModel {
    /// Vocabulary size: the special tokens and [`WORDS`].
    pub fn vocab_size(&self) -> usize {
        5 + WORDS.len()
    }

    /// Writes the model directory into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("1_Pooling"))?;
        let write_json = |name: &str, v: serde_json::Value| {
            std::fs::write(
                dir.join(name),
                serde_json::to_string_pretty(&v).unwrap_or_default(),
            )
        };
        write_json(
            "config.json",
            json!({
                "architectures": ["BertModel"],
                "model_type": "bert",
                "hidden_act": "gelu",
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "layer_norm_eps": 1e-12,
                "max_position_embeddings": self.max_positions,
                "num_attention_heads": self.heads,
                "num_hidden_layers": self.layers,
                "pad_token_id": 0,
                "position_embedding_type": "absolute",
                "type_vocab_size": 2,
                "vocab_size": self.vocab_size(),
            }),
        )?;
        write_json("tokenizer.json", tokenizer_json())?;
        write_json(
            "modules.json",
            json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]),
        )?;
        write_json(
            "sentence_bert_config.json",
            json!({"max_seq_length": self.max_seq_length, "do_lower_case": false}),
        )?;
        write_json(
            "1_Pooling/config.json",
            json!({
                "word_embedding_dimension": self.hidden,
                "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true,
                "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false,
            }),
        )?;
        candle_core::safetensors::save(&self.weights(), dir.join("model.safetensors"))
            .map_err(std::io::Error::other)
    }

    /// Seeded random weights under the checkpoint's names (layer norms near identity).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let mut rng = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut tensor = |shape: &[usize], center: f32, scale: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    // xorshift64*
                    rng ^= rng >> 12;
                    rng ^= rng << 25;
                    rng ^= rng >> 27;
                    let u = (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32
                        / (1u64 << 24) as f32;
                    center + scale * (u - 0.5)
                })
                .collect();
            Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
        };
        let (h, i) = (self.hidden, self.intermediate);
        let mut w = HashMap::new();
        let mut put = |name: String, t: Tensor| {
            w.insert(name, t);
        };
        put(
            "embeddings.word_embeddings.weight".into(),
            tensor(&[self.vocab_size(), h], 0.0, 1.0),
        );
        put(
            "embeddings.position_embeddings.weight".into(),
            tensor(&[self.max_positions, h], 0.0, 0.5),
        );
        put(
            "embeddings.token_type_embeddings.weight".into(),
            tensor(&[2, h], 0.0, 0.5),
        );
        put("embeddings.LayerNorm.weight".into(), tensor(&[h], 1.0, 0.2));
        put("embeddings.LayerNorm.bias".into(), tensor(&[h], 0.0, 0.2));
        for l in 0..self.layers {
            let p = format!("encoder.layer.{l}");
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                let scale = 2.0 / (inp as f32).sqrt();
                put(
                    format!("{p}.{name}.weight"),
                    tensor(&[out, inp], 0.0, scale),
                );
                put(format!("{p}.{name}.bias"), tensor(&[out], 0.0, 0.1));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                put(format!("{p}.{norm}.weight"), tensor(&[h], 1.0, 0.2));
                put(format!("{p}.{norm}.bias"), tensor(&[h], 0.0, 0.2));
            }
        }
        w
    }
}

/// A BERT WordPiece `tokenizer.json` over [`WORDS`], laid out as Hugging Face writes it
/// (including the fixed padding and truncation that loading must override).
fn tokenizer_json() -> serde_json::Value {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut vocab = serde_json::Map::new();
    for (id, tok) in specials.iter().chain(WORDS).enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [CLS], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [SEP], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    })
}
