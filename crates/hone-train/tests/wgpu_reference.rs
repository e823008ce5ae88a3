//! The training step on burn's wgpu backend (CI: Mesa's lavapipe, see `.ci/run`), in f32: the
//! loss and every LoRA gradient of the fixtures' labelled batch, as one micro-batch and
//! accumulated over two, and one AdamW step against PyTorch + PEFT (as `reference.rs` on the
//! CPU); then a few steps of a whole run on stories260k (data, schedule, evaluation,
//! checkpoints, adapter) resumed on wgpu from a CPU checkpoint, against the same steps resumed
//! on the CPU. The CPU runs hone's fused kernels, wgpu the composed burn operations that CUDA
//! runs.
//!
//! Tolerances: the CPU tests' own for the loss (1e-5), the gradients (1e-5 relative or 1e-7
//! absolute) and the AdamW step (1e-6, or 1e-4 where |g| < 1e-5: Adam divides by |g| + eps and
//! so amplifies rounding differences of tiny gradients). Measured on lavapipe: gradients within
//! 6e-8, the AdamW step within 4e-5 (a tiny-gradient element). The resumed run: the last loss
//! within 1e-4 relative and the adapters within 5e-4, a tenth of one step's update at lr 5e-3,
//! as three more Adam steps amplify the same differences (measured: 4e-7 relative and 5e-5).

mod common;
#[path = "../../hone-model/tests/wgpu_common/mod.rs"]
mod wgpu_common;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use common::{adapter_tensors, config, serial, write_data, StopAfter};
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig, WeightStore};
use hone_train::step::{adapter_keys, adapter_values};
use hone_train::{train_on, AdamWConfig, Learner, MicroBatch, RunOptions, Silent};
use wgpu_common::{device, Wgpu};

type Ad = Autodiff<Wgpu>;

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

/// The fixture's base model with PEFT's adapter, under autodiff on wgpu.
fn learner(name: &str, config: AdamWConfig) -> Learner<Ad> {
    let dir = fixture(name);
    let model_config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let (mut model, _) =
        CausalLm::<Ad>::from_store(&model_config, &store, &device(), LoadOptions::default())
            .unwrap();
    model.load_adapter(&dir.join("adapter")).unwrap();
    Learner::new(model, config, 0.0, device())
}

/// `refs/train_batch.safetensors`: as one micro-batch of two rows, and as two of one row.
fn train_batches(name: &str) -> (MicroBatch, [MicroBatch; 2]) {
    let batch = refs(name, "train_batch.safetensors");
    let (ids, shape) = batch.load_i64("input_ids").unwrap();
    let (labels, _) = batch.load_i64("labels").unwrap();
    let s = shape[1];
    let row = |r: usize| {
        MicroBatch::dense(
            ids[r * s..(r + 1) * s].to_vec(),
            labels[r * s..(r + 1) * s].to_vec(),
            1,
        )
    };
    (
        MicroBatch::dense(ids.clone(), labels.clone(), 2),
        [row(0), row(1)],
    )
}

#[test]
fn training_step_gradients_and_adamw_step_match_torch_on_wgpu() {
    let _guard = serial();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    for name in FIXTURES {
        let mut learner = learner(name, adamw);
        let (batch, rows) = train_batches(name);
        let reference = refs(name, "lora_grads.safetensors");
        let expected_loss = f64::from(f32s(&reference, "loss")[0]);
        let keys = adapter_keys(&learner.model);
        assert_eq!(keys.len(), reference.names().len() - 1, "{name}");
        for (what, batches) in [("one batch", vec![batch.clone()]), ("2 x 1", rows.to_vec())] {
            let step = learner.gradients(&batches).unwrap();
            eprintln!(
                "{name} ({what}): loss {} vs PEFT {expected_loss}",
                step.loss
            );
            assert!(
                (step.loss - expected_loss).abs() < 1e-5,
                "{name} ({what}): loss {} vs PEFT {expected_loss}",
                step.loss
            );
            let mut worst = 0f32;
            for (key, grad) in keys.iter().zip(&step.grads) {
                let ours = grad.clone().into_data().to_vec::<f32>().unwrap();
                let expected = f32s(&reference, key);
                assert_eq!(ours.len(), expected.len(), "{key}");
                for (i, (g, e)) in ours.iter().zip(&expected).enumerate() {
                    let err = (g - e).abs();
                    worst = worst.max(err);
                    assert!(
                        err <= 1e-7 || err <= 1e-5 * e.abs(),
                        "{name} ({what}): {key}[{i}]: {g} vs PEFT {e}"
                    );
                }
            }
            eprintln!("{name} ({what}): worst absolute gradient error {worst:e}");
        }

        let outcome = learner.step(std::slice::from_ref(&batch), 1e-2).unwrap();
        assert!(outcome.applied);
        let after = refs(name, "adamw_step.safetensors");
        let mut worst = 0f32;
        for (key, value) in keys.iter().zip(adapter_values(&learner.model)) {
            let ours = value.into_data().to_vec::<f32>().unwrap();
            let g = f32s(&reference, key);
            for (i, (p, e)) in ours.iter().zip(f32s(&after, key)).enumerate() {
                let tolerance = if g[i].abs() < 1e-5 { 1e-4 } else { 1e-6 };
                worst = worst.max((p - e).abs());
                assert!(
                    (p - e).abs() <= tolerance,
                    "{name}: {key}[{i}] (grad {}): {p} vs torch {e}",
                    g[i]
                );
            }
        }
        let loss_after = learner.gradients(&[batch]).unwrap().loss;
        let expected = f64::from(f32s(&after, "loss_after")[0]);
        eprintln!(
            "{name}: AdamW step: worst parameter error {worst:e}; loss after {loss_after} vs \
             torch {expected}"
        );
        assert!(
            (loss_after - expected).abs() < 1e-5,
            "{name}: loss after the step {loss_after} vs torch {expected}"
        );
    }
}

#[test]
fn stories260k_run_resumed_on_wgpu_matches_the_run_resumed_on_the_cpu() {
    // Both runs take their first step on the CPU (bit-identical: same seed, same data) and
    // resume from its checkpoint, one on the CPU and one on wgpu: what is compared is the resume
    // (optimizer state, schedule, data position) across backends. (Fresh adapters are the same on
    // both anyway: LoRA A is drawn on the CPU, hone-model's wgpu_reference checks it.)
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 4\ngrad_accum = 2\nsave_every = 1\neval_every = 2";
    let run_config = |dir: &str| config(&data, &tmp.path().join(dir), extra, &[]);
    let resume = || RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    for dir in ["cpu", "wgpu"] {
        let first = train_on::<Autodiff<Cpu>>(
            &run_config(dir),
            RunOptions::default(),
            &mut StopAfter(1),
            Default::default(),
        )
        .unwrap();
        assert_eq!(first.step, 1);
    }
    let on_cpu = train_on::<Autodiff<Cpu>>(
        &run_config("cpu"),
        resume(),
        &mut Silent,
        Default::default(),
    )
    .unwrap();
    let on_wgpu = train_on::<Ad>(&run_config("wgpu"), resume(), &mut Silent, device()).unwrap();
    for summary in [&on_cpu, &on_wgpu] {
        assert_eq!(summary.resumed_from, Some(1));
        assert!(summary.completed);
    }

    let (a, b) = (on_cpu.last_loss.unwrap(), on_wgpu.last_loss.unwrap());
    eprintln!("stories260k: last loss cpu {a} vs wgpu {b}");
    assert!(
        (a - b).abs() <= 1e-4 * a.abs(),
        "last loss cpu {a} vs wgpu {b}"
    );
    let cpu = adapter_tensors(on_cpu.adapter_dir.as_ref().unwrap());
    let wgpu = adapter_tensors(on_wgpu.adapter_dir.as_ref().unwrap());
    let diff = common::max_abs_diff(&cpu, &wgpu);
    eprintln!("stories260k: adapters after 3 resumed steps differ by {diff:e}");
    assert!(diff <= 5e-4, "cpu vs wgpu adapters differ by {diff}");
}
