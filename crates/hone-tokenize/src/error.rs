//! Typed errors of the tokenization stage (examples -> rows -> cached shards).
//!
//! Template problems keep their own type ([`TemplateError`]); everything that fails for one
//! example is wrapped with the example's index so that a message reaching the user says which
//! record to look at.

use std::path::PathBuf;

use crate::chat::TemplateError;

/// What went wrong while turning one example into token ids and labels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExampleError {
    /// The chat template failed (raised, not prefix-stable, bad syntax, ...).
    #[error(transparent)]
    Template(#[from] TemplateError),

    /// A conversation was given but no chat template was.
    #[error("it is a conversation, but no chat template was given")]
    NoTemplate,

    /// The tokenizer failed on the text.
    #[error("the tokenizer failed: {message}")]
    Encode {
        /// The tokenizer's message.
        message: String,
    },

    /// `add_eos` is set but the tokenizer spec names no EOS id.
    #[error(
        "add_eos is set for a {format} example but no EOS token id is known; set the tokenizer's \
         eos_token (tokenizer_config.json) or set add_eos = false"
    )]
    MissingEos {
        /// `completion` or `text`.
        format: &'static str,
    },
}

/// What went wrong while tokenizing a data set, packing it, or reading/writing its cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizeError {
    /// One example could not be tokenized.
    #[error("example {index}: {source}")]
    Example {
        /// 0-based position of the example in the input.
        index: usize,
        /// Why.
        #[source]
        source: ExampleError,
    },

    /// A setting is out of range.
    #[error("tokenize config: `{field}`: {message}")]
    InvalidConfig {
        /// The config field.
        field: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },

    /// A row does not fit the length a batch was asked to have.
    #[error("row {row} has {len} tokens, more than the batch length {pad_to}")]
    RowTooLong {
        /// Index of the row in the batch.
        row: usize,
        /// Its length.
        len: usize,
        /// The requested batch length.
        pad_to: usize,
    },

    /// The tokenizer could not be serialised to compute the cache key.
    #[error("cannot fingerprint the tokenizer: {message}")]
    Fingerprint {
        /// The tokenizer's message.
        message: String,
    },

    /// A file or directory of the cache could not be read or written.
    #[error("cache: cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `create`, `rename`, ...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A cache file exists but is not what hone wrote.
    #[error("cache: {}: {message}", path.display())]
    CorruptCache {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl TokenizeError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::CorruptCache {
            path: path.into(),
            message: message.into(),
        }
    }
}
