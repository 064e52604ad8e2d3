//! Paths that servers read differently, over real sockets: dot segments hidden behind
//! `;params` (Tomcat, Jetty and Spring strip those first), a `;params` segment that moves
//! the request to another route, encoded control characters, double encoding, and raw
//! UTF-8, which must reach the upstream byte for byte.
//!
//! Requests are written by hand over a `TcpStream` so no client library rewrites the path,
//! and the upstream is a recorder of its own: "never forwarded" is checked against what it
//! received, not only against keygate's answer.

use crate::support::{spawn_app_upstream, Store, TestApp};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `/admin/**` needs `admin:write`, `/users/**` any key with `users:read`, and everything
/// else falls to a catch-all whose `auth` the test chooses.
const CONFIG: &str = r#"
proxy:
  listen: 127.0.0.1:0
  upstream: {upstream}
  timeouts: { upstream: 2s, header_read: 2s, idle: 30s }
admin:
  listen: 127.0.0.1:0
store:
  {store}
cache: { ttl: 5m, negative_ttl: 2s }
routes:
  - { name: admin-area, path: "/admin/**", scopes: ["admin:write"] }
  - { name: users, path: "/users/**", scopes: ["users:read"] }
  - { name: rest, path: "/**"{rest_auth} }
unmatched: deny
"#;

/// Request paths (raw bytes, as sent) the upstream received.
type Log = Arc<Mutex<Vec<Vec<u8>>>>;

/// An upstream that records each request's path and answers 200 with the path as body.
async fn spawn_recorder() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let accept_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = accept_log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let path = req.uri().path().as_bytes().to_vec();
                    log.lock().unwrap().push(path.clone());
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(path)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, log)
}

struct Setup {
    app: TestApp,
    log: Log,
    /// `admin:write` and `users:read`: allowed everywhere a path can be allowed.
    admin: String,
    /// `users:read` only.
    reader: String,
}

/// keygate with `CONFIG` in front of a recorder; the catch-all is public or key-only.
async fn setup(public_rest: bool) -> Setup {
    let (upstream, log) = spawn_recorder().await;
    let rest_auth = if public_rest { ", auth: none" } else { "" };
    let config = CONFIG.replace("{rest_auth}", rest_auth);
    let app = spawn_app_upstream(&config, Store::Memory, upstream).await;
    let admin = app.create_key(&["admin:write", "users:read"]).await.key;
    let reader = app.create_key(&["users:read"]).await.key;
    Setup {
        app,
        log,
        admin,
        reader,
    }
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

impl Answer {
    fn is_bad_path(&self) -> bool {
        let body: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        self.status == 400 && body["error"]["code"] == "bad_path"
    }
}

/// One `GET target` on a fresh connection (closed after), with an optional key. The
/// target is raw bytes: a `&str` could not carry invalid UTF-8.
async fn get(addr: SocketAddr, target: &[u8], key: Option<&str>) -> Answer {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: kg.test\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.extend_from_slice(format!("Authorization: Bearer {k}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
    stream.write_all(&req).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the proxy neither answered nor closed")
        .expect("read response");
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "expected a sized body: {head}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    Answer {
        status,
        body: raw[head_end + 4..].to_vec(),
    }
}

/// Every target is refused as `bad_path` with each key and with none, and none reaches
/// the upstream. All failures are reported at once, so a run shows the whole class.
async fn assert_all_bad_path(s: &Setup, targets: &[&[u8]]) {
    let mut wrong = Vec::new();
    for target in targets {
        let keys = [
            ("no key", None),
            ("users:read", Some(s.reader.as_str())),
            ("admin:write", Some(s.admin.as_str())),
        ];
        for (who, key) in keys {
            let a = get(s.app.proxy, target, key).await;
            if !a.is_bad_path() {
                wrong.push(format!(
                    "{} ({who}): {a:?}",
                    String::from_utf8_lossy(target)
                ));
            }
        }
    }
    let seen: Vec<String> = s
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        wrong.is_empty() && seen.is_empty(),
        "not refused as bad_path:\n{}\nforwarded: {seen:?}",
        wrong.join("\n")
    );
}

/// `None` if the request was forwarded and the upstream got exactly `want`, else what
/// went wrong.
async fn mismatch(s: &Setup, target: &[u8], key: &str, want: &[u8]) -> Option<String> {
    let a = get(s.app.proxy, target, Some(key)).await;
    let last = s.log.lock().unwrap().last().cloned();
    (a.status != 200 || a.body != want || last.as_deref() != Some(want)).then(|| {
        format!(
            "{}: want {:?}, got {a:?}",
            String::from_utf8_lossy(target),
            String::from_utf8_lossy(want)
        )
    })
}

async fn assert_forwarded(s: &Setup, target: &[u8], key: &str, want: &[u8]) {
    if let Some(m) = mismatch(s, target, key, want).await {
        panic!("{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_behind_params_are_400_bad_path_and_never_forwarded() {
    let targets: &[&[u8]] = &[
        b"/users/..;/admin/secret",
        b"/users/..;jsessionid=1/admin/secret",
        b"/users/.;/x",
        b"/users/%2e%2e;x/admin/secret",
        b"/users/%2E%2E;/admin/secret",
        b"/%2E;/admin/secret",
        b"/;x/admin/secret",
        b"/users//x/..;/../admin",
    ];
    for public_rest in [true, false] {
        let s = setup(public_rest).await;
        assert_all_bad_path(&s, targets).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_params_segment_that_changes_the_route_is_400_bad_path() {
    // `admin;x` is `admin` to Tomcat and Spring: as-is it would fall to the catch-all
    // and reach `/admin/secret` without `admin:write`.
    let targets: &[&[u8]] = &[
        b"/admin;x/secret",
        b"/admin;/secret",
        b"/admin;jsessionid=abc",
        b"/users;v=1/1",
        b"//admin;x/./secret",
    ];
    for public_rest in [true, false] {
        let s = setup(public_rest).await;
        assert_all_bad_path(&s, targets).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_that_pick_the_same_route_either_way_are_forwarded_unchanged() {
    let s = setup(true).await;
    for (target, want) in [
        (
            &b"/users/1;jsessionid=abc"[..],
            &b"/users/1;jsessionid=abc"[..],
        ),
        (
            b"/users//1;jsessionid=abc/./x",
            b"/users/1;jsessionid=abc/x",
        ),
        (b"/users/a;b=c/d;e", b"/users/a;b=c/d;e"),
    ] {
        assert_forwarded(&s, target, &s.reader, want).await;
    }
    assert_forwarded(&s, b"/admin/x;v=1", &s.admin, b"/admin/x;v=1").await;
    assert_forwarded(&s, b"/other;v=1/y", &s.reader, b"/other;v=1/y").await;
    // Still behind its route's scope.
    let a = get(s.app.proxy, b"/admin/x;v=1", Some(&s.reader)).await;
    assert_eq!(a.status, 403, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_utf8_in_a_path_reaches_the_upstream_byte_exact() {
    let s = setup(true).await;
    let mut wrong = Vec::new();
    for (target, want) in [
        // Each needs normalising, so the path is rebuilt, not passed through.
        (
            "/users/caf\u{e9}/x/..".as_bytes(),
            "/users/caf\u{e9}/".as_bytes(),
        ),
        ("/users//日本/./語".as_bytes(), "/users/日本/語".as_bytes()),
        (
            "/users/ünï/%7e/😀/".as_bytes(),
            "/users/ünï/~/😀/".as_bytes(),
        ),
        // Already normal: passed through as it came.
        ("/users/café".as_bytes(), "/users/café".as_bytes()),
    ] {
        wrong.extend(mismatch(&s, target, &s.reader, want).await);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Bytes that are not UTF-8 never reach keygate's routing (the HTTP parser refuses them).
    let before = s.log.lock().unwrap().len();
    let a = get(s.app.proxy, b"/users/caf\xe9/x", Some(&s.reader)).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(
        s.log.lock().unwrap().len(),
        before,
        "invalid UTF-8 was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_control_characters_and_double_encoding_are_400_bad_path() {
    let targets: &[&[u8]] = &[
        b"/users/a%00b",
        b"/users/a%0a",
        b"/users/a%0D%0AX-Injected:%201",
        b"/users/%1f",
        b"/users/%7F",
        b"/x/%00",
        b"/users/%252e%252e/admin/secret",
        b"/users/%252E%252E/admin/secret",
        b"/users%252fadmin",
        b"/users/a%255c",
        b"/users/a%25%32%65",
    ];
    for public_rest in [true, false] {
        let s = setup(public_rest).await;
        assert_all_bad_path(&s, targets).await;
    }
}
