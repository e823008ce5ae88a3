//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, built into a
//! `tokenizers` tokenizer (as a `tokenizer.json` document, the form Hugging Face's own GGUF
//! converter produces).
//!
//! Supported: GPT-2-style byte-level BPE (`tokenizer.ggml.model = gpt2`) with the
//! pre-tokenizers of `tokenizer.ggml.pre` listed in [`PRE_TOKENIZERS`] (llama.cpp's
//! `llama-vocab.cpp` names them and gives their regular expressions). Control tokens
//! (`token_type` 3) become special added tokens, user-defined ones (4) plain added tokens.
//! SentencePiece vocabularies (`llama`) are refused by name for now.

use serde_json::{json, Map, Value as Json};

use super::{GgufFile, Value};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Llama 3's split expression (`llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values hone reads, and what each means.
pub const PRE_TOKENIZERS: &[(&str, &str)] = &[
    ("default", "GPT-2's byte-level split"),
    ("gpt2", "GPT-2's byte-level split"),
    (
        "smollm",
        "single digits, then GPT-2's byte-level split (SmolLM, StarCoder)",
    ),
    ("starcoder", "single digits, then GPT-2's byte-level split"),
    ("llama-bpe", "Llama 3's split expression"),
    ("llama3", "Llama 3's split expression"),
    ("qwen2", "NFC, then Qwen2's split expression"),
];

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// `(normalizer, pre-tokenizer)` for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<(Json, Json)> {
    Ok(match pre {
        "default" | "gpt2" => (Json::Null, byte_level(true)),
        "smollm" | "starcoder" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        "llama-bpe" | "llama3" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        ),
        other => {
            return Err(ModelError::Unsupported {
                path: file.path().to_path_buf(),
                what: "pre-tokenizer (tokenizer.ggml.pre)",
                found: other.to_string(),
                supported: PRE_TOKENIZERS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    })
}

fn token_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
        _ => Err(super::GgufError::Metadata {
            path: file.path().to_path_buf(),
            key: key.to_string(),
            message: format!("expected a token id below the vocabulary size {vocab}, found {v}"),
        }
        .into()),
    }
}

fn flag(file: &GgufFile, key: &str) -> Option<bool> {
    file.get(key).and_then(Value::as_bool)
}

/// The tokenizer of `file`, with its BOS/EOS ids and `add_bos_token`.
pub fn tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let path = file.path();
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            what: "tokenizer model (tokenizer.ggml.model)",
            found: model.to_string(),
            supported: "gpt2 (byte-level BPE); SentencePiece (llama) GGUF vocabularies are not \
                        read yet"
                .into(),
        });
    }
    let tokens = file.get_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types = match file.get("tokenizer.ggml.token_type") {
        Some(v) => v.as_array().map(|a| a.to_vec()).unwrap_or_default(),
        None => Vec::new(),
    };
    if !types.is_empty() && types.len() != n {
        return Err(super::GgufError::Metadata {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.token_type".into(),
            message: format!("has {} entries for {n} tokens", types.len()),
        }
        .into());
    }
    let mut vocab = Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let text = token.as_str().ok_or_else(|| {
            ModelError::from(super::GgufError::Metadata {
                path: path.to_path_buf(),
                key: "tokenizer.ggml.tokens".into(),
                message: format!("entry {id} is a {}, expected a string", token.type_name()),
            })
        })?;
        vocab.insert(text.to_string(), json!(id));
        let ty = types.get(id).and_then(Value::as_i64).unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    let merges: Vec<Json> = match file.get("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(_) => file
            .get_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.as_str()
                    .filter(|s| s.split(' ').count() == 2)
                    .map(|s| json!(s))
                    .ok_or_else(|| {
                        super::GgufError::Metadata {
                            path: path.to_path_buf(),
                            key: "tokenizer.ggml.merges".into(),
                            message: format!(
                                "entry {i} is not two tokens separated by a space: {m}"
                            ),
                        }
                        .into()
                    })
            })
            .collect::<Result<_>>()?,
    };
    let pre = match file.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => file.get_str("tokenizer.ggml.pre")?,
    };
    let (normalizer, pre_tokenizer) = pre_tokenizer(file, pre)?;
    let bos_id = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let mut eos_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = token_id(file, key, n)? {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    // llama.cpp's default for BPE vocabularies: no BOS unless the file asks for one.
    let add_bos = flag(file, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let post_processor = match (add_bos, bos_id) {
        (true, Some(bos)) => {
            let bos_text = tokens[bos as usize].as_str().unwrap_or_default();
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_text, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_text: {"id": bos_text, "ids": [bos], "tokens": [bos_text]}},
            })
        }
        _ => Json::Null,
    };
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let inner: tokenizers::Tokenizer =
        document
            .to_string()
            .parse()
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("cannot build the tokenizer from tokenizer.ggml.*: {e}"),
            })?;
    Ok(Tokenizer::from_parts(
        inner,
        bos_id,
        eos_ids,
        add_bos,
        path.to_path_buf(),
    ))
}
