//! The change feed on a real Redis, seen from a replica ("B") whose cache holds a key:
//! a gap in the sequence, a counter ahead of the messages, a counter deleted (also by
//! FLUSHALL) or set back, and a killed subscription each flush B's whole cache (the
//! warmed key costs a store read again); malformed messages are counted and change
//! nothing; the propagation lag is measured; `cache.on_store_error: deny`; and two
//! keygate processes sharing revocations and rotations through one Redis.
//!
//! Cache hits are told from store reads by Redis's own HGETALL count (`get_counting`).

use crate::support::{
    assert_error, eventually, free_port, spawn_app, spawn_app_with, Redis, Store, TestApp, ROOT,
    TEST_CONFIG,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The change channel and counter of the test apps (`namespace: kgtest`).
const EVENTS: &str = "kgtest:events";
const SEQ: &str = "kgtest:seq";
/// A route that needs `users:read`.
const PATH: &str = "/users/1";
/// Counter-based flushes need two 1-second checks; leave room for a slow machine.
const COUNTER_DEADLINE: Duration = Duration::from_secs(4);
/// Message-based effects arrive in milliseconds.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(2);

/// One keygate's two ports, whether it runs in-process or as a child process.
#[derive(Clone)]
struct Node {
    proxy: SocketAddr,
    admin: SocketAddr,
    http: reqwest::Client,
}

struct Created {
    id: String,
    key: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

impl Node {
    fn of(app: &TestApp) -> Node {
        Node {
            proxy: app.proxy,
            admin: app.admin,
            http: client(),
        }
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

    async fn create_key(&self) -> Created {
        let resp = self
            .http
            .post(format!("http://{}/v1/keys", self.admin))
            .bearer_auth(ROOT)
            .json(&json!({"label": "feed", "scopes": ["users:read"]}))
            .send()
            .await
            .expect("admin reachable");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 201, "create key: {body}");
        Created {
            id: body["id"].as_str().unwrap().to_string(),
            key: body["key"].as_str().unwrap().to_string(),
        }
    }

    async fn revoke(&self, id: &str) {
        let resp = self
            .http
            .delete(format!("http://{}/v1/keys/{id}", self.admin))
            .bearer_auth(ROOT)
            .send()
            .await
            .expect("admin reachable");
        assert_eq!(resp.status(), 200, "revoke {id}");
    }

    /// `POST /v1/api-keys/rotate` as root in the default tenant: the new key's text.
    async fn rotate(&self, id: &str, grace: &str) -> String {
        let resp = self
            .http
            .post(format!("http://{}/v1/api-keys/rotate", self.admin))
            .bearer_auth(ROOT)
            .json(&json!({"id": id, "grace_period": grace}))
            .send()
            .await
            .expect("admin reachable");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "rotate: {body}");
        body["key"]
            .as_str()
            .expect("rotate returns the new key")
            .to_string()
    }

    async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("admin reachable");
        assert_eq!(resp.status(), 200, "/metrics");
        resp.text().await.unwrap()
    }

    /// One series (`name` or `name{label="v"}`, as rendered), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics().await, series)
    }

    /// Wait until `series` is at least `want`; panics with the last value otherwise.
    async fn wait_metric(&self, series: &str, want: f64, within: Duration) {
        let last = std::cell::Cell::new(f64::NAN);
        let ok = eventually(within, || async {
            last.set(self.metric(series).await);
            last.get() >= want
        })
        .await;
        assert!(
            ok,
            "{series} stayed at {} (wanted >= {want}) for {within:?}",
            last.get()
        );
    }

    /// Wait until this node follows the change feed: its subscribe-time flush is done,
    /// so a cache warmed afterwards is not emptied by it.
    async fn wait_following(&self) {
        self.wait_metric("keygate_pubsub_connected", 1.0, Duration::from_secs(10))
            .await;
    }
}

/// The value of `series` in a prometheus text exposition, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a number"))
        })
        .unwrap_or(0.0)
}

fn flushes(reason: &str) -> String {
    format!("keygate_cache_flushes_total{{reason=\"{reason}\"}}")
}

fn received(event: &str) -> String {
    format!("keygate_invalidations_received_total{{event=\"{event}\"}}")
}

/// GET `PATH` with `key`: the status and how many HGETALLs Redis ran meanwhile
/// (0 = answered from the node's cache).
async fn get_counting(node: &Node, redis: &Redis, key: &str) -> (u16, u64) {
    let before = redis.calls("hgetall");
    let status = node.status(key).await;
    (status, redis.calls("hgetall") - before)
}

/// Wait until `node` answers `key` with `status` from its cache (no store read).
async fn wait_cached(node: &Node, redis: &Redis, key: &str, status: u16) {
    let last = std::cell::Cell::new((0, 0));
    let ok = eventually(Duration::from_secs(5), || async {
        last.set(get_counting(node, redis, key).await);
        last.get() == (status, 0)
    })
    .await;
    assert!(
        ok,
        "never answered {status} from the cache; last (status, reads) = {:?}",
        last.get()
    );
}

/// The request after a flush reads the store once, and passes.
async fn assert_store_read(node: &Node, redis: &Redis, key: &str, what: &str) {
    assert_eq!(
        get_counting(node, redis, key).await,
        (200, 1),
        "{what}: the warmed key must cost one store read (cache flushed)"
    );
    // And it is cached again afterwards.
    assert_eq!(get_counting(node, redis, key).await, (200, 0), "{what}");
}

/// Two in-process replicas on `redis`, both following the change feed.
async fn replicas(redis: &Redis) -> (TestApp, TestApp) {
    let a = spawn_app(Store::Redis(redis)).await;
    let b = spawn_app(Store::Redis(redis)).await;
    Node::of(&a).wait_following().await;
    Node::of(&b).wait_following().await;
    (a, b)
}

/// A key created on `a` that `b` answers from its cache, after `b` has applied the
/// key's own create message (which would otherwise evict it later).
async fn warmed_key(a: &Node, b: &Node, redis: &Redis) -> Created {
    let creates = b.metric(&received("create")).await;
    let key = a.create_key().await;
    b.wait_metric(&received("create"), creates + 1.0, MESSAGE_DEADLINE)
        .await;
    wait_cached(b, redis, &key.key, 200).await;
    key
}

fn digest_of(redis: &Redis, id: &str) -> String {
    redis.cmd(&["GET", &format!("kgtest:id:{id}")])
}

fn counter(redis: &Redis) -> u64 {
    let v: Option<u64> = redis.cmd(&["GET", SEQ]);
    v.expect("kgtest:seq exists after a write")
}

fn publish(redis: &Redis, message: &str) {
    let receivers: i64 = redis.cmd(&["PUBLISH", EVENTS, message]);
    assert!(receivers >= 1, "nobody subscribed to {EVENTS}");
}

/// A digest that belongs to no key.
fn other_digest() -> String {
    "5e".repeat(32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_sequence_flushes_the_cache() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let gaps = b.metric(&flushes("gap")).await;

    // Four changes whose messages were lost, then the fifth arrives: seq jumps by 5.
    let seq: u64 = redis.cmd(&["INCRBY", SEQ, "5"]);
    let now = keygate::time::now_ms().to_string();
    publish(&redis, &format!("{seq} revoke {} {now}", other_digest()));

    b.wait_metric(&flushes("gap"), gaps + 1.0, MESSAGE_DEADLINE)
        .await;
    assert_store_read(&b, &redis, &key.key, "after a gap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_ahead_of_the_messages_flushes_the_cache() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let ahead = b.metric(&flushes("counter_ahead")).await;

    // A change whose message never comes.
    let _: u64 = redis.cmd(&["INCR", SEQ]);
    let started = Instant::now();
    b.wait_metric(&flushes("counter_ahead"), ahead + 1.0, COUNTER_DEADLINE)
        .await;
    println!("counter_ahead flush after {:?}", started.elapsed());
    assert_store_read(&b, &redis, &key.key, "after the counter ran ahead").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_counter_flushes_the_cache() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let missing = b.metric(&flushes("counter_missing")).await;

    let deleted: i64 = redis.cmd(&["DEL", SEQ]);
    assert_eq!(deleted, 1);
    b.wait_metric(&flushes("counter_missing"), missing + 1.0, COUNTER_DEADLINE)
        .await;
    assert_store_read(&b, &redis, &key.key, "after the counter vanished").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_makes_a_cached_key_unknown_within_seconds() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let missing = b.metric(&flushes("counter_missing")).await;

    let _: String = redis.cmd(&["FLUSHALL"]);
    let started = Instant::now();
    // The record is gone from Redis; B holds it for 5 min unless it notices.
    let gone = eventually(COUNTER_DEADLINE, || async {
        b.status(&key.key).await == 401
    })
    .await;
    assert!(
        gone,
        "B still accepts a key deleted by FLUSHALL {:?} later (status {})",
        started.elapsed(),
        b.status(&key.key).await
    );
    println!("B forgot the flushed key after {:?}", started.elapsed());
    assert_error(b.get(&key.key).await, 401, "unknown_key").await;
    assert!(b.metric(&flushes("counter_missing")).await > missing);
    // A forgot it too, and the feed still works for new keys.
    assert_error(a.get(&key.key).await, 401, "unknown_key").await;
    let fresh = a.create_key().await;
    assert_eq!(b.status(&fresh.key).await, 200);
}

/// FLUSHALL followed at once by a write (an operator re-provisioning keys): the counter
/// is back at B's last seq before B's next 1-second check, so the check sees nothing
/// wrong; the new write's message carries a seq B has already seen. The deleted key
/// must still stop passing within seconds, not after `cache.ttl` (5 min).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_then_a_write_still_makes_a_cached_key_unknown() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    assert_eq!(counter(&redis), 1, "one write so far");

    let _: String = redis.cmd(&["FLUSHALL"]);
    let fresh = a.create_key().await;
    let started = Instant::now();
    assert_eq!(counter(&redis), 1, "the counter restarted");
    let gone = eventually(COUNTER_DEADLINE, || async {
        b.status(&key.key).await == 401
    })
    .await;
    let m = b.metrics().await;
    assert!(
        gone,
        "B still accepts a key deleted by FLUSHALL {:?} later (it is in no listing and \
         cannot be revoked); flushes: gap {} counter_missing {} counter_back {} \
         counter_ahead {}",
        started.elapsed(),
        sample(&m, &flushes("gap")),
        sample(&m, &flushes("counter_missing")),
        sample(&m, &flushes("counter_back")),
        sample(&m, &flushes("counter_ahead")),
    );
    assert_error(b.get(&key.key).await, 401, "unknown_key").await;
    assert_eq!(b.status(&fresh.key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_that_went_back_flushes_the_cache() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    for _ in 0..5 {
        a.create_key().await;
    }
    let key = warmed_key(&a, &b, &redis).await;
    assert!(counter(&redis) >= 6, "counter {}", counter(&redis));
    let back = b.metric(&flushes("counter_back")).await;

    let _: String = redis.cmd(&["SET", SEQ, "1"]);
    b.wait_metric(&flushes("counter_back"), back + 1.0, COUNTER_DEADLINE)
        .await;
    assert_store_read(&b, &redis, &key.key, "after the counter went back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_reconnects_flushes_and_says_so() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    assert_eq!(b.metric("keygate_pubsub_reconnects_total").await, 0.0);
    let subscribes = b.metric(&flushes("subscribe")).await;
    assert_eq!(subscribes, 1.0, "one subscribe-time flush at start");

    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed >= 2, "killed {killed} pubsub connections");

    b.wait_metric(
        "keygate_pubsub_reconnects_total",
        1.0,
        Duration::from_secs(5),
    )
    .await;
    b.wait_metric(
        &flushes("subscribe"),
        subscribes + 1.0,
        Duration::from_secs(5),
    )
    .await;
    b.wait_metric("keygate_pubsub_connected", 1.0, Duration::from_secs(5))
        .await;
    assert_store_read(&b, &redis, &key.key, "after re-subscribing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_change_messages_are_counted_and_change_nothing() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let other = a.create_key().await;
    let digest = digest_of(&redis, &key.id);
    b.wait_metric(&received("create"), 2.0, MESSAGE_DEADLINE)
        .await;
    wait_cached(&b, &redis, &key.key, 200).await;
    let malformed = b.metric("keygate_invalidations_malformed_total").await;
    let before = b.metrics().await;

    // Each names the warmed key's digest (where it has one) and a seq far ahead: a
    // lenient parser would evict the key or see a gap.
    let next = counter(&redis) + 10;
    let now = keygate::time::now_ms();
    let bad = [
        "garbage".to_string(),
        String::new(),
        format!("{next} explode {digest} {now}"),
        format!("{next} REVOKE {digest} {now}"),
        format!("{next} revoke {} {now}", &digest[..40]),
        format!("{next} revoke {digest}zz {now}"),
        format!("{next} revoke {digest} {now} extra"),
        format!("{next} revoke {digest}"),
        format!("{next}  revoke {digest} {now}"),
        format!("-1 revoke {digest} {now}"),
        format!("{next} revoke {digest} soon"),
    ];
    for m in &bad {
        publish(&redis, m);
    }
    b.wait_metric(
        "keygate_invalidations_malformed_total",
        malformed + bad.len() as f64,
        MESSAGE_DEADLINE,
    )
    .await;
    assert_eq!(
        b.metric("keygate_invalidations_malformed_total").await,
        malformed + bad.len() as f64,
        "each malformed message counted once"
    );
    assert_eq!(
        get_counting(&b, &redis, &key.key).await,
        (200, 0),
        "a malformed message evicted the key or flushed the cache"
    );

    // The sequence did not move either: the next real change is no gap, and it evicts
    // only its own key.
    a.revoke(&other.id).await;
    b.wait_metric(&received("revoke"), 1.0, MESSAGE_DEADLINE)
        .await;
    assert_error(b.get(&other.key).await, 403, "revoked_key").await;
    assert_eq!(
        get_counting(&b, &redis, &key.key).await,
        (200, 0),
        "another key's revocation evicted this one"
    );
    let after = b.metrics().await;
    for reason in [
        "gap",
        "counter_ahead",
        "counter_missing",
        "counter_back",
        "subscribe",
    ] {
        assert_eq!(
            sample(&after, &flushes(reason)),
            sample(&before, &flushes(reason)),
            "a malformed message caused a {reason} flush"
        );
    }
    for event in ["create", "update", "rotate"] {
        assert_eq!(
            sample(&after, &received(event)),
            sample(&before, &received(event)),
            "a malformed message was counted as a {event}"
        );
    }
    assert_eq!(sample(&after, &received("revoke")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_of_received_revocations_is_measured() {
    let redis = Redis::start();
    let (a, b) = replicas(&redis).await;
    let (a, b) = (Node::of(&a), Node::of(&b));
    let key = warmed_key(&a, &b, &redis).await;
    let before = b.metrics().await;
    let count = sample(&before, "keygate_invalidation_lag_seconds_count");
    let sum = sample(&before, "keygate_invalidation_lag_seconds_sum");
    assert!(count >= 1.0, "the create message was measured: {count}");

    a.revoke(&key.id).await;
    b.wait_metric(&received("revoke"), 1.0, MESSAGE_DEADLINE)
        .await;
    b.wait_metric(
        "keygate_invalidation_lag_seconds_count",
        count + 1.0,
        MESSAGE_DEADLINE,
    )
    .await;
    let after = b.metrics().await;
    let lag = sample(&after, "keygate_invalidation_lag_seconds_sum") - sum;
    assert!(
        (0.0..1.0).contains(&lag),
        "a revocation on loopback took {lag} s to arrive"
    );
    // Every message B applied was measured (same clock, so none was skipped).
    let applied: f64 = ["create", "revoke", "update", "rotate"]
        .iter()
        .map(|e| sample(&after, &received(e)))
        .sum();
    assert_eq!(
        sample(&after, "keygate_invalidation_lag_seconds_count"),
        applied
    );
    assert_error(b.get(&key.key).await, 403, "revoked_key").await;
}

const DENY_CONFIG_FROM: &str = "cache: { ttl: 5m, negative_ttl: 2s }";
const DENY_CONFIG_TO: &str = "cache: { ttl: 5m, negative_ttl: 2s, on_store_error: deny }";

async fn spawn_deny_app(redis: &Redis) -> TestApp {
    assert!(TEST_CONFIG.contains(DENY_CONFIG_FROM));
    let config = TEST_CONFIG.replace(DENY_CONFIG_FROM, DENY_CONFIG_TO);
    spawn_app_with(&config, Store::RedisTimeout(redis, "250ms")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_mode_refuses_cached_keys_while_redis_is_down_then_recovers() {
    let mut redis = Redis::start_persistent();
    let app = spawn_deny_app(&redis).await;
    let b = Node::of(&app);
    b.wait_following().await;
    // With Redis up, deny mode serves cache hits like the default.
    let key = warmed_key(&b, &b, &redis).await;

    redis.kill();
    let started = Instant::now();
    let refused = eventually(Duration::from_secs(5), || async {
        b.status(&key.key).await == 503
    })
    .await;
    assert!(
        refused,
        "a cached key still passes {:?} after Redis died, with on_store_error: deny",
        started.elapsed()
    );
    println!(
        "deny mode refused the cached key after {:?}",
        started.elapsed()
    );
    let headers = assert_error(b.get(&key.key).await, 503, "store_unavailable").await;
    assert!(
        headers.contains_key("retry-after"),
        "503 without Retry-After"
    );
    assert_eq!(b.metric("keygate_pubsub_connected").await, 0.0);

    redis.restart();
    let back = eventually(Duration::from_secs(10), || async {
        b.status(&key.key).await == 200
    })
    .await;
    assert!(back, "the key never passed again after Redis came back");
    assert_eq!(b.metric("keygate_pubsub_connected").await, 1.0);
    assert!(b.metric("keygate_pubsub_reconnects_total").await >= 1.0);
    wait_cached(&b, &redis, &key.key, 200).await;
}

/// README: `deny` applies "while the store is failing (a read failed, or the change feed
/// is down)". Here the feed stays connected but reads fail (Redis paused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_mode_refuses_cached_keys_once_a_store_read_failed() {
    let redis = Redis::start();
    let app = spawn_deny_app(&redis).await;
    let b = Node::of(&app);
    b.wait_following().await;
    let key = warmed_key(&b, &b, &redis).await;
    let never_seen = unknown_key();

    let _: String = redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let paused = Instant::now();
    // A read fails: the store is failing.
    assert_error(b.get(&never_seen).await, 503, "store_unavailable").await;
    let status = b.status(&key.key).await;
    let within_pause = paused.elapsed() < Duration::from_millis(2500);
    assert!(within_pause, "the checks outlasted the pause");
    assert_eq!(
        status, 503,
        "with on_store_error: deny, a cached key passed right after a store read failed"
    );

    // Once the pause is over, the key passes again.
    let back = eventually(Duration::from_secs(8), || async {
        b.status(&key.key).await == 200
    })
    .await;
    assert!(back, "the key never passed again after the pause");
}

/// A well-formed key that no store has heard of.
fn unknown_key() -> String {
    use keygate::key::{self, Environment, KeyType, Prefixes};
    key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .expect("os rng")
        .text
}

/// A keygate child process, killed on drop (its log is printed if the test failed).
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    node: Node,
}

impl Process {
    fn spawn(dir: &Path, name: &'static str, redis: &Redis, upstream: SocketAddr) -> Process {
        let (proxy, admin) = (free_port(), free_port());
        let mut config = TEST_CONFIG.to_string();
        for port in [proxy, admin] {
            assert!(config.contains("listen: 127.0.0.1:0\n"));
            config = config.replacen(
                "listen: 127.0.0.1:0\n",
                &format!("listen: 127.0.0.1:{port}\n"),
                1,
            );
        }
        let config = config
            .replace("{upstream}", &format!("http://{upstream}"))
            .replace(
                "{store}",
                &format!(
                    "redis: {{ url: \"{}\", namespace: kgtest, timeout: 250ms }}",
                    redis.url
                ),
            );
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .env("KEYGATE_ROOT_TOKEN", ROOT)
            .env("KEYGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keygate");
        Process {
            name,
            child,
            log,
            node: Node {
                proxy: ([127, 0, 0, 1], proxy).into(),
                admin: ([127, 0, 0, 1], admin).into(),
                http: client(),
            },
        }
    }

    /// Wait until `/readyz` answers 200 and the change feed is followed.
    async fn wait_ready(&mut self) {
        let url = format!("http://{}/readyz", self.node.admin);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "keygate {} exited with {status}: {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ok = self
                .node
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "keygate {} never ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.node.wait_following().await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- keygate {} log ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_revocations_and_rotations() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut pa = Process::spawn(dir.path(), "a", &redis, upstream);
    let mut pb = Process::spawn(dir.path(), "b", &redis, upstream);
    pa.wait_ready().await;
    pb.wait_ready().await;
    let (a, b) = (pa.node.clone(), pb.node.clone());

    // Created on A, usable on B at once.
    let key = a.create_key().await;
    let resp = b.get(&key.key).await;
    assert_eq!(resp.status(), 200, "a key created on A works on B");
    let echoed: Value = resp.json().await.unwrap();
    assert_eq!(echoed["headers"]["x-keygate-key-id"][0], key.id.as_str());

    // Revoked on A: B, answering from its cache, refuses within 1 s.
    wait_cached(&b, &redis, &key.key, 200).await;
    a.revoke(&key.id).await;
    let started = Instant::now();
    let refused = eventually(Duration::from_secs(1), || async {
        b.status(&key.key).await == 403
    })
    .await;
    assert!(refused, "B still accepts a key revoked on A after 1 s");
    println!("B refused the revoked key after {:?}", started.elapsed());
    assert_error(b.get(&key.key).await, 403, "revoked_key").await;

    // Rotated on A with a 2 s grace: both pass on B, then only the new one.
    let old = a.create_key().await;
    wait_cached(&b, &redis, &old.key, 200).await;
    let new = a.rotate(&old.id, "2s").await;
    let rotated = Instant::now();
    let (old_status, new_status) = (b.status(&old.key).await, b.status(&new).await);
    assert!(
        rotated.elapsed() < Duration::from_millis(1500),
        "too slow to check the grace"
    );
    assert_eq!(old_status, 200, "the old key passes on B during the grace");
    assert_eq!(new_status, 200, "the new key passes on B");
    let refused = eventually(Duration::from_secs(5), || async {
        b.status(&old.key).await == 403
    })
    .await;
    assert!(
        refused,
        "B still accepts the old key {:?} after a 2 s grace",
        rotated.elapsed()
    );
    println!(
        "B refused the rotated key {:?} after the rotation",
        rotated.elapsed()
    );
    assert!(
        rotated.elapsed() >= Duration::from_millis(1900),
        "the old key was refused before its grace ended ({:?})",
        rotated.elapsed()
    );
    assert_error(b.get(&old.key).await, 403, "revoked_key").await;
    assert_eq!(b.status(&new).await, 200, "the new key still passes on B");
    assert_eq!(a.status(&new).await, 200, "and on A");
    assert_error(a.get(&old.key).await, 403, "revoked_key").await;
}
