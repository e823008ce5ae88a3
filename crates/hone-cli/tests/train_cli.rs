//! `hone train` end to end: the run directory and summary, config errors that name file and
//! key, and a run killed while it writes checkpoints resuming to the uninterrupted result.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use safetensors::SafeTensors;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes a small Alpaca data set and a config training on it into `dir`; returns the config.
fn setup(dir: &Path, train: &str) -> PathBuf {
    let names = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna"];
    let mut data = String::new();
    for i in 0..24 {
        let name = names[i % names.len()];
        let line = serde_json::json!({
            "instruction": format!("Tell me a story about {name}."),
            "output": format!("{name} had a red ball. {name} was happy. {i}"),
        });
        data.push_str(&(line.to_string() + "\n"));
    }
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
    let config = format!(
        r#"[model]
path = {model:?}

[data]
inputs = [{data:?}]
split = {{ val_fraction = 0.2 }}

[tokenize]
template = "alpaca"
max_seq_len = 128
packing = false

[lora]
r = 4
target_modules = ["q_proj", "v_proj"]

[train]
lr = 1e-2
micro_batch_size = 2
{train}
"#,
        model = root()
            .join("checkpoints/base/stories260k")
            .display()
            .to_string(),
        data = dir.join("data.jsonl").display().to_string(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn adapter_values(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn train_writes_the_run_directory_and_prints_the_validation_loss_before_and_after() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "max_steps = 6\nlog_every = 2");
    let run = tmp.path().join("run");
    let out = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args([
            "--set",
            &format!("output.dir={:?}", run.display().to_string()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Not a terminal: plain progress lines every log_every steps, then the summary.
    assert!(
        stdout.contains("step 2/6 loss") && stdout.contains("step 6/6 loss"),
        "{stdout}"
    );
    assert!(
        stdout.contains("before training ->") && stdout.contains("after"),
        "{stdout}"
    );
    assert!(
        stdout.contains("peak mem "),
        "the summary reports peak memory: {stdout}"
    );
    for file in [
        "config.toml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "data/train.jsonl",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    assert!(std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .contains("lr = 0.01"));
    // The run is not started over by accident.
    let again = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args([
            "--set",
            &format!("output.dir={:?}", run.display().to_string()),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(text(&again).contains("--resume"), "{}", text(&again));
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "lrr = 1e-3");
    let out = hone()
        .args(["train", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("tiny.toml") && err.contains("lrr"), "{err}");

    let config = setup(tmp.path(), "");
    for (set, wanted) in [
        ("train.nope=1", "--set train.nope=1"),
        ("train.lr=fast", "train.lr"),
        ("train.warmup_ratio=2", "train.warmup_ratio"),
        ("lora.r=0", "lora"),
    ] {
        let out = hone()
            .args(["train", "--config"])
            .arg(&config)
            .args(["--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{set}");
        let err = text(&out);
        assert!(
            err.contains(wanted) && err.contains("tiny.toml"),
            "{set}: {err}"
        );
    }
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(
        tmp.path(),
        "max_steps = 40\nsave_every = 1\nkeep_last = 3\nlog_every = 40",
    );
    let dir_arg = |name: &str| {
        format!(
            "output.dir={:?}",
            tmp.path().join(name).display().to_string()
        )
    };

    let whole = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", &dir_arg("whole")])
        .output()
        .unwrap();
    assert!(whole.status.success(), "{}", text(&whole));

    // Kill the process (SIGKILL) while it writes a checkpoint every step.
    let killed = tmp.path().join("killed");
    let mut child = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", &dir_arg("killed")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("step-6").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("adapter").exists(),
        "the run finished before it was killed"
    );

    let resumed = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", &dir_arg("killed"), "--resume"])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(
        text(&resumed).contains("resuming from"),
        "{}",
        text(&resumed)
    );
    let a = adapter_values(&tmp.path().join("whole/adapter"));
    let b = adapter_values(&killed.join("adapter"));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "{ka}: killed + resumed differs from the uninterrupted run by {diff}"
        );
    }
    // No temporary directory is left, and only the newest checkpoints are kept.
    let names: Vec<String> = std::fs::read_dir(&killed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    let mut steps: Vec<&String> = names.iter().filter(|n| n.starts_with("step-")).collect();
    steps.sort();
    assert_eq!(steps, ["step-38", "step-39", "step-40"]);
}
