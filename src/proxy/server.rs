//! The proxy listener: one worker thread per CPU, each with its own single-threaded
//! runtime (as nginx's workers); an acceptor hands each connection to the least busy
//! worker, so a request is served start to finish on one thread. Accept bounded by
//! `max_connections`, TLS, deadlines and drain are `connection`'s, shared with the admin
//! port.

use super::{Conn, Proxy, Slot};
use crate::connection::{self, Port, ServerSettings};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

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
type Handoff = (
    std::net::TcpStream,
    SocketAddr,
    OwnedSemaphorePermit,
    tokio::time::Instant,
);

/// What every proxy worker is given: the same for all of them.
#[derive(Clone)]
pub struct WorkerSetup {
    pub proxy: Arc<Proxy>,
    /// Its `deadlines.drain` bounds the drain at shutdown.
    pub settings: ServerSettings,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: watch::Receiver<bool>,
}

/// Serve with `workers` threads until `setup.shutdown` turns true; then stop accepting and
/// let open connections finish their in-flight requests for up to `deadlines.drain`.
/// Returns when every worker has stopped: an error if serving ended without being asked
/// to (no worker left, the socket unusable) or a worker ended abnormally.
///
/// This task accepts and hands each connection to the worker with the fewest open ones
/// (a connection's requests then all run on that worker). Not `SO_REUSEPORT` listeners:
/// the kernel's hash can load one worker far more than another, a process of the same
/// user could bind the port too and take a share, and two listeners binding port 0 could
/// be given the same port.
pub async fn serve_workers(
    listener: std::net::TcpListener,
    workers: usize,
    setup: WorkerSetup,
) -> Result<(), String> {
    let slots = Arc::new(Semaphore::new(setup.settings.max_connections));
    let mut shutdown = setup.shutdown.clone();
    let (handoff, done): (Vec<_>, Vec<_>) = (0..workers.max(1))
        .map(|i| start_worker(i, setup.clone()))
        .unzip();
    let mut failed = None;
    match TcpListener::from_std(listener) {
        Ok(listener) => loop {
            let Some((stream, peer, permit)) =
                connection::accept(&listener, &slots, &mut shutdown).await
            else {
                break;
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
                failed = Some("no proxy worker is running".to_string());
                break;
            };
            open.fetch_add(1, Ordering::Relaxed);
            let accepted = tokio::time::Instant::now();
            if tx.send((stream, peer, permit, accepted)).is_err() {
                open.fetch_sub(1, Ordering::Relaxed);
            }
        },
        Err(e) => failed = Some(format!("cannot listen on the proxy socket: {e}")),
    }
    // Stop accepting; the workers drain their connections.
    drop(handoff);
    for rx in done {
        if rx.await.is_err() {
            failed.get_or_insert_with(|| "a proxy worker stopped abnormally".to_string());
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Worker thread `i` with its own single-threaded runtime: where to hand it connections,
/// its open-connection count, and a signal when it has stopped.
fn start_worker(
    i: usize,
    setup: WorkerSetup,
) -> (
    (mpsc::UnboundedSender<Handoff>, Arc<AtomicUsize>),
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Handoff>();
    let open = Arc::new(AtomicUsize::new(0));
    let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = (tx, open.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("keygate-proxy-{i}"))
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    // Access lines collect per worker and go to the log writer in batches.
                    crate::logging::batch_this_thread();
                    runtime.block_on(async {
                        let flusher = tokio::spawn(crate::logging::flush_every());
                        worker(rx, open, setup).await;
                        flusher.abort();
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot start a proxy worker's runtime"),
            }
            crate::logging::flush_this_thread();
            let _ = finished.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a proxy worker thread");
    }
    (handle, finished_rx)
}

/// One worker: serves the connections handed to it as tasks on this thread's runtime.
async fn worker(
    mut incoming: mpsc::UnboundedReceiver<Handoff>,
    open: Arc<AtomicUsize>,
    setup: WorkerSetup,
) {
    let WorkerSetup {
        proxy,
        settings,
        tls,
        mut shutdown,
    } = setup;
    let port = Port::new("proxy", &settings, tls, shutdown.clone())
        .with_max_first_line(settings.max_first_line());
    let port = Arc::new(port);
    let mut connections = JoinSet::new();
    // This worker's own read path to the store, used by its connections only.
    let reader = proxy
        .store
        .worker_reader()
        .unwrap_or_else(|| proxy.store.clone());
    // And its own way to the rate-limit counters (exact mode), over that connection.
    let limits = crate::limits::worker_store(&*reader);

    loop {
        let (stream, peer, permit, accepted) = tokio::select! {
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
        let (proxy, port, open) = (proxy.clone(), port.clone(), open.clone());
        let (reader, limits) = (reader.clone(), limits.clone());
        // Freed when the connection and any tunnel it became are gone.
        let slot: Slot = Arc::new(OpenSlot {
            _permit: permit,
            open,
        });
        connections.spawn(async move {
            let handler = move |tls| {
                let ctx = Arc::new(ConnCtx {
                    proxy,
                    conn: Conn::new(peer, tls, slot, reader, limits),
                });
                move |req| {
                    let ctx = ctx.clone();
                    async move { ctx.proxy.handle(req, &ctx.conn).await }
                }
            };
            port.serve_tcp(stream, peer, accepted, handler).await;
        });
    }
    connection::drain(&mut connections, settings.deadlines.drain).await;
}

/// A connection's `max_connections` slot and its place in its worker's count, given back
/// on drop (also when the connection's task panicked).
struct OpenSlot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ConnCtx {
    proxy: Arc<Proxy>,
    conn: Conn,
}
