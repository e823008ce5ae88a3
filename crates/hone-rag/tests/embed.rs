//! The sentence embedder against sentence-transformers: reference token ids and embeddings
//! written by `scripts/bert_fixture.py` (sentence-transformers 6.3, transformers 5.25, torch
//! 2.15) for the tiny random BERT in `fixtures/bert/tiny` and for the real all-MiniLM-L6-v2
//! (checked when `scripts/fetch-models.sh minilm` has fetched it, else reported SKIPPED).

mod common;
use common::{copy_dir, root};

use hone_rag::embed::fingerprint;
use hone_rag::{RagError, SentenceEmbedder};
use serde::Deserialize;

#[derive(Deserialize)]
struct Refs {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn refs(name: &str) -> Refs {
    let path = root().join("fixtures/bert").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Largest absolute difference between hone's embeddings and the references.
fn check(embedder: &SentenceEmbedder, refs: &Refs, tolerance: f32) -> f32 {
    let texts: Vec<&str> = refs.sentences.iter().map(String::as_str).collect();
    let ids = embedder.token_ids(&texts).unwrap();
    assert_eq!(ids, refs.input_ids, "token ids differ from transformers'");
    let out = embedder.embed(&texts).unwrap();
    assert_eq!(out.rows(), texts.len());
    let mut worst = 0.0f32;
    for (i, want) in refs.embeddings.iter().enumerate() {
        let got = out.row(i);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs());
        }
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {i} has norm {norm}");
    }
    assert!(
        worst < tolerance,
        "max |hone - sentence-transformers| = {worst:e} (tolerance {tolerance:e})"
    );
    worst
}

#[test]
fn tiny_bert_embeddings_equal_sentence_transformers() {
    let dir = root().join("fixtures/bert/tiny");
    let refs = refs("tiny.refs.json");
    // Batches of 3 mix lengths (padding and masks matter); batches of 1 have no padding.
    for batch in [3, 1, 32] {
        let embedder = SentenceEmbedder::load(&dir).unwrap().with_batch_size(batch);
        assert_eq!(embedder.dim(), 32);
        let worst = check(&embedder, &refs, 1e-4);
        eprintln!("tiny BERT, batch {batch}: max abs difference {worst:e}");
    }
}

#[test]
fn real_minilm_embeddings_equal_sentence_transformers() {
    let dir = root().join("checkpoints/base/all-minilm-l6-v2");
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "SKIPPED: {} not fetched (scripts/fetch-models.sh minilm)",
            dir.display()
        );
        return;
    }
    let embedder = SentenceEmbedder::load(&dir).unwrap();
    assert_eq!(embedder.dim(), 384);
    assert_eq!(embedder.settings().max_seq_len, 256);
    let worst = check(&embedder, &refs("minilm.refs.json"), 1e-4);
    eprintln!("all-MiniLM-L6-v2: max abs difference {worst:e}");
}

#[test]
fn bad_embedder_directories_are_errors_naming_the_file_key_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    copy_dir(&root().join("fixtures/bert/tiny"), &dir);
    let message = |e: RagError| e.to_string();

    // Unsupported pooling: the key and the file are named.
    let pooling = dir.join("1_Pooling/config.json");
    let original = std::fs::read(&pooling).unwrap();
    std::fs::write(
        &pooling,
        r#"{"embedding_dimension": 32, "pooling_mode": "cls"}"#,
    )
    .unwrap();
    let e = message(SentenceEmbedder::load(&dir).unwrap_err());
    assert!(
        e.contains("1_Pooling/config.json") && e.contains("pooling_mode"),
        "{e}"
    );
    std::fs::write(&pooling, &original).unwrap();

    // A wrong architecture value.
    let config = dir.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\""),
    )
    .unwrap();
    let e = message(SentenceEmbedder::load(&dir).unwrap_err());
    assert!(e.contains("config.json") && e.contains("hidden_act"), "{e}");

    // A config that disagrees with the weights: the tensor and its shapes are named.
    std::fs::write(
        &config,
        original.replace("\"intermediate_size\": 64", "\"intermediate_size\": 48"),
    )
    .unwrap();
    let e = message(SentenceEmbedder::load(&dir).unwrap_err());
    assert!(
        e.contains("model.safetensors")
            && e.contains("encoder.layer.0.intermediate.dense.weight")
            && e.contains("[48, 32]")
            && e.contains("[64, 32]"),
        "{e}"
    );
    std::fs::write(&config, &original).unwrap();

    // Missing and corrupt files.
    std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
    let e = message(SentenceEmbedder::load(&dir).unwrap_err());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(dir.join("modules.json")).unwrap();
    let e = message(SentenceEmbedder::load(&dir).unwrap_err());
    assert!(e.contains("modules.json"), "{e}");
    let e = message(SentenceEmbedder::load(&tmp.path().join("absent")).unwrap_err());
    assert!(e.contains("absent"), "{e}");
}

#[test]
fn fingerprint_changes_with_the_weights_and_not_with_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a/tiny");
    let b = tmp.path().join("b/tiny");
    copy_dir(&root().join("fixtures/bert/tiny"), &a);
    copy_dir(&root().join("fixtures/bert/tiny"), &b);
    let fa = fingerprint(&a).unwrap();
    assert_eq!(fa.name, "tiny");
    assert_eq!(fa, fingerprint(&b).unwrap());
    let weights = b.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert_ne!(fa, fingerprint(&b).unwrap());
}
