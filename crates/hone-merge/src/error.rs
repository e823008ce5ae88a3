//! Typed errors of the merge crate. Each variant names the adapter directory, tensor or file at
//! fault and says what was expected, so that a user can act without reading the code.

use std::path::PathBuf;

use hone_model::ModelError;

/// Errors raised while combining adapters or merging them into a base model.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Reading a model, an adapter configuration or a safetensors file failed.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// The I/O error is part of the message (not a `source`, so that error chains do not
    /// print it twice).
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: cannot write safetensors: {message}")]
    Serialize { path: PathBuf, message: String },

    #[error("no adapter given: at least one adapter directory is needed")]
    NoAdapters,

    #[error("{weights} weight(s) given for {adapters} adapter(s): give one weight per adapter, in the same order")]
    WeightsCount { weights: usize, adapters: usize },

    #[error("weight {index} of the adapter weights is {value}: weights must be finite numbers")]
    InvalidWeight { index: usize, value: f64 },

    #[error("method `{method}`: {message}")]
    Density {
        method: &'static str,
        message: String,
    },

    #[error("method `{method}`: {message}")]
    SvdSetting {
        method: &'static str,
        message: String,
    },

    #[error("module `{module}`: SVD of the {rows}x{cols} combined update failed: {message}")]
    Svd {
        module: String,
        rows: usize,
        cols: usize,
        message: String,
    },

    #[error(
        "method `{method}` needs adapters of equal rank, but {first} has r={first_rank} and {other} has \
         r={other_rank} (`cat` combines adapters of different ranks)"
    )]
    RankMismatch {
        method: &'static str,
        first: PathBuf,
        first_rank: usize,
        other: PathBuf,
        other_rank: usize,
    },

    #[error(
        "method `{method}` needs equal ranks on module `{module}`, but {first} gives it rank {first_rank} \
         and {other} rank {other_rank} (rank_pattern differs; `cat` combines them)"
    )]
    ModuleRankMismatch {
        method: &'static str,
        module: String,
        first: PathBuf,
        first_rank: usize,
        other: PathBuf,
        other_rank: usize,
    },

    #[error(
        "adapter {adapter}: tensor `{tensor}` is not a LoRA matrix hone can merge \
         (expected `base_model.model.<module>.lora_A.weight` or `...lora_B.weight`)"
    )]
    UnexpectedTensor { adapter: PathBuf, tensor: String },

    #[error("adapter {adapter}: `{present}` has no partner `{missing}`")]
    MissingPair {
        adapter: PathBuf,
        present: String,
        missing: String,
    },

    #[error(
        "adapter {adapter}: tensor `{tensor}`: expected shape {expected:?} ({why}), found {found:?} \
         (is the adapter made for another base model?)"
    )]
    ShapeMismatch {
        adapter: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        why: String,
    },

    #[error(
        "adapter {adapter} targets module `{module}`, but the base model {base} has no 2-D tensor \
         `{tensor}` (is the adapter made for another base model?)"
    )]
    NotInBase {
        adapter: PathBuf,
        module: String,
        tensor: String,
        base: PathBuf,
    },

    #[error(
        "adapter {adapter} targets `{module}`, which the merged model does not store \
         ({base} ties lm_head to the embeddings)"
    )]
    TiedTarget {
        adapter: PathBuf,
        module: String,
        base: PathBuf,
    },

    #[error("{path} already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },

    #[error(
        "the output {path} is or contains the {what} {input}: replacing it would delete that \
         input (even with --force); choose another output directory"
    )]
    OutputIsInput {
        path: PathBuf,
        /// The input inside `path` (or equal to it).
        input: PathBuf,
        /// `base model` or `adapter`.
        what: &'static str,
    },

    #[error("invalid size `{input}`: {message} (examples: 5GB, 500MB, 2GiB, 1000000)")]
    InvalidSize { input: String, message: String },

    #[error("{path}: key `{key}`: {message}")]
    InvalidConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;

impl MergeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MergeError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

impl From<hone_io::Error> for MergeError {
    fn from(e: hone_io::Error) -> Self {
        MergeError::io(e.path, e.source)
    }
}

impl From<hone_model::gguf::GgufError> for MergeError {
    fn from(e: hone_model::gguf::GgufError) -> Self {
        MergeError::Model(e.into())
    }
}
