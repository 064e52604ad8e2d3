//! The admin router without sockets (`tower::ServiceExt::oneshot`) over a `MemoryStore`
//! and a limit store of the tests' own (`TestLimits`); the real-socket tests are in
//! `tests/it/admin_*.rs`.

use super::{router, routes, OPENAPI};
use crate::admin::{AdminState, MAX_BODY_BYTES};
use crate::auth::Verifier;
use crate::cache::KeyCache;
use crate::config::Config;
use crate::key::{self, KeyHasher, Prefixes};
use crate::limits::{Ask, Decision, Headroom, LimitStore, Outcome, Push};
use crate::metrics::Metrics;
use crate::snapshot::{Live, Snapshot};
use crate::store::{memory::MemoryStore, KeyStore, StoreError};
use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tower::ServiceExt;

const ROOT: &str = "router-test-root-token";
const UNKNOWN_ID: &str = "0190a5c4-0000-7000-8000-000000000000";

/// A limit store for these tests: what each counter (by id) has spent is what the test
/// says, totals are what it says, and `down` makes every call fail.
#[derive(Default)]
#[allow(
    clippy::disallowed_types,
    reason = "a test's double: what the test sets, read by the handler"
)]
struct TestLimits {
    spent: std::sync::Mutex<HashMap<String, u64>>,
    totals: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    down: AtomicBool,
}

impl TestLimits {
    fn up(&self) -> Result<(), StoreError> {
        match self.down.load(Ordering::Relaxed) {
            true => Err(StoreError::Unavailable("test: down".into())),
            false => Ok(()),
        }
    }
    /// `spent` on every counter whose id starts with `prefix` (`c:<budget>:` a key's
    /// credits, `k:<budget>:<name>:` one of its rate limits).
    fn spend(&self, prefix: &str, spent: u64) {
        self.spent.lock().unwrap().insert(prefix.to_string(), spent);
    }
}

#[async_trait::async_trait]
impl LimitStore for TestLimits {
    async fn take(&self, _: &Ask, _: u64) -> Result<Outcome, StoreError> {
        unreachable!("the admin API never spends")
    }
    async fn exchange(&self, _: &[Push]) -> Result<Vec<u64>, StoreError> {
        unreachable!("the admin API never spends")
    }
    async fn retire(&self, _: &Ask, _: u64, _: u64) -> Result<(), StoreError> {
        self.up()
    }
    async fn peek(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError> {
        self.up()?;
        let spent = self.spent.lock().unwrap();
        let counters = ask
            .counters
            .iter()
            .map(|c| {
                let quota = c.quota_of(c.window(now_ms));
                let used = (spent.iter())
                    .filter(|(id, _)| c.id.starts_with(id.as_str()))
                    .map(|(_, n)| *n)
                    .sum::<u64>();
                Headroom {
                    kind: c.kind,
                    quota,
                    remaining: quota.saturating_sub(used),
                    reset_ms: c.reset_in(now_ms),
                    period_ms: c.period_ms,
                }
            })
            .collect();
        Ok(Outcome {
            decision: Decision::Admit,
            counters,
        })
    }
    async fn totals(&self, tag: &str, key_id: &str) -> Result<(u64, u64), StoreError> {
        self.up()?;
        assert_eq!(tag, crate::limits::tag("default"), "the tenant's tag");
        Ok(self
            .totals
            .lock()
            .unwrap()
            .get(key_id)
            .copied()
            .unwrap_or((0, 0)))
    }
    async fn add_totals(&self, _: &[(String, String, u64, u64)]) -> Result<(), StoreError> {
        unreachable!("the admin API never spends")
    }
    async fn replicas(&self, _: &str, _: u64) -> Result<Option<u64>, StoreError> {
        unreachable!("the admin API never exchanges")
    }
}

fn state() -> Arc<AdminState> {
    state_with(Arc::default())
}

fn state_with(limits: Arc<TestLimits>) -> Arc<AdminState> {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let yaml = "proxy: { listen: \"127.0.0.1:0\", upstream: \"http://127.0.0.1:9\" }\nstore: { memory: {} }\nroutes: []\n";
    let config = Config::from_yaml(yaml, "router-test", &[("X", "Y")]).expect("a valid config");
    let metrics = Arc::new(Metrics::new());
    Arc::new(AdminState {
        store,
        limits,
        verifier: Verifier {
            cache: Arc::new(KeyCache::new(1000)),
            hasher: KeyHasher::new(None),
            prefixes: Prefixes::default(),
            legacy: Default::default(),
        },
        live: Live::new(Snapshot::new(&config, &metrics)),
        root_digest: Some(key::sha256(ROOT.as_bytes())),
        default_tenant: "default".into(),
        ready: Arc::new(AtomicBool::new(true)),
        metrics,
    })
}

/// What came back: status, headers and the body as text.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
    /// Assert keygate's error shape with this status and code.
    fn error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(self.json()["error"]["code"], code, "{}", self.text);
        assert!(self.json()["error"]["message"].is_string());
        self
    }
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request with optional bearer token and content type, JSON body if `body` is given.
async fn send(
    s: &Arc<AdminState>,
    method: &str,
    uri: &str,
    bearer: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(b) = bearer {
        req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
    }
    if let Some(c) = content_type {
        req = req.header(header::CONTENT_TYPE, c);
    }
    let req = req.body(body.into()).expect("a valid request");
    let resp = router(s.clone()).oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("a full body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn root_json(s: &Arc<AdminState>, method: &str, uri: &str, body: Value) -> Answer {
    let ct = Some("application/json");
    send(s, method, uri, Some(ROOT), ct, body.to_string()).await
}

fn documented() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..3]), Some("3.1"));
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

/// Every route the router is built from is in the OpenAPI document, and nothing else is.
#[test]
fn openapi_lists_exactly_the_served_routes() {
    let mut served: Vec<(String, String)> = routes()
        .served
        .iter()
        .map(|(m, p)| (m.as_str().to_ascii_lowercase(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented(), served);
}

/// And the router answers each documented route itself, not with a fallback.
#[tokio::test]
async fn every_documented_route_reaches_a_handler() {
    let s = state();
    for (method, path) in documented() {
        let uri = path.replace("{id}", UNKNOWN_ID);
        let a = send(&s, &method.to_ascii_uppercase(), &uri, None, None, "").await;
        // Not every answer is JSON (`/metrics`); a fallback's always is.
        let body: Value = serde_json::from_str(&a.text).unwrap_or(Value::Null);
        let code = &body["error"]["code"];
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path}: {} {}",
            a.status,
            a.text
        );
    }
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_in_keygate_json() {
    let s = state();
    for path in [
        "/",
        "/v1/nope",
        "/v1/keys/x/y",
        "/v1/keys/",
        "/v1/api-keys/",
    ] {
        let a = send(&s, "GET", path, Some(ROOT), None, "").await;
        a.error(404, "not_found");
        assert_eq!(a.header(header::CONTENT_TYPE), Some("application/json"));
    }
    let a = send(&s, "PUT", "/v1/keys", Some(ROOT), None, "").await;
    a.error(405, "method_not_allowed");
    assert_eq!(a.header(header::ALLOW), Some("GET,HEAD,POST"));
    let a = send(&s, "GET", &format!("/v1/keys/{UNKNOWN_ID}"), None, None, "").await;
    a.error(405, "method_not_allowed");
    assert_eq!(a.header(header::ALLOW), Some("DELETE"));
}

#[tokio::test]
async fn missing_or_invalid_bearer_is_401_with_a_challenge() {
    let s = state();
    let a = send(&s, "GET", "/v1/keys", None, None, "").await;
    a.error(401, "missing_key");
    let realm = "Bearer realm=\"keygate-admin\"";
    assert_eq!(a.header(header::WWW_AUTHENTICATE), Some(realm));
    let a = send(&s, "GET", "/v1/api-keys", Some("not-a-key"), None, "").await;
    a.error(401, "malformed_key");
    let invalid = "Bearer realm=\"keygate-admin\", error=\"invalid_token\"";
    assert_eq!(a.header(header::WWW_AUTHENTICATE), Some(invalid));
    let unknown = "sk_live_0000000000000000000000000000000000000000";
    let a = send(&s, "GET", "/v1/api-keys", Some(unknown), None, "").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text);
    assert_eq!(a.header(header::WWW_AUTHENTICATE), Some(invalid));
}

/// Credentials are judged before the body, and the content type before the size.
#[tokio::test]
async fn bodies_are_checked_after_credentials() {
    let s = state();
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    for (bearer, ct, body, status, code) in [
        (
            None,
            Some("text/plain"),
            "{}".to_string(),
            401,
            "missing_key",
        ),
        (
            Some(ROOT),
            None,
            "{}".into(),
            400,
            "unsupported_content_type",
        ),
        (
            Some(ROOT),
            Some("text/plain"),
            big.clone(),
            400,
            "unsupported_content_type",
        ),
        (
            Some(ROOT),
            Some("application/json"),
            "{".into(),
            400,
            "invalid_body",
        ),
        (
            Some(ROOT),
            Some("application/json"),
            r#"{"label":"a","x":1}"#.into(),
            400,
            "invalid_body",
        ),
    ] {
        send(&s, "POST", "/v1/keys", bearer, ct, body)
            .await
            .error(status, code);
    }
    let a = send(
        &s,
        "POST",
        "/v1/keys",
        Some(ROOT),
        Some("application/json"),
        big,
    )
    .await;
    a.error(413, "body_too_large");
    assert_eq!(a.header(header::CONNECTION), Some("close"));
}

/// What a key path gives for odd ids, in the order clients have always seen.
#[tokio::test]
async fn odd_ids_keep_their_answers() {
    let s = state();
    // Not UTF-8 once decoded: axum's plain 400, before the credentials are looked at.
    for bearer in [None, Some(ROOT)] {
        let a = send(&s, "DELETE", "/v1/keys/%FF", bearer, None, "").await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
        assert_eq!(a.text, "Invalid URL: Invalid UTF-8 in `id`");
    }
    // Anything else that is not one of our ids: 404 after the credentials, before a body.
    for id in ["not-an-id", "%20", "%2F", "%00", UNKNOWN_ID] {
        let uri = format!("/v1/api-keys/{id}");
        send(&s, "GET", &uri, None, None, "")
            .await
            .error(401, "missing_key");
        send(&s, "GET", &uri, Some(ROOT), None, "")
            .await
            .error(404, "key_not_found");
        send(&s, "DELETE", &uri, Some(ROOT), None, "")
            .await
            .error(404, "key_not_found");
        let jack = format!("/v1/keys/{id}");
        send(&s, "DELETE", &jack, Some(ROOT), None, "")
            .await
            .error(404, "key_not_found");
    }
    let patch = |id: &str| format!("/v1/api-keys/{id}");
    send(
        &s,
        "PATCH",
        &patch("not-an-id"),
        None,
        Some("text/plain"),
        "x",
    )
    .await
    .error(401, "missing_key");
    send(
        &s,
        "PATCH",
        &patch("not-an-id"),
        Some(ROOT),
        Some("text/plain"),
        "x",
    )
    .await
    .error(404, "key_not_found");
    send(
        &s,
        "PATCH",
        &patch(UNKNOWN_ID),
        Some(ROOT),
        Some("text/plain"),
        "x",
    )
    .await
    .error(400, "unsupported_content_type");
}

#[tokio::test]
async fn create_get_list_revoke_with_the_root_token() {
    let s = state();
    let a = root_json(&s, "POST", "/v1/keys", json!({"label": "svc"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.header(header::CACHE_CONTROL), Some("no-store"));
    let created = a.json();
    let id = created["id"].as_str().expect("an id").to_string();
    assert!(created["key"]
        .as_str()
        .is_some_and(|k| k.starts_with("sk_live_")));
    assert_eq!(created["org_id"], "default");

    let got = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{id}"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(
        (got.json()["name"].clone(), got.json()["revoked"].clone()),
        (json!("svc"), json!(false))
    );
    assert!(
        got.json().get("key").is_none(),
        "the key text is shown only once"
    );

    let listed = send(&s, "GET", "/v1/keys", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["id"], id.as_str());

    let revoked = send(
        &s,
        "DELETE",
        &format!("/v1/keys/{id}"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text);
    assert!(revoked.json()["revoked_at"].is_string());
    let hidden = send(&s, "GET", "/v1/api-keys", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(hidden, json!({"data": [], "next_cursor": null}));
    let shown = send(&s, "GET", "/v1/api-keys?revoked=true", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(shown["data"][0]["revoked"], true);
}

#[tokio::test]
async fn health_and_the_openapi_document_are_served() {
    let s = state();
    let a = send(&s, "GET", "/healthz", None, None, "").await;
    assert_eq!(
        (a.status, a.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let a = send(&s, "GET", "/readyz", None, None, "").await;
    assert_eq!(a.json(), json!({"status": "ready", "store": "memory"}));
    let a = send(&s, "GET", "/openapi.json", None, None, "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header(header::CONTENT_TYPE), Some("application/json"));
    assert_eq!(a.text, OPENAPI);
}

/// Bodies with limits that are refused on both create endpoints, with the field named.
#[tokio::test]
async fn create_refuses_bad_limits_naming_the_field() {
    let s = state();
    let rl = |v: Value| json!({"ratelimits": v});
    let ok = json!({"name": "requests", "limit": 10, "duration": "1s"});
    let nine: Vec<Value> = (0..9)
        .map(|i| json!({"name": format!("l{i}"), "limit": 1, "duration": "1m"}))
        .collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            rl(json!(nine)),
            "invalid_field",
            "field `ratelimits`: at most 8",
        ),
        (
            rl(json!([ok, {"name": "Bad", "limit": 1, "duration": "1s"}])),
            "invalid_field",
            "field `ratelimits[1].name`: use 1 to 32",
        ),
        (
            rl(json!([{"name": "credits", "limit": 1, "duration": "1s"}])),
            "invalid_field",
            "field `ratelimits[0].name`: `credits` is reserved",
        ),
        (
            rl(json!([ok, ok])),
            "invalid_field",
            "field `ratelimits[1].name`: \"requests\" is already the name",
        ),
        (
            rl(json!([{"name": "a", "limit": 0, "duration": "1s"}])),
            "invalid_field",
            "field `ratelimits[0].limit`: use 1 to 1000000000000",
        ),
        (
            rl(json!([{"name": "a", "limit": 1_000_000_000_001u64, "duration": "1s"}])),
            "invalid_field",
            "field `ratelimits[0].limit`",
        ),
        (
            rl(json!([{"name": "a", "limit": -1, "duration": "1s"}])),
            "invalid_body",
            "field `ratelimits[0].limit`",
        ),
        (
            rl(json!([{"name": "a", "limit": 1, "duration": "0s"}])),
            "invalid_field",
            "field `ratelimits[0].duration`: at least 1s",
        ),
        (
            rl(json!([{"name": "a", "limit": 1, "duration": "367d"}])),
            "invalid_field",
            "field `ratelimits[0].duration`: at most 366d",
        ),
        (
            rl(json!([{"name": "a", "limit": 1, "duration": "1500ms"}])),
            "invalid_field",
            "field `ratelimits[0].duration`: invalid duration",
        ),
        (
            rl(json!([{"name": "a", "limit": 1}])),
            "invalid_body",
            "field `ratelimits[0]`: missing field `duration`",
        ),
        (
            rl(json!([{"name": "a", "limit": 1, "duration": "1s", "burst": 2}])),
            "invalid_body",
            "field `ratelimits[0].burst`",
        ),
        (
            json!({"credits": {"remaining": 1_000_000_000_000_001u64}}),
            "invalid_field",
            "field `credits.remaining`: use 0 to 999999999999999",
        ),
        (
            json!({"credits": {"remaining": 1_000_000_000_000_000u64}}),
            "invalid_field",
            "field `credits.remaining`: use 0 to 999999999999999",
        ),
        (
            json!({"credits": {"remaining": 5, "refill": {"amount": 0, "interval": "1d"}}}),
            "invalid_field",
            "field `credits.refill.amount`: use 1 to",
        ),
        (
            json!({"credits": {"remaining": 5, "refill": {"amount": 5, "interval": "59s"}}}),
            "invalid_field",
            "field `credits.refill.interval`: at least 1m",
        ),
        (
            json!({"credits": {"remaining": 5, "refill": {"amount": 5, "interval": "53w"}}}),
            "invalid_field",
            "field `credits.refill.interval`: at most 366d",
        ),
        (
            json!({"credits": {}}),
            "invalid_body",
            "field `credits`: missing field `remaining`",
        ),
    ];
    for (extra, code, message) in &cases {
        for (uri, mut body) in [
            ("/v1/keys", json!({"label": "svc"})),
            ("/v1/api-keys", json!({"name": "svc", "type": "secret"})),
        ] {
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let a = root_json(&s, "POST", uri, body.clone()).await;
            a.error(400, code);
            let got = a.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(got.starts_with(message), "{uri} {body}: {got:?}");
        }
    }
    let listed = send(&s, "GET", "/v1/keys", Some(ROOT), None, "").await;
    assert_eq!(listed.json(), json!([]), "nothing was created");
}

/// A PATCH body's limits are checked like a create body's; one with no field to change
/// is still the one 400.
#[tokio::test]
async fn patch_refuses_bad_limits_and_empty_bodies() {
    let s = state();
    let id = root_json(&s, "POST", "/v1/keys", json!({"label": "svc"}))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let uri = format!("/v1/api-keys/{id}");
    for (body, code, message) in [
        (
            json!({}),
            "invalid_body",
            "give at least one of `name`, `scopes`, `ratelimits` and `credits`",
        ),
        (
            json!({"ratelimits": null}),
            "invalid_body",
            "give at least one of",
        ),
        (
            json!({"ratelimits": [
                {"name": "a", "limit": 1, "duration": "1s"},
                {"name": "credits", "limit": 1, "duration": "1s"},
            ]}),
            "invalid_field",
            "field `ratelimits[1].name`",
        ),
        (
            json!({"credits": 5}),
            "invalid_body",
            "field `credits`: invalid type",
        ),
        (
            json!({"credits": {"remaining": 1, "refill": {"amount": 1, "interval": "1 day"}}}),
            "invalid_field",
            "field `credits.refill.interval`: invalid duration",
        ),
    ] {
        let a = root_json(&s, "PATCH", &uri, body.clone()).await;
        a.error(400, code);
        let got = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(got.starts_with(message), "{body}: {got:?}");
    }
}

/// What both surfaces show of a key's limits: the durations in their largest exact unit,
/// credits' `remaining` as the limit store has it now (not as set).
#[tokio::test]
async fn key_objects_show_limits_and_the_credits_left_now() {
    let limits = Arc::new(TestLimits::default());
    let s = state_with(limits.clone());
    let body = json!({
        "name": "metered", "type": "secret",
        "ratelimits": [
            {"name": "requests", "limit": 100, "duration": "60s"},
            {"name": "daily", "limit": 5000, "duration": "24h"},
        ],
        "credits": {"remaining": 1000, "refill": {"amount": 500, "interval": "168h"}},
    });
    let created = root_json(&s, "POST", "/v1/api-keys", body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let created = created.json();
    let id = created["id"].as_str().unwrap().to_string();
    let ratelimits = json!([
        {"name": "requests", "limit": 100, "duration": "1m"},
        {"name": "daily", "limit": 5000, "duration": "1d"},
    ]);
    assert_eq!(created["ratelimits"], ratelimits);
    assert_eq!(
        created["credits"],
        json!({"remaining": 1000, "refill": {"amount": 500, "interval": "1w"}})
    );

    limits.spend(&format!("c:{id}:"), 300);
    let got = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{id}"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(got.json()["ratelimits"], ratelimits);
    assert_eq!(
        got.json()["credits"],
        json!({"remaining": 700, "refill": {"amount": 500, "interval": "1w"}})
    );
    let listed = send(&s, "GET", "/v1/api-keys", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(listed["data"][0]["credits"]["remaining"], 700);
    let jack = send(&s, "GET", "/v1/keys", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(jack[0]["credits"]["remaining"], 700);
    assert_eq!(jack[0]["ratelimits"], ratelimits);

    // A key without limits shows none.
    let plain = root_json(&s, "POST", "/v1/keys", json!({"label": "plain"}))
        .await
        .json();
    assert_eq!(
        (plain["ratelimits"].clone(), plain["credits"].clone()),
        (json!([]), Value::Null)
    );
}

/// A limit store that cannot be read is 503 `store_unavailable` wherever credits are
/// shown; a rotation reads them first, so it fails before anything is written.
#[tokio::test]
async fn an_unreadable_limit_store_is_503_and_a_rotation_changes_nothing() {
    let limits = Arc::new(TestLimits::default());
    let s = state_with(limits.clone());
    let body = json!({"name": "metered", "type": "secret", "credits": {"remaining": 10}});
    let id = root_json(&s, "POST", "/v1/api-keys", body).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = root_json(&s, "POST", "/v1/keys", json!({"label": "plain"}))
        .await
        .json();
    limits.down.store(true, Ordering::Relaxed);
    for uri in [
        format!("/v1/api-keys/{id}"),
        format!("/v1/api-keys/{id}/usage"),
        "/v1/api-keys".into(),
        "/v1/keys".into(),
    ] {
        let a = send(&s, "GET", &uri, Some(ROOT), None, "").await;
        a.error(503, "store_unavailable");
        assert_eq!(a.header(header::RETRY_AFTER), Some("1"));
    }
    root_json(&s, "POST", "/v1/api-keys/rotate", json!({"id": id}))
        .await
        .error(503, "store_unavailable");
    // A key without credits needs no limit store.
    let a = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{}", plain["id"].as_str().unwrap()),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);

    limits.down.store(false, Ordering::Relaxed);
    let all = send(&s, "GET", "/v1/api-keys", Some(ROOT), None, "")
        .await
        .json();
    assert_eq!(
        all["data"].as_array().map(Vec::len),
        Some(2),
        "nothing rotated: {all}"
    );
    assert!(all["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["revoked_at"].is_null()));
}

/// A rotation's new key carries the limits and credits, and its credits are the old
/// key's balance (one budget).
#[tokio::test]
async fn a_rotated_key_keeps_the_limits_and_the_balance() {
    let limits = Arc::new(TestLimits::default());
    let s = state_with(limits.clone());
    let body = json!({
        "name": "metered", "type": "secret",
        "ratelimits": [{"name": "requests", "limit": 10, "duration": "1s"}],
        "credits": {"remaining": 50},
    });
    let old = root_json(&s, "POST", "/v1/api-keys", body).await.json();
    let old_id = old["id"].as_str().unwrap();
    limits.spend(&format!("c:{old_id}:"), 20);
    let rotated = root_json(&s, "POST", "/v1/api-keys/rotate", json!({"id": old_id})).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text);
    let new = rotated.json();
    assert_eq!(new["ratelimits"], old["ratelimits"]);
    assert_eq!(new["credits"], json!({"remaining": 30, "refill": null}));
    let new_id = new["id"].as_str().unwrap();
    let record = s.store.by_id("default", new_id).await.unwrap().unwrap();
    assert_eq!(record.limits.budget.as_deref(), Some(old_id));
    let got = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{new_id}"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(got.json()["credits"]["remaining"], 30);
}

/// The usage answer: each window's state from the limit store, the credits, and the
/// key's totals under its tenant's tag; a key without limits still answers.
#[tokio::test]
async fn usage_shows_each_window_the_credits_and_the_totals() {
    let limits = Arc::new(TestLimits::default());
    let s = state_with(limits.clone());
    let body = json!({
        "name": "metered", "type": "secret",
        "ratelimits": [
            {"name": "requests", "limit": 100, "duration": "60s"},
            {"name": "daily", "limit": 5000, "duration": "24h"},
        ],
        "credits": {"remaining": 1000, "refill": {"amount": 500, "interval": "168h"}},
    });
    let id = root_json(&s, "POST", "/v1/api-keys", body).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    limits.spend(&format!("c:{id}:"), 300);
    limits.spend(&format!("k:{id}:requests:"), 7);
    limits.totals.lock().unwrap().insert(id.clone(), (9, 2));
    let usage = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{id}/usage"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.text);
    let u = usage.json();
    assert_eq!(u["id"], id.as_str());
    assert_eq!(u["requests"], json!({"admitted": 9, "refused": 2}));
    assert_eq!(
        (
            u["ratelimits"][0]["remaining"].clone(),
            u["ratelimits"][1]["remaining"].clone()
        ),
        (json!(93), json!(5000))
    );
    // Windows aligned to the epoch: a minute's ends on a whole minute.
    let reset = u["ratelimits"][0]["reset_at"].as_str().unwrap();
    assert!(reset.ends_with(":00Z"), "{reset}");
    assert_eq!(u["credits"]["remaining"], 700);
    assert!(u["credits"]["refills_at"].is_string(), "{u}");

    let plain = root_json(&s, "POST", "/v1/keys", json!({"label": "plain"}))
        .await
        .json();
    let pid = plain["id"].as_str().unwrap();
    let u = send(
        &s,
        "GET",
        &format!("/v1/api-keys/{pid}/usage"),
        Some(ROOT),
        None,
        "",
    )
    .await;
    assert_eq!(
        u.json(),
        json!({
            "id": pid, "ratelimits": [], "credits": null,
            "requests": {"admitted": 0, "refused": 0},
        })
    );
}
