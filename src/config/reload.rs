//! Hot reload: the config file is watched (its directory, so Kubernetes ConfigMap updates,
//! which swap a `..data` symlink, are seen) and SIGHUP reloads too. A new file is loaded
//! and validated first; only a good one is swapped in (routes, scopes, header policy,
//! cache TTLs). A bad one is refused with the same error `check-config` prints.

use super::{Config, StoreConfig};
use crate::cache::KeyCache;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// What a reload may change in a running process.
pub struct Reloadable {
    pub proxy: Arc<Proxy>,
    pub cache: Arc<KeyCache>,
    pub metrics: Arc<Metrics>,
}

/// Swap in a validated `new` config; warn about changes that need a restart.
pub fn apply(current: &mut Config, new: Config, target: &Reloadable) {
    for (what, changed) in [
        ("proxy.listen", current.proxy_listen != new.proxy_listen),
        ("admin.listen", current.admin_listen != new.admin_listen),
        (
            "proxy.upstream",
            current.upstream.authority != new.upstream.authority,
        ),
        ("store", !same_store(&current.store, &new.store)),
        (
            "proxy.timeouts",
            current.timeouts.header_read != new.timeouts.header_read
                || current.timeouts.idle != new.timeouts.idle
                || current.timeouts.upstream != new.timeouts.upstream
                || current.timeouts.write != new.timeouts.write
                || current.timeouts.drain != new.timeouts.drain,
        ),
        (
            "proxy.limits",
            current.limits.max_header_bytes != new.limits.max_header_bytes
                || current.limits.max_uri_bytes != new.limits.max_uri_bytes
                || current.limits.max_connections != new.limits.max_connections,
        ),
        (
            "admin.max_connections",
            current.limits.admin_max_connections != new.limits.admin_max_connections,
        ),
        ("keys", current.prefixes != new.prefixes),
        (
            "cache.max_entries",
            current.cache.max_entries != new.cache.max_entries,
        ),
    ] {
        if changed {
            tracing::warn!(
                field = what,
                "this setting changed but needs a restart to take effect"
            );
        }
    }
    target.proxy.set_policy(new.policy.clone());
    target.cache.set_ttls(new.cache.ttl, new.cache.negative_ttl);
    let routes = new.policy.routes().len();
    current.policy = new.policy;
    current.cache.ttl = new.cache.ttl;
    current.cache.negative_ttl = new.cache.negative_ttl;
    target
        .metrics
        .config_reloads
        .with_label_values(&["success"])
        .inc();
    tracing::info!(routes, "configuration reloaded");
}

fn same_store(a: &StoreConfig, b: &StoreConfig) -> bool {
    match (a, b) {
        (StoreConfig::Memory, StoreConfig::Memory) => true,
        (StoreConfig::Redis(x), StoreConfig::Redis(y)) => {
            x.url == y.url && x.namespace == y.namespace && x.timeout == y.timeout
        }
        _ => false,
    }
}

fn reload_once(path: &Path, current: &mut Config, target: &Reloadable) {
    match Config::load(path) {
        Ok(new) => apply(current, new, target),
        Err(e) => {
            target
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            tracing::error!(error = %e, "configuration reload refused; keeping the running configuration");
        }
    }
}

/// Watch `path` and SIGHUP until `shutdown`.
pub async fn run(
    path: PathBuf,
    mut current: Config,
    target: Reloadable,
    mut shutdown: watch::Receiver<bool>,
) {
    // The file itself, or a ConfigMap's `..data` symlink swap.
    let mut names = vec![std::ffi::OsString::from("..data")];
    names.extend(path.file_name().map(|n| n.to_owned()));
    let dir = crate::watch::dir_of(&path);
    let mut changes = match crate::watch::watch_files(std::slice::from_ref(&dir), Some(names)) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config file; SIGHUP still reloads");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    loop {
        tokio::select! {
            Some(()) = async { match changes.as_mut() { Some(c) => c.next().await, None => None } } => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                tracing::info!("SIGHUP: reloading configuration");
            }
            _ = shutdown.changed() => return,
        }
        reload_once(&path, &mut current, &target);
    }
}
