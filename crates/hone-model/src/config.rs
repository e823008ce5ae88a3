//! Model configuration: a serde mirror of Hugging Face `config.json` ([`HfConfig`], accepting both
//! the transformers 4.x keys `rope_theta` + `rope_scaling` and the 5.x `rope_parameters`) resolved
//! once into hone's own [`ModelConfig`]. Later code never looks at raw JSON.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;

/// The architectures hone implements, by their `architectures` / `model_type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM` (`model_type = "llama"`).
    Llama,
    /// `MistralForCausalLM` (`model_type = "mistral"`).
    Mistral,
    /// `Qwen2ForCausalLM` (`model_type = "qwen2"`).
    Qwen2,
}

/// `(architectures name, model_type, Architecture)`: the one table mapping HF names to ours.
const ARCHITECTURES: &[(&str, &str, Architecture)] = &[
    ("LlamaForCausalLM", "llama", Architecture::Llama),
    ("MistralForCausalLM", "mistral", Architecture::Mistral),
    ("Qwen2ForCausalLM", "qwen2", Architecture::Qwen2),
];

fn supported_architectures() -> String {
    ARCHITECTURES
        .iter()
        .map(|(a, m, _)| format!("{a} (model_type \"{m}\")"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One or several token ids (`eos_token_id` may be a list in `config.json` and
/// `generation_config.json`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![*id],
            OneOrMany::Many(ids) => ids.clone(),
        }
    }
}

/// Serde mirror of a Hugging Face `config.json` for the Llama family. Unknown keys are ignored
/// (real checkpoints carry many that do not change the computation).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// transformers 4.x RoPE keys.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x RoPE key: `{"rope_type", "rope_theta", ...scaling keys}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Mistral: window of every layer (may be `null`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: sliding window only when this is true, on layers `>= max_window_layers`.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5.x: `"full_attention"` / `"sliding_attention"` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub bos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub pad_token_id: Option<OneOrMany>,
}

/// hone's resolved model configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Fraction of `head_dim` that is rotated (1.0 for every supported architecture's default).
    pub partial_rotary_factor: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding attention window per layer (`None` = full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and resolves `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and resolves a `config.json` text; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| {
            let message = e.to_string();
            match message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                Some(key) => ModelError::InvalidConfig {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                    message: "required key is missing".into(),
                },
                None => ModelError::InvalidJson {
                    path: path.to_path_buf(),
                    message,
                },
            }
        })?;
        raw.resolve(path)
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Number of rotated dimensions of each head.
    pub fn rotary_dim(&self) -> usize {
        ((self.head_dim as f64) * self.partial_rotary_factor) as usize
    }

    /// The SmolLM-135M shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
    /// vocab 49152, tied), used with random weights by the benchmarks.
    pub fn smol() -> Self {
        Self::llama_shape(576, 30, 9, 3, 1536, 49152, true)
    }

    /// A small Llama shape (hidden 512, 8 layers, 8 heads, 8 KV heads, intermediate 1408,
    /// vocab 32000, untied), used with random weights by the benchmarks.
    pub fn small() -> Self {
        Self::llama_shape(512, 8, 8, 8, 1408, 32000, false)
    }

    /// A plain Llama configuration of the given shape (rope theta 1e4, eps 1e-5).
    pub fn llama_shape(
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
        tied: bool,
    ) -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hidden / heads,
            vocab_size: vocab,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
            tie_word_embeddings: tied,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: vec![None; layers],
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }
}

fn invalid(path: &Path, key: &str, message: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

impl HfConfig {
    fn architecture(&self, path: &Path) -> Result<Architecture> {
        if let Some(names) = &self.architectures {
            let name = names.first().map(String::as_str).unwrap_or("");
            return ARCHITECTURES
                .iter()
                .find(|(a, _, _)| *a == name)
                .map(|(_, _, arch)| *arch)
                .ok_or_else(|| ModelError::Unsupported {
                    path: path.to_path_buf(),
                    what: "architecture",
                    found: names.join(", "),
                    supported: supported_architectures(),
                });
        }
        let model_type = self.model_type.as_deref().unwrap_or("");
        ARCHITECTURES
            .iter()
            .find(|(_, m, _)| *m == model_type)
            .map(|(_, _, arch)| *arch)
            .ok_or_else(|| ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "model_type",
                found: model_type.to_string(),
                supported: supported_architectures(),
            })
    }

    /// Validates the raw configuration and resolves defaults as transformers does.
    pub fn resolve(&self, path: &Path) -> Result<ModelConfig> {
        let architecture = self.architecture(path)?;
        if let (Some(model_type), Some((_, expected, _))) = (
            self.model_type.as_deref(),
            ARCHITECTURES.iter().find(|(_, _, a)| *a == architecture),
        ) {
            if model_type != *expected {
                return Err(invalid(
                    path,
                    "model_type",
                    format!(
                        "`{model_type}` does not match the architecture (expected `{expected}`)"
                    ),
                ));
            }
        }
        for (key, value) in [
            ("hidden_size", Some(self.hidden_size)),
            ("intermediate_size", Some(self.intermediate_size)),
            ("num_hidden_layers", Some(self.num_hidden_layers)),
            ("num_attention_heads", Some(self.num_attention_heads)),
            ("vocab_size", Some(self.vocab_size)),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == Some(0) {
                return Err(invalid(
                    path,
                    key,
                    "expected a positive integer (>= 1), found 0",
                ));
            }
        }
        if let Some(eps) = self.rms_norm_eps {
            if !(eps > 0.0 && eps.is_finite()) {
                return Err(invalid(
                    path,
                    "rms_norm_eps",
                    format!("expected a finite number > 0 (e.g. 1e-5), found {eps}"),
                ));
            }
        }
        let num_heads = self.num_attention_heads;
        let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(
                path,
                "num_key_value_heads",
                format!("must divide num_attention_heads ({num_heads}), found {num_kv_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => {
                if !self.hidden_size.is_multiple_of(num_heads) {
                    return Err(invalid(
                        path,
                        "hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads {num_heads}; set head_dim",
                            self.hidden_size
                        ),
                    ));
                }
                self.hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                path,
                "head_dim",
                format!("must be even for RoPE, found {head_dim}"),
            ));
        }
        let act = self.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "hidden_act",
                found: act.to_string(),
                supported: "silu".into(),
            });
        }

        let (rope_theta, rope_scaling, partial) = self.resolve_rope(path, architecture)?;
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            let key = match &self.rope_parameters {
                Some(p) if p.get("rope_theta").is_some() => "rope_parameters.rope_theta",
                _ => "rope_theta",
            };
            return Err(invalid(
                path,
                key,
                format!("expected a finite number > 0 (e.g. 10000), found {rope_theta}"),
            ));
        }
        let partial_rotary_factor = partial.or(self.partial_rotary_factor).unwrap_or(1.0);
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(invalid(
                path,
                "partial_rotary_factor",
                format!("expected a number in (0, 1], found {partial_rotary_factor}"),
            ));
        }
        let rotary = (head_dim as f64 * partial_rotary_factor) as usize;
        if !rotary.is_multiple_of(2) || rotary == 0 {
            return Err(invalid(
                path,
                "partial_rotary_factor",
                format!("gives an odd or empty rotary dimension ({rotary})"),
            ));
        }

        let layers = self.num_hidden_layers;
        let sliding_window = self.resolve_sliding_window(path, architecture, layers)?;

        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Llama => (
                attention_bias,
                attention_bias,
                self.mlp_bias.unwrap_or(false),
            ),
            Architecture::Mistral => (false, false, false),
            Architecture::Qwen2 => (true, false, false),
        };
        let first = |v: &Option<OneOrMany>| v.as_ref().and_then(|v| v.to_vec().first().copied());

        Ok(ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            partial_rotary_factor,
            // LlamaConfig, MistralConfig and Qwen2Config all default to untied embeddings.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: first(&self.bos_token_id),
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(OneOrMany::to_vec)
                .unwrap_or_default(),
        })
    }

    /// Returns `(rope_theta, scaling, partial_rotary_factor from rope_parameters)`.
    fn resolve_rope(
        &self,
        path: &Path,
        architecture: Architecture,
    ) -> Result<(f64, RopeScaling, Option<f64>)> {
        let default_theta = match architecture {
            Architecture::Qwen2 | Architecture::Mistral => 1_000_000.0,
            Architecture::Llama => 10_000.0,
        };
        if let Some(params) = &self.rope_parameters {
            let key = "rope_parameters";
            let obj = params
                .as_object()
                .ok_or_else(|| invalid(path, key, "expected an object"))?;
            if obj.values().all(|v| v.is_object()) && !obj.is_empty() {
                return Err(invalid(
                    path,
                    key,
                    "per-layer-type RoPE parameters are not supported by the Llama family",
                ));
            }
            let theta = match obj.get("rope_theta") {
                Some(v) => v.as_f64().ok_or_else(|| {
                    invalid(path, "rope_parameters.rope_theta", "expected a number")
                })?,
                None => self.rope_theta.unwrap_or(default_theta),
            };
            let partial = obj.get("partial_rotary_factor").and_then(|v| v.as_f64());
            let scaling = RopeScaling::from_json(params, path, key, self.max_position_embeddings)?;
            return Ok((theta, scaling, partial));
        }
        let theta = self.rope_theta.unwrap_or(default_theta);
        let scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => RopeScaling::Default,
            Some(v) => {
                RopeScaling::from_json(v, path, "rope_scaling", self.max_position_embeddings)?
            }
        };
        Ok((theta, scaling, None))
    }

    fn resolve_sliding_window(
        &self,
        path: &Path,
        architecture: Architecture,
        layers: usize,
    ) -> Result<Vec<Option<usize>>> {
        if let Some(types) = &self.layer_types {
            if types.len() != layers {
                return Err(invalid(
                    path,
                    "layer_types",
                    format!(
                        "has {} entries, expected num_hidden_layers = {layers}",
                        types.len()
                    ),
                ));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => match self.sliding_window {
                        Some(w) if w > 0 => Ok(Some(w)),
                        _ => Err(invalid(
                            path,
                            "sliding_window",
                            "layer_types asks for sliding attention but no window is set",
                        )),
                    },
                    other => Err(invalid(
                        path,
                        "layer_types",
                        format!("unknown layer type `{other}` (expected full_attention or sliding_attention)"),
                    )),
                })
                .collect();
        }
        let window = self.sliding_window.filter(|w| *w > 0);
        Ok(match architecture {
            Architecture::Llama => vec![None; layers],
            Architecture::Mistral => vec![window; layers],
            Architecture::Qwen2 => {
                if self.use_sliding_window.unwrap_or(false) {
                    let from = self.max_window_layers.unwrap_or(layers);
                    (0..layers)
                        .map(|i| if i >= from { window } else { None })
                        .collect()
                } else {
                    vec![None; layers]
                }
            }
        })
    }
}
