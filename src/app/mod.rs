//! `App::build(config)` binds both listeners and wires store, cache, proxy and admin;
//! `run_until_stopped` serves until shutdown. The same entry point serves `main` and tests.

pub mod reload;

use crate::admin::{self, AdminState};
use crate::auth::Verifier;
use crate::cache::KeyCache;
use crate::config::{Config, StoreConfig};
use crate::connection::{Deadlines, ServerSettings};
use crate::feed::FeedSettings;
use crate::key::{self, KeyHasher};
use crate::metrics::Metrics;
use crate::proxy::server;
use crate::proxy::Proxy;
use crate::snapshot::{Live, Snapshot};
use crate::store::{memory::MemoryStore, redis::RedisStore, KeyStore};
use crate::tls::CertResolver;
use crate::usage::{UsageQueue, UsageRecorder};
use secrecy::ExposeSecret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct App {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub admin: Arc<AdminState>,
    proxy_listener: std::net::TcpListener,
    admin_listener: TcpListener,
    settings: ServerSettings,
    shutdown: Arc<watch::Sender<bool>>,
    redis_feed: Option<FeedSettings>,
    usage_queue: UsageQueue,
    last_used_interval: Duration,
    config: Config,
    reload_from: Option<PathBuf>,
    tls: Option<Arc<CertResolver>>,
    admin_tls: Option<Arc<CertResolver>>,
}

/// Ask a running `App` to stop (drain, then return from `run_until_stopped`).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        // rustls' process-wide provider, used by the Redis TLS client (idempotent).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (store, redis_feed): (Arc<dyn KeyStore>, _) = match &config.fixed.store {
            StoreConfig::Memory => (Arc::new(MemoryStore::new()), None),
            StoreConfig::Redis(settings) => {
                let store = RedisStore::connect(settings)?;
                let feed = FeedSettings {
                    redis: settings.clone(),
                    channel: store.channel(),
                    seq_key: store.seq_key(),
                };
                (Arc::new(store), Some(feed))
            }
        };
        let metrics = Arc::new(Metrics::new());
        let live = Live::new(Snapshot::new(&config, &metrics));
        let verifier = Verifier {
            cache: Arc::new(KeyCache::new(config.fixed.cache_max_entries)),
            hasher: KeyHasher::new(
                config
                    .fixed
                    .pepper
                    .as_ref()
                    .map(|p| p.expose_secret().as_bytes()),
            ),
            prefixes: config.fixed.prefixes.clone(),
        };
        let (usage, usage_queue) = UsageRecorder::new();
        let proxy = Proxy::new(
            &config,
            live.clone(),
            verifier.clone(),
            store.clone(),
            metrics.clone(),
            usage,
        );
        let proxy = Arc::new(proxy.map_err(|e| anyhow::anyhow!("proxy.upstream_ca: {e}"))?);
        let admin = Arc::new(AdminState {
            store,
            verifier,
            live,
            root_digest: config
                .fixed
                .root_token
                .as_ref()
                .map(|t| key::sha256(t.expose_secret().as_bytes())),
            default_tenant: config.fixed.default_tenant.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
        });
        let proxy_listener = server::bind(config.fixed.proxy_listen).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (proxy): {e}",
                config.fixed.proxy_listen
            )
        })?;
        let admin_listener = TcpListener::bind(config.fixed.admin_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {} (admin): {e}",
                    config.fixed.admin_listen
                )
            })?;
        let tls = match &config.fixed.tls {
            None => None,
            Some((cert, key)) => Some(Arc::new(
                CertResolver::new(cert.clone(), key.clone()).map_err(|e| anyhow::anyhow!(e))?,
            )),
        };
        let admin_tls = match &config.fixed.admin_tls {
            None => None,
            Some((cert, key)) => Some(Arc::new(
                CertResolver::new(cert.clone(), key.clone()).map_err(|e| anyhow::anyhow!(e))?,
            )),
        };
        let (tx, _) = watch::channel(false);
        Ok(App {
            proxy_addr: proxy_listener.local_addr()?,
            admin_addr: admin_listener.local_addr()?,
            proxy,
            admin,
            proxy_listener,
            admin_listener,
            settings: ServerSettings {
                deadlines: Deadlines {
                    header_read: config.fixed.timeouts.header_read,
                    idle: config.fixed.timeouts.idle,
                    write: config.fixed.timeouts.write,
                    // A slow upstream is bounded by its own timeout, not the idle one.
                    stall: config
                        .fixed
                        .timeouts
                        .idle
                        .max(config.fixed.timeouts.upstream),
                    drain: config.fixed.timeouts.drain,
                },
                max_header_bytes: config.fixed.limits.max_header_bytes,
                max_uri_bytes: config.fixed.limits.max_uri_bytes,
                max_connections: config.fixed.limits.max_connections,
            },
            shutdown: Arc::new(tx),
            redis_feed,
            usage_queue,
            last_used_interval: config.fixed.last_used_interval,
            config,
            reload_from: None,
            tls,
            admin_tls,
        })
    }

    /// Reload from `path` when it changes or on SIGHUP (`serve --config`).
    pub fn reload_from(mut self, path: PathBuf) -> Self {
        self.reload_from = Some(path);
        self
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Serve both ports until shut down; then readiness turns false, listeners close,
    /// and in-flight requests get up to `proxy.timeouts.drain` to finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let drain = self.config.fixed.timeouts.drain;
        let rx = self.shutdown.subscribe();
        if let Some(feed) = self.redis_feed.clone() {
            tokio::spawn(crate::feed::follow(
                feed,
                self.admin.verifier.cache.clone(),
                self.admin.metrics.clone(),
                rx.clone(),
            ));
        }
        if let Some(path) = self.reload_from.clone() {
            let target = reload::Target {
                live: self.proxy.live.clone(),
                metrics: self.admin.metrics.clone(),
            };
            let hup = reload::hangups();
            tokio::spawn(reload::run(
                path,
                self.config.clone(),
                target,
                hup,
                rx.clone(),
            ));
        }
        let acceptor = self.tls.clone().map(|resolver| {
            tokio::spawn(crate::tls::watch_cert(resolver.clone(), rx.clone()));
            tokio_rustls::TlsAcceptor::from(crate::tls::server_config(resolver))
        });
        let (stop_usage, usage_stopped) = tokio::sync::oneshot::channel();
        let flusher = tokio::spawn(crate::usage::run_flusher(
            self.usage_queue,
            self.admin.store.clone(),
            self.admin.metrics.clone(),
            self.last_used_interval,
            usage_stopped,
        ));
        let ready = self.admin.ready.clone();
        let router = admin::router(self.admin.clone());
        let admin_acceptor = self.admin_tls.clone().map(|resolver| {
            tokio::spawn(crate::tls::watch_cert(resolver.clone(), rx.clone()));
            tokio_rustls::TlsAcceptor::from(crate::tls::server_config(resolver))
        });
        let admin_settings = ServerSettings {
            max_connections: self.config.fixed.limits.admin_max_connections,
            ..self.settings.clone()
        };
        let admin = tokio::spawn(admin::serve(
            self.admin_listener,
            router,
            admin_acceptor,
            admin_settings,
            rx.clone(),
        ));
        let mut ready_rx = rx.clone();
        tokio::spawn(async move {
            let _ = ready_rx.wait_for(|stop| *stop).await;
            ready.store(false, Ordering::Release);
        });
        let setup = server::WorkerSetup {
            proxy: self.proxy,
            settings: self.settings,
            tls: acceptor,
            shutdown: rx,
        };
        server::serve_workers(self.proxy_listener, self.config.fixed.proxy_workers, setup).await;
        // After the drain: the last requests' uses are in the queue; write them.
        let _ = stop_usage.send(());
        let _ = tokio::time::timeout(drain, flusher).await;
        let _ = tokio::time::timeout(drain, admin).await;
        Ok(())
    }
}
