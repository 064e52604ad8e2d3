//! `last_used_at` by write-behind: the proxy notes a use in the cached identity (an atomic
//! compare, at most one queue push per key per second), and a flusher writes the batch to
//! the store every interval in one round trip, and once more at shutdown.

use crate::cache::Identity;
use crate::key::Digest;
use crate::store::KeyStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Pending uses at most; when full, a use is dropped and retried on the key's next use.
const QUEUE: usize = 65_536;

#[derive(Clone)]
pub struct UsageRecorder {
    tx: mpsc::Sender<Arc<Identity>>,
}

pub struct UsageQueue(mpsc::Receiver<Arc<Identity>>);

impl UsageRecorder {
    pub fn new() -> (UsageRecorder, UsageQueue) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (UsageRecorder { tx }, UsageQueue(rx))
    }

    /// Note a successful authentication. Cheap on repeat: one relaxed load per request
    /// once the key was noted in the current second.
    pub fn note(&self, id: &Arc<Identity>, now_ms: u64) {
        if id.last_used_ms.load(Ordering::Relaxed) / 1000 >= now_ms / 1000 {
            return;
        }
        id.last_used_ms.store(now_ms, Ordering::Relaxed);
        if !id.usage_queued.swap(true, Ordering::AcqRel) && self.tx.try_send(id.clone()).is_err() {
            id.usage_queued.store(false, Ordering::Release);
        }
    }
}

/// Drain the queue into one batch of (digest, last use).
fn drain(queue: &mut UsageQueue) -> Vec<(Digest, u64)> {
    let mut batch = Vec::new();
    while let Ok(id) = queue.0.try_recv() {
        // Clear the flag before reading the time: a use after this point queues again.
        id.usage_queued.store(false, Ordering::Release);
        batch.push((id.digest, id.last_used_ms.load(Ordering::Relaxed)));
    }
    batch
}

async fn flush(queue: &mut UsageQueue, store: &dyn KeyStore, metrics: &crate::metrics::Metrics) {
    let batch = drain(queue);
    if batch.is_empty() {
        return;
    }
    if let Err(e) = store.touch(&batch).await {
        // Best effort: last_used_at is informational, never a security decision.
        metrics.store_errors.with_label_values(&["touch"]).inc();
        tracing::warn!(error = %e, keys = batch.len(), "could not record last use");
    }
}

/// Flush every `interval` until `stop` fires, then flush what is left and return.
pub async fn run_flusher(
    mut queue: UsageQueue,
    store: Arc<dyn KeyStore>,
    metrics: Arc<crate::metrics::Metrics>,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => flush(&mut queue, &*store, &metrics).await,
            _ = &mut stop => {
                flush(&mut queue, &*store, &metrics).await;
                return;
            }
        }
    }
}
