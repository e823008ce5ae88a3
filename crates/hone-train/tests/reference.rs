//! The training step against PyTorch + PEFT (fixtures/peft, see its README): the loss and every
//! LoRA gradient of the labelled batch, one torch.optim.AdamW step, and gradient accumulation
//! checked against the same references.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig, WeightStore};
use hone_train::step::{adapter_keys, adapter_values};
use hone_train::{AdamWConfig, Learner, MicroBatch};

type Ad = Autodiff<Cpu>;

const FIXTURES: [&str; 2] = ["llama_gqa", "qwen2_tied"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn refs(name: &str, file: &str) -> WeightStore {
    WeightStore::open_files(&[fixture(name).join("refs").join(file)]).unwrap()
}

fn f32s(store: &WeightStore, key: &str) -> Vec<f32> {
    let shape = store.shape(key).unwrap();
    store.load_f32(key, &shape).unwrap()
}

/// The fixture's base model with PEFT's adapter loaded, under autodiff.
fn learner(name: &str, config: AdamWConfig, max_grad_norm: f64) -> Learner<Ad> {
    let dir = fixture(name);
    let model_config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let (mut model, _) = CausalLm::<Ad>::from_store(
        &model_config,
        &store,
        &Default::default(),
        LoadOptions::default(),
    )
    .unwrap();
    model.load_adapter(&dir.join("adapter")).unwrap();
    Learner::new(model, config, max_grad_norm, Default::default())
}

/// `refs/train_batch.safetensors` as one micro-batch of two rows.
fn train_batch(name: &str) -> MicroBatch {
    let batch = refs(name, "train_batch.safetensors");
    let (ids, shape) = batch.load_i64("input_ids").unwrap();
    let (labels, _) = batch.load_i64("labels").unwrap();
    MicroBatch::dense(ids, labels, shape[0])
}

/// Row `r` of a micro-batch alone.
fn row(batch: &MicroBatch, r: usize) -> MicroBatch {
    let s = batch.seq;
    MicroBatch::dense(
        batch.input_ids[r * s..(r + 1) * s].to_vec(),
        batch.labels[r * s..(r + 1) * s].to_vec(),
        1,
    )
}

fn assert_close_to_peft(name: &str, learner: &Learner<Ad>, grads: &[Tensor<Cpu, 2>], what: &str) {
    let reference = refs(name, "lora_grads.safetensors");
    let keys = adapter_keys(&learner.model);
    assert_eq!(
        keys.len(),
        reference.names().len() - 1,
        "{name}: every reference gradient is checked"
    );
    for (key, grad) in keys.iter().zip(grads) {
        let ours = grad.clone().into_data().to_vec::<f32>().unwrap();
        let expected = f32s(&reference, key);
        assert_eq!(ours.len(), expected.len(), "{key}");
        for (i, (g, e)) in ours.iter().zip(&expected).enumerate() {
            let ok = (g - e).abs() <= 1e-7 || (g - e).abs() <= 1e-5 * e.abs();
            assert!(ok, "{name} ({what}): {key}[{i}]: {g} vs PEFT {e}");
        }
    }
}

#[test]
fn training_step_loss_and_lora_gradients_match_peft() {
    for name in FIXTURES {
        let learner = learner(name, AdamWConfig::default(), 0.0);
        let step = learner.gradients(&[train_batch(name)]).unwrap();
        let expected = f32s(&refs(name, "lora_grads.safetensors"), "loss")[0] as f64;
        assert!(
            (step.loss - expected).abs() < 1e-5,
            "{name}: loss {} vs PEFT {expected}",
            step.loss
        );
        assert_close_to_peft(name, &learner, &step.grads, "one batch");
    }
}

#[test]
fn accumulated_micro_batches_normalise_by_all_target_tokens() {
    // The two rows have different numbers of targets (row 0 ignores 3 labels, row 1 five), so
    // averaging per micro-batch would give a different gradient than PEFT's batch of two.
    for name in FIXTURES {
        let learner = learner(name, AdamWConfig::default(), 0.0);
        let batch = train_batch(name);
        let step = learner
            .gradients(&[row(&batch, 0), row(&batch, 1)])
            .unwrap();
        let expected = f32s(&refs(name, "lora_grads.safetensors"), "loss")[0] as f64;
        assert!(
            (step.loss - expected).abs() < 1e-5,
            "{name}: accumulated loss {} vs {expected}",
            step.loss
        );
        assert_eq!(
            step.targets,
            2 * 31 - 3 - 4,
            "{name}: targets of both rows (shifted)"
        );
        assert_close_to_peft(name, &learner, &step.grads, "2 x 1 accumulated");
    }
}

#[test]
fn four_micro_batches_of_one_equal_one_batch_of_four() {
    let name = "llama_gqa";
    let learner = learner(name, AdamWConfig::default(), 0.0);
    let a = train_batch(name);
    // Four rows: the fixture's two, and the same ids with other label masks.
    let mut ids = a.input_ids.clone();
    ids.extend_from_slice(&a.input_ids);
    let mut labels = a.labels.clone();
    let mut more = a.input_ids.clone();
    for (i, l) in more.iter_mut().enumerate() {
        if i % 32 < 20 || i % 7 == 0 {
            *l = -100;
        }
    }
    labels.extend(more);
    let four = MicroBatch::dense(ids, labels, 4);
    let whole = learner.gradients(std::slice::from_ref(&four)).unwrap();
    let parts: Vec<MicroBatch> = (0..4).map(|r| row(&four, r)).collect();
    let accumulated = learner.gradients(&parts).unwrap();
    assert_eq!(whole.targets, accumulated.targets);
    assert!(
        (whole.loss - accumulated.loss).abs() < 1e-6,
        "{} vs {}",
        whole.loss,
        accumulated.loss
    );
    for (key, (x, y)) in adapter_keys(&learner.model)
        .iter()
        .zip(whole.grads.iter().zip(&accumulated.grads))
    {
        let x = x.clone().into_data().to_vec::<f32>().unwrap();
        let y = y.clone().into_data().to_vec::<f32>().unwrap();
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert!(
                // The gradient tolerance: 1e-5 relative or 1e-7 absolute (summation order
                // over 4×32 vs 32 tokens differs by ~2e-8 on gradients of size 3e-2).
                (p - q).abs() <= 1e-7 + 1e-5 * p.abs(),
                "{key}[{i}]: batch {p} vs accumulated {q}"
            );
        }
    }
}

fn adamw_fixture_config() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn tensor_of(store: &WeightStore, key: &str) -> Tensor<Cpu, 2> {
    let shape = store.shape(key).unwrap();
    let values = store.load_f32(key, &shape).unwrap();
    Tensor::from_data(
        burn::tensor::TensorData::new(values, [shape[0], shape[1]]),
        &Default::default(),
    )
}

#[test]
fn adamw_update_from_peft_gradients_matches_torch_step() {
    // The optimizer alone: torch's gradients and adapter weights in, torch's step out.
    for name in FIXTURES {
        let adapter =
            WeightStore::open_files(&[fixture(name).join("adapter/adapter_model.safetensors")])
                .unwrap();
        let grads = refs(name, "lora_grads.safetensors");
        let expected = refs(name, "adamw_step.safetensors");
        let keys: Vec<String> = adapter.names();
        let params = keys.iter().map(|k| tensor_of(&adapter, k)).collect();
        let g = keys.iter().map(|k| tensor_of(&grads, k)).collect();
        let mut opt = hone_train::AdamW::<Cpu>::new(adamw_fixture_config());
        let updated = opt.update(1e-2, params, g);
        for (key, value) in keys.iter().zip(updated) {
            let ours = value.into_data().to_vec::<f32>().unwrap();
            for (i, (p, e)) in ours.iter().zip(f32s(&expected, key)).enumerate() {
                assert!(
                    (p - e).abs() <= 1e-6,
                    "{name}: {key}[{i}]: {p} vs torch {e}"
                );
            }
        }
    }
}

#[test]
fn one_training_step_matches_torch_adamw_step() {
    // Gradients computed here, then AdamW. Adam divides by |g| + eps, so an element whose
    // gradient is tiny (|g| < 1e-5) amplifies f32 rounding differences of the gradient by
    // lr * eps / (|g| + eps)^2; those get 1e-4, every other element 1e-6.
    for name in FIXTURES {
        let mut learner = learner(name, adamw_fixture_config(), 0.0);
        let batch = train_batch(name);
        let outcome = learner.step(std::slice::from_ref(&batch), 1e-2).unwrap();
        assert!(outcome.applied);
        let reference = refs(name, "adamw_step.safetensors");
        let grads = refs(name, "lora_grads.safetensors");
        let (mut ill_conditioned, mut total) = (0, 0);
        for (key, value) in adapter_keys(&learner.model)
            .iter()
            .zip(adapter_values(&learner.model))
        {
            let ours = value.into_data().to_vec::<f32>().unwrap();
            let g = f32s(&grads, key);
            for (i, (p, e)) in ours.iter().zip(f32s(&reference, key)).enumerate() {
                let tolerance = if g[i].abs() < 1e-5 { 1e-4 } else { 1e-6 };
                ill_conditioned += usize::from(g[i].abs() < 1e-5);
                total += 1;
                assert!(
                    (p - e).abs() <= tolerance,
                    "{name}: {key}[{i}] (grad {}): {p} vs torch {e}",
                    g[i]
                );
            }
        }
        assert!(
            ill_conditioned * 20 < total,
            "{name}: {ill_conditioned} of {total} gradients are tiny"
        );
        let after = learner.gradients(&[batch]).unwrap().loss;
        let expected = f32s(&reference, "loss_after")[0] as f64;
        assert!(
            (after - expected).abs() < 1e-5,
            "{name}: loss after the step {after} vs torch {expected}"
        );
        // The base weights stay frozen.
        assert!(learner
            .model
            .projections()
            .iter()
            .all(|(_, l)| l.weight().is_some_and(|w| !w.is_require_grad())));
    }
}
