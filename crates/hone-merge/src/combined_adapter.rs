//! Writing the combination of several adapters as a new PEFT LoRA adapter (what PEFT's
//! `add_weighted_adapter` followed by `save_pretrained` gives): `adapter_config.json` with
//! `r = lora_alpha = ` the combined rank (scaling 1) and `adapter_model.safetensors` (f32) with
//! every module's combined `lora_A` `[r, in]` and `lora_B` `[out, r]`, zero-padded to `r` where a
//! module's own combined rank is smaller (as PEFT allocates it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_model::adapter::{write_peft, LoraTensors};
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
    let mut modules = Vec::new();
    for module in set.modules().keys() {
        let combined = set.combined(module)?.padded(rank);
        let shape = combined.shape;
        modules.push((
            module.clone(),
            LoraTensors {
                a: combined.a,
                a_shape: [rank, shape.in_features],
                b: combined.b,
                b_shape: [shape.out_features, rank],
            },
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
    write_peft(&options.out, &settings, &base_name, &modules)?;
    Ok(CombineReport {
        method: set.method,
        rank,
        modules: set.modules().len(),
        settings,
    })
}
