//! The proxy port's request path: normalise, match a route, authenticate the bearer key
//! against the cache, then forward with identity headers (see `forward`).

pub mod forward;
pub mod headers;
pub mod host;
pub mod lifecycle;
pub mod server;

use crate::auth::{Admitted, Ask, Credential, Need, Outcome, Refused, Rules, Verdict, Verifier};
use crate::cache::{Identity, Reader, Source};
use crate::config::Config;
use crate::error::{Body, Deny};
use crate::limits::{Admission, LimitStore, Limiter};
use crate::logging;
use crate::metrics::{AuthOutcome, Metrics};
use crate::policy::Route;
use crate::snapshot::{Live, Snapshot};
use crate::usage::UsageRecorder;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Where this connection's key lookups read on a miss: its worker's own store
    /// connection (`KeyStore::worker_reader`), or the shared store.
    pub reader: Reader,
    /// Its worker's way to the rate-limit counters, when the store has one of its own
    /// per worker (`exact` mode's scripts then skip the shared connection).
    pub limits: Option<Arc<dyn LimitStore>>,
}

impl Conn {
    pub fn new(
        peer: SocketAddr,
        tls: bool,
        slot: Slot,
        reader: Reader,
        limits: Option<Arc<dyn LimitStore>>,
    ) -> Conn {
        // An IP address always makes a valid value; the fallback only avoids a panic path.
        let peer_header = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        Conn {
            peer,
            tls,
            peer_header,
            upstream: forward::UpstreamSlot::default(),
            slot,
            reader,
            limits,
        }
    }
}

pub struct Proxy {
    /// Everything a reload may change; loaded once per request.
    pub live: Live,
    pub verifier: Verifier,
    /// The shared store, for key reads off the proxy workers (their own: `Conn::reader`).
    pub store: Reader,
    pub metrics: Arc<Metrics>,
    pub forwarder: forward::Forwarder,
    pub max_uri_bytes: usize,
    /// Header fields a request may carry (`connection::max_header_count`).
    pub max_header_count: usize,
    pub usage: UsageRecorder,
    /// Rate limits and credits.
    pub limiter: Arc<Limiter>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        live: Live,
        verifier: Verifier,
        store: Reader,
        metrics: Arc<Metrics>,
        usage: UsageRecorder,
        limiter: Arc<Limiter>,
    ) -> Result<Self, String> {
        let fixed = &config.fixed;
        // The CA file was checked at load, but it may have changed since: report, not panic.
        let upstream_tls = crate::tls::upstream_client_config(fixed.upstream_ca.as_deref())?;
        let t = &fixed.timeouts;
        Ok(Proxy {
            live,
            verifier,
            store,
            metrics,
            forwarder: forward::Forwarder::new(
                fixed.upstream.clone(),
                t.upstream,
                t.idle,
                upstream_tls,
            )?,
            max_uri_bytes: fixed.limits.max_uri_bytes,
            max_header_count: crate::connection::max_header_count(fixed.limits.max_header_bytes),
            usage,
            limiter,
        })
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: &Conn) -> Response<Body> {
        let snap = self.live.load();
        // Only the access log needs it: one clock read fewer per request without.
        let access_log = snap.policy.headers.access_log && logging::access_enabled();
        let started = access_log.then(Instant::now);
        let method = req.method().clone();
        let mut who = None;
        let (route_index, result) = self.decide_and_forward(&snap, req, conn, &mut who).await;
        let per_route = snap.metrics.route(route_index);
        let (mut resp, code) = match result {
            Ok((resp, upstream_elapsed)) => {
                per_route.allowed();
                per_route.upstream.observe(upstream_elapsed.as_secs_f64());
                (resp, "allowed")
            }
            Err(deny) => {
                per_route.denied(&deny);
                (deny.response(), deny.code())
            }
        };
        // Forwarded answers and keygate's own refusals alike, once the key is known.
        if let Some(id) = &who {
            lifecycle::add(&snap.policy.headers.lifecycle, resp.headers_mut(), id);
        }
        if access_log {
            // One line per request: never the path (it may carry data), never a key.
            let who = who.as_deref();
            logging::access(&logging::Access {
                method: method.as_str(),
                route: snap.policy.route_name(route_index),
                status: resp.status().as_u16(),
                decision: code,
                key_id: who.map_or("-", Identity::id),
                tenant: who.map_or("-", Identity::tenant),
                peer: conn.peer.ip(),
                duration_us: started.map_or(0, |s| s.elapsed().as_micros() as u64),
            });
        }
        resp
    }

    async fn decide_and_forward(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        conn: &Conn,
        who: &mut Option<Arc<Identity>>,
    ) -> (Option<usize>, Result<(Response<Body>, Duration), Deny>) {
        let policy = &*snap.policy;
        if let Err(d) = self.screen(&req) {
            return (None, Err(d));
        }
        let host = host::request_host(&req);
        let ask = Ask {
            method: req.method(),
            path: req.uri().path(),
            credential: Credential::Headers(req.headers()),
            transport: host.as_ref().err().cloned(),
        };
        let decision = self
            .verifier
            .decide(policy, ask, snap.auth, &conn.reader)
            .await;
        if let Some(check) = &decision.key {
            self.record(&check.verdict, check.started);
        }
        let Admitted {
            index,
            route,
            path,
            identity,
            judged_at,
        } = match decision.into_outcome() {
            Outcome::Admitted(admitted) => admitted,
            Outcome::Refused(Refused {
                index,
                deny,
                identity,
            }) => {
                *who = identity;
                return (index, Err(deny));
            }
        };
        // The decision refused any other host answer already.
        let host = host.ok().flatten();
        let limit = route
            .max_body_bytes
            .or(policy.headers.default_max_body_bytes);
        if declared_body_over(&req, limit) {
            *who = identity;
            return (index, Err(Deny::BodyTooLarge));
        }
        let admission = match identity.as_deref() {
            Some(id) if Limiter::applies(route, id) => {
                let rules = snap.rate_limits;
                let now = match judged_at {
                    0 => crate::time::now_ms(),
                    t => t,
                };
                let admitted = if rules.exact {
                    let store = conn.limits.as_ref();
                    self.limiter.admit(rules, route, id, now, store).await
                } else {
                    self.limiter.admit_local(rules, route, id, now)
                };
                match admitted {
                    Ok(a) => a,
                    Err(d) => {
                        *who = identity;
                        return (index, Err(d));
                    }
                }
            }
            _ => Admission::default(),
        };
        let out = forward::Outbound {
            path: path.path.into_owned_if_changed(),
            host,
            identity: identity.as_deref(),
            body_limit: limit,
            unchecked: admission.unchecked,
        };
        let mut result = self.forwarder.forward(req, out, policy, conn).await;
        if let (Ok((resp, _)), Some(h)) = (&mut result, admission.headers) {
            crate::limits::limiter::add_headers(resp.headers_mut(), h);
        }
        *who = identity;
        (index, result)
    }

    /// What is refused before the method is looked at: the target's length and the
    /// number of header fields (the rest is the decision's, `auth::Verifier::decide`).
    fn screen(&self, req: &Request<Incoming>) -> Result<(), Deny> {
        let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if target_len > self.max_uri_bytes {
            return Err(Deny::UriTooLong);
        }
        // HTTP/2 has no count limit of its own (hyper's HTTP/1 parser refuses more).
        if req.headers().len() > self.max_header_count {
            return Err(Deny::TooManyHeaders);
        }
        // Content-Length with Transfer-Encoding needs no check here: hyper's HTTP/1
        // parser keeps only the chunked framing and closes the connection afterwards,
        // and the forwarder re-frames the body, so the upstream sees one request.
        Ok(())
    }

    /// A key check alone, with the proxy's side effects: what the criterion bench
    /// measures on a cache hit (the request path runs it inside `Verifier::decide`).
    pub async fn check_token(
        &self,
        token: &str,
        route: &Route,
        rules: Rules,
        reader: &Reader,
        who: &mut Option<Arc<Identity>>,
    ) -> Result<Arc<Identity>, Deny> {
        let need = Need {
            scopes: &route.scopes,
            allow_publishable: route.allow_publishable,
            challenge: &route.scope_challenge,
        };
        let started = Instant::now();
        let verdict = self
            .verifier
            .verify(token, &need, rules, reader, started)
            .await;
        self.record(&verdict, started);
        match (verdict.result, verdict.identity) {
            (Ok(()), Some(id)) => {
                *who = Some(id.clone());
                Ok(id)
            }
            (Err(d), id) => {
                *who = id;
                Err(d)
            }
            // `verify` allows only a key it found; refuse rather than trust an empty answer.
            (Ok(()), None) => Err(Deny::UnknownKey),
        }
    }

    /// The proxy's side effects of a key check: store errors logged and counted, the
    /// check timed, an allowed key's use noted (`explain` does none of these).
    fn record(&self, verdict: &Verdict, started: Instant) {
        if let Some(e) = &verdict.store_error {
            static SAMPLED: crate::logging::Sampled = crate::logging::Sampled::new();
            if let Some(left_out) = SAMPLED.pass() {
                tracing::warn!(error = %e, left_out, "key store read failed");
            }
            self.metrics.store_errors.with_label_values(&["read"]).inc();
        }
        if let Some(id) = verdict.allowed() {
            self.usage.note(id, verdict.at_ms);
        }
        let observed = match (&verdict.store_error, verdict.source) {
            (Some(_), _) => Some((AuthOutcome::Error, Source::Store)),
            (None, Some(source)) if verdict.result.is_ok() => Some((AuthOutcome::Allowed, source)),
            (None, Some(source)) => Some((AuthOutcome::Denied, source)),
            (None, None) => None,
        };
        if let Some((outcome, source)) = observed {
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.observe_auth(outcome, source, seconds);
        }
    }
}

/// Does the request declare a body over `limit`? (A body without `Content-Length` is
/// counted as it streams, in `forward`.)
fn declared_body_over(req: &Request<Incoming>, limit: Option<u64>) -> bool {
    let Some(limit) = limit else { return false };
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
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
