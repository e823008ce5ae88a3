//! Data-parallel training over several devices of one machine (`train.devices`), with
//! burn's collective engine (`burn-collective`): one peer per device, each a thread holding its
//! own copy of the model and of the optimizer.
//!
//! Every step, rank 0 (the trainer's thread) hands each peer its share of the step's
//! micro-batches ([`shares`]). Each peer computes the *unnormalised* gradients of its share
//! ([`gradient_sums`]) and all peers exchange them in one all-reduce of one flat tensor:
//!
//! ```text
//! row_k = [ grad sums of every adapter, flattened | NLL sum | targets hi, lo | tokens hi, lo ]
//! peer k sends [n, len] zeros with row k = row_k; all-reduce (Sum) gives every row
//! every peer adds the rows in rank order, divides by the step's total target count
//! ```
//!
//! So the loss stays transformers' `num_items_in_batch` normalisation over the whole global
//! step (peers with unequal target counts weigh exactly as their tokens), and adding the rows
//! in rank order, rather than letting the collective sum them in whatever order it visits its
//! peers, makes the result bit-identical on every peer and from run to run. The counts travel
//! as two f32 halves (`c >> 12`, `c & 4095`) so that they stay exact. Every peer then applies
//! the identical clipping and AdamW update ([`apply_update`]) to its own copy. The price of
//! the stacked layout is `n` times the traffic of a plain sum, small for adapter gradients.
//!
//! A run with `n` devices and micro-batch `m`, accumulation `g` visits `m · g · n` rows per step
//! and computes what one device computes with accumulation `g · n`; with `g = 1` the
//! micro-batches, the sums and their order are those of one device with accumulation `n`,
//! so the two agree bit for bit.
//!
//! Dropout draws from the backend's one global generator. With dropout on, peers take turns
//! for [seed, forward pass] of each micro-batch (the backward passes still overlap), so the
//! masks depend only on `(seed, step, micro-batch)` as on one device.
//!
//! Failures do not hang: a peer that returns an error or panics is recorded, and a watchdog
//! thread then resets the collective (dropping the pending all-reduce, so that the peers
//! waiting in it return an error); a peer that waits longer than the timeout in an all-reduce
//! is treated the same way. The error names the peer and the step. (Registration, when the
//! session starts, cannot be interrupted through burn-collective's API; the peers register
//! first thing in their threads, and only once every thread exists.)
//!
//! Multi-node ([`MultiNode`], `distributed.nodes > 1`): every node (a process) runs its local peers
//! as above, and global peer rank = `node_rank · local peers + local rank`. Every node reads the
//! same data order and takes its global peers' shares ([`node_shares`]). The peers of every node
//! exchange their rows through hone's orchestrator ([`relay`]: each sends its row of the step and
//! gets every row back in rank order), then add them in rank order as above, so every peer of
//! every node computes what one device computes with accumulation `g · total peers`. burn's
//! collective is not used across nodes: its global all-reduce hangs in burn 0.21 (see
//! [`relay`]). A peer waits for the orchestrator's answer at most the timeout; a failed peer
//! makes the watchdog cut the other local peers' connections, so that they return at once.

mod relay;

use std::any::Any;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId,
    ReduceOperation,
};
use hone_model::AutodiffKernelBackend;
use hone_model::{run_on, BackendTask, CausalLm, DeviceSpec};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::step::{
    apply_update, gradient_sums, no_targets, read_f64s, GradientSums, Learner, MicroBatch,
    StepEngine, StepGradients, StepOutcome,
};

/// One collective session per process: burn-collective keeps one local server per backend.
static SESSION: Mutex<()> = Mutex::new(());
/// Turns for [seed, forward] when dropout draws from the backend's global generator.
static FORWARD_TURN: Mutex<()> = Mutex::new(());

/// How often the watchdog looks at the peers.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// Counts travel as two f32 values `(c >> COUNT_SHIFT, c & COUNT_MASK)`, exact below 2^36.
const COUNT_SHIFT: u32 = 12;
const COUNT_MASK: usize = (1 << COUNT_SHIFT) - 1;
/// Values after the gradients in a peer's row: NLL sum, targets (2), tokens (2), step (2:
/// peers at different steps, e.g. a node resumed from another checkpoint, are an error).
const TAIL: usize = 7;

/// The global peer ranks of node `node_rank` when `nodes` nodes run `local` peers each.
pub fn node_ranks(nodes: usize, node_rank: usize, local: usize) -> Range<usize> {
    debug_assert!(node_rank < nodes);
    node_rank * local..(node_rank + 1) * local
}

/// The micro-batches of a step of `len` that the local peers of node `node_rank` compute (one
/// range per local peer): the shares of their global ranks among `nodes · local` peers.
pub fn node_shares(len: usize, nodes: usize, node_rank: usize, local: usize) -> Vec<Range<usize>> {
    shares(len, nodes * local)[node_ranks(nodes, node_rank, local)].to_vec()
}

/// Where this process sits in a multi-node session (`distributed.nodes > 1`), as resolved by
/// the run config ([`RunConfig::multinode`](crate::RunConfig::multinode)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiNode {
    /// Number of nodes (processes), each with the same number of local peers.
    pub nodes: usize,
    /// This node's rank, `0..nodes`.
    pub node_rank: usize,
    /// The orchestrator every node's peers exchange their rows through, `host:port`.
    pub orchestrator: String,
}

/// Runs the orchestrator of multi-node training on `port` (every interface) until the process
/// is interrupted: `distributed.orchestrator = "tcp://HOST:port"` on every node.
pub fn run_orchestrator(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| TrainError::Parallel {
        message: format!("the orchestrator cannot listen on port {port}: {e}"),
    })?;
    serve_orchestrator(listener)
}

/// [`run_orchestrator`] on a listener of the caller's (tests bind port 0 on the loopback).
pub fn serve_orchestrator(listener: TcpListener) -> Result<()> {
    relay::serve(listener).map_err(|e| TrainError::Parallel {
        message: format!("the orchestrator stopped: {e}"),
    })
}

/// The micro-batches of a step that peer `k` of `n` computes: contiguous blocks, in order,
/// as equal as possible (the first `len % n` peers take one more). Peer `k` of a full step of
/// `g · n` micro-batches takes micro-batches `k·g .. (k+1)·g`; a short last step may leave a
/// peer none.
pub fn shares(len: usize, n: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut start = 0;
    (0..n)
        .map(|k| {
            let size = base + usize::from(k < extra);
            let range = start..start + size;
            start += size;
            range
        })
        .collect()
}

/// The device `spec` names, on backend `B` (an error when `spec` needs another backend, e.g.
/// `cuda:1` in a run whose first device is `cpu`).
pub fn device_for<B: Backend>(spec: DeviceSpec) -> Result<B::Device> {
    struct DeviceOf;
    impl BackendTask for DeviceOf {
        type Output = Box<dyn Any + Send>;
        fn run<C: Backend>(self, device: C::Device) -> Self::Output {
            Box::new(device)
        }
    }
    run_on(spec, DeviceOf)?
        .downcast::<B::Device>()
        .map(|d| *d)
        .map_err(|_| TrainError::Parallel {
            message: format!("device {spec} is not on the backend of the run's first device"),
        })
}

/// Settings of a data-parallel session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParallelConfig {
    /// Clip the global gradient norm to this (0: off), as [`apply_update`].
    pub max_grad_norm: f64,
    /// The longest a peer waits for the others in one all-reduce.
    pub timeout: Duration,
}

/// What rank 0 sends a peer thread.
enum Message {
    /// Register with the collective (sent once every peer thread exists).
    Register,
    Step(Job),
}

/// One step's work for one peer.
struct Job {
    step: usize,
    batches: Vec<MicroBatch>,
    /// Seed of the backend's generator before each micro-batch.
    seeds: Option<Vec<u64>>,
    /// The learning rate of the update; `None`: gradients only.
    lr: Option<f64>,
}

/// What the peers, rank 0 and the watchdog share.
struct Session {
    /// Local peers.
    n: usize,
    /// Peers of every node, and the global rank of local rank 0.
    total: usize,
    offset: usize,
    multinode: Option<MultiNode>,
    config: ParallelConfig,
    /// Dropout is on: [seed, forward] of a micro-batch takes [`FORWARD_TURN`].
    serial_forward: bool,
    /// Each peer's device, for messages.
    names: Vec<String>,
    /// The first failure, as reported to the user.
    failure: Mutex<Option<String>>,
    /// Per peer: the step whose all-reduce it waits in, and since when.
    waiting: Mutex<Vec<Option<(usize, Instant)>>>,
    /// The collective was reset: peers do not unregister.
    aborted: AtomicBool,
    /// The session is over: the watchdog exits.
    closed: AtomicBool,
    /// Multi-node: each peer's connection to the orchestrator while it waits there, so that
    /// an abort can cut it.
    links: Mutex<Vec<Option<TcpStream>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Session {
    fn peer(&self, rank: usize) -> String {
        format!("peer {} ({})", self.offset + rank, self.names[rank])
    }

    /// Records `message` unless a failure is known already.
    fn fail(&self, message: String) {
        lock(&self.failure).get_or_insert(message);
    }

    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// The failure of a peer, else `fallback`.
    fn error(&self, fallback: impl Into<String>) -> TrainError {
        TrainError::Parallel {
            message: self.failure().unwrap_or_else(|| fallback.into()),
        }
    }

    /// Drops every pending exchange: burn's collective is reset (the peers waiting in its
    /// all-reduce get an error), the connections to the orchestrator are cut.
    fn abort<B: Backend>(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if self.multinode.is_none() {
            reset_collective::<B>();
        }
        for link in lock(&self.links).iter().flatten() {
            let _ = link.shutdown(Shutdown::Both);
        }
    }

    fn set_waiting(&self, rank: usize, step: Option<usize>) {
        lock(&self.waiting)[rank] = step.map(|s| (s, Instant::now()));
    }

    /// The timeout message when a peer has waited longer than the timeout.
    fn overdue(&self) -> Option<String> {
        let timeout = self.config.timeout;
        let waiting = lock(&self.waiting);
        let (rank, step, since) = waiting
            .iter()
            .enumerate()
            .filter_map(|(k, w)| w.map(|(step, since)| (k, step, since)))
            .find(|(_, _, since)| since.elapsed() > timeout)?;
        let absent: Vec<String> = (0..self.n)
            .filter(|&k| waiting[k].is_none())
            .map(|k| self.peer(k))
            .collect();
        Some(format!(
            "{} waited {:.0} s in the all-reduce of step {} (train.collective_timeout_secs = \
             {}) for {}",
            self.peer(rank),
            since.elapsed().as_secs_f64(),
            step + 1,
            timeout.as_secs(),
            if absent.is_empty() && self.multinode.is_some() {
                "the other nodes".to_string()
            } else if absent.is_empty() {
                "nobody: the collective itself stalled".to_string()
            } else {
                absent.join(", ")
            }
        ))
    }
}

/// Whether any adapter draws dropout masks.
fn uses_dropout<B: Backend>(model: &CausalLm<B>) -> bool {
    model.adapters().into_iter().any(|(_, l)| l.dropout > 0.0)
}

/// Packs `count` as two exact f32 halves.
fn count_halves(count: usize) -> [f32; 2] {
    [(count >> COUNT_SHIFT) as f32, (count & COUNT_MASK) as f32]
}

fn from_halves(hi: f64, lo: f64) -> usize {
    ((hi as usize) << COUNT_SHIFT) + lo as usize
}

/// Every local peer's row (`n` peers, rows of `len`) through burn's all-reduce: peer `rank`
/// sends `n` rows of zeros but its own (see the module doc).
fn local_all_reduce<B: Backend>(
    rank: usize,
    n: usize,
    len: usize,
    row: Tensor<B, 1>,
) -> std::result::Result<Tensor<B, 1>, String> {
    let device = row.device();
    let mut blocks = Vec::with_capacity(3);
    if rank > 0 {
        blocks.push(Tensor::zeros([rank * len], &device));
    }
    blocks.push(row);
    if rank + 1 < n {
        blocks.push(Tensor::zeros([(n - 1 - rank) * len], &device));
    }
    let stacked = Tensor::cat(blocks, 0).into_primitive().tensor();
    all_reduce::<B>(PeerId::from(rank), stacked, ReduceOperation::Sum)
        .map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
        .map_err(|e| format!("{e:?}"))
}

/// A row's values on the host.
fn read_f32s<B: Backend>(row: Tensor<B, 1>) -> std::result::Result<Vec<f32>, String> {
    row.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("cannot read the step's row: {e:?}"))
}

/// Sums the peers' gradient sums (the all-reduce of one flat tensor, see the module doc) and
/// divides them by the step's target count.
fn reduce<B: Backend>(
    rank: usize,
    step: usize,
    sums: GradientSums<B>,
    device: &B::Device,
    session: &Session,
) -> Result<StepGradients<B>> {
    let (n, global) = (session.total, session.offset + rank);
    let shapes: Vec<[usize; 2]> = sums.grads.iter().map(|g| g.dims()).collect();
    let width: usize = shapes.iter().map(|[r, c]| r * c).sum();
    let len = width + TAIL;
    let mut row: Vec<Tensor<B, 1>> = sums
        .grads
        .into_iter()
        .map(|g| {
            let [r, c] = g.dims();
            g.reshape([r * c])
        })
        .collect();
    let [t_hi, t_lo] = count_halves(sums.targets);
    let [k_hi, k_lo] = count_halves(sums.tokens);
    let [s_hi, s_lo] = count_halves(step);
    row.push(sums.nll);
    row.push(Tensor::from_data(
        TensorData::new(vec![t_hi, t_lo, k_hi, k_lo, s_hi, s_lo], [6]),
        device,
    ));
    let row = Tensor::cat(row, 0);
    session.set_waiting(rank, Some(step));
    let reduced = match &session.multinode {
        None => local_all_reduce(global, n, len, row),
        Some(node) => read_f32s(row).and_then(|row| {
            let rows = relay::all_gather(
                &node.orchestrator,
                step,
                global,
                n,
                &row,
                session.config.timeout,
                |link| {
                    lock(&session.links)[rank] = link.try_clone().ok();
                    // An abort that came before the link was filed (see Session::abort).
                    if session.aborted.load(Ordering::SeqCst) {
                        let _ = link.shutdown(Shutdown::Both);
                    }
                },
            );
            lock(&session.links)[rank] = None;
            rows.map(|rows| Tensor::from_data(TensorData::new(rows, [n * len]), device))
        }),
    };
    session.set_waiting(rank, None);
    let reduced = reduced.map_err(|e| {
        session.error(format!(
            "{}: the all-reduce of step {} failed: {e}",
            session.peer(rank),
            step + 1
        ))
    })?;
    let rows = reduced.reshape([n, len]);

    let tails = read_f64s(
        rows.clone().slice([0..n, width..len]).reshape([n * TAIL]),
        "the step's loss and counts",
    )?;
    let (mut nll, mut targets, mut tokens) = (0.0, 0, 0);
    for (k, tail) in tails.chunks(TAIL).enumerate() {
        let at = from_halves(tail[5], tail[6]);
        if at != step {
            return Err(session.error(format!(
                "peer {k} is at step {} while {} is at step {}: every node must start from the \
                 same checkpoint",
                at + 1,
                session.peer(rank),
                step + 1
            )));
        }
        nll += tail[0];
        targets += from_halves(tail[1], tail[2]);
        tokens += from_halves(tail[3], tail[4]);
    }
    if targets == 0 {
        return Err(no_targets());
    }
    let mut total = rows.clone().slice([0..1, 0..width]);
    for k in 1..n {
        total = total + rows.clone().slice([k..k + 1, 0..width]);
    }
    let scale = 1.0 / targets as f64;
    let flat = total.reshape([width]) * scale;
    let mut offset = 0;
    let grads = shapes
        .into_iter()
        .map(|[r, c]| {
            let g = flat.clone().slice(offset..offset + r * c).reshape([r, c]);
            offset += r * c;
            g
        })
        .collect();
    Ok(StepGradients {
        grads,
        loss: nll * scale,
        targets,
        tokens,
    })
}

/// The step's gradients as one peer sees them: those of its share, all-reduced.
fn peer_gradients<B: AutodiffKernelBackend>(
    rank: usize,
    model: &CausalLm<B>,
    device: &B::Device,
    job: &Job,
    session: &Session,
) -> Result<StepGradients<B::InnerBackend>> {
    let sums = gradient_sums(model, &job.batches, device, |i| {
        let turn = session.serial_forward.then(|| lock(&FORWARD_TURN));
        if let Some(seeds) = &job.seeds {
            B::seed(device, seeds[i]);
        }
        turn
    });
    reduce(rank, job.step, sums, device, session)
}

/// One step of one peer: the all-reduced gradients and, unless the job asks for gradients
/// only, the update of the peer's copy of the model.
fn peer_step<B: AutodiffKernelBackend>(
    rank: usize,
    model: &mut CausalLm<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    device: &B::Device,
    job: &Job,
    session: &Session,
) -> Result<()> {
    let grads = peer_gradients(rank, model, device, job, session)?;
    if let Some(lr) = job.lr {
        apply_update(model, optimizer, grads, lr, session.config.max_grad_norm)?;
    }
    Ok(())
}

/// The optimizer state on `device`.
fn optimizer_on<B: Backend>(optimizer: &AdamW<B>, device: &B::Device) -> AdamW<B> {
    let mut out = optimizer.clone();
    for m in out.moments.iter_mut().flatten() {
        m.m = m.m.clone().to_device(device);
        m.v = m.v.clone().to_device(device);
    }
    out
}

/// A peer thread (ranks 1..): registers when told, then runs the steps it receives until rank
/// 0 closes the channel; a failure is recorded for the watchdog and ends the thread.
fn peer_main<B: AutodiffKernelBackend>(
    rank: usize,
    mut model: CausalLm<B>,
    mut optimizer: AdamW<B::InnerBackend>,
    device: B::Device,
    messages: Receiver<Message>,
    session: Arc<Session>,
) {
    // Multi-node peers exchange their rows through the orchestrator instead.
    if session.multinode.is_none() {
        if !matches!(messages.recv(), Ok(Message::Register)) {
            return;
        }
        let collective = CollectiveConfig::default().with_num_devices(session.n);
        if let Err(e) = register::<B::InnerBackend>(PeerId::from(rank), device.clone(), collective)
        {
            session.fail(format!("{}: cannot register: {e:?}", session.peer(rank)));
            return;
        }
    }
    while let Ok(Message::Step(job)) = messages.recv() {
        let result = catch_unwind(AssertUnwindSafe(|| {
            peer_step(rank, &mut model, &mut optimizer, &device, &job, &session)
        }));
        let message = match result {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(payload) => format!("panicked: {}", hone_io::panic_message(payload.as_ref())),
        };
        session.fail(format!(
            "{} at step {}: {message}",
            session.peer(rank),
            job.step + 1
        ));
        return;
    }
    if !session.aborted.load(Ordering::SeqCst) && session.multinode.is_none() {
        if let Err(e) = finish_collective::<B::InnerBackend>(PeerId::from(rank)) {
            session.fail(format!(
                "{}: cannot leave the collective: {e:?}",
                session.peer(rank)
            ));
        }
    }
}

/// The watchdog: after a failure or a timeout it resets the collective, which drops the
/// pending all-reduce so that no peer stays blocked in it.
fn watch<B: Backend>(session: Arc<Session>) {
    while !session.closed.load(Ordering::SeqCst) {
        std::thread::sleep(WATCH_INTERVAL);
        if session.failure().is_none() {
            match session.overdue() {
                Some(message) => session.fail(message),
                None => continue,
            }
        }
        session.abort::<B>();
        return;
    }
}

/// Peers 1.. of a data-parallel session, driven by rank 0: the caller, who keeps its own model
/// and optimizer and passes them to [`DataParallel::step`]. Dropping a session in the middle of
/// a step (an error, a panic) aborts it without waiting for the collective.
pub struct DataParallel<B: AutodiffKernelBackend> {
    session: Arc<Session>,
    senders: Vec<SyncSender<Message>>,
    workers: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    device: B::Device,
    /// Rank 0 is between sending a step's jobs and the end of its update.
    in_step: bool,
    closed: bool,
    _exclusive: MutexGuard<'static, ()>,
}

impl<B: AutodiffKernelBackend> DataParallel<B> {
    /// Starts peers on `devices[1..]` with copies of `model` and `optimizer` (rank 0, on
    /// `devices[0]`, is the caller's) and registers all of them with the collective. The model
    /// is materialised first: a lazily initialised parameter would be drawn anew by each copy.
    pub fn start(
        model: &mut CausalLm<B>,
        optimizer: &AdamW<B::InnerBackend>,
        devices: &[B::Device],
        config: ParallelConfig,
    ) -> Result<Self> {
        Self::start_on_nodes(model, optimizer, devices, config, None)
    }

    /// [`DataParallel::start`] for this node of a multi-node session (`multinode`; `None`:
    /// this machine alone). `devices` are this node's: one is enough when there are several
    /// nodes. Every node must start one with the same `devices.len()`.
    pub fn start_on_nodes(
        model: &mut CausalLm<B>,
        optimizer: &AdamW<B::InnerBackend>,
        devices: &[B::Device],
        config: ParallelConfig,
        multinode: Option<MultiNode>,
    ) -> Result<Self> {
        let n = devices.len();
        let nodes = multinode.as_ref().map_or(1, |m| m.nodes);
        if let Some(m) = multinode.as_ref().filter(|m| m.node_rank >= m.nodes) {
            return Err(TrainError::Parallel {
                message: format!("node rank {} of {} nodes", m.node_rank, m.nodes),
            });
        }
        if n == 0 || n * nodes < 2 {
            return Err(TrainError::Parallel {
                message: format!("data-parallel training needs 2 devices or more, found {n}"),
            });
        }
        let exclusive = lock(&SESSION);
        *model = model.clone().fork(&devices[0]);
        let offset = multinode.as_ref().map_or(0, |m| m.node_rank * n);
        let session = Arc::new(Session {
            n,
            total: n * nodes,
            offset,
            multinode,
            config,
            serial_forward: uses_dropout(model),
            names: devices.iter().map(|d| format!("{d:?}")).collect(),
            failure: Mutex::new(None),
            waiting: Mutex::new(vec![None; n]),
            aborted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            links: Mutex::new((0..n).map(|_| None).collect()),
        });
        let mut this = Self {
            session: session.clone(),
            senders: Vec::new(),
            workers: Vec::new(),
            watchdog: None,
            device: devices[0].clone(),
            in_step: false,
            closed: false,
            _exclusive: exclusive,
        };
        let spawn_error = |e: std::io::Error| TrainError::Parallel {
            message: format!("cannot start a peer thread: {e}"),
        };
        for (rank, device) in devices.iter().enumerate().skip(1) {
            let (copy, opt, device) = (
                model.clone().fork(device),
                optimizer_on(optimizer, device),
                device.clone(),
            );
            let (tx, rx) = sync_channel(1);
            let session = session.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hone-peer-{rank}"))
                .spawn(move || peer_main(rank, copy, opt, device, rx, session))
                .map_err(spawn_error)?;
            this.senders.push(tx);
            this.workers.push(handle);
        }
        let watched = session.clone();
        this.watchdog = Some(
            std::thread::Builder::new()
                .name("hone-peer-watchdog".into())
                .spawn(move || watch::<B::InnerBackend>(watched))
                .map_err(spawn_error)?,
        );
        if session.multinode.is_some() {
            return Ok(this);
        }
        // Every thread exists: only now may any peer register (registration waits for all).
        for tx in &this.senders {
            tx.send(Message::Register)
                .map_err(|_| session.error("a peer thread ended before registering"))?;
        }
        let collective = CollectiveConfig::default().with_num_devices(n);
        register::<B::InnerBackend>(PeerId::from(0usize), devices[0].clone(), collective)
            .map_err(|e| session.error(format!("{}: cannot register: {e:?}", session.peer(0))))?;
        Ok(this)
    }

    /// One step over all peers: peer `k` computes micro-batches `shares(batches.len(), n)[k]`
    /// (seeding the backend's generator with `seeds[i]` before micro-batch `i` when given),
    /// then every peer applies the same update at `lr`; `model` and `optimizer` are rank 0's.
    pub fn step(
        &mut self,
        model: &mut CausalLm<B>,
        optimizer: &mut AdamW<B::InnerBackend>,
        step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
        lr: f64,
    ) -> Result<StepOutcome> {
        let job = self.dispatch(step, batches, seeds, Some(lr))?;
        let outcome = peer_gradients(0, model, &self.device, &job, &self.session)
            .and_then(|grads| {
                apply_update(
                    model,
                    optimizer,
                    grads,
                    lr,
                    self.session.config.max_grad_norm,
                )
            })
            .map_err(|e| self.cause(e))?;
        self.in_step = false;
        Ok(outcome)
    }

    /// The all-reduced, normalised gradients of a step as [`DataParallel::step`] computes
    /// them, without an update (every peer's model stays as it is).
    pub fn gradients(
        &mut self,
        model: &CausalLm<B>,
        step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
    ) -> Result<StepGradients<B::InnerBackend>> {
        let job = self.dispatch(step, batches, seeds, None)?;
        let grads = peer_gradients(0, model, &self.device, &job, &self.session)
            .map_err(|e| self.cause(e))?;
        self.in_step = false;
        Ok(grads)
    }

    /// Sends peers 1.. their jobs; returns rank 0's.
    fn dispatch(
        &mut self,
        step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
        lr: Option<f64>,
    ) -> Result<Job> {
        if self.closed {
            return Err(self.session.error("the data-parallel session is closed"));
        }
        if seeds.is_some_and(|s| s.len() != batches.len()) {
            return Err(TrainError::Parallel {
                message: "one seed per micro-batch is needed".into(),
            });
        }
        self.in_step = true;
        let (n, nodes) = (self.session.n, self.session.total / self.session.n);
        let ranges = node_shares(batches.len(), nodes, self.session.offset / n, n);
        let job = |range: &Range<usize>| Job {
            step,
            batches: batches[range.clone()].to_vec(),
            seeds: seeds.map(|s| s[range.clone()].to_vec()),
            lr,
        };
        for (tx, range) in self.senders.iter().zip(&ranges[1..]) {
            tx.send(Message::Step(job(range)))
                .map_err(|_| self.session.error("a peer thread ended"))?;
        }
        Ok(job(&ranges[0]))
    }

    /// Rank 0's error, or the peer failure that cut rank 0 off (the reset makes its
    /// all-reduce fail).
    fn cause(&self, e: TrainError) -> TrainError {
        match (&e, self.session.failure()) {
            (TrainError::Parallel { .. }, Some(message)) => TrainError::Parallel { message },
            _ => e,
        }
    }

    /// Ends the session: every peer leaves the collective and its thread is joined. An error
    /// when a peer failed.
    pub fn finish(mut self) -> Result<()> {
        self.close(false);
        match self.session.failure() {
            Some(message) => Err(TrainError::Parallel { message }),
            None => Ok(()),
        }
    }

    fn close(&mut self, abort: bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        let abort = abort || self.session.failure().is_some();
        if abort {
            self.session.abort::<B::InnerBackend>();
        }
        // Closing the channels ends the peers' loops.
        self.senders.clear();
        if !abort && self.session.multinode.is_none() {
            if let Err(e) = finish_collective::<B::InnerBackend>(PeerId::from(0usize)) {
                let peer = self.session.peer(0);
                self.session
                    .fail(format!("{peer}: cannot leave the collective: {e:?}"));
            }
        }
        for handle in self.workers.drain(..) {
            if let Err(payload) = handle.join() {
                self.session.fail(format!(
                    "a peer thread panicked: {}",
                    hone_io::panic_message(payload.as_ref())
                ));
            }
        }
        self.session.closed.store(true, Ordering::SeqCst);
        if let Some(handle) = self.watchdog.take() {
            let _ = handle.join();
        }
    }
}

/// The trainer's engine over several devices and nodes: [`DataParallel::step`] on the
/// learner's model and optimizer (rank 0's).
impl<B: AutodiffKernelBackend> StepEngine<B> for DataParallel<B> {
    fn step(
        &mut self,
        learner: &mut Learner<B>,
        step: usize,
        batches: &[MicroBatch],
        seeds: Option<&[u64]>,
        lr: f64,
    ) -> Result<StepOutcome> {
        DataParallel::step(
            self,
            &mut learner.model,
            &mut learner.optimizer,
            step,
            batches,
            seeds,
            lr,
        )
    }

    fn finish(self: Box<Self>) -> Result<()> {
        DataParallel::finish(*self)
    }
}

impl<B: AutodiffKernelBackend> Drop for DataParallel<B> {
    fn drop(&mut self) {
        let abort = self.in_step;
        self.close(abort);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_contiguous_ordered_and_as_equal_as_possible() {
        assert_eq!(shares(4, 2), [0..2, 2..4]);
        assert_eq!(shares(5, 2), [0..3, 3..5]);
        assert_eq!(shares(1, 3), [0..1, 1..1, 1..1]);
        assert_eq!(shares(0, 2), [0..0, 0..0]);
    }

    #[test]
    fn a_peer_waiting_too_long_is_reported_with_the_absent_peers() {
        let session = Session {
            n: 3,
            total: 3,
            offset: 0,
            multinode: None,
            config: ParallelConfig {
                max_grad_norm: 0.0,
                timeout: Duration::from_millis(1),
            },
            serial_forward: false,
            names: vec!["Cpu".into(); 3],
            failure: Mutex::new(None),
            waiting: Mutex::new(vec![None; 3]),
            aborted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            links: Mutex::new((0..3).map(|_| None).collect()),
        };
        assert_eq!(session.overdue(), None);
        session.set_waiting(0, Some(4));
        session.set_waiting(2, Some(4));
        std::thread::sleep(Duration::from_millis(5));
        let message = session.overdue().unwrap();
        assert!(
            message.starts_with("peer 0 (Cpu) waited")
                && message.contains("all-reduce of step 5")
                && message.ends_with("for peer 1 (Cpu)"),
            "{message}"
        );
    }

    #[test]
    fn node_shares_lay_the_global_peers_out_in_rank_order() {
        // 2 nodes x 2 peers, a step of 8 micro-batches: node 1 holds global ranks 2 and 3.
        assert_eq!(node_ranks(2, 1, 2), 2..4);
        assert_eq!(node_shares(8, 2, 0, 2), [0..2, 2..4]);
        assert_eq!(node_shares(8, 2, 1, 2), [4..6, 6..8]);
        // The nodes' shares, in node order, are one device's micro-batches in order.
        for (len, nodes, local) in [(6, 3, 1), (7, 2, 2), (3, 2, 2), (12, 3, 2)] {
            let all: Vec<_> = (0..nodes)
                .flat_map(|k| node_shares(len, nodes, k, local))
                .collect();
            assert_eq!(all, shares(len, nodes * local));
            assert_eq!(all.last().unwrap().end, len);
        }
    }

    #[test]
    fn counts_survive_the_f32_round_trip_exactly() {
        for c in [0, 1, 4095, 4096, (1 << 24) + 1, (1 << 35) + 12345] {
            let [hi, lo] = count_halves(c);
            assert_eq!(from_halves(hi as f64, lo as f64), c);
        }
    }
}
