//! The proxy port's request path: normalise, match a route, authenticate the bearer key
//! against the cache, then forward with identity headers (see `forward`).

pub mod forward;
pub mod headers;
pub mod host;
pub mod policy;
pub mod route;
pub mod server;

use crate::cache::{Entry, Identity, KeyCache, Source};
use crate::config::Config;
use crate::error::{Body, Deny};
use crate::key::{self, KeyHasher, KeyType, Prefixes};
use crate::metrics::{self, AuthOutcome, Metrics, RouteMetrics};
use crate::usage::UsageRecorder;
use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{Request, Response};
use hyper::body::Incoming;
use policy::{Policy, Route};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a reload swaps: the policy and the metric handles resolved for its routes.
pub struct Snapshot {
    pub policy: Arc<Policy>,
    pub metrics: RouteMetrics,
}

/// What holds a client connection's `max_connections` slot: the slot is free once every
/// clone is dropped (a WebSocket tunnel keeps one).
pub type Slot = Arc<dyn std::any::Any + Send + Sync>;

/// The client connection a request arrived on: facts about it, and its own upstream
/// connection (HTTP/1).
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP as an `X-Forwarded-For` value, made once per connection.
    pub peer_header: http::HeaderValue,
    pub upstream: forward::UpstreamSlot,
    pub slot: Slot,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool, slot: Slot) -> Conn {
        // An IP address always makes a valid value; the fallback only avoids a panic path.
        let peer_header = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        Conn {
            peer,
            tls,
            peer_header,
            upstream: forward::UpstreamSlot::default(),
            slot,
        }
    }
}

pub struct Proxy {
    pub snapshot: ArcSwap<Snapshot>,
    pub cache: Arc<KeyCache>,
    pub hasher: KeyHasher,
    pub prefixes: Prefixes,
    pub metrics: Arc<Metrics>,
    pub forwarder: forward::Forwarder,
    pub max_uri_bytes: usize,
    /// Header fields a request may carry (`connection::max_header_count`).
    pub max_header_count: usize,
    pub usage: UsageRecorder,
    /// `cache.on_store_error: deny`: refuse cache hits while the store is failing.
    pub deny_on_store_error: bool,
}

impl Proxy {
    pub fn new(
        config: &Config,
        cache: Arc<KeyCache>,
        hasher: KeyHasher,
        metrics: Arc<Metrics>,
        usage: UsageRecorder,
    ) -> Result<Self, String> {
        // The CA file was checked at load, but it may have changed since: report, not panic.
        let upstream_tls = crate::tls::upstream_client_config(config.upstream_ca.as_deref())?;
        let snapshot = Snapshot {
            metrics: metrics.for_policy(&config.policy),
            policy: config.policy.clone(),
        };
        Ok(Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            cache,
            hasher,
            prefixes: config.prefixes.clone(),
            metrics,
            forwarder: forward::Forwarder::new(
                config.upstream.clone(),
                config.timeouts.upstream,
                config.timeouts.idle,
                upstream_tls,
            )?,
            max_uri_bytes: config.limits.max_uri_bytes,
            max_header_count: crate::connection::max_header_count(config.limits.max_header_bytes),
            usage,
            deny_on_store_error: config.cache.on_store_error
                == crate::config::raw::OnStoreError::Deny,
        })
    }

    /// Swap in a new policy (hot reload): requests in flight keep the one they loaded.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        let metrics = self.metrics.for_policy(&policy);
        self.snapshot.store(Arc::new(Snapshot { policy, metrics }));
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: &Conn) -> Response<Body> {
        let snap = self.snapshot.load();
        // Only the access log needs it: one clock read fewer per request without.
        let started = snap.policy.access_log.then(Instant::now);
        let method = req.method().clone();
        let mut who = None;
        let (route_index, result) = self
            .decide_and_forward(&snap.policy, req, conn, &mut who)
            .await;
        let per_route = snap.metrics.route(route_index);
        let (resp, code) = match result {
            Ok((resp, upstream_elapsed)) => {
                per_route.count(0);
                per_route.upstream.observe(upstream_elapsed.as_secs_f64());
                (resp, "allowed")
            }
            Err(deny) => {
                per_route.count(metrics::result_index(deny.code()));
                (deny.response(), deny.code())
            }
        };
        if snap.policy.access_log {
            // One line per request: never the path (it may carry data), never a key.
            let route = route_index.map_or("-", |i| &*snap.policy.routes()[i].name);
            let who = who.as_deref();
            tracing::info!(
                target: "keygate::access",
                method = %method,
                route,
                status = resp.status().as_u16(),
                decision = code,
                key_id = who.map_or("-", Identity::id),
                tenant = who.map_or("-", Identity::tenant),
                peer = %conn.peer.ip(),
                duration_us = started.map_or(0, |s| s.elapsed().as_micros() as u64),
            );
        }
        resp
    }

    async fn decide_and_forward(
        &self,
        policy: &Policy,
        req: Request<Incoming>,
        conn: &Conn,
        who: &mut Option<Arc<Identity>>,
    ) -> (Option<usize>, Result<(Response<Body>, Duration), Deny>) {
        let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target_len > self.max_uri_bytes {
            return (None, Err(Deny::UriTooLong));
        }
        // HTTP/2 has no count limit of its own (hyper's HTTP/1 parser refuses more).
        if req.headers().len() > self.max_header_count {
            return (None, Err(Deny::TooManyHeaders));
        }
        if req
            .method()
            .as_str()
            .bytes()
            .any(|b| b.is_ascii_lowercase())
        {
            return (None, Err(Deny::BadMethod));
        }
        let host = match host::request_host(&req) {
            Ok(h) => h,
            Err(d) => return (None, Err(d)),
        };
        // Content-Length with Transfer-Encoding needs no check here: hyper's HTTP/1
        // parser keeps only the chunked framing and closes the connection afterwards,
        // and the forwarder re-frames the body, so the upstream sees one request.
        let Ok(route::Normalized { path, has_params }) = route::normalize_request(req.uri().path())
        else {
            return (None, Err(Deny::BadPath));
        };
        // Forwarded as it is, params kept: refused unless its route does not depend on them.
        let Ok(found) = policy.find_unambiguous(req.method(), &path, has_params) else {
            return (None, Err(Deny::BadPath));
        };
        let Some((index, route)) = found else {
            return (None, Err(Deny::NoRoute));
        };
        let identity = if route.public {
            None
        } else {
            match self.authenticate(&req, route, who).await {
                Ok(id) => Some(id),
                Err(d) => return (index, Err(d)),
            }
        };
        let limit = route.max_body_bytes.or(policy.default_max_body_bytes);
        if let Some(limit) = limit {
            let declared = req
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return (index, Err(Deny::BodyTooLarge));
            }
        }
        let out = forward::Outbound {
            path: path.into_owned_if_changed(),
            host,
            identity: identity.as_deref(),
            body_limit: limit,
        };
        let result = self.forwarder.forward(req, out, policy, conn).await;
        *who = identity;
        (index, result)
    }

    /// Bearer extraction, format check (no I/O), digest, cache, then the record's rules.
    /// `who` learns the key's identity as soon as it is known (for the access log).
    pub async fn authenticate(
        &self,
        req: &Request<Incoming>,
        route: &Route,
        who: &mut Option<Arc<Identity>>,
    ) -> Result<Arc<Identity>, Deny> {
        let token = bearer(req.headers())?;
        self.check_token(token, route, who).await
    }

    /// Everything after extraction: what the criterion bench measures on a cache hit.
    pub async fn check_token(
        &self,
        token: &str,
        route: &Route,
        who: &mut Option<Arc<Identity>>,
    ) -> Result<Arc<Identity>, Deny> {
        key::parse(&self.prefixes, token).map_err(|_| Deny::MalformedKey)?;
        let digest = self.hasher.digest(token);
        let started = Instant::now();
        let (entry, source) = match self.cache.lookup_at(&digest, started).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "key store read failed");
                self.metrics.store_errors.with_label_values(&["read"]).inc();
                self.metrics.observe_auth(
                    AuthOutcome::Error,
                    Source::Store,
                    started.elapsed().as_secs_f64(),
                );
                return Err(Deny::StoreUnavailable);
            }
        };
        if self.deny_on_store_error && source == Source::Cache && !self.cache.store_ok() {
            return Err(Deny::StoreUnavailable);
        }
        let now = crate::time::now_ms();
        let verdict = match entry {
            Entry::Unknown => Err(Deny::UnknownKey),
            Entry::Known(id) => {
                *who = Some(id.clone());
                check_record(id, &digest, route, now)
            }
        };
        if let Ok(id) = &verdict {
            self.usage.note(id, now);
        }
        let outcome = if verdict.is_ok() {
            AuthOutcome::Allowed
        } else {
            AuthOutcome::Denied
        };
        self.metrics
            .observe_auth(outcome, source, started.elapsed().as_secs_f64());
        verdict
    }
}

/// The record's own rules, in the order a caller would want to hear about them.
pub fn check_record(
    id: Arc<Identity>,
    digest: &key::Digest,
    route: &Route,
    now_ms: u64,
) -> Result<Arc<Identity>, Deny> {
    if !key::ct_eq(&id.digest, digest) {
        return Err(Deny::UnknownKey);
    }
    if id.is_revoked_at(now_ms) {
        return Err(Deny::RevokedKey);
    }
    if id.is_expired_at(now_ms) {
        return Err(Deny::ExpiredKey);
    }
    if id.key_type == KeyType::Publishable && !route.allow_publishable {
        return Err(Deny::PublishableNotAllowed);
    }
    if !id.grants_all(&route.scopes) {
        return Err(Deny::InsufficientScope(route.scope_challenge.clone()));
    }
    Ok(id)
}

/// The token of the one `Authorization: Bearer` header. Keys in query strings are
/// never looked at.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, Deny> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let value = all.next().ok_or(Deny::MissingKey)?;
    if all.next().is_some() {
        return Err(Deny::MultipleAuthorization);
    }
    let value = value.to_str().map_err(|_| Deny::MalformedKey)?.trim();
    let (scheme, token) = match value.split_once(' ') {
        Some(parts) => parts,
        None if value.eq_ignore_ascii_case("bearer") => return Err(Deny::MalformedKey),
        None => return Err(Deny::UnsupportedScheme),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Deny::UnsupportedScheme);
    }
    Ok(token.trim_start())
}

trait CowExt {
    fn into_owned_if_changed(self) -> Option<String>;
}

impl CowExt for std::borrow::Cow<'_, str> {
    /// `None` when normalisation changed nothing, so the original URI can be reused.
    fn into_owned_if_changed(self) -> Option<String> {
        match self {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(s) => Some(s),
        }
    }
}

/// Property tests: `bearer` sees the client's `Authorization` headers, whatever they hold.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Header value bytes around the schemes and separators that matter, plus any byte.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => prop::sample::select(vec![
                "Bearer", "bearer", "BEARER", "Basic", "Bearer ", " ", " ", "\t", "sk_live_",
                "abc", "=", ",", "\"", "é", "\u{0}",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            1 => any::<u8>().prop_map(|b| vec![b]),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn bearer_returns_a_trimmed_suffix_of_the_one_header(
            values in prop::collection::vec(value(), 0..3)
        ) {
            let mut headers = http::HeaderMap::new();
            for v in &values {
                // What the HTTP parser could hand over: a value `HeaderValue` accepts.
                if let Ok(v) = http::HeaderValue::from_bytes(v) {
                    headers.append(AUTHORIZATION, v);
                }
            }
            let Ok(token) = bearer(&headers) else { return Ok(()) };
            let all: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
            prop_assert_eq!(all.len(), 1);
            let value = all[0].to_str().map(str::trim);
            prop_assert!(value.is_ok());
            let value = value.unwrap_or_default();
            // The token is the value's own text after `Bearer `: never empty, never padded.
            prop_assert!(value.ends_with(token), "{:?} -> {:?}", value, token);
            prop_assert!(!token.is_empty() && token.trim() == token, "{:?} -> {:?}", value, token);
            let scheme = value[..value.len() - token.len()].trim_end();
            prop_assert!(scheme.eq_ignore_ascii_case("bearer"), "{:?} -> {:?}", value, token);
        }
    }
}
