//! `hone bench ...`: the benchmarks of [`hone_bench`], one JSON line each on stdout. This
//! module only turns the flags into hone-bench's settings and prints what comes back.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hone_bench::data::{bench_data, DataBench};
use hone_bench::generate::{bench_generate, GenerateBench, ModelSource};
use hone_bench::load::{bench_blocking, LoadConfig, Target};
use hone_bench::rag::{bench_rag, RagBench};
use hone_bench::random_adapter::{write_random_adapter, RandomAdapter};
use hone_bench::train::{bench_train, TrainBench};
use hone_model::Tokenizer;
use hone_serve::{ModelSource as ServeSource, ServeConfig};
use serde_json::json;

use crate::args::{
    BenchArgs, BenchCommand, BenchDataArgs, BenchGenerateArgs, BenchRagArgs, BenchServeArgs,
    BenchTrainArgs,
};

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Generate(a) => println!("{}", bench_generate(generate_settings(a)?)?),
        BenchCommand::Data(a) => bench_data(&data_settings(a), |line| println!("{line}"))?,
        BenchCommand::Train(a) => println!("{}", bench_train(train_settings(a))?),
        BenchCommand::Serve(a) => bench_serve(a)?,
        BenchCommand::Rag(a) => bench_rag(&rag_settings(a), |line| println!("{line}"))?,
    }
    Ok(())
}

fn generate_settings(a: BenchGenerateArgs) -> Result<GenerateBench> {
    let model = match (a.model, a.shape) {
        (Some(dir), _) => ModelSource::Dir(dir),
        (None, Some(shape)) => ModelSource::Shape(shape),
        (None, None) => bail!("give --model DIR or --shape"),
    };
    Ok(GenerateBench {
        model,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        batch: a.batch,
        device: a.device,
        dtype: a.dtype,
        repeat: a.repeat,
        kernels: a.kernels,
        dequantize: a.dequantize,
        activations: hone_model::gguf::matmul::Activations::from_flags(
            a.q8_activations,
            a.bf16_activations,
        ),
    })
}

fn train_settings(a: BenchTrainArgs) -> TrainBench {
    TrainBench {
        shape: a.shape,
        seq: a.seq,
        batch: a.batch,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        targets: a.targets,
        steps: a.steps,
        device: a.device,
        devices: a.devices,
        gradient_checkpointing: a.gradient_checkpointing,
        dtype: a.dtype,
        peak_tflops: a.peak_tflops,
        kernels: a.kernels,
    }
}

fn rag_settings(a: BenchRagArgs) -> RagBench {
    RagBench {
        embedder: a.embedder,
        data_root: a.data_root,
        sizes: a.sizes,
        embed_chunks: a.embed_chunks,
        batch_size: a.batch_size,
        chunk_tokens: a.chunk_tokens,
        queries: a.queries,
        k: a.k,
        hnsw: a.hnsw.params(),
        candidates: hone_rag::SearchOptions::default().candidates,
        embed_only: a.embed_only,
        dump_chunks: a.dump_chunks,
    }
}

fn data_settings(a: BenchDataArgs) -> DataBench {
    DataBench {
        input: a.input,
        examples: a.examples,
        perturb: a.perturb,
        model: a.model,
        template: a.template,
        max_seq_len: a.max_seq_len,
    }
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

/// `hone bench serve`: the load tool against an in-process server (`--model`/`--shape`) or a
/// running one (`--url`), one JSON line per concurrency level.
fn bench_serve(args: BenchServeArgs) -> Result<()> {
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
                    // A model directory's config.json, or a GGUF file's metadata.
                    let mc = hone_model::loader::model_config(dir)
                        .with_context(|| format!("reading {}", dir.display()))?;
                    (
                        ServeSource::Dir(dir.clone()),
                        mc,
                        dir.clone(),
                        dir.display().to_string(),
                    )
                }
                (None, Some(shape)) => {
                    let mc = shape.config();
                    let name = format!("{shape:?}").to_lowercase();
                    let source = ServeSource::Random {
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
        .enumerate()
        .map(|(k, &c)| LoadConfig {
            concurrency: c,
            requests: args.requests.unwrap_or((2 * c).max(4)),
            max_tokens: args.max_tokens,
            prompt_tokens: args.prompt_tokens,
            prompt_vocab,
            models: models.clone(),
            time_limit: Duration::from_secs(args.time_limit_s),
            request_timeout: Duration::from_secs(args.request_timeout_s),
            // Measurements of one command never share a prompt.
            seed: args.seed.wrapping_mul(1000).wrapping_add(k as u64),
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
