//! Multi-node all-reduce through burn-collective's global orchestrator (burn 0.21): a
//! reproduction of the hang of the second global all-reduce, and a probe of a public-API way
//! around it. Each node is a process (the collective keeps one local server per process), so
//! this program starts the orchestrator(s) and the nodes as child processes of itself and kills
//! them after a timeout. The servers bind every interface: run it in a private network
//! namespace with loopback only:
//!
//! ```text
//! cargo build -p hone-train --example multinode
//! unshare -rn sh -c 'ip link set lo up && target/debug/examples/multinode'
//! ```
//!
//! Modes, each with `NODES` nodes (default 2), one CPU peer each, `STEPS` all-reduces
//! (default 4) of `[rank + 1; 4]` (`multinode NODES STEPS`):
//!
//! * `one-session`: register once, then all-reduce 4 times. In 0.21 the second all-reduce
//!   never returns: `SyncService::sync` (`global/node/sync.rs`) clears a *copy* of the list of
//!   syncing nodes, so the shared list keeps the first round's entries and never again equals
//!   the set of nodes.
//! * `session-per-step`: register, all-reduce, finish for every step, alternating between two
//!   orchestrators and two data-service ports. Each registration builds a fresh node (with a
//!   fresh sync list), and alternating keeps the orchestrators' bookkeeping apart: a node's
//!   finish on orchestrator `p` is acknowledged before its next all-reduce, which every node
//!   needs before it registers on `p` again (one orchestrator would let a fast node re-register
//!   before a slow one has finished, and hand out a node id twice).
//!
//! Exit status 0 when `one-session` hangs at step 2 and `session-per-step` completes; the
//! output says what happened.
//!
//! hone trained through `session-per-step` until CI hung in it once: `SyncService::sync` checks
//! its list and only then creates the `Notified` future it waits on, so a sync request that lands
//! in between is lost and that node waits forever (rare; 200 steps here usually pass). hone's
//! nodes now exchange through its own orchestrator (`hone_train::parallel`, `relay.rs`); this
//! program stays as the record of what burn 0.21's global all-reduce does.

use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, start_global_orchestrator, CollectiveConfig, PeerId,
    ReduceOperation,
};
use hone_model::Cpu;

/// Nodes and all-reduces per mode, unless given as `multinode NODES STEPS`.
const NODES: u32 = 2;
const STEPS: usize = 4;
const BASE_PORT: u16 = 47100;
/// How long a mode may run: this plus [`PER_STEP`] per all-reduce.
const TIMEOUT: Duration = Duration::from_secs(20);
const PER_STEP: Duration = Duration::from_millis(250);

fn orchestrator_port(round: usize) -> u16 {
    BASE_PORT + (round % 2) as u16
}

fn data_port(rank: u32, round: usize) -> u16 {
    BASE_PORT + 10 + 2 * rank as u16 + (round % 2) as u16
}

/// The run's shape: nodes, all-reduces per mode.
#[derive(Clone, Copy)]
struct Shape {
    nodes: u32,
    steps: usize,
}

fn config(shape: Shape, rank: u32, round: usize) -> CollectiveConfig {
    let data = data_port(rank, round);
    CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(shape.nodes)
        .with_global_address(
            format!("ws://127.0.0.1:{}", orchestrator_port(round))
                .parse()
                .expect("an address"),
        )
        .with_node_address(
            format!("ws://127.0.0.1:{data}")
                .parse()
                .expect("an address"),
        )
        .with_data_service_port(data)
}

/// One global all-reduce of `[rank + 1; 4]`; checks the sum.
fn reduce_once(shape: Shape, rank: u32, step: usize) -> Result<(), String> {
    let device = Default::default();
    let x = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![(rank + 1) as f32; 4], [4]), &device);
    let out = all_reduce::<Cpu>(
        PeerId::from(rank),
        x.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| format!("all-reduce {step}: {e:?}"))?;
    let out = Tensor::<Cpu, 1>::from_primitive(TensorPrimitive::Float(out))
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let expected = (1..=shape.nodes).sum::<u32>() as f32;
    if out.iter().any(|&v| v != expected) {
        return Err(format!("all-reduce {step}: {out:?}, expected {expected}"));
    }
    println!("node {rank}: all-reduce {step} ok");
    Ok(())
}

fn node(shape: Shape, rank: u32, mode: &str) -> Result<(), String> {
    let device = Default::default();
    let peer = PeerId::from(rank);
    match mode {
        "one-session" => {
            register::<Cpu>(peer, device, config(shape, rank, 0)).map_err(|e| format!("{e:?}"))?;
            for step in 1..=shape.steps {
                reduce_once(shape, rank, step)?;
            }
            finish_collective::<Cpu>(peer).map_err(|e| format!("{e:?}"))
        }
        "session-per-step" => {
            for step in 1..=shape.steps {
                register::<Cpu>(peer, device, config(shape, rank, step))
                    .map_err(|e| format!("register {step}: {e:?}"))?;
                reduce_once(shape, rank, step)?;
                finish_collective::<Cpu>(peer).map_err(|e| format!("finish {step}: {e:?}"))?;
            }
            Ok(())
        }
        other => Err(format!("unknown mode {other}")),
    }
}

/// Runs the orchestrators and the nodes of `mode`; true when every node finished in time.
fn drive(shape: Shape, mode: &str) -> bool {
    let exe = std::env::current_exe().expect("the program's path");
    let spawn =
        |args: &[String]| -> Child { Command::new(&exe).args(args).spawn().expect("spawn") };
    let orchestrators: Vec<Child> = (0..2)
        .map(|p| spawn(&["orchestrator".into(), orchestrator_port(p).to_string()]))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut nodes: Vec<Child> = (0..shape.nodes)
        .map(|r| {
            spawn(&[
                "node".into(),
                r.to_string(),
                mode.into(),
                shape.nodes.to_string(),
                shape.steps.to_string(),
            ])
        })
        .collect();
    let started = Instant::now();
    let limit = TIMEOUT + PER_STEP * shape.steps as u32;
    let mut ok = false;
    while started.elapsed() < limit {
        let done: Vec<_> = nodes
            .iter_mut()
            .map(|c| c.try_wait().ok().flatten())
            .collect();
        if done.iter().all(Option::is_some) {
            ok = done.iter().all(|s| s.is_some_and(|s| s.success()));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if started.elapsed() >= limit {
        println!("{mode}: not done after {} s: killed", limit.as_secs());
    } else {
        println!("{mode}: {:.2} s", started.elapsed().as_secs_f64());
    }
    for mut child in nodes.into_iter().chain(orchestrators) {
        let _ = child.kill();
        let _ = child.wait();
    }
    ok
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("orchestrator") => {
            let port: u16 = args[1].parse().expect("a port");
            tokio::runtime::Runtime::new()
                .expect("a runtime")
                .block_on(start_global_orchestrator(port));
            ExitCode::SUCCESS
        }
        Some("node") => match node(
            Shape {
                nodes: args[3].parse().expect("a node count"),
                steps: args[4].parse().expect("a step count"),
            },
            args[1].parse().expect("a rank"),
            &args[2],
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("node {}: {e}", args[1]);
                ExitCode::FAILURE
            }
        },
        _ => {
            let shape = Shape {
                nodes: args
                    .first()
                    .map_or(NODES, |a| a.parse().expect("a node count")),
                steps: args
                    .get(1)
                    .map_or(STEPS, |a| a.parse().expect("a step count")),
            };
            let hang = !drive(shape, "one-session");
            println!(
                "one-session: {}",
                if hang {
                    "hangs (the burn 0.21 bug)"
                } else {
                    "completed: the bug is fixed"
                }
            );
            let workaround = drive(shape, "session-per-step");
            println!(
                "session-per-step: {}",
                if workaround { "completed" } else { "failed" }
            );
            if hang && workaround {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
