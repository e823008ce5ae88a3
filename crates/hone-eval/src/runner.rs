//! [`evaluate`]: the whole evaluation of a plan on one device. Data files are read and checked
//! first, then the model is loaded once and every task is tokenized once; each column (the
//! base model, then each adapter loaded in its place) runs every task; the report collects
//! the numbers, settings and timings. Progress is reported through a callback after each
//! batch.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::*;
use hone_model::{load_model_dir, CausalLm, LoadOptions, Tokenizer};
use hone_tokenize::ChatTemplate;

use crate::config::{AdapterSpec, EvalPlan};
use crate::data::display_path;
use crate::error::{EvalError, Result};
use crate::generate::{generate_greedy, GreedySettings};
use crate::metrics::{
    answer_number, choose, choose_normalized, contains_answer, exact_match, mean_stderr,
    numeric_match, perplexity, rouge_l, Mean,
};
use crate::prepare::{load_task_data, prepare_task, Context, PreparedTask, Work};
use crate::report::{
    ChoiceSample, ColumnSummary, EvalReport, GeneratedSample, ModelSummary, Sample, TaskReport,
    TaskResult, Timings,
};
use crate::score::score_rows;
use hone_model::adapter::ADAPTER_CONFIG;

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

/// Runs `plan` on `device`, calling `progress` after every batch.
pub fn evaluate<B: Backend>(
    plan: &EvalPlan,
    device: &B::Device,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<EvalReport> {
    let started = Instant::now();
    let mut timings = Timings::default();
    // Cheap checks first: every adapter's configuration, before data and model are loaded.
    for adapter in &plan.adapters {
        hone_model::adapter::read_adapter_config(&adapter.path)
            .map_err(|cause| adapter_error(adapter, cause))?;
    }
    let model_dir = hone_model::loader::resolve_model_dir(&plan.model)?;

    let t = Instant::now();
    let data = plan
        .tasks
        .iter()
        .map(load_task_data)
        .collect::<Result<Vec<_>>>()?;
    timings.load_data_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let loaded = load_model_dir::<B>(
        &model_dir,
        device,
        LoadOptions {
            dtype: plan.dtype.burn(),
        },
    )?;
    let mut model = loaded.model;
    let tokenizer = loaded.tokenizer;
    // Every adapter must load onto this base (shapes, target modules, finite values) before
    // any column is evaluated: a bad one found after the base's evaluation wastes it.
    for adapter in &plan.adapters {
        model
            .load_adapter(&adapter.path)
            .map_err(|cause| adapter_error(adapter, cause))?;
    }
    model.detach_lora();
    timings.load_model_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let needs_template =
        plan.tasks.iter().any(|t| t.chat) || data.iter().any(|d| d.has_conversations());
    let template = match ChatTemplate::load(&plan.template, &model_dir) {
        Ok(t) => Some(t),
        Err(e) if needs_template => return Err(e.into()),
        Err(_) => None,
    };
    let max_len = plan
        .max_seq_len
        .min(model.config.max_position_embeddings.max(2));
    let ctx = Context {
        tokenizer: &tokenizer,
        template: template.as_ref(),
        max_len,
        batch_size: plan.batch_size,
    };
    let prepared = plan
        .tasks
        .iter()
        .zip(data)
        .map(|(spec, data)| prepare_task(spec, data, &ctx))
        .collect::<Result<Vec<_>>>()?;
    timings.prepare_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let columns = plan.columns();
    let stages = columns.len() * prepared.len();
    let mut summaries = Vec::with_capacity(columns.len());
    let mut results: Vec<Vec<TaskResult>> = prepared.iter().map(|_| Vec::new()).collect();
    for (c, column) in columns.iter().enumerate() {
        let load = Instant::now();
        let mut summary = ColumnSummary {
            name: column.clone(),
            adapter: None,
            lora_r: None,
            lora_alpha: None,
            lora_modules: 0,
            load_seconds: 0.0,
        };
        match c.checked_sub(1).map(|i| &plan.adapters[i]) {
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
            let stage = c * prepared.len() + i + 1;
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
            let result = run_task(
                &model,
                &tokenizer,
                task,
                column,
                plan.batch_size,
                &mut report,
            )?;
            tracing::info!(
                "{column} / {}: {:?} in {:.2} s",
                task.spec.name,
                result.metrics,
                result.seconds
            );
            results[i].push(result);
        }
    }
    timings.evaluate_seconds = t.elapsed().as_secs_f64();
    timings.total_seconds = started.elapsed().as_secs_f64();

    let tasks = prepared
        .into_iter()
        .zip(results)
        .map(|(task, results)| TaskReport {
            name: task.spec.name.clone(),
            kind: task.spec.kind,
            path: display_path(&task.spec.path),
            available: task.available,
            evaluated: task.evaluated,
            limit: task.spec.limit,
            rows: task.total(),
            prompt: task.prompt,
            generation: task.generation,
            truncated: task.truncated,
            skipped: task.skipped,
            results,
        })
        .collect();
    let c = &model.config;
    Ok(EvalReport {
        hone_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: hone_io::unix_now(),
        plan: plan.clone(),
        model: ModelSummary {
            path: display_path(&plan.model),
            architecture: format!("{:?}", c.architecture).to_lowercase(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            max_seq_len: max_len,
            device: plan.device.to_string(),
            dtype: plan.dtype,
        },
        columns: summaries,
        tasks,
        timings,
        plots: Vec::new(),
    })
}

/// An adapter that cannot be used, with a hint when `path` is a training run directory
/// rather than the adapter directory inside it.
fn adapter_error(adapter: &AdapterSpec, cause: hone_model::ModelError) -> EvalError {
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

fn finish(
    column: &str,
    metrics: BTreeMap<String, f64>,
    seconds: f64,
    tokens: usize,
    samples: Vec<Sample>,
) -> TaskResult {
    TaskResult {
        column: column.to_string(),
        metrics,
        seconds,
        tokens,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        samples,
    }
}

/// Runs one prepared task on the model as it is (base or with an adapter).
fn run_task<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    task: &PreparedTask,
    column: &str,
    batch_size: usize,
    report: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let started = Instant::now();
    let mut metrics = BTreeMap::new();
    match &task.work {
        Work::Perplexity { rows } => {
            let scores = score_rows(model, rows, batch_size, &mut *report)?;
            let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
            let targets: usize = scores.iter().map(Vec::len).sum();
            let nll: f64 = -scores.iter().flatten().map(|&lp| lp as f64).sum::<f64>();
            let loss = nll / targets.max(1) as f64;
            metrics.insert("loss".into(), loss);
            metrics.insert("ppl".into(), perplexity(loss));
            metrics.insert("tokens".into(), targets as f64);
            let seconds = started.elapsed().as_secs_f64();
            Ok(finish(column, metrics, seconds, tokens, Vec::new()))
        }
        Work::MultipleChoice {
            rows,
            items,
            choice_chars,
        } => {
            let scores = score_rows(model, rows, batch_size, &mut *report)?;
            let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
            let (mut acc, mut acc_norm) = (Mean::default(), Mean::default());
            let mut samples = Vec::with_capacity(items.len());
            let mut next = 0;
            for (item, chars) in items.iter().zip(choice_chars) {
                let lls: Vec<f64> = scores[next..next + item.choices.len()]
                    .iter()
                    .map(|s| s.iter().map(|&lp| lp as f64).sum())
                    .collect();
                next += item.choices.len();
                let predicted = choose(&lls).unwrap_or(0);
                let predicted_norm = choose_normalized(&lls, chars).unwrap_or(0);
                acc.add_bool(predicted == item.answer);
                acc_norm.add_bool(predicted_norm == item.answer);
                samples.push(Sample::Choice(ChoiceSample {
                    line: item.line,
                    answer: item.answer,
                    predicted,
                    predicted_norm,
                    log_likelihoods: lls,
                }));
            }
            let n = items.len();
            metrics.insert("acc".into(), acc.value());
            metrics.insert("acc_stderr".into(), mean_stderr(acc.value(), n));
            metrics.insert("acc_norm".into(), acc_norm.value());
            metrics.insert("acc_norm_stderr".into(), mean_stderr(acc_norm.value(), n));
            let seconds = started.elapsed().as_secs_f64();
            Ok(finish(column, metrics, seconds, tokens, samples))
        }
        Work::Generation {
            prompts,
            items,
            stop_ids,
        } => {
            let settings = GreedySettings {
                max_new_tokens: task.spec.max_new_tokens,
                stop_ids: stop_ids.clone(),
                stop_strings: task.spec.stop.clone(),
            };
            // Prompts of similar length share a batch (less padding); results keep input order.
            let mut order: Vec<usize> = (0..prompts.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
            let mut outputs = vec![None; prompts.len()];
            for chunk in order.chunks(batch_size.max(1)) {
                let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
                let generated = generate_greedy(model, tokenizer, &batch, &settings)?;
                for (&i, out) in chunk.iter().zip(generated) {
                    outputs[i] = Some(out);
                }
                report(chunk.len());
            }
            let mut m: [Mean; 5] = Default::default();
            let mut samples = Vec::with_capacity(items.len());
            let mut generated_tokens = 0;
            for (item, out) in items.iter().zip(outputs) {
                let out =
                    out.ok_or_else(|| EvalError::TensorData("a prompt produced no output".into()))?;
                let sample = GeneratedSample {
                    line: item.line,
                    exact_match: exact_match(&out.text, &item.answer),
                    numeric_match: numeric_match(&out.text, &item.answer),
                    contains: contains_answer(&out.text, &item.answer),
                    rouge_l: rouge_l(&out.text, &item.answer),
                    predicted_number: answer_number(&out.text),
                    reference_number: answer_number(&item.answer),
                    new_tokens: out.ids.len(),
                    finish_reason: format!("{:?}", out.finish_reason).to_lowercase(),
                    output: out.text,
                    reference: item.answer.clone(),
                };
                m[0].add_bool(sample.exact_match);
                m[1].add_bool(sample.numeric_match);
                m[2].add_bool(sample.contains);
                m[3].add(sample.rouge_l);
                m[4].add(sample.new_tokens as f64);
                generated_tokens += sample.new_tokens;
                samples.push(Sample::Generated(sample));
            }
            let n = items.len();
            for (k, name) in ["exact_match", "numeric_match", "contains"]
                .iter()
                .enumerate()
            {
                metrics.insert(name.to_string(), m[k].value());
                metrics.insert(format!("{name}_stderr"), mean_stderr(m[k].value(), n));
            }
            metrics.insert("rouge_l".into(), m[3].value());
            metrics.insert("mean_new_tokens".into(), m[4].value());
            let seconds = started.elapsed().as_secs_f64();
            Ok(finish(column, metrics, seconds, generated_tokens, samples))
        }
    }
}
