//! `hone eval` end to end on stories260k: presets with --limit, a config file with an adapter
//! column and plots, and errors that name the bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hone() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hone"));
    // Presets find their data relative to the repository root.
    cmd.current_dir(root());
    cmd
}

fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

#[test]
fn eval_presets_with_limit_write_json_and_markdown() {
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = run_ok(
        hone()
            .args(["eval", "--model", "checkpoints/base/stories260k"])
            .args(["--task", "openbookqa", "--task", "gsm8k", "--limit", "3"])
            .args(["--max-tokens", "16", "--batch-size", "4", "--out"])
            .arg(out.path()),
    );
    assert!(stdout.contains("| task | metric | n | base |"), "{stdout}");
    assert!(stdout.contains("| openbookqa | acc | 3 |"), "{stdout}");
    assert!(stdout.contains("| gsm8k | rouge_l | 3 |"), "{stdout}");
    // Not a terminal: progress as plain lines.
    assert!(stderr.contains("[1/2] base · openbookqa: 0/12"), "{stderr}");
    assert!(stderr.contains("[2/2] base · gsm8k: 3/3"), "{stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("eval.json")).unwrap())
            .unwrap();
    let tasks = json["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["evaluated"], 3);
    assert_eq!(tasks[0]["rows"], 12);
    assert_eq!(tasks[1]["generation"]["max_new_tokens"], 16);
    assert_eq!(
        tasks[1]["generation"]["stop_strings"],
        serde_json::json!(["Question:", "\n\n"])
    );
    assert_eq!(
        tasks[1]["results"][0]["samples"].as_array().unwrap().len(),
        3
    );
    assert_eq!(json["plan"]["batch_size"], 4);
    assert!(json["timings"]["total_seconds"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out.path().join("eval.md")).unwrap();
    assert!(
        md.contains("### gsm8k") && md.contains("Question: Janet"),
        "{md}"
    );
}

#[test]
fn eval_config_file_with_adapter_column_and_training_plots() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("fixtures/peft/llama_gqa");
    let data = dir.path().join("mc.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"Cats say?\", \"choices\": [\"meow\", \"woof\"], \"answer\": 0}\n\
         {\"question\": \"Sky is?\", \"choices\": [\"green\", \"blue\"], \"answer\": \"B\"}\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let metrics: String = (1..=20)
        .map(|s| {
            format!(
                "{{\"step\":{s},\"train/loss\":{},\"train/lr\":0.001}}\n",
                3.0 / s as f64
            )
        })
        .chain(["{\"step\":20,\"eval/loss\":0.4,\"eval/ppl\":1.49}\n".to_string()])
        .collect();
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    let config = dir.path().join("eval.toml");
    std::fs::write(
        &config,
        format!(
            "[eval]\nmodel = {:?}\nadapters = [{{ name = \"sft\", path = {:?} }}]\nrun = {:?}\n\n\
             [[eval.tasks]]\nname = \"toy\"\nkind = \"multiple_choice\"\npath = {:?}\n",
            fixture,
            fixture.join("adapter"),
            run,
            data
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let (stdout, _) = run_ok(
        hone()
            .arg("eval")
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        stdout.contains("| task | metric | n | base | sft |"),
        "{stdout}"
    );
    for png in ["loss.png", "lr.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["columns"][1]["name"], "sft");
    assert_eq!(json["plots"], serde_json::json!(["loss.png", "lr.png"]));
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(md.contains("![loss.png](loss.png)"), "{md}");
}

#[test]
fn eval_errors_name_the_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 7}\n",
    )
    .unwrap();
    let out = hone()
        .args(["eval", "--model", "checkpoints/base/stories260k", "--task"])
        .arg(format!("mc={}", bad.display()))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl:1") && stderr.contains("`answer`"),
        "{stderr}"
    );

    let out = hone()
        .args([
            "eval",
            "--model",
            "checkpoints/base/stories260k",
            "--task",
            "nosuch",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tasks.nosuch.kind") && stderr.contains("openbookqa"),
        "{stderr}"
    );
}
