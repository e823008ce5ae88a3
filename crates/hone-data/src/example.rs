//! The normalised example every input format is converted into.
//!
//! An [`Example`] is a list of role-tagged [`Message`]s, the shape of OpenAI/HF chat data, plus
//! the [`Source`] (file and line) it came from. Raw text for continued pretraining is one
//! message with the role [`Role::Text`]: it is the only message of its example, and the next
//! stage trains on it as-is, without a chat template. This keeps one type and one on-disk form
//! (`{"messages":[{"role":"text","content":"..."}]}`) for every kind of data.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
    /// Raw text for continued pretraining (always the only message of its example).
    Text,
}

impl Role {
    /// The lowercase name used on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Text => "text",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation (or the whole text of a pretraining example).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
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

/// A normalised training example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub messages: Vec<Message>,
    pub source: Source,
}

impl Example {
    /// True for a raw-text (continued pretraining) example.
    pub fn is_text(&self) -> bool {
        matches!(self.messages.as_slice(), [m] if m.role == Role::Text)
    }

    /// Total characters (Unicode scalar values) over all message contents.
    pub fn char_len(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum()
    }

    /// All message contents joined by `\n`: the text that near-duplicate detection and
    /// decontamination look at (roles are not part of it). Borrowed for one message.
    pub fn text(&self) -> Cow<'_, str> {
        match self.messages.as_slice() {
            [only] => Cow::Borrowed(&only.content),
            _ => Cow::Owned(self.joined_text()),
        }
    }

    /// All message contents joined by `\n` (see [`Example::text`]).
    pub fn joined_text(&self) -> String {
        let len = self.messages.iter().map(|m| m.content.len() + 1).sum();
        let mut out = String::with_capacity(len);
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&m.content);
        }
        out
    }
}
