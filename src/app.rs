//! `App::build(config)` binds both listeners and wires store, cache, proxy and admin;
//! `run_until_stopped` serves until shutdown. The same entry point serves `main` and tests.

use crate::admin::{self, AdminState};
use crate::cache::KeyCache;
use crate::config::reload::Reloadable;
use crate::config::{Config, StoreConfig};
use crate::connection::{Deadlines, ServerSettings};
use crate::feed::FeedSettings;
use crate::key::{self, KeyHasher};
use crate::metrics::Metrics;
use crate::proxy::server;
use crate::proxy::Proxy;
use crate::store::{memory::MemoryStore, redis::RedisStore, KeyStore};
use crate::tls::CertResolver;
use crate::usage::{UsageQueue, UsageRecorder};
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
        let (store, redis_feed): (Arc<dyn KeyStore>, _) = match &config.store {
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
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            config.cache.ttl,
            config.cache.negative_ttl,
            config.cache.max_entries,
        ));
        let hasher = KeyHasher::new(config.pepper.as_ref().map(|p| p.0.as_bytes()));
        let metrics = Arc::new(Metrics::new());
        let (usage, usage_queue) = UsageRecorder::new();
        let proxy = Arc::new(
            Proxy::new(
                &config,
                cache.clone(),
                hasher.clone(),
                metrics.clone(),
                usage,
            )
            .map_err(|e| anyhow::anyhow!("proxy.upstream_ca: {e}"))?,
        );
        let admin = Arc::new(AdminState {
            store,
            cache,
            hasher,
            prefixes: config.prefixes.clone(),
            root_digest: config
                .root_token
                .as_ref()
                .map(|t| key::sha256(t.0.as_bytes())),
            default_tenant: config.default_tenant.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
        });
        let proxy_listener = server::bind(config.proxy_listen).map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (proxy): {e}", config.proxy_listen)
        })?;
        let admin_listener = TcpListener::bind(config.admin_listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (admin): {e}", config.admin_listen)
        })?;
        let tls = match &config.tls {
            None => None,
            Some((cert, key)) => Some(Arc::new(
                CertResolver::new(cert.clone(), key.clone()).map_err(|e| anyhow::anyhow!(e))?,
            )),
        };
        let admin_tls = match &config.admin_tls {
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
                    header_read: config.timeouts.header_read,
                    idle: config.timeouts.idle,
                    write: config.timeouts.write,
                    // A slow upstream is bounded by its own timeout, not the idle one.
                    stall: config.timeouts.idle.max(config.timeouts.upstream),
                    drain: config.timeouts.drain,
                },
                max_header_bytes: config.limits.max_header_bytes,
                max_uri_bytes: config.limits.max_uri_bytes,
                max_connections: config.limits.max_connections,
            },
            shutdown: Arc::new(tx),
            redis_feed,
            usage_queue,
            last_used_interval: config.last_used_interval,
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
        let drain = self.config.timeouts.drain;
        let rx = self.shutdown.subscribe();
        if let Some(feed) = self.redis_feed.clone() {
            tokio::spawn(crate::feed::follow(
                feed,
                self.admin.cache.clone(),
                self.admin.metrics.clone(),
                rx.clone(),
            ));
        }
        if let Some(path) = self.reload_from.clone() {
            tokio::spawn(crate::config::reload::run(
                path,
                self.config.clone(),
                Reloadable {
                    proxy: self.proxy.clone(),
                    cache: self.admin.cache.clone(),
                    metrics: self.admin.metrics.clone(),
                },
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
            max_connections: self.config.limits.admin_max_connections,
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
        server::serve_workers(self.proxy_listener, self.config.proxy_workers, setup).await;
        // After the drain: the last requests' uses are in the queue; write them.
        let _ = stop_usage.send(());
        let _ = tokio::time::timeout(drain, flusher).await;
        let _ = tokio::time::timeout(drain, admin).await;
        Ok(())
    }
}
