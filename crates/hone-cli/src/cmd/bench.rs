//! `hone bench ...`: throughput measurements, one JSON line each on stdout.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::generate::argmax;
use hone_model::{load_model_dir, run_on, BackendTask, CausalLm, Input, KvCache, LoadOptions};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::{BenchArgs, BenchCommand, BenchGenerateArgs};
use crate::cmd::peak_rss_mb;

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Generate(a) => bench_generate(a),
        BenchCommand::Data(a) => crate::cmd::bench_data::run(a),
        BenchCommand::Train(a) => crate::cmd::train::bench(a),
        BenchCommand::Serve(a) => crate::cmd::serve::bench(a),
    }
}

struct GenerateTask(BenchGenerateArgs);

struct Timing {
    prefill_seconds: f64,
    decode_seconds: f64,
}

fn ids_tensor<B: Backend>(ids: &[i64], batch: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [batch, ids.len() / batch]),
        device,
    )
}

/// One prefill of `prompt` then `new_tokens` greedy decode steps for every row.
fn run_once<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[i64],
    batch: usize,
    new_tokens: usize,
    device: &B::Device,
) -> Result<Timing> {
    let vocab = model.config().vocab_size;
    let mut cache = KvCache::new(model.config().num_layers);
    let started = Instant::now();
    let logits = model.forward(
        Input::new(ids_tensor::<B>(prompt, batch, device))
            .cache(&mut cache)
            .last_logits(),
    );
    let mut logits: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    for _ in 0..new_tokens {
        let next: Vec<i64> = (0..batch)
            .map(|b| argmax(&logits[b * vocab..(b + 1) * vocab]) as i64)
            .collect();
        let out = model.forward(
            Input::new(ids_tensor::<B>(&next, batch, device))
                .cache(&mut cache)
                .last_logits(),
        );
        logits = out
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    Ok(Timing {
        prefill_seconds,
        decode_seconds: decode_started.elapsed().as_secs_f64(),
    })
}

impl BackendTask for GenerateTask {
    type Output = Result<serde_json::Value>;

    fn run<B: Backend>(self, device: B::Device) -> Result<serde_json::Value> {
        let a = self.0;
        let options = LoadOptions {
            dtype: a.dtype.burn(),
        };
        let (model, label) = match (&a.model, a.shape) {
            (Some(dir), _) => {
                let loaded = load_model_dir::<B>(dir, &device, options)
                    .with_context(|| format!("loading model {}", dir.display()))?;
                (loaded.model, dir.display().to_string())
            }
            (None, Some(shape)) => {
                let config = shape.config();
                B::seed(&device, 0);
                (
                    CausalLm::random(&config, &device, options),
                    format!("{shape:?}").to_lowercase(),
                )
            }
            (None, None) => bail!("give --model DIR or --shape"),
        };
        if a.prompt_tokens == 0 || a.batch == 0 || a.repeat == 0 {
            bail!("--prompt-tokens, --batch and --repeat must be positive");
        }
        let vocab = model.config().vocab_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let prompt: Vec<i64> = (0..a.batch * a.prompt_tokens)
            .map(|_| rng.random_range(0..vocab as i64))
            .collect();
        // Warm-up (allocator, thread pools, kernels).
        run_once(
            &model,
            &prompt[..a.batch * a.prompt_tokens.min(8)],
            a.batch,
            2.min(a.new_tokens),
            &device,
        )?;
        let mut best: Option<Timing> = None;
        for _ in 0..a.repeat {
            let t = run_once(&model, &prompt, a.batch, a.new_tokens, &device)?;
            best = Some(match best {
                None => t,
                Some(b) => Timing {
                    prefill_seconds: b.prefill_seconds.min(t.prefill_seconds),
                    decode_seconds: b.decode_seconds.min(t.decode_seconds),
                },
            });
        }
        let best = best.expect("repeat > 0");
        Ok(json!({
            "bench": "generate",
            "model": label,
            "device": format!("{device:?}"),
            "dtype": a.dtype.to_string(),
            "batch": a.batch,
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "prefill_tokens_per_sec": (a.batch * a.prompt_tokens) as f64 / best.prefill_seconds,
            "decode_tokens_per_sec": (a.batch * a.new_tokens) as f64 / best.decode_seconds.max(1e-9),
            "prefill_seconds": best.prefill_seconds,
            "decode_seconds": best.decode_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }))
    }
}

fn bench_generate(args: BenchGenerateArgs) -> Result<()> {
    let line = run_on(args.device, GenerateTask(args))??;
    println!("{line}");
    Ok(())
}
