//! The GGUF tokenizer metadata written from a Hugging Face tokenizer (`gguf::vocab`), against
//! files llama.cpp's own conversions wrote: a vocabulary-only GGUF is turned into Hugging Face's
//! files (`gguf::hf`, checked against transformers elsewhere) and back, and every `tokenizer.*`
//! key llama.cpp reads must come back as it was.

use std::path::{Path, PathBuf};

use hone_model::gguf::{hf, vocab, GgufFile, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn round_trip(name: &str, keys: &[&str]) {
    let file = GgufFile::open(&fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file_name, doc) in hf::hf_tokenizer_files(&file).unwrap() {
        std::fs::write(dir.path().join(file_name), doc.to_string()).unwrap();
    }
    let n = file.get_array("tokenizer.ggml.tokens").unwrap().len();
    let written = vocab::from_hf_dir(dir.path(), n, None).unwrap();
    let get = |key: &str| {
        written
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    for key in keys {
        let want = file.get(key).cloned();
        // llama.cpp writes token types as i32; a reader takes any integer type.
        let norm = |v: Option<Value>| match v {
            Some(Value::Array(items)) => Some(Value::Array(
                items
                    .into_iter()
                    .map(|i| match i.as_i64() {
                        Some(x) if !matches!(i, Value::F32(_)) => Value::I64(x),
                        _ => i,
                    })
                    .collect(),
            )),
            Some(v) => v.as_u64().map(Value::U64).or(Some(v)),
            None => None,
        };
        assert!(
            norm(get(key)) == norm(want.clone()),
            "{name}: {key} differs (written {:?}..., file {:?}...)",
            get(key).map(|v| format!("{v}").chars().take(120).collect::<String>()),
            want.map(|v| format!("{v}").chars().take(120).collect::<String>())
        );
    }
}

#[test]
fn smollm2s_byte_level_vocabulary_comes_back_with_its_pre_tokenizer() {
    round_trip(
        "smollm2-tokenizer.gguf",
        &[
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template",
        ],
    );
}

#[test]
fn a_sentencepiece_vocabulary_comes_back_with_its_scores_and_types() {
    round_trip(
        "stories260k-tokenizer.gguf",
        &[
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token",
        ],
    );
}

#[test]
fn an_unknown_byte_level_split_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = GgufFile::open(&fixture("smollm2-tokenizer.gguf")).unwrap();
    for (file_name, mut doc) in hf::hf_tokenizer_files(&file).unwrap() {
        if file_name == "tokenizer.json" {
            doc["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]});
        }
        std::fs::write(dir.path().join(file_name), doc.to_string()).unwrap();
    }
    let e = vocab::from_hf_dir(dir.path(), 49152, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("--tokenizer-pre"),
        "{e}"
    );
    let named = vocab::from_hf_dir(dir.path(), 49152, Some("smollm")).unwrap();
    assert!(named
        .metadata
        .iter()
        .any(|(k, v)| k == "tokenizer.ggml.pre" && v.as_str() == Some("smollm")));
}
