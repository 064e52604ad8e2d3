//! The moka cache in front of the key store: valid records (with their identity headers
//! prebuilt) and short-lived "unknown" markers, keyed by digest with an xxh3 hasher.
//! Misses are coalesced (one store read for N concurrent requests of one key), and a
//! generation counter keeps a fill that raced an invalidation from caching stale data.
//! In front of moka, each thread keeps the identities it served recently (`local`), so a
//! repeat hit touches no cache line another thread writes.

use crate::key::Digest;
use crate::key::KeyType;
use crate::store::{KeyRecord, KeyStore, StoreError};
use http::HeaderValue;
use moka::future::Cache;
use moka::Expiry;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3Builder;

/// A valid key as cached: what an authentication decision needs of its record, and the
/// text of the identity headers the proxy sends upstream for it. The rest of the record
/// (name, display prefix, timestamps the admin API shows) stays in the store. Kept small
/// (one allocation of 128 bytes, one for the text): a million cached keys is a normal
/// working set, and the hot path reads the struct on every request.
#[derive(Debug)]
pub struct Identity {
    /// The key's id, tenant and space-separated scopes, back to back (visible ASCII,
    /// checked when built): the header values are slices of it, so sending them costs a
    /// reference count each, not a copy.
    text: bytestring::ByteString,
    id_end: u16,
    tenant_end: u16,
    pub key_type: KeyType,
    /// The record's digest is plain SHA-256 (a key imported by hash): `auth` lets only a
    /// legacy-format token match it.
    pub plain_sha256: bool,
    /// Whether this identity waits in the usage queue.
    pub usage_queued: AtomicBool,
    pub digest: Digest,
    /// `u64::MAX` when the key never expires.
    expires_at: u64,
    /// When the key stops authenticating (in the future during a rotation's grace);
    /// `u64::MAX` when it is not revoked.
    revoked_at: u64,
    /// Last successful use seen by this process (write-behind, see `usage`).
    pub last_used_ms: AtomicU64,
    /// When it was read from the store (`time::mono_ms`): the start of its positive TTL.
    pub cached_at_ms: u64,
    /// The key's own rate limits and credits, `budget` filled in; `None` without any.
    pub limits: Option<Box<crate::store::KeyLimits>>,
    /// State a module above the cache keeps for this key while it is cached (the rate
    /// limiter's counters for it), made on first use: the cache only holds it.
    pub attached: Attached,
}

/// See `Identity::attached`. Inline, so a limited request reaches the limiter's state in
/// one hop from the identity (each hop is a cache miss with many keys in use).
pub type Attached = std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>;

impl Identity {
    pub fn new(record: KeyRecord) -> Result<Self, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            key: format!("id {}", record.id.escape_default()),
            reason: reason.into(),
        };
        // Visible ASCII only (a record from the store is input like any other): the
        // header values below are made without checking again, and `id()`/`tenant()`
        // always have text to give.
        let visible = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if !visible(&record.id) || !visible(&record.tenant) {
            return Err(corrupt("id or tenant is not visible ASCII"));
        }
        if !record.scopes.iter().all(|s| !s.is_empty() && visible(s)) {
            return Err(corrupt("a scope is empty or not visible ASCII"));
        }
        let mut text = String::with_capacity(
            record.id.len()
                + record.tenant.len()
                + record.scopes.iter().map(|s| s.len() + 1).sum::<usize>(),
        );
        text.push_str(&record.id);
        text.push_str(&record.tenant);
        for (i, s) in record.scopes.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(s);
        }
        let id_end = u16::try_from(record.id.len()).map_err(|_| corrupt("id too long"))?;
        let tenant_end = u16::try_from(record.id.len() + record.tenant.len())
            .map_err(|_| corrupt("tenant too long"))?;
        if !limits_in_range(&record.limits) {
            return Err(corrupt("rate limits or credits out of range"));
        }
        let limits = (!record.limits.is_empty()).then(|| {
            let mut l = record.limits.clone();
            l.budget.get_or_insert_with(|| record.id.clone());
            Box::new(l)
        });
        Ok(Identity {
            limits,
            text: bytestring::ByteString::from(text),
            id_end,
            tenant_end,
            key_type: record.key_type,
            plain_sha256: record.plain_sha256,
            usage_queued: AtomicBool::new(false),
            digest: record.digest,
            expires_at: record.expires_at.unwrap_or(u64::MAX),
            revoked_at: record.revoked_at.unwrap_or(u64::MAX),
            last_used_ms: AtomicU64::new(record.last_used_at.unwrap_or(0)),
            cached_at_ms: crate::time::mono_ms(),
            attached: Attached::new(),
        })
    }

    /// A valid identity with these end times, for other modules' unit tests.
    #[cfg(test)]
    pub fn sample(expires_at: Option<u64>, revoked_at: Option<u64>) -> Identity {
        Identity::new(KeyRecord {
            expires_at,
            revoked_at,
            ..KeyRecord::sample()
        })
        .expect("a valid record")
    }

    fn part(&self, range: std::ops::Range<usize>) -> &str {
        // ASCII, checked in `new`: never the fallback.
        self.text.get(range).unwrap_or("-")
    }

    fn header(&self, range: std::ops::Range<usize>) -> HeaderValue {
        // Checked in `new` (visible ASCII and spaces), so this never fails; the fallback
        // only avoids a panic path.
        HeaderValue::from_maybe_shared(self.text.as_bytes().slice(range))
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    fn id_range(&self) -> std::ops::Range<usize> {
        0..self.id_end as usize
    }
    fn tenant_range(&self) -> std::ops::Range<usize> {
        self.id_end as usize..self.tenant_end as usize
    }
    fn scopes_range(&self) -> std::ops::Range<usize> {
        self.tenant_end as usize..self.text.len()
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        self.part(self.id_range())
    }

    /// The key's tenant.
    pub fn tenant(&self) -> &str {
        self.part(self.tenant_range())
    }

    /// The scopes the key holds.
    pub fn scopes(&self) -> impl Iterator<Item = &str> + Clone {
        self.part(self.scopes_range())
            .split(' ')
            .filter(|s| !s.is_empty())
    }

    /// Does the key hold (or imply) every one of `required`?
    pub fn grants_all<R: AsRef<str>>(&self, required: &[R]) -> bool {
        required.iter().all(|r| {
            self.scopes()
                .any(|h| crate::key::scope_grants(h, r.as_ref()))
        })
    }

    pub fn id_header(&self) -> HeaderValue {
        self.header(self.id_range())
    }
    pub fn tenant_header(&self) -> HeaderValue {
        self.header(self.tenant_range())
    }
    pub fn scopes_header(&self) -> HeaderValue {
        self.header(self.scopes_range())
    }
    pub fn type_header(&self) -> HeaderValue {
        HeaderValue::from_static(self.key_type.as_str())
    }

    pub fn expires_at(&self) -> Option<u64> {
        (self.expires_at != u64::MAX).then_some(self.expires_at)
    }
    pub fn revoked_at(&self) -> Option<u64> {
        (self.revoked_at != u64::MAX).then_some(self.revoked_at)
    }
    pub fn is_revoked_at(&self, now_ms: u64) -> bool {
        self.revoked_at <= now_ms
    }
    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        self.expires_at <= now_ms
    }
    /// Has the key an end at all (an expiry, or a revocation, past or to come)? One
    /// comparison and no clock read: the proxy asks it of every answer before it looks
    /// at the lifecycle headers (`proxy::lifecycle`).
    pub fn may_end(&self) -> bool {
        self.revoked_at.min(self.expires_at) != u64::MAX
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

/// How long entries are trusted, in milliseconds: read from the request's snapshot on
/// every lookup, so a reload's positive TTL bounds every cached key at once (an entry
/// also keeps the TTL it was filled with, so a longer new TTL applies to new fills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    pub positive_ms: u64,
    pub negative_ms: u64,
}

impl Ttls {
    pub fn new(positive: Duration, negative: Duration) -> Ttls {
        Ttls {
            positive_ms: positive.as_millis() as u64,
            negative_ms: negative.as_millis() as u64,
        }
    }
}

/// A shared-cache value: the entry and the TTL it was filled with.
#[derive(Clone)]
struct Cached {
    entry: Entry,
    ttl: Duration,
}

struct FillTtl;

impl Expiry<Digest, Cached> for FillTtl {
    fn expire_after_create(&self, _: &Digest, value: &Cached, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
    // A value replaced in place (`hold_unknown`) lives for its own TTL, not the rest of
    // the one it replaced (moka's default).
    fn expire_after_update(
        &self,
        _: &Digest,
        value: &Cached,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// What the admin API accepts, checked again on a record from the store (input like any
/// other): names that are header- and label-safe and unique, quotas and windows that
/// keep the counters' arithmetic and expiries in range.
fn limits_in_range(l: &crate::store::KeyLimits) -> bool {
    const MAX_COUNT: u64 = 1_000_000_000_000_000;
    const MAX_WINDOW_MS: u64 = 366 * 86_400_000;
    let windows = l.ratelimits.iter().all(|r| {
        crate::key::valid_limit_name(&r.name)
            && (1..=MAX_COUNT).contains(&r.limit)
            && (1..=MAX_WINDOW_MS).contains(&r.duration_ms)
    });
    let mut names: Vec<&str> = l.ratelimits.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    let unique = names.windows(2).all(|w| w[0] != w[1]) && l.ratelimits.len() <= 16;
    let credits = l.credits.as_ref().is_none_or(|c| {
        c.remaining <= MAX_COUNT
            && c.refill.as_ref().is_none_or(|r| {
                (1..=MAX_COUNT).contains(&r.amount) && (1..=MAX_WINDOW_MS).contains(&r.interval_ms)
            })
    });
    // The budget names counters (`k:<budget>:…`): a key id's alphabet, so no `:` or `{`
    // can make it name another key's.
    let budget = l.budget.as_deref().is_none_or(|b| {
        (1..=64).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
    });
    windows && unique && credits && budget
}

/// The store a lookup reads on a miss: the shared one, or a proxy worker's own
/// (`KeyStore::worker_reader`), handed in by the caller.
pub type Reader = Arc<dyn KeyStore>;

// With the `Arc` counts, one allocation of at most 152 bytes per cached key, in
// mimalloc's 160-byte class (the key's limits, when it has any, are a second one).
const _: () = assert!(std::mem::size_of::<Identity>() <= 136);

/// Entries each thread's local front holds at most; when full it starts over.
const LOCAL_MAX: usize = 16_384;

/// One identity a thread served, trusted while its cache's generation is unchanged (every
/// invalidation changes it) and the positive TTL, counted from the store read, lasts.
struct LocalSlot {
    /// The cache it came from (tests and benches run several caches per thread).
    instance: u64,
    id: Arc<Identity>,
    generation: u64,
}

/// Hashes a digest by its first eight bytes. The local front holds only keys that were
/// found valid in the store (SHA-256 or HMAC digests: uniform, and not chosen freely by a
/// client), so that is as good as hashing all 32 and much cheaper than a streaming hasher.
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }
    // The slice length that `[u8; 32]` hashes first: the same for every digest.
    fn write_usize(&mut self, _: usize) {}
}

thread_local! {
    static LOCAL: RefCell<HashMap<Digest, LocalSlot, std::hash::BuildHasherDefault<DigestHasher>>> =
        RefCell::new(HashMap::default());
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

pub struct KeyCache {
    cache: Cache<Digest, Cached, Xxh3Builder>,
    /// Tells this cache's entries apart in the per-thread fronts.
    instance: u64,
    generation: AtomicU64,
    /// A pause between a fill's store read and its check, to race invalidations.
    #[cfg(test)]
    fill_delay_ms: AtomicU64,
    /// Last known store health: the last read (or counter check) worked...
    reads_ok: AtomicBool,
    /// ...and the change feed is following (always true without a feed).
    feed_ok: AtomicBool,
}

impl KeyCache {
    pub fn new(max_entries: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .expire_after(FillTtl)
            .build_with_hasher(Xxh3Builder::new());
        KeyCache {
            cache,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            #[cfg(test)]
            fill_delay_ms: AtomicU64::new(0),
            reads_ok: AtomicBool::new(true),
            feed_ok: AtomicBool::new(true),
        }
    }

    /// `lookup_at`, reading the clock.
    pub async fn lookup(
        &self,
        digest: &Digest,
        ttls: Ttls,
        reader: &Reader,
    ) -> Result<(Entry, Source), Arc<StoreError>> {
        self.lookup_at(digest, Instant::now(), ttls, reader).await
    }

    /// The hot path: a hit is an in-memory lookup; a miss is one coalesced read from
    /// `reader`. `now` is the time the caller already read.
    pub async fn lookup_at(
        &self,
        digest: &Digest,
        now: Instant,
        ttls: Ttls,
        reader: &Reader,
    ) -> Result<(Entry, Source), Arc<StoreError>> {
        let now_ms = crate::time::mono_ms_at(now);
        let before = self.generation.load(Ordering::Acquire);
        if let Some(id) = self.local_get(digest, before, now_ms, ttls) {
            return Ok((Entry::Known(id), Source::Cache));
        }
        if let Some(c) = self.cache.get(digest).await {
            match &c.entry {
                // Filled under a longer TTL than the running one (a reload shortened
                // it): read it again rather than trust it past the TTL now in force.
                Entry::Known(id) if id.cached_at_ms.saturating_add(ttls.positive_ms) <= now_ms => {
                    self.cache.invalidate(digest).await;
                }
                Entry::Known(id) => {
                    self.local_put(digest, id, before, now_ms, ttls);
                    return Ok((c.entry, Source::Cache));
                }
                Entry::Unknown => return Ok((c.entry, Source::Cache)),
            }
        }
        let fill = self.fill(*digest, ttls, reader.clone());
        let entry = match self.cache.try_get_with(*digest, fill).await {
            Ok(c) => {
                self.mark_reads(true);
                c.entry
            }
            Err(e) => {
                self.mark_reads(false);
                return Err(e);
            }
        };
        if self.generation.load(Ordering::Acquire) != before {
            // An invalidation ran while we filled: the inserted value may predate it.
            self.cache.invalidate(digest).await;
        } else if let Entry::Known(id) = &entry {
            self.local_put(digest, id, before, now_ms, ttls);
        }
        Ok((entry, Source::Store))
    }

    fn local_get(
        &self,
        digest: &Digest,
        generation: u64,
        now_ms: u64,
        ttls: Ttls,
    ) -> Option<Arc<Identity>> {
        LOCAL.with(|local| {
            let local = local.borrow();
            let slot = local.get(digest)?;
            (slot.instance == self.instance
                && slot.generation == generation
                && now_ms < slot.id.cached_at_ms.saturating_add(ttls.positive_ms))
            .then(|| slot.id.clone())
        })
    }

    /// Remember `id` on this thread. `generation` must have been read before the entry
    /// was obtained, so an invalidation in between leaves the slot stale at once.
    fn local_put(
        &self,
        digest: &Digest,
        id: &Arc<Identity>,
        generation: u64,
        now_ms: u64,
        ttls: Ttls,
    ) {
        if id.cached_at_ms.saturating_add(ttls.positive_ms) <= now_ms {
            return;
        }
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if local.len() >= LOCAL_MAX {
                local.clear();
            }
            let slot = LocalSlot {
                instance: self.instance,
                id: id.clone(),
                generation,
            };
            local.insert(*digest, slot);
        });
    }

    async fn fill(&self, digest: Digest, ttls: Ttls, reader: Reader) -> Result<Cached, StoreError> {
        let mut attempts = 0;
        let read = loop {
            let started = self.generation.load(Ordering::Acquire);
            let read = reader.by_digest(&digest).await?;
            #[cfg(test)]
            self.test_pause().await;
            attempts += 1;
            // Re-read when an invalidation ran meanwhile: the store may have changed after
            // our read began. Bounded; `lookup` drops the entry if the race persists.
            if attempts == 3 || self.generation.load(Ordering::Acquire) == started {
                break read;
            }
        };
        Ok(match read {
            Some(r) => Cached {
                entry: Entry::Known(Arc::new(Identity::new(r)?)),
                ttl: Duration::from_millis(ttls.positive_ms),
            },
            None => Cached {
                entry: Entry::Unknown,
                ttl: Duration::from_millis(ttls.negative_ms),
            },
        })
    }

    #[cfg(test)]
    async fn test_pause(&self) {
        let delay = self.fill_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    /// Keep `digest`'s fresh "unknown" for the positive TTL instead of the negative one
    /// (a legacy token whose key was found under its second digest, see `auth`). Safe as
    /// long: the digest can only become known by a create, whose invalidation removes it
    /// (one that ran meanwhile moves the generation, and the entry is dropped again).
    pub async fn hold_unknown(&self, digest: &Digest, ttls: Ttls) {
        let before = self.generation.load(Ordering::Acquire);
        let ttl = Duration::from_millis(ttls.positive_ms);
        match self.cache.get(digest).await {
            Some(c) if matches!(c.entry, Entry::Unknown) && c.ttl < ttl => {}
            _ => return,
        }
        let held = Cached {
            entry: Entry::Unknown,
            ttl,
        };
        self.cache.insert(*digest, held).await;
        if self.generation.load(Ordering::Acquire) != before {
            self.cache.invalidate(digest).await;
        }
    }

    /// Drop one key's entry (after a change to it, or a create that must clear "unknown").
    /// The generation moves before (fencing fills that are reading) and after (so that a
    /// thread that read the old entry just before its eviction cannot keep it locally).
    pub async fn invalidate(&self, digest: &Digest) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(digest).await;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drop everything (a lost change feed, a store that was flushed).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A store read (or the feed's counter check) worked or failed.
    pub fn mark_reads(&self, ok: bool) {
        if self.reads_ok.load(Ordering::Relaxed) != ok {
            self.reads_ok.store(ok, Ordering::Relaxed);
        }
    }

    /// The change feed is following, or lost.
    pub fn mark_feed(&self, ok: bool) {
        self.feed_ok.store(ok, Ordering::Relaxed);
    }

    /// Is the store answering and the change feed up? (`on_store_error: deny`)
    pub fn store_ok(&self) -> bool {
        self.reads_ok.load(Ordering::Relaxed) && self.feed_ok.load(Ordering::Relaxed)
    }

    /// Make every fill pause after its store read, to race invalidations.
    #[cfg(test)]
    fn set_fill_delay(&self, delay: Duration) {
        self.fill_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// A cache with the TTLs and store a snapshot and a worker would hand it.
    struct Fixture {
        cache: KeyCache,
        ttls: Ttls,
        reader: Reader,
    }

    impl Fixture {
        fn new(reader: Reader, positive: Duration, negative: Duration) -> Fixture {
            let ttls = Ttls::new(positive, negative);
            Fixture {
                cache: KeyCache::new(100),
                ttls,
                reader,
            }
        }

        async fn lookup(&self, digest: &Digest) -> Result<(Entry, Source), Arc<StoreError>> {
            self.cache.lookup(digest, self.ttls, &self.reader).await
        }
    }

    impl std::ops::Deref for Fixture {
        type Target = KeyCache;
        fn deref(&self) -> &KeyCache {
            &self.cache
        }
    }

    fn record(tenant: &str, created_at: u64) -> KeyRecord {
        KeyRecord {
            tenant: tenant.into(),
            created_at,
            ..KeyRecord::sample()
        }
    }

    /// A fill whose store read began before a revocation must not put the unrevoked
    /// record back into the cache after the revocation's eviction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fill_racing_a_revocation_does_not_cache_stale_data() {
        let store = Arc::new(MemoryStore::new());
        let r = record("t", 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        let cache = Arc::new(Fixture::new(
            store.clone(),
            Duration::from_secs(300),
            Duration::from_secs(2),
        ));
        cache.set_fill_delay(Duration::from_millis(300));
        let filler = {
            let cache = cache.clone();
            let digest = r.digest;
            tokio::spawn(async move { cache.lookup(&digest).await })
        };
        // Let the fill read the unrevoked record and pause.
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.revoke("t", &r.id, 5).await.unwrap().unwrap();
        cache.invalidate(&r.digest).await;
        let (first, _) = filler.await.unwrap().unwrap();
        cache.set_fill_delay(Duration::ZERO);
        let (later, _) = cache.lookup(&r.digest).await.unwrap();
        for (what, entry) in [("racing fill", first), ("later lookup", later)] {
            match entry {
                Entry::Known(id) => {
                    assert_eq!(id.revoked_at(), Some(5), "{what} saw stale data")
                }
                Entry::Unknown => panic!("{what}: the key vanished"),
            }
        }
    }

    /// A record whose id, tenant or scopes are not plain ASCII is refused as corrupt (it
    /// would make an invalid header, or an unreadable tenant in an admin check).
    #[test]
    fn a_record_with_non_ascii_text_is_corrupt() {
        assert!(Identity::new(record("t", 1)).is_ok());
        for bad in [
            KeyRecord {
                tenant: "t\u{e9}".into(),
                ..record("t", 1)
            },
            KeyRecord {
                scopes: vec!["\u{e9}".into()],
                ..record("t", 1)
            },
            KeyRecord {
                tenant: "t\n".into(),
                ..record("t", 1)
            },
        ] {
            assert!(
                matches!(Identity::new(bad), Err(StoreError::Corrupt { .. })),
                "accepted"
            );
        }
    }

    /// The compact identity gives back what the record held: the header values the
    /// proxy sends, the scopes a decision checks, the record's deadlines.
    #[test]
    fn an_identity_keeps_what_the_record_said() {
        let r = KeyRecord {
            scopes: vec!["users:*".into(), "billing:read".into()],
            expires_at: Some(77),
            ..record("acme", 1)
        };
        let id = Identity::new(r.clone()).unwrap();
        assert_eq!((id.id(), id.tenant()), (r.id.as_str(), "acme"));
        assert_eq!(id.id_header(), r.id.as_str());
        assert_eq!(id.tenant_header(), "acme");
        assert_eq!(id.scopes_header(), "users:* billing:read");
        assert_eq!(id.type_header(), "secret");
        assert_eq!(id.scopes().collect::<Vec<_>>(), ["users:*", "billing:read"]);
        assert!(id.grants_all(&["users:write", "billing:read"]));
        assert!(!id.grants_all(&["billing:write"]));
        assert_eq!((id.expires_at(), id.revoked_at()), (Some(77), None));
        assert!(id.is_expired_at(77) && !id.is_expired_at(76) && !id.is_revoked_at(u64::MAX - 1));
        let none = Identity::new(KeyRecord {
            scopes: vec![],
            ..record("acme", 1)
        })
        .unwrap();
        assert_eq!(none.scopes().count(), 0);
        assert!(none.grants_all::<&str>(&[]) && !none.grants_all(&["users:read"]));
        assert_eq!(none.scopes_header(), "");
    }

    /// Limits read from the store are input: out-of-range ones, duplicate names and a
    /// budget that could name another key's counters make the record corrupt.
    #[test]
    fn limits_from_the_store_are_checked() {
        use crate::store::{KeyLimits, RateLimit};
        let with = |limits: KeyLimits| {
            Identity::new(KeyRecord {
                limits,
                ..record("acme", 1)
            })
        };
        let limit = |name: &str, duration_ms| RateLimit {
            name: name.into(),
            limit: 5,
            duration_ms,
        };
        let ok = KeyLimits {
            ratelimits: vec![limit("requests", 1000)],
            budget: Some("01900000-0000-7000-8000-000000000002".into()),
            ..KeyLimits::default()
        };
        let id = with(ok.clone()).unwrap();
        assert_eq!(id.limits.as_deref(), Some(&ok));
        let own = with(KeyLimits {
            budget: None,
            ..ok.clone()
        })
        .unwrap();
        let budget = own.limits.as_ref().and_then(|l| l.budget.clone());
        assert_eq!(
            budget.as_deref(),
            Some("01900000-0000-7000-8000-000000000001")
        );
        let bad = [
            KeyLimits {
                budget: Some("x:requests:1000".into()),
                ..ok.clone()
            },
            KeyLimits {
                budget: Some("{tag}".into()),
                ..ok.clone()
            },
            KeyLimits {
                ratelimits: vec![limit("requests", 1000), limit("requests", 2000)],
                ..ok.clone()
            },
            KeyLimits {
                ratelimits: vec![limit("requests", u64::MAX - 1)],
                ..ok.clone()
            },
            KeyLimits {
                ratelimits: vec![limit("a\"b", 1000)],
                ..ok.clone()
            },
            KeyLimits {
                ratelimits: vec![limit("requests", 0)],
                ..ok.clone()
            },
        ];
        for limits in bad {
            assert!(with(limits.clone()).is_err(), "{limits:?}");
        }
    }

    fn revoked_at(entry: Entry) -> Option<u64> {
        match entry {
            Entry::Known(id) => id.revoked_at(),
            Entry::Unknown => panic!("the key vanished"),
        }
    }

    /// The per-thread front never outlives the TTL: a change the cache was not told about
    /// (no feed) shows once the TTL has passed, as it would without the front.
    #[tokio::test(flavor = "current_thread")]
    async fn the_local_front_honours_the_ttl() {
        let store = Arc::new(MemoryStore::new());
        let r = record("t", 1);
        store.insert(&r).await.unwrap();
        let cache = Fixture::new(
            store.clone(),
            Duration::from_millis(300),
            Duration::from_millis(100),
        );
        assert_eq!(cache.lookup(&r.digest).await.unwrap().1, Source::Store);
        let (e, source) = cache.lookup(&r.digest).await.unwrap();
        assert_eq!((revoked_at(e), source), (None, Source::Cache));
        store.revoke("t", &r.id, 5).await.unwrap().unwrap();
        // Within the TTL the cached record is served (nobody invalidated it)...
        assert_eq!(revoked_at(cache.lookup(&r.digest).await.unwrap().0), None);
        tokio::time::sleep(Duration::from_millis(400)).await;
        // ...after it, the store's answer.
        assert_eq!(
            revoked_at(cache.lookup(&r.digest).await.unwrap().0),
            Some(5)
        );
    }

    /// An invalidation reaches what a thread holds locally at once, and one cache's
    /// entries are never served for another's.
    #[tokio::test(flavor = "current_thread")]
    async fn invalidation_reaches_the_local_front_and_caches_stay_apart() {
        let store = Arc::new(MemoryStore::new());
        let r = record("t", 1);
        store.insert(&r).await.unwrap();
        let other_store = Arc::new(MemoryStore::new());
        let cache = Fixture::new(
            store.clone(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let other = Fixture::new(other_store, Duration::from_secs(60), Duration::from_secs(1));
        cache.lookup(&r.digest).await.unwrap();
        assert_eq!(cache.lookup(&r.digest).await.unwrap().1, Source::Cache);
        assert!(matches!(
            other.lookup(&r.digest).await.unwrap().0,
            Entry::Unknown
        ));
        assert_eq!(revoked_at(cache.lookup(&r.digest).await.unwrap().0), None);

        store.revoke("t", &r.id, 9).await.unwrap().unwrap();
        cache.invalidate(&r.digest).await;
        assert_eq!(
            revoked_at(cache.lookup(&r.digest).await.unwrap().0),
            Some(9)
        );

        store.revoke("t", &r.id, 11).await.unwrap();
        cache.invalidate_all();
        let (e, source) = cache.lookup(&r.digest).await.unwrap();
        assert_eq!(source, Source::Store);
        assert!(revoked_at(e).is_some());
    }
}
