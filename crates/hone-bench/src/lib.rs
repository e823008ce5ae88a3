//! # hone-bench
//!
//! hone's benchmark and load-test tooling, kept out of the library crates it measures and
//! built only on their public APIs; `hone bench ...` parses its flags and calls it.
//!
//! * [`load`]: the load tool behind `hone bench serve`: concurrent streamed completions against
//!   an in-process or running server, throughput and latency percentiles;
//! * [`client`]: the loopback-only HTTP client it (and hone-serve's tests) talk through;
//! * [`random_adapter`]: random PEFT adapters for a model shape, for benchmarks and tests.
//!
//! Errors are [`BenchError`].

pub mod client;
pub mod error;
pub mod load;
pub mod random_adapter;

pub use error::{BenchError, Result};
