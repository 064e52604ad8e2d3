//! Forwarding to the upstream: hop-by-hop headers out, client-sent identity headers out,
//! keygate's identity and `X-Forwarded-*` in, bodies streamed both ways, `Upgrade`
//! tunnelled only after the upstream answers 101. An HTTP/1 client connection gets its own
//! upstream connection, driven on the same worker thread (no pool lock, no cross-thread
//! wake-up per request); HTTP/2 clients and upgrades go through hyper-util's pooled client.

use super::Conn;
use crate::cache::Identity;
use crate::config::Upstream;
use crate::error::{Body, BoxError, Deny};
use crate::policy::Policy;
use bytes::Bytes;
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_service::Service;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Headers by which an upstream framework would act on another method or path than the
/// one keygate matched (Rails, Express, Symfony, IIS URL rewrite): never forwarded.
const OVERRIDES: [&str; 6] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
];

/// Client address, host, scheme and original-URL claims besides
/// `X-Forwarded-For/Proto/Host` (which are rewritten): kept from trusted proxies only.
/// `Forwarded` is extended for those.
const CLIENT_CLAIMS: [&str; 20] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "x-originating-ip",
    "x-remote-addr",
    "x-remote-ip",
    "x-host",
    "x-forwarded-uri",
    "x-original-uri",
    "x-envoy-original-path",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
];

/// Bit n set when a name in `OVERRIDES` or `CLIENT_CLAIMS` is n bytes long: most header
/// names are ruled out by their length alone.
const CLAIM_LENGTHS: u64 = {
    let mut mask = 0u64;
    let mut i = 0;
    while i < OVERRIDES.len() {
        mask |= 1 << OVERRIDES[i].len();
        i += 1;
    }
    let mut i = 0;
    while i < CLIENT_CLAIMS.len() {
        mask |= 1 << CLIENT_CLAIMS[i].len();
        i += 1;
    }
    mask
};

/// Headers that only concern one hop (RFC 9110 7.6.1, plus legacy ones and the h2c
/// upgrade's `HTTP2-Settings`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HTTP2_SETTINGS,
];

/// The upstream connection of one HTTP/1 client connection. HTTP/1 requests on a
/// connection come one after another, so the lock is never contended; it is only there
/// because hyper's service futures must be `Send`.
#[derive(Default)]
#[allow(
    clippy::disallowed_types,
    reason = "per connection, never contended (see above)"
)]
pub struct UpstreamSlot(std::sync::Mutex<Option<SendRequest<Body>>>);

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
    /// An upgraded connection (WebSocket) on which no byte moves for this long is closed.
    tunnel_idle: Duration,
}

impl Forwarder {
    /// `tls` is used when the upstream is `https://`.
    pub fn new(
        upstream: Upstream,
        timeout: Duration,
        tunnel_idle: Duration,
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
            tunnel_idle,
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
    /// from the one received, `host` the host the upstream is told (see `request_host`).
    /// Returns the response and the time to its head.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        new_path: Option<String>,
        host: Option<HeaderValue>,
        identity: Option<&Identity>,
        policy: &Policy,
        conn: &Conn,
        body_limit: Option<u64>,
    ) -> Result<(Response<Body>, Duration), Deny> {
        let upgrade = upgrade_offer(&req, &policy.upgrades);
        // HTTP/1 clients send one request at a time: they get their own upstream
        // connection. HTTP/2 (many streams at once) and upgrades use the pool.
        let direct = upgrade.is_none() && req.version() <= Version::HTTP_11;
        *req.uri_mut() = self.upstream_target(req.uri(), new_path, direct)?;
        *req.version_mut() = Version::HTTP_11;
        self.set_headers(
            req.headers_mut(),
            policy,
            conn,
            identity,
            host,
            &upgrade,
            direct,
        );

        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        // A request with a body: the upstream timeout counts from when it was all sent
        // (an upload takes as long as it takes while its frames keep moving).
        let (sent, body_sent) = match http_body::Body::is_end_stream(req.body()) {
            true => (None, None),
            false => {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let progress = Arc::new(BodyProgress::default());
                (Some((tx, progress.clone())), Some((rx, progress)))
            }
        };
        let req = req.map(|b| {
            let b = ClientBody { inner: b, sent };
            match body_limit {
                Some(limit) => Limited::new(b, limit as usize).boxed(),
                None => b.boxed(),
            }
        });

        let started = Instant::now();
        let outcome = match body_sent {
            None => tokio::time::timeout(self.timeout, self.send(req, conn, direct))
                .await
                .ok(),
            // Boxed: the larger state of this path stays off every request's future.
            Some(body_sent) => Box::pin(self.send_after_body(req, conn, direct, body_sent)).await,
        };
        let mut resp = outcome.ok_or(Deny::UpstreamTimeout)??;
        let elapsed = started.elapsed();

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return match (client_upgrade, upgrade) {
                (Some(client), Some(offer)) if switched_to_offered(&resp, &offer) => {
                    self.tunnel(client, &mut resp, conn.slot.clone());
                    let (parts, _) = resp.into_parts();
                    Ok((Response::from_parts(parts, crate::error::full("")), elapsed))
                }
                // 101 to a request that did not offer that protocol: refuse, not tunnel.
                _ => Err(Deny::UpstreamUnavailable),
            };
        }
        strip_hop_by_hop(resp.headers_mut());
        Ok((resp.map(|b| b.map_err(BoxError::from).boxed()), elapsed))
    }

    /// To the client connection's own upstream connection, or through the pool.
    async fn send(
        &self,
        req: Request<Body>,
        conn: &Conn,
        direct: bool,
    ) -> Result<Response<Incoming>, Deny> {
        if direct {
            self.send_direct(&conn.upstream, req).await
        } else {
            self.client.request(req).await.map_err(|e| classify(&e))
        }
    }

    /// `send`, with the upstream timeout counted from when the body was all sent
    /// (`body_sent` resolves then; `None` when it passed), and the body bounded by
    /// `tunnel_idle` between frames (408 if the client stopped sending, 504 if the
    /// upstream stopped taking it).
    async fn send_after_body(
        &self,
        req: Request<Body>,
        conn: &Conn,
        direct: bool,
        (body_sent, progress): (tokio::sync::oneshot::Receiver<()>, Arc<BodyProgress>),
    ) -> Option<Result<Response<Incoming>, Deny>> {
        let head_due = async {
            let _ = body_sent.await;
            tokio::time::sleep(self.timeout).await
        };
        tokio::select! {
            r = self.send(req, conn, direct) => Some(r),
            _ = head_due => None,
            stalled = progress.stalled(self.tunnel_idle) => Some(Err(stalled)),
        }
    }

    /// The request target the upstream gets: origin form on a connection of our own,
    /// absolute form for the pool (which dials from it).
    fn upstream_target(
        &self,
        uri: &Uri,
        new_path: Option<String>,
        direct: bool,
    ) -> Result<Uri, Deny> {
        let path_and_query = match new_path {
            None => uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            Some(p) => {
                let s = match uri.query() {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                PathAndQuery::try_from(s).map_err(|_| Deny::BadPath)?
            }
        };
        if direct {
            return Ok(Uri::from(path_and_query));
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.upstream.scheme.clone());
        parts.authority = Some(self.upstream.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| Deny::BadPath)
    }

    /// Every header the upstream sees is one keygate vouches for: the client's are
    /// cleaned (`strip_client_headers`), then identity, `X-Forwarded-*`, `Host` and the
    /// allowed `Upgrade` are set.
    #[allow(clippy::too_many_arguments)]
    fn set_headers(
        &self,
        headers: &mut HeaderMap,
        policy: &Policy,
        conn: &Conn,
        identity: Option<&Identity>,
        host: Option<HeaderValue>,
        upgrade: &Option<HeaderValue>,
        direct: bool,
    ) {
        // Room for what is added below at once, instead of the map growing insert by
        // insert (`try_`: a map already at http's size limit just grows as it can).
        let _ = headers.try_reserve(10);
        let trusted = policy
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&conn.peer.ip()));
        strip_client_headers(headers, policy, trusted);
        if let Some(u) = upgrade {
            headers.insert(header::UPGRADE, u.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers.remove(header::PROXY_AUTHORIZATION);
        if !policy.forward_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        set_identity(headers, policy, identity);
        set_forwarded(headers, conn, trusted, host.as_ref());
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
    }

    /// Copy both ways once both sides have switched protocols.
    /// `slot` keeps the client connection's `max_connections` slot for the tunnel's life.
    fn tunnel(
        &self,
        client: hyper::upgrade::OnUpgrade,
        resp: &mut Response<Incoming>,
        slot: super::Slot,
    ) {
        let upstream = hyper::upgrade::on(resp);
        let idle = self.tunnel_idle;
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::try_join!(client, upstream) {
                Ok((c, u)) => {
                    crate::connection::tunnel(TokioIo::new(c), TokioIo::new(u), idle).await
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
}

/// How a request body moves: written by the body as the upstream connection polls it,
/// read by the request waiting for the response head.
#[derive(Default)]
struct BodyProgress {
    frames: AtomicU64,
    ended: AtomicBool,
    /// The last poll found no data from the client (else the upstream is not taking it).
    waiting_on_client: AtomicBool,
}

impl BodyProgress {
    /// Resolves once no frame moved for `idle` before the body ended: whose fault it is.
    async fn stalled(&self, idle: Duration) -> Deny {
        let tick = (idle / 4).max(Duration::from_millis(5));
        let (mut seen, mut since) = (self.frames.load(Ordering::Relaxed), Instant::now());
        loop {
            tokio::time::sleep(tick).await;
            if self.ended.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let now = self.frames.load(Ordering::Relaxed);
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= idle {
                return match self.waiting_on_client.load(Ordering::Relaxed) {
                    true => Deny::RequestTimeout,
                    false => Deny::UpstreamTimeout,
                };
            }
        }
    }
}

/// The client's request body on its way upstream: its errors are the client's
/// (`ClientBodyError`); `sent`'s sender is dropped once it has ended (the upstream
/// timeout starts then) and its progress tells a stalled client from a stalled upstream.
struct ClientBody {
    inner: Incoming,
    sent: Option<(tokio::sync::oneshot::Sender<()>, Arc<BodyProgress>)>,
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let end = match &r {
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if let Some((_, p)) = &self.sent {
            p.waiting_on_client.store(r.is_pending(), Ordering::Relaxed);
            if let Poll::Ready(Some(Ok(_))) = r {
                p.frames.fetch_add(1, Ordering::Relaxed);
            }
            if end {
                p.ended.store(true, Ordering::Relaxed);
                self.sent = None;
            }
        }
        r.map(|f| f.map(|f| f.map_err(|e| BoxError::from(ClientBodyError(e)))))
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An error of the client's request body (bad chunked framing, cut off): the client's
/// fault (400), not the upstream's (502).
#[derive(Debug)]
struct ClientBodyError(hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> Deny {
    if e.is_connect() {
        return Deny::UpstreamUnavailable;
    }
    classify_source(e)
}

/// A body over the route's limit (413) or a broken one (400) is the client's fault;
/// anything else is the upstream's (502).
fn classify_source(e: &(dyn std::error::Error + 'static)) -> Deny {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return Deny::BodyTooLarge;
        }
        if s.is::<ClientBodyError>() {
            tracing::debug!(error = %s, "client request body failed");
            return Deny::BadRequestBody;
        }
        source = s.source();
    }
    tracing::debug!(error = %e, "upstream request failed");
    Deny::UpstreamUnavailable
}

/// The protocols of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`)
/// that `allowed` names, as the `Upgrade` value to forward; `None` when it offers none
/// (then it is forwarded as a plain request, its `Upgrade` removed).
fn upgrade_offer<B>(req: &Request<B>, allowed: &[Box<str>]) -> Option<HeaderValue> {
    let asks = req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let offered = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| allowed_protocol(p, allowed));
    let kept: Vec<&str> = offered.collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// `websocket` or `websocket/13` when `websocket` is allowed (names are case-insensitive).
fn allowed_protocol(protocol: &str, allowed: &[Box<str>]) -> bool {
    let name = protocol.split('/').next().unwrap_or("").trim();
    !name.is_empty() && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// The upstream switched to one of the protocols offered to it.
fn switched_to_offered<B>(resp: &Response<B>, offer: &HeaderValue) -> bool {
    let Some(chosen) = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let name = chosen.split('/').next().unwrap_or("").trim();
    offer.to_str().unwrap_or("").split(',').any(|p| {
        p.split('/')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(name)
    })
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

/// Remove what a client may not tell the upstream: hop-by-hop headers; any header with an
/// `_` in its name (CGI, WSGI, Rack and PHP read `x_keygate_tenant` as
/// `x-keygate-tenant`), or with `underscore_headers: keep` those that would read as a
/// header keygate vouches for; method and URL overrides; and, unless the peer is a
/// trusted proxy, client address and scheme claims.
fn strip_client_headers(headers: &mut HeaderMap, policy: &Policy, trusted: bool) {
    strip_hop_by_hop(headers);
    let mut refused = Vec::new();
    for name in headers.keys() {
        if refuse(name.as_str(), policy, trusted) {
            refused.push(name.clone());
        }
    }
    for n in refused {
        headers.remove(n);
    }
}

fn refuse(name: &str, policy: &Policy, trusted: bool) -> bool {
    if name.as_bytes().contains(&b'_') {
        return !policy.keep_underscore_headers || vouched(&name.replace('_', "-"), policy);
    }
    if name.len() >= 64 || CLAIM_LENGTHS & (1 << name.len()) == 0 {
        return false;
    }
    OVERRIDES.contains(&name) || (!trusted && CLIENT_CLAIMS.contains(&name))
}

/// A name keygate sets, rewrites or strips: a look-alike spelling must not reach the
/// upstream either.
fn vouched(name: &str, policy: &Policy) -> bool {
    let ids = &policy.identity;
    [&ids.key_id, &ids.tenant, &ids.scopes, &ids.key_type]
        .iter()
        .any(|n| n.as_str() == name)
        || HOP_BY_HOP.iter().any(|n| n.as_str() == name)
        || OVERRIDES.contains(&name)
        || CLIENT_CLAIMS.contains(&name)
        || [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "authorization",
            "proxy-authorization",
            "host",
            "content-length",
        ]
        .contains(&name)
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

/// `X-Forwarded-*`: kept and extended for trusted peers, overwritten for everyone else;
/// `Forwarded` (RFC 7239) is extended for trusted peers and was removed for the others.
fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, trusted: bool, host: Option<&HeaderValue>) {
    let peer_ip = conn.peer.ip();
    let proto = if conn.tls { "https" } else { "http" };
    if trusted {
        extend_forwarded(headers, peer_ip, proto);
    }
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

/// A trusted proxy's `Forwarded` elements, then this hop's (`for`, quoted for IPv6).
fn extend_forwarded(headers: &mut HeaderMap, peer: std::net::IpAddr, proto: &str) {
    let prev: Vec<&str> = headers
        .get_all(FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prev.is_empty() {
        return;
    }
    let this = match peer {
        std::net::IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    let value = format!("{}, {this}", prev.join(", "));
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            headers.insert(FORWARDED, v);
        }
        Err(_) => {
            headers.remove(FORWARDED);
        }
    }
}
