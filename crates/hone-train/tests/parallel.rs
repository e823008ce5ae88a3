//! Data-parallel training (`train.devices`): two CPU peers against one device, on the PEFT
//! fixture's model (steps) and on the shipped stories260k (whole runs, resume), the
//! token-count normalisation across peers with unequal targets, and a failing peer.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::prelude::*;
use common::*;
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig, WeightStore};
use hone_train::step::{adapter_values, StepGradients};
use hone_train::{
    train_on, AdamWConfig, DataParallel, Learner, MicroBatch, ParallelConfig, RunOptions, Silent,
    TrainError,
};

type Ad = Autodiff<Cpu>;

/// The acceptance tolerance of data-parallel against one device.
const TOLERANCE: f32 = 1e-5;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft/llama_gqa")
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

/// The fixture's base model with its PEFT adapter, under autodiff.
fn learner() -> Learner<Ad> {
    let dir = fixture();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let (mut model, _) =
        CausalLm::<Ad>::from_store(&config, &store, &Default::default(), LoadOptions::default())
            .unwrap();
    model.load_adapter(&dir.join("adapter")).unwrap();
    Learner::new(model, adamw(), 1.0, Default::default())
}

fn parallel(learner: &mut Learner<Ad>, n: usize) -> DataParallel<Ad> {
    DataParallel::start(
        &mut learner.model,
        &learner.optimizer,
        &vec![Default::default(); n],
        ParallelConfig {
            max_grad_norm: learner.max_grad_norm,
            timeout: Duration::from_secs(60),
        },
    )
    .unwrap()
}

/// Four rows: the fixture's two and the same ids with other label masks.
fn four_rows() -> MicroBatch {
    let store = WeightStore::open_files(&[fixture().join("refs/train_batch.safetensors")]).unwrap();
    let (ids, _) = store.load_i64("input_ids").unwrap();
    let (labels, _) = store.load_i64("labels").unwrap();
    let mut all_ids = ids.clone();
    all_ids.extend_from_slice(&ids);
    let mut all_labels = labels;
    all_labels.extend(ids.iter().enumerate().map(|(i, &id)| {
        if i % 32 < 12 || i % 5 == 0 {
            -100
        } else {
            id
        }
    }));
    MicroBatch::dense(all_ids, all_labels, 4)
}

/// Rows `rows` of `batch` as one micro-batch.
fn rows(batch: &MicroBatch, rows: std::ops::Range<usize>) -> MicroBatch {
    let s = batch.seq;
    MicroBatch::dense(
        batch.input_ids[rows.start * s..rows.end * s].to_vec(),
        batch.labels[rows.start * s..rows.end * s].to_vec(),
        rows.len(),
    )
}

fn values(tensors: &[Tensor<Cpu, 2>]) -> Vec<f32> {
    tensors
        .iter()
        .flat_map(|t| t.clone().into_data().to_vec::<f32>().unwrap())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn adapter(learner: &Learner<Ad>) -> Vec<f32> {
    let inner: Vec<Tensor<Cpu, 2>> = adapter_values(&learner.model)
        .into_iter()
        .map(|t| t.inner())
        .collect();
    values(&inner)
}

fn assert_same_gradients(one: &StepGradients<Cpu>, two: &StepGradients<Cpu>, what: &str) -> f32 {
    assert_eq!(one.targets, two.targets, "{what}: targets");
    assert_eq!(one.tokens, two.tokens, "{what}: tokens");
    assert!(
        (one.loss - two.loss).abs() < TOLERANCE as f64,
        "{what}: loss {} vs {}",
        one.loss,
        two.loss
    );
    let diff = max_diff(&values(&one.grads), &values(&two.grads));
    assert!(diff <= TOLERANCE, "{what}: gradients differ by {diff}");
    diff
}

#[test]
fn two_peers_match_one_device_with_the_doubled_batch() {
    let _guard = serial();
    let batch = four_rows();
    let halves = [rows(&batch, 0..2), rows(&batch, 2..4)];
    let mut one = learner();
    let mut two = learner();
    let mut dp = parallel(&mut two, 2);
    let (mut worst_grad, mut worst_adapter) = (0f32, 0f32);
    for step in 0..4 {
        let expected = one.gradients(std::slice::from_ref(&batch)).unwrap();
        let got = dp.gradients(&two.model, step, &halves, None).unwrap();
        worst_grad = worst_grad.max(assert_same_gradients(
            &expected,
            &got,
            &format!("step {step}"),
        ));
        let a = one.step(std::slice::from_ref(&batch), 1e-2).unwrap();
        let b = dp
            .step(
                &mut two.model,
                &mut two.optimizer,
                step,
                &halves,
                None,
                1e-2,
            )
            .unwrap();
        assert!(a.applied && b.applied);
        assert_eq!((a.targets, a.tokens), (b.targets, b.tokens));
        assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-5);
        let diff = max_diff(&adapter(&one), &adapter(&two));
        assert!(diff <= TOLERANCE, "step {step}: adapters differ by {diff}");
        worst_adapter = worst_adapter.max(diff);
    }
    assert_eq!(two.optimizer.step, 4);
    dp.finish().unwrap();
    eprintln!("2 peers vs 1 device, 4 steps: max |grad diff| {worst_grad:e}, max |adapter diff| {worst_adapter:e}");
}

#[test]
fn peers_with_unequal_target_counts_weigh_by_tokens() {
    let _guard = serial();
    // Row 0 keeps most of its labels, row 1 only a handful: a mean of per-peer means would
    // weigh row 1's few tokens as much as row 0's many.
    let mut batch = rows(&four_rows(), 0..2);
    let seq = batch.seq;
    for (i, label) in batch.labels[seq..].iter_mut().enumerate() {
        if i % 8 != 3 {
            *label = -100;
        }
    }
    let parts = [rows(&batch, 0..1), rows(&batch, 1..2)];
    let one = learner();
    let expected = one.gradients(std::slice::from_ref(&batch)).unwrap();
    let first = one.gradients(&parts[..1]).unwrap();
    let second = one.gradients(&parts[1..]).unwrap();
    assert!(first.targets > 5 * second.targets, "the counts are unequal");
    let mean_of_means = (first.loss + second.loss) / 2.0;
    assert!(
        (mean_of_means - expected.loss).abs() > 1e-2,
        "the test can tell the two normalisations apart"
    );

    let mut two = learner();
    let mut dp = parallel(&mut two, 2);
    let got = dp.gradients(&two.model, 0, &parts, None).unwrap();
    assert_same_gradients(&expected, &got, "2 peers, unequal targets");
    dp.finish().unwrap();

    // Three peers over two micro-batches: the third gets none and adds nothing.
    let mut three = learner();
    let mut dp = parallel(&mut three, 3);
    let got = dp.gradients(&three.model, 0, &parts, None).unwrap();
    assert_same_gradients(&expected, &got, "3 peers, one idle");
    dp.finish().unwrap();
}

#[test]
fn a_failing_peer_ends_the_step_with_an_error_not_a_hang() {
    let _guard = serial();
    let batch = four_rows();
    let mut broken = rows(&batch, 2..4);
    broken.labels.truncate(5);
    let mut two = learner();
    let mut dp = parallel(&mut two, 2);
    let started = Instant::now();
    let err = dp
        .step(
            &mut two.model,
            &mut two.optimizer,
            0,
            &[rows(&batch, 0..2), broken],
            None,
            1e-2,
        )
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainError::Parallel { .. }), "{message}");
    assert!(
        message.contains("peer 1") && message.contains("step 1") && message.contains("panicked"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(dp);

    // The collective recovers: a new session in the same process works.
    let one = learner();
    let mut two = learner();
    let mut dp = parallel(&mut two, 2);
    let halves = [rows(&batch, 0..2), rows(&batch, 2..4)];
    let expected = one.gradients(std::slice::from_ref(&batch)).unwrap();
    let got = dp.gradients(&two.model, 0, &halves, None).unwrap();
    assert_same_gradients(&expected, &got, "after a failed session");
    dp.finish().unwrap();
}

#[test]
fn two_devices_train_as_one_device_accumulating_their_micro_batches_and_resume_exactly() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    // Dropout on: the peers' masks must be those of one device.
    let base = "max_steps = 8\nsave_every = 4\nlog_every = 1";
    let sets = ["lora.dropout=0.1"];
    let two_devices = |dir: &str| {
        config(
            &data,
            &tmp.path().join(dir),
            &format!("{base}\ndevices = [\"cpu\", \"cpu\"]"),
            &sets,
        )
    };
    let one = train_on::<Ad>(
        &config(
            &data,
            &tmp.path().join("one"),
            &format!("{base}\ngrad_accum = 2"),
            &sets,
        ),
        RunOptions::default(),
        &mut Silent,
        Default::default(),
    )
    .unwrap();
    let two = train_on::<Ad>(
        &two_devices("two"),
        RunOptions::default(),
        &mut Silent,
        Default::default(),
    )
    .unwrap();
    assert!(one.completed && two.completed);
    assert_eq!(one.total_steps, two.total_steps);
    let a = adapter_tensors(one.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(two.adapter_dir.as_ref().unwrap());
    let diff = max_abs_diff(&a, &b);
    eprintln!("whole run, 2 devices vs 1 device with grad_accum 2: max |adapter diff| {diff:e}");
    assert!(diff <= TOLERANCE, "adapters differ by {diff}");
    let loss_diff = (one.last_loss.unwrap() - two.last_loss.unwrap()).abs();
    assert!(loss_diff < 1e-5, "last losses differ by {loss_diff}");

    // Stopped after the checkpoint of step 4 and resumed: the same adapter, bit for bit.
    let split = two_devices("split");
    let first = train_on::<Ad>(
        &split,
        RunOptions::default(),
        &mut StopAfter(4),
        Default::default(),
    )
    .unwrap();
    assert!(!first.completed && first.step == 4);
    let second = train_on::<Ad>(
        &split,
        RunOptions {
            resume: true,
            overwrite: false,
            ..RunOptions::default()
        },
        &mut Silent,
        Default::default(),
    )
    .unwrap();
    assert_eq!(second.resumed_from, Some(4));
    let c = adapter_tensors(second.adapter_dir.as_ref().unwrap());
    assert_eq!(max_abs_diff(&b, &c), 0.0, "resumed two-device run");
}
