//! The moka cache in front of the key store: valid records (with their identity headers
//! prebuilt) and short-lived "unknown" markers, keyed by digest with an xxh3 hasher.
//! Misses are coalesced (one store read for N concurrent requests of one key), and a
//! generation counter keeps a fill that raced an invalidation from caching stale data.

use crate::key::Digest;
use crate::store::{KeyRecord, KeyStore, StoreError};
use http::HeaderValue;
use moka::future::Cache;
use moka::Expiry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3Builder;

/// A valid record and the header values the proxy sends upstream for it.
#[derive(Debug)]
pub struct Identity {
    pub record: KeyRecord,
    pub id_header: HeaderValue,
    pub tenant_header: HeaderValue,
    pub scopes_header: HeaderValue,
    pub type_header: HeaderValue,
    /// Last successful use seen by this process (write-behind, see `usage`).
    pub last_used_ms: AtomicU64,
    /// Whether this identity waits in the usage queue.
    pub usage_queued: AtomicBool,
}

impl Identity {
    pub fn new(record: KeyRecord) -> Result<Self, StoreError> {
        let hv = |what: &str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| StoreError::Corrupt {
                key: format!("id {}", record.id),
                reason: format!("{what} is not a valid header value"),
            })
        };
        Ok(Identity {
            id_header: hv("id", &record.id)?,
            tenant_header: hv("tenant", &record.tenant)?,
            scopes_header: hv("scopes", &record.scopes.join(" "))?,
            type_header: HeaderValue::from_static(record.key_type.as_str()),
            last_used_ms: AtomicU64::new(record.last_used_at.unwrap_or(0)),
            usage_queued: AtomicBool::new(false),
            record,
        })
    }
}

#[derive(Debug, Clone)]
pub enum Entry {
    Known(Arc<Identity>),
    /// No such key in the store (cached briefly against floods of made-up keys).
    Unknown,
}

/// Where an answer came from (the `source` metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Store,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Store => "store",
        }
    }
}

struct Ttls {
    positive: Duration,
    negative: Duration,
}

impl Expiry<Digest, Entry> for Ttls {
    fn expire_after_create(&self, _: &Digest, value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            Entry::Known(_) => self.positive,
            Entry::Unknown => self.negative,
        })
    }
}

pub struct KeyCache {
    cache: Cache<Digest, Entry, Xxh3Builder>,
    store: Arc<dyn KeyStore>,
    generation: AtomicU64,
}

impl KeyCache {
    pub fn new(store: Arc<dyn KeyStore>, ttl: Duration, negative_ttl: Duration, max: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max)
            .expire_after(Ttls {
                positive: ttl,
                negative: negative_ttl,
            })
            .build_with_hasher(Xxh3Builder::new());
        KeyCache {
            cache,
            store,
            generation: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The hot path: a hit is an in-memory lookup; a miss is one coalesced store read.
    pub async fn lookup(&self, digest: &Digest) -> Result<(Entry, Source), Arc<StoreError>> {
        if let Some(e) = self.cache.get(digest).await {
            return Ok((e, Source::Cache));
        }
        let before = self.generation.load(Ordering::Acquire);
        let entry = self.cache.try_get_with(*digest, self.fill(*digest)).await?;
        if self.generation.load(Ordering::Acquire) != before {
            // An invalidation ran while we filled: the inserted value may predate it.
            self.cache.invalidate(digest).await;
        }
        Ok((entry, Source::Store))
    }

    async fn fill(&self, digest: Digest) -> Result<Entry, StoreError> {
        let mut attempts = 0;
        let read = loop {
            let started = self.generation.load(Ordering::Acquire);
            let read = self.store.by_digest(&digest).await?;
            attempts += 1;
            // Re-read when an invalidation ran meanwhile: the store may have changed after
            // our read began. Bounded; `lookup` drops the entry if the race persists.
            if attempts == 3 || self.generation.load(Ordering::Acquire) == started {
                break read;
            }
        };
        Ok(match read {
            Some(r) => Entry::Known(Arc::new(Identity::new(r)?)),
            None => Entry::Unknown,
        })
    }

    /// Drop one key's entry (after a change to it, or a create that must clear "unknown").
    pub async fn invalidate(&self, digest: &Digest) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(digest).await;
    }

    /// Drop everything (a lost change feed, a store that was flushed).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

/// Follow the store's change channel: evict each changed digest; flush everything on
/// every (re)subscribe, since messages published while disconnected are lost.
pub async fn follow_redis_changes(
    url: String,
    channel: String,
    cache: Arc<KeyCache>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(50);
    loop {
        let subscribed = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(pubsub)) => {
                cache.invalidate_all();
                tracing::info!(channel = %channel, "subscribed to key changes; cache flushed");
                backoff = Duration::from_millis(50);
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(m) => match parse_change(m.get_payload_bytes()) {
                                Some(d) => cache.invalidate(&d).await,
                                None => tracing::warn!("ignored a malformed change message"),
                            },
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
                // Messages published while we are away are lost: the flush on resubscribe
                // covers them; until then cached entries are bounded by their TTL, and cache
                // hits keep working while the store is down.
                tracing::warn!("key change subscription lost; reconnecting");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to key changes"),
            Err(_) => tracing::warn!("subscribing to key changes timed out"),
        }
        // Capped exponential backoff with jitter, so replicas don't reconnect in lockstep.
        let jitter = Duration::from_millis(u64::from(crate::time::now_ms() as u32 % 50));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// `<seq> <event> <digest hex> <commit ms>` -> digest.
fn parse_change(payload: &[u8]) -> Option<Digest> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let _seq: u64 = parts.next()?.parse().ok()?;
    let _event = parts.next()?;
    crate::key::unhex(parts.next()?)
}
