//! `records.jsonl`: the per-record log of an evaluation, so that an interrupted one continues
//! where it stopped ([`RecordLog::resume`]) instead of starting over.
//!
//! The first line is a header holding the resolved plan; every other line is one [`Record`]:
//! which task, column, model and adapter, the record's index in its task, the prompt the
//! model saw, the prediction and the per-record outcome ([`Sample`], the same object
//! `eval.json` lists). Lines are appended a batch at a time, then flushed and fsynced, so a
//! crash loses at most the batch in flight. A process killed while writing can leave a last
//! line without its newline: resuming drops that line (with a warning) and cuts the file back
//! to its last complete line; a malformed line anywhere else is an error.
//!
//! The report is always aggregated from records as they read back from their JSON text (also
//! in a run that was never interrupted), so a resumed run's numbers equal an uninterrupted
//! one's even where JSON's decimal form does not round-trip a float exactly.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::EvalPlan;
use crate::error::{EvalError, Result};
use crate::report::Sample;

/// File name of the log inside the output directory.
pub const RECORDS_FILE: &str = "records.jsonl";

/// Version of the log's line format, in its header.
const FORMAT: u32 = 1;

/// The first line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    hone_eval_records: u32,
    /// The plan the records belong to (a resumed evaluation must have the same).
    plan: serde_json::Value,
}

/// One record of one task on one column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub task: String,
    pub column: String,
    /// Base model directory of the column.
    pub model: PathBuf,
    /// Adapter directory of the column (none for a base model's own column).
    pub adapter: Option<PathBuf>,
    /// Position of the record among the task's evaluated records, from 0.
    pub index: usize,
    /// The text the model saw (perplexity: the scored example, decoded).
    pub prompt: String,
    /// The chosen choice's text or the generated text (none for perplexity).
    pub prediction: Option<String>,
    /// The record's outcome, as listed in `eval.json`.
    pub score: Sample,
}

impl Record {
    /// The record as its log line (without newline) and as read back from that line.
    pub fn canonical(&self) -> Result<(String, Record)> {
        let line = serde_json::to_string(self).map_err(|e| EvalError::Write {
            path: PathBuf::from(RECORDS_FILE),
            message: e.to_string(),
        })?;
        let back = serde_json::from_str(&line).map_err(|e| EvalError::Write {
            path: PathBuf::from(RECORDS_FILE),
            message: format!("a record does not read back: {e}"),
        })?;
        Ok((line, back))
    }
}

/// Key of a record: (task, column, index).
type Key = (String, String, usize);

/// The open log, with the records it already holds.
#[derive(Debug)]
pub struct RecordLog {
    path: PathBuf,
    file: File,
    done: HashMap<Key, Record>,
}

/// What [`RecordLog::resume`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Complete records read back.
    pub records: usize,
    /// A last line without its newline was dropped.
    pub dropped_partial_line: bool,
    /// There was no log to resume: a new one was started.
    pub started_fresh: bool,
}

fn plan_value(plan: &EvalPlan, path: &Path) -> Result<serde_json::Value> {
    serde_json::to_value(plan).map_err(|e| EvalError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl RecordLog {
    /// Starts a new log in `dir` (replacing any earlier one) for `plan`.
    pub fn create(dir: &Path, plan: &EvalPlan) -> Result<Self> {
        let path = dir.join(RECORDS_FILE);
        let header = Header {
            hone_eval_records: FORMAT,
            plan: plan_value(plan, &path)?,
        };
        let mut text = serde_json::to_string(&header).map_err(|e| EvalError::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        text.push('\n');
        hone_io::write_file(&path, text.as_bytes()).map_err(|e| EvalError::Write {
            path: path.clone(),
            message: e.source.to_string(),
        })?;
        let file = open_append(&path)?;
        Ok(Self {
            path,
            file,
            done: HashMap::new(),
        })
    }

    /// Opens the log in `dir` to continue it: its header must hold `plan`; complete records are
    /// kept, a partial last line is dropped. Without a log, starts a new one.
    pub fn resume(dir: &Path, plan: &EvalPlan) -> Result<(Self, Resumed)> {
        let path = dir.join(RECORDS_FILE);
        if !path.is_file() {
            let log = Self::create(dir, plan)?;
            let resumed = Resumed {
                started_fresh: true,
                ..Resumed::default()
            };
            return Ok((log, resumed));
        }
        let bytes = std::fs::read(&path).map_err(|e| EvalError::io(&path, e))?;
        // Everything after the last newline is a line cut short by a crash.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let dropped_partial_line = complete < bytes.len();
        // A damaged log is refused (not data to reject): the user removes it or starts over.
        let damaged = |line: usize, message: String| EvalError::Resume {
            path: path.clone(),
            message: format!("line {line}: {message}; run without --resume to start over"),
        };
        let text = std::str::from_utf8(&bytes[..complete])
            .map_err(|e| damaged(0, format!("not UTF-8: {e}")))?;
        let mut lines = text.lines().enumerate();
        let header: Header = match lines.next() {
            Some((_, line)) => serde_json::from_str(line)
                .map_err(|e| damaged(1, format!("not a records.jsonl header: {e}")))?,
            None => {
                // Not even the header was written completely: nothing to keep.
                let log = Self::create(dir, plan)?;
                let resumed = Resumed {
                    dropped_partial_line,
                    started_fresh: true,
                    ..Resumed::default()
                };
                return Ok((log, resumed));
            }
        };
        if header.hone_eval_records != FORMAT {
            return Err(EvalError::Resume {
                path: path.clone(),
                message: format!(
                    "format version {}, this hone writes {FORMAT}",
                    header.hone_eval_records
                ),
            });
        }
        if header.plan != plan_value(plan, &path)? {
            return Err(EvalError::Resume {
                path: path.clone(),
                message: "it was written for other settings (model, adapters, tasks, limits, \
                          batch size, dtype or prompts differ); run without --resume to start \
                          over"
                    .into(),
            });
        }
        let mut done = HashMap::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(line)
                .map_err(|e| damaged(i + 1, format!("not a record: {e}")))?;
            done.insert(
                (record.task.clone(), record.column.clone(), record.index),
                record,
            );
        }
        if dropped_partial_line {
            tracing::warn!(
                "{}: dropped a partial last line ({} bytes) left by an interrupted write",
                path.display(),
                bytes.len() - complete
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| EvalError::io(&path, e))?;
            file.set_len(complete as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| EvalError::io(&path, e))?;
        }
        let file = open_append(&path)?;
        let resumed = Resumed {
            records: done.len(),
            dropped_partial_line,
            started_fresh: false,
        };
        Ok((Self { path, file, done }, resumed))
    }

    /// The record already logged for `index` of `task` on `column`.
    pub fn get(&self, task: &str, column: &str, index: usize) -> Option<&Record> {
        self.done
            .get(&(task.to_string(), column.to_string(), index))
    }

    /// Appends canonical lines (see [`Record::canonical`]), then flushes and fsyncs.
    pub fn append(&mut self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        let write_err = |e: std::io::Error| EvalError::Write {
            path: self.path.clone(),
            message: e.to_string(),
        };
        self.file.write_all(text.as_bytes()).map_err(write_err)?;
        self.file.flush().map_err(write_err)?;
        self.file.sync_data().map_err(write_err)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| EvalError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}
