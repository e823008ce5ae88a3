//! Serving several sequences together: per-row caches and per-row adapters give each row exactly
//! what it computes alone.

use hone_model::Input;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::generate::argmax;
use hone_model::{CausalLm, Cpu, KvCache, LoadOptions, ModelConfig, WeightStore};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn base(name: &str) -> CausalLm<Cpu> {
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    CausalLm::from_store(&config, &store, &Default::default(), LoadOptions::default())
        .unwrap()
        .0
}

/// A second adapter: the fixture's with lora_B negated (a different, valid adapter).
fn negated_adapter(name: &str) -> tempfile::TempDir {
    let src = fixture(name).join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let store = WeightStore::open_files(&[src.join("adapter_model.safetensors")]).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let sign = if n.contains("lora_B") { -1.0f32 } else { 1.0 };
            let bytes = store
                .load_f32(&n, &shape)
                .unwrap()
                .iter()
                .flat_map(|v| (v * sign).to_le_bytes())
                .collect();
            (n, shape, bytes)
        })
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("adapter_model.safetensors"))
        .unwrap();
    tmp
}

fn ids(v: &[i64]) -> Tensor<Cpu, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [1, v.len()]),
        &Default::default(),
    )
}

/// Greedy continuation of `prompt` computed alone with full forward passes (no cache).
fn alone(model: &CausalLm<Cpu>, prompt: &[i64], steps: usize) -> (Vec<i64>, Vec<Vec<f32>>) {
    let mut seq = prompt.to_vec();
    let mut all_logits = Vec::new();
    for _ in 0..steps {
        let logits = model
            .forward(Input::new(ids(&seq)).last_logits())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let next = argmax(&logits) as i64;
        all_logits.push(logits);
        seq.push(next);
    }
    (seq[prompt.len()..].to_vec(), all_logits)
}

#[test]
fn rows_with_different_adapters_and_lengths_decode_as_if_alone() {
    let name = "llama_gqa";
    let neg = negated_adapter(name);
    // Server model: base weights, adapters in slots 0 and 1.
    let mut server = base(name);
    server
        .load_adapter_slot(&fixture(name).join("adapter"), 0)
        .unwrap();
    server.load_adapter_slot(neg.path(), 1).unwrap();
    // Reference models, one per configuration, run alone.
    let plain = base(name);
    let mut with_a = base(name);
    with_a.load_adapter(&fixture(name).join("adapter")).unwrap();
    let mut with_b = base(name);
    with_b.load_adapter(neg.path()).unwrap();

    let prompts: Vec<Vec<i64>> = vec![
        vec![509, 51, 441, 220, 435],
        vec![509, 272, 74],
        vec![509, 87, 220, 73, 12, 99, 100],
    ];
    let slots = [Some(0), None, Some(1)];
    let refs = [&with_a, &plain, &with_b];
    let steps = 6;
    let expected: Vec<_> = prompts
        .iter()
        .zip(refs)
        .map(|(p, m)| alone(m, p, steps))
        .collect();

    // Prefill each row on its own, then decode all rows together.
    let mut caches: Vec<KvCache<Cpu>> = (0..3).map(|_| KvCache::new(2)).collect();
    let vocab = server.config().vocab_size;
    let mut next = Vec::new();
    for (r, p) in prompts.iter().enumerate() {
        let logits = server.forward(
            Input::new(ids(p))
                .row_caches(&mut [&mut caches[r]])
                .adapters_per_row([slots[r]].to_vec())
                .last_logits(),
        );
        let logits = logits.into_data().to_vec::<f32>().unwrap();
        let diff = logits
            .iter()
            .zip(&expected[r].1[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "row {r} prefill differs by {diff}");
        next.push(argmax(&logits) as i64);
    }
    let mut generated: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
    for step in 1..steps {
        let tokens = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(next.clone(), [3, 1]),
            &Default::default(),
        );
        let mut refs: Vec<&mut KvCache<Cpu>> = caches.iter_mut().collect();
        let logits = server
            .forward(
                Input::new(tokens)
                    .row_caches(&mut refs)
                    .adapters_per_row(slots.to_vec())
                    .last_logits(),
            )
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        next.clear();
        for r in 0..3 {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let diff = row
                .iter()
                .zip(&expected[r].1[step])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "row {r} step {step} differs by {diff}");
            next.push(argmax(row) as i64);
            generated[r].push(next[r]);
        }
    }
    for r in 0..3 {
        assert_eq!(
            generated[r], expected[r].0,
            "row {r}: greedy tokens in a batch equal those alone"
        );
    }
    // The adapters matter: rows 0 and 2 would differ from the base model.
    assert_ne!(expected[0].1[0], alone(&plain, &prompts[0], 1).1[0]);

    // Unloading a slot makes its rows use the base model.
    server.unload_adapter_slot(1);
    let mut cache = KvCache::new(2);
    let logits = server
        .forward(
            Input::new(ids(&prompts[2]))
                .row_caches(&mut [&mut cache])
                .adapters_per_row([Some(1)].to_vec())
                .last_logits(),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let base_logits = alone(&plain, &prompts[2], 1).1.remove(0);
    let diff = logits
        .iter()
        .zip(&base_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
}
