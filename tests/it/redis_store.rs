//! keygate on a real Redis: the store contract, what the hot path costs in Redis
//! commands (single-flight, negative cache, junk tokens), revocation across replicas
//! through pub/sub (also after the subscription is killed), and failures: Redis killed,
//! paused, or holding a corrupt record.

use crate::support::{assert_error, eventually, spawn_app, Key, Redis, Store, TestApp, ROOT};
use keygate::key::{self, Environment, KeyType, Prefixes};
use keygate::store::redis::{RedisSettings, RedisStore};
use keygate::store::{KeyRecord, KeyStore};
use serde_json::Value;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The change channel of the test apps (`namespace: kgtest`).
const EVENTS: &str = "kgtest:events";
/// A route that needs `users:read`.
const PATH: &str = "/users/1";

/// How many connections are subscribed to the change channel.
fn subscribers(redis: &Redis) -> i64 {
    let (_, n): (String, i64) = redis.cmd(&["PUBSUB", "NUMSUB", EVENTS]);
    n
}

/// Wait until `n` apps follow the change channel.
async fn wait_subscribed(redis: &Redis, n: i64) {
    let ok = eventually(
        Duration::from_secs(5),
        || async move { subscribers(redis) >= n },
    )
    .await;
    assert!(
        ok,
        "expected {n} subscribers on {EVENTS}, have {}",
        subscribers(redis)
    );
}

/// GET `PATH` with `key`: the status and how many HGETALLs Redis ran meanwhile
/// (0 = answered from the app's cache).
async fn get_counting(app: &TestApp, redis: &Redis, key: &str) -> (u16, u64) {
    let before = redis.calls("hgetall");
    let status = app.get_with(PATH, key).await.status().as_u16();
    (status, redis.calls("hgetall") - before)
}

/// Wait until `app` answers `key` with `status` from its cache (no store read).
async fn wait_cached(app: &TestApp, redis: &Redis, key: &str, status: u16) {
    let last = std::cell::Cell::new((0, 0));
    let ok = eventually(Duration::from_secs(5), || async {
        last.set(get_counting(app, redis, key).await);
        last.get() == (status, 0)
    })
    .await;
    assert!(
        ok,
        "never answered {status} from the cache; last (status, reads) = {:?}",
        last.get()
    );
}

/// Barrier on the change feed: after this returns, every change message published
/// before it has been applied to `app`'s cache. Publishes an invalidation of
/// `sentinel` (cached first) and waits until it takes effect; messages are delivered
/// in order.
async fn drain_feed(app: &TestApp, redis: &Redis, sentinel: &Key) {
    wait_cached(app, redis, &sentinel.key, 200).await;
    let digest: String = redis.cmd(&["GET", &format!("kgtest:id:{}", sentinel.id)]);
    let _: i64 = redis.cmd(&["PUBLISH", EVENTS, &format!("0 revoke {digest} 0")]);
    let ok = eventually(Duration::from_secs(5), || async {
        get_counting(app, redis, &sentinel.key).await == (200, 1)
    })
    .await;
    assert!(ok, "the barrier message never reached the app's cache");
}

/// A well-formed key (valid prefix and checksum) that no store has heard of.
fn unknown_key() -> String {
    key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live)
        .expect("os rng")
        .text
}

/// Every command Redis ran since the last `reset_stats`, with its call count.
fn commands_run(redis: &Redis) -> Vec<(String, u64)> {
    let info: String = redis.cmd(&["INFO", "commandstats"]);
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_contract_holds_on_real_redis() {
    let redis = Redis::start();
    let store = RedisStore::connect(&RedisSettings::standalone(
        &redis.url,
        "contract",
        Duration::from_millis(250),
    ))
    .unwrap();
    crate::contract::run_all(&store).await;
    // Everything landed under the namespace, nothing outside it.
    let keys: Vec<String> = redis.cmd(&["KEYS", "*"]);
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with("contract:")),
        "keys outside the namespace: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_cost_one_redis_read() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 1).await;
    let sentinel = app.create_key(&["users:read"]).await;
    let key = app.create_key(&["users:read"]).await;
    drain_feed(&app, &redis, &sentinel).await;

    redis.reset_stats();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let http = app.http.clone();
        let url = app.proxy_url(PATH);
        let k = key.key.clone();
        set.spawn(async move {
            http.get(url)
                .bearer_auth(k)
                .send()
                .await
                .expect("proxy reachable")
                .status()
                .as_u16()
        });
    }
    let statuses = set.join_all().await;
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    assert_eq!(
        redis.calls("hgetall"),
        1,
        "100 concurrent requests of one uncached key must share one store read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_never_reach_redis() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    let prefixes = Prefixes::default();
    let base62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut random = vec![0u8; 10_000 * 64];
    getrandom::fill(&mut random).unwrap();
    let pick = |bytes: &[u8], alphabet: &[u8]| -> String {
        bytes
            .iter()
            .map(|b| alphabet[*b as usize % alphabet.len()] as char)
            .collect()
    };
    let visible: Vec<u8> = (0x21..0x7f).collect();
    let type_prefixes = ["sk_live_", "pk_live_", "sk_test_", "pk_test_"];
    let tokens: Vec<String> = random
        .chunks(64)
        .enumerate()
        .map(|(i, r)| match i % 4 {
            // Random printable garbage of random length.
            0 => pick(&r[1..1 + 1 + r[0] as usize % 63], &visible),
            // A type prefix, a body and a random (so wrong) checksum.
            1 => format!("{}{}", type_prefixes[i % 16 / 4], pick(&r[..46], base62)),
            // A real key with one checksum character changed.
            2 => {
                let mut k = unknown_key().into_bytes();
                let last = k.len() - 1;
                k[last] = if k[last] == b'0' { b'1' } else { b'0' };
                String::from_utf8(k).unwrap()
            }
            // Right prefix, wrong length.
            _ => format!("sk_live_{}", pick(&r[..r[0] as usize % 60], base62)),
        })
        .collect();
    for t in &tokens {
        assert!(key::parse(&prefixes, t).is_err(), "junk token parses: {t}");
    }

    redis.reset_stats();
    let mut set = tokio::task::JoinSet::new();
    for chunk in tokens.chunks(250) {
        let http = app.http.clone();
        let url = app.proxy_url(PATH);
        let chunk = chunk.to_vec();
        set.spawn(async move {
            let mut bad = Vec::new();
            for t in chunk {
                let resp = http
                    .get(&url)
                    .bearer_auth(&t)
                    .send()
                    .await
                    .expect("proxy reachable");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                if status != 401 || body["error"]["code"] != "malformed_key" {
                    bad.push((t, status, body));
                }
            }
            bad
        });
    }
    let bad: Vec<_> = set.join_all().await.into_iter().flatten().collect();
    assert!(
        bad.is_empty(),
        "{} junk tokens not refused as 401 malformed_key, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );

    let ran = commands_run(&redis);
    // Only our own INFO / CONFIG, connection set-up, and the change feed's periodic
    // read of the counter (GET) may appear.
    let unexpected: Vec<_> = ran
        .iter()
        .filter(|(name, _)| {
            let base = name.split('|').next().unwrap();
            !matches!(
                base,
                "info" | "config" | "client" | "hello" | "select" | "ping" | "get"
            )
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "junk tokens caused Redis commands: {unexpected:?}"
    );
    assert_eq!(redis.calls("hgetall"), 0);
    assert_eq!(redis.calls("evalsha"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_negatively_cached() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 1).await;
    let sentinel = app.create_key(&["users:read"]).await;
    drain_feed(&app, &redis, &sentinel).await;

    let unknown = unknown_key();
    redis.reset_stats();
    assert_error(app.get_with(PATH, &unknown).await, 401, "unknown_key").await;
    assert_error(app.get_with(PATH, &unknown).await, 401, "unknown_key").await;
    assert_eq!(
        redis.calls("hgetall"),
        1,
        "the second request within negative_ttl must not read Redis"
    );
    // The negative entry is short-lived (negative_ttl: 2s): the store is asked again.
    let reread = eventually(Duration::from_secs(6), || async {
        get_counting(&app, &redis, &unknown).await == (401, 1)
    })
    .await;
    assert!(reread, "the unknown-key entry never expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_through_redis_is_immediate() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    let key = app.create_key(&["users:read"]).await;
    wait_cached(&app, &redis, &key.key, 200).await;

    let resp = app.revoke(&key.id).await;
    assert_eq!(resp.status(), 200);
    assert_error(app.get_with(PATH, &key.key).await, 403, "revoked_key").await;
    // The revocation is in Redis, not only in this process.
    let digest: String = redis.cmd(&["GET", &format!("kgtest:id:{}", key.id)]);
    let revoked_at: Option<String> =
        redis.cmd(&["HGET", &format!("kgtest:k:{digest}"), "revoked_at"]);
    assert!(revoked_at.is_some(), "revoked_at not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_keys_and_revocations() {
    let redis = Redis::start();
    let a = spawn_app(Store::Redis(&redis)).await;
    let b = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 2).await;

    let key = a.create_key(&["users:read"]).await;
    let resp = b.get_with(PATH, &key.key).await;
    assert_eq!(resp.status(), 200, "a key created on A works on B at once");
    let echoed: Value = resp.json().await.unwrap();
    assert_eq!(echoed["headers"]["x-keygate-key-id"][0], key.id.as_str());

    // B answers from its cache now, so only the change feed can tell it.
    wait_cached(&b, &redis, &key.key, 200).await;
    assert_eq!(a.revoke(&key.id).await.status(), 200);
    let started = Instant::now();
    let refused = eventually(Duration::from_secs(1), || async {
        b.get_with(PATH, &key.key).await.status() == 403
    })
    .await;
    assert!(refused, "B still accepts a key revoked on A after 1 s");
    println!("B refused the revoked key after {:?}", started.elapsed());
    assert_error(b.get_with(PATH, &key.key).await, 403, "revoked_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_clears_a_cached_unknown_on_other_replicas() {
    let redis = Redis::start();
    let b = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 1).await;

    // A key we know before it exists: B caches "unknown" for its digest.
    let new = key::generate(&Prefixes::default(), KeyType::Secret, Environment::Live).unwrap();
    assert_error(b.get_with(PATH, &new.text).await, 401, "unknown_key").await;
    wait_cached(&b, &redis, &new.text, 401).await;

    // Another replica (here: the store itself, as the admin API would) creates it.
    let store = RedisStore::connect(&RedisSettings::standalone(
        &redis.url,
        "kgtest",
        Duration::from_millis(250),
    ))
    .unwrap();
    let record = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: "default".into(),
        name: "made elsewhere".into(),
        key_type: KeyType::Secret,
        environment: Environment::Live,
        prefix: new.display_prefix(),
        last_four: new.last_four(),
        scopes: vec!["users:read".into()],
        created_at: keygate::time::now_ms(),
        last_used_at: None,
        expires_at: None,
        revoked_at: None,
        successor_id: None,
        digest: key::sha256(new.text.as_bytes()),
        limits: Default::default(),
        plain_sha256: false,
    };
    store.insert(&record).await.unwrap();
    // Well within negative_ttl (2 s): only the published create can clear the entry.
    let accepted = eventually(Duration::from_secs(1), || async {
        b.get_with(PATH, &new.text).await.status() == 200
    })
    .await;
    assert!(accepted, "B kept refusing a key created elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_flushes_the_cache() {
    let redis = Redis::start();
    let a = spawn_app(Store::Redis(&redis)).await;
    let b = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 2).await;

    let key = a.create_key(&["users:read"]).await;
    wait_cached(&b, &redis, &key.key, 200).await;

    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed >= 2, "killed {killed} pubsub connections");
    // Published while B is (most likely) not subscribed: B misses the message.
    assert_eq!(a.revoke(&key.id).await.status(), 200);
    let refused = eventually(Duration::from_secs(2), || async {
        b.get_with(PATH, &key.key).await.status() == 403
    })
    .await;
    assert!(
        refused,
        "B still accepts the revoked key 2 s after losing its subscription"
    );

    // Both replicas subscribe again, and the feed works as before.
    wait_subscribed(&redis, 2).await;
    let key2 = a.create_key(&["users:read"]).await;
    wait_cached(&b, &redis, &key2.key, 200).await;
    assert_eq!(a.revoke(&key2.id).await.status(), 200);
    let refused = eventually(Duration::from_secs(1), || async {
        b.get_with(PATH, &key2.key).await.status() == 403
    })
    .await;
    assert!(refused, "after re-subscribing, B missed a revocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_cache_hits_pass_misses_get_503_then_recovery() {
    let mut redis = Redis::start_persistent();
    let app = spawn_app(Store::Redis(&redis)).await;
    wait_subscribed(&redis, 1).await;
    let key = app.create_key(&["users:read"]).await;
    drain_feed(&app, &redis, &key).await;
    wait_cached(&app, &redis, &key.key, 200).await;
    let never_seen = unknown_key();

    redis.kill();

    let started = Instant::now();
    let resp = app.get_with(PATH, &never_seen).await;
    let elapsed = started.elapsed();
    let headers = assert_error(resp, 503, "store_unavailable").await;
    assert!(
        elapsed < Duration::from_secs(2),
        "a miss with Redis down took {elapsed:?}"
    );
    assert!(
        headers.contains_key("retry-after"),
        "503 without Retry-After"
    );

    let ready = app
        .http
        .get(app.admin_url("/readyz"))
        .send()
        .await
        .expect("admin reachable");
    assert_eq!(ready.status(), 503, "readyz with Redis down");

    // The cached key keeps working while Redis is down.
    let resp = app.get_with(PATH, &key.key).await;
    assert_eq!(
        resp.status(),
        200,
        "a cached key must keep passing while Redis is down: {}",
        resp.text().await.unwrap_or_default()
    );

    redis.restart();
    let ready = app.becomes_ready().await;
    assert!(ready, "readyz never turned 200 after Redis came back");
    // Data survived (AOF), and new keys work.
    assert_eq!(app.get_with(PATH, &key.key).await.status(), 200);
    let fresh = app.create_key(&["users:read"]).await;
    assert_eq!(app.get_with(PATH, &fresh.key).await.status(), 200);
    assert_error(app.get_with(PATH, &never_seen).await, 401, "unknown_key").await;
}

/// Each proxy worker reads misses over its own Redis connection. After a Redis restart
/// (keygate ready again), the first miss on every worker is answered, not refused
/// because that worker's connection died with the old Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_the_first_miss_on_each_worker_is_answered() {
    let mut redis = Redis::start_persistent();
    let app = spawn_app(Store::Redis(&redis)).await;
    // Two client connections held open: the second goes to the other worker (the
    // acceptor picks the least busy one), so both workers open their connections.
    let client = || reqwest::Client::builder().no_proxy().build().unwrap();
    let clients = [client(), client()];
    let get = |c: &reqwest::Client, key: &str| c.get(app.proxy_url(PATH)).bearer_auth(key).send();
    for c in &clients {
        let k = app.create_key(&["users:read"]).await;
        assert_eq!(get(c, &k.key).await.unwrap().status(), 200);
    }

    redis.kill();
    redis.restart();
    let ready = app.becomes_ready().await;
    assert!(ready, "readyz never turned 200 after Redis came back");

    for (i, c) in clients.iter().enumerate() {
        let k = app.create_key(&["users:read"]).await;
        let resp = get(c, &k.key).await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "connection {i}: first miss after the restart: {}",
            resp.text().await.unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_gives_503_not_a_hang() {
    let redis = Redis::start();
    let app = spawn_app(Store::RedisTimeout(&redis, "250ms")).await;
    // Warm the connection up.
    assert_error(app.get_with(PATH, &unknown_key()).await, 401, "unknown_key").await;

    let never_seen = unknown_key();
    let _: String = redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let started = Instant::now();
    let resp = app.get_with(PATH, &never_seen).await;
    let elapsed = started.elapsed();
    let headers = assert_error(resp, 503, "store_unavailable").await;
    assert!(
        elapsed < Duration::from_millis(1500),
        "a miss with Redis paused took {elapsed:?} (timeout is 250ms)"
    );
    assert!(headers.contains_key("retry-after"));

    // Once the pause ends, the same key is looked up normally (the failure was not cached).
    let recovered = eventually(Duration::from_secs(8), || async {
        app.get_with(PATH, &never_seen).await.status() == 401
    })
    .await;
    assert!(recovered, "the store never recovered after the pause");
    assert_error(app.get_with(PATH, &never_seen).await, 401, "unknown_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_a_store_error_not_a_pass() {
    let redis = Redis::start();
    let a = spawn_app(Store::Redis(&redis)).await;
    let key = a.create_key(&["users:read"]).await;
    let records: Vec<String> = redis.cmd(&["KEYS", "kgtest:k:*"]);
    assert_eq!(records.len(), 1, "{records:?}");
    let _: i64 = redis.cmd(&["HSET", &records[0], "created_at", "notanumber"]);

    // A fresh replica has nothing cached: it must read (and refuse) the corrupt record.
    let b = spawn_app(Store::Redis(&redis)).await;
    assert_error(b.get_with(PATH, &key.key).await, 503, "store_unavailable").await;
    assert_error(b.get_with(PATH, &key.key).await, 503, "store_unavailable").await;

    // B is still healthy for everything else.
    let other = b.create_key(&["users:read"]).await;
    assert_eq!(b.get_with(PATH, &other.key).await.status(), 200);
    let ready = b.http.get(b.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_redis_newest_first() {
    let redis = Redis::start();
    let app = spawn_app(Store::Redis(&redis)).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(app.create_key(&["users:read"]).await.id);
    }
    created.reverse();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "2".to_string())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let resp = app
            .http
            .get(app.admin_url("/v1/keys"))
            .bearer_auth(ROOT)
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        pages += 1;
        let next = resp
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let items: Vec<Value> = resp.json().await.unwrap();
        assert!(items.len() <= 2, "page of {}", items.len());
        assert!(
            items.iter().all(|k| k.get("key").is_none()),
            "a listing shows a full key"
        );
        seen.extend(items.iter().map(|k| k["id"].as_str().unwrap().to_string()));
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "cursor never ends");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "newest first, each id once");
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 5);
}

/// The next change message on a subscription (within 2 s).
async fn next_event(events: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> String {
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(Duration::from_secs(2), events.next())
        .await
        .expect("a change event")
        .expect("the subscription");
    msg.get_payload::<String>().unwrap()
}

/// The field names of a record's hash, sorted.
fn hash_fields(redis: &Redis, key: &str) -> Vec<String> {
    let map: std::collections::BTreeMap<String, String> = redis.cmd(&["HGETALL", key]);
    map.into_keys().collect()
}

fn limits_store(redis: &Redis) -> RedisStore {
    RedisStore::connect(&RedisSettings::standalone(
        &redis.url,
        "lim",
        Duration::from_millis(250),
    ))
    .unwrap()
}

/// A record without limits is the hash it always was (an existing dataset is unchanged,
/// and a PATCH that sets and then removes limits leaves it as it was); limits are fields
/// of their own, and a change to them is published like a name change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_hash_fields_of_their_own_absent_without_limits() {
    use keygate::store::{Credits, KeyUpdate, RateLimit};
    let redis = Redis::start();
    let store = limits_store(&redis);
    let r = crate::contract::record("t", 1_700_000_000_000);
    store.insert(&r).await.unwrap();
    let rk = format!("lim:k:{}", key::hex(&r.digest));
    let original: std::collections::BTreeMap<String, String> = redis.cmd(&["HGETALL", &rk]);
    assert_eq!(
        hash_fields(&redis, &rk),
        [
            "created_at",
            "digest",
            "env",
            "expires_at",
            "id",
            "last_four",
            "name",
            "prefix",
            "scopes",
            "tenant",
            "type"
        ],
    );

    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut events = client.get_async_pubsub().await.unwrap();
    events.subscribe("lim:events").await.unwrap();
    let mut events = events.into_on_message();
    let seq = || redis.cmd::<u64>(&["GET", "lim:seq"]);
    let seq_before = seq();

    let set = KeyUpdate {
        ratelimits: Some(vec![RateLimit {
            name: "rps".into(),
            limit: 10,
            duration_ms: 1000,
        }]),
        credits: Some(Some(Credits {
            remaining: 100,
            set_at: 1_700_000_000_000,
            refill: None,
        })),
        ..KeyUpdate::default()
    };
    store.update("t", &r.id, &set, 5).await.unwrap().unwrap();
    let stored: std::collections::BTreeMap<String, String> = redis.cmd(&["HGETALL", &rk]);
    assert_eq!(
        stored.get("ratelimits").map(String::as_str),
        Some(r#"[{"name":"rps","limit":10,"duration_ms":1000}]"#)
    );
    assert_eq!(
        stored.get("credits").map(String::as_str),
        Some(r#"{"remaining":100,"set_at":1700000000000}"#)
    );
    assert!(!stored.contains_key("limits") && !stored.contains_key("budget"));
    assert_eq!(
        next_event(&mut events).await,
        format!("{} update {} 5", seq_before + 1, key::hex(&r.digest))
    );
    // The same change again writes and publishes nothing.
    store.update("t", &r.id, &set, 6).await.unwrap().unwrap();
    assert_eq!(seq(), seq_before + 1);

    let unset = KeyUpdate {
        ratelimits: Some(Vec::new()),
        credits: Some(None),
        ..KeyUpdate::default()
    };
    store.update("t", &r.id, &unset, 7).await.unwrap().unwrap();
    assert_eq!(
        next_event(&mut events).await,
        format!("{} update {} 7", seq_before + 2, key::hex(&r.digest))
    );
    let after: std::collections::BTreeMap<String, String> = redis.cmd(&["HGETALL", &rk]);
    assert_eq!(after, original);

    // Inserted with limits (and a budget): three fields, nothing else new.
    let mut limited = crate::contract::record("t", 1_700_000_000_001);
    limited.limits = crate::contract::some_limits();
    store.insert(&limited).await.unwrap();
    let fields = hash_fields(&redis, &format!("lim:k:{}", key::hex(&limited.digest)));
    let extra: Vec<&String> = fields
        .iter()
        .filter(|f| !original.contains_key(*f))
        .collect();
    assert_eq!(extra, ["budget", "credits", "ratelimits"]);
}

/// A limits field that does not decode is a corrupt record (naming the field, never
/// quoting it), on every read path; it is never read as "no limits".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_limits_field_is_corrupt() {
    use keygate::store::{PageRequest, StoreError};
    let redis = Redis::start();
    let store = limits_store(&redis);
    let bad = [
        ("ratelimits", "not json at all"),
        ("ratelimits", r#"{"name":"rps","limit":1,"duration_ms":1}"#),
        (
            "ratelimits",
            r#"[{"name":"rps","limit":-1,"duration_ms":1}]"#,
        ),
        ("credits", r#"{"remaining":"plenty","set_at":1}"#),
        ("credits", "[]"),
        ("credits", ""),
    ];
    for (i, (field, value)) in bad.into_iter().enumerate() {
        let tenant = format!("t{i}");
        let r = crate::contract::record(&tenant, 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        let rk = format!("lim:k:{}", key::hex(&r.digest));
        let _: i64 = redis.cmd(&["HSET", &rk, field, value]);
        let check = |got: Result<(), StoreError>, path: &str| {
            let Err(e @ StoreError::Corrupt { .. }) = got else {
                panic!("{path} of a record with {field} = {value:?}: {got:?}");
            };
            let text = e.to_string();
            assert!(text.contains(field), "{text}");
            assert!(value.len() < 3 || !text.contains(value), "{text}");
            assert!(!text.contains(&key::hex(&r.digest)), "{text}");
        };
        check(store.by_digest(&r.digest).await.map(|_| ()), "by_digest");
        check(store.by_id(&tenant, &r.id).await.map(|_| ()), "by_id");
        let page = PageRequest {
            limit: 10,
            cursor: None,
        };
        check(store.list(&tenant, &page).await.map(|_| ()), "list");
    }
}

/// Rate-limit scripts run on the server by `EVALSHA` (loaded again after `SCRIPT
/// FLUSH`), through the shared store and a worker's reader, with no `WAIT` even when
/// management writes want a replica's ack; a paused server is a timeout within the
/// store's bound, and a node that became a replica refuses as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_run_on_the_primary_without_waiting_for_replicas() {
    use keygate::store::StoreError;
    use redis::Value;
    let redis = Redis::start();
    let mut settings = RedisSettings::standalone(&redis.url, "lim", Duration::from_millis(250));
    settings.min_replicas_ack = 1;
    settings.ack_timeout = Duration::from_millis(100);
    let store = RedisStore::connect(&settings).unwrap();
    // Management writes cannot be confirmed (no replica)...
    let r = crate::contract::record("t", 1_700_000_000_000);
    assert!(matches!(
        store.insert(&r).await,
        Err(StoreError::Unconfirmed {
            acked: 0,
            wanted: 1
        })
    ));
    let waits = redis.calls("wait");
    // ...but counters do not wait for replicas.
    let scripts = store.scripts().expect("Redis runs scripts");
    assert_eq!(scripts.namespace(), "lim");
    let incr = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let keys = ["lim:{x}:c".to_string()];
    let by = |n: u64| [n.to_string()];
    assert_eq!(
        scripts.eval(&incr, &keys, &by(5)).await.unwrap(),
        Value::Int(5)
    );
    let worker = store.worker_reader().unwrap().scripts().unwrap();
    assert_eq!(worker.namespace(), "lim");
    assert_eq!(
        worker.eval(&incr, &keys, &by(2)).await.unwrap(),
        Value::Int(7)
    );
    let _: String = redis.cmd(&["SCRIPT", "FLUSH"]);
    assert_eq!(
        scripts.eval(&incr, &keys, &by(1)).await.unwrap(),
        Value::Int(8)
    );
    assert_eq!(
        worker.eval(&incr, &keys, &by(1)).await.unwrap(),
        Value::Int(9)
    );
    assert_eq!(redis.cmd::<String>(&["GET", "lim:{x}:c"]), "9");
    assert_eq!(redis.calls("wait"), waits, "a script was followed by WAIT");
    assert!(redis.calls("evalsha") >= 4);
    assert_eq!(
        redis.calls("eval"),
        1,
        "only the insert sends its script text"
    );

    // Paused: a timeout, within the bound.
    let _: String = redis.cmd(&["CLIENT", "PAUSE", "1500", "ALL"]);
    let started = Instant::now();
    let got = scripts.eval(&incr, &keys, &by(1)).await;
    assert!(matches!(got, Err(StoreError::Timeout)), "{got:?}");
    assert!(started.elapsed() < Duration::from_millis(1000));
    let _: String = redis.cmd(&["CLIENT", "UNPAUSE"]);

    // No longer the primary: the write inside the script is refused.
    let _: String = redis.cmd(&["REPLICAOF", "127.0.0.1", "1"]);
    let got = scripts.eval(&incr, &keys, &by(1)).await;
    assert!(
        matches!(&got, Err(StoreError::Unavailable(m)) if m.contains("not the primary")),
        "{got:?}"
    );
}
