//! The change feed on Redis Cluster: one sharded channel and one counter per bucket
//! (`store::cluster`), each in its bucket's slot, so a change is published by the shard
//! that made it. The rules are the standalone feed's, per bucket: a `Tracker` per bucket
//! fed by its messages and by a once-a-second `GET` of its counter flushes the whole
//! cache on a gap, a counter ahead twice, missing or gone back.
//!
//! The subscription is one RESP3 cluster client (`SSUBSCRIBE` of the 16 channels, pushes
//! on a channel of ours); counters are read over a separate RESP2 client. The client
//! resubscribes by itself after a reconnect or a topology change; a node also drops
//! shard subscriptions whose slot moved away (a `sunsubscribe` push, which the client
//! takes as final: we subscribe again). Any of these may have lost messages, so:
//! - a `ssubscribe` confirmation we did not ask for (the client resubscribed): flush;
//! - a `sunsubscribe` or a disconnection: the feed is down (`mark_feed(false)`, metric
//!   `up` 0) until every affected channel (all of them after a disconnection: we are
//!   not told which node) is subscribed again by us; then flush, re-read those counters,
//!   and it is up again.

use crate::cache::KeyCache;
use crate::feed::{parse_change, Flush, Tracker, CHECK_INTERVAL};
use crate::metrics::Metrics;
use crate::store::cluster::ClusterFeed;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Bound on connecting and on each (re)subscription attempt.
const ATTEMPT: Duration = Duration::from_secs(2);
/// How often channels that lost their subscription are subscribed again.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(100);

/// Follow the cluster's change feed until `shutdown`, reconnecting with capped
/// exponential backoff and jitter when the cluster cannot be reached at all.
pub async fn follow(
    feed: ClusterFeed,
    cache: Arc<KeyCache>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        match Session::open(&feed).await {
            Ok(mut session) => {
                let follower = Follower {
                    feed: &feed,
                    cache: &cache,
                    metrics: &metrics,
                };
                follower.up(first, "following key changes on the cluster; cache flushed");
                (first, backoff) = (false, Duration::from_millis(50));
                if session.run(&follower, &mut shutdown).await.is_break() {
                    return;
                }
                follower.down("key change subscription lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to key changes on the cluster"),
        }
        let jitter = Duration::from_millis(u64::from(crate::time::now_ms() as u32 % 50));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What the feed invalidates and reports to.
struct Follower<'a> {
    feed: &'a ClusterFeed,
    cache: &'a KeyCache,
    metrics: &'a Metrics,
}

impl Follower<'_> {
    /// Every channel is subscribed (again): what was cached may have missed changes.
    fn up(&self, first: bool, why: &str) {
        self.cache.invalidate_all();
        self.cache.mark_feed(true);
        self.cache.mark_reads(true);
        if !first {
            self.metrics.feed.reconnects.inc();
        }
        self.flushed("subscribe");
        self.metrics.feed.up.set(1);
        tracing::info!(nodes = %self.feed.settings.display_nodes(), "{why}");
    }

    fn down(&self, why: &str) {
        self.metrics.feed.up.set(0);
        self.cache.mark_feed(false);
        tracing::warn!("{why}");
    }

    fn flushed(&self, reason: &str) {
        self.metrics.feed.flushes.with_label_values(&[reason]).inc();
    }

    fn flush(&self, reason: Flush) {
        self.cache.invalidate_all();
        let label = reason.as_str();
        self.flushed(label);
        tracing::warn!(reason = label, "change feed out of step; cache flushed");
    }
}

struct Session {
    /// The subscription (RESP3; its pushes arrive on `pushes`).
    sub: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Counter reads (RESP2).
    data: ClusterConnection,
    trackers: Vec<Tracker>,
    /// Confirmations of our own `SSUBSCRIBE`s still to come through `pushes`.
    expected_confirms: usize,
    /// Buckets whose channel is not subscribed now.
    pending: BTreeSet<usize>,
}

fn io_err(what: &'static str, detail: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, what, detail))
}

impl Session {
    async fn open(feed: &ClusterFeed) -> Result<Session, String> {
        let work = async {
            let (tx, pushes) = mpsc::unbounded_channel();
            let sub_client = feed
                .builder()
                .map_err(|e| io_err("cluster client", e.to_string()))?
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()?;
            let mut sub = sub_client.get_async_connection().await?;
            for channel in &feed.channels {
                sub.ssubscribe(channel).await?;
            }
            let data_client = feed
                .builder()
                .map_err(|e| io_err("cluster client", e.to_string()))?
                .build()?;
            let mut data = data_client.get_async_connection().await?;
            // Counters read after subscribing: anything later arrives as a message.
            let mut trackers = Vec::with_capacity(feed.seq_keys.len());
            for key in &feed.seq_keys {
                let v: Option<u64> = redis::cmd("GET").arg(key).query_async(&mut data).await?;
                trackers.push(Tracker::new(v.unwrap_or(0)));
            }
            Ok::<_, redis::RedisError>(Session {
                sub,
                pushes,
                data,
                trackers,
                expected_confirms: feed.channels.len(),
                pending: BTreeSet::new(),
            })
        };
        match tokio::time::timeout(ATTEMPT * 2, work).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Apply pushes, check counters and repair lost subscriptions until the push channel
    /// closes (`Continue`) or `shutdown` (`Break`).
    async fn run(
        &mut self,
        f: &Follower<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> ControlFlow<()> {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut repair = tokio::time::interval(RESUBSCRIBE_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                push = self.pushes.recv() => match push {
                    None => return ControlFlow::Continue(()),
                    Some(p) => self.push(f, p).await,
                },
                _ = tick.tick() => self.check_counters(f).await,
                _ = repair.tick(), if !self.pending.is_empty() => self.resubscribe(f).await,
                _ = shutdown.changed() => return ControlFlow::Break(()),
            }
        }
    }

    async fn push(&mut self, f: &Follower<'_>, p: PushInfo) {
        match p.kind {
            PushKind::SMessage => {
                let (Some(channel), Some(payload)) = (p.data.first(), p.data.get(1)) else {
                    return;
                };
                let Some(b) = self.bucket(f, channel) else {
                    return;
                };
                let Value::BulkString(payload) = payload else {
                    f.metrics.feed.malformed.inc();
                    return;
                };
                let Some(change) = parse_change(payload) else {
                    f.metrics.feed.malformed.inc();
                    tracing::warn!("ignored a malformed change message");
                    return;
                };
                f.cache.invalidate(&change.digest).await;
                f.metrics.feed.observe(change.event, change.at_ms);
                if let Some(reason) = self.trackers[b].message(change.seq) {
                    f.flush(reason);
                }
            }
            PushKind::SSubscribe => {
                if self.expected_confirms > 0 {
                    self.expected_confirms -= 1;
                    return;
                }
                // The client resubscribed on its own (a reconnect, a topology change):
                // messages may have been lost meanwhile.
                f.cache.invalidate_all();
                f.flushed("subscribe");
                tracing::info!("the cluster client resubscribed to key changes; cache flushed");
                if let Some(b) = p.data.first().and_then(|c| self.bucket(f, c)) {
                    self.rebaseline(f, b).await;
                }
            }
            PushKind::SUnsubscribe => {
                // The node no longer serves the channel's slot (it moved), or we were
                // unsubscribed some other way: subscribe again, wherever it lives now.
                if let Some(b) = p.data.first().and_then(|c| self.bucket(f, c)) {
                    f.feed
                        .stats
                        .topology_changes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.lose(f, [b]);
                }
            }
            PushKind::Disconnection => {
                f.feed
                    .stats
                    .topology_changes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // One node's connection dropped; which channels it carried is not said.
                self.lose(f, 0..f.feed.channels.len());
            }
            _ => {}
        }
    }

    fn bucket(&self, f: &Follower<'_>, channel: &Value) -> Option<usize> {
        let Value::BulkString(name) = channel else {
            return None;
        };
        f.feed
            .channels
            .iter()
            .position(|c| c.as_bytes() == name.as_slice())
    }

    fn lose(&mut self, f: &Follower<'_>, buckets: impl IntoIterator<Item = usize>) {
        let was_up = self.pending.is_empty();
        self.pending.extend(buckets);
        if was_up && !self.pending.is_empty() {
            f.down("key change subscription interrupted; subscribing again");
        }
    }

    /// Subscribe the pending channels again; when none is left, flush and go up.
    async fn resubscribe(&mut self, f: &Follower<'_>) {
        let pending: Vec<usize> = self.pending.iter().copied().collect();
        for b in pending {
            let attempt = self.sub.ssubscribe(&f.feed.channels[b]);
            match tokio::time::timeout(ATTEMPT, attempt).await {
                Ok(Ok(())) => {
                    self.expected_confirms += 1;
                    self.pending.remove(&b);
                    self.rebaseline(f, b).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "resubscribing a key change channel failed");
                    return;
                }
                Err(_) => return,
            }
        }
        f.up(
            false,
            "following key changes on the cluster again; cache flushed",
        );
    }

    /// Start bucket `b`'s sequence afresh from its counter (after a (re)subscription,
    /// which comes with a flush).
    async fn rebaseline(&mut self, f: &Follower<'_>, b: usize) {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&f.feed.seq_keys[b]);
        let read = cmd.query_async::<Option<u64>>(&mut self.data);
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(1), read).await {
            self.trackers[b] = Tracker::new(v.unwrap_or(0));
        }
    }

    async fn check_counters(&mut self, f: &Follower<'_>) {
        let reads = f.feed.seq_keys.iter().map(|key| {
            let mut conn = self.data.clone();
            let cmd = redis::cmd("GET").arg(key).clone();
            async move {
                let read = cmd.query_async::<Option<u64>>(&mut conn);
                tokio::time::timeout(Duration::from_secs(1), read).await
            }
        });
        let results = futures_util::future::join_all(reads).await;
        let mut ok = true;
        let mut flush = None;
        for (b, r) in results.into_iter().enumerate() {
            match r {
                Ok(Ok(counter)) if !self.pending.contains(&b) => {
                    if let Some(reason) = self.trackers[b].check(counter) {
                        flush = Some(reason);
                    }
                }
                Ok(Ok(_)) => {}
                _ => ok = false,
            }
        }
        // Cluster trouble: reads fail; the subscription's pushes tell if it is gone.
        f.cache.mark_reads(ok);
        if let Some(reason) = flush {
            f.flush(reason);
        }
    }
}
