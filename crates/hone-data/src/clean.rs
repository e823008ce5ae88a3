//! Text cleanup: Unicode NFC normalisation and whitespace cleanup, each switchable and counted.
//!
//! Whitespace cleanup, line by line:
//! - CRLF and lone CR become LF;
//! - a line's leading indentation is kept as is (code stays valid), except on the first line,
//!   where it is removed; after it, every run of horizontal whitespace (spaces, tabs, NBSP and
//!   other Unicode spaces) becomes one space;
//! - trailing whitespace is removed, so whitespace-only lines become empty;
//! - at most one empty line is kept between two non-empty lines; leading and trailing empty
//!   lines are removed;
//! - control characters other than tab and newline, and U+FEFF, are removed.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::example::Example;

/// Which cleanup steps run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanConfig {
    /// Normalise text to Unicode NFC.
    pub nfc: bool,
    /// Clean up whitespace (see the module docs).
    pub whitespace: bool,
}

impl Default for CleanConfig {
    fn default() -> Self {
        CleanConfig {
            nfc: true,
            whitespace: true,
        }
    }
}

/// Which steps changed an example.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanOutcome {
    pub nfc_changed: bool,
    pub whitespace_changed: bool,
}

/// Cleans every piece of text of an example (message contents, raw text) in place.
pub fn clean_example(example: &mut Example, config: &CleanConfig) -> CleanOutcome {
    let mut outcome = CleanOutcome::default();
    for content in example.contents_mut() {
        if config.nfc {
            if let Cow::Owned(s) = nfc(content.as_str()) {
                if s != *content {
                    outcome.nfc_changed = true;
                    *content = s;
                }
            }
        }
        if config.whitespace {
            if let Cow::Owned(s) = clean_whitespace(content.as_str()) {
                if s != *content {
                    outcome.whitespace_changed = true;
                    *content = s;
                }
            }
        }
    }
    outcome
}

/// NFC form of `text`; borrowed when it already is NFC.
pub fn nfc(text: &str) -> Cow<'_, str> {
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

fn is_horizontal_space(c: char) -> bool {
    c != '\n' && c.is_whitespace()
}

fn is_removed_control(c: char) -> bool {
    (c.is_control() && c != '\t' && c != '\n') || c == '\u{feff}'
}

/// `text` with whitespace cleaned up (see the module docs); borrowed when nothing changes.
pub fn clean_whitespace(text: &str) -> Cow<'_, str> {
    if is_clean(text) {
        return Cow::Borrowed(text);
    }
    let unified: Cow<'_, str> = if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        Cow::Borrowed(text)
    };
    let mut out = String::with_capacity(unified.len());
    let mut started = false;
    let mut blank_lines = 0usize;
    for line in unified.split('\n') {
        let Some(start) = line.find(|c: char| !is_horizontal_space(c) && !is_removed_control(c))
        else {
            blank_lines += 1;
            continue;
        };
        if started {
            out.push('\n');
            if blank_lines > 0 {
                out.push('\n');
            }
            out.extend(line[..start].chars().filter(|&c| !is_removed_control(c)));
        }
        started = true;
        blank_lines = 0;
        let mut pending_space = false;
        for c in line[start..].chars() {
            if is_horizontal_space(c) {
                pending_space = true;
            } else if !is_removed_control(c) {
                if pending_space {
                    out.push(' ');
                    pending_space = false;
                }
                out.push(c);
            }
        }
    }
    Cow::Owned(out)
}

/// Fast check that [`clean_whitespace`] would not change `text` (the common ASCII case);
/// `false` only means "take the slow path".
fn is_clean(text: &str) -> bool {
    let bytes = text.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) => return true,
        (Some(b'\n' | b' ' | b'\t'), _) => return false,
        (_, Some(last)) if last.is_ascii_whitespace() => return false,
        _ => {}
    }
    let mut prev = 0u8;
    let mut newlines = 0usize;
    let mut at_line_start = true;
    for &b in bytes {
        match b {
            b'\n' => {
                newlines += 1;
                if prev == b' ' || prev == b'\t' || newlines > 2 {
                    return false;
                }
                at_line_start = true;
            }
            b' ' if !at_line_start && prev == b' ' => return false,
            b'\t' if !at_line_start => return false,
            b' ' | b'\t' => {}
            b if !(0x20..0x7f).contains(&b) => return false,
            _ => at_line_start = false,
        }
        if b != b'\n' {
            newlines = 0;
        }
        prev = b;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_rules() {
        let messy = "  Hello \t world  \r\n\r\n\r\n    indented\u{a0}\u{a0}line\t\n\n\t\n";
        assert_eq!(clean_whitespace(messy), "Hello world\n\n    indented line");
        assert_eq!(clean_whitespace("a\rb\r\nc"), "a\nb\nc");
        assert_eq!(clean_whitespace("x\u{0}y\u{feff}"), "xy");
        assert_eq!(clean_whitespace(" \n\t "), "");
    }

    #[test]
    fn nfc_composes() {
        assert_eq!(nfc("e\u{301}"), "\u{e9}");
        assert!(matches!(nfc("plain"), Cow::Borrowed(_)));
    }

    /// The fast path must agree with the full cleanup on every input.
    #[test]
    fn fast_path_agrees_with_full_cleanup() {
        let alphabet = [
            " ", "\t", "\n", "a", "b", "  ", "\r", "\u{a0}", "\u{1}", "é",
        ];
        let mut state = 12345u64;
        for _ in 0..20000 {
            let mut text = String::new();
            state = crate::shingle::mix64(state);
            let len = (state % 9) as usize;
            for k in 0..len {
                let pick = crate::shingle::mix64(state ^ k as u64) as usize % alphabet.len();
                text.push_str(alphabet[pick]);
            }
            let full = clean_whitespace_slow(&text);
            assert_eq!(clean_whitespace(&text), full, "input {text:?}");
            if is_clean(&text) {
                assert_eq!(full, text, "fast path accepted {text:?}");
            }
        }
    }

    fn clean_whitespace_slow(text: &str) -> String {
        // Run the full algorithm by defeating the fast path with a marker, then remove it.
        let marked = format!("\u{1}{text}");
        clean_whitespace(&marked).into_owned()
    }
}
