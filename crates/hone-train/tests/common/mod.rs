//! Shared helpers: a tiny alpaca-style data set and run configs on the shipped stories260k.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hone_train::{Control, Event, Observer, RunConfig};

/// Burn's CPU backend has one global random generator: runs that check determinism must not
/// overlap with other runs of the same test binary.
static RNG_LOCK: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn stories260k() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../checkpoints/base/stories260k")
}

const NAMES: [&str; 8] = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna", "Sam", "Mia"];
const THINGS: [&str; 8] = ["ball", "cat", "tree", "cake", "boat", "dog", "hat", "kite"];

/// Writes `n` instruction/output records to `dir/data.jsonl`.
pub fn write_data(dir: &Path, n: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        let name = NAMES[i % NAMES.len()];
        let thing = THINGS[(i / NAMES.len() + i) % THINGS.len()];
        let line = serde_json::json!({
            "instruction": format!("Tell me a story about {name}."),
            "output": format!("{name} had a {thing}. {name} was happy. {i}"),
        });
        text.push_str(&(line.to_string() + "\n"));
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// A small run config over `data` writing to `out`.
pub fn config_text(data: &Path, out: &Path) -> String {
    format!(
        r#"
[model]
path = {model:?}

[data]
inputs = [{data:?}]

[data.split]
val_fraction = 0.2

[data.dedupe.near]
enabled = false

[tokenize]
template = "alpaca"
max_seq_len = 128
packing = false

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]

[train]
lr = 5e-3
schedule = "cosine"
warmup_steps = 2
micro_batch_size = 2

[output]
dir = {out:?}
"#,
        model = stories260k().display().to_string(),
        data = data.display().to_string(),
        out = out.display().to_string(),
    )
}

/// `key = value` lines as `--set` overrides: `train.key`, or `table.key` as written when the key
/// is dotted (`distributed.nodes = 2`).
pub fn overrides(lines: &str) -> Vec<String> {
    lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            let k = k.trim();
            if k.contains('.') {
                format!("{k}={}", v.trim())
            } else {
                format!("train.{k}={}", v.trim())
            }
        })
        .collect()
}

/// The config of [`config_text`] with `train_extra` lines (`key = value`) as `train.` overrides
/// (see [`overrides`]), then `sets`.
pub fn config(data: &Path, out: &Path, train_extra: &str, sets: &[&str]) -> RunConfig {
    let mut all = overrides(train_extra);
    all.extend(sets.iter().map(|s| s.to_string()));
    RunConfig::from_toml_str(
        &config_text(data, out),
        "test.toml",
        Some("test".into()),
        &all,
    )
    .unwrap()
}

/// The f32 values of every tensor of an adapter directory, by key.
pub fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let store =
        hone_model::WeightStore::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    store
        .names()
        .into_iter()
        .map(|k| {
            let shape = store.shape(&k).unwrap();
            let v = store.load_f32(&k, &shape).unwrap();
            (k, v)
        })
        .collect()
}

pub fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// Stops a run after the checkpoint of step `at` (as an interruption would).
pub struct StopAfter(pub usize);

impl Observer for StopAfter {
    fn on_event(&mut self, event: &Event<'_>) -> Control {
        match event {
            Event::Checkpoint { step, .. } if *step == self.0 => Control::Stop,
            _ => Control::Continue,
        }
    }
}
