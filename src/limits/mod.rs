//! Per-key rate limits and credits (issue 14): what a request spends, decided all or
//! nothing. `exact` mode asks the store in one atomic script per limited request
//! (`redis.rs`, or `memory.rs` for the in-process store); `local` mode decides from
//! in-process counters and exchanges them with the store in the background (`local.rs`).
//!
//! Every limit is a counter in fixed windows: a rate limit's windows are aligned to the
//! Unix epoch (`window = now / duration`); credits are a counter whose "window" is the
//! refill period since `set_at` (one endless window without a refill), with the quota
//! `remaining` in the first period and `refill.amount` after.

pub mod limiter;
pub mod local;
pub mod memory;
pub mod redis;

pub use limiter::{Admission, Limiter};

use crate::store::{KeyLimits, StoreError};
use async_trait::async_trait;
use std::sync::Arc;

/// What one counter allows: `quota(window)` per window of `period_ms` from `anchor_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The counter's name in the store, without the namespace and window: `k:<budget>:<name>:<ms>`,
    /// `r:<route>:<name>:<ms>:k:<budget>`, `r:<route>:<name>:<ms>:t:<tenant>`, `c:<budget>:<set_at>`.
    pub id: String,
    /// The limit's name (a metric label, the header's policy name); `credits` for credits.
    pub name: Arc<str>,
    /// Quota of the first window (credits: `remaining` as set) and of every later one.
    pub first_quota: u64,
    pub quota: u64,
    pub anchor_ms: u64,
    /// `u64::MAX`: one window forever (credits without refill).
    pub period_ms: u64,
    /// What an admitted request adds: 1 for a rate limit, the route's cost for credits.
    pub cost: u64,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    RateLimit,
    Credits,
}

impl Counter {
    /// The window `now_ms` falls in (0 before the anchor).
    pub fn window(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.anchor_ms) / self.period_ms
    }
    pub fn quota_of(&self, window: u64) -> u64 {
        if window == 0 {
            self.first_quota
        } else {
            self.quota
        }
    }
    /// Milliseconds from `now_ms` to the end of its window (`u64::MAX`: never).
    pub fn reset_in(&self, now_ms: u64) -> u64 {
        reset_in(self.anchor_ms, self.period_ms, now_ms)
    }
    /// The store key of the window `now_ms` falls in, under `namespace` and `tag` (one
    /// hash slot for every counter of one request: see `Ask::tag`).
    pub fn store_key(&self, namespace: &str, tag: &str, now_ms: u64) -> String {
        format!("{namespace}:{{{tag}}}:{}:{}", self.id, self.window(now_ms))
    }
    /// How long the store keeps a window's count: two windows (none for endless ones).
    pub fn ttl_ms(&self) -> u64 {
        if self.period_ms == u64::MAX {
            0
        } else {
            self.period_ms.saturating_mul(2)
        }
    }
}

/// Everything one request spends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// The hash tag every counter key of this request shares: `rl.<xxh3 of the tenant>`
    /// (limits by tenant and by key of one tenant live in one Redis Cluster slot).
    pub tag: String,
    pub counters: Vec<Counter>,
    /// The key whose admitted/refused totals this request adds to (`usage`).
    pub key_id: String,
}

/// The state of one counter after a decision: what the `RateLimit` headers tell. Its name
/// is its counter's (in the same order), so a decision clones no name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headroom {
    pub kind: Kind,
    /// The quota of the current window.
    pub quota: u64,
    pub remaining: u64,
    /// Milliseconds to the end of the window (`u64::MAX`: never).
    pub reset_ms: u64,
    /// `u64::MAX` for endless windows.
    pub period_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// A rate limit refused: retry after this many milliseconds.
    Limited {
        retry_after_ms: u64,
    },
    /// Credits refused; `retry_after_ms` is the next refill (`None`: no refill).
    NoCredits {
        retry_after_ms: Option<u64>,
    },
}

/// A decision with every counter's state (in `Ask::counters` order; after the request's
/// own spending when admitted, unchanged when refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub counters: Vec<Headroom>,
}

/// One count sent by `local` mode: add `delta` to `key` (expiring after `ttl_ms`, 0: never)
/// and learn the total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    pub key: String,
    pub delta: u64,
    pub ttl_ms: u64,
}

/// Where counters live: Redis (`redis::RedisLimits`) or this process (`memory`).
#[async_trait]
pub trait LimitStore: Send + Sync + 'static {
    /// `exact` mode: check every counter and, only when all admit, spend on all of them,
    /// in one atomic step. Adds 1 to the key's admitted or refused total.
    async fn take(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError>;
    /// `local` mode's exchange: add each delta, return each total (same order). Keys of
    /// different tags may be mixed; the store groups them.
    async fn exchange(&self, pushes: &[Push]) -> Result<Vec<u64>, StoreError>;
    /// `exchange`, told push by push: `None` for a push whose part of the exchange was
    /// not applied (its hash tag's script failed), so that only those are sent again.
    async fn exchange_each(&self, pushes: &[Push]) -> Vec<Option<u64>> {
        match self.exchange(pushes).await {
            Ok(totals) if totals.len() == pushes.len() => totals.into_iter().map(Some).collect(),
            Ok(_) | Err(_) => vec![None; pushes.len()],
        }
    }
    /// The counters' states without spending (usage, the key object's credits).
    async fn peek(&self, ask: &Ask, now_ms: u64) -> Result<Outcome, StoreError>;
    /// The key's admitted and refused totals since creation.
    async fn totals(&self, tag: &str, key_id: &str) -> Result<(u64, u64), StoreError>;
    /// Add to the key's admitted and refused totals (`local` mode, in the background).
    async fn add_totals(&self, adds: &[(String, String, u64, u64)]) -> Result<(), StoreError>;
    /// `local` mode: note that replica `me` exchanges with this store, and say how many
    /// replicas did within the last `within_ms` (by the store's clock), `me` included;
    /// `None` for a store only this process uses (nothing to hold back from others).
    async fn replicas(&self, me: &str, within_ms: u64) -> Result<Option<u64>, StoreError>;
    /// The counters of `ask` (their windows at `now_ms`) are no longer used: a count that
    /// would never expire (credits without a refill) now expires `after_ms` from now, so
    /// that superseded counters do not pile up; one that expires already is left alone.
    async fn retire(&self, ask: &Ask, now_ms: u64, after_ms: u64) -> Result<(), StoreError>;
}

/// Milliseconds from `now_ms` to the end of the window of `period_ms` (from `anchor_ms`)
/// it falls in; `u64::MAX` for an endless window.
pub fn reset_in(anchor_ms: u64, period_ms: u64, now_ms: u64) -> u64 {
    if period_ms == u64::MAX {
        return u64::MAX;
    }
    let window = now_ms.saturating_sub(anchor_ms) / period_ms.max(1);
    let end = anchor_ms.saturating_add((window + 1).saturating_mul(period_ms));
    end.saturating_sub(now_ms)
}

/// The tag of a tenant's counters.
pub fn tag(tenant: &str) -> String {
    format!("rl.{:016x}", xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()))
}

/// The counters of a key's own limits and credits (`cost` credits per request).
pub fn key_counters(key_id: &str, limits: &KeyLimits, cost: u64) -> Vec<Counter> {
    // The very counters the proxy's decision spends (`limiter::key_counters`), so that the
    // admin API's peek and usage read the same Redis keys.
    limiter::key_counters(key_id, limits, cost)
}

/// The counters' home for `store`: Redis through its scripts, or this process.
pub fn for_store(store: &dyn crate::store::KeyStore) -> (Arc<dyn LimitStore>, String) {
    match store.scripts() {
        Some(scripts) => {
            let namespace = scripts.namespace().to_string();
            (Arc::new(redis::RedisLimits::new(scripts)), namespace)
        }
        None => (Arc::new(memory::MemoryLimits::default()), "mem".into()),
    }
}

/// A proxy worker's own way to the counters, over its own store connection
/// (`KeyStore::worker_reader`); `None` when the store has no such thing.
pub fn worker_store(reader: &dyn crate::store::KeyStore) -> Option<Arc<dyn LimitStore>> {
    let scripts = reader.scripts()?;
    Some(Arc::new(redis::RedisLimits::new(scripts)))
}
