//! Typed errors of the benchmark tooling: what the server under load, the HTTP client, the
//! stages a benchmark drives or its own settings refused.

use std::path::PathBuf;

use hone_model::ModelError;
use hone_serve::ServeError;

/// Errors raised while preparing or running a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Starting or talking to the server under test failed.
    #[error(transparent)]
    Serve(#[from] ServeError),

    /// Reading or writing a model or adapter failed.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// Curation, or reading a benchmark's input records, failed.
    #[error(transparent)]
    Data(Box<hone_data::DataError>),

    /// Tokenization failed.
    #[error(transparent)]
    Tokenize(Box<hone_tokenize::TokenizeError>),

    /// A training step (or setting up the step engine) failed.
    #[error(transparent)]
    Train(Box<hone_train::TrainError>),

    /// Loading a model or its tokenizer from a directory failed.
    #[error("loading {what} {}: {source}", path.display())]
    Load {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },

    /// The chat template could not be loaded.
    #[error("chat template `{template}` of {}: {source}", model.display())]
    Template {
        template: String,
        model: PathBuf,
        #[source]
        source: Box<hone_tokenize::TemplateError>,
    },

    /// The records a benchmark reads are unusable.
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },

    /// Reading a tensor back to the host failed.
    #[error("reading a tensor back: {0}")]
    Tensor(String),

    #[error("invalid setting `{key}`: {message}")]
    Config { key: &'static str, message: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("HTTP client: {0}")]
    Client(String),

    #[error(
        "refusing to send traffic to {0}: the load tool and client only talk to loopback addresses"
    )]
    NotLoopback(String),
}

// The stages' errors are large; boxed, a `Result` of this crate stays small.
impl From<hone_data::DataError> for BenchError {
    fn from(e: hone_data::DataError) -> Self {
        Self::Data(Box::new(e))
    }
}

impl From<hone_tokenize::TokenizeError> for BenchError {
    fn from(e: hone_tokenize::TokenizeError) -> Self {
        Self::Tokenize(Box::new(e))
    }
}

impl From<hone_train::TrainError> for BenchError {
    fn from(e: hone_train::TrainError) -> Self {
        Self::Train(Box::new(e))
    }
}

/// Result alias of this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
