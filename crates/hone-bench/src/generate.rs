//! The generation benchmark behind `hone bench generate`: one prefill of a random prompt, then
//! greedy decode steps with a KV cache, for every row of a batch; the best of `repeat` timed
//! runs (after a short warm-up) as one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::generate::argmax;
use hone_model::gguf::matmul::Activations;
use hone_model::{
    load_model_dir, run_on, BackendTask, CausalLm, DeviceSpec, FloatDtype, Input, Kernels, KvCache,
    LoadOptions,
};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::error::{BenchError, Result};
use crate::memory::{available_threads, cpu_model, huge_pages_mb, isa, peak_rss_mb};
use crate::shape::Shape;

/// The model a benchmark runs.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A model directory (or `.gguf` file).
    Dir(PathBuf),
    /// A built-in shape with random weights.
    Shape(Shape),
}

/// Settings of [`bench_generate`].
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub model: ModelSource,
    /// Prompt tokens per row.
    pub prompt_tokens: usize,
    /// Tokens decoded per row after the prefill.
    pub new_tokens: usize,
    /// Rows.
    pub batch: usize,
    pub device: DeviceSpec,
    pub dtype: FloatDtype,
    /// Timed repetitions (the best is reported).
    pub repeat: usize,
    /// The model's kernels (`Composed`: burn's composed operations, for comparisons).
    pub kernels: Kernels,
    /// Decode a GGUF model's quantized projection weights at load ([`LoadOptions::dequantize`]).
    pub dequantize: bool,
    /// How the weights kept quantized multiply the decoding rows ([`LoadOptions::activations`]).
    pub activations: Activations,
}

/// Runs the generation benchmark; the JSON object `hone bench generate` prints.
pub fn bench_generate(bench: GenerateBench) -> Result<Value> {
    if bench.prompt_tokens == 0 || bench.batch == 0 || bench.repeat == 0 {
        return Err(BenchError::Config {
            key: "prompt_tokens, batch, repeat",
            message: "--prompt-tokens, --batch and --repeat must be positive".into(),
        });
    }
    run_on(bench.device, GenerateTask(bench))?
}

struct GenerateTask(GenerateBench);

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

/// Last-position logits, read back to the host.
fn host_logits<B: Backend, const D: usize>(logits: Tensor<B, D>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| BenchError::Tensor(format!("{e:?}")))
}

/// One prefill of `prompt` then `new_tokens` greedy decode steps for every row; the pool's
/// threads stay awake between a step's parallel loops (as in `generate` and the server).
fn run_once<B: hone_model::KernelBackend>(
    model: &CausalLm<B>,
    prompt: &[i64],
    batch: usize,
    new_tokens: usize,
    device: &B::Device,
) -> Result<Timing> {
    hone_model::in_busy_pool(|| {
        let vocab = model.config().vocab_size;
        let mut cache =
            KvCache::for_generation(model.config().num_layers, prompt.len() / batch, new_tokens);
        let started = Instant::now();
        let logits = model.forward(
            Input::new(ids_tensor::<B>(prompt, batch, device))
                .cache(&mut cache)
                .last_logits(),
        );
        let mut logits = host_logits(logits)?;
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
            logits = host_logits(out)?;
        }
        Ok(Timing {
            prefill_seconds,
            decode_seconds: decode_started.elapsed().as_secs_f64(),
        })
    })
}

impl BackendTask for GenerateTask {
    type Output = Result<Value>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Result<Value> {
        let a = self.0;
        let options = LoadOptions {
            dtype: a.dtype.burn(),
            dequantize: a.dequantize,
            activations: a.activations,
        };
        let (mut model, label) = match &a.model {
            ModelSource::Dir(dir) => {
                let loaded = load_model_dir::<B>(dir, &device, options).map_err(|source| {
                    BenchError::Load {
                        what: "model",
                        path: dir.clone(),
                        source: Box::new(source),
                    }
                })?;
                (loaded.model, dir.display().to_string())
            }
            ModelSource::Shape(shape) => {
                let config = shape.config();
                B::seed(&device, 0);
                (CausalLm::random(&config, &device, options), shape.label())
            }
        };
        model.set_kernels(a.kernels);
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
        let mut best = run_once(&model, &prompt, a.batch, a.new_tokens, &device)?;
        for _ in 1..a.repeat {
            let t = run_once(&model, &prompt, a.batch, a.new_tokens, &device)?;
            best = Timing {
                prefill_seconds: best.prefill_seconds.min(t.prefill_seconds),
                decode_seconds: best.decode_seconds.min(t.decode_seconds),
            };
        }
        Ok(json!({
            "bench": "generate",
            "model": label,
            "device": format!("{device:?}"),
            "dtype": a.dtype.to_string(),
            "kernels": a.kernels.to_string(),
            "dequantize": a.dequantize,
            "activations": match a.activations {
                Activations::F32 => "f32",
                Activations::Q8 => "q8",
                Activations::Bf16 => "bf16",
            },
            "quantized_projections": model.quantized_projections(),
            "batch": a.batch,
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "prefill_tokens_per_sec": (a.batch * a.prompt_tokens) as f64 / best.prefill_seconds,
            "decode_tokens_per_sec": (a.batch * a.new_tokens) as f64 / best.decode_seconds.max(1e-9),
            "prefill_seconds": best.prefill_seconds,
            "decode_seconds": best.decode_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "threads": available_threads(),
            "cpu": cpu_model(),
            "isa": isa(),
            "huge_pages_mb": huge_pages_mb(),
        }))
    }
}
