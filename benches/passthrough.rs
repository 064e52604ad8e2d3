//! Bare hyper 1.x pass-through proxies for `scripts/loadbench`: keygate's own stack with
//! nothing else, the physical limit keygate's numbers are compared with. `cargo bench`
//! runs it as a no-op; the load bench starts the built binary with
//! `--listen ADDR --upstream HOST:PORT [--pooled] [--workers N]`:
//! - default: keygate's architecture: one thread per CPU, each a single-threaded runtime
//!   serving the connections an acceptor hands it (the least busy worker gets the next),
//!   and one upstream connection per client connection driven on the same thread;
//! - `--pooled`: the textbook hyper proxy: a multi-threaded runtime and hyper-util's
//!   pooled client.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "test and bench code: the request-path rules are for src/"
)]

use http::uri::{Authority, PathAndQuery, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

// The allocator keygate's binary uses, so the comparison is of the proxies alone.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, hyper::Error>;

fn main() {
    let (mut listen, mut upstream, mut pooled, mut workers) = (None, None, false, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--upstream" => upstream = args.next(),
            "--pooled" => pooled = true,
            "--workers" => workers = args.next().and_then(|n| n.parse::<usize>().ok()),
            _ => {} // `cargo bench` passes --bench and filters: ignore them
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        println!("passthrough: started by scripts/loadbench (--listen ADDR --upstream HOST:PORT)");
        return;
    };
    let listen: SocketAddr = listen.parse().expect("--listen ADDR");
    let upstream: SocketAddr = upstream.parse().expect("--upstream HOST:PORT");
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if pooled {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(workers);
        let rt = rt.enable_all().build().expect("runtime");
        rt.block_on(serve_pooled(listen, upstream));
        return;
    }
    // As keygate: an acceptor hands each connection to the worker with the fewest open
    // ones; each worker is a thread with a single-threaded runtime.
    let listener = keygate::proxy::server::bind(listen).expect("bind");
    let workers: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
            let open = Arc::new(AtomicUsize::new(0));
            let count = open.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(serve_per_core(rx, count, upstream))
            });
            (tx, open)
        })
        .collect();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                let (tx, open) = workers
                    .iter()
                    .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
                    .expect("a worker");
                open.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(stream);
            }
        });
}

fn bad_gateway() -> Response<Body> {
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

async fn serve_per_core(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
    upstream: SocketAddr,
) {
    while let Some(stream) = incoming.recv().await {
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        };
        let open = open.clone();
        tokio::spawn(async move {
            let slot: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let slot = slot.clone();
                async move {
                    let kept = slot.lock().unwrap().take();
                    let mut sender = match kept {
                        Some(s) if !s.is_closed() => s,
                        _ => match connect(upstream).await {
                            Some(s) => s,
                            None => return Ok::<_, Infallible>(bad_gateway()),
                        },
                    };
                    if sender.ready().await.is_err() {
                        return Ok(bad_gateway());
                    }
                    let pq = req
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or(PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(pq);
                    let resp = sender.send_request(req).await;
                    *slot.lock().unwrap() = Some(sender);
                    Ok(match resp {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => bad_gateway(),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connect(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

async fn serve_pooled(listen: SocketAddr, upstream: SocketAddr) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(http);
    let authority: Authority = upstream.to_string().parse().expect("authority");
    let shared = Arc::new((client, authority));
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let mut parts = http::uri::Parts::default();
                    parts.scheme = Some(http::uri::Scheme::HTTP);
                    parts.authority = Some(shared.1.clone());
                    parts.path_and_query = req.uri().path_and_query().cloned();
                    *req.uri_mut() = Uri::from_parts(parts).expect("uri");
                    Ok::<_, Infallible>(match shared.0.request(req).await {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => bad_gateway(),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
