//! `manifest.json` of an index directory: format version, generation, embedder, chunking
//! settings, the lexical engine and counts. Written atomically after every change.
//!
//! ```text
//! DIR/manifest.json     this file
//! DIR/lexical/          the tantivy index (BM25), chunks stored with their offsets
//! DIR/tokenizer.json    the chunking tokenizer, when chunking counted its tokens
//! DIR/dense-NNNNNN/     the dense vectors of the generation named by `dense.dir`, when the
//!                       index has an embedder (the previous generation's may remain), and
//!                       their HNSW graph above the policy's threshold
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkConfig, Tokenization};
use crate::dense::VectorPolicy;
use crate::embed::EmbedderId;
use crate::error::{RagError, Result};

/// The manifest file name in an index directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The lexical index's subdirectory.
pub const LEXICAL_DIR: &str = "lexical";
/// The version of the directory layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "hone-rag-index";

/// How the chunks were made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingManifest {
    #[serde(flatten)]
    pub config: ChunkConfig,
    pub tokenization: Tokenization,
}

/// The lexical (BM25) index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LexicalManifest {
    /// `tantivy`.
    pub engine: String,
    pub engine_version: String,
    /// The text analysis applied to chunks and queries.
    pub analyzer: String,
    /// Subdirectory of the index directory.
    pub dir: String,
}

/// How the dense vectors are searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VectorSearch {
    /// Every vector is scored (dot product of unit vectors).
    Exact,
    /// An HNSW graph proposes candidates, which are scored exactly.
    Hnsw,
}

/// The dense (embedding) index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseManifest {
    /// The embedder that embedded the chunks; queries must be embedded by the same one.
    pub embedder: EmbedderId,
    /// Where the embedder was when the index was built (absolute): the default for queries.
    pub embedder_dir: PathBuf,
    pub dim: usize,
    /// How the current generation is searched.
    pub search: VectorSearch,
    /// When changes keep a graph (absent in indexes written before graphs: the default).
    #[serde(default)]
    pub policy: VectorPolicy,
    /// The current dense directory (`dense-NNNNNN`) in the index directory.
    pub dir: String,
}

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `hone-rag-index`.
    pub format: String,
    pub version: u32,
    /// Incremented by every change (index, add, remove).
    pub generation: u64,
    /// The name of the sentence embedder of the dense index; `None`: lexical retrieval only.
    pub embedder: Option<String>,
    pub chunking: ChunkingManifest,
    pub lexical: LexicalManifest,
    /// The dense index; `None`: lexical retrieval only.
    #[serde(default)]
    pub dense: Option<DenseManifest>,
    pub documents: u64,
    pub chunks: u64,
}

impl Manifest {
    pub(crate) fn new(chunking: ChunkingManifest, lexical: LexicalManifest) -> Self {
        Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            generation: 0,
            embedder: None,
            chunking,
            lexical,
            dense: None,
            documents: 0,
            chunks: 0,
        }
    }

    /// Reads and checks `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(RagError::MissingIndex { path: dir.into() });
        }
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(RagError::NotAnIndex { path: dir.into() });
        }
        let bytes = std::fs::read(&path).map_err(|e| RagError::io(&path, e))?;
        let corrupt = |message: String| RagError::CorruptManifest {
            path: path.clone(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(corrupt(format!("expected \"format\": \"{FORMAT_NAME}\"")));
        }
        let found = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| corrupt("missing \"version\"".into()))?;
        if found != u64::from(FORMAT_VERSION) {
            return Err(RagError::VersionMismatch {
                path,
                expected: FORMAT_VERSION,
                found: u32::try_from(found).unwrap_or(u32::MAX),
            });
        }
        serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
    }

    /// Writes `DIR/manifest.json` atomically.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        json.push(b'\n');
        Ok(hone_io::write_file(&dir.join(MANIFEST_FILE), &json)?)
    }

    /// The tokenizer file chunking uses, if any.
    pub fn tokenizer_path(&self, dir: &Path) -> Option<PathBuf> {
        match &self.chunking.tokenization {
            Tokenization::Words => None,
            Tokenization::HuggingFace { file } => Some(dir.join(file)),
        }
    }
}
