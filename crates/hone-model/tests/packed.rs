//! Packed rows: several examples in one row, positions restarting per example and attention
//! confined to each example, give the same per-token logits and loss as each example alone.

mod common;

use burn::backend::Autodiff;
use common::*;
use hone_model::loss::causal_lm_loss;
use hone_model::Cpu;
use hone_model::Input;

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
        let m = model_with_adapter::<Cpu>(name, |_| {});
        let vocab = m.config().vocab_size;
        let (row, pos, seg) = packed_row();
        let packed = host(m.forward(Input::new(ids(&row, 1)).packed(&pos, &seg)));
        let mut offset = 0;
        for ex in examples() {
            let alone = host(m.forward(Input::new(ids(&ex, 1))));
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
        let unmasked = host(m.forward(Input::new(ids(&row, 1))));
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
    let m = model_with_adapter::<Ad>(name, |_| {});
    let (row, pos, seg) = packed_row();
    // Labels: every real token after the first of its example (the first label of each example
    // is -100 so that no example predicts the next one's first token); padding ignored.
    let mut labels = Vec::new();
    for ex in examples() {
        labels.push(-100);
        labels.extend_from_slice(&ex[1..]);
    }
    labels.resize(20, -100);
    let packed_loss = causal_lm_loss(
        m.forward(Input::new(ids(&row, 1)).packed(&pos, &seg)),
        &labels,
    )
    .unwrap();

    // The same tokens as separate sequences: total NLL over total targets.
    let mut total = None;
    let mut count = 0;
    for ex in examples() {
        let (sum, n) =
            hone_model::loss::causal_lm_loss_sum(m.forward(Input::new(ids(&ex, 1))), &ex);
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
        let lora = linear.lora().unwrap();
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
