//! The `hone` binary end to end: generation, the logits hook and its errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

fn read_f32(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v, t.shape().to_vec())
}

#[test]
fn generate_tells_the_golden_story_greedily() {
    let out = hone()
        .args(["generate", "--model"])
        .arg(root().join("checkpoints/base/stories260k"))
        .args(["--prompt", "Once upon a time", "--max-tokens", "40"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // golden.json's greedy continuation from BOS starts with the prompt, so the greedy
    // continuation of the prompt is the same text.
    assert!(
        text.starts_with("Once upon a time, there was a little girl named Lily. She loved to play outside in the park."),
        "{text}"
    );
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(
        summary.contains("prefill") && summary.contains("decode") && summary.contains("tokens/s"),
        "{summary}"
    );
}

#[test]
fn logits_command_matches_transformers_for_both_fixtures() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let dir = root().join("fixtures/peft").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let out_path = tmp.path().join("logits.safetensors");
        let out = hone()
            .args(["logits", "--model"])
            .arg(&dir)
            .arg("--input-ids")
            .arg(dir.join("refs/inputs.safetensors"))
            .arg("--out")
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ours, shape) = read_f32(&out_path, "logits");
        let (expected, eshape) = read_f32(&dir.join("refs/logits_base.safetensors"), "logits");
        assert_eq!(shape, eshape);
        let diff = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

#[test]
fn logits_accepts_int32_input_ids() {
    let dir = root().join("fixtures/peft/llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<i32> = vec![509, 51, 441, 220, 435, 272];
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let input = tmp.path().join("ids.safetensors");
    safetensors::serialize_to_file(
        vec![(
            "input_ids".to_string(),
            TensorView::new(Dtype::I32, vec![1, 6], &bytes).unwrap(),
        )],
        None,
        &input,
    )
    .unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let status = hone()
        .args(["logits", "--model"])
        .arg(&dir)
        .arg("--input-ids")
        .arg(&input)
        .arg("--out")
        .arg(&out_path)
        .status()
        .unwrap();
    assert!(status.success());
    let (values, shape) = read_f32(&out_path, "logits");
    assert_eq!(shape, vec![1, 6, 512]);
    // The first six positions of row 0 of the reference batch are these ids: same logits.
    let (expected, _) = read_f32(&dir.join("refs/logits_base.safetensors"), "logits");
    let diff = values
        .iter()
        .zip(&expected[..6 * 512])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
}

fn failing(args: &[&str], extra: &[&Path]) -> String {
    let mut cmd = hone();
    cmd.args(args);
    for p in extra {
        cmd.arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !stderr.contains("panicked"),
        "a panic instead of an error: {stderr}"
    );
    stderr
}

#[test]
fn logits_with_a_peft_adapter_match_peft() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let dir = root().join("fixtures/peft").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let out_path = tmp.path().join("out.safetensors");
        let out = hone()
            .args(["logits", "--model"])
            .arg(&dir)
            .arg("--adapter")
            .arg(dir.join("adapter"))
            .arg("--input-ids")
            .arg(dir.join("refs/inputs.safetensors"))
            .arg("--out")
            .arg(&out_path)
            .arg("--compare-with")
            .arg(dir.join("refs/logits_adapter.safetensors"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(line["max_abs_diff"].as_f64().unwrap() < 1e-4, "{line}");
        let (ours, _) = read_f32(&out_path, "logits");
        let (expected, _) = read_f32(&dir.join("refs/logits_adapter.safetensors"), "logits");
        let diff = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

#[test]
fn logits_with_a_missing_adapter_is_an_error_and_writes_nothing() {
    let dir = root().join("fixtures/peft/llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let missing = tmp.path().join("no-adapter");
    let msg = failing(
        &["logits", "--adapter"],
        &[
            &missing,
            Path::new("--model"),
            &dir,
            Path::new("--input-ids"),
            &dir.join("refs/inputs.safetensors"),
            Path::new("--out"),
            &out_path,
        ],
    );
    assert!(
        msg.contains("adapter_config.json") && msg.contains("no-adapter"),
        "{msg}"
    );
    assert!(!out_path.exists());
}

#[test]
fn logits_reports_a_missing_input_tensor_and_bad_ids() {
    let dir = root().join("fixtures/peft/llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    // refs/train_batch has input_ids; refs/logits_base does not.
    let msg = failing(
        &["logits", "--model"],
        &[
            &dir,
            Path::new("--input-ids"),
            &dir.join("refs/logits_base.safetensors"),
            Path::new("--out"),
            &out_path,
        ],
    );
    assert!(
        msg.contains("input_ids") && msg.contains("logits_base.safetensors"),
        "{msg}"
    );

    let ids: Vec<i64> = vec![1, 2, 9999];
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let input = tmp.path().join("ids.safetensors");
    safetensors::serialize_to_file(
        vec![(
            "input_ids".to_string(),
            TensorView::new(Dtype::I64, vec![1, 3], &bytes).unwrap(),
        )],
        None,
        &input,
    )
    .unwrap();
    let msg = failing(
        &["logits", "--model"],
        &[
            &dir,
            Path::new("--input-ids"),
            &input,
            Path::new("--out"),
            &out_path,
        ],
    );
    assert!(msg.contains("9999") && msg.contains("vocabulary"), "{msg}");
    assert!(!out_path.exists());
}

#[test]
fn cuda_device_in_a_cpu_build_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let msg = failing(
        &["generate", "--device", "cuda", "--model"],
        &[&root().join("checkpoints/base/stories260k")],
    );
    assert!(
        msg.contains("without CUDA support") && msg.contains("--features cuda"),
        "{msg}"
    );
}
