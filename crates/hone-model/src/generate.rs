//! Token sampling and text generation with a KV cache. Sampling follows the order of
//! transformers' logits processors: repetition penalty, temperature, top-k, top-p.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cache::KvCache;
use crate::detok::TextStream;
use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (transformers' definition; 1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Rejects values outside their domain, naming the setting.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Input(format!(
                "temperature must be >= 0, found {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], found {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(ModelError::Input(format!(
                "repetition_penalty must be > 0, found {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A seeded sampler.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Chooses the next token from `logits` (modified in place); `history` holds every id of the
    /// sequence so far (prompt included), for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 {
                        *l * c.repetition_penalty
                    } else {
                        *l / c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature == 0.0 {
            return argmax(logits);
        }
        for l in logits.iter_mut() {
            *l /= c.temperature;
        }
        // Candidates sorted by logit, descending (ties by id for determinism).
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if c.top_k > 0 && c.top_k < order.len() {
            order.truncate(c.top_k);
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for p in probs.iter_mut() {
            *p /= total;
        }
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return order[i];
            }
        }
        order[order.len() - 1]
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops after any of these ids (not included in the text).
    pub stop_ids: Vec<u32>,
    /// Generation stops when the text contains any of these (cut before it).
    pub stop_strings: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (the stop id, if any, included).
    pub ids: Vec<u32>,
    /// Generated text, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each new piece of text as
/// soon as it is final.
pub fn generate<B: KernelBackend>(
    model: &CausalLm<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    config: &GenerateConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    config.sampling.validate()?;
    if prompt_ids.is_empty() {
        return Err(ModelError::Input(
            "cannot generate from an empty prompt".into(),
        ));
    }
    let vocab = model.config.vocab_size;
    if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "prompt token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut cache = KvCache::for_generation(
        model.config.num_layers,
        prompt_ids.len(),
        config.max_new_tokens,
    );
    let mut history = prompt_ids.to_vec();
    let mut generated: Vec<u32> = Vec::new();
    let mut stream = TextStream::new(prompt_ids, &config.stop_strings);
    let mut finish = FinishReason::Length;

    let started = Instant::now();
    let mut input: Vec<u32> = prompt_ids.to_vec();
    let mut prefill_seconds = 0.0;
    for step in 0..config.max_new_tokens {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                input.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [1, input.len()],
            ),
            &device,
        );
        // The pool's threads stay awake between the step's parallel loops.
        let logits = crate::in_busy_pool(|| {
            model.forward(crate::Input::new(ids).cache(&mut cache).last_logits())
        });
        let mut logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
        if step == 0 {
            prefill_seconds = started.elapsed().as_secs_f64();
        }
        let next = sampler.sample(&mut logits, &history);
        history.push(next);
        generated.push(next);
        input = vec![next];
        if config.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        let delta = stream.push(tokenizer, next);
        if !delta.text.is_empty() {
            on_text(&delta.text);
        }
        if delta.stopped {
            finish = FinishReason::Stop;
            break;
        }
    }
    let rest = stream.finish(tokenizer);
    if !rest.is_empty() {
        on_text(&rest);
    }
    let text = stream.text().to_string();
    let total = started.elapsed().as_secs_f64();
    Ok(Generation {
        ids: generated,
        text,
        finish_reason: finish,
        prompt_tokens: prompt_ids.len(),
        prefill_seconds,
        decode_seconds: total - prefill_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut sampler = Sampler::new(SamplingConfig {
            temperature: 5.0,
            top_k: 1,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..20 {
            let mut logits = vec![0.1, 2.0, 1.9, -1.0];
            assert_eq!(sampler.sample(&mut logits, &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers_sign_rule() {
        // transformers: score < 0 -> score * penalty, else score / penalty.
        let mut sampler = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let mut logits = vec![3.0, 2.0, -1.0];
        assert_eq!(sampler.sample(&mut logits, &[0]), 1);
        assert_eq!(logits, vec![1.5, 2.0, -1.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first token.
        let mut sampler = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
            ..Default::default()
        });
        for _ in 0..50 {
            let mut logits = vec![3.0, 2.0, 1.0, 0.0];
            assert_eq!(sampler.sample(&mut logits, &[]), 0);
        }
    }
}
