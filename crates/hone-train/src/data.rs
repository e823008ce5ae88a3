//! From the `[data]` and `[tokenize]` tables to training and validation rows, and the order in
//! which a run visits them.
//!
//! Curation is hone-data's [`hone_data::prepare_with`] (its curated files and report are
//! written to `<run>/data/`), tokenization is hone-tokenize's [`tokenize_cached`] with a shard
//! cache in `<run>/tokenized/`. The visiting order is a pure function of the seed and the step
//! ([`BatchPlan`]): epoch `e` shuffles the rows with a generator seeded by `(seed, e)`, cuts
//! them into micro-batches, and step `s` takes the next `grad_accum` of them (the last step of
//! an epoch may take fewer). A resumed run therefore needs only its step count to continue
//! with the same data.

use std::path::Path;

use hone_model::Tokenizer;
use hone_tokenize::{
    tokenize_cached, Batch, ChatTemplate, Example, Message, PadTo, Row, ShardCache, TokenizeReport,
    TokenizerSpec,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::step::MicroBatch;

/// Training and validation rows of a run.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    /// Id written into padding slots.
    pub pad_id: u32,
    pub train_report: TokenizeReport,
    pub val_report: Option<TokenizeReport>,
    /// The chat template, when the data has conversations (also used for sample prompts).
    pub template: Option<ChatTemplate>,
}

fn to_tokenize_example(example: &hone_data::Example) -> Example {
    Example::from_messages(
        example
            .messages
            .iter()
            .map(|m| Message::new(m.role.as_str(), m.content.clone()))
            .collect(),
    )
}

/// Curates and tokenizes the run's data. `vocab_size` bounds the token ids.
pub fn prepare_datasets(
    config: &RunConfig,
    tokenizer: &Tokenizer,
    vocab_size: usize,
    run_dir: &Path,
) -> Result<Datasets> {
    let count = |text: &str| {
        tokenizer
            .inner()
            .encode(text, false)
            .map(|e| e.len())
            .unwrap_or(0)
    };
    let prepared = hone_data::prepare_with(&config.data, Some(&count))?;
    hone_data::write_prepared(&prepared, &run_dir.join("data"))?;
    let train: Vec<Example> = prepared.train.iter().map(to_tokenize_example).collect();
    let val: Vec<Example> = prepared.val.iter().map(to_tokenize_example).collect();
    if train.is_empty() {
        return Err(TrainError::NoTrainingData(format!(
            "curation of {} left no training example (see {})",
            config.data.inputs.join(", "),
            run_dir.join("data").join(hone_data::REPORT_FILE).display()
        )));
    }
    let needs_template = train
        .iter()
        .chain(&val)
        .any(|e| matches!(e, Example::Chat(_)));
    let template = match ChatTemplate::load(&config.tokenize.template, &config.model.path) {
        Ok(t) => Some(t),
        Err(e) if needs_template => return Err(e.into()),
        Err(_) => None,
    };
    let spec = match &template {
        Some(t) => TokenizerSpec::from_special_tokens(tokenizer.inner(), t.special_tokens()),
        None => TokenizerSpec {
            tokenizer: tokenizer.inner(),
            bos_id: tokenizer.bos_id,
            eos_id: tokenizer.eos_ids.first().copied(),
            pad_id: None,
        },
    };
    let cache = ShardCache::new(run_dir.join("tokenized"));
    let (train_set, _) =
        tokenize_cached(&cache, &train, spec, template.as_ref(), &config.tokenize)?;
    let val_set = if val.is_empty() {
        None
    } else {
        Some(tokenize_cached(&cache, &val, spec, template.as_ref(), &config.tokenize)?.0)
    };
    if train_set.rows.is_empty() {
        return Err(TrainError::NoTrainingData(
            "tokenization left no training row (every example was too long or had no token in the loss)".into(),
        ));
    }
    let rows = train_set
        .rows
        .iter()
        .chain(val_set.iter().flat_map(|v| v.rows.iter()));
    for row in rows {
        if let Some(&bad) = row.input_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TrainError::Dataset(format!(
                "token id {bad} is outside the model's vocabulary (size {vocab_size}): is the tokenizer the model's?"
            )));
        }
    }
    Ok(Datasets {
        pad_id: spec.padding_id(),
        train: train_set.rows,
        train_report: train_set.report,
        val_report: val_set.as_ref().map(|v| v.report.clone()),
        val: val_set.map(|v| v.rows).unwrap_or_default(),
        template,
    })
}

/// Collates rows into a micro-batch (padding to the longest row).
pub fn collate(rows: &[&Row], pad_id: u32) -> Result<MicroBatch> {
    let owned: Vec<Row> = rows.iter().map(|r| (*r).clone()).collect();
    let batch = Batch::collate(&owned, PadTo::Longest, pad_id)?;
    Ok(MicroBatch::from_batch(&batch))
}

/// Where a run is in its data: which rows each step reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub rows: usize,
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
}

/// The data position after some steps: epoch and micro-batch within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    pub micro_batch: usize,
}

impl BatchPlan {
    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.rows.div_ceil(self.micro_batch_size)
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch().div_ceil(self.grad_accum)
    }

    /// Row order of epoch `epoch`.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows).collect();
        let seed = self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        order
    }

    /// Where step `step` (0-based) starts.
    pub fn position(&self, step: usize) -> DataPosition {
        let per_epoch = self.steps_per_epoch();
        DataPosition {
            epoch: step / per_epoch,
            micro_batch: (step % per_epoch) * self.grad_accum,
        }
    }

    /// Row indices of each micro-batch of step `step`; `order` is [`BatchPlan::epoch_order`]
    /// of the step's epoch.
    pub fn step_rows(&self, step: usize, order: &[usize]) -> Vec<Vec<usize>> {
        let pos = self.position(step);
        let end = (pos.micro_batch + self.grad_accum).min(self.micro_batches_per_epoch());
        (pos.micro_batch..end)
            .map(|mb| {
                let from = mb * self.micro_batch_size;
                order[from..(from + self.micro_batch_size).min(self.rows)].to_vec()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once_per_epoch_in_a_seeded_order() {
        let plan = BatchPlan {
            rows: 10,
            micro_batch_size: 3,
            grad_accum: 2,
            seed: 7,
        };
        assert_eq!(
            (plan.micro_batches_per_epoch(), plan.steps_per_epoch()),
            (4, 2)
        );
        for epoch in 0..3 {
            let order = plan.epoch_order(epoch);
            let mut seen: Vec<usize> = (0..plan.steps_per_epoch())
                .flat_map(|s| plan.step_rows(epoch * plan.steps_per_epoch() + s, &order))
                .flatten()
                .collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(plan.epoch_order(0), plan.epoch_order(1));
        assert_eq!(plan.epoch_order(1), plan.clone().epoch_order(1));
        let other_seed = BatchPlan {
            seed: 8,
            ..plan.clone()
        };
        assert_ne!(plan.epoch_order(0), other_seed.epoch_order(0));
        // Step 1 takes micro-batches 2 and 3: rows 6..9 and 9..10.
        let step1 = plan.step_rows(1, &plan.epoch_order(0));
        assert_eq!(step1.iter().map(Vec::len).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(
            plan.position(3),
            DataPosition {
                epoch: 1,
                micro_batch: 2
            }
        );
    }
}
