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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "data rejected: {stderr}");
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "usage: {stderr}");
    assert!(
        stderr.contains("tasks.nosuch.kind") && stderr.contains("openbookqa"),
        "{stderr}"
    );
}

const STORIES: &str = "checkpoints/base/stories260k";

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Exit code and stderr of a command expected to fail.
fn run_code(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// A small perplexity file (raw text records).
fn ppl_file(dir: &Path) -> PathBuf {
    let path = dir.join("stories.jsonl");
    let text: String = [
        "Once upon a time there was a little girl named Lily.",
        "She liked to play in the park with her dog.",
        "One day the sun was hot and the sky was blue.",
        "Tom saw a big red ball and he was happy.",
        "The cat sat on the mat and looked at the bird.",
    ]
    .iter()
    .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
    .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// `hone eval` on stories260k: openbookqa (3 records) and a perplexity file, into `out`.
fn eval_mc_and_ppl(ppl: &Path, out: &Path) -> Command {
    let mut cmd = hone();
    cmd.args([
        "eval",
        "--model",
        STORIES,
        "--task",
        "openbookqa",
        "--limit",
        "6",
    ])
    .arg("--task")
    .arg(format!("ppl={}", ppl.display()))
    .args(["--batch-size", "3", "--out"])
    .arg(out);
    cmd
}

/// Rewrites the last column's results of `task` in a report with `edit`.
fn edit_result(report: &mut serde_json::Value, task: &str, edit: impl Fn(&mut serde_json::Value)) {
    let tasks = report["tasks"].as_array_mut().unwrap();
    let task = tasks.iter_mut().find(|t| t["name"] == task).unwrap();
    let result = task["results"].as_array_mut().unwrap().last_mut().unwrap();
    edit(result);
}

#[test]
fn baseline_gates_pass_on_an_equal_run_and_exit_3_on_a_regression_either_direction() {
    let dir = tempfile::tempdir().unwrap();
    let ppl = ppl_file(dir.path());
    let first = dir.path().join("first");
    run_ok(&mut eval_mc_and_ppl(&ppl, &first));
    let baseline = first.join("eval.json");

    // The same evaluation again: no difference, every gate passes, the report shows both.
    let again = dir.path().join("again");
    let (stdout, _) = run_ok(
        eval_mc_and_ppl(&ppl, &again)
            .arg("--baseline")
            .arg(&baseline)
            .args([
                "--max-drop",
                "openbookqa/acc=0.01",
                "--max-drop",
                "loss=0.01",
            ]),
    );
    assert!(stdout.contains("## Compared with baseline"), "{stdout}");
    let report = read_json(&again.join("eval.json"));
    let rows = report["comparison"]["rows"].as_array().unwrap();
    let row = |task: &str, metric: &str| {
        rows.iter()
            .find(|r| r["task"] == task && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no {task}/{metric} row: {rows:?}"))
            .clone()
    };
    let acc = row("openbookqa", "acc");
    assert_eq!(acc["difference"], 0.0);
    assert_eq!(acc["paired"], 6);
    assert_eq!(acc["regressed"], false);
    let loss = row("stories", "loss");
    assert_eq!(loss["direction"], "lower_is_better");
    assert_eq!(loss["paired"], 5);
    assert_eq!(loss["regressed"], false);
    assert_eq!(
        row("openbookqa", "acc_norm")["regressed"],
        serde_json::Value::Null
    );
    assert_eq!(report["comparison"]["passed"], true);

    // A baseline that got every question right: accuracy fell, beyond any noise -> exit 3.
    let mut better = read_json(&baseline);
    edit_result(&mut better, "openbookqa", |r| {
        for s in r["samples"].as_array_mut().unwrap() {
            s["predicted"] = s["answer"].clone();
        }
        r["metrics"]["acc"] = 1.0.into();
        r["metrics"]["acc_stderr"] = 0.0.into();
    });
    let better_path = dir.path().join("better.json");
    std::fs::write(&better_path, better.to_string()).unwrap();
    let gated = dir.path().join("gated");
    let (code, stderr) = run_code(
        eval_mc_and_ppl(&ppl, &gated)
            .arg("--baseline")
            .arg(&better_path)
            .args(["--max-drop", "acc=0.01"]),
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("regression") && stderr.contains("openbookqa/acc 1.0000 ->"),
        "{stderr}"
    );
    // The report is written all the same, with the failed gate.
    let report = read_json(&gated.join("eval.json"));
    assert_eq!(report["comparison"]["passed"], false);
    let md = std::fs::read_to_string(gated.join("eval.md")).unwrap();
    assert!(md.contains("**FAIL**"), "{md}");

    // Lower is better for the loss: a baseline with half the loss is a regression now...
    let halve = |factor: f64| {
        let mut report = read_json(&baseline);
        edit_result(&mut report, "stories", |r| {
            for s in r["samples"].as_array_mut().unwrap() {
                s["nll"] = (s["nll"].as_f64().unwrap() * factor).into();
            }
            let loss = r["metrics"]["loss"].as_f64().unwrap() * factor;
            r["metrics"]["loss"] = loss.into();
            r["metrics"]["ppl"] = loss.exp().into();
        });
        let path = dir.path().join(format!("loss-x{factor}.json"));
        std::fs::write(&path, report.to_string()).unwrap();
        path
    };
    let (code, stderr) = run_code(
        eval_mc_and_ppl(&ppl, &dir.path().join("lower"))
            .arg("--baseline")
            .arg(halve(0.5))
            .args(["--max-drop", "stories/loss=0.01", "--max-drop", "ppl=0.01"]),
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("stories/loss"), "{stderr}");
    // ...and one with a higher loss is not, even without noise allowance.
    run_ok(
        eval_mc_and_ppl(&ppl, &dir.path().join("higher"))
            .arg("--baseline")
            .arg(halve(1.5))
            .args([
                "--max-drop",
                "stories/loss=0",
                "--max-drop",
                "ppl=0",
                "--noise",
                "0",
            ]),
    );
}

#[test]
fn a_gated_metric_missing_from_either_report_is_a_usage_error_listing_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ppl = ppl_file(dir.path());
    let first = dir.path().join("first");
    run_ok(&mut eval_mc_and_ppl(&ppl, &first));
    for gate in ["gsm8k/exact_match=0.1", "tokens=1", "openbookqa/loss=0.1"] {
        let (code, stderr) = run_code(
            eval_mc_and_ppl(&ppl, &dir.path().join("second"))
                .arg("--baseline")
                .arg(first.join("eval.json"))
                .args(["--max-drop", gate]),
        );
        let name = gate.split('=').next().unwrap();
        assert_eq!(code, 2, "{gate}: {stderr}");
        assert!(
            stderr.contains(&format!("--max-drop {name}"))
                && stderr
                    .contains("openbookqa/acc, openbookqa/acc_norm, stories/loss, stories/ppl"),
            "{gate}: {stderr}"
        );
        // Checked before anything is evaluated.
        assert!(!stderr.contains("[1/2]"), "{stderr}");
    }
    let (code, stderr) = run_code(
        eval_mc_and_ppl(&ppl, &dir.path().join("third"))
            .arg("--baseline")
            .arg(dir.path().join("nosuch.json"))
            .args(["--max-drop", "acc=0.1"]),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nosuch.json"), "{stderr}");
    let (code, stderr) =
        run_code(eval_mc_and_ppl(&ppl, &dir.path().join("fourth")).args(["--max-drop", "acc=0.1"]));
    assert_eq!(code, 2, "--max-drop needs --baseline: {stderr}");
}

/// The report without what differs from run to run (times, the output directory).
fn comparable(mut report: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for key in [
                    "created_unix",
                    "timings",
                    "seconds",
                    "tokens_per_second",
                    "load_seconds",
                ] {
                    map.remove(key);
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut report);
    report["plan"]["out"] = serde_json::Value::Null;
    report
}

fn record_lines(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().skip(1).map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn resume_after_an_interruption_reports_what_an_uninterrupted_run_reports() {
    let dir = tempfile::tempdir().unwrap();
    let ppl = ppl_file(dir.path());
    let eval = |out: &Path| {
        let mut cmd = eval_mc_and_ppl(&ppl, out);
        cmd.args(["--task", "gsm8k", "--max-tokens", "8"]);
        cmd
    };
    let whole = dir.path().join("whole");
    run_ok(&mut eval(&whole));
    // 6 questions + 6 problems + 5 texts (gsm8k takes --limit 6 too).
    assert_eq!(record_lines(&whole).len(), 17);

    let parts = dir.path().join("parts");
    let (code, stderr) = run_code(eval(&parts).args(["--stop-after", "4"]));
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("--resume continues"), "{stderr}");
    let logged = record_lines(&parts).len();
    assert!((4..17).contains(&logged), "{logged} records logged");
    assert!(!parts.join("eval.json").exists());
    // A process killed in the middle of a write leaves a partial line.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(parts.join("records.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut log, b"{\"task\":\"openbookqa\",\"col").unwrap();
    drop(log);

    // Resume twice more with a stop, then to the end.
    let (code, stderr) = run_code(eval(&parts).args(["--resume", "--stop-after", "3"]));
    assert_eq!(code, 130, "{stderr}");
    assert!(
        stderr.contains(&format!("resuming: {logged} record(s)"))
            && stderr.contains("partial last line was dropped"),
        "{stderr}"
    );
    let (_, stderr) = run_ok(eval(&parts).arg("--resume"));
    assert!(stderr.contains("resuming:"), "{stderr}");

    assert_eq!(record_lines(&parts), record_lines(&whole));
    assert_eq!(
        comparable(read_json(&parts.join("eval.json"))),
        comparable(read_json(&whole.join("eval.json")))
    );

    // A damaged line before the last one is refused (exit 2), not skipped.
    let log = parts.join("records.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[3] = "{\"task\": 7}";
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let (code, stderr) = run_code(eval(&parts).arg("--resume"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("line 4: not a record"), "{stderr}");
    std::fs::write(&log, &text).unwrap();

    // Other settings than the log's: refused (exit 2), not mixed.
    let (code, stderr) = run_code(eval(&parts).args(["--resume", "--max-seq-len", "100"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("records.jsonl") && stderr.contains("other settings"),
        "{stderr}"
    );
}

#[test]
fn a_config_with_several_models_and_adapters_runs_every_column_on_every_task() {
    let dir = tempfile::tempdir().unwrap();
    let ppl = ppl_file(dir.path());
    let gqa = root().join("fixtures/peft/llama_gqa");
    let config = dir.path().join("eval.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "[eval]\nmodel = {STORIES:?}\nbatch_size = 3\nlimit = 4\nmodels = [\n  \
                 {{ name = \"gqa\", path = {gqa:?}, adapters = [{{ name = \"sft\", path = {:?} }}]{extra} }},\n]\n\n\
                 [[eval.tasks]]\nname = \"openbookqa\"\n\n\
                 [[eval.tasks]]\nname = \"stories\"\nkind = \"perplexity\"\npath = {ppl:?}\n",
                gqa.join("adapter"),
            ),
        )
        .unwrap();
    };
    write_config("");
    let out = dir.path().join("all");
    let (stdout, _) = run_ok(
        hone()
            .arg("eval")
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        stdout.contains("| task | metric | n | base | gqa | sft |"),
        "{stdout}"
    );
    let report = read_json(&out.join("eval.json"));
    let names = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("columns"), ["base", "gqa", "sft"]);
    assert_eq!(names("models"), ["base", "gqa"]);
    assert_eq!(report["columns"][2]["model"], "gqa");
    for task in report["tasks"].as_array().unwrap() {
        let columns: Vec<&str> = task["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["column"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["base", "gqa", "sft"], "{}", task["name"]);
    }
    // Every record of every column is in the log, with its model and adapter.
    let records: Vec<serde_json::Value> = record_lines(&out)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3 * (4 + 4));
    let sft = records
        .iter()
        .find(|r| r["column"] == "sft" && r["task"] == "openbookqa")
        .unwrap();
    assert!(
        sft["model"].as_str().unwrap().ends_with("llama_gqa"),
        "{sft}"
    );
    assert!(
        sft["adapter"].as_str().unwrap().ends_with("adapter"),
        "{sft}"
    );
    assert!(
        sft["prompt"].as_str().unwrap().starts_with("Question: "),
        "{sft}"
    );
    assert!(sft["prediction"].is_string(), "{sft}");

    // Each model's columns measure what that model measures alone.
    let alone = dir.path().join("alone");
    run_ok(
        hone()
            .args([
                "eval",
                "--limit",
                "4",
                "--batch-size",
                "3",
                "--task",
                "openbookqa",
            ])
            .arg("--model")
            .arg(&gqa)
            .arg("--adapter")
            .arg(format!("sft={}", gqa.join("adapter").display()))
            .arg("--task")
            .arg(format!("ppl={}", ppl.display()))
            .arg("--out")
            .arg(&alone),
    );
    let single = read_json(&alone.join("eval.json"));
    for (task, metric) in [(0, "acc"), (0, "acc_norm")] {
        for (c, c_alone) in [(1, 0), (2, 1)] {
            assert_eq!(
                report["tasks"][task]["results"][c]["metrics"][metric],
                single["tasks"][task]["results"][c_alone]["metrics"][metric]
            );
        }
    }
    for (c, c_alone) in [(1, 0), (2, 1)] {
        assert_eq!(
            report["tasks"][1]["results"][c]["metrics"]["loss"],
            single["tasks"][1]["results"][c_alone]["metrics"]["loss"]
        );
    }

    // Unknown keys in a models entry are errors (exit 2) that name the key.
    write_config(", revision = \"main\"");
    let (code, stderr) = run_code(hone().arg("eval").arg("--config").arg(&config));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("revision"), "{stderr}");
}

#[test]
fn sigterm_stops_after_the_current_batch_with_143_and_resume_finishes_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let eval = || {
        let mut cmd = hone();
        cmd.args([
            "eval", "--model", STORIES, "--task", "gsm8k", "--limit", "48",
        ])
        .args([
            "--max-tokens",
            "64",
            "--stop",
            "@@@",
            "--batch-size",
            "1",
            "--out",
        ])
        .arg(&out);
        cmd
    };
    let child = eval().stderr(std::process::Stdio::piped()).spawn().unwrap();
    let log = out.join("records.jsonl");
    let started = std::time::Instant::now();
    // Header and two records, then SIGTERM.
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "no records logged");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    let logged = record_lines(&out).len();
    assert!(
        (2..48).contains(&logged),
        "{logged} records before the signal"
    );

    let (_, stderr) = run_ok(eval().arg("--resume"));
    assert!(
        stderr.contains(&format!("resuming: {logged} record(s)")),
        "{stderr}"
    );
    let lines = record_lines(&out);
    let mut unique = lines.clone();
    unique.dedup();
    assert_eq!((lines.len(), unique.len()), (48, 48));
    let report = read_json(&out.join("eval.json"));
    assert_eq!(
        report["tasks"][0]["results"][0]["samples"]
            .as_array()
            .unwrap()
            .len(),
        48
    );
}

/// `hone eval compare` on the shipped HotpotQA set (lexical index) with stories260k: closed
/// book and retrieval arms, the report files, and the question file named in errors.
#[test]
fn eval_compare_writes_arms_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    run_ok(
        hone()
            .args(["rag", "index", "--docs"])
            .arg(root().join("datasets/rag/hotpotqa_dev_distractor_60/corpus.jsonl"))
            // Short chunks: stories260k's context is 512 tokens of a 512-token vocabulary.
            .args(["--max-tokens", "40", "--overlap", "4", "--out"])
            .arg(&index),
    );
    let out = tmp.path().join("cmp");
    let questions = root().join("datasets/rag/hotpotqa_dev_distractor_60/questions.jsonl");
    let (stdout, stderr) = run_ok(
        hone()
            .args(["eval", "compare", "--model", "checkpoints/base/stories260k"])
            .args([
                "--template",
                "chatml",
                "-k",
                "1",
                "--limit",
                "4",
                "--max-tokens",
                "8",
            ])
            .arg("--rag")
            .arg(&index)
            .arg("--questions")
            .arg(&questions)
            .arg("--out")
            .arg(&out),
    );
    assert!(stdout.contains("| metric | base | base+rag |"), "{stdout}");
    assert!(stdout.contains("recall@1"), "{stdout}");
    assert!(
        stderr.contains("base+rag: 4 questions answered"),
        "{stderr}"
    );
    for f in [
        "eval.json",
        "eval.md",
        "predictions.jsonl",
        "accuracy_latency.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["questions"], 4);
    assert_eq!(report["arms"].as_array().unwrap().len(), 2);

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"x\"}\n").unwrap();
    let failed = hone()
        .args(["eval", "compare", "--model", "checkpoints/base/stories260k"])
        .arg("--questions")
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path().join("no"))
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("bad.jsonl"), "{stderr}");
}
