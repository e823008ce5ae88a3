//! [`Example`]: one training example as this stage receives it.
//!
//! Three kinds, each with its JSON form (one JSONL line):
//!
//! | kind         | JSON                                   | in the loss (unless `train_on_inputs`) |
//! |--------------|----------------------------------------|----------------------------------------|
//! | `Chat`       | `{"messages": [{role, content}, ...]}` | assistant turns + their end-of-turn token |
//! | `Completion` | `{"prompt": "...", "completion": "..."}` | the completion + EOS                 |
//! | `Text`       | `{"text": "..."}`                      | everything + EOS                       |
//!
//! The curated data of `hone-data` stores raw text as `{"messages": [{"role": "text",
//! "content": ...}]}`; a conversation made of exactly one `text` message reads as `Text`.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chat::Message;

/// The role `hone-data` gives to raw pretraining text.
const TEXT_ROLE: &str = "text";

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A conversation, rendered with the chat template.
    Chat(Vec<Message>),
    /// A prompt and its completion, concatenated as they are (no template).
    Completion {
        /// Text the model is conditioned on.
        prompt: String,
        /// Text the model learns to produce.
        completion: String,
    },
    /// Raw text for continued pretraining.
    Text(String),
}

impl Example {
    /// A conversation; one message with the role `text` becomes [`Example::Text`].
    pub fn from_messages(messages: Vec<Message>) -> Self {
        match <[Message; 1]>::try_from(messages) {
            Ok([only]) if only.role == TEXT_ROLE => Self::Text(only.content),
            Ok([only]) => Self::Chat(vec![only]),
            Err(messages) => Self::Chat(messages),
        }
    }

    /// A prompt/completion pair.
    pub fn completion(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Self::Completion {
            prompt: prompt.into(),
            completion: completion.into(),
        }
    }

    /// Raw text.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }

    /// `chat`, `completion` or `text`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Chat(_) => "chat",
            Self::Completion { .. } => "completion",
            Self::Text(_) => "text",
        }
    }
}

/// The union of the JSON forms, to tell them apart with a clear error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExample {
    messages: Option<Vec<Message>>,
    prompt: Option<String>,
    completion: Option<String>,
    text: Option<String>,
}

impl<'de> Deserialize<'de> for Example {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawExample::deserialize(deserializer)?;
        match raw {
            RawExample {
                messages: Some(messages),
                prompt: None,
                completion: None,
                text: None,
            } => Ok(Self::from_messages(messages)),
            RawExample {
                messages: None,
                prompt: Some(prompt),
                completion: Some(completion),
                text: None,
            } => Ok(Self::Completion { prompt, completion }),
            RawExample {
                messages: None,
                prompt: None,
                completion: None,
                text: Some(text),
            } => Ok(Self::Text(text)),
            _ => Err(D::Error::custom(
                "an example must have exactly one of: `messages`; `prompt` and `completion`; \
                 `text`",
            )),
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum RawOut<'a> {
    Chat {
        messages: &'a [Message],
    },
    Completion {
        prompt: &'a str,
        completion: &'a str,
    },
    Text {
        text: &'a str,
    },
}

impl Serialize for Example {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let out = match self {
            Self::Chat(messages) => RawOut::Chat { messages },
            Self::Completion { prompt, completion } => RawOut::Completion { prompt, completion },
            Self::Text(text) => RawOut::Text { text },
        };
        out.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms_round_trip() {
        for line in [
            r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Yo"}]}"#,
            r#"{"prompt":"2+2=","completion":"4"}"#,
            r#"{"text":"Once upon a time"}"#,
        ] {
            let example: Example = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&example).unwrap(), line);
        }
    }

    #[test]
    fn a_single_text_message_is_raw_text() {
        let line = r#"{"messages":[{"role":"text","content":"abc"}]}"#;
        let example: Example = serde_json::from_str(line).unwrap();
        assert_eq!(example, Example::text("abc"));
    }

    #[test]
    fn ambiguous_or_unknown_shapes_are_rejected() {
        for line in [
            r#"{"prompt":"a"}"#,
            r#"{"text":"a","prompt":"b","completion":"c"}"#,
            r#"{"body":"a"}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<Example>(line).is_err(), "{line}");
        }
    }
}
