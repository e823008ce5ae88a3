//! [`KernelBackend`] for burn's Flex CPU backend: the fused host kernels of [`super::cpu`] on
//! f32 tensors, and under `Autodiff<Flex, C>` the autodiff nodes of [`super::ad`]. Other dtypes
//! take the composed operations.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::cache::HostKv;
use crate::gguf::QuantWeight;

use super::{ad, composed, cpu, AdTensorOf, AttnShape, KernelBackend, Mask, RopeHost, RopeTables};

/// The autodiff tensor of `Autodiff<Flex, _>` (the type is not exported by name).
pub(crate) type AdTensor =
    <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

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

/// The two dimensions of a matrix.
fn x_dims2(t: &FlexTensor) -> [usize; 2] {
    let d = dims(t);
    [d[0], d[1]]
}

/// Rows of `x` and `(in, r, out)` of a LoRA delta's operands `x [rows, in]`, `a [r, in]`,
/// `b [out, r]`.
pub(crate) fn lora_dims(
    x: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
) -> (usize, (usize, usize, usize)) {
    let (x, a, b) = (dims(x), dims(a), dims(b));
    assert!(
        x[1] == a[1] && b[1] == a[0],
        "LoRA shapes: x {x:?}, A {a:?}, B {b:?}"
    );
    (x[0], (a[1], a[0], b[0]))
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

fn f32s(dtype: DType) -> bool {
    dtype == DType::F32
}

/// Runs `attend` on the host values of `q`, `k`, `v` (f32, made contiguous) and returns its
/// output shaped as `q` (the cached attention kernels).
fn host_attention(
    q: Tensor<Flex, 3>,
    k: Tensor<Flex, 3>,
    v: Tensor<Flex, 3>,
    attend: impl FnOnce(&[f32], &[f32], &[f32]) -> Vec<f32>,
) -> Tensor<Flex, 3> {
    let (q, k, v) = (
        contiguous(&prim(q)),
        contiguous(&prim(k)),
        contiguous(&prim(v)),
    );
    let o = attend(values(&q), values(&k), values(&v));
    tensor(flex(o, &dims(&q)))
}

impl KernelBackend for Flex {
    fn fuses(dtype: DType) -> bool {
        f32s(dtype)
    }

    fn keeps_quantized(dtype: DType) -> bool {
        f32s(dtype)
    }

    fn quant_linear(x: Tensor<Self, 2>, w: &QuantWeight) -> Tensor<Self, 2> {
        if !f32s(x.dtype()) {
            return composed::quant_linear(x, w);
        }
        let x = contiguous(&prim(x));
        let m = dims(&x)[0];
        tensor(flex(w.matmul_nt(values(&x), m), &[m, w.shape()[0]]))
    }

    fn quant_linear_many(x: Tensor<Self, 2>, ws: &[&QuantWeight]) -> Vec<Tensor<Self, 2>> {
        if !f32s(x.dtype()) {
            return ws
                .iter()
                .map(|w| composed::quant_linear(x.clone(), w))
                .collect();
        }
        let x = contiguous(&prim(x));
        let m = dims(&x)[0];
        QuantWeight::matmul_nt_many(ws, values(&x), m)
            .into_iter()
            .zip(ws)
            .map(|(y, w)| tensor(flex(y, &[m, w.shape()[0]])))
            .collect()
    }

    fn lora_delta(
        x: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        if !f32s(x.dtype()) || !f32s(a.dtype()) {
            return composed::lora_delta(x, a, b, scale);
        }
        let (x, a, b) = (
            contiguous(&prim(x)),
            contiguous(&prim(a)),
            contiguous(&prim(b)),
        );
        let (rows, dims) = lora_dims(&x, &a, &b);
        let (y, _) = cpu::lora_delta(values(&x), values(&a), values(&b), rows, dims, scale as f32);
        tensor(flex(y, &[rows, dims.2]))
    }

    fn rms_norm(x: Tensor<Self, 3>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        if !f32s(x.dtype()) {
            return composed::rms_norm(x, w, eps);
        }
        let (x, w) = (contiguous(&prim(x)), contiguous(&prim(w)));
        let (y, _) = cpu::rms_norm(values(&x), values(&w), eps as f32);
        tensor(flex(y, &dims(&x)))
    }

    fn rope(
        x: Tensor<Self, 3>,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables<Self>,
    ) -> Tensor<Self, 3> {
        match &tables.host {
            Some(host) if f32s(x.dtype()) => tensor(rotate(&prim(x), heads, head_dim, host, false)),
            _ => composed::rope(x, heads, head_dim, tables),
        }
    }

    fn attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        shape: AttnShape,
        mask: Mask,
    ) -> Tensor<Self, 3> {
        if !f32s(q.dtype()) {
            return composed::attention(q, k, v, shape, mask);
        }
        let (q, k, v) = (
            contiguous(&prim(q)),
            contiguous(&prim(k)),
            contiguous(&prim(v)),
        );
        let (o, _) = cpu::attention(values(&q), values(&k), values(&v), shape, mask.view());
        tensor(flex(o, &dims(&q)))
    }

    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        use crate::gguf::matmul::{matmul_dense_few, matmul_dense_many, SMALL_M};
        if !f32s(x.dtype()) || !f32s(w.dtype()) {
            return composed::dense_linear(x, w);
        }
        let (x, w) = (contiguous(&prim(x)), contiguous(&prim(w)));
        let ([m, _], [out, inp]) = (x_dims2(&x), x_dims2(&w));
        let y = if m <= SMALL_M {
            matmul_dense_few(values(&w), out, inp, values(&x), m)
        } else {
            matmul_dense_many(values(&w), out, inp, values(&x), m)
        };
        tensor(flex(y, &[m, out]))
    }

    fn caches_on_host(dtype: DType) -> bool {
        f32s(dtype)
    }

    fn attention_cached(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        cache: &mut HostKv,
        past: usize,
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        host_attention(q, k, v, |q, k, v| {
            cache.attend(q, k, v, past, shape, window)
        })
    }

    fn attention_cached_rows(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        rows: &mut [(&mut HostKv, usize)],
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        host_attention(q, k, v, |q, k, v| {
            HostKv::attend_rows(rows, q, k, v, shape, window)
        })
    }

    fn attention_cached_ragged(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        rows: &mut [(&mut HostKv, usize)],
        lens: &[usize],
        shape: AttnShape,
        window: usize,
    ) -> Tensor<Self, 3> {
        host_attention(q, k, v, |q, k, v| {
            HostKv::attend_ragged(rows, lens, q, k, v, shape, window)
        })
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if !f32s(gate.dtype()) {
            return composed::swiglu(gate, up);
        }
        let (g, u) = (contiguous(&prim(gate)), contiguous(&prim(up)));
        tensor(flex(cpu::swiglu(values(&g), values(&u)), &dims(&g)))
    }

    fn nll_sum(logits: Tensor<Self, 2>, targets: Vec<i64>) -> Tensor<Self, 1> {
        if !f32s(logits.dtype()) {
            return composed::nll_sum(logits, targets);
        }
        let x = contiguous(&prim(logits));
        let vocab = dims(&x)[1];
        let (sum, _) = cpu::nll_sum(values(&x), vocab, &targets);
        tensor(flex(vec![sum as f32], &[1]))
    }

    fn linear_nll_sum(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: Vec<i64>,
    ) -> Tensor<Self, 1> {
        if !f32s(hidden.dtype()) {
            return composed::linear_nll_sum(hidden, weight, targets);
        }
        let (h, w) = (contiguous(&prim(hidden)), contiguous(&prim(weight)));
        let (sum, _) = cpu::linear_nll_sum(values(&h), values(&w), dims(&h)[1], &targets, false);
        tensor(flex(vec![sum as f32], &[1]))
    }

    fn ad_fuses(dtype: DType) -> bool {
        f32s(dtype)
    }

    fn ad_keeps_quantized(dtype: DType) -> bool {
        f32s(dtype)
    }

    fn ad_quant_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: &QuantWeight,
    ) -> AdTensorOf<Self, C, 2> {
        if !f32s(x.dtype()) {
            return composed::quant_linear(x, w);
        }
        tensor(ad::quant_linear::<C>(prim(x), w.clone()))
    }

    fn ad_dense_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: AdTensorOf<Self, C, 2>,
    ) -> AdTensorOf<Self, C, 2> {
        // The frozen weight transposed once per call and then multiplied on every thread
        // (`cpu::linear_nt`): burn's matmul of `x · wᵀ` had gemm pack `w`'s strided columns one
        // value at a time. Small training benchmark on Zen 4, alternated: 880–910 vs 814–834
        // tokens/s; smol 283–284 vs 254–265. A trainable weight (not what LoRA trains), 16-bit
        // tensors and few rows (gemm's small-M path is slower than streaming `w`) take the
        // composed product.
        if !f32s(x.dtype())
            || !f32s(w.dtype())
            || w.is_require_grad()
            || x.dims()[0] <= super::DENSE_FEW_ROWS
        {
            return composed::dense_linear(x, w);
        }
        let w = prim(w).primitive;
        tensor(ad::dense_linear::<C>(prim(x), w))
    }

    fn ad_lora_linear<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        w: AdTensorOf<Self, C, 2>,
        a: AdTensorOf<Self, C, 2>,
        b: AdTensorOf<Self, C, 2>,
        scale: f64,
    ) -> AdTensorOf<Self, C, 2> {
        // One node: the adapter's product added into the base product's buffer, and its input
        // gradient into the base's (`cpu::lora_linear`), where two nodes had burn add a delta
        // to the output and, backwards, the two input gradients, single-threaded. The same
        // cases as `ad_dense_linear` take the two-node form.
        if !f32s(x.dtype())
            || !f32s(w.dtype())
            || !f32s(a.dtype())
            || !f32s(b.dtype())
            || w.is_require_grad()
            || x.dims()[0] <= super::DENSE_FEW_ROWS
        {
            return Self::ad_dense_linear::<C>(x.clone(), w)
                + Self::ad_lora_delta::<C>(x, a, b, scale);
        }
        let w = prim(w).primitive;
        tensor(ad::lora_linear::<C>(
            prim(x),
            w,
            prim(a),
            prim(b),
            scale as f32,
        ))
    }

    fn ad_lora_delta<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 2>,
        a: AdTensorOf<Self, C, 2>,
        b: AdTensorOf<Self, C, 2>,
        scale: f64,
    ) -> AdTensorOf<Self, C, 2> {
        if !f32s(x.dtype()) || !f32s(a.dtype()) {
            return composed::lora_delta(x, a, b, scale);
        }
        tensor(ad::lora_delta::<C>(prim(x), prim(a), prim(b), scale as f32))
    }

    fn ad_rms_norm<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 3>,
        w: AdTensorOf<Self, C, 1>,
        eps: f64,
    ) -> AdTensorOf<Self, C, 3> {
        if !f32s(x.dtype()) {
            return composed::rms_norm(x, w, eps);
        }
        tensor(ad::rms_norm::<C>(prim(x), prim(w), eps as f32))
    }

    fn ad_rope<C: CheckpointStrategy>(
        x: AdTensorOf<Self, C, 3>,
        heads: usize,
        head_dim: usize,
        tables: &RopeTables<Autodiff<Self, C>>,
    ) -> AdTensorOf<Self, C, 3> {
        match &tables.host {
            Some(host) if f32s(x.dtype()) => {
                tensor(ad::rope::<C>(prim(x), heads, head_dim, Arc::clone(host)))
            }
            _ => composed::rope(x, heads, head_dim, tables),
        }
    }

    fn ad_attention<C: CheckpointStrategy>(
        q: AdTensorOf<Self, C, 3>,
        k: AdTensorOf<Self, C, 3>,
        v: AdTensorOf<Self, C, 3>,
        shape: AttnShape,
        mask: Mask,
    ) -> AdTensorOf<Self, C, 3> {
        if !f32s(q.dtype()) {
            return composed::attention(q, k, v, shape, mask);
        }
        tensor(ad::attention::<C>(prim(q), prim(k), prim(v), shape, mask))
    }

    fn ad_swiglu<C: CheckpointStrategy>(
        gate: AdTensorOf<Self, C, 3>,
        up: AdTensorOf<Self, C, 3>,
    ) -> AdTensorOf<Self, C, 3> {
        if !f32s(gate.dtype()) {
            return composed::swiglu(gate, up);
        }
        tensor(ad::swiglu::<C>(prim(gate), prim(up)))
    }

    fn ad_nll_sum<C: CheckpointStrategy>(
        logits: AdTensorOf<Self, C, 2>,
        targets: Vec<i64>,
    ) -> AdTensorOf<Self, C, 1> {
        if !f32s(logits.dtype()) {
            return composed::nll_sum(logits, targets);
        }
        tensor(ad::nll_sum::<C>(prim(logits), Arc::new(targets)))
    }

    fn ad_linear_nll_sum<C: CheckpointStrategy>(
        hidden: AdTensorOf<Self, C, 2>,
        weight: AdTensorOf<Self, C, 2>,
        targets: Vec<i64>,
    ) -> AdTensorOf<Self, C, 1> {
        if !f32s(hidden.dtype()) {
            return composed::linear_nll_sum(hidden, weight, targets);
        }
        tensor(ad::linear_nll_sum::<C>(
            prim(hidden),
            prim(weight),
            Arc::new(targets),
        ))
    }
}
