//! Interoperability with the Hugging Face stack, checked without Python against what PEFT and
//! transformers did with hone's outputs (fixtures/hf_interop/, written by
//! scripts/hf_interop_check.py; see its README.md).
//!
//! For each fixture model there is an adapter `hone train` wrote, the logits PEFT computed after
//! `PeftModel.from_pretrained` of it, and the logits transformers computed from the directories
//! `hone merge` wrote of it (f32 in shards with an index, and bf16), plus the layout of those
//! directories (files, tensor names, dtypes and shapes, config.json, generation_config.json, the
//! shard index) that transformers loaded with no missing or unexpected keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;
use serde_json::{json, Value};

const MODELS: [&str; 2] = ["llama_gqa", "qwen2_tied"];
const TOLERANCE: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// fixtures/hf_interop/<model>: the hone-written adapter and the Python side's records.
fn interop(model: &str) -> PathBuf {
    root().join("fixtures/hf_interop").join(model)
}

/// fixtures/peft/<model>: the base model and `refs/inputs.safetensors`.
fn base(model: &str) -> PathBuf {
    root().join("fixtures/peft").join(model)
}

fn hone() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hone"));
    // The adapters name their base relative to the repository root.
    command.current_dir(root());
    command
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The f32 `logits` tensor of a safetensors file, with its shape.
fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{}", path.display());
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), values)
}

fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (shape_a, a) = read_logits(a);
    let (shape_b, b) = read_logits(b);
    assert_eq!(shape_a, shape_b, "logits shapes differ");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `hone logits` of `model_dir` (+ `adapter`) on the fixture inputs of `model`, into `out`.
fn hone_logits(model: &str, model_dir: &Path, adapter: Option<&Path>, out: &Path) {
    let mut command = hone();
    command.args(["logits", "--model"]).arg(model_dir);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    command
        .arg("--input-ids")
        .arg(base(model).join("refs/inputs.safetensors"))
        .arg("--out")
        .arg(out);
    ok(&command.output().expect("the hone binary runs"));
}

/// The layout of a model directory as scripts/hf_interop_check.py records it: sorted file
/// names, every tensor's `[dtype, shape]` and file, and the JSON files transformers reads.
fn layout(dir: &Path) -> Value {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    let mut tensors = BTreeMap::new();
    let mut shard_of = BTreeMap::new();
    for file in files.iter().filter(|f| f.ends_with(".safetensors")) {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        for (name, info) in metadata.tensors() {
            tensors.insert(name.clone(), json!([info.dtype.to_string(), info.shape]));
            shard_of.insert(name, json!(file));
        }
    }
    let mut record = json!({"files": files, "tensors": tensors, "shard_of": shard_of});
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        if dir.join(name).is_file() {
            record[name] = read_json(&dir.join(name));
        }
    }
    record
}

/// Merges the fixture adapter of `model` as the record's `which` ("merge_f32" or "merge_bf16")
/// says; checks the layout against the one transformers accepted and the logits (computed by
/// hone in f32) against transformers' logits `reference`.
fn merge_matches_transformers(model: &str, which: &str, reference: &str) {
    let record = read_json(&interop(model).join("merged_layout.json"));
    let accepted = &record[which];
    let args: Vec<String> = accepted["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    ok(&hone()
        .args(["merge", "--model"])
        .arg(base(model))
        .arg("--adapter")
        .arg(interop(model).join("adapter"))
        .args(&args)
        .arg("--out")
        .arg(&merged)
        .output()
        .expect("the hone binary runs"));

    let written = layout(&merged);
    for key in [
        "files",
        "tensors",
        "shard_of",
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        assert_eq!(
            written.get(key),
            accepted.get(key),
            "{model} {which}: `{key}` differs from the layout transformers loaded"
        );
    }

    let out = tmp.path().join("logits.safetensors");
    hone_logits(model, &merged, None, &out);
    let diff = max_abs_diff(&out, &interop(model).join(reference));
    assert!(
        diff <= TOLERANCE,
        "{model} {which}: hone's logits of the merged model differ from transformers' by {diff}"
    );
}

#[test]
fn hone_written_adapters_give_pefts_logits() {
    for model in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("logits.safetensors");
        hone_logits(
            model,
            &base(model),
            Some(&interop(model).join("adapter")),
            &out,
        );
        let diff = max_abs_diff(&out, &interop(model).join("logits_peft.safetensors"));
        assert!(
            diff <= TOLERANCE,
            "{model}: hone's adapter logits differ from PEFT's by {diff}"
        );
        // The adapter matters: without it the logits are far from PEFT's.
        let effect = max_abs_diff(
            &base(model).join("refs/logits_base.safetensors"),
            &interop(model).join("logits_peft.safetensors"),
        );
        assert!(
            effect > 0.1,
            "{model}: the adapter changes logits by only {effect}"
        );
    }
}

#[test]
fn merged_f32_shards_keep_the_layout_and_logits_transformers_loaded() {
    for model in MODELS {
        merge_matches_transformers(
            model,
            "merge_f32",
            "logits_transformers_merged_f32.safetensors",
        );
    }
}

#[test]
fn merged_bf16_keeps_the_layout_and_logits_transformers_loaded() {
    for model in MODELS {
        merge_matches_transformers(
            model,
            "merge_bf16",
            "logits_transformers_merged_bf16.safetensors",
        );
    }
}

/// PEFT expands `target_modules` only when it is the string "all-linear"; a list holding
/// "all-linear" is taken as a module name, and `PeftModel.from_pretrained` fails with
/// "Target modules {'all-linear'} not found in the base model" (PEFT 0.21.2, measured by
/// scripts/hf_interop_check.py).
#[test]
fn all_linear_adapters_name_modules_peft_can_find() {
    let tmp = tempfile::tempdir().unwrap();
    let mut data = String::new();
    for i in 0..8 {
        let line = json!({"instruction": format!("Say {i}."), "output": format!("{i} and {i}.")});
        data.push_str(&(line.to_string() + "\n"));
    }
    std::fs::write(tmp.path().join("data.jsonl"), data).unwrap();
    let config = format!(
        "[model]\npath = {model:?}\n\n[data]\ninputs = [{data:?}]\n\n\
         [tokenize]\ntemplate = \"alpaca\"\nmax_seq_len = 256\n\n\
         [lora]\nr = 4\ntarget_modules = [\"all-linear\"]\n\n\
         [train]\nmax_steps = 1\nmicro_batch_size = 2\n\n[eval]\nat_start = false\n\n\
         [output]\ndir = {run:?}\n",
        model = base("llama_gqa").display().to_string(),
        data = tmp.path().join("data.jsonl").display().to_string(),
        run = tmp.path().join("run").display().to_string(),
    );
    std::fs::write(tmp.path().join("all_linear.toml"), config).unwrap();
    ok(&hone()
        .args(["train", "--config"])
        .arg(tmp.path().join("all_linear.toml"))
        .output()
        .expect("the hone binary runs"));
    let written = read_json(&tmp.path().join("run/adapter/adapter_config.json"));
    let targets = &written["target_modules"];
    let peft_expands = targets == "all-linear";
    let names_modules = targets
        .as_array()
        .is_some_and(|names| names.iter().all(|n| n != "all-linear"));
    assert!(
        peft_expands || names_modules,
        "target_modules {targets} is neither the string \"all-linear\" nor a list of module names"
    );
}
