//! # hone-bench
//!
//! hone's benchmark and load-test tooling, kept out of the library crates it measures and
//! built only on their public APIs; `hone bench ...` parses its flags into the settings
//! structs here, calls the benchmark and prints the JSON objects it returns.
//!
//! * [`generate`]: `hone bench generate`: prefill and decode throughput with a KV cache;
//! * [`train`]: `hone bench train`: LoRA training steps through the trainer's step engine;
//! * [`data`]: `hone bench data`: curation and tokenization throughput;
//! * [`shape`]: the model shapes with random weights these use, [`memory`]: peak RSS;
//! * [`load`]: the load tool behind `hone bench serve`: concurrent streamed completions against
//!   an in-process or running server, throughput and latency percentiles;
//! * [`client`]: the loopback-only HTTP client it (and hone-serve's tests) talk through;
//! * [`random_adapter`]: random PEFT adapters for a model shape, for benchmarks and tests.
//!
//! Errors are [`BenchError`].

pub mod client;
pub mod data;
pub mod error;
pub mod generate;
pub mod load;
pub mod memory;
pub mod rag;
pub mod random_adapter;
pub mod shape;
pub mod train;

pub use error::{BenchError, Result};
pub use shape::Shape;
