//! # hone-train
//!
//! The LoRA training loop of hone, generic over any burn autodiff backend:
//!
//! * [`config`]: the run config (TOML with `[model]`, `[data]`, `[tokenize]`, `[lora]`,
//!   `[train]`, `[distributed]`, `[eval]`, `[output]`), `--set` overrides, validation naming file and key;
//! * [`data`]: curation + tokenization of the run's data and the seeded visiting order;
//! * [`step`]: forward/backward per micro-batch, gradient accumulation normalised by the
//!   step's target tokens, clipping and the update of a [`Learner`] (model + optimizer),
//!   through a [`StepEngine`]: [`SingleDevice`] or [`DataParallel`];
//! * [`optim`]: AdamW exactly as `torch.optim.AdamW`, `clip_grad_norm_`;
//! * [`parallel`]: data-parallel steps over several devices (`train.devices`) and nodes
//!   (`[distributed]`), gradients all-reduced with burn's collective engine;
//! * [`schedule`]: constant / linear / cosine learning rates with warmup (transformers);
//! * [`checkpoint`]: atomic `step-N/` checkpoints (PEFT adapter, optimizer moments, state);
//! * [`eval`]: validation loss and perplexity, sample generations;
//! * [`metrics`]: `metrics.jsonl` and TensorBoard events;
//! * [`lock`]: the run directory's lock (`flock` on `<run>/.lock`, holding the pid);
//! * [`memory`]: the run's estimated memory, checked against the available memory;
//! * [`dry_run`]: a run's steps, tokens and estimated memory (and, measured, its time per
//!   step) without the run (`hone train --dry-run`);
//! * [`trainer`]: the [`Trainer`] of one run: `prepare` (run directory, lock, resume), `step`,
//!   `after_step` (log, evaluate, checkpoint), `finish` (adapter, samples);
//! * [`run`]: the whole run ([`train`]), its options, checks and summary, reporting progress
//!   to an [`Observer`].

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dry_run;
pub mod error;
pub mod eval;
pub mod gates;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod run;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use config::RunConfig;
pub use dry_run::{dry_run, DryRun, DryRunReport};
pub use error::{Result, TrainError};
pub use eval::{EvalResult, Sample};
pub use optim::{AdamW, AdamWConfig};
pub use parallel::{DataParallel, MultiNode, ParallelConfig};
pub use run::{
    train, train_on, Control, Event, Observer, RunOptions, RunSummary, Silent, StopToken,
};
pub use schedule::{Schedule, ScheduleKind};
pub use step::{Learner, MicroBatch, SingleDevice, StepEngine, StepOutcome};
pub use trainer::{Feed, Role, StepDone, Trainer};
