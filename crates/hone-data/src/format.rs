//! Input formats, field remapping, `auto` detection, and conversion of a raw record into a
//! normalised [`Example`]: a chat of [`Message`]s, or raw text.
//!
//! | format       | record                                              | example                           |
//! |--------------|-----------------------------------------------------|-----------------------------------|
//! | `alpaca`     | `instruction`, optional `input`, `output`, optional `system` | system (if any), user = instruction + "\n\n" + input, assistant = output |
//! | `sharegpt`   | `conversations: [{from, value}]`                    | human/user -> user, gpt/assistant/model -> assistant, system -> system, tool/function/observation -> tool |
//! | `messages`   | `messages: [{role, content}]` (OpenAI)              | as given (`developer` -> system, `function` -> tool); content may be a list of `{type: "text", text}` parts; one message with the role `text` (hone's old curated raw text) -> raw text |
//! | `completion` | `prompt`, `completion`                              | user = prompt, assistant = completion |
//! | `text`       | `text`                                              | raw text                          |
//!
//! Every field name can be replaced through [`FieldMap`]; a name may be a dotted path into
//! nested objects and arrays (`instances.0.output`). `auto` tries each format's default names
//! and a few well-known variants on the first records of each file and takes the one that
//! matches most of them:
//! `messages`, `sharegpt`, `conversations` holding `{role, content}` (messages), `alpaca`,
//! self-instruct seed tasks (`instruction` + `instances.0.input/output`, alpaca), `completion`,
//! `question`/`answer` (GSM8K, completion), and `text`. When the user remaps fields, `auto`
//! only tries the formats with those names.
//! Empty (whitespace-only) system messages are dropped during conversion.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::example::{Example, LEGACY_TEXT_ROLE};
use crate::message::{Message, Role};

/// The format a user asks for: one of the formats, or `auto` to detect it per file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    #[default]
    Auto,
    Alpaca,
    Sharegpt,
    Messages,
    Completion,
    Text,
}

impl FormatChoice {
    /// The explicit format, or `None` for `auto`.
    pub fn format(self) -> Option<Format> {
        match self {
            FormatChoice::Auto => None,
            FormatChoice::Alpaca => Some(Format::Alpaca),
            FormatChoice::Sharegpt => Some(Format::Sharegpt),
            FormatChoice::Messages => Some(Format::Messages),
            FormatChoice::Completion => Some(Format::Completion),
            FormatChoice::Text => Some(Format::Text),
        }
    }
}

/// A concrete record format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Alpaca,
    Sharegpt,
    Messages,
    Completion,
    Text,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Messages,
        Format::Sharegpt,
        Format::Alpaca,
        Format::Completion,
        Format::Text,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Sharegpt => "sharegpt",
            Format::Messages => "messages",
            Format::Completion => "completion",
            Format::Text => "text",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Field-name overrides; `None` keeps the format's default name (given as "default: ...").
/// Names may be dotted paths (`instances.0.output`); a purely numeric segment indexes an array.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    /// alpaca: the task (default: `instruction`).
    pub instruction: Option<String>,
    /// alpaca: optional extra input (default: `input`).
    pub input: Option<String>,
    /// alpaca: the answer (default: `output`).
    pub output: Option<String>,
    /// alpaca: optional system prompt (default: `system`).
    pub system: Option<String>,
    /// sharegpt: the list of turns (default: `conversations`).
    pub conversations: Option<String>,
    /// sharegpt: speaker key inside a turn (default: `from`).
    pub from: Option<String>,
    /// sharegpt: text key inside a turn (default: `value`).
    pub value: Option<String>,
    /// messages: the list of messages (default: `messages`).
    pub messages: Option<String>,
    /// messages: role key inside a message (default: `role`).
    pub role: Option<String>,
    /// messages: content key inside a message (default: `content`).
    pub content: Option<String>,
    /// completion: the prompt (default: `prompt`).
    pub prompt: Option<String>,
    /// completion: the completion (default: `completion`).
    pub completion: Option<String>,
    /// text: the raw text (default: `text`).
    pub text: Option<String>,
}

impl FieldMap {
    /// True when no field is remapped.
    pub fn is_default(&self) -> bool {
        *self == FieldMap::default()
    }

    /// The set fields that the given format does not use, as config keys.
    pub fn unused_by(&self, format: Format) -> Vec<&'static str> {
        let used: &[&str] = match format {
            Format::Alpaca => &["instruction", "input", "output", "system"],
            Format::Sharegpt => &["conversations", "from", "value"],
            Format::Messages => &["messages", "role", "content"],
            Format::Completion => &["prompt", "completion"],
            Format::Text => &["text"],
        };
        self.entries()
            .into_iter()
            .filter(|(k, v)| v.is_some() && !used.contains(k))
            .map(|(k, _)| k)
            .collect()
    }

    /// Every (name, value) pair, for validation.
    pub fn entries(&self) -> [(&'static str, &Option<String>); 13] {
        [
            ("instruction", &self.instruction),
            ("input", &self.input),
            ("output", &self.output),
            ("system", &self.system),
            ("conversations", &self.conversations),
            ("from", &self.from),
            ("value", &self.value),
            ("messages", &self.messages),
            ("role", &self.role),
            ("content", &self.content),
            ("prompt", &self.prompt),
            ("completion", &self.completion),
            ("text", &self.text),
        ]
    }
}

/// A field name parsed into path segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    parts: Vec<String>,
}

impl FieldPath {
    pub fn new(text: &str) -> Self {
        FieldPath {
            text: text.to_string(),
            parts: text.split('.').map(str::to_string).collect(),
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Follows the path; `None` if any step is missing.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        let mut current = value;
        for part in &self.parts {
            current = match current {
                Value::Object(map) => map.get(part)?,
                Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(current)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A format with its resolved field names: how to read one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    Alpaca {
        instruction: FieldPath,
        input: FieldPath,
        output: FieldPath,
        system: FieldPath,
    },
    Sharegpt {
        conversations: FieldPath,
        from: FieldPath,
        value: FieldPath,
    },
    Messages {
        messages: FieldPath,
        role: FieldPath,
        content: FieldPath,
    },
    Completion {
        prompt: FieldPath,
        completion: FieldPath,
    },
    Text {
        text: FieldPath,
    },
}

fn pick(over: &Option<String>, default: &str) -> FieldPath {
    FieldPath::new(over.as_deref().unwrap_or(default))
}

impl Layout {
    /// The format's default names with the user's overrides applied.
    pub fn resolve(format: Format, fields: &FieldMap) -> Layout {
        match format {
            Format::Alpaca => Layout::Alpaca {
                instruction: pick(&fields.instruction, "instruction"),
                input: pick(&fields.input, "input"),
                output: pick(&fields.output, "output"),
                system: pick(&fields.system, "system"),
            },
            Format::Sharegpt => Layout::Sharegpt {
                conversations: pick(&fields.conversations, "conversations"),
                from: pick(&fields.from, "from"),
                value: pick(&fields.value, "value"),
            },
            Format::Messages => Layout::Messages {
                messages: pick(&fields.messages, "messages"),
                role: pick(&fields.role, "role"),
                content: pick(&fields.content, "content"),
            },
            Format::Completion => Layout::Completion {
                prompt: pick(&fields.prompt, "prompt"),
                completion: pick(&fields.completion, "completion"),
            },
            Format::Text => Layout::Text {
                text: pick(&fields.text, "text"),
            },
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Layout::Alpaca { .. } => Format::Alpaca,
            Layout::Sharegpt { .. } => Format::Sharegpt,
            Layout::Messages { .. } => Format::Messages,
            Layout::Completion { .. } => Format::Completion,
            Layout::Text { .. } => Format::Text,
        }
    }

    /// (config key, resolved name) of each field.
    fn named_fields(&self) -> Vec<(&'static str, &FieldPath)> {
        match self {
            Layout::Alpaca {
                instruction,
                input,
                output,
                system,
            } => vec![
                ("instruction", instruction),
                ("input", input),
                ("output", output),
                ("system", system),
            ],
            Layout::Sharegpt {
                conversations,
                from,
                value,
            } => vec![
                ("conversations", conversations),
                ("from", from),
                ("value", value),
            ],
            Layout::Messages {
                messages,
                role,
                content,
            } => vec![("messages", messages), ("role", role), ("content", content)],
            Layout::Completion { prompt, completion } => {
                vec![("prompt", prompt), ("completion", completion)]
            }
            Layout::Text { text } => vec![("text", text)],
        }
    }

    /// Whether a record looks like this layout (required fields present with the right types).
    pub fn matches(&self, record: &Value) -> bool {
        let is_str = |p: &FieldPath| matches!(p.get(record), Some(Value::String(_)));
        let list_of = |list: &FieldPath, a: &FieldPath, b: &FieldPath| match list.get(record) {
            Some(Value::Array(items)) => items
                .first()
                .is_some_and(|m| a.get(m).is_some_and(Value::is_string) && b.get(m).is_some()),
            _ => false,
        };
        match self {
            Layout::Alpaca {
                instruction,
                output,
                ..
            } => is_str(instruction) && is_str(output),
            Layout::Sharegpt {
                conversations,
                from,
                value,
            } => list_of(conversations, from, value),
            Layout::Messages {
                messages,
                role,
                content,
            } => list_of(messages, role, content),
            Layout::Completion { prompt, completion } => is_str(prompt) && is_str(completion),
            Layout::Text { text } => is_str(text),
        }
    }

    /// Converts one record into an example.
    pub fn convert(&self, record: &Value) -> Result<Example, FieldError> {
        if !record.is_object() {
            return Err(FieldError::new(
                None,
                format!("expected a JSON object, found {}", type_name(record)),
            ));
        }
        let mut messages = Vec::new();
        match self {
            Layout::Alpaca {
                instruction,
                input,
                output,
                system,
            } => {
                if let Some(system) = optional_str(record, system)? {
                    messages.push(Message::new(Role::System, system));
                }
                let instruction = required_str(record, instruction)?;
                let input = optional_str(record, input)?.unwrap_or("");
                let user = if input.trim().is_empty() {
                    instruction.to_string()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                messages.push(Message::new(Role::User, user));
                messages.push(Message::new(Role::Assistant, required_str(record, output)?));
            }
            Layout::Sharegpt {
                conversations,
                from,
                value,
            } => {
                convert_turns(
                    record,
                    conversations,
                    from,
                    value,
                    sharegpt_role,
                    &mut messages,
                )?;
            }
            Layout::Messages {
                messages: list,
                role,
                content,
            } => {
                convert_turns(record, list, role, content, openai_role, &mut messages)?;
            }
            Layout::Completion { prompt, completion } => {
                messages.push(Message::new(Role::User, required_str(record, prompt)?));
                messages.push(Message::new(
                    Role::Assistant,
                    required_str(record, completion)?,
                ));
            }
            Layout::Text { text } => {
                return Ok(Example::text(required_str(record, text)?));
            }
        }
        messages.retain(|m| !(m.has_role(Role::System) && m.content.trim().is_empty()));
        if messages.len() > 1 && messages.iter().any(|m| m.role == LEGACY_TEXT_ROLE) {
            return Err(FieldError::new(
                None,
                "role `text` must be the only message of its example".to_string(),
            ));
        }
        Ok(Example::from_messages(messages))
    }
}

impl fmt::Display for Layout {
    /// The format name, plus the fields that differ from its defaults:
    /// `completion (prompt=question, completion=answer)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = self.format();
        let default = Layout::resolve(format, &FieldMap::default());
        let changed: Vec<String> = self
            .named_fields()
            .into_iter()
            .zip(default.named_fields())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((k, a), _)| format!("{k}={a}"))
            .collect();
        if changed.is_empty() {
            write!(f, "{format}")
        } else {
            write!(f, "{format} ({})", changed.join(", "))
        }
    }
}

/// What went wrong converting a record, before file and line are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub key: Option<String>,
    pub message: String,
}

impl FieldError {
    fn new(key: Option<String>, message: String) -> Self {
        FieldError { key, message }
    }
}

/// JSON type names for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn required_str<'v>(record: &'v Value, path: &FieldPath) -> Result<&'v str, FieldError> {
    required_str_named(record, path, path.as_str())
}

/// Like [`required_str`], naming the field `name` in the error (e.g. `messages.2.role`).
fn required_str_named<'v>(
    record: &'v Value,
    path: &FieldPath,
    name: &str,
) -> Result<&'v str, FieldError> {
    match path.get(record) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(FieldError::new(
            Some(name.to_string()),
            format!("missing field `{name}`"),
        )),
        Some(other) => Err(FieldError::new(
            Some(name.to_string()),
            format!(
                "field `{name}`: expected a string, found {}",
                type_name(other)
            ),
        )),
    }
}

fn optional_str<'v>(record: &'v Value, path: &FieldPath) -> Result<Option<&'v str>, FieldError> {
    match path.get(record) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => required_str(record, path).map(Some),
    }
}

/// Role names accepted in sharegpt `from` fields, and the name they get.
fn sharegpt_role(name: &str) -> Option<&'static str> {
    let role = match name.to_ascii_lowercase().as_str() {
        "human" | "user" => Role::User,
        "gpt" | "assistant" | "model" | "chatgpt" | "bot" => Role::Assistant,
        "system" => Role::System,
        "tool" | "function" | "observation" => Role::Tool,
        _ => return None,
    };
    Some(role.as_str())
}

/// Role names accepted in OpenAI-style `role` fields, and the name they get (`text`: the role
/// of raw text in hone's old curated files, which [`Example::from_messages`] reads as text).
fn openai_role(name: &str) -> Option<&'static str> {
    match name {
        "system" | "developer" => Some(Role::System.as_str()),
        "user" => Some(Role::User.as_str()),
        "assistant" => Some(Role::Assistant.as_str()),
        "tool" | "function" => Some(Role::Tool.as_str()),
        LEGACY_TEXT_ROLE => Some(LEGACY_TEXT_ROLE),
        _ => None,
    }
}

fn convert_turns(
    record: &Value,
    list: &FieldPath,
    role_key: &FieldPath,
    content_key: &FieldPath,
    map_role: fn(&str) -> Option<&'static str>,
    out: &mut Vec<Message>,
) -> Result<(), FieldError> {
    let items = match list.get(record) {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(FieldError::new(
                Some(list.to_string()),
                format!("missing field `{list}`"),
            ))
        }
        Some(other) => {
            return Err(FieldError::new(
                Some(list.to_string()),
                format!(
                    "field `{list}`: expected an array, found {}",
                    type_name(other)
                ),
            ))
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = |key: &FieldPath| format!("{list}.{i}.{key}");
        if !item.is_object() {
            return Err(FieldError::new(
                Some(format!("{list}.{i}")),
                format!(
                    "`{list}.{i}`: expected an object, found {}",
                    type_name(item)
                ),
            ));
        }
        let role_name = required_str_named(item, role_key, &at(role_key))?;
        let role = map_role(role_name).ok_or_else(|| {
            FieldError::new(
                Some(at(role_key)),
                format!("field `{}`: unknown role `{role_name}`", at(role_key)),
            )
        })?;
        let content = message_content(item, content_key).map_err(|message| {
            FieldError::new(
                Some(at(content_key)),
                format!("field `{}`: {message}", at(content_key)),
            )
        })?;
        out.push(Message::new(role, content));
    }
    Ok(())
}

/// A message's content: a string, or a list of `{type: "text", text}` parts joined together.
fn message_content(item: &Value, key: &FieldPath) -> Result<String, String> {
    match key.get(item) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for part in parts {
                match part.get("text") {
                    Some(Value::String(s)) => out.push_str(s),
                    _ => return Err(
                        "expected a string or a list of {\"type\": \"text\", \"text\": ...} parts"
                            .into(),
                    ),
                }
            }
            Ok(out)
        }
        None | Some(Value::Null) => Err("missing".into()),
        Some(other) => Err(format!("expected a string, found {}", type_name(other))),
    }
}

/// The outcome of `auto` detection for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub layout: Layout,
    /// How it was chosen, e.g. "auto: 100 of 100 sampled records match".
    pub reason: String,
}

/// How many leading records `auto` looks at.
pub const DETECT_SAMPLE: usize = 100;

/// The layouts `auto` tries, most specific first (earlier wins a tie).
pub fn candidates(fields: &FieldMap) -> Vec<Layout> {
    let mut out: Vec<Layout> = Vec::new();
    let custom = !fields.is_default();
    for format in Format::ALL {
        out.push(Layout::resolve(format, fields));
        if custom {
            continue;
        }
        // Well-known variants of the default names, tried right after their format.
        match format {
            Format::Messages => out.push(Layout::Messages {
                messages: FieldPath::new("conversations"),
                role: FieldPath::new("role"),
                content: FieldPath::new("content"),
            }),
            Format::Sharegpt => out.push(Layout::Sharegpt {
                conversations: FieldPath::new("messages"),
                from: FieldPath::new("from"),
                value: FieldPath::new("value"),
            }),
            Format::Alpaca => out.push(Layout::Alpaca {
                instruction: FieldPath::new("instruction"),
                input: FieldPath::new("instances.0.input"),
                output: FieldPath::new("instances.0.output"),
                system: FieldPath::new("system"),
            }),
            Format::Completion => out.push(Layout::Completion {
                prompt: FieldPath::new("question"),
                completion: FieldPath::new("answer"),
            }),
            Format::Text => {}
        }
    }
    out
}

/// Picks the layout that matches most of the first [`DETECT_SAMPLE`] records.
/// `Err` holds a message naming the keys that were seen.
pub fn detect<'a>(
    records: impl IntoIterator<Item = &'a Value>,
    fields: &FieldMap,
) -> Result<Detection, String> {
    let sample: Vec<&Value> = records.into_iter().take(DETECT_SAMPLE).collect();
    if sample.is_empty() {
        return Err("no records to look at".to_string());
    }
    let candidates = candidates(fields);
    let mut best: Option<(usize, &Layout)> = None;
    for layout in &candidates {
        let hits = sample.iter().filter(|r| layout.matches(r)).count();
        if hits > 0 && best.is_none_or(|(b, _)| hits > b) {
            best = Some((hits, layout));
        }
    }
    match best {
        Some((hits, layout)) => Ok(Detection {
            layout: layout.clone(),
            reason: format!("auto: {hits} of {} sampled records match", sample.len()),
        }),
        None => {
            let keys = match sample[0] {
                Value::Object(map) => map
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => format!("a {}", type_name(other)),
            };
            Err(format!(
                "no known format matches; the first record has {keys} (set `format` and `fields` explicitly)"
            ))
        }
    }
}
