//! Loading a whole Hugging Face model directory: `config.json`, the safetensors weights and the
//! tokenizer.

use std::path::Path;

use burn::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, LoadOptions, LoadReport};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

/// A model with its tokenizer.
pub struct LoadedModel<B: Backend> {
    pub model: CausalLm<B>,
    pub tokenizer: Tokenizer,
    pub report: LoadReport,
}

/// Loads model directory `dir` onto `device`.
pub fn load_model_dir<B: Backend>(
    dir: &Path,
    device: &B::Device,
    options: LoadOptions,
) -> Result<LoadedModel<B>> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
        });
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let store = WeightStore::open_dir(dir)?;
    let (model, report) = CausalLm::from_store(&config, &store, device, options)?;
    for name in &report.unused {
        tracing::warn!(
            "{}: tensor `{name}` is not used by the model",
            dir.display()
        );
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        report,
    })
}
