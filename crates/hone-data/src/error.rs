//! Typed errors of the data stage.
//!
//! Problems with one record (a line of JSONL, an element of a JSON array, a CSV row) are
//! [`RecordError`]s that carry the file, the 1-based line and, where one is to blame, the field
//! key. Depending on [`OnError`](crate::OnError) they are either collected into the report or
//! returned as [`DataError::InvalidRecords`]. Everything else (unreadable files, bad config,
//! undetectable formats, output failures) is a [`DataError`] variant of its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One bad input record: `file:line: message`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{file}:{line}: {message}")]
pub struct RecordError {
    /// The input file, as given (after glob expansion).
    pub file: String,
    /// 1-based line where the record starts.
    pub line: usize,
    /// The field at fault, as a dotted path (`conversations.2.value`), where one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What is wrong, e.g. "field `output`: expected a string, found number".
    pub message: String,
}

/// Errors returned by this crate.
#[derive(Debug, Error)]
pub enum DataError {
    /// Reading or writing a file failed. The I/O error is part of the message, not a
    /// `source`, so that error chains (the binary prints them) do not print it twice.
    #[error("cannot {action} {}: {cause}", path.display())]
    Io {
        /// `read` or `write`.
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// An input pattern is not a valid glob.
    #[error("input `{pattern}` is not a valid glob pattern: {message}")]
    BadPattern { pattern: String, message: String },
    /// An input pattern matched no file.
    #[error("input `{pattern}` matches no file")]
    NoMatch { pattern: String },
    /// A file whose name ends in none of the supported extensions.
    #[error(
        "{}: unsupported file type (expected .jsonl, .ndjson, .json, .csv, .tsv or .txt, \
         optionally followed by .gz)",
        path.display()
    )]
    UnsupportedFile { path: PathBuf },
    /// `format = "auto"` could not tell what a file holds.
    #[error("{file}: cannot detect the record format: {message}")]
    Detect { file: String, message: String },
    /// A config value is out of range or inconsistent.
    #[error("config `{key}`: {message}")]
    Config { key: String, message: String },
    /// With `on_error = "fail"`: the bad records found (at least one), in input order.
    #[error("{}{}", errors.first().map(ToString::to_string).unwrap_or_default(),
        if errors.len() > 1 { format!(" (and {} more bad records)", errors.len() - 1) } else { String::new() })]
    InvalidRecords { errors: Vec<RecordError> },
    /// The output directory could not be written.
    #[error("output {}: {message}", path.display())]
    Output { path: PathBuf, message: String },
}

impl DataError {
    /// A failed read of `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        DataError::Io {
            action: "read",
            path: path.into(),
            cause,
        }
    }

    /// A failed write (or create, rename) of `path`.
    pub(crate) fn write(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        DataError::Io {
            action: "write",
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        DataError::Config {
            key: key.to_string(),
            message: message.into(),
        }
    }
}
