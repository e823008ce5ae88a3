//! Shared loading of the golden chat-template fixtures (`tests/fixtures/chat_templates`), which
//! hold renderings produced by Hugging Face transformers (see the README there).

#![allow(dead_code)]

use std::path::PathBuf;

use hone_tokenize::{ChatTemplate, ExtraContext, Message, SpecialTokens};
use serde::Deserialize;

/// The template folders, each with `tokenizer_config.json` and `cases.json`.
pub const FOLDERS: [&str; 5] = [
    "chatml",
    "gemma-2-it",
    "llama-3.2-instruct",
    "mistral-nemo-instruct-2407",
    "smollm2-style-chatml-default-system",
];

/// One entry of `cases.json`; `template` and `special_tokens` only in `jinja2_reference`, whose
/// cases each carry their own template.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub special_tokens: SpecialTokens,
    pub messages: Vec<Message>,
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub extra_context: ExtraContext,
    pub expected: Option<String>,
    pub expected_error: Option<String>,
    pub expected_error_type: Option<String>,
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

pub fn load_template(folder: &str) -> ChatTemplate {
    let path = fixtures_dir().join(folder).join("tokenizer_config.json");
    ChatTemplate::from_tokenizer_config_file(&path, None)
        .unwrap_or_else(|e| panic!("{folder}: cannot load template: {e}"))
}

pub fn load_cases(folder: &str) -> Vec<Case> {
    load_cases_from(fixtures_dir().join(folder).join("cases.json"))
}

pub fn load_cases_from(path: PathBuf) -> Vec<Case> {
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A diff-friendly account of two strings that should be equal.
pub fn describe_mismatch(expected: &str, actual: &str) -> String {
    let at = expected
        .char_indices()
        .zip(actual.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| expected.len().min(actual.len()));
    let context_start = expected[..at]
        .char_indices()
        .rev()
        .nth(30)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let tail = |s: &str| -> String { s.get(at..).unwrap_or("").chars().take(60).collect() };
    format!(
        "first difference at byte {at} (after {:?})\n    expected: {:?}\n    actual:   {:?}\n  \
         full expected: {expected:?}\n  full actual:   {actual:?}",
        &expected[context_start..at],
        tail(expected),
        tail(actual),
    )
}

/// The small byte-level BPE tokenizers shipped with the PEFT fixtures (`fixtures/peft/*`):
/// `llama_gqa` (Llama-3 style: `<|begin_of_text|>`, `<|end_of_text|>`, `<|pad|>`; its
/// post-processor prepends BOS) and `qwen2_tied` (`<|endoftext|>`, `<|im_start|>`,
/// `<|im_end|>`; no BOS).
///
/// Their 509-token vocabularies lack most chat markers. `markers` are added as special tokens
/// (as a model of the template's family has them) when missing, so that templates of other
/// families can be tested with a real tokenizer; each test says which it adds.
pub fn fixture_tokenizer(name: &str, markers: &[&str]) -> tokenizers::Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
        .join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
    let missing: Vec<tokenizers::AddedToken> = markers
        .iter()
        .filter(|m| tokenizer.token_to_id(m).is_none())
        .map(|m| tokenizers::AddedToken::from(*m, true))
        .collect();
    tokenizer.add_special_tokens(&missing);
    tokenizer
}

/// The directory of a PEFT fixture model (for its `tokenizer_config.json`).
pub fn fixture_model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}
