//! A GGUF model file's chat template and special tokens come from its metadata
//! (`tokenizer.chat_template`, `tokenizer.ggml.*_token_id`): rendering conversations with the
//! template of `fixtures/gguf/smollm2-tokenizer.gguf` (SmolLM2-135M-Instruct's metadata) gives
//! the text transformers' `apply_chat_template` gives on its GGUF tokenizer
//! (`smollm2-tokenizer.refs.json`, written by `scripts/gguf_tokenizer_refs.py`).

use std::path::{Path, PathBuf};

use hone_tokenize::{ChatTemplate, ExtraContext, Message, TemplateError, TemplateSource};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

#[test]
fn gguf_chat_template_renders_as_transformers() {
    let path = fixture("smollm2-tokenizer.gguf");
    renders_as_transformers(&path);
    // A TemplateSource resolves against the file as against a directory.
    let template = ChatTemplate::from_model_dir(&path, None).unwrap();
    let loaded = ChatTemplate::load(&TemplateSource::Model, &path).unwrap();
    assert_eq!(loaded.source(), template.source());
}

/// The Hugging Face files `hone merge` writes for a GGUF base (`tokenizer_config.json` with the
/// template and special tokens, ...) render as transformers renders the GGUF file.
#[test]
fn hugging_face_files_written_from_gguf_metadata_render_as_transformers() {
    let file = hone_model::gguf::GgufFile::open(&fixture("smollm2-tokenizer.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, document) in hone_model::gguf::hf::hf_files(&file, "float32").unwrap() {
        std::fs::write(dir.path().join(name), document.to_string()).unwrap();
    }
    renders_as_transformers(dir.path());
}

/// Renders every conversation of `smollm2-tokenizer.refs.json` with the template of `path` (a
/// GGUF file or a model directory) and checks text and special tokens against transformers.
fn renders_as_transformers(path: &Path) {
    let template = ChatTemplate::from_model_dir(path, None).unwrap();
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2-tokenizer.refs.json")).unwrap(),
    )
    .unwrap();
    let tokens = template.special_tokens();
    assert_eq!(tokens.bos_token.as_deref(), refs["bos_token"].as_str());
    assert_eq!(tokens.eos_token.as_deref(), refs["eos_token"].as_str());
    assert_eq!(tokens.unk_token.as_deref(), refs["unk_token"].as_str());
    assert_eq!(tokens.pad_token.as_deref(), refs["pad_token"].as_str());
    let cases = refs["chat"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = template
            .render(&messages, gen, &ExtraContext::new())
            .unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "{}: generation prompt {gen}",
            path.display()
        );
    }
}

#[test]
fn gguf_without_a_chat_template_is_an_error_naming_the_key() {
    // llama_gqa.gguf (a converted test checkpoint) carries no tokenizer.chat_template.
    let path = fixture("llama_gqa.gguf");
    let err = ChatTemplate::from_model_dir(&path, None).unwrap_err();
    assert!(
        matches!(err, TemplateError::MissingTemplate { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("llama_gqa.gguf") && text.contains("tokenizer.chat_template"),
        "{text}"
    );
    let err = ChatTemplate::from_model_dir(&path, Some("tool_use")).unwrap_err();
    assert!(
        matches!(err, TemplateError::UnknownTemplateName { .. }),
        "{err}"
    );
}

#[test]
fn a_corrupt_gguf_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00\x01").unwrap();
    let err = ChatTemplate::from_model_dir(&path, None).unwrap_err();
    assert!(matches!(err, TemplateError::Gguf(_)), "{err}");
    assert!(err.to_string().contains("broken.gguf"), "{err}");
}
