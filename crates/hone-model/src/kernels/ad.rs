//! The fused kernels as autodiff nodes of `Autodiff<Flex, C>`: each forward runs the host
//! kernel and, when a parent is tracked, keeps what its backward pass needs; each backward
//! runs the matching host gradient kernel (burn-autodiff's `Backward` trait).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn_flex::FlexTensor;

use super::cpu::{self, AttnShape};
use super::flex::{contiguous, dims, flex, lora_dims, rotate, values, AdTensor};
use super::{Mask, RopeHost};
use crate::gguf::QuantWeight;

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct RmsNormOp;

impl Backward<Flex, 2> for RmsNormOp {
    /// `x`, `w`, reciprocal roots of the rows.
    type State = (FlexTensor, FlexTensor, Arc<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, w, rstd) = ops.state;
        let (dx, dw) =
            cpu::rms_norm_backward(values(&g), values(&x), values(&w), &rstd, pw.is_some());
        if let Some(node) = px {
            grads.register::<Flex>(node.id, flex(dx, &dims(&x)));
        }
        if let (Some(node), Some(dw)) = (pw, dw) {
            grads.register::<Flex>(node.id, flex(dw, &dims(&w)));
        }
    }
}

pub(crate) fn rms_norm<C: CheckpointStrategy>(x: AdTensor, w: AdTensor, eps: f32) -> AdTensor {
    let (xf, wf) = (contiguous(&x.primitive), contiguous(&w.primitive));
    let (y, rstd) = cpu::rms_norm(values(&xf), values(&wf), eps);
    let y = flex(y, &dims(&xf));
    match RmsNormOp
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xf, wf, Arc::new(rstd)), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct RopeOp;

impl Backward<Flex, 1> for RopeOp {
    /// Heads, head dim, tables.
    type State = (usize, usize, Arc<RopeHost>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let (heads, head_dim, t) = ops.state;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, rotate(&g, heads, head_dim, &t, true));
        }
    }
}

pub(crate) fn rope<C: CheckpointStrategy>(
    x: AdTensor,
    heads: usize,
    head_dim: usize,
    tables: Arc<RopeHost>,
) -> AdTensor {
    let y = rotate(&x.primitive, heads, head_dim, &tables, false);
    match RopeOp
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((heads, head_dim, tables), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct AttentionOp;

#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    o: FlexTensor,
    lse: Arc<Vec<f32>>,
    shape: AttnShape,
    mask: Mask,
}

impl Backward<Flex, 3> for AttentionOp {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (dq, dk, dv) = cpu::attention_backward(
            values(&g),
            values(&s.q),
            values(&s.k),
            values(&s.v),
            values(&s.o),
            &s.lse,
            s.shape,
            s.mask.view(),
        );
        if let Some(node) = pq {
            grads.register::<Flex>(node.id, flex(dq, &dims(&s.q)));
        }
        if let Some(node) = pk {
            grads.register::<Flex>(node.id, flex(dk, &dims(&s.k)));
        }
        if let Some(node) = pv {
            grads.register::<Flex>(node.id, flex(dv, &dims(&s.v)));
        }
    }
}

pub(crate) fn attention<C: CheckpointStrategy>(
    q: AdTensor,
    k: AdTensor,
    v: AdTensor,
    shape: AttnShape,
    mask: Mask,
) -> AdTensor {
    let (qf, kf, vf) = (
        contiguous(&q.primitive),
        contiguous(&k.primitive),
        contiguous(&v.primitive),
    );
    let (o, lse) = cpu::attention(values(&qf), values(&kf), values(&vf), shape, mask.view());
    let o = flex(o, &dims(&qf));
    match AttentionOp
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = AttentionState {
                q: qf,
                k: kf,
                v: vf,
                o: o.clone(),
                lse: Arc::new(lse),
                shape,
                mask,
            };
            prep.finish(state, o)
        }
        OpsKind::UnTracked(prep) => prep.finish(o),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct SwigluOp;

impl Backward<Flex, 2> for SwigluOp {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pg, pu] = ops.parents;
        let d = contiguous(&grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let (dg, du) = cpu::swiglu_backward(values(&d), values(&gate), values(&up));
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, flex(dg, &dims(&gate)));
        }
        if let Some(node) = pu {
            grads.register::<Flex>(node.id, flex(du, &dims(&up)));
        }
    }
}

pub(crate) fn swiglu<C: CheckpointStrategy>(gate: AdTensor, up: AdTensor) -> AdTensor {
    let (gf, uf) = (contiguous(&gate.primitive), contiguous(&up.primitive));
    let out = flex(cpu::swiglu(values(&gf), values(&uf)), &dims(&gf));
    match SwigluOp
        .prepare::<C>([gate.node.clone(), up.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gf, uf), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct NllOp;

impl Backward<Flex, 1> for NllOp {
    /// Logits, targets, log-sum-exp of each row.
    type State = (FlexTensor, Arc<Vec<i64>>, Arc<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, targets, lse) = ops.state;
        if let Some(node) = px {
            let shape = dims(&x);
            let dx = cpu::nll_sum_backward(values(&g)[0], values(&x), shape[1], &targets, &lse);
            grads.register::<Flex>(node.id, flex(dx, &shape));
        }
    }
}

pub(crate) fn nll_sum<C: CheckpointStrategy>(logits: AdTensor, targets: Arc<Vec<i64>>) -> AdTensor {
    let xf = contiguous(&logits.primitive);
    let vocab = dims(&xf)[1];
    let (sum, lse) = cpu::nll_sum(values(&xf), vocab, &targets);
    let out = flex(vec![sum as f32], &[1]);
    match NllOp
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xf, targets, Arc::new(lse)), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct LinearNllOp;

impl Backward<Flex, 1> for LinearNllOp {
    /// The gradient with respect to the hidden states for an incoming gradient of 1.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [ph] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        if let Some(node) = ph {
            let g = values(&g)[0];
            let dh = ops.state;
            let dh = if g == 1.0 {
                dh
            } else {
                flex(values(&dh).iter().map(|v| v * g).collect(), &dims(&dh))
            };
            grads.register::<Flex>(node.id, dh);
        }
    }
}

/// `weight` must be a constant (the caller checks): only `hidden` receives a gradient.
pub(crate) fn linear_nll_sum<C: CheckpointStrategy>(
    hidden: AdTensor,
    weight: AdTensor,
    targets: Arc<Vec<i64>>,
) -> AdTensor {
    let (hf, wf) = (contiguous(&hidden.primitive), contiguous(&weight.primitive));
    let shape = dims(&hf);
    let (sum, dh) = cpu::linear_nll_sum(values(&hf), values(&wf), shape[1], &targets, true);
    let out = flex(vec![sum as f32], &[1]);
    match LinearNllOp
        .prepare::<C>([hidden.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(flex(dh, &shape), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct QuantLinearOp;

impl Backward<Flex, 1> for QuantLinearOp {
    /// The frozen weight (its bytes are shared, not copied).
    type State = QuantWeight;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let w = ops.state;
        if let Some(node) = px {
            let m = dims(&g)[0];
            grads.register::<Flex>(
                node.id,
                flex(w.matmul_nn(values(&g), m), &[m, w.shape()[1]]),
            );
        }
    }
}

/// `x [m, in] · Wᵀ` for a frozen quantized `w`; the backward pass gives `x`'s gradient `g · W`.
pub(crate) fn quant_linear<C: CheckpointStrategy>(x: AdTensor, w: QuantWeight) -> AdTensor {
    let xf = contiguous(&x.primitive);
    let m = dims(&xf)[0];
    let y = flex(w.matmul_nt(values(&xf), m), &[m, w.shape()[0]]);
    match QuantLinearOp
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct DenseLinearOp;

impl Backward<Flex, 1> for DenseLinearOp {
    /// The frozen weight `[out, in]` (shared, not copied).
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let w = ops.state;
        if let Some(node) = px {
            let (m, [n, k]) = (dims(&g)[0], [dims(&w)[0], dims(&w)[1]]);
            grads.register::<Flex>(
                node.id,
                flex(cpu::linear_nn(values(&g), values(&w), m, n, k), &[m, k]),
            );
        }
    }
}

/// `x [m, in] · Wᵀ` for a frozen dense `w` `[out, in]`; the backward pass gives `x`'s gradient
/// `g · W`.
pub(crate) fn dense_linear<C: CheckpointStrategy>(x: AdTensor, w: FlexTensor) -> AdTensor {
    let xf = contiguous(&x.primitive);
    let w = contiguous(&w);
    let (m, [n, k]) = (dims(&xf)[0], [dims(&w)[0], dims(&w)[1]]);
    let y = flex(cpu::linear_nt(values(&xf), values(&w), m, n, k), &[m, n]);
    match DenseLinearOp
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct LoraOp;

#[derive(Debug, Clone)]
struct LoraState {
    x: FlexTensor,
    /// The frozen weight `[out, in]` under the adapter when the node includes its product
    /// ([`lora_linear`]; shared, not copied), `None` for the adapter's delta alone.
    w: Option<FlexTensor>,
    a: FlexTensor,
    b: FlexTensor,
    /// `x Aᵀ`.
    h: Arc<Vec<f32>>,
    scale: f32,
}

impl Backward<Flex, 3> for LoraOp {
    type State = LoraState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pa, pb] = ops.parents;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (rows, d) = lora_dims(&s.x, &s.a, &s.b);
        let (dx, da, db) = cpu::lora_backward(
            values(&g),
            values(&s.x),
            s.w.as_ref().map(values),
            (values(&s.a), values(&s.b), &s.h),
            rows,
            d,
            s.scale,
            (px.is_some(), pa.is_some(), pb.is_some()),
        );
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Flex>(node.id, flex(dx, &[rows, d.0]));
        }
        if let (Some(node), Some(da)) = (pa, da) {
            grads.register::<Flex>(node.id, flex(da, &[d.1, d.0]));
        }
        if let (Some(node), Some(db)) = (pb, db) {
            grads.register::<Flex>(node.id, flex(db, &[d.2, d.1]));
        }
    }
}

/// The adapter's delta `scale · (x Aᵀ) Bᵀ` ([`cpu::lora_delta`]): gradients for `x`, `a`, `b`.
pub(crate) fn lora_delta<C: CheckpointStrategy>(
    x: AdTensor,
    a: AdTensor,
    b: AdTensor,
    scale: f32,
) -> AdTensor {
    lora_node::<C>(x, None, a, b, scale)
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen dense `w` `[out, in]` and an adapter `a` `[r, in]`,
/// `b` `[out, r]` as one node ([`cpu::lora_linear`]): gradients for `x`, `a` and `b`.
pub(crate) fn lora_linear<C: CheckpointStrategy>(
    x: AdTensor,
    w: FlexTensor,
    a: AdTensor,
    b: AdTensor,
    scale: f32,
) -> AdTensor {
    lora_node::<C>(x, Some(contiguous(&w)), a, b, scale)
}

fn lora_node<C: CheckpointStrategy>(
    x: AdTensor,
    w: Option<FlexTensor>,
    a: AdTensor,
    b: AdTensor,
    scale: f32,
) -> AdTensor {
    let (xf, af, bf) = (
        contiguous(&x.primitive),
        contiguous(&a.primitive),
        contiguous(&b.primitive),
    );
    let (rows, d) = lora_dims(&xf, &af, &bf);
    let (y, h) = match &w {
        Some(w) => {
            assert!(
                dims(w) == [d.2, d.0],
                "lora_linear: weight {:?}, adapter [{}, {}] · [{}, {}]",
                dims(w),
                d.2,
                d.1,
                d.1,
                d.0
            );
            cpu::lora_linear(
                values(&xf),
                values(w),
                values(&af),
                values(&bf),
                rows,
                d,
                scale,
            )
        }
        None => cpu::lora_delta(values(&xf), values(&af), values(&bf), rows, d, scale),
    };
    let y = flex(y, &[rows, d.2]);
    match LoraOp
        .prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            LoraState {
                x: xf,
                w,
                a: af,
                b: bf,
                h: Arc::new(h),
                scale,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
