//! [`Row`]: the unit a model trains on, and [`Batch`]: rows stacked for one step.
//!
//! A row holds one or more examples back to back (packing) or one example (padding). Per token
//! it carries:
//!
//! * `input_ids`: the token ids;
//! * `labels`: the id where the token counts in the loss, [`IGNORE_INDEX`] (-100) elsewhere.
//!   Labels are **not shifted**: as in transformers, the model compares the logits at `t`
//!   with `labels[t + 1]`. The first label of every example is -100, so after that shift no
//!   token is trained to predict the first token of the next packed example;
//! * `position_ids`: 0, 1, 2, ... restarting at 0 for every example (and for the padding run);
//! * `segment_ids`: 1, 2, 3, ... for the examples of the row in order, [`PAD_SEGMENT`] (0) for
//!   padding.
//!
//! Attention is block-diagonal and causal: query `q` may attend to key `k` exactly when
//! `k <= q` and `segment_ids[k] == segment_ids[q]` ([`Row::can_attend`]). With one example per
//! row this is the usual causal mask plus a padding mask (`segment_ids != 0`). Padding tokens
//! attend only to padding, so no softmax row is empty. The same boundaries as lengths
//! ([`Row::seq_lens`]) are what variable-length attention kernels take (`cu_seqlens`), and
//! positions restarting per example is what transformers' `DataCollatorWithFlattening` gives
//! its flash-attention path.

use serde::{Deserialize, Serialize};

use crate::error::TokenizeError;

/// The label of a token that is not in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// The segment id of padding tokens.
pub const PAD_SEGMENT: u32 = 0;

/// One row of training tokens; all four vectors have the same length. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Loss targets (unshifted): the id, or [`IGNORE_INDEX`].
    pub labels: Vec<i32>,
    /// Position of each token within its example (restarts at 0).
    pub position_ids: Vec<u32>,
    /// Example of each token within the row (1-based), [`PAD_SEGMENT`] for padding.
    pub segment_ids: Vec<u32>,
}

impl Row {
    /// Number of tokens (including padding).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when the row has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Appends one example (ids and labels of equal length) as a new segment.
    pub(crate) fn push_example(&mut self, input_ids: &[u32], labels: &[i32]) {
        // Examples are appended before any padding, so the last real segment is the last id.
        let last = self.segment_ids.iter().rev().find(|&&s| s != PAD_SEGMENT);
        let segment = last.map_or(1, |s| s + 1);
        self.input_ids.extend_from_slice(input_ids);
        self.labels.extend_from_slice(labels);
        self.position_ids.extend(0..input_ids.len() as u32);
        self.segment_ids
            .extend(std::iter::repeat_n(segment, input_ids.len()));
    }

    /// Appends `count` padding tokens (`pad_id`, label -100, segment 0, positions from 0).
    pub fn pad(&mut self, count: usize, pad_id: u32) {
        self.input_ids.extend(std::iter::repeat_n(pad_id, count));
        self.labels.extend(std::iter::repeat_n(IGNORE_INDEX, count));
        self.position_ids.extend(0..count as u32);
        self.segment_ids
            .extend(std::iter::repeat_n(PAD_SEGMENT, count));
    }

    /// Tokens that are padding.
    pub fn padding_tokens(&self) -> usize {
        self.segment_ids
            .iter()
            .filter(|&&s| s == PAD_SEGMENT)
            .count()
    }

    /// Tokens whose label is in the loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Number of examples in the row.
    pub fn examples(&self) -> usize {
        let mut ids: Vec<u32> = self
            .segment_ids
            .iter()
            .copied()
            .filter(|&s| s != PAD_SEGMENT)
            .collect();
        ids.dedup();
        ids.len()
    }

    /// Lengths of the runs of equal segment ids, in order (padding runs included): the
    /// boundaries a variable-length attention kernel takes (`cu_seqlens` = prefix sums).
    pub fn seq_lens(&self) -> Vec<usize> {
        self.segment_ids
            .chunk_by(|a, b| a == b)
            .map(<[u32]>::len)
            .collect()
    }

    /// Whether query token `q` may attend to key token `k` (block-diagonal causal mask).
    pub fn can_attend(&self, q: usize, k: usize) -> bool {
        k <= q
            && self.segment_ids.get(q).is_some()
            && self.segment_ids.get(k) == self.segment_ids.get(q)
    }

    /// The full attention mask, `[len, len]` row-major (`mask[q * len + k]`), true where
    /// attention is allowed. Meant for tests and small rows; models build it from
    /// `segment_ids` on the device.
    pub fn block_causal_mask(&self) -> Vec<bool> {
        let n = self.len();
        let mut mask = vec![false; n * n];
        for q in 0..n {
            for k in 0..=q {
                mask[q * n + k] = self.segment_ids[k] == self.segment_ids[q];
            }
        }
        mask
    }

    /// Per token: true for real tokens, false for padding (the `attention_mask` of
    /// transformers, for one-example rows).
    pub fn attention_mask(&self) -> Vec<bool> {
        self.segment_ids.iter().map(|&s| s != PAD_SEGMENT).collect()
    }
}

/// How long the rows of a batch are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PadTo {
    /// The longest row of the batch.
    Longest,
    /// A fixed length (e.g. `max_seq_len`, for static shapes).
    Length(usize),
}

/// Rows stacked into `[batch_size, seq_len]` arrays (row-major), padded as asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Number of rows.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// `[batch_size, seq_len]` token ids.
    pub input_ids: Vec<u32>,
    /// `[batch_size, seq_len]` labels (unshifted, -100 = ignored).
    pub labels: Vec<i32>,
    /// `[batch_size, seq_len]` positions, restarting per example.
    pub position_ids: Vec<u32>,
    /// `[batch_size, seq_len]` segment ids (0 = padding); attention stays within a segment.
    pub segment_ids: Vec<u32>,
}

impl Batch {
    /// Stacks `rows`, appending padding (`pad_id`, label -100, segment 0) to each as
    /// `pad_to` asks. Packed rows already share one length and need none.
    pub fn collate(rows: &[Row], pad_to: PadTo, pad_id: u32) -> Result<Batch, TokenizeError> {
        let longest = rows.iter().map(Row::len).max().unwrap_or(0);
        let seq_len = match pad_to {
            PadTo::Longest => longest,
            PadTo::Length(n) => n,
        };
        let mut batch = Batch {
            batch_size: rows.len(),
            seq_len,
            input_ids: Vec::with_capacity(rows.len() * seq_len),
            labels: Vec::with_capacity(rows.len() * seq_len),
            position_ids: Vec::with_capacity(rows.len() * seq_len),
            segment_ids: Vec::with_capacity(rows.len() * seq_len),
        };
        for (i, row) in rows.iter().enumerate() {
            let Some(missing) = seq_len.checked_sub(row.len()) else {
                return Err(TokenizeError::RowTooLong {
                    row: i,
                    len: row.len(),
                    pad_to: seq_len,
                });
            };
            let mut padded = row.clone();
            padded.pad(missing, pad_id);
            batch.input_ids.extend(padded.input_ids);
            batch.labels.extend(padded.labels);
            batch.position_ids.extend(padded.position_ids);
            batch.segment_ids.extend(padded.segment_ids);
        }
        Ok(batch)
    }

    /// `[batch_size, seq_len]`: true for real tokens, false for padding.
    pub fn attention_mask(&self) -> Vec<bool> {
        self.segment_ids.iter().map(|&s| s != PAD_SEGMENT).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_examples() -> Row {
        let mut row = Row::default();
        row.push_example(&[1, 2, 3], &[IGNORE_INDEX, 2, 3]);
        row.push_example(&[4, 5], &[IGNORE_INDEX, 5]);
        row.pad(2, 0);
        row
    }

    #[test]
    fn segments_positions_and_lengths_follow_examples() {
        let row = two_examples();
        assert_eq!(row.segment_ids, [1, 1, 1, 2, 2, 0, 0]);
        assert_eq!(row.position_ids, [0, 1, 2, 0, 1, 0, 1]);
        assert_eq!(row.seq_lens(), [3, 2, 2]);
        assert_eq!(
            (row.examples(), row.padding_tokens(), row.label_tokens()),
            (2, 2, 3)
        );
    }

    #[test]
    fn packed_rows_do_not_attend_across_examples() {
        let row = two_examples();
        let n = row.len();
        let mask = row.block_causal_mask();
        let expected = [
            "1......", "11.....", "111....", "...1...", "...11..", ".....1.", ".....11",
        ];
        for q in 0..n {
            let line: String = (0..n)
                .map(|k| if mask[q * n + k] { '1' } else { '.' })
                .collect();
            assert_eq!(line, expected[q], "query {q}");
            for k in 0..n {
                assert_eq!(row.can_attend(q, k), mask[q * n + k]);
            }
        }
    }

    #[test]
    fn collate_pads_to_the_longest_or_a_fixed_length() {
        let mut a = Row::default();
        a.push_example(&[7, 8, 9], &[IGNORE_INDEX, 8, 9]);
        let mut b = Row::default();
        b.push_example(&[5], &[IGNORE_INDEX]);
        let batch = Batch::collate(&[a.clone(), b.clone()], PadTo::Longest, 0).unwrap();
        assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
        assert_eq!(batch.input_ids, [7, 8, 9, 5, 0, 0]);
        assert_eq!(
            batch.labels,
            [IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
        );
        assert_eq!(
            batch.attention_mask(),
            [true, true, true, true, false, false]
        );
        let fixed = Batch::collate(&[a.clone(), b], PadTo::Length(4), 0).unwrap();
        assert_eq!(fixed.seq_len, 4);
        assert_eq!(fixed.position_ids, [0, 1, 2, 0, 0, 0, 1, 2]);
        let err = Batch::collate(&[a], PadTo::Length(2), 0).unwrap_err();
        assert!(matches!(
            err,
            TokenizeError::RowTooLong {
                len: 3,
                pad_to: 2,
                ..
            }
        ));
    }
}
