//! The configuration files of a sentence-transformers directory, resolved once into
//! [`EmbedderSettings`]: `config.json` (Hugging Face BERT), `modules.json` (Transformer, Pooling,
//! optional Normalize), `1_Pooling/config.json` (old `pooling_mode_mean_tokens` and new
//! `pooling_mode` key styles) and the maximum sequence length (`sentence_bert_config.json`'s
//! `max_seq_length`, else `tokenizer_config.json`'s `model_max_length`, at most the model's
//! positions), as sentence-transformers 2.x-6.x resolve them. Later code never reads raw JSON.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::bert::BertConfig;
use crate::error::{RagError, Result};

/// Everything the embedder needs from the directory's configuration files.
#[derive(Clone, Debug)]
pub struct EmbedderSettings {
    pub bert: BertConfig,
    /// Tokens per text, special tokens included; longer texts are truncated.
    pub max_seq_len: usize,
    /// Whether the pipeline ends with L2 normalisation (a `Normalize` module).
    pub normalize: bool,
}

/// `config.json`: the keys of Hugging Face's `BertConfig` hone reads.
#[derive(Deserialize)]
struct HfBertConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// `modules.json`: one entry per pipeline stage.
#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// `1_Pooling/config.json`, both key styles.
#[derive(Deserialize)]
struct PoolingFile {
    /// sentence-transformers >= 5: `"mean"`, `"cls"`, ...
    pooling_mode: Option<String>,
    embedding_dimension: Option<usize>,
    /// sentence-transformers < 5.
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| RagError::EmbedderFile {
        path: path.into(),
        message: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| RagError::EmbedderFile {
        path: path.into(),
        message: format!("invalid JSON: {e}"),
    })
}

fn bad(path: &Path, key: &str, message: impl Into<String>) -> RagError {
    RagError::EmbedderConfig {
        path: PathBuf::from(path),
        key: key.into(),
        message: message.into(),
    }
}

impl EmbedderSettings {
    /// Reads and checks the configuration files of the sentence-transformers directory `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let bert = read_bert(&dir.join("config.json"))?;
        let (pooling_dir, normalize) = read_modules(&dir.join("modules.json"))?;
        read_pooling(&dir.join(pooling_dir).join("config.json"), bert.hidden_size)?;
        let max_seq_len = read_max_seq_len(dir, bert.max_position_embeddings)?;
        Ok(EmbedderSettings {
            bert,
            max_seq_len,
            normalize,
        })
    }
}

fn read_bert(path: &Path) -> Result<BertConfig> {
    let raw: HfBertConfig = read_json(path)?;
    if let Some(kind) = raw.model_type.as_deref() {
        if !matches!(kind, "bert" | "roberta" | "xlm-roberta") {
            return Err(bad(
                path,
                "model_type",
                format!("expected a BERT-family model (bert), found `{kind}`"),
            ));
        }
        if kind != "bert" {
            return Err(bad(
                path,
                "model_type",
                format!(
                    "`{kind}` offsets its positions by the padding id; only `bert` is supported"
                ),
            ));
        }
    }
    if raw.hidden_act != "gelu" {
        return Err(bad(
            path,
            "hidden_act",
            format!("expected `gelu`, found `{}`", raw.hidden_act),
        ));
    }
    if let Some(kind) = raw.position_embedding_type.as_deref() {
        if kind != "absolute" {
            return Err(bad(
                path,
                "position_embedding_type",
                format!("expected `absolute`, found `{kind}`"),
            ));
        }
    }
    for (key, value) in [
        ("vocab_size", raw.vocab_size),
        ("hidden_size", raw.hidden_size),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("num_attention_heads", raw.num_attention_heads),
        ("intermediate_size", raw.intermediate_size),
        ("max_position_embeddings", raw.max_position_embeddings),
        ("type_vocab_size", raw.type_vocab_size),
    ] {
        if value == 0 {
            return Err(bad(path, key, "expected a positive value, found 0"));
        }
    }
    if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
        return Err(bad(
            path,
            "num_attention_heads",
            format!(
                "hidden_size {} is not a multiple of {} heads",
                raw.hidden_size, raw.num_attention_heads
            ),
        ));
    }
    if !(raw.layer_norm_eps.is_finite() && raw.layer_norm_eps > 0.0) {
        return Err(bad(
            path,
            "layer_norm_eps",
            format!("expected a positive value, found {}", raw.layer_norm_eps),
        ));
    }
    Ok(BertConfig::new(
        raw.vocab_size,
        raw.hidden_size,
        raw.num_hidden_layers,
        raw.num_attention_heads,
        raw.intermediate_size,
        raw.max_position_embeddings,
        raw.type_vocab_size,
        raw.layer_norm_eps,
    ))
}

/// The pooling module's directory and whether a Normalize module follows it.
fn read_modules(path: &Path) -> Result<(String, bool)> {
    let modules: Vec<ModuleEntry> = read_json(path)?;
    let stage = |m: &ModuleEntry| m.kind.rsplit('.').next().unwrap_or_default().to_string();
    let stages: Vec<String> = modules.iter().map(stage).collect();
    let expected = "Transformer, Pooling and an optional Normalize";
    match stages.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["Transformer", "Pooling"] | ["Transformer", "Pooling", "Normalize"] => {}
        _ => {
            return Err(bad(
                path,
                "type",
                format!(
                    "expected the modules {expected}, found {}",
                    stages.join(", ")
                ),
            ))
        }
    }
    if !modules[0].path.is_empty() {
        return Err(bad(
            path,
            "path",
            format!(
                "expected the Transformer at the top of the directory, found `{}`",
                modules[0].path
            ),
        ));
    }
    let pooling = &modules[1].path;
    if pooling.is_empty() || pooling.contains("..") || pooling.starts_with('/') {
        return Err(bad(
            path,
            "path",
            format!("expected a subdirectory for Pooling, found `{pooling}`"),
        ));
    }
    Ok((pooling.clone(), modules.len() == 3))
}

fn read_pooling(path: &Path, hidden: usize) -> Result<()> {
    let p: PoolingFile = read_json(path)?;
    let mode = match p.pooling_mode.as_deref() {
        Some(mode) => mode.to_string(),
        None => {
            let flags = [
                ("mean", p.pooling_mode_mean_tokens),
                ("cls", p.pooling_mode_cls_token),
                ("max", p.pooling_mode_max_tokens),
                ("mean_sqrt_len_tokens", p.pooling_mode_mean_sqrt_len_tokens),
                ("weightedmean", p.pooling_mode_weightedmean_tokens),
                ("lasttoken", p.pooling_mode_lasttoken),
            ];
            let on: Vec<&str> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
            on.join("+")
        }
    };
    if mode != "mean" {
        return Err(bad(
            path,
            "pooling_mode",
            format!("expected mean pooling only, found `{mode}`"),
        ));
    }
    let dim = p.embedding_dimension.or(p.word_embedding_dimension);
    match dim {
        Some(d) if d != hidden => Err(bad(
            path,
            "embedding_dimension",
            format!("expected the model's hidden_size {hidden}, found {d}"),
        )),
        _ => Ok(()),
    }
}

fn read_max_seq_len(dir: &Path, positions: usize) -> Result<usize> {
    let st = dir.join("sentence_bert_config.json");
    let from_st = if st.is_file() {
        read_json::<SentenceBertConfig>(&st)?.max_seq_length
    } else {
        None
    };
    let tok = dir.join("tokenizer_config.json");
    let from_tok = if from_st.is_none() && tok.is_file() {
        read_json::<TokenizerConfig>(&tok)?
            .model_max_length
            // transformers writes 1e30 for "no limit"
            .filter(|n| (1.0..1e9).contains(n))
            .map(|n| n as usize)
    } else {
        None
    };
    let len = from_st.or(from_tok).unwrap_or(positions).min(positions);
    if len < 2 {
        return Err(bad(
            &st,
            "max_seq_length",
            format!("expected at least 2 tokens, found {len}"),
        ));
    }
    Ok(len)
}
