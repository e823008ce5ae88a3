//! A minimal HTTP/1.1 client for the load tool and the tests: one connection per request over
//! hyper, JSON bodies, and server-sent events read incrementally. It refuses any address that
//! is not loopback, so a load test can only ever target this machine.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::error::{BenchError, Result};

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    api_key: Option<String>,
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            BenchError::Client(format!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            ))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

fn client_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Client(format!("{what}: {e}"))
}

impl Client {
    /// A client of the server at `addr`, which must be a loopback address.
    pub fn new(addr: SocketAddr) -> Result<Self> {
        if !addr.ip().is_loopback() {
            return Err(BenchError::NotLoopback(addr.to_string()));
        }
        Ok(Self {
            addr,
            api_key: None,
        })
    }

    /// Sends `Authorization: Bearer <key>` with every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and returns the response head with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<Incoming>> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| client_err(&format!("connecting to {}", self.addr), e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| client_err("HTTP handshake", e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &self.api_key {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| client_err("building the request", e))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| client_err(&format!("request to {path}"), e))
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<HttpResponse> {
        let response = self.send(method, path, body, &[]).await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| client_err("reading the response", e))?
            .to_bytes();
        Ok(HttpResponse {
            status,
            content_type,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<HttpResponse> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<HttpResponse> {
        self.request(Method::POST, path, Some(body.to_string().into_bytes()))
            .await
    }

    /// Posts `body` and reads the answer as server-sent events (a non-200 answer is read whole
    /// into [`SseStream::error_body`]).
    pub async fn post_sse(&self, path: &str, body: &Value) -> Result<SseStream> {
        let response = self
            .send(
                Method::POST,
                path,
                Some(body.to_string().into_bytes()),
                &[("accept", "text/event-stream")],
            )
            .await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let error_body = if status != 200 {
            let bytes = (&mut body)
                .collect()
                .await
                .map_err(|e| client_err("reading the response", e))?
                .to_bytes();
            Some(String::from_utf8_lossy(&bytes).to_string())
        } else {
            None
        };
        Ok(SseStream {
            status,
            error_body,
            body,
            buffer: Vec::new(),
        })
    }
}

/// Server-sent events being received.
pub struct SseStream {
    pub status: u16,
    pub error_body: Option<String>,
    body: Incoming,
    buffer: Vec<u8>,
}

impl SseStream {
    /// The `data` of the next event (comments and keep-alives skipped); `None` at the end of
    /// the body.
    pub async fn next_data(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = find_event_end(&self.buffer) {
                let event: Vec<u8> = self.buffer.drain(..end.0 + end.1).collect();
                let text = String::from_utf8_lossy(&event[..end.0]).to_string();
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment (keep-alive) or an event without data
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(client_err("reading the event stream", e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Every remaining `data`, up to and excluding `[DONE]`; errors if the stream ends without
    /// `[DONE]`.
    pub async fn collect_data(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(data) = self.next_data().await? {
            if data == "[DONE]" {
                return Ok(out);
            }
            out.push(data);
        }
        Err(BenchError::Client(
            "the event stream ended without data: [DONE]".into(),
        ))
    }
}

/// (length of the event, length of its terminating blank line) of the first complete event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_addresses_are_refused() {
        let remote: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(matches!(
            Client::new(remote),
            Err(BenchError::NotLoopback(_))
        ));
        assert!(Client::new("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(Client::new("[::1]:80".parse().unwrap()).is_ok());
    }

    #[test]
    fn events_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }
}
