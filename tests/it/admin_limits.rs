//! A key's own rate limits and credits on the admin port (issue 14), over real sockets
//! against an in-process keygate: set on create on both surfaces and read back on both,
//! refused with the field named, replaced and removed by PATCH (credits `null`: unlimited,
//! absent: unchanged), carried by a rotation onto one budget, and `GET
//! /v1/api-keys/{id}/usage` (its shape, tenants, scopes). Each store-dependent test runs
//! on the memory store and on a real Redis.

use crate::support::{assert_error, eventually, spawn_app, Redis, Store, TestApp, ROOT};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

const TENANT: &str = "tnt_limits";
const OTHER: &str = "tnt_limits_other";

/// Two limits (one written back in a larger unit) and refilled credits, as sent.
fn limits_body() -> Value {
    json!({
        "ratelimits": [
            {"name": "requests", "limit": 100, "duration": "1s"},
            {"name": "per-day", "limit": 5000, "duration": "24h"},
        ],
        "credits": {"remaining": 1000, "refill": {"amount": 1000, "interval": "1d"}},
    })
}

/// What every key object shows of `limits_body`.
fn limits_shown() -> (Value, Value) {
    (
        json!([
            {"name": "requests", "limit": 100, "duration": "1s"},
            {"name": "per-day", "limit": 5000, "duration": "1d"},
        ]),
        json!({"remaining": 1000, "refill": {"amount": 1000, "interval": "1d"}}),
    )
}

fn with(mut body: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// A keygate on `store` ("memory" or "redis"; the Redis server is kept with it).
async fn app_on(store: &str) -> (TestApp, Option<Redis>) {
    match store {
        "memory" => (spawn_app(Store::Memory).await, None),
        _ => {
            let redis = Redis::start();
            (spawn_app(Store::Redis(&redis)).await, Some(redis))
        }
    }
}

fn admin(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: &str,
    tenant: Option<&str>,
) -> reqwest::RequestBuilder {
    let req = (app.http)
        .request(method, app.admin_url(path))
        .bearer_auth(bearer);
    match tenant {
        Some(t) => req.header("X-Tenant-ID", t),
        None => req,
    }
}

/// The JSON body of an answer that must have status `want`.
async fn json_of(resp: reqwest::Response, want: u16, what: &str) -> Value {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// A root call in `TENANT` with an optional JSON body, answered `want`.
async fn root(app: &TestApp, method: Method, path: &str, body: Option<&Value>, want: u16) -> Value {
    let what = format!("{method} {path}");
    let mut req = admin(app, method, path, ROOT, Some(TENANT));
    if let Some(b) = body {
        req = req.json(b);
    }
    json_of(req.send().await.expect("admin reachable"), want, &what).await
}

/// A secret key of `TENANT` that may read users, with neither limits nor credits.
async fn reader_key(app: &TestApp, name: &str) -> Value {
    let body = json!({"name": name, "type": "secret", "scopes": ["users:read"]});
    root(app, Method::POST, "/v1/api-keys", Some(&body), 201).await
}

async fn get_key(app: &TestApp, id: &str) -> Value {
    root(app, Method::GET, &format!("/v1/api-keys/{id}"), None, 200).await
}

async fn usage(app: &TestApp, id: &str) -> Value {
    root(
        app,
        Method::GET,
        &format!("/v1/api-keys/{id}/usage"),
        None,
        200,
    )
    .await
}

async fn patch(app: &TestApp, id: &str, body: &Value) -> Value {
    root(
        app,
        Method::PATCH,
        &format!("/v1/api-keys/{id}"),
        Some(body),
        200,
    )
    .await
}

/// The key `id` as each list of each surface shows it (`revoked=true`: every key).
async fn listed(app: &TestApp, id: &str) -> (Value, Value) {
    let hj = root(app, Method::GET, "/v1/api-keys?revoked=true", None, 200).await;
    let jack = root(app, Method::GET, "/v1/keys", None, 200).await;
    let find = |items: &Value| {
        (items.as_array().expect("a list").iter())
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} is listed: {items}"))
    };
    (find(&hj["data"]), find(&jack))
}

/// `(ratelimits, credits)` of a key object.
fn limits_of(key: &Value) -> (Value, Value) {
    let obj = key
        .as_object()
        .unwrap_or_else(|| panic!("an object: {key}"));
    assert!(
        obj.contains_key("ratelimits") && obj.contains_key("credits"),
        "{key}"
    );
    (key["ratelimits"].clone(), key["credits"].clone())
}

/// Everywhere key `id` is shown, it shows these limits.
async fn assert_shown_everywhere(app: &TestApp, id: &str, want: &(Value, Value), what: &str) {
    let (hj, jack) = listed(app, id).await;
    for (surface, key) in [
        ("get", get_key(app, id).await),
        ("list", hj),
        ("jack list", jack),
    ] {
        assert_eq!(&limits_of(&key), want, "{what}: {surface}: {key}");
    }
}

fn at(text: &Value) -> SystemTime {
    humantime::parse_rfc3339(text.as_str().unwrap_or_else(|| panic!("a time: {text}")))
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

// ---------------------------------------------------------------------------------------
// create and read back

async fn limits_set_on_create_are_shown_on_both_surfaces(store: &str) {
    let (app, _redis) = app_on(store).await;
    let want = limits_shown();
    let jack_body = with(json!({"label": "jack-metered"}), &limits_body());
    let jack = root(&app, Method::POST, "/v1/keys", Some(&jack_body), 201).await;
    let hj_body = with(
        json!({"name": "hj-metered", "type": "secret"}),
        &limits_body(),
    );
    let hj = root(&app, Method::POST, "/v1/api-keys", Some(&hj_body), 201).await;
    for created in [&jack, &hj] {
        assert_eq!(limits_of(created), want, "{store}: the create answer");
        let id = created["id"].as_str().unwrap();
        assert_shown_everywhere(&app, id, &want, store).await;
    }
    // A key without limits shows none on every surface.
    let plain = root(
        &app,
        Method::POST,
        "/v1/keys",
        Some(&json!({"label": "plain"})),
        201,
    )
    .await;
    let none = (json!([]), Value::Null);
    assert_eq!(limits_of(&plain), none);
    assert_shown_everywhere(&app, plain["id"].as_str().unwrap(), &none, store).await;
    // Credits without a refill, `null` for none.
    let body = json!({"name": "once", "type": "secret", "ratelimits": null,
                      "credits": {"remaining": 0, "refill": null}});
    let once = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await;
    let want = (json!([]), json!({"remaining": 0, "refill": null}));
    assert_shown_everywhere(&app, once["id"].as_str().unwrap(), &want, store).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_set_on_create_are_shown_on_both_surfaces_memory() {
    limits_set_on_create_are_shown_on_both_surfaces("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_set_on_create_are_shown_on_both_surfaces_redis() {
    limits_set_on_create_are_shown_on_both_surfaces("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_are_400_naming_the_field_on_both_surfaces() {
    let app = spawn_app(Store::Memory).await;
    let rl = |name: &str, limit: Value, duration: &str| {
        json!({"ratelimits": [
            {"name": "ok", "limit": 1, "duration": "1s"},
            {"name": name, "limit": limit, "duration": duration},
        ]})
    };
    let cases: Vec<(Value, &str)> = vec![
        (rl("Upper", json!(1), "1s"), "field `ratelimits[1].name`"),
        (rl("credits", json!(1), "1s"), "field `ratelimits[1].name`"),
        (rl("ok", json!(1), "1s"), "field `ratelimits[1].name`"),
        (
            rl(&"x".repeat(33), json!(1), "1s"),
            "field `ratelimits[1].name`",
        ),
        (rl("b", json!(0), "1s"), "field `ratelimits[1].limit`"),
        (
            rl("b", json!(1_000_000_000_001u64), "1s"),
            "field `ratelimits[1].limit`",
        ),
        (rl("b", json!(1.5), "1s"), "field `ratelimits[1].limit`"),
        (rl("b", json!(1), "500ms"), "field `ratelimits[1].duration`"),
        (rl("b", json!(1), "367d"), "field `ratelimits[1].duration`"),
        (
            rl("b", json!(1), "1h 30m"),
            "field `ratelimits[1].duration`",
        ),
        (
            json!({"ratelimits": (0..9).map(|i| json!({"name": format!("n{i}"), "limit": 1,
                                                       "duration": "1m"})).collect::<Vec<_>>()}),
            "field `ratelimits`",
        ),
        (
            json!({"credits": {"remaining": -1}}),
            "field `credits.remaining`",
        ),
        (
            json!({"credits": {"remaining": 1_000_000_000_000_001u64}}),
            "field `credits.remaining`",
        ),
        (
            json!({"credits": {"remaining": 1, "refill": {"amount": 0, "interval": "1d"}}}),
            "field `credits.refill.amount`",
        ),
        (
            json!({"credits": {"remaining": 1, "refill": {"amount": 1, "interval": "30s"}}}),
            "field `credits.refill.interval`",
        ),
        (
            json!({"credits": {"remaining": 1, "refill": {"amount": 1}}}),
            "field `credits.refill`",
        ),
        (
            json!({"credits": {"remaining": 1, "spent": 0}}),
            "field `credits.spent`",
        ),
    ];
    for (extra, field) in &cases {
        for (path, body) in [
            ("/v1/keys", with(json!({"label": "bad"}), extra)),
            (
                "/v1/api-keys",
                with(json!({"name": "bad", "type": "secret"}), extra),
            ),
        ] {
            let e = root(&app, Method::POST, path, Some(&body), 400).await;
            let code = e["error"]["code"].as_str().unwrap();
            let message = e["error"]["message"].as_str().unwrap();
            assert!(code.starts_with("invalid_"), "{path} {body}: {e}");
            assert!(
                message.starts_with(field),
                "{path} {body}: {message:?} names {field}"
            );
        }
    }
    let none = root(&app, Method::GET, "/v1/keys", None, 200).await;
    assert_eq!(none, json!([]), "no refused create made a key");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// PATCH

async fn patch_replaces_and_removes_limits_and_sets_and_nulls_credits(store: &str) {
    let (app, _redis) = app_on(store).await;
    let body = with(json!({"name": "metered", "type": "secret"}), &limits_body());
    let id = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, credits) = limits_shown();

    // A new list replaces the old one.
    let one = json!([{"name": "burst", "limit": 10, "duration": "60s"}]);
    let answer = patch(&app, &id, &json!({"ratelimits": one})).await;
    let shown = json!([{"name": "burst", "limit": 10, "duration": "1m"}]);
    assert_eq!(
        limits_of(&answer),
        (shown.clone(), credits.clone()),
        "{store}"
    );
    assert_shown_everywhere(&app, &id, &(shown.clone(), credits.clone()), store).await;

    // Absent and null leave them as they are.
    let answer = patch(&app, &id, &json!({"name": "renamed", "ratelimits": null})).await;
    assert_eq!(answer["name"], "renamed");
    assert_eq!(
        limits_of(&answer),
        (shown.clone(), credits.clone()),
        "{store}"
    );

    // New credits: a new balance, without a refill.
    let answer = patch(&app, &id, &json!({"credits": {"remaining": 5}})).await;
    let five = json!({"remaining": 5, "refill": null});
    assert_eq!(limits_of(&answer), (shown.clone(), five.clone()), "{store}");
    assert_shown_everywhere(&app, &id, &(shown.clone(), five.clone()), store).await;

    // `[]` removes every limit; `credits: null` makes the key unlimited.
    let answer = patch(&app, &id, &json!({"ratelimits": []})).await;
    assert_eq!(limits_of(&answer), (json!([]), five.clone()), "{store}");
    let answer = patch(&app, &id, &json!({"credits": null})).await;
    let none = (json!([]), Value::Null);
    assert_eq!(limits_of(&answer), none, "{store}");
    assert_shown_everywhere(&app, &id, &none, store).await;
    assert_eq!(
        usage(&app, &id).await,
        json!({"id": id, "ratelimits": [], "credits": null,
               "requests": {"admitted": 0, "refused": 0}}),
        "{store}"
    );

    // Bad limits change nothing; neither does a body with nothing to change.
    let bad =
        json!({"name": "x", "ratelimits": [{"name": "credits", "limit": 1, "duration": "1s"}]});
    let e = root(
        &app,
        Method::PATCH,
        &format!("/v1/api-keys/{id}"),
        Some(&bad),
        400,
    )
    .await;
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("field `ratelimits[0].name`"));
    let e = root(
        &app,
        Method::PATCH,
        &format!("/v1/api-keys/{id}"),
        Some(&json!({})),
        400,
    )
    .await;
    assert_eq!(e["error"]["code"], "invalid_body");
    assert_eq!(get_key(&app, &id).await["name"], "renamed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_replaces_and_removes_limits_and_sets_and_nulls_credits_memory() {
    patch_replaces_and_removes_limits_and_sets_and_nulls_credits("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_replaces_and_removes_limits_and_sets_and_nulls_credits_redis() {
    patch_replaces_and_removes_limits_and_sets_and_nulls_credits("redis").await;
}

// ---------------------------------------------------------------------------------------
// rotation

async fn a_rotated_key_carries_its_limits_and_credits(store: &str) {
    let (app, _redis) = app_on(store).await;
    let body = with(json!({"name": "metered", "type": "secret"}), &limits_body());
    let old = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await;
    let old_id = old["id"].as_str().unwrap();
    let want = limits_shown();
    let rotated = root(
        &app,
        Method::POST,
        "/v1/api-keys/rotate",
        Some(&json!({"id": old_id, "grace_period": "1h"})),
        200,
    )
    .await;
    assert_eq!(limits_of(&rotated), want, "{store}: the rotate answer");
    let new_id = rotated["id"].as_str().unwrap();
    assert_ne!(new_id, old_id);
    // Both keys, on every surface, the same limits; the old one in its grace period.
    assert_shown_everywhere(&app, new_id, &want, store).await;
    assert_shown_everywhere(&app, old_id, &want, store).await;
    // And the successor of the successor too (the budget is the first key's).
    let again = root(
        &app,
        Method::POST,
        "/v1/api-keys/rotate",
        Some(&json!({"id": new_id})),
        200,
    )
    .await;
    assert_eq!(limits_of(&again), want, "{store}: a second rotation");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_carries_its_limits_and_credits_memory() {
    a_rotated_key_carries_its_limits_and_credits("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_carries_its_limits_and_credits_redis() {
    a_rotated_key_carries_its_limits_and_credits("redis").await;
}

// ---------------------------------------------------------------------------------------
// usage

async fn usage_shows_each_window_the_credits_and_the_requests(store: &str) {
    let (app, _redis) = app_on(store).await;
    let body = with(json!({"name": "metered", "type": "secret"}), &limits_body());
    let id = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = SystemTime::now() - Duration::from_secs(1);
    let u = usage(&app, &id).await;
    let after = SystemTime::now() + Duration::from_secs(1);
    let obj = u.as_object().expect("an object");
    let mut fields: Vec<&str> = obj.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["credits", "id", "ratelimits", "requests"],
        "{store}: {u}"
    );
    assert_eq!(u["id"], id.as_str());
    assert_eq!(
        u["requests"],
        json!({"admitted": 0, "refused": 0}),
        "{store}"
    );
    let windows = u["ratelimits"].as_array().expect("ratelimits");
    assert_eq!(windows.len(), 2, "{store}: {u}");
    for (w, (name, limit, duration, secs)) in windows
        .iter()
        .zip([("requests", 100, "1s", 1), ("per-day", 5000, "1d", 86_400)])
    {
        let mut fields: Vec<&str> = w.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["duration", "limit", "name", "remaining", "reset_at"],
            "{w}"
        );
        assert_eq!(
            (&w["name"], &w["limit"], &w["duration"], &w["remaining"]),
            (&json!(name), &json!(limit), &json!(duration), &json!(limit)),
            "{store}: {w}"
        );
        // The end of the current window: within one duration from now.
        let reset = at(&w["reset_at"]);
        let latest = after + Duration::from_secs(secs);
        assert!(reset >= before && reset <= latest, "{store}: {w}");
    }
    let c = &u["credits"];
    assert_eq!(
        (&c["remaining"], &c["refill"]),
        (&json!(1000), &json!({"amount": 1000, "interval": "1d"})),
        "{store}: {u}"
    );
    // A day after the credits were set (at creation).
    let refill = at(&c["refills_at"]);
    let day = Duration::from_secs(86_400);
    assert!(
        refill >= before + day && refill <= after + day,
        "{store}: {u}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_each_window_the_credits_and_the_requests_memory() {
    usage_shows_each_window_the_credits_and_the_requests("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_each_window_the_credits_and_the_requests_redis() {
    usage_shows_each_window_the_credits_and_the_requests("redis").await;
}

/// A management key sees only its own tenant's keys' usage (another tenant's is 404, as
/// for `GET /v1/api-keys/{id}`) and needs `keys:read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_per_tenant_and_needs_keys_read() {
    let app = spawn_app(Store::Memory).await;
    let create = |tenant: &'static str, scopes: Value| {
        let app = &app;
        async move {
            let body = json!({"name": "k", "type": "secret", "scopes": scopes,
                              "credits": {"remaining": 10}});
            let req = admin(app, Method::POST, "/v1/api-keys", ROOT, Some(tenant)).json(&body);
            json_of(req.send().await.unwrap(), 201, "create").await
        }
    };
    let target = create(TENANT, json!(["users:read"])).await;
    let reader = create(TENANT, json!(["keys:read"])).await;
    let writer = create(TENANT, json!(["keys:write"])).await;
    let plain = create(TENANT, json!(["users:read"])).await;
    let other = create(OTHER, json!(["keys:read", "keys:write"])).await;
    let path = format!("/v1/api-keys/{}/usage", target["id"].as_str().unwrap());
    let call =
        |bearer: &str, tenant: Option<&str>| admin(&app, Method::GET, &path, bearer, tenant).send();
    let key = |k: &Value| k["key"].as_str().unwrap().to_string();

    let mine = json_of(call(&key(&reader), None).await.unwrap(), 200, "reader").await;
    assert_eq!(mine["credits"]["remaining"], 10);
    assert_eq!(mine["id"], target["id"]);
    // Another tenant's key, and the root token acting in another tenant: 404.
    for (bearer, tenant) in [(key(&other), None), (ROOT.to_string(), Some(OTHER))] {
        assert_error(call(&bearer, tenant).await.unwrap(), 404, "key_not_found").await;
    }
    // A key naming a tenant not its own: 403 before anything is looked up.
    assert_error(
        call(&key(&other), Some(TENANT)).await.unwrap(),
        403,
        "tenant_mismatch",
    )
    .await;
    // Without `keys:read`: 403 with the scope named; without credentials: 401.
    for k in [&writer, &plain] {
        let resp = call(&key(k), None).await.unwrap();
        let h = assert_error(resp, 403, "insufficient_scope").await;
        let challenge = h["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("insufficient_scope"), "{challenge}");
    }
    let resp = app.http.get(app.admin_url(&path)).send().await.unwrap();
    assert_error(resp, 401, "missing_key").await;
    // An id that is not a key: 404, as everywhere.
    let resp = admin(&app, Method::GET, "/v1/api-keys/nope/usage", ROOT, None).send();
    assert_error(resp.await.unwrap(), 404, "key_not_found").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// what the proxy spends (needs the proxy's enforcement of issue 14)

/// Requests through the proxy spend the key's credits and count in its usage; a rotated
/// key spends the same budget as the old one during the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_proxy_spends_shows_in_credits_and_usage_and_a_rotation_shares_it() {
    let app = spawn_app(Store::Memory).await;
    let body = json!({"name": "metered", "type": "secret", "scopes": ["users:read"],
                      "ratelimits": [{"name": "requests", "limit": 1000, "duration": "1h"}],
                      "credits": {"remaining": 10}});
    let old = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await;
    let (old_id, old_key) = (old["id"].as_str().unwrap(), old["key"].as_str().unwrap());
    for _ in 0..3 {
        assert_eq!(app.get_with("/users/1", old_key).await.status(), 200);
    }
    // `local` mode may report its counts a little later (the totals once a second).
    let within = Duration::from_secs(10);
    let spent = eventually(within, || async {
        get_key(&app, old_id).await["credits"]["remaining"] == 7
            && usage(&app, old_id).await["requests"]["admitted"] == 3
    })
    .await;
    assert!(
        spent,
        "credits after 3 requests: {}",
        get_key(&app, old_id).await
    );
    let u = usage(&app, old_id).await;
    assert_eq!(u["credits"]["remaining"], 7, "{u}");
    assert_eq!(u["ratelimits"][0]["remaining"], 997, "{u}");
    assert_eq!(u["requests"]["admitted"], 3, "{u}");

    let rotated = root(
        &app,
        Method::POST,
        "/v1/api-keys/rotate",
        Some(&json!({"id": old_id})),
        200,
    )
    .await;
    assert_eq!(rotated["credits"]["remaining"], 7, "one balance: {rotated}");
    let (new_id, new_key) = (
        rotated["id"].as_str().unwrap(),
        rotated["key"].as_str().unwrap(),
    );
    assert_eq!(app.get_with("/users/1", new_key).await.status(), 200);
    let shared = eventually(within, || async {
        get_key(&app, old_id).await["credits"]["remaining"] == 6
            && get_key(&app, new_id).await["credits"]["remaining"] == 6
    })
    .await;
    assert!(shared, "the old key sees what the new one spent");
    // Each key's own requests (the totals once a second).
    let counted = eventually(within, || async {
        usage(&app, new_id).await["requests"]["admitted"] == 1
    })
    .await;
    assert!(counted, "{}", usage(&app, new_id).await);
    assert_eq!(usage(&app, old_id).await["requests"]["admitted"], 3);
    app.stop().await;
}

/// Every JSON body of the admin port is one object, objects inside it where the documents
/// have objects: a body followed by anything, a body sent as an array, or a nested
/// object (`credits`, a `ratelimits` entry, an import entry) sent as an array is 400
/// `invalid_body`, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_one_json_object_with_objects_inside() {
    let (app, _redis) = app_on("memory").await;
    let made = reader_key(&app, "strict").await;
    let id = made["id"].as_str().unwrap().to_string();
    let before = get_key(&app, &id).await;
    let patch_path = format!("/v1/api-keys/{id}");
    let rotate = format!(r#"{{"id": "{id}", "grace_period": "0s"}}"#);
    let cases: Vec<(Method, &str, String)> = vec![
        (Method::POST, "/v1/api-keys", r#"{"name": "t", "type": "secret"} ,"credits": {"remaining": 0}}"#.into()),
        (Method::POST, "/v1/api-keys", r#"["t", "secret", ["users:read"]]"#.into()),
        (Method::POST, "/v1/api-keys", r#"{"name": "t", "type": "secret", "ratelimits": [["r", 3, "1s"]]}"#.into()),
        (Method::POST, "/v1/api-keys", r#"{"name": "t", "type": "secret", "credits": [5, [100, "1d"]]}"#.into()),
        (Method::POST, "/v1/api-keys", r#"{"name": "t", "type": "secret", "credits": {"remaining": 5, "refill": [100, "1d"]}}"#.into()),
        (Method::POST, "/v1/api-keys", r#"{"name": "t", "type": {"secret": null}}"#.into()),
        (Method::POST, "/v1/keys", r#"{"label": "q"}<html>"#.into()),
        (Method::POST, "/v1/keys", r#"["q", ["users:read"]]"#.into()),
        (Method::PATCH, &patch_path, r#"{"name": "n2"}{"credits": {"remaining": 0}}"#.into()),
        (Method::PATCH, &patch_path, r#"[null, null, null, [7, null]]"#.into()),
        (Method::POST, "/v1/api-keys/rotate", format!("{rotate} trailing")),
        (Method::POST, "/v1/api-keys/rotate", format!(r#"["{id}", "0s"]"#)),
        (Method::POST, "/v1/api-keys/import", r#"{"keys": [["legacy_token_0123456789abcdef", null, "seq"]]}"#.into()),
        (Method::POST, "/v1/api-keys/import", r#"{"keys": [{"key": "legacy_token_0123456789abcdef", "name": "x"}]}!!!"#.into()),
        (Method::POST, "/v1/explain", r#"["GET", "/"]"#.into()),
    ];
    for (method, path, body) in cases {
        let resp = admin(&app, method.clone(), path, ROOT, Some(TENANT))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let what = format!("{method} {path} {body}");
        let e = json_of(resp, 400, &what).await;
        assert_eq!(e["error"]["code"], "invalid_body", "{what}: {e}");
    }
    assert_eq!(get_key(&app, &id).await, before, "the key is as it was");
    let listed = root(&app, Method::GET, "/v1/api-keys?revoked=true", None, 200).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
}

/// Credits without a refill are one counter that never expires; new credits (a PATCH)
/// are a new counter, and the one they replace is given an expiry instead of staying in
/// Redis for good. The new balance is counted afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_credits_leave_no_counter_behind_for_good() {
    let (app, redis) = app_on("redis").await;
    let redis = redis.expect("a Redis");
    let body = json!({"name": "metered", "type": "secret", "scopes": ["users:read"],
                      "credits": {"remaining": 10}});
    let made = root(&app, Method::POST, "/v1/api-keys", Some(&body), 201).await;
    let (id, key) = (made["id"].as_str().unwrap(), made["key"].as_str().unwrap());
    let counters = || -> Vec<(String, i64)> {
        let mut keys: Vec<String> = redis.cmd(&["KEYS", &format!("*:c:{id}:*")]);
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let ttl: i64 = redis.cmd(&["PTTL", &k]);
                (k, ttl)
            })
            .collect()
    };
    let spend = || async {
        assert_eq!(app.get_with("/users/1", key).await.status(), 200);
        let within = Duration::from_secs(10);
        let endless = || counters().into_iter().filter(|(_, t)| *t == -1).count();
        // `local` mode: the spending reaches Redis at the next exchange.
        assert!(eventually(within, || async { endless() > 0 }).await);
        // Only the balance in force never expires.
        assert_eq!(endless(), 1, "{:?}", counters());
    };
    for round in 0..3 {
        spend().await;
        let credits = json!({"credits": {"remaining": 5}});
        patch(&app, id, &credits).await;
        let left = counters();
        assert!(
            left.iter().all(|(_, ttl)| (1..=3_600_000).contains(ttl)),
            "round {round}: every replaced counter expires: {left:?}"
        );
        assert_eq!(get_key(&app, id).await["credits"]["remaining"], 5);
    }
    assert_eq!(counters().len(), 3, "{:?}", counters());
}

/// Only the two lists take query parameters: on every other management endpoint a query
/// is 400 `invalid_query`, and the call does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_endpoints_without_parameters_refuse_a_query() {
    let (app, _redis) = app_on("memory").await;
    let made = reader_key(&app, "q").await;
    let id = made["id"].as_str().unwrap();
    let key_path = format!("/v1/api-keys/{id}");
    let calls = [
        (Method::GET, format!("{key_path}?x=1"), None),
        (Method::GET, format!("{key_path}/usage?x=1"), None),
        (
            Method::PATCH,
            format!("{key_path}?x=1"),
            Some(json!({"name": "changed"})),
        ),
        (
            Method::POST,
            "/v1/keys?x=1".into(),
            Some(json!({"label": "new"})),
        ),
        (
            Method::POST,
            "/v1/api-keys?x=1".into(),
            Some(json!({"name": "new", "type": "secret"})),
        ),
        (
            Method::POST,
            "/v1/api-keys/rotate?x=1".into(),
            Some(json!({"id": id})),
        ),
        (
            Method::POST,
            "/v1/explain?x=1".into(),
            Some(json!({"method": "GET", "path": "/"})),
        ),
        (Method::DELETE, format!("{key_path}?x=1"), None),
        (Method::DELETE, format!("/v1/keys/{id}?x=1"), None),
    ];
    for (method, path, body) in &calls {
        let e = root(&app, method.clone(), path, body.as_ref(), 400).await;
        assert_eq!(e["error"]["code"], "invalid_query", "{method} {path}: {e}");
    }
    let k = get_key(&app, id).await;
    assert_eq!(
        (&k["name"], &k["revoked"]),
        (&json!("q"), &json!(false)),
        "{k}"
    );
    let listed = root(&app, Method::GET, "/v1/api-keys?revoked=true", None, 200).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    // A bare `?` is no parameter.
    root(&app, Method::GET, &format!("{key_path}?"), None, 200).await;
}
