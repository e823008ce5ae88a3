//! The causal language-modelling loss of transformers: logits at position `t` predict the label
//! at `t + 1`; labels equal to -100 are ignored; the loss is the mean over the remaining targets.
//! [`causal_lm_loss_sum`] returns the sum and the count separately so that gradient accumulation
//! can normalise by the number of targets of the whole step, not per micro-batch.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

/// Label value that takes no part in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Summed negative log-likelihood of the shifted targets and their number.
///
/// `logits`: `[batch, seq, vocab]`; `labels`: `[batch * seq]` row-major host values (unshifted,
/// -100 = ignored). Returns a one-element tensor (differentiable) and the target count.
pub fn causal_lm_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
) -> (Tensor<B, 1>, usize) {
    let [batch, seq, vocab] = logits.dims();
    assert_eq!(
        labels.len(),
        batch * seq,
        "labels must have batch * seq entries"
    );
    let device = logits.device();
    let rows = batch * (seq - 1);
    // Targets: labels shifted left by one within each row.
    let mut targets = Vec::with_capacity(rows);
    let mut weights = Vec::with_capacity(rows);
    for b in 0..batch {
        for t in 1..seq {
            let label = labels[b * seq + t];
            let keep = label != IGNORE_INDEX && label >= 0 && (label as usize) < vocab;
            targets.push(if keep { label } else { 0 });
            weights.push(if keep { 1.0f32 } else { 0.0 });
        }
    }
    let count = weights.iter().filter(|w| **w > 0.0).count();
    if crate::kernels::fused::<B>(logits.dtype()) {
        // Every position of every row; the last one of each row predicts nothing.
        let mut all = Vec::with_capacity(batch * seq);
        for row in targets.chunks(seq - 1).zip(weights.chunks(seq - 1)) {
            all.extend(
                row.0
                    .iter()
                    .zip(row.1)
                    .map(|(&t, &w)| if w > 0.0 { t } else { -1 }),
            );
            all.push(-1);
        }
        let logits = logits.reshape([batch * seq, vocab]);
        return (crate::kernels::nll_sum(logits, all), count);
    }
    let logits = logits.narrow(1, 0, seq - 1).reshape([rows, vocab]);
    let logits = if logits.dtype() != burn::tensor::DType::F32 {
        logits.cast(burn::tensor::DType::F32)
    } else {
        logits
    };
    let log_probs = log_softmax(logits, 1);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
    let picked = log_probs.gather(1, targets).reshape([rows]);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [rows]), &device);
    ((picked * weights).sum().neg(), count)
}

/// Mean loss over the targets of one batch (transformers' `ForCausalLMLoss` without
/// `num_items_in_batch`). `None` when no label counts.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: &[i64]) -> Option<Tensor<B, 1>> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    (count > 0).then(|| sum / count as f64)
}
