//! Reliability regressions of issue 10, end to end: outputs that would delete their inputs,
//! options checked before any work or output, the model's context respected, adapters checked
//! before evaluation, and error messages that say each thing once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories() -> PathBuf {
    root().join("checkpoints/base/stories260k")
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/peft").join(name)
}

fn hone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn failed(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {stdout}"
    );
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Copies the files (not subdirectories) of `from` into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Regression: `hone merge --force --out RUN --adapter RUN/adapter` wiped the run, and an
/// `--out` above `--model` deleted the base model.
#[test]
fn merge_and_combine_refuse_an_out_holding_an_input_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("models/base");
    copy_dir(&fixture("llama_gqa"), &base);
    let run = tmp.path().join("run");
    let adapter = run.join("adapter");
    copy_dir(&fixture("llama_gqa").join("adapter"), &adapter);
    std::fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();

    let models = tmp.path().join("models");
    for out in [&run, &models] {
        let (_, stderr) = failed(&hone(&[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--out",
            s(out),
            "--force",
        ]));
        assert!(
            stderr.contains("is or contains the")
                && stderr.contains("even with --force")
                && !stderr.contains("the an "),
            "{stderr}"
        );
    }
    let (_, stderr) = failed(&hone(&[
        "adapter",
        "combine",
        "--adapter",
        s(&adapter),
        "--out",
        s(&run),
        "--force",
    ]));
    assert!(stderr.contains("is or contains the adapter"), "{stderr}");
    assert!(run.join("metrics.jsonl").is_file() && adapter.join("adapter_config.json").is_file());
    assert!(base.join("model.safetensors").is_file());
}

/// Regression: an invalid sampling option failed only after the prompt was printed.
#[test]
fn generate_checks_sampling_options_before_printing_anything() {
    let (stdout, stderr) = failed(&hone(&[
        "generate",
        "--model",
        s(&stories()),
        "--prompt",
        "Once upon a time",
        "--top-p",
        "0",
    ]));
    assert_eq!(stdout, "", "nothing printed");
    assert!(stderr.contains("top_p"), "{stderr}");
}

/// Regression: generation ran past max_position_embeddings without a word.
#[test]
fn generate_stops_at_the_models_context_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&stories(), &model);
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        config.replace(
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 24",
        ),
    )
    .unwrap();
    let (_, stderr) = ok(&hone(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "100",
        "--ignore-eos",
    ]));
    assert!(
        stderr.contains("max_position_embeddings") && stderr.contains("WARN"),
        "{stderr}"
    );
    // "[P prompt tokens, G generated, ...": P + G is the context.
    let summary = stderr
        .lines()
        .find(|l| l.contains("prompt tokens"))
        .unwrap();
    let numbers: Vec<usize> = summary
        .trim_start_matches('[')
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .take(2)
        .collect();
    assert_eq!(numbers[0] + numbers[1], 24, "{summary}");
}

/// Regression: `--model dir/model.safetensors` was reported as "... is missing".
#[test]
fn a_model_file_stands_for_its_directory() {
    let (stdout, _) = ok(&hone(&[
        "generate",
        "--model",
        s(&stories().join("model.safetensors")),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "5",
    ]));
    assert!(stdout.starts_with("Once upon a time"), "{stdout}");
}

/// Regression: `--adapter q=RUN_DIR` failed only after the whole base model was evaluated.
#[test]
fn eval_checks_every_adapter_before_evaluating_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("p.jsonl");
    std::fs::write(&data, "{\"text\": \"Once upon a time there was a cat.\"}\n").unwrap();
    let task = format!("ppl={}", data.display());
    // A training run directory (its adapter is in adapter/), and an adapter for another base.
    let run = tmp.path().join("run");
    copy_dir(&fixture("llama_gqa").join("adapter"), &run.join("adapter"));
    let other = fixture("llama_gqa").join("adapter");
    for (adapter, needle) in [(&run, "its adapter is"), (&other, "adapter `q`")] {
        let spec = format!("q={}", adapter.display());
        let (_, stderr) = failed(&hone(&[
            "eval",
            "--model",
            s(&stories()),
            "--adapter",
            &spec,
            "--task",
            &task,
            "--out",
            s(&tmp.path().join("out")),
        ]));
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains("[1/2]"), "nothing was evaluated: {stderr}");
    }
}

/// Regression: causes printed twice (`...: X:1: malformed JSON ...: X:1: malformed JSON ...`,
/// `(os error 2): No such file or directory (os error 2)`).
#[test]
fn error_messages_say_each_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \n").unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "data".into(),
            "prepare".into(),
            "--input".into(),
            bad.display().to_string(),
            "--out".into(),
            tmp.path().join("out").display().to_string(),
        ],
        vec![
            "eval".into(),
            "--model".into(),
            stories().display().to_string(),
            "--task".into(),
            format!("ppl={}", bad.display()),
            "--out".into(),
            tmp.path().join("eval").display().to_string(),
        ],
        vec![
            "generate".into(),
            "--model".into(),
            stories().display().to_string(),
            "--adapter".into(),
            tmp.path().join("no-such-adapter").display().to_string(),
        ],
    ];
    // `hone train` wraps the data stage's error in its own ("data: {0}" on a #[from] field).
    let train: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        root().join("configs/quickstart.toml").display().to_string(),
        "--set".into(),
        format!("data.inputs=[{:?}]", bad.display().to_string()),
        "--set".into(),
        format!(
            "output.dir={:?}",
            tmp.path().join("run").display().to_string()
        ),
    ];
    for args in cases.into_iter().chain([train]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_hone"))
            .current_dir(root())
            .args(&args)
            .output()
            .unwrap();
        let (_, stderr) = failed(&out);
        let message = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{stderr}"));
        // No part of the chain is repeated.
        let parts: Vec<&str> = message.split(": ").collect();
        for (i, part) in parts.iter().enumerate() {
            if part.len() > 12 {
                assert!(
                    !parts[i + 1..].contains(part),
                    "`{part}` twice in: {message}"
                );
            }
        }
        assert_eq!(
            message.matches("os error").count().min(1),
            message.matches("os error").count(),
            "{message}"
        );
    }
}
