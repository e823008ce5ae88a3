//! `hone train --config FILE [--set KEY=VALUE ...] [--resume | --overwrite]`.
//!
//! `train` loads and validates the run config, runs [`hone_train::train`] and shows progress:
//! a progress bar (step, loss, tokens/s, ETA) on stderr when it is a terminal, plain lines
//! every `train.log_every` steps otherwise. At the end it prints the validation loss before and after
//! training and the sample generations with and without the adapter, and writes
//! `<run>/summary.json` ([`run_summary`](crate::cmd::run_summary)), also when the run failed,
//! and the adapter's model card `<run>/adapter/README.md` when it completed;
//! `--json` prints that object as the last line of stdout and everything else on stderr.
//!
//! `train --dry-run[=plan|measure]` runs [`hone_train::dry_run`] instead: the config, model
//! metadata, tokenizer and data are checked and the run's steps, tokens and estimated memory
//! printed (`measure`: and its time per step, from a few timed steps), with the same exit codes
//! as a run; nothing is written ([`DryRunSummary`]).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hone_train::{Control, Event, Observer, RunConfig, RunOptions, RunSummary, TrainError};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::args::{DryRunMode, LogFormat, TrainArgs};
use crate::cmd::peak_rss_mb;
use crate::cmd::run_summary::{DryRunSummary, Record, Status, Summary};

/// Steps `--dry-run=measure` times after its warm-up step.
const MEASURED_STEPS: usize = 3;

/// Where human-readable output goes: stdout, or stderr when stdout is kept for `--json`;
/// with `--log-format json`, one JSON object per event on stderr instead.
#[derive(Debug, Clone, Copy)]
struct Out {
    stderr: bool,
    json_events: bool,
}

/// Writes one event as a JSON object line on stderr: `{"ts": UNIX_SECONDS, "event": NAME, ...}`
/// (non-finite numbers are null).
fn json_event(name: &str, fields: serde_json::Value) {
    let mut object = serde_json::Map::new();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    object.insert("ts".into(), json!(ts));
    object.insert("event".into(), json!(name));
    if let serde_json::Value::Object(fields) = fields {
        object.extend(fields);
    }
    eprintln!("{}", serde_json::Value::Object(object));
}

/// The JSON event of a trainer event.
fn event_json(event: &Event<'_>) -> (&'static str, serde_json::Value) {
    match event {
        Event::Locked { run_dir } => ("locked", json!({ "run_dir": run_dir })),
        Event::Started {
            run_dir,
            total_steps,
            start_step,
            resumed_from,
            train_rows,
            val_rows,
            trainable_params,
            memory,
        } => (
            "started",
            json!({
                "run_dir": run_dir,
                "total_steps": total_steps,
                "start_step": start_step,
                "resumed_from": resumed_from,
                "train_rows": train_rows,
                "val_rows": val_rows,
                "trainable_params": trainable_params,
                "estimated_memory_bytes": memory.total(),
                "available_memory_bytes": memory.available,
            }),
        ),
        Event::Step {
            step,
            total_steps,
            outcome,
            tokens_per_sec,
            tokens_seen,
        } => (
            "step",
            json!({
                "step": step,
                "total_steps": total_steps,
                "loss": outcome.loss,
                "grad_norm": outcome.grad_norm,
                "lr": outcome.lr,
                "applied": outcome.applied,
                "tokens": outcome.tokens,
                "tokens_per_sec": tokens_per_sec,
                "tokens_seen": tokens_seen,
            }),
        ),
        Event::Logged {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_sec,
        } => (
            "logged",
            json!({
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_sec": tokens_per_sec,
            }),
        ),
        Event::Evaluated(r) => (
            "eval",
            json!({ "step": r.step, "loss": r.loss, "ppl": r.ppl, "targets": r.targets }),
        ),
        Event::Checkpoint { step, dir } => ("checkpoint", json!({ "step": step, "dir": dir })),
        Event::Finished { step, adapter_dir } => (
            "finished",
            json!({ "step": step, "adapter_dir": adapter_dir }),
        ),
    }
}

impl Out {
    fn line(self, text: &str) {
        if self.stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// Shows a run's progress and records what the summary needs.
struct Progress {
    bar: Option<ProgressBar>,
    out: Out,
    started: Instant,
    first_step: usize,
    total_steps: usize,
    record: Record,
}

impl Progress {
    fn new(interactive: bool, out: Out) -> Self {
        Self {
            bar: interactive.then(|| ProgressBar::new(0)),
            out,
            started: Instant::now(),
            first_step: 0,
            total_steps: 0,
            record: Record::default(),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => self.out.line(&text),
        }
    }

    fn eta(&self, step: usize) -> Duration {
        let done = step.saturating_sub(self.first_step).max(1) as f64;
        let left = self.total_steps.saturating_sub(step) as f64;
        Duration::from_secs_f64(self.started.elapsed().as_secs_f64() / done * left)
    }
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Observer for Progress {
    fn on_event(&mut self, event: &Event<'_>) -> Control {
        self.record.observe(event);
        if self.out.json_events {
            let (name, fields) = event_json(event);
            json_event(name, fields);
            return Control::Continue;
        }
        match event {
            Event::Started {
                run_dir,
                total_steps,
                start_step,
                resumed_from,
                train_rows,
                val_rows,
                trainable_params,
                memory,
            } => {
                self.first_step = *start_step;
                self.total_steps = *total_steps;
                self.started = Instant::now();
                if let Some(dir) = resumed_from {
                    self.line(format!(
                        "resuming from {} (step {start_step})",
                        dir.display()
                    ));
                }
                self.line(format!(
                    "training {} ({total_steps} steps, {train_rows} training rows, {val_rows} validation rows, {trainable_params} trainable parameters)",
                    run_dir.display()
                ));
                let mb = |bytes: u64| bytes.div_ceil(1 << 20);
                self.line(format!(
                    "memory: estimated {} MB (weights {} MB + activations {} MB){}",
                    mb(memory.total()),
                    mb(memory.weights),
                    mb(memory.activations),
                    match memory.available {
                        Some(a) => format!(", {} MB available", a >> 20),
                        None => String::new(),
                    }
                ));
                if let Some(bar) = &self.bar {
                    bar.set_length(*total_steps as u64);
                    bar.set_position(*start_step as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                        )
                        .expect("a valid template"),
                    );
                    bar.reset_eta();
                }
            }
            Event::Step {
                step,
                outcome,
                tokens_per_sec,
                ..
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(*step as u64);
                    bar.set_message(format!(
                        "loss {:.4} | {tokens_per_sec:.0} tokens/s",
                        outcome.loss
                    ));
                }
                if !outcome.applied {
                    self.line(format!(
                        "step {step}: non-finite loss ({}) or gradient norm ({}): update skipped",
                        outcome.loss, outcome.grad_norm
                    ));
                }
            }
            Event::Logged {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_sec,
            } if self.bar.is_none() => {
                self.line(format!(
                    "step {step}/{} loss {loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {tokens_per_sec:.0} tokens/s eta {}",
                    self.total_steps,
                    duration(self.eta(*step))
                ));
            }
            Event::Evaluated(r) => self.line(format!(
                "step {}: eval loss {:.4} ppl {:.3}",
                r.step, r.loss, r.ppl
            )),
            Event::Checkpoint { dir, .. } if self.bar.is_none() => {
                self.line(format!("saved {}", dir.display()))
            }
            Event::Finished { adapter_dir, .. } => {
                if let Some(bar) = &self.bar {
                    bar.finish_and_clear();
                }
                self.line(format!("saved adapter {}", adapter_dir.display()));
            }
            _ => {}
        }
        Control::Continue
    }
}

fn print_summary(summary: &RunSummary, out: Out) {
    out.line(&format!(
        "run        {} ({} steps, {:.1} s{})",
        summary.run_dir.display(),
        summary.step,
        summary.seconds,
        if summary.bad_steps_total > 0 {
            format!(", {} skipped non-finite steps", summary.bad_steps_total)
        } else {
            String::new()
        }
    ));
    out.line(&match (&summary.first_eval, &summary.last_eval) {
        (Some(a), Some(b)) => format!(
            "val loss   {:.4} (ppl {:.2}) before training -> {:.4} (ppl {:.2}) after",
            a.loss, a.ppl, b.loss, b.ppl
        ),
        (None, Some(b)) => format!("val loss   {:.4} (ppl {:.2}) after training", b.loss, b.ppl),
        _ => "val loss   (no validation rows)".to_string(),
    });
    if let Some(dir) = &summary.adapter_dir {
        out.line(&format!("adapter    {}", dir.display()));
    }
    if let Some(mb) = peak_rss_mb() {
        out.line(&format!(
            "peak mem   {mb:.0} MB resident (host; the whole process)"
        ));
    }
    for sample in &summary.samples {
        out.line(&format!("\nprompt: {}", sample.prompt));
        out.line(&format!("--- base model ---\n{}", sample.base.trim_end()));
        out.line(&format!(
            "--- with adapter ---\n{}",
            sample.adapter.trim_end()
        ));
    }
}

/// `hone train-orchestrator`: the orchestrator of multi-node training (on `--port`), until
/// killed.
pub fn orchestrator(args: crate::args::TrainOrchestratorArgs) -> Result<()> {
    eprintln!(
        "multi-node orchestrator on port {} (every interface): distributed.orchestrator = \"tcp://THIS_HOST:{}\"",
        args.port, args.port
    );
    hone_train::parallel::run_orchestrator(args.port)
        .with_context(|| format!("orchestrator on port {}", args.port))
}

pub fn run(args: TrainArgs, log_format: LogFormat) -> Result<()> {
    let started = Instant::now();
    let config = RunConfig::load(&args.config, &args.set).map_err(crate::UsageError::new)?;
    let mut gate_texts = config.gates.fail_if.clone();
    gate_texts.extend(args.fail_if.iter().cloned());
    let gates = hone_train::gates::parse_all(&gate_texts).map_err(|(i, message)| {
        let at = i.checked_sub(config.gates.fail_if.len());
        crate::UsageError(match at {
            Some(_) => format!("--fail-if: {message}").into(),
            None => format!("{}: gates.fail_if[{i}]: {message}", args.config.display()).into(),
        })
    })?;
    let out = Out {
        stderr: args.json,
        json_events: log_format == LogFormat::Json,
    };
    let options = RunOptions {
        resume: args.resume,
        overwrite: args.overwrite,
        // A plan has no step boundary to stop at: a signal ends it as it ends any process.
        stop: match args.dry_run {
            Some(DryRunMode::Plan) => hone_train::StopToken::default(),
            _ => crate::signals::stop_on_signals(),
        },
    };
    if let Some(mode) = args.dry_run {
        return dry_run(&config, &options, mode, args.json, out, started)
            .with_context(|| format!("dry run of {}", args.config.display()));
    }
    // The bar draws on stderr: without a terminal there (CI logs, `2> file`), plain lines.
    let mut progress = Progress::new(std::io::stderr().is_terminal() && !out.json_events, out);
    let result = hone_train::train(&config, options, &mut progress)
        .with_context(|| format!("training with {}", args.config.display()));
    if let (Ok(summary), false) = (&result, out.json_events) {
        print_summary(summary, out);
    }
    // The summary, once the run had its directory (an error before that touched nothing).
    let Some(run_dir) = progress.record.run_dir.clone() else {
        return result.map(|_| ());
    };
    let (status, error, code) = match &result {
        Ok(_) => (Status::Completed, None, 0),
        Err(e) => {
            let interrupted = e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(TrainError::Interrupted { .. })));
            let status = if interrupted {
                Status::Interrupted
            } else {
                Status::Failed
            };
            (status, Some(crate::error_chain(e)), crate::exit_code(e))
        }
    };
    let mut summary = Summary::new(
        &config,
        &progress.record,
        &run_dir,
        status,
        error,
        code,
        started,
    );
    let mut result = result.map(|_| ());
    if result.is_ok() && !gates.is_empty() {
        let metrics = summary.gate_metrics();
        summary.gates = hone_train::gates::check(&gates, &metrics);
        let failed: Vec<String> = summary
            .gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| match g.value {
                Some(v) => format!("{} (final value {v})", g.gate),
                None => format!(
                    "{} (this run did not measure it; it has: {})",
                    g.gate,
                    metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
            .collect();
        if !failed.is_empty() {
            let err = anyhow::Error::new(TrainError::GateFailed { failed });
            summary.status = Status::GateFailed;
            summary.error = Some(crate::error_chain(&err));
            summary.exit_code = crate::exit_code(&err);
            result = Err(err);
        }
    }
    let written = summary
        .write()
        .and_then(|path| summary.write_model_card(&config).map(|_| path));
    if out.json_events {
        json_event(
            "summary",
            serde_json::to_value(&summary).expect("a summary serialises"),
        );
    }
    if args.json {
        println!("{}", summary.to_json());
    }
    match (result, written) {
        (Err(e), Err(write)) => {
            eprintln!("warning: {}", crate::error_chain(&write));
            Err(e)
        }
        (Err(e), Ok(_)) => Err(e),
        (Ok(_), written) => written.map(|_| ()),
    }
}

/// `hone train --dry-run`: the plan (and measurement) of the run, printed; nothing written.
fn dry_run(
    config: &RunConfig,
    options: &RunOptions,
    mode: DryRunMode,
    json: bool,
    out: Out,
    started: Instant,
) -> Result<()> {
    let (name, library_mode) = match mode {
        DryRunMode::Plan => ("plan", hone_train::DryRun::Plan),
        DryRunMode::Measure => (
            "measure",
            hone_train::DryRun::Measure {
                timed_steps: MEASURED_STEPS,
            },
        ),
    };
    let report = hone_train::dry_run(config, options, library_mode)?;
    let summary = DryRunSummary::new(config, &report, name, started);
    if out.json_events {
        json_event(
            "dry_run",
            serde_json::to_value(&summary).expect("a dry-run summary serialises"),
        );
    } else {
        for line in summary.lines() {
            out.line(&line);
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("a dry-run summary serialises")
        );
    }
    Ok(())
}
