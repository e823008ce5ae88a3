//! # hone-eval
//!
//! Evaluation of a base model and any number of LoRA adapters side by side:
//!
//! * **perplexity** / mean loss over a corpus with the training masks (through hone-tokenize),
//!   scored by batched log-likelihood ([`score`]);
//! * **multiple choice** by the log-likelihood of each choice given the question, with `acc`
//!   and lm-evaluation-harness' per-character `acc_norm` ([`metrics`]);
//! * **generation** with batched greedy decoding over left-padded prompts ([`generate`]),
//!   scored by exact match, numeric match (GSM8K's `#### N`), contains and ROUGE-L;
//! * a report with every number and setting, written as `eval.json` and `eval.md`
//!   ([`report`]), and PNG plots of a training run's loss and learning-rate curves ([`plot`]);
//! * metrics and standard errors aggregated from per-record outcomes ([`aggregate`]), kept in a
//!   per-record log as they are computed so an interrupted evaluation resumes ([`records`]);
//! * comparison with an earlier report and quality gates on it ([`compare`]);
//! * question answering with and without retrieval, base model and adapters side by side
//!   (`hone eval compare`: [`qa`]).
//!
//! ```no_run
//! use hone_eval::{evaluate, write_report, EvalConfig, TaskConfig};
//! let config = EvalConfig {
//!     model: "checkpoints/base/stories260k".into(),
//!     tasks: vec![TaskConfig::named("openbookqa")],
//!     limit: Some(100),
//!     ..EvalConfig::default()
//! };
//! let plan = config.resolve()?;
//! let report = evaluate::<hone_model::Cpu>(&plan, &Default::default(), &mut |_| {})?;
//! write_report(&report, std::path::Path::new("runs/eval"))?;
//! # Ok::<(), hone_eval::EvalError>(())
//! ```

pub mod aggregate;
pub mod compare;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod plot;
mod prepare;
pub mod prompt;
pub mod qa;
pub mod records;
pub mod report;
pub mod runner;
pub mod score;

pub use compare::{compare, Comparison, Direction, GateSettings, MaxDrop, DEFAULT_NOISE};
pub use config::{
    preset_names, AdapterSpec, EvalConfig, EvalPlan, ModelSpec, TaskConfig, TaskKind, TaskSpec,
    BASE_COLUMN,
};
pub use error::{EvalError, Result};
pub use generate::{generate_greedy, GenOutput, GreedySettings};
pub use plot::{plot_metrics, plot_run, read_metrics, MetricsLog, METRICS_FILE};
pub use qa::{compare_qa, write_compare, CompareReport, CompareSettings, Prediction};
pub use records::{Record, RecordLog, Resumed, RECORDS_FILE};
pub use report::{write_report, EvalReport, JSON_FILE, MARKDOWN_FILE};
pub use runner::{evaluate, evaluate_with, EvalOptions, Progress};
pub use score::{score_rows, ScoreRow};
