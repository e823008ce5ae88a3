//! `hone export gguf` against llama.cpp and gguf-py, without either at test time:
//! * `fixtures/gguf/export/llamacpp_refs.json` (`scripts/llamacpp_check.py`): llama.cpp's token
//!   ids and last-position logits on hone's f32/f16 exports of stories260k and the PEFT fixtures
//!   (one with its adapter merged in). The export made here must tokenize the prompt to llama.cpp's
//!   ids and give its logits (1e-3 for f32; 5e-2 for f16, where llama.cpp rounds activations).
//!   The `*_lora` entries are llama.cpp's logits with hone's adapter-only export applied to the
//!   f32 base (`--lora`): hone's merged export must give them.
//! * `fixtures/gguf/llama_gqa.gguf`, `qwen2_tied.gguf` (gguf-py, converted as
//!   `convert_hf_to_gguf.py` converts): the f32 export has their tensors byte for byte and their
//!   tokenizer metadata; `stories260k-tokenizer.gguf`: the SentencePiece form.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_merge::gguf_export::tensor_type;
use hone_merge::{export_gguf, Combination, ExportType, GgufExportOptions};
use hone_model::gguf::write::{write, TensorSpec};
use hone_model::gguf::{GgmlType, GgufError, GgufFile, Value};
use hone_model::tokenizer::Tokenizer;
use hone_model::{load_model_dir, Cpu, Input, LoadOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn options(base: &Path, adapters: Vec<PathBuf>, ty: ExportType, out: &Path) -> GgufExportOptions {
    GgufExportOptions {
        base: base.to_path_buf(),
        adapters,
        combination: Combination::default(),
        ty,
        out: out.to_path_buf(),
        force: false,
        name: None,
        tokenizer_pre: None,
        template: None,
        lora_only: false,
    }
}

fn last_logits(path: &Path, ids: &[i64]) -> Vec<f32> {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(path, &device, LoadOptions::default()).unwrap();
    let input =
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
    let logits: Vec<f32> = loaded
        .model
        .forward(Input::new(input))
        .into_data()
        .to_vec()
        .unwrap();
    let vocab = logits.len() / ids.len();
    logits[logits.len() - vocab..].to_vec()
}

#[test]
fn exports_give_llama_cpps_tokens_and_logits() {
    let text =
        std::fs::read_to_string(root().join("fixtures/gguf/export/llamacpp_refs.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let refs = doc["refs"].as_array().unwrap();
    // Six models in f32 and f16 (one with Llama 3 RoPE scaling, exported with rope_freqs), and
    // two adapters applied by llama.cpp (`--lora`) to the f32 base: those replay against hone's
    // merged export.
    assert_eq!(refs.len(), 14);
    let tmp = tempfile::tempdir().unwrap();
    for r in refs {
        let name = r["model"].as_str().unwrap();
        let ty = ExportType::parse(r["type"].as_str().unwrap()).unwrap();
        let adapters = r["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| root().join(a.as_str().unwrap()))
            .collect();
        let out = tmp.path().join(format!("{name}-{ty}.gguf"));
        let base = match r["base"].as_str().unwrap() {
            "llama_gqa_llama3" => {
                let dir = tmp.path().join("llama_gqa_llama3");
                llama3_scaled_fixture(&dir);
                dir
            }
            other => root().join(other),
        };
        export_gguf(&options(&base, adapters, ty, &out)).unwrap();

        let want_ids: Vec<i64> = r["llamacpp_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let tok = Tokenizer::from_dir(&out).unwrap();
        let ids: Vec<i64> = tok
            .encode_prompt(r["prompt"].as_str().unwrap())
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids, want_ids, "{name} {ty}: token ids");

        let want: Vec<f32> = r["llamacpp_last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = last_logits(&out, &want_ids);
        assert_eq!(got.len(), want.len(), "{name} {ty}: vocabulary");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let tolerance = if ty == ExportType::F32 { 1e-3 } else { 5e-2 };
        assert!(
            diff <= tolerance,
            "{name} {ty}: logits differ from llama.cpp's by {diff}"
        );
    }
}

/// The keys both files have must agree (gguf-py's conversions carry fewer `general.*` keys).
fn assert_same_metadata(ours: &GgufFile, theirs: &GgufFile, keys: &[&str]) {
    for key in keys {
        assert_eq!(
            ours.get(key),
            theirs.get(key),
            "{key}: ours vs {}",
            theirs.path().display()
        );
    }
}

#[test]
fn f32_exports_equal_the_gguf_py_conversions_of_the_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_gqa", "qwen2_tied"] {
        let out = tmp.path().join(format!("{name}.gguf"));
        let base = root().join("fixtures/peft").join(name);
        export_gguf(&options(&base, vec![], ExportType::F32, &out)).unwrap();
        let ours = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(&root().join(format!("fixtures/gguf/{name}.gguf"))).unwrap();
        let mut a: Vec<&str> = ours.tensors().iter().map(|t| t.name.as_str()).collect();
        let mut b: Vec<&str> = theirs.tensors().iter().map(|t| t.name.as_str()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names");
        for t in theirs.tensors() {
            let mine = ours.tensor_info(&t.name).unwrap();
            assert_eq!(
                (mine.dims.clone(), mine.ggml_type),
                (t.dims.clone(), t.ggml_type)
            );
            assert!(
                ours.tensor_bytes(&t.name).unwrap() == theirs.tensor_bytes(&t.name).unwrap(),
                "{name}: tensor {} differs",
                t.name
            );
        }
        let arch = theirs.get_str("general.architecture").unwrap().to_string();
        let keys: Vec<String> = theirs
            .metadata()
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| {
                k.starts_with("tokenizer.") || (k.starts_with(&arch) && !k.ends_with("vocab_size"))
            })
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert!(keys.len() >= 15, "{name}: {keys:?}");
        assert_same_metadata(&ours, &theirs, &keys);
    }
}

#[test]
fn sentencepiece_vocabularies_are_written_as_llama_cpps_llama_form() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stories.gguf");
    let base = root().join("checkpoints/base/stories260k");
    export_gguf(&options(&base, vec![], ExportType::Q8_0, &out)).unwrap();
    let ours = GgufFile::open(&out).unwrap();
    let theirs = GgufFile::open(&root().join("fixtures/gguf/stories260k-tokenizer.gguf")).unwrap();
    assert_same_metadata(
        &ours,
        &theirs,
        &[
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token",
        ],
    );
    assert_eq!(ours.get("general.file_type"), Some(&Value::U32(7)));
    // ffn_down rows are 172 wide: not whole Q8_0 blocks, so F16 as llama-quantize falls back.
    let down = ours.tensor_info("blk.0.ffn_down.weight").unwrap();
    assert_eq!(down.ggml_type, GgmlType::F16);
    let q = ours.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
}

#[test]
fn tensor_types_follow_llama_quantize() {
    let layers = 30;
    let q4km =
        |name: &str, shape: &[usize]| tensor_type(ExportType::Q4KM, name, shape, layers, true);
    // Tied: the token embedding is the output projection.
    assert_eq!(q4km("token_embd.weight", &[49152, 2048]), GgmlType::Q6K);
    assert_eq!(
        tensor_type(
            ExportType::Q4KM,
            "token_embd.weight",
            &[49152, 2048],
            layers,
            false
        ),
        GgmlType::Q4K
    );
    // SmolLM2's rows of 576 are not whole 256-blocks: the output goes to Q8_0, the other
    // Q4_K tensors to Q5_0, the Q6_K ones to Q8_0.
    assert_eq!(q4km("token_embd.weight", &[49152, 576]), GgmlType::Q8_0);
    assert_eq!(q4km("blk.3.attn_q.weight", &[576, 576]), GgmlType::Q5_0);
    assert_eq!(q4km("blk.0.attn_v.weight", &[192, 576]), GgmlType::Q8_0);
    assert_eq!(q4km("output_norm.weight", &[576]), GgmlType::F32);
    assert_eq!(q4km("blk.0.attn_norm.weight", &[576]), GgmlType::F32);
    // use_more_bits: the first and last eighth (layers 0-2, 27-29 of 30) and every third between.
    let v: Vec<usize> = (0..layers)
        .filter(|i| q4km(&format!("blk.{i}.attn_v.weight"), &[512, 2048]) == GgmlType::Q6K)
        .collect();
    assert_eq!(v, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    assert_eq!(q4km("blk.4.attn_v.weight", &[512, 2048]), GgmlType::Q4K);
    assert_eq!(q4km("blk.4.attn_q.weight", &[2048, 2048]), GgmlType::Q4K);
    assert_eq!(q4km("blk.5.ffn_down.weight", &[2048, 5632]), GgmlType::Q6K);
    assert_eq!(q4km("blk.4.ffn_down.weight", &[2048, 5632]), GgmlType::Q4K);
    // Rows of 64 are not whole 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0.
    assert_eq!(q4km("blk.4.attn_q.weight", &[64, 64]), GgmlType::Q5_0);
    assert_eq!(q4km("blk.0.attn_v.weight", &[32, 64]), GgmlType::Q8_0);
    // Rows of 172 are not whole 32-blocks either: F16.
    assert_eq!(q4km("blk.4.ffn_down.weight", &[64, 172]), GgmlType::F16);
    let q4_0 = |name: &str| tensor_type(ExportType::Q4_0, name, &[512, 64], 5, false);
    assert_eq!(
        q4_0("output.weight"),
        GgmlType::Q8_0,
        "64 is not a whole Q6_K block"
    );
    assert_eq!(
        tensor_type(ExportType::Q4_0, "output.weight", &[512, 256], 5, false),
        GgmlType::Q6K
    );
    assert_eq!(
        tensor_type(ExportType::Q8_0, "output.weight", &[512, 256], 5, false),
        GgmlType::Q8_0
    );
    assert_eq!(
        tensor_type(ExportType::BF16, "blk.0.attn_q.weight", &[64, 64], 5, false),
        GgmlType::BF16
    );
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let base = root().join("fixtures/peft/qwen2_tied");
    let e = export_gguf(&options(&base, vec![], ExportType::F16, &out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.gguf"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let mut forced = options(&base, vec![], ExportType::F16, &out);
    forced.force = true;
    let report = export_gguf(&forced).unwrap();
    assert_eq!(report.bytes, std::fs::metadata(&out).unwrap().len());
    assert!(report.modelfile.is_file());
}

/// The adapter-only export read back as llama.cpp applies it: every `W + alpha/rank · B A` of the
/// base export equals the merged export's tensor (llama's q/k rows permuted alike), and every
/// other tensor has no adapter.
#[test]
fn adapter_exports_add_up_to_the_merged_export() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_gqa", "qwen2_tied"] {
        let base = root().join("fixtures/peft").join(name);
        let adapter = base.join("adapter");
        let paths: Vec<PathBuf> = ["base", "merged", "lora"]
            .iter()
            .map(|k| tmp.path().join(format!("{name}-{k}.gguf")))
            .collect();
        export_gguf(&options(&base, vec![], ExportType::F32, &paths[0])).unwrap();
        export_gguf(&options(
            &base,
            vec![adapter.clone()],
            ExportType::F32,
            &paths[1],
        ))
        .unwrap();
        let mut lora = options(&base, vec![adapter], ExportType::F32, &paths[2]);
        lora.lora_only = true;
        export_gguf(&lora).unwrap();
        let [b, m, l] = [0, 1, 2].map(|i| GgufFile::open(&paths[i]).unwrap());
        assert_eq!(l.get_str("general.type").unwrap(), "adapter");
        assert_eq!(l.get_str("adapter.type").unwrap(), "lora");
        let alpha = l.get_f64("adapter.lora.alpha").unwrap() as f32;
        let mut adapted = 0;
        for t in b.tensors() {
            let (w, shape) = b.tensor_f32(&t.name).unwrap();
            let (want, _) = m.tensor_f32(&t.name).unwrap();
            let got = match l.tensor_info(&format!("{}.lora_a", t.name)) {
                None => w,
                Some(_) => {
                    adapted += 1;
                    let (a, a_shape) = l.tensor_f32(&format!("{}.lora_a", t.name)).unwrap();
                    let (bm, b_shape) = l.tensor_f32(&format!("{}.lora_b", t.name)).unwrap();
                    let (rank, cols, rows) = (a_shape[0], a_shape[1], b_shape[0]);
                    assert_eq!((rows, cols, b_shape[1]), (shape[0], shape[1], rank));
                    let scale = alpha / rank as f32;
                    let mut out = w;
                    for r in 0..rows {
                        for c in 0..cols {
                            let d: f32 =
                                (0..rank).map(|k| bm[r * rank + k] * a[k * cols + c]).sum();
                            out[r * cols + c] += scale * d;
                        }
                    }
                    out
                }
            };
            let diff = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{name}: {} differs by {diff}", t.name);
        }
        assert!(adapted >= 4, "{name}: {adapted} adapted tensors");
    }
}

/// The quantized types against llama.cpp's own quantizer: `fixtures/gguf/export/tiny-*.gguf`
/// are `llama-quantize` outputs (`scripts/llamacpp_check.py`) from hone's f16 export of the tiny
/// K-quant fixture (widths of 256, so Q4_K, Q5_K and Q6_K are all used); hone's export of the
/// same f16 file must choose every tensor's type as llama-quantize did and give its bytes.
#[test]
fn quantized_exports_equal_llama_quantizes() {
    let tmp = tempfile::tempdir().unwrap();
    let f16 = tmp.path().join("tiny-f16.gguf");
    let base = root().join("fixtures/gguf/kquant/tiny_q8_0.gguf");
    export_gguf(&options(&base, vec![], ExportType::F16, &f16)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for ty in [
        ExportType::Q8_0,
        ExportType::Q4_0,
        ExportType::Q4KM,
        ExportType::Q5KM,
        ExportType::Q6K,
    ] {
        let out = tmp.path().join(format!("tiny-{ty}.gguf"));
        export_gguf(&options(&f16, vec![], ty, &out)).unwrap();
        let ours = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(&root().join(format!(
            "fixtures/gguf/export/tiny-{ty}.llama-quantize.gguf"
        )))
        .unwrap();
        assert_eq!(ours.tensors().len(), theirs.tensors().len(), "{ty}");
        for t in theirs.tensors() {
            let mine = ours.tensor_info(&t.name).unwrap();
            assert_eq!(mine.ggml_type, t.ggml_type, "{ty}: {} type", t.name);
            seen.insert(t.ggml_type.name());
            let (a, b) = (
                ours.tensor_bytes(&t.name).unwrap(),
                theirs.tensor_bytes(&t.name).unwrap(),
            );
            if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                panic!(
                    "{ty}: {} ({}) differs from llama-quantize's at byte {i} (block {})",
                    t.name,
                    t.ggml_type,
                    i / t.ggml_type.block_bytes()
                );
            }
        }
    }
    for name in ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(seen.contains(name), "{name} not covered: {seen:?}");
    }
}

/// A copy of the llama_gqa fixture whose config asks for Llama 3 RoPE scaling (factor 8, low 1,
/// high 4, original context 64: with head_dim 16 most frequencies are rescaled).
fn llama3_scaled_fixture(dir: &Path) {
    let src = root().join("fixtures/peft/llama_gqa");
    std::fs::create_dir_all(dir).unwrap();
    for name in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"] = serde_json::json!({
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Llama 3 RoPE scaling goes out as llama.cpp's `rope_freqs.weight` and comes back in as
/// per-frequency divisors: the GGUF's logits equal the directory's (whose llama3 inverse
/// frequencies are checked against transformers' in hone-model), and differ from unscaled RoPE's.
#[test]
fn llama3_rope_scaling_round_trips_as_rope_freqs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama3");
    llama3_scaled_fixture(&dir);
    let out = tmp.path().join("llama3.gguf");
    export_gguf(&options(&dir, vec![], ExportType::F32, &out)).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let (factors, shape) = file.tensor_f32("rope_freqs.weight").unwrap();
    assert_eq!(shape, [8]);
    assert_eq!(factors[0], 1.0, "the highest frequency is kept");
    assert_eq!(factors[7], 8.0, "the lowest is divided by the factor");
    assert!(file.get("llama.rope.scaling.type").is_none());
    let ids: Vec<i64> = (0..48).map(|i| (i * 37 % 500) as i64).collect();
    let from_dir = last_logits(&dir, &ids);
    let from_gguf = last_logits(&out, &ids);
    let unscaled = last_logits(&root().join("fixtures/peft/llama_gqa"), &ids);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&from_dir, &from_gguf) < 1e-5);
    assert!(
        max_diff(&from_dir, &unscaled) > 1e-3,
        "the scaling matters here"
    );
    // Exported again from the GGUF, the divisors are carried over.
    let again = tmp.path().join("again.gguf");
    export_gguf(&options(&out, vec![], ExportType::F32, &again)).unwrap();
    let (copied, _) = GgufFile::open(&again)
        .unwrap()
        .tensor_f32("rope_freqs.weight")
        .unwrap();
    assert_eq!(copied, factors);
    // Divisors that do not fit the rotary dimension are refused naming the tensor.
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: if t.name == "rope_freqs.weight" {
                vec![4]
            } else {
                t.shape()
            },
            ty: t.ggml_type,
        })
        .collect();
    let bad = tmp.path().join("bad.gguf");
    let mut bytes = Vec::new();
    write::<GgufError>(&bad, &mut bytes, file.metadata(), &specs, |_, t| {
        Ok(match t.name.as_str() {
            "rope_freqs.weight" => vec![0u8; 16],
            name => file.tensor_bytes(name)?.to_vec(),
        })
    })
    .unwrap();
    std::fs::write(&bad, bytes).unwrap();
    let e = hone_model::gguf::model_config(&GgufFile::open(&bad).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rope_freqs.weight") && e.contains("8 positive"),
        "{e}"
    );
}
