//! The whole stage for a data set: examples -> [`TokenizedDataset`] (rows and report), directly
//! ([`tokenize_examples`]) or through the shard cache ([`tokenize_cached`]).
//!
//! Examples are encoded in parallel (rayon; results keep input order), fitted to
//! `max_seq_len` by the truncation policy, examples without any token in the loss are left
//! out, and the rest are packed or put one per row. Everything is deterministic: the same
//! inputs give the same rows, which is what makes the cache key meaningful.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheKey, CacheStatus, ShardCache};
use crate::chat::ChatTemplate;
use crate::config::TokenizeConfig;
use crate::encode::{Encoder, Fitted, TokenizedExample, TokenizerSpec};
use crate::error::TokenizeError;
use crate::pack::{one_per_row, pack, TokenizeReport};
use crate::row::Row;
use crate::special::special_token_warnings;
use hone_data::Example;

/// Rows ready for training and the report of how they were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizedDataset {
    /// Packed rows of exactly `max_seq_len` tokens, or one unpadded example per row.
    pub rows: Vec<Row>,
    /// Counts, efficiency and warnings.
    pub report: TokenizeReport,
}

/// Tokenizes, truncates and packs `examples`; `template` is needed for chat examples.
pub fn tokenize_examples(
    examples: &[Example],
    spec: TokenizerSpec<'_>,
    template: Option<&ChatTemplate>,
    config: &TokenizeConfig,
) -> Result<TokenizedDataset, TokenizeError> {
    config.validate()?;
    let mut report = TokenizeReport {
        examples: examples.len(),
        max_seq_len: config.max_seq_len,
        packing: config.packing,
        ..TokenizeReport::default()
    };
    if let Some(template) = template {
        for warning in special_token_warnings(template, spec.tokenizer, &config.template_vars) {
            tracing::warn!("{warning}");
            report.warnings.push(warning.to_string());
        }
    }

    let encoder = Encoder::new(spec, template, config);
    let fitted: Vec<Result<Fitted, TokenizeError>> = examples
        .par_iter()
        .enumerate()
        .map(|(index, example)| {
            encoder
                .encode_fitted(example)
                .map_err(|source| TokenizeError::Example { index, source })
        })
        .collect();

    let mut kept: Vec<TokenizedExample> = Vec::with_capacity(examples.len());
    for result in fitted {
        match result? {
            Fitted::TooLong { len } => {
                report.dropped_too_long += 1;
                report.longest_example = report.longest_example.max(len);
            }
            Fitted::Kept {
                example,
                truncated,
                original_len,
            } => {
                report.longest_example = report.longest_example.max(original_len);
                if example.label_tokens() == 0 {
                    report.dropped_no_labels += 1;
                    continue;
                }
                report.truncated += usize::from(truncated);
                kept.push(example);
            }
        }
    }
    report.kept = kept.len();
    if report.dropped_too_long > 0 || report.dropped_no_labels > 0 {
        tracing::warn!(
            "left out {} example(s) longer than max_seq_len = {} and {} without tokens in the loss",
            report.dropped_too_long,
            config.max_seq_len,
            report.dropped_no_labels
        );
    }

    let rows = if config.packing {
        pack(&kept, config.max_seq_len, spec.padding_id())
    } else {
        one_per_row(&kept)
    };
    report.count_rows(&rows);
    tracing::info!(
        "tokenized {} examples into {} rows: {} tokens, {} in the loss, {} padding \
         (efficiency {:.1}%), {} truncated",
        report.kept,
        report.rows,
        report.tokens,
        report.label_tokens,
        report.padding_tokens,
        100.0 * report.packing_efficiency,
        report.truncated
    );
    Ok(TokenizedDataset { rows, report })
}

/// [`tokenize_examples`] through `cache`: reused when examples, tokenizer, template and
/// config are unchanged (see [`CacheKey`]), built and stored otherwise.
pub fn tokenize_cached(
    cache: &ShardCache,
    examples: &[Example],
    spec: TokenizerSpec<'_>,
    template: Option<&ChatTemplate>,
    config: &TokenizeConfig,
) -> Result<(TokenizedDataset, CacheStatus), TokenizeError> {
    config.validate()?;
    let key = CacheKey::compute(examples, &spec, template, config)?;
    let (data, status) = cache.get_or_build(&key, config, || {
        tokenize_examples(examples, spec, template, config)
    })?;
    if let CacheStatus::Hit(dir) = &status {
        tracing::info!("reusing tokenized rows from {}", dir.display());
        for warning in &data.report.warnings {
            tracing::warn!("{warning}");
        }
    }
    Ok((data, status))
}
