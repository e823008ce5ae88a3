//! A GGUF file's metadata as the non-weight files of a Hugging Face model directory, so that a
//! model read from GGUF (merged with adapters by `hone merge`) can be written in Hugging Face's
//! layout: `config.json` (the `{arch}.*` hyperparameters, [`super::model::hf_config`]),
//! `tokenizer.json` (the `tokenizer.ggml.*` vocabulary, [`super::tokenizer::tokenizer_spec`]),
//! `tokenizer_config.json` (special tokens, `add_bos_token`, the chat template of
//! `tokenizer.chat_template` and llama.cpp's named templates) and `generation_config.json`
//! (BOS/EOS/padding ids; EOS lists the end-of-turn token too, so generation stops at the end of
//! a turn). transformers and hone load the directory as they load the GGUF file.

use serde_json::{json, Map, Value as Json};

use super::{tokenizer, GgufFile, Value};
use crate::error::Result;

/// llama.cpp's default template key and the key listing the names of the others.
const TEMPLATE_KEY: &str = "tokenizer.chat_template";
const TEMPLATE_NAMES_KEY: &str = "tokenizer.chat_templates";

/// The chat template(s) of `file`: one string, or `[{"name", "template"}, ...]` when llama.cpp's
/// named templates are present (the unnamed one as `default`, as transformers lists them).
fn chat_template(file: &GgufFile) -> Result<Option<Json>> {
    let default = match file.get(TEMPLATE_KEY) {
        None => None,
        Some(_) => Some(file.get_str(TEMPLATE_KEY)?.to_string()),
    };
    let names: Vec<String> = match file.get(TEMPLATE_NAMES_KEY) {
        None => Vec::new(),
        Some(_) => file
            .get_array(TEMPLATE_NAMES_KEY)?
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
    };
    if names.is_empty() {
        return Ok(default.map(Json::from));
    }
    let mut list = Vec::new();
    if let Some(text) = default {
        list.push(json!({"name": "default", "template": text}));
    }
    for name in names {
        let key = format!("{TEMPLATE_KEY}.{name}");
        let text = file.get_str(&key)?;
        list.push(json!({"name": name, "template": text}));
    }
    Ok(Some(Json::Array(list)))
}

/// `(file name, JSON document)` of `config.json` (declaring `torch_dtype`), `tokenizer.json`,
/// `tokenizer_config.json` and `generation_config.json` for the model in `file`.
pub fn hf_files(file: &GgufFile, torch_dtype: &str) -> Result<Vec<(&'static str, Json)>> {
    let mut files = vec![("config.json", super::model::hf_config(file, torch_dtype)?)];
    files.extend(hf_tokenizer_files(file)?);
    Ok(files)
}

/// `(file name, JSON document)` of `tokenizer.json`, `tokenizer_config.json` and
/// `generation_config.json` for the tokenizer in `file` (a vocabulary-only GGUF will do).
pub fn hf_tokenizer_files(file: &GgufFile) -> Result<Vec<(&'static str, Json)>> {
    let spec = tokenizer::tokenizer_spec(file)?;
    let context = file
        .get_str("general.architecture")
        .ok()
        .and_then(|arch| file.get(&format!("{arch}.context_length")))
        .and_then(Value::as_u64);
    let text = |t: &Option<tokenizer::SpecialToken>| {
        t.as_ref()
            .map(|t| Json::from(t.text.as_str()))
            .unwrap_or(Json::Null)
    };
    let mut tok_config = Map::new();
    tok_config.insert("add_bos_token".into(), json!(spec.add_bos));
    tok_config.insert("add_eos_token".into(), json!(spec.add_eos));
    tok_config.insert("bos_token".into(), text(&spec.bos));
    tok_config.insert("eos_token".into(), text(&spec.eos));
    tok_config.insert("unk_token".into(), text(&spec.unk));
    tok_config.insert("pad_token".into(), text(&spec.pad));
    tok_config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(n) = context {
        tok_config.insert("model_max_length".into(), json!(n));
    }
    tok_config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(template) = chat_template(file)? {
        tok_config.insert("chat_template".into(), template);
    }

    let mut generation = Map::new();
    if let Some(bos) = &spec.bos {
        generation.insert("bos_token_id".into(), json!(bos.id));
    }
    match spec.eos_ids().as_slice() {
        [] => {}
        [one] => {
            generation.insert("eos_token_id".into(), json!(one));
        }
        many => {
            generation.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(pad) = &spec.pad {
        generation.insert("pad_token_id".into(), json!(pad.id));
    }
    Ok(vec![
        ("tokenizer.json", spec.document),
        ("tokenizer_config.json", Json::Object(tok_config)),
        ("generation_config.json", Json::Object(generation)),
    ])
}
