//! LoRA on a quantized GGUF base (QLoRA-style): `model.path` names a GGUF file whose projections
//! stay in their block formats on the CPU while f32 adapters train over them.
//!
//! The base is `fixtures/gguf/llama_gqa_quant.gguf` (the transformers llama_gqa fixture with its
//! projections quantized by gguf-py to Q4_0..Q8_0, see fixtures/gguf/README.md). The quantized
//! products are checked against a second implementation of the same model: the weights decoded
//! to dense f32 at load (`model.dequantize`, decoding checked bit for bit against gguf-py in
//! hone-model's tests), multiplied by burn's GEMM.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use common::*;
use hone_model::Cpu;
use hone_train::{train_on, RunConfig, RunOptions, RunSummary, Silent, TrainError};

type Ad = Autodiff<Cpu>;

fn run(config: &RunConfig, options: RunOptions) -> Result<RunSummary, TrainError> {
    train_on::<Ad>(config, options, &mut Silent, Default::default())
}

fn quant_gguf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/llama_gqa_quant.gguf")
}

/// [`config`] on the quantized GGUF, every projection adapted.
fn gguf_config(data: &Path, out: &Path, extra: &str, sets: &[&str]) -> RunConfig {
    let model = format!("model.path={:?}", quant_gguf().display().to_string());
    let mut all: Vec<&str> = vec![
        &model,
        "lora.target_modules=[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]",
    ];
    all.extend(sets);
    config(data, out, extra, &all)
}

fn lora_b_moved(adapter: &[(String, Vec<f32>)]) -> bool {
    adapter
        .iter()
        .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0))
}

#[test]
fn adapters_train_over_quantized_weights_as_over_the_dequantized_model() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 6\nlog_every = 1";
    let quant = run(
        &gguf_config(&data, &tmp.path().join("quant"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    assert!(quant.completed);
    let dense = run(
        &gguf_config(
            &data,
            &tmp.path().join("dense"),
            extra,
            &["model.dequantize=true"],
        ),
        RunOptions::default(),
    )
    .unwrap();
    let a = adapter_tensors(quant.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(dense.adapter_dir.as_ref().unwrap());
    assert!(lora_b_moved(&a), "training left lora_B at zero");
    // Every projection of both layers has an adapter (7 modules x 2 layers x A, B).
    assert_eq!(
        a.len(),
        28,
        "{:?}",
        a.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff <= 1e-4,
        "quantized products vs dequantized f32 weights: adapters differ by {diff:e}"
    );
    // The losses of the two runs follow each other step by step.
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v.get("train/loss").and_then(|x| x.as_f64()))
            .collect()
    };
    let (lq, ld) = (losses(&quant.run_dir), losses(&dense.run_dir));
    assert_eq!(lq.len(), 6);
    for (q, d) in lq.iter().zip(&ld) {
        assert!((q - d).abs() <= 1e-4 * d.abs(), "losses {lq:?} vs {ld:?}");
    }
    // The resolved config names the GGUF base, and the adapter says which base it belongs to.
    let saved = std::fs::read_to_string(quant.run_dir.join("config.toml")).unwrap();
    assert!(saved.contains("llama_gqa_quant.gguf"), "{saved}");
    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(quant.adapter_dir.unwrap().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert!(adapter_config["base_model_name_or_path"]
        .as_str()
        .unwrap()
        .ends_with("llama_gqa_quant.gguf"));
}

#[test]
fn a_quantized_base_run_resumes_to_the_uninterrupted_adapter() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 8\ngrad_accum = 2\nsave_every = 4";
    let whole = run(
        &gguf_config(&data, &tmp.path().join("whole"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    let split = gguf_config(&data, &tmp.path().join("split"), extra, &[]);
    let first = train_on::<Ad>(
        &split,
        RunOptions::default(),
        &mut StopAfter(4),
        Default::default(),
    )
    .unwrap();
    assert!(!first.completed && first.step == 4);
    let second = run(
        &split,
        RunOptions {
            resume: true,
            overwrite: false,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(second.resumed_from, Some(4));
    let a = adapter_tensors(whole.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(second.adapter_dir.as_ref().unwrap());
    assert!(lora_b_moved(&a));
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-6, "8 steps vs 4 + resume + 4 differ by {diff:e}");
}

#[test]
fn gradient_checkpointing_on_a_quantized_base_trains_the_same_adapter() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 4\ngrad_accum = 2";
    let plain = run(
        &gguf_config(&data, &tmp.path().join("plain"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    let recomputed = run(
        &gguf_config(
            &data,
            &tmp.path().join("recomputed"),
            extra,
            &["train.gradient_checkpointing=true"],
        ),
        RunOptions::default(),
    )
    .unwrap();
    let a = adapter_tensors(plain.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(recomputed.adapter_dir.as_ref().unwrap());
    assert!(lora_b_moved(&a));
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-6, "adapters differ by {diff:e}");
}

#[test]
fn the_memory_estimate_counts_quantized_projections_at_their_stored_size() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let quant = gguf_config(&data, &tmp.path().join("a"), "max_steps = 1", &[]);
    let dense = gguf_config(
        &data,
        &tmp.path().join("b"),
        "max_steps = 1",
        &["model.dequantize=true"],
    );
    let estimate = |config: &RunConfig| {
        hone_train::dry_run(config, &RunOptions::default(), hone_train::DryRun::Plan)
            .unwrap()
            .memory
            .weights
    };
    let (q, d) = (estimate(&quant), estimate(&dense));
    // The projections (all quantized in this file, ~4.5-8.5 bits) are most of the parameters.
    assert!(q * 2 < d, "quantized {q} bytes vs dequantized {d} bytes");
}
