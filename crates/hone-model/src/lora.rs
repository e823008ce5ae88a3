//! LoRA (Hu et al., 2021) as PEFT implements it: a frozen linear `W` gains a trainable low-rank
//! update, `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with `A` `[r, in]` (kaiming-uniform init),
//! `B` `[out, r]` (zero init) and `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA). The product
//! is never materialised while training or serving; [`CausalLm::merge_lora`] folds `s · B A`
//! into `W` when a plain model is wanted.

use std::collections::BTreeMap;

use burn::module::{Module, Param, ParamId};
use burn::prelude::*;
use burn::tensor::Distribution;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::kernels::{composed, KernelBackend, Kernels};
use crate::model::{BaseWeight, CausalLm, Linear, OWN_SLOT};

/// The low-rank adapter of one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in_features]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[out_features, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter's input (only while gradients are tracked).
    pub dropout: f64,
}

impl<B: KernelBackend> Lora<B> {
    /// The adapter's contribution for `x` `[rows, in]`: `s · (drop(x) Aᵀ) Bᵀ`, `[rows, out]`,
    /// through the backend's fused LoRA product when `kernels` says so.
    pub fn delta(&self, x: Tensor<B, 2>, kernels: Kernels) -> Tensor<B, 2> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask / keep
        } else {
            x
        };
        // Base weights in bf16/f16 with f32 adapters (PEFT's mixed precision): the adapter
        // computes in its own dtype and its output joins the base output's.
        let (dtype, own) = (x.dtype(), self.lora_a.val().dtype());
        let x = if dtype != own { x.cast(own) } else { x };
        let y = if kernels.fused::<B>(own) {
            B::lora_delta(x, self.lora_a.val(), self.lora_b.val(), self.scale)
        } else {
            composed::lora_delta(x, self.lora_a.val(), self.lora_b.val(), self.scale)
        };
        if dtype != own {
            y.cast(dtype)
        } else {
            y
        }
    }
}

impl<B: Backend> Lora<B> {
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// `s · B A`, `[out, in]`: what merging adds to the base weight.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()) * self.scale
    }
}

/// The projections LoRA can target, by their checkpoint names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A predicate on full module names.
type ModuleMatcher = Box<dyn Fn(&str) -> bool>;

/// Which linear layers get an adapter, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`);
    /// `["all-linear"]` means every projection.
    Names(Vec<String>),
    /// A regular expression that must match the whole module name (PEFT's string form), or
    /// `"all-linear"`.
    Pattern(String),
}

impl TargetModules {
    pub(crate) fn is_all_linear(&self) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|n| n == "all-linear"),
            TargetModules::Pattern(p) => p == "all-linear",
        }
    }

    /// A matcher for full module names, or an error naming the bad pattern.
    fn matcher(&self) -> Result<ModuleMatcher> {
        if self.is_all_linear() {
            return Ok(Box::new(|_| true));
        }
        match self {
            TargetModules::Names(names) => {
                let names = names.clone();
                Ok(Box::new(move |module: &str| {
                    names
                        .iter()
                        .any(|t| module == t || module.ends_with(&format!(".{t}")))
                }))
            }
            TargetModules::Pattern(p) => {
                let re = Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    ModelError::Input(format!(
                        "target_modules: invalid regular expression `{p}`: {e}"
                    ))
                })?;
                Ok(Box::new(move |module: &str| re.is_match(module)))
            }
        }
    }
}

/// hone's LoRA settings (a subset of PEFT's `LoraConfig` that vLLM and PEFT agree on).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Per-module rank overrides: pattern (module-name suffix regex) -> rank.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides: pattern -> alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Restrict adapters to these layer indices (`None`: every layer).
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraSettings {
    /// Plain LoRA on the given projections.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
        }
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(ModelError::Input(
                "lora r must be a positive integer, found 0".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ModelError::Input(format!(
                "lora alpha must be positive, found {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Input(format!(
                "lora dropout must be in [0, 1), found {}",
                self.dropout
            )));
        }
        for (pattern, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(ModelError::Input(format!(
                    "rank_pattern `{pattern}`: rank must be positive"
                )));
            }
        }
        Ok(())
    }

    /// PEFT's lookup of a per-module override: the first pattern `p` with `(.*\.)?p$` matching.
    fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Result<Option<T>> {
        for (pattern, value) in patterns {
            let re = Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$"))
                .map_err(|e| ModelError::Input(format!("invalid pattern `{pattern}`: {e}")))?;
            if re.is_match(module) {
                return Ok(Some(*value));
            }
        }
        Ok(None)
    }

    /// `(rank, scale)` for the module named `module`.
    pub fn rank_and_scale(&self, module: &str) -> Result<(usize, f64)> {
        let r = Self::pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = Self::pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, scale))
    }
}

/// Layer index of a module name `model.layers.N....`.
fn layer_index(module: &str) -> Option<usize> {
    module
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

impl<B: Backend> CausalLm<B> {
    /// Every linear projection of the decoder with its full module name
    /// (`model.layers.N.self_attn.q_proj`, ...), in checkpoint order. `lm_head` is not included.
    pub fn projections(&self) -> Vec<(String, &Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (name, linear) in layer.projections() {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        out
    }

    /// Mutable access to every projection, as [`CausalLm::projections`].
    pub(crate) fn projections_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            for (name, linear) in layer.projections_mut() {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        out
    }

    /// The model's own adapters (slot [`OWN_SLOT`]) with their module names, in checkpoint
    /// order: the trainable parameters, as training, checkpoints and the optimizer walk them.
    pub fn adapters(&self) -> Vec<(String, &Lora<B>)> {
        self.projections()
            .into_iter()
            .filter_map(|(name, linear)| linear.lora().map(|l| (name, l)))
            .collect()
    }

    /// Mutable access to the model's own adapters, as [`CausalLm::adapters`].
    pub fn adapters_mut(&mut self) -> Vec<(String, &mut Lora<B>)> {
        self.projections_mut()
            .into_iter()
            .filter_map(|(name, linear)| {
                linear
                    .adapters
                    .get_mut(OWN_SLOT)
                    .and_then(Option::as_mut)
                    .map(|l| (name, l))
            })
            .collect()
    }

    /// Names of the projections `settings` selects, or an error when it selects none.
    pub fn lora_targets(&self, settings: &LoraSettings) -> Result<Vec<String>> {
        let matches = settings.target_modules.matcher()?;
        let targets: Vec<String> = self
            .projections()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| matches(name))
            .filter(
                |name| match (&settings.layers_to_transform, layer_index(name)) {
                    (Some(layers), Some(i)) => layers.contains(&i),
                    _ => true,
                },
            )
            .collect();
        if targets.is_empty() {
            return Err(ModelError::Input(format!(
                "target_modules {:?} matches no linear layer; hone's projections are {}",
                settings.target_modules,
                PROJECTIONS.join(", ")
            )));
        }
        Ok(targets)
    }

    /// Attaches freshly initialised adapters (PEFT's init: A kaiming-uniform with a = √5,
    /// i.e. U(-1/√in, 1/√in); B zero) to the projections `settings` selects. Returns their names.
    /// Random numbers come from the CPU backend's generator whatever the model's backend (seed it
    /// with `Cpu::seed` first; for a CPU model that is `B::seed`), so that one seed gives the same
    /// adapters on the CPU and on a GPU.
    pub fn attach_lora(&mut self, settings: &LoraSettings) -> Result<Vec<String>> {
        settings.validate()?;
        let targets = self.lora_targets(settings)?;
        let device = self.model.embed_tokens.device();
        for (name, linear) in self.projections_mut() {
            if !targets.contains(&name) {
                continue;
            }
            let (r, scale) = settings.rank_and_scale(&name)?;
            let [out, inp] = linear.shape();
            let bound = 1.0 / (inp as f64).sqrt();
            let a = Tensor::<crate::Cpu, 2>::random(
                [r, inp],
                Distribution::Uniform(-bound, bound),
                &Default::default(),
            );
            let a = Tensor::<B, 2>::from_data(a.into_data(), &device);
            let b = Tensor::<B, 2>::zeros([out, r], &device);
            linear.set_slot(
                OWN_SLOT,
                Some(Lora {
                    lora_a: Param::from_tensor(a),
                    lora_b: Param::from_tensor(b),
                    scale,
                    dropout: settings.dropout,
                }),
            );
        }
        Ok(targets)
    }

    /// Removes every adapter.
    pub fn detach_lora(&mut self) {
        for (_, linear) in self.projections_mut() {
            linear.set_slot(OWN_SLOT, None);
        }
    }

    /// Folds every adapter into its base weight (`W += s · B A`) and removes the adapters. A
    /// quantized base weight is decoded first: the merged projection is dense.
    pub fn merge_lora(&mut self) {
        let (device, dtype) = (self.model.embed_tokens.device(), self.dtype());
        for (_, linear) in self.projections_mut() {
            if let Some(lora) = linear.set_slot(OWN_SLOT, None) {
                let id = match &linear.weight {
                    BaseWeight::Dense(w) => w.id,
                    BaseWeight::Quantized(_) => ParamId::new(),
                };
                let merged = linear.dequantized_weight(&device, dtype) + lora.delta_weight();
                linear.weight = BaseWeight::Dense(Param::initialized(id, merged.detach()));
            }
        }
    }

    /// Number of trainable adapter parameters.
    pub fn lora_parameter_count(&self) -> usize {
        self.adapters()
            .iter()
            .map(|(_, l)| l)
            .map(|l| l.lora_a.val().shape().num_elements() + l.lora_b.val().shape().num_elements())
            .sum()
    }
}
