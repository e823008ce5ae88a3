//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, built into a
//! `tokenizers` tokenizer (as a `tokenizer.json` document) the way transformers' GGUF loading
//! builds it (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`, 5.25), which is the
//! reference the tests replay (`fixtures/gguf/*-tokenizer.refs.json`).
//!
//! * `tokenizer.ggml.model = gpt2`: byte-level BPE. Tokens spelled outside GPT-2's byte alphabet
//!   are respelled into it (as transformers' `byte_level_tokenizer`); the split of
//!   `tokenizer.ggml.pre` follows [`PRE_TOKENIZERS`].
//! * `tokenizer.ggml.model = llama`: SentencePiece-style BPE with byte fallback (`<0xNN>`
//!   tokens), `▁` for spaces through a `Metaspace` pre-tokenizer that prepends one to the first
//!   word, and merges from `tokenizer.ggml.merges` or, when the file has none (llama.cpp writes
//!   none for SentencePiece models), recovered from `tokenizer.ggml.scores` as transformers'
//!   `generate_merges` does. BOS is added unless `tokenizer.ggml.add_bos_token` says otherwise.
//!
//! Control tokens (`token_type` 3) become special added tokens, user-defined ones (4) plain
//! added tokens.

use std::collections::HashMap;

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

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub(crate) const CONTROL: i64 = 3;
pub(crate) const USER_DEFINED: i64 = 4;

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// `(normalizer, pre-tokenizer)` of `tokenizers` for a `tokenizer.ggml.pre` value hone knows.
pub(crate) fn pre_tokenizer_json(pre: &str) -> Option<(Json, Json)> {
    Some(match pre {
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
        _ => return None,
    })
}

/// `(normalizer, pre-tokenizer)` for the file's `tokenizer.ggml.pre` value.
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<(Json, Json)> {
    pre_tokenizer_json(pre).ok_or_else(|| ModelError::Unsupported {
        path: file.path().to_path_buf(),
        what: "pre-tokenizer (tokenizer.ggml.pre)",
        found: pre.to_string(),
        supported: PRE_TOKENIZERS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn metadata_error(file: &GgufFile, key: &str, message: String) -> ModelError {
    super::GgufError::Metadata {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        message,
    }
    .into()
}

fn token_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
        _ => Err(metadata_error(
            file,
            key,
            format!("expected a token id below the vocabulary size {vocab}, found {v}"),
        )),
    }
}

fn flag(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            metadata_error(
                file,
                key,
                format!("expected a bool, found a {}", v.type_name()),
            )
        }),
    }
}

/// A string array of the file, each entry checked.
fn strings<'f>(file: &'f GgufFile, key: &str) -> Result<Vec<&'f str>> {
    file.get_array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| {
                metadata_error(
                    file,
                    key,
                    format!("entry {i} is a {}, expected a string", v.type_name()),
                )
            })
        })
        .collect()
}

/// An optional per-token array of the file (`token_type`, `scores`), which must have one entry
/// per token, read with `read`.
fn per_token<T>(
    file: &GgufFile,
    key: &str,
    n: usize,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<Vec<T>>> {
    if file.get(key).is_none() {
        return Ok(None);
    }
    let values = file.get_array(key)?;
    if values.len() != n {
        return Err(metadata_error(
            file,
            key,
            format!("has {} entries for {n} tokens", values.len()),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            read(v).ok_or_else(|| {
                metadata_error(
                    file,
                    key,
                    format!("entry {i} is a {}, expected {expected}", v.type_name()),
                )
            })
        })
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

/// GPT-2's printable spelling of each byte (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        *slot = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    table
}

/// The file's merges, each two tokens separated by one space.
fn file_merges(file: &GgufFile) -> Result<Option<Vec<(String, String)>>> {
    if file.get("tokenizer.ggml.merges").is_none() {
        return Ok(None);
    }
    let key = "tokenizer.ggml.merges";
    strings(file, key)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(metadata_error(
                file,
                key,
                format!("entry {i} is not two tokens separated by a space: {m:?}"),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Merges recovered from a vocabulary and its scores, as transformers' `generate_merges` with
/// `vocab_scores`: every split of every token into two tokens of the vocabulary, ordered by the
/// token's score (best first), then by the lengths of the two halves (longer first), ties
/// keeping vocabulary order (the halves' ids ascending within one token).
fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    // Python: vocab = {token: index} (the last index of a repeated token), vocab_scores =
    // dict(zip(tokens, scores)) (the first position, the last score).
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if index.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, s);
    }
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    for token in order {
        let s = score[token];
        let mut local = Vec::new();
        for (cut, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(cut);
            if let (Some(&il), Some(&ir)) = (index.get(l), index.get(r)) {
                local.push((l, r, il, ir));
            }
        }
        local.sort_by_key(|&(_, _, il, ir)| (il, ir));
        merges.extend(
            local
                .into_iter()
                .map(|(l, r, _, _)| (l, r, s, l.chars().count(), r.chars().count())),
        );
    }
    // Stable, descending on (score, len(l), len(r)): Python's sorted(..., reverse=True) keeps
    // equal keys in their original order too.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special,
    })
}

/// `TemplateProcessing` adding BOS before and/or EOS after each sequence (as transformers'
/// `update_post_processor`), or null when neither is added.
fn post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return Json::Null;
    }
    let piece = |seq: &str, type_id: u32| -> Vec<Json> {
        let mut out = Vec::new();
        if let Some((text, _)) = bos {
            out.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
        }
        out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some((text, _)) = eos {
            out.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
        }
        out
    };
    let mut special = Map::new();
    for (text, id) in bos.into_iter().chain(eos) {
        special.insert(
            text.to_string(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    let single = piece("A", 0);
    let mut pair = piece("A", 0);
    pair.extend(piece("B", 1));
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

/// What differs between the two kinds of vocabulary.
struct Parts {
    vocab: Map<String, Json>,
    merges: Vec<(String, String)>,
    added: Vec<Json>,
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    model_extra: Map<String, Json>,
    add_bos_default: bool,
}

/// GPT-2-style byte-level BPE (`tokenizer.ggml.model = gpt2`).
fn byte_level_parts(file: &GgufFile, tokens: &[&str], types: &[i64]) -> Result<Parts> {
    let alphabet = byte_alphabet();
    let spelled: std::collections::HashSet<char> = alphabet.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| spelled.contains(&c));
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &text) in tokens.iter().enumerate() {
        let key = if in_alphabet(text) {
            text.to_string()
        } else {
            text.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
        match types.get(id).copied() {
            // A control token spelled outside the byte alphabet is a llama.cpp mislabel;
            // transformers skips it (it would grow the vocabulary past the model's).
            Some(CONTROL) if in_alphabet(text) => added.push(added_token(id, text, true)),
            Some(USER_DEFINED) if in_alphabet(text) => added.push(added_token(id, text, false)),
            _ => {}
        }
    }
    let pre = match file.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => file.get_str("tokenizer.ggml.pre")?,
    };
    let (normalizer, pre_tokenizer) = pre_tokenizer(file, pre)?;
    Ok(Parts {
        vocab,
        merges: file_merges(file)?.unwrap_or_default(),
        added,
        normalizer,
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model_extra: Map::from_iter([
            ("unk_token".to_string(), Json::Null),
            ("fuse_unk".to_string(), json!(false)),
            ("byte_fallback".to_string(), json!(false)),
        ]),
        // llama.cpp's default for BPE vocabularies: no BOS unless the file asks for one.
        add_bos_default: false,
    })
}

/// SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = llama`), as
/// transformers' `LlamaTokenizer(vocab, merges)`.
fn sentencepiece_parts(file: &GgufFile, tokens: &[&str], types: &[i64]) -> Result<Parts> {
    let n = tokens.len();
    let merges = match file_merges(file)? {
        Some(m) => m,
        None => {
            let scores = per_token(
                file,
                "tokenizer.ggml.scores",
                n,
                |v| v.as_f64().map(|f| f as f32),
                "a number",
            )?
            .ok_or_else(|| {
                metadata_error(
                    file,
                    "tokenizer.ggml.scores",
                    "is missing: a SentencePiece vocabulary without tokenizer.ggml.merges needs \
                     scores to order its merges"
                        .into(),
                )
            })?;
            merges_from_scores(tokens, &scores)
        }
    };
    let mut vocab = Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, &text) in tokens.iter().enumerate() {
        vocab.insert(text.to_string(), json!(id));
        match types.get(id).copied() {
            Some(CONTROL) => added.push(added_token(id, text, true)),
            Some(USER_DEFINED) => added.push(added_token(id, text, false)),
            _ => {}
        }
    }
    // transformers' GGUF loading does not pass tokenizer.ggml.add_space_prefix on to
    // LlamaTokenizer, whose default prepends a space to the first word; a file that says
    // false is rare (llama.cpp writes it for SentencePiece models that do not add one).
    let add_prefix = flag(file, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let scheme = if add_prefix { "first" } else { "never" };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(Parts {
        vocab,
        merges,
        added,
        normalizer: Json::Null,
        pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}",
                              "prepend_scheme": scheme, "split": false}),
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        model_extra: Map::from_iter([
            // transformers' LlamaTokenizer gives its BPE no unknown token: every byte has one.
            ("unk_token".to_string(), Json::Null),
            ("fuse_unk".to_string(), json!(true)),
            ("byte_fallback".to_string(), json!(true)),
        ]),
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos_default: true,
    })
}

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// The tokenizer of a GGUF file as a `tokenizer.json` document, with the special tokens its
/// metadata names (what a Hugging Face directory keeps in `tokenizer_config.json` and
/// `generation_config.json`).
#[derive(Debug, Clone)]
pub struct TokenizerSpec {
    /// The `tokenizer.json` document.
    pub document: Json,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// `tokenizer.ggml.eot_token_id` (end of turn), when it is set.
    pub eot: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    /// Whether the post-processor adds BOS / EOS (`tokenizer.ggml.add_{bos,eos}_token`).
    pub add_bos: bool,
    pub add_eos: bool,
}

impl TokenizerSpec {
    /// Every id that ends generation: EOS, then the end-of-turn token when it differs.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().map(|t| t.id).collect();
        if let Some(eot) = &self.eot {
            if !ids.contains(&eot.id) {
                ids.push(eot.id);
            }
        }
        ids
    }
}

/// The tokenizer of `file`, with its BOS/EOS ids and `add_bos_token`.
pub fn tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let spec = tokenizer_spec(file)?;
    let path = file.path();
    let inner: tokenizers::Tokenizer =
        spec.document
            .to_string()
            .parse()
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("cannot build the tokenizer from tokenizer.ggml.*: {e}"),
            })?;
    Ok(Tokenizer::from_parts(
        inner,
        spec.bos.as_ref().map(|t| t.id),
        spec.eos_ids(),
        spec.add_bos,
        path.to_path_buf(),
    ))
}

/// The `tokenizer.json` document and special tokens of `file` (see [`TokenizerSpec`]).
pub fn tokenizer_spec(file: &GgufFile) -> Result<TokenizerSpec> {
    let path = file.path();
    let model = file.get_str("tokenizer.ggml.model")?;
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types = per_token(
        file,
        "tokenizer.ggml.token_type",
        n,
        Value::as_i64,
        "an integer",
    )?
    .unwrap_or_default();
    let parts = match model {
        "gpt2" => byte_level_parts(file, &tokens, &types)?,
        "llama" => sentencepiece_parts(file, &tokens, &types)?,
        other => {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "tokenizer model (tokenizer.ggml.model)",
                found: other.to_string(),
                supported: "gpt2 (byte-level BPE), llama (SentencePiece BPE with byte fallback)"
                    .into(),
            })
        }
    };
    let bos_id = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let eos_id = token_id(file, "tokenizer.ggml.eos_token_id", n)?;
    let unk_id = token_id(file, "tokenizer.ggml.unknown_token_id", n)?;
    let pad_id = token_id(file, "tokenizer.ggml.padding_token_id", n)?;
    // The tokens these ids name are special whatever their token_type (`<unk>` is UNKNOWN in a
    // SentencePiece vocabulary): transformers registers bos/eos/unk/pad as special tokens.
    let mut added = parts.added;
    for id in [bos_id, eos_id, unk_id, pad_id].into_iter().flatten() {
        if !added.iter().any(|a| a["id"] == json!(id)) {
            added.push(added_token(id as usize, tokens[id as usize], true));
        }
    }
    let eot_id = token_id(file, "tokenizer.ggml.eot_token_id", n)?;
    let add_bos = flag(file, "tokenizer.ggml.add_bos_token")?.unwrap_or(parts.add_bos_default);
    let add_eos = flag(file, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let with_text = |id: Option<u32>| id.map(|id| (tokens[id as usize], id));
    let post_processor = post_processor(
        with_text(bos_id).filter(|_| add_bos),
        with_text(eos_id).filter(|_| add_eos),
    );
    let merges: Vec<Json> = parts
        .merges
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let mut model_json = Map::from_iter([
        ("type".to_string(), json!("BPE")),
        ("dropout".to_string(), Json::Null),
        ("continuing_subword_prefix".to_string(), Json::Null),
        ("end_of_word_suffix".to_string(), Json::Null),
        ("ignore_merges".to_string(), json!(false)),
        ("vocab".to_string(), Json::Object(parts.vocab)),
        ("merges".to_string(), Json::Array(merges)),
    ]);
    model_json.extend(parts.model_extra);
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": parts.normalizer,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": post_processor,
        "decoder": parts.decoder,
        "model": model_json,
    });
    let special = |id: Option<u32>| {
        id.map(|id| SpecialToken {
            text: tokens[id as usize].to_string(),
            id,
        })
    };
    Ok(TokenizerSpec {
        document,
        bos: special(bos_id),
        eos: special(eos_id),
        eot: special(eot_id),
        unk: special(unk_id),
        pad: special(pad_id),
        add_bos,
        add_eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], '\u{120}');
        assert_eq!(a[b'\n' as usize], '\u{10a}');
        assert_eq!(a[0xad], '\u{143}');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_from_scores_order_by_score_then_lengths() {
        // transformers' generate_merges on this vocabulary gives
        // [('a','b'), ('ab','c'), ('a','bc'), ('b','c')]: "abc" (score -1) splits two ways,
        // both kept, longer left half first.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -0.5, -2.0, -1.0];
        let got = merges_from_scores(&tokens, &scores);
        let want = [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")];
        assert_eq!(
            got,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
    }
}
