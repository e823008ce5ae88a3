//! The [`Trainer`]: one run in four named steps.
//!
//! * [`Trainer::prepare`]: config checks that need the file system, the run directory and its
//!   lock, the model with fresh adapters, the data, resuming from the newest checkpoint that
//!   loads, `config.toml`, the first evaluation and the [`StepEngine`];
//! * [`Trainer::step`]: the step's micro-batches through the engine (one device, or
//!   data-parallel peers on several devices and nodes), the trainer state and the
//!   non-finite-step guard;
//! * [`Trainer::after_step`]: the step's event, logging, evaluation and checkpoints (also the
//!   checkpoint of an interrupted run);
//! * [`Trainer::finish`]: the engine's end, the final adapter and the sample generations.
//!
//! [`Trainer::run`] drives them. The process has a [`Role`]: the lead (global rank 0) logs,
//! evaluates and writes checkpoints, the adapter and samples; a follower (another node of a
//! multi-node run) only trains.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use hone_model::lora::LoraSettings;
use hone_model::AutodiffKernelBackend;
use hone_model::{load_model_dir, CausalLm, LoadOptions, Tokenizer};

use crate::checkpoint::{self, LogWindow, TrainerState, CHECKPOINT_FORMAT};
use crate::config::RunConfig;
use crate::data::{prepare_datasets, BatchPlan, DataFiles, Datasets};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, EvalResult, Sample, SampleSetup};
use crate::lock::RunLock;
use crate::metrics::MetricsWriter;
use crate::optim::AdamW;
use crate::parallel::device_for;
use crate::run::{
    check_context, check_memory, check_paths, prepare_run_dir, write_run_config, Control, Event,
    Observer, RunOptions, RunSummary, StopToken, FINAL_ADAPTER, SAMPLES_FILE,
};
use crate::schedule::Schedule;
use crate::step::{step_seeds, Learner, SingleDevice, StepEngine, StepOutcome};

/// What this process does besides training.
pub enum Role {
    /// Global rank 0 (node 0's rank 0, or the only process): evaluates, logs to the metrics,
    /// writes checkpoints, the final adapter and the samples.
    Lead(MetricsWriter),
    /// Another node of a multi-node run: trains its peers' shares, writes nothing.
    Follower,
}

/// What [`Trainer::step`] did.
#[derive(Debug, Clone, Copy)]
pub struct StepDone {
    /// Steps done (the step just finished, counted from 1).
    pub step: usize,
    pub outcome: StepOutcome,
    /// Wall time of the step (its batches, forward, backward and update).
    pub seconds: f64,
}

/// What each step trains on: the rows, the plan that visits them (with the current epoch's
/// order) and the learning-rate schedule. The trainer's and `hone train --dry-run`'s
/// ([`crate::dry_run`]) steps go through [`Feed::step`].
pub struct Feed {
    pub data: Datasets,
    pub plan: BatchPlan,
    pub schedule: Schedule,
    seed: u64,
    /// The epoch whose visiting order is cached, and that order.
    order: Option<(usize, Vec<usize>)>,
}

impl Feed {
    /// The feed of `config`'s run over `data`: [`BatchPlan::for_run`], its
    /// [`BatchPlan::total_steps`] and the `[train]` schedule over them.
    pub fn new(config: &RunConfig, data: Datasets) -> Self {
        let t = &config.train;
        let plan = BatchPlan::for_run(config, data.train.len());
        let total_steps = plan.total_steps(t);
        let schedule = Schedule {
            kind: t.schedule,
            peak_lr: t.lr,
            warmup_steps: Schedule::warmup_from(total_steps, t.warmup_steps, t.warmup_ratio),
            total_steps,
        };
        Self {
            data,
            plan,
            schedule,
            seed: t.seed,
            order: None,
        }
    }

    /// Optimizer steps of the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// Non-padding tokens the whole run trains on.
    pub fn total_tokens(&self) -> u64 {
        self.plan.tokens(self.total_steps(), &self.data.train)
    }

    /// Step `step` (0-based) through `engine`: its micro-batches (the data order is a
    /// function of the seed and the step), their dropout seeds and the schedule's learning
    /// rate.
    pub fn step<B: AutodiffKernelBackend>(
        &mut self,
        engine: &mut dyn StepEngine<B>,
        learner: &mut Learner<B>,
        step: usize,
    ) -> Result<StepOutcome> {
        let epoch = self.plan.position(step).epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.plan.epoch_order(epoch)));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let batches = self
            .plan
            .step_batches(step, order, &self.data.train, self.data.pad_id)?;
        let seeds = step_seeds(self.seed, step, batches.len());
        engine.step(
            learner,
            step,
            &batches,
            Some(&seeds),
            self.schedule.lr(step),
        )
    }
}

/// The devices of `config`'s peers: `device` (rank 0's), then the other `train.devices`
/// resolved on `B`.
pub(crate) fn peer_devices<B: AutodiffKernelBackend>(
    config: &RunConfig,
    device: B::Device,
) -> Result<Vec<B::Device>> {
    let mut devices = vec![device];
    for spec in &config.devices()[1..] {
        devices.push(device_for::<B>(*spec)?);
    }
    Ok(devices)
}

/// The model of `config` (`model.path`, in `model.dtype`) on `device` with fresh adapters
/// (`[lora]`, initialised from `train.seed`) and, with `train.gradient_checkpointing`,
/// recomputed layers; its tokenizer and the adapter settings.
pub(crate) fn load_trainable<B: AutodiffKernelBackend>(
    config: &RunConfig,
    device: &B::Device,
) -> Result<(CausalLm<B>, Tokenizer, LoraSettings)> {
    let load = LoadOptions {
        dtype: config.model.dtype.burn(),
        dequantize: config.model.dequantize,
        ..LoadOptions::default()
    };
    let loaded = load_model_dir::<B>(&config.model.path, device, load)?;
    let mut model = loaded.model;
    model.set_kernels(config.model.kernels);
    let settings = config.lora.settings();
    B::seed(device, config.train.seed);
    // The adapters are drawn on the CPU whatever the device: one seed, one initial adapter.
    <hone_model::Cpu as burn::tensor::backend::Backend>::seed(
        &Default::default(),
        config.train.seed,
    );
    model.attach_lora(&settings)?;
    if config.train.gradient_checkpointing {
        model.enable_gradient_checkpointing()?;
    }
    Ok((model, loaded.tokenizer, settings))
}

/// A run in progress; see the module doc.
pub struct Trainer<'a, B: AutodiffKernelBackend> {
    // Dropped first: the peers leave before the rest goes, the lock is released last.
    engine: Box<dyn StepEngine<B>>,
    config: &'a RunConfig,
    stop: StopToken,
    run_dir: PathBuf,
    role: Role,
    learner: Learner<B>,
    tokenizer: Tokenizer,
    feed: Feed,
    settings: LoraSettings,
    base_model: String,
    /// What a checkpoint records; `state.step` is the number of steps done.
    state: TrainerState,
    /// Averages since the last logging point (a resumed run continues its checkpoint's).
    window: LogWindow,
    start_step: usize,
    summary: RunSummary,
    started: Instant,
    _lock: RunLock,
}

impl<'a, B: AutodiffKernelBackend> Trainer<'a, B> {
    /// Everything before the first step: checks, run directory (locked until the trainer is
    /// dropped), model and adapters, data, resume (`options.resume`: the newest checkpoint
    /// that loads), `config.toml`, the first evaluation and the step engine. With several
    /// `train.devices`, `device` is rank 0's (the first) and the others are resolved on `B`.
    pub fn prepare(
        config: &'a RunConfig,
        options: RunOptions,
        observer: &mut dyn Observer,
        device: B::Device,
    ) -> Result<Self> {
        let started = Instant::now();
        let t = &config.train;
        // Config errors that need the file system or the model's config.json, before
        // anything is created.
        check_paths(config)?;
        let model_config = check_context(config)?;
        let memory = check_memory::<B>(config, &model_config)?;
        let devices = peer_devices::<B>(config, device.clone())?;
        let multinode = config.multinode();
        if let Some(warning) = config.distributed.obsolete_keys_warning() {
            tracing::warn!("{warning}");
        }
        let lead = multinode.as_ref().is_none_or(|m| m.node_rank == 0);
        let (run_dir, lock) = prepare_run_dir(config, &options)?;
        observer.on_event(&Event::Locked { run_dir: &run_dir });
        let (mut model, tokenizer, settings) = load_trainable::<B>(config, &device)?;
        let vocab_size = model.config().vocab_size;
        let data = prepare_datasets(config, &tokenizer, vocab_size, DataFiles::Run(&run_dir))?;
        let feed = Feed::new(config, data);
        let plan = &feed.plan;
        let total_steps = feed.total_steps();
        let adamw = t.adamw();

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
        let role = if lead {
            // Resumed: the lines of later steps go (those of the checkpoint's step were all
            // written before it). Fresh: whatever a run killed before its first checkpoint
            // wrote.
            let resume_step = resumed_from.as_ref().map(|_| start_step);
            Role::Lead(MetricsWriter::open(&run_dir, resume_step)?)
        } else {
            Role::Follower
        };
        let summary = RunSummary {
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
            train_rows: feed.data.train.len(),
            val_rows: feed.data.val.len(),
            trainable_params: model.lora_parameter_count(),
            memory: &memory,
        });
        let window = std::mem::take(&mut state.log_window);
        let mut trainer = Self {
            engine: Box::new(SingleDevice),
            config,
            stop: options.stop,
            run_dir,
            role,
            learner: Learner::with_optimizer(model, optimizer, t.max_grad_norm, device),
            tokenizer,
            feed,
            settings,
            base_model: config.model.path.display().to_string(),
            state,
            window,
            start_step,
            summary,
            started,
            _lock: lock,
        };
        if start_step == 0 && config.eval.at_start {
            trainer.summary.first_eval = trainer.evaluate(0, true, observer)?;
        }
        if !trainer.is_done() {
            let timeout = std::time::Duration::from_secs(t.collective_timeout_secs);
            trainer.engine = trainer.learner.start_engine(&devices, timeout, multinode)?;
            if trainer.stop.is_stopped() {
                return Err(TrainError::Interrupted {
                    step: start_step,
                    checkpoint: resumed_from,
                });
            }
        }
        Ok(trainer)
    }

    /// Every step is done.
    pub fn is_done(&self) -> bool {
        self.state.step >= self.summary.total_steps
    }

    /// The lead or a follower.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// The next step: its micro-batches (the data order is a function of the seed and the
    /// step), the engine's update at the schedule's learning rate, the trainer state. A step
    /// whose loss or gradient is not finite is skipped; `train.max_bad_steps` of them in a
    /// row end the run with [`TrainError::Diverged`].
    pub fn step(&mut self) -> Result<StepDone> {
        let started = Instant::now();
        let config = self.config;
        let t = &config.train;
        let step = self.state.step;
        let outcome = self
            .feed
            .step(self.engine.as_mut(), &mut self.learner, step)?;

        let done = step + 1;
        let state = &mut self.state;
        state.step = done;
        state.scheduler_step = done;
        state.rng_consumed = done;
        state.data = self.feed.plan.position(done);
        state.optimizer_step = self.learner.optimizer.step;
        state.tokens_seen += outcome.tokens as u64;
        if outcome.applied {
            state.bad_steps_in_row = 0;
        } else {
            state.bad_steps_in_row += 1;
            state.bad_steps_total += 1;
            self.summary.bad_steps_total = state.bad_steps_total;
            tracing::warn!(
                "step {done}: non-finite loss {} or gradient norm {}; update skipped",
                outcome.loss,
                outcome.grad_norm
            );
            if state.bad_steps_in_row >= t.max_bad_steps {
                let last_good = match checkpoint::list_checkpoints(&self.run_dir)?.last() {
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
        Ok(StepDone {
            step: done,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// After a step: its event; on the lead, the metrics every `train.log_every` steps, the
    /// validation every `train.eval_every` steps and at the end, a checkpoint every
    /// `train.save_every` steps. Once stopped ([`RunOptions::stop`]), a checkpoint of this
    /// step whatever `save_every` says, then [`TrainError::Interrupted`]. What the observer
    /// asked for is returned.
    pub fn after_step(&mut self, done: StepDone, observer: &mut dyn Observer) -> Result<Control> {
        let config = self.config;
        let t = &config.train;
        let StepDone {
            step,
            outcome,
            seconds,
        } = done;
        let total_steps = self.summary.total_steps;
        self.summary.step = step;
        self.summary.last_loss = Some(outcome.loss);
        let window = &mut self.window;
        if outcome.applied {
            window.loss += outcome.loss;
            window.steps += 1;
            window.last_grad_norm = Some(outcome.grad_norm);
        }
        window.tokens += outcome.tokens;
        window.seconds += seconds;
        let mut control = observer.on_event(&Event::Step {
            step,
            total_steps,
            outcome: &outcome,
            tokens_per_sec: outcome.tokens as f64 / seconds.max(1e-9),
            tokens_seen: self.state.tokens_seen,
        });
        if step % t.log_every == 0 || step == total_steps {
            self.log(step, outcome.lr, observer)?;
        }
        // The final evaluation too comes before the step's checkpoint: a run resumed from
        // the checkpoint of step N finds everything of step N logged.
        if step == total_steps || (t.eval_every > 0 && step % t.eval_every == 0) {
            let last = self.summary.last_eval.take();
            self.summary.last_eval = self.evaluate(step, true, observer)?.or(last);
        }
        // Asked to stop: a checkpoint of this step, whatever save_every says.
        let stopping = self.stop.is_stopped() && step < total_steps;
        let due = t.save_every > 0 && step % t.save_every == 0;
        let mut saved = None;
        if matches!(self.role, Role::Lead(_))
            && (due || stopping)
            && self.state.bad_steps_in_row == 0
        {
            let dir = checkpoint::checkpoint_dir(&self.run_dir, step);
            self.state.log_window = self.window.clone();
            checkpoint::save_checkpoint(
                &dir,
                &self.learner.model,
                &self.settings,
                &self.base_model,
                &self.learner.optimizer,
                &self.state,
            )?;
            checkpoint::prune_checkpoints(&self.run_dir, t.keep_last)?;
            if observer.on_event(&Event::Checkpoint { step, dir: &dir }) == Control::Stop {
                control = Control::Stop;
            }
            saved = Some(dir);
        }
        if stopping {
            let checkpoint = match saved {
                Some(dir) => Some(dir),
                None => checkpoint::list_checkpoints(&self.run_dir)?
                    .pop()
                    .map(|(_, dir)| dir),
            };
            return Err(TrainError::Interrupted { step, checkpoint });
        }
        Ok(control)
    }

    /// The end of a run whose steps are all done: the engine ends (an error when a peer
    /// failed); the lead writes the final adapter and the samples.
    pub fn finish(mut self, observer: &mut dyn Observer) -> Result<RunSummary> {
        std::mem::replace(&mut self.engine, Box::new(SingleDevice)).finish()?;
        self.summary.completed = true;
        if matches!(self.role, Role::Follower) {
            return Ok(self.stopped());
        }
        let total_steps = self.summary.total_steps;
        if self.start_step == total_steps {
            // Resumed from the final checkpoint: its evaluation was logged before it was
            // written.
            self.summary.last_eval = self.evaluate(total_steps, false, observer)?;
        }
        let adapter_dir = self.run_dir.join(FINAL_ADAPTER);
        self.learner
            .model
            .save_adapter(&adapter_dir, &self.settings, &self.base_model)?;
        self.summary.adapter_dir = Some(adapter_dir.clone());
        observer.on_event(&Event::Finished {
            step: total_steps,
            adapter_dir: &adapter_dir,
        });
        self.write_samples()?;
        Ok(self.stopped())
    }

    /// Steps until done (or until the observer stops the run early: then no final adapter is
    /// written and the summary is not `completed`), then [`Trainer::finish`].
    pub fn run(mut self, observer: &mut dyn Observer) -> Result<RunSummary> {
        while !self.is_done() {
            let done = self.step()?;
            if self.after_step(done, observer)? == Control::Stop && !self.is_done() {
                return Ok(self.stopped());
            }
        }
        self.finish(observer)
    }

    /// The summary as it stands, with the run's wall time.
    fn stopped(mut self) -> RunSummary {
        self.summary.seconds = self.started.elapsed().as_secs_f64();
        self.summary
    }

    /// Averages of the logging window into the metrics (the lead's), then a new window.
    fn log(&mut self, step: usize, lr: f64, observer: &mut dyn Observer) -> Result<()> {
        let Role::Lead(metrics) = &mut self.role else {
            return Ok(());
        };
        let window = &self.window;
        let loss = if window.steps > 0 {
            window.loss / window.steps as f64
        } else {
            f64::NAN
        };
        let tokens_per_sec = window.tokens as f64 / window.seconds.max(1e-9);
        let last_grad_norm = window.last_grad_norm.unwrap_or(f64::NAN);
        metrics.log(
            step,
            &[
                ("train/loss", loss),
                ("train/lr", lr),
                ("train/grad_norm", last_grad_norm),
                ("train/tokens_per_sec", tokens_per_sec),
            ],
        )?;
        observer.on_event(&Event::Logged {
            step,
            loss,
            lr,
            grad_norm: last_grad_norm,
            tokens_per_sec,
        });
        self.window = LogWindow {
            last_grad_norm: window.last_grad_norm,
            ..LogWindow::default()
        };
        Ok(())
    }

    /// The validation loss at `step` on the lead (`None` on a follower, or without validation
    /// rows); `log`: into the metrics and to the observer.
    fn evaluate(
        &mut self,
        step: usize,
        log: bool,
        observer: &mut dyn Observer,
    ) -> Result<Option<EvalResult>> {
        let Role::Lead(metrics) = &mut self.role else {
            return Ok(None);
        };
        let eval = &self.config.eval;
        let result = evaluate(
            &self.learner.model.valid(),
            &self.feed.data.val,
            eval.micro_batch_size
                .unwrap_or(self.config.train.micro_batch_size),
            eval.max_batches,
            self.feed.data.pad_id,
            step,
            &self.learner.device,
        )?;
        if let (Some(r), true) = (&result, log) {
            metrics.log(step, &[("eval/loss", r.loss), ("eval/ppl", r.ppl)])?;
            observer.on_event(&Event::Evaluated(r));
        }
        Ok(result)
    }

    /// Answers `eval.prompts` with and without the adapter into `<run>/samples.jsonl`.
    fn write_samples(&mut self) -> Result<()> {
        let config = self.config;
        if config.eval.prompts.is_empty() {
            return Ok(());
        }
        let setup = SampleSetup {
            tokenizer: &self.tokenizer,
            template: self.feed.data.template.as_ref(),
            template_vars: &config.tokenize.template_vars,
            max_new_tokens: config.eval.max_new_tokens,
            temperature: config.eval.temperature,
            seed: config.train.seed,
        };
        let tuned = self.learner.model.valid();
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
            self.summary.samples.push(sample);
        }
        let path = self.run_dir.join(SAMPLES_FILE);
        std::fs::write(&path, lines).map_err(|e| TrainError::io(&path, e))
    }
}
