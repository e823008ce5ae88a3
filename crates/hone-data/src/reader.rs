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
//!
//! Size limit: a record (a JSONL line, a JSON array element, a CSV row, a whole `.txt` file)
//! longer than `max_record_bytes` ([`DEFAULT_MAX_RECORD_BYTES`] unless configured) is a bad
//! record naming its file, line and size. JSONL is read line by line through a bounded reader,
//! so such a line is skipped without ever being held in memory; JSON arrays and CSV rows are
//! checked once parsed, before any further work.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
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

/// The default of `max_record_bytes`: 8 MiB, about two million tokens of text, far beyond
/// any training context, while a larger record (often a whole file exported as one line)
/// would cost seconds and gigabytes of memory in cleanup and deduplication.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 8 << 20;

/// Reads every record of one file, with the default record size limit.
pub fn read_records(path: &Path) -> Result<FileRecords, DataError> {
    read_records_limited(path, DEFAULT_MAX_RECORD_BYTES)
}

/// Reads every record of one file; a record longer than `max_record_bytes` is a bad record.
pub fn read_records_limited(
    path: &Path,
    max_record_bytes: usize,
) -> Result<FileRecords, DataError> {
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
    let kind = if ext == "json" && first_non_blank(path, gz)? == Some(b'[') {
        FileKind::JsonArray
    } else {
        kind
    };
    let file: Arc<str> = Arc::from(name.as_str());
    let limit = max_record_bytes;
    let (records, errors) = match kind {
        FileKind::JsonLines => {
            let lines = read_lines_bounded(path, &mut open(path, gz)?, limit)?;
            parse_json_lines(&file, lines, limit)
        }
        FileKind::JsonArray => {
            let bytes = read_bytes(path, gz, None)?;
            parse_json_array(&file, strip_bom(&bytes), limit)
        }
        FileKind::Delimited(d) => {
            let mut reader = open(path, gz)?;
            skip_bom(path, &mut reader)?;
            parse_delimited(path, &file, reader, d, limit)?
        }
        FileKind::PlainText => match read_bytes(path, gz, Some(limit))? {
            bytes if bytes.len() > limit => (
                Vec::new(),
                vec![too_long(&file, 1, "the text file is", None, limit)],
            ),
            bytes => parse_plain_text(&file, strip_bom(&bytes)),
        },
    };
    tracing::debug!(file = %file, records = records.len(), errors = errors.len(), "read");
    Ok(FileRecords {
        path: file,
        records,
        errors,
    })
}

/// A buffered reader of the file's (decompressed) bytes.
fn open(path: &Path, gz: bool) -> Result<Box<dyn BufRead + Send>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    })
}

/// The file's (decompressed) bytes; with `limit`, at most `limit + 1` of them (enough to tell
/// that the file is longer than `limit`).
fn read_bytes(path: &Path, gz: bool, limit: Option<usize>) -> Result<Vec<u8>, DataError> {
    let mut reader = open(path, gz)?;
    let mut out = Vec::new();
    match limit {
        Some(limit) => reader.take(limit as u64 + 1).read_to_end(&mut out),
        None => reader.read_to_end(&mut out),
    }
    .map_err(|e| DataError::io(path, e))?;
    Ok(out)
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Consumes a UTF-8 byte-order mark at the start of `reader`, if there is one.
fn skip_bom(path: &Path, reader: &mut impl BufRead) -> Result<(), DataError> {
    let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
    if head.starts_with(BOM) {
        reader.consume(BOM.len());
    }
    Ok(())
}

/// The first byte of the file (after a byte-order mark) that is not ASCII whitespace.
fn first_non_blank(path: &Path, gz: bool) -> Result<Option<u8>, DataError> {
    let mut reader = open(path, gz)?;
    skip_bom(path, &mut reader)?;
    loop {
        let buf = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(&b) = buf.iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// One line of a JSONL file as read: its bytes (without the newline), or only its length when
/// it is longer than the limit.
enum Line {
    Bytes(Vec<u8>),
    TooLong(usize),
}

/// Reads the lines of `reader`, never holding more than `limit + 1` bytes of one line: the rest
/// of a longer line is skipped (and counted). The newline ending the last line is not an extra
/// line; a byte-order mark at the start is dropped.
fn read_lines_bounded(
    path: &Path,
    reader: &mut impl BufRead,
    limit: usize,
) -> Result<Vec<Line>, DataError> {
    let io = |e| DataError::io(path, e);
    skip_bom(path, reader)?;
    let mut lines = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = reader
            .by_ref()
            .take(limit as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            lines.push(Line::Bytes(buf));
        } else if buf.len() <= limit {
            lines.push(Line::Bytes(buf)); // the last line, without a newline
        } else {
            // Longer than the limit: skip to the end of the line without keeping it.
            let mut total = buf.len();
            drop(buf);
            loop {
                let chunk = reader.fill_buf().map_err(io)?;
                if chunk.is_empty() {
                    break;
                }
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        total += i;
                        reader.consume(i + 1);
                        break;
                    }
                    None => {
                        let len = chunk.len();
                        total += len;
                        reader.consume(len);
                    }
                }
            }
            lines.push(Line::TooLong(total));
        }
    }
    Ok(lines)
}

/// "line is N bytes, more than max_record_bytes = L" (`N` unknown: "more than").
fn too_long(
    file: &Arc<str>,
    line: usize,
    what: &str,
    bytes: Option<usize>,
    limit: usize,
) -> RecordError {
    let size = match bytes {
        Some(n) => format!("{n} bytes"),
        None => format!("more than {limit} bytes"),
    };
    record_error(
        file,
        line,
        format!(
            "{what} {size}, longer than max_record_bytes = {limit} (raise `max_record_bytes` in \
             the [data] config to accept it)"
        ),
    )
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

fn parse_json_lines(
    file: &Arc<str>,
    lines: Vec<Line>,
    limit: usize,
) -> (Vec<RawRecord>, Vec<RecordError>) {
    let parsed: Vec<Result<RawRecord, RecordError>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, raw)| {
            let line = i + 1;
            let raw = match raw {
                Line::Bytes(bytes) => bytes.as_slice(),
                Line::TooLong(n) => return Err(too_long(file, line, "line is", Some(*n), limit)),
            };
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

fn parse_json_array(
    file: &Arc<str>,
    bytes: &[u8],
    limit: usize,
) -> (Vec<RawRecord>, Vec<RecordError>) {
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
            let len = raw.get().len();
            if len > limit {
                return Err(too_long(file, line, "array element is", Some(len), limit));
            }
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

/// Reads CSV/TSV rows; an I/O failure of `input` (e.g. corrupt gzip) fails the whole file.
fn parse_delimited(
    path: &Path,
    file: &Arc<str>,
    input: impl Read,
    delimiter: u8,
    limit: usize,
) -> Result<(Vec<RawRecord>, Vec<RecordError>), DataError> {
    let io_error = |e: csv::Error| match e.into_kind() {
        csv::ErrorKind::Io(e) => DataError::io(path, e),
        other => DataError::io(path, std::io::Error::other(format!("{other:?}"))),
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(input);
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
                        return Ok((Vec::new(), vec![record_error(file, 1, msg)]));
                    }
                }
            }
            names
        }
        Err(e) if e.is_io_error() => return Err(io_error(e)),
        Err(e) => {
            let msg = format!("cannot read the CSV header: {e} (the whole file is skipped)");
            return Ok((Vec::new(), vec![record_error(file, 1, msg)]));
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
                let len = row.as_slice().len();
                if len > limit {
                    errors.push(too_long(file, line, "row is", Some(len), limit));
                    continue;
                }
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
            Err(e) if e.is_io_error() => return Err(io_error(e)),
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
    Ok((records, errors))
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
