//! PEFT LoRA adapter directories opened for merging: the configuration (read by hone-model), the
//! memory-mapped `adapter_model.safetensors`, and the module -> shape table derived from its
//! tensor names. Every tensor must be a `lora_A`/`lora_B` pair of consistent shapes whose rank
//! agrees with the configuration (`r`, `rank_pattern`) and finite values; nothing is guessed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_model::adapter::{peft_key, PeftFiles};
use hone_model::lora::LoraSettings;
use hone_model::{ModelError, WeightStore};

use crate::error::{MergeError, Result};

/// The shape of one module's adapter: `lora_A` `[rank, in_features]`, `lora_B`
/// `[out_features, rank]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleShape {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// One module's LoRA factors as stored, with PEFT's scaling for it.
#[derive(Debug, Clone)]
pub struct Factors {
    /// `[rank, in_features]`, row-major.
    pub a: Vec<f32>,
    /// `[out_features, rank]`, row-major.
    pub b: Vec<f32>,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), after `rank_pattern`/`alpha_pattern`.
    pub scale: f64,
    pub shape: ModuleShape,
}

/// An opened PEFT LoRA adapter directory.
pub struct Adapter {
    pub dir: PathBuf,
    pub settings: LoraSettings,
    pub base_model_name_or_path: Option<String>,
    store: WeightStore,
    modules: BTreeMap<String, ModuleShape>,
}

/// The module name of a PEFT key `base_model.model.<module>.lora_X.weight`, with `X`.
fn parse_key(key: &str) -> Option<(&str, &'static str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    for which in ["lora_A", "lora_B"] {
        if let Some(module) = rest.strip_suffix(&format!(".{which}.weight")) {
            if !module.is_empty() {
                return Some((module, which));
            }
        }
    }
    None
}

impl Adapter {
    /// Opens `dir`: reads `adapter_config.json`, maps `adapter_model.safetensors` and checks
    /// every tensor (pairs, 2-D shapes, rank against the configuration).
    pub fn open(dir: &Path) -> Result<Self> {
        let PeftFiles {
            settings,
            base_model_name_or_path,
            store,
            weights_path: weights,
        } = PeftFiles::open(dir)?;
        let names = store.names();
        let mut modules = BTreeMap::new();
        for name in &names {
            let Some((module, which)) = parse_key(name) else {
                return Err(MergeError::UnexpectedTensor {
                    adapter: dir.to_path_buf(),
                    tensor: name.clone(),
                });
            };
            if which == "lora_B" {
                continue;
            }
            let key_b = peft_key(module, "lora_B");
            if !store.contains(&key_b) {
                return Err(MergeError::MissingPair {
                    adapter: dir.to_path_buf(),
                    present: name.clone(),
                    missing: key_b,
                });
            }
            let (shape_a, shape_b) = (store.shape(name)?, store.shape(&key_b)?);
            if shape_a.len() != 2 {
                return Err(MergeError::ShapeMismatch {
                    adapter: dir.to_path_buf(),
                    tensor: name.clone(),
                    expected: vec![settings.r, 0],
                    found: shape_a,
                    why: "lora_A is [r, in_features]".into(),
                });
            }
            let (rank, in_features) = (shape_a[0], shape_a[1]);
            if shape_b.len() != 2 || shape_b[1] != rank {
                return Err(MergeError::ShapeMismatch {
                    adapter: dir.to_path_buf(),
                    tensor: key_b,
                    expected: vec![shape_b.first().copied().unwrap_or(0), rank],
                    found: shape_b,
                    why: format!("lora_B is [out_features, r] and `{name}` has r = {rank}"),
                });
            }
            let (configured, _) = settings.rank_and_scale(module)?;
            if configured != rank {
                return Err(MergeError::ShapeMismatch {
                    adapter: dir.to_path_buf(),
                    tensor: name.clone(),
                    expected: vec![configured, in_features],
                    found: shape_a,
                    why: "adapter_config.json gives this module that rank (r / rank_pattern)"
                        .into(),
                });
            }
            let shape = ModuleShape {
                rank,
                in_features,
                out_features: shape_b[0],
            };
            // A NaN or infinity would spread to every merged weight: refuse it now, by name.
            store.load_f32_finite(name, &shape_a)?;
            store.load_f32_finite(&key_b, &[shape.out_features, rank])?;
            modules.insert(module.to_string(), shape);
        }
        for name in &names {
            if let Some((module, "lora_B")) = parse_key(name) {
                if !modules.contains_key(module) {
                    return Err(MergeError::MissingPair {
                        adapter: dir.to_path_buf(),
                        present: name.clone(),
                        missing: peft_key(module, "lora_A"),
                    });
                }
            }
        }
        if modules.is_empty() {
            return Err(ModelError::Input(format!(
                "{}: the adapter holds no LoRA tensor",
                weights.display()
            ))
            .into());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            settings,
            base_model_name_or_path,
            store,
            modules,
        })
    }

    /// Modules with an adapter, sorted by name, with their shapes.
    pub fn modules(&self) -> &BTreeMap<String, ModuleShape> {
        &self.modules
    }

    /// The rank PEFT allocates for this adapter in `add_weighted_adapter`: `r`, or the largest
    /// `rank_pattern` value when that is larger.
    pub fn config_rank(&self) -> usize {
        self.settings
            .rank_pattern
            .values()
            .copied()
            .fold(self.settings.r, usize::max)
    }

    /// The factors and scaling of `module`, or `None` when this adapter does not target it.
    pub fn factors(&self, module: &str) -> Result<Option<Factors>> {
        let Some(&shape) = self.modules.get(module) else {
            return Ok(None);
        };
        let a = self.store.load_f32(
            &peft_key(module, "lora_A"),
            &[shape.rank, shape.in_features],
        )?;
        let b = self.store.load_f32(
            &peft_key(module, "lora_B"),
            &[shape.out_features, shape.rank],
        )?;
        let (_, scale) = self.settings.rank_and_scale(module)?;
        Ok(Some(Factors { a, b, scale, shape }))
    }
}
