//! A whole training run from a [`RunConfig`]: run directory, data, model with fresh adapters
//! (or the latest checkpoint when resuming), the step loop with logging, evaluation,
//! checkpoints and the non-finite-step guard, then the final adapter and sample generations.
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
//! With several `train.devices`, this thread is rank 0 of a [`DataParallel`] session: it
//! prepares the data, hands every peer its share of each step, and alone evaluates, logs and
//! writes checkpoints, the adapter and samples (every peer holds the same adapter).
//!
//! With `train.nodes > 1` every node runs this with its own run directory and its local peers;
//! node 0's rank 0 alone evaluates, logs and writes checkpoints, the adapter and samples, the
//! other nodes train silently.
//!
//! Progress is reported through an [`Observer`]; the library prints nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hone_model::{load_model_dir, run_on, BackendTask, CausalLm, LoadOptions, ModelConfig};
use serde::Serialize;

use crate::checkpoint::{self, LogWindow, TrainerState, CHECKPOINT_FORMAT};
use crate::config::RunConfig;
use crate::data::{collate, prepare_datasets, BatchPlan};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, EvalResult, Sample, SampleSetup};
use crate::lock::RunLock;
use crate::memory::{self, MemoryEstimate, RunShape};
use crate::metrics::MetricsWriter;
use crate::optim::{AdamW, AdamWConfig};
use crate::parallel::{device_for, DataParallel, ParallelConfig};
use crate::schedule::Schedule;
use crate::step::{apply_update, step_gradients, StepOutcome};

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
        fn run<B: Backend>(self, device: B::Device) -> Result<RunSummary> {
            train_on::<Autodiff<B>>(self.config, self.options, self.observer, device)
        }
    }
    run_on(
        config.devices()[0],
        Task {
            config,
            options,
            observer,
        },
    )?
}

/// A seed for the random numbers of micro-batch `micro` of step `step` (splitmix64 mixing).
fn step_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ ((step as u64) << 20 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D1_049B_133A_D1EB);
    z ^ (z >> 31)
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

/// Prepares the run directory: refuses a directory that is not a run, takes the run's lock,
/// refuses to mix runs, clears it for `overwrite` and checks a resumed config. `config.toml`
/// is written later, once setup succeeded ([`write_run_config`]).
fn prepare_run_dir(config: &RunConfig, options: &RunOptions) -> Result<(PathBuf, RunLock)> {
    let dir = config.run_dir();
    let saved = dir.join(CONFIG_FILE);
    let run_dir_error = |message: String| TrainError::RunDir {
        path: dir.clone(),
        message,
    };
    let foreign = |dir: &Path| -> Result<bool> {
        match std::fs::read_dir(dir) {
            Ok(entries) => Ok(entries
                .flatten()
                .any(|e| !is_setup_leftover(&e.file_name().to_string_lossy()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(TrainError::io(dir, e)),
        }
    };
    if !saved.is_file() && foreign(&dir)? {
        return Err(run_dir_error(format!(
            "is not empty and holds no {CONFIG_FILE}: it is not a hone run; choose another output.dir"
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let lock = RunLock::acquire(&dir)?;
    if let Some(pid) = lock.stale_holder() {
        tracing::warn!(
            "{}: the run of pid {pid} ended without releasing its lock (killed?); taking it over",
            lock.path().display()
        );
    }
    if saved.is_file() {
        if options.resume {
            let previous = RunConfig::load(&saved, &[])?;
            let differences = config_differences(&previous, config);
            if !differences.is_empty() {
                return Err(run_dir_error(format!(
                    "cannot resume: the config differs from the run's {CONFIG_FILE} in {}",
                    differences.join(", ")
                )));
            }
        } else if options.overwrite {
            // Everything but the lock we hold: removing its file would let another run lock
            // a new one.
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
        } else {
            return Err(run_dir_error(
                "holds a run already: pass --resume to continue it, --overwrite to start again, \
                 or choose another output.name"
                    .into(),
            ));
        }
    }
    checkpoint::remove_stale_temporaries(&dir)?;
    Ok((dir, lock))
}

/// Writes the resolved config to `<run>/config.toml` (atomically), which marks the directory
/// as a run: called once setup succeeded, so that a failed setup leaves no run behind.
fn write_run_config(config: &RunConfig, dir: &Path) -> Result<()> {
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
fn check_paths(config: &RunConfig) -> Result<()> {
    let missing = |key: &str, what: &str, path: &Path| TrainError::MissingPath {
        key: key.into(),
        what: what.into(),
        path: path.to_path_buf(),
        cwd: working_dir(),
    };
    if !config.model.path.is_dir() {
        return Err(missing("model.path", "model directory", &config.model.path));
    }
    match hone_data::reader::expand_inputs(&config.data.inputs) {
        Err(hone_data::error::DataError::NoMatch { pattern }) => {
            Err(missing("data.inputs", "data path", Path::new(&pattern)))
        }
        Err(e) => Err(e.into()),
        Ok(_) => Ok(()),
    }
}

/// Reads the model's `config.json` and refuses a `tokenize.max_seq_len` beyond its context.
fn check_context(config: &RunConfig) -> Result<ModelConfig> {
    let path = config.model.path.join("config.json");
    let model_config = ModelConfig::from_file(&path)?;
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
fn check_memory<B: Backend>(
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
        fused_cpu: hone_model::kernels::fused::<B>(dtype),
        replicas: if on_cpu { devices.len() } else { 1 },
    };
    let mut estimate = memory::estimate(model_config, shape);
    if on_cpu {
        estimate.available = memory::mem_available();
        memory::check(&estimate, &shape)?;
    }
    Ok(estimate)
}

/// Runs `config` on backend `B` (an autodiff backend) and `device`. With several
/// `train.devices`, `device` is rank 0's (the first) and the others are resolved on `B`.
pub fn train_on<B: AutodiffBackend>(
    config: &RunConfig,
    options: RunOptions,
    observer: &mut dyn Observer,
    device: B::Device,
) -> Result<RunSummary> {
    let started = Instant::now();
    let t = &config.train;
    // Config errors that need the file system or the model's config.json, before anything
    // is created.
    check_paths(config)?;
    let model_config = check_context(config)?;
    let memory = check_memory::<B>(config, &model_config)?;
    let mut devices = vec![device.clone()];
    for spec in &config.devices()[1..] {
        devices.push(device_for::<B>(*spec)?);
    }
    // Global rank 0 (node 0's rank 0) evaluates, logs and writes; other nodes train silently.
    let lead = t.node_rank == 0;
    // Held until the run returns.
    let (run_dir, _lock) = prepare_run_dir(config, &options)?;
    observer.on_event(&Event::Locked { run_dir: &run_dir });
    let load = LoadOptions {
        dtype: config.model.dtype.burn(),
    };
    let loaded = load_model_dir::<B>(&config.model.path, &device, load)?;
    let tokenizer = loaded.tokenizer;
    let mut model: CausalLm<B> = loaded.model;
    let settings = config.lora.settings();
    B::seed(&device, t.seed);
    model.attach_lora(&settings)?;
    if config.train.gradient_checkpointing {
        model.enable_gradient_checkpointing()?;
    }
    let data = prepare_datasets(config, &tokenizer, model.config.vocab_size, &run_dir)?;

    let plan = BatchPlan {
        rows: data.train.len(),
        micro_batch_size: t.micro_batch_size,
        // With several devices a step reads every peer's micro-batches.
        grad_accum: t.grad_accum * devices.len() * t.nodes,
        seed: t.seed,
    };
    let total_steps = t.max_steps.unwrap_or(t.epochs * plan.steps_per_epoch());
    let schedule = Schedule {
        kind: t.schedule,
        peak_lr: t.lr,
        warmup_steps: Schedule::warmup_from(total_steps, t.warmup_steps, t.warmup_ratio),
        total_steps,
    };
    let adamw = AdamWConfig {
        beta1: t.betas[0],
        beta2: t.betas[1],
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let base_model = config.model.path.display().to_string();

    // Resume from the newest checkpoint that loads.
    let mut optimizer = AdamW::<B::InnerBackend>::new(adamw);
    let mut state = TrainerState {
        format: CHECKPOINT_FORMAT,
        step: 0,
        total_steps,
        optimizer_step: 0,
        scheduler_step: 0,
        data: plan.position(0),
        seed: t.seed,
        rng_consumed: 0,
        bad_steps_in_row: 0,
        bad_steps_total: 0,
        tokens_seen: 0,
        log_window: LogWindow::default(),
    };
    let mut resumed_from: Option<PathBuf> = None;
    if options.resume {
        // Newest first; a checkpoint that does not load is reported and the one before it
        // tried. Checkpoints that exist but none loading is an error, never a fresh start.
        let mut failure = None;
        for (_, dir) in checkpoint::list_checkpoints(&run_dir)?.into_iter().rev() {
            match checkpoint::load_checkpoint(&dir, &mut model, &settings, adamw) {
                Ok((opt, st)) => {
                    optimizer = opt;
                    state = st;
                    resumed_from = Some(dir);
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot resume from {}: {e}", dir.display());
                    failure.get_or_insert(e);
                }
            }
        }
        if let (None, Some(e)) = (&resumed_from, failure) {
            return Err(e);
        }
        if state.step > total_steps {
            return Err(TrainError::RunDir {
                path: run_dir.clone(),
                message: format!(
                    "the checkpoint is at step {} but the run has {total_steps} steps",
                    state.step
                ),
            });
        }
    }
    state.total_steps = total_steps;
    let start_step = state.step;
    // Setup succeeded: now the directory holds a run.
    write_run_config(config, &run_dir)?;
    let mut metrics = if lead {
        // Resumed: the lines of later steps go (those of the checkpoint's step were all
        // written before it). Fresh: whatever a run killed before its first checkpoint wrote.
        let resume_step = resumed_from.as_ref().map(|_| start_step);
        Some(MetricsWriter::open(&run_dir, resume_step)?)
    } else {
        None
    };
    let mut summary = RunSummary {
        run_dir: run_dir.clone(),
        step: start_step,
        total_steps,
        resumed_from: resumed_from.as_ref().map(|_| start_step),
        completed: false,
        first_eval: None,
        last_eval: None,
        last_loss: None,
        bad_steps_total: state.bad_steps_total,
        adapter_dir: None,
        samples: Vec::new(),
        seconds: 0.0,
    };
    observer.on_event(&Event::Started {
        run_dir: &run_dir,
        total_steps,
        start_step,
        resumed_from: resumed_from.as_deref(),
        train_rows: data.train.len(),
        val_rows: data.val.len(),
        trainable_params: model.lora_parameter_count(),
        memory: &memory,
    });

    let eval_batch = config.eval.micro_batch_size.unwrap_or(t.micro_batch_size);
    // `metrics: None` evaluates without logging (an evaluation logged before).
    let run_eval = |model: &CausalLm<B>,
                    step: usize,
                    metrics: Option<&mut MetricsWriter>,
                    observer: &mut dyn Observer|
     -> Result<Option<EvalResult>> {
        let valid = model.valid();
        let result = evaluate(
            &valid,
            &data.val,
            eval_batch,
            config.eval.max_batches,
            data.pad_id,
            step,
            &device,
        )?;
        if let (Some(r), Some(metrics)) = (&result, metrics) {
            metrics.log(step, &[("eval/loss", r.loss), ("eval/ppl", r.ppl)])?;
            observer.on_event(&Event::Evaluated(r));
        }
        Ok(result)
    };
    if let Some(metrics) = metrics
        .as_mut()
        .filter(|_| start_step == 0 && config.eval.at_start)
    {
        summary.first_eval = run_eval(&model, 0, Some(metrics), observer)?;
    }

    let mut parallel = if (devices.len() > 1 || t.nodes > 1) && start_step < total_steps {
        let parallel_config = ParallelConfig {
            max_grad_norm: t.max_grad_norm,
            timeout: Duration::from_secs(t.collective_timeout_secs),
        };
        Some(DataParallel::start_on_nodes(
            &mut model,
            &optimizer,
            &devices,
            parallel_config,
            config.multinode(),
        )?)
    } else {
        None
    };
    if options.stop.is_stopped() && start_step < total_steps {
        return Err(TrainError::Interrupted {
            step: start_step,
            checkpoint: resumed_from,
        });
    }
    // A resumed run continues the checkpoint's logging window.
    let mut window = std::mem::take(&mut state.log_window);
    let mut order: Option<(usize, Vec<usize>)> = None;
    for step in start_step..total_steps {
        let step_started = Instant::now();
        let epoch = plan.position(step).epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, plan.epoch_order(epoch)));
        }
        let rows = plan.step_rows(step, &order.as_ref().expect("set above").1);
        let batches = rows
            .iter()
            .map(|indices| {
                collate(
                    &indices.iter().map(|&i| &data.train[i]).collect::<Vec<_>>(),
                    data.pad_id,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let outcome = match &mut parallel {
            None => {
                let grads = step_gradients(&model, &batches, &device, |micro| {
                    B::seed(&device, step_seed(t.seed, step, micro))
                })?;
                apply_update(
                    &mut model,
                    &mut optimizer,
                    grads,
                    schedule.lr(step),
                    t.max_grad_norm,
                )?
            }
            Some(parallel) => {
                let seeds: Vec<u64> = (0..batches.len())
                    .map(|micro| step_seed(t.seed, step, micro))
                    .collect();
                parallel.step(
                    &mut model,
                    &mut optimizer,
                    step,
                    &batches,
                    Some(&seeds),
                    schedule.lr(step),
                )?
            }
        };
        let done = step + 1;
        state.step = done;
        state.scheduler_step = done;
        state.rng_consumed = done;
        state.data = plan.position(done);
        state.optimizer_step = optimizer.step;
        state.tokens_seen += outcome.tokens as u64;
        if outcome.applied {
            state.bad_steps_in_row = 0;
        } else {
            state.bad_steps_in_row += 1;
            state.bad_steps_total += 1;
            summary.bad_steps_total = state.bad_steps_total;
            tracing::warn!(
                "step {done}: non-finite loss {} or gradient norm {}; update skipped",
                outcome.loss,
                outcome.grad_norm
            );
            if state.bad_steps_in_row >= t.max_bad_steps {
                let last_good = match checkpoint::list_checkpoints(&run_dir)?.last() {
                    Some((_, dir)) => format!("the last good checkpoint is {}", dir.display()),
                    None => "no checkpoint had been written (train.save_every = 0 or none reached)"
                        .into(),
                };
                return Err(TrainError::Diverged {
                    step: done,
                    count: state.bad_steps_in_row,
                    last_good,
                });
            }
        }
        let seconds = step_started.elapsed().as_secs_f64();
        summary.step = done;
        summary.last_loss = Some(outcome.loss);
        if outcome.applied {
            window.loss += outcome.loss;
            window.steps += 1;
            window.last_grad_norm = Some(outcome.grad_norm);
        }
        window.tokens += outcome.tokens;
        window.seconds += seconds;
        let mut control = observer.on_event(&Event::Step {
            step: done,
            total_steps,
            outcome: &outcome,
            tokens_per_sec: outcome.tokens as f64 / seconds.max(1e-9),
            tokens_seen: state.tokens_seen,
        });
        if let Some(metrics) = metrics
            .as_mut()
            .filter(|_| done % t.log_every == 0 || done == total_steps)
        {
            let loss = if window.steps > 0 {
                window.loss / window.steps as f64
            } else {
                f64::NAN
            };
            let tokens_per_sec = window.tokens as f64 / window.seconds.max(1e-9);
            let last_grad_norm = window.last_grad_norm.unwrap_or(f64::NAN);
            metrics.log(
                done,
                &[
                    ("train/loss", loss),
                    ("train/lr", outcome.lr),
                    ("train/grad_norm", last_grad_norm),
                    ("train/tokens_per_sec", tokens_per_sec),
                ],
            )?;
            observer.on_event(&Event::Logged {
                step: done,
                loss,
                lr: outcome.lr,
                grad_norm: last_grad_norm,
                tokens_per_sec,
            });
            window = LogWindow {
                last_grad_norm: window.last_grad_norm,
                ..LogWindow::default()
            };
        }
        // The final evaluation too comes before the step's checkpoint: a run resumed from
        // the checkpoint of step N finds everything of step N logged.
        if let Some(metrics) = metrics
            .as_mut()
            .filter(|_| done == total_steps || (t.eval_every > 0 && done % t.eval_every == 0))
        {
            summary.last_eval =
                run_eval(&model, done, Some(metrics), observer)?.or(summary.last_eval);
        }
        // Asked to stop: a checkpoint of this step, whatever save_every says.
        let stopping = options.stop.is_stopped() && done < total_steps;
        let due = t.save_every > 0 && done % t.save_every == 0;
        let mut saved = None;
        if lead && (due || stopping) && state.bad_steps_in_row == 0 {
            let dir = checkpoint::checkpoint_dir(&run_dir, done);
            state.log_window = window.clone();
            checkpoint::save_checkpoint(&dir, &model, &settings, &base_model, &optimizer, &state)?;
            checkpoint::prune_checkpoints(&run_dir, t.keep_last)?;
            if observer.on_event(&Event::Checkpoint {
                step: done,
                dir: &dir,
            }) == Control::Stop
            {
                control = Control::Stop;
            }
            saved = Some(dir);
        }
        if stopping {
            let checkpoint = match saved {
                Some(dir) => Some(dir),
                None => checkpoint::list_checkpoints(&run_dir)?
                    .pop()
                    .map(|(_, dir)| dir),
            };
            return Err(TrainError::Interrupted {
                step: done,
                checkpoint,
            });
        }
        if control == Control::Stop && done < total_steps {
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }

    if let Some(parallel) = parallel.take() {
        parallel.finish()?;
    }
    if metrics.is_none() {
        summary.completed = true;
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    if start_step == total_steps {
        // Resumed from the final checkpoint: its evaluation was logged before it was written.
        summary.last_eval = run_eval(&model, total_steps, None, observer)?;
    }
    let adapter_dir = run_dir.join(FINAL_ADAPTER);
    model.save_adapter(&adapter_dir, &settings, &base_model)?;
    summary.adapter_dir = Some(adapter_dir.clone());
    summary.completed = true;
    observer.on_event(&Event::Finished {
        step: total_steps,
        adapter_dir: &adapter_dir,
    });

    if !config.eval.prompts.is_empty() {
        let setup = SampleSetup {
            tokenizer: &tokenizer,
            template: data.template.as_ref(),
            template_vars: &config.tokenize.template_vars,
            max_new_tokens: config.eval.max_new_tokens,
            temperature: config.eval.temperature,
            seed: t.seed,
        };
        let tuned = model.valid();
        let mut base = tuned.clone();
        base.detach_lora();
        let mut lines = String::new();
        for prompt in &config.eval.prompts {
            let (rendered, ids) = setup.encode(prompt)?;
            let sample = Sample {
                prompt: prompt.clone(),
                rendered,
                base: setup.generate(&base, &ids)?,
                adapter: setup.generate(&tuned, &ids)?,
            };
            lines.push_str(&(serde_json::to_string(&sample).expect("a sample serialises") + "\n"));
            summary.samples.push(sample);
        }
        let path = run_dir.join(SAMPLES_FILE);
        std::fs::write(&path, lines).map_err(|e| TrainError::io(&path, e))?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
