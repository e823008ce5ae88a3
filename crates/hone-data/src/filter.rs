//! Example filters: empty examples, chats without an assistant turn, and length bounds in
//! characters and (when the caller gives a token counter) tokens.
//!
//! Lengths are totals over all message contents; chat-template tokens are not counted.

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::example::Example;
use crate::report::RemovalReason;

/// Which filters run; the bounds are inclusive and off when `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Drop examples with no message or with an empty (after cleanup) message.
    pub drop_empty: bool,
    /// Drop chat examples without any assistant message (raw text and completions are
    /// exempt).
    pub require_assistant: bool,
    /// Minimum total characters.
    pub min_chars: Option<usize>,
    /// Maximum total characters.
    pub max_chars: Option<usize>,
    /// Minimum total tokens (needs a token counter).
    pub min_tokens: Option<usize>,
    /// Maximum total tokens (needs a token counter).
    pub max_tokens: Option<usize>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            drop_empty: true,
            require_assistant: true,
            min_chars: None,
            max_chars: None,
            min_tokens: None,
            max_tokens: None,
        }
    }
}

impl FilterConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        if let (Some(lo), Some(hi)) = (self.min_chars, self.max_chars) {
            if lo > hi {
                return Err(DataError::config(
                    "filter.min_chars",
                    format!("min_chars ({lo}) is above max_chars ({hi})"),
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_tokens, self.max_tokens) {
            if lo > hi {
                return Err(DataError::config(
                    "filter.min_tokens",
                    format!("min_tokens ({lo}) is above max_tokens ({hi})"),
                ));
            }
        }
        Ok(())
    }

    /// True when a token bound is set.
    pub fn needs_tokens(&self) -> bool {
        self.min_tokens.is_some() || self.max_tokens.is_some()
    }

    /// The structural and character-length checks; `None` keeps the example.
    pub fn check_chars(&self, example: &Example, chars: usize) -> Option<(RemovalReason, String)> {
        if self.drop_empty {
            if matches!(example, Example::Chat(messages) if messages.is_empty()) {
                return Some((RemovalReason::Empty, "no messages".to_string()));
            }
            if let Some((label, _)) = example.parts().find(|(_, c)| c.trim().is_empty()) {
                return Some((RemovalReason::Empty, format!("empty {label} message")));
            }
        }
        let no_assistant = match example {
            Example::Chat(messages) => !messages.iter().any(|m| m.is_assistant()),
            Example::Completion { .. } | Example::Text(_) => false,
        };
        if self.require_assistant && no_assistant {
            return Some((
                RemovalReason::NoAssistant,
                "no assistant message".to_string(),
            ));
        }
        bound_check(
            chars,
            self.min_chars,
            self.max_chars,
            "characters",
            RemovalReason::TooShort,
            RemovalReason::TooLong,
        )
    }

    /// The token-length checks; `None` keeps the example.
    pub fn check_tokens(&self, tokens: usize) -> Option<(RemovalReason, String)> {
        bound_check(
            tokens,
            self.min_tokens,
            self.max_tokens,
            "tokens",
            RemovalReason::TooFewTokens,
            RemovalReason::TooManyTokens,
        )
    }
}

fn bound_check(
    value: usize,
    min: Option<usize>,
    max: Option<usize>,
    what: &str,
    low: RemovalReason,
    high: RemovalReason,
) -> Option<(RemovalReason, String)> {
    if let Some(min) = min.filter(|&m| value < m) {
        return Some((low, format!("{value} {what} < min {min}")));
    }
    if let Some(max) = max.filter(|&m| value > m) {
        return Some((high, format!("{value} {what} > max {max}")));
    }
    None
}
