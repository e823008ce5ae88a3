//! Checkpoints of a run: `<run>/step-N/` holds
//!
//! * `adapter/`: the adapters in PEFT's format (loadable by PEFT, vLLM and `hone generate`);
//! * `optimizer.safetensors`: AdamW's moments, `<peft key>.exp_avg` and `<peft key>.exp_avg_sq`;
//! * `trainer_state.json`: [`TrainerState`] (steps, optimizer step count, data position, seed
//!   and the number of steps whose random numbers were consumed, bad-step counters).
//!
//! A checkpoint is written into a temporary sibling directory and renamed into place
//! ([`hone_io::StagedDir`]), so a `step-N/` directory is always complete: a
//! process killed while writing leaves only a `.step-N.tmp-PID-K` directory, which
//! [`remove_stale_temporaries`] deletes. `keep_last` pruning removes the oldest checkpoints
//! only after a newer one is in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::lora::LoraSettings;
use hone_model::AutodiffKernelBackend;
use hone_model::{CausalLm, ModelError, WeightStore};
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig, Moments};
use crate::step::adapter_keys;

/// Version of the checkpoint layout.
pub const CHECKPOINT_FORMAT: u32 = 1;
/// File names inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_DIR: &str = "adapter";

/// Where a run stands; everything besides tensors that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Steps done (updates applied or skipped).
    pub step: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// AdamW updates applied (torch's `step` of each parameter).
    pub optimizer_step: u64,
    /// Scheduler steps taken (equal to `step`: skipped updates advance the schedule too).
    pub scheduler_step: usize,
    /// Where the next step reads.
    pub data: DataPosition,
    /// The run's seed; random numbers of step `s` come from a generator seeded by it and `s`.
    pub seed: u64,
    /// Steps whose random numbers were consumed (equal to `step`).
    pub rng_consumed: usize,
    /// Consecutive steps with a non-finite loss or gradient at this point.
    pub bad_steps_in_row: usize,
    /// All skipped steps so far.
    pub bad_steps_total: usize,
    /// Non-padding tokens trained on so far.
    pub tokens_seen: u64,
    /// The steps since the last logging point, so that a resumed run logs the same averages
    /// (absent in checkpoints of earlier versions: an empty window).
    #[serde(default)]
    pub log_window: LogWindow,
}

/// Sums of the steps since the last logging point (what `train/loss` and
/// `train/tokens_per_sec` average over).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindow {
    /// Summed loss of the applied steps.
    pub loss: f64,
    /// Applied steps.
    pub steps: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// Gradient norm of the last applied step of the run (`None` before the first).
    pub last_grad_norm: Option<f64>,
}

/// Name of the checkpoint directory of step `step`.
pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("step-{step}"))
}

/// Checkpoints in `run_dir`, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::io(run_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(run_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes temporary directories left by a process killed while writing (`.NAME.tmp-PID-K`,
/// `.NAME.old-PID-K`).
pub fn remove_stale_temporaries(run_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            && (name.contains(".tmp-") || name.contains(".old-"))
            && entry.path().is_dir()
        {
            std::fs::remove_dir_all(entry.path()).map_err(|e| TrainError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Removes all but the newest `keep_last` checkpoints (`0` keeps all).
pub fn prune_checkpoints(run_dir: &Path, keep_last: usize) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let all = list_checkpoints(run_dir)?;
    let excess = all.len().saturating_sub(keep_last);
    for (_, dir) in &all[..excess] {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    Ok(())
}

fn f32_bytes<B: Backend>(t: Tensor<B, 2>, what: &str) -> Result<Vec<u8>> {
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| TrainError::Tensor {
            what: what.to_string(),
            message: format!("{e:?}"),
        })?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes `step-N/` for the model's adapters, the optimizer and `state`, atomically.
pub fn save_checkpoint<B: AutodiffKernelBackend>(
    dir: &Path,
    model: &CausalLm<B>,
    settings: &LoraSettings,
    base_model: &str,
    optimizer: &AdamW<B::InnerBackend>,
    state: &TrainerState,
) -> Result<()> {
    let keys = adapter_keys(model);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    if let Some(moments) = &optimizer.moments {
        for (key, Moments { m, v }) in keys.iter().zip(moments) {
            let shape = m.dims().to_vec();
            tensors.push((
                format!("{key}.exp_avg"),
                shape.clone(),
                f32_bytes(m.clone(), key)?,
            ));
            tensors.push((
                format!("{key}.exp_avg_sq"),
                shape,
                f32_bytes(v.clone(), key)?,
            ));
        }
    }
    let state_json =
        serde_json::to_string_pretty(state).expect("the trainer state serialises") + "\n";
    let staged = hone_io::StagedDir::new(dir)?;
    let tmp = staged.path();
    model.save_adapter(&tmp.join(ADAPTER_DIR), settings, base_model)?;
    let path = tmp.join(OPTIMIZER_FILE);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("shape and byte length agree by construction");
            (n.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("optimizer_step".to_string(), optimizer.step.to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .map_err(|e| ModelError::write_safetensors(&path, e))?;
    let path = tmp.join(STATE_FILE);
    std::fs::write(&path, &state_json).map_err(|e| ModelError::write(path, e))?;
    staged.commit()?;
    Ok(())
}

/// A map of `rank_pattern` / `alpha_pattern` as TOML writes it (`{ q_proj = 4 }`).
fn pattern_text<T: std::fmt::Display>(map: &std::collections::BTreeMap<String, T>) -> String {
    let items: Vec<String> = map.iter().map(|(k, v)| format!("{k:?} = {v}")).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Adapted modules in config terms: `q_proj, v_proj in layers 0-4`, or per projection when the
/// layers differ between them.
fn describe_modules(modules: &[String]) -> String {
    use std::collections::BTreeMap;
    let mut by_kind: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for m in modules {
        let kind = m.rsplit('.').next().unwrap_or(m);
        let layer = m
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let layers = by_kind.entry(kind).or_default();
        layers.extend(layer);
    }
    let layers_text = |layers: &[usize]| -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut i = 0;
        while i < layers.len() {
            let mut j = i;
            while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
                j += 1;
            }
            parts.push(if i == j {
                layers[i].to_string()
            } else {
                format!("{}-{}", layers[i], layers[j])
            });
            i = j + 1;
        }
        parts.join(",")
    };
    let first = by_kind.values().next().cloned().unwrap_or_default();
    if by_kind.values().all(|l| *l == first) {
        let kinds: Vec<&str> = by_kind.keys().copied().collect();
        format!("{} in layers {}", kinds.join(", "), layers_text(&first))
    } else {
        let parts: Vec<String> = by_kind
            .iter()
            .map(|(k, l)| format!("{k} (layers {})", layers_text(l)))
            .collect();
        parts.join(", ")
    }
}

/// How a checkpoint's adapter settings differ from the config's, in config keys
/// (`lora.r: checkpoint 8, config 16`). `target_modules` and `layers_to_transform` are compared
/// resolved against `model` (the modules they select), so `["all-linear"]` equals the list of
/// projections PEFT writes for it.
pub fn lora_differences<B: Backend>(
    model: &CausalLm<B>,
    checkpoint: &LoraSettings,
    config: &LoraSettings,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut compare = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("lora.{key}: checkpoint {a}, config {b}"));
        }
    };
    compare("r", checkpoint.r.to_string(), config.r.to_string());
    compare(
        "alpha",
        checkpoint.alpha.to_string(),
        config.alpha.to_string(),
    );
    compare(
        "dropout",
        checkpoint.dropout.to_string(),
        config.dropout.to_string(),
    );
    compare(
        "use_rslora",
        checkpoint.use_rslora.to_string(),
        config.use_rslora.to_string(),
    );
    compare(
        "rank_pattern",
        pattern_text(&checkpoint.rank_pattern),
        pattern_text(&config.rank_pattern),
    );
    compare(
        "alpha_pattern",
        pattern_text(&checkpoint.alpha_pattern),
        pattern_text(&config.alpha_pattern),
    );
    let (a, b) = (model.lora_targets(checkpoint)?, model.lora_targets(config)?);
    if a != b {
        compare(
            "target_modules",
            format!("adapts {}", describe_modules(&a)),
            format!("adapts {}", describe_modules(&b)),
        );
    }
    Ok(out)
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: format!("not a trainer state: {e}"),
    })?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(TrainError::Checkpoint {
            path,
            message: format!(
                "checkpoint format {} is not {CHECKPOINT_FORMAT}",
                state.format
            ),
        });
    }
    Ok(state)
}

/// Loads a checkpoint into `model` (its adapters are replaced) and returns the optimizer and
/// the trainer state. The adapter must match `settings`.
pub fn load_checkpoint<B: AutodiffKernelBackend>(
    dir: &Path,
    model: &mut CausalLm<B>,
    settings: &LoraSettings,
    config: AdamWConfig,
) -> Result<(AdamW<B::InnerBackend>, TrainerState)> {
    let state = read_state(dir)?;
    let adapter_dir = dir.join(ADAPTER_DIR);
    let (saved, _) = hone_model::adapter::read_adapter_config(&adapter_dir)?;
    let differences = lora_differences(model, &saved, settings)?;
    if !differences.is_empty() {
        return Err(TrainError::AdapterMismatch {
            path: adapter_dir,
            differences,
        });
    }
    model.load_adapter(&adapter_dir)?;
    let keys = adapter_keys(model);
    let shapes: Vec<[usize; 2]> = crate::step::adapter_values(model)
        .iter()
        .map(|t| t.dims())
        .collect();
    let device = model.devices().into_iter().next().unwrap_or_default();
    let moments = if state.optimizer_step == 0 {
        Vec::new()
    } else {
        let path = dir.join(OPTIMIZER_FILE);
        let store = WeightStore::open_files(std::slice::from_ref(&path))?;
        let mut moments = Vec::with_capacity(keys.len());
        for (key, shape) in keys.iter().zip(&shapes) {
            let load = |suffix: &str| -> Result<Tensor<B::InnerBackend, 2>> {
                let values = store.load_f32(&format!("{key}.{suffix}"), shape)?;
                Ok(Tensor::from_data(TensorData::new(values, *shape), &device))
            };
            moments.push(Moments {
                m: load("exp_avg")?,
                v: load("exp_avg_sq")?,
            });
        }
        if store.names().len() != 2 * keys.len() {
            return Err(TrainError::Checkpoint {
                path,
                message: format!(
                    "expected {} moment tensors, found {}",
                    2 * keys.len(),
                    store.names().len()
                ),
            });
        }
        moments
    };
    Ok((
        AdamW::from_state(config, state.optimizer_step, moments),
        state,
    ))
}
