//! Forwarding, as the upstream and the client see it: identity headers set (and spoofed
//! ones dropped), Authorization and hop-by-hop headers stripped, `X-Forwarded-*`, path
//! normalisation, upstream failures, size limits, request framing, HTTP/2, WebSocket and
//! keep-alive.
//!
//! Requests whose exact bytes matter (paths, framing, repeated headers) are written by
//! hand over a `TcpStream`, so no client library rewrites them on the way.

use crate::raw::*;
use crate::support::{
    assert_error, spawn_app, spawn_app_upstream, spawn_app_with, Store, TEST_CONFIG,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
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
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------
// Configs and upstreams of the tests' own
// ---------------------------------------------------------------------------------

/// How much of a request body the recording upstream got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyState {
    Reading(u64),
    Complete(u64),
    Failed(u64),
}

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: BodyState,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An upstream that records every request head it receives and how its body ended,
/// and answers 200 after reading the whole body.
async fn spawn_recorder() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let accept_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = accept_log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| record(req, log.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, log)
}

async fn record(
    req: http::Request<Incoming>,
    log: Log,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let idx = {
        let mut l = log.lock().unwrap();
        l.push(Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            body: BodyState::Reading(0),
        });
        l.len() - 1
    };
    let mut body = req.into_body();
    let mut n = 0u64;
    let end = loop {
        match body.frame().await {
            None => break BodyState::Complete(n),
            Some(Err(_)) => break BodyState::Failed(n),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    n += d.len() as u64;
                }
                log.lock().unwrap()[idx].body = BodyState::Reading(n);
            }
        }
    };
    log.lock().unwrap()[idx].body = end;
    Ok(http::Response::new(Full::new(Bytes::from(format!(
        "{{\"body_bytes\":{n}}}"
    )))))
}

fn seen(log: &Log) -> Vec<Seen> {
    log.lock().unwrap().clone()
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------
// Identity, Authorization, hop-by-hop, X-Forwarded-*
// ---------------------------------------------------------------------------------

const SPOOFED: &str = "x-keygate-key-id: forged\r\nX-Keygate-Tenant: evil\r\nx-keygate-tenant: evil2\r\nX-KEYGATE-SCOPES: *\r\nx-keygate-key-type: root\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_reach_upstream_and_spoofed_ones_never_do() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read", "widgets:read"]).await;
    let resp = exchange(
        app.proxy,
        get("/users/1", &format!("{}{SPOOFED}", bearer(&k.key))),
    )
    .await;
    let seen = resp.echoed();
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-id"),
        [k.id.as_str()],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-tenant"),
        ["default"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-scopes"),
        ["users:read widgets:read"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-type"),
        ["secret"],
        "{seen}"
    );

    // Another tenant's key carries its own tenant.
    let acme = app.create_key_in(Some("acme"), &["*"]).await;
    let resp = app
        .http
        .get(app.proxy_url("/users/2"))
        .bearer_auth(&acme.key)
        .header("x-keygate-tenant", "default")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(
        upstream_header(&seen, "x-keygate-tenant"),
        ["acme"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-id"),
        [acme.id.as_str()],
        "{seen}"
    );
    assert_eq!(upstream_header(&seen, "x-keygate-scopes"), ["*"], "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_strip_identity_headers_and_set_none() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    for extra in [SPOOFED.to_string(), format!("{}{SPOOFED}", bearer(&k.key))] {
        for path in ["/public/a", "/healthz"] {
            let seen = exchange(app.proxy, get(path, &extra)).await.echoed();
            for h in [
                "x-keygate-key-id",
                "x-keygate-tenant",
                "x-keygate-scopes",
                "x-keygate-key-type",
            ] {
                assert!(
                    upstream_header(&seen, h).is_empty(),
                    "{h} reached the upstream: {seen}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_stripped_by_default() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    let extra = format!(
        "{}Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n",
        bearer(&k.key)
    );
    for path in ["/users/1", "/public/a"] {
        let seen = exchange(app.proxy, get(path, &extra)).await.echoed();
        assert!(upstream_header(&seen, "authorization").is_empty(), "{seen}");
        assert!(
            upstream_header(&seen, "proxy-authorization").is_empty(),
            "{seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_forwarded_when_configured() {
    let config = with_proxy_line("forward_authorization: true");
    let app = spawn_app_with(&config, Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    let seen = exchange(app.proxy, get("/users/1", &bearer(&k.key)))
        .await
        .echoed();
    assert_eq!(
        upstream_header(&seen, "authorization"),
        [format!("Bearer {}", k.key)],
        "{seen}"
    );
    // Still authenticated: identity is set alongside.
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-id"),
        [k.id.as_str()],
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_reach_upstream() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let extra = format!(
        "{}Connection: keep-alive, x-custom-hop\r\n\
         Connection: X-Other-Hop\r\n\
         X-Custom-Hop: 1\r\n\
         X-Other-Hop: 2\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Trailer: x-trailing\r\n\
         Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-Ordinary: yes\r\n\
         Accept: text/plain\r\n",
        bearer(&k.key)
    );
    for path in ["/users/1", "/public/a"] {
        let seen = exchange(app.proxy, get(path, &extra)).await.echoed();
        for h in [
            "connection",
            "x-custom-hop",
            "x-other-hop",
            "keep-alive",
            "te",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
        ] {
            assert!(
                upstream_header(&seen, h).is_empty(),
                "{h} reached the upstream: {seen}"
            );
        }
        assert_eq!(upstream_header(&seen, "x-ordinary"), ["yes"], "{seen}");
        assert_eq!(upstream_header(&seen, "accept"), ["text/plain"], "{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_from_untrusted_client_is_overwritten() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let request = format!(
        "GET /users/1 HTTP/1.1\r\nHost: api.example.test\r\n{}\
         X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n",
        bearer(&k.key)
    );
    let seen = exchange(app.proxy, request).await.echoed();
    assert_eq!(
        upstream_header(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-proto"),
        ["http"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-host"),
        ["api.example.test"],
        "{seen}"
    );

    // Through an ordinary client too: the Host it sends is the proxy's address.
    let resp = app
        .http
        .get(app.proxy_url("/public/a"))
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(
        upstream_header(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-host"),
        [app.proxy.to_string()],
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_from_trusted_proxy_is_extended() {
    let config = with_proxy_line("trusted_proxies: [\"127.0.0.1\"]");
    let app = spawn_app_with(&config, Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let request = format!(
        "GET /users/1 HTTP/1.1\r\nHost: api.example.test\r\n{}\
         X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: edge.example\r\n\r\n",
        bearer(&k.key)
    );
    let seen = exchange(app.proxy, request).await.echoed();
    assert_eq!(
        upstream_header(&seen, "x-forwarded-for"),
        ["1.2.3.4, 127.0.0.1"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-proto"),
        ["https"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-host"),
        ["edge.example"],
        "{seen}"
    );

    // A trusted peer that sends none gets the defaults.
    let seen = exchange(app.proxy, get("/public/a", "")).await.echoed();
    assert_eq!(
        upstream_header(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-proto"),
        ["http"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-forwarded-host"),
        ["kg.test"],
        "{seen}"
    );
}

// ---------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------

const ADMIN_CHALLENGE: &str =
    "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"admin\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_escape_into_the_admin_area() {
    let app = spawn_app(Store::Memory).await;
    let reader = app.create_key(&["users:read"]).await;
    let admin = app.create_key(&["admin"]).await;
    for path in [
        "/users/../admin/x",
        "//admin/x",
        "/users//../admin/x",
        "/users/./../admin/x",
        "/users/%2e%2e/admin/x",
        "/users/%2E%2E/admin/x",
        "/users/%2e%2E/admin/x",
        "/users/.%2e/admin/x",
        "/users/1/../../admin/x",
        "/../../admin/x",
    ] {
        let resp = exchange(app.proxy, get(path, &bearer(&reader.key))).await;
        resp.assert_error(403, "insufficient_scope");
        assert_eq!(
            resp.header("www-authenticate"),
            Some(ADMIN_CHALLENGE),
            "{path}"
        );
        // With the admin scope it is served, as the path it was matched as.
        let seen = exchange(app.proxy, get(path, &bearer(&admin.key)))
            .await
            .echoed();
        assert_eq!(seen["path"], "/admin/x", "{path}: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_and_bad_escapes_are_400_bad_path() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    for path in [
        "/users%2Fadmin",
        "/users%2fadmin",
        "/users/a%2fb",
        "/users/a%2Fb",
        "/users/%5c",
        "/users/%5C",
        "/users/%zz",
        "/users/%2",
        "/users/%",
        "/public/%2e%2e%2fadmin",
    ] {
        let resp = exchange(app.proxy, get(path, &bearer(&k.key))).await;
        resp.assert_error(400, "bad_path");
        // Refused before authentication: no key needed to learn that.
        let resp = exchange(app.proxy, get(path, "")).await;
        resp.assert_error(400, "bad_path");
    }
    // A raw backslash is refused too (by keygate or by the HTTP parser).
    let resp = exchange(app.proxy, get("/users/a\\b", &bearer(&k.key))).await;
    assert_eq!(resp.status, 400, "raw backslash: {resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalised_path_arrives_upstream_and_query_is_preserved() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    for (sent, path, query) in [
        ("/users//1/./x", "/users/1/x", None),
        (
            "/users//1/./x?b=2&a=%2F&c",
            "/users/1/x",
            Some("b=2&a=%2F&c"),
        ),
        (
            "/users/1/x/..?q=/../admin",
            "/users/1/",
            Some("q=/../admin"),
        ),
        ("/users/%7euser/%41", "/users/~user/A", None),
        ("/users/a%3fb", "/users/a%3Fb", None),
        ("/users/1?x=%2e%2e%2F", "/users/1", Some("x=%2e%2e%2F")),
        ("/users/.hidden/..x", "/users/.hidden/..x", None),
    ] {
        let seen = exchange(app.proxy, get(sent, &bearer(&k.key)))
            .await
            .echoed();
        assert_eq!(seen["path"], path, "{sent}: {seen}");
        assert_eq!(seen["query"].as_str(), query, "{sent}: {seen}");
    }
}

// ---------------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502() {
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, closed_port().await).await;
    let k = app.create_key(&["users:read"]).await;
    let resp = app
        .http
        .get(app.proxy_url("/public/a"))
        .send()
        .await
        .unwrap();
    let h = assert_error(resp, 502, "upstream_unavailable").await;
    assert!(h.get("www-authenticate").is_none());
    let resp = app.get_with("/users/1", &k.key).await;
    assert_error(resp, 502, "upstream_unavailable").await;
    // Authentication still comes first.
    let resp = app
        .http
        .get(app.proxy_url("/users/1"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "missing_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_after_the_upstream_timeout() {
    let app = spawn_app(Store::Memory).await;
    // Under the 2 s upstream timeout: served.
    let resp = app
        .http
        .get(app.proxy_url("/__sleep?ms=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Over it: keygate answers 504 itself rather than waiting the 3 s out (the request
    // is bounded well above the timeout, so a hang fails instead of blocking).
    let resp = app
        .http
        .get(app.proxy_url("/__sleep?ms=3000"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_error(resp, 504, "upstream_timeout").await;
}

// ---------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_head_over_max_header_bytes_is_431() {
    let config = with_proxy_line("limits: { max_header_bytes: 8192 }");
    let app = spawn_app_with(&config, Store::Memory).await;
    let small = format!("X-Filler: {}\r\n", "a".repeat(2 * 1024));
    let big = format!("X-Filler: {}\r\n", "a".repeat(10 * 1024));
    exchange(app.proxy, get("/public/a", &small)).await.echoed();
    let resp = exchange(app.proxy, get("/public/a", &big)).await;
    assert_eq!(resp.status, 431, "{resp:?}");

    // The default limit (64 KiB) lets the same 10 KB header through.
    let default = spawn_app(Store::Memory).await;
    let seen = exchange(default.proxy, get("/public/a", &big))
        .await
        .echoed();
    assert_eq!(upstream_header(&seen, "x-filler")[0].len(), 10 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_over_max_uri_bytes_is_414() {
    let config = with_proxy_line("limits: { max_uri_bytes: 100 }");
    let app = spawn_app_with(&config, Store::Memory).await;
    let ok = format!("/public/{}", "a".repeat(90));
    let long = format!("/public/{}", "a".repeat(150));
    let long_query = format!("/public/a?q={}", "a".repeat(120));
    assert_eq!(
        app.http
            .get(app.proxy_url(&ok))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for target in [long, long_query] {
        let resp = app.http.get(app.proxy_url(&target)).send().await.unwrap();
        assert_error(resp, 414, "uri_too_long").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_route_limit_with_content_length_is_413() {
    let (upstream, log) = spawn_recorder().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    let k = app.create_key(&["*"]).await;
    let post = |n: usize| {
        app.http
            .post(app.proxy_url("/small/x"))
            .bearer_auth(&k.key)
            .body(vec![b'x'; n])
            .send()
    };
    // At and under the limit: forwarded whole.
    for n in [1000, 1024] {
        let resp = post(n).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["body_bytes"], n, "{body}");
    }
    let resp = post(2000).await.unwrap();
    let h = assert_error(resp, 413, "body_too_large").await;
    assert_eq!(
        h.get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    // Refused on the declared length: the upstream never saw a third request.
    let small: Vec<Seen> = seen(&log)
        .into_iter()
        .filter(|s| s.path == "/small/x")
        .collect();
    assert_eq!(small.len(), 2, "{small:?}");
    assert!(
        small
            .iter()
            .all(|s| s.method == "POST" && matches!(s.body, BodyState::Complete(n) if n <= 1024)),
        "{small:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_route_limit_is_413_and_never_reaches_upstream_whole() {
    let (upstream, log) = spawn_recorder().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    let k = app.create_key(&["*"]).await;
    let chunk = "y".repeat(1000);
    let mut request = format!(
        "POST /small/x HTTP/1.1\r\nHost: kg.test\r\n{}Transfer-Encoding: chunked\r\n\r\n",
        bearer(&k.key)
    );
    for _ in 0..4 {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    let mut c = RawConn::connect(app.proxy).await;
    c.send(&request).await;
    let resp = c.expect_response().await;
    resp.assert_error(413, "body_too_large");
    // The upstream may have started on the body, but never got all 4000 bytes.
    let ok = crate::support::eventually(Duration::from_secs(5), || async {
        seen(&log)
            .iter()
            .all(|s| !matches!(s.body, BodyState::Reading(_)))
    })
    .await;
    assert!(ok, "the upstream is still reading: {:?}", seen(&log));
    for s in seen(&log) {
        assert!(
            !matches!(s.body, BodyState::Complete(n) if n > 1024),
            "the upstream received an over-limit body: {s:?}"
        );
    }
    // A chunked body within the limit goes through whole.
    let request = format!(
        "POST /small/x HTTP/1.1\r\nHost: kg.test\r\n{}Transfer-Encoding: chunked\r\n\r\n\
         200\r\n{}\r\n200\r\n{}\r\n0\r\n\r\n",
        bearer(&k.key),
        "z".repeat(512),
        "z".repeat(512)
    );
    let resp = exchange(app.proxy, request).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["body_bytes"], 1024);
}

// ---------------------------------------------------------------------------------
// Framing and smuggling
// ---------------------------------------------------------------------------------

/// `POST /public/a` framed by both headers, in `order`; its body, read as chunked,
/// ends at once and is followed by a smuggled `GET /public/smuggled`.
fn cl_te_request(te_first: bool) -> String {
    let smuggled = "0\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: kg.test\r\n\r\n";
    let cl = format!("Content-Length: {}\r\n", smuggled.len());
    let te = "Transfer-Encoding: chunked\r\n";
    let (first, second) = if te_first {
        (te.to_string(), cl)
    } else {
        (cl, te.to_string())
    };
    format!("POST /public/a HTTP/1.1\r\nHost: kg.test\r\n{first}{second}\r\n{smuggled}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_framed_once_and_smuggles_nothing() {
    let (upstream, log) = spawn_recorder().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    for te_first in [false, true] {
        let before = seen(&log).len();
        let mut c = RawConn::connect(app.proxy).await;
        c.send(cl_te_request(te_first)).await;
        let first = c.expect_response().await;
        // Nothing more comes on this connection: it is closed.
        let next = c.response().await;
        assert!(
            next.is_none(),
            "te_first={te_first}: a second response arrived: {next:?}"
        );
        assert!(
            seen(&log).iter().all(|s| s.path != "/public/smuggled"),
            "te_first={te_first}: the smuggled request reached the upstream: {:?}",
            seen(&log)
        );
        // hyper drops Content-Length in favour of chunked framing (RFC 9112 6.3) and
        // closes the connection afterwards: either that single request or a 400 is fine.
        let reached: Vec<_> = seen(&log)
            .into_iter()
            .skip(before)
            .filter(|s| s.path == "/public/a")
            .collect();
        assert!(
            first.status == 400 || (first.status == 200 && reached.len() == 1),
            "te_first={te_first}: answered {} and the upstream saw {:?}",
            first.status,
            seen(&log)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_400() {
    let (upstream, log) = spawn_recorder().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
    ] {
        let request = format!("POST /public/a HTTP/1.1\r\nHost: kg.test\r\n{lengths}\r\nhello!");
        let mut c = RawConn::connect(app.proxy).await;
        c.send(request).await;
        let resp = c.expect_response().await;
        assert_eq!(resp.status, 400, "{lengths:?}: {resp:?}");
        assert!(
            c.response().await.is_none(),
            "{lengths:?}: the connection stayed open"
        );
    }
    assert!(seen(&log).is_empty(), "the upstream saw {:?}", seen(&log));
}

// ---------------------------------------------------------------------------------
// Protocols
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_is_proxied_with_identity() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .get(app.proxy_url("/users/1?x=1"))
        .bearer_auth(&k.key)
        .header("x-keygate-tenant", "evil")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(seen["path"], "/users/1", "{seen}");
    assert_eq!(seen["query"], "x=1", "{seen}");
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-id"),
        [k.id.as_str()],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-tenant"),
        ["default"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-scopes"),
        ["users:read"],
        "{seen}"
    );
    assert_eq!(
        upstream_header(&seen, "x-keygate-key-type"),
        ["secret"],
        "{seen}"
    );
    assert!(upstream_header(&seen, "authorization").is_empty(), "{seen}");

    // Refusals over HTTP/2 are the same JSON answers.
    let resp = h2.get(app.proxy_url("/users/1")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_error(resp, 401, "missing_key").await;
    let resp = h2
        .post(app.proxy_url("/users/1"))
        .bearer_auth(&k.key)
        .send()
        .await
        .unwrap();
    assert_error(resp, 403, "insufficient_scope").await;
}

/// A WebSocket echo server that also reports the headers of each handshake it accepts.
#[allow(clippy::result_large_err)] // tungstenite's callback signature, not ours
async fn spawn_ws_echo() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let log = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let callback = move |req: &Request, resp: Response| {
                    log.lock().unwrap().push(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_tunnelled_for_a_valid_key() {
    let (upstream, handshakes) = spawn_ws_echo().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    let k = app.create_key(&["chat"]).await;

    let mut req = format!("ws://{}/ws/room", app.proxy)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", k.key).parse().unwrap(),
    );
    let stream = TcpStream::connect(app.proxy).await.unwrap();
    let (mut ws, resp) =
        tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("handshake timed out")
            .expect("handshake");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(READ_TIMEOUT, ws.next())
            .await
            .expect("echo timed out")
            .expect("stream open")
            .expect("a message");
        assert_eq!(echoed.to_text().unwrap(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), [0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();

    // The upstream's handshake carried the identity, not the key.
    let hs = handshakes.lock().unwrap().clone();
    assert_eq!(hs.len(), 1, "{hs:?}");
    assert_eq!(hs[0].get("x-keygate-key-id").unwrap(), k.id.as_str());
    assert_eq!(hs[0].get("x-keygate-scopes").unwrap(), "chat");
    assert!(hs[0].get("authorization").is_none(), "{:?}", hs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshake_without_key_is_401() {
    let (upstream, handshakes) = spawn_ws_echo().await;
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    for auth in [None, Some("Bearer junk".to_string())] {
        let mut req = format!("ws://{}/ws/room", app.proxy)
            .into_client_request()
            .unwrap();
        if let Some(a) = &auth {
            req.headers_mut()
                .insert("authorization", a.parse().unwrap());
        }
        let stream = TcpStream::connect(app.proxy).await.unwrap();
        let err = tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("handshake timed out")
            .expect_err("the handshake must be refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status(), 401, "{auth:?}");
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or(b"null")).unwrap();
                let want = if auth.is_none() {
                    "missing_key"
                } else {
                    "malformed_key"
                };
                assert_eq!(body["error"]["code"], want, "{body}");
            }
            other => panic!("{auth:?}: expected an HTTP refusal, got {other:?}"),
        }
    }
    assert!(
        handshakes.lock().unwrap().is_empty(),
        "the upstream saw a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    // One reqwest client: a mix of allowed and refused requests, all answered right.
    for i in 0..20 {
        let resp = if i % 3 == 2 {
            app.http
                .get(app.proxy_url(&format!("/users/{i}")))
                .send()
                .await
                .unwrap()
        } else {
            app.get_with(&format!("/users/{i}"), &k.key).await
        };
        if i % 3 == 2 {
            assert_error(resp, 401, "missing_key").await;
        } else {
            assert_eq!(resp.status(), 200, "request {i}");
            let seen: Value = resp.json().await.unwrap();
            assert_eq!(seen["path"], format!("/users/{i}"));
        }
    }
    // Provably one connection: several exchanges, and a refusal does not close it.
    let mut c = RawConn::connect(app.proxy).await;
    for i in 0..5 {
        c.send(get(&format!("/users/{i}"), &bearer(&k.key))).await;
        let seen = c.expect_response().await.echoed();
        assert_eq!(seen["path"], format!("/users/{i}"));
        c.send(get("/users/x", "")).await;
        c.expect_response().await.assert_error(401, "missing_key");
        c.send(get("/nowhere", "")).await;
        c.expect_response().await.assert_error(404, "no_route");
    }
    // Pipelined: two requests written at once, two answers in order.
    c.send(format!(
        "{}{}",
        get("/users/a", &bearer(&k.key)),
        get("/users/b", &bearer(&k.key))
    ))
    .await;
    assert_eq!(c.expect_response().await.echoed()["path"], "/users/a");
    assert_eq!(c.expect_response().await.echoed()["path"], "/users/b");
}

/// An upstream that answers one request per connection and then closes it without saying
/// so (no `Connection: close`), the way an app's keep-alive timeout races a proxy. Counts
/// the connections it accepted.
async fn spawn_one_shot_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Close at once, without `Connection: close`.
            });
        }
    });
    (addr, accepted)
}

/// `n` authenticated GETs in sequence through a keygate in front of `upstream`, on one
/// keep-alive client connection (reqwest's pool reuses it), `pause` apart; each must get
/// the upstream's `200 ok`.
async fn sequential_gets(upstream: SocketAddr, n: usize, pause: Duration) {
    let app = spawn_app_upstream(TEST_CONFIG, Store::Memory, upstream).await;
    let k = app.create_key(&["users:read"]).await;
    // Exactly one client connection (a pooled client may open a second one when the
    // next request starts before the last connection is back in its pool).
    let stream = TcpStream::connect(app.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..n {
        let req = hyper::Request::get("/users/1")
            .header("host", app.proxy.to_string())
            .header("authorization", format!("Bearer {}", k.key))
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok", "request {i}");
        tokio::time::sleep(pause).await;
    }
}

/// Each HTTP/1 client connection has its own upstream connection; when the upstream closed
/// it since the last request, keygate opens a new one instead of failing the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_between_requests_costs_no_failed_request() {
    let (upstream, accepted) = spawn_one_shot_upstream().await;
    sequential_gets(upstream, 20, Duration::from_millis(20)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        20,
        "one upstream connection per request, since the upstream closed each one"
    );
}

/// A keep-alive upstream connection is reused for the next request on the same client
/// connection: no connection per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_across_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req: hyper::Request<Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    sequential_gets(upstream, 50, Duration::ZERO).await;
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        n, 1,
        "50 requests on one client connection opened {n} upstream connections"
    );
}
