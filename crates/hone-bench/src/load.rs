//! The load tool behind `hone bench serve`: N concurrent clients send streamed completions,
//! round-robin over several models (the base and adapters), until a request count or a time
//! limit is reached, and report throughput, latency percentiles and errors. Loopback only (see
//! [`Client`]), bounded in requests, time and per-request timeout.
//!
//! Prompts are token ids (drawn below `prompt_vocab`, so that a random-weight model with a
//! borrowed tokenizer gets ids the tokenizer knows), decoding is greedy with `ignore_eos`, so
//! every request produces exactly `max_tokens` tokens, and a response with another count is an
//! error. [`bench_blocking`] runs the server in process and adds the worker's own decode rate
//! (tokens per second of batched decode steps, from its metrics).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use hone_serve::{Metrics, ServeConfig, Server};

use crate::client::Client;
use crate::error::{BenchError, Result};

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Concurrent streams.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    pub max_tokens: usize,
    pub prompt_tokens: usize,
    /// Prompt ids are drawn below this.
    pub prompt_vocab: u32,
    /// Models requested round-robin.
    pub models: Vec<String>,
    /// No request starts after this.
    pub time_limit: Duration,
    pub request_timeout: Duration,
    /// Prompts of different seeds never repeat one another (request `i` draws from a stream
    /// derived from both): a server that caches prompts (llama-server does, per slot) must
    /// prefill every request of a measurement whose seed it has not seen.
    pub seed: u64,
}

/// The seed of request `i`'s prompt: splitmix64 of the measurement's seed, plus `i`, so that
/// neighbouring seeds give unrelated prompts (a plain `seed + i` would repeat seed 43's first
/// prompt as seed 42's second).
fn prompt_seed(seed: u64, i: usize) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).wrapping_add(i as u64)
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub concurrency: usize,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub wall_seconds: f64,
    /// Completion tokens of successful requests per wall-clock second.
    pub tokens_per_sec: f64,
    pub requests_per_sec: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    /// Time to the first streamed chunk that carries text (a server may send an empty chunk
    /// first).
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    /// Inter-token latency: time between consecutive streamed chunks that carry text (one
    /// token each, unless the server merges them), pooled over requests.
    pub itl_p50_s: f64,
    pub itl_p99_s: f64,
    pub requests_per_model: BTreeMap<String, usize>,
    /// Up to 5 error messages.
    pub error_samples: Vec<String>,
}

struct Sample {
    model: String,
    latency: f64,
    ttft: f64,
    /// Seconds between consecutive chunks with choices.
    gaps: Vec<f64>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn one_request(
    client: &Client,
    model: &str,
    prompt: &[u32],
    cfg: &LoadConfig,
) -> Result<Sample> {
    let started = Instant::now();
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let mut stream = client.post_sse("/v1/completions", &body).await?;
    if stream.status != 200 {
        return Err(BenchError::Client(format!(
            "status {}: {}",
            stream.status,
            stream.error_body.unwrap_or_default()
        )));
    }
    let mut ttft = None;
    let mut usage: Option<Value> = None;
    let (mut last, mut gaps) = (None::<Instant>, Vec::new());
    while let Some(data) = stream.next_data().await? {
        let now = Instant::now();
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data)
            .map_err(|e| BenchError::Client(format!("bad chunk ({e}): {data}")))?;
        if let Some(error) = chunk.get("error") {
            return Err(BenchError::Client(format!("error event: {error}")));
        }
        let text = |c: &Value| {
            let t = c.get("text").or_else(|| c.pointer("/delta/content"));
            t.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
        };
        if chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(text))
        {
            ttft.get_or_insert_with(|| (now - started).as_secs_f64());
            if let Some(last) = last {
                gaps.push((now - last).as_secs_f64());
            }
            last = Some(now);
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
    }
    let usage = usage.ok_or_else(|| BenchError::Client("no usage chunk".into()))?;
    let count = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let completion_tokens = count("completion_tokens");
    if completion_tokens != cfg.max_tokens {
        return Err(BenchError::Client(format!(
            "expected {} completion tokens (ignore_eos), got {completion_tokens}",
            cfg.max_tokens
        )));
    }
    Ok(Sample {
        model: model.to_string(),
        latency: started.elapsed().as_secs_f64(),
        ttft: ttft.unwrap_or(0.0),
        gaps,
        prompt_tokens: count("prompt_tokens"),
        completion_tokens,
    })
}

/// Runs `cfg` against the server of `client`.
pub async fn run_load(client: &Client, cfg: &LoadConfig) -> Result<LoadReport> {
    if cfg.concurrency == 0 || cfg.requests == 0 || cfg.models.is_empty() || cfg.prompt_vocab == 0 {
        return Err(BenchError::Config {
            key: "load",
            message: "concurrency, requests, models and prompt_vocab must be non-empty".into(),
        });
    }
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cfg.concurrency {
        let (client, cfg) = (client.clone(), cfg.clone());
        let (next, samples, errors) = (next.clone(), samples.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.requests || started.elapsed() >= cfg.time_limit {
                    break;
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(prompt_seed(cfg.seed, i));
                let prompt: Vec<u32> = (0..cfg.prompt_tokens.max(1))
                    .map(|_| rng.random_range(0..cfg.prompt_vocab))
                    .collect();
                let model = &cfg.models[i % cfg.models.len()];
                let outcome = tokio::time::timeout(
                    cfg.request_timeout,
                    one_request(&client, model, &prompt, &cfg),
                )
                .await;
                match outcome {
                    Ok(Ok(sample)) => samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(sample),
                    Ok(Err(e)) => errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{model}: {e}")),
                    Err(_) => errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!(
                            "{model}: timed out after {:?}",
                            cfg.request_timeout
                        )),
                }
            }
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| BenchError::Client(format!("a load task failed: {e}")))?;
    }
    let wall = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|p| p.into_inner()));
    let mut latencies: Vec<f64> = samples.iter().map(|s| s.latency).collect();
    let mut ttfts: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut gaps: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gaps.iter().copied())
        .collect();
    latencies.sort_by(f64::total_cmp);
    ttfts.sort_by(f64::total_cmp);
    gaps.sort_by(f64::total_cmp);
    let completion_tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let mut per_model = BTreeMap::new();
    for s in &samples {
        *per_model.entry(s.model.clone()).or_default() += 1;
    }
    Ok(LoadReport {
        concurrency: cfg.concurrency,
        requests: samples.len() + errors.len(),
        ok: samples.len(),
        errors: errors.len(),
        prompt_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
        completion_tokens,
        wall_seconds: wall,
        tokens_per_sec: completion_tokens as f64 / wall.max(1e-9),
        requests_per_sec: samples.len() as f64 / wall.max(1e-9),
        latency_p50_s: percentile(&latencies, 0.5),
        latency_p99_s: percentile(&latencies, 0.99),
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p99_s: percentile(&ttfts, 0.99),
        itl_p50_s: percentile(&gaps, 0.5),
        itl_p99_s: percentile(&gaps, 0.99),
        requests_per_model: per_model,
        error_samples: errors.into_iter().take(5).collect(),
    })
}

/// A load run and what the in-process worker saw during it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    #[serde(flatten)]
    pub load: LoadReport,
    /// Tokens per second of the worker's batched decode steps (in-process runs only).
    pub decode_tokens_per_sec: Option<f64>,
    /// Mean rows per decode step (in-process runs only).
    pub mean_decode_batch: Option<f64>,
    /// Prompt tokens per second of the worker's prefills (in-process runs only).
    pub prefill_tokens_per_sec: Option<f64>,
}

/// The worker's cumulative counters.
struct WorkerTotals {
    decode_tokens: f64,
    decode_seconds: f64,
    decode_steps: f64,
    prefill_tokens: f64,
    prefill_seconds: f64,
}

impl WorkerTotals {
    fn read(m: &Metrics) -> Self {
        Self {
            decode_tokens: m.decode_tokens.load(Ordering::Relaxed) as f64,
            decode_seconds: m.decode_seconds.get(),
            decode_steps: m.decode_step.totals().0 as f64,
            prefill_tokens: m.prefill_tokens.load(Ordering::Relaxed) as f64,
            prefill_seconds: m.prefill_seconds.get(),
        }
    }

    fn minus(&self, before: &Self) -> Self {
        Self {
            decode_tokens: self.decode_tokens - before.decode_tokens,
            decode_seconds: self.decode_seconds - before.decode_seconds,
            decode_steps: self.decode_steps - before.decode_steps,
            prefill_tokens: self.prefill_tokens - before.prefill_tokens,
            prefill_seconds: self.prefill_seconds - before.prefill_seconds,
        }
    }
}

/// Where the load goes.
pub enum Target {
    /// Start a server from this config on 127.0.0.1, port 0.
    InProcess(Box<ServeConfig>),
    /// A running server on a loopback address.
    Running {
        addr: SocketAddr,
        api_key: Option<String>,
    },
}

/// Runs every load config in turn (after one warm-up request per model), calling `on_result`
/// after each.
pub fn bench_blocking(
    target: Target,
    runs: &[LoadConfig],
    mut on_result: impl FnMut(&BenchResult),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| BenchError::Io {
            context: "starting the async runtime".into(),
            source,
        })?;
    runtime.block_on(async {
        let (client, server) = match target {
            Target::Running { addr, api_key } => (Client::new(addr)?.with_api_key(api_key), None),
            Target::InProcess(config) => {
                let mut config = *config;
                config.host = std::net::IpAddr::from([127, 0, 0, 1]);
                config.port = 0;
                let api_key = config.api_key.clone();
                let server = Server::bind(config).await?;
                let client = Client::new(server.local_addr())?.with_api_key(api_key);
                let metrics = server.metrics();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let handle = tokio::spawn(server.run(async {
                    let _ = stopped.await;
                }));
                (client, Some((metrics, stop, handle)))
            }
        };
        if let Some(first) = runs.first() {
            let warm = LoadConfig {
                concurrency: 1,
                requests: first.models.len(),
                max_tokens: 2,
                ..first.clone()
            };
            run_load(&client, &warm).await?;
        }
        for cfg in runs {
            let before = server.as_ref().map(|(m, _, _)| WorkerTotals::read(m));
            let load = run_load(&client, cfg).await?;
            let delta = match (&server, before) {
                (Some((m, _, _)), Some(before)) => Some(WorkerTotals::read(m).minus(&before)),
                _ => None,
            };
            on_result(&BenchResult {
                load,
                decode_tokens_per_sec: delta
                    .as_ref()
                    .map(|d| d.decode_tokens / d.decode_seconds.max(1e-9)),
                mean_decode_batch: delta
                    .as_ref()
                    .map(|d| d.decode_tokens / d.decode_steps.max(1.0)),
                prefill_tokens_per_sec: delta
                    .as_ref()
                    .map(|d| d.prefill_tokens / d.prefill_seconds.max(1e-9)),
            });
        }
        if let Some((_, stop, handle)) = server {
            let _ = stop.send(());
            let _ = handle.await;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::{percentile, prompt_seed};

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn measurements_of_neighbouring_seeds_share_no_prompt_seed() {
        // Requests 0..64 of seeds 42_000..42_003 (one command's concurrencies, as bench.rs
        // numbers them) and 43_000: no request's prompt seed repeats another's.
        let mut seen = std::collections::HashSet::new();
        for seed in [42_000, 42_001, 42_002, 43_000] {
            for i in 0..64 {
                assert!(
                    seen.insert(prompt_seed(seed, i)),
                    "seed {seed}, request {i}"
                );
            }
        }
    }
}
