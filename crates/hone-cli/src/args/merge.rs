//! `hone merge`'s arguments, and the adapter selection it shares with `hone adapter combine`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use hone_merge::{Combination, MajoritySign, Method};
use hone_model::FloatDtype;

/// How adapters are combined: PEFT's `add_weighted_adapter` combination types.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodArg {
    /// Weighted sum of the A matrices and of the B matrices (weights √(w·scale)); equal ranks.
    /// With several adapters B'A' has cross terms: it is not the sum of their deltas.
    Linear,
    /// Concatenated ranks: exactly Σ w·scale·B·A, the weighted sum of the adapters' deltas.
    Cat,
    /// TIES: keep the --density largest values, elect signs, average the agreeing ones.
    Ties,
    /// DARE: keep values at random with probability --density (rescaled), then sum.
    #[value(name = "dare_linear", alias = "dare-linear")]
    DareLinear,
    /// DARE pruning, then TIES' sign election and averaging.
    #[value(name = "dare_ties", alias = "dare-ties")]
    DareTies,
    /// Keep the --density largest values, then sum.
    #[value(name = "magnitude_prune", alias = "magnitude-prune")]
    MagnitudePrune,
    /// Weighted sum of the deltas s·B·A, then a truncated SVD to --svd-rank; any ranks.
    Svd,
    /// TIES on the deltas, then a truncated SVD.
    #[value(name = "ties_svd", alias = "ties-svd")]
    TiesSvd,
    /// DARE on the deltas, then a truncated SVD.
    #[value(name = "dare_linear_svd", alias = "dare-linear-svd")]
    DareLinearSvd,
    /// DARE + TIES on the deltas, then a truncated SVD.
    #[value(name = "dare_ties_svd", alias = "dare-ties-svd")]
    DareTiesSvd,
    /// Magnitude pruning of the deltas, then a truncated SVD.
    #[value(name = "magnitude_prune_svd", alias = "magnitude-prune-svd")]
    MagnitudePruneSvd,
}

/// TIES' sign election.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MajoritySignArg {
    /// Sign of the sum of the values.
    Total,
    /// Sign held by more adapters.
    Frequency,
}

/// Which adapters, and how to combine them.
#[derive(Args, Debug, Clone)]
pub struct AdapterSelection {
    /// PEFT LoRA adapter directory; repeat for several (a single adapter is merged as is).
    /// `hone merge` and `hone adapter combine` need at least one.
    #[arg(long = "adapter", value_name = "DIR")]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated, e.g. 0.7,0.3 (default: 1 each); negative
    /// weights subtract.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        value_name = "W1,W2,..."
    )]
    pub weights: Vec<f64>,
    /// How several adapters are combined (PEFT's combination_type).
    #[arg(long, value_enum, default_value = "linear")]
    pub method: MethodArg,
    /// Fraction of values kept by ties, dare_linear, dare_ties and magnitude_prune (and their
    /// _svd variants), in (0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// Rank of the result of the *_svd methods (default: the largest adapter rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the *_svd factors to ±(this quantile of their entries), in [0, 1].
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// Sign election of ties and dare_ties.
    #[arg(long, value_enum, default_value = "total")]
    pub majority_sign: MajoritySignArg,
    /// Seed of DARE's random pruning.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl AdapterSelection {
    /// The library's combination (validated there, against the adapters).
    pub fn combination(&self) -> Combination {
        Combination {
            method: match self.method {
                MethodArg::Linear => Method::Linear,
                MethodArg::Cat => Method::Cat,
                MethodArg::Ties => Method::Ties,
                MethodArg::DareLinear => Method::DareLinear,
                MethodArg::DareTies => Method::DareTies,
                MethodArg::MagnitudePrune => Method::MagnitudePrune,
                MethodArg::Svd => Method::Svd,
                MethodArg::TiesSvd => Method::TiesSvd,
                MethodArg::DareLinearSvd => Method::DareLinearSvd,
                MethodArg::DareTiesSvd => Method::DareTiesSvd,
                MethodArg::MagnitudePruneSvd => Method::MagnitudePruneSvd,
            },
            weights: (!self.weights.is_empty()).then(|| self.weights.clone()),
            density: self.density,
            svd: hone_merge::SvdOptions {
                rank: self.svd_rank,
                clamp: self.svd_clamp,
            },
            majority_sign: match self.majority_sign {
                MajoritySignArg::Total => MajoritySign::Total,
                MajoritySignArg::Frequency => MajoritySign::Frequency,
            },
            seed: self.seed,
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    hone_merge::parse_size(text).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model: a Hugging Face model directory, or a GGUF file (its tensors decoded to f32; the
    /// config, tokenizer and generation config written from its metadata).
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: PathBuf,
    #[command(flatten)]
    pub selection: AdapterSelection,
    /// dtype of the written weights (default: the base's config.json dtype, else f32; f32 for a
    /// GGUF base).
    #[arg(long, value_enum)]
    pub dtype: Option<FloatDtype>,
    /// Largest safetensors shard (bytes of tensor data; KB/MB/GB are powers of 1000, KiB/MiB/GiB
    /// of 1024). Above it the weights are split and listed by model.safetensors.index.json.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Output directory (written completely or not at all).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
}

fn parse_export_type(text: &str) -> Result<hone_merge::ExportType, String> {
    hone_merge::ExportType::parse(text).ok_or_else(|| {
        format!(
            "unknown type {text:?}; expected one of {}",
            hone_merge::ExportType::ALL
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// `hone export ...`: formats other programs run.
#[derive(clap::Subcommand, Debug)]
pub enum ExportCommand {
    /// One GGUF file for llama.cpp, Ollama and LM Studio: the base with the adapters merged in,
    /// its tokenizer, chat template and stop tokens; an Ollama Modelfile beside it; a JSON
    /// summary line on stdout.
    Gguf(ExportGgufArgs),
}

#[derive(Args, Debug)]
pub struct ExportGgufArgs {
    /// Base model: a Hugging Face model directory or a GGUF file.
    #[arg(
        long,
        value_name = "DIR|FILE.gguf",
        required_unless_present = "run",
        conflicts_with = "run"
    )]
    pub model: Option<PathBuf>,
    /// A training run directory: its base model (`model.path` of its config.toml), its final
    /// adapter (RUN/adapter) and the chat template it was trained with, whose end-of-turn token
    /// becomes the file's end-of-turn id.
    #[arg(long, value_name = "RUN")]
    pub run: Option<PathBuf>,
    #[command(flatten)]
    pub selection: AdapterSelection,
    /// Storage type, as llama-quantize names it: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m,
    /// q6_k (1-D tensors stay f32; the quantized types choose per tensor as llama-quantize does).
    #[arg(long = "type", value_name = "TYPE", default_value = "f16", value_parser = parse_export_type)]
    pub ty: hone_merge::ExportType,
    /// The GGUF file to write (its Ollama Modelfile goes beside it as NAME.Modelfile).
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// general.name of the file (default: the base's name).
    #[arg(long)]
    pub name: Option<String>,
    /// tokenizer.ggml.pre for a byte-level tokenizer whose split hone does not recognise (the
    /// name llama.cpp gives it, e.g. llama-bpe, qwen2, smollm).
    #[arg(long, value_name = "NAME")]
    pub tokenizer_pre: Option<String>,
    /// Write the adapter(s) alone in llama.cpp's LoRA format (for `llama-cli --lora` and
    /// Ollama's ADAPTER line) instead of the merged model; --type f32, f16 or q8_0.
    #[arg(long)]
    pub lora_only: bool,
}
