//! Helpers shared by the integration tests: fixture paths, merge options, hand-made adapters.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hone_merge::{Combination, MergeOptions, Method};
use hone_model::WeightStore;
use serde_json::Value;

pub const FIXTURES: [&str; 2] = ["llama_gqa", "qwen2_tied"];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

pub fn options(base: &Path, adapters: &[&Path], out: &Path) -> MergeOptions {
    MergeOptions {
        base: base.to_path_buf(),
        adapters: adapters.iter().map(|a| a.to_path_buf()).collect(),
        combination: Combination::default(),
        dtype: None,
        max_shard_size: hone_merge::DEFAULT_MAX_SHARD_SIZE,
        out: out.to_path_buf(),
        force: false,
    }
}

pub fn combination(method: Method, weights: &[f64], density: Option<f64>) -> Combination {
    Combination {
        method,
        weights: Some(weights.to_vec()),
        density,
        ..Default::default()
    }
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Names of the entries of `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Writes an adapter directory from `config` and f32 tensors.
pub fn write_adapter(dir: &Path, config: &Value, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    hone_merge::export::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        safetensors::Dtype::F32,
        &data,
    )
    .unwrap();
}

/// The fixture adapter's tensors, each passed through `edit(name, shape, values)`.
pub fn fixture_tensors(
    edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>),
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let store =
        WeightStore::open_files(&[fixture("llama_gqa").join("adapter/adapter_model.safetensors")])
            .unwrap();
    store
        .names()
        .into_iter()
        .map(|n| {
            let mut shape = store.shape(&n).unwrap();
            let mut values = store.load_f32(&n, &shape).unwrap();
            edit(&n, &mut shape, &mut values);
            (n, shape, values)
        })
        .collect()
}

pub fn fixture_config() -> Value {
    read_json(&fixture("llama_gqa").join("adapter/adapter_config.json"))
}

/// The largest absolute difference of two equally long f32 slices, in f64.
pub fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// What a one-shard merge writes.
pub const MERGED_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Every tensor of the model directory `peft` (PEFT's `merge_and_unload` + `save_pretrained`)
/// is in `ours` under the same name, within `tolerance`; `ours` holds no other.
pub fn assert_tensors_match(ours: &Path, peft: &Path, tolerance: f64, what: &str) {
    let ours = WeightStore::open_dir(ours).unwrap();
    let peft = WeightStore::open_dir(peft).unwrap();
    assert_eq!(ours.names(), peft.names(), "{what}");
    for tensor in peft.names() {
        let shape = peft.shape(&tensor).unwrap();
        let d = max_diff(
            &ours.load_f32(&tensor, &shape).unwrap(),
            &peft.load_f32(&tensor, &shape).unwrap(),
        );
        assert!(
            d < tolerance,
            "{what}: `{tensor}` differs from PEFT's merge by {d}"
        );
    }
}
