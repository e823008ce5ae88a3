//! The process's peak resident memory and the machine (threads, CPU model, ISA), as benchmarks report them.

/// Peak resident memory of this process in MB (VmHWM), where the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    kb_field("/proc/self/status", "VmHWM:").map(|kb| kb / 1024.0)
}

/// This process's memory on transparent huge pages now, in MB (`AnonHugePages` of
/// `/proc/self/smaps_rollup`), where the OS reports it: the benchmark lines report it as
/// `huge_pages_mb`, since streaming weights from 2 MiB pages runs faster than from 4 KiB ones
/// (`hone` asks glibc for them at start-up; see the README, "Huge pages").
pub fn huge_pages_mb() -> Option<f64> {
    kb_field("/proc/self/smaps_rollup", "AnonHugePages:").map(|kb| kb / 1024.0)
}

/// The value of the `key` line (`key   123 kB`) of a `/proc` file, in kB.
fn kb_field(path: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak resident memory (VmHWM) to the current one (Linux: `clear_refs` 5), so that
/// [`peak_rss_mb`] reports the peak of what follows; elsewhere it stays the peak so far.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The CPU's model name (`model name` of `/proc/cpuinfo`; `unknown` elsewhere), which the
/// benchmark lines report as `cpu`: figures from different machines must say which they are.
pub fn cpu_model() -> String {
    hone_model::kernels::cpu::cpu_model().unwrap_or_else(|| "unknown".to_string())
}

/// The vector extension the kernels take here (`avx512`, `avx2`, `sse`): see
/// [`hone_model::kernels::cpu::isa`]; the benchmark lines report it as `isa`.
pub use hone_model::kernels::cpu::isa;

/// Threads the machine offers (what the benchmark lines report as `threads`).
pub fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ISA agrees with the flags the kernel lists in /proc/cpuinfo (another source than
    /// CPUID as `is_x86_feature_detected!` reads it) and with the build's `avx512` feature, and
    /// the model name is found.
    #[test]
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn isa_and_cpu_model_match_proc_cpuinfo() {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap();
        let has = |f: &str| flags.contains(&f);
        let expected = if hone_model::kernels::cpu::AVX512_BUILD && has("avx512f") {
            "avx512"
        } else if has("avx2") && has("fma") {
            "avx2"
        } else {
            "sse"
        };
        assert_eq!(isa(), expected, "flags: {flags:?}");
        let model = cpu_model();
        assert!(
            text.contains(&model) && model != "unknown",
            "model name {model:?}"
        );
    }
}
