//! Whole runs on the shipped stories260k: determinism, resume, checkpoints, the non-finite
//! guard and the files a run leaves.

mod common;

use std::path::Path;

use burn::backend::Autodiff;
use common::*;
use hone_model::Cpu;
use hone_train::checkpoint::{list_checkpoints, read_state};
use hone_train::{train_on, RunConfig, RunOptions, RunSummary, Silent, TrainError};

type Ad = Autodiff<Cpu>;

fn run(config: &RunConfig, options: RunOptions) -> Result<RunSummary, TrainError> {
    train_on::<Ad>(config, options, &mut Silent, Default::default())
}

#[test]
fn same_seed_and_data_give_bit_identical_adapters() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 6\ngrad_accum = 2";
    let sets = ["lora.dropout=0.1"];
    let a = run(
        &config(&data, &tmp.path().join("a"), extra, &sets),
        RunOptions::default(),
    )
    .unwrap();
    let b = run(
        &config(&data, &tmp.path().join("b"), extra, &sets),
        RunOptions::default(),
    )
    .unwrap();
    let c = run(
        &config(
            &data,
            &tmp.path().join("c"),
            extra,
            &["lora.dropout=0.1", "train.seed=7"],
        ),
        RunOptions::default(),
    )
    .unwrap();
    let file = |s: &RunSummary| {
        std::fs::read(
            s.adapter_dir
                .as_ref()
                .unwrap()
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(file(&a), file(&b), "same seed, same data: the same bytes");
    assert_ne!(file(&a), file(&c), "another seed gives another adapter");
    assert_eq!(a.last_loss, b.last_loss);
}

#[test]
fn resume_matches_uninterrupted_run() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    // Dropout, accumulation and more than one epoch: resuming must restore the optimizer,
    // the schedule, the data position and the random numbers.
    let extra = "max_steps = 20\ngrad_accum = 2\nsave_every = 5\nkeep_last = 2\nlog_every = 1";
    let sets = ["lora.dropout=0.1"];
    let whole = run(
        &config(&data, &tmp.path().join("whole"), extra, &sets),
        RunOptions::default(),
    )
    .unwrap();
    assert!(whole.completed);
    let steps: Vec<usize> = list_checkpoints(&whole.run_dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [15, 20], "keep_last = 2 keeps the newest two");

    let split = config(&data, &tmp.path().join("split"), extra, &sets);
    let first = train_on::<Ad>(
        &split,
        RunOptions::default(),
        &mut StopAfter(10),
        Default::default(),
    )
    .unwrap();
    assert!(!first.completed && first.step == 10 && first.adapter_dir.is_none());
    let state = read_state(&first.run_dir.join("step-10")).unwrap();
    assert_eq!(
        (state.step, state.optimizer_step, state.scheduler_step),
        (10, 10, 10)
    );
    let second = run(
        &split,
        RunOptions {
            resume: true,
            overwrite: false,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(second.resumed_from, Some(10));
    assert!(second.completed);

    let a = adapter_tensors(whole.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(second.adapter_dir.as_ref().unwrap());
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff <= 1e-6,
        "20 steps in one go vs 10 + resume + 10 differ by {diff}"
    );
    // Each step is logged once in the resumed run's metrics.
    let metrics = std::fs::read_to_string(second.run_dir.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=20).collect::<Vec<u64>>());
}

#[test]
fn non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 16);
    // An absurd learning rate: the first update is finite (the base model's loss), after it
    // the adapters hold values near f32's maximum and the logits overflow.
    let extra = "max_steps = 20\nsave_every = 1\nkeep_last = 0\nmax_bad_steps = 3\nwarmup_steps = 0\nschedule = \"constant\"";
    let config = config(&data, &tmp.path().join("run"), extra, &["train.lr=1e37"]);
    let err = run(&config, RunOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            TrainError::Diverged {
                step: 4,
                count: 3,
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("max_bad_steps") && message.contains("step-1"),
        "{message}"
    );
    let steps: Vec<usize> = list_checkpoints(&config.run_dir())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [1], "no checkpoint is written for skipped steps");
    let mut model =
        hone_model::load_model_dir::<Cpu>(&stories260k(), &Default::default(), Default::default())
            .unwrap()
            .model;
    model
        .load_adapter(&config.run_dir().join("step-1/adapter"))
        .unwrap();
    assert!(!config.run_dir().join("adapter").exists());
}

#[test]
fn a_run_leaves_config_metrics_events_adapter_and_samples() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 40);
    let extra = "epochs = 3\neval_every = 10\nlog_every = 5\nlr = 1e-2";
    let config = config(
        &data,
        &tmp.path().join("run"),
        extra,
        &[
            "eval.prompts=[\"Tell me a story about Mia.\"]",
            "eval.max_new_tokens=24",
        ],
    );
    let summary = run(&config, RunOptions::default()).unwrap();
    let dir = &summary.run_dir;
    assert_eq!(
        summary.total_steps,
        3 * 16,
        "32 training rows, 2 per micro-batch, 3 epochs"
    );

    // The saved config is the resolved one and reads back equal.
    let saved = RunConfig::load(&dir.join("config.toml"), &[]).unwrap();
    assert_eq!(saved, config);

    // Training lowers the validation loss.
    let (first, last) = (summary.first_eval.unwrap(), summary.last_eval.unwrap());
    assert_eq!((first.step, last.step), (0, 48));
    assert!(
        last.loss < first.loss - 0.1,
        "validation loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!((last.ppl - last.loss.exp()).abs() < 1e-9);

    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    for key in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "eval/loss",
        "eval/ppl",
    ] {
        assert!(
            metrics.contains(&format!("\"{key}\"")),
            "{key} missing in\n{metrics}"
        );
    }
    let eval_steps = metrics.lines().filter(|l| l.contains("eval/loss")).count();
    assert_eq!(
        eval_steps,
        1 + 4 + 1,
        "start, every 10 steps before the end, end"
    );
    let events = std::fs::read_dir(dir.join("tb"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .count();
    assert_eq!(events, 1);

    // The adapter is PEFT's format and changes the model's output.
    let adapter = dir.join("adapter");
    let (settings, _) = hone_model::adapter::read_adapter_config(&adapter).unwrap();
    assert_eq!(
        settings.target_modules,
        hone_model::lora::TargetModules::Names(vec![
            "down_proj".into(),
            "q_proj".into(),
            "v_proj".into()
        ])
    );
    assert_eq!((settings.r, settings.alpha), (4, 8.0));
    assert_eq!(summary.samples.len(), 1);
    let sample = &summary.samples[0];
    assert!(
        sample.rendered.ends_with("### Response:\n"),
        "{:?}",
        sample.rendered
    );
    assert_ne!(sample.base, sample.adapter);
    assert!(dir.join("samples.jsonl").is_file() && dir.join("data/train.jsonl").is_file());
}

#[test]
fn existing_runs_are_not_mixed_up() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 12);
    let out = tmp.path().join("run");
    let config = config(&data, &out, "max_steps = 2", &[]);
    run(&config, RunOptions::default()).unwrap();
    let err = run(&config, RunOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    // Resuming with another config names the keys that differ.
    let changed = common::config(&data, &out, "max_steps = 2", &["train.lr=1e-3", "lora.r=2"]);
    let err = run(
        &changed,
        RunOptions {
            resume: true,
            overwrite: false,
            ..RunOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.lr") && err.contains("lora.r"), "{err}");
    run(
        &changed,
        RunOptions {
            resume: false,
            overwrite: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    // A directory that is not a run is left alone.
    let stranger = tmp.path().join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    std::fs::write(stranger.join("notes.txt"), "mine").unwrap();
    let err = run(
        &common::config(&data, &stranger, "max_steps = 1", &[]),
        RunOptions {
            resume: false,
            overwrite: true,
            ..RunOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a hone run"), "{err}");
    assert!(Path::new(&stranger.join("notes.txt")).is_file());
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 4\ngrad_accum = 2";
    let plain = run(
        &config(&data, &tmp.path().join("plain"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    let recomputed = run(
        &config(
            &data,
            &tmp.path().join("recomputed"),
            extra,
            &["train.gradient_checkpointing=true"],
        ),
        RunOptions::default(),
    )
    .unwrap();
    let a = adapter_tensors(plain.adapter_dir.as_ref().unwrap());
    let b = adapter_tensors(recomputed.adapter_dir.as_ref().unwrap());
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-6, "adapters differ by {diff:e}");
    // Training moved the adapter (B starts at zero), so the comparison is not vacuous.
    assert!(a
        .iter()
        .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0)));

    let refused = hone_train::RunConfig::from_toml_str(
        &config_text(&data, &tmp.path().join("dropout")),
        "test.toml",
        Some("test".into()),
        &[
            "train.gradient_checkpointing=true".into(),
            "lora.dropout=0.1".into(),
        ],
    );
    let message = match refused {
        Err(e) => e.to_string(),
        Ok(_) => panic!("gradient checkpointing with dropout must be refused"),
    };
    assert!(message.contains("lora.dropout"), "{message}");
}

/// bf16 base weights with f32 adapters (PEFT's mixed precision): the adapter stays f32 on disk and
/// in the optimizer, and training follows the f32 run within bf16's precision.
#[test]
fn bf16_base_weights_train_f32_adapters_close_to_the_f32_run() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 4\ngrad_accum = 2";
    let f32_run = run(
        &config(&data, &tmp.path().join("f32"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    let bf16_run = run(
        &config(
            &data,
            &tmp.path().join("bf16"),
            extra,
            &["model.dtype=\"bf16\""],
        ),
        RunOptions::default(),
    )
    .unwrap();
    let dir = bf16_run.adapter_dir.as_ref().unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let (a, b) = (f32_run.last_loss.unwrap(), bf16_run.last_loss.unwrap());
    assert!(
        (a - b).abs() <= 2e-2 * a.abs(),
        "last loss f32 {a} vs bf16 {b}"
    );
    // The adapters point the same way (B starts at zero, so B is the whole update).
    let fa = adapter_tensors(f32_run.adapter_dir.as_ref().unwrap());
    let fb = adapter_tensors(dir);
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for ((ka, va), (kb, vb)) in fa.iter().zip(&fb) {
        assert_eq!(ka, kb);
        if ka.contains("lora_B") {
            for (x, y) in va.iter().zip(vb) {
                dot += f64::from(*x) * f64::from(*y);
                na += f64::from(*x).powi(2);
                nb += f64::from(*y).powi(2);
            }
        }
    }
    let cosine = dot / (na.sqrt() * nb.sqrt());
    assert!(cosine > 0.95, "cosine of the lora_B updates {cosine}");
}

fn resume() -> RunOptions {
    RunOptions {
        resume: true,
        overwrite: false,
        ..RunOptions::default()
    }
}

/// Stops a run after step `at`, before any checkpoint of that step (as a kill would).
struct StopAtStep(usize);

impl hone_train::Observer for StopAtStep {
    fn on_event(&mut self, event: &hone_train::Event<'_>) -> hone_train::Control {
        match event {
            hone_train::Event::Step { step, .. } if *step == self.0 => hone_train::Control::Stop,
            _ => hone_train::Control::Continue,
        }
    }
}

/// Steps of the lines of `metrics.jsonl` that hold `key`.
fn logged_steps(run_dir: &Path, key: &str) -> Vec<u64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get(key).is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

/// Regression: the checkpoint stores the modules `all-linear` expands to, the config says
/// `["all-linear"]`, and resuming compared the two literally: every shipped config failed.
#[test]
fn an_all_linear_run_resumes_to_the_uninterrupted_adapter() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 6\nsave_every = 2";
    let sets = ["lora.target_modules=[\"all-linear\"]"];
    let whole = run(
        &config(&data, &tmp.path().join("whole"), extra, &sets),
        RunOptions::default(),
    )
    .unwrap();
    let split = config(&data, &tmp.path().join("split"), extra, &sets);
    train_on::<Ad>(
        &split,
        RunOptions::default(),
        &mut StopAfter(4),
        Default::default(),
    )
    .unwrap();
    let resumed = run(&split, resume()).unwrap();
    assert_eq!(resumed.resumed_from, Some(4));
    let file = |s: &RunSummary| {
        std::fs::read(
            s.adapter_dir
                .as_ref()
                .unwrap()
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(file(&whole), file(&resumed), "bitwise the same adapter");
}

#[test]
fn a_checkpoint_with_other_lora_settings_is_reported_in_config_keys() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 12);
    let extra = "max_steps = 2\nsave_every = 2";
    let all = config(
        &data,
        &tmp.path().join("run"),
        extra,
        &["lora.target_modules=[\"all-linear\"]"],
    );
    run(&all, RunOptions::default()).unwrap();
    let step = all.run_dir().join("step-2");
    let mut model =
        hone_model::load_model_dir::<Ad>(&stories260k(), &Default::default(), Default::default())
            .unwrap()
            .model;
    let adamw = hone_train::AdamWConfig::default();
    // The same settings load.
    hone_train::checkpoint::load_checkpoint(&step, &mut model, &all.lora.settings(), adamw)
        .unwrap();
    let mut other = all.lora.settings();
    other.r = 16;
    other.target_modules = hone_model::lora::TargetModules::Names(vec!["q_proj".into()]);
    let err =
        hone_train::checkpoint::load_checkpoint(&step, &mut model, &other, adamw).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, TrainError::AdapterMismatch { .. }),
        "{message}"
    );
    assert!(
        message.contains("lora.r: checkpoint 4, config 16"),
        "{message}"
    );
    assert!(
        message.contains(
            "lora.target_modules: checkpoint adapts down_proj, gate_proj, k_proj, o_proj, \
             q_proj, up_proj, v_proj in layers 0-4, config adapts q_proj in layers 0-4"
        ),
        "{message}"
    );
    assert!(
        !message.contains("LoraSettings"),
        "no Debug dump: {message}"
    );
}

#[test]
fn metrics_hold_each_step_once_after_resuming() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    let extra = "max_steps = 8\nsave_every = 4\nlog_every = 1\neval_every = 4";
    let config = config(&data, &tmp.path().join("run"), extra, &[]);
    let dir = config.run_dir();
    // Stopped at step 3, before the first checkpoint: the resumed run starts from scratch and
    // logs steps 0..=3 again.
    let first = train_on::<Ad>(
        &config,
        RunOptions::default(),
        &mut StopAtStep(3),
        Default::default(),
    )
    .unwrap();
    assert!(!first.completed);
    assert_eq!(logged_steps(&dir, "train/loss"), [1, 2, 3]);
    // Stopped after step 6 (checkpoint at 4), then resumed to the end.
    train_on::<Ad>(&config, resume(), &mut StopAtStep(6), Default::default()).unwrap();
    assert_eq!(logged_steps(&dir, "train/loss"), [1, 2, 3, 4, 5, 6]);
    let done = run(&config, resume()).unwrap();
    assert_eq!(done.resumed_from, Some(4));
    assert_eq!(
        logged_steps(&dir, "train/loss"),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(logged_steps(&dir, "eval/loss"), [0, 4, 8]);
    // Resumed from the final checkpoint: the final evaluation (logged before that checkpoint)
    // is not logged again, but still reported.
    let again = run(&config, resume()).unwrap();
    assert_eq!(again.resumed_from, Some(8));
    assert_eq!(logged_steps(&dir, "eval/loss"), [0, 4, 8]);
    assert_eq!(again.last_eval.unwrap().loss, done.last_eval.unwrap().loss);
}

#[test]
fn the_logging_window_survives_a_resume() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 24);
    // A checkpoint at step 3 in the middle of a logging window of 4 steps.
    let extra = "max_steps = 8\nsave_every = 3\nlog_every = 4";
    let whole = run(
        &config(&data, &tmp.path().join("whole"), extra, &[]),
        RunOptions::default(),
    )
    .unwrap();
    let split = config(&data, &tmp.path().join("split"), extra, &[]);
    train_on::<Ad>(
        &split,
        RunOptions::default(),
        &mut StopAfter(3),
        Default::default(),
    )
    .unwrap();
    run(&split, resume()).unwrap();
    let loss_at = |dir: &Path, step: u64| -> f64 {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["step"] == step && v.get("train/loss").is_some())
            .unwrap()["train/loss"]
            .as_f64()
            .unwrap()
    };
    // Equal up to the JSON round trip of the checkpoint's loss sum; without the window the
    // resumed run averaged step 4 alone.
    let (a, b) = (loss_at(&whole.run_dir, 4), loss_at(&split.run_dir(), 4));
    assert!(
        (a - b).abs() <= 1e-12 * a.abs(),
        "train/loss at step 4: {a} vs {b}"
    );
}

/// Regression: a setup failure left `config.toml`, and the corrected command was refused
/// ("holds a run already") until `--overwrite`.
#[test]
fn a_failed_setup_leaves_no_run_behind() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let good = write_data(tmp.path(), 12);
    // Records without the alpaca fields: curation keeps nothing, after the run directory
    // was created.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"\"}\n{\"text\": \"\"}\n").unwrap();
    let out = tmp.path().join("run");
    let failing = config(&bad, &out, "max_steps = 2", &[]);
    assert!(run(&failing, RunOptions::default()).is_err());
    assert!(out.is_dir(), "the failure came after the directory existed");
    assert!(!out.join("config.toml").exists());
    // The corrected command runs, with or without --resume.
    run(&config(&good, &out, "max_steps = 2", &[]), resume()).unwrap();
    assert!(out.join("config.toml").is_file());
}

#[test]
fn config_errors_found_at_start_name_the_key_and_create_nothing() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 12);
    let out = tmp.path().join("run");
    let cases: [(&[&str], &str); 4] = [
        (
            &["tokenize.max_seq_len=2048"],
            "tokenize.max_seq_len = 2048 exceeds the model's context (max_position_embeddings = 512",
        ),
        (
            &["train.micro_batch_size=100000000"],
            "train.micro_batch_size = 100000000",
        ),
        (
            &["data.inputs=[\"no/such/data.jsonl\"]"],
            "data.inputs: data path no/such/data.jsonl (relative paths resolve against the working directory",
        ),
        (
            &["model.path=no/such/model"],
            "model.path: model directory or GGUF file no/such/model",
        ),
    ];
    for (sets, wanted) in cases {
        let message = run(
            &config(&data, &out, "max_steps = 1", sets),
            RunOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains(wanted), "{sets:?}: {message}");
        assert!(!out.exists(), "{sets:?} created the run directory");
    }
}

#[test]
fn a_second_run_on_a_locked_directory_is_refused_naming_the_holder() {
    let _guard = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 12);
    let out = tmp.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let held = hone_train::lock::RunLock::acquire(&out).unwrap();
    let err = run(
        &config(&data, &out, "max_steps = 1", &[]),
        RunOptions::default(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, TrainError::RunLocked { .. })
            && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(held);
    run(
        &config(&data, &out, "max_steps = 1", &[]),
        RunOptions::default(),
    )
    .unwrap();
}
