//! The fusable operations as compositions of burn operations: what every backend without fused
//! kernels runs (CUDA, wgpu), what [`super::Kernels::Composed`] runs everywhere, and the path of
//! attention over a KV cache.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, TensorData};

use super::{AttnShape, Mask, RopeTables};
use crate::gguf::QuantWeight;

/// RMSNorm `w * x / sqrt(mean(x²) + eps)` of `x` `[batch, seq, hidden]`, computed in f32.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x = if dtype != DType::F32 {
        x.cast(DType::F32)
    } else {
        x
    };
    let variance = x.clone().powi_scalar(2).mean_dim(2);
    let x = x * (variance + eps).sqrt().recip();
    let x = if dtype != DType::F32 {
        x.cast(dtype)
    } else {
        x
    };
    x * w.unsqueeze::<3>()
}

fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// Applies RoPE to `x` `[batch, seq, heads, head_dim]`; only the first `rotary_dim` features
/// rotate (partial rotary), the rest pass through.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, rope: &RopeTables<B>) -> Tensor<B, 4> {
    let head_dim = x.dims()[3];
    let rotary = rope.cos.dims()[3];
    if rotary == head_dim {
        return x.clone() * rope.cos.clone() + rotate_half(x) * rope.sin.clone();
    }
    let rot = x.clone().narrow(3, 0, rotary);
    let pass = x.narrow(3, rotary, head_dim - rotary);
    let rot = rot.clone() * rope.cos.clone() + rotate_half(rot) * rope.sin.clone();
    Tensor::cat(vec![rot, pass], 3)
}

/// RoPE on `x` `[batch, seq, heads * head_dim]`, same layout out.
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    head_dim: usize,
    tables: &RopeTables<B>,
) -> Tensor<B, 3> {
    let [batch, seq, _] = x.dims();
    apply_rope(x.reshape([batch, seq, heads, head_dim]), tables).reshape([
        batch,
        seq,
        heads * head_dim,
    ])
}

/// Attention without a cache on the projections' layout (`[batch, seq, heads * dim]`).
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    shape: AttnShape,
    mask: Mask,
) -> Tensor<B, 3> {
    let AttnShape {
        batch,
        seq,
        heads,
        kv_heads,
        dim,
        ..
    } = shape;
    let q = q.reshape([batch, seq, heads, dim]).swap_dims(1, 2);
    let k = k.reshape([batch, seq, kv_heads, dim]).swap_dims(1, 2);
    let v = v.reshape([batch, seq, kv_heads, dim]).swap_dims(1, 2);
    match mask {
        Mask::Causal { window } => attend(q, k, v, 0, None, window),
        Mask::Dense(m) => {
            let m = Tensor::<B, 3, Bool>::from_data(
                TensorData::new(m.as_ref().clone(), [batch, seq, seq]),
                &q.device(),
            )
            .unsqueeze_dim(1);
            attend(q, k, v, 0, Some(&m), 0)
        }
    }
}

/// Attention of new queries `[batch, heads, seq, d]` (RoPE applied) at positions
/// `past..past + seq` against keys and values `[batch, kv_heads, past + seq, d]`; `mask`
/// (`[batch, 1, seq, keys]`, true = masked) replaces the causal/sliding-window (`window`, 0 =
/// none) mask. Returns `[batch, seq, heads * d]`, before the output projection.
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    past: usize,
    mask: Option<&Tensor<B, 4, Bool>>,
    window: usize,
) -> Tensor<B, 3> {
    let [batch, h, seq, d] = q.dims();
    let kvh = k.dims()[1];
    let total = k.dims()[2];
    debug_assert_eq!(total, past + seq);
    let groups = h / kvh;
    let mask = match mask {
        Some(m) => Some(m.clone()),
        None if window > 0 && total > window => {
            Some(sliding_window_mask::<B>(seq, total, window, &q.device()))
        }
        None => None,
    };
    let options = AttentionModuleOptions {
        scale: Some(1.0 / (d as f64).sqrt()),
        softcap: None,
        is_causal: mask.is_none(),
    };
    let out = if groups > 1 && (seq == 1 || mask.is_some()) {
        // Fold the query heads of each group into the query axis instead of copying keys
        // and values `groups` times; an explicit mask is repeated along the folded axis.
        // (Without a mask only a single query can fold: the implicit causal mask would
        // not know the folded rows.)
        let q = q.reshape([batch, kvh, groups * seq, d]);
        let mask = mask.map(|m| {
            let [mb, _, _, keys] = m.dims();
            m.unsqueeze_dim::<5>(2)
                .expand([mb, 1, groups, seq, keys])
                .reshape([mb, 1, groups * seq, keys])
        });
        let options = AttentionModuleOptions {
            is_causal: false,
            ..options
        };
        burn_attention(q, k, v, mask, None, options).reshape([batch, h, seq, d])
    } else {
        let (k, v) = if groups > 1 {
            let expand = |t: Tensor<B, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([batch, kvh, groups, total, d])
                    .reshape([batch, h, total, d])
            };
            (expand(k), expand(v))
        } else {
            (k, v)
        };
        burn_attention(q, k, v, mask, None, options)
    };
    out.swap_dims(1, 2).reshape([batch, seq, h * d])
}

/// Boolean mask `[1, 1, seq, total]`, true where attention is forbidden: the future, and keys at
/// least `window` positions behind the query (transformers: `kv_idx > q_idx - sliding_window`).
fn sliding_window_mask<B: Backend>(
    seq: usize,
    total: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let offset = total - seq;
    let mut data = vec![false; seq * total];
    for i in 0..seq {
        let q = i + offset;
        for j in 0..total {
            data[i * total + j] = j > q || q - j >= window;
        }
    }
    Tensor::<B, 2, Bool>::from_data(TensorData::new(data, [seq, total]), device).unsqueeze()
}

/// `silu(gate) * up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// Summed negative log-likelihood `[1]` of `targets` (`< 0` = ignored) under `logits`
/// `[rows, vocab]`, computed in f32.
pub fn nll_sum<B: Backend>(logits: Tensor<B, 2>, targets: Vec<i64>) -> Tensor<B, 1> {
    let [rows, _] = logits.dims();
    let device = logits.device();
    let logits = if logits.dtype() != DType::F32 {
        logits.cast(DType::F32)
    } else {
        logits
    };
    let weights: Vec<f32> = targets
        .iter()
        .map(|&t| if t >= 0 { 1.0 } else { 0.0 })
        .collect();
    let index: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [rows, 1]), &device);
    let picked = log_softmax(logits, 1).gather(1, index).reshape([rows]);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [rows]), &device);
    (picked * weights).sum().neg()
}

/// Summed negative log-likelihood `[1]` of `targets` under `hidden · weightᵀ`.
pub fn linear_nll_sum<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Vec<i64>,
) -> Tensor<B, 1> {
    nll_sum(hidden.matmul(weight.transpose()), targets)
}

/// `x [rows, in] · Wᵀ` with the quantized `w` `[out, in]` decoded to a dense constant of `x`'s
/// dtype on every call (what backends without a quantized product run).
/// LoRA's delta `scale · (x Aᵀ) Bᵀ` with burn's matrix products.
pub fn lora_delta<B: Backend>(
    x: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    x.matmul(a.transpose()).matmul(b.transpose()) * scale
}

/// [`super::KernelBackend::dense_linear`] in burn operations.
pub fn dense_linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    if x.dims()[0] <= super::DENSE_FEW_ROWS {
        w.matmul(x.transpose()).transpose()
    } else {
        x.matmul(w.transpose())
    }
}

pub fn quant_linear<B: Backend>(x: Tensor<B, 2>, w: &QuantWeight) -> Tensor<B, 2> {
    let dense = Tensor::<B, 2>::from_data(TensorData::new(w.dequantize(), w.shape()), &x.device());
    let dtype = x.dtype();
    let dense = if dense.dtype() != dtype {
        dense.cast(dtype)
    } else {
        dense
    };
    x.matmul(dense.transpose())
}
