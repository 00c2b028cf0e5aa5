//! A tiny HTTP origin server that says who it is.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::debug;

/// The largest request head the origin reads before giving up on a connection.
const MAX_HEAD: usize = 64 * 1024;

/// An HTTP/1.1 server on 127.0.0.1 answering every request `200` with the body `origin <name>`
/// and the headers `X-Origin: <name>` and `X-Echo-Url` with the request target it received (and
/// `X-Echo-Trail` with the value of a request's `X-Trail`); stopped on drop.
///
/// It keeps connections alive (as varnishd expects from a backend) and counts requests, so a test
/// can tell a cache hit from a miss.
#[derive(Debug)]
pub struct HttpOrigin {
    name: String,
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

impl HttpOrigin {
    /// Starts the origin on a free port; it accepts connections as soon as this returns.
    pub async fn start(name: &str) -> anyhow::Result<HttpOrigin> {
        HttpOrigin::start_slow(name, Duration::ZERO).await
    }

    /// Starts an origin that waits `delay` before it answers each request (a slow backend).
    pub async fn start_slow(name: &str, delay: Duration) -> anyhow::Result<HttpOrigin> {
        HttpOrigin::start_with(name, delay, true).await
    }

    /// Starts an origin that serves every request but fails its health check: `GET /health`
    /// answers 503, so only a probe can tell it apart from a healthy one.
    pub async fn start_failing_health_checks(name: &str) -> anyhow::Result<HttpOrigin> {
        HttpOrigin::start_with(name, Duration::ZERO, false).await
    }

    async fn start_with(name: &str, delay: Duration, healthy: bool) -> anyhow::Result<HttpOrigin> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("cannot bind the origin")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let answer = Answer {
            name: name.to_owned(),
            delay,
            healthy,
        };
        let server = tokio::spawn(serve(listener, answer, Arc::clone(&requests)));
        Ok(HttpOrigin {
            name: name.to_owned(),
            addr,
            requests,
            server,
        })
    }

    /// Returns the address the origin listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the number of requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Returns a log of the origin: it keeps none, so this says what it is and how busy it was.
    pub fn log(&self) -> String {
        format!(
            "origin {} on {} answered {} requests",
            self.name,
            self.addr,
            self.requests()
        )
    }
}

impl Drop for HttpOrigin {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.server.abort();
    }
}

/// What the origin answers, and how long it waits first.
#[derive(Clone, Debug)]
struct Answer {
    name: String,
    delay: Duration,
    /// Whether `GET /health` answers 200 (or 503).
    healthy: bool,
}

async fn serve(listener: TcpListener, answer: Answer, requests: Arc<AtomicU64>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, answer.clone(), Arc::clone(&requests)));
                }
                Err(error) => debug!(%error, "origin accept failed"),
            },
            // Reaps finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(mut stream: TcpStream, answer: Answer, requests: Arc<AtomicU64>) {
    let name = &answer.name;
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buffer).await else {
            return;
        };
        let original_head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let head = original_head.to_ascii_lowercase();
        let body_length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        let close = head
            .lines()
            .any(|line| line.starts_with("connection:") && line.contains("close"));
        // Drops the head and any request body (GETs have none; varnishd may send one on a pass).
        let consumed = (head_end + 4 + body_length).min(buffer.len());
        let missing = head_end + 4 + body_length - consumed;
        buffer.drain(..consumed);
        if missing > 0 {
            let mut rest = vec![0_u8; missing];
            if stream.read_exact(&mut rest).await.is_err() {
                return;
            }
        }
        requests.fetch_add(1, Ordering::SeqCst);
        if !answer.delay.is_zero() {
            tokio::time::sleep(answer.delay).await;
        }
        let health_check = head.starts_with("get /health ");
        let status = if health_check && !answer.healthy {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        let body = format!("origin {name}");
        // What varnishd's VCL wrote into the request, for tests of paths (pipe) whose response
        // varnishd does not touch.
        let echo: String = original_head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(field, _)| field.eq_ignore_ascii_case("x-trail"))
            .map(|(_, value)| format!("X-Echo-Trail: {}\r\n", value.trim()))
            .collect();
        // The request target as it reached the origin (after any rewrite of varnishd's).
        let url = original_head.split(' ').nth(1).unwrap_or_default();
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Origin: {name}\r\nX-Echo-Url: {url}\r\n{echo}{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// Reads until `buffer` holds a complete request head; returns the offset of its `\r\n\r\n`.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            return Some(end);
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0_u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::HttpOrigin;
    use crate::http_get;

    #[tokio::test]
    async fn answers_every_request_with_its_name() -> anyhow::Result<()> {
        let origin = HttpOrigin::start("blue").await?;
        let response = http_get(origin.addr(), "/any/path?x=1", "example.com").await?;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("X-Origin"), Some("blue"));
        assert_eq!(response.body, "origin blue");
        assert_eq!(origin.requests(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn keeps_a_connection_alive_for_several_requests() -> anyhow::Result<()> {
        let origin = HttpOrigin::start("green").await?;
        let mut stream = tokio::net::TcpStream::connect(origin.addr()).await?;
        stream
            .write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
        assert_eq!(origin.requests(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn stops_listening_when_dropped() -> anyhow::Result<()> {
        let origin = HttpOrigin::start("red").await?;
        let addr = origin.addr();
        drop(origin);
        // The accept loop is aborted; the listener closes once the runtime drops the task.
        let mut refused = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refused, "the origin still accepts connections after drop");
        Ok(())
    }
}
