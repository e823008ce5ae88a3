//! `hone train --dry-run` (issue 16 item 4) on the shipped quickstart config and stories260k
//! model: the steps and tokens it prints are those a real run of the same config records in
//! its `summary.json`, it writes nothing, and it fails with a run's exit codes (2 for an
//! unknown config key, 4 when every record is rejected); `--dry-run=measure` times real steps.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `hone train --config CONFIG` from the repository root (the shipped config's relative paths
/// resolve there), writing (if at all) to `run`, with `extra` arguments.
fn train(config: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hone"));
    command
        .current_dir(root())
        .args(["train", "--config"])
        .arg(config)
        .arg("--set")
        .arg(format!("output.dir={:?}", run.display().to_string()));
    // Fast: no evaluation, no samples, no checkpoints; none of them changes steps or tokens.
    for set in [
        "eval.at_start=false",
        "eval.prompts=[]",
        "train.eval_every=0",
        "train.save_every=0",
    ] {
        command.args(["--set", set]);
    }
    command.args(extra).output().unwrap()
}

fn quickstart() -> PathBuf {
    PathBuf::from("configs/quickstart.toml")
}

/// The JSON object on the last line of stdout.
fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// Every path under `dir` (relative), sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(base).unwrap().to_path_buf());
            if path.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A dry run of `config` with `extra` that must succeed, write nothing into `tmp` and not
/// create `run`; its JSON object.
fn dry_run(tmp: &Path, config: &Path, run: &Path, extra: &[&str]) -> serde_json::Value {
    let before = tree(tmp);
    let out = train(config, run, extra);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!run.exists(), "the dry run created {}", run.display());
    assert_eq!(
        tree(tmp),
        before,
        "the dry run wrote into {}",
        tmp.display()
    );
    last_json(&out)
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn dry_run_prints_the_steps_and_tokens_a_real_run_records_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = quickstart();

    // One epoch: the steps come from the rows and the batch plan.
    let run = tmp.path().join("one-epoch");
    let plan = dry_run(
        tmp.path(),
        &config,
        &run,
        &["--set", "train.epochs=1", "--dry-run", "--json"],
    );
    assert_eq!(plan["dry_run"], "plan");
    assert!(plan["est_step_seconds"].is_null(), "{plan}");
    assert!(
        plan["est_peak_memory_bytes"].as_u64().unwrap() > 0,
        "{plan}"
    );
    assert_eq!(plan["model"]["name"], "stories260k");
    let steps_per_epoch = plan["steps"].as_u64().unwrap();
    assert!(steps_per_epoch > 3, "{plan}");
    let out = train(&config, &run, &["--set", "train.epochs=1", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let real = summary(&run);
    assert_eq!(real["status"], "completed", "{real}");
    assert_eq!(plan["steps"], real["total_steps"], "{plan}\n{real}");
    assert_eq!(plan["steps"], real["steps"], "{plan}\n{real}");
    assert_eq!(plan["total_tokens"], real["tokens"], "{plan}\n{real}");
    assert_eq!(plan["examples"]["train"], real["data"]["curated"]["train"]);
    assert_eq!(plan["examples"]["val"], real["data"]["curated"]["val"]);

    // train.max_steps past the first epoch: the second epoch's shuffled order decides which
    // rows the last steps read.
    let run = tmp.path().join("capped");
    let max_steps = format!("train.max_steps={}", steps_per_epoch + 3);
    let plan = dry_run(
        tmp.path(),
        &config,
        &run,
        &["--set", &max_steps, "--dry-run", "--json"],
    );
    let out = train(&config, &run, &["--set", &max_steps]);
    assert!(out.status.success(), "{}", text(&out));
    let real = summary(&run);
    assert_eq!(plan["steps"], real["total_steps"], "{plan}\n{real}");
    assert_eq!(plan["total_tokens"], real["tokens"], "{plan}\n{real}");

    // A dry run of a config whose run directory holds that run already is refused as the run
    // would be (exit 2), and leaves the run as it was.
    let before = tree(&run);
    let out = train(&config, &run, &["--set", &max_steps, "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("holds a run already"), "{}", text(&out));
    assert_eq!(tree(&run), before);
}

#[test]
fn a_config_with_an_unknown_key_exits_2_naming_it_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root().join("configs/quickstart.toml")).unwrap();
    let bad = shipped.replacen("[train]\n", "[train]\nlearning_rate = 1e-3\n", 1);
    assert_ne!(bad, shipped);
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, bad).unwrap();
    let run = tmp.path().join("run");
    let before = tree(tmp.path());
    let out = train(&config, &run, &["--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("learning_rate") && err.contains("bad.toml"),
        "{err}"
    );
    assert!(!run.exists());
    assert_eq!(tree(tmp.path()), before);
}

#[test]
fn data_whose_every_record_is_rejected_exits_4_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{not json\n[1, 2\n{\"instruction\": \n").unwrap();
    let run = tmp.path().join("run");
    let before = tree(tmp.path());
    let inputs = format!("data.inputs=[{:?}]", data.display().to_string());
    let out = train(
        &quickstart(),
        &run,
        &[
            "--set",
            &inputs,
            "--set",
            "data.on_error=\"skip\"",
            "--dry-run",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("left no training example"),
        "{}",
        text(&out)
    );
    assert!(!run.exists());
    assert_eq!(tree(tmp.path()), before);
}

#[test]
fn dry_run_measure_times_real_steps_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let measured = dry_run(
        tmp.path(),
        &quickstart(),
        &run,
        &["--dry-run=measure", "--json"],
    );
    assert_eq!(measured["dry_run"], "measure");
    let step = measured["est_step_seconds"].as_f64().unwrap();
    assert!(step > 0.0 && step.is_finite(), "{measured}");
    let steps = measured["steps"].as_f64().unwrap();
    let total = measured["est_total_seconds"].as_f64().unwrap();
    assert!((total - step * steps).abs() <= 1e-9 * total, "{measured}");
    let m = &measured["measured"];
    assert_eq!(m["steps"], 3, "{measured}");
    // r = 8 on every linear layer of stories260k: adapters exist and were trained.
    assert!(m["trainable_params"].as_u64().unwrap() > 0, "{measured}");
    assert!(m["tokens_per_sec"].as_f64().unwrap() > 0.0, "{measured}");
    // The plan part is the plain dry run's.
    let plan = dry_run(tmp.path(), &quickstart(), &run, &["--dry-run", "--json"]);
    assert_eq!(plan["steps"], measured["steps"]);
    assert_eq!(plan["total_tokens"], measured["total_tokens"]);
}
