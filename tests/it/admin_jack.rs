//! The jack document's surface on the admin port (`POST /v1/keys`, `GET /v1/keys`,
//! `DELETE /v1/keys/{id}`), its management auth, tenants, strict input, pagination,
//! health/metrics, and that none of it is reachable through the proxy port.
//! All over real sockets against an in-process keygate with the memory store.

use crate::support::{assert_error, eventually, spawn_app, Key, Store, TestApp, ROOT};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

// ---------------------------------------------------------------------------------------
// helpers

/// `POST /v1/keys` with a JSON body, an optional bearer and an optional `X-Tenant-ID`.
async fn post_keys(
    app: &TestApp,
    bearer: Option<&str>,
    tenant: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    post_raw(
        app,
        bearer,
        tenant,
        Some("application/json"),
        body.to_string(),
    )
    .await
}

/// `POST /v1/keys` with a raw body and content type.
async fn post_raw(
    app: &TestApp,
    bearer: Option<&str>,
    tenant: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = app.http.post(app.admin_url("/v1/keys")).body(body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    req.send().await.expect("admin reachable")
}

/// `GET /v1/keys` with an optional bearer, tenant header and query pairs.
async fn get_keys(
    app: &TestApp,
    bearer: Option<&str>,
    tenant: Option<&str>,
    query: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = app.http.get(app.admin_url("/v1/keys")).query(query);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    req.send().await.expect("admin reachable")
}

/// `DELETE /v1/keys/{id}` with an optional bearer and tenant header.
async fn delete_key(
    app: &TestApp,
    bearer: Option<&str>,
    tenant: Option<&str>,
    id: &str,
) -> reqwest::Response {
    let mut req = app.http.delete(app.admin_url(&format!("/v1/keys/{id}")));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(t) = tenant {
        req = req.header("X-Tenant-ID", t);
    }
    req.send().await.expect("admin reachable")
}

/// A 200 list: the items as JSON values.
async fn list_ok(app: &TestApp, bearer: &str, tenant: Option<&str>) -> Vec<Value> {
    let resp = get_keys(app, Some(bearer), tenant, &[]).await;
    assert_eq!(resp.status(), 200, "list keys");
    let body: Value = resp.json().await.expect("list body is JSON");
    body.as_array().expect("list body is an array").clone()
}

fn ids_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().expect("id is a string").to_string())
        .collect()
}

/// Create a key as `bearer` and return it; panics unless 201.
async fn create_as(app: &TestApp, bearer: &str, tenant: Option<&str>, body: &Value) -> Key {
    let resp = post_keys(app, Some(bearer), tenant, body).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "create key: {body}");
    Key {
        id: body["id"].as_str().unwrap().to_string(),
        key: body["key"].as_str().unwrap().to_string(),
        body,
    }
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

fn assert_uuid(s: &str) {
    let u = uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("{s:?} is not a UUID: {e}"));
    assert_eq!(u.hyphenated().to_string(), s, "canonical lowercase UUID");
}

/// `2026-06-12T14:24:37Z`: RFC 3339, UTC, `Z` suffix. Returns the instant.
fn rfc3339_z(s: &str) -> SystemTime {
    assert!(s.ends_with('Z'), "{s:?} should end with Z");
    assert_eq!(
        s.as_bytes().get(10),
        Some(&b'T'),
        "{s:?} should be RFC 3339"
    );
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The secret part of a key: everything after the display prefix.
fn secret_tail(key: &Key) -> String {
    let prefix = key.body["prefix"].as_str().unwrap();
    key.key[prefix.len()..].to_string()
}

// ---------------------------------------------------------------------------------------
// the document's examples

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_as_documented_returns_201_with_the_documented_fields() {
    let app = spawn_app(Store::Memory).await;
    let before = SystemTime::now();
    // Exactly the curl example, with the root token as the bearer.
    let resp = app
        .http
        .post(app.admin_url("/v1/keys"))
        .header("Authorization", format!("Bearer {ROOT}"))
        .header("Content-Type", "application/json")
        .body(r#"{"label": "production"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json")));
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store"),
        "a response carrying a secret must not be cached"
    );
    let body: Value = resp.json().await.unwrap();
    let obj = body.as_object().expect("an object");
    for f in ["id", "key", "prefix", "label", "org_id", "created_at"] {
        assert!(obj.contains_key(f), "missing documented field {f}: {body}");
    }
    let id = body["id"].as_str().unwrap();
    assert_uuid(id);
    let key = body["key"].as_str().unwrap();
    let prefix = body["prefix"].as_str().unwrap();
    assert!(key.starts_with("sk_live_"), "a secret live key: {key}");
    assert!(
        key.len() >= "sk_live_".len() + 32,
        "a long random key: {key}"
    );
    assert!(
        key.starts_with(prefix),
        "prefix {prefix} is a prefix of the key"
    );
    assert!(
        prefix.len() < key.len() - 16,
        "prefix must not reveal the key"
    );
    assert!(
        prefix.len() > "sk_live_".len(),
        "prefix shows a few key chars"
    );
    assert_eq!(body["label"], "production");
    assert_eq!(body["org_id"], "default");
    let created = rfc3339_z(body["created_at"].as_str().unwrap());
    let after = SystemTime::now();
    assert!(secs_between(before, created) > -2.0 && secs_between(created, after) > -2.0);
    // Additive fields are fine; nothing else should be a secret.
    assert_eq!(
        body["expires_at"],
        Value::Null,
        "no expires_in -> no expiry"
    );

    // The new key authenticates through the proxy (root grants all scopes by default).
    let r = app.get_with("/users/1", key).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_as_documented_shows_prefixes_never_keys() {
    let app = spawn_app(Store::Memory).await;
    let a = create_as(&app, ROOT, None, &json!({"label": "production"})).await;
    let b = create_as(
        &app,
        ROOT,
        None,
        &json!({"label": "staging", "scopes": ["users:read"]}),
    )
    .await;
    let resp = app
        .http
        .get(app.admin_url("/v1/keys"))
        .header("Authorization", format!("Bearer {ROOT}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    for k in [&a, &b] {
        assert!(!text.contains(&k.key), "the full key leaked into the list");
        assert!(
            !text.contains(&secret_tail(k)),
            "key material leaked into the list"
        );
    }
    let items: Vec<Value> = serde_json::from_str(&text).expect("a JSON array");
    assert_eq!(items.len(), 2, "{text}");
    for item in &items {
        let obj = item.as_object().expect("items are objects");
        for f in [
            "id",
            "prefix",
            "label",
            "org_id",
            "created_at",
            "last_used_at",
            "revoked_at",
        ] {
            assert!(obj.contains_key(f), "missing documented field {f}: {item}");
        }
        assert!(
            !obj.contains_key("key"),
            "list item has a key field: {item}"
        );
        assert_uuid(item["id"].as_str().unwrap());
        rfc3339_z(item["created_at"].as_str().unwrap());
        assert!(item["last_used_at"].is_null() || item["last_used_at"].is_string());
        assert_eq!(item["revoked_at"], Value::Null);
        assert_eq!(item["org_id"], "default");
    }
    for k in [&a, &b] {
        let item = items
            .iter()
            .find(|i| i["id"] == k.id.as_str())
            .unwrap_or_else(|| panic!("created key {} is listed", k.id));
        assert_eq!(item["prefix"], k.body["prefix"]);
        assert_eq!(item["label"], k.body["label"]);
        assert_eq!(item["created_at"], k.body["created_at"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_as_documented_then_key_is_refused_and_listed_revoked() {
    let app = spawn_app(Store::Memory).await;
    let k = create_as(
        &app,
        ROOT,
        None,
        &json!({"label": "production", "scopes": ["users:read"]}),
    )
    .await;
    assert_eq!(k.body["scopes"], json!(["users:read"]));
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);

    let resp = app
        .http
        .delete(app.admin_url(&format!("/v1/keys/{}", k.id)))
        .header("Authorization", format!("Bearer {ROOT}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(&k.key),
        "the full key leaked into the delete response"
    );
    assert!(!text.contains(&secret_tail(&k)));
    let deleted: Value = serde_json::from_str(&text).unwrap();
    assert!(deleted.get("key").is_none(), "{deleted}");
    let revoked_at = deleted["revoked_at"]
        .as_str()
        .expect("revoked_at set")
        .to_string();
    let revoked = rfc3339_z(&revoked_at);
    assert!(secs_between(rfc3339_z(k.body["created_at"].as_str().unwrap()), revoked) >= 0.0);

    // Immediately refused through the proxy: 403 revoked_key (the document's 403 Forbidden).
    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;

    let items = list_ok(&app, ROOT, None).await;
    let item = items.iter().find(|i| i["id"] == k.id.as_str()).unwrap();
    assert_eq!(item["revoked_at"], revoked_at.as_str());

    // Revoking again: 200, and the revocation time does not move.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = delete_key(&app, Some(ROOT), None, &k.id).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        again["revoked_at"],
        revoked_at.as_str(),
        "revoke is idempotent"
    );
    let items = list_ok(&app, ROOT, None).await;
    let item = items.iter().find(|i| i["id"] == k.id.as_str()).unwrap();
    assert_eq!(item["revoked_at"], revoked_at.as_str());
    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_key_appears_only_in_the_create_response() {
    let app = spawn_app(Store::Memory).await;
    let k = create_as(&app, ROOT, Some("solo"), &json!({"label": "once"})).await;
    let tail = secret_tail(&k);
    assert!(k.body.to_string().contains(&k.key));

    let mut seen = Vec::new();
    seen.push(
        get_keys(&app, Some(ROOT), Some("solo"), &[])
            .await
            .text()
            .await
            .unwrap(),
    );
    seen.push(
        get_keys(&app, Some(ROOT), Some("solo"), &[("limit", "1")])
            .await
            .text()
            .await
            .unwrap(),
    );
    let del = delete_key(&app, Some(ROOT), Some("solo"), &k.id).await;
    let del_headers = format!("{:?}", del.headers());
    seen.push(del.text().await.unwrap());
    seen.push(
        get_keys(&app, Some(ROOT), Some("solo"), &[])
            .await
            .text()
            .await
            .unwrap(),
    );
    for text in &seen {
        assert!(text.contains(&k.id), "the key is still described: {text}");
        assert!(!text.contains(&k.key), "full key leaked: {text}");
        assert!(!text.contains(&tail), "key material leaked: {text}");
    }
    assert!(!del_headers.contains(&tail));
}

// ---------------------------------------------------------------------------------------
// management with keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_management_key_creates_lists_and_revokes_in_its_tenant() {
    let app = spawn_app(Store::Memory).await;
    let admin = app
        .create_key_in(Some("acme"), &["keys:read", "keys:write"])
        .await;
    assert_eq!(admin.body["org_id"], "acme");

    let child = create_as(
        &app,
        &admin.key,
        None,
        &json!({"label": "ci", "scopes": ["keys:read"]}),
    )
    .await;
    assert_eq!(
        child.body["org_id"], "acme",
        "created in the caller's tenant"
    );
    assert_eq!(child.body["scopes"], json!(["keys:read"]));

    let items = list_ok(&app, &admin.key, None).await;
    let ids = ids_of(&items);
    assert!(
        ids.contains(&admin.id) && ids.contains(&child.id),
        "{ids:?}"
    );
    assert_eq!(ids.len(), 2);
    assert!(items.iter().all(|i| i["org_id"] == "acme"));
    // The default tenant does not see acme's keys.
    assert!(list_ok(&app, ROOT, None).await.is_empty());

    let resp = delete_key(&app, Some(&admin.key), None, &child.id).await;
    assert_eq!(resp.status(), 200);
    let items = list_ok(&app, &admin.key, None).await;
    let c = items.iter().find(|i| i["id"] == child.id.as_str()).unwrap();
    assert!(c["revoked_at"].is_string());
    assert_error(
        get_keys(&app, Some(&child.key), None, &[]).await,
        403,
        "revoked_key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_management_key_lists_but_cannot_create_or_revoke() {
    let app = spawn_app(Store::Memory).await;
    let reader = app.create_key(&["keys:read"]).await;
    let victim = app.create_key(&["users:read"]).await;

    let items = list_ok(&app, &reader.key, None).await;
    assert_eq!(items.len(), 2);

    let h = assert_error(
        post_keys(&app, Some(&reader.key), None, &json!({"label": "nope"})).await,
        403,
        "insufficient_scope",
    )
    .await;
    let challenge = h
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");

    assert_error(
        delete_key(&app, Some(&reader.key), None, &victim.id).await,
        403,
        "insufficient_scope",
    )
    .await;

    // Nothing changed.
    let items = list_ok(&app, ROOT, None).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| i["revoked_at"].is_null()));
    assert_eq!(app.get_with("/users/1", &victim.key).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_without_keys_scopes_cannot_list() {
    let app = spawn_app(Store::Memory).await;
    let user = app.create_key(&["users:read"]).await;
    assert_error(
        get_keys(&app, Some(&user.key), None, &[]).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_error(
        post_keys(&app, Some(&user.key), None, &json!({"label": "x"})).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_error(
        delete_key(&app, Some(&user.key), None, &user.id).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_eq!(app.get_with("/users/1", &user.key).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_bad_credentials_are_401_and_change_nothing() {
    let app = spawn_app(Store::Memory).await;
    let existing = app.create_key(&["users:read"]).await;

    // A well-formed key with a valid checksum, but from another keygate: unknown here.
    let other = spawn_app(Store::Memory).await;
    let foreign = other.create_key(&["keys:read", "keys:write"]).await;

    // Missing Authorization.
    let h = assert_error(get_keys(&app, None, None, &[]).await, 401, "missing_key").await;
    assert!(h.get("www-authenticate").is_some(), "RFC 6750 challenge");
    assert_error(
        post_keys(&app, None, None, &json!({"label": "x"})).await,
        401,
        "missing_key",
    )
    .await;
    assert_error(
        delete_key(&app, None, None, &existing.id).await,
        401,
        "missing_key",
    )
    .await;

    let wrong_root = format!("{ROOT}x");
    let bad_checksum = {
        let mut t = existing.key.clone();
        let last = t.pop().unwrap();
        t.push(if last == 'a' { 'b' } else { 'a' });
        t
    };
    for bearer in [
        "not-a-key",
        "sk_live_tooshort",
        wrong_root.as_str(),
        &ROOT[..ROOT.len() - 1],
        bad_checksum.as_str(),
        foreign.key.as_str(),
    ] {
        for resp in [
            get_keys(&app, Some(bearer), None, &[]).await,
            post_keys(&app, Some(bearer), None, &json!({"label": "x"})).await,
            delete_key(&app, Some(bearer), None, &existing.id).await,
        ] {
            let (status, code, _) = error_of(resp).await;
            assert_eq!(status, 401, "bearer {bearer:?} -> {code}");
        }
    }
    let h = assert_error(
        get_keys(&app, Some(&foreign.key), None, &[]).await,
        401,
        "unknown_key",
    )
    .await;
    let challenge = h
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(challenge.contains("invalid_token"), "{challenge}");

    // Another scheme.
    let resp = app
        .http
        .get(app.admin_url("/v1/keys"))
        .header("Authorization", format!("Basic {ROOT}"))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "unsupported_auth_scheme").await;

    // Nothing was created or revoked.
    let items = list_ok(&app, ROOT, None).await;
    assert_eq!(ids_of(&items), vec![existing.id.clone()]);
    assert!(items[0]["revoked_at"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_management_key_is_403_revoked_key() {
    let app = spawn_app(Store::Memory).await;
    let admin = app.create_key(&["keys:read", "keys:write"]).await;
    let other = app.create_key(&["users:read"]).await;
    assert_eq!(
        get_keys(&app, Some(&admin.key), None, &[]).await.status(),
        200
    );
    assert_eq!(app.revoke(&admin.id).await.status(), 200);

    assert_error(
        get_keys(&app, Some(&admin.key), None, &[]).await,
        403,
        "revoked_key",
    )
    .await;
    assert_error(
        post_keys(&app, Some(&admin.key), None, &json!({"label": "x"})).await,
        403,
        "revoked_key",
    )
    .await;
    assert_error(
        delete_key(&app, Some(&admin.key), None, &other.id).await,
        403,
        "revoked_key",
    )
    .await;
    assert_eq!(list_ok(&app, ROOT, None).await.len(), 2);
    assert_eq!(app.get_with("/users/1", &other.key).await.status(), 200);
}

// ---------------------------------------------------------------------------------------
// no privilege escalation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_grant_scopes_it_does_not_hold() {
    let app = spawn_app(Store::Memory).await;
    let admin = app.create_key(&["keys:write", "keys:read"]).await;

    for scopes in [
        json!(["users:write"]),
        json!(["*"]),
        json!(["keys:*"]),
        json!(["keys:read", "users:write"]),
        json!(["admin"]),
    ] {
        let resp = post_keys(
            &app,
            Some(&admin.key),
            None,
            &json!({"label": "escalate", "scopes": scopes}),
        )
        .await;
        assert_error(resp, 403, "scope_escalation").await;
    }
    assert_eq!(
        list_ok(&app, ROOT, None).await.len(),
        1,
        "no key was created by refused calls"
    );

    // A subset of its own scopes is fine, and the child really is limited to it.
    let sub = create_as(
        &app,
        &admin.key,
        None,
        &json!({"label": "reader", "scopes": ["keys:read"]}),
    )
    .await;
    assert_eq!(sub.body["scopes"], json!(["keys:read"]));
    assert_eq!(
        get_keys(&app, Some(&sub.key), None, &[]).await.status(),
        200
    );
    assert_error(
        post_keys(&app, Some(&sub.key), None, &json!({"label": "x"})).await,
        403,
        "insufficient_scope",
    )
    .await;
    // The subset key cannot reach a route needing scopes it lacks.
    assert_error(
        app.get_with("/users/1", &sub.key).await,
        403,
        "insufficient_scope",
    )
    .await;

    // No `scopes`: the new key inherits exactly the caller's scopes.
    let inherit = create_as(&app, &admin.key, None, &json!({"label": "same"})).await;
    let mut got: Vec<String> = serde_json::from_value(inherit.body["scopes"].clone()).unwrap();
    got.sort();
    assert_eq!(got, vec!["keys:read".to_string(), "keys:write".to_string()]);
    assert_error(
        app.get_with("/users/1", &inherit.key).await,
        403,
        "insufficient_scope",
    )
    .await;
    let grandchild = create_as(
        &app,
        &inherit.key,
        None,
        &json!({"label": "grandchild", "scopes": ["keys:read"]}),
    )
    .await;
    assert_eq!(grandchild.body["org_id"], "default");
    // An inherited key cannot escalate either.
    assert_error(
        post_keys(
            &app,
            Some(&inherit.key),
            None,
            &json!({"label": "x", "scopes": ["users:read"]}),
        )
        .await,
        403,
        "scope_escalation",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// tenants

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_chooses_the_tenant_with_x_tenant_id_default_otherwise() {
    let app = spawn_app(Store::Memory).await;
    let t1 = create_as(&app, ROOT, Some("t1"), &json!({"label": "in t1"})).await;
    assert_eq!(t1.body["org_id"], "t1");
    let d = create_as(&app, ROOT, None, &json!({"label": "in default"})).await;
    assert_eq!(d.body["org_id"], "default");

    assert_eq!(
        ids_of(&list_ok(&app, ROOT, Some("t1")).await),
        vec![t1.id.clone()]
    );
    assert_eq!(ids_of(&list_ok(&app, ROOT, None).await), vec![d.id.clone()]);
    assert_eq!(
        ids_of(&list_ok(&app, ROOT, Some("default")).await),
        vec![d.id.clone()]
    );
    assert!(list_ok(&app, ROOT, Some("t3")).await.is_empty());

    // Root revoking inside the wrong tenant does not find the key.
    assert_error(
        delete_key(&app, Some(ROOT), None, &t1.id).await,
        404,
        "key_not_found",
    )
    .await;
    assert_eq!(
        delete_key(&app, Some(ROOT), Some("t1"), &t1.id)
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_sees_and_touches_only_its_tenant() {
    let app = spawn_app(Store::Memory).await;
    let t1_admin = app
        .create_key_in(Some("t1"), &["keys:read", "keys:write"])
        .await;
    let t1_user = app.create_key_in(Some("t1"), &["users:read"]).await;
    let t2_admin = app
        .create_key_in(Some("t2"), &["keys:read", "keys:write"])
        .await;
    let t2_user = app.create_key_in(Some("t2"), &["users:read"]).await;

    // Listing: only t1's keys.
    let items = list_ok(&app, &t1_admin.key, None).await;
    let mut ids = ids_of(&items);
    ids.sort();
    let mut want = vec![t1_admin.id.clone(), t1_user.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(items.iter().all(|i| i["org_id"] == "t1"));
    let items = list_ok(&app, &t1_admin.key, Some("t1")).await;
    assert_eq!(items.len(), 2, "naming one's own tenant is fine");

    // Deleting another tenant's key: 404 key_not_found (never 403), and it still works.
    for id in [&t2_user.id, &t2_admin.id] {
        assert_error(
            delete_key(&app, Some(&t1_admin.key), None, id).await,
            404,
            "key_not_found",
        )
        .await;
    }
    assert_eq!(app.get_with("/users/1", &t2_user.key).await.status(), 200);
    let t2_items = list_ok(&app, &t2_admin.key, None).await;
    assert_eq!(t2_items.len(), 2);
    assert!(t2_items.iter().all(|i| i["revoked_at"].is_null()));

    // Naming another tenant: 403 tenant_mismatch, on every call, and nothing happens.
    assert_error(
        get_keys(&app, Some(&t1_admin.key), Some("t2"), &[]).await,
        403,
        "tenant_mismatch",
    )
    .await;
    assert_error(
        post_keys(
            &app,
            Some(&t1_admin.key),
            Some("t2"),
            &json!({"label": "x"}),
        )
        .await,
        403,
        "tenant_mismatch",
    )
    .await;
    assert_error(
        delete_key(&app, Some(&t1_admin.key), Some("t2"), &t2_user.id).await,
        403,
        "tenant_mismatch",
    )
    .await;
    assert_eq!(list_ok(&app, ROOT, Some("t2")).await.len(), 2);
    assert_eq!(list_ok(&app, ROOT, Some("t1")).await.len(), 2);
    assert_eq!(app.get_with("/users/1", &t2_user.key).await.status(), 200);

    // The t1 key still revokes its own tenant's key.
    assert_eq!(
        delete_key(&app, Some(&t1_admin.key), None, &t1_user.id)
            .await
            .status(),
        200
    );
    assert_error(
        app.get_with("/users/1", &t1_user.key).await,
        403,
        "revoked_key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_x_tenant_id_is_400() {
    let app = spawn_app(Store::Memory).await;
    let long = "a".repeat(65);
    for bad in ["bad tenant!", "", "t1/..", long.as_str()] {
        let (s, code, msg) =
            error_of(post_keys(&app, Some(ROOT), Some(bad), &json!({"label": "x"})).await).await;
        assert_eq!(s, 400, "tenant {bad:?}: {code} {msg}");
        assert!(msg.contains("X-Tenant-ID"), "{msg}");
        let (s, _, _) = error_of(get_keys(&app, Some(ROOT), Some(bad), &[]).await).await;
        assert_eq!(s, 400, "tenant {bad:?} on list");
    }
    // The longest valid tenant works.
    let ok = "a".repeat(64);
    let k = create_as(&app, ROOT, Some(&ok), &json!({"label": "x"})).await;
    assert_eq!(k.body["org_id"], ok.as_str());
    assert!(
        list_ok(&app, ROOT, None).await.is_empty(),
        "nothing in default"
    );
}

// ---------------------------------------------------------------------------------------
// strict input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_bad_bodies_naming_the_field() {
    let app = spawn_app(Store::Memory).await;
    let long_label = "x".repeat(201);
    let cases: Vec<(String, &str, &str)> = vec![
        // (body, expected code, text the message must contain)
        (r#"{"label":"x","foo":1}"#.into(), "invalid_body", "foo"),
        (r#"{"label": 5}"#.into(), "invalid_body", "label"),
        (r#"{"label": null}"#.into(), "invalid_body", "label"),
        (r#"{}"#.into(), "invalid_body", "label"),
        (r#"{"label":""}"#.into(), "invalid_field", "label"),
        (r#"{"label":"   "}"#.into(), "invalid_field", "label"),
        (
            json!({ "label": long_label }).to_string(),
            "invalid_field",
            "label",
        ),
        (
            r#"{"label":"x","scopes":["Users Read"]}"#.into(),
            "invalid_field",
            "scopes[0]",
        ),
        (
            r#"{"label":"x","scopes":["users:read","Bad"]}"#.into(),
            "invalid_field",
            "scopes[1]",
        ),
        (
            r#"{"label":"x","scopes":[]}"#.into(),
            "invalid_field",
            "scopes",
        ),
        (
            r#"{"label":"x","scopes":"users:read"}"#.into(),
            "invalid_body",
            "scopes",
        ),
        (
            r#"{"label":"x","expires_in":"soon"}"#.into(),
            "invalid_field",
            "expires_in",
        ),
        (
            r#"{"label":"x","expires_in":"0s"}"#.into(),
            "invalid_field",
            "expires_in",
        ),
        (
            r#"{"label":"x","expires_in":3600}"#.into(),
            "invalid_body",
            "expires_in",
        ),
        (r#"{"label":"#.into(), "invalid_body", ""),
        (r#"not json"#.into(), "invalid_body", ""),
        (r#"[]"#.into(), "invalid_body", ""),
        (String::new(), "invalid_body", ""),
    ];
    for (body, want_code, want_text) in &cases {
        let resp = post_raw(
            &app,
            Some(ROOT),
            None,
            Some("application/json"),
            body.clone(),
        )
        .await;
        let (status, code, msg) = error_of(resp).await;
        assert_eq!(status, 400, "body {body}: {code} {msg}");
        assert_eq!(&code, want_code, "body {body}: {msg}");
        assert!(
            msg.contains(want_text),
            "body {body}: message {msg:?} should name {want_text}"
        );
    }

    // Content types.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let resp = post_raw(&app, Some(ROOT), None, ct, r#"{"label":"x"}"#).await;
        assert_error(resp, 400, "unsupported_content_type").await;
    }

    assert!(
        list_ok(&app, ROOT, None).await.is_empty(),
        "no refused call created a key"
    );

    // Boundaries that must be accepted.
    let max_label = "y".repeat(200);
    let k = create_as(&app, ROOT, None, &json!({ "label": max_label })).await;
    assert_eq!(k.body["label"], max_label.as_str());
    let resp = post_raw(
        &app,
        Some(ROOT),
        None,
        Some("application/json; charset=utf-8"),
        r#"{"label":"charset"}"#,
    )
    .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(list_ok(&app, ROOT, None).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_64_kib_is_413() {
    let app = spawn_app(Store::Memory).await;
    let limit = 64 * 1024;
    let pad = |total: usize| {
        let frame = r#"{"label":""}"#.len();
        format!(r#"{{"label":"{}"}}"#, "z".repeat(total - frame))
    };
    let over = pad(limit + 1);
    assert_eq!(over.len(), limit + 1);
    let resp = post_raw(&app, Some(ROOT), None, Some("application/json"), over).await;
    assert_error(resp, 413, "body_too_large").await;

    // Exactly 64 KiB is read (and then refused for its 65 000-character label, not its size).
    let exact = pad(limit);
    assert_eq!(exact.len(), limit);
    let resp = post_raw(&app, Some(ROOT), None, Some("application/json"), exact).await;
    let (status, code, msg) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (400, "invalid_field"), "{msg}");
    assert!(msg.contains("label"));

    // A much larger body is refused the same way, and the server keeps serving.
    let huge = pad(limit * 8);
    let resp = post_raw(&app, Some(ROOT), None, Some("application/json"), huge).await;
    assert_error(resp, 413, "body_too_large").await;
    assert!(list_ok(&app, ROOT, None).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_paths_are_404() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;

    assert_error(
        delete_key(&app, Some(ROOT), None, "not-a-uuid").await,
        404,
        "key_not_found",
    )
    .await;
    let fresh = uuid::Uuid::now_v7().to_string();
    assert_error(
        delete_key(&app, Some(ROOT), None, &fresh).await,
        404,
        "key_not_found",
    )
    .await;
    // The display prefix and the label are not ids (the document: use the id).
    let prefix = k.body["prefix"].as_str().unwrap();
    assert_error(
        delete_key(&app, Some(ROOT), None, prefix).await,
        404,
        "key_not_found",
    )
    .await;
    assert_error(
        delete_key(&app, Some(ROOT), None, "test").await,
        404,
        "key_not_found",
    )
    .await;
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);

    for path in ["/v1/nope", "/v2/keys", "/v1/keys/x/y", "/"] {
        let resp = app
            .http
            .get(app.admin_url(path))
            .bearer_auth(ROOT)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json")),
            "{path}: JSON 404"
        );
        let (_, code, _) = error_of(resp).await;
        assert_eq!(code, "not_found", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_sets_expires_at() {
    let app = spawn_app(Store::Memory).await;
    let k = create_as(
        &app,
        ROOT,
        None,
        &json!({"label": "hourly", "expires_in": "1h"}),
    )
    .await;
    let created = rfc3339_z(k.body["created_at"].as_str().unwrap());
    let expires = rfc3339_z(k.body["expires_at"].as_str().expect("expires_at set"));
    let d = secs_between(created, expires);
    assert!(
        (3599.0..=3601.0).contains(&d),
        "expires_at - created_at = {d}s"
    );

    let items = list_ok(&app, ROOT, None).await;
    assert_eq!(items[0]["expires_at"], k.body["expires_at"]);

    let k90 = create_as(
        &app,
        ROOT,
        None,
        &json!({"label": "quarterly", "expires_in": "90d"}),
    )
    .await;
    let d = secs_between(
        rfc3339_z(k90.body["created_at"].as_str().unwrap()),
        rfc3339_z(k90.body["expires_at"].as_str().unwrap()),
    );
    assert!(
        (90.0 * 86400.0 - 1.0..=90.0 * 86400.0 + 1.0).contains(&d),
        "{d}"
    );

    // An unexpired key works.
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);
}

// ---------------------------------------------------------------------------------------
// pagination

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_with_x_next_cursor_newest_first() {
    let app = spawn_app(Store::Memory).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let k = create_as(
            &app,
            ROOT,
            Some("pages"),
            &json!({ "label": format!("k{i}") }),
        )
        .await;
        created.push(k.id);
    }
    // Noise in another tenant must not show up.
    app.create_key(&["users:read"]).await;
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    // Without limit: everything, newest first, no cursor.
    let resp = get_keys(&app, Some(ROOT), Some("pages"), &[]).await;
    assert!(resp.headers().get("x-next-cursor").is_none());
    let all: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(ids_of(&all), newest_first);

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = vec![("limit", "3")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let resp = get_keys(&app, Some(ROOT), Some("pages"), &q).await;
        assert_eq!(resp.status(), 200);
        let next = resp
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let items: Vec<Value> = resp.json().await.unwrap();
        sizes.push(items.len());
        seen.extend(ids_of(&items));
        match next {
            Some(c) => {
                assert!(!c.is_empty());
                cursor = Some(c);
            }
            None => break,
        }
    }
    assert_eq!(sizes, vec![3, 3, 1], "pages of 3, last page has no cursor");
    assert_eq!(seen, newest_first, "every id exactly once, newest first");

    // A page size that divides the total: no empty trailing page behind a cursor.
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let mut q = vec![("limit", "7")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let resp = get_keys(&app, Some(ROOT), Some("pages"), &q).await;
        let next = resp
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let items: Vec<Value> = resp.json().await.unwrap();
        assert!(!items.is_empty(), "a cursor never leads to an empty page");
        seen.extend(ids_of(&items));
        pages += 1;
        assert!(pages < 5);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_refuses_bad_query_parameters() {
    let app = spawn_app(Store::Memory).await;
    app.create_key(&["users:read"]).await;
    for q in [
        "limit=0",
        "limit=5000",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "limit=",
        "foo=1",
        "limit=3&foo=1",
        "cursor=garbage",
        "cursor=",
        "cursor=%00%01",
        "cursor=0000000000000000",
    ] {
        let resp = app
            .http
            .get(app.admin_url(&format!("/v1/keys?{q}")))
            .bearer_auth(ROOT)
            .send()
            .await
            .unwrap();
        let (status, code, msg) = error_of(resp).await;
        assert_eq!(status, 400, "?{q}: {code} {msg}");
    }
    // Boundaries that must be accepted.
    for q in ["limit=1", "limit=1000"] {
        let resp = app
            .http
            .get(app.admin_url(&format!("/v1/keys?{q}")))
            .bearer_auth(ROOT)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "?{q}");
        let items: Vec<Value> = resp.json().await.unwrap();
        assert_eq!(items.len(), 1);
    }
}

// ---------------------------------------------------------------------------------------
// health and metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let app = spawn_app(Store::Memory).await;
    let resp = app
        .http
        .get(app.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let k = app.create_key(&["users:read"]).await;
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);

    let resp = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.contains("keygate_requests_total"), "{text}");
    assert!(text.contains("keygate_auth_duration_seconds"), "{text}");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("keygate_requests_total{")
                && l.contains("route=\"users-read\"")
                && l.contains("result=\"allowed\"")
        })
        .unwrap_or_else(|| panic!("a users-read/allowed sample:\n{text}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{line}");
    // Metrics never carry key material nor raw paths.
    assert!(!text.contains(&k.key));
    assert!(!text.contains(&secret_tail(&k)));
    assert!(!text.contains("/users/1"));
}

// ---------------------------------------------------------------------------------------
// not through the proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_not_reachable_through_the_proxy_port() {
    let app = spawn_app(Store::Memory).await;
    let manager = app
        .create_key(&["keys:read", "keys:write", "users:read"])
        .await;

    for bearer in [ROOT, manager.key.as_str()] {
        let resp = app
            .http
            .get(app.proxy_url("/v1/keys"))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains(&manager.id),
            "a key list leaked via the proxy: {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(!body.is_array());
        assert_eq!(status, 404, "{text}");
        assert_eq!(body["error"]["code"], "no_route", "{text}");

        let resp = app
            .http
            .post(app.proxy_url("/v1/keys"))
            .bearer_auth(bearer)
            .json(&json!({"label": "via proxy"}))
            .send()
            .await
            .unwrap();
        assert_error(resp, 404, "no_route").await;

        let resp = app
            .http
            .delete(app.proxy_url(&format!("/v1/keys/{}", manager.id)))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_error(resp, 404, "no_route").await;
    }
    // Nothing was created or revoked.
    let items = list_ok(&app, ROOT, None).await;
    assert_eq!(ids_of(&items), vec![manager.id.clone()]);
    assert!(items[0]["revoked_at"].is_null());
    assert_eq!(app.get_with("/users/1", &manager.key).await.status(), 200);
}

// ---------------------------------------------------------------------------------------
// last use

/// The document lists `last_used_at` ("2026-06-13T09:15:02Z" in its example) and DESIGN.md's
/// request path notes last use (batched write-behind). After a key is used, its listing
/// must eventually show when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_at_is_noted_after_the_key_is_used() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let items = list_ok(&app, ROOT, None).await;
    assert_eq!(items[0]["last_used_at"], Value::Null, "never used yet");

    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);
    let noted = eventually(Duration::from_secs(10), || async {
        list_ok(&app, ROOT, None).await[0]["last_used_at"].is_string()
    })
    .await;
    assert!(
        noted,
        "last_used_at stayed null 10 s after the key was used"
    );
    let items = list_ok(&app, ROOT, None).await;
    let used = rfc3339_z(items[0]["last_used_at"].as_str().unwrap());
    let created = rfc3339_z(items[0]["created_at"].as_str().unwrap());
    assert!(secs_between(created, used) >= 0.0);
}

/// The fields README.md lists for an object: the `{a, b, ...}` right after `marker`
/// (which ends with the `{`), plus the `` `x` and `y` `` of a "plus ..." after it.
fn readme_fields(marker: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README.md says {marker:?}"));
    let rest = &readme[at + marker.len()..];
    let (list, after) = rest.split_once('}').expect("a closing }");
    let after = after.trim_start_matches([']', '`']);
    let mut fields: BTreeSet<String> = list
        .split(',')
        .map(|f| f.split_whitespace().collect::<String>())
        .collect();
    if let Some(plus) = after.strip_prefix(" plus ") {
        let plus = plus.split_once('.').map_or(plus, |(p, _)| p);
        fields.extend(plus.split('`').skip(1).step_by(2).map(str::to_string));
    }
    fields
}

fn fields_of(object: &Value) -> BTreeSet<String> {
    object
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect()
}

/// README.md's key objects are the ones served, field by field: jack's (in its table row
/// and its description, `revokes_at` included) and HelloJohn's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_lists_exactly_the_fields_of_each_key_object() {
    let app = spawn_app(Store::Memory).await;
    create_as(&app, ROOT, None, &json!({"label": "documented"})).await;
    let jack = list_ok(&app, ROOT, None).await;
    let served = fields_of(&jack[0]);
    assert!(served.contains("revokes_at"), "{served:?}");
    let row = "list the tenant's keys, newest first, revoked ones included: `[{";
    assert_eq!(readme_fields(row), served, "README's GET /v1/keys row");
    assert_eq!(
        readme_fields("The jack key object is `{"),
        served,
        "README's jack key object"
    );
    let resp = app
        .http
        .get(app.admin_url("/v1/api-keys"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        readme_fields("The HelloJohn key object is `{"),
        fields_of(&body["data"][0]),
        "README's HelloJohn key object"
    );
    app.stop().await;
}
