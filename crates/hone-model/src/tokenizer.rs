//! The tokenizer of a Hugging Face model directory: `tokenizer.json` through the `tokenizers`
//! crate, special tokens from `tokenizer_config.json`, `special_tokens_map.json`,
//! `generation_config.json` and `config.json` (which may list several end-of-sequence ids).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::OneOrMany;
use crate::error::{ModelError, Result};

/// A tokenizer with the model's BOS/EOS conventions.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_id: Option<u32>,
    /// Every id that ends generation (union of all files that name one).
    pub eos_ids: Vec<u32>,
    /// Whether a BOS must be prepended to an encoded prompt (`add_bos_token`).
    add_bos: bool,
    path: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::InvalidJson {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A special-token entry: `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn token_ids(value: Option<&Value>) -> Vec<u32> {
    value
        .and_then(|v| serde_json::from_value::<OneOrMany>(v.clone()).ok())
        .map(|v| v.to_vec())
        .unwrap_or_default()
}

impl Tokenizer {
    /// Loads the tokenizer of model directory `dir`, or of a GGUF model file (its
    /// `tokenizer.ggml.*` metadata, [`crate::gguf::tokenizer`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::loader::is_gguf(dir) {
            return crate::gguf::tokenizer::tokenizer(&crate::gguf::GgufFile::open(dir)?);
        }
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let gen_config = read_json(&dir.join("generation_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;

        let id_of = |text: Option<String>| text.and_then(|t| inner.token_to_id(&t));
        let special = |key: &str| {
            token_text(tok_config.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_text(special_map.as_ref().and_then(|c| c.get(key))))
        };

        let bos_id = token_ids(gen_config.as_ref().and_then(|c| c.get("bos_token_id")))
            .first()
            .copied()
            .or_else(|| id_of(special("bos_token")))
            .or_else(|| {
                token_ids(model_config.as_ref().and_then(|c| c.get("bos_token_id")))
                    .first()
                    .copied()
            });
        let mut eos_ids = token_ids(gen_config.as_ref().and_then(|c| c.get("eos_token_id")));
        for id in token_ids(model_config.as_ref().and_then(|c| c.get("eos_token_id")))
            .into_iter()
            .chain(id_of(special("eos_token")))
        {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let add_bos = tok_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            add_bos,
            path,
        })
    }

    /// A tokenizer built elsewhere (from a GGUF file's metadata, [`crate::gguf::tokenizer`]);
    /// `path` names its source in messages.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
        path: PathBuf,
    ) -> Self {
        Self {
            inner,
            bos_id,
            eos_ids,
            add_bos,
            path,
        }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text` as the tokenizer's post-processor does (`add_special_tokens = true`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode text: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a generation prompt: special tokens as configured, BOS first when the model uses
    /// one. An empty prompt is BOS alone.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = if text.is_empty() {
            Vec::new()
        } else {
            self.encode(text)?
        };
        if let Some(bos) = self.bos_id {
            if (self.add_bos || ids.is_empty()) && ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(ModelError::Input(format!(
                "the prompt is empty and {} defines no BOS token to start from",
                self.path.display()
            )));
        }
        Ok(ids)
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// Token strings of `ids` (as `convert_ids_to_tokens`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
