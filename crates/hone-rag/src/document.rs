//! Reading a corpus: JSONL records and Markdown / plain-text files, from paths, directories and
//! glob patterns.
//!
//! - `.jsonl`, `.ndjson`, `.json` (optionally `.gz`): one document per record
//!   `{"id": ..., "title": ..., "text": ...}`; `id` (string or integer) and a non-blank `text`
//!   are required, `title` defaults to the id, other fields are ignored. The JSONL rules (empty
//!   lines, byte-order mark, JSON arrays) are hone-data's ([`hone_data::reader`]).
//! - `.md`, `.markdown`, `.txt`: one document per file; the id is the path as found (with `/`
//!   separators), the title the first Markdown `# heading`, else the file stem. The text is the
//!   file without a leading UTF-8 byte-order mark; chunk offsets index into exactly that text.
//! - A directory is walked recursively in name order, reading the files with those extensions
//!   and skipping hidden entries; a glob pattern matches files.
//!
//! A bad record (malformed JSON, missing field, blank text, invalid UTF-8, a duplicate id) is a
//! [`RecordError`] with its file and line; [`OnError`] says whether it fails the read or is
//! skipped with a warning. Unreadable inputs and unsupported explicit files are always errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hone_data::reader::{expand_inputs, read_records};
use hone_data::{OnError, RecordError};
use serde_json::Value;

use crate::error::{RagError, Result};

/// One document of the corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Unique within the index; chunk ids are `{id}#{position}`.
    pub id: String,
    pub title: String,
    /// Where it came from: `file:line` for a record, the path for a file.
    pub source: String,
    pub text: String,
}

/// The documents read from some inputs, and the bad records skipped (with `OnError::Skip`).
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    pub documents: Vec<Document>,
    pub skipped: Vec<RecordError>,
}

/// How a file is read, from its extension (after removing `.gz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DocKind {
    Records,
    Markdown,
    PlainText,
}

fn doc_kind(path: &Path) -> Option<DocKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let (name, gz) = match name.strip_suffix(".gz") {
        Some(stem) => (stem, true),
        None => (name.as_str(), false),
    };
    match (Path::new(name).extension()?.to_str()?, gz) {
        ("jsonl" | "ndjson" | "json", _) => Some(DocKind::Records),
        ("md" | "markdown", false) => Some(DocKind::Markdown),
        ("txt", false) => Some(DocKind::PlainText),
        _ => None,
    }
}

/// Reads every document of `inputs` (paths, directories, glob patterns), in input order.
/// An empty result is [`RagError::EmptyCorpus`].
pub fn read_corpus(inputs: &[String], on_error: OnError) -> Result<Corpus> {
    let files = resolve_inputs(inputs)?;
    let mut corpus = Corpus::default();
    let mut errors = Vec::new();
    for file in &files {
        match doc_kind(file) {
            Some(DocKind::Records) => read_record_file(file, &mut corpus.documents, &mut errors)?,
            Some(kind) => match read_text_file(file, kind)? {
                Ok(doc) => corpus.documents.push(doc),
                Err(e) => errors.push(e),
            },
            None => return Err(RagError::UnsupportedFile { path: file.clone() }),
        }
    }
    reject_duplicates(&mut corpus.documents, &mut errors);
    if !errors.is_empty() {
        match on_error {
            OnError::Fail => return Err(RagError::InvalidDocuments { errors }),
            OnError::Skip => {
                for e in &errors {
                    tracing::warn!("skipped: {e}");
                }
            }
        }
    }
    corpus.skipped = errors;
    if corpus.documents.is_empty() {
        return Err(RagError::EmptyCorpus {
            inputs: inputs.join(", "),
        });
    }
    tracing::debug!(
        files = files.len(),
        documents = corpus.documents.len(),
        skipped = corpus.skipped.len(),
        "read corpus"
    );
    Ok(corpus)
}

/// Paths, directories (walked) and globs -> files, each once, in input order.
fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            let before = files.len();
            walk_dir(path, &mut files)?;
            if files.len() == before {
                tracing::warn!("{input}: directory holds no .jsonl, .md or .txt file");
            }
        } else {
            files.extend(expand_inputs(std::slice::from_ref(input))?);
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    Ok(files)
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RagError::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| RagError::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk_dir(&path, out)?;
        } else if doc_kind(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

fn display_path(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "/")
}

fn record_error(file: &str, line: usize, message: impl Into<String>) -> RecordError {
    RecordError {
        file: file.to_string(),
        line,
        key: None,
        message: message.into(),
    }
}

fn read_record_file(
    path: &Path,
    docs: &mut Vec<Document>,
    errors: &mut Vec<RecordError>,
) -> Result<()> {
    let records = read_records(path)?;
    errors.extend(records.errors);
    let file = records.path.to_string();
    for record in records.records {
        match record_document(&file, record.line, &record.value) {
            Ok(doc) => docs.push(doc),
            Err(e) => errors.push(e),
        }
    }
    Ok(())
}

/// One `{id, title, text}` record -> a document.
fn record_document(file: &str, line: usize, value: &Value) -> Result<Document, RecordError> {
    let field_error = |key: &str, message: String| RecordError {
        file: file.to_string(),
        line,
        key: Some(key.to_string()),
        message,
    };
    let Value::Object(map) = value else {
        return Err(record_error(
            file,
            line,
            format!("expected a JSON object, found {}", kind_of(value)),
        ));
    };
    let id = match map.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(field_error(
                "id",
                format!(
                    "field `id`: expected a non-empty string or a number, found {}",
                    kind_of(other)
                ),
            ))
        }
        None => return Err(field_error("id", "missing field `id`".into())),
    };
    let text = match map.get("text") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(field_error("text", "field `text` is blank".into())),
        Some(other) => {
            return Err(field_error(
                "text",
                format!("field `text`: expected a string, found {}", kind_of(other)),
            ))
        }
        None => return Err(field_error("text", "missing field `text`".into())),
    };
    let title = match map.get("title") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => id.clone(),
        Some(other) => {
            return Err(field_error(
                "title",
                format!("field `title`: expected a string, found {}", kind_of(other)),
            ))
        }
    };
    Ok(Document {
        id,
        title,
        source: format!("{file}:{line}"),
        text,
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A whole Markdown or text file -> one document (an inner `Err` is a bad document).
fn read_text_file(path: &Path, kind: DocKind) -> Result<Result<Document, RecordError>> {
    let file = display_path(path);
    let bytes = std::fs::read(path).map_err(|e| RagError::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            return Ok(Err(record_error(&file, line, "invalid UTF-8")));
        }
    };
    if text.trim().is_empty() {
        return Ok(Err(record_error(&file, 1, "empty document")));
    }
    let heading = (kind == DocKind::Markdown)
        .then(|| markdown_title(text))
        .flatten();
    let title = heading.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone())
    });
    Ok(Ok(Document {
        id: file.clone(),
        title,
        source: file,
        text: text.to_string(),
    }))
}

/// The text of the first ATX heading (`# Title`) of a Markdown document.
fn markdown_title(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim_start_matches('#');
        let level = line.len() - rest.len();
        ((1..=6).contains(&level) && rest.starts_with(' '))
            .then(|| rest.trim().trim_end_matches('#').trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

/// A later document with an id seen before is a bad record.
fn reject_duplicates(docs: &mut Vec<Document>, errors: &mut Vec<RecordError>) {
    let mut first: HashMap<String, String> = HashMap::new();
    docs.retain(|doc| match first.get(&doc.id) {
        Some(source) => {
            let (file, line) = split_source(&doc.source);
            errors.push(record_error(
                &file,
                line,
                format!("duplicate document id `{}` (first at {source})", doc.id),
            ));
            false
        }
        None => {
            first.insert(doc.id.clone(), doc.source.clone());
            true
        }
    });
}

fn split_source(source: &str) -> (String, usize) {
    match source.rsplit_once(':') {
        Some((file, line)) if line.parse::<usize>().is_ok() => {
            (file.to_string(), line.parse().unwrap_or(1))
        }
        _ => (source.to_string(), 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_title_is_the_first_atx_heading() {
        assert_eq!(
            markdown_title("intro\n## Setup ##\n# Later").as_deref(),
            Some("Setup")
        );
        assert_eq!(markdown_title("#hashtag\nno heading"), None);
    }

    #[test]
    fn records_need_an_id_and_text() {
        let ok = serde_json::json!({"id": 7, "text": "body"});
        let doc = record_document("f.jsonl", 3, &ok).unwrap();
        assert_eq!((doc.id.as_str(), doc.title.as_str()), ("7", "7"));
        assert_eq!(doc.source, "f.jsonl:3");
        let blank = serde_json::json!({"id": "a", "text": "  "});
        let err = record_document("f.jsonl", 4, &blank).unwrap_err();
        assert_eq!(err.to_string(), "f.jsonl:4: field `text` is blank");
        let missing = serde_json::json!({"text": "x"});
        assert!(record_document("f.jsonl", 5, &missing)
            .unwrap_err()
            .to_string()
            .contains("missing field `id`"));
    }
}
