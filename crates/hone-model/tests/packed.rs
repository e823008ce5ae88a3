//! Packed rows: several examples in one row, positions restarting per example and attention
//! confined to each example, give the same per-token logits and loss as each example alone.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::loss::causal_lm_loss;
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig, WeightStore};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn model<B: Backend>(name: &str) -> CausalLm<B> {
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let mut m = CausalLm::from_store(&config, &store, &Default::default(), LoadOptions::default())
        .unwrap()
        .0;
    m.load_adapter(&dir.join("adapter")).unwrap();
    m
}

fn ids<B: Backend>(v: &[i64], batch: usize) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [batch, v.len() / batch]),
        &Default::default(),
    )
}

fn vec3<B: Backend>(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Three examples of lengths 5, 9 and 4 packed into one row of 20 (2 padding tokens, segment 0).
fn examples() -> Vec<Vec<i64>> {
    vec![
        vec![509, 51, 441, 220, 435],
        vec![509, 272, 74, 299, 295, 86, 77, 285, 78],
        vec![509, 87, 220, 73],
    ]
}

fn packed_row() -> (Vec<i64>, Vec<u32>, Vec<u32>) {
    let (mut ids, mut pos, mut seg) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ex) in examples().iter().enumerate() {
        for (p, &id) in ex.iter().enumerate() {
            ids.push(id);
            pos.push(p as u32);
            seg.push(i as u32 + 1);
        }
    }
    while ids.len() < 20 {
        ids.push(511);
        pos.push(0);
        seg.push(0);
    }
    (ids, pos, seg)
}

#[test]
fn packed_rows_do_not_attend_across_examples() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let m = model::<Cpu>(name);
        let vocab = m.config.vocab_size;
        let (row, pos, seg) = packed_row();
        let packed = vec3(m.forward_packed(ids(&row, 1), &pos, &seg));
        let mut offset = 0;
        for ex in examples() {
            let alone = vec3(m.forward(ids(&ex, 1), None));
            for t in 0..ex.len() {
                let a = &alone[t * vocab..(t + 1) * vocab];
                let p = &packed[(offset + t) * vocab..(offset + t + 1) * vocab];
                let diff = a
                    .iter()
                    .zip(p)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{name}: token {t} of an example at offset {offset}: {diff}"
                );
            }
            offset += ex.len();
        }
        // Without the segment mask the later examples would see the earlier ones.
        let unmasked = vec3(m.forward(ids(&row, 1), None));
        let t = 5 + 3;
        let diff = (0..vocab)
            .map(|v| (unmasked[t * vocab + v] - packed[t * vocab + v]).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff > 1e-3,
            "{name}: the test must be sensitive to cross-example attention"
        );
    }
}

#[test]
fn packed_loss_and_gradients_equal_those_of_the_examples_alone() {
    type Ad = Autodiff<Cpu>;
    let name = "llama_gqa";
    let m = model::<Ad>(name);
    let (row, pos, seg) = packed_row();
    // Labels: every real token after the first of its example (the first label of each example
    // is -100 so that no example predicts the next one's first token); padding ignored.
    let mut labels = Vec::new();
    for ex in examples() {
        labels.push(-100);
        labels.extend_from_slice(&ex[1..]);
    }
    labels.resize(20, -100);
    let packed_loss = causal_lm_loss(m.forward_packed(ids(&row, 1), &pos, &seg), &labels).unwrap();

    // The same tokens as separate sequences: total NLL over total targets.
    let mut total = None;
    let mut count = 0;
    for ex in examples() {
        let (sum, n) = hone_model::loss::causal_lm_loss_sum(m.forward(ids(&ex, 1), None), &ex);
        count += n;
        total = Some(match total {
            None => sum,
            Some(t) => t + sum,
        });
    }
    let separate_loss = total.unwrap() / count as f64;
    let a = packed_loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let b = separate_loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    assert!((a - b).abs() < 1e-5, "packed loss {a} vs separate {b}");

    let ga = packed_loss.backward();
    let gb = separate_loss.backward();
    for (module, linear) in m.projections() {
        let lora = linear.lora.as_ref().unwrap();
        let x = lora
            .lora_b
            .grad(&ga)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let y = lora
            .lora_b
            .grad(&gb)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let diff = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{module}.lora_B gradient differs by {diff}");
    }
}
