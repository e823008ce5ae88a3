//! Scalars of a run (`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`,
//! `eval/loss`, `eval/ppl`, ...) written twice: as JSON lines in `<run>/metrics.jsonl`
//! (`{"step": 10, "train/loss": 2.31, ...}`, one object per logging point) and as TensorBoard
//! event files under `<run>/tb/` (through the `tensorboard-rs` crate).
//!
//! A resumed run first drops the JSON lines of steps after the checkpoint it resumes from (the
//! lines of the checkpoint's own step, its evaluation included, were written before the
//! checkpoint and are kept), so that the file holds each step once; a run that starts fresh
//! empties the file (a run killed before its first checkpoint leaves lines behind). The
//! TensorBoard event files get the same treatment: their records of later steps are dropped
//! (the files are rewritten record by record, without decoding the summaries), and a fresh start
//! removes them.

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
    /// Opens the writers of `run_dir`. With `resume_step`, lines and events of later steps are
    /// removed; without (a fresh start), every earlier line and event file is.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        truncate_after(&path, resume_step)?;
        let tb = run_dir.join(TENSORBOARD_DIR);
        truncate_events(&tb, resume_step)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
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

/// Keeps the lines of `path` whose `step` is at most `step` (none without a step).
fn truncate_after(path: &Path, step: Option<usize>) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            let logged = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64));
            matches!((logged, step), (Some(s), Some(step)) if s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        hone_io::write_file(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The `step` of a serialized TensorBoard `Event` (protobuf field 2, a varint; 0 when absent),
/// or `None` when the bytes do not parse.
fn event_step(mut event: &[u8]) -> Option<u64> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut step = 0;
    while !event.is_empty() {
        let tag = varint(&mut event)?;
        let skip = match tag & 7 {
            0 => {
                let v = varint(&mut event)?;
                if tag >> 3 == 2 {
                    step = v;
                }
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut event)?).ok()?,
            5 => 4,
            _ => return None,
        };
        event = event.get(skip..)?;
    }
    Some(step)
}

/// Rewrites the event files under `tb` without the records of steps after `step` (and a
/// record cut short by a kill); without a step, removes them. A record is
/// `[u64 length][u32 crc][event][u32 crc]`, copied as it is.
fn truncate_events(tb: &Path, step: Option<usize>) -> Result<()> {
    let entries = match std::fs::read_dir(tb) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(tb, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(tb, e))?;
        let path = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents")
        {
            continue;
        }
        let Some(step) = step else {
            std::fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
            continue;
        };
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut kept = Vec::with_capacity(bytes.len());
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + 12) {
            let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
            let Some(record) = bytes.get(at..(at + 16).saturating_add(len)) else {
                break;
            };
            // The file-version record has step 0 and is always kept.
            match event_step(&record[12..12 + len]) {
                Some(s) if s as usize <= step => kept.extend_from_slice(record),
                Some(_) => {}
                None => break,
            }
            at += 16 + len;
        }
        if kept.len() != bytes.len() {
            hone_io::write_file(&path, &kept)?;
        }
    }
    Ok(())
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

    /// Steps of every record of every event file under `run_dir/tb`.
    fn event_steps(run_dir: &Path) -> Vec<u64> {
        let mut steps = Vec::new();
        for entry in std::fs::read_dir(run_dir.join(TENSORBOARD_DIR)).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let mut at = 0;
            while at < bytes.len() {
                let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
                steps.push(event_step(&bytes[at + 12..at + 12 + len]).unwrap());
                at += 16 + len;
            }
        }
        steps.sort();
        steps
    }

    /// Writes steps 0 (an evaluation), 1, 2, 3 (losses) with one writer, as a killed run
    /// would leave them. (A writer opened in the same second by the same process reuses the
    /// file name, so the truncation is called directly.)
    fn killed_run(dir: &Path) {
        let mut w = MetricsWriter::open(dir, None).unwrap();
        w.log(0, &[("eval/loss", 3.0)]).unwrap();
        for step in 1..=3 {
            w.log(step, &[("train/loss", 2.0)]).unwrap();
        }
    }

    #[test]
    fn resuming_drops_the_tensorboard_events_of_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        killed_run(dir.path());
        // The version record has step 0.
        assert_eq!(event_steps(dir.path()), [0, 0, 1, 2, 3]);
        truncate_events(&dir.path().join(TENSORBOARD_DIR), Some(2)).unwrap();
        assert_eq!(event_steps(dir.path()), [0, 0, 1, 2]);
    }

    #[test]
    fn a_fresh_start_drops_what_a_run_killed_before_its_first_checkpoint_logged() {
        let dir = tempfile::tempdir().unwrap();
        killed_run(dir.path());
        truncate_events(&dir.path().join(TENSORBOARD_DIR), None).unwrap();
        assert_eq!(event_steps(dir.path()), Vec::<u64>::new());
        let mut w = MetricsWriter::open(dir.path(), None).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap(),
            "",
            "a run killed before its first checkpoint starts an empty file"
        );
        w.log(0, &[("eval/loss", 3.0)]).unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, "{\"step\":0,\"eval/loss\":3.0}\n");
    }

    #[test]
    fn a_record_cut_short_by_a_kill_is_dropped_from_the_event_file() {
        let dir = tempfile::tempdir().unwrap();
        killed_run(dir.path());
        let tb = dir.path().join(TENSORBOARD_DIR);
        let file = std::fs::read_dir(&tb)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        truncate_events(&tb, Some(5)).unwrap();
        assert_eq!(event_steps(dir.path()), [0, 0, 1, 2]);
    }
}
