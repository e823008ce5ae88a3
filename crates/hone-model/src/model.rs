//! The Llama-family decoder (Llama, Mistral, Qwen2) over any burn backend, following
//! transformers' `modeling_llama.py`: RMSNorm, grouped-query attention with RoPE in the
//! `rotate_half` layout, SwiGLU MLP, optional q/k/v biases, tied or untied `lm_head`.
//! Field names are the checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...).
//!
//! Every forward pass enters through [`CausalLm::forward`] with an [`Input`](crate::forward::Input)
//! describing it (see [`crate::forward`]); the layers here are its body, shared by training,
//! packed rows, evaluation, generation, batched serving and per-layer recomputation.

use std::sync::Arc;

use burn::module::{Module, Param, ParamId};
use burn::prelude::*;
use burn::tensor::{DType, Distribution, IndexingUpdateOp, TensorData};

use crate::cache::{HostKv, LayerCache};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::forward::Selection;
use crate::gguf::matmul::Activations;
use crate::gguf::QuantWeight;
use crate::kernels::{self, composed, KernelBackend, Kernels, RopeTables};
use crate::lora::Lora;
use crate::rope::RopeCache;
use crate::weights::WeightStore;

/// The adapter slot of the model's own adapter: the one training trains, `save_adapter` writes
/// and `merge_lora` folds. Serving loads further adapters into other slots.
pub const OWN_SLOT: usize = 0;

/// A linear projection with the weight in Hugging Face layout `[out, in]` and LoRA adapter
/// slots: `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ` with the adapter a row selects
/// ([`crate::forward::Adapters`]). The base weight and bias are frozen (they never require
/// gradients); only adapters train.
///
/// The base weight is a dense parameter, or, for GGUF models loaded on a backend that
/// multiplies by block formats ([`KernelBackend::keeps_quantized`]), the file's blocks
/// ([`BaseWeight`]).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub(crate) weight: BaseWeight<B>,
    /// `[out_features]`.
    pub(crate) bias: Option<Param<Tensor<B, 1>>>,
    /// Adapter slots; slot [`OWN_SLOT`] is the model's own adapter.
    pub(crate) adapters: Vec<Option<Lora<B>>>,
}

/// The frozen base weight `[out, in]` of a [`Linear`].
#[derive(Module, Debug)]
pub enum BaseWeight<B: Backend> {
    /// A dense parameter (it never requires gradients).
    Dense(Param<Tensor<B, 2>>),
    /// A GGUF tensor's blocks, multiplied by [`KernelBackend::quant_linear`]: not a parameter
    /// (no gradient, not in records), its bytes shared between clones of the model.
    Quantized(QuantWeight),
}

impl<B: Backend> Linear<B> {
    /// The frozen weight `[out, in]` when it is dense; `None` when it is kept quantized (see
    /// [`Linear::quantized`], [`Linear::dequantized_weight`]).
    pub fn weight(&self) -> Option<Tensor<B, 2>> {
        match &self.weight {
            BaseWeight::Dense(w) => Some(w.val()),
            BaseWeight::Quantized(_) => None,
        }
    }

    /// The frozen weight when it is kept in a ggml block format.
    pub fn quantized(&self) -> Option<&QuantWeight> {
        match &self.weight {
            BaseWeight::Dense(_) => None,
            BaseWeight::Quantized(q) => Some(q),
        }
    }

    /// The frozen weight `[out, in]` as a dense tensor: the parameter itself when dense, else a
    /// decoded copy on `device` in `dtype` (the memory of a dense layer: for merging and
    /// inspection, not for the forward pass).
    pub fn dequantized_weight(&self, device: &B::Device, dtype: DType) -> Tensor<B, 2> {
        match &self.weight {
            BaseWeight::Dense(w) => w.val(),
            BaseWeight::Quantized(q) => {
                let t =
                    Tensor::<B, 2>::from_data(TensorData::new(q.dequantize(), q.shape()), device);
                if dtype != DType::F32 {
                    t.cast(dtype)
                } else {
                    t
                }
            }
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match &self.weight {
            BaseWeight::Dense(w) => w.dims(),
            BaseWeight::Quantized(q) => q.shape(),
        }
    }

    /// The model's own adapter on this projection.
    pub fn lora(&self) -> Option<&Lora<B>> {
        self.slot(OWN_SLOT)
    }

    /// The adapter in `slot`.
    pub fn slot(&self, slot: usize) -> Option<&Lora<B>> {
        self.adapters.get(slot).and_then(Option::as_ref)
    }

    /// Puts `lora` into `slot`, returning what was there.
    pub(crate) fn set_slot(&mut self, slot: usize, lora: Option<Lora<B>>) -> Option<Lora<B>> {
        if self.adapters.len() <= slot {
            // An empty slot beyond the last: nothing to put or to give back.
            lora.as_ref()?;
            self.adapters.resize_with(slot + 1, || None);
        }
        let old = std::mem::replace(&mut self.adapters[slot], lora);
        while self.adapters.last().is_some_and(Option::is_none) {
            self.adapters.pop();
        }
        old
    }
}

impl<B: KernelBackend> Linear<B> {
    /// `x Wᵀ` for `x` `[rows, in]` (the bias is added by [`Self::finish`]).
    fn base(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.weight {
            BaseWeight::Dense(w) => B::dense_linear(x, w.val()),
            BaseWeight::Quantized(q) => B::quant_linear(x, q),
        }
    }

    /// `x`: `[..., in]` -> `[..., out]`, with the adapters `select` picks.
    pub(crate) fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        select: &Selection<B>,
        kernels: Kernels,
    ) -> Tensor<B, D> {
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x2d = x.reshape([rows, dims[D - 1]]);
        if let Some(y) = self.fused_with_adapter(x2d.clone(), select, kernels) {
            return self.shaped(self.with_bias(y), dims);
        }
        let y = self.base(x2d.clone());
        self.finish(y, x2d, select, kernels, dims)
    }

    /// `x Wᵀ` plus the adapter `select` picks as one fused product
    /// ([`KernelBackend::lora_linear`]: no separate delta to add, forwards or backwards), when
    /// the weight is dense, one adapter applies to every row, it has no dropout in effect and
    /// computes in `x`'s dtype with fused kernels; `None` otherwise (the bias is not added).
    fn fused_with_adapter(
        &self,
        x2d: Tensor<B, 2>,
        select: &Selection<B>,
        kernels: Kernels,
    ) -> Option<Tensor<B, 2>> {
        let (BaseWeight::Dense(w), Selection::Slot(slot)) = (&self.weight, select) else {
            return None;
        };
        let lora = self.slot(*slot)?;
        let a = lora.lora_a.val();
        let dropping = lora.dropout > 0.0 && B::ad_enabled(&x2d.device());
        if dropping || a.dtype() != x2d.dtype() || !kernels.fused::<B>(a.dtype()) {
            return None;
        }
        Some(B::lora_linear(
            x2d,
            w.val(),
            a,
            lora.lora_b.val(),
            lora.scale,
        ))
    }

    /// [`Linear::forward`] of one input through several projections of the same input width
    /// (a layer's q/k/v or gate/up): when every base weight is kept quantized, the products go
    /// to the backend together ([`KernelBackend::quant_linear_many`]: one parallel loop on the
    /// CPU when decoding); bias and adapters as in [`Linear::forward`].
    pub(crate) fn forward_many<const D: usize, const N: usize>(
        linears: [&Self; N],
        x: Tensor<B, D>,
        select: &Selection<B>,
        kernels: Kernels,
    ) -> [Tensor<B, D>; N] {
        let quantized: Option<Vec<&QuantWeight>> = linears.iter().map(|l| l.quantized()).collect();
        let Some(weights) = quantized else {
            return linears.map(|l| l.forward(x.clone(), select, kernels));
        };
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x2d = x.reshape([rows, dims[D - 1]]);
        let mut products = B::quant_linear_many(x2d.clone(), &weights).into_iter();
        linears.map(|l| {
            let y = products.next().expect("one product per weight");
            l.finish(y, x2d.clone(), select, kernels, dims)
        })
    }

    /// The base product `y` `[rows, out]` of `x2d` plus the bias and the adapters `select`
    /// picks, reshaped to `dims` with the last dimension `out`.
    fn finish<const D: usize>(
        &self,
        y: Tensor<B, 2>,
        x2d: Tensor<B, 2>,
        select: &Selection<B>,
        kernels: Kernels,
        dims: [usize; D],
    ) -> Tensor<B, D> {
        let mut y = self.with_bias(y);
        match select {
            Selection::Slot(slot) => {
                if let Some(lora) = self.slot(*slot) {
                    y = y + lora.delta(x2d, kernels);
                }
            }
            Selection::Rows(groups) => {
                for (slot, idx) in groups {
                    if let Some(lora) = self.slot(*slot) {
                        let delta = lora.delta(x2d.clone().select(0, idx.clone()), kernels);
                        y = y.select_assign(0, idx.clone(), delta, IndexingUpdateOp::Add);
                    }
                }
            }
        }
        self.shaped(y, dims)
    }

    /// `y` `[rows, out]` plus the bias, if the projection has one.
    fn with_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.bias {
            Some(b) => y + b.val().unsqueeze_dim(0),
            None => y,
        }
    }

    /// `y` `[rows, out]` reshaped to the input's `dims` with the last dimension `out`.
    fn shaped<const D: usize>(&self, y: Tensor<B, 2>, dims: [usize; D]) -> Tensor<B, D> {
        let mut out = dims;
        out[D - 1] = self.shape()[0];
        y.reshape(out)
    }
}

/// Root-mean-square layer norm: `w * x / sqrt(mean(x²) + eps)`, computed in f32.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub(crate) weight: Param<Tensor<B, 1>>,
    pub(crate) eps: f64,
}

impl<B: KernelBackend> RmsNorm<B> {
    /// `x`: `[batch, seq, hidden]`.
    pub(crate) fn forward(&self, x: Tensor<B, 3>, kernels: Kernels) -> Tensor<B, 3> {
        if kernels.fused::<B>(x.dtype()) {
            B::rms_norm(x, self.weight.val(), self.eps)
        } else {
            composed::rms_norm(x, self.weight.val(), self.eps)
        }
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub(crate) q_proj: Linear<B>,
    pub(crate) k_proj: Linear<B>,
    pub(crate) v_proj: Linear<B>,
    pub(crate) o_proj: Linear<B>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Sliding window of this layer (0 = full attention).
    pub(crate) sliding_window: usize,
}

/// What every layer of one forward pass shares: RoPE tables of the tokens and the adapter
/// selection of the rows.
pub(crate) struct LayerContext<'a, B: Backend> {
    pub(crate) rope: &'a RopeTables<B>,
    pub(crate) select: &'a Selection<B>,
    /// Which implementation of the fusable operations runs.
    pub(crate) kernels: Kernels,
}

/// A layer's view of the KV cache of a forward pass.
pub(crate) enum LayerCacheMut<'a, B: Backend> {
    None,
    /// One cache for the whole batch, holding `len` positions.
    Batch(&'a mut LayerCache<B>, usize),
    /// One cache per row, each with its own length.
    Rows(Vec<(&'a mut LayerCache<B>, usize)>),
    /// Rows of different numbers of new tokens, one after the other in a batch of one: row
    /// `b` (`lens[b]` tokens) continues its own cache, of its own length.
    Ragged(Vec<(&'a mut LayerCache<B>, usize)>, &'a [usize]),
}

impl<B: KernelBackend> Attention<B> {
    /// `x`: `[batch, seq, hidden]`; `mask` (`[batch, 1, seq, keys]`, true = masked) replaces the
    /// causal/sliding-window mask.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: LayerCacheMut<'_, B>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let select = ctx.select;
        if let (LayerCacheMut::None, Some(_)) = (&cache, &ctx.rope.host) {
            let full_mask = mask.is_none_or(|m| m.dims() == [batch, 1, seq, seq]);
            if full_mask && ctx.kernels.fused::<B>(x.dtype()) {
                return self.forward_fused(x, ctx.rope, mask, select);
            }
        }
        let mut cache = cache;
        let host_path = ctx.rope.host.is_some()
            && mask.is_none()
            && ctx.kernels.fused::<B>(x.dtype())
            && B::caches_on_host(x.dtype());
        match &mut cache {
            LayerCacheMut::Batch(slot, len) if host_path && slot.on_host() => {
                let host = slot.host_mut().expect("checked on_host");
                return self.forward_cached(x, ctx, &mut [(host, *len)], None);
            }
            LayerCacheMut::Rows(rows) if host_path && rows.iter().all(|(s, _)| s.on_host()) => {
                let mut rows: Vec<(&mut HostKv, usize)> = rows
                    .iter_mut()
                    .map(|(s, len)| (s.host_mut().expect("checked on_host"), *len))
                    .collect();
                return self.forward_cached(x, ctx, &mut rows, None);
            }
            LayerCacheMut::Ragged(rows, lens)
                if host_path && rows.iter().all(|(s, _)| s.on_host()) =>
            {
                let mut rows: Vec<(&mut HostKv, usize)> = rows
                    .iter_mut()
                    .map(|(s, len)| (s.host_mut().expect("checked on_host"), *len))
                    .collect();
                return self.forward_cached(x, ctx, &mut rows, Some(lens));
            }
            _ => {}
        }
        let q = self
            .q_proj
            .forward(x.clone(), select, ctx.kernels)
            .reshape([batch, seq, h, d]);
        let k = self
            .k_proj
            .forward(x.clone(), select, ctx.kernels)
            .reshape([batch, seq, kvh, d]);
        let v = self
            .v_proj
            .forward(x, select, ctx.kernels)
            .reshape([batch, seq, kvh, d]);
        let q = composed::apply_rope(q, ctx.rope).swap_dims(1, 2);
        let k = composed::apply_rope(k, ctx.rope).swap_dims(1, 2);
        let v = v.swap_dims(1, 2);
        let out = match cache {
            LayerCacheMut::None => self.attend(q, k, v, 0, mask),
            LayerCacheMut::Batch(slot, len) => {
                let (k, v) = slot.append(len, k, v);
                self.attend(q, k, v, len, mask)
            }
            LayerCacheMut::Rows(rows) => {
                // Rows continue caches of different lengths: attention runs per row.
                let outs = rows
                    .into_iter()
                    .enumerate()
                    .map(|(r, (slot, len))| {
                        let row = |t: &Tensor<B, 4>| t.clone().narrow(0, r, 1);
                        let (k, v) = slot.append(len, row(&k), row(&v));
                        let mask = mask.map(|m| m.clone().narrow(0, r, 1));
                        self.attend(row(&q), k, v, len, mask.as_ref())
                    })
                    .collect();
                Tensor::cat(outs, 0)
            }
            LayerCacheMut::Ragged(rows, lens) => {
                // Rows of different lengths one after the other: attention runs per row, over
                // its span of the tokens.
                let mut start = 0;
                let outs = rows
                    .into_iter()
                    .zip(lens)
                    .map(|((slot, past), &len)| {
                        let span = |t: &Tensor<B, 4>| t.clone().narrow(2, start, len);
                        let (k, v) = slot.append(past, span(&k), span(&v));
                        let out = self.attend(span(&q), k, v, past, None);
                        start += len;
                        out
                    })
                    .collect();
                Tensor::cat(outs, 1)
            }
        };
        self.o_proj.forward(out, select, ctx.kernels)
    }

    /// [`Self::forward`] without a cache through the backend's fused kernels: RoPE and attention
    /// on the projections' own `[batch, seq, heads, head_dim]` layout, no transposes or copies of
    /// grouped keys and values.
    fn forward_fused(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        select: &Selection<B>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (q, k, v) = self.fused_qkv(x, rope, select);
        let mask = match mask {
            Some(m) => {
                let m = m.clone().reshape([batch * seq * seq]).into_data();
                let m: Vec<bool> = m
                    .to_vec::<bool>()
                    .expect("a boolean mask converts to bools");
                kernels::Mask::Dense(Arc::new(m))
            }
            None => kernels::Mask::Causal {
                window: self.sliding_window,
            },
        };
        let shape = self.attn_shape(batch, seq);
        self.o_proj.forward(
            <B as KernelBackend>::attention(q, k, v, shape, mask),
            select,
            Kernels::Fused,
        )
    }

    /// q, k (RoPE applied) and v of `x` through the fused kernels, in the projections' own
    /// `[batch, seq, heads * head_dim]` layout.
    fn fused_qkv(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        select: &Selection<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let [q, k, v] = Linear::forward_many(projections, x, select, Kernels::Fused);
        (B::rope(q, h, d, rope), B::rope(k, kvh, d, rope), v)
    }

    /// The shapes of this layer's attention over `batch` rows of `seq` queries.
    fn attn_shape(&self, batch: usize, seq: usize) -> kernels::AttnShape {
        kernels::AttnShape {
            batch,
            seq,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// [`Self::forward`] continuing host KV caches through the backend's fused kernels (RoPE,
    /// attention over the cache read in place): one cache `(cache, past)` for the whole batch,
    /// or one per row (rows of different lengths: the projections and attention run batched,
    /// each row over its own cache); with `ragged`, rows of those numbers of new tokens one after
    /// the other in a batch of one.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        caches: &mut [(&mut HostKv, usize)],
        ragged: Option<&[usize]>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let select = ctx.select;
        let (q, k, v) = self.fused_qkv(x, ctx.rope, select);
        let window = self.sliding_window;
        let shape = |batch| self.attn_shape(batch, seq);
        let out = match (caches, ragged) {
            (rows, Some(lens)) => {
                B::attention_cached_ragged(q, k, v, rows, lens, shape(batch), window)
            }
            ([(cache, past)], None) => {
                B::attention_cached(q, k, v, cache, *past, shape(batch), window)
            }
            (rows, None) => B::attention_cached_rows(q, k, v, rows, shape(batch), window),
        };
        self.o_proj.forward(out, select, Kernels::Fused)
    }

    /// [`composed::attend`] with this layer's sliding window.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        past: usize,
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 3> {
        composed::attend(q, k, v, past, mask, self.sliding_window)
    }
}

/// SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub(crate) gate_proj: Linear<B>,
    pub(crate) up_proj: Linear<B>,
    pub(crate) down_proj: Linear<B>,
}

impl<B: KernelBackend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>, select: &Selection<B>, kernels: Kernels) -> Tensor<B, 3> {
        let [gate, up] = Linear::forward_many([&self.gate_proj, &self.up_proj], x, select, kernels);
        let act = if kernels.fused::<B>(gate.dtype()) {
            B::swiglu(gate, up)
        } else {
            composed::swiglu(gate, up)
        };
        self.down_proj.forward(act, select, kernels)
    }
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub(crate) self_attn: Attention<B>,
    pub(crate) mlp: Mlp<B>,
    pub(crate) input_layernorm: RmsNorm<B>,
    pub(crate) post_attention_layernorm: RmsNorm<B>,
}

impl<B: KernelBackend> DecoderLayer<B> {
    /// The layer body every forward pass runs: `x` `[batch, seq, hidden]` -> same shape.
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: LayerCacheMut<'_, B>,
    ) -> Tensor<B, 3> {
        let normed = self.input_layernorm.forward(x.clone(), ctx.kernels);
        let h = x + self.self_attn.forward(normed, ctx, mask, cache);
        let normed = self
            .post_attention_layernorm
            .forward(h.clone(), ctx.kernels);
        h + self.mlp.forward(normed, ctx.select, ctx.kernels)
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's projections, named as under `model.layers.N.`, in checkpoint order.
    pub(crate) fn projections(&self) -> [(&'static str, &Linear<B>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    /// Mutable access to the projections, as [`DecoderLayer::projections`].
    pub(crate) fn projections_mut(&mut self) -> [(&'static str, &mut Linear<B>); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    /// This layer's sliding window (0 = full attention).
    pub(crate) fn window(&self) -> usize {
        self.self_attn.sliding_window
    }
}

/// The decoder stack (checkpoint prefix `model.`).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`.
    pub(crate) embed_tokens: Param<Tensor<B, 2>>,
    pub(crate) layers: Vec<DecoderLayer<B>>,
    pub(crate) norm: RmsNorm<B>,
}

/// A causal language model: decoder + `lm_head` (absent when tied to `embed_tokens`).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub(crate) model: Decoder<B>,
    pub(crate) lm_head: Option<Linear<B>>,
    /// The tied output projection in the block format the source stores `embed_tokens` in
    /// (kept beside the f32 embeddings when projections are kept quantized): inference
    /// multiplies by it, reading a quarter of the bytes (SmolLM2's Q8_0 head: 30 of 113 MB a
    /// token). The training loss keeps the f32 table.
    pub(crate) tied_head: Option<QuantWeight>,
    /// RoPE frequencies and the cos/sin tables of every position used so far (built once,
    /// grown on demand, shared by clones of the model).
    #[module(skip)]
    pub(crate) rope: Arc<RopeCache>,
    #[module(skip)]
    pub(crate) config: ModelConfig,
    /// Recompute each decoder layer in the backward pass of training steps
    /// ([`CausalLm::enable_gradient_checkpointing`], [`crate::recompute`]).
    #[module(skip)]
    pub(crate) gradient_checkpointing: bool,
    /// Which implementation of the fusable operations runs ([`CausalLm::set_kernels`]).
    #[module(skip)]
    pub(crate) kernels: Kernels,
}

/// Options for building a model.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Compute dtype of the weights (F32 by default; BF16/F16 on GPUs).
    pub dtype: DType,
    /// Decode quantized GGUF projection weights to dense tensors at load even where the
    /// backend multiplies by block formats ([`KernelBackend::keeps_quantized`]: Flex, f32).
    /// False by default: they stay quantized there (`--dequantize`, `model.dequantize`).
    pub dequantize: bool,
    /// How the weights kept quantized multiply activations: exact f32 by default, 8-bit
    /// activations as llama.cpp does (`--q8-activations`), or bfloat16 activations for BF16
    /// weights' many-row products (`--bf16-activations`); both faster, not exact.
    pub activations: Activations,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            dequantize: false,
            activations: Activations::F32,
        }
    }
}

/// What loading found besides the tensors it used.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors in the checkpoint that the model does not use (full names).
    pub unused: Vec<String>,
}

/// Tensors under Hugging Face's names, as f32: a safetensors checkpoint ([`WeightStore`]) or a
/// GGUF file ([`crate::gguf::GgufWeights`]).
pub trait WeightSource {
    /// Tensor `name` as f32 in row-major order, checking that its shape is `expected`.
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>>;
    /// Every tensor the source holds (to report those a model does not use).
    fn names(&self) -> Vec<String>;
    /// Tensor `name` `[out, in]` in its block format when the source stores it quantized in a
    /// format [`QuantWeight`] multiplies by (`None`: load it with [`WeightSource::load_f32`]).
    fn load_quant(&self, name: &str, expected: [usize; 2]) -> Result<Option<QuantWeight>> {
        let _ = (name, expected);
        Ok(None)
    }
}

impl WeightSource for WeightStore {
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        WeightStore::load_f32(self, name, expected)
    }

    fn names(&self) -> Vec<String> {
        WeightStore::names(self)
    }
}

/// Where the weights of a model come from.
enum Source<'a> {
    Checkpoint(&'a dyn WeightSource, std::cell::RefCell<Vec<String>>),
    Random,
}

struct Builder<'a, B: Backend> {
    source: Source<'a>,
    device: &'a B::Device,
    dtype: DType,
    /// Keep projection weights the source stores quantized in their block formats.
    keep_quantized: bool,
    /// The few-row products of the weights kept quantized.
    activations: Activations,
}

impl<B: Backend> Builder<'_, B> {
    fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        let tensor = match &self.source {
            Source::Checkpoint(store, used) => {
                let values = store.load_f32(name, &shape)?;
                used.borrow_mut().push(name.to_string());
                Tensor::<B, D>::from_data(TensorData::new(values, shape), self.device)
            }
            Source::Random => match init {
                Init::Normal => {
                    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 0.02), self.device)
                }
                Init::Ones => Tensor::<B, D>::ones(shape, self.device),
                Init::Zeros => Tensor::<B, D>::zeros(shape, self.device),
            },
        };
        Ok(if self.dtype != DType::F32 {
            tensor.cast(self.dtype)
        } else {
            tensor
        })
    }

    /// A frozen parameter: it never requires gradients, so no optimizer state is kept for it.
    fn param<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::initialized(
            ParamId::new(),
            self.tensor(name, shape, init)?,
        ))
    }

    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear<B>> {
        let name = format!("{prefix}.weight");
        let quant = match &self.source {
            Source::Checkpoint(store, used) if self.keep_quantized => {
                let quant = store
                    .load_quant(&name, [out, inp])?
                    .map(|q| q.with_activations(self.activations));
                if quant.is_some() {
                    used.borrow_mut().push(name.clone());
                }
                quant
            }
            _ => None,
        };
        let weight = match quant {
            Some(q) => BaseWeight::Quantized(q),
            None => BaseWeight::Dense(self.param(&name, [out, inp], Init::Normal)?),
        };
        Ok(Linear {
            weight,
            bias: if bias {
                Some(self.param(&format!("{prefix}.bias"), [out], Init::Zeros)?)
            } else {
                None
            },
            adapters: Vec::new(),
        })
    }

    fn norm(&self, name: &str, size: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: self.param(name, [size], Init::Ones)?,
            eps,
        })
    }

    fn build(&self, config: &ModelConfig) -> Result<CausalLm<B>> {
        let c = config;
        let (hid, d) = (c.hidden_size, c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: self.linear(
                        &format!("{p}.self_attn.q_proj"),
                        hid,
                        c.num_heads * d,
                        c.qkv_bias,
                    )?,
                    k_proj: self.linear(
                        &format!("{p}.self_attn.k_proj"),
                        hid,
                        c.num_kv_heads * d,
                        c.qkv_bias,
                    )?,
                    v_proj: self.linear(
                        &format!("{p}.self_attn.v_proj"),
                        hid,
                        c.num_kv_heads * d,
                        c.qkv_bias,
                    )?,
                    o_proj: self.linear(
                        &format!("{p}.self_attn.o_proj"),
                        c.num_heads * d,
                        hid,
                        c.o_bias,
                    )?,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: d,
                    sliding_window: c.sliding_window[i].unwrap_or(0),
                },
                mlp: Mlp {
                    gate_proj: self.linear(
                        &format!("{p}.mlp.gate_proj"),
                        hid,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                    up_proj: self.linear(
                        &format!("{p}.mlp.up_proj"),
                        hid,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                    down_proj: self.linear(
                        &format!("{p}.mlp.down_proj"),
                        c.intermediate_size,
                        hid,
                        c.mlp_bias,
                    )?,
                },
                input_layernorm: self.norm(
                    &format!("{p}.input_layernorm.weight"),
                    hid,
                    c.rms_norm_eps,
                )?,
                post_attention_layernorm: self.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    hid,
                    c.rms_norm_eps,
                )?,
            });
        }
        let model = Decoder {
            embed_tokens: self.param(
                "model.embed_tokens.weight",
                [c.vocab_size, hid],
                Init::Normal,
            )?,
            layers,
            norm: self.norm("model.norm.weight", hid, c.rms_norm_eps)?,
        };
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.linear("lm_head", hid, c.vocab_size, false)?)
        };
        let tied_head = match &self.source {
            Source::Checkpoint(store, _) if self.keep_quantized && c.tie_word_embeddings => store
                .load_quant("model.embed_tokens.weight", [c.vocab_size, hid])?
                .map(|q| q.with_activations(self.activations)),
            _ => None,
        };
        Ok(CausalLm {
            model,
            lm_head,
            tied_head,
            rope: Arc::new(RopeCache::new(crate::rope::inverse_frequencies(
                c.rotary_dim(),
                c.rope_theta,
                &c.rope_scaling,
            ))),
            config: c.clone(),
            gradient_checkpointing: false,
            kernels: Kernels::default(),
        })
    }
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    Ones,
    Zeros,
}

impl<B: KernelBackend> CausalLm<B> {
    /// Builds the model of `config` from the tensors of `store`. Missing or mis-shaped tensors
    /// are errors naming the tensor and file; tensors the model does not use are reported.
    /// Projection weights `store` holds quantized stay quantized where the backend multiplies
    /// by them ([`KernelBackend::keeps_quantized`]) unless `options.dequantize`.
    pub fn from_store(
        config: &ModelConfig,
        store: &dyn WeightSource,
        device: &B::Device,
        options: LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        let builder = Builder::<B> {
            source: Source::Checkpoint(store, Default::default()),
            device,
            dtype: options.dtype,
            keep_quantized: !options.dequantize && B::keeps_quantized(options.dtype),
            activations: options.activations,
        };
        let model = builder.build(config)?;
        let used = match &builder.source {
            Source::Checkpoint(_, used) => used.borrow().clone(),
            Source::Random => Vec::new(),
        };
        let used: std::collections::HashSet<String> = used.into_iter().collect();
        let unused = store
            .names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect();
        Ok((model, LoadReport { unused }))
    }
}

impl<B: Backend> CausalLm<B> {
    /// A model of `config` with random weights (normal, std 0.02; norms at one), for benchmarks.
    pub fn random(config: &ModelConfig, device: &B::Device, options: LoadOptions) -> Self {
        let builder = Builder::<B> {
            source: Source::Random,
            device,
            dtype: options.dtype,
            keep_quantized: false,
            activations: Activations::F32,
        };
        builder
            .build(config)
            .expect("building a model from random weights reads no file and cannot fail")
    }

    /// Number of projections (decoder layers' and the output head, untied or tied to a quantized
    /// `embed_tokens`) whose weight is kept quantized.
    pub fn quantized_projections(&self) -> usize {
        let layers = self
            .model
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .filter(|(_, l)| l.quantized().is_some())
            .count();
        layers
            + usize::from(
                self.lm_head
                    .as_ref()
                    .is_some_and(|h| h.quantized().is_some())
                    || self.tied_head.is_some(),
            )
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Inverse RoPE frequencies `[rotary_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        self.rope.inv_freq()
    }

    /// Whether training steps recompute each layer in the backward pass.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.val().dtype()
    }

    /// Which implementation of the fusable operations the forward passes run.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Runs the backend's fused kernels ([`Kernels::Fused`], the default) or composed burn
    /// operations ([`Kernels::Composed`], for comparisons).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }
}
