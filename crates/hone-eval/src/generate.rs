//! Batched greedy generation for prompts of different lengths, with a KV cache.
//!
//! Prompts are **left-padded** to a common length; every row gets its own positions (0 at its
//! first real token) and the model hides the padding slots from every query
//! ([`hone_model::Visibility::LeftPadding`]). Decoding appends one token per row to one batch
//! cache, so rows that finish are dropped from the batch (their cache rows removed). The
//! tokens equal those of one-by-one greedy decoding (see the tests); the text comes from
//! [`TextStream`], as in `hone generate` and `hone serve`.

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::detok::TextStream;
use hone_model::{CausalLm, FinishReason, Input, KvCache, Tokenizer};

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

/// One forward step over `ids` `[batch, seq]` at `positions`, extending `cache`; returns the
/// greedy next token of every row.
fn step<B: hone_model::KernelBackend>(
    model: &CausalLm<B>,
    cache: &mut KvCache<B>,
    ids: Vec<i64>,
    positions: &[usize],
    pads: &[usize],
    device: &B::Device,
) -> Result<Vec<u32>> {
    let batch = pads.len();
    let seq = ids.len() / batch;
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
    let logits = model.forward(
        Input::new(input)
            .positions(positions.iter().map(|&p| p as u32).collect())
            .left_padding(pads.to_vec())
            .cache(cache)
            .last_logits(),
    );
    let next = logits
        .reshape([batch, model.config().vocab_size])
        .argmax(1)
        .reshape([batch]);
    let next = next
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| EvalError::TensorData(format!("{e:?}")))?;
    Ok(next.into_iter().map(|v| v as u32).collect())
}

/// Greedy continuations of `prompts` (each non-empty), generated together.
pub fn generate_greedy<B: hone_model::KernelBackend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    settings: &GreedySettings,
) -> Result<Vec<GenOutput>> {
    let vocab = model.config().vocab_size;
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
    let mut cache =
        KvCache::for_generation(model.config().num_layers, width, settings.max_new_tokens);
    let mut streams: Vec<TextStream> = prompts
        .iter()
        .map(|p| TextStream::new(p, &settings.stop_strings))
        .collect();

    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut positions = Vec::with_capacity(prompts.len() * width);
    for (p, &pad) in prompts.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
        positions.extend(std::iter::repeat_n(0usize, pad));
        positions.extend(0..p.len());
    }
    let mut next = step(model, &mut cache, ids, &positions, &pads, &device)?;
    for generated in 1..=settings.max_new_tokens {
        // Record the new tokens and decide which rows stop.
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &row) in active.iter().enumerate() {
            let token = next[slot];
            let out = &mut outputs[row];
            out.ids.push(token);
            let stream = &mut streams[row];
            if settings.stop_ids.contains(&token) {
                out.finish_reason = FinishReason::Stop;
                stream.finish(tokenizer);
                out.text = stream.text().to_string();
                continue;
            }
            if stream.push(tokenizer, token).stopped {
                out.finish_reason = FinishReason::Stop;
                out.text = stream.text().to_string();
                continue;
            }
            if generated == settings.max_new_tokens {
                stream.finish(tokenizer);
            }
            out.text = stream.text().to_string();
            if generated < settings.max_new_tokens {
                keep.push(slot);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.retain_rows(&keep, &device);
            active = keep.iter().map(|&s| active[s]).collect();
            pads = keep.iter().map(|&s| pads[s]).collect();
            lens = keep.iter().map(|&s| lens[s]).collect();
            next = keep.iter().map(|&s| next[s]).collect();
        }
        let ids: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        // The new token of each row sits at position prompt_len + generated - 1.
        let positions: Vec<usize> = lens.iter().map(|&l| l + generated - 1).collect();
        next = step(model, &mut cache, ids, &positions, &pads, &device)?;
    }
    Ok(outputs)
}
