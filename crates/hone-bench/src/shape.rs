//! [`Shape`]: model shapes with random weights, for benchmarks without a download.

use hone_model::ModelConfig;

/// Model shapes with random weights, for benchmarks without a download.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// SmolLM-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied.
    Smol,
    /// Llama hidden 512, 8 layers, 8 heads, 8 KV heads, intermediate 1408, vocab 32000, untied.
    Small,
    /// Llama-3.2-1B class: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
    /// vocab 128256, tied.
    #[value(name = "llama-1b", alias = "1b")]
    Llama1b,
}

impl Shape {
    /// The model configuration of the shape (random weights in the benchmarks).
    pub fn config(self) -> ModelConfig {
        match self {
            Shape::Smol => ModelConfig::smol(),
            Shape::Small => ModelConfig::small(),
            Shape::Llama1b => ModelConfig::llama_shape(2048, 16, 32, 8, 8192, 128_256, true),
        }
    }

    /// The name benchmarks print (`smol`, `small`, `llama1b`).
    pub fn label(self) -> String {
        format!("{self:?}").to_lowercase()
    }
}
