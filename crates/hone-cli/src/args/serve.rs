//! `hone serve`'s and `hone bench serve`'s arguments.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use hone_model::{DeviceSpec, FloatDtype};
use hone_tokenize::TemplateSource;

use super::Shape;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model directory or GGUF file served in process (or --shape, or --url).
    #[arg(long, conflicts_with_all = ["shape", "url"])]
    pub model: Option<PathBuf>,
    /// A built-in shape with random weights, served in process.
    #[arg(long, value_enum, conflicts_with = "url")]
    pub shape: Option<Shape>,
    /// Tokenizer for --shape: prompts are token ids below its vocabulary size, and generated ids
    /// it does not know decode to no text (token counts are exact either way).
    #[arg(long, default_value = "checkpoints/base/stories260k")]
    pub tokenizer: PathBuf,
    /// A running server to load instead, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer key for --url.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Models to request round-robin with --url (default: the base named by /v1/models' first
    /// entry is not looked up, so give at least one).
    #[arg(long = "model-name")]
    pub model_names: Vec<String>,
    /// Random adapters to create and request round-robin with the base (in-process runs).
    #[arg(long, default_value_t = 2)]
    pub adapters: usize,
    /// Concurrent streams, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests per measurement (default: 2 x concurrency, at least 4).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Tokens generated per request (ignore_eos: exactly this many).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Prompt ids are drawn below this (default: the smaller of tokenizer and model vocab).
    #[arg(long)]
    pub prompt_vocab: Option<u32>,
    /// Seed of the random prompts. Each concurrency of one command draws its own prompts
    /// (from seed × 1000 + its index), so no prompt repeats within a command; give another seed
    /// to each command sent to the same --url server, or a server that caches prompts (llama-server)
    /// skips the prefill of those it has seen.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// No request starts after this many seconds of a measurement.
    #[arg(long, default_value_t = 300)]
    pub time_limit_s: u64,
    #[arg(long, default_value_t = 300)]
    pub request_timeout_s: u64,
    /// Batch size of the in-process server (default: the largest concurrency).
    #[arg(long)]
    pub max_batch: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: FloatDtype,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json; a merged
    /// model directory works the same) or GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Name of the base model in requests and /v1/models (default: the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A PEFT adapter loaded at start, served under NAME (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Directory whose sub-directories are adapters: a request for `model: NAME` loads
    /// DIR/NAME on first use, and /v1/models loads new folders (no restart needed). Names are
    /// 1-64 ASCII letters, digits, `.`, `_`, `-`; other folders are skipped with a warning.
    #[arg(long, value_name = "DIR")]
    pub adapters_dir: Option<PathBuf>,
    /// Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 403).
    /// Needs --adapters-dir: `lora_path` must name an adapter inside it.
    #[arg(long, requires = "adapters_dir")]
    pub allow_runtime_lora: bool,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set HONE_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype of the weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: FloatDtype,
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
    /// Chat template: model (the model's own; the default), model:NAME, chatml, llama3, alpaca.
    #[arg(long)]
    pub chat_template: Option<TemplateSource>,
    /// A retrieval index (`hone rag index --out DIR`): a chat request with `"rag": {"k": N}`
    /// (or `true`) answers from the passages retrieved for its last user message, numbered
    /// [1]..[N] in the prompt, and the response lists them in `sources`.
    #[arg(long, value_name = "DIR")]
    pub rag: Option<PathBuf>,
    /// Passages per request when the request gives no `k` (1 to 50).
    #[arg(long, default_value_t = 5, requires = "rag")]
    pub rag_k: usize,
    /// Retrieve for every chat request without a `rag` field (`"rag": false` opts out).
    #[arg(long, requires = "rag")]
    pub rag_default: bool,
    /// Requests decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens prefilled in one step while requests are decoding (chunked prefill, in the
    /// same forward pass as the running streams' tokens: a long prompt delays them by one chunk
    /// at a time). Smaller chunks (e.g. 64) keep running streams steadier, at some throughput and
    /// time to first token on long prompts.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Requests waiting for a place in the batch; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Longest prompt in tokens (default: the model's context length).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest request body in bytes; larger ones are refused with 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Adapters loaded at once.
    #[arg(long, default_value_t = 32)]
    pub max_adapters: usize,
    /// Seconds a client may take to send a request's headers (also the idle time of a
    /// keep-alive connection); then the connection is closed.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub header_timeout: u64,
    /// Seconds a client may take to send a request's body; then 408.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub body_timeout: u64,
    /// On Ctrl-C / SIGTERM, seconds running requests may take to finish before the server
    /// exits anyway.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
}
