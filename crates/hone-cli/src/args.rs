//! Command-line arguments (raw input; each command validates and resolves them before work).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hone_model::DeviceSpec;

#[derive(Parser, Debug)]
#[command(
    name = "hone",
    version,
    about = "LoRA fine-tuning of Llama-family models: curate, tokenize, train, evaluate, merge, serve"
)]
pub struct Cli {
    /// Log debug messages (or set HONE_LOG, e.g. HONE_LOG=info).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Write the logits of integer input ids (a numerical-check hook).
    Logits(LogitsArgs),
    /// Benchmarks printing one JSON line per measurement.
    Bench(BenchArgs),
}

/// Compute dtype of the model weights.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            DTypeArg::F32 => burn::tensor::DType::F32,
            DTypeArg::Bf16 => burn::tensor::DType::BF16,
            DTypeArg::F16 => burn::tensor::DType::F16,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (empty: start from BOS alone).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens reaching this probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Penalise tokens already present (transformers' definition; 1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence ids.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// PEFT adapter directory (applied on top of the base model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// safetensors file holding an integer tensor `input_ids` [batch, seq] (I64 or I32).
    #[arg(long)]
    pub input_ids: PathBuf,
    /// Output safetensors file; receives f32 `logits` [batch, seq, vocab].
    #[arg(long)]
    pub out: PathBuf,
    /// Compare with the `logits` of this safetensors file and print one JSON line
    /// (max and mean absolute difference); fails above --tolerance.
    #[arg(long)]
    pub compare_with: Option<PathBuf>,
    /// Largest accepted max absolute difference for --compare-with.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill and decode throughput of generation with a KV cache.
    Generate(BenchGenerateArgs),
}

/// Model shapes with random weights, for benchmarks without a download.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// SmolLM-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied.
    Smol,
    /// Llama hidden 512, 8 layers, 8 heads, 8 KV heads, intermediate 1408, vocab 32000, untied.
    Small,
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model directory (or use --shape for random weights).
    #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
    pub model: Option<PathBuf>,
    /// A built-in shape with random weights.
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}
