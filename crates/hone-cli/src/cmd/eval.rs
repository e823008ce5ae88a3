//! `hone eval`: a base model and any number of adapters on perplexity, multiple-choice and
//! generation tasks, side by side, through [`hone_eval::evaluate`]. Settings come from the
//! `[eval]` section of `--config` and/or flags (flags win; `--task` replaces the config's
//! tasks). Writes `eval.json` and `eval.md` (and, with `--run`, loss and learning-rate plots)
//! into `--out`, prints the results table, and shows progress as a bar on a terminal or as
//! plain lines otherwise.
//!
//! Each batch's per-record results are appended to `records.jsonl` in `--out` as they are
//! computed; `--resume` continues an interrupted evaluation from it (SIGINT/SIGTERM stop at
//! the next batch and exit 130/143). `--baseline OLD/eval.json` adds a comparison to the
//! report, and `--max-drop [TASK/]METRIC=DROP` gates on it: exit code 3 when a metric got
//! worse by more than allowed plus noise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use hone_eval::{
    compare, evaluate_with, plot_run, write_report, EvalConfig, EvalError, EvalOptions, EvalPlan,
    EvalReport, GateSettings, Progress, RecordLog, TaskConfig, TaskKind, DEFAULT_NOISE,
};
use hone_model::{run_on, BackendTask};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{EvalArgs, EvalCommand};

/// Output directory when neither `--out` nor the config names one.
const DEFAULT_OUT: &str = "runs/eval";

/// `--task` text -> a task config.
fn parse_task(text: &str) -> Result<TaskConfig> {
    let Some((head, file)) = text.split_once('=') else {
        return Ok(TaskConfig::named(text.trim()));
    };
    let path = PathBuf::from(file.trim());
    let kind = match head.trim() {
        "ppl" | "perplexity" => Some(TaskKind::Perplexity),
        "mc" | "multiple_choice" => Some(TaskKind::MultipleChoice),
        "gen" | "generation" => Some(TaskKind::Generation),
        _ => None,
    };
    Ok(match kind {
        Some(kind) => {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .with_context(|| format!("--task {text}: no file name after `=`"))?;
            TaskConfig {
                kind: Some(kind),
                path: Some(path),
                ..TaskConfig::named(name)
            }
        }
        None => TaskConfig {
            path: Some(path),
            ..TaskConfig::named(head.trim())
        },
    })
}

/// Config file + flags -> the validated plan.
fn build_plan(args: &EvalArgs) -> Result<EvalPlan> {
    let mut config = match &args.config {
        Some(path) => EvalConfig::from_toml_file(path).map_err(crate::UsageError::new)?,
        None => EvalConfig::default(),
    };
    if let Some(model) = &args.model {
        config.model = model.clone();
    }
    config.adapters.extend(args.adapters.iter().cloned());
    if !args.tasks.is_empty() {
        config.tasks = args
            .tasks
            .iter()
            .map(|t| parse_task(t))
            .collect::<Result<_>>()?;
    }
    if args.limit.is_some() {
        config.limit = args.limit;
    }
    if let Some(n) = args.batch_size {
        config.batch_size = n;
    }
    if let Some(d) = args.device {
        config.device = d;
    }
    if let Some(d) = args.dtype {
        config.dtype = d;
    }
    config.chat |= args.chat;
    config.all_tokens |= args.all_tokens;
    if let Some(t) = &args.template {
        config.template = t.clone();
    }
    if let Some(n) = args.max_seq_len {
        config.max_seq_len = n;
    }
    if args.out.is_some() {
        config.out = args.out.clone();
    }
    if args.run.is_some() {
        config.run = args.run.clone();
    }
    for task in &mut config.tasks {
        let kind = task.kind_hint();
        let prompted = matches!(kind, Some(TaskKind::MultipleChoice | TaskKind::Generation));
        if prompted && args.prompt.is_some() {
            task.prompt = args.prompt.clone();
        }
        if kind == Some(TaskKind::MultipleChoice) && args.choice_format.is_some() {
            task.choice_format = args.choice_format.clone();
        }
        if kind == Some(TaskKind::Generation) {
            if args.fewshot.is_some() {
                task.fewshot = args.fewshot;
            }
            if args.fewshot_file.is_some() {
                task.fewshot_path = args.fewshot_file.clone();
            }
            if args.max_tokens.is_some() {
                task.max_new_tokens = args.max_tokens;
            }
            if !args.stop.is_empty() {
                task.stop = Some(args.stop.clone());
            }
        }
    }
    if config.model.as_os_str().is_empty() && config.models.is_empty() {
        return Err(crate::UsageError(
            "give --model DIR (or `model` or `models` in the [eval] section of --config)".into(),
        )
        .into());
    }
    Ok(config.resolve()?)
}

/// Progress on stderr: a bar on a terminal, a line per 10% otherwise.
struct Display {
    bar: Option<ProgressBar>,
    stage: usize,
    last_tenth: usize,
}

impl Display {
    fn new(interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template"),
            );
            bar
        });
        Self {
            bar,
            stage: 0,
            last_tenth: 0,
        }
    }

    fn update(&mut self, p: &Progress<'_>) {
        let message = format!("[{}/{}] {} · {}", p.stage, p.stages, p.column, p.task);
        let new_stage = p.stage != self.stage;
        self.stage = p.stage;
        match &self.bar {
            Some(bar) => {
                if new_stage {
                    bar.set_length(p.total as u64);
                    bar.set_message(message);
                    bar.reset();
                }
                bar.set_position(p.done as u64);
            }
            None => {
                let tenth = (p.done * 10).checked_div(p.total).unwrap_or(10);
                if new_stage {
                    self.last_tenth = 0;
                    eprintln!("{message}: 0/{}", p.total);
                } else if tenth > self.last_tenth {
                    self.last_tenth = tenth;
                    eprintln!("{message}: {}/{}", p.done, p.total);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

struct EvalTask<'a> {
    plan: &'a EvalPlan,
    display: &'a mut Display,
    log: &'a mut RecordLog,
    stop: &'a (dyn Fn(usize) -> bool + Sync),
}

impl BackendTask for EvalTask<'_> {
    type Output = hone_eval::Result<EvalReport>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Self::Output {
        let display = self.display;
        let options = EvalOptions {
            log: Some(self.log),
            stop: Some(self.stop),
        };
        evaluate_with::<B>(self.plan, &device, options, &mut |p| display.update(p))
    }
}

/// The gate settings of the flags, checked against the baseline before anything runs.
fn gate_settings(args: &EvalArgs, plan: &EvalPlan) -> Result<Option<GateSettings>> {
    let Some(baseline) = &args.baseline else {
        return Ok(None);
    };
    if !baseline.is_file() {
        return Err(EvalError::MissingPath {
            path: baseline.clone(),
            what: "the --baseline report",
        }
        .into());
    }
    let noise = args.noise.unwrap_or(DEFAULT_NOISE);
    if !noise.is_finite() || noise < 0.0 {
        return Err(crate::UsageError(
            format!("--noise must be a finite number >= 0, found {noise}").into(),
        )
        .into());
    }
    let settings = GateSettings {
        baseline: baseline.clone(),
        baseline_column: args.baseline_column.clone(),
        column: args.column.clone(),
        max_drops: args.max_drops.clone(),
        noise,
    };
    hone_eval::compare::precheck(&settings, plan)?;
    Ok(Some(settings))
}

pub fn run(mut args: EvalArgs) -> Result<()> {
    if let Some(EvalCommand::Compare(compare)) = args.command.take() {
        return super::eval_compare::run(compare);
    }
    let started = Instant::now();
    let plan = build_plan(&args)?;
    let gates = gate_settings(&args, &plan)?;
    let out = plan
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut log = if args.resume {
        let (log, resumed) = RecordLog::resume(&out, &plan)?;
        if resumed.started_fresh {
            eprintln!("no records to resume in {}: starting afresh", out.display());
        } else {
            eprintln!(
                "resuming: {} record(s) already in {}{}",
                resumed.records,
                log.path().display(),
                if resumed.dropped_partial_line {
                    " (a partial last line was dropped)"
                } else {
                    ""
                }
            );
        }
        log
    } else {
        RecordLog::create(&out, &plan)?
    };
    let token = crate::signals::stop_on_signals();
    let stop_after = args.stop_after;
    let stop = move |logged: usize| token.is_stopped() || stop_after.is_some_and(|n| logged >= n);
    let mut display = Display::new(std::io::stderr().is_terminal());
    let task = EvalTask {
        plan: &plan,
        display: &mut display,
        log: &mut log,
        stop: &stop,
    };
    let result = run_on(plan.device, task);
    display.finish();
    let mut report = result??;
    if let Some(run_dir) = &plan.run {
        let files =
            plot_run(run_dir, &out).with_context(|| format!("plotting {}", run_dir.display()))?;
        report.plots = files
            .iter()
            .map(|f| {
                f.file_name()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| f.clone())
            })
            .collect();
    }
    if let Some(gates) = &gates {
        report.comparison = Some(compare(&report, gates)?);
    }
    let (json, md) = write_report(&report, &out)?;
    let markdown = report.to_markdown();
    let summary = markdown.split("\n## Tasks").next().unwrap_or(&markdown);
    println!("{}", summary.trim_end());
    eprintln!(
        "wrote {} and {} in {:.1} s",
        json.display(),
        md.display(),
        started.elapsed().as_secs_f64()
    );
    for plot in &report.plots {
        eprintln!("wrote {}", out.join(plot).display());
    }
    if let Some(comparison) = &report.comparison {
        comparison.check()?;
    }
    Ok(())
}
