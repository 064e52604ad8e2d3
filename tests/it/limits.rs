//! Connection limits that need timers or counting: the header-read timeout (hyper needs a
//! timer for it), the idle timeout of keep-alive connections, and `max_connections`.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(timeouts: &str, limits: &str) -> String {
    TEST_CONFIG.replace(
        "  timeouts: { upstream: 2s, header_read: 2s, idle: 30s }\n",
        &format!("  timeouts: {timeouts}\n  limits: {limits}\n"),
    )
}

/// A keygate with these timeouts (memory store, no other limits) and one connection to
/// its proxy port; keep the app alive while the connection is used.
async fn connected(timeouts: &str) -> (TestApp, TcpStream) {
    let app = spawn_app_with(&config(timeouts, "{}"), Store::Memory).await;
    let s = TcpStream::connect(app.proxy).await.unwrap();
    (app, s)
}

/// Read until EOF (or 5 s); returns the bytes and whether the peer closed.
async fn read_until_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off_by_the_header_read_timeout() {
    let (_app, mut s) = connected("{ upstream: 2s, header_read: 300ms, idle: 30s }").await;
    // Half a request head, then silence (slowloris).
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kg.test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (bytes, closed) = read_until_close(&mut s).await;
    assert!(
        closed,
        "the connection stayed open past the header-read timeout"
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "closed only after {waited:?}"
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_app, mut s) = connected("{ upstream: 2s, header_read: 2s, idle: 400ms }").await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kg.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the server closes the connection.
    let (_, closed) = read_until_close(&mut s).await;
    assert!(closed, "an idle keep-alive connection was never closed");
}

/// The idle timeout counts from the last byte: a connection used more often than that
/// stays open however long it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_use_outlives_the_idle_timeout() {
    let (_app, mut s) = connected("{ upstream: 2s, header_read: 2s, idle: 600ms }").await;
    let started = Instant::now();
    for i in 0..8 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kg.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("request {i}: no answer"))
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Well past twice the idle timeout on one connection.
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_for_a_slot() {
    let app = spawn_app_with(
        &config(
            "{ upstream: 5s, header_read: 5s, idle: 30s }",
            "{ max_connections: 2 }",
        ),
        Store::Memory,
    )
    .await;
    // Two connections hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(app.proxy).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kg.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third is accepted by the kernel but not served while both are open.
    let mut third = TcpStream::connect(app.proxy).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kg.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "a connection over the limit was served");
    // Free a slot: the waiting connection is served.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
