//! From the `[data]` and `[tokenize]` tables to training and validation rows, and the order in
//! which a run visits them.
//!
//! Curation is hone-data's [`hone_data::prepare_with`] (its curated files and report are
//! written to `<run>/data/`), tokenization is hone-tokenize's [`tokenize_cached`] with a shard
//! cache in `<run>/tokenized/`; a dry run ([`DataFiles::Nowhere`]) writes neither and only reads
//! an entry of that cache that already exists. The visiting order is a pure function of the
//! seed and the step ([`BatchPlan`]): epoch `e` shuffles the rows with a generator seeded by
//! `(seed, e)`, cuts them into micro-batches, and step `s` takes the next `grad_accum` of them
//! (the last step of an epoch may take fewer). A resumed run therefore needs only its step
//! count to continue with the same data, and a dry run counts a run's steps and tokens
//! ([`BatchPlan::total_steps`], [`BatchPlan::tokens`]) without running it.

use std::path::Path;

use hone_model::Tokenizer;
use hone_tokenize::{
    tokenize_cached, tokenize_examples, Batch, CacheKey, ChatTemplate, Example, PadTo, Row,
    ShardCache, TokenizeReport, TokenizedDataset, TokenizerSpec,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::{RunConfig, TrainSection};
use crate::error::{Result, TrainError};
use crate::step::MicroBatch;

/// Where [`prepare_datasets`] leaves its files.
#[derive(Debug, Clone, Copy)]
pub enum DataFiles<'a> {
    /// A run in this directory: the curated data and its report in `data/`, the token cache
    /// in `tokenized/` (read, and written on a miss).
    Run(&'a Path),
    /// A dry run of the run in this directory: nothing is written; an entry of its
    /// `tokenized/` cache that already exists is read, otherwise the rows are tokenized in
    /// memory.
    Nowhere(&'a Path),
}

/// Training and validation rows of a run.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    /// Examples left by curation (before tokenization).
    pub curated_train: usize,
    pub curated_val: usize,
    /// Curation's report (what `<run>/data/report.json` holds).
    pub curation: hone_data::Report,
    /// Id written into padding slots.
    pub pad_id: u32,
    pub train_report: TokenizeReport,
    pub val_report: Option<TokenizeReport>,
    /// The chat template, when the data has conversations (also used for sample prompts).
    pub template: Option<ChatTemplate>,
}

/// The rows of `examples` through the token cache of `files`' run directory.
fn tokenize_through_cache(
    files: DataFiles<'_>,
    examples: &[Example],
    spec: TokenizerSpec<'_>,
    template: Option<&ChatTemplate>,
    config: &hone_tokenize::TokenizeConfig,
) -> Result<TokenizedDataset> {
    match files {
        DataFiles::Run(run_dir) => {
            let cache = ShardCache::new(run_dir.join("tokenized"));
            Ok(tokenize_cached(&cache, examples, spec, template, config)?.0)
        }
        DataFiles::Nowhere(run_dir) => {
            let cache = ShardCache::new(run_dir.join("tokenized"));
            let key = CacheKey::compute(examples, &spec, template, config)?;
            // A damaged entry is the real run's to replace: here it is only not used.
            if let Ok(Some(data)) = cache.load(&key) {
                tracing::info!(
                    "reusing tokenized rows from {}",
                    cache.entry_dir(&key).display()
                );
                return Ok(data);
            }
            Ok(tokenize_examples(examples, spec, template, config)?)
        }
    }
}

/// Curates and tokenizes the run's data. `vocab_size` bounds the token ids; `files` says
/// whether the curated data and the token cache are written.
pub fn prepare_datasets(
    config: &RunConfig,
    tokenizer: &Tokenizer,
    vocab_size: usize,
    files: DataFiles<'_>,
) -> Result<Datasets> {
    let count = |text: &str| {
        tokenizer
            .inner()
            .encode(text, false)
            .map(|e| e.len())
            .unwrap_or(0)
    };
    let prepared = hone_data::prepare_with(&config.data, Some(&count))?;
    if let DataFiles::Run(run_dir) = files {
        hone_data::write_prepared(&prepared, &run_dir.join("data"))?;
    }
    let (train, val) = prepared.examples();
    if train.is_empty() {
        let r = &prepared.report;
        let see = match files {
            DataFiles::Run(run_dir) => format!(
                "see {}",
                run_dir.join("data").join(hone_data::REPORT_FILE).display()
            ),
            DataFiles::Nowhere(_) => "`hone data prepare` writes the report".into(),
        };
        return Err(TrainError::NoTrainingData(format!(
            "curation of {} left no training example ({} records read, {} bad records skipped, \
             {} examples removed; {see})",
            config.data.inputs.join(", "),
            r.input_records,
            r.errors.len(),
            r.total_removed(),
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
    let train_set =
        tokenize_through_cache(files, &train, spec, template.as_ref(), &config.tokenize)?;
    let val_set = if val.is_empty() {
        None
    } else {
        Some(tokenize_through_cache(
            files,
            &val,
            spec,
            template.as_ref(),
            &config.tokenize,
        )?)
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
        curated_train: prepared.train.len(),
        curated_val: prepared.val.len(),
        curation: prepared.report,
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
    /// The plan of `config`'s run over `rows` training rows: a step reads `train.grad_accum`
    /// micro-batches of every peer (`train.devices`) of every node (`distributed.nodes`).
    pub fn for_run(config: &RunConfig, rows: usize) -> Self {
        let t = &config.train;
        BatchPlan {
            rows,
            micro_batch_size: t.micro_batch_size,
            grad_accum: t.grad_accum * config.devices().len() * config.distributed.nodes,
            seed: t.seed,
        }
    }

    /// Optimizer steps of the run: `train.max_steps`, else `train.epochs` passes.
    pub fn total_steps(&self, train: &TrainSection) -> usize {
        train
            .max_steps
            .unwrap_or(train.epochs * self.steps_per_epoch())
    }

    /// The micro-batches of step `step` (0-based), collated from `rows` (the training rows this
    /// plan was made for); `order` is [`BatchPlan::epoch_order`] of the step's epoch.
    pub fn step_batches(
        &self,
        step: usize,
        order: &[usize],
        rows: &[Row],
        pad_id: u32,
    ) -> Result<Vec<MicroBatch>> {
        self.step_rows(step, order)
            .iter()
            .map(|indices| {
                collate(
                    &indices.iter().map(|&i| &rows[i]).collect::<Vec<_>>(),
                    pad_id,
                )
            })
            .collect()
    }

    /// Non-padding tokens of the first `steps` steps over `rows` (what the run's steps report
    /// as [`MicroBatch::tokens`], summed: collation only adds padding).
    pub fn tokens(&self, steps: usize, rows: &[Row]) -> u64 {
        let per_row: Vec<u64> = rows
            .iter()
            .map(|r| (r.len() - r.padding_tokens()) as u64)
            .collect();
        let per_epoch = self.steps_per_epoch().max(1);
        let mut total = 0;
        let mut order = Vec::new();
        for step in 0..steps {
            if step % per_epoch == 0 {
                order = self.epoch_order(step / per_epoch);
            }
            total += self
                .step_rows(step, &order)
                .iter()
                .flatten()
                .map(|&i| per_row[i])
                .sum::<u64>();
        }
        total
    }

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

    /// A row of `lens` examples (segments 1, 2, ...) followed by `padding` padding tokens.
    fn row(lens: &[usize], padding: usize) -> Row {
        let mut r = Row::default();
        for (s, &n) in lens.iter().enumerate() {
            r.input_ids.extend(std::iter::repeat_n(5, n));
            r.labels.extend(std::iter::repeat_n(5, n));
            r.position_ids.extend(0..n as u32);
            r.segment_ids.extend(std::iter::repeat_n(s as u32 + 1, n));
        }
        r.pad(padding, 0);
        r
    }

    /// `hone train --dry-run` counts a run's tokens from the rows; the run counts them from the
    /// collated micro-batches of each step. Rows of different lengths (collation pads them),
    /// packed rows with padding, a last micro-batch that is short and steps beyond one epoch
    /// must give the same sums.
    #[test]
    fn plan_tokens_equal_the_tokens_of_the_collated_steps() {
        let rows = vec![
            row(&[3], 0),
            row(&[7], 0),
            row(&[2, 4], 2),
            row(&[5], 0),
            row(&[1, 1, 1], 5),
            row(&[8], 0),
            row(&[6], 0),
        ];
        let plan = BatchPlan {
            rows: rows.len(),
            micro_batch_size: 2,
            grad_accum: 3,
            seed: 11,
        };
        // 4 micro-batches an epoch, 2 steps: steps 0..5 cross two epoch boundaries and end
        // half way through the third epoch.
        assert_eq!(plan.steps_per_epoch(), 2);
        for steps in [1, 2, 5] {
            let mut collated = 0u64;
            for step in 0..steps {
                let order = plan.epoch_order(plan.position(step).epoch);
                for batch in plan.step_batches(step, &order, &rows, 0).unwrap() {
                    collated += batch.tokens() as u64;
                }
            }
            assert_eq!(plan.tokens(steps, &rows), collated, "{steps} steps");
        }
        // Every epoch trains on each row's 3+7+6+5+3+8+6 = 38 tokens once.
        assert_eq!(plan.tokens(4, &rows), 2 * 38);
    }
}
