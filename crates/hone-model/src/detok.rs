//! Incremental, context-aware detokenization with stop strings: the one way generated ids
//! become text in hone (`hone generate`, batched generation in `hone eval`, `hone serve`), so
//! the three give the same text for the same ids.
//!
//! - **Context**: decoding starts inside the last few prompt tokens, as vLLM's detokenizer
//!   does: SentencePiece-style decoders drop the leading space of the first token they see, so
//!   decoding the generated ids alone would lose the space between prompt and completion.
//! - **Incremental**: each token decodes a short window of ids — from the start of the previous
//!   piece (`prefix`) to the end — and hands out what the window decodes to beyond the previous
//!   piece, so a step costs the same at token 10 as at token 10,000 (re-decoding everything
//!   each step is quadratic). A window that ends in an incomplete UTF-8 sequence (U+FFFD) waits
//!   for the next token.
//! - **Stop strings**: text that could be the start of a stop string is held back; a stop
//!   string cuts the text before it and ends the stream.

use crate::tokenizer::Tokenizer;

/// Prompt tokens decoded together with the completion.
const CONTEXT_TOKENS: usize = 4;

/// What one new token produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// Text that is now final (possibly empty).
    pub text: String,
    /// A stop string was reached: the text ends before it, and generation ends.
    pub stopped: bool,
}

/// The text state of one generation.
#[derive(Debug, Clone)]
pub struct TextStream {
    /// Context tokens followed by the generated ones.
    ids: Vec<u32>,
    /// Start of the window the next decode begins at.
    prefix: usize,
    /// End of the ids whose text is already in `text`.
    read: usize,
    /// Completion text decoded so far (final or held back).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

/// Largest `n` such that the last `n` bytes of `text` start some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for n in (1..stop.len().min(text.len() + 1)).rev() {
            let at = text.len() - n;
            if text.is_char_boundary(at) && stop.as_bytes().starts_with(&text.as_bytes()[at..]) {
                hold = hold.max(n);
                break;
            }
        }
    }
    hold
}

impl TextStream {
    /// A stream continuing `prompt`, cut at any of `stops` (empty strings are ignored).
    pub fn new(prompt: &[u32], stops: &[String]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read = ids.len();
        Self {
            ids,
            prefix: 0,
            read,
            text: String::new(),
            emitted: 0,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            stopped: false,
        }
    }

    /// The text `ids[prefix..]` decodes to beyond `ids[prefix..read]`, or `None` while it is
    /// not final (nothing new, or an incomplete UTF-8 sequence at its end).
    fn advance(&mut self, tokenizer: &Tokenizer, at_end: bool) -> Option<String> {
        let before = tokenizer
            .decode(&self.ids[self.prefix..self.read])
            .unwrap_or_default();
        let after = tokenizer
            .decode(&self.ids[self.prefix..])
            .unwrap_or_default();
        if after.len() <= before.len() || (!at_end && after.ends_with('\u{FFFD}')) {
            return None;
        }
        let piece = match after.strip_prefix(before.as_str()) {
            Some(piece) => piece.to_string(),
            // A decoder that rewrites earlier text: take what lies beyond its length.
            None => after
                .get(before.len()..)
                .map(str::to_string)
                .unwrap_or_default(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Some(piece)
    }

    /// Adds a generated token.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Delta {
        if self.stopped {
            return Delta {
                text: String::new(),
                stopped: true,
            };
        }
        self.ids.push(id);
        let Some(piece) = self.advance(tokenizer, false) else {
            return Delta::default();
        };
        self.text.push_str(&piece);
        self.emit()
    }

    /// Hands out the final text: up to a stop string (and stops), or all but what could start
    /// one.
    fn emit(&mut self) -> Delta {
        // A stop string can only newly appear within the held-back tail plus the new piece.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let cut = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(cut) = cut {
            self.stopped = true;
            self.text.truncate(cut);
            return Delta {
                text: self.take(cut),
                stopped: true,
            };
        }
        let ready = self.text.len() - held_back(&self.text, &self.stops);
        Delta {
            text: self.take(ready),
            stopped: false,
        }
    }

    /// At the end of generation: everything not yet handed out (an incomplete UTF-8 sequence
    /// at the very end included, as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        if !self.stopped && self.read < self.ids.len() {
            if let Some(piece) = self.advance(tokenizer, true) {
                self.text.push_str(&piece);
            }
        }
        let end = self.text.len();
        self.take(end)
    }

    /// The completion text so far (handed out or held back).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Hands out `text[emitted..end]`.
    fn take(&mut self, end: usize) -> String {
        if end > self.emitted {
            let piece = self.text[self.emitted..end].to_string();
            self.emitted = end;
            piece
        } else {
            String::new()
        }
    }
}

/// The completion text of `generated` after `prompt`, as a [`TextStream`] gives it (cut at the
/// first stop string).
pub fn completion_text(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    generated: &[u32],
    stops: &[String],
) -> String {
    let mut stream = TextStream::new(prompt, stops);
    for &id in generated {
        if stream.push(tokenizer, id).stopped {
            break;
        }
    }
    stream.finish(tokenizer);
    stream.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_keeps_a_forming_stop_string() {
        let stops = vec!["\n\nUser:".to_string()];
        assert_eq!(held_back("Hello\n\nUs", &stops), 4);
        assert_eq!(held_back("Hello", &stops), 0);
    }
}
