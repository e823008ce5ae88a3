//! Merging adapters into a base model and writing the result as a Hugging Face directory that
//! transformers and hone load as a plain model: `W' = W + B' A'` for every targeted module, where
//! `B' A'` is the adapters' combination ([`crate::combine`]; for one adapter `w · s · B A`, what
//! PEFT's `merge_and_unload` adds). Every other tensor of the base is copied through, converted
//! to the output dtype; a model with tied embeddings gets no `lm_head.weight`.
//!
//! The base is a Hugging Face directory or a GGUF file (its quantized tensors decoded to f32,
//! llama's q/k rows in Hugging Face's order; `config.json`, the tokenizer files and the
//! generation config written from its metadata, [`hone_model::gguf::hf`]).
//!
//! Work is tensor by tensor on the host in f32, one output shard at a time, so memory stays
//! about one shard plus the adapters. Everything is checked (adapters against each other and
//! against the base's tensor shapes) before the first byte is written, and the directory is
//! written all or nothing (`hone_io::StagedDir`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_model::gguf::{GgufFile, GgufWeights};
use hone_model::model::WeightSource;
use hone_model::{FloatDtype, ModelConfig, ModelError, WeightStore};

use crate::combine::{AdapterSet, Combination, Method};
use crate::error::{MergeError, Result};
use crate::export;

/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// What to merge and where to write it.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Hugging Face model directory or GGUF file of the base model.
    pub base: PathBuf,
    /// PEFT LoRA adapter directories, in the order of `combination.weights`.
    pub adapters: Vec<PathBuf>,
    pub combination: Combination,
    /// Output dtype; `None`: the dtype `config.json` declares, else f32 (a GGUF base: f32, which
    /// its block formats decode to exactly).
    pub dtype: Option<FloatDtype>,
    /// Largest shard in bytes of tensor data.
    pub max_shard_size: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
}

/// One written weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub file: String,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// What [`merge`] did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The combination method used (`linear` for a single adapter).
    pub method: Method,
    pub dtype: FloatDtype,
    /// Modules that received an update.
    pub merged_modules: usize,
    pub tensors: usize,
    pub shards: Vec<ShardInfo>,
    /// Bytes of tensor data over all shards (the index's `total_size`).
    pub total_size: u64,
    /// Non-weight files copied from the base (besides the rewritten `config.json`), or, for a
    /// GGUF base, written from its metadata (`tokenizer.json`, ...).
    pub copied_files: Vec<String>,
    /// Base tensors not written (`lm_head.weight` of a tied model).
    pub dropped: Vec<String>,
}

/// Canonical form of `path` when it exists.
fn canonical(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

/// Refuses an output directory that is one of the inputs or holds one (`--out RUN` with
/// `--adapter RUN/adapter`, or a parent of the base model): replacing it, even with `force`,
/// would delete that input. Paths are compared in canonical form, so `..` and symbolic links
/// are seen through.
pub(crate) fn check_output_not_input(out: &Path, inputs: &[(&Path, &'static str)]) -> Result<()> {
    let Some(out_c) = canonical(out) else {
        return Ok(());
    };
    for (input, what) in inputs {
        if canonical(input).is_some_and(|input_c| input_c.starts_with(&out_c)) {
            return Err(MergeError::OutputIsInput {
                path: out.to_path_buf(),
                input: input.to_path_buf(),
                what,
            });
        }
    }
    Ok(())
}

/// What describes the base model besides its tensors: a directory's `config.json`, or the GGUF
/// file (metadata and tensors).
pub(crate) enum BaseMeta {
    Dir(serde_json::Value),
    Gguf(GgufFile),
}

/// The base model's tensors: a Hugging Face directory's safetensors or a GGUF file's tensors
/// under Hugging Face's names.
pub(crate) enum BaseWeights<'a> {
    Dir(WeightStore),
    Gguf(GgufWeights<'a>),
}

impl BaseWeights<'_> {
    pub(crate) fn names(&self) -> Vec<String> {
        match self {
            BaseWeights::Dir(store) => store.names(),
            BaseWeights::Gguf(weights) => weights.names(),
        }
    }

    pub(crate) fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(match self {
            BaseWeights::Dir(store) => store.shape(name)?,
            BaseWeights::Gguf(weights) => weights.shape(name)?,
        })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            BaseWeights::Dir(store) => store.contains(name),
            BaseWeights::Gguf(weights) => weights.contains(name),
        }
    }

    pub(crate) fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(match self {
            BaseWeights::Dir(store) => store.load_f32(name, shape)?,
            BaseWeights::Gguf(weights) => weights.load_f32(name, shape)?,
        })
    }
}

impl BaseMeta {
    /// Opens the base model `base` (a resolved directory or GGUF file).
    pub(crate) fn open(base: &Path) -> Result<Self> {
        Ok(if hone_model::loader::is_gguf(base) {
            BaseMeta::Gguf(GgufFile::open(base).map_err(ModelError::from)?)
        } else {
            BaseMeta::Dir(export::read_config(base)?)
        })
    }

    /// The configuration and tensors of the base; a GGUF base must have only tensors with a
    /// Hugging Face name.
    pub(crate) fn weights(&self, base: &Path) -> Result<(ModelConfig, BaseWeights<'_>)> {
        Ok(match self {
            BaseMeta::Gguf(file) => {
                let config = hone_model::gguf::model_config(file)?;
                let weights = GgufWeights::new(file, &config)?;
                if let Some(tensor) = weights.unmapped().into_iter().next() {
                    return Err(ModelError::Unsupported {
                        path: base.to_path_buf(),
                        what: "GGUF tensor in a merge (one without a Hugging Face name)",
                        found: tensor,
                        supported: "the token embedding, output norm and head, and the \
                                    attention, norm and MLP tensors of each block"
                            .into(),
                    }
                    .into());
                }
                (config, BaseWeights::Gguf(weights))
            }
            BaseMeta::Dir(_) => (
                ModelConfig::from_file(&base.join("config.json"))?,
                BaseWeights::Dir(WeightStore::open_dir(base)?),
            ),
        })
    }
}

/// Merges the adapters of `options` into the base model and writes the Hugging Face directory.
pub fn merge(options: &MergeOptions) -> Result<MergeReport> {
    let base = &hone_model::loader::resolve_model_dir(&options.base)?;
    let mut inputs: Vec<(&Path, &'static str)> = vec![(base.as_path(), "base model")];
    inputs.extend(options.adapters.iter().map(|a| (a.as_path(), "adapter")));
    check_output_not_input(&options.out, &inputs)?;
    if options.out.exists() && !options.force {
        return Err(MergeError::OutputExists {
            path: options.out.clone(),
        });
    }
    let meta = BaseMeta::open(base)?;
    let (config, store) = meta.weights(base)?;
    let declared = match &meta {
        BaseMeta::Dir(config_json) => export::declared_dtype(config_json),
        BaseMeta::Gguf(_) => None,
    };
    let dtype = options.dtype.or(declared).unwrap_or(FloatDtype::F32);
    let set = AdapterSet::open(&options.adapters, &options.combination)?;

    // Plan: every base tensor in module order, minus lm_head.weight of a tied model.
    let mut names = store.names();
    names.sort_by(|a, b| export::natural_cmp(a, b));
    let mut dropped = Vec::new();
    if config.tie_word_embeddings {
        names.retain(|n| {
            let keep = n != "lm_head.weight";
            if !keep {
                dropped.push(n.clone());
            }
            keep
        });
    }
    let mut shapes = Vec::with_capacity(names.len());
    for name in &names {
        shapes.push(store.shape(name)?);
    }
    check_modules_in_base(
        &set,
        &store,
        base,
        &names,
        &shapes,
        config.tie_word_embeddings,
    )?;
    let sizes: Vec<u64> = shapes
        .iter()
        .map(|s| (s.iter().product::<usize>() * dtype.size()) as u64)
        .collect();
    let shards = export::plan_shards(&sizes, options.max_shard_size);

    let staged = hone_io::StagedDir::new(&options.out)?;
    let copied_files = match &meta {
        BaseMeta::Gguf(file) => export::write_gguf_files(file, dtype, staged.path())?,
        BaseMeta::Dir(config_json) => {
            export::write_config_and_copy_files(base, config_json, dtype, staged.path())?
        }
    };
    let mut weight_map = BTreeMap::new();
    let mut infos = Vec::new();
    let mut merged_modules = 0;
    for (index, range) in shards.iter().enumerate() {
        let file = export::shard_file_name(index, shards.len());
        let mut tensors = Vec::with_capacity(range.len());
        for i in range.clone() {
            let (name, shape) = (&names[i], &shapes[i]);
            let mut values = store.load_f32(name, shape)?;
            if let Some(module) = name
                .strip_suffix(".weight")
                .filter(|m| set.modules().contains_key(*m))
            {
                set.combined(module)?.add_to(&mut values);
                merged_modules += 1;
            }
            tensors.push((name.clone(), shape.clone(), dtype.encode(&values)));
            weight_map.insert(name.clone(), file.clone());
        }
        export::write_safetensors(&staged.path().join(&file), dtype.safetensors(), &tensors)?;
        let bytes = range.clone().map(|i| sizes[i]).sum();
        tracing::info!("wrote {file} ({} tensors, {bytes} bytes)", tensors.len());
        infos.push(ShardInfo {
            file,
            tensors: tensors.len(),
            bytes,
        });
    }
    let total_size: u64 = sizes.iter().sum();
    if shards.len() > 1 {
        export::write_index(staged.path(), total_size, &weight_map)?;
    }
    staged.commit()?;
    Ok(MergeReport {
        method: set.method,
        dtype,
        merged_modules,
        tensors: names.len(),
        shards: infos,
        total_size,
        copied_files,
        dropped,
    })
}

/// Every module of the adapters must be a written 2-D base tensor `<module>.weight` of shape
/// `[out_features, in_features]`.
pub(crate) fn check_modules_in_base(
    set: &AdapterSet,
    store: &BaseWeights<'_>,
    base: &Path,
    names: &[String],
    shapes: &[Vec<usize>],
    tied: bool,
) -> Result<()> {
    let written: BTreeMap<&str, &Vec<usize>> =
        names.iter().map(String::as_str).zip(shapes).collect();
    for (module, shape) in set.modules() {
        let adapter = set
            .adapters
            .iter()
            .find(|a| a.modules().contains_key(module))
            .map(|a| a.dir.clone())
            .unwrap_or_default();
        let tensor = format!("{module}.weight");
        let Some(found) = written.get(tensor.as_str()) else {
            if tied && module == "lm_head" && store.contains(&tensor) {
                return Err(MergeError::TiedTarget {
                    adapter,
                    module: module.clone(),
                    base: base.to_path_buf(),
                });
            }
            return Err(MergeError::NotInBase {
                adapter,
                module: module.clone(),
                tensor,
                base: base.to_path_buf(),
            });
        };
        if found.len() != 2 {
            return Err(MergeError::NotInBase {
                adapter,
                module: module.clone(),
                tensor,
                base: base.to_path_buf(),
            });
        }
        let (out_f, in_f) = (found[0], found[1]);
        let why = format!("the base's `{tensor}` in {} is {found:?}", base.display());
        if shape.in_features != in_f {
            return Err(MergeError::ShapeMismatch {
                adapter,
                tensor: hone_model::adapter::peft_key(module, "lora_A"),
                expected: vec![shape.rank, in_f],
                found: vec![shape.rank, shape.in_features],
                why,
            });
        }
        if shape.out_features != out_f {
            return Err(MergeError::ShapeMismatch {
                adapter,
                tensor: hone_model::adapter::peft_key(module, "lora_B"),
                expected: vec![out_f, shape.rank],
                found: vec![shape.out_features, shape.rank],
                why,
            });
        }
    }
    Ok(())
}
