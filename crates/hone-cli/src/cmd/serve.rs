//! `hone serve`: the OpenAI-compatible server; `hone bench serve`: its load benchmark (one
//! JSON line per concurrency level).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hone_bench::load::{bench_blocking, LoadConfig, Target};
use hone_bench::random_adapter::{write_random_adapter, RandomAdapter};
use hone_model::{DeviceSpec, FloatDtype, ModelConfig, Tokenizer};
use hone_serve::{Limits, ModelSource, ServeConfig, Timeouts};
use hone_tokenize::TemplateSource;
use serde_json::json;

use crate::args::Shape;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json); a merged
    /// model directory works the same.
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
    /// Chat template: model (the model's own; the default), model:NAME, chatml, llama3, alpaca.
    #[arg(long)]
    pub chat_template: Option<TemplateSource>,
    /// Requests decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
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

/// `NAME=DIR` pairs.
fn parse_adapters(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                Ok((name.to_string(), PathBuf::from(dir)))
            }
            _ => bail!("--adapter `{s}`: expected NAME=DIR"),
        })
        .collect()
}

fn serve_config(args: ServeArgs) -> Result<ServeConfig> {
    let mut config = ServeConfig::new(ModelSource::Dir(args.model));
    config.served_model_name = args.served_model_name;
    config.adapters = parse_adapters(&args.adapters)?;
    config.adapters_dir = args.adapters_dir;
    config.allow_runtime_lora = args.allow_runtime_lora;
    config.host = args.host;
    config.port = args.port;
    config.api_key = args
        .api_key
        .or_else(|| std::env::var("HONE_API_KEY").ok().filter(|k| !k.is_empty()));
    config.device = args.device;
    config.dtype = args.dtype.burn();
    config.chat_template = args.chat_template;
    config.limits = Limits {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_prompt_tokens: args.max_prompt_tokens,
        max_body_bytes: args.max_body_bytes,
        max_adapters: args.max_adapters,
        ..Limits::default()
    };
    config.timeouts = Timeouts {
        header_read: Duration::from_secs(args.header_timeout),
        body_read: Duration::from_secs(args.body_timeout),
        shutdown: Duration::from_secs(args.shutdown_timeout),
    };
    config.validate()?;
    if !config.host.is_loopback() && config.api_key.is_none() {
        tracing::warn!(
            "listening on {} without --api-key: anyone who can reach it can use it{}",
            config.host,
            if config.allow_runtime_lora {
                " and load adapters from --adapters-dir"
            } else {
                ""
            }
        );
    }
    Ok(config)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = serve_config(args)?;
    let name = config.base_name();
    let adapters: Vec<String> = config.adapters.iter().map(|(n, _)| n.clone()).collect();
    hone_serve::serve_blocking(config, |addr| {
        println!(
            "hone serve: `{name}`{} on http://{addr} (Ctrl-C to stop)",
            if adapters.is_empty() {
                String::new()
            } else {
                format!(" with adapters {}", adapters.join(", "))
            }
        );
        let _ = std::io::stdout().flush();
    })
    .context("serving")
}

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model directory served in process (or --shape, or --url).
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

/// A loopback address from `http://HOST:PORT[/...]`.
fn parse_url(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: only http:// URLs are supported"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {hostport}"))?
        .find(|a| a.ip().is_loopback())
        .with_context(|| {
            format!("--url {url}: not a loopback address; the load tool only targets this machine")
        })?;
    Ok(addr)
}

pub fn bench(args: BenchServeArgs) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency must list positive numbers");
    }
    let adapters_tmp = tempfile::tempdir().context("creating a directory for adapters")?;
    let (target, models, label, prompt_vocab) = match (&args.url, &args.model, args.shape) {
        (Some(url), _, _) => {
            if args.model_names.is_empty() {
                bail!("--url needs at least one --model-name");
            }
            let target = Target::Running {
                addr: parse_url(url)?,
                api_key: args.api_key.clone(),
            };
            let vocab = args.prompt_vocab.unwrap_or(256);
            (target, args.model_names.clone(), url.clone(), vocab)
        }
        (None, model, shape) => {
            let (source, model_config, tokenizer_dir, label) = match (model, shape) {
                (Some(dir), _) => {
                    let mc = ModelConfig::from_file(&dir.join("config.json"))
                        .with_context(|| format!("reading {}", dir.display()))?;
                    (
                        ModelSource::Dir(dir.clone()),
                        mc,
                        dir.clone(),
                        dir.display().to_string(),
                    )
                }
                (None, Some(shape)) => {
                    let mc = shape.config();
                    let name = format!("{shape:?}").to_lowercase();
                    let source = ModelSource::Random {
                        config: Box::new(mc.clone()),
                        seed: 0,
                        tokenizer_dir: args.tokenizer.clone(),
                        name: name.clone(),
                    };
                    (source, mc, args.tokenizer.clone(), name)
                }
                (None, None) => bail!("give --model DIR, --shape or --url"),
            };
            let tokenizer = Tokenizer::from_dir(&tokenizer_dir)
                .with_context(|| format!("loading the tokenizer of {}", tokenizer_dir.display()))?;
            let vocab = args
                .prompt_vocab
                .unwrap_or_else(|| tokenizer.vocab_size().min(model_config.vocab_size) as u32);
            let mut config = ServeConfig::new(source);
            config.device = args.device;
            config.dtype = args.dtype.burn();
            let largest = args.concurrency.iter().copied().max().unwrap_or(1);
            config.limits.max_batch = args.max_batch.unwrap_or(largest);
            config.limits.max_queue = largest.max(256);
            let mut models = vec![config.base_name()];
            for i in 0..args.adapters {
                let name = format!("bench-adapter-{i}");
                let dir = adapters_tmp.path().join(&name);
                let spec = RandomAdapter {
                    seed: i as u64,
                    ..Default::default()
                };
                write_random_adapter(&dir, &model_config, &spec)?;
                config.adapters.push((name.clone(), dir));
                models.push(name);
            }
            config.limits.max_adapters = config.limits.max_adapters.max(args.adapters);
            (Target::InProcess(Box::new(config)), models, label, vocab)
        }
    };
    let runs: Vec<LoadConfig> = args
        .concurrency
        .iter()
        .map(|&c| LoadConfig {
            concurrency: c,
            requests: args.requests.unwrap_or((2 * c).max(4)),
            max_tokens: args.max_tokens,
            prompt_tokens: args.prompt_tokens,
            prompt_vocab,
            models: models.clone(),
            time_limit: Duration::from_secs(args.time_limit_s),
            request_timeout: Duration::from_secs(args.request_timeout_s),
            seed: 42,
        })
        .collect();
    // Device and dtype describe the in-process server; a running server's are not known here.
    let (device, dtype) = match args.url {
        Some(_) => (None, None),
        None => (Some(args.device.to_string()), Some(args.dtype.to_string())),
    };
    let mut errors = 0;
    bench_blocking(target, &runs, |result| {
        errors += result.load.errors;
        let mut line = json!({
            "bench": "serve",
            "model": label,
            "device": device,
            "dtype": dtype,
            "models": models,
            "max_tokens": args.max_tokens,
            "prompt_tokens_per_request": args.prompt_tokens,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        });
        if let (Some(obj), Ok(serde_json::Value::Object(r))) =
            (line.as_object_mut(), serde_json::to_value(result))
        {
            obj.extend(r);
        }
        println!("{line}");
        let _ = std::io::stdout().flush();
    })?;
    if errors > 0 {
        bail!("{errors} requests failed (see error_samples)");
    }
    Ok(())
}
