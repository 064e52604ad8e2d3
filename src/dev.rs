//! `--dev` mode: the built-in config (`config/dev.yaml`), a generated root token, and an
//! echo upstream that shows what keygate forwarded (also used by the tests).
//!
//! Echo endpoints: any path answers JSON with method, path, query, headers and the body
//! (its size and xxh3 always; its text when small); `/__bytes?n=N` streams N bytes;
//! `/__sleep?ms=N` answers after N milliseconds.

use crate::config::{Config, ConfigError, Upstream};
use crate::error::{full, Body, BoxError};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;

pub const DEV_CONFIG: &str = include_str!("../config/dev.yaml");

/// The dev config with `upstream` and a fresh root token filled in.
pub fn config(upstream: &str, root_token: &str) -> Result<Config, ConfigError> {
    let mut c = Config::from_yaml(
        DEV_CONFIG,
        "config/dev.yaml (built in)",
        &crate::config::ProcessEnv,
    )?;
    c.fixed.upstream = Upstream::parse(upstream).map_err(|m| ConfigError {
        source: "--upstream".into(),
        field: String::new(),
        line: None,
        message: m,
    })?;
    c.fixed.root_token = Some(root_token.into());
    c.fixed.store = crate::config::StoreConfig::Memory;
    Ok(c)
}

/// A random root token: `kgroot_` and 40 base62 characters from the OS CSPRNG.
pub fn root_token() -> String {
    let k = crate::key::generate(
        &crate::key::Prefixes {
            secret_live: "kgroot_".into(),
            ..Default::default()
        },
        crate::key::KeyType::Secret,
        crate::key::Environment::Live,
    )
    .expect("the OS random number generator is available");
    k.text
}

/// Start the echo upstream on `addr` (port 0 for any); returns the bound address.
pub async fn spawn_echo_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // As many header fields as keygate lets through (hyper's default is 100).
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .max_headers(crate::connection::max_header_count(usize::MAX));
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(echo))
                    .await;
            });
        }
    });
    Ok(local)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok())?
    })
}

async fn echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/__bytes" {
        let n = query_param(&req, "n").unwrap_or(0);
        return Ok(Response::new(pattern_body(n)));
    }
    if path == "/__sleep" {
        let ms = query_param(&req, "ms").unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let method = req.method().to_string();
    let query = req.uri().query().map(str::to_string);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    // Consume the body as a stream: size and hash, never the whole thing in memory.
    let mut body = req.into_body();
    let mut size = 0u64;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut small = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            let mut r = Response::new(full("body read error"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        };
        if let Some(data) = frame.data_ref() {
            size += data.len() as u64;
            hasher.update(data);
            if small.len() + data.len() <= 65536 {
                small.extend_from_slice(data);
            }
        }
    }
    let text = (size as usize == small.len())
        .then(|| String::from_utf8(small).ok())
        .flatten();
    let json = serde_json::json!({
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_bytes": size,
        "body_xxh3": format!("{:016x}", hasher.digest()),
        "body": text,
    });
    let mut r = Response::new(full(json.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// `n` bytes of a repeating pattern (byte i = i % 251), streamed in 64 KiB chunks.
pub fn pattern_body(n: u64) -> Body {
    const CHUNK: u64 = 65536;
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= n {
            return None;
        }
        let len = CHUNK.min(n - sent);
        let chunk: Vec<u8> = (sent..sent + len).map(|i| (i % 251) as u8).collect();
        Some((
            Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))),
            sent + len,
        ))
    });
    StreamBody::new(stream).boxed()
}
