//! What a reload swaps: one immutable snapshot of everything that may change without a
//! restart (the route table and header policy, their metric handles, the cache's rules),
//! behind one `ArcSwap`. A request loads it once; a reload builds a whole new one from a
//! validated config and stores it, and mutates nothing else.

use crate::auth;
use crate::cache::Ttls;
use crate::config::{Config, OnStoreError};
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::{self, Policy};
use arc_swap::{ArcSwap, Guard};
use std::sync::Arc;

pub struct Snapshot {
    pub policy: Arc<Policy>,
    /// Handles for `policy`'s routes, in its order.
    pub metrics: RouteMetrics,
    pub auth: auth::Rules,
    pub rate_limits: crate::config::RateLimitRules,
}

impl Snapshot {
    /// The snapshot of a validated config's reloadable part.
    pub fn new(config: &Config, metrics: &Metrics) -> Snapshot {
        let live = &config.live;
        let routes = live.policy.routes().iter().map(|r| &*r.name);
        let routes = routes.chain(std::iter::once(policy::UNMATCHED));
        Snapshot {
            metrics: metrics.for_routes(routes),
            policy: live.policy.clone(),
            auth: auth::Rules {
                ttls: Ttls::new(live.cache.ttl, live.cache.negative_ttl),
                deny_on_store_error: live.cache.on_store_error == OnStoreError::Deny,
            },
            rate_limits: live.rate_limits,
        }
    }
}

/// The current snapshot, shared by the proxy, the admin API and reload.
#[derive(Clone)]
pub struct Live(Arc<ArcSwap<Snapshot>>);

impl Live {
    pub fn new(first: Snapshot) -> Live {
        Live(Arc::new(ArcSwap::from_pointee(first)))
    }

    /// The snapshot to use for one request, start to finish.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.0.load()
    }

    /// Swap in a new snapshot: requests in flight keep the one they loaded.
    pub fn store(&self, next: Snapshot) {
        self.0.store(Arc::new(next));
    }
}
