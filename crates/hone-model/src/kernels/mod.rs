//! The model's fusable operations as a backend extension trait, [`KernelBackend`].
//!
//! burn's tensor operations on Flex run one elementwise pass per operation, single-threaded,
//! and its autodiff records every intermediate of a decomposed softmax or norm; in a training
//! step that costs more than the matrix products. The operations of this trait (RMSNorm, RoPE,
//! attention, SwiGLU, cross-entropy, and the output projection fused with the cross-entropy)
//! have composed defaults ([`composed`]: burn operations, what CUDA and wgpu run); Flex and
//! `Autodiff<Flex, _>` override them ([`flex`]) with single multi-threaded passes over host slices
//! ([`cpu`]) and, under autodiff, single nodes with analytic backward passes ([`ad`]). Measured on
//! the small training benchmark: 390 -> ~1,080 tokens/s and 1,253 -> 519 MB peak (composed first).
//!
//! Autodiff backends implement the trait through their inner backend's `ad_*` methods
//! (`impl KernelBackend for Autodiff<B, C>` calls `B::ad_rms_norm::<C>` ...), so a backend
//! states in one place what it fuses with and without autodiff, and no type is inspected at run
//! time. Which implementation runs is the model's explicit choice, [`Kernels`]
//! ([`crate::CausalLm::set_kernels`]; `model.kernels` in a run config, `--kernels` on the bench
//! commands): [`Kernels::Composed`] runs the composed operations on every backend, which is how
//! the tests and benchmarks compare the two.

pub mod ad;
pub mod composed;
pub mod cpu;
pub mod flex;
pub mod fma;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};
use serde::{Deserialize, Serialize};

pub use cpu::{AttnShape, Visibility};

use crate::cache::HostKv;
use crate::gguf::QuantWeight;

/// Row counts up to which [`KernelBackend::dense_linear`] multiplies as a few-row product.
pub const DENSE_FEW_ROWS: usize = 16;

/// Which implementation of the fusable operations a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The backend's own implementations where it has them ([`KernelBackend::fuses`]),
    /// composed burn operations elsewhere.
    #[default]
    Fused,
    /// Composed burn operations on every backend (for comparisons).
    Composed,
}

impl Kernels {
    /// Whether backend `B` runs its fused implementations for tensors of `dtype`.
    pub fn fused<B: KernelBackend>(self, dtype: DType) -> bool {
        self == Kernels::Fused && B::fuses(dtype)
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fused" => Ok(Kernels::Fused),
            "composed" => Ok(Kernels::Composed),
            other => Err(format!(
                "invalid kernels `{other}`: expected fused or composed"
            )),
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernels::Fused => "fused",
            Kernels::Composed => "composed",
        })
    }
}

/// Host cos/sin tables of one forward pass: `[rows, rot]` in the `rotate_half` layout, row `r`
/// for token `t` with `r = t % rows`.
#[derive(Debug)]
pub struct RopeHost {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rot: usize,
}

/// Cos/sin tables for the tokens of one forward pass, shaped `[batch, seq, 1, rotary_dim]`, and
/// the same tables on the host when the pass runs fused kernels.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    pub(crate) cos: Tensor<B, 4>,
    pub(crate) sin: Tensor<B, 4>,
    /// `[rows, rotary_dim]`, for the fused CPU kernels.
    pub(crate) host: Option<Arc<RopeHost>>,
}

/// Which keys each query sees, owned (kept for the backward pass).
#[derive(Debug, Clone)]
pub enum Mask {
    Causal {
        window: usize,
    },
    /// `[batch, seq, seq]`, true = masked.
    Dense(Arc<Vec<bool>>),
}

impl Mask {
    pub fn view(&self) -> Visibility<'_> {
        match self {
            Mask::Causal { window } => Visibility::Causal { window: *window },
            Mask::Dense(m) => Visibility::Mask(m),
        }
    }
}

/// An autodiff backend whose inner backend has the kernels too: what training needs (the
/// forward pass runs on `Self`, gradient checkpointing recomputes layers on the inner backend).
pub trait AutodiffKernelBackend:
    AutodiffBackend<InnerBackend: KernelBackend> + KernelBackend
{
}

impl<B: AutodiffBackend<InnerBackend: KernelBackend> + KernelBackend> AutodiffKernelBackend for B {}

/// A tensor of an autodiff backend over `B`.
pub type AdTensorOf<B, C, const D: usize> = Tensor<Autodiff<B, C>, D>;

/// The model's fusable operations. Every method has a composed default ([`composed`]); a
/// backend overrides those it fuses and says for which dtypes in [`KernelBackend::fuses`]. The
/// `ad_*` methods are the same operations on `Autodiff<Self, C>`, which implements this trait
/// through them.
///
/// Shapes: `x`, `gate`, `up` `[batch, seq, features]`; `q` `[batch, seq, heads * dim]`, `k`, `v`
/// `[batch, seq, kv_heads * dim]` with RoPE applied; `logits` `[rows, vocab]`, `hidden`
/// `[rows, h]`, `weight` `[vocab, h]` (a constant); `targets` one per row, `< 0` = ignored.
pub trait KernelBackend: Backend {
    /// Whether the overridden methods run for tensors of `dtype` (false: the model composes).
    fn fuses(dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// RMSNorm of `x` with weight `w` `[hidden]`.
    fn rms_norm(x: Tensor<Self, 3>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        composed::rms_norm(x, w, eps)
    }

    /// RoPE on a projection's output `[batch, seq, heads * head_dim]`, same layout out.
    fn rope(
        x: Tensor<Self, 3>,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables<Self>,
    ) -> Tensor<Self, 3> {
        composed::rope(x, heads, head_dim, tables)
    }

    /// Attention without a cache, returning `[batch, seq, heads * dim]`.
    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        shape: AttnShape,
        mask: Mask,
    ) -> Tensor<Self, 3> {
        composed::attention(q, k, v, shape, mask)
    }

    /// Whether [`KernelBackend::attention_cached`] runs for tensors of `dtype`: decoding then
    /// keeps a layer's keys and values in host memory ([`HostKv`]) and attends over them in
    /// place (false: the model composes over a tensor cache).
    fn caches_on_host(dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// Attention of new queries over a layer's host KV cache holding `past` positions: `k`, `v`
    /// (the new positions) are appended to `cache` first; `q` sees keys up to its own position
    /// (the last `window` of them when `window > 0`). Returns `[batch, seq, heads * dim]`.
    /// The default reads the tensors back to the host (correct on any backend, fast on none).
    fn attention_cached(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        cache: &mut HostKv,
        past: usize,
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        let device = q.device();
        let host = |t: Tensor<Self, 3>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("a float tensor converts to f32")
        };
        let dims = q.dims();
        let o = cache.attend(&host(q), &host(k), &host(v), past, shape, window);
        Tensor::from_data(TensorData::new(o, dims), &device)
    }

    /// [`KernelBackend::attention_cached`] for rows with caches of their own (`rows[b]` = row
    /// `b`'s cache and its length; `shape.batch` rows). The default attends row by row.
    fn attention_cached_rows(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        rows: &mut [(&mut HostKv, usize)],
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        assert_eq!(rows.len(), shape.batch, "one cache per row");
        let one = AttnShape { batch: 1, ..shape };
        let outs = rows
            .iter_mut()
            .enumerate()
            .map(|(r, (cache, past))| {
                let row = |t: &Tensor<Self, 3>| t.clone().narrow(0, r, 1);
                Self::attention_cached(row(&q), row(&k), row(&v), cache, *past, one, window)
            })
            .collect();
        Tensor::cat(outs, 0)
    }

    /// [`KernelBackend::attention_cached`] for rows with different numbers of new tokens, one
    /// after the other (`q`, `k`, `v` `[1, tokens, heads * dim]`; row `b` = `lens[b]` tokens
    /// continuing `rows[b]`). `shape.batch` and `shape.seq` are not read. The default attends
    /// row by row.
    fn attention_cached_ragged(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        rows: &mut [(&mut HostKv, usize)],
        lens: &[usize],
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        assert_eq!(rows.len(), lens.len(), "one cache per row");
        let mut start = 0;
        let outs = rows
            .iter_mut()
            .zip(lens)
            .map(|((cache, past), &len)| {
                let one = AttnShape {
                    batch: 1,
                    seq: len,
                    ..shape
                };
                let span = |t: &Tensor<Self, 3>| t.clone().narrow(1, start, len);
                let o =
                    Self::attention_cached(span(&q), span(&k), span(&v), cache, *past, one, window);
                start += len;
                o
            })
            .collect();
        Tensor::cat(outs, 1)
    }

    /// `silu(gate) * up`.
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        composed::swiglu(gate, up)
    }

    /// Summed negative log-likelihood `[1]` of `targets` under `logits`.
    fn nll_sum(logits: Tensor<Self, 2>, targets: Vec<i64>) -> Tensor<Self, 1> {
        composed::nll_sum(logits, targets)
    }

    /// Summed negative log-likelihood `[1]` of `targets` under `hidden · weightᵀ`.
    fn linear_nll_sum(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: Vec<i64>,
    ) -> Tensor<Self, 1> {
        composed::linear_nll_sum(hidden, weight, targets)
    }

    /// `x [rows, in] · wᵀ` for a dense frozen weight `w` `[out, in]` (gradients for `x` under
    /// autodiff). The default multiplies few rows (decoding, up to [`DENSE_FEW_ROWS`]) as
    /// `(w xᵀ)ᵀ`, which streams `w` once: 1–3.5× faster than gemm's small-M path for 1–16 rows
    /// on AVX-512.
    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        composed::dense_linear(x, w)
    }

    /// Whether a model on this backend keeps GGUF projection weights in their block formats
    /// ([`QuantWeight`]) for compute dtype `dtype`, multiplying by them with
    /// [`KernelBackend::quant_linear`]; false: they are dequantized at load.
    fn keeps_quantized(dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// `x [rows, in] · Wᵀ` for a frozen quantized weight `w` `[out, in]` (no gradient for `w`;
    /// under autodiff the gradient of `x` is `g · W`). The composed default dequantizes `w`
    /// into a dense tensor on every call.
    fn quant_linear(x: Tensor<Self, 2>, w: &QuantWeight) -> Tensor<Self, 2> {
        composed::quant_linear(x, w)
    }

    /// [`KernelBackend::quant_linear`] of one input by several weights of the same input
    /// width (a layer's q/k/v or gate/up projections), one product per weight. The default
    /// multiplies one after the other; a backend may run them together (one parallel loop).
    fn quant_linear_many(x: Tensor<Self, 2>, ws: &[&QuantWeight]) -> Vec<Tensor<Self, 2>> {
        ws.iter()
            .map(|w| Self::quant_linear(x.clone(), w))
            .collect()
    }

    /// LoRA's delta `scale · (x Aᵀ) Bᵀ` for `x` `[rows, in]`, `a` `[r, in]`, `b` `[out, r]`
    /// (gradients for all three under autodiff).
    fn lora_delta(
        x: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        composed::lora_delta(x, a, b, scale)
    }

    /// A dense frozen projection with an adapter, `x Wᵀ + scale · (x Aᵀ) Bᵀ`, for `x` `[rows, in]`,
    /// `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]` (gradients for `x`, `a` and `b` under
    /// autodiff). The default is [`KernelBackend::dense_linear`] plus
    /// [`KernelBackend::lora_delta`]; a backend may run both in one pass.
    fn lora_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        Self::dense_linear(x.clone(), w) + Self::lora_delta(x, a, b, scale)
    }

    /// [`KernelBackend::fuses`] of `Autodiff<Self, _>`.
    fn ad_fuses(dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// [`KernelBackend::keeps_quantized`] of `Autodiff<Self, _>`.
    fn ad_keeps_quantized(dtype: DType) -> bool {
        let _ = dtype;
        false
    }

    /// [`KernelBackend::quant_linear`] on `Autodiff<Self, C>`.
    fn ad_quant_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: &QuantWeight,
    ) -> AdTensorOf<Self, C, 2> {
        composed::quant_linear(x, w)
    }

    /// [`KernelBackend::dense_linear`] on `Autodiff<Self, C>`.
    fn ad_dense_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: AdTensorOf<Self, C, 2>,
    ) -> AdTensorOf<Self, C, 2> {
        composed::dense_linear(x, w)
    }

    /// [`KernelBackend::lora_delta`] on `Autodiff<Self, C>`.
    fn ad_lora_delta<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        a: AdTensorOf<Self, C, 2>,
        b: AdTensorOf<Self, C, 2>,
        scale: f64,
    ) -> AdTensorOf<Self, C, 2> {
        composed::lora_delta(x, a, b, scale)
    }

    /// [`KernelBackend::lora_linear`] on `Autodiff<Self, C>`.
    fn ad_lora_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: AdTensorOf<Self, C, 2>,
        a: AdTensorOf<Self, C, 2>,
        b: AdTensorOf<Self, C, 2>,
        scale: f64,
    ) -> AdTensorOf<Self, C, 2> {
        Self::ad_dense_linear::<C>(x.clone(), w) + Self::ad_lora_delta::<C>(x, a, b, scale)
    }

    /// [`KernelBackend::rms_norm`] on `Autodiff<Self, C>`.
    fn ad_rms_norm<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 3>,
        w: AdTensorOf<Self, C, 1>,
        eps: f64,
    ) -> AdTensorOf<Self, C, 3> {
        composed::rms_norm(x, w, eps)
    }

    /// [`KernelBackend::rope`] on `Autodiff<Self, C>`.
    fn ad_rope<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 3>,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables<Autodiff<Self, C>>,
    ) -> AdTensorOf<Self, C, 3> {
        composed::rope(x, heads, head_dim, tables)
    }

    /// [`KernelBackend::attention`] on `Autodiff<Self, C>`.
    fn ad_attention<C: CheckpointStrategy>(
        q: AdTensorOf<Self, C, 3>,
        k: AdTensorOf<Self, C, 3>,
        v: AdTensorOf<Self, C, 3>,
        shape: AttnShape,
        mask: Mask,
    ) -> AdTensorOf<Self, C, 3> {
        composed::attention(q, k, v, shape, mask)
    }

    /// [`KernelBackend::swiglu`] on `Autodiff<Self, C>`.
    fn ad_swiglu<C: CheckpointStrategy>(
        gate: AdTensorOf<Self, C, 3>,
        up: AdTensorOf<Self, C, 3>,
    ) -> AdTensorOf<Self, C, 3> {
        composed::swiglu(gate, up)
    }

    /// [`KernelBackend::nll_sum`] on `Autodiff<Self, C>`.
    fn ad_nll_sum<C: CheckpointStrategy>(
        logits: AdTensorOf<Self, C, 2>,
        targets: Vec<i64>,
    ) -> AdTensorOf<Self, C, 1> {
        composed::nll_sum(logits, targets)
    }

    /// [`KernelBackend::linear_nll_sum`] on `Autodiff<Self, C>` (`weight` a constant).
    fn ad_linear_nll_sum<C: CheckpointStrategy>(
        hidden: AdTensorOf<Self, C, 2>,
        weight: AdTensorOf<Self, C, 2>,
        targets: Vec<i64>,
    ) -> AdTensorOf<Self, C, 1> {
        composed::linear_nll_sum(hidden, weight, targets)
    }
}

impl<B: KernelBackend, C: CheckpointStrategy> KernelBackend for Autodiff<B, C> {
    fn fuses(dtype: DType) -> bool {
        B::ad_fuses(dtype)
    }

    fn keeps_quantized(dtype: DType) -> bool {
        B::ad_keeps_quantized(dtype)
    }

    fn quant_linear(x: Tensor<Self, 2>, w: &QuantWeight) -> Tensor<Self, 2> {
        B::ad_quant_linear::<C>(x, w)
    }

    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        B::ad_dense_linear::<C>(x, w)
    }

    fn lora_delta(
        x: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        B::ad_lora_delta::<C>(x, a, b, scale)
    }

    fn lora_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        B::ad_lora_linear::<C>(x, w, a, b, scale)
    }

    fn rms_norm(x: Tensor<Self, 3>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        B::ad_rms_norm::<C>(x, w, eps)
    }

    fn rope(
        x: Tensor<Self, 3>,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables<Self>,
    ) -> Tensor<Self, 3> {
        B::ad_rope::<C>(x, heads, head_dim, tables)
    }

    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        shape: AttnShape,
        mask: Mask,
    ) -> Tensor<Self, 3> {
        B::ad_attention::<C>(q, k, v, shape, mask)
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        B::ad_swiglu::<C>(gate, up)
    }

    fn nll_sum(logits: Tensor<Self, 2>, targets: Vec<i64>) -> Tensor<Self, 1> {
        B::ad_nll_sum::<C>(logits, targets)
    }

    fn linear_nll_sum(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: Vec<i64>,
    ) -> Tensor<Self, 1> {
        B::ad_linear_nll_sum::<C>(hidden, weight, targets)
    }
}

/// CUDA composes every operation (cubecl fuses elementwise chains itself).
#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {}

/// wgpu composes every operation, as CUDA does (CI runs it on lavapipe to exercise that path).
#[cfg(feature = "wgpu")]
impl KernelBackend for burn::backend::Wgpu {}
