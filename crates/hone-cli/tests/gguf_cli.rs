//! Commands that take `--model DIR` take a GGUF model file too: `fixtures/gguf/llama_gqa.gguf`
//! is `fixtures/peft/llama_gqa` converted as llama.cpp converts it, so `hone logits` on it
//! gives transformers' logits of the directory and `hone generate` the same greedy text as on
//! the directory; `hone template render` reads a GGUF's `tokenizer.chat_template`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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

/// The JSON line of `hone bench generate --model GGUF` (4 + 4 tokens, one repetition) with `extra`.
fn bench_generate(gguf: &Path, extra: &[&str]) -> serde_json::Value {
    let text = ok(hone()
        .args(["bench", "generate", "--model"])
        .arg(gguf)
        .args(["--prompt-tokens", "8", "--new-tokens", "2", "--repeat", "1"])
        .args(extra)
        .output()
        .unwrap());
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn logits_of_a_gguf_model_match_transformers() {
    let gguf = root().join("fixtures/gguf/llama_gqa.gguf");
    let refs = root().join("fixtures/peft/llama_gqa/refs");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("logits.safetensors");
    ok(hone()
        .args(["logits", "--model"])
        .arg(&gguf)
        .arg("--input-ids")
        .arg(refs.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap());
    let (ours, shape) = read_f32(&out_path, "logits");
    let (expected, eshape) = read_f32(&refs.join("logits_base.safetensors"), "logits");
    assert_eq!(shape, eshape);
    let diff = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-4,
        "GGUF logits differ from transformers' by {diff}"
    );
}

#[test]
fn generate_on_a_gguf_model_gives_the_directorys_greedy_text() {
    let run = |model: &Path| {
        ok(hone()
            .args(["generate", "--model"])
            .arg(model)
            .args(["--prompt", "hello world", "--max-tokens", "12"])
            .output()
            .unwrap())
    };
    let from_gguf = run(&root().join("fixtures/gguf/llama_gqa.gguf"));
    let from_dir = run(&root().join("fixtures/peft/llama_gqa"));
    assert!(!from_gguf.is_empty());
    assert_eq!(from_gguf, from_dir);
}

#[test]
fn template_render_reads_a_gguf_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let messages = tmp.path().join("messages.json");
    std::fs::write(&messages, r#"[{"role": "user", "content": "Hi there!"}]"#).unwrap();
    let text = ok(hone()
        .args(["template", "render", "--add-generation-prompt", "--model"])
        .arg(root().join("fixtures/gguf/smollm2-tokenizer.gguf"))
        .arg("--messages")
        .arg(&messages)
        .output()
        .unwrap());
    // transformers' apply_chat_template on the same file (smollm2-tokenizer.refs.json).
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/gguf/smollm2-tokenizer.refs.json")).unwrap(),
    )
    .unwrap();
    let want = refs["chat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["messages"].as_array().unwrap().len() == 1 && c["add_generation_prompt"] == true
        })
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text, want);

    // A GGUF without a template says which key it looked for.
    let out = hone()
        .args(["template", "render", "--model"])
        .arg(root().join("fixtures/gguf/llama_gqa.gguf"))
        .arg("--messages")
        .arg(&messages)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokenizer.chat_template"), "{err}");
}

/// `hone bench generate` on the fetched SmolLM2 Q4_1 file: with the projection weights kept
/// quantized the process's peak resident memory is well below the run that dequantizes them at
/// load (the f32 projections alone are ~400 MB more). SKIPPED when the file is absent
/// (`scripts/fetch-models.sh` fetches it).
#[test]
fn bench_generate_on_a_quantized_gguf_needs_far_less_memory_than_dequantizing() {
    let gguf =
        root().join("checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        eprintln!(
            "SKIPPED: {} is absent (scripts/fetch-models.sh fetches it)",
            gguf.display()
        );
        return;
    }
    let quant = bench_generate(&gguf, &[]);
    let dense = bench_generate(&gguf, &["--dequantize"]);
    assert_eq!(quant["quantized_projections"], 30 * 7 + 1, "{quant}");
    assert_eq!(dense["quantized_projections"], 0, "{dense}");
    let (q, d) = (
        quant["peak_rss_mb"].as_f64().unwrap(),
        dense["peak_rss_mb"].as_f64().unwrap(),
    );
    eprintln!("peak RSS: quantized {q:.0} MB, dequantized {d:.0} MB");
    assert!(
        q < 0.6 * d,
        "peak RSS quantized {q} MB is not well below dequantized {d} MB"
    );
    // Nor are the mapped file's pages kept beside the copies made of them (358 MB before):
    // the weights once, the f32 embedding table (vocab × hidden, for the training loss) and
    // under 100 MB for everything else (81 MB on 4 KiB pages; 87 with glibc's heaps on huge
    // pages, as hone runs, where memory comes in 2 MiB pieces).
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let file = mib(std::fs::metadata(&gguf).unwrap().len() as f64);
    let table = mib(49152.0 * 576.0 * 4.0);
    assert!(
        q < file + table + 100.0,
        "peak RSS quantized {q} MB: more than the {file:.0} MB file, the {table:.0} MB f32 \
         embedding table and 100 MB"
    );
}

/// `--q8-activations` reaches the model: `hone bench generate` on a quantized fixture reports the
/// activations it ran with, and `hone generate` with it produces text.
#[test]
fn q8_activations_flag_reaches_the_model() {
    let gguf = root().join("fixtures/gguf/kquant/tiny_q4_0.gguf");
    assert_eq!(bench_generate(&gguf, &[])["activations"], "f32");
    assert_eq!(
        bench_generate(&gguf, &["--q8-activations"])["activations"],
        "q8"
    );
    let text = ok(hone()
        .args(["generate", "--model"])
        .arg(&gguf)
        .args(["--prompt", "hello", "--max-tokens", "4", "--q8-activations"])
        .output()
        .unwrap());
    assert!(!text.is_empty());
}

/// `--bf16-activations` reaches the model (reported by `hone bench generate`), and asking for
/// both roundings at once is refused with an error naming the two flags.
#[test]
fn bf16_activations_flag_reaches_the_model() {
    let gguf = root().join("fixtures/gguf/kquant/tiny_q4_0.gguf");
    assert_eq!(
        bench_generate(&gguf, &["--bf16-activations"])["activations"],
        "bf16"
    );
    let out = hone()
        .args(["bench", "generate", "--model"])
        .arg(&gguf)
        .args(["--q8-activations", "--bf16-activations"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--q8-activations") && err.contains("--bf16-activations"),
        "{err}"
    );
}

/// `hone bench serve` serves a GGUF file in process (with a random adapter beside it).
#[test]
fn bench_serve_takes_a_gguf_model_file() {
    let stdout = ok(hone()
        .args(["bench", "serve", "--model"])
        .arg(root().join("fixtures/gguf/llama_gqa_quant.gguf"))
        .args(["--concurrency", "2", "--requests", "4", "--max-tokens", "4"])
        .args(["--prompt-tokens", "8", "--adapters", "1"])
        .output()
        .unwrap());
    let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (line["ok"].as_u64(), line["errors"].as_u64()),
        (Some(4), Some(0)),
        "{line}"
    );
    assert_eq!(line["completion_tokens"], 16, "{line}");
    assert_eq!(line["requests_per_model"]["bench-adapter-0"], 2, "{line}");
}
