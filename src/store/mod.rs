//! The key model and the `KeyStore` trait, with `memory` (dev, tests) and `redis`
//! (production, shared by replicas) implementations that behave the same.

pub mod cluster;
pub mod copy;
pub mod memory;
pub mod redis;
pub mod topology;

use crate::key::{Digest, Environment, KeyType};
use async_trait::async_trait;
use std::fmt;

/// One API key as stored. The key text itself is never here: only its digest.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// UUIDv7: time-ordered, so ids sort by creation.
    pub id: String,
    /// The jack document's `org_id`; HelloJohn's tenant.
    pub tenant: String,
    /// The jack document's `label`; HelloJohn's `name`.
    pub name: String,
    pub key_type: KeyType,
    pub environment: Environment,
    /// Type prefix plus the first body characters (safe to show and log).
    pub prefix: String,
    pub last_four: String,
    pub scopes: Vec<String>,
    pub created_at: u64,
    pub last_used_at: Option<u64>,
    pub expires_at: Option<u64>,
    /// When the key stops authenticating; in the future during a rotation grace period.
    pub revoked_at: Option<u64>,
    /// Set on a rotated key: the id of the key that replaced it.
    pub successor_id: Option<String>,
    pub digest: Digest,
    /// The key's own rate limits and credits (empty: none).
    pub limits: KeyLimits,
    /// `digest` is plain SHA-256 of a text keygate never saw (imported by hash): only a
    /// legacy-format token may match it, never a keygate key (see `auth`).
    pub plain_sha256: bool,
}

/// A valid record (tenant `t`, scope `*`; never used, expiring or revoked), for unit tests
/// that need one: change what the test is about with `..KeyRecord::sample()`.
#[cfg(test)]
impl KeyRecord {
    pub fn sample() -> KeyRecord {
        KeyRecord {
            id: "01900000-0000-7000-8000-000000000001".into(),
            tenant: "t".into(),
            name: "n".into(),
            key_type: crate::key::KeyType::Secret,
            environment: crate::key::Environment::Live,
            prefix: "sk_live_abcd".into(),
            last_four: "wxyz".into(),
            scopes: vec!["*".into()],
            created_at: 1,
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
            successor_id: None,
            digest: [3u8; 32],
            limits: Default::default(),
            plain_sha256: false,
        }
    }
}

/// A key's own rate limits and credits. Counted under `budget` (the key's own id, or for
/// a key made by rotation the id of the first key of the chain), so old and new key share
/// one budget during a rotation's grace period.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyLimits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratelimits: Vec<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// Whose counters this key spends; `None`: its own id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
}

impl KeyLimits {
    pub fn is_empty(&self) -> bool {
        self.ratelimits.is_empty() && self.credits.is_none()
    }
}

/// `limit` requests per `duration_ms`, counted in fixed windows aligned to the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    pub name: String,
    pub limit: u64,
    pub duration_ms: u64,
}

/// Credits: `remaining` as of `set_at` (ms), spent by each admitted request's cost; with a
/// refill, every `interval_ms` after `set_at` the remaining credits are `amount` again.
/// Changing them (PATCH) sets a new `set_at`, which starts a new spent counter.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credits {
    pub remaining: u64,
    pub set_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<Refill>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refill {
    pub amount: u64,
    pub interval_ms: u64,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("prefix", &self.prefix)
            .field("type", &self.key_type)
            .field("scopes", &self.scopes)
            .field("revoked_at", &self.revoked_at)
            .field("plain_sha256", &self.plain_sha256)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// Revoked now (a future `revoked_at` is a rotation grace period: still valid).
    pub fn is_revoked_at(&self, now_ms: u64) -> bool {
        self.revoked_at.is_some_and(|t| t <= now_ms)
    }
    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_ms)
    }
}

/// Listing order is newest first; `cursor` is opaque to clients.
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    pub limit: usize,
    pub cursor: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Page {
    pub items: Vec<KeyRecord>,
    /// Present when more items follow.
    pub next_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
    #[error("store returned a malformed record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("a key with this id or digest already exists")]
    Conflict,
    #[error("invalid cursor")]
    BadCursor,
    #[error("the key is revoked or expired and cannot be rotated")]
    NotRotatable,
    /// The key already has a successor: a second rotation would fork it into two live keys.
    #[error("the key already has a successor and cannot be rotated again")]
    AlreadyRotated,
    #[error("the key is revoked and cannot be changed")]
    Revoked,
    /// The change was written on the primary but fewer than `wanted` replicas confirmed
    /// it within the ack timeout: a failover now may or may not keep it. Every write is
    /// safe to repeat (revoke and update are idempotent).
    #[error("the change reached {acked} of {wanted} replicas in time")]
    Unconfirmed { acked: u32, wanted: u32 },
}

/// A change to a key's name, scopes, rate limits and/or credits.
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// Replaces the key's rate limits (a limit keeps its counter while its name and
    /// duration stay the same).
    pub ratelimits: Option<Vec<RateLimit>>,
    /// `Some(None)`: unlimited from now on; `Some(Some(c))`: these credits from now on.
    pub credits: Option<Option<Credits>>,
}

/// Storage of key records. Every write is atomic: a record is findable by digest
/// only if it is also in its tenant's list and findable by id.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Add a new record (id and digest must be new).
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// The hot-path read: one round trip.
    async fn by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError>;
    /// A handle for one proxy worker's key reads (`by_digest`), when this store does
    /// better with one per worker thread; `None`: read through the shared store.
    fn worker_reader(&self) -> Option<std::sync::Arc<dyn KeyStore>> {
        None
    }
    /// A tenant's key by id; another tenant's id is `None`.
    async fn by_id(&self, tenant: &str, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// A tenant's keys, newest first.
    async fn list(&self, tenant: &str, page: &PageRequest) -> Result<Page, StoreError>;
    /// Change name and/or scopes in the tenant; returns the record as it now is.
    /// `Revoked` (and nothing changed) when the key is revoked at `now_ms`: checked in the
    /// same atomic step as the write, so a concurrent revoke is either seen or later.
    /// Applying the same change twice gives the same record.
    async fn update(
        &self,
        tenant: &str,
        id: &str,
        change: &KeyUpdate,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Atomically insert `new` (same tenant) and schedule the old key's revocation at
    /// `old_revokes_at` (never later than an earlier scheduled one), linking it to `new`.
    /// `NotRotatable` when the old key is revoked or expired at `now_ms`, else
    /// `AlreadyRotated` when it has a successor: concurrent rotations make one new key.
    /// Returns the old record as it now is; `None` when it is not in the tenant.
    async fn rotate(
        &self,
        tenant: &str,
        old_id: &str,
        new: &KeyRecord,
        old_revokes_at: u64,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Revoke at `at_ms` unless already revoked by then (a rotation's future revocation
    /// is brought forward); returns the record as it now is. Revoking twice changes nothing.
    async fn revoke(
        &self,
        tenant: &str,
        id: &str,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Record last uses (digest, ms) in one round trip; a later time never goes back,
    /// unknown digests are skipped. No change event: it affects no decision.
    async fn touch(&self, uses: &[(Digest, u64)]) -> Result<(), StoreError>;
    /// One page of every record of every tenant, for background counts (`dormant`):
    /// start at cursor 0; the next cursor is 0 at the end. `None`: this store cannot
    /// scan all records (Redis Cluster).
    async fn scan_all(&self, _cursor: u64) -> Result<Option<(u64, Vec<KeyRecord>)>, StoreError> {
        Ok(None)
    }
    /// Is the store answering?
    async fn ping(&self) -> Result<(), StoreError>;
    /// Short name for logs and metrics.
    fn kind(&self) -> &'static str;
    /// Where rate-limit counters live in this store (`None`: in this process).
    fn scripts(&self) -> Option<std::sync::Arc<dyn Scripts>> {
        None
    }
}

/// Runs a rate-limit script (`limits::redis`) on the node that owns its keys; every key
/// of one call shares a hash tag, so one slot in Redis Cluster.
#[async_trait]
pub trait Scripts: Send + Sync + 'static {
    async fn eval(
        &self,
        script: &::redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<::redis::Value, StoreError>;
    /// The key prefix of this keygate's data (`store.redis.namespace`).
    fn namespace(&self) -> &str;
}

/// Sort key of the tenant index: creation time then id, fixed width, so byte order is
/// creation order and a cursor taken from it is stable under concurrent creates.
pub(crate) fn order_key(record: &KeyRecord) -> String {
    format!("{:016x}:{}", record.created_at, record.id)
}

/// Cursors are the order key of the last item returned, checked on the way back in.
pub(crate) fn check_cursor(cursor: &str) -> Result<(), StoreError> {
    let (ts, id) = cursor.split_once(':').ok_or(StoreError::BadCursor)?;
    let ok = ts.len() == 16
        && ts.bytes().all(|b| b.is_ascii_hexdigit())
        && !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(()).ok_or(StoreError::BadCursor)
}
