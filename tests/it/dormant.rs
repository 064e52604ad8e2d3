//! Dormant keys: the `unused_for` list filter of both admin documents (with paging) and
//! the `keygate_keys_dormant` gauge, over real Redis. Old uses and creations are written
//! into the records directly (the record and, for `created_at`, its tenant index entry).

use crate::support::{
    assert_error, eventually, spawn_app_with, Key, Redis, Store, TestApp, ROOT, TEST_CONFIG,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY_MS: u64 = 86_400_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn record_key(redis: &Redis, id: &str) -> String {
    let digest: String = redis.cmd(&["GET", &format!("kgtest:id:{id}")]);
    format!("kgtest:k:{digest}")
}

/// Pretend the key was last used `days` ago.
fn used_days_ago(redis: &Redis, id: &str, days: u64) {
    let at = (now_ms() - days * DAY_MS).to_string();
    let _: i64 = redis.cmd(&["HSET", &record_key(redis, id), "last_used_at", &at]);
}

/// Pretend the key was created `days` ago (record and tenant index, so paging stays sound).
fn created_days_ago(redis: &Redis, tenant: &str, id: &str, days: u64) {
    let rec = record_key(redis, id);
    let old: String = redis.cmd(&["HGET", &rec, "created_at"]);
    let at = now_ms() - days * DAY_MS;
    let index = format!("kgtest:t:{tenant}");
    let old_member = format!("{:016x}:{id}", old.parse::<u64>().unwrap());
    let _: i64 = redis.cmd(&["ZREM", &index, &old_member]);
    let _: i64 = redis.cmd(&["ZADD", &index, "0", &format!("{at:016x}:{id}")]);
    let _: i64 = redis.cmd(&["HSET", &rec, "created_at", &at.to_string()]);
}

async fn get(
    app: &TestApp,
    path: &str,
    tenant: &str,
    query: &[(&str, String)],
) -> reqwest::Response {
    app.http
        .get(app.admin_url(path))
        .bearer_auth(ROOT)
        .header("X-Tenant-ID", tenant)
        .query(query)
        .send()
        .await
        .expect("admin reachable")
}

/// Every page of a list with `limit`: the ids, and the size of each page.
async fn all_pages(
    app: &TestApp,
    path: &str,
    tenant: &str,
    query: &[(&str, &str)],
    limit: usize,
) -> (BTreeSet<String>, Vec<usize>) {
    let (mut ids, mut sizes, mut cursor) = (BTreeSet::new(), Vec::new(), None::<String>);
    loop {
        let mut q: Vec<(&str, String)> = query.iter().map(|(k, v)| (*k, v.to_string())).collect();
        q.push(("limit", limit.to_string()));
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let resp = get(app, path, tenant, &q).await;
        assert_eq!(resp.status(), 200, "{path} {q:?}");
        let header = resp
            .headers()
            .get("x-next-cursor")
            .map(|h| h.to_str().unwrap().to_string());
        let body: Value = resp.json().await.unwrap();
        let (items, next) = match path {
            "/v1/keys" => (body.as_array().unwrap().clone(), header),
            _ => (
                body["data"].as_array().unwrap().clone(),
                body["next_cursor"].as_str().map(String::from),
            ),
        };
        assert!(items.len() <= limit, "{path}: page over the limit: {body}");
        sizes.push(items.len());
        for k in items {
            assert!(
                ids.insert(k["id"].as_str().unwrap().to_string()),
                "{path}: listed twice"
            );
        }
        match next {
            Some(c) => cursor = Some(c),
            None => return (ids, sizes),
        }
        assert!(sizes.len() < 50, "{path}: paging does not end");
    }
}

fn set(keys: &[&Key]) -> BTreeSet<String> {
    keys.iter().map(|k| k.id.clone()).collect()
}

/// Wait until the proxy's use of `k` is written behind (`last_used_at` set).
async fn wait_used(app: &TestApp, k: &Key) {
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);
    let path = format!("/v1/api-keys/{}", k.id);
    let written = eventually(Duration::from_secs(10), || async {
        let body: Value = get(app, &path, "default", &[]).await.json().await.unwrap();
        body["last_used_at"].is_string()
    })
    .await;
    assert!(written, "last use of {} never written", k.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_for_lists_exactly_the_dormant_keys_on_both_surfaces_with_paging() {
    let redis = Redis::start();
    let app = spawn_app_with(TEST_CONFIG, Store::Redis(&redis)).await;
    let mut made = Vec::new();
    for _ in 0..9 {
        made.push(app.create_key(&["users:read"]).await);
    }
    let other = app.create_key_in(Some("other"), &["users:read"]).await;
    let [used_long_ago, old_never_used, used_now, fresh, revoked_old, used_10d, old_a, old_b, old_c] =
        made.iter().collect::<Vec<_>>().try_into().unwrap();
    wait_used(&app, used_now).await;
    used_days_ago(&redis, &used_long_ago.id, 100);
    created_days_ago(&redis, "default", &old_never_used.id, 100);
    used_days_ago(&redis, &revoked_old.id, 200);
    assert_eq!(app.revoke(&revoked_old.id).await.status(), 200);
    used_days_ago(&redis, &used_10d.id, 10);
    for k in [old_a, old_b, old_c] {
        // Used long ago, created long ago too: interleaved in the list with the others.
        created_days_ago(&redis, "default", &k.id, 120);
        used_days_ago(&redis, &k.id, 95);
    }
    created_days_ago(&redis, "other", &other.id, 100);

    let dormant_90 = set(&[used_long_ago, old_never_used, old_a, old_b, old_c]);
    let with_revoked = {
        let mut s = dormant_90.clone();
        s.insert(revoked_old.id.clone());
        s
    };
    let mut dormant_7 = with_revoked.clone();
    dormant_7.insert(used_10d.id.clone());
    for limit in [1, 2, 4, 1000] {
        // jack lists revoked keys; HelloJohn leaves them out unless `revoked=true`.
        let (jack, _) =
            all_pages(&app, "/v1/keys", "default", &[("unused_for", "90d")], limit).await;
        assert_eq!(jack, with_revoked, "jack, limit {limit}");
        let q = [("unused_for", "90d")];
        let (hj, _) = all_pages(&app, "/v1/api-keys", "default", &q, limit).await;
        assert_eq!(hj, dormant_90, "hellojohn, limit {limit}");
        let q = [("unused_for", "90d"), ("revoked", "true")];
        let (hj, _) = all_pages(&app, "/v1/api-keys", "default", &q, limit).await;
        assert_eq!(hj, with_revoked, "hellojohn revoked=true, limit {limit}");
        let (jack, _) =
            all_pages(&app, "/v1/keys", "default", &[("unused_for", "1w")], limit).await;
        assert_eq!(jack, dormant_7, "jack 1w, limit {limit}");
    }
    // Other units, and the tenant rule: only the caller's tenant.
    let (jack, _) = all_pages(&app, "/v1/keys", "default", &[("unused_for", "2160h")], 3).await;
    assert_eq!(jack, with_revoked);
    let (o, _) = all_pages(&app, "/v1/api-keys", "other", &[("unused_for", "90d")], 3).await;
    assert_eq!(o, set(&[&other]));
    let (none, _) = all_pages(&app, "/v1/api-keys", "default", &[("unused_for", "1y")], 3).await;
    assert!(none.is_empty(), "{none:?}");
    assert!(!dormant_7.contains(&fresh.id) && !dormant_7.contains(&used_now.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_for_refuses_what_is_not_a_duration() {
    let redis = Redis::start();
    let app = spawn_app_with(TEST_CONFIG, Store::Redis(&redis)).await;
    app.create_key(&["users:read"]).await;
    for path in ["/v1/keys", "/v1/api-keys"] {
        let ok = get(&app, path, "default", &[("unused_for", "90d".into())]).await;
        assert_eq!(ok.status(), 200, "{path}");
        for bad in [
            "", "90", "1.5d", "1h 30m", "0s", "36601d", "-1d", "090d", "1M", "x",
        ] {
            let resp = get(&app, path, "default", &[("unused_for", bad.into())]).await;
            let text = resp.text().await.unwrap();
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                body["error"]["code"], "invalid_query",
                "{path} {bad:?}: {text}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with("parameter `unused_for`: invalid duration"),
                "{path} {bad:?}: {message}"
            );
        }
        let resp = get(
            &app,
            path,
            "default",
            &[("unused_for", "1d".into()), ("limit", "0".into())],
        )
        .await;
        assert_error(resp, 400, "invalid_query").await;
    }
}

fn gauge(text: &str, kind: &str) -> Option<i64> {
    let prefix = format!("keygate_keys_dormant{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

async fn scrape(app: &TestApp) -> String {
    let resp = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dormant_gauge_counts_live_keys_of_every_tenant_after_a_refresh() {
    let redis = Redis::start();
    let config = TEST_CONFIG.replace(
        "last_used_interval: 200ms",
        "last_used_interval: 200ms\n  dormant_interval: 50ms",
    );
    let app = spawn_app_with(&config, Store::Redis(&redis)).await;
    let fresh = app.create_key(&["users:read"]).await;
    let old_never_used = app.create_key_in(Some("t1"), &["users:read"]).await;
    let used_40d = app.create_key_in(Some("t2"), &["users:read"]).await;
    let used_now = app.create_key(&["users:read"]).await;
    let revoked = app.create_key(&["users:read"]).await;
    let expired = app.create_key(&["users:read"]).await;
    let revoked_used_40d = app.create_key(&["users:read"]).await;
    wait_used(&app, &used_now).await;
    created_days_ago(&redis, "t1", &old_never_used.id, 40);
    used_days_ago(&redis, &used_40d.id, 40);
    assert_eq!(app.revoke(&revoked.id).await.status(), 200);
    created_days_ago(&redis, "default", &expired.id, 40);
    let _: i64 = redis.cmd(&[
        "HSET",
        &record_key(&redis, &expired.id),
        "expires_at",
        "1000",
    ]);
    used_days_ago(&redis, &revoked_used_40d.id, 40);
    assert_eq!(app.revoke(&revoked_used_40d.id).await.status(), 200);

    // never_used: fresh, old_never_used; unused_30d: old_never_used, used_40d.
    let counted = eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        gauge(&text, "never_used") == Some(2) && gauge(&text, "unused_30d") == Some(2)
    })
    .await;
    let text = scrape(&app).await;
    assert!(
        counted,
        "never_used {:?}, unused_30d {:?}",
        gauge(&text, "never_used"),
        gauge(&text, "unused_30d")
    );
    assert!(
        text.lines()
            .all(|l| !l.starts_with("keygate_keys_dormant{") || !l.contains("tenant")),
        "no tenant label"
    );

    // The next refresh follows changes: the fresh key is used, and is no longer counted.
    wait_used(&app, &fresh).await;
    let recounted = eventually(Duration::from_secs(10), || async {
        gauge(&scrape(&app).await, "never_used") == Some(1)
    })
    .await;
    assert!(recounted, "{}", scrape(&app).await);
}
