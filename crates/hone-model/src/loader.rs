//! Loading a whole Hugging Face model directory: `config.json`, the safetensors weights and the
//! tokenizer.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::model::{CausalLm, LoadOptions, LoadReport};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

/// A model with its tokenizer.
pub struct LoadedModel<B: Backend> {
    pub model: CausalLm<B>,
    pub tokenizer: Tokenizer,
    pub report: LoadReport,
}

/// The model directory `path` names: `path` itself, or, when `path` is a file of a model
/// directory (`dir/model.safetensors`, `dir/config.json`), the directory holding it. A GGUF
/// model file is a whole model and stands for itself.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.is_dir() || is_gguf(path) {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if parent.join("config.json").is_file() {
        tracing::info!(
            "{} is a file: using the model directory {} that holds it",
            path.display(),
            parent.display()
        );
        return Ok(parent);
    }
    Err(ModelError::NotADirectory {
        path: path.to_path_buf(),
        parent,
    })
}

/// The configuration of the model `path` names: `config.json` of a model directory (or of the
/// directory of a file in it, see [`resolve_model_dir`]), or a GGUF file's `{arch}.*` metadata.
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    if is_gguf(path) {
        return crate::gguf::model_config(&crate::gguf::GgufFile::open(path)?);
    }
    ModelConfig::from_file(&resolve_model_dir(path)?.join("config.json"))
}

/// Loads model directory `dir` (or the directory of a file in it, see [`resolve_model_dir`])
/// onto `device`.
pub fn load_model_dir<B: KernelBackend>(
    dir: &Path,
    device: &B::Device,
    options: LoadOptions,
) -> Result<LoadedModel<B>> {
    if is_gguf(dir) {
        return load_gguf(dir, device, options);
    }
    let dir = &resolve_model_dir(dir)?;
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

/// Whether `path` names a GGUF file (by its extension, or its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Loads a GGUF file onto `device`: configuration and tokenizer from its metadata. Projection
/// weights in block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) stay quantized where
/// the backend multiplies by them ([`KernelBackend::keeps_quantized`]: Flex in f32) unless
/// `options.dequantize`; every other weight (embeddings, norms, and all weights elsewhere) is
/// decoded to f32, then cast to `options.dtype`.
pub fn load_gguf<B: KernelBackend>(
    path: &Path,
    device: &B::Device,
    options: LoadOptions,
) -> Result<LoadedModel<B>> {
    let file = crate::gguf::GgufFile::open(path)?;
    let config = crate::gguf::model_config(&file)?;
    let tokenizer = crate::gguf::tokenizer::tokenizer(&file)?;
    let weights = crate::gguf::GgufWeights::new(&file, &config)?;
    let (model, report) = CausalLm::from_store(&config, &weights, device, options)?;
    for name in &report.unused {
        tracing::warn!(
            "{}: tensor `{name}` is not used by the model",
            path.display()
        );
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        report,
    })
}
