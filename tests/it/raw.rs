//! Raw HTTP/1.1 over TCP for tests whose exact bytes matter (paths, framing, repeated
//! headers, hostile clients): no client library rewrites them on the way.

use crate::support::TEST_CONFIG;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any single read from the proxy: far above any healthy answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A response read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// keygate's own JSON error: status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, status, "expected {status} {code}, body {body}");
        assert_eq!(self.json()["error"]["code"], code, "body {body}");
    }

    /// What the echo upstream saw (the request was forwarded).
    pub fn echoed(&self) -> Value {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(
            self.status, 200,
            "expected the upstream's answer, body {body}"
        );
        self.json()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One client connection; responses are read one at a time, so keep-alive and
/// pipelining can be observed.
pub struct RawConn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        RawConn {
            stream: TcpStream::connect(addr).await.expect("connect to proxy"),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("write request");
    }

    /// Read more bytes into the buffer; false at end of stream (or a reset).
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk))
            .await
            .expect("the proxy neither answered nor closed the connection")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response, or `None` if the connection closed cleanly before one began.
    pub async fn response(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "connection closed mid-head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end + 4).collect();
        let head = String::from_utf8(head).expect("ASCII response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body = if (100..200).contains(&status) || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed mid-body");
            }
            self.buf.drain(..len).collect()
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "connection closed mid-chunk");
                };
                let line: Vec<u8> = self.buf.drain(..line_end + 2).collect();
                let size_text = String::from_utf8_lossy(&line[..line_end]).to_string();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("chunk size {size_text:?}"));
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "connection closed mid-chunk");
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// Like `response`, but a response must come.
    pub async fn expect_response(&mut self) -> RawResponse {
        self.response()
            .await
            .expect("the proxy closed the connection without answering")
    }
}

/// Open a connection, send `request`, read one response.
pub async fn exchange(addr: SocketAddr, request: impl AsRef<[u8]>) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    c.send(request).await;
    c.expect_response().await
}

/// `GET target` with `Host: kg.test` and `extra` header lines (each ending in CRLF).
pub fn get(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: kg.test\r\n{extra}\r\n")
}

pub fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

/// The values the echo upstream received for header `name` (lowercase).
pub fn upstream_header(seen: &Value, name: &str) -> Vec<String> {
    seen["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// `TEST_CONFIG` with `line` added to the `proxy:` section.
pub fn with_proxy_line(line: &str) -> String {
    let config = TEST_CONFIG.replacen("proxy:\n", &format!("proxy:\n  {line}\n"), 1);
    assert_ne!(config, TEST_CONFIG, "could not insert {line:?}");
    config
}
