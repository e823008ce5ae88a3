//! Random PEFT LoRA adapters for a model shape, written in PEFT's file format: for benchmarks
//! (several adapters on a random-weight model) and tests (adapters that visibly change a real
//! model's output). `lora_B` is random too (PEFT initialises it to zero, which would make the
//! adapter a no-op).

use std::path::Path;

use hone_model::adapter::{write_peft, LoraTensors};
use hone_model::lora::LoraSettings;
use hone_model::{ModelConfig, ModelError};
use rand::{Rng, SeedableRng};

use crate::error::Result;

/// Shape of a random adapter.
#[derive(Debug, Clone)]
pub struct RandomAdapter {
    pub rank: usize,
    pub alpha: f64,
    /// Projections to adapt (`q_proj`, `v_proj`, ...).
    pub targets: Vec<String>,
    /// `lora_B` entries are uniform in `[-b_range, b_range]`.
    pub b_range: f32,
    pub seed: u64,
}

impl Default for RandomAdapter {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            b_range: 0.05,
            seed: 0,
        }
    }
}

/// `[out, in]` of projection `target` in `config`, if it is one.
fn projection_shape(config: &ModelConfig, target: &str) -> Option<(String, [usize; 2])> {
    let (h, kvh, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let (hidden, inter) = (config.hidden_size, config.intermediate_size);
    Some(match target {
        "q_proj" => ("self_attn", [h * d, hidden]),
        "k_proj" => ("self_attn", [kvh * d, hidden]),
        "v_proj" => ("self_attn", [kvh * d, hidden]),
        "o_proj" => ("self_attn", [hidden, h * d]),
        "gate_proj" => ("mlp", [inter, hidden]),
        "up_proj" => ("mlp", [inter, hidden]),
        "down_proj" => ("mlp", [hidden, inter]),
        _ => return None,
    })
    .map(|(block, shape)| (block.to_string(), shape))
}

/// Writes a random adapter for `config` into `dir` (replaced atomically).
pub fn write_random_adapter(dir: &Path, config: &ModelConfig, spec: &RandomAdapter) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let r = spec.rank;
    let mut modules = Vec::new();
    for layer in 0..config.num_layers {
        for target in &spec.targets {
            let (block, [out, inp]) = projection_shape(config, target).ok_or_else(|| {
                ModelError::Input(format!("`{target}` is not a projection LoRA can adapt"))
            })?;
            let module = format!("model.layers.{layer}.{block}.{target}");
            let a_bound = 1.0 / (inp as f32).sqrt();
            let mut values = |n: usize, bound: f32| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
            };
            let a = values(r * inp, a_bound);
            let b = values(out * r, spec.b_range);
            modules.push((
                module,
                LoraTensors {
                    a,
                    a_shape: [r, inp],
                    b,
                    b_shape: [out, r],
                },
            ));
        }
    }
    let targets: Vec<&str> = spec.targets.iter().map(String::as_str).collect();
    let settings = LoraSettings::new(r, spec.alpha, &targets);
    write_peft(dir, &settings, "random", &modules)?;
    Ok(())
}
