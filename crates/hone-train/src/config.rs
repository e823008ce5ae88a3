//! The run config: one TOML file with the tables `[model]`, `[data]` (hone-data's
//! [`DataConfig`]), `[tokenize]` (hone-tokenize's [`TokenizeConfig`]), `[lora]`, `[train]`,
//! `[distributed]` (multi-node only), `[eval]` and `[output]`, plus `--set table.key=value` overrides from the command line.
//!
//! ```toml
//! [model]
//! path = "checkpoints/base/stories260k"
//! device = "cpu"                 # cpu | cuda | cuda:N
//!
//! [data]
//! inputs = ["datasets/quickstart/train.jsonl"]
//!
//! [tokenize]
//! template = "alpaca"
//! max_seq_len = 256
//!
//! [lora]
//! r = 8
//! alpha = 16
//! target_modules = ["all-linear"]
//!
//! [train]
//! lr = 3e-3
//! schedule = "cosine"
//! warmup_ratio = 0.05
//! epochs = 2
//! ```
//!
//! Parsing follows "parse, then validate": every table denies unknown keys, and a wrong type
//! or a bad value is a [`TrainError::Config`] naming the file (or the `--set` that supplied
//! it) and the dotted key. [`RunConfig::to_toml`] writes the resolved config (every default
//! filled in) that a run saves beside its outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_data::DataConfig;
use hone_model::lora::{LoraSettings, TargetModules};
use hone_model::{DeviceSpec, FloatDtype, Kernels};
use hone_tokenize::TokenizeConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::schedule::ScheduleKind;

/// Where run directories go when `[output] dir` is not given: `<RUNS_DIR>/<name>/`.
pub const RUNS_DIR: &str = "checkpoints/runs";

/// `[model]`: the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a GGUF
    /// file (configuration, tokenizer and chat template from its metadata; on the CPU in f32
    /// its quantized projections stay quantized and frozen under f32 adapters, QLoRA-style).
    pub path: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`. Default `cpu`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Dtype of the base weights: `f32` (default) or `bf16` (adapters, their gradients and the
    /// optimizer state stay f32; the adapters compute in f32 as in PEFT's mixed precision).
    #[serde(default)]
    pub dtype: FloatDtype,
    /// `fused` (default: the backend's fused kernels where it has them, the CPU's) or
    /// `composed` (burn's composed operations everywhere, as CUDA runs them; slower on the CPU,
    /// for comparisons). Left out of the resolved config when it is the default.
    #[serde(default, skip_serializing_if = "is_fused")]
    pub kernels: Kernels,
    /// Decode a GGUF base model's quantized projection weights to f32 at load (default false:
    /// they stay in their block formats on the CPU in f32). Left out of the resolved config when
    /// false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dequantize: bool,
}

fn is_fused(kernels: &Kernels) -> bool {
    *kernels == Kernels::Fused
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
}

/// `[lora]`: the adapters, as PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank. Default 8.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator (`alpha / r`). Default 16.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapters' input while training. Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Scale `alpha / sqrt(r)` instead of `alpha / r`. Default false.
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names (`["q_proj", "v_proj"]`, the default), `["all-linear"]`, or a regular
    /// expression over full module names.
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Per-module rank overrides (PEFT's `rank_pattern`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (PEFT's `alpha_pattern`).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only these layer indices get adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            use_rslora: false,
            target_modules: default_targets(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
        }
    }
}

impl LoraSection {
    /// The model crate's settings.
    pub fn settings(&self) -> LoraSettings {
        LoraSettings {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
        }
    }
}

/// `[train]`: optimisation and the rhythm of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// `constant`, `linear` or `cosine` (each after a linear warmup). Default `linear`.
    pub schedule: ScheduleKind,
    /// Warmup steps (exclusive with `warmup_ratio`). Default 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the total steps, rounded up (transformers' rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Passes over the training rows. Default 1. Ignored when `max_steps` is set.
    pub epochs: usize,
    /// Optimizer steps to run (overrides `epochs`; the data cycles as needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Rows per forward/backward pass. Default 4.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (torch's `clip_grad_norm_`); 0 turns it off.
    /// Default 1.0.
    pub max_grad_norm: f64,
    /// Decoupled weight decay (AdamW). Default 0.
    pub weight_decay: f64,
    /// AdamW's (beta1, beta2). Default [0.9, 0.999].
    pub betas: [f64; 2],
    /// AdamW's epsilon. Default 1e-8.
    pub eps: f64,
    /// Seed of adapter init, data order and dropout. Default 42.
    pub seed: u64,
    /// Write a checkpoint every N steps (0: only the final adapter). Default 0.
    pub save_every: usize,
    /// Checkpoints kept (the oldest are removed; 0 keeps all). Default 2.
    pub keep_last: usize,
    /// Validation loss every N steps (0: only before and after training). Default 0.
    pub eval_every: usize,
    /// Metrics every N steps. Default 10.
    pub log_every: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient. Default 5.
    pub max_bad_steps: usize,
    /// Recompute each decoder layer's activations in the backward pass (per-layer gradient
    /// checkpointing): less memory, about a third more compute. Refused with LoRA dropout.
    /// Default false.
    pub gradient_checkpointing: bool,
    /// Data-parallel training over these devices (`["cpu", "cpu"]`, `["cuda:0", "cuda:1"]`),
    /// one peer each, all on one backend. Each step then reads `micro_batch_size *
    /// grad_accum * len(devices)` rows; peer k takes the k-th contiguous block of the step's
    /// micro-batches. Training, evaluation and samples run on the first device, and
    /// `model.device` is not used. Default: empty, train on `model.device` alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
    /// With several devices: the longest a peer waits for the others at a step's all-reduce
    /// before the run stops with an error naming the missing peers. Default 600.
    pub collective_timeout_secs: u64,
}

impl TrainSection {
    /// The optimizer's settings: `betas`, `eps`, `weight_decay`.
    pub fn adamw(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            schedule: ScheduleKind::Linear,
            warmup_steps: None,
            warmup_ratio: None,
            epochs: 1,
            max_steps: None,
            micro_batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            seed: 42,
            save_every: 0,
            keep_last: 2,
            eval_every: 0,
            log_every: 10,
            max_bad_steps: 5,
            gradient_checkpointing: false,
            devices: Vec::new(),
            collective_timeout_secs: 600,
        }
    }
}

/// `[distributed]`: multi-node training, several machines (processes) each running its
/// `train.devices` peers, gradients exchanged through hone's orchestrator
/// (`hone train-orchestrator --port P`, see [`crate::parallel`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedSection {
    /// The number of nodes (machines, processes), each with the same number of
    /// `train.devices`. Global peer rank = `node_rank * len(devices) + local rank`; a step
    /// reads `micro_batch_size * grad_accum * len(devices) * nodes` rows. Default 1.
    pub nodes: usize,
    /// With `nodes > 1`: this node's rank, `0..nodes`. Node 0 alone evaluates, logs and
    /// writes checkpoints, the adapter and samples. Default 0.
    pub node_rank: usize,
    /// With `nodes > 1`: the orchestrator, `tcp://host:port` (`hone train-orchestrator
    /// --port P`), the same on every node. `ws://host:port`, as written for burn's websocket
    /// orchestrator that hone used before, means the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestrator: Option<String>,
    /// No longer used (the nodes only talk to the orchestrator); accepted with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_host: Option<String>,
    /// No longer used (the nodes only talk to the orchestrator); accepted with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_port: Option<u16>,
}

impl Default for DistributedSection {
    fn default() -> Self {
        Self {
            nodes: 1,
            node_rank: 0,
            orchestrator: None,
            node_host: None,
            data_port: None,
        }
    }
}

/// The `[train]` keys that moved to `[distributed]`, and what to write instead.
const MOVED_KEYS: [(&str, &str); 5] = [
    (
        "nodes",
        "moved to the [distributed] table: set distributed.nodes",
    ),
    (
        "node_rank",
        "moved to the [distributed] table: set distributed.node_rank",
    ),
    (
        "node_host",
        "no longer used: the nodes exchange gradients through distributed.orchestrator alone",
    ),
    (
        "orchestrators",
        "replaced by distributed.orchestrator: one address tcp://host:port \
         (`hone train-orchestrator --port P`)",
    ),
    (
        "data_ports",
        "no longer used: the nodes exchange gradients through distributed.orchestrator alone",
    ),
];

impl DistributedSection {
    /// One node alone (no `[distributed]` table needed).
    fn is_single(&self) -> bool {
        *self == Self::default()
    }

    /// The orchestrator's `(host, port)` when it is of the form `tcp://host:port` (or
    /// `ws://host:port`).
    fn orchestrator_address(&self) -> Option<(&str, u16)> {
        let address = self.orchestrator.as_deref()?;
        let (host, port) = (address.strip_prefix("tcp://"))
            .or_else(|| address.strip_prefix("ws://"))?
            .rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?;
        (!host.is_empty() && !host.contains('/')).then_some((host, port))
    }

    /// The error is `(dotted key, message)`.
    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.nodes == 0 {
            return Err(("distributed.nodes", "must be at least 1".into()));
        }
        if self.nodes == 1 {
            let set = [
                ("distributed.node_rank", self.node_rank != 0),
                ("distributed.orchestrator", self.orchestrator.is_some()),
            ];
            return match set.iter().find(|(_, on)| *on) {
                Some((key, _)) => Err((
                    key,
                    "is only for multi-node runs (distributed.nodes > 1)".into(),
                )),
                None => Ok(()),
            };
        }
        if self.node_rank >= self.nodes {
            return Err((
                "distributed.node_rank",
                format!("must be in 0..{}, found {}", self.nodes, self.node_rank),
            ));
        }
        match self.orchestrator_address() {
            Some((_, port)) if port != 0 => Ok(()),
            _ => Err((
                "distributed.orchestrator",
                format!(
                    "needs the orchestrator's address tcp://host:port (the host and port of \
                     `hone train-orchestrator --port P`), found {:?}",
                    self.orchestrator
                ),
            )),
        }
    }

    /// A warning naming the keys that multi-node training no longer uses, when set.
    pub fn obsolete_keys_warning(&self) -> Option<String> {
        let set: Vec<&str> = [
            ("distributed.node_host", self.node_host.is_some()),
            ("distributed.data_port", self.data_port.is_some()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(key, _)| *key)
        .collect();
        (!set.is_empty()).then(|| {
            format!(
                "{} no longer used: the nodes exchange gradients through \
                 distributed.orchestrator alone (remove the key)",
                if set.len() == 1 {
                    format!("{} is", set[0])
                } else {
                    format!("{} are", set.join(" and "))
                }
            )
        })
    }
}

/// `[eval]`: validation and sample generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Rows per validation forward pass (default: `train.micro_batch_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Use at most this many validation batches (default: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batches: Option<usize>,
    /// Measure the validation loss before the first step. Default true.
    pub at_start: bool,
    /// User messages to answer with and without the adapter when training ends (rendered
    /// with the chat template and its generation prompt).
    pub prompts: Vec<String>,
    /// Tokens generated per prompt. Default 128.
    pub max_new_tokens: usize,
    /// Sampling temperature of those generations (0: greedy). Default 0.
    pub temperature: f32,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            micro_batch_size: None,
            max_batches: None,
            at_start: true,
            prompts: Vec::new(),
            max_new_tokens: 128,
            temperature: 0.0,
        }
    }
}

/// `[output]`: where the run directory is.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Run directory (default `checkpoints/runs/<name>/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Run name (default: the config file's stem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A whole run config. Relative paths are relative to the current directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub tokenize: TokenizeConfig,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default, skip_serializing_if = "DistributedSection::is_single")]
    pub distributed: DistributedSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub output: OutputSection,
    /// `[gates]`: conditions on the final metrics that fail the run ([`crate::gates`]).
    #[serde(default, skip_serializing_if = "crate::gates::GatesSection::is_empty")]
    pub gates: crate::gates::GatesSection,
}

/// Parses the value of `--set key=value` as TOML, or as a plain string when it is not TOML
/// (`--set model.path=dir/x` needs no quotes).
fn parse_set_value(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.into())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies one `table.key=value` override to `root`.
fn apply_set(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let source = format!("--set {assignment}");
    let Some((key, value)) = assignment.split_once('=') else {
        return Err(TrainError::config(
            source,
            assignment,
            "expected KEY=VALUE, e.g. train.lr=1e-4",
        ));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(TrainError::config(
            source,
            key,
            "expected a dotted key such as train.lr",
        ));
    }
    let mut table = root;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                let prefix = parts[..=i].join(".");
                return Err(TrainError::config(
                    source,
                    key,
                    format!("`{prefix}` is a value, not a table"),
                ));
            }
        };
    }
    table.insert(
        parts[parts.len() - 1].to_string(),
        parse_set_value(value.trim()),
    );
    Ok(())
}

/// Which source supplied `key` (the innermost `--set` that covers it, else the file).
fn source_of(key: &str, file: &str, sets: &[String]) -> String {
    sets.iter()
        .rev()
        .find(|s| {
            let k = s.split_once('=').map_or(s.as_str(), |(k, _)| k).trim();
            key == k || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."))
        })
        .map(|s| format!("{file} (--set {s})"))
        .unwrap_or_else(|| file.to_string())
}

/// Refuses the multi-node keys of `[train]` that moved to `[distributed]`, naming the new key
/// (a config must not silently change meaning). `saved`: the single-node defaults that a run
/// directory's `config.toml` of an earlier hone holds are dropped instead.
fn moved_keys(table: &mut toml::Table, file: &str, sets: &[String], saved: bool) -> Result<()> {
    let Some(toml::Value::Table(train)) = table.get_mut("train") else {
        return Ok(());
    };
    if saved {
        for (key, default) in [("nodes", 1), ("node_rank", 0)] {
            if train.get(key) == Some(&toml::Value::Integer(default)) {
                train.remove(key);
            }
        }
    }
    match MOVED_KEYS.iter().find(|(key, _)| train.contains_key(*key)) {
        Some((key, message)) => {
            let key = format!("train.{key}");
            Err(TrainError::config(
                source_of(&key, file, sets),
                key,
                *message,
            ))
        }
        None => Ok(()),
    }
}

impl RunConfig {
    /// Reads `path`, applies `sets` (`table.key=value`), and validates. The run name defaults
    /// to the file stem and the output directory to `checkpoints/runs/<name>/`.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        Self::from_toml_str(&text, &path.display().to_string(), name, sets)
    }

    /// The `config.toml` of a run directory. Runs written before `[distributed]` existed
    /// hold `train.nodes = 1` and `train.node_rank = 0`: those defaults are dropped (any other
    /// moved key is an error as in [`RunConfig::load`]).
    pub fn load_saved(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        Self::parse(&text, &path.display().to_string(), name, &[], true)
    }

    /// As [`RunConfig::load`] for config text; `file` names it in errors.
    pub fn from_toml_str(
        text: &str,
        file: &str,
        default_name: Option<String>,
        sets: &[String],
    ) -> Result<Self> {
        Self::parse(text, file, default_name, sets, false)
    }

    /// `saved`: a run directory's `config.toml` (see [`RunConfig::load_saved`]).
    fn parse(
        text: &str,
        file: &str,
        default_name: Option<String>,
        sets: &[String],
        saved: bool,
    ) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            TrainError::config(file, "(syntax)", format!("{at}{message}"))
        })?;
        for assignment in sets {
            apply_set(&mut table, assignment)?;
        }
        moved_keys(&mut table, file, sets, saved)?;
        let mut config: RunConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().trim_end().to_string();
                TrainError::config(source_of(&key, file, sets), key, message)
            })?;
        if config.output.name.is_none() {
            config.output.name = default_name;
        }
        let name = config.output.name.clone().unwrap_or_else(|| "run".into());
        if config.output.dir.is_none() {
            config.output.dir = Some(Path::new(RUNS_DIR).join(&name));
        }
        config.validate().map_err(|(key, message)| {
            TrainError::config(source_of(&key, file, sets), key, message)
        })?;
        Ok(config)
    }

    /// The devices training runs on: `train.devices`, or `model.device` alone.
    pub fn devices(&self) -> Vec<DeviceSpec> {
        if self.train.devices.is_empty() {
            vec![self.model.device]
        } else {
            self.train.devices.clone()
        }
    }

    /// This node's place in a multi-node run (`distributed.nodes > 1`), else `None`.
    pub fn multinode(&self) -> Option<crate::parallel::MultiNode> {
        let d = &self.distributed;
        match d.orchestrator_address() {
            Some((host, port)) if d.nodes > 1 => Some(crate::parallel::MultiNode {
                nodes: d.nodes,
                node_rank: d.node_rank,
                orchestrator: format!("{host}:{port}"),
            }),
            _ => None,
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.output.dir.clone().unwrap_or_else(|| {
            Path::new(RUNS_DIR).join(self.output.name.as_deref().unwrap_or("run"))
        })
    }

    /// The resolved config as TOML (what `config.toml` in a run directory holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| TrainError::config("config", "(write)", e.to_string()))
    }

    /// Range checks; the error is `(dotted key, message)`.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let err = |key: &str, message: String| Err((key.to_string(), message));
        if let Err((i, message)) = crate::gates::parse_all(&self.gates.fail_if) {
            return err(&format!("gates.fail_if[{i}]"), message);
        }
        let t = &self.train;
        if !(t.lr.is_finite() && t.lr >= 0.0) {
            return err(
                "train.lr",
                format!("must be a finite number >= 0, found {}", t.lr),
            );
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return err(
                "train.warmup_ratio",
                "give warmup_steps or warmup_ratio, not both".into(),
            );
        }
        if let Some(r) = t.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return err(
                    "train.warmup_ratio",
                    format!("must be in [0, 1], found {r}"),
                );
            }
        }
        if t.max_steps.is_none() && t.epochs == 0 {
            return err(
                "train.epochs",
                "must be at least 1 (or set train.max_steps)".into(),
            );
        }
        if t.max_steps == Some(0) {
            return err("train.max_steps", "must be at least 1".into());
        }
        for (key, v) in [
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.log_every", t.log_every),
            ("train.max_bad_steps", t.max_bad_steps),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if let Some(other) = t
            .devices
            .iter()
            .find(|d| matches!(d, DeviceSpec::Cpu) != matches!(t.devices[0], DeviceSpec::Cpu))
        {
            return err(
                "train.devices",
                format!(
                    "mixes {} and {other}: all peers must be on one backend",
                    t.devices[0]
                ),
            );
        }
        if t.collective_timeout_secs == 0 {
            return err("train.collective_timeout_secs", "must be at least 1".into());
        }
        if let Err((key, message)) = self.distributed.validate() {
            return err(key, message);
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return err(
                "train.max_grad_norm",
                format!("must be >= 0 (0 = no clipping), found {}", t.max_grad_norm),
            );
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return err(
                "train.weight_decay",
                format!("must be >= 0, found {}", t.weight_decay),
            );
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return err(
                    "train.betas",
                    format!("beta{} must be in [0, 1), found {b}", i + 1),
                );
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return err("train.eps", format!("must be > 0, found {}", t.eps));
        }
        if t.gradient_checkpointing && self.lora.dropout > 0.0 {
            return err(
                "train.gradient_checkpointing",
                format!(
                    "needs lora.dropout = 0 (the recomputed forward pass would draw another \
                     dropout mask), found lora.dropout = {}",
                    self.lora.dropout
                ),
            );
        }
        if self.model.dtype == FloatDtype::F16 {
            return err(
                "model.dtype",
                "f16 base weights are not supported for training (f16's range overflows in \
                 activations without loss scaling); use bf16 or f32"
                    .into(),
            );
        }
        if self.eval.micro_batch_size == Some(0) {
            return err("eval.micro_batch_size", "must be at least 1".into());
        }
        if !(self.eval.temperature.is_finite() && self.eval.temperature >= 0.0) {
            return err(
                "eval.temperature",
                format!("must be >= 0, found {}", self.eval.temperature),
            );
        }
        if let Err(e) = self.lora.settings().validate() {
            return err("lora", e.to_string());
        }
        if let Err(e) = self.data.validate() {
            return err("data", e.to_string());
        }
        if let Err(e) = self.tokenize.validate() {
            return err("tokenize", e.to_string());
        }
        if let Some(name) = &self.output.name {
            if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
                return err(
                    "output.name",
                    format!("`{name}` is not a plain directory name"),
                );
            }
        }
        Ok(())
    }
}
