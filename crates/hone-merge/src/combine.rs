//! Combining several LoRA adapters into one low-rank update per module, following PEFT's
//! `LoraModel.add_weighted_adapter` (`peft/tuners/lora/model.py`):
//!
//! - `cat`: `A' = concat_rows(w_i · s_i · A_i)`, `B' = concat_cols(B_i)`; the rank is the sum of
//!   the ranks and `B' A' = Σ w_i s_i B_i A_i` exactly.
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal ranks): the rule of
//!   [`crate::methods`] is applied to the `A`s with weights `sign(w_i s_i) · sqrt(|w_i s_i|)` and
//!   to the `B`s with weights `sqrt(|w_i s_i|)`, separately. `B' A'` therefore holds cross terms
//!   (`linear` is not the sum of the deltas; `cat` is).
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` (any ranks):
//!   the rule (task arithmetic for `svd`) is applied to the adapters' deltas `s_i B_i A_i` with
//!   the weights `w_i`, and the result is factored back to rank `svd_rank` (default: the largest
//!   rank) by truncated SVD ([`crate::svd`]). The deltas are formed in f32 as PEFT's
//!   `get_delta_weight` does; `svd` alone never forms them (its delta is `B A` of rank `Σ r_i`).
//!
//! The combined adapter has scaling 1 (PEFT sets `r = lora_alpha = new rank`). With a single
//! adapter PEFT always uses `linear`, and so does hone. A module only some adapters target is
//! combined from those adapters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::adapters::{Adapter, Factors, ModuleShape};
use crate::error::{MergeError, Result};
use crate::methods::{self, MajoritySign};
use crate::svd;

/// How adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Weighted sum of the `A`s and of the `B`s (with square-root weights); equal ranks.
    #[default]
    Linear,
    /// Concatenation of ranks: exactly the weighted sum of the adapters' deltas.
    Cat,
    /// TIES: magnitude pruning, sign election, disjoint merge; equal ranks, needs a density.
    Ties,
    /// DARE: random pruning with rescaling, then a weighted sum; equal ranks, needs a density.
    DareLinear,
    /// DARE pruning, then TIES' sign election and disjoint merge; equal ranks, needs a density.
    DareTies,
    /// Magnitude pruning, then a weighted sum; equal ranks, needs a density.
    MagnitudePrune,
    /// Weighted sum of the deltas, truncated SVD; any ranks.
    Svd,
    /// TIES on the deltas, truncated SVD; any ranks, needs a density.
    TiesSvd,
    /// DARE + weighted sum on the deltas, truncated SVD; any ranks, needs a density.
    DareLinearSvd,
    /// DARE + TIES' election on the deltas, truncated SVD; any ranks, needs a density.
    DareTiesSvd,
    /// Magnitude pruning + weighted sum on the deltas, truncated SVD; any ranks, needs a density.
    MagnitudePruneSvd,
}

impl Method {
    /// PEFT's name of the method.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Cat => "cat",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::MagnitudePrune => "magnitude_prune",
            Method::Svd => "svd",
            Method::TiesSvd => "ties_svd",
            Method::DareLinearSvd => "dare_linear_svd",
            Method::DareTiesSvd => "dare_ties_svd",
            Method::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the method prunes and so needs a density.
    pub fn uses_density(self) -> bool {
        !matches!(self, Method::Linear | Method::Cat | Method::Svd)
    }

    /// Whether the method combines deltas and factors them by SVD (and so takes [`SvdOptions`]).
    pub fn is_svd(self) -> bool {
        matches!(
            self,
            Method::Svd
                | Method::TiesSvd
                | Method::DareLinearSvd
                | Method::DareTiesSvd
                | Method::MagnitudePruneSvd
        )
    }

    /// Whether all adapters must have the same rank (the methods that combine factors
    /// element-wise).
    pub fn needs_equal_ranks(self) -> bool {
        !(self == Method::Cat || self.is_svd())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to combine and how.
#[derive(Debug, Clone, Default)]
pub struct Combination {
    pub method: Method,
    /// One weight per adapter (`None`: 1 each). Negative weights subtract.
    pub weights: Option<Vec<f64>>,
    /// Fraction of values kept by the pruning methods, in (0, 1].
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
    /// Seed of DARE's random pruning.
    pub seed: u64,
    /// Settings of the SVD methods; must be left unset for the others.
    pub svd: SvdOptions,
}

/// Settings of the SVD methods (PEFT's `svd_rank` and `svd_clamp`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SvdOptions {
    /// Rank of the combined adapter (`None`: the largest rank of the adapters, as in PEFT).
    pub rank: Option<usize>,
    /// Quantile in [0, 1] of the entries of the factors at which they are clamped, symmetrically
    /// (`None`: no clamping).
    pub clamp: Option<f64>,
}

/// A validated combination as [`combine_factors`] applies it to each module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleRule {
    pub method: Method,
    /// Fraction of values kept by the pruning methods (1 for the others).
    pub density: f64,
    pub majority_sign: MajoritySign,
    /// Rank of the SVD methods' result (unused by the others).
    pub svd_rank: usize,
    /// Clamp quantile of the SVD methods.
    pub svd_clamp: Option<f64>,
}

/// A combined update of one module with scaling 1: `delta = B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub shape: ModuleShape,
    /// `[rank, in_features]`, row-major.
    pub a: Vec<f32>,
    /// `[out_features, rank]`, row-major.
    pub b: Vec<f32>,
}

impl LowRank {
    /// `B A` added to `weight` (`[out_features, in_features]`, row-major, as the shape says;
    /// the merge checks it against the base first), row by row in parallel.
    pub fn add_to(&self, weight: &mut [f32]) {
        use rayon::prelude::*;
        let ModuleShape {
            rank, in_features, ..
        } = self.shape;
        if rank == 0 || in_features == 0 {
            return; // an empty product adds nothing
        }
        weight
            .par_chunks_mut(in_features)
            .zip(self.b.par_chunks(rank))
            .for_each(|(row, b_row)| {
                let mut delta = vec![0f32; in_features];
                for (k, &bk) in b_row.iter().enumerate() {
                    let a_row = &self.a[k * in_features..(k + 1) * in_features];
                    for (d, &a) in delta.iter_mut().zip(a_row) {
                        *d += bk * a;
                    }
                }
                for (w, d) in row.iter_mut().zip(&delta) {
                    *w += d;
                }
            });
    }

    /// The same update with rank `rank >= self.shape.rank`, padded with zero rows of `A` and
    /// zero columns of `B` (PEFT allocates the combined adapter at one rank for all modules).
    pub fn padded(&self, rank: usize) -> LowRank {
        let ModuleShape {
            rank: r,
            in_features,
            out_features,
        } = self.shape;
        let mut a = self.a.clone();
        a.resize(rank * in_features, 0.0);
        let mut b = vec![0f32; out_features * rank];
        for o in 0..out_features {
            b[o * rank..o * rank + r].copy_from_slice(&self.b[o * r..(o + 1) * r]);
        }
        LowRank {
            shape: ModuleShape { rank, ..self.shape },
            a,
            b,
        }
    }
}

/// Combines per-module factors of several adapters (in adapter order; `None` where an adapter
/// does not target the module) with `rule`. `weights` has one entry per adapter; `seeds(i, which)`
/// gives DARE's seed for adapter `i`'s `lora_A`, `lora_B` or `delta`. The pure core of
/// [`AdapterSet::combined`].
pub fn combine_factors(
    module: &str,
    factors: &[(PathBuf, Option<Factors>)],
    weights: &[f64],
    rule: &ModuleRule,
    seeds: &dyn Fn(usize, &str) -> u64,
) -> Result<LowRank> {
    if weights.len() != factors.len() {
        return Err(MergeError::WeightsCount {
            weights: weights.len(),
            adapters: factors.len(),
        });
    }
    let present: Vec<Present> = factors
        .iter()
        .enumerate()
        .filter_map(|(i, (dir, f))| f.as_ref().map(|f| (i, dir, f)))
        .collect();
    if present.is_empty() {
        return Err(
            hone_model::ModelError::Input(format!("no adapter targets module `{module}`")).into(),
        );
    }
    if rule.method == Method::Cat {
        Ok(cat(&present, weights))
    } else if rule.method.is_svd() {
        svd_combined(module, &present, weights, rule, seeds)
    } else {
        factorwise(module, &present, weights, rule, seeds)
    }
}

/// An adapter that targets the module: its index, directory and factors.
type Present<'a> = (usize, &'a PathBuf, &'a Factors);

/// `A' = concat_rows(w_i s_i A_i)`, `B' = concat_cols(B_i)`.
fn cat(present: &[Present], weights: &[f64]) -> LowRank {
    let first = present[0].2;
    let rank: usize = present.iter().map(|(_, _, f)| f.shape.rank).sum();
    let shape = ModuleShape {
        rank,
        ..first.shape
    };
    let mut a = Vec::with_capacity(rank * shape.in_features);
    let mut b = vec![0f32; shape.out_features * rank];
    let mut offset = 0;
    for &(i, _, f) in present {
        let factor = (weights[i] * f.scale) as f32;
        a.extend(f.a.iter().map(|x| x * factor));
        let r = f.shape.rank;
        for o in 0..shape.out_features {
            b[o * rank + offset..o * rank + offset + r].copy_from_slice(&f.b[o * r..(o + 1) * r]);
        }
        offset += r;
    }
    LowRank { shape, a, b }
}

/// The merge rule of `method` (its `merge_utils.py` function) on equally long tensors.
fn apply_rule(
    method: Method,
    parts: &[&[f32]],
    weights: &[f32],
    rule: &ModuleRule,
    seeds: &[u64],
) -> Vec<f32> {
    let (density, sign) = (rule.density, rule.majority_sign);
    match method {
        Method::Linear | Method::Cat | Method::Svd => methods::task_arithmetic(parts, weights),
        Method::Ties | Method::TiesSvd => methods::ties(parts, weights, density, sign),
        Method::DareLinear | Method::DareLinearSvd => {
            methods::dare_linear(parts, weights, density, seeds)
        }
        Method::DareTies | Method::DareTiesSvd => {
            methods::dare_ties(parts, weights, density, sign, seeds)
        }
        Method::MagnitudePrune | Method::MagnitudePruneSvd => {
            methods::magnitude_prune_merge(parts, weights, density)
        }
    }
}

/// The rule applied to the `A`s and to the `B`s separately, with weights
/// `sign(w_i s_i) · sqrt(|w_i s_i|)` and `sqrt(|w_i s_i|)`; equal ranks.
fn factorwise(
    module: &str,
    present: &[Present],
    weights: &[f64],
    rule: &ModuleRule,
    seeds: &dyn Fn(usize, &str) -> u64,
) -> Result<LowRank> {
    let (_, first_dir, first) = present[0];
    for &(_, dir, f) in &present[1..] {
        if f.shape.rank != first.shape.rank {
            return Err(MergeError::ModuleRankMismatch {
                method: rule.method.name(),
                module: module.to_string(),
                first: first_dir.clone(),
                first_rank: first.shape.rank,
                other: dir.clone(),
                other_rank: f.shape.rank,
            });
        }
    }
    let (mut weights_a, mut weights_b) = (Vec::new(), Vec::new());
    for &(i, _, f) in present {
        let ws = weights[i] * f.scale;
        let root = ws.abs().sqrt();
        weights_a.push((if ws >= 0.0 { root } else { -root }) as f32);
        weights_b.push(root as f32);
    }
    let a_parts: Vec<&[f32]> = present.iter().map(|(_, _, f)| f.a.as_slice()).collect();
    let b_parts: Vec<&[f32]> = present.iter().map(|(_, _, f)| f.b.as_slice()).collect();
    let combine = |parts: &[&[f32]], w: &[f32], which: &str| -> Vec<f32> {
        let seeds: Vec<u64> = present.iter().map(|&(i, _, _)| seeds(i, which)).collect();
        apply_rule(rule.method, parts, w, rule, &seeds)
    };
    Ok(LowRank {
        shape: first.shape,
        a: combine(&a_parts, &weights_a, "lora_A"),
        b: combine(&b_parts, &weights_b, "lora_B"),
    })
}

/// PEFT's `get_delta_weight` in f32: `(B A) · scale`, `[out, in]` row-major.
fn delta(f: &Factors) -> Vec<f32> {
    let mut delta = vec![0f32; f.shape.out_features * f.shape.in_features];
    LowRank {
        shape: f.shape,
        a: f.a.clone(),
        b: f.b.clone(),
    }
    .add_to(&mut delta);
    let scale = f.scale as f32;
    delta.iter_mut().for_each(|d| *d *= scale);
    delta
}

/// The rule applied to the deltas `s_i B_i A_i` with weights `w_i`, factored by truncated SVD.
fn svd_combined(
    module: &str,
    present: &[Present],
    weights: &[f64],
    rule: &ModuleRule,
    seeds: &dyn Fn(usize, &str) -> u64,
) -> Result<LowRank> {
    let shape = present[0].2.shape;
    let (out_features, in_features) = (shape.out_features, shape.in_features);
    let total: usize = present.iter().map(|(_, _, f)| f.shape.rank).sum();
    if rule.method == Method::Svd && total < out_features.min(in_features) {
        // Σ w_i s_i B_i A_i = B' A' with B' = [w_i s_i B_i] (columns) and A' = [A_i] (rows).
        let mut b = vec![0f64; out_features * total];
        let mut a = Vec::with_capacity(total * in_features);
        let mut offset = 0;
        for &(i, _, f) in present {
            let factor = weights[i] * f.scale;
            let r = f.shape.rank;
            for o in 0..out_features {
                for k in 0..r {
                    b[o * total + offset + k] = factor * f.b[o * r + k] as f64;
                }
            }
            a.extend(f.a.iter().map(|&x| x as f64));
            offset += r;
        }
        let product = ModuleShape {
            rank: total,
            ..shape
        };
        return svd::truncated_svd_of_product(
            module,
            &b,
            &a,
            product,
            rule.svd_rank,
            rule.svd_clamp,
        );
    }
    let deltas: Vec<Vec<f32>> = present.iter().map(|(_, _, f)| delta(f)).collect();
    let parts: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
    let w: Vec<f32> = present.iter().map(|&(i, _, _)| weights[i] as f32).collect();
    let seeds: Vec<u64> = present.iter().map(|&(i, _, _)| seeds(i, "delta")).collect();
    let merged = apply_rule(rule.method, &parts, &w, rule, &seeds);
    tracing::debug!("module `{module}`: SVD of a {out_features}x{in_features} update");
    svd::truncated_svd(
        module,
        &merged,
        out_features,
        in_features,
        rule.svd_rank,
        rule.svd_clamp,
    )
}

/// Several opened adapters with the validated way to combine them.
pub struct AdapterSet {
    pub adapters: Vec<Adapter>,
    /// The method actually used (`linear` when there is one adapter, as in PEFT).
    pub method: Method,
    weights: Vec<f64>,
    rule: ModuleRule,
    seed: u64,
    /// Union of the adapters' modules with their shape (the rank is the first adapter's).
    modules: BTreeMap<String, ModuleShape>,
}

impl AdapterSet {
    /// Validates `combination` for `dirs.len()` adapters, opens every adapter and checks that
    /// they agree on each shared module's shape and, where `method` needs it, on their rank.
    pub fn open(dirs: &[PathBuf], combination: &Combination) -> Result<Self> {
        if dirs.is_empty() {
            return Err(MergeError::NoAdapters);
        }
        let weights = combination
            .weights
            .clone()
            .unwrap_or_else(|| vec![1.0; dirs.len()]);
        if weights.len() != dirs.len() {
            return Err(MergeError::WeightsCount {
                weights: weights.len(),
                adapters: dirs.len(),
            });
        }
        if let Some((index, &value)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(MergeError::InvalidWeight { index, value });
        }
        let requested = combination.method;
        let density = match (requested.uses_density(), combination.density) {
            (true, Some(d)) if d > 0.0 && d <= 1.0 => d,
            (true, Some(d)) => {
                return Err(MergeError::Density {
                    method: requested.name(),
                    message: format!("density must be in (0, 1], found {d}"),
                })
            }
            (true, None) => {
                return Err(MergeError::Density {
                    method: requested.name(),
                    message: "a density (fraction of values kept, in (0, 1]) is required".into(),
                })
            }
            (false, Some(_)) => {
                return Err(MergeError::Density {
                    method: requested.name(),
                    message: "density is only used by ties, dare_linear, dare_ties, \
                              magnitude_prune and their _svd variants"
                        .into(),
                })
            }
            (false, None) => 1.0,
        };
        let svd = combination.svd;
        let svd_error = |message: String| MergeError::SvdSetting {
            method: requested.name(),
            message,
        };
        if !requested.is_svd() && (svd.rank.is_some() || svd.clamp.is_some()) {
            return Err(svd_error(
                "an SVD rank or clamp is only used by svd, ties_svd, dare_linear_svd, \
                 dare_ties_svd and magnitude_prune_svd"
                    .into(),
            ));
        }
        if svd.rank == Some(0) {
            return Err(svd_error("the SVD rank must be at least 1".into()));
        }
        if let Some(q) = svd.clamp.filter(|q| !(0.0..=1.0).contains(q)) {
            return Err(svd_error(format!(
                "the SVD clamp is a quantile in [0, 1], found {q}"
            )));
        }
        let method = if dirs.len() == 1 {
            Method::Linear
        } else {
            requested
        };
        if method != requested {
            tracing::info!("one adapter: using `linear` instead of `{requested}`, as PEFT does");
        }
        let adapters = dirs
            .iter()
            .map(|d| Adapter::open(d))
            .collect::<Result<Vec<_>>>()?;
        if method.needs_equal_ranks() {
            let first = &adapters[0];
            if let Some(other) = adapters
                .iter()
                .find(|a| a.config_rank() != first.config_rank())
            {
                return Err(MergeError::RankMismatch {
                    method: method.name(),
                    first: first.dir.clone(),
                    first_rank: first.config_rank(),
                    other: other.dir.clone(),
                    other_rank: other.config_rank(),
                });
            }
        }
        let mut modules: BTreeMap<String, (ModuleShape, &Adapter)> = BTreeMap::new();
        for adapter in &adapters {
            for (module, &shape) in adapter.modules() {
                let Some((seen, by)) = modules.get(module) else {
                    modules.insert(module.clone(), (shape, adapter));
                    continue;
                };
                let (which, expected, found) = if seen.in_features != shape.in_features {
                    (
                        "lora_A",
                        vec![shape.rank, seen.in_features],
                        vec![shape.rank, shape.in_features],
                    )
                } else if seen.out_features != shape.out_features {
                    (
                        "lora_B",
                        vec![seen.out_features, shape.rank],
                        vec![shape.out_features, shape.rank],
                    )
                } else {
                    continue;
                };
                return Err(MergeError::ShapeMismatch {
                    adapter: adapter.dir.clone(),
                    tensor: hone_model::adapter::peft_key(module, which),
                    expected,
                    found,
                    why: format!("the module's shape in {}", by.dir.display()),
                });
            }
        }
        let modules = modules.into_iter().map(|(m, (s, _))| (m, s)).collect();
        let largest_rank = adapters.iter().map(Adapter::config_rank).max().unwrap_or(0);
        Ok(Self {
            method,
            weights,
            rule: ModuleRule {
                method,
                density,
                majority_sign: combination.majority_sign,
                svd_rank: svd.rank.unwrap_or(largest_rank),
                svd_clamp: svd.clamp,
            },
            seed: combination.seed,
            modules,
            adapters,
        })
    }

    /// Every module some adapter targets, with its shape (rank of the first adapter).
    pub fn modules(&self) -> &BTreeMap<String, ModuleShape> {
        &self.modules
    }

    /// The rank of the combined adapter as PEFT allocates it: the sum of the adapters' ranks for
    /// `cat`, the SVD rank for the SVD methods, their common rank otherwise.
    pub fn output_rank(&self) -> usize {
        let ranks = self.adapters.iter().map(Adapter::config_rank);
        match self.method {
            Method::Cat => ranks.sum(),
            m if m.is_svd() => self.rule.svd_rank,
            _ => ranks.max().unwrap_or(0),
        }
    }

    /// The combined update of `module` (scaling 1).
    pub fn combined(&self, module: &str) -> Result<LowRank> {
        let factors = self
            .adapters
            .iter()
            .map(|a| Ok((a.dir.clone(), a.factors(module)?)))
            .collect::<Result<Vec<_>>>()?;
        let seed = self.seed;
        let seeds = |i: usize, which: &str| {
            xxhash_rust::xxh3::xxh3_64_with_seed(format!("{module}\0{i}\0{which}").as_bytes(), seed)
        };
        combine_factors(module, &factors, &self.weights, &self.rule, &seeds)
    }
}
