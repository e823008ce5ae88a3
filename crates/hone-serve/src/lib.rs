//! # hone-serve
//!
//! An OpenAI-compatible HTTP server for hone models (axum on tokio), with continuous batching
//! and LoRA adapters chosen per request.
//!
//! * [`Server`] / [`serve_blocking`]: `POST /v1/completions`, `POST /v1/chat/completions`
//!   (both streamable as server-sent events), `GET /v1/models`, `POST /v1/load_lora_adapter`,
//!   `POST /v1/unload_lora_adapter`, `GET /health`, `GET /metrics` (Prometheus).
//! * [`Engine`]: the handle to the model worker thread (the `worker` module holds the scheduler), which
//!   owns the model, each request's KV cache and the adapter bank, and decodes all running
//!   requests together, each row with its own adapter.
//! * [`ServeConfig`]: validated settings, [`Limits`] and [`Timeouts`].
//! * Retrieval ([`rag`]): with [`RagSettings`], chat requests may retrieve passages from a
//!   `hone rag` index; the answer carries their `sources`.
//!
//! The load tool of `hone bench serve`, its HTTP client and random adapters live in `hone-bench`.
//!
//! Errors are [`ServeError`] (starting, loading) and [`ApiError`] (what a request gets back, in
//! OpenAI's error JSON).

mod adapters_dir;
mod bank;
mod completion;
pub mod config;
pub mod engine;
pub mod error;
mod http;
pub mod metrics;
pub mod openai;
pub mod rag;
mod server;
mod worker;

pub use config::{Limits, ModelSource, ServeConfig, Timeouts};
pub use engine::{Engine, Event, GenRequest, ModelInfo, Usage};
pub use error::{ApiError, Result, ServeError};
pub use metrics::Metrics;
pub use rag::RagSettings;
pub use server::{serve_blocking, shutdown_signal, Server};
