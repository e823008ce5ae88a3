//! Typed errors of the model crate. Every variant names the file, key or tensor at fault and
//! says what was expected, so a user can act on the message without reading the code.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is missing: a Hugging Face model directory needs it")]
    MissingFile { path: PathBuf },

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
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile { path }
        } else {
            ModelError::Io { path, source }
        }
    }
}
