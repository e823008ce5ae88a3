//! `hone train` end to end: the run directory and summary, config errors that name file and
//! key, a run killed while it writes checkpoints resuming to the uninterrupted result, the
//! shipped quickstart config killed with SIGKILL ten times ending with the uninterrupted
//! adapter byte for byte, and the lock that refuses a second run on one directory.

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

/// `hone train --config configs/quickstart.toml` (the shipped config, relative paths resolved
/// from the repository root) with `sets`, writing to `out`.
fn quickstart(out: &Path, sets: &[&str]) -> Command {
    let mut command = hone();
    command
        .current_dir(root())
        .args(["train", "--config", "configs/quickstart.toml", "--set"])
        .arg(format!("output.dir={:?}", out.display().to_string()));
    for set in sets {
        command.args(["--set", set]);
    }
    command
}

/// The newest `step-N` of a run directory (0 when none).
fn newest_checkpoint(run: &Path) -> usize {
    std::fs::read_dir(run)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step-")
                        .and_then(|n| n.parse().ok())
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Whether process `pid` is writing a checkpoint (its temporary directory `.step-N.tmp-PID-K`
/// exists; those of earlier, killed processes do not count).
fn saving(run: &Path, pid: u32) -> bool {
    let marker = format!(".tmp-{pid}-");
    std::fs::read_dir(run).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".step-") && name.contains(&marker)
        })
    })
}

/// A small seeded generator (xorshift64*), so that the kill times are reproducible.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Regression (issue 10): `--resume` failed for every shipped config (all-linear compared
/// literally), and resumption was checked with one kill at a chosen point. Here the shipped
/// quickstart config is killed with SIGKILL ten times at seeded random moments (during startup
/// and before the first checkpoint, mid-step after a checkpoint, and while a checkpoint is
/// being written), resumed each time, and must end with the uninterrupted run's adapter, byte
/// for byte, and each step logged once.
#[test]
fn the_quickstart_run_killed_ten_times_resumes_to_the_bitwise_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.max_steps=40",
        "train.save_every=2",
        "train.log_every=1",
        "eval.prompts=[]",
    ];
    let started = Instant::now();
    let whole = tmp.path().join("whole");
    let out = quickstart(&whole, &sets).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let uninterrupted = started.elapsed();

    let run = tmp.path().join("killed");
    let mut rng = Rng(0x5EED_0010);
    let (mut during_save, mut after_checkpoint, mut log) = (0, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(600);
    for kill in 0..10 {
        let before = newest_checkpoint(&run);
        let mut child = quickstart(&run, &sets)
            .arg("--resume")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let spawned = Instant::now();
        let pid = child.id();
        let finished = |child: &mut std::process::Child| child.try_wait().unwrap().is_some();
        let mode = kill % 3;
        match mode {
            // Anywhere in the first second: loading, the first evaluation, early steps.
            0 => {
                let delay = Duration::from_millis(rng.below(1000));
                while spawned.elapsed() < delay && !finished(&mut child) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // Mid-step, up to 300 ms after a new checkpoint appeared.
            1 => {
                while newest_checkpoint(&run) <= before && !finished(&mut child) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                std::thread::sleep(Duration::from_millis(rng.below(300)));
            }
            // While a checkpoint is written: poll for its temporary directory, stop the
            // process, and check it is still there (else the save had just finished).
            _ => {
                while !saving(&run, pid)
                    && newest_checkpoint(&run) <= before + 4
                    && !finished(&mut child)
                {
                    std::hint::spin_loop();
                }
                signal(&child, libc::SIGSTOP);
            }
        }
        let mid_save = saving(&run, pid);
        assert!(Instant::now() < deadline, "the kills took too long");
        assert!(
            child.try_wait().unwrap().is_none(),
            "kill {kill}: the run ended before it was killed (log so far {log:?})"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let at = newest_checkpoint(&run);
        during_save += usize::from(mid_save && mode == 2);
        after_checkpoint += usize::from(at > 0 && !mid_save);
        log.push((mode, at, mid_save));
        assert!(
            !run.join("adapter").exists(),
            "kill {kill} came after the end"
        );
    }
    let resumed = quickstart(&run, &sets).arg("--resume").output().unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed));
    eprintln!(
        "kills (mode, newest checkpoint, mid-save): {log:?}; uninterrupted run {:.1} s, all {:.1} s",
        uninterrupted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        text(&resumed).contains("ended without releasing its lock"),
        "the killed holder's lock is reported as stale: {}",
        text(&resumed)
    );
    assert!(
        after_checkpoint >= 3,
        "kills after a checkpoint: {after_checkpoint} ({log:?})"
    );
    assert!(
        during_save >= 1,
        "no kill landed while a checkpoint was written ({log:?})"
    );
    let file = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        file(&whole) == file(&run),
        "the adapter after 10 kills and resumes differs from the uninterrupted run's ({log:?})"
    );
    // Each step's training metrics once, and the same evaluations as the uninterrupted run.
    let steps = |dir: &Path, key: &str| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get(key).is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&run, "train/loss"), (1..=40).collect::<Vec<_>>());
    assert_eq!(steps(&run, "eval/loss"), steps(&whole, "eval/loss"));
}

/// Regression (issue 10): two `hone train` on one output directory both ran and left a mixed
/// directory.
#[test]
fn a_second_train_on_a_running_directory_is_refused_naming_the_first_ones_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let sets = ["train.max_steps=200", "eval.prompts=[]"];
    let mut first = quickstart(&run, &sets)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(run.join(".lock"))
        .unwrap_or_default()
        .trim()
        != first.id().to_string()
    {
        assert!(Instant::now() < deadline, "the first run took no lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    for extra in [&[][..], &["--resume"][..], &["--overwrite"][..]] {
        let second = quickstart(&run, &sets).args(extra).output().unwrap();
        let message = text(&second);
        assert!(!second.status.success(), "{extra:?}: {message}");
        assert!(
            message.contains(&format!("in use by another hone train (pid {}", first.id())),
            "{extra:?}: {message}"
        );
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run is untouched"
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Issue 16: a CI job reads what a run did from `summary.json` (and `--json`'s last stdout
/// line, the same object) instead of scraping the human output, which goes to stderr.
#[test]
fn train_json_prints_the_summary_json_that_matches_the_runs_metrics_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = quickstart(
        &run,
        &[
            "train.max_steps=4",
            "train.eval_every=2",
            "train.log_every=2",
            "eval.prompts=[]",
        ],
    )
    .arg("--json")
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout holds the summary alone: {stdout}"
    );
    assert!(
        stderr.contains("step 4/4 loss") && stderr.contains("peak mem "),
        "the human output goes to stderr: {stderr}"
    );
    let printed: serde_json::Value = serde_json::from_str(stdout.trim_end()).unwrap();
    let summary = json_file(&run.join("summary.json"));
    assert_eq!(printed, summary);

    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["exit_code"], 0);
    assert!(summary["error"].is_null());
    assert_eq!(summary["steps"], 4);
    assert_eq!(summary["total_steps"], 4);
    assert!(summary["tokens"].as_u64().unwrap() > 0);
    assert!(summary["tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(summary["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(summary["peak_memory_mb"].as_f64().unwrap() > 0.0);
    // Validation losses as metrics.jsonl logged them (at the start, steps 2 and 4).
    let evals: Vec<(u64, f64)> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["eval/loss"].as_f64()?)))
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [0, 2, 4],
        "{evals:?}"
    );
    let best = evals
        .iter()
        .copied()
        .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let loss = &summary["val_loss"];
    assert_eq!(loss["first"].as_f64(), Some(evals[0].1));
    assert_eq!(loss["final"].as_f64(), Some(evals[2].1));
    assert_eq!(loss["best"].as_f64(), Some(best.1));
    assert_eq!(loss["best_step"].as_u64(), Some(best.0));
    // Digests recomputed here.
    let adapter = run.join("adapter/adapter_model.safetensors");
    assert_eq!(summary["adapter"]["sha256"], sha256(&adapter));
    assert_eq!(
        Path::new(summary["adapter"]["path"].as_str().unwrap()),
        adapter
    );
    assert_eq!(
        summary["config"]["sha256"],
        sha256(&run.join("config.toml"))
    );
    let inputs = summary["data"]["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert_eq!(
        inputs[0]["sha256"],
        sha256(&root().join("datasets/quickstart/train.jsonl"))
    );
    let report = json_file(&run.join("data/report.json"));
    let curated = &summary["data"]["curated"];
    assert_eq!(curated["train"], report["kept"]["train"]);
    assert_eq!(curated["val"], report["kept"]["val"]);
    assert_eq!(curated["input_records"], report["input_records"]);
    assert_eq!(summary["hone_version"], env!("CARGO_PKG_VERSION"));
    let commit = summary["git_commit"].as_str().unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    assert_eq!(summary["device"], "cpu");
    assert!(
        ["avx512", "avx2", "sse"].contains(&summary["cpu"]["isa"].as_str().unwrap()),
        "{}",
        summary["cpu"]
    );
}

/// Issue 16 item 7: a completed run's adapter carries a model card (`adapter/README.md`, PEFT's
/// layout) naming the base model, the library, the data with its digest, the hyperparameters
/// and the validation results, as the run's summary has them.
#[test]
fn the_adapter_carries_a_model_card_with_base_model_data_digest_hyperparameters_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = quickstart(
        &run,
        &["train.max_steps=2", "train.log_every=1", "eval.prompts=[]"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let card = std::fs::read_to_string(run.join("adapter/README.md")).unwrap();
    let summary = json_file(&run.join("summary.json"));
    assert!(
        card.starts_with("---\nbase_model: \"checkpoints/base/stories260k\"\nlibrary_name: peft\n"),
        "{card}"
    );
    let data = root().join("datasets/quickstart/train.jsonl");
    for expected in [
        sha256(&data),
        sha256(&run.join("adapter/adapter_model.safetensors")),
        sha256(&run.join("config.toml")),
        "| `lora.r` | `8` |".to_string(),
        "| `steps` | `2 of 2` |".to_string(),
        format!(
            "| final | {:.4} |",
            summary["val_loss"]["final"].as_f64().unwrap()
        ),
        format!("hone {}", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(card.contains(&expected), "{expected} not in\n{card}");
    }
}

/// Issue 16: a run that fails once it has its directory still leaves `summary.json`, with
/// status failed and the error the user saw; a second run there is not refused because of it.
#[test]
fn a_run_that_fails_writes_summary_json_with_status_failed_and_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "max_steps = 2");
    let data = tmp.path().join("data.jsonl");
    let mut lines = std::fs::read_to_string(&data).unwrap();
    lines.push_str("{not json\n");
    std::fs::write(&data, lines).unwrap();
    let run = tmp.path().join("run");
    let dir_set = format!("output.dir={:?}", run.display().to_string());
    let out = hone()
        .args(["train", "--json", "--config"])
        .arg(&config)
        .args(["--set", &dir_set])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "data rejected: {}", text(&out));
    let summary = json_file(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    assert_eq!(summary["exit_code"], out.status.code().unwrap());
    let error = summary["error"].as_str().unwrap();
    assert!(
        error.contains("data.jsonl:25") && String::from_utf8_lossy(&out.stderr).contains(error),
        "{error}\n{}",
        text(&out)
    );
    assert_eq!(summary["steps"], 0);
    assert!(summary["adapter"].is_null());
    let printed: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim_end()).unwrap();
    assert_eq!(printed, summary);
    // The data fixed, the same directory trains.
    let good: String = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("{not"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&data, good).unwrap();
    let again = hone()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", &dir_set])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(json_file(&run.join("summary.json"))["status"], "completed");
}

/// The exit code of `command` (which must not have been killed by a signal) and its output.
fn code(command: &mut Command) -> (i32, String) {
    let out = command.output().unwrap();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed: {}", text(&out)));
    (code, text(&out))
}

/// Issue 16: exit code 2 for what the user fixes in the command line or config, the same in
/// `hone train` and `hone data prepare`.
#[test]
fn bad_flags_config_keys_values_and_missing_files_exit_with_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "max_steps = 1");
    let train = |sets: &[&str]| {
        let mut command = hone();
        command.args(["train", "--config"]).arg(&config);
        for set in sets {
            command.args(["--set", set]);
        }
        command
    };
    let missing = tmp.path().join("missing.jsonl").display().to_string();
    let cases: Vec<(&str, Command)> = vec![
        ("unknown flag", {
            let mut c = hone();
            c.args(["train", "--nope"]);
            c
        }),
        ("unknown config key", train(&["train.nope=1"])),
        ("invalid value", train(&["train.lr=fast"])),
        ("missing config file", {
            let mut c = hone();
            c.args(["train", "--config"])
                .arg(tmp.path().join("none.toml"));
            c
        }),
        (
            "missing data file named by the config",
            train(&[&format!("data.inputs=[{missing:?}]")]),
        ),
        ("data prepare: missing input", {
            let mut c = hone();
            c.args(["data", "prepare", "--input", &missing, "--out"])
                .arg(tmp.path().join("prepared"));
            c
        }),
    ];
    for (case, mut command) in cases {
        let (code, out) = code(&mut command);
        assert_eq!(code, 2, "{case}: {out}");
    }
}

/// Issue 16: exit code 4 when the data is rejected: a bad record with `on_error = "fail"` (in
/// `hone train` and `hone data prepare`), or nothing left to train on after curation.
#[test]
fn rejected_data_exits_with_code_4() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "max_steps = 1");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"hi\", \"output\": \"ok\"}\n{not json\n",
    )
    .unwrap();
    let only_bad = tmp.path().join("only-bad.jsonl");
    std::fs::write(&only_bad, "{not json\n[1, 2\n").unwrap();
    let run = |data: &Path, extra: &[&str], name: &str| {
        let mut command = hone();
        command
            .args(["train", "--config"])
            .arg(&config)
            .args([
                "--set",
                &format!("data.inputs=[{:?}]", data.display().to_string()),
            ])
            .args([
                "--set",
                &format!(
                    "output.dir={:?}",
                    tmp.path().join(name).display().to_string()
                ),
            ]);
        for set in extra {
            command.args(["--set", set]);
        }
        command
    };
    let (c, out) = code(&mut run(&bad, &["data.on_error=\"fail\""], "a"));
    assert_eq!(c, 4, "a bad record with on_error fail: {out}");
    let (c, out) = code(&mut run(&only_bad, &["data.on_error=\"skip\""], "b"));
    assert_eq!(c, 4, "nothing left after curation: {out}");
    assert!(out.contains("left no training example"), "{out}");
    let (c, out) = code(
        hone()
            .args(["data", "prepare", "--on-error", "fail", "--input"])
            .arg(&bad)
            .arg("--out")
            .arg(tmp.path().join("prepared")),
    );
    assert_eq!(
        c, 4,
        "data prepare, a bad record with --on-error fail: {out}"
    );
}

/// Issue 16: any other failure exits with code 1 (here a model directory whose config.json is
/// not JSON).
#[test]
fn other_failures_exit_with_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "max_steps = 1");
    let model = tmp.path().join("broken-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{").unwrap();
    let (c, out) = code(hone().args(["train", "--config"]).arg(&config).args([
        "--set",
        &format!("model.path={:?}", model.display().to_string()),
    ]));
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("config.json"), "{out}");
}

/// The last step `metrics.jsonl` logged a training loss for (0 when none).
fn last_logged_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("train/loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Issue 16: SIGTERM (143) and SIGINT (130) stop `hone train` at the next step boundary with a
/// checkpoint of that step (not one save_every would write), summary.json status
/// interrupted and the lock released; `--resume` ends with the uninterrupted adapter, byte for
/// byte, each step logged once.
#[test]
fn sigterm_and_sigint_checkpoint_at_the_next_step_and_resume_to_the_bitwise_uninterrupted_adapter()
{
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.max_steps=30",
        "train.save_every=100",
        "train.log_every=1",
        "eval.prompts=[]",
    ];
    let whole = tmp.path().join("whole");
    let out = quickstart(&whole, &sets).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let run = tmp.path().join("interrupted");
    let mut stopped_at = Vec::new();
    for (sig, expected, after) in [(libc::SIGTERM, 143, 3), (libc::SIGINT, 130, 12)] {
        let mut child = quickstart(&run, &sets)
            .arg("--resume")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while last_logged_step(&run) < after {
            assert!(Instant::now() < deadline, "no step {after} logged");
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
            std::thread::sleep(Duration::from_millis(2));
        }
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(expected), "{stderr}");
        let summary = json_file(&run.join("summary.json"));
        assert_eq!(summary["status"], "interrupted", "{summary}");
        assert_eq!(summary["exit_code"], expected);
        let step = summary["steps"].as_u64().unwrap();
        assert!(step >= after && step < 30, "stopped at step {step}");
        assert_eq!(
            newest_checkpoint(&run) as u64,
            step,
            "a checkpoint of the step it stopped at"
        );
        assert!(
            summary["error"].as_str().unwrap().contains("--resume"),
            "{summary}"
        );
        assert!(!run.join("adapter").exists());
        stopped_at.push(step);
    }
    let resumed = quickstart(&run, &sets).arg("--resume").output().unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(
        !text(&resumed).contains("ended without releasing its lock"),
        "the interrupted runs released their lock: {}",
        text(&resumed)
    );
    assert_eq!(json_file(&run.join("summary.json"))["status"], "completed");
    let file = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        file(&whole) == file(&run),
        "interrupted at steps {stopped_at:?} and resumed, the adapter differs from the uninterrupted run's"
    );
    let steps = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("train/loss").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&run), (1..=30).collect::<Vec<_>>());
}

/// Issue 16: `--log-format json` turns stderr into one JSON object per line (each training
/// event, the summary, the final error) for log collectors; stdout stays empty.
#[test]
fn log_format_json_writes_each_train_event_as_one_json_object_per_stderr_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = quickstart(
        &run,
        &["train.max_steps=4", "train.log_every=2", "eval.prompts=[]"],
    )
    .args(["--log-format", "json"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let count = |name: &str| names.iter().filter(|n| **n == name).count();
    assert_eq!(count("step"), 4, "{names:?}");
    assert_eq!(count("logged"), 2, "{names:?}");
    for name in ["locked", "started", "eval", "finished"] {
        assert!(count(name) >= 1, "no {name} event: {names:?}");
    }
    assert_eq!(names.last(), Some(&"summary"), "{names:?}");
    let summary = events.last().unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(
        summary["adapter"],
        json_file(&run.join("summary.json"))["adapter"]
    );
    let step = events.iter().find(|e| e["event"] == "step").unwrap();
    assert!(
        step["loss"].as_f64().is_some() && step["ts"].as_f64().is_some(),
        "{step}"
    );

    // The final error too.
    let failed = hone()
        .args(["--log-format", "json", "train", "--config"])
        .arg(tmp.path().join("none.toml"))
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&failed.stderr);
    let error: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(error["event"], "error");
    assert_eq!(error["exit_code"], 2);
    assert_eq!(failed.status.code(), Some(2));
}

/// Issue 16: quality gates. `[gates] fail_if` and `--fail-if` are checked on the run's final
/// values; a gate that holds (or names a metric the run never measured) ends the run with exit
/// code 3 and `summary.json` says which gate and the value it saw; a malformed gate is a usage
/// error (2) before anything runs.
#[test]
fn quality_gates_pass_fail_with_exit_code_3_and_are_recorded_in_summary_json() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "train.max_steps=4",
        "train.eval_every=2",
        "train.log_every=2",
        "eval.prompts=[]",
    ];
    // Passing: the final validation loss is far below 1000 and a loss is never negative.
    let pass = tmp.path().join("pass");
    let mut sets = base.to_vec();
    sets.push(r#"gates.fail_if=["train/loss < 0"]"#);
    let (c, log) = code(quickstart(&pass, &sets).args(["--fail-if", "eval/loss > 1000"]));
    assert_eq!(c, 0, "{log}");
    let summary = json_file(&pass.join("summary.json"));
    assert_eq!(summary["status"], "completed");
    let gates = summary["gates"].as_array().unwrap();
    assert_eq!(gates.len(), 2);
    assert_eq!(gates[0]["gate"], "train/loss < 0");
    assert_eq!(gates[1]["gate"], "eval/loss > 1000");
    assert!(gates.iter().all(|g| g["passed"] == true), "{gates:?}");
    assert_eq!(gates[1]["value"], summary["val_loss"]["final"]);

    // Failing: a loss is always above 0; `eval/accuracy` is never measured by a training run.
    let fail = tmp.path().join("fail");
    let (c, log) = code(quickstart(&fail, &base).args([
        "--fail-if",
        "eval/loss > 0",
        "--fail-if",
        "eval/accuracy < 0.5",
    ]));
    assert_eq!(c, 3, "{log}");
    assert!(
        log.contains("quality gates failed: eval/loss > 0 (final value"),
        "{log}"
    );
    assert!(
        log.contains("eval/accuracy < 0.5 (this run did not measure it"),
        "{log}"
    );
    let summary = json_file(&fail.join("summary.json"));
    assert_eq!(summary["status"], "gate_failed");
    assert_eq!(summary["exit_code"], 3);
    let gates = summary["gates"].as_array().unwrap();
    assert_eq!(gates[0]["passed"], false);
    assert_eq!(gates[0]["value"], summary["val_loss"]["final"]);
    assert!(gates[1]["value"].is_null());
    // The adapter was still written: the gate judges it, it does not delete it.
    assert!(fail.join("adapter/adapter_model.safetensors").is_file());

    // Malformed: exit 2, naming the flag or the config key, and no run directory.
    let bad = tmp.path().join("bad");
    let (c, log) = code(quickstart(&bad, &base).args(["--fail-if", "eval/loss >"]));
    assert_eq!(c, 2, "{log}");
    assert!(log.contains("--fail-if: `eval/loss >`"), "{log}");
    let mut sets = base.to_vec();
    sets.push(r#"gates.fail_if=["loss is low"]"#);
    let (c, log) = code(&mut quickstart(&bad, &sets));
    assert_eq!(c, 2, "{log}");
    assert!(log.contains("gates.fail_if[0]"), "{log}");
    assert!(!bad.exists());
}
