//! [`EvalConfig`]: the `[eval]` settings (raw, as written in TOML or built from flags), and
//! [`EvalPlan`]: the same settings validated and resolved, with every task's defaults filled in
//! (the plan is what a report records).
//!
//! Columns of the report: `model` (column `base`) and its `adapters`, then each of `models`
//! (column named `name`) and its own adapters. Every model × adapter column runs every task.
//!
//! ```toml
//! [eval]
//! model = "checkpoints/base/stories260k"
//! adapters = [{ name = "sft", path = "runs/sft/adapter" }]
//! models = [              # more base models, each with its own adapters (optional)
//!   { name = "gqa", path = "fixtures/peft/llama_gqa", adapters = [{ name = "gqa-sft", path = "fixtures/peft/llama_gqa/adapter" }] },
//! ]
//! batch_size = 8          # rows per forward pass (log-likelihood) / prompts per decode batch
//! limit = 100             # first N records of every task (all when absent)
//! device = "cpu"          # cpu | cuda | cuda:N
//! dtype = "f32"           # f32 | bf16 | f16
//! chat = false            # wrap prompts in the model's chat template
//! template = "model"      # chat template source: model | model:NAME | chatml | llama3 | alpaca
//! all_tokens = false      # perplexity over every token, not only the trained (assistant) ones
//! max_seq_len = 2048      # longest row; longer contexts lose their left part
//! out = "runs/eval"       # where eval.json, eval.md and plots go
//! run = "runs/sft"        # a training run whose metrics.jsonl is plotted
//!
//! [[eval.tasks]]
//! name = "openbookqa"     # a preset (openbookqa, gsm8k) or any name with `kind` and `path`
//! [[eval.tasks]]
//! name = "gsm8k"
//! max_new_tokens = 64
//! fewshot = 3
//! [[eval.tasks]]
//! name = "val"
//! kind = "perplexity"
//! path = "runs/data/val.jsonl"
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hone_model::{DeviceSpec, FloatDtype};
use hone_tokenize::TemplateSource;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::prompt::{Field, PromptTemplate};

/// Name of the column that holds the base model without adapter.
pub const BASE_COLUMN: &str = "base";

/// What a task measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Mean loss and perplexity over a corpus (curated messages, text or completion JSONL).
    Perplexity,
    /// Log-likelihood of each choice given the question (OpenBookQA or `{question, choices,
    /// answer}` JSONL).
    MultipleChoice,
    /// Greedy generation scored against references (`{question, answer}` JSONL).
    Generation,
}

impl TaskKind {
    /// The snake-case name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Perplexity => "perplexity",
            TaskKind::MultipleChoice => "multiple_choice",
            TaskKind::Generation => "generation",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A named PEFT adapter directory: one column of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for AdapterSpec {
    type Err = String;

    /// `NAME=DIR`, or a bare `DIR` named after its last component.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, path) = match s.split_once('=') {
            Some((name, path)) => (name.trim().to_string(), PathBuf::from(path.trim())),
            None => {
                let path = PathBuf::from(s.trim());
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, path)
            }
        };
        if name.is_empty() || path.as_os_str().is_empty() {
            return Err(format!("invalid adapter `{s}`: expected NAME=DIR"));
        }
        Ok(AdapterSpec { name, path })
    }
}

/// A further base model with its adapters: its own column (`name`) and one per adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Column name of the model without adapter.
    pub name: String,
    /// Hugging Face model directory (or GGUF file).
    pub path: PathBuf,
    #[serde(default)]
    pub adapters: Vec<AdapterSpec>,
}

/// One task as written: a preset name alone, or a name with `kind` and `path`; any field
/// overrides the preset's or the kind's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Row name in the report; `openbookqa` and `gsm8k` are presets.
    pub name: String,
    pub kind: Option<TaskKind>,
    /// The data file (JSONL).
    pub path: Option<PathBuf>,
    /// Prompt with `{question}` (and `{choices}` for multiple choice), `{{`/`}}` for braces.
    pub prompt: Option<String>,
    /// Multiple choice: the scored continuation, with `{choice}` (and `{label}`).
    pub choice_format: Option<String>,
    /// Generation: solved examples put before each prompt, from `fewshot_path`.
    pub fewshot: Option<usize>,
    pub fewshot_path: Option<PathBuf>,
    /// Generation: tokens to generate at most.
    pub max_new_tokens: Option<usize>,
    /// Generation: the output is cut before the first of these.
    pub stop: Option<Vec<String>>,
    /// Overrides the global `chat` for this task.
    pub chat: Option<bool>,
    /// Overrides the global `limit` for this task.
    pub limit: Option<usize>,
}

impl TaskConfig {
    /// The task's kind as far as it is known before resolution: the explicit `kind`, else the
    /// preset's.
    pub fn kind_hint(&self) -> Option<TaskKind> {
        self.kind
            .or_else(|| PRESETS.iter().find(|p| p.name == self.name).map(|p| p.kind))
    }

    /// A task named `name` with every other field at its default (for presets).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// The `[eval]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Hugging Face model directory of the base model.
    #[serde(default)]
    pub model: PathBuf,
    /// Adapters, each a column beside the base model.
    #[serde(default)]
    pub adapters: Vec<AdapterSpec>,
    /// More base models, each with its adapters (columns after `model`'s).
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub tasks: Vec<TaskConfig>,
    /// Rows per forward pass / prompts per generation batch. Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// First N records of each task. Default: all.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub dtype: FloatDtype,
    /// Apply the chat template to multiple-choice and generation prompts. Default false.
    #[serde(default)]
    pub chat: bool,
    /// Chat template for `chat` prompts and chat examples of perplexity data. Default `model`.
    #[serde(default)]
    pub template: TemplateSource,
    /// Perplexity over every token instead of the trained ones. Default false.
    #[serde(default)]
    pub all_tokens: bool,
    /// Longest row in tokens (also capped by the model's `max_position_embeddings`). Default 2048.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Output directory for eval.json, eval.md and plots.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Training run directory with `metrics.jsonl` to plot.
    #[serde(default)]
    pub run: Option<PathBuf>,
}

fn default_batch_size() -> usize {
    8
}

fn default_max_seq_len() -> usize {
    2048
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            adapters: Vec::new(),
            models: Vec::new(),
            tasks: Vec::new(),
            batch_size: default_batch_size(),
            limit: None,
            device: DeviceSpec::default(),
            dtype: FloatDtype::default(),
            chat: false,
            template: TemplateSource::default(),
            all_tokens: false,
            max_seq_len: default_max_seq_len(),
            out: None,
            run: None,
        }
    }
}

/// A task with every setting resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub kind: TaskKind,
    pub path: PathBuf,
    /// Records evaluated at most (None: all).
    pub limit: Option<usize>,
    /// Prompt template (multiple choice and generation).
    pub prompt: String,
    /// Continuation template (multiple choice).
    pub choice_format: String,
    pub chat: bool,
    /// Perplexity: every token counts, not only the trained ones.
    pub all_tokens: bool,
    pub fewshot: usize,
    pub fewshot_path: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
}

/// A preset: defaults for a well-known data set.
struct Preset {
    name: &'static str,
    kind: TaskKind,
    path: &'static str,
    prompt: &'static str,
    choice_format: &'static str,
    stop: &'static [&'static str],
    max_new_tokens: usize,
    fewshot_path: Option<&'static str>,
}

/// Presets, with paths relative to the working directory (the repository root).
const PRESETS: [Preset; 2] = [
    Preset {
        name: "openbookqa",
        kind: TaskKind::MultipleChoice,
        path: "datasets/eval/openbookqa_test.jsonl",
        prompt: "Question: {question}\nAnswer:",
        choice_format: " {choice}",
        stop: &[],
        max_new_tokens: 0,
        fewshot_path: None,
    },
    Preset {
        name: "gsm8k",
        kind: TaskKind::Generation,
        path: "datasets/eval/gsm8k_test.jsonl",
        prompt: "Question: {question}\nAnswer:",
        choice_format: "",
        stop: &["Question:", "\n\n"],
        max_new_tokens: 256,
        fewshot_path: Some("datasets/gsm8k_train.jsonl"),
    },
];

/// Names of the presets.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// Default prompt of a kind without a preset.
const DEFAULT_PROMPT: &str = "Question: {question}\nAnswer:";
/// Default continuation of multiple-choice tasks without a preset.
const DEFAULT_CHOICE: &str = " {choice}";
/// Default continuation in chat mode (the assistant turn starts right after the template).
const DEFAULT_CHAT_CHOICE: &str = "{choice}";
/// Default generation length without a preset.
const DEFAULT_MAX_NEW_TOKENS: usize = 128;
/// Default stop strings without a preset.
const DEFAULT_STOP: [&str; 1] = ["\n\n"];

/// The settings of one evaluation, validated, with resolved tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPlan {
    /// Base models in column order (`model` as `base` first), each with its adapters.
    pub models: Vec<ModelSpec>,
    pub tasks: Vec<TaskSpec>,
    pub batch_size: usize,
    pub limit: Option<usize>,
    pub device: DeviceSpec,
    pub dtype: FloatDtype,
    pub template: TemplateSource,
    pub max_seq_len: usize,
    pub out: Option<PathBuf>,
    pub run: Option<PathBuf>,
}

impl EvalPlan {
    /// Column names: each base model, then each of its adapters.
    pub fn columns(&self) -> Vec<String> {
        self.models
            .iter()
            .flat_map(|m| {
                std::iter::once(m.name.clone()).chain(m.adapters.iter().map(|a| a.name.clone()))
            })
            .collect()
    }
}

fn require_dir(path: &Path, what: &'static str) -> Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(EvalError::MissingPath {
            path: path.to_path_buf(),
            what,
        })
    }
}

fn require_exists(path: &Path, what: &'static str) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(EvalError::MissingPath {
            path: path.to_path_buf(),
            what,
        })
    }
}

fn require_file(path: &Path, what: &'static str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(EvalError::MissingPath {
            path: path.to_path_buf(),
            what,
        })
    }
}

impl EvalConfig {
    /// Parses the `[eval]` section of a TOML document (a document without one is read as the
    /// section itself). Errors name the key at fault.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        let value: toml::Value = toml::from_str(text).map_err(|e| EvalError::Config {
            key: origin.display().to_string(),
            message: e.to_string(),
        })?;
        let section = match value.get("eval") {
            Some(section) => section.clone(),
            None => value,
        };
        section
            .try_into()
            .map_err(|e: toml::de::Error| EvalError::Config {
                key: format!("{} [eval]", origin.display()),
                message: e.to_string(),
            })
    }

    /// Reads a TOML file (see [`EvalConfig::from_toml_str`]).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Validates every setting, checks that files exist, and fills in task defaults.
    pub fn resolve(&self) -> Result<EvalPlan> {
        let mut models = Vec::with_capacity(1 + self.models.len());
        if !self.model.as_os_str().is_empty() {
            models.push(ModelSpec {
                name: BASE_COLUMN.to_string(),
                path: self.model.clone(),
                adapters: self.adapters.clone(),
            });
        } else if !self.adapters.is_empty() {
            return Err(EvalError::config(
                "adapters",
                "given without `model`: the adapters of a model in `models` go in its own \
                 `adapters` list",
            ));
        }
        models.extend(self.models.iter().cloned());
        if models.is_empty() {
            return Err(EvalError::config(
                "model",
                "required: a Hugging Face model directory (or a `models` list)",
            ));
        }
        let from_model = !self.model.as_os_str().is_empty();
        let mut names = HashSet::new();
        for (i, spec) in models.iter_mut().enumerate() {
            let key = if i == 0 && from_model {
                "model".to_string()
            } else {
                format!("models.{}", spec.name)
            };
            if spec.name.trim().is_empty() {
                return Err(EvalError::config("models.name", "must not be empty"));
            }
            if !names.insert(spec.name.clone()) {
                return Err(EvalError::config(
                    key,
                    format!(
                        "the column name `{}` is used twice (`{BASE_COLUMN}` is `model`'s column)",
                        spec.name
                    ),
                ));
            }
            require_exists(&spec.path, "a base model directory")?;
            // A file of the model directory (`dir/model.safetensors`) stands for the directory.
            spec.path = hone_model::loader::resolve_model_dir(&spec.path)?;
            for adapter in &spec.adapters {
                if !names.insert(adapter.name.clone()) {
                    return Err(EvalError::config(
                        format!("{key}.adapters"),
                        format!(
                            "the column name `{}` is used twice (`{BASE_COLUMN}` is `model`'s \
                             column)",
                            adapter.name
                        ),
                    ));
                }
                require_dir(&adapter.path, "an adapter directory")?;
            }
        }
        if self.batch_size == 0 {
            return Err(EvalError::config(
                "batch_size",
                "must be at least 1, found 0",
            ));
        }
        if self.limit == Some(0) {
            return Err(EvalError::config(
                "limit",
                "must be at least 1 (leave it out for all records)",
            ));
        }
        if self.max_seq_len < 2 {
            return Err(EvalError::config(
                "max_seq_len",
                format!("must be at least 2, found {}", self.max_seq_len),
            ));
        }
        if self.tasks.is_empty() {
            return Err(EvalError::config(
                "tasks",
                format!(
                    "no task given: name a preset ({}) or a task with `kind` and `path`",
                    preset_names().join(", ")
                ),
            ));
        }
        let mut task_names = HashSet::new();
        let mut tasks = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            if !task_names.insert(task.name.clone()) {
                return Err(EvalError::config(
                    "tasks",
                    format!("the task name `{}` is used twice", task.name),
                ));
            }
            tasks.push(self.resolve_task(task)?);
        }
        Ok(EvalPlan {
            models,
            tasks,
            batch_size: self.batch_size,
            limit: self.limit,
            device: self.device,
            dtype: self.dtype,
            template: self.template.clone(),
            max_seq_len: self.max_seq_len,
            out: self.out.clone(),
            run: self.run.clone(),
        })
    }

    fn resolve_task(&self, task: &TaskConfig) -> Result<TaskSpec> {
        let key = |field: &str| format!("tasks.{}.{field}", task.name);
        if task.name.trim().is_empty() {
            return Err(EvalError::config("tasks.name", "must not be empty"));
        }
        let preset = PRESETS.iter().find(|p| p.name == task.name);
        let kind = match (task.kind, preset) {
            (Some(kind), _) => kind,
            (None, Some(p)) => p.kind,
            (None, None) => {
                return Err(EvalError::config(
                    key("kind"),
                    format!(
                        "required for a task that is not a preset ({}): perplexity, \
                         multiple_choice or generation",
                        preset_names().join(", ")
                    ),
                ))
            }
        };
        // A preset's defaults apply only to its own kind.
        let preset = preset.filter(|p| p.kind == kind);
        let path = match (&task.path, preset) {
            (Some(path), _) => path.clone(),
            (None, Some(p)) => PathBuf::from(p.path),
            (None, None) => return Err(EvalError::config(key("path"), "required: the data file")),
        };
        require_file(&path, "a task's data file")?;
        let chat = task.chat.unwrap_or(self.chat);
        let prompt = task
            .prompt
            .clone()
            .unwrap_or_else(|| preset.map_or(DEFAULT_PROMPT, |p| p.prompt).to_string());
        let choice_format = task.choice_format.clone().unwrap_or_else(|| {
            if chat {
                DEFAULT_CHAT_CHOICE.to_string()
            } else {
                preset
                    .map_or(DEFAULT_CHOICE, |p| p.choice_format)
                    .to_string()
            }
        });
        let fewshot = task.fewshot.unwrap_or(0);
        let fewshot_path = task
            .fewshot_path
            .clone()
            .or_else(|| preset.and_then(|p| p.fewshot_path).map(PathBuf::from));
        let max_new_tokens = task.max_new_tokens.unwrap_or_else(|| {
            preset
                .map(|p| p.max_new_tokens)
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_MAX_NEW_TOKENS)
        });
        let stop = task.stop.clone().unwrap_or_else(|| {
            let stop: &[&str] = preset.map_or(&DEFAULT_STOP, |p| p.stop);
            stop.iter().map(|s| s.to_string()).collect()
        });
        let limit = task.limit.or(self.limit);
        if limit == Some(0) {
            return Err(EvalError::config(key("limit"), "must be at least 1"));
        }

        let unused = |field: &str, set: bool| -> Result<()> {
            if set {
                Err(EvalError::config(
                    key(field),
                    format!("is not used by {kind} tasks"),
                ))
            } else {
                Ok(())
            }
        };
        match kind {
            TaskKind::Perplexity => {
                unused("prompt", task.prompt.is_some())?;
                unused("choice_format", task.choice_format.is_some())?;
                unused("fewshot", task.fewshot.is_some())?;
                unused("max_new_tokens", task.max_new_tokens.is_some())?;
                unused("stop", task.stop.is_some())?;
                unused("chat", task.chat.is_some())?;
            }
            TaskKind::MultipleChoice => {
                PromptTemplate::parse(&prompt, &[Field::Question, Field::Choices])?;
                PromptTemplate::parse(&choice_format, &[Field::Choice, Field::Label])?;
                unused("fewshot", task.fewshot.is_some())?;
                unused("max_new_tokens", task.max_new_tokens.is_some())?;
                unused("stop", task.stop.is_some())?;
            }
            TaskKind::Generation => {
                PromptTemplate::parse(&prompt, &[Field::Question])?;
                unused("choice_format", task.choice_format.is_some())?;
                if max_new_tokens == 0 {
                    return Err(EvalError::config(
                        key("max_new_tokens"),
                        "must be at least 1",
                    ));
                }
                if fewshot > 0 {
                    match &fewshot_path {
                        Some(p) => require_file(p, "the few-shot examples file")?,
                        None => {
                            return Err(EvalError::config(
                                key("fewshot_path"),
                                "required when fewshot > 0: a {question, answer} JSONL file",
                            ))
                        }
                    }
                }
            }
        }
        Ok(TaskSpec {
            name: task.name.clone(),
            kind,
            path,
            limit,
            prompt: if kind == TaskKind::Perplexity {
                String::new()
            } else {
                prompt
            },
            choice_format: if kind == TaskKind::MultipleChoice {
                choice_format
            } else {
                String::new()
            },
            chat: chat && kind != TaskKind::Perplexity,
            all_tokens: self.all_tokens,
            fewshot,
            fewshot_path: if fewshot > 0 { fewshot_path } else { None },
            max_new_tokens: if kind == TaskKind::Generation {
                max_new_tokens
            } else {
                0
            },
            stop: if kind == TaskKind::Generation {
                stop
            } else {
                Vec::new()
            },
        })
    }
}
