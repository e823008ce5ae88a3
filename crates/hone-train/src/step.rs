//! One optimizer step over the LoRA adapters: forward and backward of each micro-batch,
//! gradient accumulation, global-norm clipping and the AdamW update.
//!
//! The loss of a step is transformers' causal-LM loss over *all* its micro-batches: the
//! summed negative log-likelihood of every target token divided by the number of target
//! tokens of the whole step (`num_items_in_batch`), so that accumulating four micro-batches of
//! one row computes exactly what one batch of four rows would. Each micro-batch contributes
//! the gradient of its NLL *sum*; the accumulated sum is divided by the step's target count.
//!
//! A step runs through a [`StepEngine`]: [`SingleDevice`] here, or
//! [`DataParallel`](crate::parallel::DataParallel) over several devices and nodes; both
//! update a [`Learner`] (the model and its optimizer).
//!
//! Trainable parameters are found by walking the model's projections ([`adapter_keys`]): the
//! adapters' `lora_A`/`lora_B` in checkpoint order, named by their PEFT keys. Base weights are
//! never touched, so no gradient or optimizer memory is spent on them.

use std::time::Duration;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::adapter::peft_key;
use hone_model::loss::causal_lm_loss_sum_hidden;
use hone_model::AutodiffKernelBackend;
use hone_model::{CausalLm, Input};
use hone_tokenize::{Batch, PAD_SEGMENT};

use crate::error::{Result, TrainError};
use crate::optim::{clip_by_global_norm, global_norm, AdamW, AdamWConfig};
use crate::parallel::{DataParallel, MultiNode, ParallelConfig};

/// The rows of one forward pass, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub batch: usize,
    pub seq: usize,
    /// `[batch * seq]` token ids.
    pub input_ids: Vec<i64>,
    /// `[batch * seq]` unshifted labels (-100 = not in the loss).
    pub labels: Vec<i64>,
    /// `(position_ids, segment_ids)` when a row holds several examples or padding; `None`
    /// when every row is one unpadded sequence (plain causal attention).
    pub packing: Option<(Vec<u32>, Vec<u32>)>,
}

impl MicroBatch {
    /// A batch of unpadded single sequences.
    pub fn dense(input_ids: Vec<i64>, labels: Vec<i64>, batch: usize) -> Self {
        let seq = input_ids.len() / batch.max(1);
        Self {
            batch,
            seq,
            input_ids,
            labels,
            packing: None,
        }
    }

    /// From collated rows (packed or padded).
    pub fn from_batch(b: &Batch) -> Self {
        let single = b.segment_ids.iter().all(|&s| s == 1)
            && (0..b.batch_size).all(|r| {
                b.position_ids[r * b.seq_len..(r + 1) * b.seq_len]
                    .iter()
                    .enumerate()
                    .all(|(i, &p)| p as usize == i)
            });
        Self {
            batch: b.batch_size,
            seq: b.seq_len,
            input_ids: b.input_ids.iter().map(|&i| i64::from(i)).collect(),
            labels: b.labels.iter().map(|&l| i64::from(l)).collect(),
            packing: (!single).then(|| (b.position_ids.clone(), b.segment_ids.clone())),
        }
    }

    /// Tokens that are not padding.
    pub fn tokens(&self) -> usize {
        match &self.packing {
            Some((_, segments)) => segments.iter().filter(|&&s| s != PAD_SEGMENT).count(),
            None => self.input_ids.len(),
        }
    }

    /// Token ids `[batch, seq]` on `device`.
    pub fn ids<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.input_ids.clone(), [self.batch, self.seq]),
            device,
        )
    }

    /// Summed negative log-likelihood of the targets (differentiable) and their number; on the
    /// CPU the logits are never materialised (`causal_lm_loss_sum_hidden`).
    pub fn loss_sum<B: hone_model::KernelBackend>(
        &self,
        model: &CausalLm<B>,
        device: &B::Device,
    ) -> (Tensor<B, 1>, usize) {
        let ids = self.ids(device);
        let input = match &self.packing {
            Some((positions, segments)) => Input::new(ids).packed(positions, segments),
            None => Input::new(ids),
        };
        let hidden = model.forward(input.hidden());
        causal_lm_loss_sum_hidden(model, hidden, &self.labels)
    }
}

/// PEFT keys of the trainable tensors, in the order every function here uses.
pub fn adapter_keys<B: Backend>(model: &CausalLm<B>) -> Vec<String> {
    let mut keys = Vec::new();
    for (name, _) in model.adapters() {
        keys.push(peft_key(&name, "lora_A"));
        keys.push(peft_key(&name, "lora_B"));
    }
    keys
}

/// The adapter tensors, in [`adapter_keys`] order.
pub fn adapter_values<B: Backend>(model: &CausalLm<B>) -> Vec<Tensor<B, 2>> {
    let mut out = Vec::new();
    for (_, lora) in model.adapters() {
        out.push(lora.lora_a.val());
        out.push(lora.lora_b.val());
    }
    out
}

/// The gradients of the adapter tensors (zeros where a tensor got none), detached.
fn adapter_grads<B: AutodiffKernelBackend>(
    model: &CausalLm<B>,
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 2>> {
    let mut out = Vec::new();
    for (_, lora) in model.adapters() {
        for p in [&lora.lora_a, &lora.lora_b] {
            out.push(
                p.grad(grads)
                    .unwrap_or_else(|| p.val().inner().zeros_like()),
            );
        }
    }
    out
}

/// Replaces the adapter tensors (same order and shapes), keeping each parameter's id and
/// making it trainable again.
pub fn set_adapter_values<B: AutodiffKernelBackend>(
    model: &mut CausalLm<B>,
    values: Vec<Tensor<B::InnerBackend, 2>>,
) {
    let mut values = values.into_iter();
    for (_, lora) in model.adapters_mut() {
        for p in [&mut lora.lora_a, &mut lora.lora_b] {
            let value = values.next().expect("one value per adapter tensor");
            *p = Param::initialized(p.id, Tensor::from_inner(value).require_grad());
        }
    }
}

/// Unnormalised gradients of some micro-batches: what one data-parallel peer contributes to a
/// step before the peers' contributions are summed and divided by the step's target count.
#[derive(Debug, Clone)]
pub struct GradientSums<B: Backend> {
    /// Gradients of the summed NLL, in [`adapter_keys`] order (zeros when no target).
    pub grads: Vec<Tensor<B, 2>>,
    /// `[1]`: the summed NLL of every target token.
    pub nll: Tensor<B, 1>,
    /// Target tokens.
    pub targets: usize,
    /// Non-padding tokens.
    pub tokens: usize,
}

/// Gradients of one step, already divided by the step's target count.
#[derive(Debug, Clone)]
pub struct StepGradients<B: Backend> {
    /// In [`adapter_keys`] order.
    pub grads: Vec<Tensor<B, 2>>,
    /// Mean loss over the step's targets (NaN or infinite when the forward pass was).
    pub loss: f64,
    /// Target tokens of the step.
    pub targets: usize,
    /// Non-padding tokens of the step.
    pub tokens: usize,
}

/// Forward and backward of every micro-batch in `batches`, without normalisation; zero
/// gradients when there is no target (a data-parallel peer may get no micro-batch of a short
/// last step). `before_micro_batch(i)` runs before the forward pass of micro-batch `i` (the
/// trainer seeds the dropout generator there); what it returns is held until that forward
/// pass is done, before its backward pass.
pub fn gradient_sums<B: AutodiffKernelBackend, G>(
    model: &CausalLm<B>,
    batches: &[MicroBatch],
    device: &B::Device,
    mut before_micro_batch: impl FnMut(usize) -> G,
) -> GradientSums<B::InnerBackend> {
    let mut sums: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
    let mut nll: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    let (mut targets, mut tokens) = (0usize, 0usize);
    for (i, batch) in batches.iter().enumerate() {
        tokens += batch.tokens();
        let guard = before_micro_batch(i);
        // `enable_gradient_checkpointing` refuses what `checkpointed_gradients` refuses, so an
        // error here means adapters changed since; the plain backward pass is still correct.
        let checkpointed = model.gradient_checkpointing().then(|| {
            model.checkpointed_gradients(
                batch.ids(device),
                batch.packing.as_ref().map(|(p, s)| (&p[..], &s[..])),
                &batch.labels,
            )
        });
        if let Some(Err(e)) = &checkpointed {
            tracing::warn!("gradient checkpointing skipped for this micro-batch: {e}");
        }
        let (sum, count, micro) = if let Some(Ok(out)) = checkpointed {
            drop(guard);
            (out.loss_sum, out.count, out.grads)
        } else {
            let (sum, count) = batch.loss_sum(model, device);
            drop(guard);
            if count == 0 {
                continue;
            }
            let inner = sum.clone().inner();
            let grads = sum.backward();
            (inner, count, adapter_grads(model, &grads))
        };
        if count == 0 {
            continue;
        }
        targets += count;
        nll.push(sum);
        sums = Some(match sums {
            None => micro,
            Some(acc) => acc.into_iter().zip(micro).map(|(a, g)| a + g).collect(),
        });
    }
    let grads = sums.unwrap_or_else(|| {
        adapter_values(model)
            .into_iter()
            .map(|p| p.inner().zeros_like())
            .collect()
    });
    let nll = if nll.is_empty() {
        Tensor::zeros([1], device)
    } else {
        Tensor::cat(nll, 0).sum()
    };
    GradientSums {
        grads,
        nll,
        targets,
        tokens,
    }
}

/// Forward and backward of every micro-batch of one step. `before_micro_batch(i)` runs before
/// micro-batch `i` (the trainer seeds the dropout generator there).
pub fn step_gradients<B: AutodiffKernelBackend, G>(
    model: &CausalLm<B>,
    batches: &[MicroBatch],
    device: &B::Device,
    before_micro_batch: impl FnMut(usize) -> G,
) -> Result<StepGradients<B::InnerBackend>> {
    let sums = gradient_sums(model, batches, device, before_micro_batch);
    if sums.targets == 0 {
        return Err(no_targets());
    }
    let scale = 1.0 / sums.targets as f64;
    let nll_sum = read_f64s(sums.nll, "the loss")?[0];
    Ok(StepGradients {
        grads: sums.grads.into_iter().map(|g| g * scale).collect(),
        loss: nll_sum * scale,
        targets: sums.targets,
        tokens: sums.tokens,
    })
}

/// The error of a step without any token in the loss.
pub(crate) fn no_targets() -> TrainError {
    TrainError::Dataset("a training step has no token in the loss".into())
}

/// The values of a 1-D tensor on the host, as f64.
pub(crate) fn read_f64s<B: Backend>(t: Tensor<B, 1>, what: &str) -> Result<Vec<f64>> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| TrainError::Tensor {
            what: what.into(),
            message: format!("{e:?}"),
        })
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean loss of the step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// False when the loss or gradient was not finite and the update was skipped.
    pub applied: bool,
    pub targets: usize,
    pub tokens: usize,
}

/// Clips `grads` (when `max_grad_norm > 0`) and applies AdamW to the model's adapters, unless
/// the loss or gradient norm is not finite (then nothing changes and `applied` is false).
pub fn apply_update<B: AutodiffKernelBackend>(
    model: &mut CausalLm<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    step: StepGradients<B::InnerBackend>,
    lr: f64,
    max_grad_norm: f64,
) -> Result<StepOutcome> {
    let grad_norm = global_norm(&step.grads)?;
    let mut outcome = StepOutcome {
        loss: step.loss,
        grad_norm,
        lr,
        applied: false,
        targets: step.targets,
        tokens: step.tokens,
    };
    if !(step.loss.is_finite() && grad_norm.is_finite()) {
        return Ok(outcome);
    }
    let grads = if max_grad_norm > 0.0 {
        clip_by_global_norm(step.grads, grad_norm, max_grad_norm)
    } else {
        step.grads
    };
    let params = adapter_values(model)
        .into_iter()
        .map(|p| p.inner())
        .collect();
    let updated = optimizer.update(lr, params, grads);
    set_adapter_values(model, updated);
    outcome.applied = true;
    Ok(outcome)
}

/// A seed for the random numbers of micro-batch `micro` of step `step` (splitmix64 mixing).
fn step_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ ((step as u64) << 20 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D1_049B_133A_D1EB);
    z ^ (z >> 31)
}

/// The seeds of the backend's generator before each of the `micro_batches` of step `step`: the
/// dropout masks depend only on `(seed, step, micro-batch)`, whichever engine runs the step.
pub fn step_seeds(seed: u64, step: usize, micro_batches: usize) -> Vec<u64> {
    (0..micro_batches)
        .map(|micro| step_seed(seed, step, micro))
        .collect()
}

/// A model with adapters and its optimizer: what a [`StepEngine`] updates. The trainer, the
/// benchmark (`hone bench train`) and the reference tests hold one.
pub struct Learner<B: AutodiffKernelBackend> {
    pub model: CausalLm<B>,
    pub optimizer: AdamW<B::InnerBackend>,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// Rank 0's device: where the model lives, and where evaluation runs.
    pub device: B::Device,
}

impl<B: AutodiffKernelBackend> Learner<B> {
    pub fn new(
        model: CausalLm<B>,
        config: AdamWConfig,
        max_grad_norm: f64,
        device: B::Device,
    ) -> Self {
        Self::with_optimizer(model, AdamW::new(config), max_grad_norm, device)
    }

    /// With an optimizer that has state already (a resumed run).
    pub fn with_optimizer(
        model: CausalLm<B>,
        optimizer: AdamW<B::InnerBackend>,
        max_grad_norm: f64,
        device: B::Device,
    ) -> Self {
        Self {
            model,
            optimizer,
            max_grad_norm,
            device,
        }
    }

    /// Loss and gradients of one step on this device (no update).
    pub fn gradients(&self, batches: &[MicroBatch]) -> Result<StepGradients<B::InnerBackend>> {
        step_gradients(&self.model, batches, &self.device, |_| {})
    }

    /// A whole step on this device: gradients, clipping, AdamW at `lr` ([`SingleDevice`]
    /// without seeding the generator).
    pub fn step(&mut self, batches: &[MicroBatch], lr: f64) -> Result<StepOutcome> {
        SingleDevice.step(self, 0, batches, None, lr)
    }

    /// The engine that runs this learner's steps on `devices` (rank 0's first, the learner's
    /// own) and, with `multinode`, with the other nodes: [`SingleDevice`] for one device of one
    /// node, else a [`DataParallel`] session whose peers start with copies of the learner.
    /// `timeout` bounds a peer's wait in an all-reduce.
    pub fn start_engine(
        &mut self,
        devices: &[B::Device],
        timeout: Duration,
        multinode: Option<MultiNode>,
    ) -> Result<Box<dyn StepEngine<B>>> {
        if devices.len() <= 1 && multinode.is_none() {
            return Ok(Box::new(SingleDevice));
        }
        let config = ParallelConfig {
            max_grad_norm: self.max_grad_norm,
            timeout,
        };
        Ok(Box::new(DataParallel::start_on_nodes(
            &mut self.model,
            &self.optimizer,
            devices,
            config,
            multinode,
        )?))
    }
}

/// How a training step's micro-batches become one update of a [`Learner`]: on one device
/// ([`SingleDevice`]) or over data-parallel peers ([`DataParallel`]). The trainer's step and
/// `hone bench train` go through this one call.
pub trait StepEngine<B: AutodiffKernelBackend> {
    /// Step `step` over `batches` (every peer's micro-batches of the step, in order), seeding
    /// the backend's generator with `seeds[i]` before micro-batch `i` when given; every copy of
    /// the learner gets the same update at `lr`.
    fn step(
        &mut self,
        learner: &mut Learner<B>,
        step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
        lr: f64,
    ) -> Result<StepOutcome>;

    /// Ends the engine (peers leave the collective, their threads are joined); an error when
    /// a peer failed.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Every micro-batch on the learner's device, one after the other (gradient accumulation).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice;

impl<B: AutodiffKernelBackend> StepEngine<B> for SingleDevice {
    fn step(
        &mut self,
        learner: &mut Learner<B>,
        _step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
        lr: f64,
    ) -> Result<StepOutcome> {
        if seeds.is_some_and(|s| s.len() != batches.len()) {
            return Err(TrainError::Dataset(
                "one seed per micro-batch is needed".into(),
            ));
        }
        let device = learner.device.clone();
        let grads = step_gradients(&learner.model, batches, &device, |micro| {
            if let Some(seeds) = seeds {
                B::seed(&device, seeds[micro]);
            }
        })?;
        apply_update(
            &mut learner.model,
            &mut learner.optimizer,
            grads,
            lr,
            learner.max_grad_norm,
        )
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
