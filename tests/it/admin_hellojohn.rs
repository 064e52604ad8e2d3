//! The HelloJohn document's surface on the admin port (`/v1/api-keys`: list with filters,
//! create, get, patch, delete, rotate), publishable keys at the proxy, rotation grace
//! periods, scope changes enforced at once (also across replicas on Redis), the one key
//! model shared with the jack surface (`/v1/keys`), strict input, and tenants; races:
//! concurrent rotations make one successor, a PATCH racing a revoke never answers 200
//! for a revoked key (both on memory and Redis).
//! All over real sockets against an in-process keygate (memory store unless said).

use crate::support::{assert_error, eventually, spawn_app, Key, Redis, Store, TestApp, ROOT};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The tenant of the document's examples.
const TENANT: &str = "tnt_01HABCDEF654321";
/// Another tenant.
const OTHER: &str = "tnt_01HOTHER000000";

/// The fields of the document's "API Key Object".
const KEY_OBJECT_FIELDS: [&str; 10] = [
    "id",
    "name",
    "type",
    "prefix",
    "last_four",
    "scopes",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked",
];

// ---------------------------------------------------------------------------------------
// helpers

/// An admin request with a bearer and an optional `X-Tenant-ID`.
fn admin(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: &str,
    tenant: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut req = app
        .http
        .request(method, app.admin_url(path))
        .bearer_auth(bearer);
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    req
}

async fn send(req: reqwest::RequestBuilder) -> reqwest::Response {
    req.send().await.expect("admin reachable")
}

/// `POST /v1/api-keys` with a JSON body.
async fn create(
    app: &TestApp,
    bearer: &str,
    tenant: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    send(admin(app, Method::POST, "/v1/api-keys", bearer, tenant).json(body)).await
}

/// Create as `bearer`; panics unless 201.
async fn create_as(app: &TestApp, bearer: &str, tenant: Option<&str>, body: &Value) -> Key {
    let resp = create(app, bearer, tenant, body).await;
    let body = json_of(resp, 201, "create key").await;
    Key {
        id: body["id"].as_str().expect("id").to_string(),
        key: body["key"].as_str().expect("key").to_string(),
        body,
    }
}

/// Create with the root token in `TENANT`.
async fn root_create(app: &TestApp, body: &Value) -> Key {
    create_as(app, ROOT, Some(TENANT), body).await
}

/// A secret key in `TENANT` named "svc" with `scopes`.
async fn secret(app: &TestApp, scopes: &[&str]) -> Key {
    root_create(
        app,
        &json!({"name": "svc", "type": "secret", "scopes": scopes}),
    )
    .await
}

async fn get_key(app: &TestApp, bearer: &str, tenant: Option<&str>, id: &str) -> reqwest::Response {
    send(admin(
        app,
        Method::GET,
        &format!("/v1/api-keys/{id}"),
        bearer,
        tenant,
    ))
    .await
}

/// `GET /v1/api-keys/{id}` as root in `TENANT`; panics unless 200.
async fn get_ok(app: &TestApp, id: &str) -> Value {
    json_of(get_key(app, ROOT, Some(TENANT), id).await, 200, "get key").await
}

async fn list(
    app: &TestApp,
    bearer: &str,
    tenant: Option<&str>,
    query: &[(&str, &str)],
) -> reqwest::Response {
    send(admin(app, Method::GET, "/v1/api-keys", bearer, tenant).query(query)).await
}

/// `GET /v1/api-keys` as root in `TENANT`: (data, next_cursor).
async fn list_ok(app: &TestApp, query: &[(&str, &str)]) -> (Vec<Value>, Value) {
    let body = json_of(list(app, ROOT, Some(TENANT), query).await, 200, "list").await;
    let data = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("`data` is an array: {body}"))
        .clone();
    let next = body.get("next_cursor").cloned().unwrap_or(Value::Null);
    (data, next)
}

async fn patch(
    app: &TestApp,
    bearer: &str,
    tenant: Option<&str>,
    id: &str,
    body: &Value,
) -> reqwest::Response {
    send(
        admin(
            app,
            Method::PATCH,
            &format!("/v1/api-keys/{id}"),
            bearer,
            tenant,
        )
        .json(body),
    )
    .await
}

/// PATCH as root in `TENANT`; panics unless 200.
async fn patch_ok(app: &TestApp, id: &str, body: &Value) -> Value {
    json_of(patch(app, ROOT, Some(TENANT), id, body).await, 200, "patch").await
}

async fn delete(app: &TestApp, bearer: &str, tenant: Option<&str>, id: &str) -> reqwest::Response {
    send(admin(
        app,
        Method::DELETE,
        &format!("/v1/api-keys/{id}"),
        bearer,
        tenant,
    ))
    .await
}

async fn rotate(
    app: &TestApp,
    bearer: &str,
    tenant: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    send(admin(app, Method::POST, "/v1/api-keys/rotate", bearer, tenant).json(body)).await
}

/// Rotate as root in `TENANT`; panics unless 200.
async fn rotate_ok(app: &TestApp, body: &Value) -> Value {
    json_of(rotate(app, ROOT, Some(TENANT), body).await, 200, "rotate").await
}

/// `GET /v1/keys` (the jack surface) as root in `tenant`.
async fn jack_list(app: &TestApp, tenant: &str) -> Vec<Value> {
    let resp = send(admin(app, Method::GET, "/v1/keys", ROOT, Some(tenant))).await;
    let body = json_of(resp, 200, "jack list").await;
    body.as_array().expect("jack list is an array").clone()
}

/// The body of a response with status `want`.
async fn json_of(resp: reqwest::Response, want: u16, what: &str) -> Value {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: body {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// The body text of a response with status `want`.
async fn resp_text(resp: reqwest::Response, want: u16) -> String {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "body {text}");
    text
}

/// Status, code and message of a keygate JSON error.
async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not a keygate error body: {body}"))
        .to_string();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error without message: {body}"))
        .to_string();
    (status, code, message)
}

/// Proxy status of GET `path` with `key`.
async fn status_at(app: &TestApp, path: &str, key: &str) -> u16 {
    app.get_with(path, key).await.status().as_u16()
}

fn ids_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().expect("id is a string").to_string())
        .collect()
}

fn find<'a>(items: &'a [Value], id: &str) -> Option<&'a Value> {
    items.iter().find(|i| i["id"] == id)
}

/// An RFC 3339 UTC instant (`...Z`).
fn at(v: &Value) -> SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 string, got {v}"));
    assert!(s.ends_with('Z'), "{s:?} should end with Z");
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

/// `b - a` in seconds (negative when b is earlier).
fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Assert `t` lies in `[lo + offset - 2 s, hi + offset + 2 s]` (timestamps are shown to the
/// second).
fn assert_near(t: SystemTime, lo: SystemTime, hi: SystemTime, offset: Duration, what: &str) {
    let from = lo + offset - Duration::from_secs(2);
    let to = hi + offset + Duration::from_secs(2);
    assert!(
        t >= from && t <= to,
        "{what}: {} is not within [{}, {}]",
        humantime::format_rfc3339_seconds(t),
        humantime::format_rfc3339_seconds(from),
        humantime::format_rfc3339_seconds(to),
    );
}

/// The document's key object: all its fields, no `key`, consistent with the created key.
fn assert_key_object(obj: &Value, created: &Key) {
    let map = obj
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {obj}"));
    for f in KEY_OBJECT_FIELDS {
        assert!(map.contains_key(f), "missing documented field {f}: {obj}");
    }
    assert!(
        !map.contains_key("key"),
        "the key object shows the key: {obj}"
    );
    assert_eq!(obj["id"], created.id.as_str());
    let prefix = obj["prefix"].as_str().expect("prefix");
    assert!(
        created.key.starts_with(prefix) && prefix.len() < created.key.len(),
        "prefix {prefix:?} is a proper prefix of the key"
    );
    assert_eq!(
        obj["last_four"].as_str().expect("last_four"),
        &created.key[created.key.len() - 4..]
    );
    assert_eq!(obj["name"], created.body["name"]);
    assert_eq!(obj["type"], created.body["type"]);
    assert_eq!(obj["scopes"], created.body["scopes"]);
    assert_eq!(obj["created_at"], created.body["created_at"]);
    assert_eq!(obj["expires_at"], created.body["expires_at"]);
    assert!(obj["revoked"].is_boolean(), "{obj}");
    assert!(obj["last_used_at"].is_null() || obj["last_used_at"].is_string());
}

// ---------------------------------------------------------------------------------------
// the document's calls as written

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_as_documented_returns_201_with_the_documented_fields() {
    let app = spawn_app(Store::Memory).await;
    let resp = app
        .http
        .post(app.admin_url("/v1/api-keys"))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .header("Content-Type", "application/json")
        .body(
            r#"{
"name": "Analytics Service",
"type": "secret",
"scopes": ["users:read", "sessions:read"],
"expires_in": "90d"
}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "201 Created");
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store"),
        "a response carrying a secret must not be cached"
    );
    let body: Value = resp.json().await.unwrap();
    let obj = body.as_object().expect("an object");
    for f in [
        "id",
        "name",
        "type",
        "key",
        "scopes",
        "expires_at",
        "created_at",
    ] {
        assert!(obj.contains_key(f), "missing documented field {f}: {body}");
    }
    assert!(body["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(body["name"], "Analytics Service");
    assert_eq!(body["type"], "secret");
    let key = body["key"].as_str().unwrap();
    assert!(key.starts_with("sk_live_"), "a secret live key: {key}");
    assert!(
        key.len() >= "sk_live_".len() + 32,
        "a long random key: {key}"
    );
    assert_eq!(body["scopes"], json!(["users:read", "sessions:read"]));
    let d = secs_between(at(&body["created_at"]), at(&body["expires_at"]));
    let ninety_days = 90.0 * 86_400.0;
    assert!(
        (ninety_days - 2.0..=ninety_days + 2.0).contains(&d),
        "expires_at - created_at = {d} s, want 90 days"
    );
    let created = at(&body["created_at"]);
    assert!(
        secs_between(created, SystemTime::now()).abs() < 60.0,
        "created_at is now"
    );

    // The key works at the proxy for the scopes it was given.
    assert_eq!(status_at(&app, "/users/1", key).await, 200);
    assert_error(
        app.get_with("/admin/x", key).await,
        403,
        "insufficient_scope",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_as_documented_returns_data_of_key_objects_without_keys() {
    let app = spawn_app(Store::Memory).await;
    let a = root_create(
        &app,
        &json!({"name": "Production Backend", "type": "secret"}),
    )
    .await;
    let b = root_create(
        &app,
        &json!({"name": "Analytics Service", "type": "secret",
                "scopes": ["users:read", "sessions:read"], "expires_in": "90d"}),
    )
    .await;
    let c = root_create(&app, &json!({"name": "Web", "type": "publishable"})).await;

    // Exactly the curl example.
    let resp = app
        .http
        .get(app.admin_url("/v1/api-keys"))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    for k in [&a, &b, &c] {
        let tail = &k.key[k.body["prefix"].as_str().unwrap().len()..];
        assert!(!text.contains(&k.key), "a full key leaked into the list");
        assert!(!text.contains(tail), "key material leaked into the list");
    }
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let data = body["data"].as_array().expect("{\"data\": [...]}");
    assert_eq!(data.len(), 3, "{text}");
    assert_eq!(
        ids_of(data),
        vec![c.id.clone(), b.id.clone(), a.id.clone()],
        "newest first"
    );
    for k in [&a, &b, &c] {
        let item = find(data, &k.id).unwrap();
        assert_key_object(item, k);
        assert_eq!(item["revoked"], false);
        assert_eq!(item["last_used_at"], Value::Null, "never used");
    }
    assert_eq!(find(data, &a.id).unwrap()["scopes"], json!(["*"]));
    assert_eq!(find(data, &a.id).unwrap()["expires_at"], Value::Null);
    assert_eq!(find(data, &c.id).unwrap()["type"], "publishable");

    // Another tenant sees none of them.
    let resp = list(&app, ROOT, Some(OTHER), &[]).await;
    let other = json_of(resp, 200, "other tenant list").await;
    assert_eq!(other["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_as_documented_returns_the_key_object() {
    let app = spawn_app(Store::Memory).await;
    let k = root_create(
        &app,
        &json!({"name": "Analytics Service", "type": "secret",
                "scopes": ["users:read", "sessions:read"], "expires_in": "90d"}),
    )
    .await;
    let resp = app
        .http
        .get(app.admin_url(&format!("/v1/api-keys/{}", k.id)))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .send()
        .await
        .unwrap();
    let text = resp_text(resp, 200).await;
    assert!(!text.contains(&k.key), "GET shows the full key: {text}");
    let obj: Value = serde_json::from_str(&text).unwrap();
    assert_key_object(&obj, &k);
    assert_eq!(obj["revoked"], false);
    assert_eq!(obj["name"], "Analytics Service");
    assert_eq!(obj["scopes"], json!(["users:read", "sessions:read"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_as_documented_changes_name_and_scopes() {
    let app = spawn_app(Store::Memory).await;
    let k = root_create(
        &app,
        &json!({"name": "Analytics Service", "type": "secret",
                "scopes": ["users:read", "sessions:read"]}),
    )
    .await;

    let resp = app
        .http
        .patch(app.admin_url(&format!("/v1/api-keys/{}", k.id)))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .header("Content-Type", "application/json")
        .body(r#"{"name": "Reporting", "scopes": ["users:read", "audit-logs:read"]}"#)
        .send()
        .await
        .unwrap();
    let obj = json_of(resp, 200, "patch").await;
    assert_eq!(obj["id"], k.id.as_str());
    assert_eq!(obj["name"], "Reporting");
    assert_eq!(obj["scopes"], json!(["users:read", "audit-logs:read"]));
    assert!(obj.get("key").is_none(), "PATCH shows the key: {obj}");

    // Persisted, and each field is optional.
    let got = get_ok(&app, &k.id).await;
    assert_eq!(got["name"], "Reporting");
    assert_eq!(got["scopes"], json!(["users:read", "audit-logs:read"]));
    let only_name = patch_ok(&app, &k.id, &json!({"name": "Only Name"})).await;
    assert_eq!(only_name["name"], "Only Name");
    assert_eq!(
        only_name["scopes"],
        json!(["users:read", "audit-logs:read"])
    );
    let only_scopes = patch_ok(&app, &k.id, &json!({"scopes": ["sessions:read"]})).await;
    assert_eq!(only_scopes["name"], "Only Name");
    assert_eq!(only_scopes["scopes"], json!(["sessions:read"]));
    // Unchanged: type, prefix, created_at.
    assert_eq!(only_scopes["type"], "secret");
    assert_eq!(only_scopes["prefix"], k.body["prefix"]);
    assert_eq!(only_scopes["created_at"], k.body["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_as_documented_is_204_and_the_key_is_then_refused_revoked() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200, "cached now");

    let resp = app
        .http
        .delete(app.admin_url(&format!("/v1/api-keys/{}", k.id)))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204, "204 No Content");
    assert!(resp.bytes().await.unwrap().is_empty(), "no body on 204");

    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;
    let got = get_ok(&app, &k.id).await;
    assert_eq!(got["revoked"], true);

    // Revoked keys cannot be restored: a second DELETE changes nothing and the key stays
    // refused.
    let again = delete(&app, ROOT, Some(TENANT), &k.id).await;
    assert!(
        again.status() == 204 || again.status() == 404,
        "second delete: {}",
        again.status()
    );
    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;
    // Nor does a PATCH of the revoked key bring it back, whatever it answers.
    let p = patch(
        &app,
        ROOT,
        Some(TENANT),
        &k.id,
        &json!({"scopes": ["users:read", "users:write"]}),
    )
    .await;
    let p_status = p.status();
    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;
    assert_eq!(
        get_ok(&app, &k.id).await["revoked"],
        true,
        "after PATCH ({p_status})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_as_documented_returns_new_key_and_when_the_old_one_stops() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;

    let before = SystemTime::now();
    let resp = app
        .http
        .post(app.admin_url("/v1/api-keys/rotate"))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("X-Tenant-ID", TENANT)
        .header("Content-Type", "application/json")
        .body(format!(r#"{{"id": "{}", "grace_period": "24h"}}"#, old.id))
        .send()
        .await
        .unwrap();
    let after = SystemTime::now();
    let body = json_of(resp, 200, "rotate").await;
    for f in ["id", "key", "old_key_id", "old_key_revokes_at"] {
        assert!(
            body.get(f).is_some(),
            "missing documented field {f}: {body}"
        );
    }
    let new_id = body["id"].as_str().unwrap();
    assert_ne!(new_id, old.id, "a new key id");
    assert_eq!(body["old_key_id"], old.id.as_str());
    let new_key = body["key"].as_str().unwrap();
    assert!(new_key.starts_with("sk_live_"), "{new_key}");
    assert_ne!(new_key, old.key);
    assert_near(
        at(&body["old_key_revokes_at"]),
        before,
        after,
        Duration::from_secs(24 * 3600),
        "old_key_revokes_at",
    );

    // Both keys are listed; the new one is a key object of its own.
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&data), vec![new_id.to_string(), old.id.clone()]);
    let new_obj = find(&data, new_id).unwrap();
    assert_eq!(new_obj["revoked"], false);
    assert_eq!(
        new_obj["last_four"].as_str().unwrap(),
        &new_key[new_key.len() - 4..]
    );
    assert_eq!(find(&data, &old.id).unwrap()["revoked"], false, "in grace");
}

// ---------------------------------------------------------------------------------------
// publishable keys and environments

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefixes_follow_type_and_environment() {
    let app = spawn_app(Store::Memory).await;
    for (ty, env, want) in [
        ("publishable", None, "pk_live_"),
        ("secret", None, "sk_live_"),
        ("publishable", Some("test"), "pk_test_"),
        ("secret", Some("test"), "sk_test_"),
        ("publishable", Some("live"), "pk_live_"),
    ] {
        let mut body = json!({"name": format!("{ty} {env:?}"), "type": ty});
        if let Some(e) = env {
            body["environment"] = json!(e);
        }
        let k = root_create(&app, &body).await;
        assert!(
            k.key.starts_with(want),
            "{ty}/{env:?}: {} should start with {want}",
            k.key
        );
        assert_eq!(k.body["type"], ty);
        let got = get_ok(&app, &k.id).await;
        assert_eq!(got["type"], ty);
        assert!(got["prefix"].as_str().unwrap().starts_with(want));
    }
    // Test-environment keys authenticate like live ones.
    let t = root_create(
        &app,
        &json!({"name": "ci", "type": "secret", "environment": "test", "scopes": ["users:read"]}),
    )
    .await;
    assert_eq!(status_at(&app, "/users/1", &t.key).await, 200);
    let pt = root_create(
        &app,
        &json!({"name": "web-test", "type": "publishable", "environment": "test"}),
    )
    .await;
    assert_eq!(status_at(&app, "/widgets/1", &pt.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_passes_only_routes_that_allow_publishable() {
    let app = spawn_app(Store::Memory).await;
    let pk = root_create(
        &app,
        &json!({"name": "Frontend", "type": "publishable", "scopes": ["*"]}),
    )
    .await;
    assert!(pk.key.starts_with("pk_live_"), "{}", pk.key);
    assert_eq!(pk.body["scopes"], json!(["*"]));

    let resp = app.get_with("/widgets/1", &pk.key).await;
    assert_eq!(resp.status(), 200, "widgets allows publishable keys");
    // Even scope `*` does not open a secret-only route to a publishable key.
    for path in ["/users/1", "/admin/x", "/users/1?x=1"] {
        assert_error(
            app.get_with(path, &pk.key).await,
            403,
            "publishable_key_not_allowed",
        )
        .await;
    }
    // A secret key with `*` passes both.
    let sk = root_create(&app, &json!({"name": "Backend", "type": "secret"})).await;
    assert_eq!(status_at(&app, "/users/1", &sk.key).await, 200);
    assert_eq!(status_at(&app, "/widgets/1", &sk.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_can_never_manage_keys() {
    let app = spawn_app(Store::Memory).await;
    let pk = root_create(
        &app,
        &json!({"name": "Frontend", "type": "publishable", "scopes": ["*"]}),
    )
    .await;
    let target = secret(&app, &["users:read"]).await;

    assert_error(
        list(&app, &pk.key, Some(TENANT), &[]).await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        list(&app, &pk.key, None, &[]).await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        create(
            &app,
            &pk.key,
            Some(TENANT),
            &json!({"name": "x", "type": "secret"}),
        )
        .await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        get_key(&app, &pk.key, Some(TENANT), &target.id).await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        patch(
            &app,
            &pk.key,
            Some(TENANT),
            &target.id,
            &json!({"name": "x"}),
        )
        .await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        delete(&app, &pk.key, Some(TENANT), &target.id).await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    assert_error(
        rotate(&app, &pk.key, Some(TENANT), &json!({"id": target.id})).await,
        403,
        "publishable_key_forbidden",
    )
    .await;
    // Nothing changed.
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data.len(), 2);
    let t = get_ok(&app, &target.id).await;
    assert_eq!(
        (t["name"].clone(), t["revoked"].clone()),
        (json!("svc"), json!(false))
    );
}

// ---------------------------------------------------------------------------------------
// defaults and list filters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_create_without_scopes_gets_all_scopes() {
    let app = spawn_app(Store::Memory).await;
    let k = root_create(
        &app,
        &json!({"name": "Production Backend", "type": "secret"}),
    )
    .await;
    assert_eq!(k.body["scopes"], json!(["*"]), "default: [\"*\"] (all)");
    assert_eq!(k.body["expires_at"], Value::Null, "default: no expiry");
    assert_eq!(get_ok(&app, &k.id).await["scopes"], json!(["*"]));
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
    assert_eq!(status_at(&app, "/admin/x", &k.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_type() {
    let app = spawn_app(Store::Memory).await;
    let s1 = root_create(&app, &json!({"name": "s1", "type": "secret"})).await;
    let p1 = root_create(&app, &json!({"name": "p1", "type": "publishable"})).await;
    let s2 = root_create(&app, &json!({"name": "s2", "type": "secret"})).await;
    let p2 = root_create(&app, &json!({"name": "p2", "type": "publishable"})).await;

    let (data, _) = list_ok(&app, &[("type", "publishable")]).await;
    assert_eq!(ids_of(&data), vec![p2.id.clone(), p1.id.clone()]);
    assert!(data.iter().all(|i| i["type"] == "publishable"));
    let (data, _) = list_ok(&app, &[("type", "secret")]).await;
    assert_eq!(ids_of(&data), vec![s2.id.clone(), s1.id.clone()]);
    assert!(data.iter().all(|i| i["type"] == "secret"));
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_hides_revoked_keys_unless_asked() {
    let app = spawn_app(Store::Memory).await;
    let keep = secret(&app, &["users:read"]).await;
    let gone = secret(&app, &["users:read"]).await;
    let gone_pk = root_create(&app, &json!({"name": "web", "type": "publishable"})).await;
    for id in [&gone.id, &gone_pk.id] {
        assert_eq!(delete(&app, ROOT, Some(TENANT), id).await.status(), 204);
    }

    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(
        ids_of(&data),
        vec![keep.id.clone()],
        "default revoked=false"
    );
    let (data, _) = list_ok(&app, &[("revoked", "false")]).await;
    assert_eq!(ids_of(&data), vec![keep.id.clone()]);

    let (data, _) = list_ok(&app, &[("revoked", "true")]).await;
    assert_eq!(
        ids_of(&data),
        vec![gone_pk.id.clone(), gone.id.clone(), keep.id.clone()],
        "revoked=true includes revoked keys"
    );
    assert_eq!(find(&data, &gone.id).unwrap()["revoked"], true);
    assert_eq!(find(&data, &gone_pk.id).unwrap()["revoked"], true);
    assert_eq!(find(&data, &keep.id).unwrap()["revoked"], false);

    // Filters combine.
    let (data, _) = list_ok(&app, &[("revoked", "true"), ("type", "publishable")]).await;
    assert_eq!(ids_of(&data), vec![gone_pk.id.clone()]);
    let (data, _) = list_ok(&app, &[("type", "publishable")]).await;
    assert!(data.is_empty(), "{data:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_refuses_bad_query_values() {
    let app = spawn_app(Store::Memory).await;
    secret(&app, &["users:read"]).await;
    for q in [
        vec![("type", "admin")],
        vec![("type", "")],
        vec![("type", "Secret")],
        vec![("revoked", "yes")],
        vec![("revoked", "1")],
        vec![("revoked", "")],
        vec![("limit", "0")],
        vec![("limit", "many")],
        vec![("limit", "-1")],
        vec![("cursor", "garbage")],
        vec![("colour", "red")],
    ] {
        let resp = list(&app, ROOT, Some(TENANT), &q).await;
        let (status, code, msg) = error_of(resp).await;
        assert_eq!(status, 400, "query {q:?}: {code} {msg}");
        assert!(
            code.starts_with("invalid_"),
            "query {q:?}: code {code} ({msg})"
        );
        if q[0].0 != "cursor" {
            assert!(
                msg.contains(q[0].0),
                "query {q:?}: message {msg:?} should name the parameter"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_with_next_cursor_newest_first() {
    let app = spawn_app(Store::Memory).await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            root_create(&app, &json!({"name": format!("k{i}"), "type": "secret"}))
                .await
                .id,
        );
    }
    // Noise in another tenant.
    create_as(
        &app,
        ROOT,
        Some(OTHER),
        &json!({"name": "x", "type": "secret"}),
    )
    .await;
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let (all, next) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&all), newest_first);
    assert_eq!(next, Value::Null);

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = vec![("limit", "2")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let resp = list(&app, ROOT, Some(TENANT), &q).await;
        let body = json_of(resp, 200, "page").await;
        assert!(
            body.as_object().unwrap().contains_key("next_cursor"),
            "next_cursor is always present: {body}"
        );
        let items = body["data"].as_array().unwrap();
        sizes.push(items.len());
        seen.extend(ids_of(items));
        match &body["next_cursor"] {
            Value::String(c) => {
                assert!(!c.is_empty());
                cursor = Some(c.clone());
            }
            Value::Null => break,
            other => panic!("next_cursor is a string or null: {other}"),
        }
    }
    assert_eq!(
        sizes,
        vec![2, 2, 1],
        "pages of 2; the last has next_cursor null"
    );
    assert_eq!(seen, newest_first, "every id exactly once, newest first");

    // Paging through a filtered list: each matching key once, in order.
    let app = spawn_app(Store::Memory).await;
    let mut pks = Vec::new();
    for i in 0..5 {
        pks.push(
            root_create(
                &app,
                &json!({"name": format!("p{i}"), "type": "publishable"}),
            )
            .await
            .id,
        );
        root_create(&app, &json!({"name": format!("s{i}"), "type": "secret"})).await;
    }
    pks.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = vec![("limit", "2"), ("type", "publishable")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let body = json_of(list(&app, ROOT, Some(TENANT), &q).await, 200, "page").await;
        let items = body["data"].as_array().unwrap();
        assert!(items.len() <= 2);
        assert!(items.iter().all(|i| i["type"] == "publishable"));
        seen.extend(ids_of(items));
        match &body["next_cursor"] {
            Value::String(c) => cursor = Some(c.clone()),
            _ => break,
        }
    }
    assert_eq!(
        seen, pks,
        "filtered paging: every publishable key once, newest first"
    );
}

// ---------------------------------------------------------------------------------------
// scope changes reach the proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_scopes_are_enforced_by_the_proxy_at_once() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200, "cached");

    patch_ok(&app, &k.id, &json!({"scopes": ["widgets:read"]})).await;
    assert_error(
        app.get_with("/users/1", &k.key).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_eq!(status_at(&app, "/widgets/1", &k.key).await, 200);

    patch_ok(&app, &k.id, &json!({"scopes": ["users:read"]})).await;
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);

    // A name change keeps the scopes.
    patch_ok(&app, &k.id, &json!({"name": "renamed"})).await;
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_scopes_reach_another_replica_on_redis() {
    let redis = Redis::start();
    let (a, b) = two_replicas(&redis).await;

    let k = secret(&a, &["users:read"]).await;
    // B knows the key (and caches it: the cache TTL is 5 minutes).
    assert_eq!(status_at(&b, "/users/1", &k.key).await, 200);
    assert_eq!(status_at(&b, "/users/1", &k.key).await, 200);
    // B's admin surface reads the same store.
    assert_eq!(
        json_of(
            get_key(&b, ROOT, Some(TENANT), &k.id).await,
            200,
            "get on B"
        )
        .await["scopes"],
        json!(["users:read"])
    );

    patch_ok(&a, &k.id, &json!({"scopes": ["widgets:read"]})).await;
    assert_error(
        a.get_with("/users/1", &k.key).await,
        403,
        "insufficient_scope",
    )
    .await;
    let narrowed = eventually(Duration::from_secs(1), || async {
        status_at(&b, "/users/1", &k.key).await == 403
    })
    .await;
    assert!(
        narrowed,
        "B still grants users:read 1 s after the PATCH on A"
    );
    assert_error(
        b.get_with("/users/1", &k.key).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_eq!(status_at(&b, "/widgets/1", &k.key).await, 200);

    patch_ok(&a, &k.id, &json!({"scopes": ["users:read"]})).await;
    let widened = eventually(Duration::from_secs(1), || async {
        status_at(&b, "/users/1", &k.key).await == 200
    })
    .await;
    assert!(
        widened,
        "B still refuses users:read 1 s after the PATCH back on A"
    );
    assert_eq!(
        json_of(
            get_key(&b, ROOT, Some(TENANT), &k.id).await,
            200,
            "get on B"
        )
        .await["scopes"],
        json!(["users:read"])
    );
}

// ---------------------------------------------------------------------------------------
// rotation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_keys_pass_during_the_grace_period() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;
    assert_eq!(status_at(&app, "/users/1", &old.key).await, 200, "cached");

    let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "24h"})).await;
    let new_key = r["key"].as_str().unwrap();
    assert_eq!(
        status_at(&app, "/users/1", &old.key).await,
        200,
        "old key in grace"
    );
    assert_eq!(status_at(&app, "/users/1", new_key).await, 200, "new key");
    // The old key is not revoked yet, but its end is known.
    let o = get_ok(&app, &old.id).await;
    assert_eq!(o["revoked"], false);
    if let Some(ra) = o.get("revoked_at").filter(|v| !v.is_null()) {
        assert_eq!(ra, &r["old_key_revokes_at"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_key_is_refused_after_a_short_grace_period_new_key_still_passes() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;
    assert_eq!(status_at(&app, "/users/1", &old.key).await, 200, "cached");

    let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "1s"})).await;
    let new_key = r["key"].as_str().unwrap().to_string();
    let refused = eventually(Duration::from_secs(3), || async {
        status_at(&app, "/users/1", &old.key).await == 403
    })
    .await;
    assert!(
        refused,
        "the old key still passes 3 s into a 1 s grace period"
    );
    assert_error(app.get_with("/users/1", &old.key).await, 403, "revoked_key").await;
    assert_eq!(status_at(&app, "/users/1", &new_key).await, 200);

    assert_eq!(get_ok(&app, &old.id).await["revoked"], true);
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(
        ids_of(&data),
        vec![r["id"].as_str().unwrap().to_string()],
        "the expired-grace key is revoked, so hidden by default"
    );
    let (data, _) = list_ok(&app, &[("revoked", "true")]).await;
    assert_eq!(find(&data, &old.id).unwrap()["revoked"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_grace_revokes_the_old_key_at_once() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;
    assert_eq!(status_at(&app, "/users/1", &old.key).await, 200, "cached");

    let before = SystemTime::now();
    let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "0s"})).await;
    let after = SystemTime::now();
    assert_near(
        at(&r["old_key_revokes_at"]),
        before,
        after,
        Duration::ZERO,
        "old_key_revokes_at",
    );
    assert_error(app.get_with("/users/1", &old.key).await, 403, "revoked_key").await;
    assert_eq!(
        status_at(&app, "/users/1", r["key"].as_str().unwrap()).await,
        200
    );
    assert_eq!(get_ok(&app, &old.id).await["revoked"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_grace_period_is_one_hour() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;
    let before = SystemTime::now();
    let r = rotate_ok(&app, &json!({"id": old.id})).await;
    let after = SystemTime::now();
    assert_near(
        at(&r["old_key_revokes_at"]),
        before,
        after,
        Duration::from_secs(3600),
        "default old_key_revokes_at",
    );
    assert_eq!(status_at(&app, "/users/1", &old.key).await, 200);
    assert_eq!(
        status_at(&app, "/users/1", r["key"].as_str().unwrap()).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_key_keeps_name_type_scopes_and_tenant() {
    let app = spawn_app(Store::Memory).await;
    for (ty, env, scopes, want_prefix) in [
        (
            "secret",
            "live",
            json!(["users:read", "sessions:read"]),
            "sk_live_",
        ),
        ("publishable", "live", json!(["widgets:read"]), "pk_live_"),
        ("secret", "test", json!(["users:read"]), "sk_test_"),
    ] {
        let old = root_create(
            &app,
            &json!({"name": format!("Svc {ty} {env}"), "type": ty,
                    "environment": env, "scopes": scopes}),
        )
        .await;
        let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "24h"})).await;
        let new_id = r["id"].as_str().unwrap();
        let new_key = r["key"].as_str().unwrap();
        assert!(new_key.starts_with(want_prefix), "{new_key}");

        // Found in the same tenant, not in another.
        let n = get_ok(&app, new_id).await;
        assert_eq!(n["name"], old.body["name"]);
        assert_eq!(n["type"], ty);
        assert_eq!(n["scopes"], scopes);
        assert_eq!(n["revoked"], false);
        assert!(new_key.starts_with(n["prefix"].as_str().unwrap()));
        assert_error(
            get_key(&app, ROOT, Some(OTHER), new_id).await,
            404,
            "key_not_found",
        )
        .await;
        let jack = jack_list(&app, TENANT).await;
        assert_eq!(find(&jack, new_id).unwrap()["org_id"], TENANT);

        // It works at the proxy like the old one.
        if ty == "secret" {
            assert_eq!(status_at(&app, "/users/1", new_key).await, 200);
        } else {
            assert_eq!(status_at(&app, "/widgets/1", new_key).await, 200);
            assert_error(
                app.get_with("/users/1", new_key).await,
                403,
                "publishable_key_not_allowed",
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_revoked_or_expired_key_is_409() {
    let app = spawn_app(Store::Memory).await;
    let revoked = secret(&app, &["users:read"]).await;
    assert_eq!(
        delete(&app, ROOT, Some(TENANT), &revoked.id).await.status(),
        204
    );
    assert_error(
        rotate(&app, ROOT, Some(TENANT), &json!({"id": revoked.id})).await,
        409,
        "key_not_rotatable",
    )
    .await;

    let expiring = root_create(
        &app,
        &json!({"name": "brief", "type": "secret", "scopes": ["users:read"], "expires_in": "1s"}),
    )
    .await;
    let expired = eventually(Duration::from_secs(5), || async {
        status_at(&app, "/users/1", &expiring.key).await == 401
    })
    .await;
    assert!(expired, "a key with expires_in 1s still passes after 5 s");
    assert_error(
        app.get_with("/users/1", &expiring.key).await,
        401,
        "expired_key",
    )
    .await;
    assert_error(
        rotate(
            &app,
            ROOT,
            Some(TENANT),
            &json!({"id": expiring.id, "grace_period": "1h"}),
        )
        .await,
        409,
        "key_not_rotatable",
    )
    .await;

    // No key was created by the refused rotations.
    let (data, _) = list_ok(&app, &[("revoked", "true")]).await;
    assert_eq!(data.len(), 2, "{data:?}");
    // `revoked` filters on revocation only: the expired key is listed without it.
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&data), vec![expiring.id.clone()], "{data:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_an_unknown_or_foreign_id_is_404() {
    let app = spawn_app(Store::Memory).await;
    let foreign = create_as(
        &app,
        ROOT,
        Some(OTHER),
        &json!({"name": "theirs", "type": "secret", "scopes": ["users:read"]}),
    )
    .await;
    for id in [
        uuid::Uuid::now_v7().to_string(),
        foreign.id.clone(),
        "key_01HABCDEF666555".to_string(),
        String::new(),
    ] {
        assert_error(
            rotate(
                &app,
                ROOT,
                Some(TENANT),
                &json!({"id": id, "grace_period": "0s"}),
            )
            .await,
            404,
            "key_not_found",
        )
        .await;
    }
    // The foreign key is untouched and still works.
    let theirs = json_of(
        get_key(&app, ROOT, Some(OTHER), &foreign.id).await,
        200,
        "get",
    )
    .await;
    assert_eq!(theirs["revoked"], false);
    assert!(
        theirs.get("revoked_at").is_none_or(Value::is_null),
        "{theirs}"
    );
    assert_eq!(status_at(&app, "/users/1", &foreign.key).await, 200);
    let other = json_of(list(&app, ROOT, Some(OTHER), &[]).await, 200, "list").await;
    assert_eq!(other["data"].as_array().unwrap().len(), 1);
    let (mine, _) = list_ok(&app, &[]).await;
    assert!(mine.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_refuses_bad_bodies_naming_the_field() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    let cases = vec![
        (json!({"id": k.id, "grace_period": "soon"}), "grace_period"),
        (json!({"id": k.id, "grace_period": "-1h"}), "grace_period"),
        (json!({"id": k.id, "grace_period": ""}), "grace_period"),
        (json!({"id": k.id, "grace_period": "367d"}), "grace_period"),
        (json!({"id": k.id, "grace_period": 3600}), "grace_period"),
        (json!({"grace_period": "1h"}), "id"),
        (json!({"id": 5}), "id"),
        (json!({"id": k.id, "colour": "red"}), "colour"),
    ];
    for (body, field) in &cases {
        let (status, code, msg) = error_of(rotate(&app, ROOT, Some(TENANT), body).await).await;
        assert_eq!(status, 400, "body {body}: {code} {msg}");
        assert!(code.starts_with("invalid_"), "body {body}: {code}");
        assert!(
            msg.contains(field),
            "body {body}: message {msg:?} should name {field}"
        );
    }
    // Nothing was rotated.
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&data), vec![k.id.clone()]);
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_needs_every_scope_of_the_rotated_key() {
    let app = spawn_app(Store::Memory).await;
    let writer = secret(&app, &["keys:write"]).await;
    let all = secret(&app, &["*"]).await;
    let (status, code, msg) =
        error_of(rotate(&app, &writer.key, Some(TENANT), &json!({"id": all.id})).await).await;
    assert_eq!((status, code.as_str()), (403, "scope_escalation"), "{msg}");
    // Nothing rotated: the `*` key is not scheduled for revocation and no key was added.
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data.len(), 2);
    let a = get_ok(&app, &all.id).await;
    assert!(a.get("revoked_at").is_none_or(Value::is_null), "{a}");

    // A key it could have made itself, it may rotate.
    let narrow = secret(&app, &["keys:write"]).await;
    let r = json_of(
        rotate(&app, &writer.key, Some(TENANT), &json!({"id": narrow.id})).await,
        200,
        "rotate within own scopes",
    )
    .await;
    assert_eq!(r["old_key_id"], narrow.id.as_str());
}

/// Two apps on one Redis: wait until both follow the change channel.
async fn two_replicas(redis: &Redis) -> (TestApp, TestApp) {
    let a = spawn_app(Store::Redis(redis)).await;
    let b = spawn_app(Store::Redis(redis)).await;
    let subscribed = eventually(Duration::from_secs(5), || async {
        let (_, n): (String, i64) = redis.cmd(&["PUBSUB", "NUMSUB", "kgtest:events"]);
        n >= 2
    })
    .await;
    assert!(subscribed, "both apps follow the change channel");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_redis_is_seen_by_another_replica() {
    let redis = Redis::start();
    let (a, b) = two_replicas(&redis).await;

    // A 24 h grace period: B accepts both keys, and shows the new one on its admin port.
    let old = secret(&a, &["users:read"]).await;
    assert_eq!(
        status_at(&b, "/users/1", &old.key).await,
        200,
        "cached on B"
    );
    let r = rotate_ok(&a, &json!({"id": old.id, "grace_period": "24h"})).await;
    let new_id = r["id"].as_str().unwrap();
    let new_key = r["key"].as_str().unwrap();
    assert_eq!(
        status_at(&b, "/users/1", &old.key).await,
        200,
        "in grace on B"
    );
    assert_eq!(
        status_at(&b, "/users/1", new_key).await,
        200,
        "new key on B"
    );
    let n = json_of(
        get_key(&b, ROOT, Some(TENANT), new_id).await,
        200,
        "get on B",
    )
    .await;
    assert_eq!(
        (n["name"].clone(), n["scopes"].clone()),
        (json!("svc"), json!(["users:read"]))
    );
    let o = json_of(
        get_key(&b, ROOT, Some(TENANT), &old.id).await,
        200,
        "get on B",
    )
    .await;
    assert_eq!(o["revoked"], false);

    // Revoked on A during the grace period: B refuses it soon.
    assert_eq!(delete(&a, ROOT, Some(TENANT), &old.id).await.status(), 204);
    let refused = eventually(Duration::from_secs(1), || async {
        status_at(&b, "/users/1", &old.key).await == 403
    })
    .await;
    assert!(
        refused,
        "B accepts the old key 1 s after its revocation on A"
    );
    assert_error(b.get_with("/users/1", &old.key).await, 403, "revoked_key").await;
    assert_eq!(status_at(&b, "/users/1", new_key).await, 200);
    assert_error(
        rotate(&b, ROOT, Some(TENANT), &json!({"id": old.id})).await,
        409,
        "key_not_rotatable",
    )
    .await;

    // A zero grace period on A: B refuses the old key soon, the new one passes.
    let r2 = rotate_ok(&a, &json!({"id": new_id, "grace_period": "0s"})).await;
    let refused = eventually(Duration::from_secs(1), || async {
        status_at(&b, "/users/1", new_key).await == 403
    })
    .await;
    assert!(refused, "B accepts a key rotated with 0s grace 1 s later");
    assert_eq!(
        status_at(&b, "/users/1", r2["key"].as_str().unwrap()).await,
        200
    );
    let (data, _) = list_ok(&b, &[]).await;
    assert_eq!(ids_of(&data), vec![r2["id"].as_str().unwrap().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_old_key_during_its_grace_period_is_immediate() {
    let app = spawn_app(Store::Memory).await;
    let old = secret(&app, &["users:read"]).await;
    let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "24h"})).await;
    let new_key = r["key"].as_str().unwrap();
    assert_eq!(status_at(&app, "/users/1", &old.key).await, 200, "in grace");

    assert_eq!(
        delete(&app, ROOT, Some(TENANT), &old.id).await.status(),
        204
    );
    assert_error(app.get_with("/users/1", &old.key).await, 403, "revoked_key").await;
    assert_eq!(status_at(&app, "/users/1", new_key).await, 200);
    assert_eq!(get_ok(&app, &old.id).await["revoked"], true);
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&data), vec![r["id"].as_str().unwrap().to_string()]);
}

// ---------------------------------------------------------------------------------------
// rotation cannot fork a key; a PATCH cannot race a revoke

/// A keygate on the memory store, and one on a fresh real Redis (kept with it): the
/// races below are decided inside each store, so both are tried.
async fn on_both_stores() -> Vec<(&'static str, TestApp, Option<Redis>)> {
    let redis = Redis::start();
    let on_redis = spawn_app(Store::Redis(&redis)).await;
    vec![
        ("memory", spawn_app(Store::Memory).await, None),
        ("redis", on_redis, Some(redis)),
    ]
}

/// A secret key in `TENANT` with a name no other key of the test has.
async fn named_key(app: &TestApp, name: &str) -> Key {
    root_create(
        app,
        &json!({"name": name, "type": "secret", "scopes": ["users:read"]}),
    )
    .await
}

/// Ids of every key named `name` in `TENANT`, revoked ones too, newest first.
async fn ids_named(app: &TestApp, name: &str) -> Vec<String> {
    let (data, next) = list_ok(app, &[("revoked", "true")]).await;
    assert!(next.is_null(), "one page holds the test's keys");
    let named: Vec<Value> = data.into_iter().filter(|k| k["name"] == name).collect();
    ids_of(&named)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_key_twice_is_409_key_already_rotated() {
    for (store, app, _redis) in on_both_stores().await {
        let name = format!("twice-{store}");
        let old = named_key(&app, &name).await;
        let r = rotate_ok(&app, &json!({"id": old.id, "grace_period": "24h"})).await;
        let new_id = r["id"].as_str().expect("id").to_string();

        let again = rotate(
            &app,
            ROOT,
            Some(TENANT),
            &json!({"id": old.id, "grace_period": "0s"}),
        )
        .await;
        let (status, code, message) = error_of(again).await;
        assert_eq!(
            (status, code.as_str()),
            (409, "key_already_rotated"),
            "{store}"
        );
        assert!(message.contains("successor"), "{store}: {message}");

        // Exactly one successor, and the refused call changed nothing: the old key keeps
        // its grace period (not the 0s asked the second time) and still passes.
        assert_eq!(
            ids_named(&app, &name).await,
            vec![new_id.clone(), old.id.clone()]
        );
        let got = get_ok(&app, &old.id).await;
        assert_eq!(got["revoked"], false, "{store}");
        assert_eq!(got["revoked_at"], r["old_key_revokes_at"], "{store}");
        assert_eq!(status_at(&app, "/users/1", &old.key).await, 200, "{store}");
        // The successor is the key to rotate next.
        rotate_ok(&app, &json!({"id": new_id, "grace_period": "24h"})).await;
        assert_eq!(ids_named(&app, &name).await.len(), 3, "{store}");
    }
}

/// Concurrent calls per race below.
const RACERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_of_one_key_make_exactly_one_successor() {
    for (store, app, _redis) in on_both_stores().await {
        let name = format!("race-{store}");
        let old = named_key(&app, &name).await;
        let start = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..RACERS {
            let req = admin(
                &app,
                Method::POST,
                "/v1/api-keys/rotate",
                ROOT,
                Some(TENANT),
            )
            .json(&json!({"id": old.id, "grace_period": "24h"}));
            let start = start.clone();
            set.spawn(async move {
                start.wait().await;
                let resp = send(req).await;
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap_or(Value::Null))
            });
        }
        let mut winners = Vec::new();
        while let Some(answer) = set.join_next().await {
            let (status, body) = answer.expect("rotation task");
            match status {
                200 => winners.push(body["id"].as_str().expect("id").to_string()),
                409 => assert_eq!(body["error"]["code"], "key_already_rotated", "{store}"),
                _ => panic!("{store}: a concurrent rotation answered {status}: {body}"),
            }
        }
        assert_eq!(winners.len(), 1, "{store}: successors {winners:?}");
        assert_eq!(
            ids_named(&app, &name).await,
            vec![winners[0].clone(), old.id.clone()],
            "{store}"
        );
    }
}

/// Rounds of PATCH against DELETE on a fresh key each.
const PATCH_RACE_ROUNDS: usize = 25;

/// Start `RACERS - 1` PATCHes (each its own name) and one DELETE of `id` at once; the
/// PATCH answers by name, and the DELETE's status.
async fn race_patches_against_a_revoke(
    app: &TestApp,
    id: &str,
) -> (Vec<(String, u16, Value)>, u16) {
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let path = format!("/v1/api-keys/{id}");
    let mut patches = tokio::task::JoinSet::new();
    for i in 1..RACERS {
        let name = format!("p{i}");
        let req = admin(app, Method::PATCH, &path, ROOT, Some(TENANT)).json(&json!({"name": name}));
        let start = start.clone();
        patches.spawn(async move {
            start.wait().await;
            let resp = send(req).await;
            let status = resp.status().as_u16();
            (
                name,
                status,
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        });
    }
    let del = admin(app, Method::DELETE, &path, ROOT, Some(TENANT));
    start.wait().await;
    let deleted = send(del).await.status().as_u16();
    (patches.join_all().await, deleted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_racing_a_revoke_never_answers_200_for_a_revoked_key() {
    for (store, app, _redis) in on_both_stores().await {
        let (mut changed, mut refused) = (0, 0);
        for round in 0..PATCH_RACE_ROUNDS {
            let k = secret(&app, &["users:read"]).await;
            let (answers, deleted) = race_patches_against_a_revoke(&app, &k.id).await;
            assert_eq!(deleted, 204, "{store} round {round}");
            // Once the revoke has answered, every PATCH is refused.
            assert_error(
                patch(&app, ROOT, Some(TENANT), &k.id, &json!({"name": "late"})).await,
                409,
                "key_revoked",
            )
            .await;
            let mut written = vec!["svc".to_string()];
            for (name, status, body) in answers {
                let what = format!("{store} round {round} PATCH {name}: {status} {body}");
                match status {
                    200 => {
                        assert_eq!(body["revoked"], false, "{what}");
                        assert_eq!(body["name"], name.as_str(), "{what}");
                        written.push(name);
                        changed += 1;
                    }
                    409 => {
                        assert_eq!(body["error"]["code"], "key_revoked", "{what}");
                        refused += 1;
                    }
                    _ => panic!("{what}"),
                }
            }
            // A refused PATCH wrote nothing: the name is the original or a 200's.
            let last = get_ok(&app, &k.id).await;
            assert_eq!(last["revoked"], true, "{store} round {round}");
            let name = last["name"].as_str().expect("name").to_string();
            assert!(
                written.contains(&name),
                "{store} round {round}: name {name:?}, written {written:?}"
            );
        }
        eprintln!("{store}: {changed} PATCHes before the revoke, {refused} refused after it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_patch_twice_gives_the_same_key() {
    for (store, app, redis) in on_both_stores().await {
        let k = secret(&app, &["users:read"]).await;
        let change = json!({"name": "same", "scopes": ["users:read", "widgets:read"]});
        let first = patch_ok(&app, &k.id, &change).await;
        let seq = || redis.as_ref().map(|r| r.cmd::<i64>(&["GET", "kgtest:seq"]));
        let before = seq();
        let second = patch_ok(&app, &k.id, &change).await;
        assert_eq!(first, second, "{store}");
        assert_eq!(get_ok(&app, &k.id).await, second, "{store}");
        // Nothing changed, so nothing is published for other replicas to drop.
        assert_eq!(seq(), before, "{store}: change counter");
    }
}

// ---------------------------------------------------------------------------------------
// one key model under both surfaces

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_on_jack_appears_on_hellojohn() {
    let app = spawn_app(Store::Memory).await;
    let resp = send(
        admin(&app, Method::POST, "/v1/keys", ROOT, Some(TENANT))
            .json(&json!({"label": "production", "scopes": ["users:read"]})),
    )
    .await;
    let j = json_of(resp, 201, "jack create").await;
    let id = j["id"].as_str().unwrap();

    let (data, _) = list_ok(&app, &[]).await;
    let item = find(&data, id).expect("the jack key is on /v1/api-keys");
    assert_eq!(item["name"], "production", "name == label");
    assert_eq!(item["type"], "secret");
    assert_eq!(item["prefix"], j["prefix"]);
    assert_eq!(item["scopes"], json!(["users:read"]));
    assert_eq!(item["created_at"], j["created_at"]);
    assert_eq!(item["revoked"], false);
    let got = get_ok(&app, id).await;
    assert_eq!(got["name"], "production");
    let key = j["key"].as_str().unwrap();
    assert_eq!(got["last_four"].as_str().unwrap(), &key[key.len() - 4..]);

    // Renamed on HelloJohn, the label follows on jack.
    patch_ok(&app, id, &json!({"name": "prod-2"})).await;
    assert_eq!(
        find(&jack_list(&app, TENANT).await, id).unwrap()["label"],
        "prod-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_on_hellojohn_appears_on_jack() {
    let app = spawn_app(Store::Memory).await;
    let k = root_create(
        &app,
        &json!({"name": "Analytics Service", "type": "secret",
                "scopes": ["users:read", "sessions:read"], "expires_in": "90d"}),
    )
    .await;
    let jack = jack_list(&app, TENANT).await;
    let item = find(&jack, &k.id).expect("the HelloJohn key is on /v1/keys");
    assert_eq!(item["label"], "Analytics Service", "label == name");
    assert_eq!(item["org_id"], TENANT, "org_id == tenant");
    assert_eq!(item["prefix"], k.body["prefix"]);
    assert_eq!(item["created_at"], k.body["created_at"]);
    assert_eq!(item["revoked_at"], Value::Null);
    assert!(item.get("key").is_none());
    // Not in another tenant's jack list.
    assert!(find(&jack_list(&app, OTHER).await, &k.id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_on_one_surface_shows_on_the_other() {
    let app = spawn_app(Store::Memory).await;
    // Revoke on jack, read on HelloJohn.
    let a = secret(&app, &["users:read"]).await;
    let resp = send(admin(
        &app,
        Method::DELETE,
        &format!("/v1/keys/{}", a.id),
        ROOT,
        Some(TENANT),
    ))
    .await;
    let j = json_of(resp, 200, "jack revoke").await;
    assert!(j["revoked_at"].is_string(), "{j}");
    let got = get_ok(&app, &a.id).await;
    assert_eq!(got["revoked"], true, "revoked on jack -> revoked: true");
    let (data, _) = list_ok(&app, &[("revoked", "true")]).await;
    assert_eq!(find(&data, &a.id).unwrap()["revoked"], true);
    assert!(find(&list_ok(&app, &[]).await.0, &a.id).is_none());

    // Revoke on HelloJohn, read on jack.
    let b = secret(&app, &["users:read"]).await;
    assert_eq!(delete(&app, ROOT, Some(TENANT), &b.id).await.status(), 204);
    let jack = jack_list(&app, TENANT).await;
    let item = find(&jack, &b.id).unwrap();
    let revoked_at = at(&item["revoked_at"]);
    assert!(
        secs_between(revoked_at, SystemTime::now()).abs() < 60.0,
        "revoked_at is now: {item}"
    );
    assert_error(app.get_with("/users/1", &b.key).await, 403, "revoked_key").await;
    assert_error(app.get_with("/users/1", &a.key).await, 403, "revoked_key").await;
}

// ---------------------------------------------------------------------------------------
// strict input, ids, tenants, management scopes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_bad_bodies_naming_the_field() {
    let app = spawn_app(Store::Memory).await;
    let long = "x".repeat(201);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "x", "type": "secret", "foo": 1}), "foo"),
        (json!({"name": "x"}), "type"),
        (json!({"type": "secret"}), "name"),
        (json!({"name": "x", "type": "admin"}), "type"),
        (json!({"name": "x", "type": "Secret"}), "type"),
        (json!({"name": "x", "type": null}), "type"),
        (json!({"name": "", "type": "secret"}), "name"),
        (json!({"name": "   ", "type": "secret"}), "name"),
        (json!({"name": long, "type": "secret"}), "name"),
        (json!({"name": "a\u{7}b", "type": "secret"}), "name"),
        (json!({"name": 5, "type": "secret"}), "name"),
        (
            json!({"name": "x", "type": "secret", "scopes": ["Users Read"]}),
            "scopes[0]",
        ),
        (
            json!({"name": "x", "type": "secret", "scopes": ["users:read", "bad scope"]}),
            "scopes[1]",
        ),
        (
            json!({"name": "x", "type": "secret", "scopes": []}),
            "scopes",
        ),
        (
            json!({"name": "x", "type": "secret", "scopes": "users:read"}),
            "scopes",
        ),
        (
            json!({"name": "x", "type": "secret", "expires_in": "soon"}),
            "expires_in",
        ),
        (
            json!({"name": "x", "type": "secret", "expires_in": "0s"}),
            "expires_in",
        ),
        (
            json!({"name": "x", "type": "secret", "expires_in": "-1d"}),
            "expires_in",
        ),
        (
            json!({"name": "x", "type": "secret", "expires_in": 90}),
            "expires_in",
        ),
        (
            json!({"name": "x", "type": "secret", "environment": "prod"}),
            "environment",
        ),
        (json!([]), ""),
        (json!("x"), ""),
    ];
    for (body, field) in &cases {
        let (status, code, msg) = error_of(create(&app, ROOT, Some(TENANT), body).await).await;
        assert_eq!(status, 400, "body {body}: {code} {msg}");
        assert!(code.starts_with("invalid_"), "body {body}: code {code}");
        assert!(
            msg.contains(field),
            "body {body}: message {msg:?} should name {field}"
        );
    }
    // Not JSON at all.
    for raw in ["not json", "{\"name\":", ""] {
        let resp = send(
            admin(&app, Method::POST, "/v1/api-keys", ROOT, Some(TENANT))
                .header("Content-Type", "application/json")
                .body(raw),
        )
        .await;
        let (status, _, _) = error_of(resp).await;
        assert_eq!(status, 400, "body {raw:?}");
    }
    let (data, _) = list_ok(&app, &[("revoked", "true")]).await;
    assert!(data.is_empty(), "no refused call created a key: {data:?}");

    // Boundaries that are accepted.
    let k = root_create(&app, &json!({"name": "y".repeat(200), "type": "secret"})).await;
    assert_eq!(k.body["name"].as_str().unwrap().chars().count(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_refuses_bad_bodies_naming_the_field() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "name"),
        (json!({"foo": 1}), "foo"),
        (json!({"type": "publishable"}), "type"),
        (json!({"expires_in": "1d"}), "expires_in"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(201)}), "name"),
        (json!({"name": 7}), "name"),
        (json!({"scopes": []}), "scopes"),
        (json!({"scopes": ["NOPE"]}), "scopes[0]"),
        (json!({"scopes": "users:read"}), "scopes"),
        (json!({"name": "ok", "scopes": []}), "scopes"),
    ];
    for (body, field) in &cases {
        let (status, code, msg) =
            error_of(patch(&app, ROOT, Some(TENANT), &k.id, body).await).await;
        assert_eq!(status, 400, "body {body}: {code} {msg}");
        assert!(code.starts_with("invalid_"), "body {body}: code {code}");
        assert!(
            msg.contains(field),
            "body {body}: message {msg:?} should name {field}"
        );
    }
    // Nothing changed.
    let got = get_ok(&app, &k.id).await;
    assert_eq!(got["name"], "svc");
    assert_eq!(got["scopes"], json!(["users:read"]));
    assert_eq!(got["type"], "secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_sent_as_json() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    let create_body = r#"{"name":"x","type":"secret"}"#.to_string();
    let patch_body = r#"{"name":"x"}"#.to_string();
    let rotate_body = format!(r#"{{"id":"{}"}}"#, k.id);
    let patch_path = format!("/v1/api-keys/{}", k.id);
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        for (method, path, body) in [
            (Method::POST, "/v1/api-keys", &create_body),
            (Method::PATCH, patch_path.as_str(), &patch_body),
            (Method::POST, "/v1/api-keys/rotate", &rotate_body),
        ] {
            let mut req = admin(&app, method.clone(), path, ROOT, Some(TENANT)).body(body.clone());
            if let Some(c) = ct {
                req = req.header("Content-Type", c);
            }
            let (status, code, msg) = error_of(send(req).await).await;
            assert_eq!(
                (status, code.as_str()),
                (400, "unsupported_content_type"),
                "{method} {path} with {ct:?}: {msg}"
            );
        }
    }
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(ids_of(&data), vec![k.id.clone()]);
    assert_eq!(data[0]["name"], "svc");
    // `application/json; charset=utf-8` is JSON.
    let resp = send(
        admin(&app, Method::POST, "/v1/api-keys", ROOT, Some(TENANT))
            .header("Content-Type", "application/json; charset=utf-8")
            .body(create_body),
    )
    .await;
    assert_eq!(resp.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_ids_are_404() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    let prefix = k.body["prefix"].as_str().unwrap().to_string();
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [
        "not-an-id",
        "key_01HABCDEF666555",
        prefix.as_str(),
        unknown.as_str(),
        "%20",
    ] {
        assert_error(
            get_key(&app, ROOT, Some(TENANT), id).await,
            404,
            "key_not_found",
        )
        .await;
        assert_error(
            patch(&app, ROOT, Some(TENANT), id, &json!({"name": "x"})).await,
            404,
            "key_not_found",
        )
        .await;
        assert_error(
            delete(&app, ROOT, Some(TENANT), id).await,
            404,
            "key_not_found",
        )
        .await;
    }
    assert_eq!(get_ok(&app, &k.id).await["name"], "svc");
    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_key_is_404_and_untouched() {
    let app = spawn_app(Store::Memory).await;
    let theirs = create_as(
        &app,
        ROOT,
        Some(OTHER),
        &json!({"name": "theirs", "type": "secret", "scopes": ["users:read"]}),
    )
    .await;
    // As root acting in TENANT, and as a TENANT management key.
    let manager = secret(&app, &["keys:read", "keys:write"]).await;
    for (bearer, tenant) in [(ROOT, Some(TENANT)), (manager.key.as_str(), None)] {
        assert_error(
            get_key(&app, bearer, tenant, &theirs.id).await,
            404,
            "key_not_found",
        )
        .await;
        assert_error(
            patch(
                &app,
                bearer,
                tenant,
                &theirs.id,
                &json!({"name": "mine", "scopes": ["keys:read"]}),
            )
            .await,
            404,
            "key_not_found",
        )
        .await;
        assert_error(
            delete(&app, bearer, tenant, &theirs.id).await,
            404,
            "key_not_found",
        )
        .await;
    }
    let got = json_of(
        get_key(&app, ROOT, Some(OTHER), &theirs.id).await,
        200,
        "get",
    )
    .await;
    assert_eq!(got["name"], "theirs");
    assert_eq!(got["scopes"], json!(["users:read"]));
    assert_eq!(got["revoked"], false);
    assert_eq!(status_at(&app, "/users/1", &theirs.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_tenant_id_naming_another_tenant_than_the_key_is_403() {
    let app = spawn_app(Store::Memory).await;
    let manager = secret(&app, &["keys:read", "keys:write"]).await;
    let target = secret(&app, &["users:read"]).await;
    let m = manager.key.as_str();
    let t = Some(OTHER);
    for resp in [
        list(&app, m, t, &[]).await,
        create(&app, m, t, &json!({"name": "x", "type": "secret"})).await,
        get_key(&app, m, t, &target.id).await,
        patch(&app, m, t, &target.id, &json!({"name": "x"})).await,
        delete(&app, m, t, &target.id).await,
        rotate(&app, m, t, &json!({"id": target.id})).await,
    ] {
        assert_error(resp, 403, "tenant_mismatch").await;
    }
    // With its own tenant named (or none), it works.
    assert_eq!(list(&app, m, Some(TENANT), &[]).await.status(), 200);
    assert_eq!(list(&app, m, None, &[]).await.status(), 200);
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data.len(), 2, "nothing was created");
    let got = get_ok(&app, &target.id).await;
    assert_eq!(
        (got["name"].clone(), got["revoked"].clone()),
        (json!("svc"), json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_need_keys_scopes() {
    let app = spawn_app(Store::Memory).await;
    let reader = secret(&app, &["keys:read"]).await;
    let target = secret(&app, &["users:read"]).await;
    let r = reader.key.as_str();

    // Reading is allowed.
    assert_eq!(list(&app, r, Some(TENANT), &[]).await.status(), 200);
    assert_eq!(
        get_key(&app, r, Some(TENANT), &target.id).await.status(),
        200
    );
    // Writing is not.
    for resp in [
        patch(&app, r, Some(TENANT), &target.id, &json!({"name": "x"})).await,
        delete(&app, r, Some(TENANT), &target.id).await,
        rotate(&app, r, Some(TENANT), &json!({"id": target.id})).await,
        create(
            &app,
            r,
            Some(TENANT),
            &json!({"name": "x", "type": "secret"}),
        )
        .await,
    ] {
        let h = assert_error(resp, 403, "insufficient_scope").await;
        assert!(
            h.get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("insufficient_scope")),
            "RFC 6750 challenge: {h:?}"
        );
    }
    // A key with no keys:* scope cannot even read.
    let plain = secret(&app, &["users:read"]).await;
    assert_error(
        list(&app, &plain.key, None, &[]).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_error(
        get_key(&app, &plain.key, None, &target.id).await,
        403,
        "insufficient_scope",
    )
    .await;

    let got = get_ok(&app, &target.id).await;
    assert_eq!(
        (got["name"].clone(), got["revoked"].clone()),
        (json!("svc"), json!(false))
    );
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data.len(), 3, "nothing rotated or created");
    assert_eq!(status_at(&app, "/users/1", &target.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_cannot_hand_out_scopes_the_caller_lacks() {
    let app = spawn_app(Store::Memory).await;
    let writer = secret(&app, &["keys:write"]).await;
    let w = writer.key.as_str();
    let target = secret(&app, &["keys:write"]).await;

    for scopes in [
        json!(["*"]),
        json!(["users:read"]),
        json!(["keys:write", "admin"]),
    ] {
        let (status, code, msg) =
            error_of(patch(&app, w, None, &target.id, &json!({"scopes": scopes})).await).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "scope_escalation"),
            "{scopes}: {msg}"
        );
    }
    // The writer cannot widen itself either.
    let (status, code, _) =
        error_of(patch(&app, w, None, &writer.id, &json!({"scopes": ["*"]})).await).await;
    assert_eq!((status, code.as_str()), (403, "scope_escalation"));
    assert_eq!(
        get_ok(&app, &writer.id).await["scopes"],
        json!(["keys:write"])
    );
    assert_eq!(
        get_ok(&app, &target.id).await["scopes"],
        json!(["keys:write"])
    );
    assert_error(app.get_with("/admin/x", w).await, 403, "insufficient_scope").await;

    // Within its own scopes it may.
    let ok = json_of(
        patch(
            &app,
            w,
            None,
            &target.id,
            &json!({"scopes": ["keys:write"], "name": "ok"}),
        )
        .await,
        200,
        "patch within own scopes",
    )
    .await;
    assert_eq!(ok["name"], "ok");
}

// ---------------------------------------------------------------------------------------
// last use, methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_at_is_shown_after_the_key_is_used() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    assert_eq!(get_ok(&app, &k.id).await["last_used_at"], Value::Null);

    assert_eq!(status_at(&app, "/users/1", &k.key).await, 200);
    let noted = eventually(Duration::from_secs(2), || async {
        get_ok(&app, &k.id).await["last_used_at"].is_string()
    })
    .await;
    assert!(
        noted,
        "last_used_at is still null 2 s after the key was used"
    );
    let got = get_ok(&app, &k.id).await;
    let used = at(&got["last_used_at"]);
    assert!(secs_between(at(&got["created_at"]), used) >= 0.0);
    assert!(secs_between(used, SystemTime::now()).abs() < 60.0);
    let (data, _) = list_ok(&app, &[]).await;
    assert_eq!(data[0]["last_used_at"], got["last_used_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_on_a_known_path_is_405_json() {
    let app = spawn_app(Store::Memory).await;
    let k = secret(&app, &["users:read"]).await;
    let id_path = format!("/v1/api-keys/{}", k.id);
    for (method, path) in [
        (Method::PUT, "/v1/api-keys"),
        (Method::DELETE, "/v1/api-keys"),
        (Method::PATCH, "/v1/api-keys"),
        (Method::PUT, id_path.as_str()),
        (Method::POST, id_path.as_str()),
        (Method::PUT, "/v1/api-keys/rotate"),
    ] {
        let resp = send(
            admin(&app, method.clone(), path, ROOT, Some(TENANT))
                .header("Content-Type", "application/json")
                .body("{}"),
        )
        .await;
        assert!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json")),
            "{method} {path}: JSON error"
        );
        let h = assert_error(resp, 405, "method_not_allowed").await;
        let allow = h
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow: {h:?}"))
            .to_ascii_uppercase();
        assert!(
            !allow.contains(method.as_str()),
            "{method} {path}: Allow {allow}"
        );
    }
    // Nothing changed.
    assert_eq!(get_ok(&app, &k.id).await["name"], "svc");
}
