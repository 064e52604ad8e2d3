//! Files watched for a reload (the config file, TLS certificates): the directories that
//! hold them are watched, not the files, so a file replaced by a rename or a Kubernetes
//! `..data` symlink swap is seen too; a burst of events is reported as one change.

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Wait this long after a file event for more to settle (editors write in steps).
pub const SETTLE: Duration = Duration::from_millis(150);

/// Settled changes of the watched files. Watching stops when this is dropped.
pub struct Changes {
    settled: mpsc::Receiver<()>,
    _watcher: RecommendedWatcher,
}

impl Changes {
    /// The next change, once its events have settled. Cancel-safe (for `select!`): the
    /// settling runs in a task of its own, so another branch winning loses no change.
    pub async fn next(&mut self) -> Option<()> {
        self.settled.recv().await
    }
}

/// The directory a file is in, as notify needs it (`.` for a bare file name).
pub fn dir_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
        .to_path_buf()
}

/// Watch `dirs` (not their subdirectories) for any event but a read, on a file named in
/// `names`, or on any file when `names` is `None`. Must be called inside a tokio runtime.
pub fn watch_files(dirs: &[PathBuf], names: Option<Vec<OsString>>) -> notify::Result<Changes> {
    let (raw_tx, mut raw) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let named = match &names {
            None => true,
            Some(names) => event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n))),
        };
        if named && !event.kind.is_access() {
            // Full: a change is pending already, and one is all it takes.
            let _ = raw_tx.try_send(());
        }
    })?;
    for d in dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    let (settled_tx, settled) = mpsc::channel::<()>(1);
    // Ends when the watcher (and with it the callback's sender) is gone.
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while raw.try_recv().is_ok() {}
            if let Err(mpsc::error::TrySendError::Closed(())) = settled_tx.try_send(()) {
                return;
            }
        }
    });
    Ok(Changes {
        settled,
        _watcher: watcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write to a named file is one change; a file not named is none.
    #[tokio::test]
    async fn named_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let names = Some(vec![OsString::from("watched.yaml")]);
        let mut changes = watch_files(&[dir.path().to_path_buf()], names).unwrap();
        let wait = Duration::from_secs(5);

        std::fs::write(dir.path().join("other.yaml"), "x").unwrap();
        let quiet = tokio::time::timeout(SETTLE * 4, changes.next()).await;
        assert!(quiet.is_err(), "a file not named was reported");

        std::fs::write(dir.path().join("watched.yaml"), "a").unwrap();
        let seen = tokio::time::timeout(wait, changes.next()).await;
        assert_eq!(
            seen,
            Ok(Some(())),
            "a write to the named file was not reported"
        );
    }
}
