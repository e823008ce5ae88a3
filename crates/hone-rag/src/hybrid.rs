//! Hybrid ranking: weighted reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009).
//!
//! `score(d) = Σ_i w_i / (k + rank_i(d))` over the ranked lists `i` that contain `d`, with
//! 1-based ranks and `k = 60` by default (the paper's constant). Only ranks matter, so BM25 and
//! cosine scores need no calibration against each other. Ties are broken by the best single
//! rank, then by first appearance (list order, then rank), so the fusion is deterministic.

use std::collections::HashMap;

use crate::error::{RagError, Result};
use crate::retriever::Hit;

/// The RRF constant of the paper.
pub const RRF_K: f64 = 60.0;

/// Settings of the fusion.
#[derive(Clone, Debug, PartialEq)]
pub struct FusionConfig {
    /// Added to every rank; larger values flatten the head of each list.
    pub k: f64,
    /// One weight per ranked list (non-negative, finite).
    pub weights: Vec<f64>,
}

impl FusionConfig {
    /// Equal weights for `lists` lists and `k = 60`.
    pub fn equal(lists: usize) -> Self {
        FusionConfig {
            k: RRF_K,
            weights: vec![1.0; lists],
        }
    }

    fn validate(&self, lists: usize) -> Result<()> {
        if !(self.k.is_finite() && self.k >= 0.0) {
            return Err(RagError::config(
                "fusion.k",
                format!("expected a finite value >= 0, found {}", self.k),
            ));
        }
        if self.weights.len() != lists {
            return Err(RagError::config(
                "fusion.weights",
                format!(
                    "expected one weight per ranked list ({lists}), found {}",
                    self.weights.len()
                ),
            ));
        }
        if let Some(w) = self.weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(RagError::config(
                "fusion.weights",
                format!("expected finite weights >= 0, found {w}"),
            ));
        }
        Ok(())
    }
}

/// Fuses ranked lists of ids (best first; an id repeated within a list counts at its first
/// rank) into one list of `(id, fused score)`, best first.
pub fn reciprocal_rank_fusion<S: AsRef<str>>(
    lists: &[Vec<S>],
    config: &FusionConfig,
) -> Result<Vec<(String, f64)>> {
    config.validate(lists.len())?;
    struct Entry {
        score: f64,
        best_rank: usize,
        first_seen: usize,
    }
    let mut entries: HashMap<&str, Entry> = HashMap::new();
    let mut order = 0;
    for (list, &weight) in lists.iter().zip(&config.weights) {
        let mut seen = std::collections::HashSet::new();
        for (i, id) in list.iter().enumerate() {
            let id = id.as_ref();
            if !seen.insert(id) {
                continue;
            }
            let rank = i + 1;
            let entry = entries.entry(id).or_insert_with(|| {
                order += 1;
                Entry {
                    score: 0.0,
                    best_rank: rank,
                    first_seen: order,
                }
            });
            entry.score += weight / (config.k + rank as f64);
            entry.best_rank = entry.best_rank.min(rank);
        }
    }
    let mut fused: Vec<(&str, Entry)> = entries.into_iter().collect();
    fused.sort_by(|(_, a), (_, b)| {
        b.score
            .total_cmp(&a.score)
            .then(a.best_rank.cmp(&b.best_rank))
            .then(a.first_seen.cmp(&b.first_seen))
    });
    Ok(fused
        .into_iter()
        .map(|(id, e)| (id.to_string(), e.score))
        .collect())
}

/// Fuses ranked hit lists by chunk id: each fused hit carries its chunk (from the first list
/// that holds it) and the fused score; at most `k` hits.
pub fn fuse_hits(lists: &[Vec<Hit>], config: &FusionConfig, k: usize) -> Result<Vec<Hit>> {
    let ids: Vec<Vec<&str>> = lists
        .iter()
        .map(|l| l.iter().map(|h| h.chunk.id.as_str()).collect())
        .collect();
    let fused = reciprocal_rank_fusion(&ids, config)?;
    let mut chunks = HashMap::new();
    for hit in lists.iter().flatten() {
        chunks.entry(hit.chunk.id.as_str()).or_insert(&hit.chunk);
    }
    Ok(fused
        .into_iter()
        .take(k)
        .map(|(id, score)| Hit {
            chunk: chunks[id.as_str()].clone(),
            score: score as f32,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn rrf_matches_hand_computed_scores() {
        // list 1: a b c; list 2: c a d; k = 60, equal weights.
        // a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63.
        let lists = vec![vec!["a", "b", "c"], vec!["c", "a", "d"]];
        let fused = reciprocal_rank_fusion(&lists, &FusionConfig::equal(2)).unwrap();
        let ids: Vec<&str> = fused.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "b", "d"]);
        let expected = [
            1.0 / 61.0 + 1.0 / 62.0,
            1.0 / 63.0 + 1.0 / 61.0,
            1.0 / 62.0,
            1.0 / 63.0,
        ];
        for ((_, score), want) in fused.iter().zip(expected) {
            assert!(close(*score, want), "{score} vs {want}");
        }
    }

    #[test]
    fn rrf_weights_and_k_change_the_order() {
        // With list 2 weighted 3x and k = 1: a: 1/2 + 3/3 = 1.5, c: 1/4 + 3/2 = 1.75,
        // d: 3/4 = 0.75, b: 1/3.
        let lists = vec![vec!["a", "b", "c"], vec!["c", "a", "d"]];
        let config = FusionConfig {
            k: 1.0,
            weights: vec![1.0, 3.0],
        };
        let fused = reciprocal_rank_fusion(&lists, &config).unwrap();
        let ids: Vec<&str> = fused.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "d", "b"]);
        assert!(close(fused[0].1, 1.75) && close(fused[1].1, 1.5));
        assert!(close(fused[2].1, 0.75) && close(fused[3].1, 1.0 / 3.0));
    }

    #[test]
    fn rrf_ties_break_by_best_rank_then_first_seen() {
        // x and y both score 1/61 + 1/62; x was seen first. z is a repeat within list 1 and
        // counts once, at rank 2 there: 1/62.
        let lists = vec![vec!["x", "z", "y", "z"], vec!["y", "w", "x"]];
        let fused = reciprocal_rank_fusion(&lists, &FusionConfig::equal(2)).unwrap();
        let ids: Vec<&str> = fused.iter().map(|(id, _)| id.as_str()).collect();
        // x: 1/61 + 1/63; y: 1/63 + 1/61 (same, x seen first); z: 1/62; w: 1/62 (z first).
        assert_eq!(ids, ["x", "y", "z", "w"]);
    }

    #[test]
    fn rrf_rejects_bad_settings() {
        let lists = vec![vec!["a"]];
        let wrong_count = FusionConfig::equal(2);
        assert!(reciprocal_rank_fusion(&lists, &wrong_count).is_err());
        let negative = FusionConfig {
            k: 60.0,
            weights: vec![-1.0],
        };
        assert!(reciprocal_rank_fusion(&lists, &negative).is_err());
        let nan_k = FusionConfig {
            k: f64::NAN,
            weights: vec![1.0],
        };
        assert!(reciprocal_rank_fusion(&lists, &nan_k).is_err());
        let empty: Vec<Vec<&str>> = Vec::new();
        assert!(reciprocal_rank_fusion(&empty, &FusionConfig::equal(0))
            .unwrap()
            .is_empty());
    }
}
