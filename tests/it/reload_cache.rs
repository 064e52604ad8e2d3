//! Hot reload of the cache rules, seen from outside on a real Redis: a reload from
//! `cache.on_store_error: serve_cached` to `deny` refuses cached keys (503
//! `store_unavailable`) once the store fails, without a restart; the admin API's key check
//! honours `deny` too; a reload that shortens `cache.ttl` makes a change the cache was not
//! told about (written to Redis behind keygate's back) visible within the new TTL.
//!
//! The store is made to fail with `CLIENT PAUSE` (reads time out after 250 ms) and cache
//! hits are told from store reads by Redis's own HGETALL count, as in `feed.rs`.

use crate::support::*;
use keygate::config::Config;
use keygate::App;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A route that needs `users:read`.
const PATH: &str = "/users/1";
const CACHE_LINE: &str = "cache: { ttl: 5m, negative_ttl: 2s }";
/// How long a pause lasts: well over the 250 ms read timeout, short enough for a test.
const PAUSE_MS: u64 = 2000;

/// A keygate reloading from a file of its own, on `redis` (250 ms read timeout).
struct Reloading {
    proxy: SocketAddr,
    admin: SocketAddr,
    http: reqwest::Client,
    path: PathBuf,
    token_file: PathBuf,
    upstream: SocketAddr,
    redis_url: String,
    stop: keygate::app::ShutdownHandle,
    _dir: tempfile::TempDir,
}

impl Drop for Reloading {
    fn drop(&mut self) {
        self.stop.shutdown();
    }
}

fn config_text(upstream: SocketAddr, redis_url: &str, token_file: &Path, cache: &str) -> String {
    assert!(TEST_CONFIG.contains(CACHE_LINE));
    TEST_CONFIG
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace(
            "{store}",
            &format!("redis: {{ url: \"{redis_url}\", namespace: kgtest, timeout: 250ms }}"),
        )
        .replace(
            "admin:\n  listen: 127.0.0.1:0",
            &format!(
                "admin:\n  listen: 127.0.0.1:0\n  root_token_file: {}",
                token_file.display()
            ),
        )
        .replace(CACHE_LINE, cache)
}

/// Replace the file the way editors and `kubectl cp` do: write a sibling, rename over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

impl Reloading {
    async fn start(redis: &Redis, cache: &str) -> Reloading {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("root-token");
        std::fs::write(&token_file, ROOT).unwrap();
        let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let path = dir.path().join("keygate.yaml");
        std::fs::write(&path, config_text(upstream, &redis.url, &token_file, cache)).unwrap();
        let app = App::build(Config::load(&path).unwrap())
            .await
            .unwrap()
            .reload_from(path.clone());
        let (proxy, admin) = (app.proxy_addr, app.admin_addr);
        let stop = app.shutdown_handle();
        tokio::spawn(app.run_until_stopped());
        let node = Reloading {
            proxy,
            admin,
            http: client(),
            path,
            token_file,
            upstream,
            redis_url: redis.url.clone(),
            stop,
            _dir: dir,
        };
        node.wait_metric("keygate_pubsub_connected", 1.0).await;
        node
    }

    /// Rewrite the config file with `cache` as its cache line; wait until it is applied.
    async fn reload(&self, cache: &str) {
        let done = self
            .metric("keygate_config_reloads_total{result=\"success\"}")
            .await;
        replace_file(
            &self.path,
            &config_text(self.upstream, &self.redis_url, &self.token_file, cache),
        );
        self.wait_metric(
            "keygate_config_reloads_total{result=\"success\"}",
            done + 1.0,
        )
        .await;
    }

    async fn get(&self, key: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{PATH}", self.proxy))
            .bearer_auth(key)
            .send()
            .await
            .expect("proxy reachable")
    }

    async fn status(&self, key: &str) -> u16 {
        self.get(key).await.status().as_u16()
    }

    /// A key made by root, once this node has seen the key's own create message (which
    /// would otherwise evict it from the cache later).
    async fn create_key(&self, scopes: &[&str]) -> (String, String) {
        let creates = self.metric(RECEIVED_CREATE).await;
        let resp = self
            .http
            .post(format!("http://{}/v1/keys", self.admin))
            .bearer_auth(ROOT)
            .json(&json!({"label": "reload-cache", "scopes": scopes}))
            .send()
            .await
            .expect("admin reachable");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 201, "create key: {body}");
        self.wait_metric(RECEIVED_CREATE, creates + 1.0).await;
        (
            body["id"].as_str().unwrap().to_string(),
            body["key"].as_str().unwrap().to_string(),
        )
    }

    /// `POST /v1/keys` as `key` with a body the API refuses (400 once the caller is
    /// authenticated): an admin call that needs no store access after the key check.
    async fn admin_bad_create(&self, key: &str) -> reqwest::Response {
        self.http
            .post(format!("http://{}/v1/keys", self.admin))
            .bearer_auth(key)
            .json(&json!({"no_such_field": 1}))
            .send()
            .await
            .expect("admin reachable")
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("admin reachable")
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().expect("a number"))
            })
            .unwrap_or(0.0)
    }

    async fn wait_metric(&self, series: &str, want: f64) {
        let last = std::cell::Cell::new(f64::NAN);
        let ok = eventually(Duration::from_secs(10), || async {
            last.set(self.metric(series).await);
            last.get() >= want
        })
        .await;
        assert!(ok, "{series} stayed at {} (wanted >= {want})", last.get());
    }
}

const RECEIVED_CREATE: &str = "keygate_invalidations_received_total{event=\"create\"}";

/// Wait until `check` (a request with `key`) is answered `status` with no store read.
async fn wait_cached<F, Fut>(redis: &Redis, status: u16, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut last = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let before = redis.calls("hgetall");
        let got = check().await;
        last = (got, redis.calls("hgetall") - before);
        if last == (status, 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never answered {status} from the cache; last (status, reads) = {last:?}");
}

/// A well-formed key that no store has heard of.
fn unknown_key() -> String {
    use keygate::key::{self, Environment, KeyType, Prefixes};
    key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .expect("os rng")
        .text
}

/// Pause every Redis client for `PAUSE_MS`; keygate's next store read fails (timeout).
fn pause(redis: &Redis) -> Instant {
    let _: String = redis.cmd(&["CLIENT", "PAUSE", &PAUSE_MS.to_string(), "ALL"]);
    Instant::now()
}

/// Wait out a pause: a store read works again (a new unknown key is answered 401).
async fn wait_store_back(node: &Reloading) {
    let back = eventually(Duration::from_secs(10), || async {
        node.status(&unknown_key()).await == 401
    })
    .await;
    assert!(back, "the store never answered again after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_on_store_error_deny_refuses_cached_keys_without_a_restart() {
    let redis = Redis::start();
    let node = Reloading::start(&redis, CACHE_LINE).await;
    let (_, key) = node.create_key(&["users:read"]).await;
    wait_cached(&redis, 200, || node.status(&key)).await;

    // serve_cached (the default): once a read failed, a cached key still passes.
    let paused = pause(&redis);
    assert_error(node.get(&unknown_key()).await, 503, "store_unavailable").await;
    let status = node.status(&key).await;
    assert!(
        paused.elapsed() < Duration::from_millis(PAUSE_MS - 500),
        "the checks outlasted the pause"
    );
    assert_eq!(status, 200, "serve_cached refused a cached key");
    wait_store_back(&node).await;

    // The same file with `deny`, applied by a reload: no restart.
    node.reload("cache: { ttl: 5m, negative_ttl: 2s, on_store_error: deny }")
        .await;
    wait_cached(&redis, 200, || node.status(&key)).await;
    let paused = pause(&redis);
    assert_error(node.get(&unknown_key()).await, 503, "store_unavailable").await;
    let resp = node.get(&key).await;
    assert!(
        paused.elapsed() < Duration::from_millis(PAUSE_MS - 500),
        "the checks outlasted the pause"
    );
    let headers = assert_error(resp, 503, "store_unavailable").await;
    assert!(
        headers.contains_key("retry-after"),
        "503 without Retry-After"
    );

    // Once the store answers again, the key passes again.
    let back = eventually(Duration::from_secs(10), || async {
        node.status(&key).await == 200
    })
    .await;
    assert!(back, "the key never passed again after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_key_check_honours_on_store_error_deny_also_after_a_reload() {
    let redis = Redis::start();
    let node = Reloading::start(&redis, CACHE_LINE).await;
    let (_, admin_key) = node.create_key(&["keys:read", "keys:write"]).await;
    // Authenticated, then the body refused: the key is judged, nothing else is read.
    wait_cached(&redis, 400, || async {
        node.admin_bad_create(&admin_key).await.status().as_u16()
    })
    .await;

    // serve_cached: a cached admin key still authenticates while reads fail.
    let paused = pause(&redis);
    assert_error(node.get(&unknown_key()).await, 503, "store_unavailable").await;
    let status = node.admin_bad_create(&admin_key).await.status().as_u16();
    assert!(paused.elapsed() < Duration::from_millis(PAUSE_MS - 500));
    assert_eq!(status, 400, "serve_cached refused a cached admin key");
    wait_store_back(&node).await;

    node.reload("cache: { ttl: 5m, negative_ttl: 2s, on_store_error: deny }")
        .await;
    wait_cached(&redis, 400, || async {
        node.admin_bad_create(&admin_key).await.status().as_u16()
    })
    .await;
    let paused = pause(&redis);
    assert_error(node.get(&unknown_key()).await, 503, "store_unavailable").await;
    let resp = node.admin_bad_create(&admin_key).await;
    assert!(paused.elapsed() < Duration::from_millis(PAUSE_MS - 500));
    let headers = assert_error(resp, 503, "store_unavailable").await;
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    // The root token is no key: it is never refused for the store's health.
    let root = node.admin_bad_create(ROOT).await.status().as_u16();
    assert_eq!(root, 400, "the root token was refused in deny mode");

    let back = eventually(Duration::from_secs(10), || async {
        node.admin_bad_create(&admin_key).await.status() == 400
    })
    .await;
    assert!(back, "the admin key never passed again after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_shortens_cache_ttl_shows_unannounced_changes_within_the_new_ttl() {
    let redis = Redis::start();
    let node = Reloading::start(&redis, CACHE_LINE).await;
    node.reload("cache: { ttl: 1s, negative_ttl: 500ms }").await;
    let (id, key) = node.create_key(&["users:read"]).await;
    wait_cached(&redis, 200, || node.status(&key)).await;

    // Revoke behind keygate's back: the record changes, no change message, no counter.
    let digest: String = redis.cmd(&["GET", &format!("kgtest:id:{id}")]);
    let rec = format!("kgtest:k:{digest}");
    let _: i64 = redis.cmd(&["HSET", &rec, "revoked_at", "1"]);
    let changed = Instant::now();
    // The cache was not told: what it holds is still served...
    let before = redis.calls("hgetall");
    let status = node.status(&key).await;
    if changed.elapsed() < Duration::from_millis(500) {
        assert_eq!(
            (status, redis.calls("hgetall") - before),
            (200, 0),
            "the cache was told about a change nobody announced"
        );
    }
    // ...until the new TTL (1 s, not the 5 m the process started with) has passed.
    let seen = eventually(Duration::from_secs(4), || async {
        node.status(&key).await == 403
    })
    .await;
    assert!(seen, "the unannounced revocation never showed");
    println!(
        "unannounced revocation visible after {:?} (cache.ttl 1s)",
        changed.elapsed()
    );
    assert_error(node.get(&key).await, 403, "revoked_key").await;
}

/// A key cached under the old, longer TTL is trusted only as long as the new one allows:
/// the shared cache keeps the TTL an entry was filled with, so a hit there is checked
/// against the running snapshot's TTL too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_ttl_also_bounds_keys_cached_before_the_reload() {
    let redis = Redis::start();
    let node = Reloading::start(&redis, CACHE_LINE).await;
    let (id, key) = node.create_key(&["users:read"]).await;
    wait_cached(&redis, 200, || node.status(&key)).await;
    node.reload("cache: { ttl: 1s, negative_ttl: 500ms }").await;

    let digest: String = redis.cmd(&["GET", &format!("kgtest:id:{id}")]);
    let rec = format!("kgtest:k:{digest}");
    let _: i64 = redis.cmd(&["HSET", &rec, "revoked_at", "1"]);
    // Cached for 5 m before the reload; the running TTL is 1 s.
    let seen = eventually(Duration::from_secs(6), || async {
        node.status(&key).await == 403
    })
    .await;
    assert!(
        seen,
        "a key cached before the reload outlived the new cache.ttl"
    );
    assert_error(node.get(&key).await, 403, "revoked_key").await;
}
