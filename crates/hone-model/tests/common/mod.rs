//! Shared helpers of the integration tests that run the PEFT fixtures (base model + adapter).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::{CausalLm, LoadOptions, ModelConfig, WeightStore};

/// `fixtures/peft/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// The fixture's base model (its config changed by `edit`) with the fixture's PEFT adapter.
pub fn model_with_adapter<B: hone_model::KernelBackend>(
    name: &str,
    edit: impl Fn(&mut ModelConfig),
) -> CausalLm<B> {
    let dir = fixture(name);
    let mut config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    edit(&mut config);
    let store = WeightStore::open_dir(&dir).unwrap();
    let mut m = CausalLm::from_store(&config, &store, &Default::default(), LoadOptions::default())
        .unwrap()
        .0;
    m.load_adapter(&dir.join("adapter")).unwrap();
    m
}

/// Token ids `[batch, len / batch]`.
pub fn ids<B: Backend>(v: &[i64], batch: usize) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [batch, v.len() / batch]),
        &Default::default(),
    )
}

/// A tensor's values as f32, row-major.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}
