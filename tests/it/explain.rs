//! `POST /v1/explain` and `keygate explain`: explain gives the proxy's own answer (status
//! and code) on every case of the proxy's decision tests (`proxy_auth.rs`, `paths.rs`,
//! `hostile.rs`), sent to both over real sockets; it has no side effects (last use, rate
//! limits, auth metrics); it follows the admin API's caller and tenant rules; the CLI
//! explains routes offline.

use crate::support::{eventually, spawn_app, Store, TestApp, ROOT};
use keygate::key::{Environment, KeyType, Prefixes};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request written by hand on a fresh connection (no client library rewrites the
/// method or the path): the status and keygate's `error.code`, or `allowed` when the
/// request reached the upstream. A HEAD answer has no body: its code is not known.
async fn proxy_answer(
    addr: SocketAddr,
    method: &str,
    target: &str,
    key: Option<&str>,
) -> (u16, String) {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: kg.test\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the proxy neither answered nor closed")
        .expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let code = if status == 200 {
        "allowed".to_string()
    } else if method == "HEAD" {
        "?".to_string()
    } else {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        v["error"]["code"].as_str().unwrap_or("?").to_string()
    };
    (status, code)
}

/// `POST /v1/explain` as `token` (the root token unless given), with `tenant` as
/// `X-Tenant-ID` when given.
async fn explain_as(app: &TestApp, token: &str, tenant: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.admin_url("/v1/explain"))
        .bearer_auth(token)
        .json(&body);
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    let resp = req.send().await.expect("admin reachable");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn explain(app: &TestApp, body: Value) -> Value {
    let (status, v) = explain_as(app, ROOT, None, body.clone()).await;
    assert_eq!(status, 200, "explain {body}: {v}");
    v
}

/// Explain's decision as the proxy's (status, code); a HEAD's code is not compared.
fn decided(v: &Value, method: &str) -> (u16, String) {
    let d = &v["decision"];
    let code = d["code"].as_str().unwrap_or("-").to_string();
    let status = match d["status"].as_u64() {
        Some(s) => s as u16,
        None if d["allowed"] == true && code == "allowed" => 200,
        None => 0,
    };
    let code = if method == "HEAD" && status != 200 {
        "?".into()
    } else {
        code
    };
    (status, code)
}

fn unissued_key() -> String {
    keygate::key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .unwrap()
        .text
}

/// Create a key through `POST /v1/api-keys` with the root token; returns (id, key).
async fn create_api_key(app: &TestApp, tenant: Option<&str>, body: Value) -> (String, String) {
    let mut req = app
        .http
        .post(app.admin_url("/v1/api-keys"))
        .bearer_auth(ROOT)
        .json(&body);
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201, "create {body}");
    let v: Value = resp.json().await.unwrap();
    (
        v["id"].as_str().unwrap().into(),
        v["key"].as_str().unwrap().into(),
    )
}

/// The methods and targets of the proxy's decision tests: scopes per method, public and
/// exact routes, no route, dot segments and params, encoded controls and double
/// encoding, raw UTF-8, a lower-case method.
const CASES: &[(&str, &str)] = &[
    ("GET", "/users/1"),
    ("HEAD", "/users/1"),
    ("POST", "/users/1"),
    ("PUT", "/users/1"),
    ("PATCH", "/users/1"),
    ("DELETE", "/users/1"),
    ("OPTIONS", "/users/1"),
    ("GET", "/admin/x"),
    ("GET", "/widgets/1"),
    ("GET", "/healthz"),
    ("GET", "/healthz/x"),
    ("GET", "/public/a/b/c"),
    ("GET", "/nowhere/at/all"),
    ("PATCH", "/upload/x"),
    ("POST", "/upload/x"),
    ("GET", "/users/%2e%2e/admin"),
    ("GET", "/users/../admin/x"),
    ("GET", "/users//x/./1?api_key=abc"),
    ("GET", "/users/..;/admin/secret"),
    ("GET", "/users/%2E%2E;/admin/secret"),
    ("GET", "/;x/admin/secret"),
    ("GET", "/admin;x/secret"),
    ("GET", "/users;v=1/1"),
    ("GET", "/users/1;jsessionid=abc"),
    ("GET", "/admin/x;v=1"),
    ("GET", "/users/a%00b"),
    ("GET", "/users/a%0D%0AX-Injected:%201"),
    ("GET", "/users/%252e%252e/admin/secret"),
    ("GET", "/users%252fadmin"),
    ("GET", "/users/a%25%32%65"),
    ("GET", "/users/%2F"),
    ("GET", "/users/caf\u{e9}/x/.."),
    ("GET", "/users/\u{65e5}\u{672c}/./\u{8a9e}"),
    ("delete", "/users/1"),
    ("get", "/healthz"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_proxy_on_the_whole_decision_matrix() {
    let app = spawn_app(Store::Memory).await;
    // Made first: it has expired by the time the other keys are made and checked.
    let (expired_id, expired) = create_api_key(
        &app,
        None,
        json!({"name": "short", "type": "secret", "scopes": ["*"], "expires_in": "1s"}),
    )
    .await;
    let mut keys: Vec<(&str, String, Option<String>)> = vec![
        ("malformed", "junk".into(), None),
        ("bad checksum", format!("{}A", &unissued_key()[..53]), None),
        ("unknown", unissued_key(), None),
    ];
    for (kind, scopes) in [
        ("secret users:read", &["users:read"][..]),
        ("secret users:write", &["users:write"][..]),
        ("secret users:*", &["users:*"][..]),
        ("secret *", &["*"][..]),
        ("secret admin", &["admin"][..]),
        ("secret without route scopes", &["nothing:relevant"][..]),
    ] {
        let k = app.create_key(scopes).await;
        keys.push((kind, k.key, Some(k.id)));
    }
    for (kind, scopes) in [
        ("publishable *", json!(["*"])),
        ("publishable users:read", json!(["users:read"])),
    ] {
        let body = json!({"name": "pk", "type": "publishable", "scopes": scopes});
        let (id, key) = create_api_key(&app, None, body).await;
        keys.push((kind, key, Some(id)));
    }
    let revoked = app.create_key(&["*"]).await;
    assert_eq!(app.revoke(&revoked.id).await.status(), 200);
    keys.push(("revoked", revoked.key, Some(revoked.id)));
    let gone = eventually(Duration::from_secs(5), || async {
        proxy_answer(app.proxy, "GET", "/users/1", Some(&expired))
            .await
            .0
            == 401
    })
    .await;
    assert!(gone, "the 1 s key did not expire");
    keys.push(("expired", expired, Some(expired_id)));

    let mut wrong = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (method, target) in CASES {
        for (kind, key, id) in &keys {
            let proxy = proxy_answer(app.proxy, method, target, Some(key)).await;
            seen.insert(proxy.1.clone());
            let by_key = explain(&app, json!({"method": method, "path": target, "key": key})).await;
            let mut answers = vec![("key", decided(&by_key, method))];
            if let Some(id) = id {
                let by_id = explain(
                    &app,
                    json!({"method": method, "path": target, "key_id": id}),
                )
                .await;
                answers.push(("key_id", decided(&by_id, method)));
            }
            for (how, got) in answers {
                if got != proxy {
                    wrong.push(format!(
                        "{method} {target} with {kind} ({how}): proxy {proxy:?}, explain {got:?}"
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "explain disagrees with the proxy:\n{}",
        wrong.join("\n")
    );
    // The matrix covers every refusal explain can give, and admissions.
    for code in [
        "allowed",
        "bad_method",
        "bad_path",
        "no_route",
        "malformed_key",
        "unknown_key",
        "expired_key",
        "revoked_key",
        "publishable_key_not_allowed",
        "insufficient_scope",
    ] {
        assert!(seen.contains(code), "no case gave {code}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_normalized_path_the_route_and_the_reasons() {
    let app = spawn_app(Store::Memory).await;
    let reader = app.create_key(&["users:read"]).await;
    let v = explain(
        &app,
        json!({"method": "DELETE", "path": "/users//1/./x/..", "key": reader.key}),
    )
    .await;
    assert_eq!(v["normalized_path"], "/users/1/", "{v}");
    assert_eq!(
        v["route"],
        json!({"name": "users-write", "scopes": ["users:write"], "auth": "key", "allow_publishable": false})
    );
    assert_eq!(
        v["decision"],
        json!({"allowed": false, "status": 403, "code": "insufficient_scope"})
    );
    let reasons: Vec<&str> = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for want in [
        "path normalized from /users//1/./x/.. to /users/1/",
        "route users-write requires scopes [users:write]",
        "key lacks scope users:write",
    ] {
        assert!(reasons.contains(&want), "no reason {want:?} in {reasons:?}");
    }
    let v = explain(
        &app,
        json!({"method": "GET", "path": "/users/%2e%2e/admin", "key": reader.key}),
    )
    .await;
    assert_eq!(v["normalized_path"], "/admin");
    assert_eq!(v["route"]["name"], "admin-area", "{v}");
    assert_eq!(v["decision"]["code"], "insufficient_scope");
    assert!(
        v["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("key lacks scope admin")),
        "{v}"
    );
    let v = explain(
        &app,
        json!({"method": "GET", "path": "/users/%2e%2e/nowhere", "key": reader.key}),
    )
    .await;
    assert_eq!(v["normalized_path"], "/nowhere");
    assert_eq!(v["route"], Value::Null);
    assert_eq!(
        v["decision"],
        json!({"allowed": false, "status": 404, "code": "no_route"})
    );
    let v = explain(
        &app,
        json!({"method": "GET", "path": "/users/%2F", "key": reader.key}),
    )
    .await;
    assert_eq!(v["normalized_path"], Value::Null);
    assert_eq!(v["decision"]["code"], "bad_path");
    let v = explain(
        &app,
        json!({"method": "GET", "path": "/users/7", "key_id": reader.id}),
    )
    .await;
    assert_eq!(
        v["decision"],
        json!({"allowed": true, "status": null, "code": "allowed"})
    );
}

/// `keygate_auth_duration_seconds`' observations, over all labels.
async fn auth_observations(app: &TestApp) -> f64 {
    let text = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("keygate_auth_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn last_used_at(app: &TestApp, id: &str) -> Value {
    let resp = app
        .http
        .get(app.admin_url(&format!("/v1/api-keys/{id}")))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    v["last_used_at"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_spends_no_rate_limit_and_notes_no_use() {
    let app = spawn_app(Store::Memory).await;
    let body = json!({"name": "once a minute", "type": "secret", "scopes": ["users:read"],
        "ratelimits": [{"name": "per-minute", "limit": 1, "duration": "1m"}]});
    let (id, key) = create_api_key(&app, None, body).await;
    let before = auth_observations(&app).await;
    for ask in [
        json!({"key": key}),
        json!({"key_id": id}),
        json!({"key": key}),
    ] {
        let mut body = json!({"method": "GET", "path": "/users/1"});
        body.as_object_mut()
            .unwrap()
            .extend(ask.as_object().unwrap().clone());
        let v = explain(&app, body).await;
        assert_eq!(v["decision"]["code"], "allowed", "{v}");
    }
    assert_eq!(
        auth_observations(&app).await,
        before,
        "explain was counted as a proxy decision"
    );
    // Well past `last_used_interval` (200 ms): a noted use would be written by now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        last_used_at(&app, &id).await,
        Value::Null,
        "explain noted a use"
    );
    // The minute's one request is still there.
    let (status, code) = proxy_answer(app.proxy, "GET", "/users/1", Some(&key)).await;
    assert_eq!((status, code.as_str()), (200, "allowed"));
    // And the proxy's use is what shows.
    let used = eventually(Duration::from_secs(5), || async {
        last_used_at(&app, &id).await.is_string()
    })
    .await;
    assert!(used, "the proxy's use was never written");
    assert!(auth_observations(&app).await > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_follows_the_caller_and_tenant_rules() {
    let app = spawn_app(Store::Memory).await;
    let manager = app.create_key_in(Some("acme"), &["keys:read"]).await;
    let acme_key = app.create_key_in(Some("acme"), &["users:read"]).await;
    let other = app.create_key(&["users:read"]).await;
    let ask = |k: &str| json!({"method": "GET", "path": "/users/1", "key": k});
    let ask_id = |id: &str| json!({"method": "GET", "path": "/users/1", "key_id": id});

    let (status, v) = explain_as(&app, &manager.key, None, ask(&acme_key.key)).await;
    assert_eq!(
        (status, &v["decision"]["code"]),
        (200, &json!("allowed")),
        "{v}"
    );
    let (status, v) = explain_as(&app, &manager.key, None, ask_id(&acme_key.id)).await;
    assert_eq!(
        (status, &v["decision"]["code"]),
        (200, &json!("allowed")),
        "{v}"
    );
    // Another tenant's key, by text or by id: as if it did not exist.
    for body in [ask(&other.key), ask_id(&other.id)] {
        let (status, v) = explain_as(&app, &manager.key, None, body).await;
        assert_eq!(
            (status, &v["error"]["code"]),
            (404, &json!("key_not_found")),
            "{v}"
        );
    }
    // Keys that tell nothing about any tenant are explained.
    let (status, v) = explain_as(&app, &manager.key, None, ask("junk")).await;
    assert_eq!(
        (status, &v["decision"]["code"]),
        (200, &json!("malformed_key")),
        "{v}"
    );
    let (status, v) = explain_as(&app, &manager.key, Some("default"), ask(&acme_key.key)).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (403, &json!("tenant_mismatch")),
        "{v}"
    );
    // The root token explains in the tenant it names.
    let (status, _) = explain_as(&app, ROOT, Some("acme"), ask(&acme_key.key)).await;
    assert_eq!(status, 200);
    let (status, _) = explain_as(&app, ROOT, None, ask(&acme_key.key)).await;
    assert_eq!(status, 404);
    // Needs keys:read; a key without it, or none, is refused.
    let (status, v) = explain_as(&app, &acme_key.key, None, ask(&acme_key.key)).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (403, &json!("insufficient_scope")),
        "{v}"
    );
    let resp = app
        .http
        .post(app.admin_url("/v1/explain"))
        .json(&ask("junk"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_explain_bodies_are_the_admin_apis_400s() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    for (body, code) in [
        (json!({"method": "GET", "path": "/"}), "invalid_body"),
        (
            json!({"method": "GET", "path": "/", "key": k.key, "key_id": k.id}),
            "invalid_body",
        ),
        (
            json!({"method": "GET", "path": "/", "key": null}),
            "invalid_body",
        ),
        (
            json!({"method": "GET", "path": "/", "key_id": null, "key": k.key}),
            "invalid_body",
        ),
        (
            json!({"method": "GET", "path": "/", "key": k.key, "headers": {}}),
            "invalid_body",
        ),
        (json!({"path": "/", "key": k.key}), "invalid_body"),
        (
            json!({"method": "GET", "path": 5, "key": k.key}),
            "invalid_body",
        ),
        (
            json!({"method": "G T", "path": "/", "key": k.key}),
            "invalid_field",
        ),
        (
            json!({"method": "", "path": "/", "key": k.key}),
            "invalid_field",
        ),
        (
            json!({"method": "A".repeat(65), "path": "/", "key": k.key}),
            "invalid_field",
        ),
    ] {
        let (status, v) = explain_as(&app, ROOT, None, body.clone()).await;
        assert_eq!(
            (status, &v["error"]["code"]),
            (400, &json!(code)),
            "{body}: {v}"
        );
    }
    let (status, v) = explain_as(
        &app,
        ROOT,
        None,
        json!({"method": "GET", "path": "/", "key_id": "nope"}),
    )
    .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (404, &json!("key_not_found")),
        "{v}"
    );
    let resp = app
        .http
        .post(app.admin_url("/v1/explain"))
        .bearer_auth(ROOT)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let huge = json!({"method": "GET", "path": format!("/{}", "a".repeat(70_000)), "key": k.key});
    let (status, _) = explain_as(&app, ROOT, None, huge).await;
    assert_eq!(status, 413);
}

/// The keygate binary with no `KEYGATE_*` variables inherited.
fn keygate() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
        cmd.env_remove(k);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

async fn run_explain(config: &Path, method: &str, path: &str) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        keygate()
            .arg("explain")
            .arg("--config")
            .arg(config)
            .arg(method)
            .arg(path)
            .output(),
    )
    .await
    .expect("keygate explain did not exit within 15 s")
    .expect("run keygate");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_explains_a_route_offline() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    std::fs::write(
        &config,
        "proxy:\n  listen: 127.0.0.1:0\n  upstream: http://127.0.0.1:3000\nstore:\n  \
         redis: { url: \"redis://127.0.0.1:1/0\" }\nroutes:\n  \
         - { name: search, methods: [GET], path: \"/search/**\", scopes: [\"search:read\"] }\n  \
         - { name: health, path: /healthz, auth: none }\nunmatched: deny\n",
    )
    .unwrap();
    // The store is never contacted (nothing listens on port 1).
    let (code, out, err) = run_explain(&config, "GET", "/search/%2e/a/../b").await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    for want in [
        "normalized path: /search/b",
        "route: search",
        "requires scopes [search:read]",
    ] {
        assert!(out.contains(want), "stdout lacks {want:?}: {out}");
    }
    let (code, out, _) = run_explain(&config, "GET", "/healthz").await;
    assert_eq!(code, Some(0));
    assert!(out.contains("public"), "{out}");
    for (method, path, want) in [
        ("GET", "/users/%2e%2e/admin", "no_route"),
        ("POST", "/search/x", "no_route"),
        ("GET", "/search/%2F", "bad_path"),
        ("get", "/search/x", "bad_method"),
    ] {
        let (code, out, err) = run_explain(&config, method, path).await;
        assert_eq!(code, Some(1), "{method} {path}: stdout {out}\nstderr {err}");
        assert!(
            err.contains(want),
            "{method} {path}: stderr lacks {want}: {err}"
        );
    }
    let (code, _, err) = run_explain(&config, "G T", "/").await;
    assert_eq!(code, Some(2), "{err}");
    std::fs::write(&config, "proxy:\n  listen: 127.0.0.1:0\n  upstreem: x\n").unwrap();
    let (code, _, err) = run_explain(&config, "GET", "/").await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("keygate.yaml") && err.contains("upstreem"),
        "{err}"
    );
}
