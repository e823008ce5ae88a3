//! Comparison with an earlier evaluation (`eval.json`) and quality gates on it: for one column
//! of each report (by default the last: the adapter under test), every quality metric of every
//! task both reports hold is shown as baseline, current, difference and the difference's
//! standard error; each `--max-drop [TASK/]METRIC=DROP` gate fails when the metric got worse
//! by more than `DROP` plus `noise` standard errors of the difference.
//!
//! Which way is worse follows the metric ([`Direction`]): accuracy-like metrics should not
//! fall, `loss` and `ppl` should not rise. The standard error of the difference pairs records
//! when both reports hold per-record outcomes for the same records (lines of the same data
//! file): `SE = sqrt(Σ (d_i − d̄)² / (n (n − 1)))` over the per-record differences of the
//! metric's influence values ([`crate::aggregate::influences`]; for the loss, the per-example
//! spread of the ratio estimator, not the per-token one). Otherwise the two evaluations are
//! taken as independent: `SE = sqrt(SE_baseline² + SE_current²)`, from the per-record outcomes
//! or the `METRIC_stderr` numbers (0 when neither report has them, e.g. an older report's loss).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::aggregate::{influences, stderr_of_centered};
use crate::config::{EvalPlan, TaskKind};
use crate::error::{EvalError, Result};
use crate::report::{EvalReport, Sample};

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    HigherIsBetter,
    LowerIsBetter,
}

impl Direction {
    /// The quality metrics and their directions (counts and timings have none).
    pub fn of(metric: &str) -> Option<Self> {
        match metric {
            "acc" | "acc_norm" | "exact_match" | "numeric_match" | "contains" | "rouge_l" => {
                Some(Direction::HigherIsBetter)
            }
            "loss" | "ppl" => Some(Direction::LowerIsBetter),
            _ => None,
        }
    }

    /// How much worse `current` is than `baseline` (negative: better).
    pub fn drop(self, baseline: f64, current: f64) -> f64 {
        match self {
            Direction::HigherIsBetter => baseline - current,
            Direction::LowerIsBetter => current - baseline,
        }
    }
}

/// One gate: `[TASK/]METRIC=DROP`, the largest allowed worsening (in the metric's units).
#[derive(Debug, Clone, PartialEq)]
pub struct MaxDrop {
    /// None: every task that has the metric.
    pub task: Option<String>,
    pub metric: String,
    pub max_drop: f64,
}

impl MaxDrop {
    fn name(&self) -> String {
        match &self.task {
            Some(task) => format!("{task}/{}", self.metric),
            None => self.metric.clone(),
        }
    }
}

impl FromStr for MaxDrop {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, drop) = s.rsplit_once('=').ok_or_else(|| {
            format!("`{s}`: expected [TASK/]METRIC=DROP, e.g. openbookqa/acc=0.01")
        })?;
        let max_drop: f64 = drop
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: the allowed drop `{drop}` is not a number"))?;
        if !max_drop.is_finite() || max_drop < 0.0 {
            return Err(format!(
                "`{s}`: the allowed drop must be a finite number >= 0, found {drop}"
            ));
        }
        let name = name.trim();
        let (task, metric) = match name.rsplit_once('/') {
            Some((task, metric)) => (Some(task.trim().to_string()), metric.trim().to_string()),
            None => (None, name.to_string()),
        };
        if metric.is_empty() || task.as_deref() == Some("") {
            return Err(format!("`{s}`: expected [TASK/]METRIC=DROP"));
        }
        Ok(MaxDrop {
            task,
            metric,
            max_drop,
        })
    }
}

/// What to compare against and which gates to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct GateSettings {
    /// The earlier `eval.json`.
    pub baseline: PathBuf,
    /// Column of the baseline report (default: its last).
    pub baseline_column: Option<String>,
    /// Column of the current report (default: its last).
    pub column: Option<String>,
    pub max_drops: Vec<MaxDrop>,
    /// Standard errors of the difference tolerated on top of each allowed drop.
    pub noise: f64,
}

/// Default of [`GateSettings::noise`].
pub const DEFAULT_NOISE: f64 = 2.0;

/// The comparison, as `eval.json` and `eval.md` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub baseline: PathBuf,
    pub baseline_column: String,
    pub column: String,
    pub noise: f64,
    pub rows: Vec<ComparisonRow>,
    /// No gate failed.
    pub passed: bool,
}

/// One metric of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    pub task: String,
    pub metric: String,
    pub direction: Direction,
    pub baseline: f64,
    pub current: f64,
    /// `current − baseline`.
    pub difference: f64,
    /// Standard error of the difference (None: neither report says).
    pub stderr: Option<f64>,
    /// Records paired for `stderr` (0: the reports were taken as independent).
    pub paired: usize,
    /// The gate on this row, if any.
    pub max_drop: Option<f64>,
    /// Whether the gate failed (None without a gate).
    pub regressed: Option<bool>,
}

/// The parts of a report a comparison reads; older reports (no per-record perplexity
/// outcomes, no `loss_stderr`) read too.
#[derive(Debug, Clone, Deserialize)]
struct View {
    columns: Vec<ViewColumn>,
    tasks: Vec<ViewTask>,
}

#[derive(Debug, Clone, Deserialize)]
struct ViewColumn {
    name: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ViewTask {
    name: String,
    results: Vec<ViewResult>,
}

#[derive(Debug, Clone, Deserialize)]
struct ViewResult {
    column: String,
    metrics: BTreeMap<String, f64>,
    #[serde(default)]
    samples: Vec<Sample>,
}

impl View {
    fn of(report: &EvalReport) -> Self {
        View {
            columns: report
                .columns
                .iter()
                .map(|c| ViewColumn {
                    name: c.name.clone(),
                })
                .collect(),
            tasks: report
                .tasks
                .iter()
                .map(|t| ViewTask {
                    name: t.name.clone(),
                    results: t
                        .results
                        .iter()
                        .map(|r| ViewResult {
                            column: r.column.clone(),
                            metrics: r.metrics.clone(),
                            samples: r.samples.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| EvalError::Baseline {
            path: path.to_path_buf(),
            message: format!("not an eval.json report: {e}"),
        })
    }

    /// The named column, or the last one.
    fn column(&self, name: Option<&str>, what: &str, path: &Path) -> Result<String> {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        match name {
            Some(n) if names.contains(&n) => Ok(n.to_string()),
            Some(n) => Err(EvalError::Baseline {
                path: path.to_path_buf(),
                message: format!("{what} has no column `{n}` (it has {})", names.join(", ")),
            }),
            None => names
                .last()
                .map(|n| n.to_string())
                .ok_or_else(|| EvalError::Baseline {
                    path: path.to_path_buf(),
                    message: format!("{what} has no column"),
                }),
        }
    }

    fn result(&self, task: &str, column: &str) -> Option<&ViewResult> {
        self.tasks
            .iter()
            .find(|t| t.name == task)?
            .results
            .iter()
            .find(|r| r.column == column)
    }
}

/// Standard error of `current − baseline` for `metric`, and the number of paired records.
fn difference_stderr(
    metric: &str,
    baseline: &ViewResult,
    current: &ViewResult,
) -> (Option<f64>, usize) {
    let b = influences(metric, &baseline.samples);
    let c = influences(metric, &current.samples);
    if let (Some((_, b)), Some((_, c))) = (&b, &c) {
        let by_line: HashMap<usize, f64> = b.iter().copied().collect();
        let same_records = b.len() == c.len()
            && by_line.len() == b.len()
            && c.iter().all(|(line, _)| by_line.contains_key(line));
        if same_records && c.len() >= 2 {
            let d: Vec<f64> = c.iter().map(|(line, u)| u - by_line[line]).collect();
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            return (
                Some(stderr_of_centered(d.iter().map(|v| v - mean))),
                d.len(),
            );
        }
    }
    let own = |r: &ViewResult, inf: &Option<(f64, Vec<(usize, f64)>)>| -> Option<f64> {
        match inf {
            Some((_, u)) => Some(stderr_of_centered(u.iter().map(|v| v.1))),
            None => r.metrics.get(&format!("{metric}_stderr")).copied(),
        }
    };
    match (own(baseline, &b), own(current, &c)) {
        (None, None) => (None, 0),
        (sb, sc) => {
            let (sb, sc) = (sb.unwrap_or(0.0), sc.unwrap_or(0.0));
            (Some((sb * sb + sc * sc).sqrt()), 0)
        }
    }
}

/// Quality metrics a task of `kind` reports.
fn kind_metrics(kind: TaskKind) -> &'static [&'static str] {
    match kind {
        TaskKind::Perplexity => &["loss", "ppl"],
        TaskKind::MultipleChoice => &["acc", "acc_norm"],
        TaskKind::Generation => &["exact_match", "numeric_match", "contains", "rouge_l"],
    }
}

/// Checks, before anything is evaluated, that the baseline reads and has the columns asked
/// for, and that every gate names a metric both the baseline and `plan`'s tasks will have.
pub fn precheck(settings: &GateSettings, plan: &EvalPlan) -> Result<()> {
    let path = &settings.baseline;
    let base = View::read(path)?;
    let baseline_column = base.column(settings.baseline_column.as_deref(), "the baseline", path)?;
    if let Some(column) = &settings.column {
        if !plan.columns().contains(column) {
            return Err(EvalError::config(
                "column",
                format!(
                    "this evaluation has no column `{column}` (it has {})",
                    plan.columns().join(", ")
                ),
            ));
        }
    }
    let mut available = Vec::new();
    for task in &plan.tasks {
        let Some(b) = base.result(&task.name, &baseline_column) else {
            continue;
        };
        for metric in kind_metrics(task.kind) {
            if b.metrics.contains_key(*metric) {
                available.push((task.name.clone(), metric.to_string()));
            }
        }
    }
    for gate in &settings.max_drops {
        let found = available.iter().any(|(task, metric)| {
            *metric == gate.metric && gate.task.as_deref().is_none_or(|t| t == task.as_str())
        });
        if !found {
            return Err(EvalError::UnknownMetric {
                metric: gate.name(),
                message: if Direction::of(&gate.metric).is_none() {
                    format!("`{}` is not a quality metric", gate.metric)
                } else {
                    format!(
                        "not in both the baseline (column `{baseline_column}`) and this \
                         evaluation's tasks"
                    )
                },
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available
                        .iter()
                        .map(|(t, m)| format!("{t}/{m}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
    }
    Ok(())
}

/// Compares `report` with the baseline of `settings` and applies its gates. Errors (usage):
/// an unreadable baseline, a missing column, a gated metric either report lacks.
pub fn compare(report: &EvalReport, settings: &GateSettings) -> Result<Comparison> {
    let path = &settings.baseline;
    let base = View::read(path)?;
    let current = View::of(report);
    let baseline_column = base.column(settings.baseline_column.as_deref(), "the baseline", path)?;
    let column = current.column(settings.column.as_deref(), "this evaluation", path)?;

    // Every (task, metric) of a quality metric both columns have.
    let mut rows = Vec::new();
    let mut available = Vec::new();
    for task in &current.tasks {
        let (Some(c), Some(b)) = (
            current.result(&task.name, &column),
            base.result(&task.name, &baseline_column),
        ) else {
            continue;
        };
        for (metric, &value) in &c.metrics {
            let (Some(direction), Some(&old)) = (Direction::of(metric), b.metrics.get(metric))
            else {
                continue;
            };
            available.push(format!("{}/{metric}", task.name));
            let (stderr, paired) = difference_stderr(metric, b, c);
            rows.push(ComparisonRow {
                task: task.name.clone(),
                metric: metric.clone(),
                direction,
                baseline: old,
                current: value,
                difference: value - old,
                stderr,
                paired,
                max_drop: None,
                regressed: None,
            });
        }
    }
    for gate in &settings.max_drops {
        let matching: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.metric == gate.metric && gate.task.as_deref().is_none_or(|t| t == r.task)
            })
            .map(|(i, _)| i)
            .collect();
        if matching.is_empty() {
            let message = if Direction::of(&gate.metric).is_none() {
                format!("`{}` is not a quality metric", gate.metric)
            } else {
                format!(
                    "not in both reports (baseline column `{baseline_column}`, current column \
                     `{column}`)"
                )
            };
            return Err(EvalError::UnknownMetric {
                metric: gate.name(),
                message,
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        }
        for i in matching {
            let row = &mut rows[i];
            let drop = row.direction.drop(row.baseline, row.current);
            let allowed = gate.max_drop + settings.noise * row.stderr.unwrap_or(0.0);
            row.max_drop = Some(gate.max_drop);
            row.regressed = Some(drop > allowed);
        }
    }
    let passed = rows.iter().all(|r| r.regressed != Some(true));
    Ok(Comparison {
        baseline: path.clone(),
        baseline_column,
        column,
        noise: settings.noise,
        rows,
        passed,
    })
}

impl Comparison {
    /// The failed gates, one phrase each (empty when all passed).
    pub fn failures(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.regressed == Some(true))
            .map(|r| {
                format!(
                    "{}/{} {:.4} -> {:.4} (difference {:+.4} ± {:.4}, allowed drop {} + {} SE)",
                    r.task,
                    r.metric,
                    r.baseline,
                    r.current,
                    r.difference,
                    r.stderr.unwrap_or(0.0),
                    r.max_drop.unwrap_or(0.0),
                    self.noise
                )
            })
            .collect()
    }

    /// [`EvalError::Regression`] when a gate failed.
    pub fn check(&self) -> Result<()> {
        let failures = self.failures();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(EvalError::Regression {
                baseline: self.baseline.clone(),
                failures: failures.join("; "),
            })
        }
    }
}
