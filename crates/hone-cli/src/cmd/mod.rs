//! One module per subcommand.

pub mod adapter;
pub mod bench;
pub mod data;
pub mod eval;
pub mod eval_compare;
pub mod generate;
pub mod logits;
pub mod merge;
pub mod rag;
pub mod run_summary;
pub mod serve;
pub mod template;
pub mod train;

pub use hone_bench::memory::peak_rss_mb;
