//! The admin port (axum), never the proxy port. Endpoints:
//! - `GET /healthz` (alive), `GET /readyz` (config loaded, store answering), `GET /metrics`
//! - `POST /v1/keys`, `GET /v1/keys`, `DELETE /v1/keys/{id}`: the jack document (`jack.rs`)
//! - `GET|POST /v1/api-keys`, `GET|PATCH|DELETE /v1/api-keys/{id}`,
//!   `POST /v1/api-keys/rotate`, `GET /v1/api-keys/{id}/usage`: the HelloJohn document
//!   (`hellojohn.rs`)
//! - `POST /v1/explain`: what the proxy would decide on a method, path and key
//!   (`explain.rs`), by the proxy's own decision and without its side effects
//! - `POST /v1/api-keys/import`: keys made before keygate, by text or SHA-256 (`import.rs`)
//! - `GET /openapi.json`: the OpenAPI 3.1 document of all of the above
//!
//! Management calls authenticate with the root token or a secret key holding
//! `keys:read` / `keys:write`, and act only inside the caller's tenant.
//!
//! Where things live: `router.rs` (the route table, health, metrics, fallbacks),
//! `caller.rs` (authentication and the `Auth`/`OnKey` extractors), `body.rs` (the
//! `JsonBody`/`QueryParams` extractors), `keys.rs` (the key service both documents
//! call), `limits.rs` (a key's rate limits and credits, in and out, and its usage),
//! `error.rs` (the error shape); `jack.rs` and `hellojohn.rs` translate shapes.

pub mod body;
pub mod caller;
pub mod error;
pub mod explain;
pub mod hellojohn;
pub mod import;
pub mod jack;
pub mod keys;
pub mod limits;
pub mod router;
pub mod strict;

pub use body::{JsonBody, QueryParams, MAX_BODY_BYTES};
pub use caller::{authorize, Auth, Caller, OnKey, Read, Scope, Write};
pub use error::ApiError;
pub use router::{router, OPENAPI};

use crate::auth::Verifier;
use crate::connection::{self, Port, ServerSettings};
use crate::key::Digest;
use crate::metrics::Metrics;
use crate::snapshot::Live;
use crate::store::KeyStore;
use axum::Router;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct AdminState {
    pub store: Arc<dyn KeyStore>,
    /// Where the keys' rate-limit and credits counters live (the one the proxy spends
    /// from): read for credits' `remaining` and the usage endpoint, never spent.
    pub limits: Arc<dyn crate::limits::LimitStore>,
    /// The proxy's key check (cache, digest, formats), for management keys.
    pub verifier: Verifier,
    /// The running snapshot: the cache rules a management key's check follows.
    pub live: Live,
    /// SHA-256 of the root token: compared in constant time, length-independent.
    pub root_digest: Option<Digest>,
    pub default_tenant: String,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

/// Serve the admin router until `shutdown`: at most `settings.max_connections` at once
/// (more wait in the accept backlog), TLS when `tls` is given, the proxy's deadlines on
/// every connection; at shutdown, stop accepting and let requests finish for `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: ServerSettings,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    serve_port("admin", listener, router, tls, settings, shutdown).await;
}

/// `serve` for any axum port of keygate's (`name` in its logs): the secret-scanning
/// listener is served this way too.
pub async fn serve_port(
    name: &'static str,
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: ServerSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let port = Arc::new(Port::new(name, &settings, tls, shutdown.clone()));
    let mut connections = tokio::task::JoinSet::new();
    while let Some((stream, peer, permit)) =
        connection::accept(&listener, &slots, &mut shutdown).await
    {
        let accepted = tokio::time::Instant::now();
        while connections.try_join_next().is_some() {}
        let (router, port) = (router.clone(), port.clone());
        connections.spawn(async move {
            let _permit = permit;
            serve_one(&port, stream, peer, accepted, router).await;
        });
    }
    connection::drain(&mut connections, settings.deadlines.drain).await;
}

/// One admin connection: the router behind keygate's connection deadlines.
async fn serve_one(
    port: &Port,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    accepted: tokio::time::Instant,
    router: Router,
) {
    use tower_service::Service;
    let handler = move |_tls| {
        move |req| {
            let mut router = router.clone();
            async move {
                match router.call(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        }
    };
    port.serve_tcp(stream, peer, accepted, handler).await;
}
