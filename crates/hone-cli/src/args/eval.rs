//! `hone eval`'s arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hone_eval::{AdapterSpec, MaxDrop};
use hone_model::{DeviceSpec, FloatDtype};
use hone_tokenize::TemplateSource;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    /// TOML file with an `[eval]` section (flags override its values).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hugging Face model directory of the base model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter as NAME=DIR (repeatable); each is a column beside the base model.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<AdapterSpec>,
    /// A task (repeatable): a preset (openbookqa, gsm8k), PRESET=FILE, or KIND=FILE with KIND
    /// one of ppl, mc, gen (named after the file). Replaces the config's tasks.
    #[arg(long = "task", value_name = "TASK")]
    pub tasks: Vec<String>,
    /// Evaluate the first N records of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per forward pass (log-likelihood) and prompts per generation batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Device: cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Compute dtype of the weights [default: f32].
    #[arg(long, value_enum)]
    pub dtype: Option<FloatDtype>,
    /// Wrap multiple-choice and generation prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Chat template: model, model:NAME, chatml, llama3 or alpaca [default: model].
    #[arg(long)]
    pub template: Option<TemplateSource>,
    /// Perplexity over every token, not only the trained (assistant) ones.
    #[arg(long)]
    pub all_tokens: bool,
    /// Longest row in tokens [default: 2048, capped by the model].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Prompt template of multiple-choice and generation tasks ({question}, {choices}).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Scored continuation of multiple-choice tasks ({choice}, {label}).
    #[arg(long)]
    pub choice_format: Option<String>,
    /// Generation: solved examples before each prompt.
    #[arg(long)]
    pub fewshot: Option<usize>,
    /// Generation: {question, answer} JSONL the few-shot examples come from.
    #[arg(long)]
    pub fewshot_file: Option<PathBuf>,
    /// Generation: new tokens at most.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Generation: cut the output before this string (repeatable; replaces the defaults).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Output directory for eval.json, eval.md and plots [default: runs/eval].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training run directory whose metrics.jsonl is plotted (loss.png, lr.png).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Continue an interrupted evaluation from --out's records.jsonl: records already scored
    /// are not computed again (starts afresh when there is none).
    #[arg(long)]
    pub resume: bool,
    /// An earlier eval.json to compare with (baseline, current, difference and its standard
    /// error in eval.md and eval.json).
    #[arg(long, value_name = "EVAL_JSON")]
    pub baseline: Option<PathBuf>,
    /// Gate (repeatable): exit with code 3 when [TASK/]METRIC got worse than the baseline by
    /// more than DROP plus --noise standard errors; e.g. openbookqa/acc=0.01, loss=0.05.
    #[arg(
        long = "max-drop",
        value_name = "[TASK/]METRIC=DROP",
        requires = "baseline"
    )]
    pub max_drops: Vec<MaxDrop>,
    /// Column of the baseline report to compare with [default: its last].
    #[arg(long, value_name = "NAME", requires = "baseline")]
    pub baseline_column: Option<String>,
    /// Column of this evaluation to compare [default: the last].
    #[arg(long, value_name = "NAME", requires = "baseline")]
    pub column: Option<String>,
    /// Standard errors of the difference tolerated as noise on top of each --max-drop
    /// (0: the allowed drop alone) [default: 2].
    #[arg(long, value_name = "Z", requires = "baseline")]
    pub noise: Option<f64>,
    /// Testing aid: stop as if interrupted once this many records are logged.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Question answering for the base model and each adapter, closed book and with retrieval,
    /// on the same questions: exact match, F1, containment, abstention, citations,
    /// groundedness, recall@k / MRR, latency, prompt tokens, training cost. Writes eval.json,
    /// eval.md, predictions.jsonl and accuracy_latency.png.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Base model: Hugging Face directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter as NAME=DIR (repeatable): two more arms, closed book and with retrieval.
    /// Its training cost is read from DIR/../summary.json when DIR is a run's adapter.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<AdapterSpec>,
    /// Retrieval index (`hone rag index --out DIR`); without it only closed-book arms run.
    #[arg(long, value_name = "DIR")]
    pub rag: Option<PathBuf>,
    /// Questions, JSONL: {id, question, answers, answerable?, gold_passage_ids}.
    #[arg(long)]
    pub questions: PathBuf,
    /// Passages shown per question.
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// The first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Questions generated together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// New tokens at most per answer (greedy).
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Chat template: model, model:NAME, chatml, llama3 or alpaca.
    #[arg(long, default_value = "model")]
    pub template: TemplateSource,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: FloatDtype,
    /// Output directory.
    #[arg(long, default_value = "runs/eval-compare")]
    pub out: PathBuf,
}
