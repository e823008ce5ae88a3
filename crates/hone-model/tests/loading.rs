//! Checkpoint variants (sharded, f16, bf16), RoPE scaling formulas and Mistral's sliding window.

use hone_model::Input;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::rope::{inverse_frequencies, RopeScaling};
use hone_model::{load_model_dir, CausalLm, Cpu, KvCache, LoadOptions, ModelConfig, WeightStore};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/peft").join(name)
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn read_all(path: &Path) -> Tensors {
    let store = WeightStore::open_files(&[path.to_path_buf()]).unwrap();
    store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let data = store.load_f32(&n, &shape).unwrap();
            (n, shape, data)
        })
        .collect()
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => unreachable!("test helper"),
    }
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| encode(d, dtype)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn model_dir_with(tensors_by_file: &[(&str, Tensors, Dtype)], index: bool) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("llama_gqa").join(file), tmp.path().join(file)).unwrap();
    }
    let mut map = serde_json::Map::new();
    for (file, tensors, dtype) in tensors_by_file {
        write(&tmp.path().join(file), tensors, *dtype);
        for (n, _, _) in tensors {
            map.insert(n.clone(), serde_json::Value::String(file.to_string()));
        }
    }
    if index {
        let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            json.to_string(),
        )
        .unwrap();
    }
    tmp
}

fn logits_of(dir: &Path) -> Vec<f32> {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(dir, &device, LoadOptions::default()).unwrap();
    let store =
        WeightStore::open_files(&[fixture("llama_gqa").join("refs/inputs.safetensors")]).unwrap();
    let (ids, shape) = store.load_i64("input_ids").unwrap();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device);
    loaded
        .model
        .forward(Input::new(ids))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sharded_checkpoint_with_index_loads_like_a_single_file() {
    let all = read_all(&fixture("llama_gqa").join("model.safetensors"));
    let (first, second): (Tensors, Tensors) = all
        .into_iter()
        .partition(|(n, _, _)| !n.contains("layers.1"));
    let dir = model_dir_with(
        &[
            ("model-00001-of-00002.safetensors", first, Dtype::F32),
            ("model-00002-of-00002.safetensors", second, Dtype::F32),
        ],
        true,
    );
    let expected = {
        let store =
            WeightStore::open_files(&[fixture("llama_gqa").join("refs/logits_base.safetensors")])
                .unwrap();
        let shape = store.shape("logits").unwrap();
        store.load_f32("logits", &shape).unwrap()
    };
    let diff = max_abs_diff(&logits_of(dir.path()), &expected);
    assert!(
        diff < 1e-4,
        "sharded logits differ from transformers by {diff}"
    );
}

#[test]
fn index_naming_a_missing_shard_is_an_error_naming_it() {
    let all = read_all(&fixture("llama_gqa").join("model.safetensors"));
    let dir = model_dir_with(
        &[("model-00001-of-00002.safetensors", all, Dtype::F32)],
        true,
    );
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let text = text.replacen("model-00001-of-00002", "model-00002-of-00002", 1);
    std::fs::write(&index, text).unwrap();
    let err = load_model_dir::<Cpu>(dir.path(), &Default::default(), LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn half_precision_checkpoints_decode_exactly() {
    for dtype in [Dtype::F16, Dtype::BF16] {
        let all = read_all(&fixture("llama_gqa").join("model.safetensors"));
        // The f32 checkpoint holding exactly the rounded values must give the same logits.
        let rounded: Tensors = all
            .iter()
            .map(|(n, s, d)| {
                let r = d
                    .iter()
                    .map(|&v| match dtype {
                        Dtype::F16 => half::f16::from_f32(v).to_f32(),
                        _ => half::bf16::from_f32(v).to_f32(),
                    })
                    .collect();
                (n.clone(), s.clone(), r)
            })
            .collect();
        let half_dir = model_dir_with(&[("model.safetensors", all, dtype)], false);
        let f32_dir = model_dir_with(&[("model.safetensors", rounded, Dtype::F32)], false);
        let diff = max_abs_diff(&logits_of(half_dir.path()), &logits_of(f32_dir.path()));
        assert!(diff == 0.0, "{dtype:?}: logits differ by {diff}");
    }
}

#[test]
fn llama3_rope_matches_transformers_formula_in_all_three_regimes() {
    let text = std::fs::read_to_string(root().join("fixtures/rope/reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let l3 = &reference["llama3"];
    let regimes: Vec<&str> = l3["regimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for regime in ["high", "medium", "low"] {
        assert!(
            regimes.contains(&regime),
            "the reference must exercise the {regime} regime"
        );
    }
    let c = &l3["config"];
    let ours = inverse_frequencies(
        c["dim"].as_u64().unwrap() as usize,
        c["base"].as_f64().unwrap(),
        &RopeScaling::Llama3 {
            factor: c["factor"].as_f64().unwrap(),
            low_freq_factor: c["low_freq_factor"].as_f64().unwrap(),
            high_freq_factor: c["high_freq_factor"].as_f64().unwrap(),
            original_max_position_embeddings: c["old_context_len"].as_f64().unwrap(),
        },
    );
    let expected = floats(&l3["inv_freq"]);
    assert_eq!(ours.len(), expected.len());
    for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "llama3 inv_freq[{i}] ({}): {a} vs {b}",
            regimes[i]
        );
    }

    let lin = &reference["linear"];
    let ours = inverse_frequencies(
        16,
        10000.0,
        &RopeScaling::Linear {
            factor: lin["config"]["factor"].as_f64().unwrap(),
        },
    );
    for (a, b) in ours.iter().zip(floats(&lin["inv_freq"])) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "linear: {a} vs {b}");
    }
    let ours = inverse_frequencies(16, 10000.0, &RopeScaling::Default);
    for (a, b) in ours.iter().zip(floats(&reference["default"]["inv_freq"])) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "default: {a} vs {b}");
    }
}

#[test]
fn llama3_rope_scaling_is_read_from_both_config_styles() {
    let base =
        std::fs::read_to_string(fixture("llama_gqa").join("refs/config_v4_style.json")).unwrap();
    let mut v4: serde_json::Value = serde_json::from_str(&base).unwrap();
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    v4["rope_scaling"] = scaling.clone();
    let mut v5 = v4.clone();
    v5.as_object_mut().unwrap().remove("rope_scaling");
    v5.as_object_mut().unwrap().remove("rope_theta");
    let mut params = scaling;
    params["rope_theta"] = 10000.0.into();
    v5["rope_parameters"] = params;
    let p = Path::new("config.json");
    let a = ModelConfig::from_json_str(&v4.to_string(), p).unwrap();
    let b = ModelConfig::from_json_str(&v5.to_string(), p).unwrap();
    assert_eq!(a, b);
    assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    // 4.x configs also spell the type as "type".
    v4["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    let c = ModelConfig::from_json_str(&v4.to_string(), p).unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

/// A one-layer Mistral model made from the llama_gqa fixture's weights, with `window`.
fn one_layer_mistral(window: usize) -> CausalLm<Cpu> {
    let text = std::fs::read_to_string(fixture("llama_gqa").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    json["model_type"] = "mistral".into();
    json["num_hidden_layers"] = 1.into();
    json["sliding_window"] = window.into();
    let config = ModelConfig::from_json_str(&json.to_string(), Path::new("config.json")).unwrap();
    assert_eq!(config.sliding_window, vec![Some(window)]);
    let store = WeightStore::open_dir(&fixture("llama_gqa")).unwrap();
    CausalLm::from_store(&config, &store, &Default::default(), LoadOptions::default())
        .unwrap()
        .0
}

#[test]
fn mistral_sliding_window_sees_exactly_the_last_window_tokens() {
    // With one layer and relative (rotary) positions, the output at position t under a window of
    // W equals the output for the W tokens ending at t fed alone.
    let window = 8;
    let model = one_layer_mistral(window);
    let device = Default::default();
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 11) % 509).collect();
    let full = model
        .forward(Input::new(Tensor::from_data(
            TensorData::new(ids.clone(), [1, ids.len()]),
            &device,
        )))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let vocab = model.config().vocab_size;
    for t in window..ids.len() {
        let alone: Vec<i64> = ids[t + 1 - window..=t].to_vec();
        let logits = model
            .forward(
                Input::new(Tensor::from_data(
                    TensorData::new(alone, [1, window]),
                    &device,
                ))
                .last_logits(),
            )
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let diff = max_abs_diff(&logits, &full[t * vocab..(t + 1) * vocab]);
        assert!(
            diff < 1e-4,
            "position {t}: windowed logits differ by {diff}"
        );
    }
    // And the window matters: without it, position 23 sees more context.
    let wide = one_layer_mistral(64)
        .forward(Input::new(Tensor::from_data(
            TensorData::new(ids.clone(), [1, ids.len()]),
            &device,
        )))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert!(max_abs_diff(&wide[23 * vocab..], &full[23 * vocab..]) > 1e-3);

    // Decoding with a KV cache applies the same window.
    let mut cache = KvCache::new(1);
    for (t, &id) in ids.iter().enumerate() {
        let logits = model
            .forward(
                Input::new(Tensor::from_data(
                    TensorData::new(vec![id], [1, 1]),
                    &device,
                ))
                .cache(&mut cache)
                .last_logits(),
            )
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let diff = max_abs_diff(&logits, &full[t * vocab..(t + 1) * vocab]);
        assert!(diff < 1e-4, "cached position {t}: differs by {diff}");
    }
}
