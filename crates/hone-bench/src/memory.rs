//! The process's peak resident memory, as benchmarks report it.

/// Peak resident memory of this process in MB (VmHWM), where the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak resident memory (VmHWM) to the current one (Linux: `clear_refs` 5), so that
/// [`peak_rss_mb`] reports the peak of what follows; elsewhere it stays the peak so far.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Threads the machine offers (what the benchmark lines report as `threads`).
pub fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
