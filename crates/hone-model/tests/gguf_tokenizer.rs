//! GGUF tokenizers against transformers' GGUF loading (`AutoTokenizer.from_pretrained(dir,
//! gguf_file=...)`): `fixtures/gguf/{smollm2,stories260k}-tokenizer.gguf` (tensor-free GGUF
//! files holding a byte-level BPE and a SentencePiece vocabulary) and the ids, token strings and
//! decodes transformers gives on a corpus of accents, CJK, emoji, digits, code, whitespace and
//! special tokens (`*.refs.json`), all written by `scripts/gguf_tokenizer_refs.py`.

use std::path::{Path, PathBuf};

use hone_model::gguf::tokenizer::tokenizer;
use hone_model::gguf::GgufFile;
use hone_model::Tokenizer;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn refs(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Replays every sample of `refs` on `tok`; returns the mismatches, one line each.
fn replay(tok: &Tokenizer, refs: &Value) -> Vec<String> {
    let inner = tok.inner();
    let mut bad = Vec::new();
    let samples = refs["samples"].as_array().unwrap();
    assert!(samples.len() >= 20, "the corpus shrank");
    for s in samples {
        let text = s["text"].as_str().unwrap();
        let want = ids(&s["ids"]);
        let got = tok.encode(text).unwrap();
        if got != want {
            bad.push(format!("{text:?}: ids {got:?}, transformers {want:?}"));
        }
        let want_plain = ids(&s["ids_no_special"]);
        let enc = inner.encode(text, false).unwrap();
        let got_plain = enc.get_ids().to_vec();
        if got_plain != want_plain {
            bad.push(format!(
                "{text:?}: ids without special tokens {got_plain:?}, transformers {want_plain:?}"
            ));
        }
        let want_tokens: Vec<&str> = s["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if enc.get_tokens() != want_tokens.as_slice() {
            bad.push(format!(
                "{text:?}: tokens {:?}, transformers {want_tokens:?}",
                enc.get_tokens()
            ));
        }
        let decoded = inner.decode(&want_plain, false).unwrap();
        if decoded != s["decode"].as_str().unwrap() {
            bad.push(format!(
                "{text:?}: decodes to {decoded:?}, transformers {:?}",
                s["decode"]
            ));
        }
        let skipped = tok.decode(&want).unwrap();
        if skipped != s["decode_skip_special"].as_str().unwrap() {
            bad.push(format!(
                "{text:?}: decodes (special tokens skipped) to {skipped:?}, transformers {:?}",
                s["decode_skip_special"]
            ));
        }
    }
    bad
}

fn special_ids_match(tok: &Tokenizer, refs: &Value) {
    let id = |key: &str| {
        refs[key]
            .as_str()
            .map(|t| tok.inner().token_to_id(t).unwrap())
    };
    assert_eq!(tok.bos_id, id("bos_token"), "BOS");
    assert_eq!(tok.eos_ids.first().copied(), id("eos_token"), "EOS");
}

#[test]
fn smollm2_byte_level_tokenizer_gives_transformers_ids() {
    let file = GgufFile::open(&fixture("smollm2-tokenizer.gguf")).unwrap();
    assert!(file.tensors().is_empty(), "the fixture is metadata only");
    let tok = tokenizer(&file).unwrap();
    let refs = refs("smollm2-tokenizer.refs.json");
    special_ids_match(&tok, &refs);
    let bad = replay(&tok, &refs);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn sentencepiece_tokenizer_gives_transformers_ids() {
    let file = GgufFile::open(&fixture("stories260k-tokenizer.gguf")).unwrap();
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert!(
        file.get("tokenizer.ggml.merges").is_none(),
        "the fixture must make hone recover the merges from the scores"
    );
    let tok = tokenizer(&file).unwrap();
    let refs = refs("stories260k-tokenizer.refs.json");
    special_ids_match(&tok, &refs);
    let bad = replay(&tok, &refs);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The same vocabulary as llama.cpp's own `convert_hf_to_gguf.py --vocab-only` writes it from
/// a tokenizer.json (every score -1000, no `add_space_prefix`): the merges come from ties, so
/// their order rests on the token lengths and vocabulary order alone, and the ids differ from
/// the fixture above on two samples. transformers' ids are still the reference.
#[test]
fn sentencepiece_tokenizer_from_llama_cpps_converter_gives_transformers_ids() {
    let file = GgufFile::open(&fixture("stories260k-llamacpp-tokenizer.gguf")).unwrap();
    let scores = file.get_array("tokenizer.ggml.scores").unwrap();
    assert!(scores.iter().all(|s| s.as_f64() == Some(-1000.0)));
    let tok = tokenizer(&file).unwrap();
    let refs = refs("stories260k-llamacpp-tokenizer.refs.json");
    special_ids_match(&tok, &refs);
    let bad = replay(&tok, &refs);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// `hone merge` writes a GGUF base's tokenizer as Hugging Face files (`gguf::hf::hf_files`):
/// loaded back from that directory, both vocabularies give transformers' ids, and BOS/EOS are
/// the same.
#[test]
fn tokenizer_files_written_from_gguf_metadata_give_transformers_ids() {
    for (gguf, refs_name) in [
        ("smollm2-tokenizer.gguf", "smollm2-tokenizer.refs.json"),
        (
            "stories260k-tokenizer.gguf",
            "stories260k-tokenizer.refs.json",
        ),
    ] {
        let file = GgufFile::open(&fixture(gguf)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = hone_model::gguf::hf::hf_tokenizer_files(&file).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json"
            ]
        );
        for (name, document) in files {
            std::fs::write(dir.path().join(name), document.to_string()).unwrap();
        }
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let refs = refs(refs_name);
        special_ids_match(&tok, &refs);
        let bad = replay(&tok, &refs);
        assert!(
            bad.is_empty(),
            "{gguf}: {} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
        let from_gguf = tokenizer(&file).unwrap();
        assert_eq!(tok.eos_ids, from_gguf.eos_ids, "{gguf}");
    }
}
