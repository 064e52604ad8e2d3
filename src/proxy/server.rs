//! The proxy listener: one worker thread per CPU, each with its own single-threaded
//! runtime (as nginx's workers); an acceptor hands each connection to the least busy
//! worker, so a request is served start to finish on one thread; accept bounded by `max_connections`, HTTP/1.1 and HTTP/2 via
//! hyper-util's auto builder, header-read and idle timeouts, and graceful drain.

use super::{Conn, Proxy};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

/// A stream that counts the reads and writes that moved bytes, for the idle timeout (a
/// counter, not a clock read per I/O: the watcher compares it between its ticks).
struct IdleIo<T> {
    inner: T,
    moved: Arc<AtomicU64>,
}

impl<T> IdleIo<T> {
    fn note(&self) {
        // One writer (the connection's task): no read-modify-write needed.
        let n = self.moved.load(Ordering::Relaxed);
        self.moved.store(n.wrapping_add(1), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.note();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.note();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            self.note();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bind the proxy's listening socket (a plain socket: no runtime needed yet).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// A connection handed to a worker, with its `max_connections` slot.
type Handoff = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// Serve with `workers` threads until `shutdown` turns true; then stop accepting and let
/// open connections finish their in-flight requests for up to `drain`. Returns when every
/// worker has stopped.
///
/// This task accepts and hands each connection to the worker with the fewest open ones
/// (a connection's requests then all run on that worker). Not `SO_REUSEPORT` listeners:
/// the kernel's hash can load one worker far more than another, a process of the same
/// user could bind the port too and take a share, and two listeners binding port 0 could
/// be given the same port.
pub async fn serve_workers(
    listener: std::net::TcpListener,
    workers: usize,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let mut done = Vec::new();
    let mut handoff = Vec::new();
    for i in 0..workers.max(1) {
        let (tx, rx) = mpsc::unbounded_channel::<Handoff>();
        let open = Arc::new(AtomicUsize::new(0));
        handoff.push((tx, open.clone()));
        let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
        done.push(finished_rx);
        let (proxy, settings, tls, shutdown) = (
            proxy.clone(),
            settings.clone(),
            tls.clone(),
            shutdown.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("keygate-proxy-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.block_on(worker(rx, open, proxy, settings, tls, shutdown, drain))
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start a proxy worker's runtime"),
                }
                let _ = finished.send(());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a proxy worker thread");
        }
    }

    match TcpListener::from_std(listener) {
        Ok(listener) => loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break, // closed: never happens, the semaphore is ours
                },
                _ = shutdown.changed() => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let Some((tx, open)) = handoff
                .iter()
                .filter(|(tx, _)| !tx.is_closed())
                .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
            else {
                tracing::error!("no proxy worker is running");
                break;
            };
            open.fetch_add(1, Ordering::Relaxed);
            if tx.send((stream, peer, permit)).is_err() {
                open.fetch_sub(1, Ordering::Relaxed);
            }
        },
        Err(e) => tracing::error!(error = %e, "cannot listen on the proxy socket"),
    }
    // Stop accepting; the workers drain their connections.
    drop(handoff);
    for rx in done {
        if rx.await.is_err() {
            tracing::error!("a proxy worker stopped abnormally");
        }
    }
}

/// One worker: serves the connections handed to it as tasks on this thread's runtime.
async fn worker(
    mut incoming: mpsc::UnboundedReceiver<Handoff>,
    open: Arc<AtomicUsize>,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();

    loop {
        let (stream, peer, permit) = tokio::select! {
            c = incoming.recv() => match c {
                Some(c) => c,
                None => break, // the acceptor stopped: shutting down
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a connection");
                open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
        };
        let proxy = proxy.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let idle = settings.idle_timeout;
        let handshake_timeout = settings.header_read_timeout;
        let tls = tls.clone();
        let open = open.clone();
        connections.spawn(async move {
            match tls {
                None => {
                    let conn = Conn::new(peer, false);
                    serve_connection(stream, conn, proxy, &builder, shutdown, idle).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = Conn::new(peer, true);
                            serve_connection(stream, conn, proxy, &builder, shutdown, idle).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drain_connections(&mut connections, drain).await;
}

/// Wait up to `drain` for this worker's connections, which saw the shutdown signal and finish their requests.
async fn drain_connections(connections: &mut JoinSet<()>, drain: Duration) {
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, all_done).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "drain timeout: closing connections with requests in flight"
        );
        connections.shutdown().await;
    }
}

struct ConnCtx {
    proxy: Arc<Proxy>,
    conn: Conn,
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    conn: Conn,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
    idle: Duration,
) {
    let peer = conn.peer;
    let moved = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(IdleIo {
        inner: stream,
        moved: moved.clone(),
    });
    let ctx = Arc::new(ConnCtx { proxy, conn });
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.proxy.handle(req, &ctx.conn).await) }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // The idle and shutdown watch is a task of its own, which runs only when its timer or
    // the shutdown signal fires: polled here, its timer and the shutdown receiver would be
    // polled again at every wake-up of the connection, several times per request.
    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    tokio::spawn(watch_connection(moved, idle, shutdown, close_tx));
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with error");
                }
                // Dropping `close_rx` ends the watcher.
                return;
            }
            // Graceful: a request still in flight (slow upstream) completes first.
            _ = &mut close_rx, if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Tell the connection to close once no bytes moved for `idle` (checked every quarter
/// of it, so it closes between `idle` and 1.25 x `idle` after the last byte) or when
/// the server shuts down. Returns when the connection has ended.
async fn watch_connection(
    moved: Arc<AtomicU64>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut close: oneshot::Sender<()>,
) {
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut seen = moved.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            _ = close.closed() => return,
            // A closed channel means the server is going away too.
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(tick) => {
                let now = moved.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    quiet = Duration::ZERO;
                } else {
                    quiet += tick;
                    if quiet >= idle {
                        break;
                    }
                }
            }
        }
    }
    let _ = close.send(());
}
