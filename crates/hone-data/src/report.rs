//! The curation report (`report.json`) and its human-readable summary table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::error::RecordError;

/// Why an example was removed, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// No message, or an empty message after cleanup.
    Empty,
    /// A chat without any assistant message.
    NoAssistant,
    /// Fewer characters than `filter.min_chars`.
    TooShort,
    /// More characters than `filter.max_chars`.
    TooLong,
    /// Identical (after cleanup) to an earlier example.
    ExactDuplicate,
    /// Fewer tokens than `filter.min_tokens`.
    TooFewTokens,
    /// More tokens than `filter.max_tokens`.
    TooManyTokens,
    /// Shares a long word n-gram with an evaluation record.
    Contaminated,
    /// MinHash near-duplicate of an earlier kept example.
    NearDuplicate,
}

impl RemovalReason {
    pub const ALL: [RemovalReason; 9] = [
        RemovalReason::Empty,
        RemovalReason::NoAssistant,
        RemovalReason::TooShort,
        RemovalReason::TooLong,
        RemovalReason::ExactDuplicate,
        RemovalReason::TooFewTokens,
        RemovalReason::TooManyTokens,
        RemovalReason::Contaminated,
        RemovalReason::NearDuplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RemovalReason::Empty => "empty",
            RemovalReason::NoAssistant => "no_assistant",
            RemovalReason::TooShort => "too_short",
            RemovalReason::TooLong => "too_long",
            RemovalReason::ExactDuplicate => "exact_duplicate",
            RemovalReason::TooFewTokens => "too_few_tokens",
            RemovalReason::TooManyTokens => "too_many_tokens",
            RemovalReason::Contaminated => "contaminated",
            RemovalReason::NearDuplicate => "near_duplicate",
        }
    }
}

/// Examples kept per split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub train: usize,
    pub val: usize,
}

/// How many examples each cleanup step changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleaned {
    pub nfc: usize,
    pub whitespace: usize,
}

/// Distribution of a length over the kept examples (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
}

impl LengthStats {
    /// `None` for an empty list.
    pub fn from_values(values: &[usize]) -> Option<LengthStats> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let r = (p * sorted.len() as f64).ceil() as usize;
            sorted[r.clamp(1, sorted.len()) - 1]
        };
        let sum: u128 = sorted.iter().map(|&v| v as u128).sum();
        Some(LengthStats {
            min: sorted[0],
            median: rank(0.5),
            p95: rank(0.95),
            max: sorted[sorted.len() - 1],
            mean: sum as f64 / sorted.len() as f64,
        })
    }
}

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    pub path: String,
    /// The format and field names used, e.g. `completion (prompt=question, completion=answer)`;
    /// `None` when the file held no readable record.
    pub format: Option<String>,
    /// "explicit", or how `auto` decided.
    pub detection: String,
    /// Records seen (good and bad).
    pub records: usize,
    /// Bad records.
    pub errors: usize,
}

/// A removed example shown for inspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedExample {
    pub file: String,
    pub line: usize,
    /// Why, in detail (e.g. "near-duplicate of data.jsonl:3 (estimated Jaccard 0.86)").
    pub detail: String,
    /// The example's text, cut to [`PREVIEW_CHARS`] characters.
    pub text: String,
}

/// Length of [`RemovedExample::text`].
pub const PREVIEW_CHARS: usize = 300;
/// Removed examples kept per reason.
pub const SAMPLES_PER_REASON: usize = 3;

/// Decontamination summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecontamReport {
    pub eval_files: Vec<String>,
    pub eval_records: usize,
    pub ngram: usize,
    pub distinct_ngrams: usize,
}

/// Everything `report.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Records seen in all inputs, good and bad.
    pub input_records: usize,
    /// The format of all files (`alpaca`, ...), `mixed` when files differ, or `none`.
    pub detected_format: String,
    pub files: Vec<FileReport>,
    pub kept: Kept,
    /// Removed examples per reason (every reason listed, zeros included).
    pub removed: BTreeMap<RemovalReason, usize>,
    pub cleaned: Cleaned,
    /// Bad records that were skipped.
    pub errors: Vec<RecordError>,
    /// Characters per kept example.
    pub char_length: Option<LengthStats>,
    /// Tokens per kept example, when a token counter was given.
    pub token_length: Option<LengthStats>,
    /// Up to [`SAMPLES_PER_REASON`] removed examples per reason.
    pub removed_examples: BTreeMap<RemovalReason, Vec<RemovedExample>>,
    pub decontamination: Option<DecontamReport>,
    /// Seconds spent in `prepare`.
    pub seconds: f64,
    /// The config that produced this report.
    pub config: DataConfig,
}

impl Report {
    pub fn total_removed(&self) -> usize {
        self.removed.values().sum()
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A small table for the terminal, e.g.
///
/// ```text
/// records   7,473 in 1 file, format completion (prompt=question, completion=answer)
/// kept      train 7,093   val 373
/// removed   exact_duplicate 2, near_duplicate 5
/// errors    0
/// chars     min 112   median 420   p95 823   max 1,420
/// ```
pub fn summary_table(report: &Report) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let files = report.files.len();
    let format = match report.files.as_slice() {
        [one] => one.format.clone().unwrap_or_else(|| "none".into()),
        _ => report.detected_format.clone(),
    };
    rows.push((
        "records".into(),
        format!(
            "{} in {} file{}, format {}",
            thousands(report.input_records),
            files,
            if files == 1 { "" } else { "s" },
            format
        ),
    ));
    rows.push((
        "kept".into(),
        format!(
            "train {}   val {}",
            thousands(report.kept.train),
            thousands(report.kept.val)
        ),
    ));
    let removed: Vec<String> = report
        .removed
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(r, &n)| format!("{} {}", r.as_str(), thousands(n)))
        .collect();
    rows.push((
        "removed".into(),
        if removed.is_empty() {
            "0".into()
        } else {
            format!(
                "{} ({})",
                thousands(report.total_removed()),
                removed.join(", ")
            )
        },
    ));
    rows.push(("errors".into(), thousands(report.errors.len())));
    rows.push((
        "cleaned".into(),
        format!(
            "nfc {}   whitespace {}",
            thousands(report.cleaned.nfc),
            thousands(report.cleaned.whitespace)
        ),
    ));
    let stats = |s: &LengthStats| {
        format!(
            "min {}   median {}   p95 {}   max {}",
            thousands(s.min),
            thousands(s.median),
            thousands(s.p95),
            thousands(s.max)
        )
    };
    if let Some(s) = &report.char_length {
        rows.push(("chars".into(), stats(s)));
    }
    if let Some(s) = &report.token_length {
        rows.push(("tokens".into(), stats(s)));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}   {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=100).collect();
        let s = LengthStats::from_values(&v).unwrap();
        assert_eq!((s.min, s.median, s.p95, s.max), (1, 50, 95, 100));
        let one = LengthStats::from_values(&[7]).unwrap();
        assert_eq!((one.min, one.median, one.p95, one.max), (7, 7, 7, 7));
        assert!(LengthStats::from_values(&[]).is_none());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
