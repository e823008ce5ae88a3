//! Rank-`r` factors of a combined update by truncated SVD, as PEFT's
//! `LoraModel._svd_generalized_task_arithmetic_weighted_adapter` builds them
//! (`peft/tuners/lora/model.py`, after kohya-ss' `svd_merge_lora.py`):
//!
//! `U, S, Vh = svd(delta)`; keep the first `r` triplets; `B = U·diag(S)` `[out, r]`,
//! `A = Vh` `[r, in]`; with a clamp quantile `q`, `hi = quantile(concat(B, A), q)` (linear
//! interpolation, as `torch.quantile`) and every entry of `A` and `B` is clamped to `[-hi, hi]`.
//!
//! hone computes the SVD in f64 with nalgebra (PEFT: f32 LAPACK), then rounds the factors to f32.
//! Where PEFT leaves a detail to LAPACK, hone fixes it:
//! - signs: each singular triplet is flipped so that the largest-magnitude entry of its column of
//!   `U` is positive (the first such entry on ties). `B A` does not depend on signs, but the clamp
//!   quantile does, so a clamped result matches PEFT's only where LAPACK chose the same signs;
//! - `r > min(out, in)`: the reduced SVD has `min(out, in)` triplets and the factors are
//!   zero-padded to rank `r` (PEFT's default `full_matrices=True` then fails or writes factors of
//!   mismatched ranks; with `full_matrices=False` it writes rank `min(out, in)`). Otherwise full and
//!   reduced SVDs give the same factors, so hone has no `full_matrices` (nor `driver`, a choice of
//!   cuSOLVER algorithm) setting.
//!
//! A delta given as a product `B A` of rank `R < min(out, in)` (the `svd` method) is decomposed
//! without forming it: with `B = Q_b R_b` and `Aᵀ = Q_a R_a` (thin QR), `B A = Q_b (R_b R_aᵀ) Q_aᵀ`,
//! so the SVD of the `R × R` core gives the SVD of `B A` at `O((out + in) R²)` cost.

use nalgebra::DMatrix;

use crate::adapters::ModuleShape;
use crate::combine::LowRank;
use crate::error::{MergeError, Result};

/// `torch.quantile(values, q)` with linear interpolation: the value at position `q · (n − 1)`
/// of the sorted values, interpolated between its neighbours as `torch.lerp` does. `values` is
/// sorted in place; `None` when it is empty.
pub fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let position = q * (values.len() - 1) as f64;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    let (start, end) = (values[below], values[above]);
    let weight = position - below as f64;
    Some(if weight < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    })
}

/// The rank-`rank` factors of the `out × in` matrix `delta` (row-major), optionally clamped at
/// quantile `clamp`. `module` names the module in errors.
pub fn truncated_svd(
    module: &str,
    delta: &[f32],
    out_features: usize,
    in_features: usize,
    rank: usize,
    clamp: Option<f64>,
) -> Result<LowRank> {
    let matrix =
        DMatrix::from_row_iterator(out_features, in_features, delta.iter().map(|&x| x as f64));
    let (u, s, v_t) = decompose(module, matrix)?;
    Ok(factors(u, &s, v_t, rank, clamp))
}

/// The rank-`rank` factors of `B A`, with `b` `[out, R]` and `a` `[R, in]` (row-major, f64),
/// optionally clamped at quantile `clamp`; the same result as [`truncated_svd`] of the product,
/// from the SVD of an `R × R` core (use it when `R < min(out, in)`).
pub fn truncated_svd_of_product(
    module: &str,
    b: &[f64],
    a: &[f64],
    shape: ModuleShape,
    rank: usize,
    clamp: Option<f64>,
) -> Result<LowRank> {
    let ModuleShape {
        rank: inner,
        in_features,
        out_features,
    } = shape;
    let qr_b = DMatrix::from_row_slice(out_features, inner, b).qr();
    let qr_a = DMatrix::from_column_slice(in_features, inner, a).qr(); // Aᵀ, column-major
    let core = qr_b.r() * qr_a.r().transpose();
    let (u, s, v_t) = decompose(module, core)?;
    Ok(factors(
        qr_b.q() * u,
        &s,
        v_t * qr_a.q().transpose(),
        rank,
        clamp,
    ))
}

/// Thin SVD with singular values in descending order: `(U [m, k], S [k], Vᵀ [k, n])`.
fn decompose(module: &str, matrix: DMatrix<f64>) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let (rows, cols) = matrix.shape();
    if !matrix.iter().all(|x| x.is_finite()) {
        return Err(MergeError::Svd {
            module: module.to_string(),
            rows,
            cols,
            message: "the combined update holds NaN or infinite values".into(),
        });
    }
    let k = rows.min(cols);
    // LAPACK's bdsqr allows 6·k² QR sweeps; the same bound here, so bad input cannot loop forever.
    let svd = nalgebra::SVD::try_new(matrix, true, true, f64::EPSILON * 5.0, 6 * k * k + 100)
        .ok_or_else(|| MergeError::Svd {
            module: module.to_string(),
            rows,
            cols,
            message: "the SVD did not converge".into(),
        })?;
    let s = svd.singular_values.iter().copied().collect();
    match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => Ok((u, s, v_t)),
        _ => Err(MergeError::Svd {
            module: module.to_string(),
            rows,
            cols,
            message: "the SVD returned no singular vectors".into(),
        }),
    }
}

/// PEFT's factors from a sorted thin SVD: the first `rank` triplets with hone's sign convention,
/// `B = U·diag(S)`, `A = Vᵀ`, clamped, rounded to f32 and zero-padded to `rank`.
fn factors(
    u: DMatrix<f64>,
    s: &[f64],
    v_t: DMatrix<f64>,
    rank: usize,
    clamp: Option<f64>,
) -> LowRank {
    let (out_features, in_features) = (u.nrows(), v_t.ncols());
    let kept = rank.min(s.len());
    // b: [out, kept] and a: [kept, in], row-major.
    let mut b = vec![0f64; out_features * kept];
    let mut a = vec![0f64; kept * in_features];
    for j in 0..kept {
        let column = u.column(j);
        let mut largest = 0;
        for (i, x) in column.iter().enumerate() {
            if x.abs() > column[largest].abs() {
                largest = i;
            }
        }
        let sign = if column[largest] < 0.0 { -1.0 } else { 1.0 };
        for (o, x) in column.iter().enumerate() {
            b[o * kept + j] = sign * x * s[j];
        }
        for (i, x) in v_t.row(j).iter().enumerate() {
            a[j * in_features + i] = sign * x;
        }
    }
    if let Some(q) = clamp {
        let mut values: Vec<f64> = b.iter().chain(&a).copied().collect();
        if let Some(hi) = quantile(&mut values, q) {
            // torch.clamp(x, -hi, hi) = min(max(x, -hi), hi): all `hi` when hi < 0.
            for x in b.iter_mut().chain(a.iter_mut()) {
                *x = x.max(-hi).min(hi);
            }
        }
    }
    let low = LowRank {
        shape: ModuleShape {
            rank: kept,
            in_features,
            out_features,
        },
        a: a.iter().map(|&x| x as f32).collect(),
        b: b.iter().map(|&x| x as f32).collect(),
    };
    if kept < rank {
        low.padded(rank)
    } else {
        low
    }
}
