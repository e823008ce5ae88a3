//! Hugging Face model directory output, as transformers' `save_pretrained` writes it: tensors in
//! `model.safetensors` (metadata `{"format": "pt"}`), or split into
//! `model-0000K-of-0000N.safetensors` shards of at most `max_shard_size` bytes (a larger tensor
//! gets a shard of its own) listed by `model.safetensors.index.json` (`metadata.total_size`,
//! `weight_map`); `config.json` with the written dtype; the base's other files copied.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

use hone_model::FloatDtype;

use crate::error::{MergeError, Result};

/// The single-file weights name and the shard index name.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Parses a size as transformers' `max_shard_size`: a number of bytes, or a number with a unit
/// (`KB`, `MB`, `GB` are powers of 1000; `KiB`, `MiB`, `GiB` powers of 1024; case-insensitive).
pub fn parse_size(input: &str) -> Result<u64> {
    let invalid = |message: &str| MergeError::InvalidSize {
        input: input.to_string(),
        message: message.to_string(),
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid("expected a number"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(invalid("unknown unit")),
    };
    let bytes = number * multiplier as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(invalid("the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Orders tensor names as modules are numbered: digit runs compare as numbers, so
/// `model.layers.2` comes before `model.layers.10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then(x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len()).then(a.cmp(b))
}

/// Splits tensors (their byte sizes, in writing order) into consecutive shards of at most
/// `max_bytes` each, as `huggingface_hub`'s `split_torch_state_dict_into_shards` does: a tensor
/// that does not fit starts a new shard; a tensor larger than `max_bytes` is alone in its shard.
pub fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut used) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && used + size > max_bytes {
            shards.push(start..i);
            (start, used) = (i, 0);
        }
        used += size;
    }
    if start < sizes.len() {
        shards.push(start..sizes.len());
    }
    shards
}

/// The file name of shard `index` (0-based) of `count`, or `model.safetensors` when alone.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// Writes one safetensors file with metadata `{"format": "pt"}`. `tensors` holds
/// `(name, shape, little-endian bytes)` of `dtype`.
pub fn write_safetensors(
    path: &Path,
    dtype: Dtype,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(dtype, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| MergeError::Serialize {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => MergeError::io(path, source),
        other => MergeError::Serialize {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|e| MergeError::io(path, e))
}

/// Writes `model.safetensors.index.json`: `total_size` (bytes of tensor data) and the
/// tensor -> file map, sorted by tensor name.
pub fn write_index(
    dir: &Path,
    total_size: u64,
    weight_map: &BTreeMap<String, String>,
) -> Result<()> {
    let map: serde_json::Map<String, Value> = weight_map
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": map,
    });
    write_json(&dir.join(INDEX_FILE), &index)
}

/// Whether a base-directory file is weights (replaced by the merged ones) or belongs to an
/// adapter, and so is not copied.
fn is_weights_file(name: &str) -> bool {
    const EXTENSIONS: [&str; 8] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".h5",
        ".msgpack",
    ];
    EXTENSIONS.iter().any(|e| name.ends_with(e))
        || name.ends_with(".index.json")
        || name == "adapter_config.json"
}

/// The dtype `config.json` declares (`dtype`, transformers 5, or `torch_dtype`), if any.
pub fn declared_dtype(config: &Value) -> Option<FloatDtype> {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Value::as_str))
        .and_then(FloatDtype::from_config_name)
}

/// Reads `config.json` of `base` as JSON.
pub fn read_config(base: &Path) -> Result<Value> {
    let path = base.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| MergeError::io(&path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| hone_model::ModelError::InvalidJson {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if !value.is_object() {
        return Err(MergeError::InvalidConfig {
            path,
            key: "(root)".into(),
            message: "expected a JSON object".into(),
        });
    }
    Ok(value)
}

/// Writes the non-weight files of a Hugging Face directory for GGUF base `file` into `out`
/// (`config.json` declaring `dtype`, the tokenizer files and the generation config, from its
/// metadata, [`hone_model::gguf::hf::hf_files`]); returns the names besides `config.json`.
pub fn write_gguf_files(
    file: &hone_model::gguf::GgufFile,
    dtype: FloatDtype,
    out: &Path,
) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for (name, document) in hone_model::gguf::hf::hf_files(file, dtype.config_name())? {
        write_json(&out.join(name), &document)?;
        if name != "config.json" {
            written.push(name.to_string());
        }
    }
    Ok(written)
}

/// Writes `config` to `out/config.json` with its dtype keys set to `dtype` (`torch_dtype` and/or
/// `dtype`, whichever it has; `torch_dtype` when it has neither), then copies every other
/// regular file of `base` that is not weights (tokenizer files, `generation_config.json`,
/// `chat_template.jinja`, licences, ...). Hidden files and directories are skipped. Returns the
/// copied file names.
pub fn write_config_and_copy_files(
    base: &Path,
    config: &Value,
    dtype: FloatDtype,
    out: &Path,
) -> Result<Vec<String>> {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        let mut set = false;
        for key in ["torch_dtype", "dtype"] {
            if map.contains_key(key) {
                map.insert(key.to_string(), Value::from(dtype.config_name()));
                set = true;
            }
        }
        if !set {
            map.insert("torch_dtype".to_string(), Value::from(dtype.config_name()));
        }
    }
    write_json(&out.join("config.json"), &config)?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(base)
        .map_err(|e| MergeError::io(base, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| MergeError::io(base, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    let mut copied = Vec::new();
    for path in entries {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if name.starts_with('.')
            || name == "config.json"
            || is_weights_file(&name)
            || !path.is_file()
        {
            continue;
        }
        let target = out.join(&name);
        std::fs::copy(&path, &target).map_err(|e| MergeError::io(&path, e))?;
        copied.push(name);
    }
    Ok(copied)
}
