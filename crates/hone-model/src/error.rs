//! Typed errors of the model crate. Every variant names the file, key or tensor at fault and
//! says what was expected, so a user can act on the message without reading the code.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed. The I/O error is part of the message, not a `source`, so that
    /// error chains (the binary prints them) do not print it twice.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// Writing a file or directory failed (disk full, permissions, ...).
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path} is missing: a Hugging Face model directory needs it")]
    MissingFile { path: PathBuf },

    #[error(
        "expected a model directory (with config.json), got a file: {path}; and {parent}, \
         which holds it, has no config.json"
    )]
    NotADirectory { path: PathBuf, parent: PathBuf },

    #[error(
        "tensor `{name}` in {path}: value {value} at flat index {index} is not finite \
         ({count} NaN/inf value(s) in all); the file is corrupt or its training diverged"
    )]
    NonFinite {
        name: String,
        path: PathBuf,
        index: usize,
        value: f32,
        count: usize,
    },

    #[error("invalid JSON in {path}: {message}")]
    InvalidJson { path: PathBuf, message: String },

    #[error("{path}: key `{key}`: {message}")]
    InvalidConfig {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: unsupported {what} `{found}`; hone supports: {supported}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        found: String,
        supported: String,
    },

    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {message}")]
    CorruptSafetensors { path: PathBuf, message: String },

    #[error("tensor `{name}` not found in {files}")]
    MissingTensor { name: String, files: String },

    #[error("tensor `{name}` in {path}: shape mismatch: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` in {path}: unsupported dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{0}")]
    Input(String),

    /// A GGUF file could not be read (the message names the file and key or tensor).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// A failed read of `path` (a missing file becomes [`ModelError::MissingFile`]).
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        let path = path.into();
        if cause.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile { path }
        } else {
            ModelError::Io { path, cause }
        }
    }

    /// A failed write of `path`.
    pub fn write(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        ModelError::Write {
            path: path.into(),
            cause,
        }
    }

    /// A failed `safetensors::serialize_to_file` of `path`: an I/O failure keeps the I/O
    /// error's message ("No space left on device"), anything else says what safetensors refused.
    pub fn write_safetensors(path: impl Into<PathBuf>, e: safetensors::SafeTensorError) -> Self {
        let cause = match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        };
        Self::write(path, cause)
    }
}

impl From<hone_io::Error> for ModelError {
    fn from(e: hone_io::Error) -> Self {
        ModelError::write(e.path, e.source)
    }
}
