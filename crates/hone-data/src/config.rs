//! The data-stage config: what to read, how to read it, and which curation steps run.
//!
//! Every struct denies unknown fields and fills missing ones with defaults, so a TOML table
//! such as
//!
//! ```toml
//! inputs = ["datasets/gsm8k_train.jsonl"]
//! format = "completion"
//! fields = { prompt = "question", completion = "answer" }
//! on_error = "skip"
//! max_record_bytes = 8388608
//! [dedupe.near]
//! threshold = 0.8
//! [decontaminate]
//! eval_files = ["datasets/eval/*.jsonl"]
//! ```
//!
//! is a complete config. [`DataConfig::validate`] checks ranges before any work starts.

use serde::{Deserialize, Serialize};

use crate::clean::CleanConfig;
use crate::decontam::DecontamConfig;
use crate::error::DataError;
use crate::filter::FilterConfig;
use crate::format::{FieldMap, FormatChoice};
use crate::minhash::NearDedupConfig;
use crate::reader::DEFAULT_MAX_RECORD_BYTES;
use crate::split::SplitConfig;

/// What to do with a bad record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Return [`DataError::InvalidRecords`] before anything is written.
    #[default]
    Fail,
    /// Skip the record and list it in the report's `errors`.
    Skip,
}

/// Duplicate removal settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// Remove exact duplicates (after cleanup).
    pub exact: bool,
    /// MinHash + LSH near-duplicate removal.
    pub near: NearDedupConfig,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            exact: true,
            near: NearDedupConfig::default(),
        }
    }
}

/// The whole data-stage config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Input files or glob patterns (`data/*.jsonl.gz`).
    pub inputs: Vec<String>,
    /// Record format, or `auto` to detect it per file.
    pub format: FormatChoice,
    /// Field-name overrides.
    pub fields: FieldMap,
    /// What to do with bad records.
    pub on_error: OnError,
    /// Longest record in bytes (a JSONL line, a JSON array element, a CSV row, a `.txt`
    /// file); a longer one is a bad record (skipped or fatal per `on_error`). Default 8 MiB
    /// ([`crate::reader::DEFAULT_MAX_RECORD_BYTES`]).
    pub max_record_bytes: usize,
    pub clean: CleanConfig,
    pub filter: FilterConfig,
    pub dedupe: DedupeConfig,
    pub decontaminate: DecontamConfig,
    pub split: SplitConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            inputs: Vec::new(),
            format: FormatChoice::default(),
            fields: FieldMap::default(),
            on_error: OnError::default(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            clean: CleanConfig::default(),
            filter: FilterConfig::default(),
            dedupe: DedupeConfig::default(),
            decontaminate: DecontamConfig::default(),
            split: SplitConfig::default(),
        }
    }
}

impl DataConfig {
    /// A default config reading `inputs`.
    pub fn new<S: Into<String>>(inputs: impl IntoIterator<Item = S>) -> Self {
        DataConfig {
            inputs: inputs.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Checks every value before any work starts.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.inputs.is_empty() {
            return Err(DataError::config(
                "inputs",
                "at least one input file is required",
            ));
        }
        if self.max_record_bytes == 0 {
            return Err(DataError::config(
                "max_record_bytes",
                "expected a positive number of bytes, found 0",
            ));
        }
        for (key, value) in self.fields.entries() {
            if let Some(v) = value {
                if v.is_empty() || v.split('.').any(str::is_empty) {
                    return Err(DataError::config(
                        &format!("fields.{key}"),
                        format!("`{v}` is not a field name or dotted path"),
                    ));
                }
            }
        }
        if let Some(format) = self.format.format() {
            if let Some(key) = self.fields.unused_by(format).first() {
                return Err(DataError::config(
                    &format!("fields.{key}"),
                    format!("is not used by format `{format}`"),
                ));
            }
        }
        self.filter.validate()?;
        if self.dedupe.near.enabled {
            self.dedupe.near.validate()?;
        }
        self.decontaminate.validate()?;
        self.split.validate()
    }
}
