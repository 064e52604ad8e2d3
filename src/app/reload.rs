//! Hot reload: the config file is watched (its directory, so Kubernetes ConfigMap updates,
//! which swap a `..data` symlink, are seen) and SIGHUP reloads too. A new file is loaded
//! and validated first; only a good one becomes the running snapshot (routes, scopes,
//! header policy, cache rules: `config::Live`). A bad one is refused with the same error
//! `check-config` prints. What needs a restart is `config::Fixed`, and is only warned of.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::{Live, Snapshot};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::Signal;
use tokio::sync::watch;

/// Where a reload lands: the running snapshot, and the metrics its route handles use.
pub struct Target {
    pub live: Live,
    pub metrics: Arc<Metrics>,
}

/// Swap in a validated `new` config's snapshot; warn about changes that need a restart.
pub fn apply(current: &mut Config, new: Config, target: &Target) {
    for what in current.fixed.changed(&new.fixed) {
        tracing::warn!(
            field = what,
            "this setting changed but needs a restart to take effect"
        );
    }
    target.live.store(Snapshot::new(&new, &target.metrics));
    let routes = new.live.policy.routes().len();
    current.live = new.live;
    target
        .metrics
        .config_reloads
        .with_label_values(&["success"])
        .inc();
    tracing::info!(routes, "configuration reloaded");
}

fn reload_once(path: &Path, current: &mut Config, target: &Target) {
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

/// Start taking SIGHUP as "reload". Called before the ports serve: until a handler is
/// installed, SIGHUP's default action ends the process.
pub fn hangups() -> Option<Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    }
}

/// Watch `path`, and take `hup` (from `hangups`), until `shutdown`.
pub async fn run(
    path: PathBuf,
    mut current: Config,
    target: Target,
    mut hup: Option<Signal>,
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
