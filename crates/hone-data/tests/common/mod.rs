//! Helpers shared by the integration tests: fixture files in a temp dir, config builders and
//! deterministic text generators.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hone_data::{DataConfig, Example, OnError, SourcedExample};

/// Writes `content` to `dir/name` and returns the path as a string.
pub fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write fixture");
    path.to_string_lossy().into_owned()
}

/// Writes JSON values as JSONL.
pub fn write_jsonl(dir: &Path, name: &str, rows: &[serde_json::Value]) -> String {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    write(dir, name, text)
}

/// A config reading `inputs` with every curation step that could remove test examples off,
/// except those a test turns on.
pub fn bare_config(inputs: &[String]) -> DataConfig {
    let mut c = DataConfig::new(inputs.iter().cloned());
    c.dedupe.exact = false;
    c.dedupe.near.enabled = false;
    c.split.val_fraction = 0.0;
    c.on_error = OnError::Fail;
    c
}

/// Deterministic pseudo-random generator (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `count` random words from a 2,000-word synthetic vocabulary ("w0".."w1999" spelled with
/// letters so they are single words).
pub fn random_words(rng: &mut Rng, count: usize) -> Vec<String> {
    (0..count).map(|_| word(rng.below(2000))).collect()
}

pub fn word(i: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut s = String::from("z");
    let mut n = i;
    loop {
        s.push(letters[n % 26] as char);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    s
}

/// The text of a raw-text example.
pub fn text_of(e: &SourcedExample) -> &str {
    match &e.example {
        Example::Text(text) => text,
        other => panic!("expected a text example, found {other:?}"),
    }
}

/// Lowercased word 3-gram set, computed independently of the crate.
pub fn trigrams(text: &str) -> std::collections::HashSet<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.windows(3).map(|w| w.join(" ")).collect()
}

pub fn jaccard(
    a: &std::collections::HashSet<String>,
    b: &std::collections::HashSet<String>,
) -> f64 {
    let inter = a.intersection(b).count() as f64;
    let union = a.union(b).count() as f64;
    if union == 0.0 {
        0.0
    } else {
        inter / union
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
