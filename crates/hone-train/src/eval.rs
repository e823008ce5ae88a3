//! Validation during a run, and sample generations at its end.
//!
//! The validation loss is the causal-LM loss over *every* target token of the validation rows
//! (summed NLL over all batches divided by the total target count, so batch boundaries do not
//! weigh tokens differently); the perplexity is `exp(loss)`. It runs on the model without
//! autodiff, so adapter dropout is off.

use burn::prelude::*;
use hone_model::{generate, CausalLm, GenerateConfig, SamplingConfig, Tokenizer};
use hone_tokenize::{ChatTemplate, ExtraContext, Message, Row};
use serde::{Deserialize, Serialize};

use crate::data::collate;
use crate::error::{Result, TrainError};

/// Validation loss and perplexity at a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: usize,
    pub loss: f64,
    pub ppl: f64,
    /// Target tokens the loss averages over.
    pub targets: usize,
}

/// Mean loss over all target tokens of `rows`, in batches of `batch_size` (at most
/// `max_batches` of them). `None` when the rows hold no target.
pub fn evaluate<B: hone_model::KernelBackend>(
    model: &CausalLm<B>,
    rows: &[Row],
    batch_size: usize,
    max_batches: Option<usize>,
    pad_id: u32,
    step: usize,
    device: &B::Device,
) -> Result<Option<EvalResult>> {
    let mut sums: Vec<Tensor<B, 1>> = Vec::new();
    let mut targets = 0usize;
    let chunks = rows
        .chunks(batch_size.max(1))
        .take(max_batches.unwrap_or(usize::MAX));
    for chunk in chunks {
        let refs: Vec<&Row> = chunk.iter().collect();
        let batch = collate(&refs, pad_id)?;
        let (sum, count) = batch.loss_sum(model, device);
        targets += count;
        sums.push(sum);
    }
    if targets == 0 {
        return Ok(None);
    }
    let total = Tensor::cat(sums, 0)
        .sum()
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| TrainError::Tensor {
            what: "the validation loss".into(),
            message: format!("{e:?}"),
        })?[0];
    let loss = total / targets as f64;
    Ok(Some(EvalResult {
        step,
        loss,
        ppl: loss.exp(),
        targets,
    }))
}

/// One prompt answered by the base model and by the trained adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    /// The text given to the model (the prompt rendered with the chat template).
    pub rendered: String,
    pub base: String,
    pub adapter: String,
}

/// How sample prompts become token ids and when generation stops.
pub struct SampleSetup<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub template_vars: &'a ExtraContext,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
}

impl SampleSetup<'_> {
    /// The prompt as the model sees it: a user turn rendered with the template and its
    /// generation prompt, encoded without added special tokens (as training encodes
    /// conversations); without a template, the text after BOS.
    pub fn encode(&self, prompt: &str) -> Result<(String, Vec<u32>)> {
        match self.template {
            Some(template) => {
                let text = template.render(&[Message::user(prompt)], true, self.template_vars)?;
                let ids = self
                    .tokenizer
                    .inner()
                    .encode(text.as_str(), false)
                    .map_err(|e| {
                        TrainError::Dataset(format!("cannot encode the prompt `{prompt}`: {e}"))
                    })?
                    .get_ids()
                    .to_vec();
                Ok((text, ids))
            }
            None => Ok((prompt.to_string(), self.tokenizer.encode_prompt(prompt)?)),
        }
    }

    /// Generates the answer of `model` to `ids`.
    pub fn generate<B: hone_model::KernelBackend>(
        &self,
        model: &CausalLm<B>,
        ids: &[u32],
    ) -> Result<String> {
        let mut stop_ids = self.tokenizer.eos_ids.clone();
        if let Some(eos) = self
            .template
            .and_then(|t| t.special_tokens().eos_token.as_deref())
            .and_then(|t| self.tokenizer.inner().token_to_id(t))
        {
            if !stop_ids.contains(&eos) {
                stop_ids.push(eos);
            }
        }
        let config = GenerateConfig {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                seed: self.seed,
                ..SamplingConfig::default()
            },
            stop_ids,
            stop_strings: Vec::new(),
        };
        Ok(generate(model, self.tokenizer, ids, &config, |_| {})?.text)
    }
}
