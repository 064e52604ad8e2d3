//! In-process key store for `--dev` and tests: the same behaviour as Redis, one process.

use super::{
    check_cursor, order_key, KeyRecord, KeyStore, KeyUpdate, Page, PageRequest, StoreError,
};
use crate::key::Digest;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};

#[derive(Default)]
struct Inner {
    by_digest: HashMap<Digest, KeyRecord>,
    by_id: HashMap<String, Digest>,
    /// tenant -> order key -> digest
    by_tenant: HashMap<String, BTreeMap<String, Digest>>,
}

#[derive(Default)]
pub struct MemoryStore {
    #[allow(
        clippy::disallowed_types,
        reason = "the dev and test store: a lock per read is fine there"
    )]
    inner: tokio::sync::RwLock<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut g = self.inner.write().await;
        if g.by_digest.contains_key(&record.digest) || g.by_id.contains_key(&record.id) {
            return Err(StoreError::Conflict);
        }
        g.by_id.insert(record.id.clone(), record.digest);
        g.by_tenant
            .entry(record.tenant.clone())
            .or_default()
            .insert(order_key(record), record.digest);
        g.by_digest.insert(record.digest, record.clone());
        Ok(())
    }

    async fn by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.inner.read().await.by_digest.get(digest).cloned())
    }

    /// The whole (dev and test sized) store in one page.
    async fn scan_all(&self, _cursor: u64) -> Result<Option<(u64, Vec<KeyRecord>)>, StoreError> {
        let g = self.inner.read().await;
        Ok(Some((0, g.by_digest.values().cloned().collect())))
    }

    async fn by_id(&self, tenant: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let g = self.inner.read().await;
        Ok(g.by_id
            .get(id)
            .and_then(|d| g.by_digest.get(d))
            .filter(|r| r.tenant == tenant)
            .cloned())
    }

    async fn list(&self, tenant: &str, page: &PageRequest) -> Result<Page, StoreError> {
        if let Some(c) = &page.cursor {
            check_cursor(c)?;
        }
        let g = self.inner.read().await;
        let Some(index) = g.by_tenant.get(tenant) else {
            return Ok(Page::default());
        };
        let range = match &page.cursor {
            Some(c) => index.range(..c.clone()),
            None => index.range::<String, _>(..),
        };
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (_, digest) in range.rev() {
            if items.len() == page.limit {
                next_cursor = items.last().map(order_key);
                break;
            }
            if let Some(r) = g.by_digest.get(digest) {
                items.push(r.clone());
            }
        }
        Ok(Page { items, next_cursor })
    }

    async fn revoke(
        &self,
        tenant: &str,
        id: &str,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut g = self.inner.write().await;
        let Some(digest) = g.by_id.get(id).copied() else {
            return Ok(None);
        };
        match g.by_digest.get_mut(&digest) {
            Some(r) if r.tenant == tenant => {
                if r.revoked_at.is_none_or(|t| t > at_ms) {
                    r.revoked_at = Some(at_ms);
                }
                Ok(Some(r.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn update(
        &self,
        tenant: &str,
        id: &str,
        change: &KeyUpdate,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut g = self.inner.write().await;
        let Some(digest) = g.by_id.get(id).copied() else {
            return Ok(None);
        };
        match g.by_digest.get_mut(&digest) {
            Some(r) if r.tenant == tenant => {
                if r.is_revoked_at(now_ms) {
                    return Err(StoreError::Revoked);
                }
                if let Some(n) = &change.name {
                    r.name = n.clone();
                }
                if let Some(s) = &change.scopes {
                    r.scopes = s.clone();
                }
                if let Some(l) = &change.ratelimits {
                    r.limits.ratelimits = l.clone();
                }
                if let Some(c) = &change.credits {
                    r.limits.credits = c.clone();
                }
                Ok(Some(r.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn rotate(
        &self,
        tenant: &str,
        old_id: &str,
        new: &KeyRecord,
        old_revokes_at: u64,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut g = self.inner.write().await;
        let Some(digest) = g.by_id.get(old_id).copied() else {
            return Ok(None);
        };
        match g.by_digest.get(&digest) {
            Some(r) if r.tenant == tenant => {
                if r.is_revoked_at(now_ms) || r.is_expired_at(now_ms) {
                    return Err(StoreError::NotRotatable);
                }
                if r.successor_id.is_some() {
                    return Err(StoreError::AlreadyRotated);
                }
            }
            _ => return Ok(None),
        }
        if g.by_digest.contains_key(&new.digest) || g.by_id.contains_key(&new.id) {
            return Err(StoreError::Conflict);
        }
        g.by_id.insert(new.id.clone(), new.digest);
        g.by_tenant
            .entry(new.tenant.clone())
            .or_default()
            .insert(order_key(new), new.digest);
        g.by_digest.insert(new.digest, new.clone());
        // Present: checked above under the same lock.
        let Some(old) = g.by_digest.get_mut(&digest) else {
            return Ok(None);
        };
        if old.revoked_at.is_none_or(|t| t > old_revokes_at) {
            old.revoked_at = Some(old_revokes_at);
        }
        old.successor_id = Some(new.id.clone());
        Ok(Some(old.clone()))
    }

    async fn touch(&self, uses: &[(Digest, u64)]) -> Result<(), StoreError> {
        let mut g = self.inner.write().await;
        for (digest, at) in uses {
            if let Some(r) = g.by_digest.get_mut(digest) {
                if r.last_used_at.is_none_or(|t| t < *at) {
                    r.last_used_at = Some(*at);
                }
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
