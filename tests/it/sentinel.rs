//! keygate on Redis Sentinel, as real processes: a SIGKILLed primary loses no change a
//! keygate acknowledged (creates authenticate and are listed, revocations are refused, on
//! both of two keygates, neither restarted), a write that replicas did not confirm is 503
//! `replication_unconfirmed` and safe to retry, and `/readyz` follows the primary.
//! Timings (kill to writes again, kill to cache misses answered again) are printed.

use crate::support::{eventually, ROOT};
use crate::support_ha::{Keygate, SentinelSet};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The route every key here is used on (`users:read`).
const PATH: &str = "/users/1";
/// `store.redis.ack_timeout` in `CONFIG`.
const ACK_TIMEOUT: Duration = Duration::from_millis(500);

/// `{proxy_port}`, `{admin_port}` are filled in by `Keygate::spawn`, `{upstream}` and
/// `{nodes}` by `config`.
const CONFIG: &str = r#"
proxy:
  listen: 127.0.0.1:{proxy_port}
  upstream: http://{upstream}
  timeouts: { upstream: 2s, header_read: 2s, idle: 30s }
admin:
  listen: 127.0.0.1:{admin_port}
store:
  redis:
    sentinel: { master_name: mymaster, nodes: {nodes} }
    namespace: kgtest
    timeout: 1s
    min_replicas_ack: 1
    ack_timeout: 500ms
  last_used_interval: 200ms
cache: { ttl: 5m, negative_ttl: 2s }
routes:
  - { name: health, path: /healthz, auth: none }
  - { name: users-read, methods: [GET, HEAD], path: "/users/**", scopes: ["users:read"] }
unmatched: deny
"#;

fn config(set: &SentinelSet, upstream: SocketAddr) -> String {
    CONFIG
        .replace("{upstream}", &upstream.to_string())
        .replace("{nodes}", &set.sentinel_nodes_yaml())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// An answer: status and error code (empty if none), or the transport error.
#[derive(Debug, Clone)]
struct Answer {
    status: Option<u16>,
    code: String,
    body: Value,
}

impl Answer {
    async fn of(r: reqwest::Result<reqwest::Response>) -> Answer {
        match r {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                let code = body["error"]["code"].as_str().unwrap_or("").to_string();
                Answer {
                    status: Some(status),
                    code,
                    body,
                }
            }
            Err(e) => Answer {
                status: None,
                code: format!("transport: {e}"),
                body: Value::Null,
            },
        }
    }

    /// `201`, `503 replication_unconfirmed`, `transport: ...`.
    fn label(&self) -> String {
        match self.status {
            Some(s) if self.code.is_empty() => s.to_string(),
            Some(s) => format!("{s} {}", self.code),
            None => self.code.clone(),
        }
    }
}

async fn create(http: &reqwest::Client, kg: &Keygate) -> Answer {
    Answer::of(
        http.post(format!("{}/v1/keys", kg.admin))
            .bearer_auth(ROOT)
            .json(&json!({"label": "ha", "scopes": ["users:read"]}))
            .send()
            .await,
    )
    .await
}

/// A key from a 201 answer: (id, key).
fn created(a: &Answer) -> Option<(String, String)> {
    (a.status == Some(201)).then(|| {
        (
            a.body["id"].as_str().expect("id").to_string(),
            a.body["key"].as_str().expect("key").to_string(),
        )
    })
}

/// Create, insisting on 201.
async fn create_ok(http: &reqwest::Client, kg: &Keygate) -> (String, String) {
    let a = create(http, kg).await;
    created(&a).unwrap_or_else(|| panic!("create: {} {}", a.label(), a.body))
}

/// A write retried while the store answers "try again" (503 `replication_unconfirmed`
/// or `store_unavailable`, or no answer): on a loaded machine the sentinels may fail
/// over a second time after the burst, and retrying is what the 503 tells a client to
/// do. Gives up after 20 s and returns the last answer.
async fn until_acknowledged<F, Fut>(what: &str, op: F) -> Answer
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut retries = 0;
    loop {
        let a = op().await;
        let again = a.status.is_none()
            || (a.status == Some(503)
                && matches!(
                    a.code.as_str(),
                    "replication_unconfirmed" | "store_unavailable"
                ));
        if !again || Instant::now() >= deadline {
            if retries > 0 {
                eprintln!("{what}: {retries} retries before {}", a.label());
            }
            return a;
        }
        retries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Create after the burst, retrying while the store says "try again", insisting on 201.
async fn create_settled(http: &reqwest::Client, kg: &Keygate) -> (String, String) {
    let a = until_acknowledged("create", || create(http, kg)).await;
    created(&a).unwrap_or_else(|| panic!("create: {} {}", a.label(), a.body))
}

/// The two admin documents the burst writes through.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    /// `/v1/keys`: create 201, revoke 200.
    Jack,
    /// `/v1/api-keys`: create 201, revoke 204.
    HelloJohn,
}

async fn create_via(http: &reqwest::Client, kg: &Keygate, api: Api) -> Answer {
    match api {
        Api::Jack => create(http, kg).await,
        Api::HelloJohn => {
            Answer::of(
                http.post(format!("{}/v1/api-keys", kg.admin))
                    .bearer_auth(ROOT)
                    .json(&json!({"name": "ha", "type": "secret", "scopes": ["users:read"]}))
                    .send()
                    .await,
            )
            .await
        }
    }
}

/// Revoke through `api`: whether it answered success, and the answer.
async fn revoke_via(http: &reqwest::Client, kg: &Keygate, api: Api, id: &str) -> (bool, Answer) {
    match api {
        Api::Jack => {
            let a = revoke(http, kg, id).await;
            (a.status == Some(200), a)
        }
        Api::HelloJohn => {
            let a = Answer::of(
                http.delete(format!("{}/v1/api-keys/{id}", kg.admin))
                    .bearer_auth(ROOT)
                    .send()
                    .await,
            )
            .await;
            (a.status == Some(204), a)
        }
    }
}

async fn revoke(http: &reqwest::Client, kg: &Keygate, id: &str) -> Answer {
    Answer::of(
        http.delete(format!("{}/v1/keys/{id}", kg.admin))
            .bearer_auth(ROOT)
            .send()
            .await,
    )
    .await
}

async fn get(http: &reqwest::Client, kg: &Keygate, key: &str) -> Answer {
    Answer::of(
        http.get(format!("{}{PATH}", kg.proxy))
            .bearer_auth(key)
            .send()
            .await,
    )
    .await
}

/// Every key object on `GET /v1/keys`, following `X-Next-Cursor`, by id.
async fn list(http: &reqwest::Client, kg: &Keygate) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = http
            .get(format!("{}/v1/keys", kg.admin))
            .bearer_auth(ROOT)
            .query(&[("limit", "1000")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c.as_str())]);
        }
        let r = req.send().await.expect("admin reachable");
        assert_eq!(r.status(), 200, "list keys");
        cursor = r
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let page: Vec<Value> = r.json().await.expect("a JSON array");
        for k in page {
            out.insert(k["id"].as_str().expect("id").to_string(), k);
        }
        if cursor.is_none() {
            return out;
        }
    }
}

async fn metrics(http: &reqwest::Client, kg: &Keygate) -> String {
    http.get(format!("{}/metrics", kg.admin))
        .send()
        .await
        .expect("admin reachable")
        .text()
        .await
        .expect("metrics text")
}

/// The sum of every series of `name` (any labels), or None if there is none.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let series: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!series.is_empty()).then(|| series.iter().sum())
}

/// Does the exposition have the sample line `line` (e.g. `keygate_store_info{mode="sentinel"} 1`)?
fn has_sample(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

fn primary_info(port: u16) -> String {
    format!("keygate_store_primary_info{{node=\"127.0.0.1:{port}\"}} 1")
}

async fn readyz(http: &reqwest::Client, kg: &Keygate) -> Option<u16> {
    http.get(format!("{}/readyz", kg.admin))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Both keygates on `set`, ready, with the echo upstream.
async fn two_keygates(set: &SentinelSet, http: &reqwest::Client) -> (Keygate, Keygate) {
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut a = Keygate::spawn(&config(set, upstream));
    let mut b = Keygate::spawn(&config(set, upstream));
    a.wait_ready(http).await;
    b.wait_ready(http).await;
    (a, b)
}

/// A management write as the burst saw it.
#[derive(Debug, Clone)]
struct Op {
    keygate: usize,
    api: Api,
    revoke: bool,
    started: Instant,
    finished: Instant,
    answer: String,
    ok: bool,
}

/// What the burst's writers share.
#[derive(Default)]
struct Burst {
    stop: AtomicBool,
    ops: Mutex<Vec<Op>>,
    /// Acknowledged creates: (id, key).
    created: Mutex<Vec<(String, String)>>,
    /// Keys waiting to be revoked (a failed revoke goes back to the front: retried).
    victims: Mutex<VecDeque<(String, String)>>,
    /// Ids a revoke was sent for, whatever the answer.
    attempted: Mutex<HashSet<String>>,
    /// Acknowledged revokes: (id, key).
    revoked: Mutex<Vec<(String, String)>>,
}

/// One writer of the burst against keygate `i` through `api`: two creates (every second
/// created key becomes a victim) to one revoke, one every 10 ms, until `stop`.
async fn writer(i: usize, api: Api, kg: Arc<Keygate>, http: reqwest::Client, burst: Arc<Burst>) {
    let mut n = 0u64;
    while !burst.stop.load(Ordering::Relaxed) {
        n += 1;
        let victim = if n % 3 == 0 {
            burst.victims.lock().unwrap().pop_front()
        } else {
            None
        };
        let started = Instant::now();
        let (answer, ok, revoke_op) = match victim {
            Some((id, key)) => {
                burst.attempted.lock().unwrap().insert(id.clone());
                let (ok, a) = revoke_via(&http, &kg, api, &id).await;
                if ok {
                    burst.revoked.lock().unwrap().push((id, key));
                } else {
                    burst.victims.lock().unwrap().push_front((id, key));
                }
                (a.label(), ok, true)
            }
            None => {
                let a = create_via(&http, &kg, api).await;
                let made = created(&a);
                let ok = made.is_some();
                if let Some(k) = made {
                    burst.created.lock().unwrap().push(k.clone());
                    if n % 2 == 0 {
                        burst.victims.lock().unwrap().push_back(k);
                    }
                }
                (a.label(), ok, false)
            }
        };
        burst.ops.lock().unwrap().push(Op {
            keygate: i,
            api,
            revoke: revoke_op,
            started,
            finished: Instant::now(),
            answer,
            ok,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Proxy traffic with one long-lived key on keygate `kg` until `stop`: answers counted.
async fn proxy_traffic(
    kg: Arc<Keygate>,
    http: reqwest::Client,
    key: String,
    burst: Arc<Burst>,
) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    while !burst.stop.load(Ordering::Relaxed) {
        *seen.entry(get(&http, &kg, &key).await.label()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// From the kill on, every 100 ms a key never used on `kg` before (a cache miss) until one
/// is answered 200: the time from the kill, and every answer seen.
async fn miss_probe(
    kg: Arc<Keygate>,
    http: reqwest::Client,
    mut fresh: Vec<String>,
    killed: Arc<OnceLock<Instant>>,
    burst: Arc<Burst>,
) -> (Option<Duration>, BTreeMap<String, u64>) {
    let mut seen = BTreeMap::new();
    let kill = loop {
        if let Some(t) = killed.get() {
            break *t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut last = None;
    while !burst.stop.load(Ordering::Relaxed) {
        // Once the fresh keys run out, the last one again (only 503s are left untried
        // twice in practice: an unknown answer would be negatively cached).
        let key = fresh.pop().or_else(|| last.clone()).expect("fresh keys");
        let a = get(&http, &kg, &key).await;
        *seen.entry(a.label()).or_default() += 1;
        if a.status == Some(200) {
            return (Some(kill.elapsed()), seen);
        }
        last = Some(key);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (None, seen)
}

/// Until every `(id, key)` is answered by both keygates' proxies as `want` says, or 5 s;
/// returns the ones that never were, with the last answers.
async fn settle(
    http: &reqwest::Client,
    kgs: [&Keygate; 2],
    keys: &[(String, String)],
    want: impl Fn(&Answer) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pending: Vec<&(String, String)> = keys.iter().collect();
    loop {
        let mut still = Vec::new();
        let mut why = Vec::new();
        for k in pending {
            for (i, kg) in kgs.iter().enumerate() {
                let a = get(http, kg, &k.1).await;
                if !want(&a) {
                    why.push(format!("{} on keygate {i}: {}", k.0, a.label()));
                    still.push(k);
                    break;
                }
            }
        }
        if still.is_empty() || Instant::now() >= deadline {
            return why;
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn refused(a: &Answer) -> bool {
    matches!(
        (a.status, a.code.as_str()),
        (Some(403), "revoked_key") | (Some(401), _)
    )
}

/// Two keygates on one Sentinel set (a primary, two replicas), a burst of creates and
/// revokes on both admin ports and proxy traffic on both, the primary SIGKILLed
/// mid-burst. Once writes succeed again on both: every acknowledged create authenticates
/// on both and is listed, every acknowledged revoke is refused by both, a key cached and
/// then revoked after the failover is refused at once (the change feed moved), metrics
/// show the primary change, and neither keygate restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_keeps_every_acknowledged_change() {
    let set = tokio::task::spawn_blocking(|| SentinelSet::start_with_replicas(2))
        .await
        .unwrap();
    let http = client();
    let (a, b) = two_keygates(&set, &http).await;
    let old_primary = set.primary_port();
    for kg in [&a, &b] {
        let m = metrics(&http, kg).await;
        assert!(
            has_sample(&m, "keygate_store_info{mode=\"sentinel\"} 1"),
            "{m}"
        );
        assert!(has_sample(&m, &primary_info(old_primary)), "{m}");
    }

    // Before the kill: victims cached on both proxies, a long-lived key for proxy traffic,
    // and keys never used on one keygate for the cache-miss probes.
    let burst = Arc::new(Burst::default());
    let stable = create_ok(&http, &a).await;
    for i in 0..30 {
        let k = create_ok(&http, if i % 2 == 0 { &a } else { &b }).await;
        for kg in [&a, &b] {
            assert_eq!(get(&http, kg, &k.1).await.status, Some(200));
        }
        burst.created.lock().unwrap().push(k.clone());
        burst.victims.lock().unwrap().push_back(k);
    }
    // Keygate i's fresh keys are created through the other one, so never touched by i.
    let mut fresh: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (pool, other) in fresh.iter_mut().zip([&b, &a]) {
        for _ in 0..100 {
            let k = create_ok(&http, other).await;
            burst.created.lock().unwrap().push(k.clone());
            pool.push(k.1);
        }
    }
    // The miss path works before the kill.
    for (kg, pool) in [&a, &b].into_iter().zip(&mut fresh) {
        let k = pool.pop().unwrap();
        assert_eq!(get(&http, kg, &k).await.status, Some(200));
    }
    for kg in [&a, &b] {
        assert_eq!(get(&http, kg, &stable.1).await.status, Some(200));
    }

    let (a, b) = (Arc::new(a), Arc::new(b));
    let killed: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut writers = Vec::new();
    let mut traffic = Vec::new();
    let mut probes = Vec::new();
    for (i, kg) in [&a, &b].into_iter().enumerate() {
        for api in [Api::Jack, Api::HelloJohn] {
            writers.push(tokio::spawn(writer(
                i,
                api,
                kg.clone(),
                http.clone(),
                burst.clone(),
            )));
        }
        traffic.push(tokio::spawn(proxy_traffic(
            kg.clone(),
            http.clone(),
            stable.1.clone(),
            burst.clone(),
        )));
        probes.push(tokio::spawn(miss_probe(
            kg.clone(),
            http.clone(),
            std::mem::take(&mut fresh[i]),
            killed.clone(),
            burst.clone(),
        )));
    }

    // Mid-burst: once both writers have had some writes acknowledged, SIGKILL the primary.
    let warm = eventually(Duration::from_secs(10), || async {
        let ops = burst.ops.lock().unwrap();
        (0..2).all(|i| ops.iter().filter(|o| o.keygate == i && o.ok).count() >= 30)
    })
    .await;
    assert!(warm, "the burst did not get going");
    let mut set = set;
    let kill = Instant::now();
    killed.set(kill).unwrap();
    set.kill_primary();
    let (set, new_primary) = tokio::task::spawn_blocking(move || {
        let p = set.wait_failover();
        (set, p)
    })
    .await
    .unwrap();
    let sentinel_failover = kill.elapsed();
    assert_ne!(new_primary, old_primary);

    // Keep going until both keygates acknowledge writes again (20 creates and 5 revokes
    // each, started after the kill, through both documents) and both answer cache misses
    // again.
    let recovered = eventually(Duration::from_secs(30), || async {
        let ops = burst.ops.lock().unwrap();
        let writes = (0..2).all(|i| {
            let after = |revoke: bool| {
                ops.iter()
                    .filter(|o| o.keygate == i && o.ok && o.started > kill && o.revoke == revoke)
                    .count()
            };
            let both_apis = [Api::Jack, Api::HelloJohn].iter().all(|api| {
                ops.iter()
                    .any(|o| o.keygate == i && o.api == *api && o.ok && o.started > kill)
            });
            after(false) >= 20 && after(true) >= 5 && both_apis
        });
        writes && probes.iter().all(|p| p.is_finished())
    })
    .await;
    burst.stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut proxy_seen = Vec::new();
    for t in traffic {
        proxy_seen.push(t.await.unwrap());
    }
    let mut miss = Vec::new();
    for p in probes {
        miss.push(p.await.unwrap());
    }
    let ops = burst.ops.lock().unwrap().clone();

    // The timings.
    eprintln!(
        "sentinels: kill -> new primary {new_primary} named by all three: {sentinel_failover:?}"
    );
    for i in 0..2 {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.keygate == i).collect();
        let first_ok = mine
            .iter()
            .filter(|o| o.ok && o.started > kill)
            .map(|o| o.finished - kill)
            .min();
        let last_failure = mine
            .iter()
            .filter(|o| !o.ok)
            .map(|o| o.finished.saturating_duration_since(kill))
            .max();
        let mut answers: BTreeMap<String, u64> = BTreeMap::new();
        for o in &mine {
            let kind = if o.revoke { "revoke" } else { "create" };
            let when = if o.started > kill { "after" } else { "before" };
            *answers
                .entry(format!("{kind} {when} kill: {}", o.answer))
                .or_default() += 1;
        }
        let slowest = mine.iter().map(|o| o.finished - o.started).max();
        let in_flight: Vec<&str> = mine
            .iter()
            .filter(|o| o.started <= kill && o.finished > kill)
            .map(|o| o.answer.as_str())
            .collect();
        eprintln!(
            "keygate {i}: kill -> first acknowledged write {first_ok:?} (last failed write ended \
             {last_failure:?} after the kill; slowest write {slowest:?}); kill -> cache miss \
             answered {:?}; in flight at the kill {in_flight:?}; writes {answers:?}; miss probes \
             {:?}; proxy (cached key) {:?}",
            miss[i].0, miss[i].1, proxy_seen[i]
        );
    }
    assert!(
        recovered,
        "writes or cache misses did not come back within 30 s of the kill; misses {miss:?}; \
         logs a:\n{}\nlogs b:\n{}",
        a.logs(),
        b.logs()
    );

    // A revoke that was not acknowledged is retried now: it must succeed (retrying is safe).
    let retry: Vec<(String, String)> = {
        let attempted = burst.attempted.lock().unwrap();
        burst
            .victims
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| attempted.contains(id))
            .cloned()
            .collect()
    };
    for (id, key) in &retry {
        let r = until_acknowledged("retried revoke", || revoke(&http, &a, id)).await;
        assert_eq!(r.status, Some(200), "retried revoke of {id}: {}", r.label());
        burst
            .revoked
            .lock()
            .unwrap()
            .push((id.clone(), key.clone()));
    }
    let revoked = burst.revoked.lock().unwrap().clone();
    let attempted = burst.attempted.lock().unwrap().clone();
    let created = burst.created.lock().unwrap().clone();
    let live: Vec<(String, String)> = created
        .iter()
        .filter(|(id, _)| !attempted.contains(id))
        .cloned()
        .collect();
    eprintln!(
        "acknowledged: {} creates ({} never revoked), {} revokes ({} of them retried after the burst)",
        created.len(),
        live.len(),
        revoked.len(),
        retry.len()
    );

    let lost_revokes = settle(&http, [&a, &b], &revoked, refused).await;
    assert!(
        lost_revokes.is_empty(),
        "acknowledged revokes not refused: {lost_revokes:?}"
    );
    let lost_creates = settle(&http, [&a, &b], &live, |x| x.status == Some(200)).await;
    assert!(
        lost_creates.is_empty(),
        "acknowledged creates that do not authenticate: {lost_creates:?}"
    );
    for kg in [&a, &b] {
        let listed = list(&http, kg).await;
        let missing: Vec<&String> = created
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !listed.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "acknowledged creates not listed: {missing:?}"
        );
        let unrevoked: Vec<&String> = revoked
            .iter()
            .map(|(id, _)| id)
            .filter(|id| listed[*id]["revoked_at"].is_null())
            .collect();
        assert!(
            unrevoked.is_empty(),
            "acknowledged revokes listed without revoked_at: {unrevoked:?}"
        );
    }

    // The change feed follows the primary: a key cached on one keygate and revoked on the
    // other after the failover is refused within the feed's delay (10 s allows for a second
    // failover), not the cache TTL (5 minutes here).
    for (writer, reader) in [(&a, &b), (&b, &a)] {
        let k = create_settled(&http, writer).await;
        // Cached on the reader (a miss may wait out a second failover).
        let cached = eventually(Duration::from_secs(20), || async {
            get(&http, reader, &k.1).await.status == Some(200)
        })
        .await;
        assert!(
            cached,
            "a key created after the failover does not authenticate"
        );
        assert_eq!(get(&http, reader, &k.1).await.status, Some(200));
        let r = until_acknowledged("revoke", || revoke(&http, writer, &k.0)).await;
        assert_eq!(r.status, Some(200), "{}", r.label());
        let t = Instant::now();
        let gone = eventually(Duration::from_secs(10), || async {
            refused(&get(&http, reader, &k.1).await)
        })
        .await;
        assert!(
            gone,
            "a revoke after the failover did not reach the other keygate's cache"
        );
        eprintln!(
            "revoke after the failover reached the other keygate in {:?}",
            t.elapsed()
        );
    }

    // Metrics: the primary the sentinels name now (on a loaded machine they may fail
    // over a second time, which keygate follows too), at least one primary change and
    // one +switch-master seen.
    let sentinel_ports = set.sentinel_ports();
    let named_now = || {
        sentinel_ports
            .iter()
            .find_map(|&p| SentinelSet::primary_seen_by(p).ok())
            .map_or(0, |(_, port)| port)
    };
    for kg in [&a, &b] {
        let last = std::cell::RefCell::new(String::new());
        let named = std::cell::Cell::new(new_primary);
        let shows = eventually(Duration::from_secs(10), || async {
            let m = metrics(&http, kg).await;
            named.set(named_now());
            let shows = has_sample(&m, &primary_info(named.get()))
                && !has_sample(&m, &primary_info(old_primary));
            *last.borrow_mut() = m;
            shows
        })
        .await;
        let last = last.into_inner();
        if named.get() != new_primary {
            eprintln!(
                "the sentinels failed over again: {new_primary} then {}",
                named.get()
            );
        }
        assert!(shows, "primary_info does not name {}: {last}", named.get());
        assert!(
            has_sample(&last, "keygate_store_info{mode=\"sentinel\"} 1"),
            "{last}"
        );
        let changes = metric_sum(&last, "keygate_store_primary_changes_total");
        assert!(changes.is_some_and(|n| n >= 1.0), "{last}");
        let failovers = metric_sum(&last, "keygate_store_failovers_total");
        assert!(failovers.is_some_and(|n| n >= 1.0), "{last}");
        eprintln!(
            "keygate metrics: primary_changes_total {changes:?}, failovers_total {failovers:?}, \
             replication_ack_failures_total {:?}",
            metric_sum(&last, "keygate_store_replication_ack_failures_total")
        );
    }

    // Neither keygate restarted: the same processes, each started once.
    let (mut a, mut b) = (
        Arc::try_unwrap(a).ok().expect("tasks done"),
        Arc::try_unwrap(b).ok().expect("tasks done"),
    );
    for kg in [&mut a, &mut b] {
        assert!(kg.running(), "a keygate exited: {}", kg.logs());
        let starts = kg.logs().matches("keygate started").count();
        assert_eq!(starts, 1, "{}", kg.logs());
    }
    a.stop().await;
    b.stop().await;
    drop(set);
}

/// With the replica stopped, a create, a patch, a rotation and a revoke each answer 503
/// `replication_unconfirmed` within about `ack_timeout` (no hang); with the replica back,
/// the retried revoke answers 200 and the key is refused, and the retried patch answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_write_is_503_and_retry_is_safe() {
    let mut set = tokio::task::spawn_blocking(SentinelSet::start)
        .await
        .unwrap();
    let http = client();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut kg = Keygate::spawn(&config(&set, upstream));
    kg.wait_ready(&http).await;
    let (id, key) = create_ok(&http, &kg).await;
    let (other, _) = create_ok(&http, &kg).await;
    assert_eq!(get(&http, &kg, &key).await.status, Some(200));

    let mut set = tokio::task::spawn_blocking(move || {
        set.stop_replica();
        set
    })
    .await
    .unwrap();
    let patch = || async {
        Answer::of(
            http.patch(format!("{}/v1/api-keys/{other}", kg.admin))
                .bearer_auth(ROOT)
                .json(&json!({"name": "renamed"}))
                .send()
                .await,
        )
        .await
    };
    for what in ["create", "patch", "rotate", "revoke"] {
        let t = Instant::now();
        let r = match what {
            "create" => create(&http, &kg).await,
            "patch" => patch().await,
            "rotate" => {
                Answer::of(
                    http.post(format!("{}/v1/api-keys/rotate", kg.admin))
                        .bearer_auth(ROOT)
                        .json(&json!({"id": other}))
                        .send()
                        .await,
                )
                .await
            }
            _ => revoke(&http, &kg, &id).await,
        };
        let took = t.elapsed();
        eprintln!("{what} without a replica: {} in {took:?}", r.label());
        assert_eq!(
            (r.status, r.code.as_str()),
            (Some(503), "replication_unconfirmed"),
            "{what}: {}",
            r.body
        );
        assert!(r.body["error"]["message"].is_string(), "{}", r.body);
        assert!(
            took < ACK_TIMEOUT + Duration::from_millis(1500),
            "{what} took {took:?} with ack_timeout {ACK_TIMEOUT:?}"
        );
    }
    // Concurrent writes do not queue behind each other's WAIT (each has a connection
    // of its own): every one is answered `replication_unconfirmed`, none times out.
    let answers = futures_util::future::join_all((0..8).map(|_| create(&http, &kg))).await;
    for r in &answers {
        assert_eq!(
            (r.status, r.code.as_str()),
            (Some(503), "replication_unconfirmed"),
            "concurrent create: {}",
            r.body
        );
    }
    let m = metrics(&http, &kg).await;
    let failures = metric_sum(&m, "keygate_store_replication_ack_failures_total");
    assert!(failures.is_some_and(|n| n >= 4.0), "{m}");

    let set = tokio::task::spawn_blocking(move || {
        set.start_replica();
        set
    })
    .await
    .unwrap();
    let r = revoke(&http, &kg, &id).await;
    assert_eq!(
        r.status,
        Some(200),
        "retried revoke: {} {}",
        r.label(),
        r.body
    );
    assert!(!r.body["revoked_at"].is_null(), "{}", r.body);
    let gone = eventually(Duration::from_secs(5), || async {
        let a = get(&http, &kg, &key).await;
        (a.status, a.code.as_str()) == (Some(403), "revoked_key")
    })
    .await;
    assert!(gone, "the revoked key is still accepted");
    // The retried patch too (it may have applied already: then it changes nothing).
    let r = patch().await;
    assert_eq!(
        r.status,
        Some(200),
        "retried patch: {} {}",
        r.label(),
        r.body
    );
    assert_eq!(r.body["name"], "renamed", "{}", r.body);
    // And writes are confirmed again.
    let (_, fresh) = create_ok(&http, &kg).await;
    assert_eq!(get(&http, &kg, &fresh).await.status, Some(200));
    assert!(kg.running(), "{}", kg.logs());
    kg.stop().await;
    drop(set);
}

/// `/readyz` is 200 while a primary is known, 503 once the primary and its only replica
/// are gone (no failover can succeed), and 200 again when the primary comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_primary() {
    let set = tokio::task::spawn_blocking(SentinelSet::start)
        .await
        .unwrap();
    let http = client();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut kg = Keygate::spawn(&config(&set, upstream));
    kg.wait_ready(&http).await;
    let m = metrics(&http, &kg).await;
    assert!(
        has_sample(&m, "keygate_store_info{mode=\"sentinel\"} 1"),
        "{m}"
    );
    assert!(has_sample(&m, &primary_info(set.primary_port())), "{m}");

    // The replica first, so the sentinels have nothing to promote.
    let mut set = set;
    set.kill_replicas();
    let t = Instant::now();
    set.kill_primary();
    let down = eventually(Duration::from_secs(15), || async {
        readyz(&http, &kg).await == Some(503)
    })
    .await;
    assert!(
        down,
        "/readyz stayed {:?} without a primary",
        readyz(&http, &kg).await
    );
    eprintln!(
        "primary and replica killed -> /readyz 503 in {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let set = tokio::task::spawn_blocking(move || {
        set.restart_primary();
        set
    })
    .await
    .unwrap();
    let up = eventually(Duration::from_secs(20), || async {
        readyz(&http, &kg).await == Some(200)
    })
    .await;
    assert!(
        up,
        "/readyz did not come back with the primary: {}",
        kg.logs()
    );
    eprintln!("primary back -> /readyz 200 in {:?}", t.elapsed());
    assert!(kg.running(), "{}", kg.logs());
    kg.stop().await;
    drop(set);
}

/// A graceful failover (`SENTINEL FAILOVER`): the old primary stays up and becomes a
/// replica (answering writes with READONLY). keygate names the new primary within 5 s and
/// moves its writes and its change feed there: a revoke is acknowledged and refused, a new
/// key is written on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_moves_writes_off_the_demoted_primary() {
    let set = tokio::task::spawn_blocking(SentinelSet::start)
        .await
        .unwrap();
    let http = client();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut kg = Keygate::spawn(&config(&set, upstream));
    kg.wait_ready(&http).await;
    let (id, key) = create_ok(&http, &kg).await;
    assert_eq!(get(&http, &kg, &key).await.status, Some(200));
    let old = set.primary_port();

    let t = Instant::now();
    let set = tokio::task::spawn_blocking(move || {
        let mut set = set;
        set.manual_failover();
        set.wait_failover();
        set
    })
    .await
    .unwrap();
    let new = set.primary_port();
    eprintln!(
        "SENTINEL FAILOVER -> {old} replaced by {new} in {:?}",
        t.elapsed()
    );
    assert_ne!(old, new);
    // keygate follows the sentinels at once (+switch-master), not at its next error.
    let moved = eventually(Duration::from_secs(5), || async {
        has_sample(&metrics(&http, &kg).await, &primary_info(new))
    })
    .await;
    assert!(
        moved,
        "primary_info never named {new}: {}",
        metrics(&http, &kg).await
    );
    eprintln!(
        "SENTINEL FAILOVER -> keygate names {new} in {:?}",
        t.elapsed()
    );
    // Until the sentinels' next INFO of the old primary (up to 10 s) it is still a primary
    // with no replica, and the new one has none either: writes are 503
    // replication_unconfirmed meanwhile. Demote it now, as the sentinels are about to.
    let set = tokio::task::spawn_blocking(move || {
        set.make_replica(old);
        set
    })
    .await
    .unwrap();
    assert_eq!(set.replica_ports(), vec![old]);

    let last = std::cell::RefCell::new(String::new());
    let seen = std::cell::RefCell::new(BTreeMap::<String, u64>::new());
    let written = eventually(Duration::from_secs(20), || async {
        let a = revoke(&http, &kg, &id).await;
        *last.borrow_mut() = a.label();
        *seen.borrow_mut().entry(a.label()).or_default() += 1;
        a.status == Some(200)
    })
    .await;
    eprintln!("revokes until acknowledged: {:?}", seen.borrow());
    assert!(
        written,
        "writes did not come back: last {}; logs:\n{}",
        last.borrow(),
        kg.logs()
    );
    eprintln!(
        "SENTINEL FAILOVER -> revoke acknowledged in {:?}",
        t.elapsed()
    );
    let gone = eventually(Duration::from_secs(5), || async {
        refused(&get(&http, &kg, &key).await)
    })
    .await;
    assert!(gone, "the revoked key is still accepted after the failover");
    let (fresh_id, fresh) = create_ok(&http, &kg).await;
    assert_eq!(get(&http, &kg, &fresh).await.status, Some(200));
    let exists: i64 = set.cmd(&["EXISTS", &format!("kgtest:id:{fresh_id}")]);
    assert_eq!(exists, 1, "the new key is not on the new primary");
    let m = metrics(&http, &kg).await;
    assert!(has_sample(&m, &primary_info(new)), "{m}");
    assert!(kg.running(), "{}", kg.logs());
    kg.stop().await;
}
