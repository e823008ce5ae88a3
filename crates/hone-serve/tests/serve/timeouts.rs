//! Slow and stalled clients (issue 10): a request head or body that stops arriving is cut off
//! after its timeout, and shutdown ends within its bound even while such a client is connected.
//! Raw TCP clients on 127.0.0.1; every wait is bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// A POST to `/v1/completions` declaring a 50-byte body and sending 9 bytes of it.
const STALLED_BODY: &str = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                            Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"prompt\"";

/// A request head cut off in the middle.
const STALLED_HEAD: &str = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le";

/// A blocking client (tokio's io-util is not enabled here) that sends `sent` and then stalls.
fn connect(server: &TestServer, sent: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.client.addr()).unwrap();
    stream.write_all(sent.as_bytes()).unwrap();
    stream
}

/// Everything the server sends until it closes the connection (at most `bound`): the bytes
/// and when the connection closed, or `None` if it was still open at `bound`.
async fn read_until_closed(stream: &TcpStream, bound: Duration) -> Option<(String, Duration)> {
    let mut stream = stream.try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = bound.checked_sub(started.elapsed())?;
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => break, // reset: closed too
            }
        }
        let text = String::from_utf8_lossy(&received).into_owned();
        Some((text, started.elapsed()))
    })
    .await
    .unwrap()
}

fn with_timeouts(header: u64, body: u64, shutdown: u64) -> hone_serve::ServeConfig {
    let mut config = stories_config();
    config.timeouts = hone_serve::Timeouts {
        header_read: Duration::from_secs(header),
        body_read: Duration::from_secs(body),
        shutdown: Duration::from_secs(shutdown),
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_closed_after_the_header_timeout() {
    let server = start(with_timeouts(1, 30, 5)).await;
    let opened = Instant::now();
    let stalled = connect(&server, STALLED_HEAD);
    let idle = connect(&server, "");
    for stream in [&stalled, &idle] {
        read_until_closed(stream, Duration::from_secs(10))
            .await
            .expect("a stalled connection is still open 10 s after a 1 s header timeout");
        let after = opened.elapsed();
        assert!(
            after >= Duration::from_millis(500),
            "closed after {after:?}"
        );
    }
    // Others are still served.
    assert_eq!(server.get("/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_after_the_body_timeout() {
    let server = start(with_timeouts(30, 1, 5)).await;
    let stalled = connect(&server, STALLED_BODY);
    let (response, after) = read_until_closed(&stalled, Duration::from_secs(10))
        .await
        .expect("a stalled body is still being waited for 10 s after a 1 s body timeout");
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request_timeout"), "{response}");
    assert!(
        after >= Duration::from_millis(500),
        "answered after {after:?}"
    );
    assert_eq!(server.get("/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_timeout_while_clients_stall() {
    // Head and body timeouts far beyond the shutdown timeout: only the shutdown bound can end
    // the wait (before the fix the server waited for the stalled body forever).
    let server = start(with_timeouts(60, 60, 1)).await;
    let body = connect(&server, STALLED_BODY);
    let _head = connect(&server, STALLED_HEAD);
    let _idle = connect(&server, "");
    // Let the server start reading the stalled body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = server
        .shutdown_within(Duration::from_secs(15))
        .await
        .expect("the server was still running 15 s after shutdown with a 1 s shutdown timeout");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The stalled connection was closed with the server.
    assert!(read_until_closed(&body, Duration::from_secs(5))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_running_at_shutdown_still_gets_its_answer() {
    let server = start(with_timeouts(10, 10, 60)).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
                      "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut stream = server
        .client
        .post_sse("/v1/completions", &body)
        .await
        .unwrap();
    assert_eq!(stream.status, 200);
    // The first token is out: the request is running when the signal comes.
    assert!(stream.next_data().await.unwrap().is_some());
    let shutdown = tokio::spawn(server.shutdown_within(Duration::from_secs(60)));
    let rest = tokio::time::timeout(TIMEOUT, stream.collect_data())
        .await
        .expect("the stream stalled")
        .expect("the stream was cut");
    let usage: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 480, "{usage}");
    shutdown
        .await
        .unwrap()
        .expect("shutdown did not end after the last request");
}
