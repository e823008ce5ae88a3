//! The model worker: one thread owns the model, every request's KV cache and the adapter bank,
//! and runs continuous batching (as in Orca / vLLM, at token granularity).
//!
//! Each iteration: take new commands; drop requests whose client went away; admit waiting
//! requests while the batch has room (requests whose prompts have the same length are prefilled
//! together, a row each); then one forward pass for everything that runs: a token for every
//! decoding request and the next chunk of the waiting prompts (at most `limits.prefill_chunk`
//! prompt tokens while requests decode, so that a long prompt does not stall their streams;
//! whole prompts when nothing else runs). The rows of a step have different numbers of tokens,
//! each row its own cache and adapter slot ([`hone_model::Cache::Ragged`],
//! [`hone_model::Adapters::PerRow`]): decoding rows ride on the prompt chunk's products instead
//! of a pass of their own. A request whose prompt is done samples its first token and joins
//! the decoding rows from the next step. A request joins or leaves the batch between steps.
//! Rows never interact, so greedy output does not depend on
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
                self.step();
                self.publish_gauges();
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
            let layers = self.model.config().num_layers;
            let caches = group
                .iter()
                .map(|(req, _)| KvCache::for_generation(layers, len, req.max_tokens))
                .collect();
            self.prefilling.push_back(Prefill {
                group,
                caches,
                done: 0,
            });
        }
    }

    /// One forward pass for the batch: a token for every decoding request and, in the same
    /// pass, the next chunk of the waiting prompts (`limits.prefill_chunk` tokens while requests
    /// are decoding: the most a running stream waits for a newcomer's prompt beyond its own
    /// token; whole prompts, up to [`MAX_PREFILL_TOKENS`], when nothing decodes). The rows
    /// have different numbers of tokens and each its own cache and adapter
    /// ([`hone_model::Cache::Ragged`]), so the decoding rows ride on the prompt chunk's
    /// products instead of a pass of their own. Requests whose prompts are done sample their
    /// first token and join the decoding batch for the next step.
    fn step(&mut self) {
        let mut chunks = self.plan_prefill();
        let decoding = self.active.len();
        if decoding == 0 && chunks.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut ids: Vec<i64> = self.active.iter().map(|s| s.next as i64).collect();
        let mut lens = vec![1; decoding];
        let mut slots: Vec<Option<usize>> = self.active.iter().map(|s| s.slot).collect();
        // Rows whose logits are needed: every decoding row, and the rows of prompts that end in
        // this step.
        let mut wanted: Vec<i64> = (0..decoding as i64).collect();
        let mut prompt_tokens = 0;
        for (p, chunk) in &chunks {
            let last = p.done + chunk == p.group[0].0.prompt.len();
            for (req, slot) in &p.group {
                if last {
                    wanted.push(lens.len() as i64);
                }
                ids.extend(req.prompt[p.done..p.done + chunk].iter().map(|&t| t as i64));
                lens.push(*chunk);
                slots.push(*slot);
                prompt_tokens += chunk;
            }
        }
        let (model, device) = (&self.model, &self.device);
        let mut caches: Vec<&mut KvCache<B>> =
            self.active.iter_mut().map(|s| &mut s.cache).collect();
        caches.extend(chunks.iter_mut().flat_map(|(p, _)| p.caches.iter_mut()));
        let tokens = ids.len();
        let wanted_rows = wanted.len();
        let result = flatten(catch_unwind(AssertUnwindSafe(|| {
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens]), device);
            let hidden = model.forward(
                Input::new(input)
                    .ragged_caches(&mut caches, lens)
                    .adapters_per_row(slots)
                    .last_hidden(),
            );
            // The output projection for the rows that sample only.
            let [rows, _, width] = hidden.dims();
            let hidden = if wanted.len() == rows {
                hidden
            } else {
                let n = wanted.len();
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(wanted, [n]), device);
                hidden.select(0, idx)
            };
            let n = hidden.dims()[0];
            let logits = model.logits(hidden.reshape([n, 1, width]));
            read_floats(logits.reshape([n, model.config().vocab_size]))
        })));
        let mut logits = match result {
            Ok(logits) => logits,
            Err(message) => {
                self.fail_prefills(chunks, &message);
                return self.fail_batch(&message);
            }
        };
        // The step's time, shared between decoding and prefill by their tokens.
        let seconds = started.elapsed().as_secs_f64();
        let m = self.shared.metrics.clone();
        let decode_share = seconds * decoding as f64 / tokens as f64;
        tracing::debug!(
            target: "hone_serve::step",
            decoding,
            prompt_tokens,
            sampled = wanted_rows,
            ms = seconds * 1e3,
            "step"
        );
        if decoding > 0 {
            m.decode_step.observe(seconds);
            m.decode_seconds.add(decode_share);
            m.decode_tokens
                .fetch_add(decoding as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if prompt_tokens > 0 {
            m.prefill_seconds.add(seconds - decode_share);
            m.prefill_steps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = prompt_tokens as u64;
            m.prompt_tokens
                .fetch_add(t, std::sync::atomic::Ordering::Relaxed);
            m.prefill_tokens
                .fetch_add(t, std::sync::atomic::Ordering::Relaxed);
        }
        let vocab = self.model.config().vocab_size;
        for (i, mut seq) in std::mem::take(&mut self.active).into_iter().enumerate() {
            let row = &mut logits[i * vocab..(i + 1) * vocab];
            match seq.accept(row, &self.shared.tokenizer, &m) {
                Outcome::Continue => self.active.push(seq),
                done => self.retire(seq, done),
            }
        }
        let mut next = decoding * vocab;
        let mut unfinished = Vec::new();
        for (mut p, chunk) in chunks {
            if p.done + chunk == p.group[0].0.prompt.len() {
                let rows = p.group.len() * vocab;
                self.start_decoding(p, logits[next..next + rows].to_vec());
                next += rows;
            } else {
                p.done += chunk;
                unfinished.push(p);
            }
        }
        for p in unfinished.into_iter().rev() {
            self.prefilling.push_front(p);
        }
    }

    /// Takes the prompt chunks of the next step off the prefill queue: `(group, tokens per
    /// row)`, `limits.prefill_chunk` tokens in all while requests decode (at least one token of
    /// one group); whole prompts when nothing decodes (the first group's whatever its length,
    /// then those that fit in [`MAX_PREFILL_TOKENS`]).
    fn plan_prefill(&mut self) -> Vec<(Prefill<B>, usize)> {
        let mut planned = Vec::new();
        if self.active.is_empty() {
            let mut budget = MAX_PREFILL_TOKENS;
            while let Some(p) = self.prefilling.pop_front() {
                let left = p.group[0].0.prompt.len() - p.done;
                let tokens = p.group.len() * left;
                if !planned.is_empty() && tokens > budget {
                    self.prefilling.push_front(p);
                    break;
                }
                budget = budget.saturating_sub(tokens);
                planned.push((p, left));
            }
            return planned;
        }
        let mut budget = self.shared.limits.prefill_chunk;
        while budget > 0 {
            let Some(p) = self.prefilling.pop_front() else {
                break;
            };
            let (n, left) = (p.group.len(), p.group[0].0.prompt.len() - p.done);
            let chunk = left.min((budget / n).max(1));
            budget = budget.saturating_sub(n * chunk);
            planned.push((p, chunk));
        }
        planned
    }

    /// Ends the requests of prefill groups with an error (the model failed on their step).
    fn fail_prefills(&mut self, chunks: Vec<(Prefill<B>, usize)>, message: &str) {
        for (p, _) in chunks {
            tracing::error!("prefill failed for {} requests: {message}", p.group.len());
            for (req, slot) in p.group {
                let _ = req.events.send(Event::Error(ApiError::internal(format!(
                    "the model failed on this request: {message}"
                ))));
                self.release(slot);
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
}
