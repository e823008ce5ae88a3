//! Writing the combination of several adapters as a new PEFT LoRA adapter (what PEFT's
//! `add_weighted_adapter` followed by `save_pretrained` gives): `adapter_config.json` with
//! `r = lora_alpha = ` the combined rank (scaling 1) and `adapter_model.safetensors` (f32) with
//! every module's combined `lora_A` `[r, in]` and `lora_B` `[out, r]`, zero-padded to `r` where a
//! module's own combined rank is smaller (as PEFT allocates it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_model::adapter::{peft_config_json, peft_key, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use hone_model::lora::{LoraSettings, TargetModules};

use crate::combine::{AdapterSet, Combination, Method};
use crate::error::{MergeError, Result};
use crate::export;
use crate::merge::check_output_not_input;

/// What to combine and where to write it.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    /// PEFT LoRA adapter directories, in the order of `combination.weights`.
    pub adapters: Vec<PathBuf>,
    pub combination: Combination,
    /// Output adapter directory.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
}

/// What [`combine_adapters`] wrote.
#[derive(Debug, Clone)]
pub struct CombineReport {
    /// The method used (`linear` for a single adapter).
    pub method: Method,
    /// Rank (and alpha) of the new adapter.
    pub rank: usize,
    pub modules: usize,
    /// The settings written to `adapter_config.json`.
    pub settings: LoraSettings,
}

/// `target_modules` and `layers_to_transform` of the combined adapter: the first adapter's when
/// every adapter has the same ones and targets the same modules, else the explicit list of the
/// modules that have tensors (which PEFT and hone both read as exact names).
fn targets(set: &AdapterSet) -> (TargetModules, Option<Vec<usize>>) {
    let first = &set.adapters[0];
    let same = set.adapters.iter().all(|a| {
        a.settings.target_modules == first.settings.target_modules
            && a.settings.layers_to_transform == first.settings.layers_to_transform
            && a.modules().keys().eq(first.modules().keys())
    });
    if same {
        return (
            first.settings.target_modules.clone(),
            first.settings.layers_to_transform.clone(),
        );
    }
    let mut names: Vec<String> = set.modules().keys().cloned().collect();
    names.sort_by(|a, b| export::natural_cmp(a, b));
    (TargetModules::Names(names), None)
}

/// Combines the adapters of `options` and writes the result as a PEFT adapter directory.
pub fn combine_adapters(options: &CombineOptions) -> Result<CombineReport> {
    let inputs: Vec<(&Path, &'static str)> = options
        .adapters
        .iter()
        .map(|a| (a.as_path(), "adapter"))
        .collect();
    check_output_not_input(&options.out, &inputs)?;
    if options.out.exists() && !options.force {
        return Err(MergeError::OutputExists {
            path: options.out.clone(),
        });
    }
    let set = AdapterSet::open(&options.adapters, &options.combination)?;
    let rank = set.output_rank();
    let mut tensors = Vec::new();
    for module in set.modules().keys() {
        let combined = set.combined(module)?.padded(rank);
        let shape = combined.shape;
        tensors.push((
            peft_key(module, "lora_A"),
            vec![rank, shape.in_features],
            hone_model::FloatDtype::F32.encode(&combined.a),
        ));
        tensors.push((
            peft_key(module, "lora_B"),
            vec![shape.out_features, rank],
            hone_model::FloatDtype::F32.encode(&combined.b),
        ));
    }
    let first = &set.adapters[0];
    let (target_modules, layers_to_transform) = targets(&set);
    let settings = LoraSettings {
        r: rank,
        alpha: rank as f64,
        dropout: first.settings.dropout,
        use_rslora: false,
        target_modules,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        layers_to_transform,
    };
    let base_name = first.base_model_name_or_path.clone().unwrap_or_default();
    let config = peft_config_json(&settings, &base_name);

    let staged = hone_io::StagedDir::new(&options.out)?;
    let config_path = staged.path().join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    std::fs::write(&config_path, text).map_err(|e| MergeError::io(&config_path, e))?;
    export::write_safetensors(
        &staged.path().join(ADAPTER_WEIGHTS),
        safetensors::Dtype::F32,
        &tensors,
    )?;
    staged.commit()?;
    Ok(CombineReport {
        method: set.method,
        rank,
        modules: set.modules().len(),
        settings,
    })
}
