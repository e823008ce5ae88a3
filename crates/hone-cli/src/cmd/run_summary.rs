//! `<run>/summary.json`: what one `hone train` did, for CI jobs and batch scripts. Written
//! atomically when the run returns, whether it completed, failed or was interrupted (once the
//! run directory was locked; an error before that, e.g. a bad config, leaves no run directory
//! to write into). `hone train --json` prints the same object as the last line of stdout.
//!
//! Validation losses come from the run's `metrics.jsonl` (so a resumed run reports its first
//! evaluation too), counts of curated examples from `<run>/data/report.json`, digests are
//! SHA-256 of the files as they are on disk.
//!
//! `hone train --dry-run --json` prints a [`DryRunSummary`] instead: the plan of the run (steps,
//! tokens, estimated memory and, measured, time per step) and no file is written.
//!
//! A completed run's adapter also gets a model card, `<run>/adapter/README.md`, in the layout
//! PEFT's `save_pretrained` writes (YAML front matter with `base_model` and `library_name`,
//! then model details, training data with digests, hyperparameters and evaluation results), so
//! an adapter copied elsewhere says how it was made ([`Summary::write_model_card`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_train::{Event, RunConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmd::peak_rss_mb;

/// A value written into the model card as JSON (strings quoted, options `null`).
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    /// Training completed but a quality gate failed (exit code 3).
    #[serde(rename = "gate_failed")]
    GateFailed,
    Failed,
    /// Stopped by SIGINT/SIGTERM at a step boundary, with a checkpoint to resume from.
    Interrupted,
}

/// What a run reported while it worked (an [`hone_train::Observer`] feeds it every event).
#[derive(Debug, Default)]
pub struct Record {
    /// Set once the run locked its directory.
    pub run_dir: Option<PathBuf>,
    steps: usize,
    total_steps: usize,
    resumed_from: Option<usize>,
    tokens_seen: u64,
    /// Tokens and time of this process's steps.
    tokens_here: u64,
    training_started: Option<Instant>,
    training_seconds: f64,
    adapter_dir: Option<PathBuf>,
}

impl Record {
    pub fn observe(&mut self, event: &Event<'_>) {
        match event {
            Event::Locked { run_dir } => self.run_dir = Some(run_dir.to_path_buf()),
            Event::Started {
                total_steps,
                start_step,
                resumed_from,
                ..
            } => {
                self.total_steps = *total_steps;
                self.steps = *start_step;
                self.resumed_from = resumed_from.map(|_| *start_step);
                self.training_started = Some(Instant::now());
            }
            Event::Step {
                step,
                outcome,
                tokens_seen,
                ..
            } => {
                self.steps = *step;
                self.tokens_seen = *tokens_seen;
                self.tokens_here += outcome.tokens as u64;
                if let Some(t) = self.training_started {
                    self.training_seconds = t.elapsed().as_secs_f64();
                }
            }
            Event::Finished { adapter_dir, .. } => {
                self.adapter_dir = Some(adapter_dir.to_path_buf())
            }
            _ => {}
        }
    }
}

/// A file and the SHA-256 of its bytes (hex).
#[derive(Debug, Clone, Serialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub sha256: String,
}

impl FileDigest {
    /// `None` when the file cannot be read.
    fn of(path: &Path) -> Option<Self> {
        Some(Self {
            path: path.to_path_buf(),
            sha256: sha256_file(path).ok()?,
        })
    }
}

/// SHA-256 of a file's bytes, lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Validation losses of the run, from `metrics.jsonl` (`eval/loss`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ValLoss {
    pub first: Option<f64>,
    #[serde(rename = "final")]
    pub last: Option<f64>,
    pub best: Option<f64>,
    pub best_step: Option<u64>,
}

impl ValLoss {
    fn read(metrics: &Path) -> Self {
        let text = std::fs::read_to_string(metrics).unwrap_or_default();
        let mut out = ValLoss::default();
        for value in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let (Some(loss), Some(step)) = (value["eval/loss"].as_f64(), value["step"].as_u64())
            else {
                continue;
            };
            out.first.get_or_insert(loss);
            out.last = Some(loss);
            if out.best.is_none_or(|b| loss < b) {
                out.best = Some(loss);
                out.best_step = Some(step);
            }
        }
        out
    }
}

/// Counts of curation's report (`<run>/data/report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Curated {
    pub input_records: usize,
    pub train: usize,
    pub val: usize,
    pub removed: usize,
    /// Bad records skipped (`data.on_error = "skip"`).
    pub bad_records: usize,
}

impl Curated {
    pub fn of(r: &hone_data::Report) -> Self {
        Curated {
            input_records: r.input_records,
            train: r.kept.train,
            val: r.kept.val,
            removed: r.total_removed(),
            bad_records: r.errors.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DataSummary {
    /// The files `data.inputs` named (globs expanded), with their digests.
    pub inputs: Vec<FileDigest>,
    /// `None` when curation did not finish.
    pub curated: Option<Curated>,
}

/// The host CPU: `/proc/cpuinfo`'s model name and the widest vector ISA the kernels use.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub model: Option<String>,
    /// `avx512`, `avx2` or `sse` ([`hone_model::kernels::cpu::isa`]).
    pub isa: &'static str,
}

impl Cpu {
    fn detect() -> Self {
        Self {
            model: hone_model::kernels::cpu::cpu_model(),
            isa: hone_model::kernels::cpu::isa(),
        }
    }
}

/// `model.device`, or the `train.devices` joined by commas.
pub fn device_names(config: &RunConfig) -> String {
    config
        .devices()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub status: Status,
    /// The error chain of a failed or interrupted run.
    pub error: Option<String>,
    /// The exit code `hone train` ends with.
    pub exit_code: i32,
    pub run_dir: PathBuf,
    /// Steps done (the run's, resumed ones included) and planned.
    pub steps: usize,
    pub total_steps: usize,
    /// The checkpoint step this process resumed from.
    pub resumed_from: Option<usize>,
    /// Non-padding tokens trained on by the run (resumed ones included).
    pub tokens: u64,
    /// Seconds this process ran, setup included.
    pub wall_seconds: f64,
    /// Tokens per second of this process's steps (evaluations and checkpoints included).
    pub tokens_per_sec: Option<f64>,
    /// Peak resident memory of the process (VmHWM).
    pub peak_memory_mb: Option<f64>,
    pub val_loss: ValLoss,
    /// The final adapter's `adapter_model.safetensors`.
    pub adapter: Option<FileDigest>,
    /// The resolved `<run>/config.toml`.
    pub config: Option<FileDigest>,
    pub data: DataSummary,
    pub hone_version: &'static str,
    /// The commit the binary was built from, or "unknown".
    pub git_commit: &'static str,
    /// `model.device`, or the `train.devices` joined by commas.
    pub device: String,
    pub cpu: Cpu,
    /// The quality gates checked on the final values (`[gates]`, `--fail-if`).
    pub gates: Vec<hone_train::gates::GateOutcome>,
}

impl Summary {
    /// The summary of a run that ended with `status` (and `error`, the printed chain).
    pub fn new(
        config: &RunConfig,
        record: &Record,
        run_dir: &Path,
        status: Status,
        error: Option<String>,
        exit_code: i32,
        started: Instant,
    ) -> Self {
        let inputs = hone_data::reader::expand_inputs(&config.data.inputs)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| FileDigest::of(p))
            .collect();
        let curated = std::fs::read(run_dir.join("data").join(hone_data::REPORT_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<hone_data::Report>(&bytes).ok())
            .map(|r| Curated::of(&r));
        let config_file = run_dir.join(hone_train::run::CONFIG_FILE);
        Summary {
            status,
            error,
            exit_code,
            run_dir: run_dir.to_path_buf(),
            steps: record.steps,
            total_steps: record.total_steps,
            resumed_from: record.resumed_from,
            tokens: record.tokens_seen,
            wall_seconds: started.elapsed().as_secs_f64(),
            tokens_per_sec: (record.training_seconds > 0.0)
                .then(|| record.tokens_here as f64 / record.training_seconds),
            peak_memory_mb: peak_rss_mb(),
            val_loss: ValLoss::read(&run_dir.join(hone_train::metrics::METRICS_FILE)),
            adapter: record
                .adapter_dir
                .as_ref()
                .and_then(|d| FileDigest::of(&d.join("adapter_model.safetensors"))),
            config: config_file
                .is_file()
                .then(|| FileDigest::of(&config_file))
                .flatten(),
            data: DataSummary { inputs, curated },
            hone_version: env!("CARGO_PKG_VERSION"),
            git_commit: env!("HONE_GIT_COMMIT"),
            device: device_names(config),
            cpu: Cpu::detect(),
            gates: Vec::new(),
        }
    }

    /// The values gates can name: the last value of each `metrics.jsonl` key, and the
    /// summary's `eval/loss_first`, `eval/loss_best`, `tokens_per_sec`, `peak_memory_mb`,
    /// `wall_seconds`.
    pub fn gate_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let text = std::fs::read_to_string(self.run_dir.join(hone_train::metrics::METRICS_FILE))
            .unwrap_or_default();
        let mut metrics = hone_train::gates::final_metrics(&text);
        let extra = [
            ("eval/loss_first", self.val_loss.first),
            ("eval/loss_best", self.val_loss.best),
            ("tokens_per_sec", self.tokens_per_sec),
            ("peak_memory_mb", self.peak_memory_mb),
            ("wall_seconds", Some(self.wall_seconds)),
        ];
        for (key, value) in extra {
            if let Some(v) = value {
                metrics.insert(key.to_string(), v);
            }
        }
        metrics
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a summary serialises")
    }

    /// The model card of the run's adapter (Markdown, PEFT's model-card layout).
    pub fn model_card(&self, config: &RunConfig) -> String {
        use std::fmt::Write as _;
        let name = config.output.name.as_deref().unwrap_or("adapter");
        let base = config.model.path.display().to_string();
        let (l, t) = (&config.lora, &config.train);
        let mut card = String::new();
        let _ = writeln!(
            card,
            "---\nbase_model: {}\nlibrary_name: peft\ntags:\n- lora\n- hone\n---\n",
            json(&base)
        );
        let _ = writeln!(card, "# Model Card for {name}\n");
        let _ = writeln!(
            card,
            "A LoRA adapter for `{base}`, trained with hone {} (commit {}) and saved in PEFT's \
             format (`adapter_config.json`, `adapter_model.safetensors`): it loads with \
             `peft.PeftModel.from_pretrained`.\n",
            self.hone_version, self.git_commit
        );
        let _ = writeln!(card, "## Model Details\n");
        let _ = writeln!(
            card,
            "- **Base model:** `{base}` (`{}`)",
            config.model.dtype
        );
        let _ = writeln!(
            card,
            "- **Adapter:** LoRA, `adapter_model.safetensors` sha256 `{}`",
            self.adapter
                .as_ref()
                .map_or("(not written)", |d| d.sha256.as_str())
        );
        let _ = writeln!(
            card,
            "- **Library:** hone {} (PEFT format)\n",
            self.hone_version
        );
        let _ = writeln!(card, "## Training Details\n\n### Training Data\n");
        let _ = writeln!(card, "| file | sha256 |\n|---|---|");
        for input in &self.data.inputs {
            let _ = writeln!(card, "| `{}` | `{}` |", input.path.display(), input.sha256);
        }
        if let Some(c) = &self.data.curated {
            let _ = writeln!(
                card,
                "\nCurated: {} records in, {} training and {} validation examples, {} removed, {} bad records skipped.",
                c.input_records, c.train, c.val, c.removed, c.bad_records
            );
        }
        let _ = writeln!(card, "\n### Training Hyperparameters\n");
        let rows: Vec<(&str, String)> = vec![
            ("lora.r", l.r.to_string()),
            ("lora.alpha", l.alpha.to_string()),
            ("lora.dropout", l.dropout.to_string()),
            ("lora.use_rslora", l.use_rslora.to_string()),
            ("lora.target_modules", json(&l.target_modules)),
            (
                "tokenize.max_seq_len",
                config.tokenize.max_seq_len.to_string(),
            ),
            ("train.lr", t.lr.to_string()),
            ("train.schedule", json(&t.schedule)),
            ("train.warmup_steps", json(&t.warmup_steps)),
            ("train.warmup_ratio", json(&t.warmup_ratio)),
            ("train.epochs", t.epochs.to_string()),
            ("train.max_steps", json(&t.max_steps)),
            ("train.micro_batch_size", t.micro_batch_size.to_string()),
            ("train.grad_accum", t.grad_accum.to_string()),
            ("train.max_grad_norm", t.max_grad_norm.to_string()),
            ("train.weight_decay", t.weight_decay.to_string()),
            ("train.betas", json(&t.betas)),
            ("train.eps", t.eps.to_string()),
            ("train.seed", t.seed.to_string()),
            ("devices", self.device.clone()),
            ("steps", format!("{} of {}", self.steps, self.total_steps)),
            ("tokens", self.tokens.to_string()),
        ];
        let _ = writeln!(card, "| key | value |\n|---|---|");
        for (key, value) in rows {
            let _ = writeln!(card, "| `{key}` | `{value}` |");
        }
        if let Some(c) = &self.config {
            let _ = writeln!(
                card,
                "\nThe whole resolved config is the run's `{}` (sha256 `{}`).",
                hone_train::run::CONFIG_FILE,
                c.sha256
            );
        }
        let _ = writeln!(card, "\n## Evaluation\n");
        let v = &self.val_loss;
        match (v.first, v.last) {
            (Some(first), Some(last)) => {
                let _ = writeln!(card, "| validation | loss | perplexity |\n|---|---|---|");
                let _ = writeln!(
                    card,
                    "| first (before training, when evaluated at the start) | {first:.4} | {:.3} |",
                    first.exp()
                );
                let _ = writeln!(card, "| final | {last:.4} | {:.3} |", last.exp());
                if let (Some(best), Some(step)) = (v.best, v.best_step) {
                    let _ = writeln!(
                        card,
                        "| best (step {step}) | {best:.4} | {:.3} |",
                        best.exp()
                    );
                }
            }
            _ => {
                let _ = writeln!(card, "No validation rows: no evaluation.");
            }
        }
        card
    }

    /// Writes the model card into the completed run's adapter directory (`README.md`, as PEFT
    /// names it); nothing when the run wrote no adapter.
    pub fn write_model_card(&self, config: &RunConfig) -> anyhow::Result<Option<PathBuf>> {
        let Some(adapter) = self
            .adapter
            .as_ref()
            .filter(|_| self.status == Status::Completed)
        else {
            return Ok(None);
        };
        let Some(dir) = adapter.path.parent() else {
            return Ok(None);
        };
        let path = dir.join("README.md");
        hone_io::write_file(&path, self.model_card(config).as_bytes())?;
        Ok(Some(path))
    }

    /// Writes `<run>/summary.json` atomically.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let path = self.run_dir.join(hone_train::run::SUMMARY_FILE);
        let text = serde_json::to_string_pretty(self).expect("a summary serialises") + "\n";
        hone_io::write_file(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// The estimated memory of a run, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryBytes {
    pub weights: u64,
    pub activations: u64,
    /// The host's available memory (on the CPU).
    pub available: Option<u64>,
}

/// What `hone train --dry-run --json` prints: the run's plan, and with `--dry-run=measure`
/// its timed steps. Steps and tokens are what a run of the same config does (its
/// `summary.json` `total_steps` and `tokens`).
#[derive(Debug, Clone, Serialize)]
pub struct DryRunSummary {
    /// `plan` or `measure`.
    pub dry_run: &'static str,
    /// The run directory a run would write (the dry run wrote nothing there).
    pub run_dir: PathBuf,
    pub model: hone_train::dry_run::ModelInfo,
    /// `model.device`, or the `train.devices` joined by commas.
    pub device: String,
    /// Curation's counts: examples kept for training and validation, removed, bad.
    pub examples: Curated,
    /// Tokenized rows for training and validation.
    pub train_rows: usize,
    pub val_rows: usize,
    /// Optimizer steps of the run, per epoch, and the passes over the data they make.
    pub steps: usize,
    pub steps_per_epoch: usize,
    pub epochs: f64,
    /// Non-padding tokens: per step on average, and of the whole run.
    pub tokens_per_step: f64,
    pub total_tokens: u64,
    /// The run's memory estimate (weights + activations), the one a run checks.
    pub est_peak_memory_bytes: u64,
    pub est_memory: MemoryBytes,
    /// Mean seconds of a measured step (`measure`; `null` for `plan`).
    pub est_step_seconds: Option<f64>,
    /// `est_step_seconds` times the steps: training steps only, without evaluations,
    /// checkpoints and samples (`null` for `plan`).
    pub est_total_seconds: Option<f64>,
    /// The measurement (`measure`): timed steps, warm-up, tokens/s, trainable parameters.
    pub measured: Option<hone_train::dry_run::Measurement>,
    /// Peak resident memory of the process (VmHWM), in bytes: with `measure`, what loading
    /// and the timed steps used.
    pub peak_rss_bytes: Option<u64>,
    pub wall_seconds: f64,
    pub hone_version: &'static str,
}

impl DryRunSummary {
    pub fn new(
        config: &RunConfig,
        report: &hone_train::DryRunReport,
        dry_run: &'static str,
        started: Instant,
    ) -> Self {
        let m = &report.memory;
        DryRunSummary {
            dry_run,
            run_dir: config.run_dir(),
            model: report.model.clone(),
            device: device_names(config),
            examples: Curated::of(&report.curation),
            train_rows: report.train_rows,
            val_rows: report.val_rows,
            steps: report.total_steps,
            steps_per_epoch: report.steps_per_epoch,
            epochs: report.epochs(),
            tokens_per_step: report.tokens_per_step(),
            total_tokens: report.total_tokens,
            est_peak_memory_bytes: m.total(),
            est_memory: MemoryBytes {
                weights: m.weights,
                activations: m.activations,
                available: m.available,
            },
            est_step_seconds: report.measured.as_ref().map(|x| x.step_seconds),
            est_total_seconds: report.total_seconds(),
            measured: report.measured.clone(),
            peak_rss_bytes: peak_rss_mb().map(|mb| (mb * 1024.0 * 1024.0) as u64),
            wall_seconds: started.elapsed().as_secs_f64(),
            hone_version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// The human lines `hone train --dry-run` prints.
    pub fn lines(&self) -> Vec<String> {
        let mb = |bytes: u64| bytes.div_ceil(1 << 20);
        let e = &self.examples;
        let mut lines = vec![
            format!(
                "dry run    {} (nothing written; a run would write {})",
                self.dry_run,
                self.run_dir.display()
            ),
            format!(
                "model      {} ({}, {} parameters, {} layers, vocabulary {}) on {}",
                self.model.name,
                self.model.architecture,
                self.model.parameters,
                self.model.layers,
                self.model.vocab_size,
                self.device
            ),
            format!(
                "data       {} records -> {} training + {} validation examples ({} removed, {} bad records skipped) -> {} + {} rows",
                e.input_records, e.train, e.val, e.removed, e.bad_records, self.train_rows, self.val_rows
            ),
            format!(
                "steps      {} ({} per epoch, {:.2} epochs)",
                self.steps, self.steps_per_epoch, self.epochs
            ),
            format!(
                "tokens     {} ({:.0} per step)",
                self.total_tokens, self.tokens_per_step
            ),
            format!(
                "memory     estimated {} MB (weights {} MB + activations {} MB){}",
                mb(self.est_peak_memory_bytes),
                mb(self.est_memory.weights),
                mb(self.est_memory.activations),
                match self.est_memory.available {
                    Some(a) => format!(", {} MB available", a >> 20),
                    None => String::new(),
                }
            ),
        ];
        match (&self.measured, self.est_total_seconds) {
            (Some(m), Some(total)) => {
                lines.push(format!(
                    "time       {:.3} s per step ({} timed steps after a {:.3} s warm-up, {:.0} tokens/s, {} trainable parameters) -> about {:.0} s of training steps",
                    m.step_seconds, m.steps, m.warmup_seconds, m.tokens_per_sec, m.trainable_params, total
                ));
                if let Some(bytes) = self.peak_rss_bytes {
                    lines.push(format!(
                        "peak mem   {} MB resident while measuring (host; the whole process)",
                        mb(bytes)
                    ));
                }
            }
            _ => lines
                .push("time       not measured (--dry-run=measure times a few steps)".to_string()),
        }
        lines
    }
}
