//! hone-data: raw training records -> normalised, curated examples with a report.
//!
//! ```text
//! inputs (JSONL / JSON / CSV / TSV / TXT, .gz, globs)      reader
//!   -> records -> examples (alpaca, sharegpt, messages,    format
//!      completion, text; auto-detected per file)
//!   -> NFC + whitespace cleanup                           clean
//!   -> empty / no-assistant / length filters               filter
//!   -> exact duplicates                                    dedupe
//!   -> token-length filter (caller's counter)              filter
//!   -> evaluation 13-gram overlap                          decontam
//!   -> MinHash + LSH near duplicates                       minhash
//!   -> deterministic train/validation split                split
//!   -> train.jsonl, val.jsonl, report.json (atomic)        write, report
//! ```
//!
//! ```no_run
//! use hone_data::{prepare, summary_table, write_prepared, DataConfig};
//! let config = DataConfig::new(["datasets/gsm8k_train.jsonl"]);
//! let prepared = prepare(&config)?;
//! write_prepared(&prepared, std::path::Path::new("runs/data"))?;
//! eprint!("{}", summary_table(&prepared.report));
//! # Ok::<(), hone_data::DataError>(())
//! ```
//!
//! No tokenizer or tensor library is used here: token lengths come from a caller-provided
//! [`TokenCounter`] passed to [`prepare_with`].

pub mod clean;
pub mod config;
pub mod decontam;
pub mod dedupe;
pub mod error;
pub mod example;
pub mod filter;
pub mod format;
pub mod message;
pub mod minhash;
pub mod pipeline;
pub mod reader;
pub mod report;
pub mod shingle;
pub mod split;
pub mod write;

pub use clean::CleanConfig;
pub use config::{DataConfig, DedupeConfig, OnError};
pub use decontam::DecontamConfig;
pub use error::{DataError, RecordError};
pub use example::{Example, Source, SourcedExample};
pub use filter::FilterConfig;
pub use format::{FieldMap, Format, FormatChoice, Layout};
pub use message::{Message, Role};
pub use minhash::NearDedupConfig;
pub use pipeline::{prepare, prepare_with, read_curated, Prepared, TokenCounter};
pub use report::{summary_table, LengthStats, RemovalReason, Report};
pub use shingle::ShingleUnit;
pub use split::SplitConfig;
pub use write::{
    check_output_dir, write_prepared, write_prepared_with, Overwrite, REPORT_FILE, TRAIN_FILE,
    VAL_FILE,
};
