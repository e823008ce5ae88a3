//! The model worker: one thread owns the model, every request's KV cache and the adapter bank,
//! and runs continuous batching (as in Orca / vLLM, at token granularity).
//!
//! Each iteration: take new commands; drop requests whose client went away; admit waiting
//! requests while the batch has room (requests whose prompts have the same length are prefilled
//! together, a row each); run one chunk of prefill (at most `limits.prefill_chunk` prompt
//! tokens while other requests are decoding, so that a long prompt does not stall their
//! streams; whole prompts when nothing else runs), sampling the first token of each request
//! whose prompt is done; then one decode step for the whole batch, one token per row, each
//! row with its own cache and adapter slot ([`hone_model::Cache::PerRow`], [`hone_model::Adapters::PerRow`]). A request joins or
//! leaves the batch between steps. Rows never interact, so greedy output does not depend on
//! what else is in the batch. A panic inside the model fails the requests of that step, not
//! the server.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::{
    load_model_dir, BackendTask, CausalLm, FinishReason, Input, KvCache, LoadOptions, Sampler,
    Tokenizer,
};

use crate::bank::Bank;
use crate::config::{ModelSource, ServeConfig};
use crate::engine::{AdapterEntry, Command, Event, GenRequest, ModelInfo, Shared, Usage};
use crate::error::{ApiError, Result, ServeError};
use crate::metrics::Metrics;
use hone_model::detok::TextStream;

/// What the worker thread starts from.
pub(crate) struct Setup {
    pub config: ServeConfig,
    pub tokenizer: Tokenizer,
    pub metrics: Arc<Metrics>,
    pub rx: Receiver<Command>,
    pub ready: Sender<Result<Arc<Shared>>>,
}

/// The worker, generic over the backend chosen at run time.
pub(crate) struct WorkerTask(pub Setup);

impl BackendTask for WorkerTask {
    type Output = ();

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) {
        let Setup {
            config,
            tokenizer,
            metrics,
            rx,
            ready,
        } = self.0;
        match Worker::<B>::load(&config, tokenizer, metrics, rx, device) {
            Ok(worker) => {
                let _ = ready.send(Ok(worker.shared.clone()));
                drop(ready);
                worker.run();
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    }
}

/// One request in the batch.
struct Sequence<B: Backend> {
    req: Box<GenRequest>,
    cache: KvCache<B>,
    slot: Option<usize>,
    sampler: Sampler,
    history: Vec<u32>,
    text: TextStream,
    generated: usize,
    /// The last sampled token: the next step's input.
    next: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Continue,
    Finished,
    Cancelled,
}

impl<B: Backend> Sequence<B> {
    /// Samples the next token from `logits`, sends its text, and says whether to go on.
    fn accept(&mut self, logits: &mut [f32], tokenizer: &Tokenizer, metrics: &Metrics) -> Outcome {
        let id = self.sampler.sample(logits, &self.history);
        self.history.push(id);
        self.generated += 1;
        self.next = id;
        if self.generated == 1 {
            metrics
                .time_to_first_token
                .observe(self.req.received.elapsed().as_secs_f64());
        }
        metrics
            .generation_tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut text, stopped) = if self.req.stop_ids.contains(&id) {
            (self.text.finish(tokenizer), true)
        } else {
            let d = self.text.push(tokenizer, id);
            (d.text, d.stopped)
        };
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if self.generated >= self.req.max_tokens {
            text.push_str(&self.text.finish(tokenizer));
            Some(FinishReason::Length)
        } else {
            None
        };
        if self.req.events.send(Event::Token { text }).is_err() {
            return Outcome::Cancelled;
        }
        match finish {
            None => Outcome::Continue,
            Some(finish_reason) => {
                // Observed before the client can see the end, so that /metrics agrees with it.
                metrics
                    .request_latency
                    .observe(self.req.received.elapsed().as_secs_f64());
                metrics
                    .generation
                    .observe(self.req.submitted.elapsed().as_secs_f64());
                let _ = self.req.events.send(Event::Done(Usage {
                    finish_reason,
                    prompt_tokens: self.req.prompt.len(),
                    completion_tokens: self.generated,
                }));
                Outcome::Finished
            }
        }
    }
}

struct Worker<B: Backend> {
    model: CausalLm<B>,
    device: B::Device,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    bank: Bank,
    waiting: VecDeque<Box<GenRequest>>,
    /// Admitted requests whose prompts are being prefilled, chunk by chunk.
    prefilling: VecDeque<Prefill<B>>,
    active: Vec<Sequence<B>>,
    /// Every handle is gone: finish what runs, then stop.
    closing: bool,
}

/// Prompt tokens prefilled in one forward at most (a group of equal-length prompts is split
/// beyond it; a single longer prompt goes alone).
const MAX_PREFILL_TOKENS: usize = 4096;

/// Requests with prompts of the same length, prefilled together (a row each), `done` prompt
/// positions so far.
struct Prefill<B: Backend> {
    group: Vec<(Box<GenRequest>, Option<usize>)>,
    caches: Vec<KvCache<B>>,
    done: usize,
}

fn read_floats<B: Backend>(t: Tensor<B, 2>) -> std::result::Result<Vec<f32>, String> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| format!("cannot read logits: {e:?}"))
}

/// The logits of a step run under `catch_unwind`, or what went wrong.
fn flatten(
    result: std::thread::Result<std::result::Result<Vec<f32>, String>>,
) -> std::result::Result<Vec<f32>, String> {
    result.unwrap_or_else(|panic| Err(hone_io::panic_message(&*panic)))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

impl<B: hone_model::KernelBackend> Worker<B> {
    fn load(
        config: &ServeConfig,
        tokenizer: Tokenizer,
        metrics: Arc<Metrics>,
        rx: Receiver<Command>,
        device: B::Device,
    ) -> Result<Self> {
        let options = LoadOptions {
            dtype: config.dtype,
            activations: config.activations,
            ..LoadOptions::default()
        };
        let (model, source) = match &config.model {
            ModelSource::Dir(dir) => {
                let wrap = |source| ServeError::Model {
                    path: dir.clone(),
                    source,
                };
                // A Hugging Face directory or a GGUF file; unused tensors are logged there.
                let loaded = load_model_dir::<B>(dir, &device, options).map_err(wrap)?;
                (loaded.model, dir.display().to_string())
            }
            ModelSource::Random {
                config: mc, seed, ..
            } => {
                B::seed(&device, *seed);
                (
                    CausalLm::random(mc, &device, options),
                    format!("random weights (seed {seed})"),
                )
            }
        };
        if tokenizer.vocab_size() > model.config().vocab_size {
            tracing::warn!(
                "the tokenizer knows {} tokens, the model {}: prompts with larger ids are refused",
                tokenizer.vocab_size(),
                model.config().vocab_size
            );
        }
        let info = ModelInfo {
            name: config.base_name(),
            vocab_size: model.config().vocab_size,
            max_positions: model.config().max_position_embeddings,
            source,
        };
        let shared = Arc::new(Shared::new(tokenizer, info, config.limits.clone(), metrics));
        let mut worker = Worker {
            model,
            device,
            shared,
            rx,
            bank: Bank::default(),
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            active: Vec::new(),
            closing: false,
        };
        for (name, path) in &config.adapters {
            worker
                .load_adapter(name, path)
                .map_err(|e| ServeError::Adapter {
                    name: name.clone(),
                    path: path.clone(),
                    source: Box::new(e.into()),
                })?;
        }
        Ok(worker)
    }

    fn run(mut self) {
        tracing::info!("model worker running: {}", self.shared.info.source);
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.prefilling.is_empty() {
                if self.closing {
                    break;
                }
                self.publish_gauges();
                match self.rx.recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            // The model's work runs on the pool (see `hone_model::run_on_this_thread`), whose
            // threads stay awake for the step (`hone_model::in_busy_pool`).
            hone_model::in_busy_pool(|| {
                self.prefill_step();
                self.publish_gauges();
                self.decode_step();
            });
        }
        self.shared
            .alive
            .store(false, std::sync::atomic::Ordering::Release);
        tracing::info!("model worker stopped");
    }

    fn publish_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.shared.metrics;
        m.queue_depth.store(self.waiting.len() as u64, Relaxed);
        m.running.store(self.active.len() as u64, Relaxed);
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate(req) => self.waiting.push_back(req),
            Command::LoadAdapter { name, path, reply } => {
                let _ = reply.send(self.load_adapter(&name, &path));
            }
            Command::UnloadAdapter { name, reply } => {
                let _ = reply.send(self.unload_adapter(&name));
            }
        }
    }

    fn publish_adapters(&self) {
        let names = self
            .shared
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        self.shared.metrics.set_adapters(names);
    }

    fn load_adapter(&mut self, name: &str, path: &Path) -> std::result::Result<(), ApiError> {
        crate::config::validate_adapter_name(name)
            .map_err(|m| ApiError::bad_param("lora_name", m))?;
        if name == self.shared.info.name {
            return Err(ApiError::bad_param(
                "lora_name",
                format!("`{name}` is the base model's name"),
            ));
        }
        if self.bank.find(name).is_some() {
            let table = self
                .shared
                .adapters
                .read()
                .unwrap_or_else(|p| p.into_inner());
            return match table.get(name) {
                Some(entry) if same_dir(&entry.path, path) => Ok(()),
                _ => Err(ApiError::bad_param(
                    "lora_name",
                    format!("an adapter named `{name}` is already loaded from another path; unload it first"),
                )),
            };
        }
        let used = self.bank.occupied();
        if used >= self.shared.limits.max_adapters {
            return Err(ApiError::bad_request(format!(
                "{used} adapters are loaded, the limit (--max-adapters); unload one first"
            )));
        }
        let slot = self.bank.next_free();
        let model = &mut self.model;
        let loaded = catch_unwind(AssertUnwindSafe(|| model.load_adapter_slot(path, slot)));
        match loaded {
            Ok(Ok(info)) => {
                self.bank.occupy(slot, name);
                self.shared
                    .adapters
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        name.to_string(),
                        AdapterEntry {
                            path: PathBuf::from(path),
                            created: hone_io::unix_now(),
                        },
                    );
                self.publish_adapters();
                tracing::info!(
                    "adapter `{name}` loaded from {} into slot {slot} (r = {}, {} modules)",
                    path.display(),
                    info.settings.r,
                    info.modules.len()
                );
                Ok(())
            }
            Ok(Err(e)) => Err(ApiError::bad_param(
                "lora_path",
                format!("cannot load adapter `{name}` from {}: {e}", path.display()),
            )),
            Err(panic) => Err(ApiError::internal(format!(
                "loading adapter `{name}` failed: {}",
                hone_io::panic_message(&*panic)
            ))),
        }
    }

    fn unload_adapter(&mut self, name: &str) -> std::result::Result<(), ApiError> {
        let Some((slot, empty_now)) = self.bank.retire(name) else {
            return Err(ApiError::model_not_found(name));
        };
        self.shared
            .adapters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.publish_adapters();
        if empty_now {
            self.model.unload_adapter_slot(slot);
        }
        tracing::info!("adapter `{name}` unloaded");
        Ok(())
    }

    fn release(&mut self, slot: Option<usize>) {
        if let Some(slot) = slot {
            if self.bank.release(slot) {
                self.model.unload_adapter_slot(slot);
            }
        }
    }

    /// Ends a sequence that left the batch.
    fn retire(&mut self, seq: Sequence<B>, outcome: Outcome) {
        let m = &self.shared.metrics;
        if outcome == Outcome::Cancelled {
            m.cancelled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.release(seq.slot);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        let gone = (before - self.waiting.len()) as u64;
        self.shared
            .metrics
            .cancelled
            .fetch_add(gone, std::sync::atomic::Ordering::Relaxed);
        for seq in std::mem::take(&mut self.active) {
            if seq.req.events.is_closed() {
                self.retire(seq, Outcome::Cancelled);
            } else {
                self.active.push(seq);
            }
        }
        // A prefill whose every client went away stops (rows of a group share their steps;
        // a row cancelled alone is retired when its prompt is done).
        for p in std::mem::take(&mut self.prefilling) {
            if p.group.iter().all(|(r, _)| r.events.is_closed()) {
                self.shared
                    .metrics
                    .cancelled
                    .fetch_add(p.group.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for (_, slot) in p.group {
                    self.release(slot);
                }
            } else {
                self.prefilling.push_back(p);
            }
        }
    }

    /// Moves waiting requests into the batch while it has room. Requests whose prompts have the
    /// same length are prefilled together, one row each (up to [`MAX_PREFILL_TOKENS`] per
    /// forward), whatever their adapters.
    fn admit(&mut self) {
        let prefilling: usize = self.prefilling.iter().map(|p| p.group.len()).sum();
        let room = self
            .shared
            .limits
            .max_batch
            .saturating_sub(self.active.len() + prefilling);
        let mut admitted: Vec<(Box<GenRequest>, Option<usize>)> = Vec::new();
        while admitted.len() < room {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            if let Some(slot) = self.check(&req) {
                admitted.push((req, slot));
            }
        }
        while let Some((first, _)) = admitted.first() {
            let len = first.prompt.len();
            let rows = (MAX_PREFILL_TOKENS / len).max(1);
            let (mut group, rest): (Vec<_>, Vec<_>) = admitted
                .into_iter()
                .partition(|(r, _)| r.prompt.len() == len);
            admitted = rest;
            let later = group.split_off(rows.min(group.len()));
            admitted.extend(later);
            let caches = (0..group.len())
                .map(|_| KvCache::new(self.model.config().num_layers))
                .collect();
            self.prefilling.push_back(Prefill {
                group,
                caches,
                done: 0,
            });
        }
    }

    /// Prefills the next chunk of the waiting prompts: `limits.prefill_chunk` tokens while
    /// requests are decoding (the longest a running stream waits for a newcomer's prompt),
    /// whole prompts otherwise. Requests whose prompts are done sample their first token and
    /// join the decoding batch.
    fn prefill_step(&mut self) {
        let mut budget = if self.active.is_empty() {
            usize::MAX
        } else {
            self.shared.limits.prefill_chunk
        };
        while budget > 0 {
            let Some(mut p) = self.prefilling.pop_front() else {
                break;
            };
            let (n, len) = (p.group.len(), p.group[0].0.prompt.len());
            let chunk = (len - p.done).min((budget / n).max(1));
            budget = budget.saturating_sub(n * chunk);
            let last = p.done + chunk == len;
            match self.prefill_chunk(&mut p, chunk, last) {
                Ok(Some(logits)) => self.start_decoding(p, logits),
                Ok(None) => {
                    p.done += chunk;
                    self.prefilling.push_front(p);
                }
                Err(message) => {
                    tracing::error!("prefill failed for {n} requests: {message}");
                    for (req, slot) in p.group {
                        let _ = req.events.send(Event::Error(ApiError::internal(format!(
                            "the model failed on this request: {message}"
                        ))));
                        self.release(slot);
                    }
                }
            }
        }
    }

    /// Takes the request's adapter slot (`Some(slot)` for the base is `Some(None)`), or answers
    /// the request with an error and returns `None`.
    fn check(&mut self, req: &GenRequest) -> Option<Option<usize>> {
        let slot = match &req.adapter {
            None => None,
            Some(name) => match self.bank.acquire(name) {
                Some(slot) => Some(slot),
                None => {
                    let _ = req
                        .events
                        .send(Event::Error(ApiError::model_not_found(name)));
                    return None;
                }
            },
        };
        let vocab = self.model.config().vocab_size;
        if req.prompt.is_empty() || req.prompt.iter().any(|&id| id as usize >= vocab) {
            let _ = req.events.send(Event::Error(ApiError::bad_param(
                "prompt",
                format!("the prompt must be 1 or more token ids below {vocab}"),
            )));
            self.release(slot);
            return None;
        }
        Some(slot)
    }

    /// Runs prompt positions `done..done + chunk` of a prefill group; with `last`, returns the
    /// logits of the last position of every row (`[rows, vocab]`).
    fn prefill_chunk(
        &mut self,
        p: &mut Prefill<B>,
        chunk: usize,
        last: bool,
    ) -> std::result::Result<Option<Vec<f32>>, String> {
        let n = p.group.len();
        let started = Instant::now();
        let slots: Vec<Option<usize>> = p.group.iter().map(|(_, slot)| *slot).collect();
        let ids: Vec<i64> = p
            .group
            .iter()
            .flat_map(|(r, _)| r.prompt[p.done..p.done + chunk].iter().map(|&i| i as i64))
            .collect();
        let (model, device, caches) = (&self.model, &self.device, &mut p.caches);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, chunk]), device);
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            let input = Input::new(tokens)
                .row_caches(&mut refs)
                .adapters_per_row(slots);
            if last {
                let out = model.forward(input.last_logits());
                read_floats(out.reshape([n, model.config().vocab_size])).map(Some)
            } else {
                // The hidden state of the last position only: no output projection.
                let _ = model.forward(input.last_hidden());
                Ok(None)
            }
        }));
        let result = result.unwrap_or_else(|panic| Err(hone_io::panic_message(&*panic)))?;
        let m = &self.shared.metrics;
        m.prefill_seconds.add(started.elapsed().as_secs_f64());
        m.prefill_steps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tokens = (n * chunk) as u64;
        m.prompt_tokens
            .fetch_add(tokens, std::sync::atomic::Ordering::Relaxed);
        m.prefill_tokens
            .fetch_add(tokens, std::sync::atomic::Ordering::Relaxed);
        Ok(result)
    }

    /// Samples the first token of every request of a finished prefill (`logits` `[rows,
    /// vocab]`) and moves them into the decoding batch.
    fn start_decoding(&mut self, p: Prefill<B>, mut logits: Vec<f32>) {
        let m = self.shared.metrics.clone();
        let vocab = self.model.config().vocab_size;
        for (i, ((req, slot), cache)) in p.group.into_iter().zip(p.caches).enumerate() {
            let mut seq = Sequence {
                text: TextStream::new(&req.prompt, &req.stop_strings),
                sampler: Sampler::new(req.sampling.clone()),
                history: req.prompt.clone(),
                cache,
                slot,
                generated: 0,
                next: 0,
                req,
            };
            if seq.req.events.is_closed() {
                self.retire(seq, Outcome::Cancelled);
                continue;
            }
            let row = &mut logits[i * vocab..(i + 1) * vocab];
            match seq.accept(row, &self.shared.tokenizer, &m) {
                Outcome::Continue => self.active.push(seq),
                done => self.retire(seq, done),
            }
        }
    }

    /// Ends every running request with an error (the model failed on their step).
    fn fail_batch(&mut self, message: &str) {
        tracing::error!(
            "decode step failed for {} requests: {message}",
            self.active.len()
        );
        for seq in std::mem::take(&mut self.active) {
            let _ = seq.req.events.send(Event::Error(ApiError::internal(format!(
                "the model failed during decoding: {message}"
            ))));
            self.retire(seq, Outcome::Finished);
        }
    }

    /// One token for every request in the batch.
    fn decode_step(&mut self) {
        let n = self.active.len();
        if n == 0 {
            return;
        }
        let started = Instant::now();
        let tokens: Vec<i64> = self.active.iter().map(|s| s.next as i64).collect();
        let adapters: Vec<Option<usize>> = self.active.iter().map(|s| s.slot).collect();
        let (model, device, active) = (&self.model, &self.device, &mut self.active);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut caches: Vec<&mut KvCache<B>> =
                active.iter_mut().map(|s| &mut s.cache).collect();
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [n, 1]), device);
            let out = model.forward(
                Input::new(input)
                    .row_caches(&mut caches)
                    .adapters_per_row(adapters)
                    .last_logits(),
            );
            read_floats(out.reshape([n, model.config().vocab_size]))
        }));
        let mut logits = match flatten(result) {
            Ok(logits) => logits,
            Err(message) => return self.fail_batch(&message),
        };
        let seconds = started.elapsed().as_secs_f64();
        let m = self.shared.metrics.clone();
        m.decode_step.observe(seconds);
        m.decode_seconds.add(seconds);
        m.decode_tokens
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let vocab = self.model.config().vocab_size;
        for (i, mut seq) in std::mem::take(&mut self.active).into_iter().enumerate() {
            let row = &mut logits[i * vocab..(i + 1) * vocab];
            match seq.accept(row, &self.shared.tokenizer, &m) {
                Outcome::Continue => self.active.push(seq),
                done => self.retire(seq, done),
            }
        }
    }
}
