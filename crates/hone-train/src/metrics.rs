//! Scalars of a run (`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`,
//! `eval/loss`, `eval/ppl`, ...) written twice: as JSON lines in `<run>/metrics.jsonl`
//! (`{"step": 10, "train/loss": 2.31, ...}`, one object per logging point) and as TensorBoard
//! event files under `<run>/tb/` (through the `tensorboard-rs` crate).
//!
//! A resumed run first drops the JSON lines of steps after the checkpoint it resumes from, so
//! that the file holds each step once; TensorBoard shows the newest event of a step.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::error::{Result, TrainError};

/// The file names inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TENSORBOARD_DIR: &str = "tb";

/// Appends scalars to `metrics.jsonl` and the TensorBoard event file.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: SummaryWriter,
}

impl MetricsWriter {
    /// Opens the writers of `run_dir`; with `resume_step`, lines of later steps are removed.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if let Some(step) = resume_step {
            truncate_after(&path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let tb = run_dir.join(TENSORBOARD_DIR);
        // tensorboard-rs panics when it cannot create the directory: create it first.
        std::fs::create_dir_all(&tb).map_err(|e| TrainError::io(&tb, e))?;
        Ok(Self {
            path,
            file,
            tensorboard: SummaryWriter::new(&tb),
        })
    }

    /// Writes one logging point.
    pub fn log(&mut self, step: usize, scalars: &[(&str, f64)]) -> Result<()> {
        let mut object = Map::new();
        object.insert("step".into(), Value::from(step));
        for (name, value) in scalars {
            // JSON has no NaN or infinity: those are written as null.
            object.insert(
                name.to_string(),
                serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number),
            );
            self.tensorboard.add_scalar(name, *value as f32, step);
        }
        let line = Value::Object(object).to_string() + "\n";
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))?;
        self.tensorboard.flush();
        Ok(())
    }
}

/// Keeps the lines of `path` whose `step` is at most `step`.
fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_the_lines_of_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = MetricsWriter::open(dir.path(), None).unwrap();
            for step in 1..=4 {
                w.log(step, &[("train/loss", 1.0 / step as f64)]).unwrap();
            }
            w.log(5, &[("train/loss", f64::NAN)]).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 5);
        assert!(text.lines().last().unwrap().contains("null"), "{text}");
        let _w = MetricsWriter::open(dir.path(), Some(2)).unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            "{\"step\":1,\"train/loss\":1.0}\n{\"step\":2,\"train/loss\":0.5}\n"
        );
        let events: Vec<_> = std::fs::read_dir(dir.path().join(TENSORBOARD_DIR))
            .unwrap()
            .collect();
        assert!(!events.is_empty());
    }
}
