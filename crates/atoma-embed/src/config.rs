//! What a model directory says about its model, read and checked once at load: BERT's
//! `config.json`, and sentence-transformers' `modules.json`, `sentence_bert_config.json` and
//! pooling `config.json` (each optional, with sentence-transformers' defaults for a plain BERT).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{EmbedError, Result};

/// The encoder's shape, from `config.json` (the Hugging Face `BertConfig` fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| EmbedError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(bad(format!(
                "model_type `{t}` is not supported (only `bert`)"
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only `gelu`, the exact erf form)",
                self.hidden_act
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            )));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(bad(format!("{name} is 0")));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "layer_norm_eps {} is not a positive number",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

/// One entry of `modules.json`: the sentence-transformers pipeline, in order.
#[derive(Debug, Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// Everything load needs from the directory's JSON files.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub bert: BertConfig,
    /// Tokens per input, [CLS] and [SEP] included (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
    /// sentence-transformers lower-cases the text itself before tokenizing.
    pub lowercase: bool,
    /// The pipeline ends with `Normalize` (unit-length vectors).
    pub normalize: bool,
}

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

impl ModelConfig {
    /// Reads the configuration of the model directory `dir`.
    ///
    /// Without `modules.json` the pipeline is sentence-transformers' default for a plain
    /// encoder (mean pooling), plus normalisation; without `sentence_bert_config.json` inputs
    /// may fill every position embedding.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let bert: BertConfig = read_json(&config_path)?;
        bert.check(&config_path)?;

        let modules_path = dir.join("modules.json");
        let (pooling_dir, normalize) = if modules_path.is_file() {
            pipeline(&modules_path, &read_json::<Vec<Module>>(&modules_path)?)?
        } else {
            (Some(PathBuf::from("1_Pooling")), true)
        };
        if let Some(pooling_path) = pooling_dir.map(|d| dir.join(d).join("config.json"))
            && pooling_path.is_file()
        {
            check_pooling(&pooling_path, &read_json(&pooling_path)?)?;
        }

        let st_path = dir.join("sentence_bert_config.json");
        let st: SentenceBertConfig = if st_path.is_file() {
            read_json(&st_path)?
        } else {
            SentenceBertConfig::default()
        };
        let max_tokens = st
            .max_seq_length
            .unwrap_or(bert.max_position_embeddings)
            .min(bert.max_position_embeddings);
        if max_tokens < 2 {
            return Err(EmbedError::BadConfig {
                path: st_path,
                reason: format!("max_seq_length {max_tokens} leaves no room for [CLS] and [SEP]"),
            });
        }
        Ok(Self {
            bert,
            max_tokens,
            lowercase: st.do_lower_case,
            normalize,
        })
    }
}

/// Checks the pipeline is Transformer → Pooling → optional Normalize; returns the pooling
/// module's directory and whether vectors are normalised.
fn pipeline(path: &Path, modules: &[Module]) -> Result<(Option<PathBuf>, bool)> {
    let kinds: Vec<&str> = modules.iter().map(|m| m.kind.as_str()).collect();
    let normalize = match kinds.as_slice() {
        [TRANSFORMER, POOLING] => false,
        [TRANSFORMER, POOLING, NORMALIZE] => true,
        _ => {
            return Err(EmbedError::BadConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "pipeline {kinds:?} is not supported (only Transformer, Pooling, optional Normalize)"
                ),
            });
        }
    };
    Ok((Some(PathBuf::from(&modules[1].path)), normalize))
}

fn check_pooling(path: &Path, p: &PoolingConfig) -> Result<()> {
    let others = p.pooling_mode_cls_token
        || p.pooling_mode_max_tokens
        || p.pooling_mode_mean_sqrt_len_tokens
        || p.pooling_mode_weightedmean_tokens
        || p.pooling_mode_lasttoken;
    if !p.pooling_mode_mean_tokens || others {
        return Err(EmbedError::BadConfig {
            path: path.to_path_buf(),
            reason: "only mean pooling is supported".into(),
        });
    }
    Ok(())
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| EmbedError::io(path, source))?;
    serde_json::from_str(&text).map_err(|e| EmbedError::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
