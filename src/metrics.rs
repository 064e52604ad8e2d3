//! Prometheus metrics, registered once. Label values are bounded (route names from config,
//! fixed result codes); hot-path handles are resolved ahead so a request takes no lock.

use crate::cache::Source;
use crate::error::Deny;
use crate::store::topology::StoreStats;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};

/// Brings a counter kept elsewhere up to `seen` (counters only grow).
fn catch_up(counter: &IntCounter, seen: u64) {
    let now = counter.get();
    if seen > now {
        counter.inc_by(seen - now);
    }
}

/// Every `result` label of `keygate_requests_total`: `allowed`, then each `Deny` code in
/// `Deny::iter()` order (a new refusal gets its label without an edit here).
pub fn results() -> impl Iterator<Item = &'static str> {
    std::iter::once("allowed").chain(Deny::iter().map(|d| d.code()))
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
    /// The change feed's health (`feed.rs`).
    pub feed: FeedMetrics,
    pub config_reloads: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    log_lines_dropped: IntCounter,
    /// The store's topology: mode, primary, failovers, unconfirmed writes.
    pub store: StoreMetrics,
    /// Rate-limit and credit decisions.
    limits: LimitMetrics,
    /// Secret-scanning reports (`secret_scanning`).
    pub scanning: ScanMetrics,
    /// `keygate_keys_dormant{kind}`: set by the background count (`dormant`).
    pub keys_dormant: IntGaugeVec,
    /// Serialises scrapes while they bring hits and misses up to date (not a request path).
    #[allow(
        clippy::disallowed_types,
        reason = "taken by scrapes only, never by a request"
    )]
    scrape: std::sync::Mutex<()>,
}

/// Registers each metric as it is made (names are static, so failures are bugs).
struct Builder(Registry);

impl Builder {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("static metric definition"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("static metric definition"))
    }

    /// A counter family whose `known` label values start at 0, so dashboards and alerts
    /// see them before they move.
    fn counters(&self, name: &str, help: &str, label: &str, known: &[&str]) -> IntCounterVec {
        let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("static definition");
        for k in known {
            v.with_label_values(&[k]);
        }
        self.add(v)
    }

    /// `keygate_build_info`, always 1, with the version as a label.
    fn build_info(&self) {
        let opts = Opts::new("keygate_build_info", "keygate build information")
            .const_label("version", env!("CARGO_PKG_VERSION"));
        self.add(IntGauge::with_opts(opts).expect("static metric definition"))
            .set(1);
    }

    /// Exponential buckets from `start` seconds, doubling `count` times.
    fn histograms(
        &self,
        name: &str,
        help: &str,
        start: f64,
        count: usize,
        labels: &[&str],
    ) -> HistogramVec {
        let buckets = prometheus::exponential_buckets(start, 2.0, count).expect("static buckets");
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(HistogramVec::new(opts, labels).expect("static metric definition"))
    }
}

/// What the store saw of its topology (`store::topology::StoreStats`), brought up to
/// date at each scrape.
pub struct StoreMetrics {
    info: IntGaugeVec,
    primary: IntGaugeVec,
    primary_changes: IntCounter,
    failovers: IntCounter,
    ack_failures: IntCounter,
    topology_changes: IntCounter,
    stats: arc_swap::ArcSwapOption<StoreStats>,
}

impl StoreMetrics {
    fn new(b: &Builder) -> StoreMetrics {
        let vec = |name: &str, help: &str, label: &str| {
            b.add(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("static definition"))
        };
        StoreMetrics {
            info: vec(
                "keygate_store_info",
                "The key store's mode (always 1)",
                "mode",
            ),
            primary: vec(
                "keygate_store_primary_info",
                "The Redis primary in use (1; absent while none is known)",
                "node",
            ),
            primary_changes: b.counter(
                "keygate_store_primary_changes_total",
                "Times keygate moved its Redis connections to another primary",
            ),
            failovers: b.counter(
                "keygate_store_failovers_total",
                "Failovers announced by the sentinels (+switch-master)",
            ),
            ack_failures: b.counter(
                "keygate_store_replication_ack_failures_total",
                "Management writes answered replication_unconfirmed (too few replicas in time)",
            ),
            topology_changes: b.counter(
                "keygate_store_topology_changes_total",
                "Redis Cluster: node connections lost or bucket slots moved, seen by the change feed",
            ),
            stats: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Report this store (`mode`: memory, standalone, sentinel, cluster).
    pub fn watch(&self, mode: &'static str, stats: Option<Arc<StoreStats>>) {
        self.info.with_label_values(&[mode]).set(1);
        self.stats.store(stats);
    }

    fn catch_up(&self) {
        let Some(stats) = self.stats.load_full() else {
            return;
        };
        catch_up(&self.primary_changes, stats.primary_changes.load(Relaxed));
        catch_up(&self.failovers, stats.failovers.load(Relaxed));
        catch_up(&self.ack_failures, stats.ack_failures.load(Relaxed));
        catch_up(&self.topology_changes, stats.topology_changes.load(Relaxed));
        self.primary.reset();
        if let Some(node) = stats.primary.load_full() {
            self.primary.with_label_values(&[node.as_str()]).set(1);
        }
    }
}

/// `keygate_ratelimit_decisions_total{limit, result}`. Route limit names come from the
/// config, key limit names from the admin API: past `MAX_LIMIT_LABELS` distinct names,
/// the rest count as `other`, so a client cannot grow the label set without bound.
struct LimitMetrics {
    decisions: IntCounterVec,
    /// Tallies by limit name: an open-addressed table whose buckets are set once and
    /// never change, so a lookup is a hash, a load and a compare (it runs once per limit
    /// per limited request, on every proxy thread).
    seen: [OnceLock<Box<Tally>>; LIMIT_BUCKETS],
    names: AtomicUsize,
    /// Every name past the cap.
    other: Tally,
}

/// One limit name's decisions. Every limited request counts one, on every proxy thread:
/// a counter both threads write would move its cache line between the cores on each
/// request, so each thread adds to its own stripe and a scrape sums them into `handles`.
struct Tally {
    name: Box<str>,
    handles: [IntCounter; 4],
    stripes: [Stripe; STRIPES],
}

/// One thread's counts by result, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Stripe([AtomicU64; 4]);

/// Stripes per name: threads past this many share one (still exact: they are atomic).
const STRIPES: usize = 8;

thread_local! {
    /// This thread's stripe, handed out in turn on first use.
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

impl Tally {
    fn new(decisions: &IntCounterVec, name: &str) -> Tally {
        Tally {
            name: name.into(),
            handles: LIMIT_RESULTS.map(|r| decisions.with_label_values(&[name, r])),
            stripes: Default::default(),
        }
    }

    fn add(&self, result: LimitResult) {
        let stripe = STRIPE.with(|s| *s);
        self.stripes[stripe].0[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Bring the exported counters up to the stripes' sums.
    fn catch_up(&self) {
        for (i, handle) in self.handles.iter().enumerate() {
            let sum = self
                .stripes
                .iter()
                .map(|s| s.0[i].load(Ordering::Relaxed))
                .sum();
            catch_up(handle, sum);
        }
    }
}

/// The `result` label values, in `LimitResult` order.
const LIMIT_RESULTS: [&str; 4] = ["admitted", "refused", "unchecked", "store_error_denied"];
const MAX_LIMIT_LABELS: usize = 64;
/// Twice the names it holds at most, so probes stay short and always end.
const LIMIT_BUCKETS: usize = 2 * MAX_LIMIT_LABELS;

/// What a rate-limit decision was, for `keygate_ratelimit_decisions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitResult {
    Admitted,
    Refused,
    Unchecked,
    StoreErrorDenied,
}

impl LimitMetrics {
    fn new(b: &Builder) -> LimitMetrics {
        let opts = Opts::new(
            "keygate_ratelimit_decisions_total",
            "Rate-limit and credit decisions, by limit name and result",
        );
        let decisions =
            b.add(IntCounterVec::new(opts, &["limit", "result"]).expect("static definition"));
        let other = Tally::new(&decisions, "other");
        LimitMetrics {
            decisions,
            seen: std::array::from_fn(|_| OnceLock::new()),
            // "other" is a label too: the table holds one name fewer.
            names: AtomicUsize::new(1),
            other,
        }
    }

    /// The tally of `limit`, made on its first decision ("other"'s past the cap).
    fn tally(&self, limit: &str) -> &Tally {
        let start = xxhash_rust::xxh3::xxh3_64(limit.as_bytes()) as usize % LIMIT_BUCKETS;
        for i in 0..LIMIT_BUCKETS {
            let bucket = &self.seen[(start + i) % LIMIT_BUCKETS];
            let tally = match bucket.get() {
                Some(found) => found,
                None if limit == "other" => return &self.other,
                None if self.names.load(Ordering::Relaxed) >= MAX_LIMIT_LABELS => {
                    return &self.other;
                }
                None => bucket.get_or_init(|| {
                    self.names.fetch_add(1, Ordering::Relaxed);
                    Box::new(Tally::new(&self.decisions, limit))
                }),
            };
            if *tally.name == *limit {
                return tally;
            }
        }
        // Not reached: the table has room for every name it admits.
        &self.other
    }

    fn decision(&self, limit: &str, result: LimitResult) {
        self.tally(limit).add(result);
    }

    fn catch_up(&self) {
        for tally in self.seen.iter().filter_map(OnceLock::get) {
            tally.catch_up();
        }
        self.other.catch_up();
    }
}

/// `keygate_secret_scanning_tokens_total{label, action}` (each reported token: what it
/// was and what was done) and `keygate_secret_scanning_refused_total{reason}` (reports
/// refused whole). Every label value is one of the fixed lists below.
pub struct ScanMetrics {
    tokens: IntCounterVec,
    refused: IntCounterVec,
}

/// A reported token's `label` values.
pub const SCAN_LABELS: [&str; 2] = ["true_positive", "false_positive"];
/// What was done about a reported token: its `action` values.
pub const SCAN_ACTIONS: [&str; 4] = ["revoked", "already_revoked", "reported", "none"];
/// Why a whole report was refused: its `reason` values.
pub const SCAN_REFUSALS: [&str; 6] = [
    "unsigned",
    "unknown_key_identifier",
    "bad_signature",
    "too_large",
    "invalid_body",
    "timeout",
];

impl ScanMetrics {
    fn new(b: &Builder) -> ScanMetrics {
        let opts = Opts::new(
            "keygate_secret_scanning_tokens_total",
            "Tokens reported by secret scanners, by label and what was done",
        );
        let tokens = IntCounterVec::new(opts, &["label", "action"]).expect("static definition");
        for label in SCAN_LABELS {
            for action in SCAN_ACTIONS {
                tokens.with_label_values(&[label, action]);
            }
        }
        ScanMetrics {
            tokens: b.add(tokens),
            refused: b.counters(
                "keygate_secret_scanning_refused_total",
                "Secret-scanning reports refused whole, by reason",
                "reason",
                &SCAN_REFUSALS,
            ),
        }
    }

    /// One reported token; values outside the fixed lists are not counted.
    pub fn token(&self, label: &str, action: &str) {
        if SCAN_LABELS.contains(&label) && SCAN_ACTIONS.contains(&action) {
            self.tokens.with_label_values(&[label, action]).inc();
        }
    }

    /// One refused report; a reason outside the fixed list is not counted.
    pub fn refused(&self, reason: &str) {
        if SCAN_REFUSALS.contains(&reason) {
            self.refused.with_label_values(&[reason]).inc();
        }
    }
}

/// The change feed: messages, reconnects, flushes, lag.
pub struct FeedMetrics {
    pub received: IntCounterVec,
    pub malformed: IntCounter,
    pub reconnects: IntCounter,
    pub flushes: IntCounterVec,
    pub up: IntGauge,
    lag: Histogram,
}

impl FeedMetrics {
    fn new(b: &Builder) -> FeedMetrics {
        let lag = HistogramOpts::new(
            "keygate_invalidation_lag_seconds",
            "From a change's commit (time in the message) to its local eviction",
        )
        .buckets(prometheus::exponential_buckets(1e-4, 2.0, 16).expect("static buckets"));
        FeedMetrics {
            received: b.counters(
                "keygate_invalidations_received_total",
                "Key change messages received from the store, by event",
                "event",
                &[],
            ),
            malformed: b.counter(
                "keygate_invalidations_malformed_total",
                "Change messages that could not be parsed (ignored)",
            ),
            reconnects: b.counter(
                "keygate_pubsub_reconnects_total",
                "Times the change subscription was re-established",
            ),
            flushes: b.counters(
                "keygate_cache_flushes_total",
                "Whole-cache flushes, by reason (subscribe, gap, counter_ahead, counter_missing, counter_back)",
                "reason",
                &["subscribe", "gap", "counter_ahead", "counter_missing", "counter_back"],
            ),
            up: b.gauge("keygate_pubsub_connected", "1 while the change subscription is up"),
            lag: b.add(Histogram::with_opts(lag).expect("static metric definition")),
        }
    }

    /// A change message was applied: count it and record its propagation lag.
    pub fn observe(&self, event: &str, committed_ms: u64) {
        self.received.with_label_values(&[event]).inc();
        let now = crate::time::now_ms();
        if now >= committed_ms {
            self.lag.observe((now - committed_ms) as f64 / 1000.0);
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let b = Builder(Registry::new());
        let requests = b.add(
            IntCounterVec::new(
                Opts::new(
                    "keygate_requests_total",
                    "Proxied requests by route and result",
                ),
                &["route", "result"],
            )
            .expect("static metric definition"),
        );
        // 1 µs to ~1 s: a cache hit is microseconds, a store read under a millisecond.
        let auth_duration = b.histograms(
            "keygate_auth_duration_seconds",
            "Time to authenticate a request's key, by result and source",
            1e-6,
            21,
            &["result", "source"],
        );
        let upstream_duration = b.histograms(
            "keygate_upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head, by route",
            1e-4,
            20,
            &["route"],
        );
        b.build_info();
        let h = |r: &str, s: &str| auth_duration.with_label_values(&[r, s]);
        Metrics {
            requests,
            upstream_duration,
            cache_entries: b.gauge("keygate_cache_entries", "Entries in the key cache"),
            store_errors: b.counters(
                "keygate_store_errors_total",
                "Key store errors by operation",
                "operation",
                &["read", "touch"],
            ),
            auth_handles: [
                [h("allowed", "cache"), h("allowed", "store")],
                [h("denied", "cache"), h("denied", "store")],
                [h("error", "cache"), h("error", "store")],
            ],
            feed: FeedMetrics::new(&b),
            config_reloads: b.counters(
                "keygate_config_reloads_total",
                "Configuration reloads by result",
                "result",
                &["success", "failure"],
            ),
            cache_hits: b.counter(
                "keygate_cache_hits_total",
                "Key checks answered from the cache",
            ),
            cache_misses: b.counter(
                "keygate_cache_misses_total",
                "Key checks that read the store (one read per coalesced miss)",
            ),
            log_lines_dropped: b.counter(
                "keygate_log_lines_dropped_total",
                "Log lines (access log included) dropped because stderr could not keep up",
            ),
            store: StoreMetrics::new(&b),
            limits: LimitMetrics::new(&b),
            scanning: ScanMetrics::new(&b),
            // No label value until the first count ends: absent rather than a false 0.
            keys_dormant: b.add(
                IntGaugeVec::new(
                    Opts::new(
                        "keygate_keys_dormant",
                        "Live keys never used, and live keys unused for 30 days (last complete count)",
                    ),
                    &["kind"],
                )
                .expect("static metric definition"),
            ),
            #[allow(clippy::disallowed_types, reason = "see the field")]
            scrape: std::sync::Mutex::new(()),
            registry: b.0,
        }
    }

    /// One limit's part in a decision: `admitted`, `refused`, `unchecked` (the store could
    /// not be asked; admitted) or `store_error_denied`.
    pub fn ratelimit_decision(&self, limit: &str, result: LimitResult) {
        self.limits.decision(limit, result);
    }

    pub fn observe_auth(&self, outcome: AuthOutcome, source: Source, seconds: f64) {
        self.auth_handles[outcome as usize][source as usize].observe(seconds);
    }

    /// Resolve the per-route handles for a route table's names, in its order (at load
    /// and at every reload); the last name is what a request without a route counts as.
    pub fn for_routes<'a>(&self, names: impl Iterator<Item = &'a str>) -> RouteMetrics {
        let routes = names
            .map(|name| PerRoute {
                results: results()
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
            catch_up(counter, seen);
        }
        catch_up(&self.log_lines_dropped, crate::logging::dropped_lines());
        self.store.catch_up();
        self.limits.catch_up();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics could not be encoded; the scrape is partial");
        }
        String::from_utf8_lossy(&buf).into_owned()
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
    pub fn allowed(&self) {
        self.results[0].inc();
    }

    /// Counted under the refusal's own label: `results()` puts `Deny::iter()` after
    /// `allowed`, in `Deny::index` order.
    pub fn denied(&self, deny: &Deny) {
        self.results[1 + deny.index()].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal is counted under its own code on every route, never under another.
    #[test]
    fn each_refusal_counts_under_its_code() {
        let m = Metrics::new();
        let routes = m.for_routes(["users", "unmatched"].into_iter());
        for deny in Deny::iter() {
            routes.route(Some(0)).denied(&deny);
            routes.route(None).denied(&deny);
            for route in ["users", "unmatched"] {
                let c = m.requests.with_label_values(&[route, deny.code()]);
                assert_eq!(c.get(), 1, "{route} {}", deny.code());
            }
        }
        routes.route(Some(0)).allowed();
        assert_eq!(m.requests.with_label_values(&["users", "allowed"]).get(), 1);
        assert_eq!(results().count(), 1 + Deny::iter().count());
    }

    /// Decisions counted on many threads (each on its own stripe) all reach a scrape.
    #[test]
    fn decisions_from_many_threads_add_up_in_a_scrape() {
        let m = Metrics::new();
        std::thread::scope(|s| {
            for t in 0..2 * STRIPES {
                let m = &m;
                s.spawn(move || {
                    for _ in 0..1000 {
                        m.ratelimit_decision("per-key", LimitResult::Admitted);
                    }
                    m.ratelimit_decision("per-key", LimitResult::Refused);
                    if t == 0 {
                        m.ratelimit_decision("daily", LimitResult::Unchecked);
                    }
                });
            }
        });
        let text = m.render();
        let value = |labels: &str| {
            let line = text.lines().find(|l| l.contains(labels));
            line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        let n = 2 * STRIPES as u64;
        let per_key = "limit=\"per-key\",result=";
        assert_eq!(
            value(&format!("{per_key}\"admitted\"")),
            Some(1000 * n),
            "{text}"
        );
        assert_eq!(value(&format!("{per_key}\"refused\"")), Some(n), "{text}");
        let daily = "limit=\"daily\",result=\"unchecked\"";
        assert_eq!(value(daily), Some(1), "{text}");
        // A second scrape adds nothing twice.
        let decisions = |t: &str| {
            let lines = t
                .lines()
                .filter(|l| l.starts_with("keygate_ratelimit_decisions"));
            lines.map(str::to_string).collect::<Vec<_>>()
        };
        assert_eq!(decisions(&m.render()), decisions(&text));
    }

    /// Limit names are labels up to the cap, then `other`; every decision is counted once.
    #[test]
    fn limit_names_past_the_cap_count_as_other() {
        let m = Metrics::new();
        let name = |i: usize| format!("limit-{i}");
        for round in 0..3 {
            for i in 0..100 {
                m.ratelimit_decision(&name(i), LimitResult::Admitted);
            }
            m.ratelimit_decision(&name(7), LimitResult::Refused);
            m.limits.catch_up();
            let count = |label: &str, result: &str| {
                m.limits.decisions.with_label_values(&[label, result]).get()
            };
            let each = round + 1;
            for i in 0..MAX_LIMIT_LABELS - 1 {
                assert_eq!(count(&name(i), "admitted"), each, "{}", name(i));
            }
            let past = (100 - (MAX_LIMIT_LABELS - 1)) as u64;
            assert_eq!(count("other", "admitted"), past * each);
            assert_eq!(count(&name(7), "refused"), each);
        }
        let text = m.render();
        let labels = (text.lines())
            .filter(|l| l.starts_with("keygate_ratelimit_decisions_total{"))
            .filter(|l| l.contains("result=\"admitted\""))
            .count();
        assert_eq!(labels, MAX_LIMIT_LABELS, "{text}");
    }
}
