//! Writing the curated data set: `train.jsonl`, `val.jsonl` and `report.json`, atomically.
//!
//! Files are written into a fresh temporary directory beside the target (`hone_io::StagedDir`:
//! same file system), flushed and synced, and the directory is then renamed into place. An
//! existing target directory is first renamed aside and removed only after the new one is in
//! place. A failure at any point removes the temporary directory; the target is either the old
//! complete output or the new complete output, never a mix or a half-written file.
//!
//! An existing output directory is only replaced when it is safe to: when it is empty or
//! holds nothing but a previous output of this stage (`train.jsonl`, `val.jsonl` and a
//! `report.json` of hone's structure), or, with [`Overwrite::Any`] (`--force`), whatever it
//! holds, except that a directory holding one of the inputs (or evaluation files) is never
//! replaced: that would delete the data being curated. See [`check_output_dir`].
//!
//! Each JSONL line is an [`Example`] in its JSON form: `{"messages":[{"role":"user",
//! "content":"..."},...]}` for a chat, `{"text":"..."}` for raw text.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::example::SourcedExample;
use crate::pipeline::Prepared;

pub const TRAIN_FILE: &str = "train.jsonl";
pub const VAL_FILE: &str = "val.jsonl";
pub const REPORT_FILE: &str = "report.json";

/// Writes examples as JSONL, one [`Example`](crate::Example) per line in its JSON form.
pub fn write_jsonl(path: &Path, examples: &[SourcedExample]) -> Result<(), DataError> {
    let io = |e| DataError::write(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    for ex in examples {
        serde_json::to_writer(&mut w, &ex.example).map_err(|e| DataError::write(path, e.into()))?;
        w.write_all(b"\n").map_err(io)?;
    }
    let file = w
        .into_inner()
        .map_err(|e| DataError::write(path, e.into_error()))?;
    file.sync_all().map_err(io)
}

fn write_report(path: &Path, prepared: &Prepared) -> Result<(), DataError> {
    let io = |e| DataError::write(path, e);
    let mut text = serde_json::to_string_pretty(&prepared.report)
        .map_err(|e| DataError::write(path, e.into()))?;
    text.push('\n');
    let mut file = File::create(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Which existing output directory may be replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overwrite {
    /// Only an empty directory or a previous output of this stage.
    #[default]
    Prepared,
    /// Any directory (`--force`), except one that holds an input.
    Any,
}

/// Files this stage writes into its output directory.
const OUTPUT_FILES: [&str; 3] = [TRAIN_FILE, VAL_FILE, REPORT_FILE];

/// Keys every `report.json` this stage writes holds: how a previous output is recognised.
const REPORT_KEYS: [&str; 4] = ["input_records", "kept", "removed", "config"];

/// Whether `dir` holds nothing but a previous output of this stage (or nothing at all).
fn is_previous_output(entries: &[String], dir: &Path) -> bool {
    if entries.is_empty() {
        return true;
    }
    if !entries.iter().all(|n| OUTPUT_FILES.contains(&n.as_str())) {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(dir.join(REPORT_FILE)) else {
        return false;
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(report)) => {
            REPORT_KEYS.iter().all(|k| report.contains_key(*k))
        }
        _ => false,
    }
}

/// Checks that `out_dir` may receive the curated files: it does not exist, or it is a directory
/// that holds none of `inputs` (compared as canonical paths, so `./data/../data/raw.jsonl` and
/// symbolic links are seen through) and, unless `overwrite` is [`Overwrite::Any`], holds
/// nothing but a previous output of this stage.
pub fn check_output_dir(
    out_dir: &Path,
    inputs: &[PathBuf],
    overwrite: Overwrite,
) -> Result<(), DataError> {
    let refuse = |message: String| DataError::Output {
        path: out_dir.to_path_buf(),
        message,
    };
    if !out_dir.exists() {
        return Ok(());
    }
    if !out_dir.is_dir() {
        return Err(refuse("exists and is not a directory".into()));
    }
    let out_c = std::fs::canonicalize(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    for input in inputs {
        if let Ok(input_c) = std::fs::canonicalize(input) {
            if input_c.starts_with(&out_c) {
                return Err(refuse(format!(
                    "holds the input {}; replacing the directory would delete it (even with \
                     --force): choose another output directory",
                    input.display()
                )));
            }
        }
    }
    let mut entries: Vec<String> = std::fs::read_dir(out_dir)
        .map_err(|e| DataError::io(out_dir, e))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| DataError::io(out_dir, e))
        })
        .collect::<Result<_, _>>()?;
    entries.sort();
    if overwrite == Overwrite::Prepared && !is_previous_output(&entries, out_dir) {
        const SHOWN: usize = 5;
        let mut listed = entries
            .iter()
            .take(SHOWN)
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if entries.len() > SHOWN {
            listed.push_str(&format!(" and {} more", entries.len() - SHOWN));
        }
        return Err(refuse(format!(
            "is not empty and is not an output of `hone data prepare` (it holds {listed}); \
             it would be replaced as a whole: choose another directory, or pass --force to \
             replace it"
        )));
    }
    Ok(())
}

/// The files `prepared` was curated from: the inputs read and the evaluation files.
fn input_files(prepared: &Prepared) -> Vec<PathBuf> {
    let report = &prepared.report;
    let mut files: Vec<PathBuf> = report
        .files
        .iter()
        .map(|f| PathBuf::from(&f.path))
        .collect();
    if let Some(decontam) = &report.decontamination {
        if let Ok(eval) = crate::reader::expand_inputs(&decontam.eval_files) {
            files.extend(eval);
        }
    }
    files
}

/// Writes `train.jsonl`, `val.jsonl` and `report.json` into `out_dir`, replacing it as a
/// whole when it is empty or a previous output (see the module docs).
pub fn write_prepared(prepared: &Prepared, out_dir: &Path) -> Result<(), DataError> {
    write_prepared_with(prepared, out_dir, Overwrite::Prepared)
}

/// [`write_prepared`], replacing any existing directory with [`Overwrite::Any`] except one
/// that holds an input.
pub fn write_prepared_with(
    prepared: &Prepared,
    out_dir: &Path,
    overwrite: Overwrite,
) -> Result<(), DataError> {
    check_output_dir(out_dir, &input_files(prepared), overwrite)?;
    if out_dir.file_name().is_none() {
        return Err(DataError::Output {
            path: out_dir.to_path_buf(),
            message: "has no directory name".into(),
        });
    }
    let io = |e: hone_io::Error| DataError::write(e.path, e.source);
    let staged = hone_io::StagedDir::new(out_dir).map_err(io)?;
    write_jsonl(&staged.path().join(TRAIN_FILE), &prepared.train)?;
    write_jsonl(&staged.path().join(VAL_FILE), &prepared.val)?;
    write_report(&staged.path().join(REPORT_FILE), prepared)?;
    staged.commit().map_err(io)?;
    tracing::info!(dir = %out_dir.display(), train = prepared.train.len(), val = prepared.val.len(), "wrote curated data");
    Ok(())
}
