//! keygate's key store and change feed on a real Redis Cluster (6 nodes, see
//! `support_cluster.rs`): the store contract, interrupted creates (skipped, repaired),
//! a primary killed during writes, slots moved during reads, and the sharded feed.

use crate::support_cluster::Cluster;
use keygate::store::cluster::{ClusterSettings, ClusterStore};
use keygate::store::KeyStore;
use std::time::Duration;

fn settings(cluster: &Cluster, namespace: &str, acks: u32) -> ClusterSettings {
    ClusterSettings {
        nodes: cluster.seeds(),
        namespace: namespace.into(),
        timeout: Duration::from_secs(1),
        min_replicas_ack: acks,
        ack_timeout: Duration::from_millis(500),
        ca_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_keeps_the_contract() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = ClusterStore::connect(&settings(&cluster, "contract", 1)).unwrap();
    assert_eq!(store.kind(), "redis-cluster");
    store.ping().await.unwrap();
    crate::contract::run_all(&store).await;
    let keys = cluster.all_keys();
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with("contract:")),
        "keys outside the namespace: {keys:?}"
    );
    // Records spread over the shards: more than one primary holds some.
    let holding = cluster
        .primaries()
        .into_iter()
        .filter(|&i| {
            !cluster.nodes[i]
                .cmd::<Vec<String>>(&["KEYS", "contract:*:k:*"])
                .is_empty()
        })
        .count();
    assert!(holding > 1, "records on {holding} primary");
}

#[test]
fn slot_matches_redis() {
    // Checked against `CLUSTER KEYSLOT` on a cluster node once; stable by definition.
    assert_eq!(crate::support_cluster::slot("foo"), 12182);
    assert_eq!(crate::support_cluster::slot("{user1000}.following"), 3443);
    assert_eq!(crate::support_cluster::slot("bar"), 5061);
}

/// Run `args` through a cluster-routed connection.
fn direct<T: redis::FromRedisValue>(
    conn: &mut redis::cluster::ClusterConnection,
    args: &[&str],
) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(conn).expect("redis command")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_creates_are_skipped_and_old_ones_repaired() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = ClusterStore::connect(&settings(&cluster, "crash", 0)).unwrap();
    let now = keygate::time::now_ms();
    // A real key, created in between the two leftovers (list order is by creation).
    let real = crate::contract::record("t", now - 60_000);
    store.insert(&real).await.unwrap();
    // What a crash between insert's steps leaves: the tenant entry, no record.
    let mut conn = cluster.client();
    // The entry's last field is when it was written (the repair rule's clock).
    let mut leftover = |created: u64, written: u64| {
        let r = crate::contract::record("t", created);
        let entry = format!(
            "{} {} {written}",
            keygate::key::hex(&r.digest),
            r.created_at
        );
        let member = format!("{:016x}:{}", r.created_at, r.id);
        let _: i64 = direct(&mut conn, &["HSET", "crash:{crash.t.t}:ids", &r.id, &entry]);
        let _: i64 = direct(&mut conn, &["ZADD", "crash:{crash.t.t}:list", "0", &member]);
        (r, member)
    };
    let (old, old_member) = leftover(now - 120_000, now - 120_000);
    let (young, young_member) = leftover(now, now);
    // A migrated key is old but just written: its create may be in flight, so it stays.
    let (imported, _) = leftover(now - 130_000, now);

    // Newest first: young, real, old. A page of one that holds only the young leftover
    // still leads on to the next.
    let first = store
        .list(
            "t",
            &keygate::store::PageRequest {
                limit: 1,
                cursor: None,
            },
        )
        .await
        .unwrap();
    assert!(first.items.is_empty());
    let second = store
        .list(
            "t",
            &keygate::store::PageRequest {
                limit: 1,
                cursor: first.next_cursor,
            },
        )
        .await
        .unwrap();
    assert_eq!(second.items, vec![real.clone()]);
    let all = store
        .list(
            "t",
            &keygate::store::PageRequest {
                limit: 10,
                cursor: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(all.items, vec![real.clone()]);
    assert_eq!(store.by_id("t", &old.id).await.unwrap(), None);
    assert_eq!(store.by_id("t", &young.id).await.unwrap(), None);
    assert_eq!(
        store.by_id("t", &real.id).await.unwrap(),
        Some(real.clone())
    );

    // The old leftover is gone from both; the young one stays (its create may be running).
    let mut conn = cluster.client();
    let ids: Option<String> = direct(&mut conn, &["HGET", "crash:{crash.t.t}:ids", &old.id]);
    assert_eq!(ids, None, "old leftover still in the id map");
    let score: Option<f64> = direct(
        &mut conn,
        &["ZSCORE", "crash:{crash.t.t}:list", &old_member],
    );
    assert_eq!(score, None, "old leftover still listed");
    let ids: Option<String> = direct(&mut conn, &["HGET", "crash:{crash.t.t}:ids", &young.id]);
    assert!(ids.is_some(), "a young entry was removed");
    assert_eq!(store.by_id("t", &imported.id).await.unwrap(), None);
    let ids: Option<String> = direct(&mut conn, &["HGET", "crash:{crash.t.t}:ids", &imported.id]);
    assert!(
        ids.is_some(),
        "an entry written just now (an old key being migrated) was removed"
    );
    let score: Option<f64> = direct(
        &mut conn,
        &["ZSCORE", "crash:{crash.t.t}:list", &young_member],
    );
    assert!(score.is_some(), "a young entry was unlisted");
    // The young entry's create completes after all: it is listed and authenticates.
    store.insert(&young).await.unwrap();
    assert_eq!(
        store.by_id("t", &young.id).await.unwrap(),
        Some(young.clone())
    );
    assert_eq!(store.by_digest(&young.digest).await.unwrap(), Some(young));
    // So does the migrated key's.
    store.insert(&imported).await.unwrap();
    assert_eq!(
        store.by_id("t", &imported.id).await.unwrap(),
        Some(imported)
    );
    // And the entries that remain are exactly the three keys.
    let n: i64 = direct(&mut conn, &["HLEN", "crash:{crash.t.t}:ids"]);
    assert_eq!(n, 3);
}

/// Every key of a tenant, through the store's paging (retried for a while: just after a
/// failover a connection may still lead to the old node).
async fn listed_ids(store: &ClusterStore, tenant: &str) -> std::collections::HashSet<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match try_listed_ids(store, tenant).await {
            Ok(ids) => return ids,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("listing failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("listing still fails: {e}"),
        }
    }
}

async fn try_listed_ids(
    store: &ClusterStore,
    tenant: &str,
) -> Result<std::collections::HashSet<String>, keygate::store::StoreError> {
    let mut ids = std::collections::HashSet::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(tenant, &keygate::store::PageRequest { limit: 100, cursor })
            .await?;
        ids.extend(page.items.into_iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(ids),
        }
    }
}

/// What one write in a burst answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Written on a primary, not confirmed by a replica in time.
    Unconfirmed,
    /// No primary took it (refused, cluster down, timeout).
    Failed,
}

fn outcome<T>(r: &Result<T, keygate::store::StoreError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(keygate::store::StoreError::Unconfirmed { .. }) => Outcome::Unconfirmed,
        Err(_) => Outcome::Failed,
    }
}

/// The hash slot of bucket `b`'s keys under namespace `ns`.
fn bucket_slot(ns: &str, b: usize) -> u16 {
    let c = char::from_digit(b as u32, 16).unwrap();
    crate::support_cluster::slot(&format!("{ns}:{{{ns}.{c}}}:seq"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_primary_failover() {
    use keygate::store::cluster::bucket_of;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let mut cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = Arc::new(ClusterStore::connect(&settings(&cluster, "fo", 1)).unwrap());
    // The victim: the primary of bucket 0. The tenant's slot is elsewhere, so that a
    // write's trouble comes from its bucket's shard.
    let victim = cluster.primary_for_slot(bucket_slot("fo", 0));
    let tenant = (0..)
        .map(|i| format!("t{i}"))
        .find(|t| {
            cluster.primary_for_slot(crate::support_cluster::slot(&format!("{{fo.t.{t}}}")))
                != victim
        })
        .unwrap();
    let victim_buckets: Vec<usize> = (0..16)
        .filter(|&b| cluster.primary_for_slot(bucket_slot("fo", b)) == victim)
        .collect();
    // Keys to revoke during the burst.
    let mut to_revoke = Vec::new();
    for _ in 0..60 {
        let r = crate::contract::record(&tenant, keygate::time::now_ms());
        store.insert(&r).await.unwrap();
        to_revoke.push(r);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let burst = {
        let (store, stop, tenant) = (store.clone(), stop.clone(), tenant.clone());
        tokio::spawn(async move {
            // (time since start, bucket, outcome) per write; the records whose insert
            // returned Ok; the keys whose revoke returned Ok.
            let mut log = Vec::new();
            let (mut inserted, mut revoked) = (Vec::new(), Vec::new());
            let mut pending = std::collections::VecDeque::from(to_revoke);
            while !stop.load(Ordering::Relaxed) {
                let r = crate::contract::record(&tenant, keygate::time::now_ms());
                let res = store.insert(&r).await;
                log.push((started.elapsed(), bucket_of(&r.digest), outcome(&res)));
                if res.is_ok() {
                    inserted.push(r);
                }
                let Some(old) = pending.pop_front() else {
                    continue;
                };
                let res = store
                    .revoke(&tenant, &old.id, keygate::time::now_ms())
                    .await;
                log.push((started.elapsed(), bucket_of(&old.digest), outcome(&res)));
                match res {
                    Ok(Some(_)) => revoked.push(old),
                    Ok(None) => panic!("a key of the tenant was not found"),
                    Err(_) => pending.push_back(old),
                }
            }
            (log, inserted, revoked)
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The replica falls behind first: what the primary takes from now on, it alone has.
    // Those writes must not be acknowledged (WAIT), since the kill loses them.
    let replica = cluster.cut_replication(victim);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let killed_at = started.elapsed();
    let (cluster, promoted, rejoined) = tokio::task::spawn_blocking(move || {
        cluster.kill(victim);
        cluster.resume(replica);
        let promoted = cluster.kill_primary(victim);
        // Its replica is a primary now, without a replica of its own: writes there cannot
        // be confirmed until the old node is back, as its replica.
        let t = Instant::now();
        cluster.restart(victim);
        (cluster, promoted, promoted + t.elapsed())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let (log, inserted, revoked) = burst.await.unwrap();

    let after_kill = |o: Outcome| {
        log.iter()
            .filter(|(t, b, _)| *t > killed_at && victim_buckets.contains(b))
            .skip_while(|(_, _, got)| *got == Outcome::Ok)
            .find(|(_, _, got)| *got == o || o == Outcome::Unconfirmed && *got == Outcome::Ok)
            .map(|(t, _, _)| *t - killed_at)
    };
    let count = |o: Outcome| log.iter().filter(|(_, _, got)| *got == o).count();
    let last_failure = log
        .iter()
        .filter(|(_, b, got)| victim_buckets.contains(b) && *got != Outcome::Ok)
        .map(|(t, _, _)| *t)
        .max();
    let confirmed_again = last_failure.and_then(|lf| {
        log.iter()
            .find(|(t, b, got)| *t > lf && victim_buckets.contains(b) && *got == Outcome::Ok)
            .map(|(t, _, _)| *t - killed_at)
    });
    println!(
        "failover: {} writes: {} ok, {} unconfirmed, {} failed; the killed shard serves buckets \
         {victim_buckets:?}; replica promoted {promoted:?} and old primary back as its replica \
         {rejoined:?} after the kill; writes there reached a primary again {:?} and were \
         confirmed again {confirmed_again:?} after the kill",
        log.len(),
        count(Outcome::Ok),
        count(Outcome::Unconfirmed),
        count(Outcome::Failed),
        after_kill(Outcome::Unconfirmed),
    );
    assert!(count(Outcome::Failed) > 0, "the kill disturbed no write");
    assert!(
        confirmed_again.is_some(),
        "writes on the killed shard never succeeded again"
    );

    // Every acknowledged write survived the failover.
    let listed = listed_ids(&store, &tenant).await;
    for r in &inserted {
        let read = store.by_digest(&r.digest).await.unwrap();
        assert_eq!(read.as_ref(), Some(r), "an acknowledged insert was lost");
        assert!(
            listed.contains(&r.id),
            "an acknowledged insert is not listed"
        );
    }
    for r in &revoked {
        let read = store.by_digest(&r.digest).await.unwrap().unwrap();
        assert!(read.revoked_at.is_some(), "an acknowledged revoke was lost");
    }
    let on_victim = |r: &&keygate::store::KeyRecord| victim_buckets.contains(&bucket_of(&r.digest));
    assert!(
        inserted.iter().filter(on_victim).count() > 3
            && revoked.iter().filter(on_victim).count() > 3,
        "too few writes on the killed shard to tell"
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_reshard() {
    use keygate::store::cluster::bucket_of;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let cluster = Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    // `redis-cli --cluster reshard` moves a primary's lowest slots: pick a namespace with a
    // bucket slot close to the start of its primary's slots, so moving a few slots moves it.
    let view = cluster.view();
    let lowest_of_owner = |slot: u16| {
        view.iter()
            .filter(|v| v.master && v.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|v| (v.port, v.slots.iter().map(|&(a, _)| a).min().unwrap()))
            .next()
            .unwrap()
    };
    let (ns, bucket, moved) = (0..)
        .map(|i| format!("rs{i}"))
        .find_map(|ns| {
            (0..16).find_map(|b| {
                let slot = bucket_slot(&ns, b);
                let (_, lowest) = lowest_of_owner(slot);
                (slot - lowest < 40).then(|| (ns.clone(), b, u32::from(slot - lowest) + 3))
            })
        })
        .unwrap();
    let slot = bucket_slot(&ns, bucket);
    let from = cluster.primary_for_slot(slot);
    let to = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != from)
        .unwrap();

    let store = Arc::new(ClusterStore::connect(&settings(&cluster, &ns, 0)).unwrap());
    // Good keys: 150 in the bucket that moves, 40 elsewhere.
    let (mut moving, mut others) = (Vec::new(), Vec::new());
    while moving.len() < 150 || others.len() < 40 {
        let r = crate::contract::record("t", keygate::time::now_ms());
        let (list, want) = if bucket_of(&r.digest) == bucket {
            (&mut moving, 150)
        } else {
            (&mut others, 40)
        };
        if list.len() < want {
            store.insert(&r).await.unwrap();
            list.push(r);
        }
    }
    let keys: Arc<Vec<_>> = Arc::new(moving.iter().chain(&others).map(|r| r.digest).collect());
    let n_moving = moving.len();

    let done = Arc::new(AtomicBool::new(false));
    let (reads, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..3)
        .map(|task| {
            let (store, keys, done) = (store.clone(), keys.clone(), done.clone());
            let (reads, errors) = (reads.clone(), errors.clone());
            tokio::spawn(async move {
                let mut i = task;
                while !done.load(Ordering::Relaxed) {
                    // Every other read is of a key in the moving bucket.
                    let d = if i % 2 == 0 {
                        keys[i % n_moving]
                    } else {
                        keys[i % keys.len()]
                    };
                    i += 1;
                    reads.fetch_add(1, Ordering::Relaxed);
                    match store.by_digest(&d).await {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("a good key read as unknown during the reshard"),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("read error during the reshard: {e}");
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let c = cluster.clone();
    let before = reads.load(Ordering::Relaxed);
    tokio::task::spawn_blocking(move || c.reshard(from, to, moved))
        .await
        .unwrap();
    let took = started.elapsed();
    // And back and forth by hand, a key at a time: the slot half-moved for a while.
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || {
        c.move_slot(slot, to, from, Duration::from_millis(3));
        c.move_slot(slot, from, to, Duration::from_millis(3));
    })
    .await
    .unwrap();
    let took_by_hand = started.elapsed() - took;
    let during = reads.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(
        cluster.primary_for_slot(slot),
        to,
        "the bucket's slot did not move"
    );
    let (reads, errors) = (
        reads.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    println!("reshard: {moved} slots (bucket {bucket}'s slot {slot} among them) in {took:?}, then slot {slot} back and forth a key at a time in {took_by_hand:?}; {reads} reads ({during} while it ran), {errors} errors");
    assert!(during > 50, "too few reads during the reshard: {during}");
    assert!(errors * 20 < reads, "{errors} of {reads} reads failed");
    // Writes to the moved bucket work on its new primary.
    let r = &moving[0];
    let revoked = store.revoke("t", &r.id, 5).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(5));
    assert_eq!(
        store
            .by_digest(&r.digest)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_follows_revocations_across_the_cluster() {
    use crate::support::eventually;
    use keygate::cache::{Entry, KeyCache, Source, Ttls};
    use keygate::metrics::Metrics;
    use keygate::store::cluster::bucket_of;
    use std::sync::Arc;

    let cluster = Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    let reader = Arc::new(ClusterStore::connect(&settings(&cluster, "feed", 0)).unwrap());
    let writer = ClusterStore::connect(&settings(&cluster, "feed", 0)).unwrap();
    let cache = Arc::new(KeyCache::new(1000));
    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(keygate::feed::cluster::follow(
        reader.feed_settings(),
        cache.clone(),
        metrics.clone(),
        stopped,
    ));
    let up = || metrics.feed.up.get() == 1;
    assert!(
        eventually(Duration::from_secs(10), || async { up() }).await,
        "the feed never came up"
    );

    let ttls = Ttls::new(Duration::from_secs(300), Duration::from_secs(2));
    let store: keygate::cache::Reader = reader.clone();
    let lookup = |d: keygate::key::Digest| {
        let (cache, store) = (cache.clone(), store.clone());
        async move {
            let (entry, source) = cache.lookup(&d, ttls, &store).await.unwrap();
            let revoked = match entry {
                Entry::Known(id) => id.revoked_at().is_some(),
                Entry::Unknown => panic!("a good key is unknown"),
            };
            (revoked, source)
        }
    };
    let revoked_seen = |d: keygate::key::Digest| async move {
        eventually(Duration::from_secs(5), || async { lookup(d).await.0 }).await
    };
    let cached = |d: keygate::key::Digest| async move {
        eventually(Duration::from_secs(5), || async {
            lookup(d).await == (false, Source::Cache)
        })
        .await
    };
    let received = |event: &str| metrics.feed.received.with_label_values(&[event]).get();

    // A key cached here, revoked through another store: evicted by the message.
    let k = crate::contract::record("t", keygate::time::now_ms());
    writer.insert(&k).await.unwrap();
    // (The create's own message evicts it once more, whenever it arrives.)
    assert!(cached(k.digest).await, "never served from the cache");
    let before = received("revoke");
    writer
        .revoke("t", &k.id, keygate::time::now_ms())
        .await
        .unwrap();
    assert!(
        revoked_seen(k.digest).await,
        "the revocation never reached the cache"
    );
    assert!(received("revoke") > before, "evicted without a message");

    // The slot of a key's bucket moves to another primary: the node drops the shard
    // subscription; the feed subscribes again where the slot is now, and messages come.
    let k2 = crate::contract::record("t", keygate::time::now_ms());
    writer.insert(&k2).await.unwrap();
    let slot = bucket_slot("feed", bucket_of(&k2.digest));
    let from = cluster.primary_for_slot(slot);
    let to = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != from)
        .unwrap();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.move_slot(slot, from, to, Duration::ZERO))
        .await
        .unwrap();
    let flushes = || metrics.feed.flushes.with_label_values(&["subscribe"]).get();
    let flushed = flushes();
    // The feed noticed (down, subscribed again, flushed) and is up.
    let resubscribed = eventually(Duration::from_secs(5), || async { flushes() > 1 && up() }).await;
    println!(
        "feed: after the slot move, subscribe flushes {flushed} -> {}, up {}",
        flushes(),
        up()
    );
    assert!(
        resubscribed,
        "the feed did not resubscribe after the slot moved"
    );
    let seen = reader
        .stats()
        .topology_changes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        seen >= 1,
        "the slot move was not counted as a topology change"
    );
    assert!(cached(k2.digest).await, "never served from the cache");
    let before = received("revoke");
    writer
        .revoke("t", &k2.id, keygate::time::now_ms())
        .await
        .unwrap();
    assert!(
        revoked_seen(k2.digest).await,
        "a revocation after the slot move never arrived"
    );
    assert!(
        received("revoke") > before,
        "no message after the slot move"
    );

    let _ = stop.send(true);
    feed.await.unwrap();
}

/// Rate-limit scripts run on the primary of their hash tag's slot, with no `WAIT`, and
/// keep running there after the slot moves (the client follows MOVED; `NOSCRIPT` on the
/// new owner loads the script again). A record without limits has no limits fields here
/// either, also after a PATCH set and removed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_run_where_their_slot_is() {
    use keygate::store::cluster::bucket_of;
    use keygate::store::{Credits, KeyUpdate, RateLimit};
    use redis::Value;
    let cluster = std::sync::Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    let store = ClusterStore::connect(&settings(&cluster, "lim", 1)).unwrap();
    let scripts = store.scripts().expect("a cluster runs scripts");
    assert_eq!(scripts.namespace(), "lim");
    let waits = cluster.calls("wait");
    let both = redis::Script::new(
        "redis.call('INCRBY', KEYS[2], ARGV[1]) return redis.call('INCRBY', KEYS[1], ARGV[1])",
    );
    let keys = ["lim:{x}:a".to_string(), "lim:{x}:b".to_string()];
    let by = |n: u64| [n.to_string()];
    let slot = crate::support_cluster::slot(&keys[0]);
    let owner = cluster.primary_for_slot(slot);
    assert_eq!(
        scripts.eval(&both, &keys, &by(3)).await.unwrap(),
        Value::Int(3)
    );
    assert_eq!(
        scripts.eval(&both, &keys, &by(3)).await.unwrap(),
        Value::Int(6)
    );
    assert_eq!(cluster.nodes[owner].cmd::<String>(&["GET", &keys[1]]), "6");
    assert_eq!(
        cluster.calls("wait"),
        waits,
        "a script was followed by WAIT"
    );

    let to = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != owner)
        .unwrap();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.move_slot(slot, owner, to, Duration::ZERO))
        .await
        .unwrap();
    for i in cluster.primaries() {
        let _: String = cluster.nodes[i].cmd(&["SCRIPT", "FLUSH"]);
    }
    assert_eq!(
        scripts.eval(&both, &keys, &by(1)).await.unwrap(),
        Value::Int(7)
    );
    assert_eq!(cluster.nodes[to].cmd::<String>(&["GET", &keys[0]]), "7");
    assert_eq!(cluster.nodes[to].cmd::<String>(&["GET", &keys[1]]), "7");

    // The record layout: no limits fields unless the key has limits.
    let plain = ClusterStore::connect(&settings(&cluster, "lim", 0)).unwrap();
    let r = crate::contract::record("t", keygate::time::now_ms());
    plain.insert(&r).await.unwrap();
    let rk = format!(
        "lim:{{lim.{:x}}}:k:{}",
        bucket_of(&r.digest),
        keygate::key::hex(&r.digest)
    );
    let mut conn = cluster.client();
    let hash = |conn: &mut redis::cluster::ClusterConnection| {
        direct::<std::collections::BTreeMap<String, String>>(conn, &["HGETALL", &rk])
    };
    let original = hash(&mut conn);
    assert_eq!(original.get("id"), Some(&r.id));
    for field in ["limits", "ratelimits", "credits", "budget"] {
        assert!(!original.contains_key(field), "{field} in {original:?}");
    }
    let set = KeyUpdate {
        ratelimits: Some(vec![RateLimit {
            name: "rps".into(),
            limit: 1,
            duration_ms: 1000,
        }]),
        credits: Some(Some(Credits {
            remaining: 1,
            set_at: 1,
            refill: None,
        })),
        ..KeyUpdate::default()
    };
    let updated = plain.update("t", &r.id, &set, 1).await.unwrap().unwrap();
    assert_eq!(updated.limits.ratelimits, set.ratelimits.clone().unwrap());
    assert!(hash(&mut conn).contains_key("ratelimits"));
    let unset = KeyUpdate {
        ratelimits: Some(Vec::new()),
        credits: Some(None),
        ..KeyUpdate::default()
    };
    plain.update("t", &r.id, &unset, 2).await.unwrap().unwrap();
    assert_eq!(hash(&mut conn), original);
}
