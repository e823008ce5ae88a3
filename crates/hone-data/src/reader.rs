//! Reading raw records from files: JSONL, JSON arrays, CSV/TSV and plain text, each optionally
//! gzip-compressed (`.gz`), from paths or glob patterns.
//!
//! Every record is a JSON value plus the 1-based line it starts on. A CSV row becomes an object
//! of its header names to string values; a `.txt` file is one record `{"text": <whole file>}`.
//! Bad records (malformed JSON, invalid UTF-8, empty lines, ragged CSV rows) are returned as
//! [`RecordError`]s beside the good ones, never as a panic; only problems with a whole file
//! (cannot open, corrupt gzip, unknown extension) are [`DataError`]s.
//!
//! JSONL rules: each line holds one JSON value; the newline ending the last line is not an
//! extra line, but any other empty or whitespace-only line is an error ("empty line"), since it
//! usually marks a broken export. A `.json` file whose first non-blank byte is `[` is read as
//! one array (a syntax error then fails the whole file, at the line serde_json reports);
//! otherwise it is read as JSONL. A UTF-8 byte-order mark at the start is ignored.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{DataError, RecordError};

/// One parsed record and the line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRecord {
    pub line: usize,
    pub value: Value,
}

/// The records of one file, in file order, and the bad ones.
#[derive(Clone, Debug)]
pub struct FileRecords {
    pub path: Arc<str>,
    pub records: Vec<RawRecord>,
    pub errors: Vec<RecordError>,
}

/// How a file is laid out, from its extension (after removing `.gz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    /// `.jsonl`, `.ndjson`, or `.json` not starting with `[`.
    JsonLines,
    /// `.json` starting with `[`.
    JsonArray,
    /// `.csv` (`,`) or `.tsv` (tab), with a header row.
    Delimited(u8),
    /// `.txt`: the whole file is one text record.
    PlainText,
}

/// Expands paths and glob patterns into a list of files, in the order given; files matched by
/// several patterns are read once. An existing path is taken literally even if it holds glob
/// characters; a pattern that matches nothing is an error.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for pattern in patterns {
        let literal = Path::new(pattern);
        let matched: Vec<PathBuf> = if literal.exists() {
            vec![literal.to_path_buf()]
        } else {
            let paths = glob::glob(pattern).map_err(|e| DataError::BadPattern {
                pattern: pattern.clone(),
                message: e.to_string(),
            })?;
            let mut found = Vec::new();
            for entry in paths {
                let path = entry.map_err(|e| {
                    let path = e.path().to_path_buf();
                    DataError::io(path, e.into())
                })?;
                if path.is_file() {
                    found.push(path);
                }
            }
            found.sort();
            found
        };
        if matched.is_empty() {
            return Err(DataError::NoMatch {
                pattern: pattern.clone(),
            });
        }
        for path in matched {
            if seen.insert(path.clone()) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// Reads every record of one file.
pub fn read_records(path: &Path) -> Result<FileRecords, DataError> {
    let name = path.to_string_lossy().into_owned();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), true),
        None => (name.clone(), false),
    };
    let ext = Path::new(&stem)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let kind = match ext.as_str() {
        "jsonl" | "ndjson" | "json" => FileKind::JsonLines,
        "csv" => FileKind::Delimited(b','),
        "tsv" => FileKind::Delimited(b'\t'),
        "txt" => FileKind::PlainText,
        _ => {
            return Err(DataError::UnsupportedFile {
                path: path.to_path_buf(),
            })
        }
    };
    let bytes = read_bytes(path, gz)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let kind = if ext == "json" && first_non_blank(bytes) == Some(b'[') {
        FileKind::JsonArray
    } else {
        kind
    };
    let file: Arc<str> = Arc::from(name.as_str());
    let (records, errors) = match kind {
        FileKind::JsonLines => parse_json_lines(&file, bytes),
        FileKind::JsonArray => parse_json_array(&file, bytes),
        FileKind::Delimited(d) => parse_delimited(&file, bytes, d),
        FileKind::PlainText => parse_plain_text(&file, bytes),
    };
    tracing::debug!(file = %file, records = records.len(), errors = errors.len(), "read");
    Ok(FileRecords {
        path: file,
        records,
        errors,
    })
}

fn read_bytes(path: &Path, gz: bool) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !gz {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| DataError::io(path, e))?;
    Ok(out)
}

fn first_non_blank(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !b.is_ascii_whitespace())
}

fn record_error(file: &Arc<str>, line: usize, message: impl Into<String>) -> RecordError {
    RecordError {
        file: file.to_string(),
        line,
        key: None,
        message: message.into(),
    }
}

/// serde_json's message without its " at line L column C" suffix (we report our own line).
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn parse_json_lines(file: &Arc<str>, bytes: &[u8]) -> (Vec<RawRecord>, Vec<RecordError>) {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop(); // the newline that ends the last line
    }
    let parsed: Vec<Result<RawRecord, RecordError>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, raw)| {
            let line = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let text = std::str::from_utf8(raw).map_err(|e| {
                record_error(
                    file,
                    line,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
                )
            })?;
            if text.trim().is_empty() {
                return Err(record_error(file, line, "empty line"));
            }
            serde_json::from_str::<Value>(text)
                .map(|value| RawRecord { line, value })
                .map_err(|e| {
                    record_error(
                        file,
                        line,
                        format!(
                            "malformed JSON at column {}: {}",
                            e.column(),
                            json_message(&e)
                        ),
                    )
                })
        })
        .collect();
    split_results(parsed)
}

fn parse_json_array(file: &Arc<str>, bytes: &[u8]) -> (Vec<RawRecord>, Vec<RecordError>) {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = line_of_offset(bytes, e.valid_up_to());
            return (
                Vec::new(),
                vec![record_error(
                    file,
                    line,
                    "invalid UTF-8 (the whole JSON array file is skipped)",
                )],
            );
        }
    };
    let items: Vec<&RawValue> = match serde_json::from_str(text) {
        Ok(items) => items,
        Err(e) => {
            let message = format!(
                "malformed JSON array at column {}: {} (the whole file is skipped)",
                e.column(),
                json_message(&e)
            );
            return (
                Vec::new(),
                vec![record_error(file, e.line().max(1), message)],
            );
        }
    };
    let base = text.as_ptr() as usize;
    let newlines: Vec<usize> = memchr_all(text.as_bytes(), b'\n');
    let parsed = items
        .par_iter()
        .map(|raw| {
            let offset = (raw.get().as_ptr() as usize).saturating_sub(base);
            let line = newlines.partition_point(|&n| n < offset) + 1;
            serde_json::from_str::<Value>(raw.get())
                .map(|value| RawRecord { line, value })
                .map_err(|e| {
                    record_error(file, line, format!("malformed JSON: {}", json_message(&e)))
                })
        })
        .collect();
    split_results(parsed)
}

fn memchr_all(bytes: &[u8], needle: u8) -> Vec<usize> {
    bytes
        .iter()
        .enumerate()
        .filter_map(|(i, &b)| (b == needle).then_some(i))
        .collect()
}

fn line_of_offset(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn parse_delimited(
    file: &Arc<str>,
    bytes: &[u8],
    delimiter: u8,
) -> (Vec<RawRecord>, Vec<RecordError>) {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let headers: Vec<String> = match reader.byte_headers() {
        Ok(h) => {
            let mut names = Vec::with_capacity(h.len());
            for (i, field) in h.iter().enumerate() {
                match std::str::from_utf8(field) {
                    Ok(s) => names.push(s.trim().to_string()),
                    Err(_) => {
                        let msg = format!(
                            "invalid UTF-8 in header column {} (the whole file is skipped)",
                            i + 1
                        );
                        return (Vec::new(), vec![record_error(file, 1, msg)]);
                    }
                }
            }
            names
        }
        Err(e) => {
            let msg = format!("cannot read the CSV header: {e} (the whole file is skipped)");
            return (Vec::new(), vec![record_error(file, 1, msg)]);
        }
    };
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let mut row = csv::ByteRecord::new();
    loop {
        let line = reader.position().line() as usize;
        match reader.read_byte_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {
                let line = row.position().map_or(line, |p| p.line() as usize);
                let mut object = serde_json::Map::with_capacity(headers.len());
                let mut bad = None;
                for (name, field) in headers.iter().zip(row.iter()) {
                    match std::str::from_utf8(field) {
                        Ok(s) => {
                            object.insert(name.clone(), Value::String(s.to_string()));
                        }
                        Err(e) => {
                            bad = Some(RecordError {
                                file: file.to_string(),
                                line,
                                key: Some(name.clone()),
                                message: format!(
                                    "column `{name}`: invalid UTF-8 at byte {}",
                                    e.valid_up_to() + 1
                                ),
                            });
                            break;
                        }
                    }
                }
                match bad {
                    Some(err) => errors.push(err),
                    None => records.push(RawRecord {
                        line,
                        value: Value::Object(object),
                    }),
                }
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line() as usize);
                let message = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("expected {expected_len} columns, found {len}"),
                    _ => format!("malformed CSV: {e}"),
                };
                let fatal = !matches!(e.kind(), csv::ErrorKind::UnequalLengths { .. });
                errors.push(record_error(file, line, message));
                if fatal {
                    break;
                }
            }
        }
    }
    (records, errors)
}

fn parse_plain_text(file: &Arc<str>, bytes: &[u8]) -> (Vec<RawRecord>, Vec<RecordError>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut object = serde_json::Map::new();
            object.insert("text".to_string(), Value::String(text.to_string()));
            (
                vec![RawRecord {
                    line: 1,
                    value: Value::Object(object),
                }],
                Vec::new(),
            )
        }
        Err(e) => {
            let line = line_of_offset(bytes, e.valid_up_to());
            (
                Vec::new(),
                vec![record_error(
                    file,
                    line,
                    "invalid UTF-8 (the whole text file is skipped)",
                )],
            )
        }
    }
}

fn split_results(
    parsed: Vec<Result<RawRecord, RecordError>>,
) -> (Vec<RawRecord>, Vec<RecordError>) {
    let mut records = Vec::with_capacity(parsed.len());
    let mut errors = Vec::new();
    for r in parsed {
        match r {
            Ok(rec) => records.push(rec),
            Err(e) => errors.push(e),
        }
    }
    (records, errors)
}
