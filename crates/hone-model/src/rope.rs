//! Rotary position embeddings: inverse frequencies for the RoPE types of transformers'
//! `modeling_rope_utils` (`default`, `linear`, `llama3`) and the cos/sin tables of the HF
//! `rotate_half` layout (the two halves of each head are rotated against each other).

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::error::{ModelError, Result};

/// RoPE scaling as configured by `rope_scaling` (4.x) or `rope_parameters` (5.x).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 / 3.2 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per inverse frequency (`rotary_dim / 2` of them): llama.cpp's
    /// `rope_freqs.weight` tensor, which its GGUF files of Llama 3.1+ carry in place of the
    /// `llama3` parameters (`θ_i = pos · base^(-2i/d) / factors[i]`).
    Factors(Vec<f32>),
}

const SUPPORTED: &str = "default, linear, llama3";

impl RopeScaling {
    /// Parses a `rope_scaling` / `rope_parameters` object; `key` names it in errors.
    pub fn from_json(
        value: &serde_json::Value,
        path: &Path,
        key: &str,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self> {
        let invalid = |sub: &str, message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            key: format!("{key}.{sub}"),
            message,
        };
        let obj = value.as_object().ok_or_else(|| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: "expected an object".into(),
        })?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |name: &str| -> Result<f64> {
            obj.get(name)
                .ok_or_else(|| invalid(name, format!("required for rope type `{kind}`")))?
                .as_f64()
                .ok_or_else(|| invalid(name, "expected a number".into()))
        };
        let factor = || -> Result<f64> {
            let f = num("factor")?;
            if f < 1.0 {
                return Err(invalid("factor", format!("must be >= 1, found {f}")));
            }
            Ok(f)
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
            "llama3" => {
                let original = match obj.get("original_max_position_embeddings") {
                    Some(_) => num("original_max_position_embeddings")?,
                    None => max_position_embeddings.ok_or_else(|| {
                        invalid(
                            "original_max_position_embeddings",
                            "required for llama3".into(),
                        )
                    })? as f64,
                };
                let low = num("low_freq_factor")?;
                let high = num("high_freq_factor")?;
                if high <= low {
                    return Err(invalid(
                        "high_freq_factor",
                        format!("must be greater than low_freq_factor ({low}), found {high}"),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                })
            }
            other => Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "RoPE type",
                found: format!("{other} (in `{key}`)"),
                supported: SUPPORTED.into(),
            }),
        }
    }
}

/// Inverse frequencies `[rotary_dim / 2]`, as transformers computes them (in f32).
pub fn inverse_frequencies(rotary_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), evaluated in float32.
    let base: Vec<f32> = (0..rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            1.0 / (theta as f32).powf(exponent)
        })
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Factors(ref factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let factor = factor as f32;
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor as f32;
            let high_wavelen = old / high_freq_factor as f32;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor as f32)
                            / (high_freq_factor - low_freq_factor) as f32;
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// llama.cpp's `rope_freqs.weight` for Llama 3 scaling, as its `convert_hf_to_gguf.py` computes
/// it (in f64, stored as f32): per inverse frequency of `base^(-2i/d)`, 1 above the high-frequency
/// wavelength, `factor` below the low one, and `1 / ((1 - s)/factor + s)` between, `s` the smooth
/// interpolation of transformers' `llama3` type.
pub fn llama3_frequency_factors(
    rotary_dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
) -> Vec<f32> {
    let old = original_max_position_embeddings;
    let low_wavelen = old / low_freq_factor;
    let high_wavelen = old / high_freq_factor;
    (0..rotary_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// `cos` and `sin` tables `[positions, rotary_dim]` in the `rotate_half` layout
/// (`cat(freqs, freqs)`), row `p` for position `p`.
pub fn cos_sin_tables(inv_freq: &[f32], positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let dim = 2 * half;
    let mut cos = vec![0f32; positions * dim];
    let mut sin = vec![0f32; positions * dim];
    for p in 0..positions {
        for (i, &f) in inv_freq.iter().enumerate() {
            // transformers: freqs = position (f32) * inv_freq (f32), then cos/sin in f32.
            let angle = p as f32 * f;
            let (s, c) = angle.sin_cos();
            cos[p * dim + i] = c;
            cos[p * dim + half + i] = c;
            sin[p * dim + i] = s;
            sin[p * dim + half + i] = s;
        }
    }
    (cos, sin)
}

/// RoPE frequencies with the cos/sin tables of positions `0..rows`, built once per model and
/// grown (doubling) when a forward pass reaches further; every row is computed as
/// [`cos_sin_tables`] computes it, so growing never changes a value.
pub struct RopeCache {
    inv_freq: Vec<f32>,
    tables: RwLock<Arc<RopeRows>>,
}

/// Cos/sin tables `[rows, 2 * inv_freq.len()]` in the `rotate_half` layout.
#[derive(Debug, Default)]
pub(crate) struct RopeRows {
    pub(crate) rows: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

/// Positions a model's tables hold at first.
const MIN_ROWS: usize = 256;

impl RopeCache {
    pub fn new(inv_freq: Vec<f32>) -> Self {
        Self {
            inv_freq,
            tables: RwLock::new(Arc::new(RopeRows::default())),
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotary dimension (`2 * inv_freq.len()`).
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Tables holding at least positions `0..positions`.
    pub(crate) fn rows(&self, positions: usize) -> Arc<RopeRows> {
        {
            let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
            if tables.rows >= positions {
                return tables.clone();
            }
        }
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if tables.rows < positions {
            let rows = positions.next_power_of_two().max(MIN_ROWS);
            let (cos, sin) = cos_sin_tables(&self.inv_freq, rows);
            *tables = Arc::new(RopeRows { rows, cos, sin });
        }
        tables.clone()
    }
}

impl std::fmt::Debug for RopeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RopeCache")
            .field("dim", &self.dim())
            .field("rows", &self.tables.read().map(|t| t.rows).unwrap_or(0))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_divides_every_frequency() {
        let base = inverse_frequencies(16, 10000.0, &RopeScaling::Default);
        let scaled = inverse_frequencies(16, 10000.0, &RopeScaling::Linear { factor: 4.0 });
        for (b, s) in base.iter().zip(&scaled) {
            assert!((b / 4.0 - s).abs() <= 1e-12);
        }
    }
}
