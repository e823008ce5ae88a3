//! The reference checks on CUDA (needs an NVIDIA GPU; `--features cuda`; not run by CI, which
//! has no GPU; `scripts/gpu-check.sh` runs it): the fixtures' base, adapter and merged logits
//! against transformers 5.23 + PEFT 0.21.2, the labelled batch's loss and every LoRA gradient
//! against PEFT, one AdamW step against torch, and LoRA on the quantized GGUF bases of
//! `fixtures/gguf/kquant` (decoded at load on CUDA) against PEFT's loss and gradients.
//!
//! Tolerances are TF32's, not the CPU's: burn-cuda 0.21 (cubek-matmul) multiplies f32 matrices
//! on the tensor cores in TF32 (10-bit mantissa, relative rounding 2^-11 ≈ 4.9e-4 per input)
//! whenever the GPU supports it, as PyTorch does with `allow_tf32 = True`. Logits within 2e-3
//! (measured on an H200: 3.8e-4 on the fixtures, 1.3e-3 on the K-quant llama); the loss within
//! 1e-4 relative; each gradient tensor within 1e-2 of PEFT's in relative L2 norm (the elements
//! are printed, not judged: TF32 rounding is relative to the summands, not to the result); the
//! AdamW step within 1e-4 where |g| ≥ 1e-3 (Adam's first step is lr·sign(g), so elements whose
//! gradient is near zero may flip: those are counted and printed). Each test prints the worst
//! values it saw.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::prelude::*;
use common::serial;
use hone_model::adapter::peft_key;
use hone_model::loss::causal_lm_loss;
use hone_model::{load_model_dir, CausalLm, Input, LoadOptions, ModelConfig, WeightStore};
use hone_train::step::{adapter_keys, adapter_values};
use hone_train::{AdamWConfig, Learner, MicroBatch};

type Ad = Autodiff<Cuda>;

const FIXTURES: [&str; 2] = ["llama_gqa", "qwen2_tied"];

fn device() -> CudaDevice {
    CudaDevice::new(0)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn fixture(name: &str) -> PathBuf {
    root().join("peft").join(name)
}

fn refs(name: &str, file: &str) -> WeightStore {
    WeightStore::open_files(&[fixture(name).join("refs").join(file)]).unwrap()
}

fn f32s(store: &WeightStore, key: &str) -> Vec<f32> {
    let shape = store.shape(key).unwrap();
    store.load_f32(key, &shape).unwrap()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn ids<B: Backend>(store: &WeightStore, key: &str) -> Tensor<B, 2, Int> {
    let (ids, shape) = store.load_i64(key).unwrap();
    Tensor::from_data(
        TensorData::new(ids, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `‖a − b‖ / ‖b‖`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn base<B: hone_model::KernelBackend>(name: &str) -> CausalLm<B> {
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    CausalLm::from_store(&config, &store, &device_of::<B>(), LoadOptions::default())
        .unwrap()
        .0
}

fn device_of<B: Backend>() -> B::Device {
    Default::default()
}

#[test]
fn fixture_logits_match_transformers_and_peft_on_cuda() {
    let _guard = serial();
    let _ = device();
    for name in FIXTURES {
        let inputs = refs(name, "inputs.safetensors");
        let mut model = base::<Cuda>(name);
        let logits = |m: &CausalLm<Cuda>| host(m.forward(Input::new(ids(&inputs, "input_ids"))));
        let d_base = max_abs_diff(
            &logits(&model),
            &f32s(&refs(name, "logits_base.safetensors"), "logits"),
        );
        model.load_adapter(&fixture(name).join("adapter")).unwrap();
        let d_adapter = max_abs_diff(
            &logits(&model),
            &f32s(&refs(name, "logits_adapter.safetensors"), "logits"),
        );
        model.merge_lora();
        let d_merged = max_abs_diff(
            &logits(&model),
            &f32s(&refs(name, "logits_merged.safetensors"), "logits"),
        );
        eprintln!("{name}: logits vs transformers/PEFT on CUDA: base {d_base:e}, adapter {d_adapter:e}, merged {d_merged:e}");
        for (what, d) in [
            ("base", d_base),
            ("adapter", d_adapter),
            ("merged", d_merged),
        ] {
            assert!(d < 2e-3, "{name}: {what} logits differ by {d}");
        }
    }
}

/// The fixture's base model with PEFT's adapter, under autodiff on CUDA.
fn learner(name: &str, config: AdamWConfig) -> Learner<Ad> {
    let mut model = base::<Ad>(name);
    model.load_adapter(&fixture(name).join("adapter")).unwrap();
    Learner::new(model, config, 0.0, device())
}

#[test]
fn loss_gradients_and_adamw_step_match_peft_and_torch_on_cuda() {
    let _guard = serial();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    for name in FIXTURES {
        let mut learner = learner(name, adamw);
        let batch = refs(name, "train_batch.safetensors");
        let (input_ids, _) = batch.load_i64("input_ids").unwrap();
        let (labels, _) = batch.load_i64("labels").unwrap();
        let batch = MicroBatch::dense(input_ids, labels, 2);
        let reference = refs(name, "lora_grads.safetensors");
        let expected_loss = f64::from(f32s(&reference, "loss")[0]);
        let keys = adapter_keys(&learner.model);
        let step = learner.gradients(std::slice::from_ref(&batch)).unwrap();
        let loss_rel = (step.loss - expected_loss).abs() / expected_loss.abs();
        let mut worst_rel = 0f64;
        let mut worst_abs = 0f32;
        for (key, grad) in keys.iter().zip(&step.grads) {
            let ours = host(grad.clone());
            let expected = f32s(&reference, key);
            let rel = rel_l2(&ours, &expected);
            worst_rel = worst_rel.max(rel);
            worst_abs = worst_abs.max(max_abs_diff(&ours, &expected));
            assert!(
                rel <= 1e-2,
                "{name}: {key}: relative L2 error {rel:e} vs PEFT"
            );
        }
        eprintln!(
            "{name}: loss {} vs PEFT {expected_loss} (rel {loss_rel:e}); gradients: worst relative \
             L2 {worst_rel:e}, worst element {worst_abs:e}",
            step.loss
        );
        assert!(
            loss_rel <= 1e-4,
            "{name}: loss {} vs PEFT {expected_loss}",
            step.loss
        );

        let outcome = learner.step(std::slice::from_ref(&batch), 1e-2).unwrap();
        assert!(outcome.applied);
        let after = refs(name, "adamw_step.safetensors");
        let (mut worst, mut flipped, mut total) = (0f32, 0usize, 0usize);
        for (key, value) in keys.iter().zip(adapter_values(&learner.model)) {
            let ours = host(value);
            let g = f32s(&reference, key);
            for (i, (p, e)) in ours.iter().zip(f32s(&after, key)).enumerate() {
                total += 1;
                if g[i].abs() < 1e-3 {
                    if (p - e).abs() > 1e-4 {
                        flipped += 1;
                    }
                    continue;
                }
                worst = worst.max((p - e).abs());
                assert!(
                    (p - e).abs() <= 1e-4,
                    "{name}: {key}[{i}] (grad {}): {p} vs torch {e}",
                    g[i]
                );
            }
        }
        eprintln!(
            "{name}: AdamW step: worst parameter error {worst:e} where |g| >= 1e-3; {flipped} of \
             {total} elements with |g| < 1e-3 off by more than 1e-4"
        );
    }
}

#[test]
fn lora_on_quantized_gguf_bases_matches_peft_on_cuda() {
    let _guard = serial();
    let dir = root().join("gguf/kquant");
    for ty in ["q4_0", "q8_0", "q4_k", "q6_k"] {
        let reference =
            WeightStore::open_files(&[dir.join(format!("refs_{ty}.safetensors"))]).unwrap();
        let loaded = load_model_dir::<Ad>(
            &dir.join(format!("tiny_{ty}.gguf")),
            &device(),
            LoadOptions::default(),
        )
        .unwrap();
        let mut model = loaded.model;
        let base_logits = host(model.forward(Input::new(ids(&reference, "input_ids"))));
        let d_logits = max_abs_diff(&base_logits, &f32s(&reference, "logits"));
        model.load_adapter(&dir.join("adapter")).unwrap();
        let (labels, _) = reference.load_i64("labels").unwrap();
        let loss = causal_lm_loss(
            model.forward(Input::new(ids(&reference, "input_ids"))),
            &labels,
        )
        .unwrap();
        let value = host(loss.clone())[0] as f64;
        let expected = f32s(&reference, "loss")[0] as f64;
        let grads = loss.backward();
        let mut worst = 0f64;
        for (module, linear) in model.projections() {
            let lora = linear.lora().unwrap();
            for (which, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
                let ours = host(p.grad(&grads).expect("an adapter gradient"));
                let rel = rel_l2(&ours, &f32s(&reference, &peft_key(&module, which)));
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-2,
                    "{ty}: {module}.{which}: relative L2 error {rel:e}"
                );
            }
        }
        eprintln!(
            "{ty}: base logits vs transformers {d_logits:e}; loss {value} vs PEFT {expected}; \
             gradients: worst relative L2 {worst:e}"
        );
        assert!(d_logits < 2e-3, "{ty}: base logits differ by {d_logits}");
        assert!(
            (value - expected).abs() / expected.abs() <= 1e-4,
            "{ty}: loss {value} vs {expected}"
        );
    }
}
