//! The evaluation report: [`EvalReport`] holds every number and every setting (model,
//! adapters, data files, limits, prompts, generation settings, timings, per-example outputs);
//! [`write_report`] writes it as `eval.json` and as `eval.md` (a Markdown table whose rows are
//! task metrics and whose columns are each base model and each adapter), each atomically
//! (a temporary file in the same directory, renamed into place). With a baseline, both also
//! show the [`Comparison`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compare::{Comparison, Direction};
use crate::config::{EvalPlan, TaskKind};
use crate::error::{EvalError, Result};
use hone_model::FloatDtype;

/// File names inside the output directory.
pub const JSON_FILE: &str = "eval.json";
pub const MARKDOWN_FILE: &str = "eval.md";

/// Everything one evaluation measured and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub hone_version: String,
    /// Seconds since the Unix epoch when the report was made.
    pub created_unix: u64,
    /// The resolved settings.
    pub plan: EvalPlan,
    /// The base models, in column order.
    pub models: Vec<ModelSummary>,
    pub columns: Vec<ColumnSummary>,
    pub tasks: Vec<TaskReport>,
    pub timings: Timings,
    /// Plot files written beside the report (file names).
    pub plots: Vec<PathBuf>,
    /// The comparison with a baseline report, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

/// A base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Its column name.
    pub name: String,
    pub path: PathBuf,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Longest row used: `max_seq_len` capped by the model's `max_position_embeddings`.
    pub max_seq_len: usize,
    pub device: String,
    pub dtype: FloatDtype,
}

/// One column: the base model or an adapter on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSummary {
    pub name: String,
    /// Name of the base model of the column.
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    /// Projections that carry the adapter.
    pub lora_modules: usize,
    pub load_seconds: f64,
}

/// How a task's prompts were built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptReport {
    pub template: String,
    pub choice_format: String,
    pub chat: bool,
    /// Name of the chat template used (chat prompts or chat examples).
    pub chat_template: Option<String>,
    pub fewshot: usize,
    pub fewshot_path: Option<PathBuf>,
    /// Lines of the few-shot file that were used, in order.
    pub fewshot_lines: Vec<usize>,
    /// The first example's full context text, as the model saw it.
    pub example: String,
}

/// Decoding settings of a generation task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationReport {
    pub decoding: String,
    pub max_new_tokens: usize,
    pub stop_strings: Vec<String>,
    pub stop_ids: Vec<u32>,
    pub batch_size: usize,
}

/// One task, all columns. The counts (`evaluated`, `rows`, `truncated`, `skipped`) and the
/// prompt are the first model's; another tokenizer can count differently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub name: String,
    pub kind: TaskKind,
    pub path: PathBuf,
    /// Records in the file.
    pub available: usize,
    /// Records evaluated.
    pub evaluated: usize,
    pub limit: Option<usize>,
    pub prompt: PromptReport,
    pub generation: Option<GenerationReport>,
    /// Rows scored per column (multiple choice: one per choice).
    pub rows: usize,
    /// Rows whose context was cut on the left to fit `max_seq_len`.
    pub truncated: usize,
    /// Records left out (perplexity: no token in the loss).
    pub skipped: usize,
    pub results: Vec<TaskResult>,
}

/// One task on one column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub column: String,
    pub metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    /// Tokens processed (log-likelihood) or generated (generation).
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub samples: Vec<Sample>,
}

/// Per-example outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Sample {
    Choice(ChoiceSample),
    Generated(GeneratedSample),
    Perplexity(PerplexitySample),
}

impl Sample {
    /// The example's 1-based line in its file.
    pub fn line(&self) -> usize {
        match self {
            Sample::Choice(s) => s.line,
            Sample::Generated(s) => s.line,
            Sample::Perplexity(s) => s.line,
        }
    }
}

/// An example's summed negative log-likelihood over its target tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexitySample {
    pub line: usize,
    pub nll: f64,
    pub tokens: usize,
}

/// A multiple-choice question's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceSample {
    pub line: usize,
    pub answer: usize,
    pub predicted: usize,
    pub predicted_norm: usize,
    /// Summed log-probability of each choice's tokens.
    pub log_likelihoods: Vec<f64>,
}

/// A generation and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSample {
    pub line: usize,
    pub output: String,
    pub reference: String,
    pub predicted_number: Option<f64>,
    pub reference_number: Option<f64>,
    pub exact_match: bool,
    pub numeric_match: bool,
    pub contains: bool,
    pub rouge_l: f64,
    pub new_tokens: usize,
    pub finish_reason: String,
}

/// Wall-clock seconds of each phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub load_data_seconds: f64,
    pub load_model_seconds: f64,
    pub prepare_seconds: f64,
    pub evaluate_seconds: f64,
    pub total_seconds: f64,
}

/// Metric rows shown in the Markdown table, per kind (`(metric, its stderr)`).
fn shown_metrics(kind: TaskKind) -> &'static [(&'static str, Option<&'static str>)] {
    match kind {
        TaskKind::Perplexity => &[
            ("loss", Some("loss_stderr")),
            ("ppl", Some("ppl_stderr")),
            ("tokens", None),
        ],
        TaskKind::MultipleChoice => &[
            ("acc", Some("acc_stderr")),
            ("acc_norm", Some("acc_norm_stderr")),
        ],
        TaskKind::Generation => &[
            ("exact_match", Some("exact_match_stderr")),
            ("numeric_match", Some("numeric_match_stderr")),
            ("contains", Some("contains_stderr")),
            ("rouge_l", Some("rouge_l_stderr")),
            ("mean_new_tokens", None),
        ],
    }
}

fn format_value(metric: &str, value: f64) -> String {
    if metric == "tokens" {
        format!("{value:.0}")
    } else if metric == "mean_new_tokens" {
        format!("{value:.1}")
    } else {
        format!("{value:.4}")
    }
}

/// Escapes text for a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A fenced code block that survives backticks inside `text`.
fn fenced(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}text\n{text}\n{fence}\n")
}

impl EvalReport {
    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Evaluation\n");
        for m in &self.models {
            let _ = writeln!(
                md,
                "- model `{}`: `{}` ({}, {} layers, hidden {}, vocab {}, max_seq_len {})",
                m.name,
                m.path.display(),
                m.architecture,
                m.num_layers,
                m.hidden_size,
                m.vocab_size,
                m.max_seq_len
            );
        }
        for c in self.columns.iter().filter(|c| c.adapter.is_some()) {
            let _ = writeln!(
                md,
                "- adapter `{}` on `{}`: `{}` (r={}, alpha={}, {} projections)",
                c.name,
                c.model,
                c.adapter.as_deref().unwrap_or(Path::new("")).display(),
                c.lora_r.map_or("?".into(), |r| r.to_string()),
                c.lora_alpha.map_or("?".into(), |a| a.to_string()),
                c.lora_modules
            );
        }
        let _ = writeln!(
            md,
            "- device {}, dtype {}, batch size {}, total {:.1} s\n",
            self.plan.device, self.plan.dtype, self.plan.batch_size, self.timings.total_seconds
        );

        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let _ = writeln!(
            md,
            "| task | metric | n | {} |",
            names
                .iter()
                .map(|n| cell(n))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(md, "|---|---|---:|{}", "---:|".repeat(names.len()));
        for task in &self.tasks {
            for (metric, stderr) in shown_metrics(task.kind) {
                let mut row = format!("| {} | {} | {} |", cell(&task.name), metric, task.evaluated);
                for name in &names {
                    let result = task.results.iter().find(|r| r.column == *name);
                    let value = result.and_then(|r| r.metrics.get(*metric).copied());
                    let text = match value {
                        None => "–".to_string(),
                        Some(v) => {
                            let err = stderr.and_then(|s| result.and_then(|r| r.metrics.get(s)));
                            match err {
                                Some(e) => format!(
                                    "{} ± {}",
                                    format_value(metric, v),
                                    format_value(metric, *e)
                                ),
                                None => format_value(metric, v),
                            }
                        }
                    };
                    let _ = write!(row, " {text} |");
                }
                let _ = writeln!(md, "{row}");
            }
        }

        let _ = writeln!(md, "\n## Timings (seconds, tokens/s)\n");
        let _ = writeln!(
            md,
            "| task | {} |",
            names
                .iter()
                .map(|n| cell(n))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
        for task in &self.tasks {
            let mut row = format!("| {} |", cell(&task.name));
            for name in &names {
                match task.results.iter().find(|r| r.column == *name) {
                    Some(r) => {
                        let _ = write!(
                            row,
                            " {:.2} s ({:.0} tok/s) |",
                            r.seconds, r.tokens_per_second
                        );
                    }
                    None => row.push_str(" – |"),
                }
            }
            let _ = writeln!(md, "{row}");
        }
        let t = &self.timings;
        let _ = writeln!(
            md,
            "\nLoading data {:.2} s, model {:.2} s, tokenizing {:.2} s, evaluating {:.2} s.",
            t.load_data_seconds, t.load_model_seconds, t.prepare_seconds, t.evaluate_seconds
        );

        if let Some(c) = &self.comparison {
            c.write_markdown(&mut md);
        }

        let _ = writeln!(md, "\n## Tasks");
        for task in &self.tasks {
            let _ = writeln!(md, "\n### {}\n", task.name);
            let _ = writeln!(
                md,
                "- {} on `{}`: {} of {} records{}",
                task.kind,
                task.path.display(),
                task.evaluated,
                task.available,
                task.limit
                    .map_or(String::new(), |l| format!(" (limit {l})"))
            );
            let _ = writeln!(
                md,
                "- {} rows per column, {} truncated on the left, {} skipped",
                task.rows, task.truncated, task.skipped
            );
            let p = &task.prompt;
            if task.kind != TaskKind::Perplexity {
                let _ = writeln!(md, "- prompt template `{:?}`", p.template);
                if task.kind == TaskKind::MultipleChoice {
                    let _ = writeln!(md, "- choices scored as `{:?}`", p.choice_format);
                }
                if p.chat {
                    let _ = writeln!(
                        md,
                        "- chat template `{}`",
                        p.chat_template.as_deref().unwrap_or("?")
                    );
                }
                if p.fewshot > 0 {
                    let _ = writeln!(
                        md,
                        "- {}-shot from `{}` (lines {:?})",
                        p.fewshot,
                        p.fewshot_path.as_deref().unwrap_or(Path::new("")).display(),
                        p.fewshot_lines
                    );
                }
            }
            if let Some(g) = &task.generation {
                let _ = writeln!(
                    md,
                    "- {} decoding, at most {} new tokens, stop strings {:?}, stop ids {:?}",
                    g.decoding, g.max_new_tokens, g.stop_strings, g.stop_ids
                );
            }
            if !p.example.is_empty() {
                let _ = writeln!(md, "\nFirst prompt:\n\n{}", fenced(&p.example));
            }
        }
        if !self.plots.is_empty() {
            let _ = writeln!(md, "\n## Training curves\n");
            for plot in &self.plots {
                let _ = writeln!(md, "![{}]({})", plot.display(), plot.display());
            }
        }
        md
    }
}

impl Comparison {
    /// The comparison as a Markdown section.
    fn write_markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Compared with baseline\n\nBaseline `{}` column `{}`, this evaluation column \
             `{}`; a gate fails when the metric got worse by more than its allowed drop plus {} \
             standard errors of the difference. **{}**\n",
            self.baseline.display(),
            cell(&self.baseline_column),
            cell(&self.column),
            self.noise,
            if self.passed {
                "All gates passed."
            } else {
                "A gate FAILED."
            }
        );
        let _ = writeln!(
            md,
            "| task | metric | better | baseline | current | difference ± SE | paired | allowed drop | gate |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---|");
        for r in &self.rows {
            let se = r.stderr.map_or("?".to_string(), |s| format!("{s:.4}"));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.4} | {:.4} | {:+.4} ± {se} | {} | {} | {} |",
                cell(&r.task),
                r.metric,
                match r.direction {
                    Direction::HigherIsBetter => "higher",
                    Direction::LowerIsBetter => "lower",
                },
                r.baseline,
                r.current,
                r.difference,
                r.paired,
                r.max_drop.map_or("–".to_string(), |d| d.to_string()),
                match r.regressed {
                    None => "–",
                    Some(false) => "pass",
                    Some(true) => "**FAIL**",
                }
            );
        }
    }
}

/// Writes `bytes` to `path` atomically (`hone_io::write_file`), as [`EvalError::Write`].
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    hone_io::write_file(path, bytes).map_err(|e| EvalError::Write {
        path: path.to_path_buf(),
        message: e.source.to_string(),
    })
}

/// Writes `eval.json` and `eval.md` into `dir` (created if needed); returns their paths.
pub fn write_report(report: &EvalReport, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let json_path = dir.join(JSON_FILE);
    let md_path = dir.join(MARKDOWN_FILE);
    let mut json = serde_json::to_string_pretty(report).map_err(|e| EvalError::Write {
        path: json_path.clone(),
        message: e.to_string(),
    })?;
    json.push('\n');
    write_atomic(&json_path, json.as_bytes())?;
    write_atomic(&md_path, report.to_markdown().as_bytes())?;
    Ok((json_path, md_path))
}
