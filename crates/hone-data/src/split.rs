//! Deterministic train/validation split.
//!
//! Each example gets a rank `mix64(content_hash ^ mix64(seed))`; the `round(n * val_fraction)`
//! examples with the smallest ranks form the validation set. The split therefore depends only
//! on the examples' contents, the seed and their number, not on input order: shuffling the
//! input gives the same split. Both sets keep input order.

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::shingle::mix64;

/// Split settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Fraction of the kept examples that go to validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Seed of the assignment.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            val_fraction: 0.05,
            seed: 42,
        }
    }
}

impl SplitConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(DataError::config(
                "split.val_fraction",
                format!("must be in [0, 1), found {}", self.val_fraction),
            ));
        }
        Ok(())
    }
}

/// For each example (by its 64-bit content key), whether it goes to validation.
pub fn assign_validation(keys: &[u64], config: &SplitConfig) -> Vec<bool> {
    let n = keys.len();
    let n_val = ((n as f64 * config.val_fraction).round() as usize).min(n);
    let salt = mix64(config.seed ^ 0x5851_F42D_4C95_7F2D);
    let mut order: Vec<(u64, u64, usize)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (mix64(k ^ salt), k, i))
        .collect();
    // Ties (identical contents) break by key then position, so order matters only among
    // identical examples.
    order.sort_unstable();
    let mut is_val = vec![false; n];
    for &(_, _, i) in &order[..n_val] {
        is_val[i] = true;
    }
    is_val
}
