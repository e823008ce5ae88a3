//! Typed errors of the evaluation crate. Every variant names the file, line, key or setting at
//! fault and says what was expected, so a user can fix the input without reading the code.

use std::path::PathBuf;

/// Errors raised while reading evaluation data, running a model or writing a report.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The I/O error is part of the message, not a `source`, so that error chains (the binary
    /// prints them) do not print it twice.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path} does not exist ({what})")]
    MissingPath { path: PathBuf, what: &'static str },

    #[error("{path}:{line}: invalid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{path}:{line}: key `{key}`: expected {expected}, found {found}")]
    Record {
        path: PathBuf,
        line: usize,
        key: String,
        expected: String,
        found: String,
    },

    #[error("{path}: no usable records{detail}")]
    EmptyData { path: PathBuf, detail: String },

    #[error("eval setting `{key}`: {message}")]
    Config { key: String, message: String },

    #[error("prompt template {template:?}: {message}")]
    Template { template: String, message: String },

    /// The template error is part of the message (a `From` impl, not `#[from]`, which would
    /// also make it a `source` printed twice in error chains).
    #[error("chat template: {0}")]
    ChatTemplate(hone_tokenize::TemplateError),

    #[error("tokenizing {task} example {index}: {message}")]
    Tokenize {
        task: String,
        index: usize,
        message: String,
    },

    #[error(transparent)]
    Model(#[from] hone_model::ModelError),

    #[error("adapter `{name}` ({path}): {cause}{hint}")]
    Adapter {
        name: String,
        path: PathBuf,
        cause: Box<hone_model::ModelError>,
        /// Empty, or a hint starting with a space.
        hint: String,
    },

    #[error("cannot read tensor data back from the device: {0}")]
    TensorData(String),

    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },

    #[error("plotting {path}: {message}")]
    Plot { path: PathBuf, message: String },

    #[error("cannot resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },

    /// The evaluation was asked to stop (a signal); the records logged so far stay.
    #[error("evaluation stopped after {records} new record(s){log}")]
    Interrupted {
        records: usize,
        /// Empty, or where the records are and how to continue, starting with a space.
        log: String,
    },

    #[error("baseline {path}: {message}")]
    Baseline { path: PathBuf, message: String },

    /// A `--max-drop` metric that one of the reports does not have.
    #[error("--max-drop {metric}: {message}; metrics in both reports: {available}")]
    UnknownMetric {
        metric: String,
        message: String,
        available: String,
    },

    /// A quality gate failed: a metric dropped by more than allowed plus noise.
    #[error("regression against {baseline}: {failures}")]
    Regression { baseline: PathBuf, failures: String },
}

impl From<hone_tokenize::TemplateError> for EvalError {
    fn from(e: hone_tokenize::TemplateError) -> Self {
        EvalError::ChatTemplate(e)
    }
}

/// Result alias of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        EvalError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}
