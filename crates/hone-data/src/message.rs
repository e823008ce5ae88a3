//! [`Message`]: one turn of a conversation, the unit of chat data from curation to the chat
//! template; [`Role`]: the roles curation normalises speakers to.
//!
//! Mirrors the dicts `transformers` passes as `messages`: `role` and `content`, plus any other
//! keys (`tool_calls`, `tool_call_id`, `name`, ...) which are handed to the template unchanged.
//!
//! `content` is text. OpenAI-style data also has `"content": null` (assistant turns that only
//! call tools) and lists of content parts (`[{"type": "text", "text": ...}]`); templates tell
//! these apart (`message.content is none`, `is string`), so when deserialising such a message
//! the original JSON value is kept in `extra["content"]` and is what the template sees, while
//! `content` holds its text (empty for `null`, the text parts joined for a list).

use std::fmt;

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The roles curation gives speakers (`developer` becomes `system`, sharegpt's `gpt` becomes
/// `assistant`, ...). A [`Message`]'s role is a string, because chat templates may accept
/// others (`ipython`, ...); these are the ones hone-data writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The lowercase name used on disk and by chat templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Role> for String {
    fn from(role: Role) -> String {
        role.as_str().to_string()
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ... (templates decide what they accept).
    pub role: String,
    /// The text of the turn.
    pub content: String,
    /// Any further fields, passed through to the template as JSON values (a `content` key
    /// here replaces the text above in what the template sees; see the module docs).
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with only `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: Map::new(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// Adds an extra field (e.g. `tool_calls`) visible to the template.
    pub fn with_field(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// Whether the message has this role.
    pub fn has_role(&self, role: Role) -> bool {
        self.role == role.as_str()
    }

    /// Whether this turn is one the model produces (and is trained on).
    pub fn is_assistant(&self) -> bool {
        self.has_role(Role::Assistant)
    }

    /// The `content` value the template sees: `extra["content"]` if set, else the text.
    pub fn template_content(&self) -> Value {
        self.extra
            .get("content")
            .cloned()
            .unwrap_or_else(|| Value::String(self.content.clone()))
    }
}

/// The text of a list of content parts: the `text` of each part, joined.
fn parts_text(parts: &[Value]) -> String {
    parts
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect()
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut extra = Map::deserialize(deserializer)?;
        let role = match extra.shift_remove("role") {
            Some(Value::String(role)) => role,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "message `role` must be a string, found {other}"
                )));
            }
            None => return Err(D::Error::missing_field("role")),
        };
        let content = match extra.shift_remove("content") {
            Some(Value::String(text)) => text,
            Some(Value::Null) => {
                extra.insert("content".into(), Value::Null);
                String::new()
            }
            Some(Value::Array(parts)) => {
                let text = parts_text(&parts);
                extra.insert("content".into(), Value::Array(parts));
                text
            }
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "message `content` must be a string, null or a list of parts, found {other}"
                )));
            }
            None => return Err(D::Error::missing_field("content")),
        };
        Ok(Message {
            role,
            content,
            extra,
        })
    }
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rest = self
            .extra
            .iter()
            .filter(|(k, _)| k.as_str() != "role" && k.as_str() != "content");
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        map.serialize_entry("content", &self.template_content())?;
        for (key, value) in rest {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_fields_round_trip_in_order() {
        let text = r#"{"role":"assistant","content":"x","tool_calls":[{"id":"1"}],"name":"n"}"#;
        let m: Message = serde_json::from_str(text).unwrap();
        assert_eq!((m.role.as_str(), m.content.as_str()), ("assistant", "x"));
        assert_eq!(m.extra.keys().collect::<Vec<_>>(), ["tool_calls", "name"]);
        assert_eq!(serde_json::to_string(&m).unwrap(), text);
    }

    #[test]
    fn null_and_list_content_are_kept_for_the_template() {
        let m: Message =
            serde_json::from_value(json!({"role": "assistant", "content": null})).unwrap();
        assert_eq!(m.content, "");
        assert_eq!(m.template_content(), Value::Null);
        let parts = json!([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]);
        let m: Message =
            serde_json::from_value(json!({"role": "user", "content": parts.clone()})).unwrap();
        assert_eq!(m.content, "ab");
        assert_eq!(m.template_content(), parts);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"role": "user", "content": parts})
        );
    }

    #[test]
    fn bad_messages_are_rejected_with_the_field_named() {
        let err = serde_json::from_value::<Message>(json!({"content": "x"})).unwrap_err();
        assert!(err.to_string().contains("role"), "{err}");
        let err =
            serde_json::from_value::<Message>(json!({"role": "user", "content": 3})).unwrap_err();
        assert!(err.to_string().contains("content"), "{err}");
    }
}
