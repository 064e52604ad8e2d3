//! `App::build(config)` binds both listeners and wires store, cache, proxy and admin;
//! `run_until_stopped` serves until shutdown. The same entry point serves `main` and tests.

pub mod reload;

use crate::admin::{self, AdminState};
use crate::auth::Verifier;
use crate::cache::KeyCache;
use crate::config::{Config, Fixed, ScanAction, SecretScanning, StoreConfig};
use crate::connection::{Deadlines, ServerSettings};
use crate::feed::FeedSettings;
use crate::key::{self, KeyHasher};
use crate::limits::local::Joining;
use crate::limits::{LimitStore, Limiter};
use crate::metrics::Metrics;
use crate::proxy::server;
use crate::proxy::Proxy;
use crate::secret_scanning::Scanner;
use crate::snapshot::{Live, Snapshot};
use crate::store::cluster::{ClusterFeed, ClusterSettings, ClusterStore};
use crate::store::redis::{Mode, RedisSettings, RedisStore};
use crate::store::topology::StoreStats;
use crate::store::{memory::MemoryStore, KeyStore};
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
    followers: Followers,
    usage_queue: UsageQueue,
    last_used_interval: Duration,
    /// `local` rate-limit counters waiting to join the exchange, and where it goes.
    limit_exchange: (Joining, Arc<dyn LimitStore>),
    config: Config,
    reload_from: Option<PathBuf>,
    tls: Option<Arc<CertResolver>>,
    admin_tls: Option<Arc<CertResolver>>,
    /// The secret-scanning listener, when `secret_scanning` is configured.
    scanning: Option<ScanningPort>,
    /// Where the secret-scanning listener listens (`None`: off).
    pub scanning_addr: Option<SocketAddr>,
}

/// The secret-scanning listener's socket and TLS, bound in `build`.
struct ScanningPort {
    listener: TcpListener,
    tls: Option<Arc<CertResolver>>,
    config: SecretScanning,
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
        let fixed = &config.fixed;
        let (store, followers) = open_store(&fixed.store)?;
        let metrics = Arc::new(Metrics::new());
        metrics
            .store
            .watch(fixed.store.mode(), followers.stats.clone());
        let live = Live::new(Snapshot::new(&config, &metrics));
        let pepper = fixed.pepper.as_ref().map(|p| p.expose_secret().as_bytes());
        let verifier = Verifier {
            cache: Arc::new(KeyCache::new(fixed.cache_max_entries)),
            hasher: KeyHasher::new(pepper),
            prefixes: fixed.prefixes.clone(),
            legacy: fixed.legacy.clone(),
        };
        let (usage, usage_queue) = UsageRecorder::new();
        let (limiter, joining, limit_store) = Limiter::for_store(&*store, metrics.clone());
        let (v, s, m) = (verifier.clone(), store.clone(), metrics.clone());
        let proxy = Proxy::new(&config, live.clone(), v, s, m, usage, Arc::new(limiter))
            .map_err(|e| anyhow::anyhow!("proxy.upstream_ca: {e}"))?;
        let admin = AdminState {
            limits: limit_store.clone(),
            store,
            verifier,
            live,
            root_digest: (fixed.root_token.as_ref())
                .map(|t| key::sha256(t.expose_secret().as_bytes())),
            default_tenant: fixed.default_tenant.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
        };
        let (proxy_listener, admin_listener) = bind(fixed).await?;
        let (tls, admin_tls) = (cert_resolver(&fixed.tls)?, cert_resolver(&fixed.admin_tls)?);
        let scanning = bind_scanning(fixed).await?;
        let (tx, _) = watch::channel(false);
        Ok(App {
            scanning_addr: (scanning.as_ref())
                .map(|s| s.listener.local_addr())
                .transpose()?,
            scanning,
            proxy_addr: proxy_listener.local_addr()?,
            admin_addr: admin_listener.local_addr()?,
            proxy: Arc::new(proxy),
            admin: Arc::new(admin),
            proxy_listener,
            admin_listener,
            settings: server_settings(fixed),
            shutdown: Arc::new(tx),
            followers,
            usage_queue,
            last_used_interval: fixed.last_used_interval,
            limit_exchange: (joining, limit_store),
            reload_from: None,
            tls,
            admin_tls,
            config,
        })
    }

    /// The start line (where keygate listens, its upstream, store and route count), and a
    /// warning when the admin API has no root token to let the first caller in.
    pub fn log_started(&self) {
        let fixed = &self.config.fixed;
        let (store, namespace) = match &fixed.store {
            StoreConfig::Redis(r) => (r.display_url(), r.namespace.as_str()),
            StoreConfig::Memory => ("memory".into(), "-"),
        };
        tracing::info!(
            proxy = %self.proxy_addr,
            proxy_tls = fixed.tls.is_some(),
            admin = %self.admin_addr,
            upstream = %format_args!("{}://{}", fixed.upstream.scheme, fixed.upstream.authority),
            store = %store,
            namespace = %namespace,
            digests = if fixed.pepper.is_some() { "hmac-sha256" } else { "sha256" },
            routes = self.config.live.policy.routes().len(),
            "keygate started"
        );
        if let (Some(addr), Some(s)) = (self.scanning_addr, &fixed.secret_scanning) {
            tracing::info!(
                secret_scanning = %addr,
                tls = s.tls.is_some(),
                action = match s.action {
                    ScanAction::Revoke => "revoke",
                    ScanAction::Report => "report",
                },
                public_keys = s.public_keys.len(),
                "secret-scanning listener started"
            );
        }
        if fixed.root_token.is_none() {
            tracing::warn!(
                "no root token is configured: the admin API accepts management keys only, \
                 so no first key can be made; set KEYGATE_ROOT_TOKEN (or the variable named \
                 by admin.root_token_env) or admin.root_token_file, and restart"
            );
        }
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
        self.follow_changes(&rx);
        let (stop_usage, usage_stopped) = tokio::sync::oneshot::channel();
        let flusher = tokio::spawn(crate::usage::run_flusher(
            self.usage_queue,
            self.admin.store.clone(),
            self.admin.metrics.clone(),
            self.last_used_interval,
            usage_stopped,
        ));
        tokio::spawn(crate::dormant::run(
            self.admin.store.clone(),
            self.admin.metrics.clone(),
            self.config.fixed.dormant_interval,
            rx.clone(),
        ));
        let (joining, limit_store) = self.limit_exchange;
        let exchange = tokio::spawn(crate::limits::local::run_exchange(
            joining,
            limit_store,
            self.config.fixed.limit_sync_interval,
            rx.clone(),
        ));
        let admin_settings = ServerSettings {
            max_connections: self.config.fixed.limits.admin_max_connections,
            ..self.settings.clone()
        };
        let scanning = self.scanning.map(|port| {
            let scanner = Scanner {
                admin: self.admin.clone(),
                public_keys: port.config.public_keys,
                action: port.config.action,
            };
            tokio::spawn(admin::serve_port(
                "secret_scanning",
                port.listener,
                crate::secret_scanning::router(Arc::new(scanner)),
                tls_acceptor(port.tls, &rx),
                admin_settings.clone(),
                rx.clone(),
            ))
        });
        let admin = tokio::spawn(admin::serve(
            self.admin_listener,
            admin::router(self.admin.clone()),
            tls_acceptor(self.admin_tls, &rx),
            admin_settings,
            rx.clone(),
        ));
        let (ready, mut ready_rx) = (self.admin.ready.clone(), rx.clone());
        tokio::spawn(async move {
            let _ = ready_rx.wait_for(|stop| *stop).await;
            ready.store(false, Ordering::Release);
        });
        let setup = server::WorkerSetup {
            proxy: self.proxy,
            settings: self.settings,
            tls: tls_acceptor(self.tls, &rx),
            shutdown: rx,
        };
        let workers = self.config.fixed.proxy_workers;
        let served = server::serve_workers(self.proxy_listener, workers, setup).await;
        // The proxy may have stopped on its own: the admin port goes with it.
        let _ = self.shutdown.send(true);
        // After the drain: the last requests' uses are in the queue; write them.
        let _ = stop_usage.send(());
        let _ = tokio::time::timeout(drain, flusher).await;
        let _ = tokio::time::timeout(drain, exchange).await;
        let _ = tokio::time::timeout(drain, admin).await;
        if let Some(scanning) = scanning {
            let _ = tokio::time::timeout(drain, scanning).await;
        }
        served.map_err(|e| anyhow::anyhow!("the proxy stopped serving: {e}"))
    }

    /// Start following the store's change feed and the config file (with SIGHUP, taken
    /// before the ports serve: until then SIGHUP would end the process).
    fn follow_changes(&self, rx: &watch::Receiver<bool>) {
        if let Some(sentinel) = &self.followers.sentinel {
            if let Some(follow) = sentinel.follow_topology(rx.clone()) {
                tokio::spawn(follow);
            }
        }
        if let Some(feed) = self.followers.cluster_feed.clone() {
            let (cache, metrics) = (
                self.admin.verifier.cache.clone(),
                self.admin.metrics.clone(),
            );
            tokio::spawn(crate::feed::cluster::follow(
                feed,
                cache,
                metrics,
                rx.clone(),
            ));
        }
        if let Some(feed) = self.followers.feed.clone() {
            let (cache, metrics) = (
                self.admin.verifier.cache.clone(),
                self.admin.metrics.clone(),
            );
            tokio::spawn(crate::feed::follow(feed, cache, metrics, rx.clone()));
        }
        if let Some(path) = self.reload_from.clone() {
            let target = reload::Target {
                live: self.proxy.live.clone(),
                metrics: self.admin.metrics.clone(),
            };
            let (config, hup) = (self.config.clone(), reload::hangups());
            tokio::spawn(reload::run(path, config, target, hup, rx.clone()));
        }
    }
}

/// The configured store for a command-line tool (`keygate migrate`): with Sentinel, the
/// primary is followed until `shutdown`.
pub fn connect_store(
    store: &StoreConfig,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Arc<dyn KeyStore>> {
    let (store, followers) = open_store(store)?;
    if let Some(follow) = followers.sentinel.and_then(|s| s.follow_topology(shutdown)) {
        tokio::spawn(follow);
    }
    Ok(store)
}

/// What keeps the cache in step with the store, and the store on its primary.
#[derive(Default)]
struct Followers {
    /// The change feed (standalone and Sentinel).
    feed: Option<FeedSettings>,
    /// Sentinel: the store whose connections follow the primary.
    sentinel: Option<RedisStore>,
    /// Cluster: the change feed on the buckets' sharded channels.
    cluster_feed: Option<ClusterFeed>,
    stats: Option<Arc<StoreStats>>,
}

/// The store, and what follows its changes and its topology.
fn open_store(store: &StoreConfig) -> anyhow::Result<(Arc<dyn KeyStore>, Followers)> {
    Ok(match store {
        StoreConfig::Memory => (Arc::new(MemoryStore::new()), Followers::default()),
        StoreConfig::Redis(
            settings @ RedisSettings {
                mode: Mode::Cluster { nodes },
                ..
            },
        ) => {
            let store = ClusterStore::connect(&ClusterSettings {
                nodes: nodes.clone(),
                namespace: settings.namespace.clone(),
                timeout: settings.timeout,
                min_replicas_ack: settings.min_replicas_ack,
                ack_timeout: settings.ack_timeout,
                ca_file: settings.ca_file.clone(),
            })?;
            let followers = Followers {
                stats: Some(store.stats()),
                cluster_feed: Some(store.feed_settings()),
                ..Followers::default()
            };
            (Arc::new(store), followers)
        }
        StoreConfig::Redis(settings) => {
            let store = RedisStore::connect(settings)?;
            let feed = FeedSettings {
                target: store.target(),
                channel: store.channel(),
                seq_key: store.seq_key(),
            };
            let followers = Followers {
                feed: Some(feed),
                stats: Some(store.target().stats.clone()),
                sentinel: matches!(settings.mode, Mode::Sentinel(_)).then(|| store.clone()),
                cluster_feed: None,
            };
            (Arc::new(store), followers)
        }
    })
}

/// Both listening sockets, or an error naming the address that could not be bound.
async fn bind(fixed: &Fixed) -> anyhow::Result<(std::net::TcpListener, TcpListener)> {
    let refused = |addr: SocketAddr, port: &str, e: std::io::Error| {
        anyhow::anyhow!("cannot listen on {addr} ({port}): {e}")
    };
    let proxy =
        server::bind(fixed.proxy_listen).map_err(|e| refused(fixed.proxy_listen, "proxy", e))?;
    let admin = TcpListener::bind(fixed.admin_listen)
        .await
        .map_err(|e| refused(fixed.admin_listen, "admin", e))?;
    Ok((proxy, admin))
}

/// The secret-scanning listener's socket (and its TLS), when configured.
async fn bind_scanning(fixed: &Fixed) -> anyhow::Result<Option<ScanningPort>> {
    let Some(s) = &fixed.secret_scanning else {
        return Ok(None);
    };
    let listener = TcpListener::bind(s.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (secret_scanning): {e}", s.listen))?;
    let tls = cert_resolver(&s.tls)?;
    Ok(Some(ScanningPort {
        listener,
        tls,
        config: s.clone(),
    }))
}

fn cert_resolver(pair: &Option<(PathBuf, PathBuf)>) -> anyhow::Result<Option<Arc<CertResolver>>> {
    let Some((cert, key)) = pair else {
        return Ok(None);
    };
    let resolver = CertResolver::new(cert.clone(), key.clone()).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(Arc::new(resolver)))
}

/// The proxy port's connection settings (the admin port's differ in `max_connections`).
fn server_settings(fixed: &Fixed) -> ServerSettings {
    let t = &fixed.timeouts;
    ServerSettings {
        deadlines: Deadlines {
            header_read: t.header_read,
            idle: t.idle,
            write: t.write,
            // A slow upstream is bounded by its own timeout, not the idle one.
            stall: t.idle.max(t.upstream),
            drain: t.drain,
        },
        max_header_bytes: fixed.limits.max_header_bytes,
        max_uri_bytes: fixed.limits.max_uri_bytes,
        max_connections: fixed.limits.max_connections,
    }
}

/// The TLS acceptor of a port, with its certificate watched for changes.
fn tls_acceptor(
    resolver: Option<Arc<CertResolver>>,
    rx: &watch::Receiver<bool>,
) -> Option<tokio_rustls::TlsAcceptor> {
    let resolver = resolver?;
    tokio::spawn(crate::tls::watch_cert(resolver.clone(), rx.clone()));
    Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
        resolver,
    )))
}
