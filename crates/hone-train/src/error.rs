//! Typed errors of the training crate. Each variant names the file, key, checkpoint or step at
//! fault and says what was expected, so that a message can be acted on without the code.

use std::path::PathBuf;

/// Errors raised while configuring, running or resuming a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value that does not parse or is out of range. `source` is the config file (or
    /// `--set KEY=VALUE` when the value came from the command line), `key` the dotted key.
    #[error("{source_name}: {key}: {message}")]
    Config {
        source_name: String,
        key: String,
        message: String,
    },

    /// Quality gates that failed (`[gates] fail_if`, `hone train --fail-if`), each with the
    /// value it saw.
    #[error("quality gates failed: {}", failed.join("; "))]
    GateFailed { failed: Vec<String> },

    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Model(#[from] hone_model::ModelError),

    #[error("data: {0}")]
    Data(#[from] hone_data::DataError),

    #[error("tokenization: {0}")]
    Tokenize(#[from] hone_tokenize::TokenizeError),

    #[error("chat template: {0}")]
    Template(#[from] hone_tokenize::TemplateError),

    /// A token id the model cannot embed, a prompt or step without tokens.
    #[error("{0}")]
    Dataset(String),

    /// Curation or tokenization left nothing to train on: the data was rejected.
    #[error("{0}")]
    NoTrainingData(String),

    /// The run was asked to stop (`RunOptions::stop`, e.g. on SIGINT/SIGTERM) and did at a step
    /// boundary; `checkpoint` names the checkpoint it can resume from, if any.
    #[error(
        "training interrupted at step {step}{}",
        match checkpoint {
            Some(dir) => format!("; resume from {} with --resume", dir.display()),
            None => String::from(" (no checkpoint written)"),
        }
    )]
    Interrupted {
        step: usize,
        checkpoint: Option<PathBuf>,
    },

    /// A checkpoint directory that cannot be read back.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// The run directory holds another run, or cannot be resumed.
    #[error("run directory {path}: {message}")]
    RunDir { path: PathBuf, message: String },

    /// Too many consecutive steps with a non-finite loss or gradient.
    #[error(
        "training stopped at step {step}: {count} steps in a row had a non-finite loss or \
         gradient (train.max_bad_steps = {count}); {last_good}"
    )]
    Diverged {
        step: usize,
        count: usize,
        last_good: String,
    },

    /// Data-parallel training over several devices failed: a peer's error or panic, a
    /// collective that failed or timed out. The message names the peer and the step.
    #[error("data-parallel training: {message}")]
    Parallel { message: String },

    /// A path of the config (`model.path`, `data.inputs`) that does not exist. Relative paths
    /// resolve against the working directory, which the message names.
    #[error(
        "{key}: {what} {path} (relative paths resolve against the working directory {cwd}) \
         does not exist"
    )]
    MissingPath {
        key: String,
        what: String,
        path: PathBuf,
        cwd: PathBuf,
    },

    /// The run directory is locked by another `hone train` (its pid, when the lock file names
    /// it).
    #[error(
        "run directory {path} is in use by another hone train ({holder}; lock file {lock}): \
         wait for it to finish or choose another output.dir"
    )]
    RunLocked {
        path: PathBuf,
        lock: PathBuf,
        /// `pid N`, or `pid unknown`.
        holder: String,
    },

    /// A checkpoint whose adapter was trained with other `[lora]` settings than the config's,
    /// compared after resolving `target_modules` against the model. Each difference reads
    /// `lora.KEY: checkpoint X, config Y`.
    #[error("checkpoint {path}: its adapter differs from the config's [lora]: {}", differences.join("; "))]
    AdapterMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },

    /// `tokenize.max_seq_len` beyond the positions the model was trained on.
    #[error(
        "tokenize.max_seq_len = {max_seq_len} exceeds the model's context \
         (max_position_embeddings = {max_position_embeddings} in {model_config}): the model never \
         saw positions beyond it; set tokenize.max_seq_len to at most {max_position_embeddings}"
    )]
    ContextTooLong {
        max_seq_len: usize,
        max_position_embeddings: usize,
        model_config: PathBuf,
    },

    /// The run's estimated memory exceeds what the machine has available.
    #[error(
        "the run needs an estimated {needed_mb} MB ({detail}), more than the {available_mb} MB \
         available (MemAvailable in /proc/meminfo): lower train.micro_batch_size or \
         tokenize.max_seq_len, or set train.gradient_checkpointing = true"
    )]
    OutOfMemory {
        needed_mb: u64,
        available_mb: u64,
        detail: String,
    },

    /// A tensor could not be read back to the host.
    #[error("reading {what} from the device: {message}")]
    Tensor { what: String, message: String },
}

/// Result alias of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        source: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        TrainError::Config {
            source_name: source.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<hone_io::Error> for TrainError {
    fn from(e: hone_io::Error) -> Self {
        TrainError::io(e.path, e.source)
    }
}
