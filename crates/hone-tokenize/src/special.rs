//! Warnings for template markers the tokenizer does not know as single tokens.
//!
//! A chat template written for one model family (`<|im_start|>`, `<|eot_id|>`,
//! `<start_of_turn>`) used with another family's tokenizer still renders, but each marker is
//! split into ordinary pieces (`<`, `|`, `im`, `_start`, ...) that the base model never saw as
//! one token: training then has to teach the model a long, unusual stop sequence, and a
//! server that stops on the EOS id never sees it. [`special_token_warnings`] finds such
//! markers so the user hears about it before training.
//!
//! Candidates are the marker-like strings in the text the template renders for a few sample
//! conversations (so that text shown only with tools, such as `<tools>`, does not count):
//! `<|...|>`, and `<name>` / `</name>` not part of `<<...>>` (Llama 2's `<<SYS>>` is plain
//! text). The template's special-token strings (`bos_token`, `eos_token`,
//! `additional_special_tokens`, ...) are candidates too when they appear in a rendering. When
//! no sample renders, the template source is scanned instead. A candidate is reported when
//! encoding it alone (without special tokens) does not give exactly one token. Bracket markers
//! (`[INST]`) are only checked when listed among the special tokens, since some models use them
//! as plain text.

use std::collections::BTreeSet;
use std::fmt;

use crate::chat::{ChatTemplate, ExtraContext, Message};

/// A marker that the tokenizer splits into several tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokenWarning {
    /// The marker, e.g. `<|im_start|>`.
    pub marker: String,
    /// The pieces it is encoded as.
    pub pieces: Vec<String>,
}

impl fmt::Display for SpecialTokenWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the chat template writes {:?}, which the tokenizer does not have as one token (it \
             becomes {} pieces: {}); the base model never saw this marker. Use the template \
             of the model's own family, or add the token to the tokenizer and train its \
             embedding",
            self.marker,
            self.pieces.len(),
            self.pieces.join(" "),
        )
    }
}

/// Sample conversations rendered to find the markers a template writes.
fn samples() -> Vec<(Vec<Message>, bool)> {
    let turn = || vec![Message::user("Hi"), Message::assistant("Hello")];
    let mut with_system = vec![Message::system("Be brief.")];
    with_system.extend(turn());
    vec![(turn(), false), (turn(), true), (with_system, false)]
}

/// Markers the template writes that `tokenizer` splits into several tokens, in order of first
/// appearance. See the module docs for what counts as a marker.
pub fn special_token_warnings(
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    extra: &ExtraContext,
) -> Vec<SpecialTokenWarning> {
    let renderings: Vec<String> = samples()
        .into_iter()
        .filter_map(|(messages, prompt)| template.render(&messages, prompt, extra).ok())
        .collect();
    let text = if renderings.is_empty() {
        template.source().to_string()
    } else {
        renderings.join("\n")
    };
    let mut candidates = marker_candidates(&text);
    let tokens = template.special_tokens();
    let listed = [
        &tokens.bos_token,
        &tokens.eos_token,
        &tokens.unk_token,
        &tokens.pad_token,
    ]
    .into_iter()
    .flatten()
    .chain(tokens.additional_special_tokens.iter().flatten());
    for token in listed {
        if !token.is_empty() && text.contains(token.as_str()) && !candidates.contains(token) {
            candidates.push(token.clone());
        }
    }
    candidates
        .into_iter()
        .filter_map(|marker| {
            let encoding = tokenizer.encode(marker.as_str(), false).ok()?;
            (encoding.get_ids().len() != 1).then(|| SpecialTokenWarning {
                pieces: encoding.get_tokens().to_vec(),
                marker,
            })
        })
        .collect()
}

/// Marker-like substrings of `text` (`<|...|>`, `<name>`, `</name>`), each once, in order.
pub fn marker_candidates(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        let found = pipe_marker(&text[i..]).or_else(|| {
            let after_angle = i > 0 && bytes[i - 1] == b'<';
            (!after_angle).then(|| tag_marker(&text[i..])).flatten()
        });
        match found {
            Some(len) => {
                let marker = &text[i..i + len];
                if seen.insert(marker.to_string()) {
                    out.push(marker.to_string());
                }
                i += len;
            }
            None => i += 1,
        }
    }
    out
}

/// Length of a `<|name|>` marker at the start of `s` (no whitespace or quotes inside).
fn pipe_marker(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("<|")?;
    let end = rest.find("|>")?;
    let inner = &rest[..end];
    let plain = !inner.is_empty()
        && inner.len() <= 64
        && inner
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '<' | '>' | '"' | '\'' | '|'));
    plain.then_some(2 + end + 2)
}

/// Length of a `<name>` or `</name>` marker at the start of `s`, not followed by `>`.
fn tag_marker(s: &str) -> Option<usize> {
    let rest = &s[1..];
    let body = rest.strip_prefix('/').unwrap_or(rest);
    let slash = rest.len() - body.len();
    let first = body.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '_') {
        return None;
    }
    let name_len = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        .unwrap_or(body.len());
    if name_len > 64 || !body[name_len..].starts_with('>') {
        return None;
    }
    if body[name_len + 1..].starts_with('>') {
        return None;
    }
    Some(1 + slash + name_len + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_and_plain_text_is_not() {
        let text = "<s>[INST] <<SYS>>\nx<</SYS>>\n\nhi [/INST]<|im_start|>user\na < b > c\
                    <start_of_turn>model</s><|im_start|><| bad |><a href=x>";
        assert_eq!(
            marker_candidates(text),
            ["<s>", "<|im_start|>", "<start_of_turn>", "</s>"]
        );
    }
}
