//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors` with PEFT's
//! key names (`base_model.model.<module>.lora_A.weight` `[r, in]`, `...lora_B.weight`
//! `[out, r]`). hone reads what PEFT writes and writes the portable subset that PEFT, vLLM,
//! mistral.rs and LoRAX load: plain LoRA or rsLoRA, one safetensors file, no bias, no
//! `modules_to_save`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::lora::{Lora, LoraSettings, TargetModules};
use crate::model::{CausalLm, OWN_SLOT};
use crate::weights::WeightStore;

/// File names inside an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// PEFT's key for a module's LoRA matrix (`which` is `lora_A` or `lora_B`).
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// Serde mirror of the `adapter_config.json` fields hone reads or must refuse. Other keys are
/// ignored (PEFT writes many that do not change a plain LoRA's computation).
#[derive(Debug, Clone, Deserialize)]
struct PeftConfigFile {
    #[serde(default)]
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_rslora: Option<bool>,
    #[serde(default)]
    use_dora: Option<bool>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, usize>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    layers_pattern: Option<Value>,
    #[serde(default)]
    target_parameters: Option<Value>,
    #[serde(default)]
    lora_bias: Option<bool>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// What was read from an adapter directory.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub settings: LoraSettings,
    /// Modules that received an adapter.
    pub modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

fn invalid(path: &Path, key: &str, message: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// Reads and validates `adapter_config.json` of `dir`.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraSettings, Option<String>)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let raw: PeftConfigFile = serde_json::from_str(&text).map_err(|e| ModelError::InvalidJson {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if let Some(t) = raw.peft_type.as_deref() {
        if t != "LORA" {
            return Err(ModelError::Unsupported {
                path,
                what: "peft_type",
                found: t.into(),
                supported: "LORA".into(),
            });
        }
    }
    let refuse = |key: &str, why: &str| Err(invalid(&path, key, why.to_string()));
    if raw.use_dora == Some(true) {
        return refuse(
            "use_dora",
            "DoRA adapters are not supported; hone supports LoRA and rsLoRA",
        );
    }
    if raw.bias.as_deref().is_some_and(|b| b != "none") {
        return refuse(
            "bias",
            "adapters that train biases are not supported (expected \"none\")",
        );
    }
    if raw.lora_bias == Some(true) {
        return refuse("lora_bias", "a bias on lora_B is not supported");
    }
    if raw
        .modules_to_save
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return refuse(
            "modules_to_save",
            "fully fine-tuned modules are not supported (not portable to vLLM either)",
        );
    }
    if raw.fan_in_fan_out == Some(true) {
        return refuse(
            "fan_in_fan_out",
            "Conv1D-style (GPT-2) adapters do not apply to Llama-family models",
        );
    }
    if raw.target_parameters.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse(
            "target_parameters",
            "parameter-targeted LoRA is not supported",
        );
    }
    if raw
        .layers_pattern
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_str() != Some("layers"))
    {
        return refuse(
            "layers_pattern",
            "only the standard `layers` pattern is supported",
        );
    }
    let layers_to_transform = match &raw.layers_to_transform {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        invalid(&path, "layers_to_transform", "expected layer indices")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(_) => {
            return refuse(
                "layers_to_transform",
                "expected an integer or a list of integers",
            )
        }
    };
    let r = raw
        .r
        .ok_or_else(|| invalid(&path, "r", "required key is missing"))?;
    let settings = LoraSettings {
        r,
        alpha: raw.lora_alpha.unwrap_or(8.0),
        dropout: raw.lora_dropout.unwrap_or(0.0),
        use_rslora: raw.use_rslora.unwrap_or(false),
        target_modules: raw
            .target_modules
            .ok_or_else(|| invalid(&path, "target_modules", "required key is missing"))?,
        rank_pattern: raw.rank_pattern.unwrap_or_default(),
        alpha_pattern: raw.alpha_pattern.unwrap_or_default(),
        layers_to_transform,
    };
    settings
        .validate()
        .map_err(|e| invalid(&path, "lora", e.to_string()))?;
    Ok((settings, raw.base_model_name_or_path))
}

/// A PEFT adapter directory opened for reading: its validated `adapter_config.json` and its
/// memory-mapped `adapter_model.safetensors` (tensors are read on demand, by PEFT key). The one
/// reader of adapter directories: loading onto a model, merging and combining all open
/// adapters through it.
pub struct PeftFiles {
    pub settings: LoraSettings,
    pub base_model_name_or_path: Option<String>,
    pub weights_path: std::path::PathBuf,
    pub store: WeightStore,
}

impl PeftFiles {
    /// Reads the configuration of `dir` ([`read_adapter_config`]) and maps its weights; a
    /// pickled `adapter_model.bin` is refused with how to convert it.
    pub fn open(dir: &Path) -> Result<Self> {
        let (settings, base_model_name_or_path) = read_adapter_config(dir)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.is_file() {
            let bin = dir.join("adapter_model.bin");
            if bin.is_file() {
                return Err(ModelError::Unsupported {
                    path: bin,
                    what: "adapter weight format",
                    found: "PyTorch pickle (.bin)".into(),
                    supported: "adapter_model.safetensors (convert with PEFT: save_pretrained(safe_serialization=True))".into(),
                });
            }
            return Err(ModelError::MissingFile { path: weights_path });
        }
        let store = WeightStore::open_files(std::slice::from_ref(&weights_path))?;
        Ok(Self {
            settings,
            base_model_name_or_path,
            weights_path,
            store,
        })
    }
}

impl<B: Backend> CausalLm<B> {
    /// Loads the PEFT adapter in `dir` as the model's own adapter (slot [`OWN_SLOT`]),
    /// replacing any. Every expected tensor must be present with its shape, and every tensor in
    /// the file must be used.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<AdapterInfo> {
        self.load_adapter_slot(dir, OWN_SLOT)
    }

    /// Loads the PEFT adapter in `dir` into adapter slot `slot` (replacing what was there),
    /// leaving the other slots untouched; nothing changes when loading fails.
    pub fn load_adapter_slot(&mut self, dir: &Path, slot: usize) -> Result<AdapterInfo> {
        let PeftFiles {
            settings,
            base_model_name_or_path: base,
            weights_path,
            store,
        } = PeftFiles::open(dir)?;
        let targets = self.lora_targets(&settings)?;
        let mut used = Vec::new();
        let mut adapters = HashMap::new();
        let (device, dtype) = (self.model.embed_tokens.device(), self.dtype());
        for (name, linear) in self.projections() {
            if !targets.contains(&name) {
                continue;
            }
            let (r, scale) = settings.rank_and_scale(&name)?;
            let [out, inp] = linear.shape();
            let (ka, kb) = (peft_key(&name, "lora_A"), peft_key(&name, "lora_B"));
            let a = store.load_f32_finite(&ka, &[r, inp])?;
            let b = store.load_f32_finite(&kb, &[out, r])?;
            used.push(ka);
            used.push(kb);
            let make = |v: Vec<f32>, shape: [usize; 2]| {
                let t = Tensor::<B, 2>::from_data(TensorData::new(v, shape), &device);
                if dtype != burn::tensor::DType::F32 {
                    t.cast(dtype)
                } else {
                    t
                }
            };
            adapters.insert(
                name.clone(),
                Lora {
                    lora_a: Param::from_tensor(make(a, [r, inp])),
                    lora_b: Param::from_tensor(make(b, [out, r])),
                    scale,
                    dropout: settings.dropout,
                },
            );
        }
        let unexpected: Vec<String> = store
            .names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::Input(format!(
                "{}: tensors that do not belong to a LoRA adapter on this model's target modules: {} \
                 (is the adapter made for another base model or target_modules?)",
                weights_path.display(),
                unexpected.join(", ")
            )));
        }
        for (name, linear) in self.projections_mut() {
            linear.set_slot(slot, adapters.remove(&name));
        }
        Ok(AdapterInfo {
            settings,
            modules: targets,
            base_model_name_or_path: base,
        })
    }

    /// Empties adapter slot `slot`.
    pub fn unload_adapter_slot(&mut self, slot: usize) {
        for (_, linear) in self.projections_mut() {
            linear.set_slot(slot, None);
        }
    }

    /// The factors of the adapter in `slot`, as f32, by module name in checkpoint order.
    pub fn adapter_tensors(&self, slot: usize) -> Result<Vec<(String, LoraTensors)>> {
        let read = |t: Tensor<B, 2>, what: &str| -> Result<(Vec<f32>, [usize; 2])> {
            let shape = t.dims();
            let values = t
                .cast(burn::tensor::DType::F32)
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| ModelError::Input(format!("reading {what}: {e:?}")))?;
            Ok((values, shape))
        };
        let mut out = Vec::new();
        for (name, linear) in self.projections() {
            if let Some(lora) = linear.slot(slot) {
                let (a, a_shape) = read(lora.lora_a.val(), &format!("{name}.lora_A"))?;
                let (b, b_shape) = read(lora.lora_b.val(), &format!("{name}.lora_B"))?;
                out.push((
                    name,
                    LoraTensors {
                        a,
                        a_shape,
                        b,
                        b_shape,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Writes the model's own adapter to `dir` in PEFT's format, atomically ([`write_peft`]).
    /// `settings` are the ones the adapter was made with.
    pub fn save_adapter(
        &self,
        dir: &Path,
        settings: &LoraSettings,
        base_model_name_or_path: &str,
    ) -> Result<()> {
        let modules = self.adapter_tensors(OWN_SLOT)?;
        if modules.is_empty() {
            return Err(ModelError::Input(
                "the model has no LoRA adapter to save".into(),
            ));
        }
        write_peft(dir, settings, base_model_name_or_path, &modules)
    }
}

/// One module's LoRA factors as f32, row-major: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensors {
    pub a: Vec<f32>,
    pub a_shape: [usize; 2],
    pub b: Vec<f32>,
    pub b_shape: [usize; 2],
}

/// Writes a PEFT adapter directory (`adapter_config.json` from `settings`,
/// `adapter_model.safetensors` with PEFT's keys, f32), replacing `dir` atomically (a temporary
/// directory renamed into place). The one writer of adapter files: training, checkpoints,
/// `hone adapter combine` and the benchmark tools all write through it.
pub fn write_peft(
    dir: &Path,
    settings: &LoraSettings,
    base_model_name_or_path: &str,
    modules: &[(String, LoraTensors)],
) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * modules.len());
    for (name, t) in modules {
        for (which, values, shape) in [("lora_A", &t.a, t.a_shape), ("lora_B", &t.b, t.b_shape)] {
            if values.len() != shape[0] * shape[1] {
                return Err(ModelError::Input(format!(
                    "{name}.{which}: {} values for shape {shape:?}",
                    values.len()
                )));
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((peft_key(name, which), shape.to_vec(), bytes));
        }
    }
    let config = peft_config_json(settings, base_model_name_or_path);
    let staged = hone_io::StagedDir::new(dir)?;
    let tmp = staged.path();
    let path = tmp.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    std::fs::write(&path, text + "\n").map_err(|e| ModelError::write(&path, e))?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("shape and byte length agree (checked above)");
            (n.clone(), view)
        })
        .collect();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let path = tmp.join(ADAPTER_WEIGHTS);
    safetensors::serialize_to_file(views, metadata, &path)
        .map_err(|e| ModelError::write_safetensors(&path, e))?;
    Ok(staged.commit()?)
}

/// The `adapter_config.json` hone writes: PEFT's keys for a plain (rs)LoRA, `target_modules`
/// sorted as PEFT writes them.
pub fn peft_config_json(settings: &LoraSettings, base_model_name_or_path: &str) -> Value {
    let targets = match &settings.target_modules {
        // PEFT expands only the plain string "all-linear"; a list holding it would name a
        // module. Write the projections it stands for, as PEFT itself saves them.
        t if t.is_all_linear() => {
            let mut names = crate::lora::PROJECTIONS.to_vec();
            names.sort();
            Value::from(names)
        }
        TargetModules::Names(names) => {
            let mut names = names.clone();
            names.sort();
            names.dedup();
            Value::from(names)
        }
        TargetModules::Pattern(p) => Value::from(p.clone()),
    };
    serde_json::json!({
        "alpha_pattern": settings.alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": settings.layers_to_transform,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": settings.r,
        "rank_pattern": settings.rank_pattern,
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": settings.use_rslora,
    })
}
