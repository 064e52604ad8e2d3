//! Importing existing keys (issue 15): `keygate import` (the built binary) loads 1,000
//! keys, half by text and half by SHA-256, into a keygate on real Redis with a
//! `keys.legacy` config; each authenticates through the proxy with its scopes; duplicates
//! fail alone; a token outside every format costs no Redis command; with a pepper both
//! kinds and keygate's own keys work; tenant rules and the 1,000-entry bound hold.

use crate::support::{
    assert_error, spawn_app_env, spawn_app_with, Redis, Store, TestApp, ROOT, TEST_CONFIG,
};
use serde_json::{json, Value};
use sha2::Digest as _;
use std::time::Duration;

/// Two legacy formats: `acme_` + 32 hex digits (imported by text), and 40 base64url
/// characters without a prefix (imported by SHA-256).
const LEGACY: &str = "keys:
  pepper_env: KEYGATE_PEPPER
  legacy:
    - { name: acme, prefix: acme_, min_length: 37, max_length: 37, charset: hex }
    - { name: old, min_length: 40, max_length: 40, charset: base64url }
";

fn config(negative_ttl: &str) -> String {
    TEST_CONFIG.replace("negative_ttl: 2s", &format!("negative_ttl: {negative_ttl}")) + LEGACY
}

async fn spawn(redis: &Redis, pepper: Option<&str>, negative_ttl: &str) -> TestApp {
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("start echo upstream");
    let env: Vec<(&str, &str)> = pepper.map(|p| ("KEYGATE_PEPPER", p)).into_iter().collect();
    spawn_app_env(&config(negative_ttl), Store::Redis(redis), upstream, &env).await
}

fn hex_key(i: usize) -> String {
    format!("acme_{:032x}", 0xabc0_0000_0000_0000_u128 + i as u128)
}

fn b64_key(i: usize) -> String {
    format!("old{i:08}_{}", "Zz9-".repeat(7))
}

fn sha256_hex(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn import(
    app: &TestApp,
    token: &str,
    tenant: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut req = app
        .http
        .post(app.admin_url("/v1/api-keys/import"))
        .bearer_auth(token)
        .json(&body);
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    req.send().await.expect("admin reachable")
}

async fn import_ok(app: &TestApp, body: Value) -> Value {
    let resp = import(app, ROOT, None, body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn status(app: &TestApp, method: reqwest::Method, key: &str) -> u16 {
    app.http
        .request(method, app.proxy_url("/users/1"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy reachable")
        .status()
        .as_u16()
}

/// The CLI against a keygate on real Redis: 1,000 keys in three batches, two duplicates
/// (one in the same batch as its original, one in a later batch) failing alone with their
/// line numbers; then every key authenticates once through the proxy, with its scopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_a_thousand_keys_that_authenticate_with_their_scopes() {
    let redis = Redis::start();
    let app = spawn(&redis, None, "2s").await;
    let mut lines = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..500 {
        let (text, legacy) = (hex_key(i), b64_key(i));
        lines.push(
            json!({"key": text, "name": format!("acme {i}"), "type": "secret",
                          "scopes": ["users:read"], "expires_at": null}),
        );
        lines.push(
            json!({"sha256": sha256_hex(&legacy), "name": format!("old {i}"),
                          "scopes": ["users:read"]}),
        );
        tokens.extend([text, legacy]);
    }
    // Line 3 repeats line 1 (same batch); line 1002 repeats line 2 (a later batch).
    lines.insert(2, lines[0].clone());
    lines.push(lines[1].clone());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "import",
            "--admin",
            &app.admin_url(""),
            "--batch",
            "500",
            "--file",
        ])
        .arg(&file)
        .env("KEYGATE_ADMIN_TOKEN", ROOT)
        .env_remove("KEYGATE_ROOT_TOKEN")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("import finished within 60 s")
        .expect("run keygate import");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a line failed: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("1000 imported, 2 failed"), "{stdout}");
    assert!(stdout.contains("line 3: duplicate_key"), "{stdout}");
    assert!(stdout.contains("line 1002: duplicate_key"), "{stdout}");
    assert!(stderr.contains("import: 500/1002 lines sent"), "{stderr}");
    assert!(
        stderr.contains("import: 1002/1002 lines sent, 1000 imported, 2 failed"),
        "{stderr}"
    );

    for t in &tokens {
        assert_eq!(status(&app, reqwest::Method::GET, t).await, 200, "{t}");
    }
    for t in tokens.iter().step_by(97) {
        assert_eq!(status(&app, reqwest::Method::DELETE, t).await, 403, "{t}");
    }
    // Listed like any other key: 1,000 in the default tenant.
    let list: Value = app
        .http
        .get(app.admin_url("/v1/api-keys?limit=1000"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1000);
    let hashed = data.iter().find(|k| k["name"] == "old 7").unwrap();
    let texted = data.iter().find(|k| k["name"] == "acme 7").unwrap();
    assert_eq!(
        (hashed["prefix"].as_str(), hashed["last_four"].as_str()),
        (Some(""), Some(""))
    );
    assert_eq!(texted["prefix"], "acme_0000");

    // Rotation of an imported key issues a keygate key; revocation stops the old one.
    let rotated: Value = app
        .http
        .post(app.admin_url("/v1/api-keys/rotate"))
        .bearer_auth(ROOT)
        .json(&json!({"id": hashed["id"], "grace_period": "0s"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = rotated["key"].as_str().unwrap();
    assert!(new.starts_with("sk_live_"), "{rotated}");
    assert_eq!(status(&app, reqwest::Method::GET, new).await, 200);
    let old = &tokens[15]; // "old 7"
    assert_eq!(status(&app, reqwest::Method::GET, old).await, 403);
    app.stop().await;
}

/// A token that matches no keygate prefix and no legacy format is refused as
/// `malformed_key` without a store read; one that fits a format but is unknown costs one
/// read. A keygate key whose plain SHA-256 was imported by hash never authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_outside_every_format_cost_no_redis_command() {
    let redis = Redis::start();
    let app = spawn(&redis, None, "2s").await;
    assert!(app.becomes_ready().await);
    let reads =
        |redis: &Redis| redis.calls("hgetall") + redis.calls("eval") + redis.calls("evalsha");
    for junk in [
        "acme_0123456789abcdef0123456789abcdeg", // not hex
        "acme_0123",                             // short
        "short-token",
        &"x".repeat(41), // base64url, but 41 long
    ] {
        redis.reset_stats();
        let resp = app.get_with("/users/1", junk).await;
        assert_error(resp, 401, "malformed_key").await;
        assert_eq!(reads(&redis), 0, "{junk} read the store");
    }
    redis.reset_stats();
    assert_error(
        app.get_with("/users/1", &hex_key(9)).await,
        401,
        "unknown_key",
    )
    .await;
    assert_eq!(
        redis.calls("hgetall"),
        1,
        "one read for a well-formed unknown key"
    );

    // The plain SHA-256 of a keygate key, imported by hash: that record is marked, and a
    // keygate-format token never matches it (without a pepper the digests are equal).
    let made = keygate::key::generate(
        &keygate::key::Prefixes::default(),
        keygate::key::KeyType::Secret,
        keygate::key::Environment::Live,
    )
    .unwrap();
    let answer = import_ok(
        &app,
        json!({"keys": [
        {"sha256": sha256_hex(&made.text), "name": "keygate key by hash", "scopes": ["*"]}]}),
    )
    .await;
    assert_eq!(answer["imported"], 1, "{answer}");
    assert_error(
        app.get_with("/users/1", &made.text).await,
        401,
        "unknown_key",
    )
    .await;
    app.stop().await;
}

/// With `KEYGATE_PEPPER`: a key imported by text (peppered digest) and one imported by
/// SHA-256 (its second digest) both authenticate, and so does a keygate key. A key found
/// by its second digest keeps its first one's miss cached as long as itself: its later
/// requests read nothing, even after the negative TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pepper_both_kinds_and_keygate_keys_authenticate() {
    let redis = Redis::start();
    let app = spawn(&redis, Some("pepper-for-the-import-test"), "200ms").await;
    let (text, legacy) = (hex_key(1), b64_key(1));
    let answer = import_ok(
        &app,
        json!({"keys": [
        {"key": text, "name": "by text", "scopes": ["users:read"]},
        {"sha256": sha256_hex(&legacy).to_uppercase(), "name": "by hash", "scopes": ["users:read"]},
        {"key": legacy, "name": "again by text", "scopes": ["users:read"]}]}),
    )
    .await;
    assert_eq!(answer["imported"], 2, "{answer}");
    // The text of a key imported by hash is a duplicate too.
    assert_eq!(answer["errors"][0]["index"], 2, "{answer}");
    assert_eq!(answer["errors"][0]["code"], "duplicate_key", "{answer}");
    let made = app.create_key(&["users:read"]).await;
    for t in [&text, &legacy, &made.key] {
        assert_eq!(status(&app, reqwest::Method::GET, t).await, 200, "{t}");
        assert_eq!(status(&app, reqwest::Method::DELETE, t).await, 403, "{t}");
    }
    // The plain SHA-256 is tried for legacy tokens only.
    let plain = keygate::key::generate(
        &keygate::key::Prefixes::default(),
        keygate::key::KeyType::Secret,
        keygate::key::Environment::Live,
    )
    .unwrap();
    import_ok(
        &app,
        json!({"keys": [{"sha256": sha256_hex(&plain.text), "name": "x"}]}),
    )
    .await;
    assert_error(
        app.get_with("/users/1", &plain.text).await,
        401,
        "unknown_key",
    )
    .await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.reset_stats();
    for _ in 0..3 {
        assert_eq!(status(&app, reqwest::Method::GET, &legacy).await, 200);
    }
    assert_eq!(
        redis.calls("hgetall"),
        0,
        "a cached hash-imported key read the store"
    );
    app.stop().await;
}

/// More than 1,000 entries is 400 for the whole call; an empty list too.
#[tokio::test]
async fn more_than_a_thousand_entries_are_refused() {
    let app = spawn_app_with(&(TEST_CONFIG.to_string() + LEGACY), Store::Memory).await;
    let entries: Vec<Value> = (0..1001)
        .map(|i| json!({"key": hex_key(i), "name": "n"}))
        .collect();
    let resp = import(&app, ROOT, None, json!({"keys": entries})).await;
    assert_error(resp, 400, "invalid_field").await;
    let resp = import(&app, ROOT, None, json!({"keys": []})).await;
    assert_error(resp, 400, "invalid_field").await;
    // A shape error anywhere refuses the call, naming the entry.
    let resp = import(
        &app,
        ROOT,
        None,
        json!({"keys": [{"key": hex_key(1), "name": "n", "colour": 1}]}),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys[0]"),
        "{body}"
    );
    // Per-entry rules fail alone.
    let answer = import_ok(
        &app,
        json!({"keys": [
        {"key": "too-short", "name": "n"},
        {"key": hex_key(1), "sha256": sha256_hex("x"), "name": "n"},
        {"sha256": "abc", "name": "n"},
        {"key": hex_key(2), "name": ""},
        {"key": hex_key(3), "name": "n", "expires_at": "2001-01-01T00:00:00Z"},
        {"key": "no-format-matches-this-one", "name": "warned"},
        {"key": hex_key(4), "name": "fine", "expires_at": "2999-01-01T00:00:00Z"}]}),
    )
    .await;
    let codes: Vec<(u64, &str)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            (0, "invalid_field"),
            (1, "invalid_field"),
            (2, "invalid_field"),
            (3, "invalid_field"),
            (4, "invalid_field")
        ],
        "{answer}"
    );
    assert_eq!(answer["imported"], 2, "{answer}");
    assert_eq!(answer["warnings"][0]["index"], 5, "{answer}");
    assert_eq!(
        answer["warnings"][0]["code"], "format_not_accepted",
        "{answer}"
    );
    app.stop().await;
}

/// A tenant-bound management key imports into its own tenant only, and only scopes it
/// holds; the root token may name any tenant.
#[tokio::test]
async fn a_tenant_bound_key_cannot_import_into_another_tenant() {
    let app = spawn_app_with(&(TEST_CONFIG.to_string() + LEGACY), Store::Memory).await;
    let manager = app
        .create_key_in(Some("acme"), &["keys:*", "users:read"])
        .await;
    let one = |tenant: Option<&str>, scopes: &[&str]| {
        let mut e = json!({"key": hex_key(7), "name": "n", "scopes": scopes});
        if let Some(t) = tenant {
            e["tenant"] = json!(t);
        }
        json!({"keys": [e]})
    };
    let resp = import(
        &app,
        &manager.key,
        Some("other"),
        one(None, &["users:read"]),
    )
    .await;
    assert_error(resp, 403, "tenant_mismatch").await;
    for (tenant, scopes, code) in [
        (Some("other"), &["users:read"][..], "tenant_mismatch"),
        (None, &["admin"][..], "scope_escalation"),
        (Some("bad tenant"), &["users:read"][..], "invalid_tenant"),
    ] {
        let resp = import(&app, &manager.key, None, one(tenant, scopes)).await;
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["errors"][0]["code"], code, "{answer}");
        assert_eq!(answer["imported"], 0, "{answer}");
    }
    let resp = import(&app, &manager.key, None, one(Some("acme"), &["users:read"])).await;
    let answer: Value = resp.json().await.unwrap();
    let id = answer["keys"][0]["id"].as_str().unwrap().to_string();
    let get = |token: &str| {
        app.http
            .get(app.admin_url(&format!("/v1/api-keys/{id}")))
            .bearer_auth(token.to_string())
            .send()
    };
    assert_eq!(get(&manager.key).await.unwrap().status(), 200);
    assert_eq!(
        get(ROOT).await.unwrap().status(),
        404,
        "not in the default tenant"
    );
    let answer: Value = import(
        &app,
        ROOT,
        None,
        json!({"keys": [
        {"key": hex_key(8), "name": "n", "tenant": "other"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(answer["imported"], 1, "{answer}");
    assert_eq!(app.get_with("/users/1", &hex_key(8)).await.status(), 200);
    app.stop().await;
}
