//! Server metrics in Prometheus' text exposition format (version 0.0.4): request counters by
//! endpoint and status, token counters, latency histograms (time to first token, whole
//! request, decode step), and gauges for the queue, the running batch and loaded adapters.
//! Hand-written: a few atomics and mutexes, no metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Clone, Default)]
struct HistogramState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            s.counts[i] += 1;
        }
        s.sum += value;
        s.count += 1;
    }

    /// (count, sum) of all observations.
    pub fn totals(&self) -> (u64, f64) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.count, s.sum)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&s.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.sum, s.count);
    }
}

/// A float counter (seconds spent), stored as f64 bits.
#[derive(Debug, Default)]
pub struct SecondsCounter(AtomicU64);

impl SecondsCounter {
    pub fn add(&self, seconds: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    /// (endpoint, HTTP status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Requests by the model they named (base or adapter), counted once resolved.
    requests_by_model: Mutex<BTreeMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests whose client went away before the end.
    pub cancelled: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: AtomicU64,
    pub time_to_first_token: Histogram,
    pub request_latency: Histogram,
    pub decode_step: Histogram,
    /// Retrieval of chat requests that asked for it (`--rag`): the search alone.
    pub retrieval: Histogram,
    /// From the hand-over to the model worker to the last token (without retrieval).
    pub generation: Histogram,
    /// Tokens produced by batched decode steps (not counting the first token of each request,
    /// which comes from its prefill).
    pub decode_tokens: AtomicU64,
    pub decode_seconds: SecondsCounter,
    pub prefill_tokens: AtomicU64,
    pub prefill_seconds: SecondsCounter,
    /// Prefill forward passes (a prompt prefilled in chunks counts once per chunk).
    pub prefill_steps: AtomicU64,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    /// Names of the loaded adapters.
    adapters: Mutex<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            requests_by_model: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
            time_to_first_token: Histogram::new(&LATENCY_BUCKETS),
            request_latency: Histogram::new(&LATENCY_BUCKETS),
            decode_step: Histogram::new(&LATENCY_BUCKETS),
            retrieval: Histogram::new(&LATENCY_BUCKETS),
            generation: Histogram::new(&LATENCY_BUCKETS),
            decode_tokens: AtomicU64::new(0),
            decode_seconds: SecondsCounter::default(),
            prefill_tokens: AtomicU64::new(0),
            prefill_seconds: SecondsCounter::default(),
            prefill_steps: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            adapters: Mutex::default(),
        }
    }
}

/// Prometheus label value escaping: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one answered request.
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// Counts one request for `model` (the base's or an adapter's name).
    pub fn record_model(&self, model: &str) {
        let mut map = self
            .requests_by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *map.entry(model.to_string()).or_default() += 1;
    }

    /// Replaces the list of loaded adapters.
    pub fn set_adapters(&self, names: Vec<String>) {
        *self.adapters.lock().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// Number of answered requests with `status` on `endpoint`.
    pub fn request_count(&self, endpoint: &str, status: u16) -> u64 {
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(endpoint.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP hone_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE hone_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hone_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                escape(endpoint)
            );
        }
        let _ = writeln!(
            out,
            "# HELP hone_model_requests_total Generation requests by model (base or adapter).\n\
             # TYPE hone_model_requests_total counter"
        );
        for (model, n) in self
            .requests_by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hone_model_requests_total{{model=\"{}\"}} {n}",
                escape(model)
            );
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "hone_prompt_tokens_total",
            "Prompt tokens prefilled.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "hone_prefill_steps_total",
            "Prefill forward passes (one per chunk of a chunked prompt).",
            load(&self.prefill_steps),
        );
        counter(
            &mut out,
            "hone_generation_tokens_total",
            "Tokens generated.",
            load(&self.generation_tokens),
        );
        counter(
            &mut out,
            "hone_requests_cancelled_total",
            "Generations stopped because the client went away.",
            load(&self.cancelled),
        );
        counter(
            &mut out,
            "hone_requests_rejected_total",
            "Requests refused with 429 because the queue was full.",
            load(&self.rejected_queue_full),
        );
        counter(
            &mut out,
            "hone_decode_tokens_total",
            "Tokens produced by batched decode steps.",
            load(&self.decode_tokens),
        );
        let _ = writeln!(
            out,
            "# HELP hone_decode_seconds_total Time spent in batched decode steps.\n\
             # TYPE hone_decode_seconds_total counter\nhone_decode_seconds_total {}",
            self.decode_seconds.get()
        );
        let _ = writeln!(
            out,
            "# HELP hone_prefill_seconds_total Time spent prefilling prompts.\n\
             # TYPE hone_prefill_seconds_total counter\nhone_prefill_seconds_total {}",
            self.prefill_seconds.get()
        );
        self.time_to_first_token.render(
            &mut out,
            "hone_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.request_latency.render(
            &mut out,
            "hone_request_latency_seconds",
            "From a request's arrival to its last generated token.",
        );
        self.decode_step.render(
            &mut out,
            "hone_decode_step_seconds",
            "Duration of one batched decode step.",
        );
        self.retrieval.render(
            &mut out,
            "hone_retrieval_seconds",
            "Retrieval (index search) of a chat request that asked for passages.",
        );
        self.generation.render(
            &mut out,
            "hone_generation_seconds",
            "From a request's hand-over to the model worker to its last token (after any retrieval).",
        );
        gauge(
            &mut out,
            "hone_queue_depth",
            "Requests waiting for a place in the batch.",
            load(&self.queue_depth) as f64,
        );
        gauge(
            &mut out,
            "hone_running_requests",
            "Requests in the decoding batch.",
            load(&self.running) as f64,
        );
        let adapters = self
            .adapters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        gauge(
            &mut out,
            "hone_adapters_loaded",
            "LoRA adapters loaded.",
            adapters.len() as f64,
        );
        let _ = writeln!(
            out,
            "# HELP hone_adapter_loaded 1 for each loaded adapter.\n# TYPE hone_adapter_loaded gauge"
        );
        for name in adapters {
            let _ = writeln!(
                out,
                "hone_adapter_loaded{{adapter=\"{}\"}} 1",
                escape(&name)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.request_latency.observe(0.003);
        m.request_latency.observe(0.2);
        m.record_request("/v1/completions", 200);
        m.set_adapters(vec!["a\"b".into()]);
        let text = m.render();
        assert!(text.contains("hone_request_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("hone_request_latency_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("hone_request_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("hone_request_latency_seconds_count 2"));
        assert!(text.contains("hone_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"));
        assert!(text.contains("hone_adapter_loaded{adapter=\"a\\\"b\"} 1"));
    }
}
