//! Forwarding to the upstream: the request's target rewritten and its headers made
//! (`headers`), bodies streamed both ways under the upstream timeout, `Upgrade`
//! tunnelled only after the upstream answers 101. An HTTP/1 client connection gets its own
//! upstream connection, driven on the same worker thread (no pool lock, no cross-thread
//! wake-up per request); HTTP/2 clients and upgrades go through hyper-util's pooled client.

use super::headers;
use super::Conn;
use crate::cache::Identity;
use crate::config::Upstream;
use crate::error::{Body, BoxError, Deny};
use crate::policy::Policy;
use bytes::Bytes;
use http::header::{self, HeaderValue};
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

/// What the request path decided about one request: how it goes upstream.
pub struct Outbound<'a> {
    /// The normalised path, when it differs from the one received.
    pub path: Option<String>,
    /// The host the upstream is told (see `request_host`).
    pub host: Option<HeaderValue>,
    /// The caller; `None` on a public route.
    pub identity: Option<&'a Identity>,
    /// The route's request body limit.
    pub body_limit: Option<u64>,
    /// Admitted without asking the rate-limit store (`on_store_error: allow`): the
    /// upstream is told with `x-keygate-ratelimit: unchecked`.
    pub unchecked: bool,
}

pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    connector: HttpsConnector<HttpConnector>,
    upstream: Upstream,
    /// `scheme://authority/` of the upstream: what the connector dials.
    upstream_uri: Uri,
    /// The upstream's authority as a `Host` value, for a client that named no host.
    upstream_host: Option<HeaderValue>,
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
        let upstream_host = HeaderValue::from_str(upstream.authority.as_str()).ok();
        Ok(Forwarder {
            client,
            connector,
            upstream,
            upstream_uri,
            upstream_host,
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

    /// Send the request upstream as `out` says. Returns the response and the time to its
    /// head.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        out: Outbound<'_>,
        policy: &Policy,
        conn: &Conn,
    ) -> Result<(Response<Body>, Duration), Deny> {
        let upgrade = headers::upgrade_offer(&req, &policy.headers.upgrades);
        // HTTP/1 clients send one request at a time: they get their own upstream
        // connection. HTTP/2 (many streams at once) and upgrades use the pool.
        let direct = upgrade.is_none() && req.version() <= Version::HTTP_11;
        *req.uri_mut() = self.upstream_target(req.uri(), out.path, direct)?;
        *req.version_mut() = Version::HTTP_11;
        // HTTP/1.1 needs a Host (the pool adds one from the URI; do the same).
        let default_host = match out.host {
            None if direct => self.upstream_host.as_ref(),
            _ => None,
        };
        headers::set_request_headers(
            req.headers_mut(),
            policy,
            conn,
            out.identity,
            out.host,
            upgrade.as_ref(),
            out.unchecked,
        );
        if let Some(h) = default_host {
            req.headers_mut().insert(header::HOST, h.clone());
        }
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (req, body_sent) = outgoing_body(req, out.body_limit);

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
            let switched = self.switch(client_upgrade.zip(upgrade), resp, conn)?;
            return Ok((switched, elapsed));
        }
        headers::strip_hop_by_hop(resp.headers_mut());
        Ok((resp.map(|b| b.map_err(BoxError::from).boxed()), elapsed))
    }

    /// A 101: tunnel if the upstream switched to a protocol this request offered (the
    /// client gets the 101 head), refuse otherwise.
    fn switch(
        &self,
        upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
        mut resp: Response<Incoming>,
        conn: &Conn,
    ) -> Result<Response<Body>, Deny> {
        match upgrade {
            Some((client, offer)) if headers::switched_to_offered(&resp, &offer) => {
                self.tunnel(client, &mut resp, conn.slot.clone());
                let (parts, _) = resp.into_parts();
                Ok(Response::from_parts(parts, crate::error::full("")))
            }
            // 101 to a request that did not offer that protocol: refuse, not tunnel.
            _ => Err(Deny::UpstreamUnavailable),
        }
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
        (body_sent, progress): BodySent,
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

/// A request body's end (the sender is dropped then) and how it moves, for the request
/// waiting on the upstream's answer.
type BodySent = (tokio::sync::oneshot::Receiver<()>, Arc<BodyProgress>);

/// The request body as it goes upstream: bounded by `limit`, and for a request with a
/// body, what tells the upstream timeout when the body was all sent (an upload takes as
/// long as it takes while its frames keep moving).
fn outgoing_body(req: Request<Incoming>, limit: Option<u64>) -> (Request<Body>, Option<BodySent>) {
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
        match limit {
            Some(limit) => Limited::new(b, limit as usize).boxed(),
            None => b.boxed(),
        }
    });
    (req, body_sent)
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
