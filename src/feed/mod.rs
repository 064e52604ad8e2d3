//! The change feed from Redis: every write publishes `<seq> <event> <digest hex> <ms>`
//! with `seq` from a counter bumped in the same script. Each replica evicts the digest;
//! pub/sub is at-most-once, so a gap in `seq`, a counter seen ahead of the messages, a
//! counter that vanished or went back (FLUSHALL, failover), or a (re)subscribe flushes
//! the whole cache. While the subscription is down, `cache.ttl` bounds staleness.

pub mod cluster;

use crate::cache::KeyCache;
use crate::key::Digest;
use crate::metrics::Metrics;
use crate::store::topology::Target;
use futures_util::StreamExt;
use redis::AsyncCommands;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the counter is compared with the last message seen.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Where the feed lives: the store's primary (followed through failovers), its
/// channel and counter.
#[derive(Clone)]
pub struct FeedSettings {
    pub target: Arc<Target>,
    pub channel: String,
    pub seq_key: String,
}

/// One parsed change message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    pub seq: u64,
    pub event: &'a str,
    pub digest: Digest,
    pub at_ms: u64,
}

pub fn parse_change(payload: &[u8]) -> Option<Change<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let event = parts.next()?;
    if !matches!(event, "create" | "revoke" | "update" | "rotate") {
        return None;
    }
    let digest = crate::key::unhex(parts.next()?)?;
    let at_ms = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Change {
        seq,
        event,
        digest,
        at_ms,
    })
}

/// Sequence bookkeeping, apart from I/O so it can be tested exactly.
#[derive(Debug, Default)]
pub struct Tracker {
    last: u64,
    /// Counter value seen ahead of `last` at the previous check.
    ahead: Option<u64>,
    /// The counter read at subscribe time: older messages may still arrive once.
    baseline: u64,
    /// A message newer than the baseline arrived.
    moved: bool,
}

/// Why the cache must be flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    Gap,
    CounterAhead,
    CounterMissing,
    CounterBack,
}

impl Flush {
    pub fn as_str(self) -> &'static str {
        match self {
            Flush::Gap => "gap",
            Flush::CounterAhead => "counter_ahead",
            Flush::CounterMissing => "counter_missing",
            Flush::CounterBack => "counter_back",
        }
    }
}

impl Tracker {
    /// Start from the counter read right after subscribing (the cache is flushed then).
    pub fn new(baseline: u64) -> Self {
        Tracker {
            last: baseline,
            ahead: None,
            baseline,
            moved: false,
        }
    }

    /// A message arrived.
    pub fn message(&mut self, seq: u64) -> Option<Flush> {
        if seq <= self.last {
            if !self.moved && seq <= self.baseline {
                // Published before we read the counter: covered by the subscribe flush.
                return None;
            }
            // Pub/sub does not repeat messages: the counter restarted (FLUSHALL, failover)
            // and has been written again since.
            self.last = seq;
            self.ahead = None;
            return Some(Flush::CounterBack);
        }
        self.moved = true;
        let gap = seq != self.last + 1;
        self.last = seq;
        gap.then_some(Flush::Gap)
    }

    /// The periodic read of the counter (`None`: the key is gone).
    pub fn check(&mut self, counter: Option<u64>) -> Option<Flush> {
        match counter {
            None if self.last > 0 => {
                self.last = 0;
                self.ahead = None;
                Some(Flush::CounterMissing)
            }
            None => None,
            Some(c) if c < self.last => {
                self.last = c;
                self.ahead = None;
                Some(Flush::CounterBack)
            }
            Some(c) if c > self.last => {
                // A message may be on its way: flush only if it is still missing by the
                // next check.
                match self.ahead {
                    Some(prev) if self.last < prev => {
                        self.last = c;
                        self.ahead = None;
                        Some(Flush::CounterAhead)
                    }
                    _ => {
                        self.ahead = Some(c);
                        None
                    }
                }
            }
            Some(_) => {
                self.ahead = None;
                None
            }
        }
    }
}

/// Follow the feed until `shutdown`, reconnecting with capped exponential backoff and
/// jitter.
pub async fn follow(
    settings: FeedSettings,
    cache: Arc<KeyCache>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let feed = Follower {
        settings: &settings,
        cache: &cache,
        metrics: &metrics,
    };
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    let mut primary = settings.target.subscribe();
    loop {
        primary.mark_unchanged();
        match subscribe(&settings).await {
            Ok((pubsub, conn, baseline)) => {
                feed.subscribed(baseline, first);
                (first, backoff) = (false, Duration::from_millis(50));
                if feed
                    .run(pubsub, conn, baseline, &mut primary, &mut shutdown)
                    .await
                    .is_break()
                {
                    return;
                }
                feed.lost();
            }
            // Sentinel, before the primary is named: the watch below wakes us.
            Err(_) if settings.target.node().is_none() => {}
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to key changes"),
        }
        let jitter = Duration::from_millis(u64::from(crate::time::now_ms() as u32 % 50));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            // A primary named at last: no need to wait out the backoff.
            _ = primary.changed() => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One process's view of the feed: what it invalidates and what it reports to.
struct Follower<'a> {
    settings: &'a FeedSettings,
    cache: &'a KeyCache,
    metrics: &'a Metrics,
}

impl Follower<'_> {
    /// A (re)subscription: what was cached may have missed changes, so it all goes.
    fn subscribed(&self, baseline: u64, first: bool) {
        self.cache.invalidate_all();
        self.cache.mark_feed(true);
        self.cache.mark_reads(true);
        if !first {
            self.metrics.feed.reconnects.inc();
        }
        self.metrics
            .feed
            .flushes
            .with_label_values(&["subscribe"])
            .inc();
        self.metrics.feed.up.set(1);
        tracing::info!(channel = %self.settings.channel, seq = baseline, "following key changes; cache flushed");
    }

    fn lost(&self) {
        self.metrics.feed.up.set(0);
        self.cache.mark_feed(false);
        tracing::warn!("key change subscription lost; reconnecting");
    }

    /// Apply messages and check the counter until the subscription ends or the primary
    /// moves (`Continue`: subscribe again, which flushes), or `shutdown` (`Break`).
    async fn run(
        &self,
        pubsub: redis::aio::PubSub,
        mut conn: redis::aio::MultiplexedConnection,
        baseline: u64,
        primary: &mut watch::Receiver<u64>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> ControlFlow<()> {
        let mut tracker = Tracker::new(baseline);
        let mut messages = pubsub.into_on_message();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flush = tokio::select! {
                msg = messages.next() => match msg {
                    None => return ControlFlow::Continue(()),
                    Some(m) => self.message(m.get_payload_bytes(), &mut tracker).await,
                },
                _ = tick.tick() => self.check_counter(&mut conn, &mut tracker).await,
                _ = primary.changed() => {
                    tracing::warn!("Redis primary moved; following key changes there");
                    return ControlFlow::Continue(());
                }
                _ = shutdown.changed() => return ControlFlow::Break(()),
            };
            if let Some(reason) = flush {
                self.cache.invalidate_all();
                let label = reason.as_str();
                self.metrics.feed.flushes.with_label_values(&[label]).inc();
                tracing::warn!(reason = label, "change feed out of step; cache flushed");
            }
        }
    }

    async fn message(&self, payload: &[u8], tracker: &mut Tracker) -> Option<Flush> {
        let Some(change) = parse_change(payload) else {
            self.metrics.feed.malformed.inc();
            tracing::warn!("ignored a malformed change message");
            return None;
        };
        self.cache.invalidate(&change.digest).await;
        self.metrics.feed.observe(change.event, change.at_ms);
        tracker.message(change.seq)
    }

    async fn check_counter(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        tracker: &mut Tracker,
    ) -> Option<Flush> {
        let read = conn.get::<_, Option<u64>>(&self.settings.seq_key);
        match tokio::time::timeout(Duration::from_secs(1), read).await {
            Ok(Ok(counter)) => {
                self.cache.mark_reads(true);
                tracker.check(counter)
            }
            // Redis trouble: reads fail; the subscription will tell if it is gone.
            _ => {
                self.cache.mark_reads(false);
                None
            }
        }
    }
}

async fn subscribe(
    s: &FeedSettings,
) -> Result<(redis::aio::PubSub, redis::aio::MultiplexedConnection, u64), String> {
    let work = async {
        let node = s.target.node().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "no Redis primary is known"))
        })?;
        let client = &node.client;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&s.channel).await?;
        // Read the counter after subscribing: anything later arrives as a message.
        let mut conn = client.get_multiplexed_async_connection().await?;
        let baseline: Option<u64> = conn.get(&s.seq_key).await?;
        Ok::<_, redis::RedisError>((pubsub, conn, baseline.unwrap_or(0)))
    };
    match tokio::time::timeout(Duration::from_secs(2), work).await {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_well_formed_messages() {
        let d = "ab".repeat(32);
        let ok = format!("7 revoke {d} 1700000000000");
        let c = parse_change(ok.as_bytes()).unwrap();
        assert_eq!((c.seq, c.event, c.at_ms), (7, "revoke", 1_700_000_000_000));
        for bad in [
            "x revoke".to_string(),
            format!("7 explode {d} 1"),
            format!("7 revoke {} 1", &d[..10]),
            format!("7 revoke {d}"),
            format!("7 revoke {d} 1 extra"),
        ] {
            assert!(parse_change(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn sequence_gaps_and_counter_checks() {
        let mut t = Tracker::new(10);
        assert_eq!(t.message(9), None, "published before the baseline was read");
        assert_eq!(t.message(11), None);
        assert_eq!(
            t.message(11),
            Some(Flush::CounterBack),
            "the counter restarted"
        );
        assert_eq!(t.message(13), Some(Flush::Gap));
        assert_eq!(t.message(14), None);
        assert_eq!(t.check(Some(14)), None);
        // Ahead once: maybe in flight. Caught up by the next check: fine.
        assert_eq!(t.check(Some(15)), None);
        assert_eq!(t.message(15), None);
        assert_eq!(t.check(Some(15)), None);
        // Ahead twice without the message: lost.
        assert_eq!(t.check(Some(16)), None);
        assert_eq!(t.check(Some(16)), Some(Flush::CounterAhead));
        assert_eq!(t.message(17), None);
        assert_eq!(t.check(Some(3)), Some(Flush::CounterBack));
        assert_eq!(t.message(4), None);
        assert_eq!(t.check(None), Some(Flush::CounterMissing));
        assert_eq!(t.check(None), None);
        assert_eq!(t.message(1), None);
        // FLUSHALL then writes up to our last value before the next check.
        let mut t = Tracker::new(0);
        assert_eq!(t.message(1), None);
        assert_eq!(t.message(1), Some(Flush::CounterBack));
    }
}
