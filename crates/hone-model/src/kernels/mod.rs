//! Fused operations for the CPU backend.
//!
//! burn's tensor operations on Flex run one elementwise pass per operation, single-threaded,
//! and its autodiff records every intermediate of a decomposed softmax or norm; in a training
//! step that costs more than the matrix products. The operations here (RMSNorm, RoPE, attention,
//! SwiGLU, cross-entropy, and the output projection fused with the cross-entropy) run as single
//! multi-threaded passes over host slices ([`cpu`]), and under `Autodiff<Flex>` as single autodiff
//! nodes with analytic backward passes ([`ad`]). Measured on the small training benchmark:
//! 390 -> ~1,080 tokens/s and 1,253 -> 519 MB peak (`HONE_FUSED_KERNELS=0` for the first).
//!
//! The model calls them when [`fused`] says the backend is Flex or `Autodiff<Flex>` (checked at
//! run time by type id, so the model stays generic over any backend); on every other backend
//! (CUDA) it keeps its composition of burn operations. [`set_enabled`] switches the fused path
//! off, which is how the tests compare the two.

pub mod ad;
pub mod cpu;

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

pub use cpu::{AttnShape, Visibility};

/// 0 = not decided yet (read `HONE_FUSED_KERNELS`), 1 = on, 2 = off.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Turns the fused CPU kernels on or off for the whole process. By default they are on unless
/// the environment sets `HONE_FUSED_KERNELS=0` (for side-by-side measurements).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("HONE_FUSED_KERNELS").map_or(true, |v| v != "0");
            set_enabled(on);
            on
        }
        v => v == 1,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Flex,
    AdPlain,
    AdBalanced,
}

fn kind<B: Backend>() -> Option<Kind> {
    let id = TypeId::of::<B>();
    if id == TypeId::of::<Flex>() {
        Some(Kind::Flex)
    } else if id == TypeId::of::<Autodiff<Flex, NoCheckpointing>>() {
        Some(Kind::AdPlain)
    } else if id == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>() {
        Some(Kind::AdBalanced)
    } else {
        None
    }
}

/// Whether the fused kernels run for backend `B` on tensors of `dtype`.
pub fn fused<B: Backend>(dtype: DType) -> bool {
    dtype == DType::F32 && kind::<B>().is_some() && enabled()
}

/// The autodiff tensor of `Autodiff<Flex, _>` (the type is not exported by name).
pub(crate) type AdTensor =
    <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

fn cast<S: 'static, T: 'static>(value: S) -> T {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<T>()
        .unwrap_or_else(|_| unreachable!("backend type checked by `fused`"))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A host `f32` buffer as a Flex tensor.
pub(crate) fn flex(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// The contiguous `f32` values of a Flex tensor (copied only when it is a strided view).
pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused kernels run on contiguous f32 tensors")
}

pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().as_slice().to_vec()
}

/// Applies `flex_op` on Flex, `ad_op` on `Autodiff<Flex, C>` (with C picked at run time).
macro_rules! dispatch {
    ($B:ty, $flex:expr, $ad:ident, ($($arg:expr),*)) => {
        match kind::<$B>().expect("checked by `fused`") {
            Kind::Flex => $flex,
            Kind::AdPlain => cast(ad::$ad::<NoCheckpointing>($($arg),*)),
            Kind::AdBalanced => cast(ad::$ad::<BalancedCheckpointing>($($arg),*)),
        }
    };
}

/// RMSNorm of `x` `[batch, seq, hidden]` with weight `w` `[hidden]`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let (x, w) = (prim(x), prim(w));
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        {
            let (x, w): (FlexTensor, FlexTensor) = (cast(x), cast(w));
            let (x, w) = (contiguous(&x), contiguous(&w));
            let (y, _) = cpu::rms_norm(values(&x), values(&w), eps as f32);
            cast(flex(y, &dims(&x)))
        },
        rms_norm,
        (cast(x), cast(w), eps as f32)
    );
    tensor::<B, 3>(out)
}

/// Host cos/sin tables of one forward pass: `[rows, rot]` in the `rotate_half` layout, row `r`
/// for token `t` with `r = t % rows`.
#[derive(Debug)]
pub struct RopeHost {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rot: usize,
}

/// RoPE on `x` `[batch, seq, heads * head_dim]` (a projection's output), same layout out.
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    head_dim: usize,
    tables: &Arc<RopeHost>,
) -> Tensor<B, 3> {
    let x = prim(x);
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        cast(rotate(&cast(x), heads, head_dim, tables, false)),
        rope,
        (cast(x), heads, head_dim, tables.clone())
    );
    tensor::<B, 3>(out)
}

/// RoPE (or its inverse, the gradient) of a Flex tensor `[.., heads * head_dim]`, as a new tensor.
pub(crate) fn rotate(
    x: &FlexTensor,
    heads: usize,
    head_dim: usize,
    t: &RopeHost,
    inverse: bool,
) -> FlexTensor {
    let mut v = values(&contiguous(x)).to_vec();
    cpu::rope(&mut v, heads, head_dim, &t.cos, &t.sin, t.rot, inverse);
    flex(v, &dims(x))
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

/// Attention of `q` `[batch, seq, heads * dim]` over `k`, `v` `[batch, seq, kv_heads * dim]`
/// (RoPE applied), returning `[batch, seq, heads * dim]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    shape: AttnShape,
    mask: Mask,
) -> Tensor<B, 3> {
    let (q, k, v) = (prim(q), prim(k), prim(v));
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        {
            let (q, k, v): (FlexTensor, FlexTensor, FlexTensor) = (cast(q), cast(k), cast(v));
            let (q, k, v) = (contiguous(&q), contiguous(&k), contiguous(&v));
            let (o, _) = cpu::attention(values(&q), values(&k), values(&v), shape, mask.view());
            cast(flex(o, &dims(&q)))
        },
        attention,
        (cast(q), cast(k), cast(v), shape, mask)
    );
    tensor::<B, 3>(out)
}

/// `silu(gate) * up`.
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    let (gate, up) = (prim(gate), prim(up));
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        {
            let (g, u): (FlexTensor, FlexTensor) = (cast(gate), cast(up));
            let (g, u) = (contiguous(&g), contiguous(&u));
            cast(flex(cpu::swiglu(values(&g), values(&u)), &dims(&g)))
        },
        swiglu,
        (cast(gate), cast(up))
    );
    tensor::<B, 3>(out)
}

/// Summed negative log-likelihood `[1]` of `targets` (`< 0` = ignored) under `logits`
/// `[rows, vocab]`.
pub fn nll_sum<B: Backend>(logits: Tensor<B, 2>, targets: Vec<i64>) -> Tensor<B, 1> {
    let logits = prim(logits);
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        {
            let x: FlexTensor = cast(logits);
            let x = contiguous(&x);
            let vocab = dims(&x)[1];
            let (sum, _) = cpu::nll_sum(values(&x), vocab, &targets);
            cast(flex(vec![sum as f32], &[1]))
        },
        nll_sum,
        (cast(logits), Arc::new(targets))
    );
    tensor::<B, 1>(out)
}

/// Summed negative log-likelihood `[1]` of `targets` (`< 0` = ignored) under the logits
/// `hidden · weightᵀ` (`hidden` `[rows, h]`, `weight` `[vocab, h]`, a constant), without
/// materialising the logits.
pub fn linear_nll_sum<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Vec<i64>,
) -> Tensor<B, 1> {
    let (hidden, weight) = (prim(hidden), prim(weight));
    let out: B::FloatTensorPrimitive = dispatch!(
        B,
        {
            let (h, w): (FlexTensor, FlexTensor) = (cast(hidden), cast(weight));
            let (h, w) = (contiguous(&h), contiguous(&w));
            let (sum, _) =
                cpu::linear_nll_sum(values(&h), values(&w), dims(&h)[1], &targets, false);
            cast(flex(vec![sum as f32], &[1]))
        },
        linear_nll_sum,
        (cast(hidden), cast(weight), Arc::new(targets))
    );
    tensor::<B, 1>(out)
}
