//! Tokenized examples -> rows: packing (several examples per fixed-length row) or one example
//! per row (padded at batch time), and the numbers of the [`TokenizeReport`].
//!
//! Packing is best-fit decreasing: examples are taken longest first (ties in input order) and
//! each goes into the open row with the least room that still fits it (ties: the oldest row),
//! or starts a new row. It is deterministic, runs in `O(n log n)`, and leaves little padding
//! when short examples can fill the gaps left by long ones. Every row is then padded to exactly
//! `max_seq_len` tokens. Inside a row, examples keep the order they were placed in; the
//! training loader shuffles rows.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::encode::TokenizedExample;
use crate::row::Row;

/// Packs examples (each at most `max_seq_len` tokens; longer ones are cut to it) into rows of
/// exactly `max_seq_len` tokens. See the module docs for the placement rule.
pub fn pack(examples: &[TokenizedExample], max_seq_len: usize, pad_id: u32) -> Vec<Row> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    // Stable: equal lengths keep input order.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));

    // Open rows by (room left, row index): the first entry with room >= len is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    for i in order {
        let len = examples[i].len().min(max_seq_len);
        if len == 0 {
            continue;
        }
        let row = match open.range((len, 0)..).next().copied() {
            Some(entry) => {
                open.remove(&entry);
                entry.1
            }
            None => {
                members.push(Vec::new());
                room.push(max_seq_len);
                members.len() - 1
            }
        };
        members[row].push(i);
        room[row] -= len;
        if room[row] > 0 {
            open.insert((room[row], row));
        }
    }

    members
        .into_iter()
        .map(|indices| {
            let mut row = Row::default();
            for i in indices {
                let e = &examples[i];
                let len = e.len().min(max_seq_len);
                row.push_example(&e.input_ids[..len], &e.labels[..len]);
            }
            let missing = max_seq_len - row.len();
            row.pad(missing, pad_id);
            row
        })
        .collect()
}

/// One row per example, unpadded (a batch pads them, see [`crate::Batch::collate`]).
pub fn one_per_row(examples: &[TokenizedExample]) -> Vec<Row> {
    examples
        .iter()
        .filter(|e| !e.is_empty())
        .map(TokenizedExample::to_row)
        .collect()
}

/// What tokenization produced: counts a user checks before training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeReport {
    /// Examples given.
    pub examples: usize,
    /// Examples in the rows.
    pub kept: usize,
    /// Kept examples that were cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left out because they were longer than `max_seq_len` (policy `drop`).
    pub dropped_too_long: usize,
    /// Examples left out because no token of theirs was in the loss (no assistant turn, or
    /// truncation removed all of it).
    pub dropped_no_labels: usize,
    /// Rows.
    pub rows: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Tokens in the loss.
    pub label_tokens: usize,
    /// Padding slots. Packed: the padding at the end of rows. Unpacked: the padding needed to
    /// bring every row to `max_seq_len` (batches padded to their longest row need less).
    pub padding_tokens: usize,
    /// `tokens / (tokens + padding_tokens)`, 1.0 when there are no slots.
    pub packing_efficiency: f64,
    /// The row length.
    pub max_seq_len: usize,
    /// Whether examples were packed.
    pub packing: bool,
    /// Longest example, in tokens, before truncation.
    pub longest_example: usize,
    /// Warnings (special tokens the tokenizer splits, ...), also logged.
    pub warnings: Vec<String>,
}

impl TokenizeReport {
    /// Fills the row-derived counts (`rows`, `tokens`, `label_tokens`, `padding_tokens`,
    /// `packing_efficiency`) from `rows`.
    pub fn count_rows(&mut self, rows: &[Row]) {
        self.rows = rows.len();
        self.tokens = rows.iter().map(|r| r.len() - r.padding_tokens()).sum();
        self.label_tokens = rows.iter().map(Row::label_tokens).sum();
        self.padding_tokens = if self.packing {
            rows.iter().map(Row::padding_tokens).sum()
        } else {
            rows.iter()
                .map(|r| self.max_seq_len.saturating_sub(r.len()) + r.padding_tokens())
                .sum()
        };
        let slots = self.tokens + self.padding_tokens;
        self.packing_efficiency = if slots == 0 {
            1.0
        } else {
            self.tokens as f64 / slots as f64
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::IGNORE_INDEX;

    fn ex(len: usize, first_id: u32) -> TokenizedExample {
        let ids: Vec<u32> = (first_id..first_id + len as u32).collect();
        let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        labels[0] = IGNORE_INDEX;
        TokenizedExample {
            input_ids: ids,
            labels,
        }
    }

    #[test]
    fn best_fit_decreasing_fills_gaps_with_shorter_examples() {
        // Longest first: 5 -> row 0 (room 3); 4 -> row 1 (room 4); 3 -> row 0 (exact fit);
        // 3 -> row 1 (room 1); 1 -> row 1 (full).
        let examples = [ex(3, 100), ex(5, 200), ex(1, 300), ex(4, 400), ex(3, 500)];
        let rows = pack(&examples, 8, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, [200, 201, 202, 203, 204, 100, 101, 102]);
        assert_eq!(rows[1].input_ids, [400, 401, 402, 403, 500, 501, 502, 300]);
        assert_eq!(rows[1].segment_ids, [1, 1, 1, 1, 2, 2, 2, 3]);
        assert_eq!(rows[1].position_ids, [0, 1, 2, 3, 0, 1, 2, 0]);
        assert!(rows.iter().all(|r| r.padding_tokens() == 0));
    }

    #[test]
    fn efficiency_is_real_tokens_over_slots() {
        // 6 -> row 0, 6 -> row 1, 2 -> row 0: 14 tokens in 16 slots.
        let rows = pack(&[ex(6, 10), ex(6, 20), ex(2, 30)], 8, 0);
        let mut report = TokenizeReport {
            max_seq_len: 8,
            packing: true,
            ..TokenizeReport::default()
        };
        report.count_rows(&rows);
        assert_eq!(
            (report.rows, report.tokens, report.padding_tokens),
            (2, 14, 2)
        );
        assert_eq!(report.label_tokens, 14 - 3);
        assert_eq!(report.packing_efficiency, 14.0 / 16.0);
        assert_eq!(rows[1].labels[6..], [IGNORE_INDEX, IGNORE_INDEX]);
    }

    #[test]
    fn unpacked_rows_count_padding_to_max_seq_len() {
        let rows = one_per_row(&[ex(6, 10), ex(2, 20)]);
        let mut report = TokenizeReport {
            max_seq_len: 8,
            packing: false,
            ..TokenizeReport::default()
        };
        report.count_rows(&rows);
        assert_eq!(
            (report.rows, report.tokens, report.padding_tokens),
            (2, 8, 8)
        );
        assert_eq!(report.packing_efficiency, 0.5);
    }
}
