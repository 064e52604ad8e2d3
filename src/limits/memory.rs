//! Rate-limit counters in this process, for the in-memory store (`--dev`, tests): the same
//! behaviour as `redis.rs`, with the same key names (namespace `mem`), one lock around a
//! map of counts.
//!
//! Expiry is only for memory: a count with a TTL is dropped once it has expired, checked
//! when the map has grown past twice its size after the last pruning (at least
//! `PRUNE_MIN` entries). Reads do not look at the expiry: every windowed key names its
//! window, so an expired count is one nobody asks for. The time of a pruning is the time
//! of the write that triggers it (`now_ms` of `take`, the clock for `exchange`).

use super::redis::{decide, headroom, totals_keys};
use super::{Ask, Decision, LimitStore, Outcome, Push};
use crate::store::StoreError;
use async_trait::async_trait;
use std::collections::HashMap;

const NAMESPACE: &str = "mem";

/// Below this many entries the map is not pruned.
const PRUNE_MIN: usize = 1024;

struct Count {
    value: u64,
    /// 0: never.
    expires_ms: u64,
}

#[derive(Default)]
struct Inner {
    counts: HashMap<String, Count>,
    /// Prune when the map grows past this.
    prune_at: usize,
}

impl Inner {
    fn get(&self, key: &str) -> u64 {
        self.counts.get(key).map_or(0, |c| c.value)
    }

    /// Add `delta` (0: only read) and return the total; a new key (or one without expiry)
    /// expires `ttl_ms` after `now_ms` (0: never).
    fn add(&mut self, key: &str, delta: u64, ttl_ms: u64, now_ms: u64) -> u64 {
        if delta == 0 {
            return self.get(key);
        }
        let c = self.counts.entry(key.to_string()).or_insert(Count {
            value: 0,
            expires_ms: 0,
        });
        c.value = c.value.saturating_add(delta);
        if ttl_ms > 0 && c.expires_ms == 0 {
            c.expires_ms = now_ms.saturating_add(ttl_ms);
        }
        c.value
    }

    fn prune(&mut self, now_ms: u64) {
        if self.counts.len() <= self.prune_at {
            return;
        }
        self.counts
            .retain(|_, c| c.expires_ms == 0 || c.expires_ms > now_ms);
        self.prune_at = PRUNE_MIN.max(self.counts.len().saturating_mul(2));
    }
}

/// Counters of this process.
#[derive(Default)]
pub struct MemoryLimits {
    #[allow(
        clippy::disallowed_types,
        reason = "the dev and test store: a short lock, never held across an await"
    )]
    inner: std::sync::Mutex<Inner>,
}

impl MemoryLimits {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn counter_keys(ask: &Ask, now_ms: u64) -> Vec<String> {
    ask.counters
        .iter()
        .map(|c| c.store_key(NAMESPACE, &ask.tag, now_ms))
        .collect()
}

#[async_trait]
impl LimitStore for MemoryLimits {
    async fn take(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError> {
        if ask.counters.is_empty() {
            return Ok(Outcome {
                decision: Decision::Admit,
                counters: Vec::new(),
            });
        }
        let keys = counter_keys(ask, now_ms);
        let [admitted, refused] = totals_keys(NAMESPACE, &ask.tag, &ask.key_id);
        let mut g = self.lock();
        let mut counts: Vec<u64> = keys.iter().map(|k| g.get(k)).collect();
        let decision = decide(ask, now_ms, &counts, None);
        if decision == Decision::Admit {
            for ((c, key), count) in ask.counters.iter().zip(&keys).zip(&mut counts) {
                if c.cost > 0 {
                    *count = g.add(key, c.cost, c.ttl_ms(), now_ms);
                }
            }
            g.add(&admitted, 1, 0, now_ms);
        } else {
            g.add(&refused, 1, 0, now_ms);
        }
        g.prune(now_ms);
        drop(g);
        Ok(Outcome {
            decision,
            counters: headroom(ask, now_ms, &counts),
        })
    }

    async fn exchange(&self, pushes: &[Push]) -> Result<Vec<u64>, StoreError> {
        let now_ms = crate::time::now_ms();
        let mut g = self.lock();
        let totals = pushes
            .iter()
            .map(|p| g.add(&p.key, p.delta, p.ttl_ms, now_ms))
            .collect();
        g.prune(now_ms);
        Ok(totals)
    }

    async fn peek(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError> {
        let keys = counter_keys(ask, now_ms);
        let counts: Vec<u64> = {
            let g = self.lock();
            keys.iter().map(|k| g.get(k)).collect()
        };
        Ok(Outcome {
            decision: decide(ask, now_ms, &counts, None),
            counters: headroom(ask, now_ms, &counts),
        })
    }

    async fn totals(&self, tag: &str, key_id: &str) -> Result<(u64, u64), StoreError> {
        let [admitted, refused] = totals_keys(NAMESPACE, tag, key_id);
        let g = self.lock();
        Ok((g.get(&admitted), g.get(&refused)))
    }

    async fn add_totals(&self, adds: &[(String, String, u64, u64)]) -> Result<(), StoreError> {
        let now_ms = crate::time::now_ms();
        let mut g = self.lock();
        for (tag, key_id, admitted, refused) in adds {
            let [a, r] = totals_keys(NAMESPACE, tag, key_id);
            g.add(&a, *admitted, 0, now_ms);
            g.add(&r, *refused, 0, now_ms);
        }
        g.prune(now_ms);
        Ok(())
    }

    /// This process's own: its exchange costs nothing worth holding back.
    async fn replicas(&self, _: &str, _: u64) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    async fn retire(&self, ask: &Ask, now_ms: u64, after_ms: u64) -> Result<(), StoreError> {
        let mut g = self.lock();
        for key in counter_keys(ask, now_ms) {
            if let Some(c) = g.counts.get_mut(&key).filter(|c| c.expires_ms == 0) {
                c.expires_ms = now_ms.saturating_add(after_ms.max(1));
            }
        }
        g.prune(now_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_counts_are_dropped_once_the_map_grows() {
        let mut inner = Inner::default();
        for i in 0..5000u64 {
            inner.add(&format!("k{i}"), 1, 100, i);
            inner.prune(i);
        }
        // Everything written more than 100 ms (of its own time) before the last pruning is gone.
        assert!(
            inner.counts.len() < 2 * PRUNE_MIN + 200,
            "{}",
            inner.counts.len()
        );
        assert_eq!(inner.get("k4999"), 1);
        // Counts without expiry stay.
        let mut inner = Inner::default();
        for i in 0..3000u64 {
            inner.add(&format!("k{i}"), 1, 0, i);
            inner.prune(u64::MAX);
        }
        assert_eq!(inner.counts.len(), 3000);
    }
}
