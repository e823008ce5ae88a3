//! Dense sentence embeddings: a BERT-family sentence-transformers model (e.g. all-MiniLM-L6-v2)
//! run in burn on the CPU (Flex backend).
//!
//! A sentence-transformers directory holds `config.json`, `model.safetensors`,
//! `tokenizer.json`, `modules.json` (Transformer, Pooling, optional Normalize),
//! `1_Pooling/config.json` (mean pooling) and usually `sentence_bert_config.json`
//! (`max_seq_length`). [`SentenceEmbedder::embed`] tokenizes with the directory's
//! `tokenizer.json` (special tokens added, truncated to the maximum sequence length as
//! sentence-transformers truncates), sorts the texts by length, runs them in padded batches with
//! an attention mask, mean-pools over the tokens and L2-normalises: the output equals
//! `SentenceTransformer(dir).encode(texts)` (checked against committed references in
//! `tests/embed.rs`).
//!
//! An embedder is identified by [`EmbedderId`]: the directory's name and an xxh3-128 hash of the
//! files that define its output, so an index can tell whether a query is embedded by the model
//! that embedded its chunks.

mod bert;
mod config;
mod host;
mod weights;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use bert::{BertConfig, BertInput, BertModel};
pub use config::EmbedderSettings;
pub use weights::WEIGHTS_FILE;

use crate::error::{RagError, Result};

/// The backend the embedder runs on: burn's CPU backend.
pub type EmbedBackend = burn::backend::Flex;

/// The tokenizer file of a sentence-transformers directory.
pub const EMBEDDER_TOKENIZER_FILE: &str = "tokenizer.json";

/// Texts per forward pass (sentence-transformers' default `batch_size`).
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// Which embedder produced a set of vectors: name and content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedderId {
    /// The model directory's name, e.g. `all-minilm-l6-v2`.
    pub name: String,
    /// xxh3-128 (hex) of the files that define the embeddings (see [`fingerprint`]).
    pub hash: String,
}

impl fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` (xxh3 {})",
            self.name,
            &self.hash[..self.hash.len().min(16)]
        )
    }
}

/// The files whose bytes make an embedder's identity, relative to its directory; the optional
/// ones count when present.
const IDENTITY_FILES: [(&str, bool); 5] = [
    ("config.json", true),
    (WEIGHTS_FILE, true),
    (EMBEDDER_TOKENIZER_FILE, true),
    ("modules.json", true),
    ("sentence_bert_config.json", false),
];

/// The identity of the sentence-transformers directory `dir`: its name and the xxh3-128 of
/// the identity files and the pooling configuration (names, lengths and bytes).
pub fn fingerprint(dir: &Path) -> Result<EmbedderId> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, required) in IDENTITY_FILES {
        let path = dir.join(name);
        if path.is_file() || required {
            files.push(path);
        }
    }
    let pooling = dir.join("1_Pooling").join("config.json");
    if pooling.is_file() {
        files.push(pooling);
    }
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let fail = |e: std::io::Error| RagError::EmbedderFile {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut file = std::fs::File::open(&path).map_err(fail)?;
        let len = file.metadata().map_err(fail)?.len();
        let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy();
        hasher.update(rel.as_bytes());
        hasher.update(&len.to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(fail)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(EmbedderId {
        name,
        hash: format!("{:032x}", hasher.digest128()),
    })
}

/// Row-major embeddings: `values.len() == rows * dim`.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub dim: usize,
    pub values: Vec<f32>,
}

impl Embeddings {
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// A loaded sentence embedder.
pub struct SentenceEmbedder {
    dir: PathBuf,
    id: EmbedderId,
    settings: EmbedderSettings,
    tokenizer: tokenizers::Tokenizer,
    /// The encoder, on host memory (the burn module the loader fills is dropped after the copy).
    model: host::HostBert,
    batch_size: usize,
}

impl fmt::Debug for SentenceEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("dir", &self.dir)
            .field("id", &self.id)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SentenceEmbedder {
    /// Loads the sentence-transformers directory `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(RagError::EmbedderFile {
                path: dir.into(),
                message: "no such model directory".into(),
            });
        }
        let settings = EmbedderSettings::read(dir)?;
        let tokenizer = load_tokenizer(&dir.join(EMBEDDER_TOKENIZER_FILE), &settings)?;
        let id = fingerprint(dir)?;
        let device = Default::default();
        let loaded = weights::load_bert::<EmbedBackend>(dir, &settings.bert, &device)?;
        let model = host::HostBert::from_model(&loaded, &settings.bert);
        drop(loaded);
        tracing::info!(dir = %dir.display(), %id, dim = settings.bert.hidden_size,
            max_seq_len = settings.max_seq_len, "loaded sentence embedder");
        Ok(SentenceEmbedder {
            dir: dir.to_path_buf(),
            id,
            settings,
            tokenizer,
            model,
            batch_size: DEFAULT_BATCH_SIZE,
        })
    }

    /// Texts per forward pass (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn id(&self) -> &EmbedderId {
        &self.id
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.settings.bert.hidden_size
    }

    pub fn settings(&self) -> &EmbedderSettings {
        &self.settings
    }

    /// The directory's `tokenizer.json` (what chunking by the embedder's tokens counts).
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(EMBEDDER_TOKENIZER_FILE)
    }

    /// The token ids the model sees for each text: special tokens added, truncated.
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| RagError::Tokenizer {
                path: self.tokenizer_path(),
                message: e.to_string(),
            })?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The sentence embeddings of `texts`, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        let dim = self.dim();
        let ids = self.token_ids(texts)?;
        let vocab = self.settings.bert.vocab_size;
        if let Some(bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(RagError::EmbedderConfig {
                path: self.tokenizer_path(),
                key: "model.vocab".into(),
                message: format!("token id {bad} is outside the model's vocab_size {vocab}"),
            });
        }
        // Sequences are packed without padding, so a batch's cost is its tokens; batches run
        // one after another, each matrix product on every core.
        let mut values = Vec::with_capacity(texts.len() * dim);
        for batch in ids.chunks(self.batch_size) {
            let rows: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
            let mut pooled = self.model.mean_pooled(&rows);
            if self.settings.normalize {
                pooled
                    .chunks_exact_mut(dim)
                    .for_each(crate::dense::normalize_clamped);
            }
            values.extend_from_slice(&pooled);
        }
        Ok(Embeddings { dim, values })
    }
}

fn load_tokenizer(path: &Path, settings: &EmbedderSettings) -> Result<tokenizers::Tokenizer> {
    let fail = |message: String| RagError::Tokenizer {
        path: path.into(),
        message,
    };
    if !path.is_file() {
        return Err(RagError::EmbedderFile {
            path: path.into(),
            message: "missing".into(),
        });
    }
    let mut tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| fail(e.to_string()))?;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: settings.max_seq_len,
            ..Default::default()
        }))
        .map_err(|e| fail(e.to_string()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}
