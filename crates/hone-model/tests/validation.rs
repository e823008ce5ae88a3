//! Values that parse but cannot be right are refused when read, naming the file, the key or
//! the tensor: config.json ranges, non-finite adapter weights, a file given for a directory.

mod common;

use std::path::Path;

use common::fixture;
use hone_model::loader::resolve_model_dir;
use hone_model::{CausalLm, Cpu, LoadOptions, ModelConfig, ModelError, WeightStore};

const STORIES: &str = "../../checkpoints/base/stories260k";

fn stories() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(STORIES)
}

/// stories260k's config.json with `key` set to the JSON text `value`.
fn config_with(key: &str, value: &str) -> Result<ModelConfig, ModelError> {
    let text = std::fs::read_to_string(stories().join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[key] = serde_json::from_str(value).unwrap();
    ModelConfig::from_json_str(&json.to_string(), Path::new("m/config.json"))
}

/// Regression: `max_position_embeddings = 0` and `rms_norm_eps = -1` were accepted.
#[test]
fn out_of_range_config_values_are_refused_naming_file_key_and_range() {
    assert!(config_with("rms_norm_eps", "1e-5").is_ok());
    for (key, value, expected) in [
        ("max_position_embeddings", "0", "positive integer"),
        ("rms_norm_eps", "-1", "> 0"),
        ("rms_norm_eps", "0", "> 0"),
        ("rope_theta", "0", "> 0"),
        ("rope_theta", "-10000", "> 0"),
        ("vocab_size", "0", "positive integer"),
        ("hidden_size", "0", "positive integer"),
        ("num_key_value_heads", "0", "positive integer"),
        (
            "num_key_value_heads",
            "3",
            "must divide num_attention_heads",
        ),
        ("head_dim", "0", "positive integer"),
        ("intermediate_size", "0", "positive integer"),
        ("num_hidden_layers", "0", "positive integer"),
    ] {
        let err = config_with(key, value).expect_err(key);
        let msg = err.to_string();
        assert!(
            matches!(err, ModelError::InvalidConfig { .. })
                && msg.contains("m/config.json")
                && msg.contains(&format!("`{key}`"))
                && msg.contains(expected),
            "{key} = {value}: {msg}"
        );
    }
    // Heads must divide the hidden size when head_dim is not given.
    let text = std::fs::read_to_string(stories().join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object_mut().unwrap().remove("head_dim");
    json["hidden_size"] = 60.into();
    let msg = ModelConfig::from_json_str(&json.to_string(), Path::new("m/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("hidden_size") && msg.contains("num_attention_heads"),
        "{msg}"
    );
}

/// Copies the fixture adapter of `llama_gqa` into `dir`, with value 3 of `tensor` set to `bad`.
fn adapter_with(dir: &Path, tensor: &str, bad: f32) {
    let src = fixture("llama_gqa").join("adapter");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let store = WeightStore::open_files(&[src.join("adapter_model.safetensors")]).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let mut values = store.load_f32(&n, &shape).unwrap();
            if n == tensor {
                values[3] = bad;
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (n, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
}

/// Regression: an adapter holding NaN loaded silently and every output was empty.
#[test]
fn adapter_with_nan_or_inf_is_refused_at_load_naming_the_tensor() {
    let base = fixture("llama_gqa");
    let config = ModelConfig::from_file(&base.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&base).unwrap();
    let mut model: CausalLm<Cpu> =
        CausalLm::from_store(&config, &store, &Default::default(), LoadOptions::default())
            .unwrap()
            .0;
    let tmp = tempfile::tempdir().unwrap();
    let tensor = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    for (name, bad) in [("nan", f32::NAN), ("inf", f32::NEG_INFINITY)] {
        let dir = tmp.path().join(name);
        adapter_with(&dir, tensor, bad);
        let err = model.load_adapter(&dir).expect_err(name);
        let msg = err.to_string();
        assert!(
            matches!(err, ModelError::NonFinite { index: 3, .. })
                && msg.contains(tensor)
                && msg.contains("adapter_model.safetensors"),
            "{msg}"
        );
    }
    // The untouched adapter still loads.
    model.load_adapter(&base.join("adapter")).unwrap();
}

/// Regression: `--model dir/model.safetensors` was reported as "... is missing".
#[test]
fn a_file_of_a_model_directory_stands_for_the_directory() {
    let dir = stories();
    assert_eq!(
        resolve_model_dir(&dir.join("model.safetensors")).unwrap(),
        dir
    );
    assert_eq!(resolve_model_dir(&dir).unwrap(), dir);
    let tmp = tempfile::tempdir().unwrap();
    let lone = tmp.path().join("model.safetensors");
    std::fs::write(&lone, b"").unwrap();
    let msg = resolve_model_dir(&lone).unwrap_err().to_string();
    assert!(
        msg.contains("expected a model directory (with config.json), got a file")
            && msg.contains(&lone.display().to_string()),
        "{msg}"
    );
}

/// Regression: a failed adapter write said "cannot read ... IoError(Os { code: 28 ...})".
#[test]
fn a_failed_write_says_cannot_write_with_the_io_message() {
    let err = ModelError::write_safetensors(
        "out/adapter_model.safetensors",
        safetensors::SafeTensorError::IoError(std::io::Error::from_raw_os_error(28)),
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot write out/adapter_model.safetensors: No space left on device"),
        "{msg}"
    );
    assert!(!msg.contains("IoError") && !msg.contains("Os {"), "{msg}");
    assert!(
        std::error::Error::source(&err).is_none(),
        "the cause is printed once"
    );
}
