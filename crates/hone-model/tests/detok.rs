//! The incremental detokenizer ([`hone_model::detok::TextStream`]) against transformers'
//! `decode(ids, skip_special_tokens=True)` on the tokenizer corpora of `fixtures/gguf/`
//! (byte-level BPE: SmolLM2; SentencePiece with byte fallback: stories260k), token by token,
//! and against decoding in the prompt's context.

use std::path::PathBuf;

use hone_model::detok::{completion_text, TextStream};
use hone_model::gguf::tokenizer::tokenizer;
use hone_model::gguf::GgufFile;
use hone_model::Tokenizer;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn load(name: &str) -> (Tokenizer, Value) {
    let file = GgufFile::open(&fixture(&format!("{name}-tokenizer.gguf"))).unwrap();
    let tok = tokenizer(&file).unwrap();
    let text = std::fs::read_to_string(fixture(&format!("{name}-tokenizer.refs.json"))).unwrap();
    (tok, serde_json::from_str(&text).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn streamed_text_equals_transformers_decode_of_every_sample() {
    for name in ["smollm2", "stories260k"] {
        let (tok, refs) = load(name);
        let mut checked = 0;
        for s in refs["samples"].as_array().unwrap() {
            let all = ids(&s["ids"]);
            let want = s["decode_skip_special"].as_str().unwrap();
            // No prompt: the whole sequence streams one token at a time.
            let mut stream = TextStream::new(&[], &[]);
            let mut pieces = String::new();
            for &id in &all {
                let delta = stream.push(&tok, id);
                assert!(!delta.stopped);
                pieces.push_str(&delta.text);
            }
            pieces.push_str(&stream.finish(&tok));
            assert_eq!(pieces, want, "{name}: {:?}", s["text"]);
            assert_eq!(stream.text(), want);
            checked += 1;
        }
        assert!(checked >= 20, "{name}: the corpus shrank");
    }
}

#[test]
fn a_completion_decodes_in_the_context_of_its_prompt() {
    for name in ["smollm2", "stories260k"] {
        let (tok, refs) = load(name);
        let mut checked = 0;
        for s in refs["samples"].as_array().unwrap() {
            let plain = ids(&s["ids_no_special"]);
            if plain.len() < 4 {
                continue;
            }
            for split in [1, plain.len() / 2, plain.len() - 1] {
                let (prompt, generated) = plain.split_at(split);
                // Decoding the last prompt tokens with the completion, minus the prompt's
                // text: what the completion adds after the prompt.
                let context = &prompt[prompt.len().saturating_sub(4)..];
                let both = tok.decode(&plain[split - context.len()..]).unwrap();
                let alone = tok.decode(context).unwrap();
                // (A split inside a multi-byte character has no such prefix: skipped.)
                let Some(want) = both.strip_prefix(alone.as_str()) else {
                    continue;
                };
                let got = completion_text(&tok, prompt, generated, &[]);
                assert_eq!(got, want, "{name}: {:?} split at {split}", s["text"]);
                checked += 1;
            }
        }
        assert!(checked >= 40, "{name}: only {checked} splits checked");
    }
}

#[test]
fn stop_strings_cut_the_text_and_are_never_streamed() {
    let (tok, _) = load("smollm2");
    let prompt = tok.encode("Q:").unwrap();
    let generated = tok
        .encode("The capital of France is Paris.\n\nUser: and Spain?")
        .unwrap();
    let stops = vec!["\n\nUser:".to_string()];
    let mut stream = TextStream::new(&prompt, &stops);
    let mut pieces = String::new();
    let mut stopped = false;
    for &id in &generated {
        let delta = stream.push(&tok, id);
        pieces.push_str(&delta.text);
        assert!(!pieces.contains('\n') || delta.stopped || pieces.ends_with('.'));
        if delta.stopped {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "the stop string ends the stream");
    assert_eq!(pieces, "The capital of France is Paris.");
    assert_eq!(stream.text(), pieces);
    assert_eq!(
        completion_text(&tok, &prompt, &generated, &stops),
        "The capital of France is Paris."
    );
}
