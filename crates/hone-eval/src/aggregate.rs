//! Per-record outcomes ([`Sample`]s) → a task's metrics and their standard errors, and the
//! per-record influence values a baseline comparison pairs ([`influences`]).
//!
//! Means of per-record values (`acc`, `exact_match`, `rouge_l`, ...) have the standard error
//! `sqrt(Σ (x_i − x̄)² / (n (n − 1)))` (for 0/1 values this is lm-evaluation-harness'
//! `acc_stderr`). The loss is a ratio — summed negative log-likelihood over all target tokens
//! divided by their count — so its standard error comes from the spread *between examples*,
//! not between tokens (tokens of one example are not independent): the ratio estimator's
//! linearisation `u_i = (nll_i − L · tokens_i) / mean tokens`, `SE = sqrt(Σ u_i² / (n (n − 1)))`.
//! Perplexity's is the delta method on top, `ppl · SE(loss)`.

use std::collections::BTreeMap;

use crate::config::TaskKind;
use crate::metrics::perplexity;
use crate::report::Sample;

/// Metrics of a 0/1 or real per-record value: the mean and its standard error.
fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    (mean, stderr_of_centered(values.iter().map(|v| v - mean)))
}

/// `sqrt(Σ u² / (n (n − 1)))` of centred values (0 for fewer than 2).
pub(crate) fn stderr_of_centered(values: impl Iterator<Item = f64>) -> f64 {
    let (mut n, mut sum_sq) = (0usize, 0.0f64);
    for u in values {
        n += 1;
        sum_sq += u * u;
    }
    if n < 2 {
        0.0
    } else {
        (sum_sq / (n as f64 * (n as f64 - 1.0))).sqrt()
    }
}

/// Per-record value of `metric` for the mean-type metrics.
fn record_value(metric: &str, sample: &Sample) -> Option<f64> {
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    match (metric, sample) {
        ("acc", Sample::Choice(s)) => Some(b(s.predicted == s.answer)),
        ("acc_norm", Sample::Choice(s)) => Some(b(s.predicted_norm == s.answer)),
        ("exact_match", Sample::Generated(s)) => Some(b(s.exact_match)),
        ("numeric_match", Sample::Generated(s)) => Some(b(s.numeric_match)),
        ("contains", Sample::Generated(s)) => Some(b(s.contains)),
        ("rouge_l", Sample::Generated(s)) => Some(s.rouge_l),
        ("mean_new_tokens", Sample::Generated(s)) => Some(s.new_tokens as f64),
        _ => None,
    }
}

/// Loss (mean nll per target token) of perplexity samples, with each example's linearised
/// contribution `u_i`.
fn loss_influences(samples: &[Sample]) -> Option<(f64, Vec<(usize, f64)>)> {
    let rows: Vec<(usize, f64, f64)> = samples
        .iter()
        .filter_map(|s| match s {
            Sample::Perplexity(p) => Some((p.line, p.nll, p.tokens as f64)),
            _ => None,
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    let nll: f64 = rows.iter().map(|r| r.1).sum();
    let tokens: f64 = rows.iter().map(|r| r.2).sum();
    let loss = nll / tokens.max(1.0);
    let mean_tokens = (tokens / rows.len() as f64).max(1e-12);
    let u = rows
        .iter()
        .map(|&(line, nll, t)| (line, (nll - loss * t) / mean_tokens))
        .collect();
    Some((loss, u))
}

/// The value of `metric` over `samples` and each record's influence on it (keyed by the
/// record's line in its file): centred per-record values for means, the linearised ratio for
/// `loss`, and `ppl` times that for `ppl`. None when the samples do not carry the metric.
pub fn influences(metric: &str, samples: &[Sample]) -> Option<(f64, Vec<(usize, f64)>)> {
    match metric {
        "loss" => loss_influences(samples),
        "ppl" => loss_influences(samples).map(|(loss, u)| {
            let ppl = perplexity(loss);
            (ppl, u.into_iter().map(|(l, v)| (l, ppl * v)).collect())
        }),
        _ => {
            let values: Vec<(usize, f64)> = samples
                .iter()
                .map(|s| record_value(metric, s).map(|v| (s.line(), v)))
                .collect::<Option<_>>()?;
            if values.is_empty() {
                return None;
            }
            let mean = values.iter().map(|v| v.1).sum::<f64>() / values.len() as f64;
            Some((
                mean,
                values.into_iter().map(|(l, v)| (l, v - mean)).collect(),
            ))
        }
    }
}

/// The metrics of a task of `kind` from its per-record outcomes (in record order).
pub fn task_metrics(kind: TaskKind, samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    let column = |metric: &str| -> Vec<f64> {
        samples
            .iter()
            .filter_map(|s| record_value(metric, s))
            .collect()
    };
    match kind {
        TaskKind::Perplexity => {
            let tokens: usize = samples
                .iter()
                .map(|s| match s {
                    Sample::Perplexity(p) => p.tokens,
                    _ => 0,
                })
                .sum();
            let (loss, u) = loss_influences(samples).unwrap_or((0.0, Vec::new()));
            let se = stderr_of_centered(u.iter().map(|v| v.1));
            metrics.insert("loss".into(), loss);
            metrics.insert("loss_stderr".into(), se);
            metrics.insert("ppl".into(), perplexity(loss));
            metrics.insert("ppl_stderr".into(), perplexity(loss) * se);
            metrics.insert("tokens".into(), tokens as f64);
        }
        TaskKind::MultipleChoice => {
            for name in ["acc", "acc_norm"] {
                let (mean, se) = mean_and_stderr(&column(name));
                metrics.insert(name.into(), mean);
                metrics.insert(format!("{name}_stderr"), se);
            }
        }
        TaskKind::Generation => {
            for name in ["exact_match", "numeric_match", "contains"] {
                let (mean, se) = mean_and_stderr(&column(name));
                metrics.insert(name.into(), mean);
                metrics.insert(format!("{name}_stderr"), se);
            }
            let (rouge, rouge_se) = mean_and_stderr(&column("rouge_l"));
            metrics.insert("rouge_l".into(), rouge);
            metrics.insert("rouge_l_stderr".into(), rouge_se);
            metrics.insert(
                "mean_new_tokens".into(),
                mean_and_stderr(&column("mean_new_tokens")).0,
            );
        }
    }
    metrics
}
