//! Batched log-likelihood: the log-probability the model gives to each target token of a row,
//! with transformers' causal-LM convention (the logits at `t - 1` predict the label at `t`;
//! label -100 = not a target). Rows of a batch are right-padded: under the causal mask a real
//! token never sees the padding after it, so padded rows score exactly what they score alone.
//! Only the hidden states of positions that predict a target are projected to the vocabulary,
//! in chunks, so long rows with large vocabularies need no `[batch, seq, vocab]` tensor.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, TensorData};
use hone_model::loss::IGNORE_INDEX;
use hone_model::CausalLm;

use crate::error::{EvalError, Result};

/// One row to score: token ids and unshifted labels (the id where it is a target, -100
/// elsewhere; the first label is never a target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreRow {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl ScoreRow {
    /// A context followed by a continuation whose tokens are the targets.
    pub fn continuation(context: &[u32], continuation: &[u32]) -> Self {
        let ids: Vec<u32> = context.iter().chain(continuation).copied().collect();
        let labels = context
            .iter()
            .map(|_| IGNORE_INDEX)
            .chain(continuation.iter().map(|&t| t as i64))
            .collect();
        Self { ids, labels }
    }

    /// Number of target tokens.
    pub fn targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Largest number of logits rows (times the vocabulary) materialised at once: 2^26 floats.
const LOGITS_BUDGET: usize = 1 << 26;

/// Reads a tensor back to the host as f32.
pub(crate) fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| EvalError::TensorData(format!("{e:?}")))
}

/// Log-probabilities of the targets of every row, in row order, each row's targets in order.
/// Rows are sorted by length (longest first) and scored `batch_size` at a time;
/// `on_rows(n)` is called after each batch with the number of rows it held.
pub fn score_rows<B: hone_model::KernelBackend>(
    model: &CausalLm<B>,
    rows: &[ScoreRow],
    batch_size: usize,
    mut on_rows: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let vocab = model.config().vocab_size;
    for (i, row) in rows.iter().enumerate() {
        if row.ids.len() != row.labels.len() || row.ids.is_empty() {
            return Err(EvalError::TensorData(format!(
                "row {i}: {} ids and {} labels (expected the same positive number)",
                row.ids.len(),
                row.labels.len()
            )));
        }
        if let Some(&bad) = row.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EvalError::TensorData(format!(
                "row {i}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].ids.len()));
    let mut out = vec![Vec::new(); rows.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let seq = chunk.iter().map(|&i| rows[i].ids.len()).max().unwrap_or(1);
        let batch = chunk.len();
        let mut ids = vec![0i64; batch * seq];
        // Flat index (into [batch * seq]) of each position that predicts a target, its target.
        let mut positions: Vec<i64> = Vec::new();
        let mut targets: Vec<i64> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (b, &r) in chunk.iter().enumerate() {
            let row = &rows[r];
            for (t, &id) in row.ids.iter().enumerate() {
                ids[b * seq + t] = id as i64;
            }
            for t in 1..row.ids.len() {
                let label = row.labels[t];
                if label != IGNORE_INDEX && label >= 0 && (label as usize) < vocab {
                    positions.push((b * seq + t - 1) as i64);
                    targets.push(label);
                    owner.push(r);
                }
            }
        }
        if positions.is_empty() {
            on_rows(batch);
            continue;
        }
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
        let hidden = model.forward(hone_model::Input::new(input).hidden());
        let hidden_size = hidden.dims()[2];
        let hidden = hidden.reshape([batch * seq, hidden_size]);
        let step = (LOGITS_BUDGET / vocab).max(1);
        let mut log_probs: Vec<f32> = Vec::with_capacity(positions.len());
        for start in (0..positions.len()).step_by(step) {
            let end = (start + step).min(positions.len());
            let n = end - start;
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(positions[start..end].to_vec(), [n]),
                &device,
            );
            let picked = hidden.clone().select(0, idx).reshape([1, n, hidden_size]);
            let logits = model.logits(picked).reshape([n, vocab]);
            let logits = if logits.dtype() != DType::F32 {
                logits.cast(DType::F32)
            } else {
                logits
            };
            let target = Tensor::<B, 2, Int>::from_data(
                TensorData::new(targets[start..end].to_vec(), [n, 1]),
                &device,
            );
            let lp = log_softmax(logits, 1).gather(1, target).reshape([n]);
            log_probs.extend(to_host(lp)?);
        }
        for (lp, r) in log_probs.into_iter().zip(owner) {
            out[r].push(lp);
        }
        on_rows(batch);
    }
    Ok(out)
}
