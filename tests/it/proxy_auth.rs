//! The proxy's allow/deny matrix, as a client sees it: status, the JSON `error.code`
//! and the exact `WWW-Authenticate` challenge (RFC 6750) for every refusal, and the
//! echo upstream's answer for every request that is let through.
//!
//! Not covered here: publishable keys. The public admin API (`POST /v1/keys`) only
//! creates secret keys, so a real publishable key cannot be made from outside the
//! process; `check_record`'s publishable rule is left to unit tests.

use crate::support::{
    assert_error, eventually, spawn_app, spawn_app_with, Store, ROOT, TEST_CONFIG,
};
use keygate::key::{Environment, KeyType, Prefixes};
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::Response;
use serde_json::{json, Value};
use std::time::Duration;

const CHALLENGE: &str = "Bearer realm=\"keygate\"";
const INVALID_TOKEN: &str = "Bearer realm=\"keygate\", error=\"invalid_token\"";
const INVALID_REQUEST: &str = "Bearer realm=\"keygate\", error=\"invalid_request\"";

/// The single `WWW-Authenticate` value of a response (panics if there are several).
fn challenge(h: &reqwest::header::HeaderMap) -> Option<String> {
    let all: Vec<_> = h.get_all(WWW_AUTHENTICATE).iter().collect();
    assert!(all.len() <= 1, "more than one WWW-Authenticate: {all:?}");
    all.first().map(|v| v.to_str().unwrap().to_string())
}

/// Assert a keygate refusal: status, code and the exact challenge (or none).
async fn assert_denied(resp: Response, status: u16, code: &str, www: Option<&str>) {
    let h = assert_error(resp, status, code).await;
    assert_eq!(challenge(&h).as_deref(), www, "WWW-Authenticate for {code}");
}

/// Assert the request reached the echo upstream; returns what the upstream saw.
async fn assert_forwarded(resp: Response, method: &str, path: &str) -> Value {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(
        status, 200,
        "expected the upstream's answer, got {status}: {body}"
    );
    let seen: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("echo JSON: {e}: {body}"));
    assert_eq!(seen["method"], method, "{seen}");
    assert_eq!(seen["path"], path, "{seen}");
    seen
}

/// A key that passes the format check (prefix, length, checksum) but was never issued.
fn unissued_key() -> String {
    keygate::key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .unwrap()
        .text
}

/// `key` with the character at `pos` replaced by another base62 character.
fn flip(key: &str, pos: usize) -> String {
    let mut b = key.as_bytes().to_vec();
    b[pos] = if b[pos] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_key_with_scope_is_forwarded() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    assert_forwarded(app.get_with("/users/1", &k.key).await, "GET", "/users/1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_authorization_is_401_missing_key_with_plain_challenge() {
    let app = spawn_app(Store::Memory).await;
    let resp = app
        .http
        .get(app.proxy_url("/users/1"))
        .send()
        .await
        .unwrap();
    assert_denied(resp, 401, "missing_key", Some(CHALLENGE)).await;
    // An empty header value is no key either, and not a different scheme.
    let resp = app
        .http
        .get(app.proxy_url("/users/1"))
        .header(AUTHORIZATION, "")
        .send()
        .await
        .unwrap();
    let got = resp.status().as_u16();
    assert_eq!(got, 401, "empty Authorization");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_schemes_are_401_unsupported_and_bearer_is_case_insensitive() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    for value in [
        "Basic dXNlcjpwYXNz".to_string(),
        format!("Token {}", k.key),
        format!("Digest {}", k.key),
    ] {
        let resp = app
            .http
            .get(app.proxy_url("/users/1"))
            .header(AUTHORIZATION, value)
            .send()
            .await
            .unwrap();
        assert_denied(resp, 401, "unsupported_auth_scheme", Some(CHALLENGE)).await;
    }
    // The bare key with no scheme at all is not accepted either.
    let resp = app
        .http
        .get(app.proxy_url("/users/1"))
        .header(AUTHORIZATION, k.key.clone())
        .send()
        .await
        .unwrap();
    assert_denied(resp, 401, "unsupported_auth_scheme", Some(CHALLENGE)).await;

    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = app
            .http
            .get(app.proxy_url("/users/1"))
            .header(AUTHORIZATION, format!("{scheme} {}", k.key))
            .send()
            .await
            .unwrap();
        assert_forwarded(resp, "GET", "/users/1").await;
    }
    // "Bearer" with no token is a malformed key, not a missing one.
    let resp = app
        .http
        .get(app.proxy_url("/users/1"))
        .header(AUTHORIZATION, "Bearer")
        .send()
        .await
        .unwrap();
    assert_denied(resp, 401, "malformed_key", Some(INVALID_TOKEN)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_400() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    // Even when both carry the same valid key.
    for second in [k.key.clone(), unissued_key()] {
        let resp = app
            .http
            .get(app.proxy_url("/users/1"))
            .header(AUTHORIZATION, format!("Bearer {}", k.key))
            .header(AUTHORIZATION, format!("Bearer {second}"))
            .send()
            .await
            .unwrap();
        assert_denied(resp, 400, "multiple_authorization", Some(INVALID_REQUEST)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_wrong_checksum_are_401_malformed_key() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let body_pos = "sk_live_".len() + 5;
    let checksum_pos = k.key.len() - 1;
    let junk = [
        "hello".to_string(),
        "sk_live_".to_string(),
        "sk_live_tooshort".to_string(),
        format!("{}x", k.key),                 // one character too many
        k.key[..k.key.len() - 1].to_string(),  // one too few
        format!("xx_live_{}", &k.key[8..]),    // unknown prefix
        flip(&k.key, body_pos),                // body typo: checksum mismatch
        flip(&k.key, checksum_pos),            // checksum typo
        k.key.replace("sk_live_", "sk_test_"), // right body, other prefix: checksum covers it
    ];
    for token in junk {
        assert_ne!(token, k.key);
        let resp = app.get_with("/users/1", &token).await;
        let h = assert_error(resp, 401, "malformed_key").await;
        assert_eq!(
            challenge(&h).as_deref(),
            Some(INVALID_TOKEN),
            "token {token:?}"
        );
    }
    // The real key still works afterwards.
    assert_forwarded(app.get_with("/users/1", &k.key).await, "GET", "/users/1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_formed_unissued_key_is_401_unknown_key() {
    let app = spawn_app(Store::Memory).await;
    let _issued = app.create_key(&["*"]).await;
    let unknown = unissued_key();
    // Twice: the second answer comes from the negative cache and must not differ.
    for _ in 0..2 {
        let resp = app.get_with("/users/1", &unknown).await;
        assert_denied(resp, 401, "unknown_key", Some(INVALID_TOKEN)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_is_403_immediately_after_delete_returns() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let other = app.create_key(&["users:read"]).await;
    // Used (and so cached) before the revocation.
    assert_forwarded(app.get_with("/users/1", &k.key).await, "GET", "/users/1").await;
    let resp = app.revoke(&k.id).await;
    assert_eq!(resp.status(), 200, "revoke: {}", resp.text().await.unwrap());
    // No waiting: the very next request is refused.
    let resp = app.get_with("/users/1", &k.key).await;
    assert_denied(resp, 403, "revoked_key", Some(INVALID_TOKEN)).await;
    // On a fresh connection too, and on every route.
    let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = fresh
        .get(app.proxy_url("/widgets/1"))
        .bearer_auth(&k.key)
        .send()
        .await
        .unwrap();
    assert_denied(resp, 403, "revoked_key", Some(INVALID_TOKEN)).await;
    // Other keys are unaffected.
    assert_forwarded(
        app.get_with("/users/1", &other.key).await,
        "GET",
        "/users/1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_turns_into_401_expired_key() {
    let app = spawn_app(Store::Memory).await;
    let resp = app
        .http
        .post(app.admin_url("/v1/keys"))
        .bearer_auth(ROOT)
        .json(&json!({"label": "short-lived", "scopes": ["users:read"], "expires_in": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert!(body["expires_at"].is_string(), "{body}");
    let key = body["key"].as_str().unwrap().to_string();

    // Valid until it expires (creation to here is milliseconds, the lifetime one second).
    assert_forwarded(app.get_with("/users/1", &key).await, "GET", "/users/1").await;

    let expired = eventually(Duration::from_secs(5), || async {
        app.get_with("/users/1", &key).await.status() == 401
    })
    .await;
    assert!(expired, "the key was still accepted 5 s after a 1 s expiry");
    let resp = app.get_with("/users/1", &key).await;
    assert_denied(resp, 401, "expired_key", Some(INVALID_TOKEN)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_scope_is_403_with_scope_challenge() {
    let app = spawn_app(Store::Memory).await;
    let reader = app.create_key(&["users:read"]).await;
    let resp = app
        .http
        .post(app.proxy_url("/users/1"))
        .bearer_auth(&reader.key)
        .send()
        .await
        .unwrap();
    assert_denied(
        resp,
        403,
        "insufficient_scope",
        Some("Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:write\""),
    )
    .await;

    let other = app.create_key(&["widgets:read", "files:write"]).await;
    let resp = app.get_with("/users/1", &other.key).await;
    assert_denied(
        resp,
        403,
        "insufficient_scope",
        Some("Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:read\""),
    )
    .await;
    // A scope that merely starts like the required one does not grant it.
    let lookalike = app.create_key(&["users:readonly", "users"]).await;
    let resp = app.get_with("/users/1", &lookalike.key).await;
    assert_error(resp, 403, "insufficient_scope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_and_prefix_wildcard_scopes_pass_users_routes() {
    let app = spawn_app(Store::Memory).await;
    for scopes in [&["*"][..], &["users:*"][..]] {
        let k = app.create_key(scopes).await;
        assert_forwarded(app.get_with("/users/1", &k.key).await, "GET", "/users/1").await;
        let resp = app
            .http
            .post(app.proxy_url("/users/1"))
            .bearer_auth(&k.key)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_forwarded(resp, "POST", "/users/1").await;
    }
    // `users:*` is not `*`: the admin area still needs `admin`.
    let k = app.create_key(&["users:*"]).await;
    let resp = app.get_with("/admin/x", &k.key).await;
    assert_denied(
        resp,
        403,
        "insufficient_scope",
        Some("Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"admin\""),
    )
    .await;
    let star = app.create_key(&["*"]).await;
    assert_forwarded(app.get_with("/admin/x", &star.key).await, "GET", "/admin/x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_pass_without_a_key() {
    let app = spawn_app(Store::Memory).await;
    for path in ["/healthz", "/public/a", "/public/a/b/c"] {
        let resp = app.http.get(app.proxy_url(path)).send().await.unwrap();
        assert_forwarded(resp, "GET", path).await;
    }
    // A junk key does not make a public route refuse.
    let resp = app.get_with("/public/a", "junk").await;
    assert_forwarded(resp, "GET", "/public/a").await;
    // The exact pattern `/healthz` is not a prefix.
    let resp = app
        .http
        .get(app.proxy_url("/healthz/x"))
        .send()
        .await
        .unwrap();
    assert_denied(resp, 404, "no_route", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_path_is_404_no_route_even_with_a_key() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    let resp = app
        .http
        .get(app.proxy_url("/nowhere"))
        .send()
        .await
        .unwrap();
    assert_denied(resp, 404, "no_route", None).await;
    let resp = app.get_with("/nowhere/at/all", &k.key).await;
    assert_denied(resp, 404, "no_route", None).await;
    // Method-restricted routes don't match other methods either: PATCH /upload/x.
    let resp = app
        .http
        .patch(app.proxy_url("/upload/x"))
        .bearer_auth(&k.key)
        .send()
        .await
        .unwrap();
    assert_denied(resp, 404, "no_route", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_require_key_lets_any_valid_key_through() {
    let config = TEST_CONFIG.replace("unmatched: deny", "unmatched: require_key");
    assert_ne!(config, TEST_CONFIG);
    let app = spawn_app_with(&config, Store::Memory).await;
    let k = app.create_key(&["nothing:relevant"]).await;
    assert_forwarded(
        app.get_with("/nowhere/x", &k.key).await,
        "GET",
        "/nowhere/x",
    )
    .await;

    let resp = app
        .http
        .get(app.proxy_url("/nowhere/x"))
        .send()
        .await
        .unwrap();
    assert_denied(resp, 401, "missing_key", Some(CHALLENGE)).await;
    let resp = app.get_with("/nowhere/x", &unissued_key()).await;
    assert_denied(resp, 401, "unknown_key", Some(INVALID_TOKEN)).await;
    let resp = app.get_with("/nowhere/x", "junk").await;
    assert_denied(resp, 401, "malformed_key", Some(INVALID_TOKEN)).await;
    // Matched routes keep their own scopes.
    let resp = app.get_with("/users/1", &k.key).await;
    assert_error(resp, 403, "insufficient_scope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_in_query_string_is_never_accepted() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["*"]).await;
    for param in ["api_key", "access_token", "key", "token"] {
        let url = app.proxy_url(&format!("/users/1?{param}={}", k.key));
        let resp = app.http.get(url).send().await.unwrap();
        assert_denied(resp, 401, "missing_key", Some(CHALLENGE)).await;
    }
    // A form body carrying `access_token` (RFC 6750 2.2) is not looked at either.
    let resp = app
        .http
        .post(app.proxy_url("/users/1"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("access_token={}", k.key))
        .send()
        .await
        .unwrap();
    assert_denied(resp, 401, "missing_key", Some(CHALLENGE)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_selects_the_route_and_its_scope() {
    let app = spawn_app(Store::Memory).await;
    let reader = app.create_key(&["users:read"]).await;
    let writer = app.create_key(&["users:write"]).await;
    let send = |method: reqwest::Method, key: String| {
        app.http
            .request(method, app.proxy_url("/users/1"))
            .bearer_auth(key)
            .send()
    };

    assert_forwarded(
        send(reqwest::Method::GET, reader.key.clone())
            .await
            .unwrap(),
        "GET",
        "/users/1",
    )
    .await;
    let head = send(reqwest::Method::HEAD, reader.key.clone())
        .await
        .unwrap();
    assert_eq!(head.status(), 200, "HEAD with users:read");
    for m in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::PATCH,
        reqwest::Method::DELETE,
    ] {
        let resp = send(m.clone(), reader.key.clone()).await.unwrap();
        assert_error(resp, 403, "insufficient_scope").await;
        let resp = send(m.clone(), writer.key.clone()).await.unwrap();
        assert_forwarded(resp, m.as_str(), "/users/1").await;
    }
    let resp = send(reqwest::Method::GET, writer.key.clone())
        .await
        .unwrap();
    assert_denied(
        resp,
        403,
        "insufficient_scope",
        Some("Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"users:read\""),
    )
    .await;
    // No users route lists OPTIONS.
    let resp = send(reqwest::Method::OPTIONS, reader.key.clone())
        .await
        .unwrap();
    assert_denied(resp, 404, "no_route", None).await;
}

/// Send `tokens` (one `GET /users/1` each) on one keep-alive connection, `PIPELINE` at a
/// time, and return the status of every answer, in order. Raw HTTP/1.1 keeps the client's
/// own cost low, so the 10,000 requests mostly measure keygate.
async fn statuses_on_one_connection(proxy: std::net::SocketAddr, tokens: &[String]) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PIPELINE: usize = 16;
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let mut statuses = Vec::with_capacity(tokens.len());
    for batch in tokens.chunks(PIPELINE) {
        let mut out = String::new();
        for t in batch {
            out.push_str(&format!(
                "GET /users/1 HTTP/1.1\r\nHost: kg.test\r\nAuthorization: Bearer {t}\r\n\r\n"
            ));
        }
        stream.write_all(out.as_bytes()).await.unwrap();
        for _ in batch {
            // Head, then a Content-Length body.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 8192];
                let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                    .await
                    .expect("no answer within 10 s")
                    .unwrap();
                assert!(
                    n > 0,
                    "the proxy closed the connection after {} answers",
                    statuses.len()
                );
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("keygate's answers carry Content-Length");
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head_end + len);
            statuses.push(status);
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_junk_tokens_are_all_refused() {
    const TOTAL: usize = 10_000;
    const CONNECTIONS: usize = 50;
    let app = spawn_app(Store::Memory).await;
    let real = app.create_key(&["*"]).await;
    let tokens: Vec<String> = (0..TOTAL)
        .map(|i| match i % 4 {
            // Well-formed but never issued.
            0 => unissued_key(),
            // The real key with one character changed.
            1 => flip(&real.key, 8 + i % 40),
            // Key-shaped garbage.
            2 => format!("sk_live_{i:046}"),
            _ => format!("junk-{i}"),
        })
        .collect();
    // 50 connections in flight at once, each with its share of the tokens.
    let mut workers = tokio::task::JoinSet::new();
    for (n, share) in tokens.chunks(TOTAL / CONNECTIONS).enumerate() {
        let (proxy, share) = (app.proxy, share.to_vec());
        workers.spawn(async move { (n, statuses_on_one_connection(proxy, &share).await) });
    }
    let mut answered = 0;
    while let Some(r) = workers.join_next().await {
        let (n, statuses) = r.expect("worker panicked");
        for (j, status) in statuses.iter().enumerate() {
            let i = n * (TOTAL / CONNECTIONS) + j;
            assert_eq!(*status, 401, "token #{i} {:?} was not refused", tokens[i]);
        }
        answered += statuses.len();
    }
    assert_eq!(answered, TOTAL);
    // And the real key still gets through.
    assert_forwarded(app.get_with("/users/1", &real.key).await, "GET", "/users/1").await;
}
