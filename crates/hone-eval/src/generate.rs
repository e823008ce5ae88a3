//! Batched greedy generation for prompts of different lengths, with a KV cache.
//!
//! hone-model's `generate` runs one sequence, and `CausalLm::forward` with a cache has no
//! padding mask. This module drives the model's public layers itself: prompts are **left-padded**
//! to a common length, every row gets its own positions (0 at its first real token) and a
//! boolean mask hides the padding slots from every query (a padding query sees itself only,
//! so no softmax row is empty). Decoding appends one token per row to per-layer caches that
//! this module owns, so rows that finish are dropped from the batch (their cache rows removed).
//! The tokens equal those of one-by-one greedy decoding (see the tests).
//! Sliding-window layers mask keys `window` or more positions behind the query, as the model does.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use hone_model::cache::LayerCache;
use hone_model::model::RopeTables;
use hone_model::{rope, CausalLm, FinishReason, Tokenizer};

use crate::error::{EvalError, Result};

/// Settings of a generation batch (greedy decoding).
#[derive(Debug, Clone, PartialEq)]
pub struct GreedySettings {
    pub max_new_tokens: usize,
    /// Generation of a row stops after any of these ids (not part of the text).
    pub stop_ids: Vec<u32>,
    /// The text is cut before the first of these, and the row stops.
    pub stop_strings: Vec<String>,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOutput {
    pub text: String,
    /// Generated ids (a stop id included).
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Cos/sin tables `[batch, seq, 1, rotary_dim]` for per-token positions (row-major).
fn rope_at<B: Backend>(
    model: &CausalLm<B>,
    positions: &[usize],
    batch: usize,
    seq: usize,
    dtype: DType,
    device: &B::Device,
) -> RopeTables<B> {
    let max = positions.iter().copied().max().unwrap_or(0);
    let (cos, sin) = rope::cos_sin_tables(&model.inv_freq, max + 1);
    let dim = 2 * model.inv_freq.len();
    let gather = |table: &[f32]| {
        let mut out = Vec::with_capacity(positions.len() * dim);
        for &p in positions {
            out.extend_from_slice(&table[p * dim..(p + 1) * dim]);
        }
        let t = Tensor::<B, 2>::from_data(TensorData::new(out, [batch * seq, dim]), device);
        let t = if dtype != DType::F32 {
            t.cast(dtype)
        } else {
            t
        };
        t.reshape([batch, seq, 1, dim])
    };
    RopeTables {
        cos: gather(&cos),
        sin: gather(&sin),
        host: None,
    }
}

/// Mask `[batch, 1, seq, total]` (true = hidden) for queries at slots `total - seq..total`:
/// a query sees the non-padding keys at or before it (within `window` when non-zero), and
/// always itself.
fn padding_mask<B: Backend>(
    pads: &[usize],
    seq: usize,
    total: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let batch = pads.len();
    let offset = total - seq;
    let mut data = vec![true; batch * seq * total];
    for (b, &pad) in pads.iter().enumerate() {
        for i in 0..seq {
            let q = offset + i;
            for k in 0..=q {
                let visible = k == q || (k >= pad && (window == 0 || q - k < window));
                data[(b * seq + i) * total + k] = !visible;
            }
        }
    }
    Tensor::<B, 3, Bool>::from_data(TensorData::new(data, [batch, seq, total]), device)
        .unsqueeze_dim(1)
}

/// One forward step over `ids` `[batch, seq]` (slots `total - seq..total`), extending `caches`;
/// returns the greedy next token of every row.
#[allow(clippy::too_many_arguments)]
fn step<B: Backend>(
    model: &CausalLm<B>,
    caches: &mut [LayerCache<B>],
    ids: Vec<i64>,
    positions: &[usize],
    pads: &[usize],
    seq: usize,
    total: usize,
    device: &B::Device,
) -> Result<Vec<u32>> {
    let batch = pads.len();
    let dtype = model.model.embed_tokens.val().dtype();
    let hidden_size = model.config.hidden_size;
    let input = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [batch * seq]), device);
    let mut x = model
        .model
        .embed_tokens
        .val()
        .select(0, input)
        .reshape([batch, seq, hidden_size]);
    let rope = rope_at(model, positions, batch, seq, dtype, device);
    // Without padding the model's own causal (and sliding-window) masking is exact, and its
    // unmasked paths are faster (fused causal attention; grouped-query decoding without copies).
    let padded = pads.iter().any(|&p| p > 0);
    let mut masks: Vec<(usize, Tensor<B, 4, Bool>)> = Vec::new();
    for (layer, cache) in model.model.layers.iter().zip(caches.iter_mut()) {
        let mask = if padded {
            let window = layer.self_attn.sliding_window;
            Some(match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = padding_mask::<B>(pads, seq, total, window, device);
                    masks.push((window, m.clone()));
                    m
                }
            })
        } else {
            None
        };
        x = layer.forward(x, &rope, Some(cache), mask.as_ref());
    }
    let last = model.model.norm.forward(x).narrow(1, seq - 1, 1);
    let logits = model.logits(last).reshape([batch, model.config.vocab_size]);
    let next = logits.argmax(1).reshape([batch]);
    let next = next
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| EvalError::TensorData(format!("{e:?}")))?;
    Ok(next.into_iter().map(|v| v as u32).collect())
}

/// Keeps rows `keep` of every cache tensor.
fn compact<B: Backend>(caches: &mut [LayerCache<B>], keep: &[usize], device: &B::Device) {
    let idx = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            keep.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [keep.len()],
        ),
        device,
    );
    for (k, v) in caches.iter_mut() {
        *k = k.take().map(|t| t.select(0, idx.clone()));
        *v = v.take().map(|t| t.select(0, idx.clone()));
    }
}

/// Greedy continuations of `prompts` (each non-empty), generated together.
pub fn generate_greedy<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    settings: &GreedySettings,
) -> Result<Vec<GenOutput>> {
    let vocab = model.config.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(EvalError::TensorData(format!("prompt {i} has no tokens")));
        }
        if let Some(&bad) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(EvalError::TensorData(format!(
                "prompt {i}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
    }
    let mut outputs: Vec<GenOutput> = prompts
        .iter()
        .map(|_| GenOutput {
            text: String::new(),
            ids: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    if prompts.is_empty() || settings.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(1);
    // Rows still generating: original index, left padding, prompt length.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut caches: Vec<LayerCache<B>> =
        (0..model.config.num_layers).map(|_| (None, None)).collect();

    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut positions = Vec::with_capacity(prompts.len() * width);
    for (p, &pad) in prompts.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
        positions.extend(std::iter::repeat_n(0usize, pad));
        positions.extend(0..p.len());
    }
    let mut next = step(
        model,
        &mut caches,
        ids,
        &positions,
        &pads,
        width,
        width,
        &device,
    )?;
    let mut total = width;
    for generated in 1..=settings.max_new_tokens {
        // Record the new tokens and decide which rows stop.
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            let token = next[slot];
            let out = &mut outputs[row];
            out.ids.push(token);
            if settings.stop_ids.contains(&token) {
                out.finish_reason = FinishReason::Stop;
                out.text = tokenizer.decode(&out.ids[..out.ids.len() - 1])?;
                continue;
            }
            let text = tokenizer.decode(&out.ids)?;
            let cut = settings
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min();
            if let Some(cut) = cut {
                out.finish_reason = FinishReason::Stop;
                out.text = text[..cut].to_string();
                continue;
            }
            out.text = text;
            if generated < settings.max_new_tokens {
                keep.push(slot);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            compact(&mut caches, &keep, &device);
            active = keep.iter().map(|&s| active[s]).collect();
            pads = keep.iter().map(|&s| pads[s]).collect();
            lens = keep.iter().map(|&s| lens[s]).collect();
            next = keep.iter().map(|&s| next[s]).collect();
        }
        let ids: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        // The new token of each row sits at position prompt_len + generated - 1.
        let positions: Vec<usize> = lens.iter().map(|&l| l + generated - 1).collect();
        total += 1;
        next = step(
            model,
            &mut caches,
            ids,
            &positions,
            &pads,
            1,
            total,
            &device,
        )?;
    }
    Ok(outputs)
}
