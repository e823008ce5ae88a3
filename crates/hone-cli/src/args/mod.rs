//! Command-line arguments, all of them: every clap struct and enum of the binary is in this module
//! (the larger commands' in its submodules), and `cmd` holds only what runs them. Raw input: each
//! command validates and resolves them before work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hone_model::{DeviceSpec, FloatDtype, Kernels};

mod adapter;
mod eval;
mod merge;
mod rag;
mod serve;

pub use adapter::{AdapterCombineArgs, AdapterCommand};
pub use eval::{CompareArgs, EvalArgs, EvalCommand};
pub use merge::{ExportCommand, ExportGgufArgs, MergeArgs};
pub use rag::{
    HnswArgs, RagAddArgs, RagCommand, RagIndexArgs, RagQueryArgs, RagRemoveArgs, SearchModeArg,
};
pub use serve::{BenchServeArgs, ServeArgs};

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
    /// Log format on stderr: text, or json (one JSON object per line: `hone train`'s progress
    /// events, its summary and the final error).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How stderr's log lines are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Write the logits of integer input ids (a numerical-check hook).
    Logits(LogitsArgs),
    /// Benchmarks printing one JSON line per measurement.
    Bench(BenchArgs),
    /// Curate training data, and inspect what curation and masking did.
    #[command(subcommand)]
    Data(DataCommand),
    /// Chat templates: show exactly what a template renders.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Merge LoRA adapters into a base model and write a Hugging Face model directory.
    Merge(MergeArgs),
    /// Export for other programs: `hone export gguf` (llama.cpp, Ollama, LM Studio).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Adapter arithmetic: combine PEFT adapters into a new adapter.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Fine-tune LoRA adapters as a run config (TOML) says; writes a run directory.
    Train(TrainArgs),
    /// Run the global orchestrator of multi-node training (distributed.orchestrator) until killed.
    TrainOrchestrator(TrainOrchestratorArgs),
    /// Evaluate a base model and adapters side by side; writes eval.json and eval.md
    /// (`hone eval compare`: question answering with and without retrieval).
    #[command(args_conflicts_with_subcommands = true)]
    Eval(Box<EvalArgs>),
    /// Serve the model over an OpenAI-compatible HTTP API, with LoRA adapters per request.
    Serve(ServeArgs),
    /// Retrieval: build, change and search a document index (`index`, `add`, `remove`, `query`).
    #[command(subcommand)]
    Rag(RagCommand),
}

#[derive(Args, Debug)]
pub struct TrainOrchestratorArgs {
    /// Port to listen on (every interface).
    #[arg(long)]
    pub port: u16,
}

#[derive(Args, Debug)]
#[command(
    after_help = "--dry-run checks a run without training or writing anything (no run directory): \
                  it validates the config, reads the model's config.json and tokenizer (not its \
                  weights), curates and tokenizes the data and prints the steps, tokens and \
                  estimated peak memory of the run; --dry-run=measure also loads the weights and \
                  times a few training steps. Exit codes as for a run: 2 config, 4 data rejected."
)]
pub struct TrainArgs {
    /// Run config (TOML): [model], [data], [tokenize], [lora], [train], [eval], [output].
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: TABLE.KEY=VALUE, VALUE read as TOML (else as a string), e.g.
    /// --set train.lr=1e-4 --set lora.target_modules='["q_proj","v_proj"]'; repeatable.
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in the output directory from its newest checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Delete the run in the output directory and start again.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the run's summary (what <run>/summary.json holds) as one JSON object on the last
    /// line of stdout; everything else goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// A quality gate: fail the run (exit 3) when 'METRIC OP NUMBER' holds on its final values,
    /// e.g. --fail-if 'eval/loss > 1.2'; added to the config's [gates] fail_if; repeatable.
    #[arg(long = "fail-if", value_name = "METRIC OP NUMBER")]
    pub fail_if: Vec<String>,
    /// Plan the run without training or writing anything: validate the config, open the
    /// model's config.json and tokenizer (not the weights), curate and tokenize the data, print
    /// steps, tokens and estimated peak memory (with --json, one JSON object on stdout's last
    /// line). --dry-run=measure also loads the weights and times a few training steps.
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "plan"
    )]
    pub dry_run: Option<DryRunMode>,
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
    pub dtype: FloatDtype,
    /// Decode a GGUF model's quantized projection weights to f32 at load (by default they stay
    /// in their block formats on the CPU in f32).
    #[arg(long)]
    pub dequantize: bool,
    /// Multiply a GGUF model's quantized weights by activations rounded to 8 bits per 32
    /// values when decoding and prefilling (llama.cpp's method: integer dot products, faster,
    /// not exact; by default activations stay f32 and the product is exact).
    #[arg(long)]
    pub q8_activations: bool,
    /// Round activations to bfloat16 where they multiply a GGUF model's BF16 weights in prefill
    /// and batched products, on a CPU with AVX-512 BF16 (llama.cpp's method for BF16 files:
    /// bfloat16 dot products, faster, not exact; elsewhere it changes nothing).
    #[arg(long, conflicts_with = "q8_activations")]
    pub bf16_activations: bool,
}

impl ModelArgs {
    /// The activations of `--q8-activations` / `--bf16-activations`.
    pub fn activations(&self) -> hone_model::gguf::matmul::Activations {
        hone_model::gguf::matmul::Activations::from_flags(
            self.q8_activations,
            self.bf16_activations,
        )
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// PEFT LoRA adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
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
    /// Data-stage throughput: curation (with MinHash), and templating + tokenization + packing.
    Data(BenchDataArgs),
    /// LoRA training-step throughput (forward, backward, clipping, AdamW) on random weights.
    Train(BenchTrainArgs),
    /// Serving throughput and latency: concurrent streamed requests across adapters.
    Serve(BenchServeArgs),
    /// Retrieval: embedding throughput, index build, query latency at several index sizes,
    /// HNSW recall against exact search.
    Rag(BenchRagArgs),
}

#[derive(Args, Debug)]
pub struct BenchRagArgs {
    /// A sentence-transformers directory (scripts/fetch-models.sh minilm fetches
    /// all-MiniLM-L6-v2 there).
    #[arg(long, default_value = "checkpoints/base/all-minilm-l6-v2")]
    pub embedder: PathBuf,
    /// Index sizes in chunks, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub sizes: Vec<usize>,
    /// Chunks embedded: the throughput measurement, and the real rows of every index (the
    /// rest are spliced from them).
    #[arg(long, default_value_t = 4096)]
    pub embed_chunks: usize,
    /// Texts per forward pass of the embedder.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Tokens per chunk (the embedder's tokenizer).
    #[arg(long, default_value_t = 48)]
    pub chunk_tokens: usize,
    /// Queries timed per index size (questions of the shipped retrieval sets).
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// Results per query, and the k of recall@k.
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    #[command(flatten)]
    pub hnsw: HnswArgs,
    /// Where datasets/ is (the shipped corpus and questions).
    #[arg(long, default_value = ".")]
    pub data_root: PathBuf,
    /// Only the embedding measurement (no indexes).
    #[arg(long)]
    pub embed_only: bool,
    /// Also write the embedded chunks' texts here (JSONL `{"text": ...}`), for
    /// scripts/bench_embed_st.py to embed the same texts with sentence-transformers.
    #[arg(long, value_name = "FILE")]
    pub dump_chunks: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model shape (random weights).
    #[arg(long, value_enum, default_value = "small")]
    pub shape: Shape,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// LoRA alpha (default: twice the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Target modules, comma-separated (or all-linear).
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Data-parallel over these devices (e.g. `cpu,cpu` or `cuda:0,cuda:1`), `--batch` rows
    /// each per step, gradients all-reduced as in `train.devices`.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Vec<DeviceSpec>,
    /// Recompute each decoder layer in the backward pass (less activation memory).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Dtype of the base weights (the adapters and optimizer stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: FloatDtype,
    /// Peak dense f32 FLOP/s of the device in TFLOP/s, to report model FLOPs utilisation.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// `fused` (the backend's fused kernels; the CPU's) or `composed` (burn's composed
    /// operations, as CUDA runs them), to compare the two.
    #[arg(long, default_value = "fused")]
    pub kernels: Kernels,
}

/// Model shapes with random weights (hone-bench's).
pub use hone_bench::Shape;

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
    pub dtype: FloatDtype,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// `fused` (the backend's fused kernels; the CPU's) or `composed` (burn's composed
    /// operations, as CUDA runs them), to compare the two.
    #[arg(long, default_value = "fused")]
    pub kernels: Kernels,
    /// Decode a GGUF model's quantized projection weights to f32 at load (by default they stay
    /// in their block formats on the CPU in f32), to compare the two.
    #[arg(long)]
    pub dequantize: bool,
    /// Multiply a GGUF model's quantized weights by activations rounded to 8 bits per 32
    /// values when decoding and prefilling (llama.cpp's method: integer dot products, faster,
    /// not exact; by default activations stay f32 and the product is exact).
    #[arg(long)]
    pub q8_activations: bool,
    /// Round activations to bfloat16 where they multiply a GGUF model's BF16 weights in prefill
    /// and batched products, on a CPU with AVX-512 BF16 (llama.cpp's method for BF16 files:
    /// bfloat16 dot products, faster, not exact; elsewhere it changes nothing).
    #[arg(long, conflicts_with = "q8_activations")]
    pub bf16_activations: bool,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Curate raw records into train.jsonl, val.jsonl and report.json; prints a summary.
    Prepare(DataPrepareArgs),
    /// Show the examples curation removed, or one curated example token by token with its
    /// loss mask (--tokens).
    Inspect(DataInspectArgs),
    /// Retrieval-aware training examples (RAFT) from a QA file and a passage corpus: each
    /// question with k numbered passages (its gold ones among hard distractors), the target a
    /// short answer citing them; or --closed-book. Writes train.jsonl, heldout.jsonl (the
    /// held-out questions) and report.json.
    Raft(DataRaftArgs),
}

/// The target when the gold passages are left out of an example.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithoutGoldArg {
    /// The answer, without a citation (RAFT: the model also learns the domain).
    Answer,
    /// "I cannot answer from the given passages."
    Abstain,
}

#[derive(Args, Debug)]
pub struct DataRaftArgs {
    /// The passages: JSONL records ({id, title, text}), Markdown or text files, directories,
    /// globs (as `hone rag index --docs`); gold_passage_ids name their ids.
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<String>,
    /// Questions, JSONL: {id, question, answers: [...], gold_passage_ids: [...]} (an empty
    /// answers list, or "answerable": false, marks a question without an answer).
    #[arg(long, value_name = "FILE")]
    pub questions: PathBuf,
    /// A `hone rag index` of the same corpus to draw the distractors from [default: BM25 over
    /// the corpus, built in a temporary directory].
    #[arg(long, value_name = "DIR")]
    pub index: Option<PathBuf>,
    /// Output directory (written completely or not at all).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Passages shown with each question, gold included.
    #[arg(short, long, default_value_t = 4)]
    pub k: usize,
    /// Share of answerable questions whose example shows the gold passages (RAFT's P).
    #[arg(long, default_value_t = 0.8)]
    pub gold_share: f64,
    /// Target of an answerable question shown without its gold passages.
    #[arg(long, value_enum, default_value = "answer")]
    pub without_gold: WithoutGoldArg,
    /// Largest share of unanswerable questions among the training examples (0 to 1; default:
    /// the data's own). Above it, unanswerable training questions are left out (seeded).
    #[arg(long)]
    pub unanswerable_share: Option<f64>,
    /// Share of questions held out of training (by a hash of the id and the seed).
    #[arg(long, default_value_t = 0.2)]
    pub heldout_fraction: f64,
    /// The question alone and its answer, no passages (the fine-tune-only arm).
    #[arg(long)]
    pub closed_book: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace --out even when it holds other files (never when it holds an input).
    #[arg(long)]
    pub force: bool,
}

/// Record format of the inputs (`[data] format`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    /// Detect it per file.
    Auto,
    Alpaca,
    Sharegpt,
    Messages,
    Completion,
    Text,
}

/// What to do with a bad record (`[data] on_error`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnErrorArg {
    /// Skip it and list it in report.json.
    Skip,
    /// Stop before writing anything.
    Fail,
}

/// Duplicate removal (`[data.dedupe] exact` and `[data.dedupe.near] enabled`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupeArg {
    /// Keep duplicates.
    None,
    /// Remove exact duplicates only.
    Exact,
    /// Remove exact duplicates, then MinHash near-duplicates.
    Minhash,
}

#[derive(Args, Debug)]
pub struct DataPrepareArgs {
    /// TOML file whose `[data]` table holds the data settings (other tables are left to other
    /// commands); flags override its values. Paths in it are relative to the current directory.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Input files or glob patterns (`inputs`); replaces the config's list.
    #[arg(long = "input", value_name = "FILE", num_args = 1..)]
    pub inputs: Vec<String>,
    /// Record format (`format`).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Output directory for train.jsonl, val.jsonl and report.json (replaced as a whole). An
    /// existing directory is only replaced when it is empty or a previous output of this
    /// command, unless --force.
    #[arg(long, default_value = "prepared")]
    pub out: PathBuf,
    /// Replace --out even when it holds other files (never when it holds an input file).
    #[arg(long)]
    pub force: bool,
    /// What to do with bad records (`on_error`; default fail).
    #[arg(long, value_enum)]
    pub on_error: Option<OnErrorArg>,
    /// Fraction of kept examples for validation (`split.val_fraction`; default 0.05).
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Duplicate removal (default minhash: exact, then near-duplicates).
    #[arg(long, value_enum)]
    pub dedupe: Option<DedupeArg>,
    /// Model directory whose tokenizer.json counts tokens: token-length statistics and the
    /// `filter.min_tokens` / `filter.max_tokens` bounds.
    #[arg(long, value_name = "MODEL_DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Evaluation files or globs to decontaminate against (`decontaminate.eval_files`);
    /// replaces the config's list.
    #[arg(long = "eval-file", value_name = "FILE", num_args = 1..)]
    pub eval_files: Vec<String>,
}

/// Which curated file to read.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArg {
    Train,
    Val,
}

fn removal_reason(name: String) -> Result<hone_data::RemovalReason, String> {
    hone_data::RemovalReason::ALL
        .into_iter()
        .find(|r| r.as_str() == name)
        .ok_or_else(|| format!("unknown removal reason `{name}`"))
}

#[derive(Args, Debug)]
pub struct DataInspectArgs {
    /// Directory written by `hone data prepare`.
    pub dir: PathBuf,
    /// Show only this removal reason.
    #[arg(long, value_parser = clap::builder::TypedValueParser::try_map(
        clap::builder::PossibleValuesParser::new(hone_data::RemovalReason::ALL.map(|r| r.as_str())),
        removal_reason,
    ))]
    pub reason: Option<hone_data::RemovalReason>,
    /// Print one curated example token by token (id, text, in the loss or not), rendered with
    /// the chat template and tokenized as training does.
    #[arg(long, requires = "model")]
    pub tokens: bool,
    /// Model directory (tokenizer.json, tokenizer_config.json) for --tokens.
    #[arg(long, value_name = "MODEL_DIR")]
    pub model: Option<PathBuf>,
    /// Chat template for --tokens: model (the model's own), model:NAME, chatml, llama3, alpaca.
    #[arg(long, default_value = "model")]
    pub template: hone_tokenize::TemplateSource,
    /// 0-based index of the example for --tokens.
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    /// Curated file for --tokens.
    #[arg(long, value_enum, default_value = "train")]
    pub split: SplitArg,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Print exactly the text a chat template renders for a conversation (stdout holds the
    /// rendering and nothing else, not even a final newline).
    Render(TemplateRenderArgs),
}

#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("source")
        .required(true)
        .args(["model", "tokenizer_config", "template"])
))]
pub struct TemplateRenderArgs {
    /// Model directory (its chat_template.jinja, tokenizer_config.json or chat_template.json) or
    /// GGUF model file (its tokenizer.chat_template).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// A tokenizer_config.json holding `chat_template`.
    #[arg(long, value_name = "FILE")]
    pub tokenizer_config: Option<PathBuf>,
    /// A built-in template.
    #[arg(long, value_parser = clap::builder::TypedValueParser::try_map(
        clap::builder::PossibleValuesParser::new(hone_tokenize::BuiltinTemplate::ALL.map(|b| b.name())),
        |name: String| name.parse::<hone_tokenize::BuiltinTemplate>(),
    ))]
    pub template: Option<hone_tokenize::BuiltinTemplate>,
    /// A named template of the model or tokenizer config (e.g. tool_use) instead of the default.
    #[arg(long, conflicts_with = "template")]
    pub name: Option<String>,
    /// JSON file: a list of messages `[{"role": ..., "content": ...}]`, or an object with
    /// `messages` whose other keys (`tools`, `documents`, ...) become template variables (a
    /// line of train.jsonl works).
    #[arg(long, value_name = "FILE.json")]
    pub messages: PathBuf,
    /// End with the prompt that starts an assistant turn.
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// Template variable KEY=VALUE (VALUE read as JSON when it parses, else as a string), e.g.
    /// --var date_string="26 Jul 2024"; repeatable, overrides the messages file.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// Examples to curate and to tokenize: the input repeated as often as needed.
    #[arg(long, default_value_t = 100_000)]
    pub examples: usize,
    /// Source records (any format `hone data prepare` reads).
    #[arg(long, default_value = "datasets/gsm8k_train.jsonl")]
    pub input: PathBuf,
    /// Append " (copy K)" to the first string field of the K-th repetition (K >= 1) so that
    /// exact dedupe keeps the copies (MinHash still finds them: they are near-duplicates);
    /// `--perturb false` repeats the records unchanged. The JSON line says what was removed.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub perturb: bool,
    /// Model directory whose tokenizer the tokenization measurement uses.
    #[arg(long, default_value = "checkpoints/base/stories260k")]
    pub model: PathBuf,
    /// Chat template for the tokenization measurement (model, model:NAME, chatml, ...).
    #[arg(long, default_value = "chatml")]
    pub template: hone_tokenize::TemplateSource,
    /// Tokens per packed row.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
}

/// `hone train --dry-run[=MODE]`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DryRunMode {
    /// Config, model config.json and tokenizer, data: steps, tokens, estimated memory.
    Plan,
    /// The plan, then the weights and a few timed training steps (the first a warm-up).
    Measure,
}
