//! Readers for evaluation data (JSONL, one record per line; blank lines skipped):
//!
//! * multiple choice ([`read_multiple_choice`]): OpenBookQA's `{id, question: {stem, choices:
//!   [{text, label}]}, answerKey}`, or the generic `{question, choices, answer}` where `choices`
//!   is a list of strings, a list of `{text, label}`, or ARC's `{text: [...], label: [...]}`,
//!   and the answer (`answer` or `answerKey`) is a 0-based index or a label;
//! * generation ([`read_generation`]): `{question, answer}` (also `prompt`/`input` and
//!   `reference`/`target`/`output`), such as GSM8K with its `#### N`;
//! * language modelling ([`read_lm`]): the curated `{"messages": [...]}` lines of hone-data
//!   (a single `text` message is raw text), `{"text"}` or `{"prompt", "completion"}`.
//!
//! Errors name the file, the line and the key, and what was expected.

use std::path::{Path, PathBuf};

use hone_tokenize::{Example, Message};
use serde_json::{Map, Value};

use crate::error::{EvalError, Result};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    /// 1-based line in its file.
    pub line: usize,
    pub question: String,
    pub choices: Vec<String>,
    /// One label per choice (the file's, else A, B, C, ...).
    pub labels: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
}

/// One generation prompt and its reference.
#[derive(Debug, Clone, PartialEq)]
pub struct GenItem {
    pub line: usize,
    pub question: String,
    pub answer: String,
}

/// Records read from a file, with the number of records the file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    pub items: Vec<T>,
    /// Non-blank lines in the file (records available without a limit).
    pub available: usize,
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => "a string".into(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => format!("a list of {} item(s)", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// Context for errors about one record.
struct At<'a> {
    path: &'a Path,
    line: usize,
}

impl At<'_> {
    fn bad(&self, key: &str, expected: &str, found: &str) -> EvalError {
        EvalError::Record {
            path: self.path.to_path_buf(),
            line: self.line,
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }

    fn string(&self, obj: &Map<String, Value>, keys: &[&str]) -> Result<String> {
        for key in keys {
            match obj.get(*key) {
                Some(Value::String(s)) => return Ok(s.clone()),
                Some(other) => return Err(self.bad(key, "a string", &describe(other))),
                None => {}
            }
        }
        Err(self.bad(&keys.join("|"), "a string", "no such key"))
    }
}

/// JSON objects of a file with their 1-based line numbers.
type Records = Vec<(usize, Map<String, Value>)>;

/// Reads the non-blank lines of `path` as JSON objects, stopping after `limit` records.
fn read_objects(path: &Path, limit: Option<usize>) -> Result<(Records, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let mut out = Vec::new();
    let mut available = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        available += 1;
        if limit.is_some_and(|n| out.len() >= n) {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| EvalError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        match value {
            Value::Object(obj) => out.push((i + 1, obj)),
            other => {
                return Err(EvalError::Record {
                    path: path.to_path_buf(),
                    line: i + 1,
                    key: "(record)".into(),
                    expected: "a JSON object".into(),
                    found: describe(&other),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(EvalError::EmptyData {
            path: path.to_path_buf(),
            detail: " (the file has no JSON lines)".into(),
        });
    }
    Ok((out, available))
}

/// Default labels: A, B, ..., Z, then 27, 28, ...
fn letter(i: usize) -> String {
    if i < 26 {
        char::from(b'A' + i as u8).to_string()
    } else {
        (i + 1).to_string()
    }
}

fn parse_choices(at: &At<'_>, key: &str, value: &Value) -> Result<(Vec<String>, Vec<String>)> {
    const EXPECTED: &str =
        "a list of strings, a list of {text, label}, or {text: [...], label: [...]}";
    let (texts, labels): (Vec<String>, Vec<Option<String>>) = match value {
        Value::Array(items) => {
            let mut texts = Vec::new();
            let mut labels = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => {
                        texts.push(s.clone());
                        labels.push(None);
                    }
                    Value::Object(o) => {
                        let key = format!("{key}[{i}].text");
                        match o.get("text") {
                            Some(Value::String(s)) => texts.push(s.clone()),
                            other => {
                                return Err(at.bad(
                                    &key,
                                    "a string",
                                    &other.map_or("no such key".into(), describe),
                                ))
                            }
                        }
                        labels.push(o.get("label").and_then(|l| l.as_str()).map(str::to_string));
                    }
                    other => {
                        return Err(at.bad(&format!("{key}[{i}]"), EXPECTED, &describe(other)))
                    }
                }
            }
            (texts, labels)
        }
        Value::Object(o) => {
            let list = |k: &str| -> Result<Vec<String>> {
                match o.get(k) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| {
                            v.as_str().map(str::to_string).ok_or_else(|| {
                                at.bad(&format!("{key}.{k}"), "strings", &describe(v))
                            })
                        })
                        .collect(),
                    other => Err(at.bad(
                        &format!("{key}.{k}"),
                        "a list of strings",
                        &other.map_or("no such key".into(), describe),
                    )),
                }
            };
            let texts = list("text")?;
            let labels = match o.get("label") {
                Some(_) => list("label")?.into_iter().map(Some).collect(),
                None => vec![None; texts.len()],
            };
            if labels.len() != texts.len() {
                return Err(at.bad(
                    &format!("{key}.label"),
                    &format!("{} labels (one per text)", texts.len()),
                    &format!("{} labels", labels.len()),
                ));
            }
            (texts, labels)
        }
        other => return Err(at.bad(key, EXPECTED, &describe(other))),
    };
    if texts.len() < 2 {
        return Err(at.bad(
            key,
            "at least 2 choices",
            &format!("{} choice(s)", texts.len()),
        ));
    }
    let labels = labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.unwrap_or_else(|| letter(i)))
        .collect();
    Ok((texts, labels))
}

fn parse_answer(at: &At<'_>, key: &str, value: &Value, labels: &[String]) -> Result<usize> {
    let expected = format!(
        "a choice index 0..{} or one of the labels {}",
        labels.len() - 1,
        labels.join(", ")
    );
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(i) if (i as usize) < labels.len() => Ok(i as usize),
            _ => Err(at.bad(key, &expected, &describe(value))),
        },
        Value::String(s) => labels
            .iter()
            .position(|l| l == s.trim())
            .ok_or_else(|| at.bad(key, &expected, &describe(value))),
        other => Err(at.bad(key, &expected, &describe(other))),
    }
}

/// Reads multiple-choice questions (OpenBookQA or generic; see the module docs).
pub fn read_multiple_choice(path: &Path, limit: Option<usize>) -> Result<Loaded<McItem>> {
    let (records, available) = read_objects(path, limit)?;
    let mut items = Vec::with_capacity(records.len());
    for (line, obj) in records {
        let at = At { path, line };
        let (question, choices_value, choices_key) = match obj.get("question") {
            // OpenBookQA / ARC: the question holds its stem and choices.
            Some(Value::Object(q)) => {
                let stem = at.string(q, &["stem"]).map_err(|_| {
                    at.bad(
                        "question.stem",
                        "a string",
                        &q.get("stem").map_or("no such key".into(), describe),
                    )
                })?;
                let choices = q.get("choices").ok_or_else(|| {
                    at.bad("question.choices", "a list of choices", "no such key")
                })?;
                (stem, choices.clone(), "question.choices")
            }
            _ => {
                let question = at.string(&obj, &["question"])?;
                let choices = obj
                    .get("choices")
                    .ok_or_else(|| at.bad("choices", "a list of choices", "no such key"))?;
                (question, choices.clone(), "choices")
            }
        };
        let (choices, labels) = parse_choices(&at, choices_key, &choices_value)?;
        let (answer_key, answer_value) = ["answerKey", "answer", "label"]
            .iter()
            .find_map(|k| obj.get(*k).map(|v| (*k, v)))
            .ok_or_else(|| {
                at.bad(
                    "answer|answerKey",
                    "the right choice (index or label)",
                    "no such key",
                )
            })?;
        let answer = parse_answer(&at, answer_key, answer_value, &labels)?;
        items.push(McItem {
            line,
            question,
            choices,
            labels,
            answer,
        });
    }
    Ok(Loaded { items, available })
}

/// Reads `{question, answer}` records.
pub fn read_generation(path: &Path, limit: Option<usize>) -> Result<Loaded<GenItem>> {
    let (records, available) = read_objects(path, limit)?;
    let mut items = Vec::with_capacity(records.len());
    for (line, obj) in records {
        let at = At { path, line };
        items.push(GenItem {
            line,
            question: at.string(&obj, &["question", "prompt", "input"])?,
            answer: at.string(&obj, &["answer", "reference", "target", "output"])?,
        });
    }
    Ok(Loaded { items, available })
}

/// Reads language-modelling examples (curated messages, text or prompt/completion).
pub fn read_lm(path: &Path, limit: Option<usize>) -> Result<Loaded<(usize, Example)>> {
    let (records, available) = read_objects(path, limit)?;
    let mut items = Vec::with_capacity(records.len());
    for (line, obj) in records {
        let at = At { path, line };
        let example = if let Some(messages) = obj.get("messages") {
            let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
                at.bad(
                    "messages",
                    "a list of {role, content} messages",
                    &e.to_string(),
                )
            })?;
            if messages.is_empty() {
                return Err(at.bad("messages", "at least one message", "an empty list"));
            }
            Example::from_messages(messages)
        } else if obj.contains_key("text") {
            Example::text(at.string(&obj, &["text"])?)
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            Example::completion(
                at.string(&obj, &["prompt"])?,
                at.string(&obj, &["completion"])?,
            )
        } else {
            return Err(at.bad(
                "messages|text|prompt",
                "a curated `messages` list, a `text`, or a `prompt` and `completion`",
                "none of them",
            ));
        };
        items.push((line, example));
    }
    Ok(Loaded { items, available })
}

/// Absolute form of a path for reports (the path itself when it cannot be resolved).
pub fn display_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
