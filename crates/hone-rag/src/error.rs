//! Typed errors of the retrieval crate.
//!
//! A bad input record (a JSONL line, an unreadable Markdown file) is a [`RecordError`] with its
//! file and 1-based line; depending on [`OnError`](hone_data::OnError) it is skipped (and
//! listed in the build report) or returned as [`RagError::InvalidDocuments`]. Problems with an
//! index directory always name the directory.

use std::path::PathBuf;

use hone_data::{DataError, RecordError};
use thiserror::Error;

/// Errors returned by this crate.
#[derive(Debug, Error)]
pub enum RagError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Expanding or reading the document inputs failed (bad glob, no match, unreadable file).
    #[error(transparent)]
    Input(#[from] DataError),
    /// A file whose extension names no supported document type.
    #[error(
        "{}: unsupported document type (expected .jsonl, .ndjson, .json, .md, .markdown or .txt)",
        path.display()
    )]
    UnsupportedFile { path: PathBuf },
    /// With `on_error = fail`: the bad documents found (at least one), in input order.
    #[error("{}{}", errors.first().map(ToString::to_string).unwrap_or_default(),
        if errors.len() > 1 { format!(" (and {} more bad documents)", errors.len() - 1) } else { String::new() })]
    InvalidDocuments { errors: Vec<RecordError> },
    /// The inputs held no usable document.
    #[error("the corpus is empty: no document with text in {inputs}")]
    EmptyCorpus { inputs: String },
    /// A setting is out of range or inconsistent.
    #[error("`{key}`: {message}")]
    Config { key: String, message: String },
    /// The tokenizer file used for chunking could not be loaded.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// The index directory does not exist.
    #[error("{}: no such index directory", path.display())]
    MissingIndex { path: PathBuf },
    /// The directory exists but holds no `manifest.json`, so it is no hone index.
    #[error("{}: not a hone retrieval index (no manifest.json)", path.display())]
    NotAnIndex { path: PathBuf },
    /// The manifest is unreadable or written by an incompatible version.
    #[error("{}: corrupt index manifest: {message}", path.display())]
    CorruptManifest { path: PathBuf, message: String },
    /// The manifest's format version is not the one this build reads.
    #[error("{}: index format version {found}, expected {expected} (rebuild it with `hone rag index`)", path.display())]
    VersionMismatch {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    /// The output directory exists and is not a hone index.
    #[error("{}: exists and is not a hone retrieval index (pass --force to replace it)", path.display())]
    OutputExists { path: PathBuf },
    /// Tantivy failed on the lexical index in `path`.
    #[error("lexical index {}: {source}", path.display())]
    Lexical {
        path: PathBuf,
        #[source]
        source: tantivy::TantivyError,
    },
    /// A file of a sentence embedder directory is missing, unreadable or not valid JSON.
    #[error("embedder {}: {message}", path.display())]
    EmbedderFile { path: PathBuf, message: String },
    /// A key of an embedder configuration file is missing or has a value hone does not support.
    #[error("embedder {}: `{key}`: {message}", path.display())]
    EmbedderConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A tensor of the embedder's weights is missing, mis-shaped or of an unsupported dtype.
    #[error("embedder {}: tensor `{tensor}`: {message}", path.display())]
    EmbedderTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// The index was built with one embedder and is searched or changed with another.
    #[error("{}: the index was built with embedder {built_with}, not {given} (rebuild the index or pass --embedder with the one that built it)", index.display())]
    EmbedderMismatch {
        index: PathBuf,
        built_with: String,
        given: String,
    },
    /// The index has a dense part and its embedder directory is not where the manifest says.
    #[error("{}: the index was built with embedder {name} from {}, which is not there (pass --embedder DIR)", index.display(), path.display())]
    MissingEmbedder {
        index: PathBuf,
        name: String,
        path: PathBuf,
    },
    /// The dense vector index in `path` is unreadable or inconsistent.
    #[error("dense index {}: {message}", path.display())]
    CorruptVectors { path: PathBuf, message: String },
    /// `remove` named a document the index does not hold.
    #[error("{}: no document with id `{id}` in the index", path.display())]
    UnknownDocument { path: PathBuf, id: String },
}

/// Results of this crate.
pub type Result<T, E = RagError> = std::result::Result<T, E>;

impl RagError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RagError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        RagError::Config {
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn lexical(path: impl Into<PathBuf>, source: tantivy::TantivyError) -> Self {
        RagError::Lexical {
            path: path.into(),
            source,
        }
    }
}

impl From<hone_io::Error> for RagError {
    fn from(e: hone_io::Error) -> Self {
        RagError::io(e.path, e.source)
    }
}
