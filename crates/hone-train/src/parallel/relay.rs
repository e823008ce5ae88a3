//! The exchange between the nodes of a multi-node run: every global peer sends its row of a step
//! (its gradient sums and counts, see the parent module) to the orchestrator, which answers each
//! of them, once the step's last peer has come, with every row in global rank order (an
//! all-gather). One TCP connection per peer and step, nothing between the nodes themselves.
//!
//! It replaces burn-collective's global all-reduce, which hone used until CI hung in it: besides
//! the second all-reduce of one registration never returning (burn 0.21's `SyncService::sync`
//! clears a copy of its list of syncing nodes), `sync` checks that list and only then creates
//! the `Notified` future it waits on, so a node whose last peer's sync request lands between the
//! two waits forever while the other nodes go on (tokio's `notify_waiters` wakes only futures
//! that exist). Neither can be reached through burn's API.
//!
//! Wire format (little-endian): request `b"HONE"`, version `u32`, step `u64`, global rank `u32`,
//! peers `u32`, row length `u64`, then the row's `f32`s; answer `0u8` and `peers × len` `f32`s,
//! or `1u8`, a `u32` length and an UTF-8 message. The orchestrator forgets a peer that hangs up
//! before its step is complete (a node that died or timed out), so a rerun against the same
//! orchestrator finds no stale rows.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::lock;

const MAGIC: &[u8; 4] = b"HONE";
const VERSION: u32 = 1;
/// Request header: magic, version, step, rank, peers, length.
const HEADER: usize = 4 + 4 + 8 + 4 + 4 + 8;
/// The most floats one step may gather (16 GiB).
const MAX_FLOATS: u64 = 1 << 32;
/// How long the orchestrator waits for a request's bytes once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a waiting request checks that its peer is still connected.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// Pause between attempts to reach an orchestrator that refuses connections.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// One step's rows as they arrive.
struct Group {
    peers: usize,
    len: usize,
    rows: Vec<Option<Vec<f32>>>,
    /// The answer, once every row is in (or the error every waiting peer gets).
    answer: Option<Arc<Vec<u8>>>,
    /// Connections attached to this group; the last one out removes it.
    attached: usize,
}

#[derive(Default)]
struct Relay {
    groups: Mutex<HashMap<u64, Group>>,
    done: Condvar,
}

/// Serves the exchange on `listener` until the process ends (one thread per connection).
pub fn serve(listener: TcpListener) -> std::io::Result<()> {
    let relay = Arc::new(Relay::default());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            // A connection that failed before it was accepted, or no descriptor left for now.
            Err(e) => {
                tracing::debug!("relay accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let relay = relay.clone();
        std::thread::Builder::new()
            .name("hone-relay".into())
            .spawn(move || {
                if let Err(e) = handle(&relay, stream) {
                    tracing::debug!("relay connection: {e}");
                }
            })?;
    }
    Ok(())
}

fn error_answer(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(1);
    out.extend_from_slice(&(message.len() as u32).to_le_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Little-endian `f32`s.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// One peer's request: read it, file its row, wait for the step's answer, send it.
fn handle(relay: &Relay, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header)?;
    let (step, rank, peers, len) = (
        u64_at(&header, 8),
        u32_at(&header, 16) as usize,
        u32_at(&header, 20) as usize,
        u64_at(&header, 24),
    );
    let refusal = if &header[..4] != MAGIC || u32_at(&header, 4) != VERSION {
        Some(format!(
            "not a hone {VERSION} multi-node request (an older or newer hone, or another program)"
        ))
    } else if rank >= peers {
        Some(format!("peer {rank} of {peers} peers"))
    } else if len.saturating_mul(peers as u64) > MAX_FLOATS {
        Some(format!(
            "{peers} rows of {len} values are more than the orchestrator takes"
        ))
    } else {
        None
    };
    if let Some(message) = refusal {
        return stream.write_all(&error_answer(&message));
    }
    let len = len as usize;
    let mut bytes = vec![0u8; len * 4];
    stream.read_exact(&mut bytes)?;
    let row = f32s(&bytes);
    drop(bytes);

    let answer = {
        let mut groups = lock(&relay.groups);
        let group = groups.entry(step).or_insert_with(|| Group {
            peers,
            len,
            rows: vec![None; peers],
            answer: None,
            attached: 0,
        });
        group.attached += 1;
        if group.answer.is_none() {
            if (group.peers, group.len) != (peers, len) {
                group.answer = Some(Arc::new(error_answer(&format!(
                    "the peers of step {} disagree: {} peers with rows of {} values, and peer \
                     {rank} says {peers} peers with rows of {len} (every node must run the same \
                     config: train.devices, [lora], distributed.nodes)",
                    step + 1,
                    group.peers,
                    group.len
                ))));
            } else if group.rows[rank].is_some() {
                group.answer = Some(Arc::new(error_answer(&format!(
                    "two peers with global rank {rank} in step {} (is distributed.node_rank the \
                     same on two nodes?)",
                    step + 1
                ))));
            } else {
                group.rows[rank] = Some(row);
                if group.rows.iter().all(Option::is_some) {
                    let mut out = Vec::with_capacity(1 + 4 * peers * len);
                    out.push(0);
                    for r in group.rows.iter_mut() {
                        for v in r.take().unwrap() {
                            out.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                    group.answer = Some(Arc::new(out));
                }
            }
            if group.answer.is_some() {
                relay.done.notify_all();
            }
        }
        wait_for_answer(relay, groups, step, rank, &stream)
    };
    match answer {
        Some(answer) => stream.write_all(&answer),
        None => Ok(()),
    }
}

/// Waits (holding `groups` between checks) until step `step` has its answer, and detaches from
/// the group; `None` when the peer hung up first (its row is withdrawn).
fn wait_for_answer(
    relay: &Relay,
    mut groups: MutexGuard<'_, HashMap<u64, Group>>,
    step: u64,
    rank: usize,
    stream: &TcpStream,
) -> Option<Arc<Vec<u8>>> {
    loop {
        let group = groups.get_mut(&step).expect("an attached group stays");
        if let Some(answer) = group.answer.clone() {
            group.attached -= 1;
            if group.attached == 0 {
                groups.remove(&step);
            }
            return Some(answer);
        }
        let (guard, _) = relay
            .done
            .wait_timeout(groups, LIVENESS_INTERVAL)
            .unwrap_or_else(PoisonError::into_inner);
        groups = guard;
        let group = groups.get_mut(&step).expect("an attached group stays");
        if group.answer.is_none() && hung_up(stream) {
            group.rows[rank] = None;
            group.attached -= 1;
            if group.attached == 0 {
                groups.remove(&step);
            }
            return None;
        }
    }
}

/// Whether the other end closed `stream` (a peer sends nothing after its request).
fn hung_up(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut probe = [0u8; 1];
    let gone = match stream.peek(&mut probe) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    };
    gone || stream.set_nonblocking(false).is_err()
}

/// One peer's side of a step's exchange: sends `row` as global rank `rank` of `peers` to the
/// orchestrator at `address` (`host:port`) and returns every peer's row in rank order
/// (`peers × row.len()` values). Gives up after `timeout` (connecting included).
/// `on_connect` receives a handle to the connection, so that another thread can cut it short
/// ([`TcpStream::shutdown`]) when the run aborts.
pub fn all_gather(
    address: &str,
    step: usize,
    rank: usize,
    peers: usize,
    row: &[f32],
    timeout: Duration,
    on_connect: impl FnOnce(&TcpStream),
) -> Result<Vec<f32>, String> {
    let started = Instant::now();
    let no_answer = || {
        format!(
            "no answer from the other nodes within {} s (train.collective_timeout_secs)",
            timeout.as_secs()
        )
    };
    let targets: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the orchestrator's address {address}: {e}"))?
        .collect();
    let mut stream = loop {
        let attempt = targets.iter().find_map(|a| {
            let left = timeout.saturating_sub(started.elapsed()).max(CONNECT_RETRY);
            TcpStream::connect_timeout(a, left).ok()
        });
        match attempt {
            Some(s) => break s,
            None if started.elapsed() + CONNECT_RETRY < timeout => {
                std::thread::sleep(CONNECT_RETRY)
            }
            None => {
                return Err(format!(
                    "cannot reach the orchestrator at {address} within {} s \
                     (train.collective_timeout_secs): is `hone train-orchestrator` running there?",
                    timeout.as_secs()
                ))
            }
        }
    };
    let io = |e: std::io::Error| -> String {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            no_answer()
        } else {
            format!("the exchange with the orchestrator at {address} failed: {e}")
        }
    };
    stream.set_nodelay(true).map_err(io)?;
    on_connect(&stream);
    let mut request = Vec::with_capacity(HEADER + 4 * row.len());
    request.extend_from_slice(MAGIC);
    request.extend_from_slice(&VERSION.to_le_bytes());
    request.extend_from_slice(&(step as u64).to_le_bytes());
    request.extend_from_slice(&(rank as u32).to_le_bytes());
    request.extend_from_slice(&(peers as u32).to_le_bytes());
    request.extend_from_slice(&(row.len() as u64).to_le_bytes());
    for v in row {
        request.extend_from_slice(&v.to_le_bytes());
    }
    let left = |started: Instant| timeout.saturating_sub(started.elapsed()).max(CONNECT_RETRY);
    stream.set_write_timeout(Some(left(started))).map_err(io)?;
    stream.write_all(&request).map_err(io)?;
    drop(request);
    stream.set_read_timeout(Some(left(started))).map_err(io)?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            format!(
                "the orchestrator at {address} closed the connection without an answer (was \
                 it stopped, or the run aborted?)"
            )
        } else {
            io(e)
        }
    })?;
    if status[0] != 0 {
        let mut n = [0u8; 4];
        stream.read_exact(&mut n).map_err(io)?;
        let mut message = vec![0u8; u32::from_le_bytes(n) as usize];
        stream.read_exact(&mut message).map_err(io)?;
        return Err(format!(
            "the orchestrator refused the step: {}",
            String::from_utf8_lossy(&message)
        ));
    }
    let mut bytes = vec![0u8; 4 * peers * row.len()];
    stream.read_exact(&mut bytes).map_err(io)?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(f32s(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An orchestrator on a free loopback port; its address.
    fn orchestrator() -> String {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || serve(listener));
        address
    }

    /// [`all_gather`] with nothing to do on connecting.
    fn send(
        address: &str,
        step: usize,
        rank: usize,
        peers: usize,
        row: &[f32],
        timeout: Duration,
    ) -> Result<Vec<f32>, String> {
        all_gather(address, step, rank, peers, row, timeout, |_| {})
    }

    /// [`send`] on a thread of its own.
    fn spawn_send(
        address: &str,
        step: usize,
        rank: usize,
        peers: usize,
        row: Vec<f32>,
    ) -> std::thread::JoinHandle<Result<Vec<f32>, String>> {
        let address = address.to_string();
        std::thread::spawn(move || send(&address, step, rank, peers, &row, LONG))
    }

    const LONG: Duration = Duration::from_secs(20);

    fn row(rank: usize, step: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (rank * 1000 + step * 100 + i) as f32 + 0.25)
            .collect()
    }

    /// `peers` peers of `step` on threads, in reverse rank order; their answers by rank.
    fn gather(
        address: &str,
        step: usize,
        peers: usize,
        len: usize,
    ) -> Vec<Result<Vec<f32>, String>> {
        let handles: Vec<_> = (0..peers)
            .rev()
            .map(|rank| spawn_send(address, step, rank, peers, row(rank, step, len)))
            .collect();
        let mut out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        out.reverse();
        out
    }

    /// [`gather`], asserting that every peer got every peer's row in rank order.
    fn assert_gathered(address: &str, step: usize, peers: usize, len: usize) {
        let expected: Vec<f32> = (0..peers).flat_map(|r| row(r, step, len)).collect();
        for answer in gather(address, step, peers, len) {
            assert_eq!(answer.unwrap(), expected);
        }
    }

    #[test]
    fn every_peer_gets_every_row_in_rank_order() {
        let address = orchestrator();
        for step in 0..3 {
            assert_gathered(&address, step, 3, 5);
        }
    }

    #[test]
    fn peers_that_disagree_on_the_shape_all_get_an_error() {
        let address = orchestrator();
        let other = spawn_send(&address, 0, 0, 2, vec![1.0; 4]);
        std::thread::sleep(Duration::from_millis(200));
        let err = send(&address, 0, 1, 2, &[1.0; 3], LONG).unwrap_err();
        assert!(err.contains("disagree") && err.contains("step 1"), "{err}");
        let err = other.join().unwrap().unwrap_err();
        assert!(err.contains("disagree"), "{err}");
    }

    #[test]
    fn a_peer_that_hangs_up_leaves_no_row_behind() {
        let address = orchestrator();
        // Rank 1 of 3 waits in step 7 while rank 0 sends a stale row and gives up.
        let waiting = spawn_send(&address, 7, 1, 3, row(1, 7, 5));
        let err = send(&address, 7, 0, 3, &[9.0; 5], Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("collective_timeout_secs"), "{err}");
        // The orchestrator notices within LIVENESS_INTERVAL; the margin is for a loaded machine.
        std::thread::sleep(20 * LIVENESS_INTERVAL);
        // Rank 0 comes again, rank 2 comes: the step gathers the new row, not the stale one
        // (nor "two peers with global rank 0").
        let late = [0, 2].map(|r| spawn_send(&address, 7, r, 3, row(r, 7, 5)));
        let expected: Vec<f32> = (0..3).flat_map(|r| row(r, 7, 5)).collect();
        for answer in [waiting].into_iter().chain(late) {
            assert_eq!(answer.join().unwrap().unwrap(), expected);
        }
        // Once every peer has its answer the step is forgotten: a rerun's step 7 starts anew.
        assert_gathered(&address, 7, 2, 5);
    }

    #[test]
    fn a_duplicate_rank_is_named() {
        let address = orchestrator();
        let first = spawn_send(&address, 0, 1, 2, vec![1.0; 2]);
        std::thread::sleep(Duration::from_millis(200));
        let err = send(&address, 0, 1, 2, &[1.0; 2], LONG).unwrap_err();
        assert!(err.contains("global rank 1"), "{err}");
        assert!(first.join().unwrap().is_err());
    }

    #[test]
    fn a_missing_orchestrator_is_named_after_the_timeout() {
        // A port that was free a moment ago.
        let port = TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let started = Instant::now();
        let err = send(&address, 0, 0, 2, &[1.0], Duration::from_millis(500)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            err.contains(&address) && err.contains("train-orchestrator"),
            "{err}"
        );
    }

    #[test]
    fn a_shutdown_from_another_thread_ends_the_wait() {
        let address = orchestrator();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            all_gather(&address, 0, 0, 2, &[1.0], Duration::from_secs(60), |s| {
                tx.send(s.try_clone().unwrap()).unwrap()
            })
        });
        let link = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        link.shutdown(Shutdown::Both).unwrap();
        let err = waiter.join().unwrap().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    }
}
