//! The key model and the `KeyStore` trait, with `memory` (dev, tests) and `redis`
//! (production, shared by replicas) implementations that behave the same.

pub mod memory;
pub mod redis;

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
}

/// A change to a key's name and/or scopes.
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
}

/// Storage of key records. Every write is atomic: a record is findable by digest
/// only if it is also in its tenant's list and findable by id.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Add a new record (id and digest must be new).
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// The hot-path read: one round trip.
    async fn by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError>;
    /// A tenant's key by id; another tenant's id is `None`.
    async fn by_id(&self, tenant: &str, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// A tenant's keys, newest first.
    async fn list(&self, tenant: &str, page: &PageRequest) -> Result<Page, StoreError>;
    /// Change name and/or scopes in the tenant; returns the record as it now is.
    async fn update(
        &self,
        tenant: &str,
        id: &str,
        change: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Atomically insert `new` (same tenant) and schedule the old key's revocation at
    /// `old_revokes_at` (never later than an earlier scheduled one), linking it to `new`.
    /// `NotRotatable` when the old key is revoked or expired at `now_ms`.
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
    /// Is the store answering?
    async fn ping(&self) -> Result<(), StoreError>;
    /// Short name for logs and metrics.
    fn kind(&self) -> &'static str;
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

#[doc(hidden)]
pub mod contract {
    //! The same behaviour cases, run against every store (unit tests run them on
    //! memory; the integration tests on a real Redis).
    use super::*;
    use crate::key::{self, Environment, KeyType};

    pub fn record(tenant: &str, created_at: u64) -> KeyRecord {
        let id = uuid::Uuid::now_v7().to_string();
        let k = key::generate(
            &key::Prefixes::default(),
            KeyType::Secret,
            Environment::Live,
        )
        .expect("os rng");
        KeyRecord {
            id,
            tenant: tenant.into(),
            name: "n".into(),
            key_type: KeyType::Secret,
            environment: Environment::Live,
            prefix: k.display_prefix(),
            last_four: k.last_four(),
            scopes: vec!["users:read".into(), "*".into()],
            created_at,
            last_used_at: None,
            expires_at: Some(created_at + 1000),
            revoked_at: None,
            successor_id: None,
            digest: key::sha256(k.text.as_bytes()),
        }
    }

    pub async fn run_all(store: &dyn KeyStore) {
        update_and_rotate(store).await;
        touch_records_last_use(store).await;
        insert_and_read_back(store).await;
        tenants_are_isolated(store).await;
        revoke_is_idempotent(store).await;
        list_pages_newest_first(store).await;
    }

    async fn insert_and_read_back(store: &dyn KeyStore) {
        let r = record("t-read", 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        assert_eq!(store.by_digest(&r.digest).await.unwrap(), Some(r.clone()));
        assert_eq!(store.by_id("t-read", &r.id).await.unwrap(), Some(r.clone()));
        assert!(matches!(store.insert(&r).await, Err(StoreError::Conflict)));
        assert_eq!(store.by_digest(&[7u8; 32]).await.unwrap(), None);
    }

    async fn update_and_rotate(store: &dyn KeyStore) {
        let old = record("t-rot", 1_700_000_000_000);
        store.insert(&old).await.unwrap();
        let change = KeyUpdate {
            name: Some("renamed".into()),
            scopes: Some(vec!["a:b".into()]),
        };
        let updated = store
            .update("t-rot", &old.id, &change)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (updated.name.as_str(), updated.scopes.clone()),
            ("renamed", vec!["a:b".to_string()])
        );
        assert_eq!(
            store.by_digest(&old.digest).await.unwrap().unwrap().scopes,
            vec!["a:b".to_string()]
        );
        assert_eq!(
            store.update("t-other", &old.id, &change).await.unwrap(),
            None
        );
        let only_name = KeyUpdate {
            name: Some("again".into()),
            scopes: None,
        };
        let r = store
            .update("t-rot", &old.id, &only_name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.name.as_str(), r.scopes.len()), ("again", 1));

        let mut new = record("t-rot", 1_700_000_000_001);
        new.expires_at = None;
        let now = 1_700_000_000_500;
        let rotated = store
            .rotate("t-rot", &old.id, &new, now + 100, now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rotated.revoked_at, Some(now + 100));
        assert_eq!(rotated.successor_id.as_deref(), Some(new.id.as_str()));
        assert_eq!(
            store.by_digest(&new.digest).await.unwrap(),
            Some(new.clone())
        );
        let ids: Vec<String> = store
            .list(
                "t-rot",
                &PageRequest {
                    limit: 10,
                    cursor: None,
                },
            )
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![new.id.clone(), old.id.clone()]);
        // Revoking during the grace period brings the revocation forward.
        let revoked = store
            .revoke("t-rot", &old.id, now + 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(now + 10));
        // A revoked key cannot be rotated; neither can another tenant's.
        let newer = record("t-rot", 1_700_000_000_002);
        assert!(matches!(
            store
                .rotate("t-rot", &old.id, &newer, now + 1000, now + 20)
                .await,
            Err(StoreError::NotRotatable)
        ));
        assert_eq!(
            store
                .rotate("t-x", &new.id, &newer, now, now)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.by_digest(&newer.digest).await.unwrap(), None);
        // An expired key cannot be rotated (record() expires 1000 ms after creation).
        let expired = record("t-rot", 1_700_000_000_000);
        store.insert(&expired).await.unwrap();
        assert!(matches!(
            store
                .rotate("t-rot", &expired.id, &newer, now + 5000, 1_700_000_002_000)
                .await,
            Err(StoreError::NotRotatable)
        ));
        assert_eq!(store.by_digest(&newer.digest).await.unwrap(), None);
    }

    async fn touch_records_last_use(store: &dyn KeyStore) {
        let r = record("t-touch", 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        store
            .touch(&[(r.digest, 5_000), ([9u8; 32], 6_000)])
            .await
            .unwrap();
        assert_eq!(
            store
                .by_digest(&r.digest)
                .await
                .unwrap()
                .unwrap()
                .last_used_at,
            Some(5_000)
        );
        store.touch(&[(r.digest, 4_000)]).await.unwrap();
        assert_eq!(
            store
                .by_digest(&r.digest)
                .await
                .unwrap()
                .unwrap()
                .last_used_at,
            Some(5_000)
        );
        assert_eq!(store.by_digest(&[9u8; 32]).await.unwrap(), None);
        store.touch(&[]).await.unwrap();
    }

    async fn tenants_are_isolated(store: &dyn KeyStore) {
        let r = record("t-a", 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        assert_eq!(store.by_id("t-b", &r.id).await.unwrap(), None);
        assert_eq!(store.revoke("t-b", &r.id, 5).await.unwrap(), None);
        assert!(store
            .list(
                "t-b",
                &PageRequest {
                    limit: 10,
                    cursor: None
                }
            )
            .await
            .unwrap()
            .items
            .is_empty());
        assert_eq!(store.by_id("t-a", "not-an-id").await.unwrap(), None);
    }

    async fn revoke_is_idempotent(store: &dyn KeyStore) {
        let r = record("t-rev", 1_700_000_000_000);
        store.insert(&r).await.unwrap();
        let first = store.revoke("t-rev", &r.id, 111).await.unwrap().unwrap();
        assert_eq!(first.revoked_at, Some(111));
        let second = store.revoke("t-rev", &r.id, 222).await.unwrap().unwrap();
        assert_eq!(second.revoked_at, Some(111));
        let read = store.by_digest(&r.digest).await.unwrap().unwrap();
        assert_eq!(read.revoked_at, Some(111));
    }

    async fn list_pages_newest_first(store: &dyn KeyStore) {
        let mut made = Vec::new();
        for i in 0..7 {
            let r = record("t-list", 1_700_000_000_000 + i);
            store.insert(&r).await.unwrap();
            made.push(r.id);
        }
        made.reverse();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .list(
                    "t-list",
                    &PageRequest {
                        limit: 3,
                        cursor: cursor.clone(),
                    },
                )
                .await
                .unwrap();
            assert!(page.items.len() <= 3);
            seen.extend(page.items.iter().map(|r| r.id.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, made);
        assert!(matches!(
            store
                .list(
                    "t-list",
                    &PageRequest {
                        limit: 3,
                        cursor: Some("garbage".into())
                    }
                )
                .await,
            Err(StoreError::BadCursor)
        ));
    }
}
