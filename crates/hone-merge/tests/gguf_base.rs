//! Merging adapters into a GGUF base (`fixtures/gguf`): the F32 conversions of the PEFT fixtures
//! merged with their adapters give PEFT's `merge_and_unload` tensors and logits, and the
//! quantized tiny llama of `fixtures/gguf/kquant` merged with its adapter gives PEFT's loss on
//! the dequantized model. The written directory is a plain Hugging Face model: its config,
//! tokenizer and generation config come from the GGUF metadata.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use hone_merge::merge;
use hone_model::loss::causal_lm_loss;
use hone_model::{load_model_dir, Cpu, Input, LoadOptions, ModelConfig, Tokenizer, WeightStore};

mod common;

use common::*;

fn gguf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn ids(store: &WeightStore, key: &str) -> Tensor<Cpu, 2, Int> {
    let (ids, shape) = store.load_i64(key).unwrap();
    Tensor::from_data(
        TensorData::new(ids, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn logits(model: &Path, inputs: &WeightStore) -> Vec<f32> {
    let loaded = load_model_dir::<Cpu>(model, &Default::default(), LoadOptions::default()).unwrap();
    loaded
        .model
        .forward(Input::new(ids(inputs, "input_ids")))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn merging_into_an_f32_gguf_base_gives_peft_merged_model() {
    for name in FIXTURES {
        let dir = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let base = gguf_fixture(&format!("{name}.gguf"));
        let report = merge(&options(&base, &[&dir.join("adapter")], &out)).unwrap();
        assert_eq!(
            report.merged_modules, 14,
            "{name}: 7 projections x 2 layers"
        );
        assert_eq!(report.dtype, hone_model::FloatDtype::F32);
        assert_eq!(entries(&out), MERGED_FILES);

        // The configuration transformers wrote for the checkpoint the GGUF was converted from.
        let ours = ModelConfig::from_file(&out.join("config.json")).unwrap();
        let theirs = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"), "{name}");
        assert_eq!(
            read_json(&out.join("config.json"))["torch_dtype"],
            "float32"
        );

        // Tensor by tensor against PEFT's merge (llama's q/k rows back in Hugging Face order).
        assert_tensors_match(&out, &dir.join("merged"), 1e-6, name);

        let inputs = WeightStore::open_files(&[dir.join("refs/inputs.safetensors")]).unwrap();
        let reference = WeightStore::open_files(&[dir.join("refs/logits_merged.safetensors")])
            .unwrap()
            .load_f32("logits", &[2, 32, 512])
            .unwrap();
        let d = max_diff(&logits(&out, &inputs), &reference);
        assert!(d <= 1e-4, "{name}: merged logits vs PEFT's {d}");

        // The tokenizer written from the GGUF vocabulary tokenizes as transformers does.
        let tok = Tokenizer::from_dir(&out).unwrap();
        let samples: serde_json::Value = read_json(&dir.join("refs/tokenization.json"));
        for sample in samples.as_array().unwrap() {
            let text = sample["text"].as_str().unwrap();
            let want: Vec<u32> = sample["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text).unwrap(), want, "{name}: {text:?}");
        }
    }
}

#[test]
fn merging_into_a_quantized_gguf_base_gives_peft_loss() {
    let kquant = gguf_fixture("kquant");
    for ty in ["q4_k", "q8_0"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let base = kquant.join(format!("tiny_{ty}.gguf"));
        let report = merge(&options(&base, &[&kquant.join("adapter")], &out)).unwrap();
        assert_eq!(report.merged_modules, 7, "{ty}");

        // PEFT's loss with the adapter on transformers' dequantized model: merged, the loss is
        // the same (the merge adds s·BA to the decoded weights in f32).
        let reference =
            WeightStore::open_files(&[kquant.join(format!("refs_{ty}.safetensors"))]).unwrap();
        let loaded =
            load_model_dir::<Cpu>(&out, &Default::default(), LoadOptions::default()).unwrap();
        let (labels, _) = reference.load_i64("labels").unwrap();
        let loss = causal_lm_loss(
            loaded
                .model
                .forward(Input::new(ids(&reference, "input_ids"))),
            &labels,
        )
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap()[0];
        let expected = reference.load_f32("loss", &[]).unwrap()[0];
        assert!(
            (loss - expected).abs() <= 1e-5,
            "{ty}: merged loss {loss} vs PEFT {expected}"
        );
    }
}

#[test]
fn an_adapter_of_another_model_on_a_gguf_base_is_refused_before_writing() {
    // llama_gqa's adapter on the tiny K-quant llama (other widths) is refused naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let base = gguf_fixture("kquant/tiny_q8_0.gguf");
    let err = merge(&options(
        &base,
        &[&fixture("llama_gqa").join("adapter")],
        &out,
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("tiny_q8_0.gguf"), "{text}");
    assert!(!out.exists(), "nothing written");
}
