//! A minimal HTTP/1.1 client over a raw TCP stream (no HTTP client crate needed in tests).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one [`http_get`] may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A response read by [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The header fields in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (chunked transfer coding removed), decoded as UTF-8 with replacement characters.
    pub body: String,
}

impl HttpResponse {
    /// Returns the value of the first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `GET path` with `Host: host` and `Connection: close` to `addr`, and reads the whole
/// response (within 10 seconds).
pub async fn http_get(addr: SocketAddr, path: &str, host: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, host, &[]).await
}

/// Sends `method path` with `Host: host`, the extra `headers` and `Connection: close` to `addr`
/// (no body), and reads the whole response (within 10 seconds).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vaas-testkit\r\n{extra}Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path} timed out after {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("{method} http://{addr}{path} (Host: {host})"))
}

/// Parses a complete HTTP/1.x response.
fn parse_response(raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "incomplete response head: {:?}",
                String::from_utf8_lossy(raw)
            )
        })?;
    let head = std::str::from_utf8(&raw[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    let body = &raw[head_end + 4..];
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    response.body = String::from_utf8_lossy(&body).into_owned();
    Ok(response)
}

/// Removes the chunked transfer coding.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size line"))?;
        let size_line = std::str::from_utf8(&body[..line_end])?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn parses_a_response_with_content_length() -> anyhow::Result<()> {
        let response =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Origin: a\r\n\r\nhello")?;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-origin"), Some("a"));
        assert_eq!(response.body, "hello");
        Ok(())
    }

    #[test]
    fn removes_chunked_transfer_coding() -> anyhow::Result<()> {
        let response = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        )?;
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "hello world");
        Ok(())
    }

    #[test]
    fn rejects_a_truncated_head() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le").is_err());
    }
}
