//! One module per subcommand.

pub mod adapter;
pub mod bench;
pub mod bench_data;
pub mod data;
pub mod eval;
pub mod generate;
pub mod logits;
pub mod merge;
pub mod rag;
pub mod run_summary;
pub mod serve;
pub mod template;
pub mod train;

/// Peak resident memory of this process in MB (VmHWM), where the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
