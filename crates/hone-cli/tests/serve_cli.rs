//! `hone serve` and `hone bench serve` end to end: the binary listens on loopback (port 0),
//! answers over HTTP with adapters and an API key, stops on SIGTERM, refuses bad settings, and
//! the load benchmark reports zero errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hone_bench::random_adapter::{write_random_adapter, RandomAdapter};
use hone_model::ModelConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories() -> PathBuf {
    root().join("checkpoints/base/stories260k")
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

/// Kills the server if the test fails before stopping it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(key) = key {
        req.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn serve_answers_with_adapters_and_a_key_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig::from_file(&stories().join("config.json")).unwrap();
    let adapter = dir.path().join("a");
    write_random_adapter(&adapter, &config, &RandomAdapter::default()).unwrap();
    let child = hone()
        .arg("serve")
        .arg("--model")
        .arg(stories())
        .args(["--port", "0", "--chat-template", "chatml", "--api-key", "k"])
        .arg("--adapter")
        .arg(format!("a={}", adapter.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let mut line = String::new();
    BufReader::new(guard.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert_eq!(http(&addr, "GET", "/health", None, None).0, 200);
    let body = r#"{"model": "a", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}"#;
    let (status, text) = http(&addr, "POST", "/v1/completions", Some(body), Some("k"));
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["model"], "a");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (status, text) = http(&addr, "POST", "/v1/completions", Some(body), None);
    assert_eq!(status, 401, "{text}");
    let chat = r#"{"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}"#;
    assert_eq!(
        http(&addr, "POST", "/v1/chat/completions", Some(chat), Some("k")).0,
        200
    );
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `hone serve` on stories260k, port 0, with `args` and `env`: the guard and the address.
fn spawn_serve(args: &[&str], env: &[(&str, &str)]) -> (Guard, String) {
    let child = hone()
        .arg("serve")
        .arg("--model")
        .arg(stories())
        .args(["--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let mut line = String::new();
    BufReader::new(guard.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (guard, addr)
}

/// Sends SIGTERM and waits (at most `bound`) for a successful exit: how long it took.
fn terminate(guard: &mut Guard, bound: Duration) -> Duration {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "still running {bound:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_exits_within_the_shutdown_timeout_while_a_client_stalls() {
    // Issue 10: a POST declaring 50 body bytes and sending 9 kept the server alive for good.
    let (mut guard, addr) = spawn_serve(
        &[
            "--shutdown-timeout",
            "1",
            "--body-timeout",
            "120",
            "--header-timeout",
            "120",
        ],
        &[("HONE_API_KEY", "  k \n")],
    );
    // HONE_API_KEY with surrounding whitespace matches the client's (trimmed) key.
    let (status, text) = http(&addr, "GET", "/v1/models", None, Some("k"));
    assert_eq!(status, 200, "{text}");
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\
              Content-Length: 50\r\n\r\n{\"prompt\"",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let took = terminate(&mut guard, Duration::from_secs(15));
    assert!(took < Duration::from_secs(6), "exited after {took:?}");
}

#[test]
fn serve_refuses_bad_settings_before_loading() {
    for (args, env, needle) in [
        (vec!["--adapter", "no-equals-sign"], None, "NAME=DIR"),
        (
            vec!["--adapter", "a=/nonexistent/adapter"],
            None,
            "not a directory",
        ),
        (vec!["--max-batch", "0"], None, "max_batch"),
        (vec!["--adapter", "a\u{200B}=/tmp"], None, "adapter name"),
        (vec!["--allow-runtime-lora"], None, "--adapters-dir"),
        (vec![], Some(("HONE_API_KEY", "  ")), "api_key"),
    ] {
        let out = hone()
            .arg("serve")
            .arg("--model")
            .arg(stories())
            .args(&args)
            .args(["--port", "0"])
            .envs(env)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
    }
    let out = hone()
        .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn bench_serve_reports_throughput_latency_and_zero_errors_across_adapters() {
    let out = hone()
        .args(["bench", "serve", "--model"])
        .arg(stories())
        .args([
            "--concurrency",
            "1,3",
            "--requests",
            "6",
            "--max-tokens",
            "4",
        ])
        .args(["--adapters", "2", "--time-limit-s", "60"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, concurrency) in lines.iter().zip([1, 3]) {
        assert_eq!(line["bench"], "serve");
        assert_eq!(line["concurrency"], concurrency);
        assert_eq!(line["ok"], 6);
        assert_eq!(line["errors"], 0);
        assert_eq!(line["completion_tokens"], 24);
        assert_eq!(line["requests_per_model"].as_object().unwrap().len(), 3);
        for key in [
            "tokens_per_sec",
            "latency_p50_s",
            "latency_p99_s",
            "ttft_p50_s",
            "itl_p50_s",
            "itl_p99_s",
            "decode_tokens_per_sec",
        ] {
            assert!(line[key].as_f64().unwrap() > 0.0, "{key}: {line}");
        }
        // Four tokens a request: the gaps between them fit in the request's latency.
        let f = |k: &str| line[k].as_f64().unwrap();
        assert!(f("itl_p50_s") <= f("itl_p99_s") && f("itl_p99_s") <= f("latency_p99_s"));
        assert!(f("ttft_p50_s") <= f("latency_p50_s"), "{line}");
    }
}

/// The environment of the running process `pid` as `/proc/PID/environ` shows it: its entries,
/// and glibc's tunables split at their `:`s (glibc parses `GLIBC_TUNABLES` in place, writing a
/// NUL over each separator).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn environ_of(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// How many of the process's mappings are advised for huge pages (`hg` in `/proc/PID/smaps`);
/// in hone only glibc's malloc asks for that, and only when its tunable took effect.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mappings_on_huge_pages(pid: u32) -> usize {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"))
        .count()
}

/// Whether this glibc acts on `glibc.malloc.hugetlb=1` here: glibc 2.35 or later, and the
/// kernel's THP mode `madvise` (under `always` glibc has nothing to advise).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_advises_huge_pages(mode: &str) -> bool {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let mut parts = version.to_str().unwrap_or("").split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 35) && mode.contains("[madvise]")
}

/// hone starts again with glibc's huge-page tunable added to what the user set (the process
/// keeps its pid: SIGTERM still stops it), the tunable takes effect (malloc's memory is advised
/// for huge pages: on Debian 12's glibc that depends on a stack byte, see
/// `allocator::start_malloc_on_a_cleared_stack`), and a setting of the user's own stands.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn hone_runs_with_glibc_huge_pages_unless_the_user_set_them() {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    if mode.as_deref().map_or(true, |m| m.contains("[never]")) {
        eprintln!("skipped: transparent huge pages are off here ({mode:?})");
        return;
    }
    let user = "glibc.malloc.trim_threshold=4294967295";
    let (mut guard, addr) = spawn_serve(&[], &[("GLIBC_TUNABLES", user)]);
    assert_eq!(http(&addr, "GET", "/health", None, None).0, 200);
    let environ = environ_of(guard.0.id());
    let at = environ
        .iter()
        .position(|e| e == &format!("GLIBC_TUNABLES={user}"))
        .unwrap_or_else(|| panic!("the user's tunable is gone: {environ:?}"));
    assert_eq!(
        environ.get(at + 1).map(String::as_str),
        Some("glibc.malloc.hugetlb=1")
    );
    let advised = glibc_advises_huge_pages(mode.as_deref().unwrap_or(""));
    if advised {
        assert!(
            mappings_on_huge_pages(guard.0.id()) > 0,
            "glibc.malloc.hugetlb=1 is set but no mapping is advised for huge pages"
        );
    }
    terminate(&mut guard, Duration::from_secs(20));

    let (mut guard, addr) = spawn_serve(&[], &[("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")]);
    assert_eq!(http(&addr, "GET", "/health", None, None).0, 200);
    let environ = environ_of(guard.0.id());
    assert!(
        environ
            .iter()
            .any(|e| e == "GLIBC_TUNABLES=glibc.malloc.hugetlb=0")
            && !environ
                .iter()
                .any(|e| e.ends_with("glibc.malloc.hugetlb=1")),
        "{environ:?}"
    );
    if advised {
        assert_eq!(mappings_on_huge_pages(guard.0.id()), 0);
    }
    terminate(&mut guard, Duration::from_secs(20));
}
