//! Reading chat templates and special tokens the way Hugging Face ships them.
//!
//! Sources, in the order `transformers` (>= 4.50) consults them for a model directory:
//! `chat_template.jinja` (and `additional_chat_templates/<name>.jinja` for named ones), then the
//! `chat_template` field of `tokenizer_config.json` (a string, or a list of
//! `{"name", "template"}` objects of which `default` is used unless another is named), then the
//! older `chat_template.json`. Special tokens (`bos_token`, `eos_token`, `unk_token`,
//! `pad_token`) are read from `tokenizer_config.json`, as strings or `AddedToken` objects
//! (`{"content": "<s>", ...}`); `additional_special_tokens` likewise.
//!
//! A GGUF model file carries the same in its metadata, which transformers' GGUF loading reads
//! into the tokenizer config: `tokenizer.chat_template` (and llama.cpp's named templates,
//! `tokenizer.chat_templates` listing names of `tokenizer.chat_template.NAME`), and the special
//! tokens as the texts of the tokens `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` name.

use std::path::{Path, PathBuf};

use minijinja::Value;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::error::TemplateError;

/// File names inside a Hugging Face model directory.
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const CHAT_TEMPLATE_JSON: &str = "chat_template.json";
const ADDITIONAL_TEMPLATES_DIR: &str = "additional_chat_templates";
/// The name transformers picks among several templates when none is asked for.
const DEFAULT_NAME: &str = "default";

/// Special-token strings that a template can reference as variables.
///
/// Absent tokens stay undefined in the template (rendering as empty text), as in transformers,
/// whose `special_tokens_map` only holds the tokens that are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token, e.g. `<s>`, `<|begin_of_text|>`.
    pub bos_token: Option<String>,
    /// End-of-sequence token, e.g. `</s>`, `<|eot_id|>`, `<|im_end|>`.
    pub eos_token: Option<String>,
    /// Unknown token.
    pub unk_token: Option<String>,
    /// Padding token.
    pub pad_token: Option<String>,
    /// `additional_special_tokens`, when the config lists them.
    pub additional_special_tokens: Option<Vec<String>>,
}

impl SpecialTokens {
    /// Fills every token missing here from `fallback`.
    pub fn or(self, fallback: &SpecialTokens) -> SpecialTokens {
        SpecialTokens {
            bos_token: self.bos_token.or_else(|| fallback.bos_token.clone()),
            eos_token: self.eos_token.or_else(|| fallback.eos_token.clone()),
            unk_token: self.unk_token.or_else(|| fallback.unk_token.clone()),
            pad_token: self.pad_token.or_else(|| fallback.pad_token.clone()),
            additional_special_tokens: self
                .additional_special_tokens
                .or_else(|| fallback.additional_special_tokens.clone()),
        }
    }

    /// The template variables these tokens define.
    pub(crate) fn context_pairs(&self) -> Vec<(&'static str, Value)> {
        let mut pairs = Vec::new();
        let singles = [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ];
        for (key, token) in singles {
            if let Some(token) = token {
                pairs.push((key, Value::from(token.as_str())));
            }
        }
        if let Some(list) = &self.additional_special_tokens {
            let list: Vec<Value> = list.iter().map(|t| Value::from(t.as_str())).collect();
            pairs.push(("additional_special_tokens", Value::from(list)));
        }
        pairs
    }
}

/// The `chat_template` field of a tokenizer config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TemplateField {
    /// No template.
    Absent,
    /// One template.
    Single(String),
    /// Several, as `(name, template)` in file order.
    Named(Vec<(String, String)>),
}

/// What a renderer needs from `tokenizer_config.json`.
#[derive(Debug, Clone)]
pub(crate) struct TokenizerConfig {
    pub templates: TemplateField,
    pub special: SpecialTokens,
}

/// A template's text together with the name used in error messages.
#[derive(Debug, Clone)]
pub(crate) struct FoundTemplate {
    pub name: String,
    pub text: String,
}

fn json_type(value: &Json) -> String {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
    .to_string()
}

fn invalid(origin: &str, field: &str, expected: &'static str, found: &Json) -> TemplateError {
    TemplateError::InvalidField {
        origin: origin.to_string(),
        field: field.to_string(),
        expected,
        found: json_type(found),
    }
}

/// A token given as `"<s>"` or `{"content": "<s>", ...}`; `null` means unset.
fn parse_token(origin: &str, field: &str, value: &Json) -> Result<Option<String>, TemplateError> {
    const EXPECTED: &str = "a string, null or an object with a string `content`";
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(map) => match map.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(
                origin,
                &format!("{field}.content"),
                EXPECTED,
                other,
            )),
            None => Err(invalid(origin, field, EXPECTED, value)),
        },
        other => Err(invalid(origin, field, EXPECTED, other)),
    }
}

fn parse_special_tokens(
    origin: &str,
    root: &serde_json::Map<String, Json>,
) -> Result<SpecialTokens, TemplateError> {
    let single = |key: &str| match root.get(key) {
        Some(value) => parse_token(origin, key, value),
        None => Ok(None),
    };
    let additional = match root.get("additional_special_tokens") {
        None | Some(Json::Null) => None,
        Some(Json::Array(items)) => {
            let mut tokens = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let field = format!("additional_special_tokens[{i}]");
                if let Some(token) = parse_token(origin, &field, item)? {
                    tokens.push(token);
                }
            }
            Some(tokens)
        }
        Some(other) => {
            return Err(invalid(
                origin,
                "additional_special_tokens",
                "a list of tokens",
                other,
            ))
        }
    };
    Ok(SpecialTokens {
        bos_token: single("bos_token")?,
        eos_token: single("eos_token")?,
        unk_token: single("unk_token")?,
        pad_token: single("pad_token")?,
        additional_special_tokens: additional,
    })
}

fn parse_template_field(
    origin: &str,
    value: Option<&Json>,
) -> Result<TemplateField, TemplateError> {
    const EXPECTED: &str = "a string or a list of {\"name\", \"template\"} objects";
    match value {
        None | Some(Json::Null) => Ok(TemplateField::Absent),
        Some(Json::String(s)) => Ok(TemplateField::Single(s.clone())),
        Some(Json::Array(items)) => {
            let mut named = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let field = |key: &str| format!("chat_template[{i}].{key}");
                let get = |key: &str| match item.get(key) {
                    Some(Json::String(s)) => Ok(s.clone()),
                    Some(other) => Err(invalid(origin, &field(key), "a string", other)),
                    None => Err(invalid(origin, &field(key), "a string", &Json::Null)),
                };
                named.push((get("name")?, get("template")?));
            }
            Ok(TemplateField::Named(named))
        }
        Some(other) => Err(invalid(origin, "chat_template", EXPECTED, other)),
    }
}

/// Parses the text of a `tokenizer_config.json`; `origin` names it in errors.
pub(crate) fn parse_tokenizer_config(
    text: &str,
    origin: &str,
) -> Result<TokenizerConfig, TemplateError> {
    let root: Json = serde_json::from_str(text).map_err(|source| TemplateError::Json {
        origin: origin.to_string(),
        source,
    })?;
    let Json::Object(root) = root else {
        return Err(invalid(origin, "<root>", "an object", &root));
    };
    Ok(TokenizerConfig {
        templates: parse_template_field(origin, root.get("chat_template"))?,
        special: parse_special_tokens(origin, &root)?,
    })
}

/// Picks one template from a config's field: `wanted` by name, else the only one, else
/// `default`.
pub(crate) fn select_template(
    field: &TemplateField,
    wanted: Option<&str>,
    origin: &str,
) -> Result<Option<FoundTemplate>, TemplateError> {
    match (field, wanted) {
        (TemplateField::Absent, _) => Ok(None),
        (TemplateField::Single(text), None) => Ok(Some(FoundTemplate {
            name: origin.to_string(),
            text: text.clone(),
        })),
        (TemplateField::Single(text), Some(name)) if name == DEFAULT_NAME => {
            Ok(Some(FoundTemplate {
                name: origin.to_string(),
                text: text.clone(),
            }))
        }
        (TemplateField::Single(_), Some(name)) => Err(TemplateError::UnknownTemplateName {
            origin: origin.to_string(),
            wanted: name.to_string(),
            available: vec![DEFAULT_NAME.to_string()],
        }),
        (TemplateField::Named(list), wanted) => {
            let name = wanted.unwrap_or(DEFAULT_NAME);
            match list.iter().find(|(n, _)| n == name) {
                Some((n, text)) => Ok(Some(FoundTemplate {
                    name: format!("{origin}#{n}"),
                    text: text.clone(),
                })),
                None => {
                    let available = list.iter().map(|(n, _)| n.clone()).collect();
                    let origin = origin.to_string();
                    Err(match wanted {
                        Some(w) => TemplateError::UnknownTemplateName {
                            origin,
                            wanted: w.to_string(),
                            available,
                        },
                        None => TemplateError::NoDefaultTemplate { origin, available },
                    })
                }
            }
        }
    }
}

pub(crate) fn read_text(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `tokenizer_config.json` from a file path.
pub(crate) fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig, TemplateError> {
    parse_tokenizer_config(&read_text(path)?, &path.display().to_string())
}

/// GGUF metadata keys of the chat template(s).
const GGUF_TEMPLATE: &str = "tokenizer.chat_template";
const GGUF_TEMPLATE_NAMES: &str = "tokenizer.chat_templates";

/// A string-valued GGUF key, if present.
fn gguf_string(
    file: &hone_model::gguf::GgufFile,
    key: &str,
) -> Result<Option<String>, TemplateError> {
    match file.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(file.get_str(key)?.to_string())),
    }
}

/// The chat templates and special tokens of a GGUF model file, as a tokenizer config.
fn read_gguf(path: &Path) -> Result<TokenizerConfig, TemplateError> {
    use hone_model::gguf::{GgufError, GgufFile};
    let file = GgufFile::open(path)?;
    let default = gguf_string(&file, GGUF_TEMPLATE)?;
    let templates = match file.get(GGUF_TEMPLATE_NAMES) {
        None => default.map_or(TemplateField::Absent, TemplateField::Single),
        Some(_) => {
            let mut named: Vec<(String, String)> = default
                .map(|t| (DEFAULT_NAME.to_string(), t))
                .into_iter()
                .collect();
            for (i, name) in file.get_array(GGUF_TEMPLATE_NAMES)?.iter().enumerate() {
                let name = name.as_str().ok_or_else(|| GgufError::Metadata {
                    path: path.to_path_buf(),
                    key: GGUF_TEMPLATE_NAMES.into(),
                    message: format!("entry {i} is a {}, expected a string", name.type_name()),
                })?;
                let key = format!("{GGUF_TEMPLATE}.{name}");
                named.push((name.to_string(), file.get_str(&key)?.to_string()));
            }
            TemplateField::Named(named)
        }
    };
    let tokens = match file.get("tokenizer.ggml.tokens") {
        None => &[][..],
        Some(_) => file.get_array("tokenizer.ggml.tokens")?,
    };
    let token = |key: &str| -> Result<Option<String>, TemplateError> {
        let key = format!("tokenizer.ggml.{key}");
        let Some(value) = file.get(&key) else {
            return Ok(None);
        };
        let text = value
            .as_u64()
            .and_then(|id| tokens.get(id as usize))
            .and_then(|t| t.as_str());
        match text {
            Some(t) => Ok(Some(t.to_string())),
            None => Err(GgufError::Metadata {
                path: path.to_path_buf(),
                key,
                message: format!(
                    "expected the id of one of the {} tokens of tokenizer.ggml.tokens, found \
                     {value}",
                    tokens.len()
                ),
            }
            .into()),
        }
    };
    Ok(TokenizerConfig {
        templates,
        special: SpecialTokens {
            bos_token: token("bos_token_id")?,
            eos_token: token("eos_token_id")?,
            unk_token: token("unknown_token_id")?,
            pad_token: token("padding_token_id")?,
            additional_special_tokens: None,
        },
    })
}

/// Everything a model directory (or GGUF model file) says about chat templates.
#[derive(Debug, Clone)]
pub(crate) struct ModelDirTemplates {
    pub dir: PathBuf,
    pub config: Option<TokenizerConfig>,
    /// `dir` is a GGUF file: its metadata is the whole story (no files beside it are read).
    gguf: bool,
}

impl ModelDirTemplates {
    /// Reads what exists of `tokenizer_config.json` in `dir` (a missing file is not an error),
    /// or the metadata of `dir` when it is a GGUF model file.
    pub fn read(dir: &Path) -> Result<Self, TemplateError> {
        if hone_model::loader::is_gguf(dir) {
            return Ok(Self {
                dir: dir.to_path_buf(),
                config: Some(read_gguf(dir)?),
                gguf: true,
            });
        }
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config = if config_path.is_file() {
            Some(read_tokenizer_config(&config_path)?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            gguf: false,
        })
    }

    /// The special tokens (empty when there is no config).
    pub fn special_tokens(&self) -> SpecialTokens {
        self.config
            .as_ref()
            .map(|c| c.special.clone())
            .unwrap_or_default()
    }

    fn from_file(path: PathBuf) -> Result<FoundTemplate, TemplateError> {
        Ok(FoundTemplate {
            text: read_text(&path)?,
            name: path.display().to_string(),
        })
    }

    fn field(&self) -> &TemplateField {
        self.config
            .as_ref()
            .map(|c| &c.templates)
            .unwrap_or(&TemplateField::Absent)
    }

    fn config_origin(&self) -> String {
        if self.gguf {
            format!("{} ({GGUF_TEMPLATE})", self.dir.display())
        } else {
            self.dir.join(TOKENIZER_CONFIG).display().to_string()
        }
    }

    /// Finds the template called `wanted` (or the default one).
    pub fn find(&self, wanted: Option<&str>) -> Result<FoundTemplate, TemplateError> {
        match wanted {
            Some(name) if name != DEFAULT_NAME => self.find_named(name),
            _ => self.find_default(),
        }
    }

    fn find_named(&self, name: &str) -> Result<FoundTemplate, TemplateError> {
        if self.gguf {
            let origin = self.config_origin();
            return match self.field() {
                TemplateField::Named(_) => select_template(self.field(), Some(name), &origin)?
                    .ok_or_else(|| TemplateError::MissingTemplate {
                        origin: origin.clone(),
                        searched: GGUF_TEMPLATE_NAMES.to_string(),
                    }),
                _ => Err(TemplateError::UnknownTemplateName {
                    origin,
                    wanted: name.to_string(),
                    available: self.available_names(),
                }),
            };
        }
        let file = self
            .dir
            .join(ADDITIONAL_TEMPLATES_DIR)
            .join(format!("{name}.jinja"));
        if file.is_file() {
            return Self::from_file(file);
        }
        let origin = self.config_origin();
        match self.field() {
            TemplateField::Named(_) => select_template(self.field(), Some(name), &origin)?
                .ok_or_else(|| TemplateError::MissingTemplate {
                    origin: origin.clone(),
                    searched: TOKENIZER_CONFIG.to_string(),
                }),
            _ => Err(TemplateError::UnknownTemplateName {
                origin: self.dir.display().to_string(),
                wanted: name.to_string(),
                available: self.available_names(),
            }),
        }
    }

    fn find_default(&self) -> Result<FoundTemplate, TemplateError> {
        if self.gguf {
            return select_template(self.field(), None, &self.config_origin())?.ok_or_else(|| {
                TemplateError::MissingTemplate {
                    origin: self.dir.display().to_string(),
                    searched: format!("the metadata key {GGUF_TEMPLATE}"),
                }
            });
        }
        let jinja = self.dir.join(CHAT_TEMPLATE_JINJA);
        if jinja.is_file() {
            return Self::from_file(jinja);
        }
        if let Some(found) = select_template(self.field(), None, &self.config_origin())? {
            return Ok(found);
        }
        let json_path = self.dir.join(CHAT_TEMPLATE_JSON);
        if json_path.is_file() {
            let origin = json_path.display().to_string();
            let root: Json = serde_json::from_str(&read_text(&json_path)?).map_err(|source| {
                TemplateError::Json {
                    origin: origin.clone(),
                    source,
                }
            })?;
            let field = parse_template_field(&origin, root.get("chat_template"))?;
            if let Some(found) = select_template(&field, None, &origin)? {
                return Ok(found);
            }
        }
        Err(TemplateError::MissingTemplate {
            origin: self.dir.display().to_string(),
            searched: format!(
                "{CHAT_TEMPLATE_JINJA}, the chat_template field of {TOKENIZER_CONFIG}, {CHAT_TEMPLATE_JSON}"
            ),
        })
    }

    /// Names of all templates present (for error messages).
    fn available_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        match self.field() {
            TemplateField::Absent => {}
            TemplateField::Single(_) => names.push(DEFAULT_NAME.to_string()),
            TemplateField::Named(list) => names.extend(list.iter().map(|(n, _)| n.clone())),
        }
        if self.gguf {
            return names;
        }
        if self.dir.join(CHAT_TEMPLATE_JINJA).is_file() && !names.iter().any(|n| n == DEFAULT_NAME)
        {
            names.push(DEFAULT_NAME.to_string());
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join(ADDITIONAL_TEMPLATES_DIR)) {
            let mut extra: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".jinja").map(str::to_string)
                })
                .collect();
            extra.sort();
            names.extend(extra);
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_may_be_strings_objects_or_null() {
        let cfg = parse_tokenizer_config(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "pad_token": null, "additional_special_tokens": ["<a>", {"content": "<b>"}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(cfg.special.bos_token.as_deref(), Some("<s>"));
        assert_eq!(cfg.special.eos_token.as_deref(), Some("</s>"));
        assert_eq!(cfg.special.pad_token, None);
        assert_eq!(cfg.special.unk_token, None);
        assert_eq!(
            cfg.special.additional_special_tokens,
            Some(vec!["<a>".to_string(), "<b>".to_string()])
        );
        assert_eq!(cfg.templates, TemplateField::Absent);
    }

    #[test]
    fn wrong_token_type_names_field_and_type() {
        let err = parse_tokenizer_config(r#"{"eos_token": 3}"#, "cfg.json").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cfg.json") && text.contains("eos_token"),
            "{text}"
        );
        assert!(text.contains("found a number"), "{text}");
    }

    #[test]
    fn named_templates_pick_default_or_by_name() {
        let cfg = parse_tokenizer_config(
            r#"{"chat_template": [{"name": "default", "template": "D"},
                                  {"name": "tool_use", "template": "T"}]}"#,
            "cfg",
        )
        .unwrap();
        let pick = |n| select_template(&cfg.templates, n, "cfg");
        assert_eq!(pick(None).unwrap().unwrap().text, "D");
        assert_eq!(pick(Some("tool_use")).unwrap().unwrap().text, "T");
        let err = pick(Some("rag")).unwrap_err().to_string();
        assert!(err.contains("rag") && err.contains("tool_use"), "{err}");
    }

    #[test]
    fn named_templates_without_default_are_refused() {
        let cfg = parse_tokenizer_config(
            r#"{"chat_template": [{"name": "a", "template": "A"}]}"#,
            "cfg",
        )
        .unwrap();
        let err = select_template(&cfg.templates, None, "cfg").unwrap_err();
        assert!(
            matches!(err, TemplateError::NoDefaultTemplate { .. }),
            "{err}"
        );
    }
}
