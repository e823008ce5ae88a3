//! A rough estimate of a run's host memory, made from the model's `config.json` before any
//! weight is loaded, and the check of it against the memory the machine has available
//! (`MemAvailable` of `/proc/meminfo`).
//!
//! The estimate is an upper bound of the usual case, not a measurement:
//!
//! * weights: the parameter count of the shapes in `config.json` times the dtype's bytes;
//! * activations kept for the backward pass, for `micro_batch_size` rows of `max_seq_len`
//!   tokens (rows are packed or padded to at most that): per token and layer about
//!   `10 hidden + 4 intermediate` values (norm inputs and outputs, q/k/v, attention output and
//!   its residual, gate/up/product of the MLP), plus on backends without hone's fused CPU
//!   kernels the attention probabilities (`2 heads seq` per token) and the logits with their
//!   gradient (`2 vocab` per token);
//! * with gradient checkpointing, only each layer's input is kept, plus one layer's full set
//!   while it is recomputed;
//! * the backward pass's working set: one layer's activations again.
//!
//! Data-parallel peers on the CPU each hold a model and their own activations.

use std::path::Path;

use hone_model::ModelConfig;

use crate::error::{Result, TrainError};

/// What [`estimate`] found, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub activations: u64,
    /// `MemAvailable` when the run started (host memory; `None` where `/proc/meminfo` is not
    /// readable).
    pub available: Option<u64>,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// The shapes an estimate needs.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub micro_batch_size: usize,
    pub max_seq_len: usize,
    /// Bytes of one weight / activation value (4 for f32, 2 for bf16).
    pub dtype_bytes: usize,
    pub gradient_checkpointing: bool,
    /// Whether hone's fused CPU kernels run (no attention matrix, no logits kept).
    pub fused_cpu: bool,
    /// Model copies in this process (data-parallel peers on the CPU).
    pub replicas: usize,
}

/// Parameters of the model `config` describes.
pub fn parameter_count(c: &ModelConfig) -> u64 {
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    let layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + head + c.num_layers as u64 * layer + h
}

/// The estimate for `config` trained with `shape` (without `available`).
pub fn estimate(config: &ModelConfig, shape: RunShape) -> MemoryEstimate {
    let tokens = (shape.micro_batch_size * shape.max_seq_len) as u64;
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let mut per_layer_token = 10 * h + 4 * i;
    let mut head_token = 2 * h;
    if !shape.fused_cpu {
        per_layer_token += 2 * (config.num_heads * shape.max_seq_len) as u64;
        head_token += 2 * config.vocab_size as u64;
    }
    let layers = config.num_layers as u64;
    let layer = tokens * per_layer_token;
    let kept = if shape.gradient_checkpointing {
        tokens * h * layers + layer
    } else {
        layer * layers
    };
    let bytes = shape.dtype_bytes as u64;
    let replicas = shape.replicas.max(1) as u64;
    MemoryEstimate {
        weights: parameter_count(config) * bytes * replicas,
        activations: (kept + layer + tokens * head_token) * bytes * replicas,
        available: None,
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes, `None` where it cannot be read.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string(Path::new("/proc/meminfo")).ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

const MB: u64 = 1 << 20;

/// Refuses `estimate` when it exceeds `available`; `shape` names the settings in the message.
pub fn check(estimate: &MemoryEstimate, shape: &RunShape) -> Result<()> {
    let Some(available) = estimate.available else {
        return Ok(());
    };
    if estimate.total() <= available {
        return Ok(());
    }
    Err(TrainError::OutOfMemory {
        needed_mb: estimate.total().div_ceil(MB),
        available_mb: available / MB,
        detail: format!(
            "weights {} MB + activations {} MB for train.micro_batch_size = {} rows of \
             tokenize.max_seq_len = {} tokens{}",
            estimate.weights.div_ceil(MB),
            estimate.activations.div_ceil(MB),
            shape.micro_batch_size,
            shape.max_seq_len,
            if shape.replicas > 1 {
                format!(", {} data-parallel peers", shape.replicas)
            } else {
                String::new()
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stories260k() -> ModelConfig {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../checkpoints/base/stories260k");
        ModelConfig::from_file(&dir.join("config.json")).unwrap()
    }

    fn shape(micro_batch_size: usize, max_seq_len: usize) -> RunShape {
        RunShape {
            micro_batch_size,
            max_seq_len,
            dtype_bytes: 4,
            gradient_checkpointing: false,
            fused_cpu: true,
            replicas: 1,
        }
    }

    #[test]
    fn the_estimate_counts_the_weights_and_grows_with_batch_and_sequence() {
        let c = stories260k();
        // The shipped model has about 260K parameters (tied embeddings).
        let params = parameter_count(&c);
        assert!((250_000..300_000).contains(&params), "{params}");
        let small = estimate(&c, shape(4, 512));
        assert_eq!(small.weights, params * 4);
        let double_batch = estimate(&c, shape(8, 512));
        assert_eq!(double_batch.activations, 2 * small.activations);
        let checkpointed = estimate(
            &c,
            RunShape {
                gradient_checkpointing: true,
                ..shape(4, 512)
            },
        );
        assert!(checkpointed.activations < small.activations);
        // Without the fused kernels the attention matrices grow with the square of the length.
        let unfused = |s| {
            estimate(
                &c,
                RunShape {
                    fused_cpu: false,
                    ..shape(1, s)
                },
            )
            .activations
        };
        assert!(unfused(1024) > 2 * unfused(512));
    }

    #[test]
    fn a_run_larger_than_the_available_memory_is_refused_naming_the_keys() {
        let c = stories260k();
        let s = shape(100_000, 512);
        let mut e = estimate(&c, s);
        e.available = Some(8 << 30);
        let message = check(&e, &s).unwrap_err().to_string();
        assert!(
            message.contains("train.micro_batch_size = 100000")
                && message.contains("tokenize.max_seq_len = 512")
                && message.contains("8192 MB available"),
            "{message}"
        );
        let s = shape(4, 512);
        let mut e = estimate(&c, s);
        e.available = Some(8 << 30);
        check(&e, &s).unwrap();
        e.available = None;
        check(&e, &s).unwrap();
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(parse_mem_available(text), Some(12345678 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }
}
