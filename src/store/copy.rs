//! `keygate migrate`: copy every record of a standalone (or Sentinel) dataset into
//! another store, such as a Redis Cluster, whose layout differs. Records are copied as
//! they are (revocations, expiry, successors, last use, rate limits and credits
//! included); a record already in the target with the same id counts as present, so a
//! rerun after an interruption is safe.

use super::redis::RedisStore;
use super::{KeyRecord, KeyStore, StoreError};

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
    pub copied: u64,
    /// Already in the target (an earlier, interrupted run).
    pub present: u64,
    /// Not copied: unreadable in the source, or the target refused it (logged by id).
    pub failed: u64,
}

/// Tries per record when the target is briefly unavailable.
const TRIES: usize = 3;

/// Copy every record from `from` into `to`; `progress` is called after each page.
pub async fn copy_records(
    from: &RedisStore,
    to: &dyn KeyStore,
    mut progress: impl FnMut(&CopyReport),
) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut cursor = 0;
    loop {
        let (next, page, unreadable) = from.scan_records(cursor).await?;
        report.failed += unreadable;
        for record in &page {
            match copy_one(record, to).await {
                Ok(true) => report.copied += 1,
                Ok(false) => report.present += 1,
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "key not copied");
                    report.failed += 1;
                }
            }
        }
        progress(&report);
        if next == 0 {
            return Ok(report);
        }
        cursor = next;
    }
}

/// `true` copied, `false` already there.
async fn copy_one(record: &KeyRecord, to: &dyn KeyStore) -> Result<bool, StoreError> {
    let mut last = None;
    for _ in 0..TRIES {
        match to.insert(record).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Conflict) => {
                return match to.by_digest(&record.digest).await? {
                    Some(r) if r.id == record.id => Ok(false),
                    _ => Err(StoreError::Conflict),
                };
            }
            Err(
                e @ (StoreError::Unavailable(_)
                | StoreError::Timeout
                | StoreError::Unconfirmed { .. }),
            ) => {
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(StoreError::Timeout))
}
