//! A whole training run from a [`RunConfig`]: what a run reports ([`Event`] to an
//! [`Observer`]) and returns ([`RunSummary`]), how it treats its directory ([`RunOptions`]), and
//! the checks before anything is written. The run itself is a [`Trainer`]
//! ([`crate::trainer`]): prepare, then step and after-step until done, then finish.
//!
//! ```text
//! <run>/config.toml        the resolved config (a resume must use the same one)
//! <run>/data/              curated train.jsonl, val.jsonl, report.json
//! <run>/tokenized/         token-row cache
//! <run>/step-N/            checkpoints (adapter/, optimizer.safetensors, trainer_state.json)
//! <run>/adapter/           the final adapter (PEFT format)
//! <run>/metrics.jsonl, tb/ scalars; samples.jsonl: generations with and without the adapter
//! <run>/summary.json       what the run did (written by the caller, e.g. `hone train`)
//! ```
//!
//! With several `train.devices`, this thread is rank 0 of a
//! [`DataParallel`](crate::parallel::DataParallel) session: it prepares the data, hands every
//! peer its share of each step, and alone evaluates, logs and writes checkpoints, the adapter
//! and samples (every peer holds the same adapter).
//!
//! With `distributed.nodes > 1` every node runs this with its own run directory and its local
//! peers; node 0's rank 0 is the lead (evaluates, logs and writes checkpoints, the adapter and
//! samples), the other nodes are followers and train silently.
//!
//! Progress is reported through an [`Observer`]; the library prints nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use burn::backend::Autodiff;
use hone_model::{run_on_this_thread, BackendTask, ModelConfig};
use hone_model::{AutodiffKernelBackend, KernelBackend};
use serde::Serialize;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::eval::{EvalResult, Sample};
use crate::lock::RunLock;
use crate::memory::{self, MemoryEstimate, RunShape};
use crate::step::StepOutcome;
use crate::trainer::Trainer;

/// File names inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";
pub const FINAL_ADAPTER: &str = "adapter";
pub const SAMPLES_FILE: &str = "samples.jsonl";
/// The run's outcome, written by the caller (`hone train`) when the run returns, also after a
/// failed setup: a directory holding it and setup leftovers is still reused.
pub const SUMMARY_FILE: &str = "summary.json";

/// How to treat an existing run directory, and how to ask the run to stop.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest complete checkpoint (from scratch when there is none).
    pub resume: bool,
    /// Delete an existing run directory (one holding a `config.toml`) and start again.
    pub overwrite: bool,
    /// Once stopped, the run ends at the next step boundary: it writes a checkpoint of that
    /// step (`--resume` continues from it bit for bit) and returns
    /// [`TrainError::Interrupted`].
    pub stop: StopToken,
}

/// A request to stop a run, shared by the run and whoever may ask it to stop (a signal
/// handler: [`StopToken::stop`] is one atomic store).
#[derive(Debug, Clone, Default)]
pub struct StopToken(Arc<AtomicBool>);

impl StopToken {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the trainer reports while it works.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run directory is prepared and locked by this run: from here on the run writes into
    /// it (a failure before this event left it untouched).
    Locked {
        run_dir: &'a Path,
    },
    /// Data and model are ready.
    Started {
        run_dir: &'a Path,
        total_steps: usize,
        /// 0, or the step of the checkpoint resumed from.
        start_step: usize,
        resumed_from: Option<&'a Path>,
        train_rows: usize,
        val_rows: usize,
        trainable_params: usize,
        /// The run's estimated memory (and what the machine had available).
        memory: &'a MemoryEstimate,
    },
    /// A step finished (`outcome.applied` is false for a skipped non-finite step).
    Step {
        step: usize,
        total_steps: usize,
        outcome: &'a StepOutcome,
        /// Non-padding tokens per second of this step.
        tokens_per_sec: f64,
        /// Non-padding tokens trained on by the run so far (before a resume included).
        tokens_seen: u64,
    },
    /// Averages since the previous logging point, as written to the metrics.
    Logged {
        step: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_sec: f64,
    },
    Evaluated(&'a EvalResult),
    Checkpoint {
        step: usize,
        dir: &'a Path,
    },
    /// The final adapter was written.
    Finished {
        step: usize,
        adapter_dir: &'a Path,
    },
}

/// Whether the run goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop after the current step (no final adapter is written; checkpoints stay).
    Stop,
}

/// Receives [`Event`]s.
pub trait Observer {
    fn on_event(&mut self, event: &Event<'_>) -> Control;
}

/// An observer that ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn on_event(&mut self, _: &Event<'_>) -> Control {
        Control::Continue
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// Steps done when the run returned.
    pub step: usize,
    pub total_steps: usize,
    /// The step of the checkpoint the run resumed from.
    pub resumed_from: Option<usize>,
    /// False when an observer stopped the run early.
    pub completed: bool,
    /// Validation before the first step (fresh runs with `eval.at_start`) and at the end.
    pub first_eval: Option<EvalResult>,
    pub last_eval: Option<EvalResult>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    pub bad_steps_total: usize,
    pub adapter_dir: Option<PathBuf>,
    pub samples: Vec<Sample>,
    pub seconds: f64,
}

/// Runs `config` on the device(s) it names (`train.devices`, else `model.device`).
pub fn train(
    config: &RunConfig,
    options: RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunSummary> {
    struct Task<'a> {
        config: &'a RunConfig,
        options: RunOptions,
        observer: &'a mut dyn Observer,
    }
    impl BackendTask for Task<'_> {
        type Output = Result<RunSummary>;
        fn run<B: KernelBackend>(self, device: B::Device) -> Result<RunSummary> {
            train_on::<Autodiff<B>>(self.config, self.options, self.observer, device)
        }
    }
    // On this thread, not the pool: data-parallel peers block in collective operations while
    // their host kernels need pool threads.
    run_on_this_thread(
        config.devices()[0],
        Task {
            config,
            options,
            observer,
        },
    )?
}

/// Dotted keys whose values differ between two configs.
fn config_differences(a: &RunConfig, b: &RunConfig) -> Vec<String> {
    fn walk(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(v), Some(w)) => walk(&key, v, w, out),
                        _ => out.push(key),
                    }
                }
            }
            (x, y) if x != y => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let (Ok(x), Ok(y)) = (toml::Value::try_from(a), toml::Value::try_from(b)) else {
        return vec!["(config)".into()];
    };
    let mut out = Vec::new();
    walk("", &x, &y, &mut out);
    out
}

/// What a run directory may hold before its `config.toml` is written: the lock, and what a
/// setup that failed leaves (curated data, the token cache). Such a directory is reused.
const SETUP_ENTRIES: [&str; 4] = [crate::lock::LOCK_FILE, "data", "tokenized", SUMMARY_FILE];

fn is_setup_leftover(name: &str) -> bool {
    SETUP_ENTRIES.contains(&name)
        || (name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")))
}

/// Refuses a run directory that is not empty and not a hone run (reads only).
fn refuse_foreign_dir(dir: &Path) -> Result<()> {
    if dir.join(CONFIG_FILE).is_file() {
        return Ok(());
    }
    let foreign = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .any(|e| !is_setup_leftover(&e.file_name().to_string_lossy())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(TrainError::io(dir, e)),
    };
    if foreign {
        return Err(TrainError::RunDir {
            path: dir.to_path_buf(),
            message: format!(
                "is not empty and holds no {CONFIG_FILE}: it is not a hone run; choose another output.dir"
            ),
        });
    }
    Ok(())
}

/// What a run with some [`RunOptions`] does with the run already in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExistingRun {
    /// None there, or one to resume (its config matches).
    Keep,
    /// One to delete first (`overwrite`).
    Clear,
}

/// Refuses to mix runs: a directory holding a run needs `resume` (with the same config) or
/// `overwrite` (reads only).
fn check_existing_run(config: &RunConfig, options: &RunOptions, dir: &Path) -> Result<ExistingRun> {
    let saved = dir.join(CONFIG_FILE);
    if !saved.is_file() {
        return Ok(ExistingRun::Keep);
    }
    let run_dir_error = |message: String| TrainError::RunDir {
        path: dir.to_path_buf(),
        message,
    };
    if options.resume {
        let previous = RunConfig::load_saved(&saved)?;
        let differences = config_differences(&previous, config);
        if !differences.is_empty() {
            return Err(run_dir_error(format!(
                "cannot resume: the config differs from the run's {CONFIG_FILE} in {}",
                differences.join(", ")
            )));
        }
        Ok(ExistingRun::Keep)
    } else if options.overwrite {
        Ok(ExistingRun::Clear)
    } else {
        Err(run_dir_error(
            "holds a run already: pass --resume to continue it, --overwrite to start again, \
             or choose another output.name"
                .into(),
        ))
    }
}

/// What [`prepare_run_dir`] would refuse, without creating, locking or clearing anything (a
/// dry run's check; a run directory locked by a running `hone train` is not detected).
pub(crate) fn check_run_dir(config: &RunConfig, options: &RunOptions) -> Result<()> {
    let dir = config.run_dir();
    refuse_foreign_dir(&dir)?;
    check_existing_run(config, options, &dir).map(|_| ())
}

/// Prepares the run directory: refuses a directory that is not a run, takes the run's lock,
/// refuses to mix runs, clears it for `overwrite` and checks a resumed config. `config.toml`
/// is written later, once setup succeeded ([`write_run_config`]).
pub(crate) fn prepare_run_dir(
    config: &RunConfig,
    options: &RunOptions,
) -> Result<(PathBuf, RunLock)> {
    let dir = config.run_dir();
    refuse_foreign_dir(&dir)?;
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let lock = RunLock::acquire(&dir)?;
    if let Some(pid) = lock.stale_holder() {
        tracing::warn!(
            "{}: the run of pid {pid} ended without releasing its lock (killed?); taking it over",
            lock.path().display()
        );
    }
    // Under the lock: the run found here is not being written by another process.
    if check_existing_run(config, options, &dir)? == ExistingRun::Clear {
        // Everything but the lock we hold: removing its file would let another run lock a new
        // one.
        for entry in std::fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
            let entry = entry.map_err(|e| TrainError::io(&dir, e))?;
            if entry.file_name() == crate::lock::LOCK_FILE {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| TrainError::io(&path, e))?;
        }
    }
    checkpoint::remove_stale_temporaries(&dir)?;
    Ok((dir, lock))
}

/// Writes the resolved config to `<run>/config.toml` (atomically), which marks the directory
/// as a run: called once setup succeeded, so that a failed setup leaves no run behind.
pub(crate) fn write_run_config(config: &RunConfig, dir: &Path) -> Result<()> {
    let saved = dir.join(CONFIG_FILE);
    let text = config.to_toml()?;
    Ok(hone_io::write_file(&saved, text.as_bytes())?)
}

/// The working directory, for messages about relative paths.
fn working_dir() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

/// Checks that `model.path` and every `data.inputs` entry exist before anything is created;
/// the error names the key and the working directory relative paths resolve against.
pub(crate) fn check_paths(config: &RunConfig) -> Result<()> {
    let missing = |key: &str, what: &str, path: &Path| TrainError::MissingPath {
        key: key.into(),
        what: what.into(),
        path: path.to_path_buf(),
        cwd: working_dir(),
    };
    let model = &config.model.path;
    if !hone_model::loader::is_gguf(model) && !model.is_dir() {
        return Err(missing("model.path", "model directory or GGUF file", model));
    }
    match hone_data::reader::expand_inputs(&config.data.inputs) {
        Err(hone_data::error::DataError::NoMatch { pattern }) => {
            Err(missing("data.inputs", "data path", Path::new(&pattern)))
        }
        Err(e) => Err(e.into()),
        Ok(_) => Ok(()),
    }
}

/// Reads the model's configuration (`config.json`, or a GGUF file's metadata) and refuses a
/// `tokenize.max_seq_len` beyond its context.
pub(crate) fn check_context(config: &RunConfig) -> Result<ModelConfig> {
    let path = if hone_model::loader::is_gguf(&config.model.path) {
        config.model.path.clone()
    } else {
        config.model.path.join("config.json")
    };
    let model_config = hone_model::loader::model_config(&path)?;
    if config.tokenize.max_seq_len > model_config.max_position_embeddings {
        return Err(TrainError::ContextTooLong {
            max_seq_len: config.tokenize.max_seq_len,
            max_position_embeddings: model_config.max_position_embeddings,
            model_config: path,
        });
    }
    Ok(model_config)
}

/// The run's memory estimate; on the CPU it is checked against the available memory.
pub(crate) fn check_memory<B: KernelBackend>(
    config: &RunConfig,
    model_config: &ModelConfig,
) -> Result<MemoryEstimate> {
    let devices = config.devices();
    let on_cpu = matches!(devices[0], hone_model::DeviceSpec::Cpu);
    let dtype = config.model.dtype.burn();
    let shape = RunShape {
        micro_batch_size: config.train.micro_batch_size,
        max_seq_len: config.tokenize.max_seq_len,
        dtype_bytes: dtype.size(),
        gradient_checkpointing: config.train.gradient_checkpointing,
        fused_cpu: config.model.kernels.fused::<B>(dtype),
        replicas: if on_cpu { devices.len() } else { 1 },
    };
    let mut estimate = memory::estimate(model_config, shape);
    if hone_model::loader::is_gguf(&config.model.path) {
        // Projections a CPU model keeps in their block formats take their stored size.
        let file = hone_model::gguf::GgufFile::open(&config.model.path)
            .map_err(hone_model::ModelError::from)?;
        let keep = !config.model.dequantize && B::keeps_quantized(dtype);
        let replicas = shape.replicas.max(1) as u64;
        estimate.weights =
            hone_model::gguf::resident_weight_bytes(&file, keep, dtype.size()) * replicas;
    }
    if on_cpu {
        estimate.available = memory::mem_available();
        memory::check(&estimate, &shape)?;
    }
    Ok(estimate)
}

/// Runs `config` on backend `B` (an autodiff backend) and `device`: [`Trainer::prepare`], then
/// [`Trainer::run`]. With several `train.devices`, `device` is rank 0's (the first) and the
/// others are resolved on `B`.
pub fn train_on<B: AutodiffKernelBackend>(
    config: &RunConfig,
    options: RunOptions,
    observer: &mut dyn Observer,
    device: B::Device,
) -> Result<RunSummary> {
    Trainer::<B>::prepare(config, options, observer, device)?.run(observer)
}
