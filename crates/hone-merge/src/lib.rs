//! # hone-merge
//!
//! LoRA adapters folded into base weights, and adapter arithmetic, following PEFT:
//! [`merge()`] writes a Hugging Face model directory (sharded safetensors, index, config,
//! tokenizer files) holding `W + B' A'` for the adapters' combination; [`combine_adapters`]
//! writes the combination itself as a new PEFT adapter. The combination methods are PEFT's
//! `add_weighted_adapter` ones ([`combine`]) built on `merge_utils.py`'s rules ([`methods`]) and,
//! for the SVD methods, a truncated SVD ([`svd`]).
//! Merging is host-side f32 arithmetic (f64 for SVDs), tensor by tensor; no burn backend is
//! involved. Output directories are written all or nothing (`hone_io::StagedDir`).

pub mod adapters;
pub mod combine;
pub mod combined_adapter;
pub mod error;
pub mod export;
pub mod gguf_export;
pub mod merge;
pub mod methods;
pub mod svd;

pub use adapters::{Adapter, Factors, ModuleShape};
pub use combine::{
    combine_factors, AdapterSet, Combination, LowRank, Method, ModuleRule, SvdOptions,
};
pub use combined_adapter::{combine_adapters, CombineOptions, CombineReport};
pub use error::{MergeError, Result};
pub use export::parse_size;
pub use gguf_export::{
    export_gguf, ExportType, GgufExportOptions, GgufExportReport, TemplateOverride,
};
pub use merge::{merge, MergeOptions, MergeReport, ShardInfo, DEFAULT_MAX_SHARD_SIZE};
pub use methods::MajoritySign;
