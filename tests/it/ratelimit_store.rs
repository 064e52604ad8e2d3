//! The rate-limit counter stores (`keygate::limits`): every case runs against
//! `MemoryLimits`, against `RedisLimits` on a private redis-server, and (all cases in one
//! test, one cluster) against `RedisLimits` on a real Redis Cluster. Times are artificial
//! (`now_ms` is an argument), so windows roll over without sleeping.
//!
//! The `Scripts` used here are a small test-only one over a plain connection, so these
//! tests check the counter scripts, not the key stores' connection handling.

use crate::support::Redis;
use crate::support_cluster::Cluster;
use async_trait::async_trait;
use keygate::limits::memory::MemoryLimits;
use keygate::limits::redis::RedisLimits;
use keygate::limits::{key_counters, tag, Ask, Counter, Decision, Kind, LimitStore, Push};
use keygate::store::{Credits, KeyLimits, RateLimit, Refill, Scripts, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A multiple of every period used here (200 ms, 1 s, 10 s, 60 s): window starts.
const BASE: u64 = 1_700_000_040_000;

#[derive(Clone)]
enum Link {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// `Scripts` over one connection, counting its calls.
struct Conn {
    link: Link,
    namespace: String,
    evals: AtomicU64,
}

impl Conn {
    async fn single(url: &str, namespace: &str) -> Arc<Conn> {
        let client = redis::Client::open(url).unwrap();
        let c = client.get_multiplexed_async_connection().await.unwrap();
        Arc::new(Conn {
            link: Link::Single(c),
            namespace: namespace.into(),
            evals: AtomicU64::new(0),
        })
    }

    async fn cluster(seeds: Vec<String>, namespace: &str) -> Arc<Conn> {
        let client = redis::cluster::ClusterClient::new(seeds).unwrap();
        let c = client.get_async_connection().await.unwrap();
        Arc::new(Conn {
            link: Link::Cluster(c),
            namespace: namespace.into(),
            evals: AtomicU64::new(0),
        })
    }

    /// One command, routed by its first key.
    async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let r = match self.link.clone() {
            Link::Single(mut c) => cmd.query_async(&mut c).await,
            Link::Cluster(mut c) => cmd.query_async(&mut c).await,
        };
        r.unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }
}

#[async_trait]
impl Scripts for Conn {
    async fn eval(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<redis::Value, StoreError> {
        self.evals.fetch_add(1, Ordering::Relaxed);
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let r = match self.link.clone() {
            Link::Single(mut c) => inv.invoke_async(&mut c).await,
            Link::Cluster(mut c) => inv.invoke_async(&mut c).await,
        };
        r.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// A store under test, a second handle on the same counters (another replica), and for
/// Redis the connection to look at keys directly.
struct Target {
    store: Arc<dyn LimitStore>,
    other: Arc<dyn LimitStore>,
    conn: Option<Arc<Conn>>,
    namespace: String,
}

impl Target {
    fn memory() -> Target {
        let store: Arc<dyn LimitStore> = Arc::new(MemoryLimits::default());
        Target {
            other: store.clone(),
            store,
            conn: None,
            // The key names `MemoryLimits` uses (they matter only to `exchange`).
            namespace: "mem".into(),
        }
    }

    async fn redis(redis: &Redis) -> Target {
        let conn = Conn::single(&redis.url, "rl").await;
        let other = Conn::single(&redis.url, "rl").await;
        Target {
            store: Arc::new(RedisLimits::new(conn.clone())),
            other: Arc::new(RedisLimits::new(other)),
            conn: Some(conn),
            namespace: "rl".into(),
        }
    }

    async fn cluster(cluster: &Cluster) -> Target {
        let conn = Conn::cluster(cluster.seeds(), "rl").await;
        let other = Conn::cluster(cluster.seeds(), "rl").await;
        Target {
            store: Arc::new(RedisLimits::new(conn.clone())),
            other: Arc::new(RedisLimits::new(other)),
            conn: Some(conn),
            namespace: "rl".into(),
        }
    }

    fn key_of(&self, ask: &Ask, i: usize, now_ms: u64) -> String {
        ask.counters[i].store_key(&self.namespace, &ask.tag, now_ms)
    }
}

fn rate(name: &str, limit: u64, period_ms: u64) -> Counter {
    Counter {
        id: format!("k:budget:{name}:{period_ms}"),
        name: name.into(),
        first_quota: limit,
        quota: limit,
        anchor_ms: 0,
        period_ms,
        cost: 1,
        kind: Kind::RateLimit,
    }
}

fn credits(remaining: u64, refill: Option<Refill>, set_at: u64, cost: u64) -> Counter {
    let limits = KeyLimits {
        credits: Some(Credits {
            remaining,
            set_at,
            refill,
        }),
        ..KeyLimits::default()
    };
    key_counters("budget", &limits, cost).remove(0)
}

fn ask(case: &str, counters: Vec<Counter>) -> Ask {
    Ask {
        tag: tag(case),
        counters,
        key_id: "key-a".into(),
    }
}

fn remaining(o: &keygate::limits::Outcome) -> Vec<u64> {
    o.counters.iter().map(|h| h.remaining).collect()
}

/// Take at `now` and check the decision and every counter's remaining count.
async fn step(t: &Target, a: &Ask, now: u64, decision: Decision, left: &[u64], what: &str) {
    let o = t.store.take(a, now).await.unwrap();
    assert_eq!(
        (o.decision, remaining(&o)),
        (decision, left.to_vec()),
        "{what}"
    );
}

const ADMIT: Decision = Decision::Admit;

fn limited(retry_after_ms: u64) -> Decision {
    Decision::Limited { retry_after_ms }
}

fn no_credits(retry_after_ms: Option<u64>) -> Decision {
    Decision::NoCredits { retry_after_ms }
}

/// Two rate limits and credits: a request is admitted only when all three have room, and
/// a refusal by any of them spends nothing on the others.
async fn all_or_nothing(t: &Target) {
    let limits = |cost| {
        key_counters(
            "key-a",
            &KeyLimits {
                ratelimits: vec![
                    RateLimit {
                        name: "burst".into(),
                        limit: 2,
                        duration_ms: 1000,
                    },
                    RateLimit {
                        name: "slow".into(),
                        limit: 3,
                        duration_ms: 10_000,
                    },
                ],
                credits: Some(Credits {
                    remaining: 7,
                    set_at: BASE - 5,
                    refill: None,
                }),
                budget: None,
            },
            cost,
        )
    };
    let a = ask("all_or_nothing", limits(2));
    let o = t.store.take(&a, BASE).await.unwrap();
    assert_eq!(o.decision, ADMIT);
    // A state's name is its counter's: they come back in the order asked.
    let shape: Vec<_> = (a.counters.iter().zip(&o.counters))
        .map(|(c, h)| {
            (
                &*c.name,
                h.kind,
                h.quota,
                h.remaining,
                h.reset_ms,
                h.period_ms,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("burst", Kind::RateLimit, 2, 1, 1000, 1000),
            ("slow", Kind::RateLimit, 3, 2, 10_000, 10_000),
            ("credits", Kind::Credits, 7, 5, u64::MAX, u64::MAX),
        ]
    );
    step(t, &a, BASE + 1, ADMIT, &[0, 1, 3], "second").await;
    step(t, &a, BASE + 2, limited(998), &[0, 1, 3], "burst full").await;
    step(t, &a, BASE + 1000, ADMIT, &[1, 0, 1], "next burst window").await;
    // `slow` and the credits refuse: Limited (a retry after the window may succeed),
    // nothing spent on `burst`.
    step(t, &a, BASE + 1001, limited(8999), &[1, 0, 1], "slow full").await;
    step(
        t,
        &a,
        BASE + 1002,
        limited(8998),
        &[1, 0, 1],
        "slow still full",
    )
    .await;
    // New windows for both limits; 1 credit left, the request costs 2.
    step(
        t,
        &a,
        BASE + 10_000,
        no_credits(None),
        &[2, 3, 1],
        "credits short",
    )
    .await;
    let cheap = ask("all_or_nothing", limits(1));
    step(t, &cheap, BASE + 10_000, ADMIT, &[1, 2, 0], "cost 1").await;
    step(
        t,
        &cheap,
        BASE + 10_001,
        no_credits(None),
        &[1, 2, 0],
        "no credits",
    )
    .await;
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (4, 5));
    if let Some(conn) = &t.conn {
        // What the store holds: exactly what the admitted requests spent.
        let burst0: String = conn.cmd(&["GET", &t.key_of(&a, 0, BASE)]).await;
        let slow0: String = conn.cmd(&["GET", &t.key_of(&a, 1, BASE)]).await;
        let credits: String = conn.cmd(&["GET", &t.key_of(&a, 2, BASE)]).await;
        assert_eq!((&*burst0, &*slow0, &*credits), ("2", "3", "7"));
        // Credits without refill never expire; windows do.
        let ttl: i64 = conn.cmd(&["PTTL", &t.key_of(&a, 2, BASE)]).await;
        assert_eq!(ttl, -1);
        let ttl: i64 = conn.cmd(&["PTTL", &t.key_of(&a, 1, BASE)]).await;
        assert!(ttl > 0 && ttl <= 20_000, "{ttl}");
    }

    // Two rate limits refusing: retry when the later of their windows ends, not the first's.
    let a = ask(
        "all_or_nothing.both",
        vec![rate("x", 1, 1000), rate("y", 1, 5000)],
    );
    step(t, &a, BASE, ADMIT, &[0, 0], "both").await;
    step(t, &a, BASE + 10, limited(4990), &[0, 0], "both full").await;
    step(t, &a, BASE + 1000, limited(4000), &[1, 0], "y full").await;
}

/// A limit of 50 and 200 concurrent takes from 8 tasks: exactly 50 admitted, each seeing
/// its own remaining count.
async fn concurrent_limit(t: &Target) {
    let a = Arc::new(ask("concurrent_limit", vec![rate("rps", 50, 60_000)]));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, a) = (t.store.clone(), a.clone());
            tokio::spawn(async move {
                let mut admitted = Vec::new();
                let mut refused = 0;
                for _ in 0..25 {
                    let o = store.take(&a, BASE + 7).await.unwrap();
                    match o.decision {
                        Decision::Admit => admitted.push(o.counters[0].remaining),
                        Decision::Limited { retry_after_ms } => {
                            assert_eq!(retry_after_ms, 60_000 - 7);
                            assert_eq!(o.counters[0].remaining, 0);
                            refused += 1;
                        }
                        d => panic!("{d:?}"),
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (a, r) = task.await.unwrap();
        admitted.extend(a);
        refused += r;
    }
    admitted.sort_unstable();
    assert_eq!(admitted, (0..50).collect::<Vec<u64>>());
    assert_eq!(refused, 150);
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (50, 150));
    if let Some(conn) = &t.conn {
        let n: String = conn.cmd(&["GET", &t.key_of(&a, 0, BASE)]).await;
        assert_eq!(n, "50");
    }
}

/// 100 credits and 50 tasks taking until refused: exactly 100 admitted, never overspent.
async fn concurrent_credits(t: &Target) {
    let a = Arc::new(ask(
        "concurrent_credits",
        vec![credits(100, None, BASE - 1000, 1)],
    ));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, a) = (t.store.clone(), a.clone());
            tokio::spawn(async move {
                let mut admitted = Vec::new();
                loop {
                    let o = store.take(&a, BASE).await.unwrap();
                    match o.decision {
                        Decision::Admit => admitted.push(o.counters[0].remaining),
                        Decision::NoCredits {
                            retry_after_ms: None,
                        } => {
                            assert_eq!(o.counters[0].remaining, 0);
                            return admitted;
                        }
                        d => panic!("{d:?}"),
                    }
                }
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        admitted.extend(task.await.unwrap());
    }
    admitted.sort_unstable();
    assert_eq!(admitted, (0..100).collect::<Vec<u64>>());
    let (ok, refused) = t.store.totals(&a.tag, "key-a").await.unwrap();
    assert_eq!((ok, refused), (100, 50));
    let o = t.store.peek(&a, BASE + 1).await.unwrap();
    assert_eq!((o.decision, remaining(&o)), (no_credits(None), vec![0]));
    if let Some(conn) = &t.conn {
        let n: String = conn.cmd(&["GET", &t.key_of(&a, 0, BASE)]).await;
        assert_eq!(n, "100");
    }
}

/// 2 per 200 ms: the count starts again in each window; a window's key expires two
/// windows after it was first written, and that expiry is never pushed back.
async fn windows_roll_over(t: &Target) {
    let a = ask("windows_roll_over", vec![rate("fast", 2, 200)]);
    step(t, &a, BASE, ADMIT, &[1], "first").await;
    if let Some(conn) = &t.conn {
        let key = t.key_of(&a, 0, BASE);
        let ttl: i64 = conn.cmd(&["PTTL", &key]).await;
        assert!(ttl > 0 && ttl <= 400, "{ttl}");
        // An expiry already set is kept (a busy window is not extended forever)...
        let _: i64 = conn.cmd(&["PEXPIRE", &key, "100000"]).await;
    }
    step(t, &a, BASE + 50, ADMIT, &[0], "second").await;
    if let Some(conn) = &t.conn {
        let ttl: i64 = conn.cmd(&["PTTL", &t.key_of(&a, 0, BASE)]).await;
        assert!(ttl > 90_000, "the expiry was reset: {ttl}");
    }
    step(t, &a, BASE + 51, limited(149), &[0], "full").await;
    step(t, &a, BASE + 199, limited(1), &[0], "still full").await;
    let o = t.store.take(&a, BASE + 200).await.unwrap();
    assert_eq!((o.decision, o.counters[0].remaining), (ADMIT, 1));
    assert_eq!((o.counters[0].quota, o.counters[0].reset_ms), (2, 200));
    if let Some(conn) = &t.conn {
        // ...and one missing is set.
        let key = t.key_of(&a, 0, BASE + 200);
        let _: i64 = conn.cmd(&["PERSIST", &key]).await;
        step(t, &a, BASE + 201, ADMIT, &[0], "window 1, second").await;
        let ttl: i64 = conn.cmd(&["PTTL", &key]).await;
        assert!(ttl > 0 && ttl <= 400, "{ttl}");
    } else {
        step(t, &a, BASE + 201, ADMIT, &[0], "window 1, second").await;
    }
    step(t, &a, BASE + 399, limited(1), &[0], "window 1 full").await;
    step(t, &a, BASE + 400, ADMIT, &[1], "window 2").await;
    step(t, &a, BASE + 10_150, ADMIT, &[1], "much later").await;
    step(t, &a, BASE + 10_160, ADMIT, &[0], "much later, second").await;
    step(t, &a, BASE + 10_170, limited(30), &[0], "much later, full").await;
}

/// Credits with a refill: `remaining` (3) in the first period from `set_at`, `amount` (5)
/// in every later one; refused until the next refill.
async fn credits_refill(t: &Target) {
    let set_at = BASE + 50;
    let refill = Refill {
        amount: 5,
        interval_ms: 200,
    };
    let a = ask("credits_refill", vec![credits(3, Some(refill), set_at, 1)]);
    for left in [2, 1, 0] {
        let o = t.store.take(&a, set_at).await.unwrap();
        assert_eq!(o.decision, ADMIT);
        let h = &o.counters[0];
        assert_eq!(
            (h.quota, h.remaining, h.reset_ms, h.period_ms),
            (3, left, 200, 200)
        );
    }
    step(t, &a, set_at, no_credits(Some(200)), &[0], "spent").await;
    step(t, &a, set_at + 50, no_credits(Some(150)), &[0], "spent").await;
    step(t, &a, set_at + 199, no_credits(Some(1)), &[0], "spent").await;
    for left in [4, 3, 2, 1, 0] {
        let o = t.store.take(&a, set_at + 210).await.unwrap();
        assert_eq!(o.decision, ADMIT);
        assert_eq!((o.counters[0].quota, o.counters[0].remaining), (5, left));
        assert_eq!(o.counters[0].reset_ms, 190);
    }
    step(
        t,
        &a,
        set_at + 300,
        no_credits(Some(100)),
        &[0],
        "spent again",
    )
    .await;
    step(t, &a, set_at + 400, ADMIT, &[4], "second refill").await;
    if let Some(conn) = &t.conn {
        let ttl: i64 = conn.cmd(&["PTTL", &t.key_of(&a, 0, set_at)]).await;
        assert!(ttl > 0 && ttl <= 400, "{ttl}");
    }
}

/// `retire` gives an endless count (credits without a refill) an expiry and leaves a
/// window's own expiry alone; a count that was never written stays absent.
async fn retire_expires_endless_counts(t: &Target) {
    let a = ask(
        "retire_expires_endless_counts",
        vec![rate("rph", 5, 3_600_000), credits(10, None, BASE - 1, 2)],
    );
    step(t, &a, BASE, ADMIT, &[4, 8], "take").await;
    t.store.retire(&a, BASE, 60_000).await.unwrap();
    let unused = ask(
        "retire_expires_endless_counts",
        vec![credits(3, None, BASE, 1)],
    );
    t.store.retire(&unused, BASE, 60_000).await.unwrap();
    if let Some(conn) = &t.conn {
        let (k0, k1) = (t.key_of(&a, 0, BASE), t.key_of(&a, 1, BASE));
        let window: i64 = conn.cmd(&["PTTL", &k0]).await;
        let credits: i64 = conn.cmd(&["PTTL", &k1]).await;
        assert!(window > 60_000 && window <= 7_200_000, "{window}");
        assert!(credits > 0 && credits <= 60_000, "{credits}");
        let never: i64 = conn.cmd(&["PTTL", &t.key_of(&unused, 0, BASE)]).await;
        assert_eq!(never, -2, "not created");
    }
    // Retiring changes no count.
    let o = t.store.peek(&a, BASE).await.unwrap();
    assert_eq!((o.decision, remaining(&o)), (ADMIT, vec![4, 8]));
}

/// `peek` tells what `take` would, and changes nothing: no count, no total.
async fn peek_changes_nothing(t: &Target) {
    let a = ask(
        "peek_changes_nothing",
        vec![rate("rps", 3, 1000), credits(10, None, BASE - 1, 2)],
    );
    let o = t.store.peek(&a, BASE).await.unwrap();
    assert_eq!((o.decision, remaining(&o)), (ADMIT, vec![3, 10]));
    assert_eq!(o.counters[0].reset_ms, 1000);
    step(t, &a, BASE, ADMIT, &[2, 8], "take").await;
    for _ in 0..3 {
        let o = t.store.peek(&a, BASE + 1).await.unwrap();
        assert_eq!((o.decision, remaining(&o)), (ADMIT, vec![2, 8]));
        let o = t.other.peek(&a, BASE + 1).await.unwrap();
        assert_eq!((o.decision, remaining(&o)), (ADMIT, vec![2, 8]));
    }
    step(t, &a, BASE + 2, ADMIT, &[1, 6], "take").await;
    step(t, &a, BASE + 3, ADMIT, &[0, 4], "take").await;
    for _ in 0..3 {
        let o = t.store.peek(&a, BASE + 4).await.unwrap();
        assert_eq!((o.decision, remaining(&o)), (limited(996), vec![0, 4]));
    }
    step(t, &a, BASE + 4, limited(996), &[0, 4], "take refused").await;
    let o = t.store.peek(&a, BASE + 1000).await.unwrap();
    assert_eq!((o.decision, remaining(&o)), (ADMIT, vec![3, 4]));
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (3, 1));
    // No counters: admitted, and not a single script run.
    let evals = t.conn.as_ref().map(|c| c.evals.load(Ordering::Relaxed));
    let empty = ask("peek_changes_nothing", vec![]);
    for o in [
        t.store.peek(&empty, BASE).await.unwrap(),
        t.store.take(&empty, BASE).await.unwrap(),
    ] {
        assert_eq!(o.decision, ADMIT);
        assert!(o.counters.is_empty());
    }
    assert_eq!(
        t.conn.as_ref().map(|c| c.evals.load(Ordering::Relaxed)),
        evals
    );
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (3, 1));
}

/// `exchange` adds deltas from two replicas and returns the totals in input order, keys
/// of several tags mixed; the counts are the ones `take` and `peek` use.
async fn exchange_sums_replicas(t: &Target) {
    let ns = &t.namespace;
    let (ta, tb) = (tag("exchange.a"), tag("exchange.b"));
    let a1 = format!("{ns}:{{{ta}}}:x:1");
    let a2 = format!("{ns}:{{{ta}}}:x:2");
    let b1 = format!("{ns}:{{{tb}}}:x:1");
    let untagged = format!("{ns}:exchange:untagged");
    let push = |key: &str, delta, ttl_ms| Push {
        key: key.to_string(),
        delta,
        ttl_ms,
    };
    assert_eq!(t.store.exchange(&[]).await.unwrap(), Vec::<u64>::new());
    let got = t
        .store
        .exchange(&[
            push(&a1, 3, 10_000),
            push(&b1, 1, 0),
            push(&a2, 2, 0),
            push(&untagged, 5, 0),
        ])
        .await
        .unwrap();
    assert_eq!(got, vec![3, 1, 2, 5]);
    let got = t
        .other
        .exchange(&[
            push(&b1, 4, 0),
            push(&a1, 4, 10_000),
            push(&a1, 0, 10_000),
            push(&untagged, 0, 0),
        ])
        .await
        .unwrap();
    assert_eq!(got, vec![5, 7, 7, 5]);
    let got = t
        .store
        .exchange(&[push(&a2, 1, 0), push(&a2, 1, 0), push(&a1, 0, 0)])
        .await
        .unwrap();
    assert_eq!(got, vec![3, 4, 7]);
    if let Some(conn) = &t.conn {
        let ttl: i64 = conn.cmd(&["PTTL", &a1]).await;
        assert!(ttl > 0 && ttl <= 10_000, "{ttl}");
        let ttl: i64 = conn.cmd(&["PTTL", &b1]).await;
        assert_eq!(ttl, -1);
    }
    // A delta of 0 reads without creating anything.
    let zero = format!("{ns}:{{{ta}}}:x:0");
    assert_eq!(t.store.exchange(&[push(&zero, 0, 0)]).await.unwrap(), [0]);
    if let Some(conn) = &t.conn {
        let exists: i64 = conn.cmd(&["EXISTS", &zero]).await;
        assert_eq!(exists, 0);
    }

    // Many tags in one exchange (more than run at a time), order kept.
    let pushes: Vec<Push> = (0..40u64)
        .map(|i| push(&format!("{ns}:{{{}}}:x:1", tag(&format!("many.{i}"))), i, 0))
        .collect();
    let expect: Vec<u64> = (0..40).collect();
    assert_eq!(t.store.exchange(&pushes).await.unwrap(), expect);
    let doubled: Vec<u64> = (0..40).map(|i| 2 * i).collect();
    assert_eq!(t.other.exchange(&pushes).await.unwrap(), doubled);

    // Counts pushed to a counter's key are what `peek` and `take` see.
    let a = ask("exchange.a", vec![rate("rps", 10, 60_000)]);
    let key = t.key_of(&a, 0, BASE);
    assert_eq!(
        t.other.exchange(&[push(&key, 4, 120_000)]).await.unwrap(),
        [4]
    );
    let o = t.store.peek(&a, BASE).await.unwrap();
    assert_eq!(remaining(&o), vec![6]);
    step(t, &a, BASE, ADMIT, &[5], "after the exchange").await;
    assert_eq!(
        t.other.exchange(&[push(&key, 0, 120_000)]).await.unwrap(),
        [5]
    );
}

/// The admitted and refused totals: counted by `take`, added to by `add_totals`, seen by
/// every replica.
async fn totals_count(t: &Target) {
    let a = ask("totals_count", vec![rate("rpm", 1, 60_000)]);
    let tb = tag("totals_count.b");
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (0, 0));
    step(t, &a, BASE, ADMIT, &[0], "admitted").await;
    step(t, &a, BASE + 1, limited(59_999), &[0], "refused").await;
    step(t, &a, BASE + 2, limited(59_998), &[0], "refused").await;
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (1, 2));
    assert_eq!(t.other.totals(&a.tag, "key-a").await.unwrap(), (1, 2));
    assert_eq!(t.store.totals(&a.tag, "key-b").await.unwrap(), (0, 0));
    t.other.add_totals(&[]).await.unwrap();
    t.other
        .add_totals(&[
            (a.tag.clone(), "key-a".into(), 10, 5),
            (tb.clone(), "key-x".into(), 1, 0),
            (a.tag.clone(), "key-a".into(), 0, 0),
            (a.tag.clone(), "key-b".into(), 0, 3),
        ])
        .await
        .unwrap();
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (11, 7));
    assert_eq!(t.store.totals(&tb, "key-x").await.unwrap(), (1, 0));
    assert_eq!(t.store.totals(&a.tag, "key-b").await.unwrap(), (0, 3));
    step(t, &a, BASE + 60_000, ADMIT, &[0], "next window").await;
    assert_eq!(t.other.totals(&a.tag, "key-a").await.unwrap(), (12, 7));
}

/// A key holding something else than a count is an error (never a panic), and nothing of
/// the request is written.
async fn garbage_is_an_error(t: &Target) {
    let Some(conn) = &t.conn else {
        return; // the memory store holds only numbers
    };
    let a = ask(
        "garbage_is_an_error",
        vec![rate("one", 5, 60_000), rate("two", 5, 60_000)],
    );
    step(t, &a, BASE, ADMIT, &[4, 4], "before").await;
    let (one, two) = (t.key_of(&a, 0, BASE), t.key_of(&a, 1, BASE));
    let corrupt = |r: Result<_, StoreError>, key: &str, what: &str| match r {
        Err(StoreError::Corrupt { key: k, .. }) => assert_eq!(k, key, "{what}"),
        other => panic!("{what}: {other:?}"),
    };
    for garbage in ["abc", "1.5", "-3", "", "12abc", "99999999999999999999"] {
        let _: () = conn.cmd(&["SET", &one, garbage]).await;
        corrupt(t.store.take(&a, BASE + 1).await.map(|_| ()), &one, garbage);
        corrupt(t.store.peek(&a, BASE + 1).await.map(|_| ()), &one, garbage);
        let pushes = [
            Push {
                key: two.clone(),
                delta: 1,
                ttl_ms: 0,
            },
            Push {
                key: one.clone(),
                delta: 1,
                ttl_ms: 0,
            },
        ];
        corrupt(t.store.exchange(&pushes).await.map(|_| ()), &one, garbage);
        let left: String = conn.cmd(&["GET", &two]).await;
        assert_eq!(left, "1", "spent on the other counter with {garbage:?}");
        let value: String = conn.cmd(&["GET", &one]).await;
        assert_eq!(value, garbage);
    }
    assert_eq!(t.store.totals(&a.tag, "key-a").await.unwrap(), (1, 0));
    // Another type: the script fails, still an error.
    let _: i64 = conn.cmd(&["DEL", &one]).await;
    let _: i64 = conn.cmd(&["RPUSH", &one, "x"]).await;
    assert!(t.store.take(&a, BASE + 1).await.is_err());
    assert!(t.store.peek(&a, BASE + 1).await.is_err());
    let _: i64 = conn.cmd(&["DEL", &one]).await;
    step(t, &a, BASE + 2, ADMIT, &[4, 3], "repaired").await;

    // A garbage total: the totals read fails, and a take spends nothing.
    let admitted = format!("{}:{{{}}}:u:key-a:admitted", t.namespace, a.tag);
    let _: () = conn.cmd(&["SET", &admitted, "x"]).await;
    corrupt(
        t.store.totals(&a.tag, "key-a").await.map(|_| ()),
        &admitted,
        "totals",
    );
    corrupt(
        t.store.take(&a, BASE + 3).await.map(|_| ()),
        &admitted,
        "take",
    );
    let left: String = conn.cmd(&["GET", &two]).await;
    assert_eq!(left, "2");
    assert!(t
        .store
        .add_totals(&[(a.tag.clone(), "key-a".into(), 1, 1)])
        .await
        .is_err());
    let refused: Option<String> = conn
        .cmd(&[
            "GET",
            &format!("{}:{{{}}}:u:key-a:refused", t.namespace, a.tag),
        ])
        .await;
    assert_eq!(refused, None);
}

/// `replicas` counts the replicas that called it lately, each once; a memory store is one
/// process's own and says so.
async fn replicas_are_counted(t: &Target) {
    if t.conn.is_none() {
        assert_eq!(t.store.replicas("a", 10_000).await.unwrap(), None);
        return;
    }
    let (a, b) = (&t.store, &t.other);
    assert_eq!(a.replicas("a", 10_000).await.unwrap(), Some(1));
    assert_eq!(b.replicas("b", 10_000).await.unwrap(), Some(2));
    assert_eq!(
        a.replicas("a", 10_000).await.unwrap(),
        Some(2),
        "a counted twice"
    );
    // A replica that stopped calling is no longer counted once `within_ms` passed.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        b.replicas("b", 200).await.unwrap(),
        Some(1),
        "a still counted"
    );
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Target::memory()).await;
                }
            )*
        }

        mod redis_server {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let redis = crate::support::Redis::start();
                    super::$case(&super::Target::redis(&redis).await).await;
                }
            )*
        }

        /// Every case, one after another on one cluster (each case has tags of its own).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_case_on_a_redis_cluster() {
            let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
            let t = Target::cluster(&cluster).await;
            $(
                println!("cluster: {}", stringify!($case));
                $case(&t).await;
            )*
            // Each tag's keys are on one primary (the scripts ran at all: one slot each).
            let keys = cluster.all_keys();
            assert!(keys.iter().all(|k| k.starts_with("rl:")), "{keys:?}");
        }
    };
}

cases!(
    all_or_nothing,
    concurrent_limit,
    concurrent_credits,
    windows_roll_over,
    credits_refill,
    peek_changes_nothing,
    exchange_sums_replicas,
    totals_count,
    garbage_is_an_error,
    replicas_are_counted,
    retire_expires_endless_counts,
);
