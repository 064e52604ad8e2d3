//! Forwarding to the upstream: hop-by-hop headers out, client-sent identity headers out,
//! keygate's identity and `X-Forwarded-*` in, bodies streamed both ways, `Upgrade`
//! tunnelled only after the upstream answers 101. An HTTP/1 client connection gets its own
//! upstream connection, driven on the same worker thread (no pool lock, no cross-thread
//! wake-up per request); HTTP/2 clients and upgrades go through hyper-util's pooled client.

use super::policy::Policy;
use super::Conn;
use crate::cache::Identity;
use crate::config::raw::Upstream;
use crate::error::{Body, BoxError, Deny};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tower_service::Service;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that only concern one hop (RFC 9110 7.6.1, plus legacy ones).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The upstream connection of one HTTP/1 client connection. HTTP/1 requests on a
/// connection come one after another, so the lock is never contended; it is only there
/// because hyper's service futures must be `Send`.
#[derive(Default)]
pub struct UpstreamSlot(Mutex<Option<SendRequest<Body>>>);

impl UpstreamSlot {
    fn take(&self) -> Option<SendRequest<Body>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
    fn put(&self, sender: SendRequest<Body>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }
}

pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    connector: HttpsConnector<HttpConnector>,
    upstream: Upstream,
    /// `scheme://authority/` of the upstream: what the connector dials.
    upstream_uri: Uri,
    timeout: Duration,
}

impl Forwarder {
    /// `tls` is used when the upstream is `https://`.
    pub fn new(
        upstream: Upstream,
        timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector.clone());
        let upstream_uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("proxy.upstream: {e}"))?;
        Ok(Forwarder {
            client,
            connector,
            upstream,
            upstream_uri,
            timeout,
        })
    }

    /// A new HTTP/1 connection to the upstream (TLS when `https://`); its driver task
    /// runs on the calling worker thread's runtime.
    async fn connect(&self) -> Result<SendRequest<Body>, Deny> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "upstream connector not ready");
                Deny::UpstreamUnavailable
            })?;
        let io = connector
            .call(self.upstream_uri.clone())
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "upstream connect failed");
                Deny::UpstreamUnavailable
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "upstream handshake failed");
                Deny::UpstreamUnavailable
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Send on the client connection's own upstream connection, opening one when there is
    /// none or it was closed. A request the closed connection never took is sent once
    /// more on a fresh one (nothing of it reached the upstream).
    async fn send_direct(
        &self,
        slot: &UpstreamSlot,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Deny> {
        let kept = match slot.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match kept {
            Some(s) => s,
            None => self.connect().await?,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = self.connect().await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| classify_source(&e))?
                }
                None => return Err(classify_source(e.error())),
            },
        };
        // Back in the slot at once: the next request on this client connection comes only
        // after this response's body has gone through (HTTP/1 is sequential), and
        // `ready()` above waits for that.
        slot.put(sender);
        Ok(resp)
    }

    /// Send the request upstream; `new_path` is the normalised path when it differs
    /// from the one received. Returns the response and the time to its head.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        new_path: Option<String>,
        identity: Option<&Identity>,
        policy: &Policy,
        conn: &Conn,
        body_limit: Option<u64>,
    ) -> Result<(Response<Body>, Duration), Deny> {
        let upgrade = wants_upgrade(&req);
        // HTTP/1 clients send one request at a time: they get their own upstream
        // connection. HTTP/2 (many streams at once) and upgrades use the pool.
        let direct = !upgrade && req.version() <= Version::HTTP_11;
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        let path_and_query = match new_path {
            None => req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            Some(p) => {
                let s = match req.uri().query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                PathAndQuery::try_from(s).map_err(|_| Deny::BadPath)?
            }
        };
        *req.uri_mut() = if direct {
            // Origin form: a connection of our own is already addressed.
            Uri::from(path_and_query)
        } else {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.upstream.scheme.clone());
            parts.authority = Some(self.upstream.authority.clone());
            parts.path_and_query = Some(path_and_query);
            Uri::from_parts(parts).map_err(|_| Deny::BadPath)?
        };
        *req.version_mut() = Version::HTTP_11;

        let headers = req.headers_mut();
        // Room for what is added below (identity, X-Forwarded-*, Host) at once, instead of
        // the map growing insert by insert.
        // (`try_`: a map already at http's size limit just grows as it can.)
        let _ = headers.try_reserve(10);
        let upgrade_value = if upgrade {
            headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(headers);
        if let Some(u) = upgrade_value {
            headers.insert(header::UPGRADE, u);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers.remove(header::PROXY_AUTHORIZATION);
        if !policy.forward_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        set_identity(headers, policy, identity);
        set_forwarded(headers, policy, conn, host.as_ref());
        match host {
            Some(h) => {
                headers.insert(header::HOST, h);
            }
            // HTTP/1.1 needs a Host (the pool adds one from the URI; do the same).
            None if direct => {
                if let Ok(h) = HeaderValue::from_str(self.upstream.authority.as_str()) {
                    headers.insert(header::HOST, h);
                }
            }
            None => {}
        }

        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let req = req.map(|b| match body_limit {
            Some(limit) => Limited::new(b, limit as usize).boxed(),
            None => b.map_err(BoxError::from).boxed(),
        });

        let started = Instant::now();
        let sent = if direct {
            tokio::time::timeout(self.timeout, self.send_direct(&conn.upstream, req)).await
        } else {
            tokio::time::timeout(self.timeout, async {
                self.client.request(req).await.map_err(|e| classify(&e))
            })
            .await
        };
        let mut resp = match sent {
            Err(_) => return Err(Deny::UpstreamTimeout),
            Ok(Err(deny)) => return Err(deny),
            Ok(Ok(r)) => r,
        };
        let elapsed = started.elapsed();

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((c, u)) => {
                            let mut c = TokioIo::new(c);
                            let mut u = TokioIo::new(u);
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
                let (parts, _) = resp.into_parts();
                return Ok((Response::from_parts(parts, crate::error::full("")), elapsed));
            }
            // 101 to a request that did not ask for it: refuse rather than tunnel.
            return Err(Deny::UpstreamUnavailable);
        }
        strip_hop_by_hop(resp.headers_mut());
        Ok((resp.map(|b| b.map_err(BoxError::from).boxed()), elapsed))
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> Deny {
    if e.is_connect() {
        return Deny::UpstreamUnavailable;
    }
    classify_source(e)
}

/// A body over the route's limit is the client's fault (413); anything else is the
/// upstream's (502).
fn classify_source(e: &(dyn std::error::Error + 'static)) -> Deny {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return Deny::BodyTooLarge;
        }
        source = s.source();
    }
    tracing::debug!(error = %e, "upstream request failed");
    Deny::UpstreamUnavailable
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove hop-by-hop headers and those the `Connection` header names. `Host` and
/// `Content-Length` survive: they frame and address the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names present (one bit per `HOP_BY_HOP` entry) instead of a
    // hash lookup per hop-by-hop name: most messages carry none, or only `Connection`.
    let mut present = 0u8;
    for n in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == n) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `HOP_BY_HOP[0]` is `Connection`. Its usual tokens (`close`, `keep-alive`,
    // `upgrade`) are not other headers to look for, or are in `HOP_BY_HOP` already.
    let mut named = Vec::new();
    if present & 1 != 0 {
        for t in connection_tokens(headers) {
            if ["close", "keep-alive", "upgrade"]
                .iter()
                .any(|u| t.eq_ignore_ascii_case(u))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                if n != header::HOST && n != header::CONTENT_LENGTH && !HOP_BY_HOP.contains(&n) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// Identity headers are set by keygate only: a client's copies are always removed.
fn set_identity(headers: &mut HeaderMap, policy: &Policy, identity: Option<&Identity>) {
    let names = &policy.identity;
    match identity {
        Some(id) => {
            headers.insert(names.key_id.clone(), id.id_header());
            headers.insert(names.tenant.clone(), id.tenant_header());
            headers.insert(names.scopes.clone(), id.scopes_header());
            headers.insert(names.key_type.clone(), id.type_header());
        }
        None => {
            let all = [&names.key_id, &names.tenant, &names.scopes, &names.key_type];
            // Comparing the few names present is cheaper than four hash lookups.
            if headers.keys().any(|k| all.contains(&k)) {
                for n in all {
                    headers.remove(n);
                }
            }
        }
    }
}

/// `X-Forwarded-*`: kept and extended for trusted peers, overwritten for everyone else.
fn set_forwarded(
    headers: &mut HeaderMap,
    policy: &Policy,
    conn: &Conn,
    host: Option<&HeaderValue>,
) {
    let peer_ip = conn.peer.ip();
    let trusted = policy.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
    // A client's own X-Forwarded-For is only looked at when it is trusted.
    let prev = if trusted {
        headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let xff = match prev {
        Some(prev) if headers.get_all(X_FORWARDED_FOR).iter().count() == 1 => {
            HeaderValue::from_str(&format!("{prev}, {peer_ip}")).ok()
        }
        // The usual case: the connection's own value, built once when it was accepted.
        _ => Some(conn.peer_header.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !(trusted && headers.contains_key(X_FORWARDED_PROTO)) {
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(X_FORWARDED_HOST)) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}
