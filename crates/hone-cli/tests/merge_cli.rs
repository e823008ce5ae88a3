//! `hone merge` and `hone adapter combine` end to end through the binary: outputs checked with
//! `hone logits --compare-with` against the PEFT fixtures' references, and the errors a user sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the hone binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The error message of a run that failed cleanly (exit code 1, or 2 for a usage error; not a
/// panic or a signal).
fn failed(out: &Output) -> String {
    let code = out.status.code();
    assert!(
        matches!(code, Some(1 | 2)),
        "exit {code:?}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `hone logits` of `model` (+ `adapter`) on the fixture inputs, compared with `refs/logits_{reference}`.
fn compare_logits(
    fixture_dir: &Path,
    model: &Path,
    adapter: Option<&Path>,
    reference: &str,
    tolerance: &str,
) {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = hone();
    command.args(["logits", "--model"]).arg(model);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    command
        .arg("--input-ids")
        .arg(fixture_dir.join("refs/inputs.safetensors"))
        .arg("--out")
        .arg(tmp.path().join("logits.safetensors"))
        .arg("--compare-with")
        .arg(fixture_dir.join(format!("refs/logits_{reference}.safetensors")))
        .args(["--tolerance", tolerance]);
    ok(&run(&mut command));
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn merge_from_a_gguf_base_gives_pefts_merged_logits() {
    // fixtures/gguf/qwen2_tied.gguf: the qwen2_tied checkpoint converted to F32 GGUF.
    let dir = fixture("qwen2_tied");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/qwen2_tied.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let stdout = ok(&run(hone()
        .args(["merge", "--model"])
        .arg(&gguf)
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--out")
        .arg(&out)));
    assert!(stdout.contains("into 14 modules"), "{stdout}");
    assert_eq!(
        entries(&out),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    compare_logits(&dir, &out, None, "merged", "1e-4");
}

#[test]
fn merge_writes_shards_whose_logits_match_peft() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let stdout = ok(&run(hone()
        .args(["merge", "--model"])
        .arg(&dir)
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .args(["--max-shard-size", "100KB", "--out"])
        .arg(&out)));
    assert!(
        stdout.contains("into 14 modules") && stdout.contains("shards"),
        "{stdout}"
    );
    let files = entries(&out);
    assert!(
        files.contains(&"model.safetensors.index.json".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"model-00001-of-00006.safetensors".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"tokenizer.json".to_string())
            && files.contains(&"generation_config.json".to_string())
    );
    compare_logits(&dir, &out, None, "merged", "1e-4");
}

#[test]
fn adapter_combine_round_trips_and_negative_weights_cancel() {
    let dir = fixture("qwen2_tied");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    // cat with 0.5, 0.5 of the same adapter is the adapter (rank 16).
    let combined = tmp.path().join("combined");
    let stdout = ok(&run(hone()
        .args(["adapter", "combine", "--adapter"])
        .arg(&adapter)
        .arg("--adapter")
        .arg(&adapter)
        .args(["--method", "cat", "--weights", "0.5,0.5", "--out"])
        .arg(&combined)));
    assert!(stdout.contains("rank-16"), "{stdout}");
    compare_logits(&dir, &dir, Some(&combined), "adapter", "1e-4");
    // PEFT's method names are accepted as PEFT spells them.
    let dare = tmp.path().join("dare");
    let stdout = ok(&run(hone()
        .args(["adapter", "combine", "--adapter"])
        .arg(&adapter)
        .arg("--adapter")
        .arg(&adapter)
        .args([
            "--method",
            "dare_ties",
            "--density",
            "0.5",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&dare)));
    assert!(
        stdout.contains("(dare_ties)") && stdout.contains("rank-8"),
        "{stdout}"
    );
    // −1 and +1: the deltas cancel and the merged model is the base.
    let merged = tmp.path().join("cancelled");
    ok(&run(hone()
        .args(["merge", "--model"])
        .arg(&dir)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--adapter")
        .arg(&adapter)
        .args(["--method", "cat", "--weights", "-1,1", "--out"])
        .arg(&merged)));
    compare_logits(&dir, &merged, None, "base", "1e-4");
}

#[test]
fn merge_errors_name_the_problem_and_touch_nothing() {
    let dir = fixture("llama_gqa");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let merge = |extra: &[&str]| {
        let mut c = hone();
        c.args(["merge", "--model"])
            .arg(&dir)
            .arg("--adapter")
            .arg(&adapter)
            .args(extra);
        run(&mut c)
    };
    let out_arg = out.to_str().unwrap();
    let message = failed(&merge(&["--out", out_arg]));
    assert!(
        message.contains("already exists") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(entries(&out), ["keep.txt"]);

    let message = failed(&merge(&["--weights", "1,2", "--out", out_arg, "--force"]));
    assert!(
        message.contains("2 weight(s) given for 1 adapter(s)"),
        "{message}"
    );
    let message = failed(&merge(&["--max-shard-size", "5XB", "--out", out_arg]));
    assert!(message.contains("invalid size `5XB`"), "{message}");
    let message = failed(&merge(&[
        "--adapter",
        adapter.to_str().unwrap(),
        "--method",
        "ties",
        "--out",
        out_arg,
        "--force",
    ]));
    assert!(
        message.contains("method `ties`") && message.contains("density"),
        "{message}"
    );
    let message = failed(&merge(&[
        "--adapter",
        dir.join("refs").to_str().unwrap(),
        "--out",
        out_arg,
        "--force",
    ]));
    assert!(message.contains("adapter_config.json"), "{message}");
    assert_eq!(entries(&out), ["keep.txt"]);
    assert_eq!(entries(tmp.path()), ["out"]);
}

#[test]
fn a_write_failure_midway_leaves_no_partial_output() {
    // Files above 150 KiB cannot be written (RLIMIT_FSIZE, with SIGXFSZ ignored so the write
    // fails with EFBIG instead of killing the process). With 200 KB shards, the first shard
    // (lm_head, 131 KB) is written and the second (embed_tokens + more, 176 KB) fails.
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let result = run(Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 150; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_hone"))
        .args(["merge", "--model"])
        .arg(&dir)
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .args(["--max-shard-size", "200KB", "--out"])
        .arg(&out));
    let message = failed(&result);
    assert!(
        message.contains("model-00002-of-"),
        "the second shard fails: {message}"
    );
    assert!(!out.exists());
    assert_eq!(
        entries(tmp.path()),
        Vec::<String>::new(),
        "no temporary directory left"
    );
}

/// `hone export gguf`: the adapter merged into a chat model's GGUF file, the JSON summary line
/// (sizes as written, the end-of-turn id among the stop ids), the Ollama Modelfile beside it, and
/// a bad `--type` refused with the list of types.
#[test]
fn export_gguf_writes_the_file_its_modelfile_and_a_summary_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qwen.gguf");
    let base = fixture("qwen2_tied");
    let stdout = ok(&run(hone()
        .args(["export", "gguf", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(base.join("adapter"))
        .args(["--type", "q8_0", "--out"])
        .arg(&out)));
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["type"], "q8_0");
    assert_eq!(
        summary["bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert!(summary["merged_modules"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        summary["tensor_types"]["Q8_0"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let modelfile = std::fs::read_to_string(tmp.path().join("qwen.Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./qwen.gguf"), "{modelfile}");
    let err = failed(&run(hone()
        .args(["export", "gguf", "--model"])
        .arg(&base)
        .args(["--type", "q3_k", "--out"])
        .arg(tmp.path().join("x.gguf"))));
    assert!(err.contains("q3_k") && err.contains("q4_k_m"), "{err}");
}

/// `hone export gguf --run`: a run trained with ChatML on a base whose EOS is not ChatML's
/// end of turn (qwen2_tied: EOS `<|endoftext|>`, `<|im_end|>` in the vocabulary) exports with the
/// run's template and `<|im_end|>` as the end-of-turn id, so llama.cpp stops at the end of an
/// answer; on a base without that token (llama_gqa) it becomes a Modelfile stop string.
#[test]
fn export_gguf_from_a_run_writes_its_template_and_end_of_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (model, eot) in [("qwen2_tied", Some(511u64)), ("llama_gqa", None)] {
        let run_dir = tmp.path().join(format!("run-{model}"));
        let set = |kv: String| ["--set".to_string(), kv];
        ok(&run(hone()
            .current_dir(&root)
            .args(["train", "--config", "configs/quickstart.toml"])
            .args(set(format!("model.path=\"fixtures/peft/{model}\"")))
            .args(set("tokenize.template=\"chatml\"".into()))
            .args(set("tokenize.max_seq_len=128".into()))
            .args(set("train.max_steps=1".into()))
            .args(set("eval.at_start=false".into()))
            .args(set(format!(
                "output.dir={:?}",
                run_dir.display().to_string()
            )))));
        let out = tmp.path().join(format!("{model}.gguf"));
        let stdout = ok(&run(hone()
            .current_dir(&root)
            .args(["export", "gguf", "--run"])
            .arg(&run_dir)
            .args(["--type", "f32", "--out"])
            .arg(&out)));
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(
            summary["template_source"]
                .as_str()
                .unwrap()
                .starts_with("builtin:chatml"),
            "{summary}"
        );
        assert!(summary["merged_modules"].as_u64().unwrap() > 0, "{summary}");
        let file = hone_model::gguf::GgufFile::open(&out).unwrap();
        assert!(file
            .get_str("tokenizer.chat_template")
            .unwrap()
            .contains("<|im_start|>"));
        let modelfile =
            std::fs::read_to_string(tmp.path().join(format!("{model}.Modelfile"))).unwrap();
        assert!(
            modelfile.contains("PARAMETER stop \"<|im_end|>\""),
            "{modelfile}"
        );
        match eot {
            Some(id) => {
                let found = file
                    .get("tokenizer.ggml.eot_token_id")
                    .and_then(|v| v.as_u64());
                assert_eq!(found, Some(id), "{model}");
                assert!(summary["eos_ids"].as_array().unwrap().contains(&id.into()));
            }
            None => {
                assert!(file.get("tokenizer.ggml.eot_token_id").is_none(), "{model}");
                assert_eq!(summary["stop_strings"][0], "<|im_end|>", "{summary}");
            }
        }
    }
}
