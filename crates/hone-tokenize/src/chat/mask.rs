//! Assistant spans for loss masks: which bytes of a rendered conversation the model is trained
//! to produce.
//!
//! For every assistant message `i` the conversation is rendered three ways with the same
//! template: `messages[..i]` with the generation prompt (`P`), `messages[..=i]` without it
//! (`T`), and the whole conversation (`F`). The span of message `i` runs from the end of `P`
//! to the end of `T` (trailing whitespace excluded), so it covers the assistant content and
//! the end-of-turn marker the template writes after it (`<|im_end|>`, `<|eot_id|>`, `</s>`,
//! `<end_of_turn>`). This works for any template that is *prefix-stable*: `T` (less trailing
//! whitespace) must be a prefix of `F`, and `P` a prefix of `T` up to trailing whitespace
//! (some templates print a newline after the generation prompt that a real turn does not
//! have). Templates that rewrite earlier turns depending on what follows (e.g. Mistral's,
//! which moves the system prompt into the *last* user turn) are reported as
//! [`TemplateError::NotPrefixStable`] instead of producing a wrong mask.
//!
//! This plays the role of transformers' `return_assistant_tokens_mask`, which needs
//! `{% generation %}` markers that few templates have.

use serde::{Deserialize, Serialize};

use super::error::TemplateError;
use super::template::{ChatTemplate, ExtraContext};
use hone_data::Message;

/// The byte range `start..end` of one assistant turn (content and end-of-turn marker) in a
/// rendered conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantSpan {
    /// Index of the assistant message in the conversation.
    pub message_index: usize,
    /// First byte of the span.
    pub start: usize,
    /// One past the last byte of the span.
    pub end: usize,
}

/// A rendered conversation and the spans of its assistant turns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedConversation {
    /// The full rendering (no generation prompt).
    pub text: String,
    /// One span per assistant message, ordered and non-overlapping.
    pub assistant_spans: Vec<AssistantSpan>,
}

impl RenderedConversation {
    /// The text covered by a span.
    pub fn span_text(&self, span: &AssistantSpan) -> &str {
        self.text.get(span.start..span.end).unwrap_or_default()
    }
}

/// Per-token loss mask from a tokenizer's byte offsets (`(start, end)` per token, as in
/// `tokenizers::Encoding::get_offsets` over the rendered text): a token is trained on when it
/// overlaps an assistant span. Tokens with empty offsets (added by post-processing) are not.
pub fn token_mask_from_offsets(spans: &[AssistantSpan], offsets: &[(usize, usize)]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, end)| {
            if start >= end {
                return false;
            }
            // First span ending after the token starts; spans are sorted and disjoint.
            let i = spans.partition_point(|s| s.end <= start);
            spans.get(i).is_some_and(|s| s.start < end)
        })
        .collect()
}

/// Length of the longest common prefix, on a char boundary of both strings.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// A short description of where two renderings part.
fn divergence(label_a: &str, a: &str, label_b: &str, b: &str) -> String {
    let at = common_prefix_len(a, b);
    let snippet = |s: &str| -> String { s[at..].chars().take(40).collect() };
    format!(
        "they differ from byte {at}: {label_a} continues {:?}, {label_b} continues {:?}",
        snippet(a),
        snippet(b)
    )
}

impl ChatTemplate {
    /// Renders `messages` (without generation prompt) and finds the byte span of every
    /// assistant turn; see the module docs for the method and its requirements.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
        extra: &ExtraContext,
    ) -> Result<RenderedConversation, TemplateError> {
        let full = self.render(messages, false, extra)?;
        let mut spans: Vec<AssistantSpan> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if !message.is_assistant() {
                continue;
            }
            let unstable = |detail: String| TemplateError::NotPrefixStable {
                template: self.name().to_string(),
                message_index: i,
                detail,
            };
            let turn = self.render(&messages[..=i], false, extra)?;
            let turn_end = turn.trim_end().len();
            if !full.starts_with(&turn[..turn_end]) {
                return Err(unstable(format!(
                    "the rendering of messages[..={i}] is not a prefix of the full rendering; {}",
                    divergence("messages[..=i]", &turn, "the full rendering", &full)
                )));
            }
            let prompt = self.render(&messages[..i], true, extra)?;
            let start = if turn.starts_with(&prompt) {
                prompt.len()
            } else {
                let common = common_prefix_len(&prompt, &turn);
                if !prompt[common..].chars().all(char::is_whitespace) {
                    return Err(unstable(format!(
                        "the rendering of messages[..{i}] with the generation prompt is not a \
                         prefix of the rendering of messages[..={i}]; {}",
                        divergence("the prompt", &prompt, "the turn", &turn)
                    )));
                }
                common
            };
            let end = turn_end.max(start);
            if let Some(previous) = spans.last() {
                if start < previous.end {
                    return Err(unstable(format!(
                        "its span starts at byte {start}, inside the previous assistant span \
                         ({}..{})",
                        previous.start, previous.end
                    )));
                }
            }
            spans.push(AssistantSpan {
                message_index: i,
                start,
                end,
            });
        }
        Ok(RenderedConversation {
            text: full,
            assistant_spans: spans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, end: usize) -> AssistantSpan {
        AssistantSpan {
            message_index: 0,
            start,
            end,
        }
    }

    #[test]
    fn tokens_overlapping_spans_are_masked_in() {
        let spans = [span(5, 10), span(20, 25)];
        let offsets = [
            (0, 5),
            (5, 7),
            (7, 10),
            (10, 12),
            (0, 0),
            (18, 21),
            (24, 30),
            (30, 31),
        ];
        assert_eq!(
            token_mask_from_offsets(&spans, &offsets),
            [false, true, true, false, false, true, true, false]
        );
    }

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("aé", "aè"), 1);
        assert_eq!(common_prefix_len("abc", "ab"), 2);
        assert_eq!(common_prefix_len("", "x"), 0);
    }
}
