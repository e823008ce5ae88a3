//! GGUF files as hone models: the hyperparameters from the `{arch}.*` metadata, the tensors
//! under Hugging Face's names, and llama's q/k rows put back in Hugging Face's order.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of llama's `q_proj` and `k_proj`
//! (weights and biases) for its interleaved RoPE; transformers' GGUF loader undoes it
//! (`reverse_permute_weights`), and so does [`GgufWeights`]: within each head of `D` rows, GGUF
//! row `2i + j` is Hugging Face row `j·D/2 + i`. qwen2 files are not permuted (llama.cpp applies
//! RoPE to them in Hugging Face's half-split layout).

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value as Json};

use super::{GgufFile, QuantWeight, Value};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::WeightSource;

/// `(GGUF architecture, Hugging Face architectures name, model_type)`.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "LlamaForCausalLM", "llama"),
    ("qwen2", "Qwen2ForCausalLM", "qwen2"),
];

/// `(GGUF key after "{arch}.", config.json key)`: the one table mapping hyperparameters.
const HYPERPARAMETERS: &[(&str, &str)] = &[
    ("embedding_length", "hidden_size"),
    ("feed_forward_length", "intermediate_size"),
    ("block_count", "num_hidden_layers"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("context_length", "max_position_embeddings"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", "rope_theta"),
    ("vocab_size", "vocab_size"),
];

/// `(GGUF name, Hugging Face name)` of the tensors outside the decoder layers.
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// `(GGUF name after "blk.N.", Hugging Face name after "model.layers.N.")`.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_gate.bias", "mlp.gate_proj.bias"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_up.bias", "mlp.up_proj.bias"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("ffn_down.bias", "mlp.down_proj.bias"),
];

/// The GGUF name of a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight` ->
/// `blk.3.attn_q.weight`), for the tensors hone reads and writes.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_TENSORS.iter().find(|(_, h)| *h == rest)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Puts llama's q/k rows in llama.cpp's order for its interleaved RoPE (what
/// `convert_hf_to_gguf.py`'s `permute` does): per head of `d` rows, Hugging Face row
/// `j·d/2 + i` becomes GGUF row `2i + j`. The inverse of the reading side's un-permutation.
pub fn permute_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Vec<T> {
    reorder_head_rows(values, rows, cols, heads, true)
}

/// Per head of `d` rows, Hugging Face row `j·d/2 + i` and GGUF row `2i + j` trade places:
/// towards GGUF's order (`to_gguf`) or back.
fn reorder_head_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
    to_gguf: bool,
) -> Vec<T> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (gguf, hf) = (h * d + 2 * i + j, h * d + j * half + i);
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn metadata_error(file: &GgufFile, key: &str, message: impl Into<String>) -> ModelError {
    super::GgufError::Metadata {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
    .into()
}

/// The GGUF architecture (`general.architecture`), refused unless hone implements it.
pub fn architecture(
    file: &GgufFile,
) -> Result<&'static (&'static str, &'static str, &'static str)> {
    let arch = file.get_str("general.architecture")?;
    ARCHITECTURES
        .iter()
        .find(|(a, _, _)| *a == arch)
        .ok_or_else(|| ModelError::Unsupported {
            path: file.path().to_path_buf(),
            what: "GGUF architecture (general.architecture)",
            found: arch.to_string(),
            supported: ARCHITECTURES
                .iter()
                .map(|(a, _, _)| *a)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The model's configuration from the file's metadata, resolved and validated by the same code
/// as a `config.json` (errors name the GGUF key).
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    let (config, arch) = config_map(file)?;
    let mut config = ModelConfig::from_json_str(&Json::Object(config).to_string(), file.path())
        .map_err(|e| to_gguf_key(e, arch))?;
    if let Some(factors) = rope_frequency_factors(file, config.rotary_dim())? {
        config.rope_scaling = crate::rope::RopeScaling::Factors(factors);
    }
    Ok(config)
}

/// The name of llama.cpp's per-frequency RoPE divisors (Llama 3.1+ files).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// `rope_freqs.weight`, when the file has it: `rotary_dim / 2` positive finite divisors.
fn rope_frequency_factors(file: &GgufFile, rotary_dim: usize) -> Result<Option<Vec<f32>>> {
    if file.tensor_info(ROPE_FREQS).is_none() {
        return Ok(None);
    }
    let (values, shape) = file.tensor_f32(ROPE_FREQS)?;
    if shape != [rotary_dim / 2] || values.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(super::GgufError::Tensor {
            path: file.path().to_path_buf(),
            tensor: ROPE_FREQS.into(),
            message: format!(
                "expected {} positive divisors (half the rotary dimension {rotary_dim}), found \
                 shape {shape:?}",
                rotary_dim / 2
            ),
        }
        .into());
    }
    Ok(Some(values))
}

/// The file's metadata as a Hugging Face `config.json` (validated as [`model_config`] does; the
/// activation and dtype written out: llama and qwen2 use SiLU, the dtype is `dtype`'s
/// `torch_dtype` name).
pub fn hf_config(file: &GgufFile, torch_dtype: &str) -> Result<Json> {
    model_config(file)?;
    if file.tensor_info(ROPE_FREQS).is_some() {
        return Err(ModelError::Unsupported {
            path: file.path().to_path_buf(),
            what: "RoPE frequency factors in a Hugging Face config.json (tensor rope_freqs.weight)",
            found: ROPE_FREQS.into(),
            supported: "GGUF files without rope_freqs; load or export the GGUF file itself, or \
                        start from the Hugging Face directory of the Llama 3.x model"
                .into(),
        });
    }
    let (mut config, _) = config_map(file)?;
    config.insert("hidden_act".into(), json!("silu"));
    config.insert("torch_dtype".into(), json!(torch_dtype));
    Ok(Json::Object(config))
}

/// The `config.json` keys the file's metadata gives, and its architecture.
fn config_map(file: &GgufFile) -> Result<(Map<String, Json>, &'static str)> {
    let &(arch, hf_arch, model_type) = architecture(file)?;
    let mut config = Map::new();
    config.insert("architectures".into(), json!([hf_arch]));
    config.insert("model_type".into(), json!(model_type));
    for (suffix, hf_key) in HYPERPARAMETERS {
        let key = format!("{arch}.{suffix}");
        let Some(value) = file.get(&key) else {
            continue;
        };
        let number = match value {
            // An f32 as its shortest decimal (1e-5, not 9.999999747378752e-6): the value a
            // config.json written from it holds, and the same f32.
            Value::F32(v) => format!("{v}").parse::<f64>().ok().map(|v| json!(v)),
            Value::F64(_) => value.as_f64().map(|v| json!(v)),
            Value::Array(_) => {
                return Err(metadata_error(
                    file,
                    &key,
                    "per-layer values (an array) are not supported; expected one number",
                ))
            }
            _ => value.as_u64().map(|v| json!(v)),
        };
        let number = number.ok_or_else(|| {
            metadata_error(
                file,
                &key,
                format!("expected a number, found {} {value}", value.type_name()),
            )
        })?;
        config.insert((*hf_key).into(), number);
    }
    for required in [
        "embedding_length",
        "feed_forward_length",
        "block_count",
        "attention.head_count",
    ] {
        file.get_u64(&format!("{arch}.{required}"))?;
    }
    if !config.contains_key("vocab_size") {
        let rows = match (
            file.tensor_info("token_embd.weight"),
            file.get("tokenizer.ggml.tokens"),
        ) {
            (Some(t), _) => t.shape()[0],
            (None, Some(Value::Array(tokens))) => tokens.len(),
            _ => {
                return Err(metadata_error(
                    file,
                    &format!("{arch}.vocab_size"),
                    "is missing, and so are token_embd.weight and tokenizer.ggml.tokens",
                ))
            }
        };
        config.insert("vocab_size".into(), json!(rows));
    }
    if let Some(heads) = file
        .get(&format!("{arch}.attention.head_count"))
        .and_then(Value::as_u64)
    {
        let hidden = file.get_u64(&format!("{arch}.embedding_length"))?;
        let head_dim = config
            .get("head_dim")
            .and_then(Json::as_u64)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        if let Some(rot) = file
            .get(&format!("{arch}.rope.dimension_count"))
            .and_then(Value::as_u64)
        {
            if head_dim > 0 && rot != head_dim {
                config.insert(
                    "partial_rotary_factor".into(),
                    json!(rot as f64 / head_dim as f64),
                );
            }
        }
    }
    let scaling_key = format!("{arch}.rope.scaling.type");
    match file.get(&scaling_key).map(|v| v.as_str()) {
        None | Some(Some("none")) => {}
        Some(Some(kind)) => {
            let factor_key = format!("{arch}.rope.scaling.factor");
            let factor = file.get_f64(&factor_key)?;
            config.insert(
                "rope_scaling".into(),
                json!({"rope_type": kind, "type": kind, "factor": factor}),
            );
        }
        Some(None) => {
            return Err(metadata_error(file, &scaling_key, "expected a string"));
        }
    }
    config.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor_info("output.weight").is_none()),
    );
    if arch == "llama" {
        config.insert(
            "attention_bias".into(),
            json!(file.tensor_info("blk.0.attn_q.bias").is_some()),
        );
        config.insert(
            "mlp_bias".into(),
            json!(file.tensor_info("blk.0.ffn_up.bias").is_some()),
        );
    }
    for (key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(v) = file.get(key) {
            let id = v.as_u64().ok_or_else(|| {
                metadata_error(file, key, format!("expected a token id, found {v}"))
            })?;
            config.insert(hf_key.into(), json!(id));
        }
    }
    Ok((config, arch))
}

/// Renames a `config.json` key in a configuration error to the GGUF key it came from.
fn to_gguf_key(e: ModelError, arch: &str) -> ModelError {
    match e {
        ModelError::InvalidConfig { path, key, message } => {
            let gguf_key = HYPERPARAMETERS
                .iter()
                .find(|(_, hf)| *hf == key)
                .map(|(suffix, _)| format!("{arch}.{suffix}"))
                .unwrap_or(key);
            ModelError::InvalidConfig {
                path,
                key: gguf_key,
                message,
            }
        }
        other => other,
    }
}

/// How a tensor's rows are reordered on the way in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rows {
    AsStored,
    /// llama's q/k: un-permute per head (`heads` heads of equal size).
    Unpermute {
        heads: usize,
    },
}

/// A GGUF file's tensors under Hugging Face's names, converted to f32.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    /// Hugging Face name -> (GGUF name, row order).
    map: HashMap<String, (String, Rows)>,
}

impl<'a> GgufWeights<'a> {
    /// The tensors of `file`, whose configuration is `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Result<Self> {
        let &(arch, _, _) = architecture(file)?;
        let mut map = HashMap::new();
        for (g, h) in GLOBAL_TENSORS {
            map.insert(h.to_string(), (g.to_string(), Rows::AsStored));
        }
        for layer in 0..config.num_layers {
            for (g, h) in LAYER_TENSORS {
                let rows = match (arch, *g) {
                    ("llama", "attn_q.weight" | "attn_q.bias") => Rows::Unpermute {
                        heads: config.num_heads,
                    },
                    ("llama", "attn_k.weight" | "attn_k.bias") => Rows::Unpermute {
                        heads: config.num_kv_heads,
                    },
                    _ => Rows::AsStored,
                };
                map.insert(
                    format!("model.layers.{layer}.{h}"),
                    (format!("blk.{layer}.{g}"), rows),
                );
            }
        }
        Ok(Self { file, map })
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            files: self.file.path().display().to_string(),
        }
    }
}

/// Puts llama's permuted q/k rows back in Hugging Face's order: per head of `d` rows, GGUF row
/// `2i + j` is Hugging Face row `j·d/2 + i`. Rows are `cols` elements of any type `T` (f32
/// values, or the bytes of a row of blocks).
fn unpermute_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Vec<T> {
    reorder_head_rows(values, rows, cols, heads, false)
}

impl GgufWeights<'_> {
    /// The GGUF name, row order and entry of tensor `name`, checked against `expected` (a q/k
    /// tensor to un-permute must split into heads of an even number of rows).
    fn entry(&self, name: &str, expected: &[usize]) -> Result<(&str, Rows, &super::TensorInfo)> {
        let (gguf_name, rows) = self.map.get(name).ok_or_else(|| self.missing(name))?;
        let info = self
            .file
            .tensor_info(gguf_name)
            .ok_or_else(|| self.missing(gguf_name))?;
        let shape = info.shape();
        let bad_heads = match *rows {
            Rows::AsStored => false,
            Rows::Unpermute { heads } => {
                heads == 0 || shape[0] % heads != 0 || (shape[0] / heads) % 2 != 0
            }
        };
        if shape != expected || bad_heads {
            return Err(ModelError::ShapeMismatch {
                name: gguf_name.clone(),
                path: self.file.path().to_path_buf(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok((gguf_name, *rows, info))
    }
}

impl GgufWeights<'_> {
    /// The row-major (PyTorch) shape of tensor `name` (a Hugging Face name).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (gguf_name, _) = self.map.get(name).ok_or_else(|| self.missing(name))?;
        self.file
            .tensor_info(gguf_name)
            .map(|info| info.shape())
            .ok_or_else(|| self.missing(gguf_name))
    }

    /// Whether `name` (a Hugging Face name) is a tensor of the file.
    pub fn contains(&self, name: &str) -> bool {
        self.map
            .get(name)
            .is_some_and(|(g, _)| self.file.tensor_info(g).is_some())
    }

    /// The file's tensors that have no Hugging Face name (neither a global tensor nor one of a
    /// decoder layer's), by their GGUF names.
    pub fn unmapped(&self) -> Vec<String> {
        let mapped: HashSet<&str> = self.map.values().map(|(g, _)| g.as_str()).collect();
        self.file
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| !mapped.contains(n.as_str()) && n != ROPE_FREQS)
            .collect()
    }
}

impl WeightSource for GgufWeights<'_> {
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (gguf_name, rows, info) = self.entry(name, expected)?;
        let shape = info.shape();
        let (values, _) = self.file.tensor_f32(gguf_name)?;
        self.file.release_tensor_pages(gguf_name);
        Ok(match rows {
            Rows::AsStored => values,
            Rows::Unpermute { heads } => {
                let cols = shape.get(1).copied().unwrap_or(1);
                unpermute_rows(&values, shape[0], cols, heads)
            }
        })
    }

    /// The tensor's bytes (copied out of the mapped file; llama's q/k rows un-permuted) when it
    /// is a 2-D tensor in a block format or a 16-bit float.
    fn load_quant(&self, name: &str, expected: [usize; 2]) -> Result<Option<QuantWeight>> {
        let (gguf_name, rows, info) = self.entry(name, &expected)?;
        let ty = info.ggml_type;
        if !ty.is_kept_as_stored() {
            return Ok(None);
        }
        let [out, inp] = expected;
        let bytes = self.file.tensor_bytes(gguf_name)?;
        let bytes = match rows {
            Rows::AsStored => bytes.to_vec(),
            Rows::Unpermute { heads } => unpermute_rows(bytes, out, ty.byte_len(inp), heads),
        };
        self.file.release_tensor_pages(gguf_name);
        QuantWeight::new(ty, bytes, out, inp)
            .map(Some)
            .map_err(|message| {
                super::GgufError::Tensor {
                    path: self.file.path().to_path_buf(),
                    tensor: gguf_name.to_string(),
                    message,
                }
                .into()
            })
    }

    fn names(&self) -> Vec<String> {
        let by_gguf: HashMap<&str, &str> = self
            .map
            .iter()
            .map(|(h, (g, _))| (g.as_str(), h.as_str()))
            .collect();
        let mut names: Vec<String> = self
            .file
            .tensors()
            .iter()
            .filter(|t| t.name != ROPE_FREQS) // part of the configuration (`RopeScaling::Factors`)
            .map(|t| {
                by_gguf
                    .get(t.name.as_str())
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| t.name.clone())
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        names.sort();
        names
    }
}

/// Bytes the weights of GGUF `file` take once loaded: the projections of the decoder layers and
/// an untied `output.weight` at their stored size when they are in a block format or a 16-bit
/// float and `keep_quantized` (see [`crate::KernelBackend::keeps_quantized`]), every other
/// tensor decoded to values of `dtype_bytes` bytes, plus the stored copy of a token embedding
/// the tied output projection multiplies by. Memory estimates use it in place of a parameter
/// count.
pub fn resident_weight_bytes(file: &GgufFile, keep_quantized: bool, dtype_bytes: usize) -> u64 {
    const PROJECTIONS: [&str; 7] = [
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    let projection = |name: &str| {
        name == "output.weight"
            || name.strip_prefix("blk.").is_some_and(|rest| {
                rest.split_once('.')
                    .is_some_and(|(_, t)| PROJECTIONS.contains(&t))
            })
    };
    let tensors = file.tensors();
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    tensors
        .iter()
        .map(|t| {
            let kept = keep_quantized && t.ggml_type.is_kept_as_stored();
            if kept && projection(&t.name) {
                t.byte_len() as u64
            } else if kept && tied && t.name == "token_embd.weight" {
                t.len() as u64 * dtype_bytes as u64 + t.byte_len() as u64
            } else {
                t.len() as u64 * dtype_bytes as u64
            }
        })
        .sum()
}
