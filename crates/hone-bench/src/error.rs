//! Typed errors of the benchmark tooling: what the server under load, the HTTP client or a
//! benchmark's own settings refused.

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

/// Result alias of this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
