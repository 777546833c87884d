//! Hot reload (SPEC §5): the config file and every file it names (users files, JWKS files,
//! header secrets, CA bundles) are watched, and SIGHUP asks for a reload.
//!
//! A new version is loaded and validated fully — files parsed, new issuers' keys fetched — before
//! one atomic swap of the policy. An invalid version is refused, logged with every error and
//! counted (`subguard_config_reloads_total{outcome="error"}`); the old one keeps serving. Checks in
//! flight finish on the policy they started with, so no check fails because of a reload.
//!
//! Watching is per folder, not per file: a Kubernetes ConfigMap update replaces the `..data`
//! symlink in the mounted folder, which a watch on the file itself would never see. Every event
//! leads to a content fingerprint comparison, so editor noise does not cause reloads.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::State;
use crate::check::Policy;
use crate::config::{self, Config, ConfigError, DirectoryKind, KeySource};

/// How long to wait for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Every file a config depends on.
pub fn watched_files(config: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    files.insert(absolute(&config.path));
    for t in config.tenants.values() {
        if let DirectoryKind::File { path, .. } = &t.directory.kind {
            files.insert(absolute(path));
        }
        for i in &t.issuers {
            if let KeySource::File { path, .. } = &i.keys {
                files.insert(absolute(path));
            }
        }
    }
    files.extend(config.extra_files.iter().map(|p| absolute(p)));
    files
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A hash of the contents of `files` (a missing file hashes as missing).
fn fingerprint(files: &BTreeSet<PathBuf>) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing changed on disk.
    Unchanged,
    /// The new version serves now.
    Applied,
}

pub struct Reloader {
    state: Arc<State>,
    config_path: PathBuf,
    files: BTreeSet<PathBuf>,
    fingerprint: u64,
}

impl Reloader {
    pub fn new(state: Arc<State>, config_path: PathBuf) -> Reloader {
        let files = watched_files(&state.policy.load().config);
        let fingerprint = fingerprint(&files);
        Reloader { state, config_path, files, fingerprint }
    }

    /// The folders to watch.
    pub fn folders(&self) -> BTreeSet<PathBuf> {
        self.files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect()
    }

    /// Loads the config again and swaps it in if it changed and is valid. `force` reloads even
    /// when the files look unchanged (SIGHUP).
    pub async fn reload(&mut self, trigger: &str, force: bool) -> Result<ReloadOutcome, Vec<ConfigError>> {
        let files = self.files.clone();
        let now = tokio::task::spawn_blocking(move || fingerprint(&files)).await.unwrap_or(0);
        if !force && now == self.fingerprint {
            return Ok(ReloadOutcome::Unchanged);
        }
        let result = self.load_and_swap().await;
        let metrics = &self.state.metrics;
        match &result {
            Ok(()) => {
                metrics.config_reloaded(true);
                tracing::info!(trigger, "config reloaded");
            }
            Err(errors) => {
                metrics.config_reloaded(false);
                for e in errors {
                    tracing::error!(trigger, error = %e, "config reload refused; the previous config keeps serving");
                }
            }
        }
        // Remember what we looked at, valid or not, so one bad edit is reported once.
        self.fingerprint = now;
        result.map(|()| ReloadOutcome::Applied)
    }

    async fn load_and_swap(&mut self) -> Result<(), Vec<ConfigError>> {
        let path = self.config_path.clone();
        let config = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .map_err(|e| vec![ConfigError::new("", format!("reload task failed: {e}"))])??;
        let old = self.state.policy.load_full();
        if config.listen != old.config.listen {
            let admin =
                |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
            tracing::warn!(
                old_grpc = %old.config.listen.grpc,
                new_grpc = %config.listen.grpc,
                old_admin = %admin(old.config.listen.admin),
                new_admin = %admin(config.listen.admin),
                "listen addresses changed; they take effect only after a restart"
            );
        }
        if config.tracing != old.config.tracing {
            tracing::warn!("tracing settings changed; they take effect only after a restart");
        }
        for w in &config.warnings {
            tracing::warn!(warning = %w, "config warning");
        }
        let files = watched_files(&config);
        let policy = Policy::build_reusing(config, self.state.metrics.clone(), Some(&old))
            .map_err(|e| vec![ConfigError::new("", e)])?;
        policy.fetch_missing_keys().await?;
        policy.start_key_refresh();
        self.state.policy.store(Arc::new(policy));
        self.state.start_revocation();
        self.files = files;
        Ok(())
    }
}

/// Runs the reloader until the process ends: file events (debounced) and SIGHUP.
pub fn spawn(state: Arc<State>, config_path: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reloader = Reloader::new(state, config_path);
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP");
                None
            }
        };
        let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        loop {
            if let Some(w) = watcher.as_mut() {
                for folder in reloader.folders() {
                    if !watched.contains(&folder) {
                        match w.watch(&folder, RecursiveMode::NonRecursive) {
                            Ok(()) => {
                                watched.insert(folder);
                            }
                            Err(e) => {
                                tracing::warn!(folder = %folder.display(), error = %e, "cannot watch folder")
                            }
                        }
                    }
                }
            }
            let (trigger, force) = tokio::select! {
                Some(()) = rx.recv() => {
                    // Let a burst of events (an editor's save, a ConfigMap swap) settle.
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    ("file change", false)
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    ("SIGHUP", true)
                }
            };
            let _ = reloader.reload(trigger, force).await;
        }
    })
}
