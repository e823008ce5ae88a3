//! Incremental detokenization with stop strings, for streaming.
//!
//! Each new token's text is the difference between two decodings, both made in the context of
//! the last few prompt tokens (as vLLM's detokenizer does): SentencePiece-style decoders drop
//! the leading space of the first token they see, so decoding the generated ids alone would
//! lose the space between prompt and completion. Text is held back while it ends in an
//! incomplete UTF-8 sequence or could be the start of a stop string; a stop string cuts the
//! text before it. The concatenated deltas are the completion's text.

use hone_model::Tokenizer;

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
    context: Vec<u32>,
    context_text: String,
    ids: Vec<u32>,
    /// Bytes of the completion text already handed out.
    emitted: usize,
    stops: Vec<String>,
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
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32], stops: &[String]) -> Self {
        let context = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let context_text = tokenizer.decode(&context).unwrap_or_default();
        Self {
            context,
            context_text,
            ids: Vec::new(),
            emitted: 0,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// The completion text of the ids so far.
    fn text(&self, tokenizer: &Tokenizer) -> String {
        let mut all = self.context.clone();
        all.extend_from_slice(&self.ids);
        match tokenizer.decode(&all) {
            Ok(full) if full.starts_with(&self.context_text) => {
                full[self.context_text.len()..].to_string()
            }
            _ => tokenizer.decode(&self.ids).unwrap_or_default(),
        }
    }

    /// Adds a generated token.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Delta {
        self.ids.push(id);
        let text = self.text(tokenizer);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let delta = self.take(&text, cut);
            return Delta {
                text: delta,
                stopped: true,
            };
        }
        if text.ends_with('\u{FFFD}') {
            return Delta::default(); // an incomplete UTF-8 sequence: wait for its next byte
        }
        let ready = text.len() - held_back(&text, &self.stops);
        Delta {
            text: self.take(&text, ready),
            stopped: false,
        }
    }

    /// At the end of generation: everything not yet handed out.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let text = self.text(tokenizer);
        let end = text.len();
        self.take(&text, end)
    }

    /// Hands out `text[emitted..end]` when both ends are character boundaries.
    fn take(&mut self, text: &str, end: usize) -> String {
        if end > self.emitted && text.is_char_boundary(self.emitted) && text.is_char_boundary(end) {
            let piece = text[self.emitted..end].to_string();
            self.emitted = end;
            piece
        } else {
            String::new()
        }
    }
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
