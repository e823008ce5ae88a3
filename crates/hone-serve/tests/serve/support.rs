//! Test support: an in-process server on 127.0.0.1, port 0, over the real stories260k model,
//! with random adapters written to a temporary directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hone_bench::client::{Client, HttpResponse};
use hone_bench::random_adapter::{write_random_adapter, RandomAdapter};
use hone_model::ModelConfig;
use hone_serve::{Metrics, ModelSource, ServeConfig, Server};
use serde_json::{json, Value};

/// Every test call is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

pub fn stories() -> PathBuf {
    repo_path("checkpoints/base/stories260k")
}

/// Writes random adapters named `names` for stories260k into `dir`.
pub fn stories_adapters(dir: &std::path::Path, names: &[&str]) -> Vec<(String, PathBuf)> {
    let config = ModelConfig::from_file(&stories().join("config.json")).expect("stories config");
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let path = dir.join(name);
            let spec = RandomAdapter {
                seed: 100 + i as u64,
                b_range: 0.2,
                ..Default::default()
            };
            write_random_adapter(&path, &config, &spec).expect("write adapter");
            (name.to_string(), path)
        })
        .collect()
}

pub fn stories_config() -> ServeConfig {
    let mut config = ServeConfig::new(ModelSource::Dir(stories()));
    config.port = 0;
    config
}

/// A running server; stopped when dropped.
pub struct TestServer {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<hone_serve::Result<()>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start(config: ServeConfig) -> TestServer {
    let key = config.api_key.clone();
    let server = tokio::time::timeout(TIMEOUT, Server::bind(config))
        .await
        .expect("server start timed out")
        .expect("server starts");
    let client = Client::new(server.local_addr())
        .expect("loopback")
        .with_api_key(key);
    let metrics = server.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        client,
        metrics,
        stop: Some(stop),
        running: Some(running),
    }
}

impl TestServer {
    /// Sends the shutdown signal and waits (at most `bound`) for the server to stop: how long
    /// it took, or `None` if it was still running at `bound`.
    pub async fn shutdown_within(mut self, bound: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let running = self.running.take().expect("running");
        match tokio::time::timeout(bound, running).await {
            Ok(result) => {
                result.expect("server task").expect("server ends cleanly");
                Some(started.elapsed())
            }
            Err(_) => None,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> HttpResponse {
        tokio::time::timeout(TIMEOUT, self.client.post_json(path, &body))
            .await
            .expect("request timed out")
            .expect("request")
    }

    pub async fn get(&self, path: &str) -> HttpResponse {
        tokio::time::timeout(TIMEOUT, self.client.get(path))
            .await
            .expect("request timed out")
            .expect("request")
    }

    /// A greedy completion: (text, whole response JSON).
    pub async fn complete(&self, model: &str, prompt: &str, max_tokens: usize) -> (String, Value) {
        let r = self
            .post(
                "/v1/completions",
                json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json().unwrap();
        (v["choices"][0]["text"].as_str().unwrap().to_string(), v)
    }

    /// A streamed request: every data payload before `[DONE]`, parsed.
    pub async fn stream(&self, path: &str, body: Value) -> Vec<Value> {
        let fut = async {
            let mut s = self.client.post_sse(path, &body).await.expect("stream");
            assert_eq!(s.status, 200, "{:?}", s.error_body);
            s.collect_data().await.expect("events")
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .expect("stream timed out")
            .into_iter()
            .map(|d| serde_json::from_str(&d).expect("chunk is JSON"))
            .collect()
    }
}

/// Polls `check` every 20 ms for up to 10 s.
pub async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// `error.param` and `error.type` of an OpenAI error body.
pub fn error_of(r: &HttpResponse) -> (Option<String>, String) {
    let v = r.json().expect("error body is JSON");
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    (
        e["param"].as_str().map(str::to_string),
        e["type"].as_str().unwrap_or_default().to_string(),
    )
}
