//! The engine: one dedicated thread owns the model and runs the scheduler (the `worker` module);
//! the async HTTP side talks to it through [`Engine`], a cheap clonable handle. Requests go in
//! over a channel, each with its own unbounded event channel for the tokens coming back; a
//! request whose event receiver is gone (client disconnected) is dropped by the worker at the
//! next step. Admission is bounded: a [`Ticket`] is taken per request (running or queued) and
//! given back when the request ends, wherever that happens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hone_model::{FinishReason, SamplingConfig, Tokenizer};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Limits, ServeConfig};
use crate::error::{ApiError, Result, ServeError};
use crate::metrics::Metrics;

/// What the worker sends back for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it completed (possibly empty).
    Token { text: String },
    /// The end of generation.
    Done(Usage),
    /// The request failed.
    Error(ApiError),
}

/// Token counts and finish reason of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A generation request, ready for the worker.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Adapter name, or `None` for the base model.
    pub adapter: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
    pub ticket: Ticket,
    /// When the request arrived (time to first token and request latency count from here).
    pub received: Instant,
    /// When it was handed to the worker (after any retrieval; generation time counts from here).
    pub submitted: Instant,
}

/// Messages to the worker.
pub(crate) enum Command {
    Generate(Box<GenRequest>),
    LoadAdapter {
        name: String,
        path: PathBuf,
        reply: oneshot::Sender<std::result::Result<(), ApiError>>,
    },
    UnloadAdapter {
        name: String,
        reply: oneshot::Sender<std::result::Result<(), ApiError>>,
    },
}

/// A loaded adapter as the HTTP side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    pub path: PathBuf,
    /// Unix seconds when it was loaded.
    pub created: u64,
}

/// Facts about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub source: String,
}

/// A place among the running or queued requests; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// State shared by the handle and the worker.
pub(crate) struct Shared {
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    pub limits: Limits,
    pub adapters: RwLock<BTreeMap<String, AdapterEntry>>,
    pub metrics: Arc<Metrics>,
    pub alive: AtomicBool,
    pending: Arc<AtomicUsize>,
}

/// Handle to the model worker.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl Engine {
    /// Starts the worker thread and waits until the model and the configured adapters are
    /// loaded. Blocks: call it from a blocking context.
    pub fn start(config: &ServeConfig, metrics: Arc<Metrics>) -> Result<Engine> {
        let tokenizer_dir = match &config.model {
            crate::config::ModelSource::Dir(dir) => dir.clone(),
            crate::config::ModelSource::Random { tokenizer_dir, .. } => tokenizer_dir.clone(),
        };
        let tokenizer =
            Tokenizer::from_dir(&tokenizer_dir).map_err(|source| ServeError::Model {
                path: tokenizer_dir.clone(),
                source,
            })?;
        let (tx, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let setup = crate::worker::Setup {
            config: config.clone(),
            tokenizer,
            metrics,
            rx,
            ready: ready_tx.clone(),
        };
        let spec = config.device;
        std::thread::Builder::new()
            .name("hone-serve-model".into())
            .spawn(move || {
                if let Err(e) =
                    hone_model::run_on_this_thread(spec, crate::worker::WorkerTask(setup))
                {
                    let _ = ready_tx.send(Err(ServeError::ModelOp(e)));
                }
            })
            .map_err(|e| ServeError::Io {
                context: "starting the model thread".into(),
                source: e,
            })?;
        let shared = ready_rx
            .recv()
            .map_err(|_| ServeError::WorkerGone("the model thread ended while loading".into()))??;
        Ok(Engine { tx, shared })
    }

    /// Facts about the base model.
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The base model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Whether the worker thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Loaded adapters by name.
    pub fn adapters(&self) -> BTreeMap<String, AdapterEntry> {
        self.shared
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn has_adapter(&self, name: &str) -> bool {
        self.shared
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Requests running or queued, at most.
    pub fn capacity(&self) -> usize {
        self.shared.limits.max_batch + self.shared.limits.max_queue
    }

    /// A place for one more request, or `None` when running + queued requests fill the capacity.
    pub fn try_admit(&self) -> Option<Ticket> {
        let cap = self.capacity();
        let pending = &self.shared.pending;
        pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Ticket(pending.clone()))
    }

    /// Hands a request to the worker.
    pub fn submit(&self, request: GenRequest) -> std::result::Result<(), ApiError> {
        self.tx
            .send(Command::Generate(Box::new(request)))
            .map_err(|_| ApiError::unavailable("the model worker is not running"))
    }

    /// Loads a PEFT adapter under `name` (a no-op when the same path is loaded under it).
    pub async fn load_adapter(
        &self,
        name: String,
        path: PathBuf,
    ) -> std::result::Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::LoadAdapter { name, path, reply })
            .map_err(|_| ApiError::unavailable("the model worker is not running"))?;
        rx.await
            .map_err(|_| ApiError::unavailable("the model worker stopped"))?
    }

    /// Unloads adapter `name`; running requests that use it finish first.
    pub async fn unload_adapter(&self, name: String) -> std::result::Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::UnloadAdapter { name, reply })
            .map_err(|_| ApiError::unavailable("the model worker is not running"))?;
        rx.await
            .map_err(|_| ApiError::unavailable("the model worker stopped"))?
    }
}

impl Shared {
    pub(crate) fn new(
        tokenizer: Tokenizer,
        info: ModelInfo,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tokenizer,
            info,
            limits,
            adapters: RwLock::default(),
            metrics,
            alive: AtomicBool::new(true),
            pending: Arc::new(AtomicUsize::new(0)),
        }
    }
}
