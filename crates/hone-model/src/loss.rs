//! The causal language-modelling loss of transformers: logits at position `t` predict the label
//! at `t + 1`; labels equal to -100 are ignored; the loss is the mean over the remaining targets.
//! [`causal_lm_loss_sum`] returns the sum and the count separately so that gradient accumulation
//! can normalise by the number of targets of the whole step, not per micro-batch.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

use crate::kernels::{KernelBackend, Kernels};

/// Label value that takes no part in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Summed negative log-likelihood of the shifted targets and their number.
///
/// `logits`: `[batch, seq, vocab]`; `labels`: `[batch * seq]` row-major host values (unshifted,
/// -100 = ignored). Returns a one-element tensor (differentiable) and the target count.
pub fn causal_lm_loss_sum<B: KernelBackend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
) -> (Tensor<B, 1>, usize) {
    causal_lm_loss_sum_with(Kernels::Fused, logits, labels)
}

/// [`causal_lm_loss_sum`] with an explicit choice of kernels.
pub fn causal_lm_loss_sum_with<B: KernelBackend>(
    kernels: Kernels,
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
    if kernels.fused::<B>(logits.dtype()) {
        let logits = logits.reshape([batch * seq, vocab]);
        return (
            B::nll_sum(logits, position_targets(labels, batch, seq, vocab)),
            count,
        );
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
pub fn causal_lm_loss<B: KernelBackend>(
    logits: Tensor<B, 3>,
    labels: &[i64],
) -> Option<Tensor<B, 1>> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    (count > 0).then(|| sum / count as f64)
}

/// The target of every position of `[batch, seq]` rows (the next label; -1 where nothing is
/// predicted: ignored labels, out-of-range ids, the last position of each row).
fn position_targets(labels: &[i64], batch: usize, seq: usize, vocab: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        for t in 1..seq {
            let label = labels[b * seq + t];
            let keep = label != IGNORE_INDEX && label >= 0 && (label as usize) < vocab;
            out.push(if keep { label } else { -1 });
        }
        out.push(-1);
    }
    out
}

/// [`causal_lm_loss_sum`] from the final hidden states `[batch, seq, hidden]` (after the final
/// norm): the same value, but on the CPU backends with a plain output projection the logits are
/// never materialised (they are formed block by block and reduced on the spot, together with the
/// gradient with respect to the hidden states), which saves two `[tokens, vocab]` buffers and
/// their passes.
pub fn causal_lm_loss_sum_hidden<B: KernelBackend>(
    model: &crate::CausalLm<B>,
    hidden: Tensor<B, 3>,
    labels: &[i64],
) -> (Tensor<B, 1>, usize) {
    let [batch, seq, h] = hidden.dims();
    let weight = match &model.lm_head {
        Some(head) if head.adapters.is_empty() && head.bias.is_none() => head.weight(),
        Some(_) => None,
        None => Some(model.model.embed_tokens.val()),
    };
    match weight {
        Some(w)
            if !w.is_require_grad()
                && labels.len() == batch * seq
                && model.kernels().fused::<B>(hidden.dtype()) =>
        {
            let vocab = w.dims()[0];
            let targets = position_targets(labels, batch, seq, vocab);
            let count = targets.iter().filter(|&&t| t >= 0).count();
            let hidden = hidden.reshape([batch * seq, h]);
            (B::linear_nll_sum(hidden, w, targets), count)
        }
        _ => causal_lm_loss_sum_with(model.kernels(), model.logits(hidden), labels),
    }
}
