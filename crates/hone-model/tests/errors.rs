//! Bad input gets an error a user can act on, naming the file, key or tensor: never a panic.

use std::path::{Path, PathBuf};

use hone_model::{load_model_dir, Cpu, LoadOptions, ModelError, Tokenizer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// A writable copy of a fixture model directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture(name).join(file), tmp.path().join(file)).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> ModelError {
    match load_model_dir::<Cpu>(dir, &Default::default(), LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites model.safetensors of `dir` with `edit` applied to the (name, shape, f32 data) list.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let store = hone_model::WeightStore::open_files(std::slice::from_ref(&path)).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let data = store.load_f32(&n, &shape).unwrap();
            (n, shape, data)
        })
        .collect();
    drop(store);
    edit(&mut tensors);
    write_f32(&path, &tensors);
}

fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn missing_tensor_names_the_tensor_and_the_file() {
    let dir = copy_fixture("llama_gqa");
    rewrite_weights(dir.path(), |t| {
        t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn shape_mismatch_names_tensor_expected_and_found() {
    let dir = copy_fixture("llama_gqa");
    rewrite_weights(dir.path(), |t| {
        let e = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        e.1 = vec![16, 64];
        e.2.truncate(16 * 64);
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("expected [32, 64]") && msg.contains("found [16, 64]"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&path, text).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
    for supported in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"] {
        assert!(msg.contains(supported), "{msg}");
    }

    let text = std::fs::read_to_string(fixture("llama_gqa").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object_mut().unwrap().remove("architectures");
    json["model_type"] = "gemma2".into();
    std::fs::write(&path, json.to_string()).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model_type") && msg.contains("gemma2") && msg.contains("qwen2"),
        "{msg}"
    );
}

#[test]
fn unsupported_rope_type_is_refused_by_name() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["rope_parameters"] =
        serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    std::fs::write(&path, json.to_string()).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("yarn") && msg.contains("llama3") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_reported_as_corrupt() {
    let dir = copy_fixture("qwen2_tied");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, ModelError::CorruptSafetensors { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, ModelError::CorruptSafetensors { .. }),
        "{err:?}"
    );
}

#[test]
fn missing_or_invalid_config_json_is_reported() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("config.json");
    std::fs::remove_file(&path).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, ModelError::MissingFile { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );

    std::fs::write(&path, "{\"hidden_size\": 64,").unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );

    std::fs::write(
        &path,
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#,
    )
    .unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("intermediate_size") && msg.contains("missing"),
        "{msg}"
    );

    let text = std::fs::read_to_string(fixture("llama_gqa").join("config.json")).unwrap();
    std::fs::write(
        &path,
        text.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("num_key_value_heads") && msg.contains("found 3"),
        "{msg}"
    );
}

#[test]
fn missing_or_invalid_tokenizer_json_is_reported() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("tokenizer.json");
    std::fs::remove_file(&path).unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().expect("must fail");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::write(&path, "{\"model\": 3}").unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, ModelError::Tokenizer { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn missing_model_directory_is_reported() {
    let err = load_err(Path::new("/nonexistent/hone-model-dir"));
    assert!(
        err.to_string().contains("/nonexistent/hone-model-dir"),
        "{err}"
    );
}

#[test]
fn cuda_device_without_the_cuda_feature_says_how_to_get_it() {
    struct Nothing;
    impl hone_model::BackendTask for Nothing {
        type Output = ();
        fn run<B: burn::prelude::Backend>(self, _device: B::Device) {}
    }
    let spec: hone_model::DeviceSpec = "cuda:1".parse().unwrap();
    let result = hone_model::run_on(spec, Nothing);
    if hone_model::device::CUDA_COMPILED {
        return; // a CUDA build accepts the device
    }
    let msg = result.expect_err("no CUDA in this build").to_string();
    assert!(
        msg.contains("cuda:1") && msg.contains("--features cuda"),
        "{msg}"
    );
    assert!("tpu"
        .parse::<hone_model::DeviceSpec>()
        .unwrap_err()
        .contains("cpu, cuda or cuda:N"));
}
