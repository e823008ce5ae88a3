//! Gradient checkpointing recomputes each decoder layer in the backward pass: loss and every
//! LoRA gradient equal those of the plain backward pass (dense and packed rows, GQA, biases,
//! tied embeddings, a sliding window), and adapters with dropout are refused.

mod common;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::*;
use hone_model::lora::LoraSettings;
use hone_model::loss::causal_lm_loss_sum;
use hone_model::Input;
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig};

type Ad = Autodiff<Cpu>;

fn model(name: &str, window: Option<usize>) -> CausalLm<Ad> {
    model_with_adapter(name, |c| {
        if window.is_some() {
            c.sliding_window = vec![window; c.num_layers];
        }
    })
}
struct Batch {
    ids: Vec<i64>,
    labels: Vec<i64>,
    positions: Vec<u32>,
    segments: Vec<u32>,
}

const BATCH: usize = 2;
const SEQ: usize = 20;

fn batch(vocab: i64) -> Batch {
    let ids: Vec<i64> = (0..(BATCH * SEQ) as i64)
        .map(|i| (i * 37 + 11) % vocab)
        .collect();
    let mut labels = ids.clone();
    labels[3] = -100;
    labels[25] = -100;
    let n = (BATCH * SEQ) as u32;
    Batch {
        ids,
        labels,
        positions: (0..n).map(|i| i % 8).collect(),
        segments: (0..n).map(|i| i / 8 + 1).collect(),
    }
}

fn ids(b: &Batch) -> Tensor<Ad, 2, Int> {
    Tensor::from_data(
        TensorData::new(b.ids.clone(), [BATCH, SEQ]),
        &Default::default(),
    )
}

fn plain(m: &CausalLm<Ad>, b: &Batch, packed: bool) -> (f32, Vec<Vec<f32>>) {
    let logits = if packed {
        m.forward(Input::new(ids(b)).packed(&b.positions, &b.segments))
    } else {
        m.forward(Input::new(ids(b)))
    };
    let (sum, _) = causal_lm_loss_sum(logits, &b.labels);
    let loss = host(sum.clone())[0];
    let grads = sum.backward();
    let mut out = Vec::new();
    for (_, linear) in m.projections() {
        if let Some(lora) = linear.lora() {
            out.push(host(lora.lora_a.grad(&grads).unwrap()));
            out.push(host(lora.lora_b.grad(&grads).unwrap()));
        }
    }
    (loss, out)
}

fn checkpointed(m: &CausalLm<Ad>, b: &Batch, packed: bool) -> (f32, Vec<Vec<f32>>) {
    let packing = packed.then_some((&b.positions[..], &b.segments[..]));
    let out = m
        .checkpointed_gradients(ids(b), packing, &b.labels)
        .unwrap();
    (
        host(out.loss_sum)[0],
        out.grads.into_iter().map(host).collect(),
    )
}

#[test]
fn checkpointed_layers_give_the_same_loss_and_gradients() {
    for (name, window) in [
        ("llama_gqa", None),
        ("qwen2_tied", None),
        ("llama_gqa", Some(5)),
    ] {
        let m = model(name, window);
        let b = batch(m.config().vocab_size as i64);
        for packed in [false, true] {
            let reference = plain(&m, &b, packed);
            let recomputed = checkpointed(&m, &b, packed);
            let what = format!("{name} window {window:?} packed {packed}");
            assert!(
                (reference.0 - recomputed.0).abs() <= 1e-6 * reference.0.abs(),
                "{what}: loss {} vs {}",
                reference.0,
                recomputed.0
            );
            assert_eq!(reference.1.len(), 28, "{what}: 14 adapters, A and B each");
            assert_eq!(reference.1.len(), recomputed.1.len());
            for (i, (a, c)) in reference.1.iter().zip(&recomputed.1).enumerate() {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(c).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-5 * scale + 1e-8,
                    "{what} gradient {i}: max diff {diff:e} (largest {scale:e})"
                );
            }
        }
    }
}

#[test]
fn checkpointing_refuses_adapters_with_dropout() {
    let dir = fixture("llama_gqa");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut m = CausalLm::<Ad>::random(&config, &Default::default(), LoadOptions::default());
    let mut settings = LoraSettings::new(4, 8.0, &["q_proj", "v_proj"]);
    settings.dropout = 0.1;
    m.attach_lora(&settings).unwrap();
    let b = batch(config.vocab_size as i64);
    let err = m
        .checkpointed_gradients(ids(&b), None, &b.labels)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropout"), "{err}");
}
