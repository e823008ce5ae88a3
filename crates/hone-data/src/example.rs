//! [`Example`]: one training example, the data contract between curation (this crate) and
//! tokenization (`hone-tokenize`), and [`SourcedExample`]: an example with the input file and
//! line it came from, as the curation pipeline carries it.
//!
//! Three kinds, each with its JSON form (one JSONL line of a curated file), told apart by their
//! keys:
//!
//! | kind         | JSON                                     | in the loss (unless `train_on_inputs`)    |
//! |--------------|------------------------------------------|-------------------------------------------|
//! | `Chat`       | `{"messages": [{role, content}, ...]}`   | assistant turns + their end-of-turn token |
//! | `Completion` | `{"prompt": "...", "completion": "..."}` | the completion + EOS                      |
//! | `Text`       | `{"text": "..."}`                        | everything + EOS                          |
//!
//! Curation writes `Chat` and `Text` (the `completion` input format becomes a user/assistant
//! chat).
//!
//! **Old curated files.** Before this form, hone-data wrote raw text as a conversation of one
//! message with the role `text`: `{"messages": [{"role": "text", "content": "..."}]}`. That
//! line still reads as `Text` (here and when such a file is given to `hone data` as input), so
//! prepared data sets made then train exactly as before; the next `hone data` run writes
//! `{"text": ...}`. Nothing else gives the role `text` a meaning.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::message::Message;

/// The role that raw text had in curated files written before `{"text": ...}` (read only).
pub(crate) const LEGACY_TEXT_ROLE: &str = "text";

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
    /// Messages as a file holds them: a conversation, except the old curated raw-text form
    /// (exactly one message, with the role `text`; see the module docs), which is
    /// [`Example::Text`].
    pub fn from_messages(messages: Vec<Message>) -> Self {
        match <[Message; 1]>::try_from(messages) {
            Ok([only]) if only.role == LEGACY_TEXT_ROLE => Self::Text(only.content),
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

    /// True for a raw-text (continued pretraining) example.
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text(_))
    }

    /// Each piece of text with its label: a chat's messages with their roles, a completion's
    /// `prompt` and `completion`, raw text labelled `text`. Curation's checks, exact-duplicate
    /// hash and length counts go over these.
    pub fn parts(&self) -> Box<dyn Iterator<Item = (&str, &str)> + '_> {
        match self {
            Self::Chat(messages) => Box::new(
                messages
                    .iter()
                    .map(|m| (m.role.as_str(), m.content.as_str())),
            ),
            Self::Completion { prompt, completion } => Box::new(
                [
                    ("prompt", prompt.as_str()),
                    ("completion", completion.as_str()),
                ]
                .into_iter(),
            ),
            Self::Text(text) => Box::new(std::iter::once(("text", text.as_str()))),
        }
    }

    /// Every piece of text (see [`Example::parts`]), mutably: what cleanup rewrites.
    pub fn contents_mut(&mut self) -> Vec<&mut String> {
        match self {
            Self::Chat(messages) => messages.iter_mut().map(|m| &mut m.content).collect(),
            Self::Completion { prompt, completion } => vec![prompt, completion],
            Self::Text(text) => vec![text],
        }
    }

    /// Total characters (Unicode scalar values) over all pieces of text.
    pub fn char_len(&self) -> usize {
        self.parts().map(|(_, c)| c.chars().count()).sum()
    }

    /// All pieces of text joined by `\n`: the text that near-duplicate detection and
    /// decontamination look at (roles are not part of it). Borrowed for one piece.
    pub fn joined(&self) -> Cow<'_, str> {
        match self {
            Self::Text(text) => Cow::Borrowed(text),
            Self::Chat(messages) if messages.len() == 1 => Cow::Borrowed(&messages[0].content),
            _ => Cow::Owned(self.joined_text()),
        }
    }

    /// All pieces of text joined by `\n` (see [`Example::joined`]).
    pub fn joined_text(&self) -> String {
        let mut out = String::new();
        for (i, (_, content)) in self.parts().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(content);
        }
        out
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

/// Where an example came from: the input file and the 1-based line its record starts on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    pub file: Arc<str>,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// An example and where it came from, as curation carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcedExample {
    pub example: Example,
    pub source: Source,
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
    fn old_text_role_is_raw_text_only_alone() {
        let line =
            r#"{"messages":[{"role":"text","content":"a"},{"role":"assistant","content":"b"}]}"#;
        let example: Example = serde_json::from_str(line).unwrap();
        assert!(matches!(example, Example::Chat(_)), "{line}");
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
