//! `keygate_keys_dormant{kind}`: live keys never used (`never_used`) and live keys unused
//! for 30 days (`unused_30d`), counted in the background by a pass over every record
//! (`KeyStore::scan_all`), never at scrape time. Redis' `SCAN` may return a record twice
//! while the keyspace is rehashed, so a count can be off by a few keys for one pass.

use crate::metrics::Metrics;
use crate::store::{KeyRecord, KeyStore};
use crate::time::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Store pages (about 200 records each in Redis) read per tick at most: a large store's
/// pass spans several ticks, and the gauge keeps the last complete pass meanwhile.
const PAGES_PER_TICK: usize = 50;
const DAYS_30_MS: u64 = 30 * 86_400_000;

/// Counts of one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dormant {
    pub never_used: i64,
    pub unused_30d: i64,
}

impl Dormant {
    /// Count one record at `now`. `unused_30d` is what `unused_for=30d` lists (over all
    /// tenants, live keys only), so a never-used key created over 30 days ago counts in both.
    pub fn add(&mut self, r: &KeyRecord, now: u64) {
        if r.is_revoked_at(now) || r.is_expired_at(now) {
            return;
        }
        if r.last_used_at.is_none() {
            self.never_used += 1;
        }
        if r.last_used_at.unwrap_or(r.created_at) < now.saturating_sub(DAYS_30_MS) {
            self.unused_30d += 1;
        }
    }
}

/// A pass in progress: where the scan is and what it counted so far.
#[derive(Default)]
struct Pass {
    cursor: u64,
    counted: Dormant,
}

/// Read up to `PAGES_PER_TICK` pages; the counts when the pass ended. `None` from the
/// store: it cannot scan, and `Err` stops the pass (the next tick starts over).
async fn step(store: &dyn KeyStore, pass: &mut Pass) -> Result<Option<Dormant>, ()> {
    for _ in 0..PAGES_PER_TICK {
        let (next, records) = match store.scan_all(pass.cursor).await {
            Ok(Some(page)) => page,
            Ok(None) => return Err(()),
            Err(e) => {
                tracing::warn!(error = %e, "could not count dormant keys");
                return Err(());
            }
        };
        let now = now_ms();
        records.iter().for_each(|r| pass.counted.add(r, now));
        if next == 0 {
            return Ok(Some(std::mem::take(pass).counted));
        }
        pass.cursor = next;
    }
    Ok(None)
}

fn publish(metrics: &Metrics, d: Dormant) {
    let g = &metrics.keys_dormant;
    g.with_label_values(&["never_used"]).set(d.never_used);
    g.with_label_values(&["unused_30d"]).set(d.unused_30d);
}

/// Count every `interval` until `stop` turns true; a store that cannot scan all records
/// (Redis Cluster) is asked once and the gauge stays absent.
pub async fn run(
    store: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if matches!(store.scan_all(0).await, Ok(None)) {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pass = Pass::default();
    loop {
        tokio::select! {
            _ = tick.tick() => match step(&*store, &mut pass).await {
                Ok(Some(done)) => publish(&metrics, done),
                Ok(None) => {}
                Err(()) => pass = Pass::default(),
            },
            // The guard `wait_for` returns is not `Send`: drop it inside.
            _ = async { drop(stop.wait_for(|s| *s).await) } => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(created_at: u64, last_used_at: Option<u64>) -> KeyRecord {
        KeyRecord {
            created_at,
            last_used_at,
            ..KeyRecord::sample()
        }
    }

    #[test]
    fn counts_live_keys_never_used_and_unused_for_30_days() {
        let now = 100 * 86_400_000;
        let day = 86_400_000;
        let mut d = Dormant::default();
        d.add(&record(now - day, None), now); // never used, young
        d.add(&record(now - 40 * day, None), now); // never used, old: both
        d.add(&record(now - 90 * day, Some(now - 31 * day)), now); // unused 31 days
        d.add(&record(now - 90 * day, Some(now - 29 * day)), now); // used 29 days ago
        let revoked = KeyRecord {
            revoked_at: Some(now - 1),
            ..record(now - 40 * day, None)
        };
        d.add(&revoked, now);
        let expired = KeyRecord {
            expires_at: Some(now),
            ..record(now - 40 * day, None)
        };
        d.add(&expired, now);
        let in_grace = KeyRecord {
            revoked_at: Some(now + 1),
            ..record(now - 40 * day, Some(now - 40 * day))
        };
        d.add(&in_grace, now); // a rotation's grace period: still live
        assert_eq!(
            d,
            Dormant {
                never_used: 2,
                unused_30d: 3
            }
        );
    }
}
