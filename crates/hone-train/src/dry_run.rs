//! A run's plan without the run (`hone train --dry-run`): the checks [`Trainer::prepare`]
//! makes, the model's `config.json` and tokenizer (not its weights), the data curated and
//! tokenized, and from them the steps, tokens and estimated memory of the run. Nothing is
//! written: no run directory, lock, curated data, token cache, checkpoint or metrics; an entry
//! of the run's token cache that already exists is read ([`DataFiles::Nowhere`]).
//!
//! The numbers come from the code the run uses: [`Feed::new`] (the [`BatchPlan`] over the
//! training rows, `train.max_steps` or the epochs, the schedule) and [`BatchPlan::tokens`]
//! (the non-padding tokens of every step, which is what the run's steps report), so a run of
//! the same config trains exactly those steps on exactly those tokens.
//!
//! [`DryRun::Measure`] also loads the weights, attaches fresh adapters and times a few real
//! training steps through the run's step engine ([`Feed::step`]); the first is a warm-up
//! (allocator, thread pools, kernels) and is not counted.
//!
//! [`Trainer::prepare`]: crate::trainer::Trainer::prepare
//! [`BatchPlan`]: crate::data::BatchPlan
//! [`BatchPlan::tokens`]: crate::data::BatchPlan::tokens

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use hone_model::AutodiffKernelBackend;
use hone_model::{run_on_this_thread, BackendTask, DeviceSpec, Tokenizer};
use serde::Serialize;

use crate::config::RunConfig;
use crate::data::{prepare_datasets, DataFiles};
use crate::error::{Result, TrainError};
use crate::memory::{parameter_count, MemoryEstimate};
use crate::optim::AdamW;
use crate::run::{check_context, check_memory, check_paths, check_run_dir, RunOptions};
use crate::step::Learner;
use crate::trainer::{load_trainable, peer_devices, Feed};

/// How far a dry run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DryRun {
    /// Config, model metadata and tokenizer, data: steps, tokens, estimated memory.
    Plan,
    /// The plan, then the weights and `timed_steps` timed training steps after one warm-up
    /// step.
    Measure { timed_steps: usize },
}

/// The model a dry run opened (its `config.json`, not its weights).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// `model.path`.
    pub path: PathBuf,
    /// The directory's name.
    pub name: String,
    /// `llama`, `mistral`, `qwen2`.
    pub architecture: String,
    /// Parameters of the shapes in `config.json` ([`parameter_count`]).
    pub parameters: u64,
    pub vocab_size: usize,
    pub layers: usize,
    pub hidden_size: usize,
}

/// What the timed steps of [`DryRun::Measure`] took.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Mean wall time of a timed step (batches, forward, backward, update).
    pub step_seconds: f64,
    /// Wall time of the warm-up step.
    pub warmup_seconds: f64,
    /// Non-padding tokens per second of the timed steps.
    pub tokens_per_sec: f64,
    /// Parameters of the adapters the run trains.
    pub trainable_params: usize,
    /// Seconds to load the weights and attach the adapters.
    pub load_seconds: f64,
}

/// What a dry run found.
#[derive(Debug, Clone)]
pub struct DryRunReport {
    pub model: ModelInfo,
    /// `model.device`, or `train.devices`.
    pub devices: Vec<DeviceSpec>,
    /// Curation's report (counts of records read, kept, removed, bad).
    pub curation: hone_data::Report,
    /// Examples curation kept for training and validation.
    pub train_examples: usize,
    pub val_examples: usize,
    /// Tokenized rows (packed or one example each).
    pub train_rows: usize,
    pub val_rows: usize,
    /// Optimizer steps per pass over the training rows.
    pub steps_per_epoch: usize,
    /// Optimizer steps of the run.
    pub total_steps: usize,
    /// Non-padding tokens the run's steps train on.
    pub total_tokens: u64,
    /// The run's memory estimate (and the host's available memory on the CPU).
    pub memory: MemoryEstimate,
    /// With [`DryRun::Measure`].
    pub measured: Option<Measurement>,
}

impl DryRunReport {
    /// Passes over the training rows (fractional when `train.max_steps` cuts one short).
    pub fn epochs(&self) -> f64 {
        self.total_steps as f64 / self.steps_per_epoch.max(1) as f64
    }

    /// Mean non-padding tokens of a step.
    pub fn tokens_per_step(&self) -> f64 {
        self.total_tokens as f64 / self.total_steps.max(1) as f64
    }

    /// Measured seconds of all the run's steps (evaluations, checkpoints and samples not
    /// included); `None` without a measurement.
    pub fn total_seconds(&self) -> Option<f64> {
        self.measured
            .as_ref()
            .map(|m| m.step_seconds * self.total_steps as f64)
    }
}

/// Dry-runs `config` with `options` (`resume`/`overwrite` decide, as in a run, whether an
/// existing run directory is refused) on the device(s) it names.
pub fn dry_run(config: &RunConfig, options: &RunOptions, mode: DryRun) -> Result<DryRunReport> {
    struct Task<'a> {
        config: &'a RunConfig,
        options: &'a RunOptions,
        mode: DryRun,
    }
    impl BackendTask for Task<'_> {
        type Output = Result<DryRunReport>;
        fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Result<DryRunReport> {
            dry_run_on::<Autodiff<B>>(self.config, self.options, self.mode, device)
        }
    }
    run_on_this_thread(
        config.devices()[0],
        Task {
            config,
            options,
            mode,
        },
    )?
}

/// [`dry_run`] on backend `B` and rank 0's `device`.
pub fn dry_run_on<B: AutodiffKernelBackend>(
    config: &RunConfig,
    options: &RunOptions,
    mode: DryRun,
    device: B::Device,
) -> Result<DryRunReport> {
    // The checks of `Trainer::prepare`, in its order, writing nothing.
    check_paths(config)?;
    let model_config = check_context(config)?;
    let memory = check_memory::<B>(config, &model_config)?;
    let devices = peer_devices::<B>(config, device)?;
    check_run_dir(config, options)?;
    if matches!(mode, DryRun::Measure { .. }) && config.distributed.nodes > 1 {
        return Err(TrainError::config(
            "config",
            "distributed.nodes",
            format!(
                "--dry-run=measure times one process's steps, but the run has {} nodes; use \
                 --dry-run (no timing)",
                config.distributed.nodes
            ),
        ));
    }
    let path = &config.model.path;
    let tokenizer = Tokenizer::from_dir(path)?;
    let run_dir = config.run_dir();
    let data = prepare_datasets(
        config,
        &tokenizer,
        model_config.vocab_size,
        DataFiles::Nowhere(&run_dir),
    )?;
    let feed = Feed::new(config, data);
    let model = ModelInfo {
        path: path.clone(),
        name: path
            .canonicalize()
            .unwrap_or_else(|_| path.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        architecture: format!("{:?}", model_config.architecture).to_lowercase(),
        parameters: parameter_count(&model_config),
        vocab_size: model_config.vocab_size,
        layers: model_config.num_layers,
        hidden_size: model_config.hidden_size,
    };
    let mut report = DryRunReport {
        model,
        devices: config.devices(),
        curation: feed.data.curation.clone(),
        train_examples: feed.data.curated_train,
        val_examples: feed.data.curated_val,
        train_rows: feed.data.train.len(),
        val_rows: feed.data.val.len(),
        steps_per_epoch: feed.plan.steps_per_epoch(),
        total_steps: feed.total_steps(),
        total_tokens: feed.total_tokens(),
        memory,
        measured: None,
    };
    if let DryRun::Measure { timed_steps } = mode {
        report.measured = Some(measure::<B>(config, options, feed, &devices, timed_steps)?);
    }
    Ok(report)
}

/// Loads the model with fresh adapters and times `timed_steps` (at least 1) steps after a
/// warm-up step, through the run's step engine (data-parallel over `devices` when there are
/// several).
fn measure<B: AutodiffKernelBackend>(
    config: &RunConfig,
    options: &RunOptions,
    mut feed: Feed,
    devices: &[B::Device],
    timed_steps: usize,
) -> Result<Measurement> {
    let t = &config.train;
    let started = Instant::now();
    let (model, _, _) = load_trainable::<B>(config, &devices[0])?;
    let load_seconds = started.elapsed().as_secs_f64();
    let trainable_params = model.lora_parameter_count();
    let mut learner = Learner::with_optimizer(
        model,
        AdamW::new(t.adamw()),
        t.max_grad_norm,
        devices[0].clone(),
    );
    let timeout = Duration::from_secs(t.collective_timeout_secs);
    let mut engine = learner.start_engine(devices, timeout, None)?;
    let timed_steps = timed_steps.max(1);
    let (mut warmup_seconds, mut seconds, mut tokens) = (0.0, 0.0, 0usize);
    // Each step reads its loss back, so the device has finished it when the clock stops.
    for step in 0..=timed_steps {
        if options.stop.is_stopped() {
            return Err(TrainError::Interrupted {
                step: 0,
                checkpoint: None,
            });
        }
        let clock = Instant::now();
        let outcome = feed.step(engine.as_mut(), &mut learner, step)?;
        let elapsed = clock.elapsed().as_secs_f64();
        if step == 0 {
            warmup_seconds = elapsed;
        } else {
            seconds += elapsed;
            tokens += outcome.tokens;
        }
    }
    engine.finish()?;
    Ok(Measurement {
        steps: timed_steps,
        step_seconds: seconds / timed_steps as f64,
        warmup_seconds,
        tokens_per_sec: tokens as f64 / seconds.max(1e-9),
        trainable_params,
        load_seconds,
    })
}
