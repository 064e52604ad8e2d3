//! The one rate-limit decision for a proxied request: every limit that applies (the key's,
//! the route's) and the key's credits admit it, or it is refused and spends nothing.

use super::local::{Few, KeyRun, Local, Slot};
use super::{reset_in, Counter, Decision, Headroom, Kind, LimitStore};
use crate::cache::Identity;
use crate::config::RateLimitRules;
use crate::error::{ratelimit_item, ratelimit_policy, Deny, Throttle, RATELIMIT, RATELIMIT_POLICY};
use crate::metrics::LimitResult;
use crate::policy::{LimitBy, Route, RouteLimit};
use crate::store::{Credits, KeyLimits, RateLimit};
use http::HeaderValue;
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_128_with_seed;

/// What an admitted request takes along.
#[derive(Debug, Default)]
pub struct Admission {
    /// `RateLimit-Policy` and `RateLimit` of the counter closest to exhaustion, for the
    /// answer (`None` when `rate_limits.headers` is off).
    pub headers: Option<(HeaderValue, HeaderValue)>,
    /// The store could not be asked and `on_store_error: allow` let the request pass.
    pub unchecked: bool,
}

/// Where a counter comes from (no allocation until its slot is new).
enum Source<'a> {
    Key(&'a RateLimit),
    Credits(&'a Credits),
    Route(&'a str, &'a RouteLimit),
}

/// One counter of one request, by reference.
struct Spec<'a> {
    source: Source<'a>,
    budget: &'a str,
    tenant: &'a str,
    cost: u64,
}

impl Spec<'_> {
    fn name(&self) -> &str {
        match &self.source {
            Source::Key(l) => &l.name,
            Source::Credits(_) => "credits",
            Source::Route(_, l) => &l.name,
        }
    }

    /// (quota of window 0, quota after, anchor, period)
    fn shape(&self) -> (u64, u64, u64, u64) {
        match &self.source {
            Source::Key(l) => (l.limit, l.limit, 0, l.duration_ms.max(1)),
            Source::Credits(c) => match &c.refill {
                Some(r) => (c.remaining, r.amount, c.set_at, r.interval_ms.max(1)),
                None => (c.remaining, c.remaining, c.set_at, u64::MAX),
            },
            Source::Route(_, l) => (l.limit, l.limit, 0, l.window_ms.max(1)),
        }
    }

    fn kind(&self) -> Kind {
        match self.source {
            Source::Credits(_) => Kind::Credits,
            _ => Kind::RateLimit,
        }
    }

    /// The counter's id in the store (see `Counter::id`).
    fn id(&self) -> String {
        match &self.source {
            Source::Key(l) => format!("k:{}:{}:{}", self.budget, l.name, l.duration_ms),
            Source::Credits(c) => format!("c:{}:{}", self.budget, c.set_at),
            Source::Route(route, l) => match l.by {
                LimitBy::Key => format!("r:{route}:{}:{}:k:{}", l.name, l.window_ms, self.budget),
                LimitBy::Tenant => {
                    format!("r:{route}:{}:{}:t:{}", l.name, l.window_ms, self.tenant)
                }
            },
        }
    }

    /// The id's hash: what `local` keys its slots by, computed without building the id
    /// (each part hashed with the previous hash as its seed).
    fn hash(&self) -> u128 {
        let mut h = 0u128;
        let mut part = |b: &[u8]| h = xxh3_128_with_seed(b, h as u64 ^ (h >> 64) as u64);
        match &self.source {
            Source::Key(l) => {
                part(b"k");
                part(self.budget.as_bytes());
                part(l.name.as_bytes());
                part(&l.duration_ms.to_le_bytes());
            }
            Source::Credits(c) => {
                part(b"c");
                part(self.budget.as_bytes());
                part(&c.set_at.to_le_bytes());
            }
            Source::Route(route, l) => {
                part(b"r");
                part(route.as_bytes());
                part(l.name.as_bytes());
                part(&l.window_ms.to_le_bytes());
                match l.by {
                    LimitBy::Key => part(self.budget.as_bytes()),
                    LimitBy::Tenant => {
                        part(b"t");
                        part(self.tenant.as_bytes());
                    }
                }
            }
        }
        h
    }

    fn counter(&self) -> Counter {
        let (first_quota, quota, anchor_ms, period_ms) = self.shape();
        Counter {
            id: self.id(),
            name: self.name().into(),
            first_quota,
            quota,
            anchor_ms,
            period_ms,
            cost: self.cost,
            kind: self.kind(),
        }
    }
}

/// The counters one request touches: the key's limits, its credits, the route's limits.
/// Filled in place: returned, the few hundred bytes would be copied once more.
fn fill_specs<'a>(route: &'a Route, id: &'a Identity, out: &mut Few<Spec<'a>>) {
    let budget = id
        .limits
        .as_ref()
        .and_then(|l| l.budget.as_deref())
        .unwrap_or(id.id());
    let tenant = id.tenant();
    let spec = |source, cost| Spec {
        source,
        budget,
        tenant,
        cost,
    };
    // Pushed one by one: `extend` reserves first, which costs more than the usual one.
    if let Some(l) = &id.limits {
        for r in &l.ratelimits {
            out.push(spec(Source::Key(r), 1));
        }
        if let Some(c) = &l.credits {
            if route.cost > 0 {
                out.push(spec(Source::Credits(c), route.cost));
            }
        }
    }
    for l in &route.rate_limits {
        out.push(spec(Source::Route(&route.name, l), 1));
    }
}

/// The counters of a key's own limits and credits (`cost` credits a request), as the
/// decision above builds them: what the admin API peeks at.
pub fn key_counters(key_id: &str, limits: &KeyLimits, cost: u64) -> Vec<Counter> {
    let budget = limits.budget.as_deref().unwrap_or(key_id);
    let spec = |source| Spec {
        source,
        budget,
        tenant: "",
        cost: 1,
    };
    let mut out: Vec<Counter> = (limits.ratelimits.iter())
        .map(|l| spec(Source::Key(l)).counter())
        .collect();
    if let Some(c) = &limits.credits {
        let mut s = spec(Source::Credits(c));
        s.cost = cost;
        out.push(s.counter());
    }
    out
}

pub struct Limiter {
    store: Arc<dyn LimitStore>,
    local: Local,
    namespace: Arc<str>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Limiter {
    pub fn new(
        store: Arc<dyn LimitStore>,
        local: Local,
        namespace: &str,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Limiter {
        Limiter {
            store,
            local,
            namespace: namespace.into(),
            metrics,
        }
    }

    /// The limiter for `store` (its counters where `store` keeps them), the local
    /// counters' exchange still to start (`local::run_exchange`), and the counter store.
    pub fn for_store(
        store: &dyn crate::store::KeyStore,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> (Limiter, super::local::Joining, Arc<dyn LimitStore>) {
        let (limit_store, namespace) = super::for_store(store);
        let (local, joining) = Local::new();
        let limiter = Limiter::new(limit_store.clone(), local, &namespace, metrics);
        (limiter, joining, limit_store)
    }

    /// Does anything limit this request? (The common case answers no without a lookup.)
    pub fn applies(route: &Route, id: &Identity) -> bool {
        !route.rate_limits.is_empty() || id.limits.is_some()
    }

    /// Admit or refuse a request on `route` by `id` (see the module doc).
    pub async fn admit(
        &self,
        rules: RateLimitRules,
        route: &Route,
        id: &Identity,
        now_ms: u64,
        worker: Option<&Arc<dyn LimitStore>>,
    ) -> Result<Admission, Deny> {
        if !rules.exact {
            return self.admit_local(rules, route, id, now_ms);
        }
        let mut specs = Few::new();
        fill_specs(route, id, &mut specs);
        if specs.is_empty() {
            return Ok(Admission::default());
        }
        let mut states = Few::new();
        let store = worker.unwrap_or(&self.store);
        let tag = super::tag(id.tenant());
        match Self::exact(&**store, &specs, &tag, id.id(), now_ms, &mut states).await {
            Ok(decision) => self.answer(rules, &specs, &states, decision, false),
            Err(()) => self.store_failed(rules, &specs),
        }
    }

    /// `admit` in `local` mode, which needs no I/O: the proxy calls it directly and
    /// makes no future for a decision that never waits.
    pub fn admit_local(
        &self,
        rules: RateLimitRules,
        route: &Route,
        id: &Identity,
        now_ms: u64,
    ) -> Result<Admission, Deny> {
        let mut specs = Few::new();
        fill_specs(route, id, &mut specs);
        if specs.is_empty() {
            return Ok(Admission::default());
        }
        // A failing exchange means the counts are this replica's alone.
        let unchecked = !self.local.store_ok();
        if unchecked && rules.deny_on_store_error {
            return self.store_failed(rules, &specs);
        }
        // Filled in place: a request's states are a few hundred bytes, not worth moving.
        let mut states = Few::new();
        let decision = self.local(route, &specs, id, now_ms, &mut states);
        self.answer(rules, &specs, &states, decision, unchecked)
    }

    /// The decision's answer: what an admitted request takes along, or the refusal.
    fn answer(
        &self,
        rules: RateLimitRules,
        specs: &[Spec<'_>],
        states: &[Headroom],
        decision: Decision,
        unchecked: bool,
    ) -> Result<Admission, Deny> {
        self.count(specs, states, decision, unchecked);
        let named = |i: Option<usize>| i.map(|i| (&specs[i], &states[i]));
        match decision {
            Decision::Admit => Ok(Admission {
                headers: rules
                    .headers
                    .then(|| named(tightest(states)))
                    .flatten()
                    .map(headers),
                unchecked,
            }),
            Decision::Limited { retry_after_ms } => Err(Deny::RateLimited(throttle(
                named(refusing(states, Kind::RateLimit)),
                Some(retry_after_ms),
            ))),
            Decision::NoCredits { retry_after_ms } => Err(Deny::CreditsExhausted(throttle(
                named(refusing(states, Kind::Credits)),
                retry_after_ms,
            ))),
        }
    }

    /// `exact`: one script in the store.
    async fn exact(
        store: &dyn LimitStore,
        specs: &[Spec<'_>],
        tag: &str,
        key_id: &str,
        now_ms: u64,
        states: &mut Few<Headroom>,
    ) -> Result<Decision, ()> {
        let ask = super::Ask {
            tag: tag.to_string(),
            counters: specs.iter().map(Spec::counter).collect(),
            key_id: key_id.to_string(),
        };
        match store.take(&ask, now_ms).await {
            Ok(o) if o.counters.len() == specs.len() => {
                states.extend(o.counters);
                Ok(o.decision)
            }
            Ok(_) => {
                tracing::error!("the rate-limit store answered for other counters than asked");
                Err(())
            }
            Err(e) => {
                static SAMPLED: crate::logging::Sampled = crate::logging::Sampled::new();
                if let Some(left_out) = SAMPLED.pass() {
                    tracing::warn!(error = %e, left_out, "rate-limit store unavailable");
                }
                Err(())
            }
        }
    }

    /// `local`: this process's counters; all are checked before any is spent.
    fn local(
        &self,
        route: &Route,
        specs: &[Spec<'_>],
        id: &Identity,
        now_ms: u64,
        states: &mut Few<Headroom>,
    ) -> Decision {
        let spare;
        let run = match Local::run(&id.attached, id.tenant(), id.id()) {
            Some(run) => run,
            None => {
                spare = Arc::new(KeyRun::new(id.tenant(), id.id()));
                Local::own(&spare)
            }
        };
        let made;
        let slots: &[Arc<Slot>] = match run.run.route(route.uid, || self.slots(specs, id)) {
            Some(kept) => {
                if kept.touch_due(now_ms) {
                    for (s, slot) in specs.iter().zip(&kept.slots) {
                        self.local.touch(s.hash(), slot);
                    }
                }
                &kept.slots
            }
            None => {
                made = self.slots(specs, id);
                &made
            }
        };
        let decision = Self::decide(specs, slots, now_ms, states);
        // A refusal spends nothing and needs no exchange: within a window the store's
        // count only grows, so what made this replica refuse stays true.
        if decision == Decision::Admit {
            for ((s, slot), st) in specs.iter().zip(slots).zip(states.iter_mut()) {
                self.local.spend(slot, s.cost);
                st.remaining = st.remaining.saturating_sub(s.cost);
            }
        }
        self.local.count(run, decision == Decision::Admit);
        decision
    }

    /// The shared map's slots for `specs`.
    fn slots(&self, specs: &[Spec<'_>], id: &Identity) -> Few<Arc<Slot>> {
        specs
            .iter()
            .map(|s| {
                self.local.slot(s.hash(), || {
                    let c = s.counter();
                    let tag = super::tag(id.tenant());
                    let key = format!("{}:{{{tag}}}:{}", self.namespace, c.id);
                    (key, c)
                })
            })
            .collect()
    }

    /// What the slots say of each counter, and whether they admit the request.
    fn decide(
        specs: &[Spec<'_>],
        slots: &[Arc<Slot>],
        now_ms: u64,
        states: &mut Few<Headroom>,
    ) -> Decision {
        let mut decision = Decision::Admit;
        for (s, slot) in specs.iter().zip(slots) {
            let (first, quota, anchor_ms, period_ms) = s.shape();
            let quota_of = |window| if window == 0 { first } else { quota };
            let (window, used) = Local::used(slot, now_ms, quota_of);
            let quota = quota_of(window);
            let reset_ms = reset_in(anchor_ms, period_ms, now_ms);
            if used.saturating_add(s.cost) > quota {
                decision = worse(decision, refusal(s.kind(), period_ms, reset_ms));
            }
            states.push(Headroom {
                kind: s.kind(),
                quota,
                remaining: quota.saturating_sub(used),
                reset_ms,
                period_ms,
            });
        }
        decision
    }

    /// The store could not be asked: admit unchecked, or refuse, as configured.
    fn store_failed(&self, rules: RateLimitRules, specs: &[Spec<'_>]) -> Result<Admission, Deny> {
        for s in specs {
            let result = if rules.deny_on_store_error {
                LimitResult::StoreErrorDenied
            } else {
                LimitResult::Unchecked
            };
            self.metrics.ratelimit_decision(s.name(), result);
        }
        if rules.deny_on_store_error {
            return Err(Deny::StoreUnavailable);
        }
        Ok(Admission {
            headers: None,
            unchecked: true,
        })
    }

    fn count(&self, specs: &[Spec<'_>], states: &[Headroom], decision: Decision, unchecked: bool) {
        for (s, st) in specs.iter().zip(states) {
            let result = match decision {
                Decision::Admit if unchecked => LimitResult::Unchecked,
                Decision::Admit => LimitResult::Admitted,
                _ if st.remaining < s.cost => LimitResult::Refused,
                _ => continue,
            };
            self.metrics.ratelimit_decision(s.name(), result);
        }
    }
}

/// What refusing on a counter answers.
fn refusal(kind: Kind, period_ms: u64, reset_ms: u64) -> Decision {
    match kind {
        Kind::RateLimit => Decision::Limited {
            retry_after_ms: reset_ms,
        },
        Kind::Credits => Decision::NoCredits {
            retry_after_ms: (period_ms != u64::MAX).then_some(reset_ms),
        },
    }
}

/// Of two refusals, a rate limit wins (waiting for its window may help); of two rate
/// limits, the later reset.
fn worse(a: Decision, b: Decision) -> Decision {
    match (a, b) {
        (Decision::Admit, x) | (x, Decision::Admit) => x,
        (Decision::Limited { retry_after_ms: x }, Decision::Limited { retry_after_ms: y }) => {
            Decision::Limited {
                retry_after_ms: x.max(y),
            }
        }
        (l @ Decision::Limited { .. }, _) | (_, l @ Decision::Limited { .. }) => l,
        (c, _) => c,
    }
}

/// The counter nearest exhaustion (its index): least remaining as a share of its quota.
fn tightest(states: &[Headroom]) -> Option<usize> {
    let share = |a: &Headroom, b: &Headroom| {
        let left = u128::from(a.remaining) * u128::from(b.quota.max(1));
        let right = u128::from(b.remaining) * u128::from(a.quota.max(1));
        left.cmp(&right).then(a.remaining.cmp(&b.remaining))
    };
    (0..states.len()).min_by(|&a, &b| share(&states[a], &states[b]))
}

/// The refusing counter of `kind` with nothing left, else the tightest.
/// Of several spent ones, the one whose window ends last: the one `Retry-After` names.
fn refusing(states: &[Headroom], kind: Kind) -> Option<usize> {
    let of_kind = (0..states.len()).filter(|&i| states[i].kind == kind);
    of_kind
        .min_by(|&a, &b| {
            let (a, b) = (&states[a], &states[b]);
            a.remaining
                .cmp(&b.remaining)
                .then(b.reset_ms.cmp(&a.reset_ms))
        })
        .or_else(|| tightest(states))
}

fn throttle(h: Option<(&Spec<'_>, &Headroom)>, retry_after_ms: Option<u64>) -> Throttle {
    let (policy, state) = h.map(headers).unzip();
    Throttle {
        retry_after: retry_after_ms.map(|ms| HeaderValue::from(ms.div_ceil(1000).max(1))),
        policy,
        state,
    }
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11) for the
/// counter `name`: `"name";q=100;w=60` and `"name";r=42;t=17` (no `w`/`t` for credits that
/// never refill). Names are validated to a header-safe alphabet.
fn headers((spec, h): (&Spec<'_>, &Headroom)) -> (HeaderValue, HeaderValue) {
    let reset = (h.period_ms != u64::MAX).then(|| h.reset_ms.div_ceil(1000));
    let name = spec.name();
    let policy = match &spec.source {
        Source::Route(_, l) => l.policy.clone(),
        _ => ratelimit_policy(name, h.quota, h.period_ms),
    };
    (
        policy,
        ratelimit_item(name, (b'r', h.remaining), reset.map(|t| (b't', t))),
    )
}

/// Put the admitted answer's `RateLimit` headers on `resp`, after any of the upstream's
/// own (fields combine into one list).
pub fn add_headers(resp: &mut http::HeaderMap, (policy, state): (HeaderValue, HeaderValue)) {
    resp.append(RATELIMIT_POLICY, policy);
    resp.append(RATELIMIT, state);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RouteLimit;
    use crate::store::Refill;

    /// A thread whose clock is a little behind another's finds the slot already in the
    /// next window: the reset it tells is still within its own window (`t <= w`).
    #[test]
    fn reset_is_at_most_the_window_when_the_slot_is_ahead() {
        let (local, _joining) = Local::new();
        let l = RouteLimit::new("per-key", 10, 60_000, LimitBy::Key);
        let spec = Spec {
            source: Source::Route("route", &l),
            budget: "k1",
            tenant: "t",
            cost: 1,
        };
        let slot = local.slot(spec.hash(), || ("ns:{t}:x".to_string(), spec.counter()));
        let (specs, slots) = ([spec], [slot]);
        let mut st = Few::new();
        Limiter::decide(&specs, &slots, 120_001, &mut st);
        assert_eq!(st[0].reset_ms, 59_999);
        st.clear();
        Limiter::decide(&specs, &slots, 119_999, &mut st);
        let (policy, state) = headers((&specs[0], &st[0]));
        assert!(
            st[0].reset_ms <= 60_000,
            "reset {} ms > the 60 s window; RateLimit {state:?} vs policy {policy:?}",
            st[0].reset_ms
        );
    }

    /// Two credit settings that share a counter (same budget and `set_at`, another refill
    /// interval): each tells the reset of its own interval.
    #[test]
    fn credits_reset_follows_the_keys_own_interval() {
        let (local, _joining) = Local::new();
        let refill = |interval_ms| {
            Some(Refill {
                amount: 5,
                interval_ms,
            })
        };
        let fast = Credits {
            remaining: 5,
            set_at: 0,
            refill: refill(60_000),
        };
        let slow = Credits {
            remaining: 5,
            set_at: 0,
            refill: refill(3_600_000),
        };
        let spec = |c| Spec {
            source: Source::Credits(c),
            budget: "b",
            tenant: "t",
            cost: 1,
        };
        let (a, b) = ([spec(&fast)], [spec(&slow)]);
        assert_eq!(a[0].hash(), b[0].hash());
        let slot = local.slot(a[0].hash(), || ("ns:{t}:x".to_string(), a[0].counter()));
        let slots = [slot];
        let mut st = Few::new();
        Limiter::decide(&a, &slots, 1_800_000, &mut st);
        st.clear();
        Limiter::decide(&b, &slots, 1_800_000, &mut st);
        assert!(
            st[0].reset_ms <= 3_600_000,
            "reset {} ms for a 1 h interval",
            st[0].reset_ms
        );
    }
}
