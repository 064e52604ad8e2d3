//! One client connection, on the proxy port or the admin port: accepted within
//! `max_connections`, the TLS handshake, then hyper's HTTP/1.1 and HTTP/2 server with
//! every deadline enforced by keygate. hyper's own header-read timer also cuts
//! idle keep-alive connections and never runs before the protocol is known, and nothing in
//! hyper closes a connection whose peer stops reading or never acknowledges a GOAWAY.
//!
//! The request path only bumps counters (the I/O wrapper and the response body do); a
//! watcher task per connection reads them a few times per timeout and decides.

use crate::error::Deny;
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// After keygate asks a connection to close (GOAWAY on HTTP/2), how long a peer with no
/// request in flight may take to go; then the socket is closed regardless.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The deadlines of a connection (`proxy.timeouts`).
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// From accept (TLS handshake included) to the first complete request head; on an
    /// HTTP/1 keep-alive connection, from the first byte of a request to its full head.
    pub header_read: Duration,
    /// No request in progress for this long: the connection is closed.
    pub idle: Duration,
    /// A response write that makes no progress for this long (the client stopped reading).
    pub write: Duration,
    /// A response being sent that moves nothing for this long (an HTTP/2 stream stuck
    /// on flow control, an upstream that went quiet mid-body).
    pub stall: Duration,
    /// At shutdown, how long requests in flight may take to finish.
    pub drain: Duration,
}

impl Deadlines {
    /// How often the watcher looks: a quarter of the shortest deadline, so each one holds
    /// within 1.25 times its value.
    fn tick(&self) -> Duration {
        (self.header_read.min(self.idle).min(self.write) / 4).max(Duration::from_millis(5))
    }
}

/// How keygate serves connections on a port: deadlines and size limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub deadlines: Deadlines,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_connections: usize,
}

impl ServerSettings {
    /// hyper's HTTP/1 and HTTP/2 server as keygate runs it on either port. hyper's own
    /// header-read timer is off: it would also cut idle keep-alive connections, and
    /// `serve` enforces `header_read` from accept instead.
    pub fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(self.max_header_bytes)
            .max_headers(max_header_count(self.max_header_bytes))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(self.max_header_bytes as u32);
        builder
    }

    /// The longest first request line read before hyper parses it (414 beyond): the
    /// target limit plus room for the method and version.
    pub fn max_first_line(&self) -> usize {
        self.max_uri_bytes + 64
    }
}

/// Header fields a head may carry: as many as the byte limit allows at 16 bytes a field
/// (hyper's default of 100 refuses a legitimate head of many short fields with 431), up
/// to 10,000: http's `HeaderMap` holds at most 24,576 and panics beyond.
pub fn max_header_count(max_header_bytes: usize) -> usize {
    (max_header_bytes / 16).clamp(100, 10_000)
}

/// What a connection did, as counters: written by its I/O and its requests, read by its
/// watcher. No clock is read per request or per I/O.
#[derive(Default)]
struct Activity {
    reads: AtomicU64,
    writes: AtomicU64,
    /// Bytes written: a response in flow-controlled pieces moves them between frames.
    written: AtomicU64,
    /// The last write (or flush) could not go through: the peer's window is full.
    write_blocked: AtomicBool,
    /// Each response being sent, by slot: each must make progress of its own (on HTTP/2
    /// one stuck stream is not kept alive by its siblings, nor by PING or SETTINGS).
    responses: Responses,
    /// Request heads received and responses finished (body written or dropped).
    heads: AtomicU64,
    done: AtomicU64,
    /// `reads` when the last response finished: more reads after it are a new request.
    reads_at_done: AtomicU64,
    /// HTTP/2: frames between requests (PING, WINDOW_UPDATE) are not a request head.
    multiplexed: AtomicBool,
}

/// Response slots: more than HTTP/2's concurrent streams (`MAX_STREAMS`), so every
/// response has one; a bit per slot in use, and per slot its occupant and frames sent.
const SLOTS: usize = 128;
const MAX_STREAMS: u32 = 100;

struct Responses {
    used: [AtomicU64; SLOTS / 64],
    /// Bumped when a slot gets a new response: the watcher tells occupants apart.
    epoch: [AtomicU64; SLOTS],
    frames: [AtomicU64; SLOTS],
}

impl Default for Responses {
    fn default() -> Self {
        Responses {
            used: std::array::from_fn(|_| AtomicU64::new(0)),
            epoch: std::array::from_fn(|_| AtomicU64::new(0)),
            frames: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Responses {
    /// A free slot, or `None` if all are taken (that response is then not watched alone).
    fn acquire(&self) -> Option<usize> {
        for (word, used) in self.used.iter().enumerate() {
            let mut bits = used.load(Ordering::Relaxed);
            while bits != u64::MAX {
                let bit = bits.trailing_ones() as usize;
                match used.compare_exchange_weak(
                    bits,
                    bits | 1 << bit,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        let slot = word * 64 + bit;
                        self.epoch[slot].fetch_add(1, Ordering::Release);
                        return Some(slot);
                    }
                    Err(now) => bits = now,
                }
            }
        }
        None
    }

    fn release(&self, slot: usize) {
        self.used[slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::AcqRel);
    }

    fn in_use(&self) -> impl Iterator<Item = usize> + '_ {
        self.used.iter().enumerate().flat_map(|(word, used)| {
            let bits = used.load(Ordering::Acquire);
            (0..64)
                .filter(move |b| bits & 1 << b != 0)
                .map(move |b| word * 64 + b)
        })
    }
}

impl Activity {
    /// One writer per counter (the task driving the I/O): no read-modify-write needed.
    fn bump(counter: &AtomicU64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }
}

/// One connection's watch, made at accept and handed to `serve`.
struct Watch {
    activity: Arc<Activity>,
    accepted: Instant,
}

impl Watch {
    /// `accepted`: when the TCP connection was accepted (the TLS handshake counts against
    /// `header_read`).
    fn new(accepted: Instant) -> Watch {
        Watch {
            activity: Arc::new(Activity::default()),
            accepted,
        }
    }

    /// Wrap the client stream so its reads and writes are counted. `max_first_line`, when
    /// set, answers 414 to an HTTP/1 first request line longer than that (hyper would
    /// answer 431 to a head over its buffer, whatever made it long).
    fn io<T>(&self, inner: T, max_first_line: Option<usize>) -> TokioIo<WatchedIo<T>> {
        TokioIo::new(WatchedIo {
            inner,
            activity: self.activity.clone(),
            first_line_left: max_first_line.unwrap_or(0),
            line_started: false,
        })
    }
}

/// A request head arrived: the returned guard, carried by the response body, marks the
/// response finished when dropped.
fn begin<B>(activity: &Arc<Activity>, req: &Request<B>) -> Finished {
    if req.version() == Version::HTTP_2 {
        activity.multiplexed.store(true, Ordering::Relaxed);
    }
    activity.heads.fetch_add(1, Ordering::AcqRel);
    Finished(activity.clone())
}

/// Dropped when a response is finished (fully written, or abandoned).
pub struct Finished(Arc<Activity>);

impl Drop for Finished {
    fn drop(&mut self) {
        let a = &self.0;
        a.reads_at_done
            .store(a.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        a.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// A response body that marks its response finished when it is dropped (hyper drops it
/// once the last frame is written), and holds a response slot while it is being sent.
pub struct Tracked<B> {
    body: B,
    slot: Option<usize>,
    /// The rest of a data frame larger than `MAX_FRAME`.
    rest: Option<Bytes>,
    finished: Finished,
}

impl<B> Tracked<B> {
    pub fn new(body: B, finished: Finished) -> Self {
        Tracked {
            body,
            slot: finished.0.responses.acquire(),
            rest: None,
            finished,
        }
    }

    /// At most `MAX_FRAME` of `data`; the rest is kept for the next poll.
    fn piece(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > MAX_FRAME {
            self.rest = Some(data.split_off(MAX_FRAME));
        }
        if let Some(slot) = self.slot {
            self.finished.0.responses.frames[slot].fetch_add(1, Ordering::Relaxed);
        }
        Frame::data(data)
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.finished.0.responses.release(slot);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(rest) = self.rest.take() {
            return Poll::Ready(Some(Ok(self.piece(rest))));
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(self.piece(data)))),
                Err(trailers) => Poll::Ready(Some(Ok(trailers))),
            },
            other => other,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// The client stream, counting the reads and writes that moved bytes.
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Bytes of the first request line still allowed before it is refused; 0: no check.
    first_line_left: usize,
    /// A byte of the first request line (not a leading CR or LF) has been seen.
    line_started: bool,
}

impl<T: AsyncWrite + Unpin> WatchedIo<T> {
    /// The first request line is over the limit: answer 414 here (a best-effort write of
    /// a few hundred bytes into an empty socket buffer), then fail the read so hyper stops.
    fn refuse_long_line(&mut self, cx: &mut Context<'_>) -> io::Error {
        static ANSWER: std::sync::LazyLock<Bytes> =
            std::sync::LazyLock::new(|| Bytes::from(Deny::UriTooLong.raw_http1()));
        let _ = Pin::new(&mut self.inner).poll_write(cx, &ANSWER);
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        io::Error::new(io::ErrorKind::InvalidData, "request target too long")
    }

    /// Scan newly read bytes of the first request line (empty lines before it, which
    /// RFC 9112 §2.2 lets a server skip, do not end it).
    fn check_first_line(&mut self, fresh: &[u8]) -> bool {
        let fresh = match self.line_started {
            true => fresh,
            false => {
                let skip = fresh
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                self.line_started = skip < fresh.len();
                &fresh[skip..]
            }
        };
        if fresh.is_empty() {
            return true;
        }
        match fresh.iter().position(|&b| b == b'\n') {
            Some(end) if end < self.first_line_left => {
                self.first_line_left = 0;
                true
            }
            None if fresh.len() < self.first_line_left => {
                self.first_line_left -= fresh.len();
                true
            }
            _ => false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() > before {
                Activity::bump(&self.activity.reads);
                if self.first_line_left > 0 && !self.check_first_line(&buf.filled()[before..]) {
                    return Poll::Ready(Err(self.refuse_long_line(cx)));
                }
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> WatchedIo<T> {
    /// A write (or flush) that could not go through marks the connection blocked; one
    /// that did clears it, and what it wrote is counted.
    fn note_write(&self, r: Poll<usize>) {
        let a = &self.activity;
        match r {
            Poll::Pending => a.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(n) => {
                if a.write_blocked.load(Ordering::Relaxed) {
                    a.write_blocked.store(false, Ordering::Relaxed);
                }
                if n > 0 {
                    Activity::bump(&a.writes);
                    let w = a.written.load(Ordering::Relaxed);
                    a.written.store(w.wrapping_add(n as u64), Ordering::Relaxed);
                }
            }
        }
    }
}

/// How much a write wrote (0 for an error), or that it could not go through.
fn written(r: &Poll<io::Result<usize>>) -> Poll<usize> {
    match r {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(n)) => Poll::Ready(*n),
        Poll::Ready(Err(_)) => Poll::Ready(0),
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(written(&r));
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(written(&r));
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(if r.is_pending() {
            Poll::Pending
        } else {
            Poll::Ready(0)
        });
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The next connection that has a free `max_connections` slot; `None` at shutdown.
/// Accept errors (out of file descriptors and the like) back off instead of spinning.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.ok()?,
            _ = shutdown.changed() => return None,
        };
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => return Some((stream, peer, permit)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// At shutdown: wait up to `drain` for `connections`, which saw the signal and finish
/// their requests; then cut the rest.
pub async fn drain(connections: &mut tokio::task::JoinSet<()>, drain: Duration) {
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, all_done).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "drain timeout: closing connections with requests in flight"
        );
        connections.shutdown().await;
    }
}

/// What the watcher tells the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Finish what is in flight, then close (HTTP/2: GOAWAY).
    Graceful,
    /// Drop the connection now.
    Now,
}

/// How one port serves its connections, made once for the port (on the proxy port, once
/// per worker) and shared by its connections: hyper's builder, the deadlines, TLS and
/// the shutdown signal.
pub struct Port {
    /// `proxy` or `admin`, for the logs.
    name: &'static str,
    builder: auto::Builder<TokioExecutor>,
    deadlines: Deadlines,
    /// See `Watch::io`.
    max_first_line: Option<usize>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
}

impl Port {
    /// Serve with `settings` (TLS when `tls` is given) until `shutdown` turns true.
    pub fn new(
        name: &'static str,
        settings: &ServerSettings,
        tls: Option<TlsAcceptor>,
        shutdown: watch::Receiver<bool>,
    ) -> Port {
        Port {
            name,
            builder: settings.builder(),
            deadlines: settings.deadlines.clone(),
            max_first_line: None,
            tls,
            shutdown,
        }
    }

    /// Answer 414 to an HTTP/1 first request line longer than `max` (see `Watch::io`).
    pub fn with_max_first_line(mut self, max: usize) -> Port {
        self.max_first_line = Some(max);
        self
    }

    /// One accepted connection, on either port: the TLS handshake when the port has TLS
    /// (it counts against `header_read` from `accepted`), then `serve`. `handler` is made
    /// once the handshake is done, told whether the connection is over TLS.
    pub async fn serve_tcp<M, H, F, B>(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        accepted: Instant,
        handler: M,
    ) where
        M: FnOnce(bool) -> H,
        H: Fn(Request<Incoming>) -> F + Send + 'static,
        F: std::future::Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let watch = Watch::new(accepted);
        let Some(acceptor) = &self.tls else {
            return self.serve(watch, stream, peer, handler(false)).await;
        };
        let until = accepted + self.deadlines.header_read;
        match tokio::time::timeout_at(until, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve(watch, stream, peer, handler(true)).await,
            Ok(Err(e)) => {
                tracing::debug!(port = self.name, peer = %peer, error = %e, "TLS handshake failed")
            }
            Err(_) => tracing::debug!(port = self.name, peer = %peer, "TLS handshake timed out"),
        }
    }

    /// Serve one connection until it ends, a deadline passes, or shutdown (graceful, then
    /// cut after `drain`): each request goes to `handler`, its response marked finished
    /// when its body is.
    async fn serve<I, H, F, B>(&self, watch: Watch, stream: I, peer: SocketAddr, handler: H)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>) -> F + Send + 'static,
        F: std::future::Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = watch.io(stream, self.max_first_line);
        let marks = watch.activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let finished = begin(&marks, &req);
            let response = handler(req);
            async move {
                let resp = response.await;
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, finished)))
            }
        });
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        // The watcher is a task of its own: polled here, its timer would be polled again at
        // every wake-up of the connection, several times per request.
        let (tx, mut rx) = mpsc::channel(2);
        tokio::spawn(watch_connection(
            watch.activity,
            watch.accepted,
            self.deadlines.clone(),
            self.shutdown.clone(),
            tx,
        ));
        let mut closing = false;
        loop {
            tokio::select! {
                biased;
                res = connection.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                cmd = rx.recv() => match cmd {
                    Some(Close::Graceful) if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Some(Close::Graceful) => {}
                    Some(Close::Now) | None => {
                        tracing::debug!(peer = %peer, "connection closed at its deadline");
                        return;
                    }
                }
            }
        }
    }
}

/// Bytes an HTTP/1 response must move to count as progress without a frame of its own.
const PIECE: u64 = 1024;

/// Largest data frame a response body hands hyper: larger ones are split (no copy), so a
/// slow HTTP/2 reader still shows progress every 16 KiB.
const MAX_FRAME: usize = 16 * 1024;

/// A response slot as the watcher last saw it.
#[derive(Clone)]
struct ResponseSeen {
    epoch: u64,
    frames: u64,
    at: Instant,
    written: u64,
}

impl ResponseSeen {
    fn new(epoch: u64, frames: u64, at: Instant, written: u64) -> Self {
        ResponseSeen {
            epoch,
            frames,
            at,
            written,
        }
    }
}

/// The watcher's view of the counters at its last look, and when each last changed.
struct Seen {
    reads: u64,
    writes: u64,
    heads: u64,
    done: u64,
    write_at: Instant,
    /// Each response slot as last seen (made when the first response is being sent).
    responses: Vec<ResponseSeen>,
    /// Since when no request has been in progress (any start or end resets it).
    quiet_since: Instant,
    /// When bytes of a next HTTP/1 request head were first seen.
    head_since: Option<Instant>,
    /// When keygate asked the connection to close, and whether for shutdown.
    closing: Option<(Instant, bool)>,
}

impl Seen {
    fn new(a: &Activity, now: Instant) -> Seen {
        Seen {
            reads: a.reads.load(Ordering::Relaxed),
            writes: a.writes.load(Ordering::Relaxed),
            heads: 0,
            done: 0,
            write_at: now,
            responses: Vec::new(),
            quiet_since: now,
            head_since: None,
            closing: None,
        }
    }

    fn update(&mut self, a: &Activity, now: Instant) {
        let (reads, writes) = (
            a.reads.load(Ordering::Relaxed),
            a.writes.load(Ordering::Relaxed),
        );
        let (heads, done) = (
            a.heads.load(Ordering::Acquire),
            a.done.load(Ordering::Acquire),
        );
        if writes != self.writes {
            self.write_at = now;
        }
        if heads != self.heads || done != self.done {
            self.quiet_since = now;
            self.head_since = None;
        }
        (self.reads, self.writes, self.heads, self.done) = (reads, writes, heads, done);
    }

    /// Is a response stuck: no frame of its own for `stall`? On HTTP/1 (one response at
    /// a time, nothing else written) what the connection writes counts too; on HTTP/2
    /// each response must move its own frames (`Tracked` sends at most 16 KiB a frame).
    fn stuck_response(&mut self, a: &Activity, stall: Duration, now: Instant) -> bool {
        let r = &a.responses;
        let sending = r.in_use().count();
        if sending == 0 {
            return false;
        }
        let written = a.written.load(Ordering::Relaxed);
        // On HTTP/2, bytes written may be acknowledgements of the client's own frames.
        let lone = sending == 1 && !a.multiplexed.load(Ordering::Relaxed);
        if self.responses.is_empty() {
            self.responses = vec![ResponseSeen::new(0, 0, now, written); SLOTS];
        }
        for slot in r.in_use() {
            let epoch = r.epoch[slot].load(Ordering::Acquire);
            let frames = r.frames[slot].load(Ordering::Relaxed);
            let s = &mut self.responses[slot];
            let pieces = lone && written.wrapping_sub(s.written) >= PIECE;
            if s.epoch != epoch || s.frames != frames || pieces {
                *s = ResponseSeen::new(epoch, frames, now, written);
            } else if now - s.at >= stall {
                return true;
            }
        }
        false
    }

    /// The one decision: what to do with the connection now.
    fn verdict(
        &mut self,
        a: &Activity,
        d: &Deadlines,
        accepted: Instant,
        now: Instant,
    ) -> Option<Close> {
        let busy = self.heads != self.done;
        if busy {
            let blocked = a.write_blocked.load(Ordering::Relaxed);
            if (blocked && now - self.write_at >= d.write) || self.stuck_response(a, d.stall, now) {
                return Some(Close::Now);
            }
        }
        if let Some((since, _)) = self.closing {
            // Requests still in flight (or opened after the GOAWAY by a peer that never
            // acknowledged it) get `drain`, as at shutdown.
            let grace_over = !busy && now - since >= CLOSE_GRACE;
            return (grace_over || now - since >= d.drain).then_some(Close::Now);
        }
        if busy {
            return None;
        }
        if self.heads == 0 {
            return (now - accepted >= d.header_read).then_some(Close::Now);
        }
        let next_head = !a.multiplexed.load(Ordering::Relaxed)
            && self.reads != a.reads_at_done.load(Ordering::Relaxed);
        if next_head {
            let since = *self.head_since.get_or_insert(now);
            if now - since >= d.header_read {
                return Some(Close::Now);
            }
        }
        if now - self.quiet_since >= d.idle {
            self.closing = Some((now, false));
            return Some(Close::Graceful);
        }
        None
    }
}

/// Watch one connection's counters until it ends; tell it to close when a deadline
/// passes or the server shuts down.
async fn watch_connection(
    activity: Arc<Activity>,
    accepted: Instant,
    d: Deadlines,
    mut shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Close>,
) {
    let mut seen = Seen::new(&activity, Instant::now());
    let mut tick = d.tick();
    let mut shutting = *shutdown.borrow();
    loop {
        if shutting && seen.closing.is_none_or(|(_, s)| !s) {
            seen.closing = Some((Instant::now(), true));
            if tx.send(Close::Graceful).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            // A closed channel means the server is going away too.
            r = shutdown.changed(), if !shutting => {
                shutting = r.is_err() || *shutdown.borrow();
                continue;
            }
            _ = tokio::time::sleep(tick) => {}
        }
        let now = Instant::now();
        seen.update(&activity, now);
        if let Some(close) = seen.verdict(&activity, &d, accepted, now) {
            // The connection is gone (send failed) or told to go now: nothing to watch.
            if tx.send(close).await.is_err() || close == Close::Now {
                return;
            }
        }
        if seen.closing.is_some() {
            tick = tick.min(CLOSE_GRACE / 4);
        }
    }
}

/// Copy both ways between an upgraded client connection and the upstream until either
/// side ends or no byte moves for `idle`.
pub async fn tunnel<A, B>(client: A, upstream: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::default());
    let mut c = WatchedIo {
        inner: client,
        activity: activity.clone(),
        first_line_left: 0,
        line_started: false,
    };
    let mut u = WatchedIo {
        inner: upstream,
        activity: activity.clone(),
        first_line_left: 0,
        line_started: false,
    };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
    tokio::pin!(copy);
    let tick = (idle / 4).max(Duration::from_millis(5));
    let mut seen = (0, Instant::now());
    loop {
        tokio::select! {
            _ = copy.as_mut() => return,
            _ = tokio::time::sleep(tick) => {
                // Both ends bump the same counters, from this one task.
                let moved = activity.reads.load(Ordering::Relaxed)
                    .wrapping_add(activity.writes.load(Ordering::Relaxed));
                let now = Instant::now();
                if moved != seen.0 {
                    seen = (moved, now);
                } else if now - seen.1 >= idle {
                    tracing::debug!("upgraded connection idle: closed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// A large body reaches hyper in frames of at most `MAX_FRAME`, each counted as the
    /// response's progress: a slow HTTP/2 reader shows progress every 16 KiB, not once per
    /// upstream chunk.
    #[tokio::test]
    async fn large_frames_are_handed_over_in_counted_pieces() {
        let watch = Watch::new(Instant::now());
        let activity = watch.activity.clone();
        let req = Request::new(());
        let body = Full::new(Bytes::from(vec![7u8; 100_000]));
        let mut tracked = Tracked::new(body, begin(&watch.activity, &req));
        let slot = tracked.slot.expect("a free slot");
        let mut sizes = Vec::new();
        while let Some(frame) = tracked.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        assert!(sizes.iter().all(|&n| n <= 16 * 1024), "{sizes:?}");
        assert_eq!(sizes.len(), 7, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 100_000);
        let counted = activity.responses.frames[slot].load(Ordering::Relaxed);
        assert_eq!(counted as usize, sizes.len());
        drop(tracked);
        assert_eq!(
            activity.responses.in_use().count(),
            0,
            "the slot was not given back"
        );
        assert_eq!(activity.done.load(Ordering::Relaxed), 1);
    }
}
