//! A Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`,
//! `chat_template.jinja`) as the `tokenizer.*` metadata of a GGUF file, in the two forms
//! llama.cpp reads, as its `convert_hf_to_gguf.py` writes them:
//!
//! * byte-level BPE (`tokenizer.ggml.model = gpt2`): tokens in id order, token types (normal;
//!   control for special added tokens; user-defined for the other added tokens; unused for ids
//!   the tokenizer does not fill up to the model's vocabulary size, spelled `[PADn]`), the merges
//!   as `"a b"`, and `tokenizer.ggml.pre` naming the pre-tokenizer, recognised from
//!   `tokenizer.json`'s normalizer and pre-tokenizer (the forms of [`super::tokenizer`]'s
//!   `PRE_TOKENIZERS`; anything else is refused unless a name is given);
//! * SentencePiece BPE with byte fallback (`llama`): tokens, scores (minus the id, the merge
//!   order of a SentencePiece BPE vocabulary; -1000 for control and unknown tokens), types
//!   (`<0xNN>` byte, the unknown token, control), `add_space_prefix` when the tokenizer prepends
//!   `▁` to the text.
//!
//! Then the BOS/EOS/unknown/padding ids, whether BOS/EOS are added, the chat template, and an
//! end-of-turn id (`tokenizer.ggml.eot_token_id`) when the template ends turns with a token of
//! the vocabulary other than EOS, so llama.cpp stops generating at the end of an answer.

use std::path::Path;

use serde_json::Value as Json;

use super::tokenizer::{pre_tokenizer_json, CONTROL, PRE_TOKENIZERS, USER_DEFINED};
use super::Value;
use crate::error::{ModelError, Result};

const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const UNUSED: i64 = 5;
const BYTE: i64 = 6;

/// End-of-turn tokens of the common chat template families (ChatML, Llama 3, Gemma, Phi-3,
/// Command-R), in the order they are looked for.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|END_OF_TURN_TOKEN|>",
];

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub text: String,
    pub id: u32,
}

/// The tokenizer metadata for a GGUF file, and what it says.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.*` keys in the order written.
    pub metadata: Vec<(String, Value)>,
    pub bos: Option<Special>,
    pub eos: Option<Special>,
    /// The end-of-turn token of the chat template, when it is not EOS.
    pub eot: Option<Special>,
    /// Where the chat template came from (`tokenizer_config.json`, `chat_template.jinja`), if any.
    pub template_source: Option<String>,
    /// The chat template (the default one when there are several).
    pub template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        cause: e,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            key: "(file)".into(),
            message: format!("not valid JSON: {e}"),
        })
}

fn unsupported(path: &Path, what: &'static str, found: String, supported: &str) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        what,
        found,
        supported: supported.to_string(),
    }
}

/// A token named by `tokenizer_config.json` (a string, or an object with `content`).
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A pre-tokenizer or normalizer with what does not change ids left out (`trim_offsets`), and a
/// sequence of one unwrapped, so that equal splits compare equal.
fn signature(j: &Json) -> Json {
    match j {
        Json::Object(o) => {
            let kind = o.get("type").and_then(Json::as_str).unwrap_or("");
            let list = o.get("pretokenizers").or_else(|| o.get("normalizers"));
            if kind == "Sequence" {
                if let Some(Json::Array(items)) = list {
                    if items.len() == 1 {
                        return signature(&items[0]);
                    }
                    return Json::Array(items.iter().map(signature).collect());
                }
            }
            let mut out = serde_json::Map::new();
            for (k, v) in o {
                if k != "trim_offsets" {
                    out.insert(k.clone(), v.clone());
                }
            }
            Json::Object(out)
        }
        other => other.clone(),
    }
}

/// The `tokenizer.ggml.pre` name of a byte-level tokenizer's split, from its normalizer and
/// pre-tokenizer.
fn pre_name(path: &Path, doc: &Json) -> Result<&'static str> {
    let normalizer = signature(&doc["normalizer"]);
    let pre = signature(&doc["pre_tokenizer"]);
    for (name, _) in PRE_TOKENIZERS {
        let (n, p) = pre_tokenizer_json(name).expect("every listed name has a form");
        if signature(&n) == normalizer && signature(&p) == pre {
            return Ok(name);
        }
    }
    Err(unsupported(
        path,
        "byte-level pre-tokenizer (no tokenizer.ggml.pre name known for it)",
        format!("normalizer {normalizer}, pre-tokenizer {pre}"),
        &format!(
            "the splits of {} (give the name llama.cpp uses for this tokenizer with \
             --tokenizer-pre)",
            PRE_TOKENIZERS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Whether `processor` (a `TemplateProcessing`, possibly inside a `Sequence`) puts `token` first
/// (`first`) or last in a single sequence.
fn processor_adds(processor: &Json, token: &str, first: bool) -> bool {
    if let Some(list) = processor.get("processors").and_then(Json::as_array) {
        return list.iter().any(|p| processor_adds(p, token, first));
    }
    let Some(single) = processor.get("single").and_then(Json::as_array) else {
        return false;
    };
    let piece = if first { single.first() } else { single.last() };
    piece
        .and_then(|p| p.get("SpecialToken"))
        .and_then(|s| s.get("id"))
        .and_then(Json::as_str)
        == Some(token)
}

/// The chat template of `dir`: `chat_template.jinja`, else `tokenizer_config.json`'s
/// A chat template's GGUF metadata entries, its default text and where it came from.
type TemplateMetadata = (Vec<(String, Value)>, Option<String>, Option<String>);

/// `chat_template` (a string, or named templates); `(metadata, default text, source)`.
fn chat_template(dir: &Path, config: Option<&Json>) -> Result<TemplateMetadata> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| ModelError::Io {
            path: jinja.clone(),
            cause: e,
        })?;
        return Ok((
            vec![(
                "tokenizer.chat_template".into(),
                Value::String(text.clone()),
            )],
            Some(text),
            Some("chat_template.jinja".into()),
        ));
    }
    let source = Some("tokenizer_config.json".to_string());
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Json::Null) => Ok((Vec::new(), None, None)),
        Some(Json::String(text)) => Ok((
            vec![(
                "tokenizer.chat_template".into(),
                Value::String(text.clone()),
            )],
            Some(text.clone()),
            source,
        )),
        Some(Json::Array(list)) => {
            let mut meta = Vec::new();
            let mut names = Vec::new();
            let mut default = None;
            for item in list {
                let (Some(name), Some(text)) = (
                    item.get("name").and_then(Json::as_str),
                    item.get("template").and_then(Json::as_str),
                ) else {
                    return Err(ModelError::InvalidConfig {
                        path: dir.join("tokenizer_config.json"),
                        key: "chat_template".into(),
                        message: "expected a string or a list of {name, template}".into(),
                    });
                };
                if name == "default" {
                    default = Some(text.to_string());
                } else {
                    names.push(Value::String(name.to_string()));
                    meta.push((
                        format!("tokenizer.chat_template.{name}"),
                        Value::String(text.to_string()),
                    ));
                }
            }
            let mut out = Vec::new();
            if let Some(text) = &default {
                out.push((
                    "tokenizer.chat_template".into(),
                    Value::String(text.clone()),
                ));
            }
            if !names.is_empty() {
                out.push(("tokenizer.chat_templates".into(), Value::Array(names)));
                out.extend(meta);
            }
            Ok((out, default, source))
        }
        Some(_) => Err(ModelError::InvalidConfig {
            path: dir.join("tokenizer_config.json"),
            key: "chat_template".into(),
            message: "expected a string or a list of {name, template}".into(),
        }),
    }
}

/// The GGUF tokenizer metadata of the Hugging Face model directory `dir`, for a model of
/// `vocab_size` rows; `pre` overrides the recognised `tokenizer.ggml.pre`.
pub fn from_hf_dir(dir: &Path, vocab_size: usize, pre: Option<&str>) -> Result<GgufVocab> {
    let path = dir.join("tokenizer.json");
    let doc = read_json(&path)?.ok_or_else(|| ModelError::MissingFile { path: path.clone() })?;
    let model = &doc["model"];
    let kind = model["type"].as_str().unwrap_or("(none)");
    if kind != "BPE" {
        return Err(unsupported(
            &path,
            "tokenizer model (model.type) for GGUF export",
            kind.to_string(),
            "BPE (byte-level, or SentencePiece-style with byte fallback)",
        ));
    }
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let byte_level = doc.to_string().contains("\"ByteLevel\"");
    if !byte_fallback && !byte_level {
        return Err(unsupported(
            &path,
            "BPE tokenizer for GGUF export",
            "neither byte-level nor with byte fallback".into(),
            "byte-level BPE (GPT-2 style) or SentencePiece BPE with byte fallback",
        ));
    }
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let inner = tok.inner();

    // Tokens by id.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    let bad_id = |id: u64, text: &str| ModelError::InvalidConfig {
        path: path.clone(),
        key: format!("token {text:?}"),
        message: format!("id {id} is outside the model's vocabulary of {vocab_size}"),
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| ModelError::InvalidConfig {
            path: path.clone(),
            key: "model.vocab".into(),
            message: "expected an object of token -> id".into(),
        })?;
    for (text, id) in vocab {
        let id = id.as_u64().unwrap_or(u64::MAX);
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad_id(id, text))?;
        *slot = Some(text.clone());
        types[id as usize] = NORMAL;
    }
    for added in doc["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad_id(id, text))?;
        *slot = Some(text.to_string());
        types[id as usize] = if added["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();

    let special = |key: &str| -> Option<Special> {
        let text = token_text(tok_config.as_ref().and_then(|c| c.get(key)))?;
        let id = inner.token_to_id(&text)?;
        Some(Special { text, id })
    };
    let by_id = |id: u32| Special {
        text: tokens[id as usize].clone(),
        id,
    };
    let bos = tok.bos_id.map(by_id).or_else(|| special("bos_token"));
    let eos = special("eos_token").or_else(|| tok.eos_ids.first().copied().map(by_id));
    let unk = special("unk_token");
    let pad = special("pad_token");
    let processor = &doc["post_processor"];
    let config_flag = |key: &str| {
        tok_config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(Json::as_bool)
    };
    let add_bos = config_flag("add_bos_token").unwrap_or_else(|| {
        bos.as_ref()
            .is_some_and(|b| processor_adds(processor, &b.text, true))
    });
    let add_eos = config_flag("add_eos_token").unwrap_or_else(|| {
        eos.as_ref()
            .is_some_and(|e| processor_adds(processor, &e.text, false))
    });

    let mut meta: Vec<(String, Value)> = Vec::new();
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    if byte_fallback {
        if let Some(u) = &unk {
            types[u.id as usize] = UNKNOWN;
        }
        for (i, t) in tokens.iter().enumerate() {
            let is_byte = t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && u8::from_str_radix(&t[3..5], 16).is_ok();
            if is_byte && types[i] != CONTROL {
                types[i] = BYTE;
            }
        }
        let scores: Vec<Value> = types
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                Value::F32(if t == CONTROL || t == UNKNOWN {
                    -1000.0
                } else {
                    -(i as f32)
                })
            })
            .collect();
        let text = doc.to_string();
        let prepends = text.contains("\"Prepend\"")
            || ["\"first\"", "\"always\""]
                .iter()
                .any(|s| text.contains(&format!("\"prepend_scheme\":{s}")))
            || doc["pre_tokenizer"]["add_prefix_space"].as_bool() == Some(true);
        meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        meta.push((
            "tokenizer.ggml.pre".into(),
            Value::String(pre.unwrap_or("default").into()),
        ));
        meta.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        meta.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
        meta.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect()),
        ));
        meta.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(prepends),
        ));
    } else {
        let pre = match pre {
            Some(p) => p,
            None => pre_name(&path, &doc)?,
        };
        let merges: Vec<String> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Json::String(s) => s.clone(),
                Json::Array(pair) => pair
                    .iter()
                    .filter_map(Json::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            })
            .collect();
        meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        meta.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        meta.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect()),
        ));
        meta.push(("tokenizer.ggml.merges".into(), strings(&merges)));
    }
    let (template_meta, template, template_source) = chat_template(dir, tok_config.as_ref())?;
    let eot = template.as_deref().and_then(|text| {
        END_OF_TURN
            .iter()
            .find(|t| text.contains(**t))
            .and_then(|t| inner.token_to_id(t).map(by_id))
            .filter(|t| eos.as_ref().is_none_or(|e| e.id != t.id))
    });
    for (key, token) in [
        ("bos_token_id", &bos),
        ("eos_token_id", &eos),
        ("eot_token_id", &eot),
        ("unknown_token_id", &unk),
        ("padding_token_id", &pad),
    ] {
        if let Some(t) = token {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(t.id)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    meta.extend(template_meta);
    Ok(GgufVocab {
        metadata: meta,
        bos,
        eos,
        eot,
        template_source,
        template,
    })
}
