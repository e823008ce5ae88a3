//! # hone-model
//!
//! Llama-family decoder-only transformers (Llama, Mistral, Qwen2) over any burn backend, loaded
//! from Hugging Face model directories and checked against transformers' outputs: configuration
//! ([`config`]), RoPE variants ([`rope`]), safetensors loading ([`weights`]), the model
//! ([`model`]) entered through one function, [`CausalLm::forward`] with an [`Input`]
//! ([`forward`]), the KV cache ([`cache`]), the tokenizer ([`tokenizer`]) and generation
//! ([`generate`]). The model runs on any backend implementing [`KernelBackend`] ([`kernels`]:
//! burn's `Backend` plus the fusable operations, composed by default and fused on the CPU).

pub mod adapter;
pub mod cache;
pub mod config;
pub mod detok;
pub mod device;
pub mod dtype;
pub mod error;
pub mod forward;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod loader;
pub mod lora;
pub mod loss;
pub mod model;
pub mod recompute;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use cache::{KvCache, RESERVED_NEW_TOKENS};
pub use config::{Architecture, ModelConfig};
pub use device::{in_busy_pool, in_pool, run_on, run_on_this_thread, BackendTask, DeviceSpec};
pub use dtype::FloatDtype;
pub use error::{ModelError, Result};
pub use forward::{Adapters, Cache, Input, Output, Positions, Visibility};
pub use generate::{generate, FinishReason, GenerateConfig, Generation, Sampler, SamplingConfig};
pub use kernels::{AutodiffKernelBackend, KernelBackend, Kernels};
pub use loader::{load_model_dir, LoadedModel};
pub use model::{CausalLm, LoadOptions, LoadReport, OWN_SLOT};
pub use tokenizer::Tokenizer;
pub use weights::WeightStore;

/// The CPU backend hone uses (burn's Flex, with AVX-512 gemm where the CPU has it).
pub type Cpu = burn::backend::Flex;
