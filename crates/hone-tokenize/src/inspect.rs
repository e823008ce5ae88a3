//! Human-readable views of rows, for checking masks by eye (`hone data inspect --tokens`).
//!
//! [`format_tokens`] prints one line per token: index, segment, position, id, whether it is
//! in the loss, and its text (the token decoded alone, escaped like a Rust string, so `\n` and
//! spaces are visible). [`format_masked_text`] prints the row's text with every run of
//! trained tokens between `[[` and `]]`, the quickest way to see what the model learns to say.

use std::fmt::Write as _;

use crate::row::{Row, IGNORE_INDEX, PAD_SEGMENT};

/// The text of one token: decoded alone (special tokens kept), or the vocabulary piece when
/// decoding fails or yields replacement characters (a byte of a multi-byte character).
fn token_text(tokenizer: &tokenizers::Tokenizer, id: u32) -> String {
    match tokenizer.decode(&[id], false) {
        Ok(text) if !text.contains('\u{FFFD}') => text,
        _ => tokenizer
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id} not in vocabulary>")),
    }
}

/// One line per token with its loss status; a summary line first.
///
/// ```text
/// 12 tokens (1 example, 0 padding), 5 in the loss
///   idx seg  pos      id  loss  token
///     0   1    0     509     -  "<|begin_of_text|>"
///     7   1    7      72  LOSS  "Hello"
/// ```
pub fn format_tokens(row: &Row, tokenizer: &tokenizers::Tokenizer) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} tokens ({} example{}, {} padding), {} in the loss",
        row.len(),
        row.examples(),
        if row.examples() == 1 { "" } else { "s" },
        row.padding_tokens(),
        row.label_tokens(),
    );
    let _ = writeln!(
        out,
        "{:>5} {:>3} {:>4} {:>7}  loss  token",
        "idx", "seg", "pos", "id"
    );
    for (i, &id) in row.input_ids.iter().enumerate() {
        let segment = row.segment_ids.get(i).copied().unwrap_or(PAD_SEGMENT);
        let position = row.position_ids.get(i).copied().unwrap_or(0);
        let label = row.labels.get(i).copied().unwrap_or(IGNORE_INDEX);
        let status = match (segment, label) {
            (PAD_SEGMENT, _) => " pad",
            (_, IGNORE_INDEX) => "   -",
            _ => "LOSS",
        };
        let segment = if segment == PAD_SEGMENT {
            "-".to_string()
        } else {
            segment.to_string()
        };
        let _ = writeln!(
            out,
            "{i:>5} {segment:>3} {position:>4} {id:>7}  {status}  {:?}",
            token_text(tokenizer, id)
        );
    }
    out
}

/// The decoded text of the row's real tokens with each run of in-loss tokens wrapped in
/// `[[` `]]`, and each example boundary shown as a line `--- example N ---`.
pub fn format_masked_text(row: &Row, tokenizer: &tokenizers::Tokenizer) -> String {
    let mut out = String::new();
    let mut i = 0;
    let n = row.len();
    let mut current_segment = None;
    while i < n {
        let segment = row.segment_ids[i];
        if segment == PAD_SEGMENT {
            i += 1;
            continue;
        }
        if current_segment != Some(segment) {
            let _ = writeln!(out, "--- example {segment} ---");
            current_segment = Some(segment);
        }
        let trained = row.labels[i] != IGNORE_INDEX;
        let start = i;
        while i < n && row.segment_ids[i] == segment && (row.labels[i] != IGNORE_INDEX) == trained {
            i += 1;
        }
        let text = tokenizer
            .decode(&row.input_ids[start..i], false)
            .unwrap_or_else(|e| format!("<cannot decode: {e}>"));
        if trained {
            let _ = write!(out, "[[{text}]]");
        } else {
            out.push_str(&text);
        }
        if row.segment_ids.get(i).is_some_and(|&s| s != segment) {
            out.push('\n');
        }
    }
    out
}
