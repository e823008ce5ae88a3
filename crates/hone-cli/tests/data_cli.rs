//! `hone data prepare|inspect`, `hone template render` and `hone bench data`, end to end on
//! small files in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories() -> PathBuf {
    root().join("checkpoints/base/stories260k")
}

/// `hone ARGS` run in `dir`.
fn hone(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hone"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// Four GSM8K-style records, the second a copy of the first.
const GOOD: &str = r#"{"question": "What is 2+2?", "answer": "2+2 = 4. #### 4"}
{"question": "What is 2+2?", "answer": "2+2 = 4. #### 4"}
{"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3-1 = 2. #### 2"}
{"question": "A train travels 60 km in an hour. How far does it go in 3 hours?", "answer": "60*3 = 180 km. #### 180"}
"#;

/// Like [`GOOD`] with a bad record on line 3 and malformed JSON on line 5.
const WITH_ERRORS: &str = r#"{"question": "What is 2+2?", "answer": "2+2 = 4. #### 4"}
{"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3-1 = 2. #### 2"}
{"question": 7, "answer": "seven"}
{"question": "A train travels 60 km in an hour. How far does it go in 3 hours?", "answer": "60*3 = 180 km. #### 180"}
{"question": "broken
"#;

fn workdir(input: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    dir
}

#[test]
fn prepare_runs_from_flags_alone() {
    let dir = workdir(GOOD);
    let out = hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--out",
            "out",
            "--val-fraction",
            "0",
            "--dedupe",
            "exact",
        ],
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("records") && stdout.contains("exact_duplicate 1"),
        "{stdout}"
    );
    let out_dir = dir.path().join("out");
    let train = lines(&out_dir.join("train.jsonl"));
    assert_eq!(train.len(), 3);
    assert_eq!(train[0]["messages"][0]["role"], "user");
    assert_eq!(train[0]["messages"][1]["content"], "2+2 = 4. #### 4");
    assert!(lines(&out_dir.join("val.jsonl")).is_empty());
    let report = report(&out_dir);
    assert_eq!(report["config"]["dedupe"]["near"]["enabled"], false);
    assert_eq!(report["removed"]["exact_duplicate"], 1);
    assert!(report["token_length"].is_null());
}

#[test]
fn prepare_with_tokenizer_reports_token_lengths() {
    let dir = workdir(GOOD);
    let model = stories();
    let out = hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--tokenizer",
            model.to_str().unwrap(),
        ],
    );
    let stdout = ok(&out);
    assert!(stdout.contains("tokens"), "{stdout}");
    let report = report(&dir.path().join("prepared"));
    assert!(
        report["token_length"]["max"].as_u64().unwrap() > 0,
        "{report}"
    );
}

#[test]
fn prepare_reads_the_data_table_of_a_toml_config_and_flags_override_it() {
    let dir = workdir(GOOD);
    std::fs::write(
        dir.path().join("run.toml"),
        r#"
[model]
path = "elsewhere"   # another command's table: not looked at

[data]
inputs = ["in.jsonl"]
format = "completion"
fields = { prompt = "question", completion = "answer" }

[data.dedupe]
exact = false
near = { enabled = false }

[data.split]
val_fraction = 0.5
"#,
    )
    .unwrap();
    let out = hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--config",
            "run.toml",
            "--val-fraction",
            "0",
            "--out",
            "curated",
        ],
    );
    ok(&out);
    let out_dir = dir.path().join("curated");
    // No dedupe in the config keeps the copy; the flag's 0 beats the config's 0.5.
    assert_eq!(lines(&out_dir.join("train.jsonl")).len(), 4);
    assert!(lines(&out_dir.join("val.jsonl")).is_empty());
    let report = report(&out_dir);
    assert_eq!(report["config"]["split"]["val_fraction"], 0.0);
    assert_eq!(report["config"]["dedupe"]["exact"], false);
    assert_eq!(report["config"]["format"], "completion");
}

#[test]
fn unknown_config_key_is_an_error_naming_the_key_and_the_file() {
    let dir = workdir(GOOD);
    std::fs::write(
        dir.path().join("typo.toml"),
        "[data]\ninputs = [\"in.jsonl\"]\n[data.split]\nval_fracton = 0.1\n",
    )
    .unwrap();
    let stderr = failed(&hone(
        dir.path(),
        &["data", "prepare", "--config", "typo.toml"],
    ));
    assert!(
        stderr.contains("typo.toml") && stderr.contains("val_fracton"),
        "{stderr}"
    );
    assert!(!dir.path().join("prepared").exists());
}

#[test]
fn on_error_fail_writes_nothing_and_names_the_bad_lines() {
    let dir = workdir(WITH_ERRORS);
    let stderr = failed(&hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--on-error",
            "fail",
            "--out",
            "out",
        ],
    ));
    assert!(
        stderr.contains("in.jsonl:3:") && stderr.contains("in.jsonl:5:"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn on_error_skip_lists_the_errors_in_the_report() {
    let dir = workdir(WITH_ERRORS);
    let out = hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--on-error",
            "skip",
            "--out",
            "out",
        ],
    );
    ok(&out);
    let report = report(&dir.path().join("out"));
    let errors = report["errors"].as_array().unwrap();
    let bad_lines: Vec<u64> = errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(bad_lines, [3, 5], "{errors:?}");
    assert_eq!(errors[0]["file"], "in.jsonl");
    assert_eq!(
        report["kept"]["train"].as_u64().unwrap() + report["kept"]["val"].as_u64().unwrap(),
        3
    );
}

#[test]
fn inspect_lists_removed_examples_per_reason() {
    let dir = workdir(GOOD);
    ok(&hone(
        dir.path(),
        &["data", "prepare", "--input", "in.jsonl"],
    ));
    let stdout = ok(&hone(dir.path(), &["data", "inspect", "prepared"]));
    assert!(
        stdout.contains("exact_duplicate: 1 removed")
            && stdout.contains("in.jsonl:2")
            && stdout.contains("same text as in.jsonl:1"),
        "{stdout}"
    );
    let only = ok(&hone(
        dir.path(),
        &["data", "inspect", "prepared", "--reason", "near_duplicate"],
    ));
    assert_eq!(only, "near_duplicate: 0 removed\n");
}

#[test]
fn inspect_tokens_puts_assistant_tokens_in_the_loss_and_user_tokens_out() {
    let dir = workdir(
        r#"{"messages": [{"role": "user", "content": "Where do fish live?"}, {"role": "assistant", "content": "In the water."}]}
"#,
    );
    ok(&hone(
        dir.path(),
        &[
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--val-fraction",
            "0",
        ],
    ));
    let model = stories();
    let stdout = ok(&hone(
        dir.path(),
        &[
            "data",
            "inspect",
            "prepared",
            "--tokens",
            "--model",
            model.to_str().unwrap(),
            "--template",
            "chatml",
            "--index",
            "0",
        ],
    ));
    // The token table: every token is either in the loss or not, and both kinds occur.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("  LOSS  ") || l.contains("     -  "))
        .collect();
    assert!(rows.iter().any(|l| l.contains("LOSS")), "{stdout}");
    assert!(rows.iter().any(|l| !l.contains("LOSS")), "{stdout}");
    // The masked text: exactly the assistant reply and its end-of-turn marker are trained.
    let masked = stdout
        .split("text, with the tokens in the loss between [[ and ]]:\n")
        .nth(1)
        .expect("masked text section");
    assert!(masked.contains("[[In the water.<|im_end|>]]"), "{masked}");
    assert_eq!(masked.matches("[[").count(), 1, "{masked}");
    let user_at = masked.find("Where do fish live?").expect("user text");
    assert!(user_at < masked.find("[[").unwrap(), "{masked}");
}

#[test]
fn template_render_prints_exactly_what_transformers_renders() {
    let fixture = root().join("crates/hone-tokenize/tests/fixtures/chat_templates/chatml");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("cases.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = fixture.join("tokenizer_config.json");
    let mut checked = 0;
    for case in cases.iter().filter(|c| {
        c["name"]
            .as_str()
            .unwrap()
            .starts_with("b_system_user_assistant_user")
    }) {
        std::fs::write(
            dir.path().join("messages.json"),
            case["messages"].to_string(),
        )
        .unwrap();
        let mut args = vec![
            "template",
            "render",
            "--tokenizer-config",
            config.to_str().unwrap(),
            "--messages",
            "messages.json",
        ];
        if case["add_generation_prompt"].as_bool().unwrap() {
            args.push("--add-generation-prompt");
        }
        let stdout = ok(&hone(dir.path(), &args));
        assert_eq!(
            stdout,
            case["expected"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn template_render_of_a_builtin_has_no_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.json"),
        r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
    )
    .unwrap();
    let stdout = ok(&hone(
        dir.path(),
        &[
            "template",
            "render",
            "--template",
            "chatml",
            "--messages",
            "m.json",
            "--add-generation-prompt",
        ],
    ));
    assert_eq!(
        stdout,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn bench_data_prints_one_json_line_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    let gsm8k = std::fs::read_to_string(root().join("datasets/gsm8k_train.jsonl")).unwrap();
    let head: String = gsm8k.lines().take(100).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("small.jsonl"), head).unwrap();
    let model = stories();
    let run = |perturb: &str| -> Vec<Value> {
        let stdout = ok(&hone(
            dir.path(),
            &[
                "bench",
                "data",
                "--examples",
                "2000",
                "--input",
                "small.jsonl",
                "--model",
                model.to_str().unwrap(),
                "--perturb",
                perturb,
            ],
        ));
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = run("true");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (curate, tokenize) = (&lines[0], &lines[1]);
    for key in [
        "examples_per_sec",
        "seconds",
        "peak_rss_mb",
        "threads",
        "removed_exact_duplicate",
        "removed_near_duplicate",
        "kept_train",
        "kept_val",
        "dedupe",
    ] {
        assert!(
            curate.get(key).is_some(),
            "curate line lacks {key}: {curate}"
        );
    }
    for key in [
        "tokens_per_sec",
        "tokens",
        "rows",
        "template",
        "max_seq_len",
        "peak_rss_mb",
        "threads",
    ] {
        assert!(
            tokenize.get(key).is_some(),
            "tokenize line lacks {key}: {tokenize}"
        );
    }
    assert_eq!(curate["stage"], "curate");
    assert_eq!(curate["examples"], 2000);
    assert_eq!(tokenize["stage"], "tokenize");
    assert_eq!(tokenize["kept"], 2000);
    assert!(tokenize["tokens"].as_u64().unwrap() > 0);
    // Perturbed copies survive exact dedupe but are near-duplicates of their original.
    assert_eq!(curate["removed_exact_duplicate"], 0);
    assert!(
        curate["removed_near_duplicate"].as_u64().unwrap() >= 1900,
        "{curate}"
    );

    let plain = run("false");
    assert_eq!(plain[0]["removed_exact_duplicate"], 1900, "{}", plain[0]);
}

/// Regression: `--input DIR/raw.jsonl --out DIR` deleted DIR with its input, leaving only
/// train/val/report.
#[test]
fn prepare_never_replaces_an_out_dir_holding_its_input_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/raw.jsonl"), GOOD).unwrap();
    for force in [false, true] {
        let mut args = vec![
            "data",
            "prepare",
            "--input",
            "data/raw.jsonl",
            "--out",
            "data",
        ];
        if force {
            args.push("--force");
        }
        let stderr = failed(&hone(dir.path(), &args));
        assert!(
            stderr.contains("raw.jsonl") && stderr.contains("choose another output directory"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("data/raw.jsonl")).unwrap(),
            GOOD
        );
        assert!(!dir.path().join("data/train.jsonl").exists());
    }
}

#[test]
fn prepare_replaces_its_own_output_but_a_foreign_directory_only_with_force() {
    let dir = workdir(GOOD);
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "prepare",
            "--input",
            "in.jsonl",
            "--out",
            "out",
            "--val-fraction",
            "0",
        ];
        args.extend_from_slice(extra);
        hone(dir.path(), &args)
    };
    ok(&prepare(&[]));
    ok(&prepare(&[])); // a previous output is replaced without asking
    std::fs::write(dir.path().join("out/notes.md"), "mine").unwrap();
    let stderr = failed(&prepare(&[]));
    assert!(
        stderr.contains("notes.md") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(dir.path().join("out/notes.md").is_file());
    ok(&prepare(&["--force"]));
    assert!(!dir.path().join("out/notes.md").exists());
    assert_eq!(lines(&dir.path().join("out/train.jsonl")).len(), 3);
}

/// Regression: a 50 MB single-line record took minutes and gigabytes to curate.
#[test]
fn prepare_skips_a_record_over_max_record_bytes_naming_file_and_line() {
    let long = "z".repeat(3000);
    let input = format!("{GOOD}{{\"question\": \"{long}\", \"answer\": \"a\"}}\n");
    let dir = workdir(&input);
    std::fs::write(
        dir.path().join("c.toml"),
        "[data]\nmax_record_bytes = 2000\n",
    )
    .unwrap();
    let args = [
        "data", "prepare", "--config", "c.toml", "--input", "in.jsonl", "--out", "out",
    ];
    let stderr = failed(&hone(dir.path(), &args));
    assert!(
        stderr.contains("in.jsonl:5:") && stderr.contains("max_record_bytes = 2000"),
        "{stderr}"
    );
    let mut skip = args.to_vec();
    skip.extend(["--on-error", "skip"]);
    ok(&hone(dir.path(), &skip));
    let report = report(&dir.path().join("out"));
    assert_eq!(report["errors"][0]["line"], 5);
}
