//! Gradient checkpointing per decoder layer (what `gradient_checkpointing_enable()` does in
//! transformers): the forward pass runs without autodiff and keeps only each layer's input;
//! the backward pass then goes layer by layer from the top, running each layer again with
//! autodiff from its saved input and backpropagating the gradient that arrived from the layer
//! above. Activation memory falls from every intermediate of every layer to one hidden state per
//! layer plus one layer's intermediates, for one extra forward pass of compute.
//!
//! Each layer's recomputation is its own autodiff graph and its own `backward()` call, so the
//! result is exactly the plain backward pass reassociated at layer boundaries.
//!
//! LoRA dropout draws a new mask on every forward pass, so the recomputation would not see the
//! mask of the first pass: checkpointing refuses adapters with dropout.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::error::{ModelError, Result};
use crate::forward::{Adapters, Positions, Prepared, Selection, Visibility};
use crate::kernels::{AutodiffKernelBackend, RopeTables};
use crate::loss::causal_lm_loss_sum_hidden;
use crate::model::{CausalLm, LayerCacheMut, LayerContext};

/// What one checkpointed forward and backward pass produced.
#[derive(Debug, Clone)]
pub struct CheckpointedGradients<B: Backend> {
    /// Summed negative log-likelihood of the targets `[1]`.
    pub loss_sum: Tensor<B, 1>,
    /// Number of targets.
    pub count: usize,
    /// Gradients of `lora_A`, `lora_B` of every adapted projection, in
    /// [`CausalLm::adapters`] order (zeros where a tensor got none).
    pub grads: Vec<Tensor<B, 2>>,
}

fn inner_tables<B: AutodiffBackend>(t: &RopeTables<B>) -> RopeTables<B::InnerBackend> {
    RopeTables {
        cos: t.cos.clone().inner(),
        sin: t.sin.clone().inner(),
        host: t.host.clone(),
    }
}

impl<B: Backend> CausalLm<B> {
    /// Marks the model for per-layer recomputation in training steps (see the module docs).
    /// Refused when an adapter uses dropout.
    pub fn enable_gradient_checkpointing(&mut self) -> Result<()> {
        refuse_dropout(self)?;
        self.gradient_checkpointing = true;
        Ok(())
    }
}

fn refuse_dropout<B: Backend>(model: &CausalLm<B>) -> Result<()> {
    match model.adapters().into_iter().find(|(_, a)| a.dropout > 0.0) {
        Some((name, _)) => Err(ModelError::Input(format!(
            "gradient checkpointing needs LoRA dropout 0 (the recomputed forward pass would \
             draw another dropout mask); `{name}` has dropout > 0"
        ))),
        None => Ok(()),
    }
}

impl<B: AutodiffKernelBackend> CausalLm<B> {
    /// Loss and adapter gradients of one batch with each decoder layer recomputed in the
    /// backward pass. `packing` is `(position_ids, segment_ids)` as for
    /// [`crate::Input::packed`]; `labels` as for [`crate::loss::causal_lm_loss_sum`].
    pub fn checkpointed_gradients(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<(&[u32], &[u32])>,
        labels: &[i64],
    ) -> Result<CheckpointedGradients<B::InnerBackend>> {
        refuse_dropout(self)?;
        let [batch, seq] = input_ids.dims();
        let (positions, visibility) = match packing {
            Some((positions, segments)) => (
                Positions::PerToken(positions.to_vec()),
                Visibility::Segments(segments.to_vec()),
            ),
            None => (Positions::Continue, Visibility::Causal),
        };
        let Prepared {
            x,
            rope,
            masks,
            select,
        } = self.prepare(
            input_ids,
            positions,
            &visibility,
            &Adapters::default(),
            &vec![0; batch],
            0,
        );
        let slot = match select {
            Selection::Slot(slot) => slot,
            Selection::Rows(_) => unreachable!("one slot for every row"),
        };
        let ctx = LayerContext {
            rope: &rope,
            select: &select,
            kernels: self.kernels,
        };
        debug_assert_eq!(x.dims()[1], seq);

        // Forward without autodiff, keeping each layer's input.
        let inner = self.valid();
        let inner_rope = inner_tables(&rope);
        let inner_select = Selection::Slot(slot);
        let inner_ctx = LayerContext {
            rope: &inner_rope,
            select: &inner_select,
            kernels: self.kernels,
        };
        let mut inputs = Vec::with_capacity(inner.model.layers.len());
        let mut x = x.inner();
        for (layer, mask) in inner.model.layers.iter().zip(&masks) {
            inputs.push(x.clone());
            let mask = mask.clone().map(|m| m.inner());
            x = layer.forward(x, &inner_ctx, mask.as_ref(), LayerCacheMut::None);
        }

        // The head: final norm, output projection, loss.
        let top = Tensor::<B, 3>::from_inner(x).require_grad();
        let (sum, count) = causal_lm_loss_sum_hidden(self, self.norm(top.clone()), labels);
        let loss_sum = sum.clone().inner();
        let grads = sum.backward();
        let mut upstream = top.grad(&grads).unwrap_or_else(|| top.inner().zeros_like());

        // Layers from the top: recompute with autodiff, backpropagate `upstream`.
        let mut per_layer = Vec::with_capacity(inputs.len());
        for ((layer, mask), x) in self.model.layers.iter().zip(&masks).zip(inputs).rev() {
            let x = Tensor::<B, 3>::from_inner(x).require_grad();
            let y = layer.forward(x.clone(), &ctx, mask.as_ref(), LayerCacheMut::None);
            let grads = (y * Tensor::from_inner(upstream)).sum().backward();
            let mut adapters = Vec::new();
            for (_, linear) in layer.projections() {
                if let Some(lora) = linear.slot(slot) {
                    for p in [&lora.lora_a, &lora.lora_b] {
                        adapters.push(
                            p.grad(&grads)
                                .unwrap_or_else(|| p.val().inner().zeros_like()),
                        );
                    }
                }
            }
            per_layer.push(adapters);
            upstream = x.grad(&grads).unwrap_or_else(|| x.inner().zeros_like());
        }
        per_layer.reverse();
        Ok(CheckpointedGradients {
            loss_sum,
            count,
            grads: per_layer.into_iter().flatten().collect(),
        })
    }
}
