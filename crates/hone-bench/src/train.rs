//! The training benchmark behind `hone bench train`: full training steps (forward, backward,
//! clipping, AdamW) of a model with random weights through the trainer's own step engine
//! ([`hone_train::StepEngine`], from [`Learner::start_engine`]), on one device or data-parallel
//! over several; one warm-up step, then timed steps, as one JSON object.

use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use hone_model::lora::{LoraSettings, TargetModules};
use hone_model::{
    run_on_this_thread, BackendTask, CausalLm, DeviceSpec, FloatDtype, Kernels, LoadOptions,
    ModelConfig,
};
use hone_train::parallel::device_for;
use hone_train::step::step_seeds;
use hone_train::{AdamWConfig, Learner, MicroBatch};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::error::{BenchError, Result};
use crate::memory::{available_threads, cpu_model, huge_pages_mb, isa, peak_rss_mb};
use crate::shape::Shape;

/// Settings of [`bench_train`].
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Model shape (random weights).
    pub shape: Shape,
    /// Tokens per row.
    pub seq: usize,
    /// Rows per device and step.
    pub batch: usize,
    pub lora_r: usize,
    /// LoRA alpha (`None`: twice the rank).
    pub lora_alpha: Option<f64>,
    /// Target modules (or `all-linear`).
    pub targets: Vec<String>,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// The device, when `devices` is empty.
    pub device: DeviceSpec,
    /// Data-parallel over these devices (`batch` rows each per step, gradients all-reduced as
    /// in `train.devices`); empty for one device.
    pub devices: Vec<DeviceSpec>,
    /// Recompute each decoder layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Dtype of the base weights (the adapters and optimizer stay f32).
    pub dtype: FloatDtype,
    /// Peak dense f32 TFLOP/s of the device, to report model FLOPs utilisation.
    pub peak_tflops: Option<f64>,
    /// The model's kernels (`Composed`: burn's composed operations, for comparisons).
    pub kernels: Kernels,
}

/// Runs the training benchmark; the JSON object `hone bench train` prints.
pub fn bench_train(bench: TrainBench) -> Result<Value> {
    if bench.seq < 2 || bench.batch == 0 || bench.steps == 0 {
        return Err(BenchError::Config {
            key: "seq, batch, steps",
            message: "--seq must be at least 2, --batch and --steps positive".into(),
        });
    }
    let device = bench.devices.first().copied().unwrap_or(bench.device);
    // As `hone train` runs (see hone_train::run).
    run_on_this_thread(device, TrainTask(bench))?
}

struct TrainTask(TrainBench);

impl BackendTask for TrainTask {
    type Output = Result<Value>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Result<Value> {
        let a = self.0;
        let config = a.shape.config();
        B::seed(&device, 0);
        let load = LoadOptions {
            dtype: a.dtype.burn(),
            ..LoadOptions::default()
        };
        let mut model = CausalLm::<Autodiff<B>>::random(&config, &device, load);
        model.set_kernels(a.kernels);
        let targets: Vec<&str> = a.targets.iter().map(String::as_str).collect();
        let mut settings = LoraSettings::new(
            a.lora_r,
            a.lora_alpha.unwrap_or(2.0 * a.lora_r as f64),
            &targets,
        );
        if targets == ["all-linear"] {
            settings.target_modules = TargetModules::Names(vec!["all-linear".into()]);
        }
        model.attach_lora(&settings)?;
        if a.gradient_checkpointing {
            model.enable_gradient_checkpointing()?;
        }
        let trainable = model.lora_parameter_count();
        let mut learner = Learner::new(model, AdamWConfig::default(), 1.0, device.clone());
        let mut devices = vec![device.clone()];
        for spec in a.devices.iter().skip(1) {
            devices.push(device_for::<Autodiff<B>>(*spec)?);
        }
        // The trainer's engine: one device, or data-parallel peers over `devices`.
        let mut engine = learner.start_engine(&devices, Duration::from_secs(600), None)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut batch = || {
            let ids: Vec<i64> = (0..a.batch * a.seq)
                .map(|_| rng.random_range(0..config.vocab_size as i64))
                .collect();
            MicroBatch::dense(ids.clone(), ids, a.batch)
        };
        // One micro-batch per device and step, seeded as the trainer seeds them.
        let mut step = |i: usize| -> Result<()> {
            let batches: Vec<MicroBatch> = devices.iter().map(|_| batch()).collect();
            let seeds = step_seeds(0, i, batches.len());
            engine.step(&mut learner, i, &batches, Some(&seeds), 1e-4)?;
            Ok(())
        };
        // Warm-up (allocator, thread pools, kernels), then timed steps; each step reads its
        // loss back, so the device has finished it when the clock stops.
        step(0)?;
        let started = Instant::now();
        for i in 0..a.steps {
            step(i + 1)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        engine.finish()?;
        let rows = a.batch * devices.len();
        let tokens_per_sec = (rows * a.seq * a.steps) as f64 / seconds;
        let tflops = train_flops_per_token(&config, a.seq) * tokens_per_sec / 1e12;
        Ok(json!({
            "bench": "train",
            "shape": a.shape.label(),
            "device": a.devices.first().unwrap_or(&a.device).to_string(),
            "devices": devices.len(),
            "seq": a.seq,
            "batch": a.batch,
            "lora_r": a.lora_r,
            "targets": a.targets,
            "trainable_params": trainable,
            "steps": a.steps,
            "tokens_per_sec": tokens_per_sec,
            "model_tflops_per_sec": tflops,
            "mfu": a.peak_tflops.map(|peak| tflops / peak),
            "sec_per_step": seconds / a.steps as f64,
            "peak_rss_mb": peak_rss_mb(),
            "gradient_checkpointing": a.gradient_checkpointing,
            "dtype": a.dtype.to_string(),
            "kernels": a.kernels.to_string(),
            "threads": available_threads(),
            "cpu": cpu_model(),
            "isa": isa(),
            "huge_pages_mb": huge_pages_mb(),
        }))
    }
}

/// Model FLOPs of one training token with a frozen base: the forward pass (2 per weight of every
/// projection and the output head, plus causal attention's two `seq × seq` products counted in
/// full) and the backward pass to the inputs (the same again for the projections, twice for
/// attention); the adapters' own products are left out (under 1% at rank 16).
fn train_flops_per_token(c: &ModelConfig, seq: usize) -> f64 {
    let (h, d) = (c.hidden_size as f64, c.head_dim as f64);
    let q = c.num_heads as f64 * d;
    let kv = c.num_kv_heads as f64 * d;
    let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * c.intermediate_size as f64;
    let weights = c.num_layers as f64 * per_layer + h * c.vocab_size as f64;
    let attention = c.num_layers as f64 * 4.0 * seq as f64 * q;
    2.0 * weights + attention + 2.0 * weights + 2.0 * attention
}
