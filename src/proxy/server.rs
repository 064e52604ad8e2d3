//! The proxy listener: accept (bounded by `max_connections`), HTTP/1.1 and HTTP/2 via
//! hyper-util's auto builder, header-read and idle timeouts, and graceful drain.

use super::{ConnInfo, Proxy};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// A stream that notes when bytes last moved, for the idle timeout.
struct IdleIo<T> {
    inner: T,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.last.store(now_ms(), Ordering::Relaxed);
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
            self.last.store(now_ms(), Ordering::Relaxed);
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
            self.last.store(now_ms(), Ordering::Relaxed);
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

/// Serve until `shutdown` turns true, then stop accepting and let open connections
/// finish their in-flight requests for up to `drain`.
pub async fn serve(
    listener: TcpListener,
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
    let slots = Arc::new(Semaphore::new(settings.max_connections));

    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
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
        let proxy = proxy.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let idle = settings.idle_timeout;
        let handshake_timeout = settings.header_read_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let conn = ConnInfo { peer, tls: false };
                    serve_connection(stream, conn, proxy, &builder, shutdown, idle).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = ConnInfo { peer, tls: true };
                            serve_connection(stream, conn, proxy, &builder, shutdown, idle).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // Wait for open connections to finish (each one saw the shutdown signal).
    let all = settings.max_connections as u32;
    let _ = tokio::time::timeout(drain, slots.acquire_many(all)).await;
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    conn: ConnInfo,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
    idle: Duration,
) {
    let last = Arc::new(AtomicU64::new(now_ms()));
    let io = TokioIo::new(IdleIo {
        inner: stream,
        last: last.clone(),
    });
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, conn).await) }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let idle_ms = idle.as_millis() as u64;
    let mut closing = false;
    loop {
        let since = now_ms().saturating_sub(last.load(Ordering::Relaxed));
        let wait = Duration::from_millis(idle_ms.saturating_sub(since).max(1));
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(wait), if !closing => {
                if now_ms().saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                    // Graceful: a request still in flight (slow upstream) completes first.
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
