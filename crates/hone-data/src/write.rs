//! Writing the curated data set: `train.jsonl`, `val.jsonl` and `report.json`, atomically.
//!
//! Files are written into a fresh temporary directory beside the target (same file system),
//! flushed and synced, and the directory is then renamed into place. An existing target
//! directory is first renamed aside and removed only after the new one is in place. A failure
//! at any point removes the temporary directory; the target is either the old complete output
//! or the new complete output, never a mix or a half-written file.
//!
//! Each JSONL line is `{"messages":[{"role":"user","content":"..."},...]}`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::DataError;
use crate::example::{Example, Message};
use crate::pipeline::Prepared;

pub const TRAIN_FILE: &str = "train.jsonl";
pub const VAL_FILE: &str = "val.jsonl";
pub const REPORT_FILE: &str = "report.json";

#[derive(Serialize)]
struct Line<'a> {
    messages: &'a [Message],
}

/// Writes examples as JSONL in the normalised messages form.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<(), DataError> {
    let io = |e| DataError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    for ex in examples {
        serde_json::to_writer(
            &mut w,
            &Line {
                messages: &ex.messages,
            },
        )
        .map_err(|e| DataError::io(path, e.into()))?;
        w.write_all(b"\n").map_err(io)?;
    }
    let file = w
        .into_inner()
        .map_err(|e| DataError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)
}

fn write_report(path: &Path, prepared: &Prepared) -> Result<(), DataError> {
    let io = |e| DataError::io(path, e);
    let mut text = serde_json::to_string_pretty(&prepared.report)
        .map_err(|e| DataError::io(path, e.into()))?;
    text.push('\n');
    let mut file = File::create(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes `train.jsonl`, `val.jsonl` and `report.json` into `out_dir`, replacing it as a
/// whole (see the module docs).
pub fn write_prepared(prepared: &Prepared, out_dir: &Path) -> Result<(), DataError> {
    let name = out_dir
        .file_name()
        .ok_or_else(|| DataError::Output {
            path: out_dir.to_path_buf(),
            message: "has no directory name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(DataError::Output {
            path: out_dir.to_path_buf(),
            message: "exists and is not a directory".into(),
        });
    }
    std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .map_err(|e| DataError::io(&parent, e))?;
    write_jsonl(&tmp.path().join(TRAIN_FILE), &prepared.train)?;
    write_jsonl(&tmp.path().join(VAL_FILE), &prepared.val)?;
    write_report(&tmp.path().join(REPORT_FILE), prepared)?;

    // Move any old output aside, then the new one in.
    let backup = if out_dir.exists() {
        let aside = tempfile::Builder::new()
            .prefix(&format!(".{name}.old-"))
            .tempdir_in(&parent)
            .map_err(|e| DataError::io(&parent, e))?
            .keep();
        // `aside` is an empty directory: rename replaces it.
        std::fs::rename(out_dir, &aside).map_err(|e| DataError::io(out_dir, e))?;
        Some(aside)
    } else {
        None
    };
    let tmp_path = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp_path, out_dir) {
        if let Some(aside) = &backup {
            let _ = std::fs::rename(aside, out_dir);
        }
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(DataError::io(out_dir, e));
    }
    if let Some(aside) = backup {
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(path = %aside.display(), error = %e, "could not remove the previous output");
        }
    }
    if let Ok(dir) = File::open(&parent) {
        let _ = dir.sync_all();
    }
    tracing::info!(dir = %out_dir.display(), train = prepared.train.len(), val = prepared.val.len(), "wrote curated data");
    Ok(())
}
