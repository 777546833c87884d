//! Hot reload (SPEC §5): the config file and every file it names (users files, JWKS files,
//! header secrets, CA bundles) are watched, and SIGHUP asks for a reload.
//!
//! A new version is loaded and validated fully — files parsed, new issuers' keys fetched — before
//! one atomic swap of the policy. An invalid version is refused, logged with every error and
//! counted (`subguard_config_reloads_total{outcome="error"}`; `subguard_config_last_reload_successful`
//! is 0 until a version is applied); the old one keeps serving. Checks in flight finish on the
//! policy they started with, so no check fails because of a reload.
//!
//! Watching is per folder, not per file: a Kubernetes ConfigMap update replaces the `..data`
//! symlink in the mounted folder, which a watch on the file itself would never see. Only events
//! that can change a watched file count ([`relevant`]): a write, create, rename or removal of a
//! watched file, of the file it resolves to, or of a ConfigMap's `..` entries (the folders that
//! symlinked files resolve into are watched too). Reads do not — subguard's own reads of its files
//! raise them, and once counted they made every check for changes trigger the next. A counted
//! event leads to a content fingerprint comparison, so editor noise does not cause reloads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::State;
use crate::check::Policy;
use crate::config::{self, Config, ConfigError, DirectoryKind, KeySource};

/// How long to wait for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// How long the watched files must hold still before a changed version is read, and after how
/// long of waiting for that a warning is logged.
const SETTLE: Duration = Duration::from_millis(250);
const SETTLE_WARN: Duration = Duration::from_secs(10);

/// How often the watched folders are looked at to see whether one was replaced (deleted and made
/// again, or another folder renamed over it). A watch follows the folder it was put on, not its
/// name: events from the new folder never reach it, so only looking finds out.
const FOLDER_CHECK: Duration = Duration::from_secs(2);

/// A watched folder's identity: its device and inode, `None` when it cannot be read.
type FolderId = Option<(u64, u64)>;

fn folder_id(folder: &Path) -> FolderId {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(folder).ok().map(|m| (m.dev(), m.ino()))
}

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

/// Whether a file event in a watched folder can mean that one of `files` changed.
///
/// Reads never do: opening a file, reading it and closing it unwritten are events too, and
/// subguard raises them itself whenever it fingerprints or loads its files. Other files in the
/// same folder (logs, an editor's swap file) do not matter either, except the entries Kubernetes
/// swaps when a ConfigMap changes (`..data`, `..data_tmp`, `..<timestamp>`), through which the
/// watched names resolve. An event without paths, or one asking for a rescan, counts.
fn relevant(event: &notify::Event, files: &BTreeSet<PathBuf>) -> bool {
    let reads_only = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => true,
        _ => false,
    };
    if reads_only {
        return false;
    }
    if event.need_rescan() || event.paths.is_empty() {
        return true;
    }
    event.paths.iter().any(|p| {
        files.contains(p) || p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".."))
    })
}

/// `files` and, for those that are symlinks, the files they resolve to.
fn with_targets(files: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    let mut all = files.clone();
    all.extend(files.iter().filter_map(|f| std::fs::canonicalize(f).ok()));
    all
}

/// What each watched file's metadata says of its last write: size, modification time, inode.
/// Two looks at a file being rewritten in place can find the same bytes (the same first half of
/// two versions, or an empty file), but not the same stamps as well.
type Stamps = Vec<Option<(u64, std::time::SystemTime, u64)>>;

fn stamps(files: &BTreeSet<PathBuf>) -> Stamps {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH), m.ino()))
        })
        .collect()
}

/// A digest of the contents of `files` (a missing or unreadable file, or one that is not a
/// regular file, counts as missing), read in small pieces so a large users file is never held
/// twice.
fn fingerprint(files: &BTreeSet<PathBuf>) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    for f in files {
        let name = f.as_os_str().as_encoded_bytes();
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name);
        let mut len: u64 = 0;
        // Only regular files are read: a named pipe would block the open, a device never ends
        // (the config then refuses such a file by name).
        let mut readable = crate::config::read::regular(f).ok().and_then(|_| std::fs::File::open(f).ok());
        while let Some(file) = readable.as_mut() {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    len += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => readable = None,
            }
        }
        // The length (or its absence) ends each file, so files cannot run into each other.
        match readable {
            Some(_) => ctx.update(&[1]),
            None => ctx.update(&[0]),
        }
        ctx.update(&len.to_le_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing changed on disk.
    Unchanged,
    /// The new version serves now.
    Applied,
    /// The files changed while they were being read (a file written in place, truncated then
    /// filled): what was read may be half a file, so it was not applied. The change raises its
    /// own event, and the next look reads the files again.
    Torn,
}

pub struct Reloader {
    state: Arc<State>,
    config_path: PathBuf,
    files: BTreeSet<PathBuf>,
    /// `files` again, for the watcher's thread to filter events with.
    shared_files: Arc<Mutex<BTreeSet<PathBuf>>>,
    fingerprint: [u8; 32],
    /// Set when the last version was refused only because a new issuer's keys could not be
    /// fetched (an identity provider down, not a mistake in the files): that version is tried
    /// again by itself, at this delay, doubling up to [`KEY_RETRY_MAX`].
    key_retry: Option<Duration>,
}

/// The first and the longest wait before a version refused for unreachable keys is tried again.
const KEY_RETRY_MIN: Duration = Duration::from_secs(2);
const KEY_RETRY_MAX: Duration = Duration::from_secs(60);

/// The watched files of the config being started, fingerprinted before the policy is built from
/// them. The reloader's first look compares against it, so a file changed while the sidecar
/// starts (after it was read, before it was watched) is applied then instead of being taken
/// for the starting point.
pub struct Baseline {
    files: BTreeSet<PathBuf>,
    fingerprint: [u8; 32],
}

impl Baseline {
    pub fn take(config: &Config) -> Baseline {
        let files = watched_files(config);
        let fingerprint = fingerprint(&files);
        Baseline { files, fingerprint }
    }

    /// The fingerprint of the files as the sidecar starts with them (`subguard_config_info`).
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }
}

impl Reloader {
    pub fn new(state: Arc<State>, config_path: PathBuf, baseline: Baseline) -> Reloader {
        let Baseline { files, fingerprint } = baseline;
        let shared_files = Arc::new(Mutex::new(with_targets(&files)));
        Reloader { state, config_path, files, shared_files, fingerprint, key_retry: None }
    }

    /// The paths the watcher's event filter counts: the watched files and where they resolve.
    pub fn shared_files(&self) -> Arc<Mutex<BTreeSet<PathBuf>>> {
        self.shared_files.clone()
    }

    /// Resolves the watched files again (a ConfigMap swap moves their targets) for the filter.
    fn refresh_targets(&self) {
        let paths = with_targets(&self.files);
        if let Ok(mut shared) = self.shared_files.lock() {
            *shared = paths;
        }
    }

    /// The folders to watch: those of the watched files, and those their symlinks resolve into
    /// (a file rewritten in place behind a symlink raises its events there).
    /// Derived from the paths `refresh_targets` resolved at the last look.
    pub fn folders(&self) -> BTreeSet<PathBuf> {
        let paths = self.shared_files.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        paths.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect()
    }

    /// Loads the config again and swaps it in if it changed and is valid. `force` reloads even
    /// when the files look unchanged (SIGHUP).
    pub async fn reload(&mut self, trigger: &str, force: bool) -> Result<ReloadOutcome, Vec<ConfigError>> {
        self.refresh_targets();
        let (mut now, mut stamp) = self.look().await;
        if !force && now == self.fingerprint {
            tracing::debug!(trigger, "watched files unchanged; nothing to reload");
            return Ok(ReloadOutcome::Unchanged);
        }
        // A file written in place is empty, then half written, for a moment: wait until the
        // files hold still for SETTLE before reading them. Files that never do are never read
        // half-way: the serving version stays until they stop changing.
        let waiting = tokio::time::Instant::now();
        let mut warned = false;
        loop {
            tokio::time::sleep(SETTLE).await;
            let (again, again_stamp) = self.look().await;
            if again == now && again_stamp == stamp {
                break;
            }
            (now, stamp) = (again, again_stamp);
            if !warned && waiting.elapsed() >= SETTLE_WARN {
                warned = true;
                tracing::warn!(
                    trigger,
                    "watched files keep changing; the reload waits until they hold still for {} ms",
                    SETTLE.as_millis()
                );
            }
        }
        let retrying = trigger == KEY_RETRY_TRIGGER;
        let (mut keys_only, mut partly_applied) = (false, false);
        let result = self.load_and_swap(&mut keys_only, &mut partly_applied, (now, stamp), retrying).await;
        if matches!(&result, Err(e) if e.is_empty()) {
            tracing::info!(
                trigger,
                "watched files changed while being read; reading them again at the next change"
            );
            return Ok(ReloadOutcome::Torn);
        }
        let metrics = &self.state.metrics;
        match &result {
            Ok(()) => {
                self.key_retry = None;
                metrics.config_reloaded(true);
                let version = metrics.config_serving(&now);
                tracing::info!(trigger, config_version = %version, "config reloaded");
            }
            Err(errors) if retrying && keys_only => {
                // The same version, refused again for the same reason: counted and logged at
                // error once, when it was first refused.
                let next = self.key_retry.map_or(KEY_RETRY_MIN, |d| (d * 2).min(KEY_RETRY_MAX));
                self.key_retry = Some(next);
                for e in errors {
                    tracing::warn!(trigger, error = %e, retry_in_s = next.as_secs(), "config reload still refused");
                }
            }
            Err(errors) => {
                self.key_retry = keys_only.then_some(KEY_RETRY_MIN);
                metrics.config_reloaded(false);
                let refused = if partly_applied {
                    "config reload held back for a tenant; the rest of the version is applied"
                } else {
                    "config reload refused; the previous config keeps serving"
                };
                for e in errors {
                    tracing::error!(trigger, error = %e, "{refused}");
                }
                if keys_only {
                    tracing::info!(
                        retry_in_s = KEY_RETRY_MIN.as_secs(),
                        "the refused version is tried again until its keys can be fetched or the files change"
                    );
                }
            }
        }
        // Remember what we looked at, valid or not, so one bad edit is reported once.
        self.fingerprint = now;
        result.map(|()| ReloadOutcome::Applied)
    }

    /// The fingerprint of the watched files as they are now, with their stamps.
    async fn look(&self) -> ([u8; 32], Stamps) {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || (fingerprint(&files), stamps(&files)))
            .await
            .unwrap_or(([0; 32], Vec::new()))
    }

    /// Sets `keys_only` when the version was refused only because new issuers' keys could not be
    /// fetched, and `partly_applied` when the rest of it was applied all the same (not on a
    /// `retrying` attempt, whose files that part came from already). An empty error list: the files no longer match `read`, the fingerprint and stamps
    /// taken before they were loaded (they changed while being read), and nothing was swapped.
    async fn load_and_swap(
        &mut self,
        keys_only: &mut bool,
        partly_applied: &mut bool,
        read: ([u8; 32], Stamps),
        retrying: bool,
    ) -> Result<(), Vec<ConfigError>> {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .map_err(|e| vec![ConfigError::new("", format!("reload task failed: {e}"))])?;
        if self.look().await != read {
            return Err(Vec::new());
        }
        let config = loaded?;
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
        if let Err(errors) = policy.fetch_missing_keys(Some(&old)).await {
            *keys_only = true;
            // Held back: only the tenants whose new issuers have no keys yet. The rest of the
            // version (a user removed from the users file, another tenant's change) must not wait
            // for someone else's identity provider. A retry of the same files applied that part
            // already (and would only start the token cache afresh).
            if !retrying
                && let Some(partial) = self.without_tenants_lacking_keys(&policy, &old, &errors).await
            {
                self.swap(partial, &old, files).await;
                *partly_applied = true;
            }
            return Err(errors);
        }
        self.swap(policy, &old, files).await;
        Ok(())
    }

    /// `policy` with the tenants named by `errors` (`tenants.<name>.issuers[i]`: keys that cannot
    /// be fetched) as they were in `old`, or left out when they are new; `None` when that is not
    /// possible (an error names no tenant) or its keys cannot be fetched either.
    async fn without_tenants_lacking_keys(
        &self,
        policy: &Policy,
        old: &Policy,
        errors: &[ConfigError],
    ) -> Option<Policy> {
        let mut held = std::collections::BTreeSet::new();
        for e in errors {
            let tenant = e.path.strip_prefix("tenants.")?.split('.').next()?;
            held.insert(tenant.to_string());
        }
        let mut config = (*policy.config).clone();
        for tenant in &held {
            match old.config.tenants.get(tenant) {
                Some(previous) => config.tenants.insert(tenant.clone(), previous.clone()),
                None => config.tenants.remove(tenant),
            };
        }
        let partial = Policy::build_reusing(config, self.state.metrics.clone(), Some(old)).ok()?;
        partial.fetch_missing_keys(Some(old)).await.ok()?;
        tracing::warn!(
            held_back = ?held,
            "config reload applied except these tenants, whose new issuers' keys cannot be fetched yet; \
             they keep their previous settings (or stay out, if new) until the keys can be fetched"
        );
        Some(partial)
    }

    /// Puts `policy` in `old`'s place, watching `files`, the files it was read from.
    async fn swap(&mut self, policy: Policy, old: &Arc<Policy>, files: BTreeSet<PathBuf>) {
        policy.adopt_directory_caches(old).await;
        policy.start_key_refresh();
        policy.forget_metrics_of_what_is_gone(old);
        self.state.policy.store(Arc::new(policy));
        self.state.start_revocation();
        self.files = files;
        self.refresh_targets();
    }
}

/// The trigger of a retry of a version refused for unreachable keys.
const KEY_RETRY_TRIGGER: &str = "retry: new issuer keys";

/// Runs the reloader until the process ends: file events (debounced) and SIGHUP.
///
/// The watches and the SIGHUP handler are in place when this returns, so a change made once the
/// sidecar reports ready is never missed (the server calls this before its listeners say ready).
/// The first thing the task does is look for changes since `baseline`, which covers those made
/// earlier, while the policy was being built.
pub fn spawn(state: Arc<State>, config_path: PathBuf, baseline: Baseline) -> tokio::task::JoinHandle<()> {
    let mut reloader = Reloader::new(state, config_path, baseline);
    let files = reloader.shared_files();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // A poisoned lock cannot happen (nothing panics while holding it); if it did, count
        // the event: a needless check for changes beats a missed one.
        let counts = files.lock().map(|f| relevant(&event, &f)).unwrap_or(true);
        if counts {
            let _ = tx.try_send(());
        }
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP");
            None
        }
    };
    let mut watched: BTreeMap<PathBuf, FolderId> = BTreeMap::new();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    watch_folders(watcher.as_mut(), &reloader, &mut watched);
    tokio::spawn(async move {
        let _ = reloader.reload("change during start-up", false).await;
        watch_folders(watcher.as_mut(), &reloader, &mut watched);
        // Deadlines, not sleeps made anew each turn: the folder check's turns (every 2 s) must
        // not push back a key retry that waits longer.
        let retry_at = |r: &Reloader| r.key_retry.map(|d| tokio::time::Instant::now() + d);
        let mut retry = retry_at(&reloader);
        let mut folder_check =
            tokio::time::interval_at(tokio::time::Instant::now() + FOLDER_CHECK, FOLDER_CHECK);
        folder_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
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
                () = async { match retry { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                    (KEY_RETRY_TRIGGER, true)
                }
                _ = folder_check.tick() => {
                    if !watched.iter().any(|(folder, id)| folder_id(folder) != *id) {
                        continue;
                    }
                    // Replaced: watch the new folder first, then look for changes made unseen.
                    tracing::info!("a watched folder was replaced; watching it again");
                    watch_folders(watcher.as_mut(), &reloader, &mut watched);
                    ("watched folder replaced", false)
                }
            };
            let _ = reloader.reload(trigger, force).await;
            watch_folders(watcher.as_mut(), &reloader, &mut watched);
            retry = retry_at(&reloader);
        }
    })
}

/// Watches the folders of the files the reloader reads now, and no others. A folder replaced
/// since it was watched (another inode under the same name) is watched again.
fn watch_folders(
    watcher: Option<&mut notify::RecommendedWatcher>,
    reloader: &Reloader,
    watched: &mut BTreeMap<PathBuf, FolderId>,
) {
    let Some(w) = watcher else { return };
    let wanted = reloader.folders();
    let replaced = |(folder, id): (&PathBuf, &FolderId)| !wanted.contains(folder) || folder_id(folder) != *id;
    for gone in watched.iter().filter(|&entry| replaced(entry)).map(|(f, _)| f.clone()).collect::<Vec<_>>() {
        // A folder that no longer exists (an old ConfigMap version) is unwatched already.
        let _ = w.unwatch(&gone);
        watched.remove(&gone);
    }
    for folder in wanted {
        let std::collections::btree_map::Entry::Vacant(entry) = watched.entry(folder) else { continue };
        let folder = entry.key();
        let id = folder_id(folder);
        match w.watch(folder, RecursiveMode::NonRecursive) {
            // A folder that is gone for now (deleted, to be made again) is remembered as missing,
            // so the folder check watches it once it is back.
            Ok(()) | Err(_) if id.is_none() => {
                entry.insert(None);
            }
            Ok(()) => {
                entry.insert(id);
            }
            Err(e) => {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot watch folder")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::Event;
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    fn files() -> BTreeSet<PathBuf> {
        ["/etc/sg/config.yaml", "/etc/sg/users.json", "/keys/acme.jwks.json"]
            .into_iter()
            .map(PathBuf::from)
            .collect()
    }

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn reads_of_watched_files_do_not_count() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!relevant(&event(kind, "/etc/sg/users.json"), &files()), "{kind:?}");
        }
    }

    #[test]
    fn writes_renames_and_removals_of_watched_files_count() {
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(relevant(&event(kind, "/keys/acme.jwks.json"), &files()), "{kind:?}");
        }
    }

    #[test]
    fn other_files_in_a_watched_folder_do_not_count() {
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        for path in
            ["/etc/sg/envoy.log", "/etc/sg/.users.json.swp", "/etc/sg/users.json~", "/keys/other.json"]
        {
            assert!(!relevant(&event(write, path), &files()), "{path}");
        }
    }

    #[test]
    fn a_configmap_swap_counts() {
        // kubelet: a new ..<timestamp> folder, a ..data_tmp symlink renamed over ..data.
        for (kind, path) in [
            (EventKind::Create(CreateKind::Folder), "/etc/sg/..2026_11_23_18_00_00.123"),
            (EventKind::Create(CreateKind::File), "/etc/sg/..data_tmp"),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/etc/sg/..data"),
        ] {
            assert!(relevant(&event(kind, path), &files()), "{path}");
        }
    }

    #[test]
    fn an_event_without_paths_or_asking_for_a_rescan_counts() {
        let write = EventKind::Modify(ModifyKind::Any);
        assert!(relevant(&Event::new(write), &files()));
        let rescan = event(write, "/etc/sg/envoy.log").set_flag(notify::event::Flag::Rescan);
        assert!(relevant(&rescan, &files()));
    }

    #[test]
    fn the_fingerprint_follows_contents_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        std::fs::write(&a, "x: 1\n").unwrap();
        std::fs::write(&b, "y: 2\n").unwrap();
        let set: BTreeSet<PathBuf> = [a.clone(), b.clone()].into_iter().collect();
        let first = fingerprint(&set);
        assert_eq!(fingerprint(&set), first, "reading changes nothing");
        std::fs::write(&a, "x: 1\n").unwrap();
        assert_eq!(fingerprint(&set), first, "the same contents written again");
        // Bytes moved from one file to the next must not look the same.
        std::fs::write(&a, "x: 1\ny").unwrap();
        std::fs::write(&b, ": 2\n").unwrap();
        assert_ne!(fingerprint(&set), first);
        std::fs::write(&a, "x: 1\n").unwrap();
        std::fs::write(&b, "y: 2\n").unwrap();
        assert_eq!(fingerprint(&set), first);
        std::fs::remove_file(&b).unwrap();
        assert_ne!(fingerprint(&set), first, "a missing file");
        std::fs::write(&b, "").unwrap();
        let empty = fingerprint(&set);
        assert_ne!(empty, first);
        std::fs::remove_file(&b).unwrap();
        assert_ne!(fingerprint(&set), empty, "missing is not empty");
        // Larger than one read: a change near the end is seen.
        let big = "u".repeat(300_000);
        std::fs::write(&b, &big).unwrap();
        let before = fingerprint(&set);
        std::fs::write(&b, format!("{}v", &big[..big.len() - 1])).unwrap();
        assert_ne!(fingerprint(&set), before);
    }

    #[tokio::test]
    async fn a_file_changed_while_the_sidecar_starts_is_applied_by_the_first_look() {
        // The quickstart: its config, users file and public keys.
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        for f in [
            "config.yaml",
            "users.yaml",
            "keys/acme.jwks.json",
            "keys/globex.jwks.json",
            "keys/initech.jwks.json",
        ] {
            std::fs::copy(quickstart.join(f), dir.path().join(f)).unwrap();
        }
        let config_path = dir.path().join("config.yaml");
        let users = dir.path().join("users.yaml");
        // What `serve` does, with a change in the window between reading the files and
        // watching them.
        let config = config::load(&config_path).unwrap();
        let baseline = Baseline::take(&config);
        let metrics = crate::telemetry::Metrics::detached();
        let policy = Policy::build(config, metrics.clone()).unwrap();
        let mut text = std::fs::read_to_string(&users).unwrap();
        text = text.replacen("acme:\n", "acme:\n  - sub: erin\n", 1);
        assert!(text.contains("sub: erin"), "the quickstart users file has an acme list");
        std::fs::write(&users, text).unwrap();
        let state = State::new(policy, metrics, prometheus_client::registry::Registry::default());
        let has_erin = |state: &State| match state.policy.load().tenants["acme"].directory.backend() {
            crate::directory::Backend::File(f) => {
                f.snapshot().tenants.get("acme").is_some_and(|subs| subs.contains_key("erin"))
            }
            _ => false,
        };
        assert!(!has_erin(&state), "the policy was built before the change");
        let task = spawn(state.clone(), config_path, baseline);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !has_erin(&state) {
            assert!(
                std::time::Instant::now() < deadline,
                "the change made during start-up was never applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
