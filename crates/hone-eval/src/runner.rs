//! [`evaluate`]: the whole evaluation of a plan on one device. Data files are read and checked
//! first; then each base model in turn is loaded, every task is tokenized for it, and each of
//! its columns (the model alone, then each of its adapters loaded in its place) runs every
//! task; the report collects the numbers, settings and timings. Progress is reported through a
//! callback after each batch.
//!
//! A task runs in batches of whole records, planned from the task alone (longest records first,
//! at most `batch_size` rows a batch unless one record has more), so that a resumed evaluation
//! ([`evaluate_with`] with a [`RecordLog`]) computes the batches it has not logged exactly as an
//! uninterrupted one would, and skips those it has. Metrics are aggregated from the per-record
//! outcomes ([`crate::aggregate`]).

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use hone_model::adapter::ADAPTER_CONFIG;
use hone_model::{load_model_dir, CausalLm, LoadOptions, Tokenizer};
use hone_tokenize::ChatTemplate;

use crate::aggregate::task_metrics;
use crate::config::{AdapterSpec, EvalPlan, ModelSpec};
use crate::data::display_path;
use crate::error::{EvalError, Result};
use crate::generate::{generate_greedy, GreedySettings};
use crate::metrics::{
    answer_number, choose, choose_normalized, contains_answer, exact_match, numeric_match, rouge_l,
};
use crate::prepare::{load_task_data, prepare_task, Context, PreparedTask, TaskData, Work};
use crate::records::{Record, RecordLog};
use crate::report::{
    ChoiceSample, ColumnSummary, EvalReport, GeneratedSample, ModelSummary, PerplexitySample,
    Sample, TaskReport, TaskResult, Timings,
};
use crate::score::score_rows;

/// Where an evaluation is: `done` of `total` units (rows or prompts) of `task` on `column`.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub column: &'a str,
    pub task: &'a str,
    /// Position of this (column, task) pair among all of them, from 1.
    pub stage: usize,
    pub stages: usize,
    pub done: usize,
    pub total: usize,
}

/// How an evaluation keeps its records and when it stops early.
#[derive(Default)]
pub struct EvalOptions<'a> {
    /// Where each batch's records are appended (and those already there are taken instead of
    /// being computed again).
    pub log: Option<&'a mut RecordLog>,
    /// Asked after each computed batch with the number of records this process has logged so
    /// far; `true` stops the evaluation with [`EvalError::Interrupted`].
    pub stop: Option<&'a (dyn Fn(usize) -> bool + Sync)>,
}

/// Runs `plan` on `device`, calling `progress` after every batch; keeps no record log.
pub fn evaluate<B: hone_model::KernelBackend>(
    plan: &EvalPlan,
    device: &B::Device,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<EvalReport> {
    evaluate_with::<B>(plan, device, EvalOptions::default(), progress)
}

/// The report's per-task fields that come from preparation (the first model's).
struct TaskInfo {
    available: usize,
    evaluated: usize,
    rows: usize,
    prompt: crate::report::PromptReport,
    generation: Option<crate::report::GenerationReport>,
    truncated: usize,
    skipped: usize,
}

/// Runs `plan` on `device` with `options`, calling `progress` after every batch.
pub fn evaluate_with<B: hone_model::KernelBackend>(
    plan: &EvalPlan,
    device: &B::Device,
    mut options: EvalOptions<'_>,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<EvalReport> {
    let started = Instant::now();
    let mut timings = Timings::default();
    // Cheap checks first: every adapter's configuration, before data and models are loaded.
    for adapter in plan.models.iter().flat_map(|m| &m.adapters) {
        hone_model::adapter::read_adapter_config(&adapter.path)
            .map_err(|cause| adapter_error(adapter, cause))?;
    }

    let t = Instant::now();
    let data = plan
        .tasks
        .iter()
        .map(load_task_data)
        .collect::<Result<Vec<_>>>()?;
    timings.load_data_seconds = t.elapsed().as_secs_f64();

    let columns = plan.columns();
    let stages = columns.len() * plan.tasks.len();
    let mut stage = 0;
    let mut logged = 0;
    let mut models = Vec::with_capacity(plan.models.len());
    let mut summaries = Vec::with_capacity(columns.len());
    let mut infos: Vec<TaskInfo> = Vec::new();
    let mut results: Vec<Vec<TaskResult>> = plan.tasks.iter().map(|_| Vec::new()).collect();
    for spec in &plan.models {
        let t = Instant::now();
        let loaded = load_model_dir::<B>(
            &spec.path,
            device,
            LoadOptions {
                dtype: plan.dtype.burn(),
                ..LoadOptions::default()
            },
        )?;
        let mut model = loaded.model;
        let tokenizer = loaded.tokenizer;
        // Every adapter must load onto this base (shapes, target modules, finite values)
        // before any of its columns is evaluated: a bad one found later wastes the work.
        for adapter in &spec.adapters {
            model
                .load_adapter(&adapter.path)
                .map_err(|cause| adapter_error(adapter, cause))?;
        }
        model.detach_lora();
        timings.load_model_seconds += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (prepared, max_len) = prepare_for(plan, spec, &model, &tokenizer, &data)?;
        timings.prepare_seconds += t.elapsed().as_secs_f64();
        if infos.is_empty() {
            infos = prepared.iter().map(task_info).collect();
        }
        let c = model.config();
        models.push(ModelSummary {
            name: spec.name.clone(),
            path: display_path(&spec.path),
            architecture: format!("{:?}", c.architecture).to_lowercase(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            max_seq_len: max_len,
            device: plan.device.to_string(),
            dtype: plan.dtype,
        });

        let t = Instant::now();
        for adapter in std::iter::once(None).chain(spec.adapters.iter().map(Some)) {
            let load = Instant::now();
            let column = adapter.map_or(&spec.name, |a| &a.name);
            let mut summary = ColumnSummary {
                name: column.clone(),
                model: spec.name.clone(),
                adapter: None,
                lora_r: None,
                lora_alpha: None,
                lora_modules: 0,
                load_seconds: 0.0,
            };
            match adapter {
                None => model.detach_lora(),
                Some(adapter) => {
                    let info = model
                        .load_adapter(&adapter.path)
                        .map_err(|cause| adapter_error(adapter, cause))?;
                    summary.adapter = Some(display_path(&adapter.path));
                    summary.lora_r = Some(info.settings.r);
                    summary.lora_alpha = Some(info.settings.alpha);
                    summary.lora_modules = info.modules.len();
                }
            }
            summary.load_seconds = load.elapsed().as_secs_f64();
            summaries.push(summary);
            for (i, task) in prepared.iter().enumerate() {
                stage += 1;
                let total = task.total();
                let mut done = 0;
                let mut report = |n: usize| {
                    done += n;
                    progress(&Progress {
                        column,
                        task: &task.spec.name,
                        stage,
                        stages,
                        done,
                        total,
                    });
                };
                report(0);
                let mut run = TaskRun {
                    model: &model,
                    tokenizer: &tokenizer,
                    task,
                    column,
                    model_path: &spec.path,
                    adapter: adapter.map(|a| a.path.as_path()),
                    batch_size: plan.batch_size,
                    log: options.log.as_deref_mut(),
                    stop: options.stop,
                    logged: &mut logged,
                };
                let result = run.run(&mut report)?;
                tracing::info!(
                    "{column} / {}: {:?} in {:.2} s",
                    task.spec.name,
                    result.metrics,
                    result.seconds
                );
                results[i].push(result);
            }
        }
        timings.evaluate_seconds += t.elapsed().as_secs_f64();
    }
    timings.total_seconds = started.elapsed().as_secs_f64();

    let tasks = plan
        .tasks
        .iter()
        .zip(infos)
        .zip(results)
        .map(|((spec, info), results)| TaskReport {
            name: spec.name.clone(),
            kind: spec.kind,
            path: display_path(&spec.path),
            available: info.available,
            evaluated: info.evaluated,
            limit: spec.limit,
            rows: info.rows,
            prompt: info.prompt,
            generation: info.generation,
            truncated: info.truncated,
            skipped: info.skipped,
            results,
        })
        .collect();
    Ok(EvalReport {
        hone_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: hone_io::unix_now(),
        plan: plan.clone(),
        models,
        columns: summaries,
        tasks,
        timings,
        plots: Vec::new(),
        comparison: None,
    })
}

/// Tokenizes every task for one model; returns them and the longest row used.
fn prepare_for<B: hone_model::KernelBackend>(
    plan: &EvalPlan,
    spec: &ModelSpec,
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    data: &[TaskData],
) -> Result<(Vec<PreparedTask>, usize)> {
    let needs_template =
        plan.tasks.iter().any(|t| t.chat) || data.iter().any(|d| d.has_conversations());
    let template = match ChatTemplate::load(&plan.template, &spec.path) {
        Ok(t) => Some(t),
        Err(e) if needs_template => return Err(e.into()),
        Err(_) => None,
    };
    let max_len = plan
        .max_seq_len
        .min(model.config().max_position_embeddings.max(2));
    let ctx = Context {
        tokenizer,
        template: template.as_ref(),
        max_len,
        batch_size: plan.batch_size,
    };
    let prepared = plan
        .tasks
        .iter()
        .zip(data)
        .map(|(task, data)| prepare_task(task, data.clone(), &ctx))
        .collect::<Result<Vec<_>>>()?;
    Ok((prepared, max_len))
}

fn task_info(task: &PreparedTask) -> TaskInfo {
    TaskInfo {
        available: task.available,
        evaluated: task.evaluated,
        rows: task.total(),
        prompt: task.prompt.clone(),
        generation: task.generation.clone(),
        truncated: task.truncated,
        skipped: task.skipped,
    }
}

/// An adapter that cannot be used, with a hint when `path` is a training run directory
/// rather than the adapter directory inside it.
pub(crate) fn adapter_error(adapter: &AdapterSpec, cause: hone_model::ModelError) -> EvalError {
    let nested = adapter.path.join("adapter");
    let hint =
        if !adapter.path.join(ADAPTER_CONFIG).is_file() && nested.join(ADAPTER_CONFIG).is_file() {
            format!(
                " (this looks like a training run directory: its adapter is {})",
                nested.display()
            )
        } else {
            String::new()
        };
    EvalError::Adapter {
        name: adapter.name.clone(),
        path: adapter.path.clone(),
        cause: Box::new(cause),
        hint,
    }
}

/// Rows each record of `work` takes.
fn record_rows(work: &Work) -> Vec<usize> {
    match work {
        Work::Perplexity { rows, .. } => vec![1; rows.len()],
        Work::MultipleChoice { items, .. } => items.iter().map(|i| i.choices.len()).collect(),
        Work::Generation { prompts, .. } => vec![1; prompts.len()],
    }
}

/// The batches of a task, as lists of record indices: records sorted by their longest row
/// (longest first, ties in record order) and grouped while they fit `batch_size` rows.
fn plan_batches(work: &Work, batch_size: usize) -> Vec<Vec<usize>> {
    let counts = record_rows(work);
    let lengths: Vec<usize> = match work {
        Work::Perplexity { rows, .. } => rows.iter().map(|r| r.ids.len()).collect(),
        Work::MultipleChoice { rows, .. } => {
            let mut start = 0;
            counts
                .iter()
                .map(|&n| {
                    let longest = rows[start..start + n].iter().map(|r| r.ids.len()).max();
                    start += n;
                    longest.unwrap_or(0)
                })
                .collect()
        }
        Work::Generation { prompts, .. } => prompts.iter().map(Vec::len).collect(),
    };
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut rows_in_last = 0;
    for i in order {
        match batches.last_mut() {
            Some(last) if rows_in_last + counts[i] <= batch_size.max(1) => {
                last.push(i);
                rows_in_last += counts[i];
            }
            _ => {
                batches.push(vec![i]);
                rows_in_last = counts[i];
            }
        }
    }
    batches
}

/// One task on one column.
struct TaskRun<'a, B: Backend> {
    model: &'a CausalLm<B>,
    tokenizer: &'a Tokenizer,
    task: &'a PreparedTask,
    column: &'a str,
    model_path: &'a Path,
    adapter: Option<&'a Path>,
    batch_size: usize,
    log: Option<&'a mut RecordLog>,
    stop: Option<&'a (dyn Fn(usize) -> bool + Sync)>,
    /// Records logged by this process so far (all tasks and columns).
    logged: &'a mut usize,
}

impl<B: hone_model::KernelBackend> TaskRun<'_, B> {
    /// Runs every batch (taking logged records instead of computing them), then aggregates.
    fn run(&mut self, report: &mut dyn FnMut(usize)) -> Result<TaskResult> {
        let started = Instant::now();
        let counts = record_rows(&self.task.work);
        let mut samples: Vec<Option<Sample>> = vec![None; counts.len()];
        for batch in plan_batches(&self.task.work, self.batch_size) {
            let logged: Vec<Option<Record>> = batch
                .iter()
                .map(|&i| {
                    self.log
                        .as_deref()
                        .and_then(|log| log.get(&self.task.spec.name, self.column, i))
                        .cloned()
                })
                .collect();
            if logged.iter().all(Option::is_some) {
                for (&i, record) in batch.iter().zip(logged) {
                    samples[i] = record.map(|r| r.score);
                }
            } else {
                let computed = self.compute(&batch)?;
                let mut lines = Vec::new();
                for ((&i, record), old) in batch.iter().zip(computed).zip(logged) {
                    let record = match old {
                        Some(old) => old,
                        None => {
                            let (line, back) = record.canonical()?;
                            lines.push(line);
                            back
                        }
                    };
                    samples[i] = Some(record.score);
                }
                if let Some(log) = self.log.as_deref_mut() {
                    log.append(&lines)?;
                }
                *self.logged += lines.len();
            }
            report(batch.iter().map(|&i| counts[i]).sum());
            if let Some(stop) = self.stop {
                if stop(*self.logged) {
                    return Err(EvalError::Interrupted {
                        records: *self.logged,
                        log: self.log.as_deref().map_or(String::new(), |log| {
                            format!(
                                " (kept in {}; --resume continues from there)",
                                log.path().display()
                            )
                        }),
                    });
                }
            }
        }
        let samples: Vec<Sample> = samples.into_iter().flatten().collect();
        let metrics = task_metrics(self.task.spec.kind, &samples);
        let tokens = match &self.task.work {
            Work::Perplexity { rows, .. } | Work::MultipleChoice { rows, .. } => {
                rows.iter().map(|r| r.ids.len()).sum()
            }
            Work::Generation { .. } => samples
                .iter()
                .map(|s| match s {
                    Sample::Generated(g) => g.new_tokens,
                    _ => 0,
                })
                .sum(),
        };
        let seconds = started.elapsed().as_secs_f64();
        Ok(TaskResult {
            column: self.column.to_string(),
            metrics,
            seconds,
            tokens,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            samples,
        })
    }

    fn record(
        &self,
        index: usize,
        prompt: String,
        prediction: Option<String>,
        score: Sample,
    ) -> Record {
        Record {
            task: self.task.spec.name.clone(),
            column: self.column.to_string(),
            model: display_path(self.model_path),
            adapter: self.adapter.map(display_path),
            index,
            prompt,
            prediction,
            score,
        }
    }

    /// The records of one batch, in batch order.
    fn compute(&self, batch: &[usize]) -> Result<Vec<Record>> {
        let (model, tokenizer) = (self.model, self.tokenizer);
        match &self.task.work {
            Work::Perplexity { rows, lines } => {
                let picked: Vec<_> = batch.iter().map(|&i| rows[i].clone()).collect();
                let scores = score_rows(model, &picked, self.batch_size, |_| {})?;
                batch
                    .iter()
                    .zip(scores)
                    .map(|(&i, lps)| {
                        let nll = -lps.iter().map(|&lp| lp as f64).sum::<f64>();
                        let sample = Sample::Perplexity(PerplexitySample {
                            line: lines[i],
                            nll,
                            tokens: lps.len(),
                        });
                        let prompt = tokenizer.decode(&rows[i].ids)?;
                        Ok(self.record(i, prompt, None, sample))
                    })
                    .collect()
            }
            Work::MultipleChoice {
                rows,
                items,
                choice_chars,
                contexts,
            } => {
                let mut starts = Vec::with_capacity(items.len());
                let mut next = 0;
                for item in items {
                    starts.push(next);
                    next += item.choices.len();
                }
                let picked: Vec<_> = batch
                    .iter()
                    .flat_map(|&i| rows[starts[i]..starts[i] + items[i].choices.len()].iter())
                    .cloned()
                    .collect();
                let scores = score_rows(model, &picked, self.batch_size, |_| {})?;
                let mut offset = 0;
                let mut records = Vec::with_capacity(batch.len());
                for &i in batch {
                    let item = &items[i];
                    let lls: Vec<f64> = scores[offset..offset + item.choices.len()]
                        .iter()
                        .map(|s| s.iter().map(|&lp| lp as f64).sum())
                        .collect();
                    offset += item.choices.len();
                    let predicted = choose(&lls).unwrap_or(0);
                    let predicted_norm = choose_normalized(&lls, &choice_chars[i]).unwrap_or(0);
                    let sample = Sample::Choice(ChoiceSample {
                        line: item.line,
                        answer: item.answer,
                        predicted,
                        predicted_norm,
                        log_likelihoods: lls,
                    });
                    let prediction = item.choices.get(predicted).cloned();
                    records.push(self.record(i, contexts[i].clone(), prediction, sample));
                }
                Ok(records)
            }
            Work::Generation {
                prompts,
                items,
                stop_ids,
                texts,
            } => {
                let settings = GreedySettings {
                    max_new_tokens: self.task.spec.max_new_tokens,
                    stop_ids: stop_ids.clone(),
                    stop_strings: self.task.spec.stop.clone(),
                };
                let picked: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].clone()).collect();
                let outputs = generate_greedy(model, tokenizer, &picked, &settings)?;
                if outputs.len() != batch.len() {
                    return Err(EvalError::TensorData(format!(
                        "{} prompts gave {} outputs",
                        batch.len(),
                        outputs.len()
                    )));
                }
                Ok(batch
                    .iter()
                    .zip(outputs)
                    .map(|(&i, out)| {
                        let item = &items[i];
                        let sample = Sample::Generated(GeneratedSample {
                            line: item.line,
                            exact_match: exact_match(&out.text, &item.answer),
                            numeric_match: numeric_match(&out.text, &item.answer),
                            contains: contains_answer(&out.text, &item.answer),
                            rouge_l: rouge_l(&out.text, &item.answer),
                            predicted_number: answer_number(&out.text),
                            reference_number: answer_number(&item.answer),
                            new_tokens: out.ids.len(),
                            finish_reason: format!("{:?}", out.finish_reason).to_lowercase(),
                            output: out.text.clone(),
                            reference: item.answer.clone(),
                        });
                        self.record(i, texts[i].clone(), Some(out.text), sample)
                    })
                    .collect())
            }
        }
    }
}
