//! Quality gates of a run: `[gates] fail_if = ["eval/loss > 1.2"]` in the run config and
//! `hone train --fail-if 'eval/loss > 1.2'`. A gate is `METRIC OP NUMBER` (`OP` one of `>`,
//! `>=`, `<`, `<=`, `==`, `!=`); the run fails its gates (exit code 3 in `hone`) when any
//! condition holds on the run's final values, or names a metric the run never measured. The
//! metrics are the last value of each key of `metrics.jsonl` (`eval/loss`, `train/loss`, ...)
//! plus what the run summary adds (`eval/loss_best`, `eval/loss_first`, `tokens_per_sec`,
//! `peak_memory_mb`, `wall_seconds`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `[gates]` of a run config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesSection {
    /// Conditions that fail the run when they hold (`"eval/loss > 1.2"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fail_if: Vec<String>,
}

impl GatesSection {
    pub fn is_empty(&self) -> bool {
        self.fail_if.is_empty()
    }
}

/// A comparison operator of a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// One parsed gate: fail when `metric op threshold` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.metric, self.op.symbol(), self.threshold)
    }
}

impl FromStr for Gate {
    type Err = String;

    /// Parses `METRIC OP NUMBER`; the error says what was expected.
    fn from_str(text: &str) -> Result<Self, String> {
        let expected =
            "expected `METRIC OP NUMBER` with OP one of > >= < <= == != (e.g. `eval/loss > 1.2`)";
        // Two-character operators first, so `>=` is not read as `>` followed by `=1.2`.
        let ops = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">", Op::Gt),
            ("<", Op::Lt),
        ];
        let (at, symbol, op) = ops
            .iter()
            .filter_map(|(s, op)| text.find(s).map(|at| (at, *s, *op)))
            .min_by_key(|(at, s, _)| (*at, std::cmp::Reverse(s.len())))
            .ok_or_else(|| format!("`{text}`: no comparison; {expected}"))?;
        let metric = text[..at].trim();
        let number = text[at + symbol.len()..].trim();
        if metric.is_empty() || metric.contains(char::is_whitespace) {
            return Err(format!(
                "`{text}`: no metric name before `{symbol}`; {expected}"
            ));
        }
        let threshold: f64 = number
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("`{text}`: `{number}` is not a finite number; {expected}"))?;
        Ok(Gate {
            metric: metric.to_string(),
            op,
            threshold,
        })
    }
}

/// How one gate came out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateOutcome {
    /// The gate as written back (`eval/loss > 1.2`).
    pub gate: String,
    /// The metric's final value (`None`: the run did not measure it).
    pub value: Option<f64>,
    /// Whether the run passes this gate.
    pub passed: bool,
}

/// Parses every gate, naming the first bad one by its position.
pub fn parse_all(texts: &[String]) -> Result<Vec<Gate>, (usize, String)> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| t.parse::<Gate>().map_err(|e| (i, e)))
        .collect()
}

/// Checks `gates` against the run's final `metrics`.
pub fn check(gates: &[Gate], metrics: &BTreeMap<String, f64>) -> Vec<GateOutcome> {
    gates
        .iter()
        .map(|g| {
            let value = metrics.get(&g.metric).copied();
            GateOutcome {
                gate: g.to_string(),
                value,
                passed: value.is_some_and(|v| !g.op.holds(v, g.threshold)),
            }
        })
        .collect()
}

/// The last value of every numeric key of `metrics.jsonl`'s lines (later lines win).
pub fn final_metrics(metrics_jsonl: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics_jsonl.lines() {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(line) else {
            continue;
        };
        for (key, value) in map {
            if let Some(v) = value.as_f64() {
                out.insert(key, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_parse_with_every_operator_and_refuse_nonsense() {
        let g: Gate = "eval/loss >= 1.25".parse().unwrap();
        assert_eq!(
            (g.metric.as_str(), g.op, g.threshold),
            ("eval/loss", Op::Ge, 1.25)
        );
        let g: Gate = "tokens_per_sec<100".parse().unwrap();
        assert_eq!((g.op, g.threshold), (Op::Lt, 100.0));
        for bad in [
            "eval/loss",
            "> 1",
            "eval/loss > x",
            "eval loss > 1",
            "eval/loss > inf",
        ] {
            assert!(bad.parse::<Gate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_gate_fails_when_its_condition_holds_or_its_metric_is_missing() {
        let metrics = final_metrics(
            "{\"step\":1,\"eval/loss\":1.5}\n{\"step\":2,\"eval/loss\":1.1,\"train/loss\":0.9}\n",
        );
        let gates = parse_all(&[
            "eval/loss > 1.2".into(),
            "train/loss > 0.5".into(),
            "eval/ppl > 3".into(),
        ])
        .unwrap();
        let out = check(&gates, &metrics);
        assert_eq!(out[0].value, Some(1.1));
        assert!(out[0].passed, "the final value counts, not the first");
        assert!(!out[1].passed);
        assert_eq!(out[2].value, None);
        assert!(!out[2].passed);
    }
}
