//! Run configs: defaults, `--set` overrides, errors that name the file and the key, the
//! resolved copy, and the configs shipped in `configs/`.

use std::path::{Path, PathBuf};

use hone_model::lora::TargetModules;
use hone_model::{FloatDtype, Kernels};
use hone_train::{RunConfig, ScheduleKind, TrainError};

const MINIMAL: &str = r#"
[model]
path = "models/x"

[data]
inputs = ["data.jsonl"]
"#;

fn parse(text: &str, sets: &[&str]) -> Result<RunConfig, TrainError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(text, "configs/x.toml", Some("x".into()), &sets)
}

fn error(text: &str, sets: &[&str]) -> String {
    parse(text, sets).unwrap_err().to_string()
}

#[test]
fn missing_tables_and_keys_take_their_defaults() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.train.lr, 2e-4);
    assert_eq!(c.train.schedule, ScheduleKind::Linear);
    assert_eq!(c.train.betas, [0.9, 0.999]);
    assert_eq!(c.lora.r, 8);
    assert_eq!(
        c.lora.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(c.model.dtype, FloatDtype::F32);
    assert_eq!(c.output.name.as_deref(), Some("x"));
    assert_eq!(c.run_dir(), Path::new("checkpoints/runs/x"));
    assert!(c.tokenize.packing && c.eval.at_start);
}

#[test]
fn set_overrides_parse_toml_values_and_fall_back_to_strings() {
    let c = parse(
        MINIMAL,
        &[
            "train.lr=1e-3",
            "lora.target_modules=\"all-linear\"",
            "model.path=other/dir",
            "train.betas=[0.8, 0.99]",
            "tokenize.template=alpaca",
            "output.name=run7",
        ],
    )
    .unwrap();
    assert_eq!(c.train.lr, 1e-3);
    assert_eq!(
        c.lora.target_modules,
        TargetModules::Pattern("all-linear".into())
    );
    assert_eq!(c.model.path, PathBuf::from("other/dir"));
    assert_eq!(c.train.betas, [0.8, 0.99]);
    assert_eq!(c.tokenize.template.to_string(), "alpaca");
    assert_eq!(c.run_dir(), Path::new("checkpoints/runs/run7"));
    // Integers where floats are expected are fine.
    assert_eq!(parse(MINIMAL, &["lora.alpha=32"]).unwrap().lora.alpha, 32.0);
}

#[test]
fn unknown_keys_are_errors_naming_the_file_and_the_key() {
    let err = error(&format!("{MINIMAL}\n[train]\nlearning_rate = 1e-4\n"), &[]);
    assert!(
        err.starts_with("configs/x.toml: train.learning_rate: unknown field `learning_rate`"),
        "{err}"
    );
    let err = error(MINIMAL, &["train.learning_rate=1"]);
    assert!(
        err.contains("configs/x.toml (--set train.learning_rate=1)")
            && err.contains("learning_rate"),
        "{err}"
    );
    let err = error(&format!("{MINIMAL}\n[trainer]\nlr = 1\n"), &[]);
    assert!(err.contains("trainer"), "{err}");
    // Unknown keys inside the data tables of hone-data are caught too.
    let err = error(&format!("{MINIMAL}\n[data.split]\nfraction = 0.1\n"), &[]);
    assert!(err.contains("data.split.fraction"), "{err}");
    let err = error(MINIMAL, &["train=3"]);
    assert!(err.contains("train"), "{err}");
    let err = error(MINIMAL, &["model.path.x=3"]);
    assert!(err.contains("`model.path` is a value"), "{err}");
    let err = error(MINIMAL, &["noequals"]);
    assert!(err.contains("KEY=VALUE"), "{err}");
}

#[test]
fn bad_values_are_errors_naming_the_key() {
    for (set, key) in [
        ("train.lr=\"fast\"", "train.lr: invalid type"),
        ("train.lr=-1", "train.lr: must be"),
        (
            "train.schedule=\"exponential\"",
            "train.schedule: unknown variant",
        ),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.betas=[0.9, 1.0]", "train.betas: beta2"),
        ("train.eps=0", "train.eps"),
        ("model.device=\"tpu\"", "model.device"),
        ("model.dtype=\"f16\"", "model.dtype"),
        ("lora.dropout=1.0", "lora"),
        ("tokenize.max_seq_len=1", "tokenize"),
        ("output.name=\"a/b\"", "output.name"),
    ] {
        let err = error(MINIMAL, &[set]);
        assert!(err.contains(key), "{set}: {err}");
    }
    let err = error(
        &format!("{MINIMAL}\n[train]\nwarmup_steps = 3\nwarmup_ratio = 0.1\n"),
        &[],
    );
    assert!(err.contains("not both"), "{err}");
    let err = error("[model]\npath = 3\n", &[]);
    assert!(err.contains("model.path"), "{err}");
    let err = error("[model\n", &[]);
    assert!(
        err.contains("configs/x.toml") && err.contains("line 1"),
        "{err}"
    );
    let err = error("[model]\npath = \"x\"\n", &[]);
    assert!(err.contains("data"), "{err}");
}

#[test]
fn the_resolved_config_reads_back_equal() {
    let c = parse(
        MINIMAL,
        &[
            "train.warmup_ratio=0.1",
            "lora.rank_pattern={ q_proj = 4 }",
            "eval.prompts=[\"hi\"]",
        ],
    )
    .unwrap();
    let text = c.to_toml().unwrap();
    assert!(
        text.contains("[train]") && text.contains("max_grad_norm = 1.0"),
        "{text}"
    );
    let again = RunConfig::from_toml_str(&text, "config.toml", None, &[]).unwrap();
    assert_eq!(again, c);
}

#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for (file, device) in [
        ("quickstart.toml", "cpu"),
        ("llama-3.2-1b.toml", "cuda:0"),
        ("qwen2.5-0.5b.toml", "cuda:0"),
    ] {
        let c = RunConfig::load(&dir.join(file), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(c.model.device.to_string(), device, "{file}");
        assert_eq!(
            c.output.name.as_deref(),
            Some(file.trim_end_matches(".toml"))
        );
    }
}

#[test]
fn train_devices_default_to_the_model_device_and_must_share_a_backend() {
    use hone_model::DeviceSpec;
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.devices(), [DeviceSpec::Cpu]);
    assert!(!c.to_toml().unwrap().contains("devices"));
    let c = parse(MINIMAL, &["train.devices=[\"cuda:0\", \"cuda:1\"]"]).unwrap();
    assert_eq!(c.devices(), [DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
    let e = error(MINIMAL, &["train.devices=[\"cpu\", \"cuda:1\"]"]);
    assert!(
        e.contains("train.devices") && e.contains("mixes cpu and cuda:1"),
        "{e}"
    );
    let e = error(MINIMAL, &["train.devices=[\"cpu\", \"tpu\"]"]);
    assert!(e.contains("train.devices") && e.contains("tpu"), "{e}");
    let e = error(MINIMAL, &["train.collective_timeout_secs=0"]);
    assert!(e.contains("train.collective_timeout_secs"), "{e}");
}

#[test]
fn model_kernels_default_to_fused_and_are_left_out_of_the_resolved_config() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.model.kernels, Kernels::Fused);
    // Left out when default, so configs resolved before the key existed hash the same.
    assert!(!c.to_toml().unwrap().contains("kernels"));
    let c = parse(MINIMAL, &["model.kernels=composed"]).unwrap();
    assert_eq!(c.model.kernels, Kernels::Composed);
    let text = c.to_toml().unwrap();
    assert!(text.contains("kernels = \"composed\""), "{text}");
    let again = RunConfig::from_toml_str(&text, "config.toml", None, &[]).unwrap();
    assert_eq!(again, c);
    let e = error(MINIMAL, &["model.kernels=fast"]);
    assert!(
        e.contains("model.kernels") && e.contains("fused") && e.contains("composed"),
        "{e}"
    );
}
