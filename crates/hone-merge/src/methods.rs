//! Task-vector merge rules on flat f32 tensors, as PEFT defines them in
//! `peft/utils/merge_utils.py`: task arithmetic (a weighted sum), magnitude pruning (keep the
//! `density` fraction of largest magnitudes), random pruning with rescaling (DARE, Yu et al.
//! 2023), sign election and disjoint merge (TIES, Yadav et al. 2023). Every rule takes the task
//! tensors (same length, one per adapter) and one weight per tensor and returns the merged tensor.
//!
//! Where PEFT leaves a detail to torch, hone fixes it so that results are reproducible:
//! magnitude pruning breaks ties in magnitude by position (earlier elements are kept), and
//! random pruning draws from ChaCha8 seeded per tensor (PEFT draws from torch's global
//! generator, so DARE results cannot match PEFT's bit for bit, only in distribution).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How TIES elects the sign of each element (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned, unweighted) values.
    #[default]
    Total,
    /// The sign held by more tensors (sum of signs).
    Frequency,
}

/// `Σ_i w_i · t_i`, element-wise (PEFT's `task_arithmetic`).
pub fn task_arithmetic(tensors: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    let len = tensors.first().map_or(0, |t| t.len());
    let mut out = vec![0f32; len];
    for (t, &w) in tensors.iter().zip(weights) {
        for (o, &x) in out.iter_mut().zip(t.iter()) {
            *o += x * w;
        }
    }
    out
}

/// Keeps the `floor(density · len)` elements of largest magnitude and zeroes the rest (PEFT's
/// `magnitude_based_pruning`); `density >= 1` keeps everything. Equal magnitudes are ranked by
/// position, earlier first.
pub fn magnitude_prune(tensor: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    let k = (density.max(0.0) * tensor.len() as f64) as usize;
    let mut out = vec![0f32; tensor.len()];
    if k == 0 {
        return out;
    }
    // Order: larger magnitude first, then lower index; a total order, so the kept set is unique.
    let before =
        |&i: &usize, &j: &usize| tensor[j].abs().total_cmp(&tensor[i].abs()).then(i.cmp(&j));
    let mut order: Vec<usize> = (0..tensor.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, before);
    }
    for &i in &order[..k] {
        out[i] = tensor[i];
    }
    out
}

/// Keeps each element with probability `density` (a Bernoulli draw from ChaCha8 seeded with
/// `seed`) and zeroes the others; with `rescale` the kept values are divided by `density` so the
/// expectation is unchanged (PEFT's `random_pruning`). `density >= 1` returns the tensor as is.
pub fn random_prune(tensor: &[f32], density: f64, rescale: bool, seed: u64) -> Vec<f32> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let divisor = if rescale { density as f32 } else { 1.0 };
    tensor
        .iter()
        .map(|&x| {
            // 24 random bits -> a uniform draw in [0, 1).
            let u = (rng.next_u32() >> 8) as f64 / (1u32 << 24) as f64;
            if u < density {
                x / divisor
            } else {
                0.0
            }
        })
        .collect()
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// TIES' sign election and disjoint merge (PEFT's `calculate_majority_sign_mask` +
/// `disjoint_merge`): per element, the majority sign is `+1` when the (unweighted) sum of values
/// (`Total`) or of signs (`Frequency`) is `>= 0`, else `-1`; the result is the mean of the
/// weighted values whose own sign equals the majority sign (0 when there is none).
pub fn elect_and_merge(tensors: &[Vec<f32>], weights: &[f32], method: MajoritySign) -> Vec<f32> {
    let len = tensors.first().map_or(0, |t| t.len());
    (0..len)
        .map(|j| {
            let magnitude: f32 = match method {
                MajoritySign::Total => tensors.iter().map(|t| t[j]).sum(),
                MajoritySign::Frequency => tensors.iter().map(|t| sign(t[j])).sum(),
            };
            let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0f32);
            for (t, &w) in tensors.iter().zip(weights) {
                if sign(t[j]) == majority {
                    sum += t[j] * w;
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// PEFT's `magnitude_prune` merge: magnitude-prune each tensor, then the weighted sum.
pub fn magnitude_prune_merge(tensors: &[&[f32]], weights: &[f32], density: f64) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tensors
        .iter()
        .map(|t| magnitude_prune(t, density))
        .collect();
    let refs: Vec<&[f32]> = pruned.iter().map(Vec::as_slice).collect();
    task_arithmetic(&refs, weights)
}

/// PEFT's `ties`: magnitude-prune each tensor, elect signs, disjoint merge.
pub fn ties(tensors: &[&[f32]], weights: &[f32], density: f64, sign: MajoritySign) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tensors
        .iter()
        .map(|t| magnitude_prune(t, density))
        .collect();
    elect_and_merge(&pruned, weights, sign)
}

/// PEFT's `dare_linear`: random-prune each tensor with rescaling (tensor `i` drawn with
/// `seeds[i]`), then the weighted sum.
pub fn dare_linear(tensors: &[&[f32]], weights: &[f32], density: f64, seeds: &[u64]) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tensors
        .iter()
        .zip(seeds)
        .map(|(t, &s)| random_prune(t, density, true, s))
        .collect();
    let refs: Vec<&[f32]> = pruned.iter().map(Vec::as_slice).collect();
    task_arithmetic(&refs, weights)
}

/// PEFT's `dare_ties`: random-prune each tensor with rescaling, elect signs, disjoint merge.
pub fn dare_ties(
    tensors: &[&[f32]],
    weights: &[f32],
    density: f64,
    sign: MajoritySign,
    seeds: &[u64],
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tensors
        .iter()
        .zip(seeds)
        .map(|(t, &s)| random_prune(t, density, true, s))
        .collect();
    elect_and_merge(&pruned, weights, sign)
}
