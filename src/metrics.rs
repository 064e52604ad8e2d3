//! Prometheus metrics, registered once. Label values are bounded (route names from config,
//! fixed result codes); hot-path handles are resolved ahead so a request takes no lock.

use crate::cache::Source;
use crate::policy::Policy;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every `result` label of `keygate_requests_total`.
pub const RESULTS: &[&str] = &[
    "allowed",
    "missing_key",
    "unsupported_auth_scheme",
    "multiple_authorization",
    "malformed_key",
    "unknown_key",
    "expired_key",
    "revoked_key",
    "publishable_key_not_allowed",
    "insufficient_scope",
    "no_route",
    "bad_path",
    "bad_host",
    "bad_request_body",
    "bad_method",
    "request_timeout",
    "too_many_headers",
    "uri_too_long",
    "body_too_large",
    "store_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
];

pub fn result_index(code: &str) -> usize {
    RESULTS.iter().position(|r| *r == code).unwrap_or(0)
}

/// Outcome of a key check, for the auth-duration histogram.
#[derive(Debug, Clone, Copy)]
pub enum AuthOutcome {
    Allowed = 0,
    Denied = 1,
    Error = 2,
}

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    upstream_duration: HistogramVec,
    pub cache_entries: IntGauge,
    pub store_errors: IntCounterVec,
    auth_handles: [[Histogram; 2]; 3],
    pub feed_received: IntCounterVec,
    pub feed_malformed: IntCounter,
    pub feed_reconnects: IntCounter,
    pub feed_flushes: IntCounterVec,
    pub feed_up: IntGauge,
    feed_lag: Histogram,
    pub config_reloads: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    /// Serialises scrapes while they bring hits and misses up to date (not a request path).
    scrape: std::sync::Mutex<()>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Proxied requests by route and result",
            ),
            &["route", "result"],
        )
        .expect("static metric definition");
        // 1 µs to ~1 s: a cache hit is microseconds, a store read under a millisecond.
        let buckets = prometheus::exponential_buckets(1e-6, 2.0, 21).expect("static buckets");
        let auth_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_auth_duration_seconds",
                "Time to authenticate a request's key, by result and source",
            )
            .buckets(buckets),
            &["result", "source"],
        )
        .expect("static metric definition");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response head, by route",
            )
            .buckets(prometheus::exponential_buckets(1e-4, 2.0, 20).expect("static buckets")),
            &["route"],
        )
        .expect("static metric definition");
        let cache_entries = IntGauge::new("keygate_cache_entries", "Entries in the key cache")
            .expect("static metric definition");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "keygate_store_errors_total",
                "Key store errors by operation",
            ),
            &["operation"],
        )
        .expect("static metric definition");
        let build = IntGauge::with_opts(
            Opts::new("keygate_build_info", "keygate build information")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("static metric definition");
        build.set(1);
        let feed_received = IntCounterVec::new(
            Opts::new(
                "keygate_invalidations_received_total",
                "Key change messages received from the store, by event",
            ),
            &["event"],
        )
        .expect("static metric definition");
        let feed_malformed = IntCounter::new(
            "keygate_invalidations_malformed_total",
            "Change messages that could not be parsed (ignored)",
        )
        .expect("static metric definition");
        let feed_reconnects = IntCounter::new(
            "keygate_pubsub_reconnects_total",
            "Times the change subscription was re-established",
        )
        .expect("static metric definition");
        let feed_flushes = IntCounterVec::new(
            Opts::new(
                "keygate_cache_flushes_total",
                "Whole-cache flushes, by reason (subscribe, gap, counter_ahead, counter_missing, counter_back)",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let feed_up = IntGauge::new(
            "keygate_pubsub_connected",
            "1 while the change subscription is up",
        )
        .expect("static metric definition");
        let feed_lag = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_invalidation_lag_seconds",
                "From a change's commit (time in the message) to its local eviction",
            )
            .buckets(prometheus::exponential_buckets(1e-4, 2.0, 16).expect("static buckets")),
        )
        .expect("static metric definition");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "keygate_config_reloads_total",
                "Configuration reloads by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let cache_hits = IntCounter::new(
            "keygate_cache_hits_total",
            "Key checks answered from the cache",
        )
        .expect("static metric definition");
        let cache_misses = IntCounter::new(
            "keygate_cache_misses_total",
            "Key checks that read the store (one read per coalesced miss)",
        )
        .expect("static metric definition");
        for c in [
            Box::new(cache_hits.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cache_misses.clone()),
            Box::new(config_reloads.clone()),
            Box::new(requests.clone()),
            Box::new(auth_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(cache_entries.clone()),
            Box::new(store_errors.clone()),
            Box::new(build),
            Box::new(feed_received.clone()),
            Box::new(feed_malformed.clone()),
            Box::new(feed_reconnects.clone()),
            Box::new(feed_flushes.clone()),
            Box::new(feed_up.clone()),
            Box::new(feed_lag.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Known label values start at 0 so dashboards and alerts see them before they move.
        for r in ["success", "failure"] {
            config_reloads.with_label_values(&[r]);
        }
        for r in [
            "subscribe",
            "gap",
            "counter_ahead",
            "counter_missing",
            "counter_back",
        ] {
            feed_flushes.with_label_values(&[r]);
        }
        for op in ["read", "touch"] {
            store_errors.with_label_values(&[op]);
        }
        let h = |r: &str, s: &str| auth_duration.with_label_values(&[r, s]);
        let auth_handles = [
            [h("allowed", "cache"), h("allowed", "store")],
            [h("denied", "cache"), h("denied", "store")],
            [h("error", "cache"), h("error", "store")],
        ];
        Metrics {
            registry,
            requests,
            upstream_duration,
            cache_entries,
            store_errors,
            auth_handles,
            feed_received,
            feed_malformed,
            feed_reconnects,
            feed_flushes,
            feed_up,
            feed_lag,
            config_reloads,
            cache_hits,
            cache_misses,
            scrape: std::sync::Mutex::new(()),
        }
    }

    pub fn observe_auth(&self, outcome: AuthOutcome, source: Source, seconds: f64) {
        self.auth_handles[outcome as usize][source as usize].observe(seconds);
    }

    /// A change message was applied: count it and record its propagation lag.
    pub fn observe_feed(&self, event: &str, committed_ms: u64) {
        self.feed_received.with_label_values(&[event]).inc();
        let now = crate::time::now_ms();
        if now >= committed_ms {
            self.feed_lag.observe((now - committed_ms) as f64 / 1000.0);
        }
    }

    /// Resolve the per-route handles for a policy (at load and at every reload).
    pub fn for_policy(&self, policy: &Policy) -> RouteMetrics {
        let mut names: Vec<&str> = policy.routes().iter().map(|r| &*r.name).collect();
        names.push("unmatched");
        let routes = names
            .iter()
            .map(|name| PerRoute {
                results: RESULTS
                    .iter()
                    .map(|res| self.requests.with_label_values(&[name, res]))
                    .collect(),
                upstream: self.upstream_duration.with_label_values(&[name]),
            })
            .collect();
        RouteMetrics { routes }
    }

    pub fn render(&self) -> String {
        // Hits and misses are the auth histogram's counts by source, brought up to date
        // here so the hot path pays for one histogram observation only.
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for (counter, source) in [
            (&self.cache_hits, Source::Cache),
            (&self.cache_misses, Source::Store),
        ] {
            let seen: u64 = self
                .auth_handles
                .iter()
                .map(|by_source| by_source[source as usize].get_sample_count())
                .sum();
            let now = counter.get();
            if seen > now {
                counter.inc_by(seen - now);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct PerRoute {
    results: Vec<IntCounter>,
    pub upstream: Histogram,
}

/// Handles per route index (the last one is for requests no route matched).
pub struct RouteMetrics {
    routes: Vec<PerRoute>,
}

impl RouteMetrics {
    pub fn route(&self, index: Option<usize>) -> &PerRoute {
        let last = self.routes.len() - 1;
        &self.routes[index.unwrap_or(last).min(last)]
    }
}

impl PerRoute {
    pub fn count(&self, result: usize) {
        self.results[result].inc();
    }
}
