//! `Deprecation` and `Sunset` on the answers to an ending key, as a client sees them over
//! real sockets with keys in a real Redis: an old key in a rotation's grace period (its
//! forwarded answers and keygate's own refusals), not the new key, nothing once the grace
//! is over, `Sunset` alone for a key expiring within `proxy.sunset_window`, and nothing
//! with `proxy.key_lifecycle_headers: false`.

use crate::support::{assert_error, eventually, spawn_app, spawn_app_with, Key, Redis, Store};
use crate::support::{TestApp, ROOT, TEST_CONFIG};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TENANT: &str = "tnt_lifecycle";

/// `POST /v1/api-keys` as root in `TENANT` with `extra` fields; panics unless 201.
async fn create(app: &TestApp, extra: Value) -> Key {
    let mut body = json!({"name": "svc", "type": "secret", "scopes": ["users:read"]});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    let resp = app
        .http
        .post(app.admin_url("/v1/api-keys"))
        .bearer_auth(ROOT)
        .header("X-Tenant-ID", TENANT)
        .json(&body)
        .send()
        .await
        .expect("admin reachable");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "create: {body}");
    Key {
        id: body["id"].as_str().expect("id").to_string(),
        key: body["key"].as_str().expect("key").to_string(),
        body,
    }
}

/// Rotate `id` with `grace`; returns the new key's text and when the old one stops.
async fn rotate(app: &TestApp, id: &str, grace: &str) -> (String, SystemTime) {
    let resp = app
        .http
        .post(app.admin_url("/v1/api-keys/rotate"))
        .bearer_auth(ROOT)
        .header("X-Tenant-ID", TENANT)
        .json(&json!({"id": id, "grace_period": grace}))
        .send()
        .await
        .expect("admin reachable");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "rotate: {body}");
    let new = body["key"].as_str().expect("key").to_string();
    (new, rfc3339(&body["old_key_revokes_at"]))
}

fn rfc3339(v: &Value) -> SystemTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// The single value of `name` (panics if there are several), as text.
fn one(h: &HeaderMap, name: &str) -> Option<String> {
    let all: Vec<_> = h.get_all(name).iter().collect();
    assert!(all.len() <= 1, "more than one {name}: {all:?}");
    all.first().map(|v| v.to_str().expect("ASCII").to_string())
}

/// `Deprecation` (RFC 9745: `@` and Unix seconds) as a time.
fn deprecation(h: &HeaderMap) -> Option<SystemTime> {
    let v = one(h, "deprecation")?;
    let digits = v.strip_prefix('@').unwrap_or_else(|| panic!("{v:?}"));
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "Deprecation {v:?} is not @<digits>"
    );
    Some(UNIX_EPOCH + Duration::from_secs(digits.parse().expect("seconds")))
}

/// `Sunset` (RFC 8594: an IMF-fixdate) as a time.
fn sunset(h: &HeaderMap) -> Option<SystemTime> {
    let v = one(h, "sunset")?;
    assert!(
        v.ends_with(" GMT") && v.len() == 29,
        "{v:?} is not an IMF-fixdate"
    );
    Some(httpdate::parse_http_date(&v).unwrap_or_else(|e| panic!("{v:?}: {e}")))
}

/// `t` rounded down to whole seconds.
fn floor_secs(t: SystemTime) -> SystemTime {
    let s = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    UNIX_EPOCH + Duration::from_secs(s)
}

/// GET `path` with `key`: status and headers.
async fn get(app: &TestApp, path: &str, key: &str) -> (u16, HeaderMap) {
    let resp = app.get_with(path, key).await;
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_key_in_its_grace_period_is_told_deprecation_and_sunset() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    let old = create(&app, json!({})).await;
    let (status, h) = get(&app, "/users/1", &old.key).await;
    assert_eq!(status, 200, "cached before the rotation");
    assert_eq!(
        (deprecation(&h), sunset(&h)),
        (None, None),
        "not ending yet"
    );

    let (new, revokes_at) = rotate(&app, &old.id, "24h").await;
    let want = Some(floor_secs(revokes_at));
    // A forwarded answer, and keygate's own refusal once the key is known (403 scope).
    for (path, status) in [("/users/1", 200), ("/admin/x", 403)] {
        let (got, h) = get(&app, path, &old.key).await;
        assert_eq!(got, status, "old key at {path}");
        assert_eq!(sunset(&h), want, "Sunset at {path}: {h:?}");
        assert_eq!(deprecation(&h), want, "Deprecation at {path}: {h:?}");
    }
    for path in ["/users/1", "/admin/x"] {
        let (_, h) = get(&app, path, &new).await;
        assert_eq!(
            (deprecation(&h), sunset(&h)),
            (None, None),
            "new key at {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_the_old_key_is_refused_as_before() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    let old = create(&app, json!({})).await;
    let (new, _) = rotate(&app, &old.id, "1s").await;
    let (status, h) = get(&app, "/users/1", &old.key).await;
    assert_eq!(status, 200, "in its grace");
    assert!(sunset(&h).is_some(), "in its grace: {h:?}");
    let refused = eventually(Duration::from_secs(5), || async {
        get(&app, "/users/1", &old.key).await.0 == 403
    })
    .await;
    assert!(refused, "the old key still passes 5 s into a 1 s grace");
    let h = assert_error(app.get_with("/users/1", &old.key).await, 403, "revoked_key").await;
    assert_eq!(
        (deprecation(&h), sunset(&h)),
        (None, None),
        "revoked: {h:?}"
    );
    assert_eq!(get(&app, "/users/1", &new).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expiring_within_the_window_is_told_sunset_only() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    // One request an hour: the second answer is keygate's 429.
    let limit = json!([{"name": "hourly", "limit": 1, "duration": "1h"}]);
    let soon = create(&app, json!({"expires_in": "3d", "ratelimits": limit})).await;
    let want = Some(floor_secs(rfc3339(&soon.body["expires_at"])));
    for status in [200, 429] {
        let (got, h) = get(&app, "/users/1", &soon.key).await;
        assert_eq!(got, status);
        assert_eq!(sunset(&h), want, "Sunset on {status}: {h:?}");
        assert_eq!(deprecation(&h), None, "no Deprecation for an expiry");
    }
    // Default window 7d: a key expiring in 30 days is not told yet.
    let later = create(&app, json!({"expires_in": "30d"})).await;
    let (got, h) = get(&app, "/users/1", &later.key).await;
    assert_eq!(got, 200);
    assert_eq!((deprecation(&h), sunset(&h)), (None, None), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_off_removes_both_headers() {
    let redis = Redis::start();
    let config = TEST_CONFIG.replace(
        "  timeouts: {",
        "  key_lifecycle_headers: false\n  timeouts: {",
    );
    assert_ne!(config, TEST_CONFIG, "the switch is in the config");
    let app = spawn_app_with(&config, Store::Redis(&redis)).await;
    let old = create(&app, json!({"expires_in": "1d"})).await;
    rotate(&app, &old.id, "24h").await;
    let (status, h) = get(&app, "/users/1", &old.key).await;
    assert_eq!(status, 200, "old key in its grace");
    assert_eq!((deprecation(&h), sunset(&h)), (None, None), "{h:?}");
}
