//! User directories: where a token's `sub` is resolved to a user of one tenant.
//!
//! A [`Directory`] answers one question per (tenant, sub): the user exists ([`Lookup::Found`]),
//! the directory says it does not ([`Lookup::NotFound`]), or the directory could not be asked
//! ([`DirectoryError`]). The last two are never confused: an outage is `directory_unavailable`,
//! never `user_not_found`. Tenants never share answers: every lookup and cache key names its tenant.
//!
//! Remote kinds (`http`, `scim`) sit behind a [`cache::DirectoryCache`] and a
//! [`breaker::Breaker`]; the file directory is in memory and needs neither.

pub mod breaker;
pub mod cache;
pub mod file;
pub mod http;
mod plain_yaml;
pub mod scim;

use std::sync::Arc;
use std::time::Instant;

pub use file::FileDirectory;

use crate::config::{DirectoryConfig, DirectoryKind, Normalize};
use crate::telemetry::Metrics;
use breaker::{Breaker, BreakerState, Permit};
use cache::{DirectoryCache, Served};

/// Whether `value` has a space or tab at either end. HTTP drops those around a header value
/// (RFC 9110 §5.5), so a user id or role forwarded with them reaches the upstream as another
/// value: `bob ` would be read as `bob`, another user.
pub fn has_outer_whitespace(value: &str) -> bool {
    value.starts_with([' ', '\t']) || value.ends_with([' ', '\t'])
}

/// A user as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Forwarded as `forward.user_header` (the sub when the directory has no id).
    pub id: Arc<str>,
    /// Roles joined by `,`, ready for `forward.roles_header`; `None` when the user has none.
    pub roles: Option<Arc<str>>,
    pub disabled: bool,
    /// Unix seconds: tokens issued (`iat`) before this are revoked.
    pub tokens_valid_after: Option<i64>,
}

/// The directory's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The user, by value: its strings are shared, so a copy is two reference counts.
    Found(User),
    NotFound,
}

/// The directory could not answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// Why a backend call failed. All are `directory_unavailable` for the request; only transport
/// failures (timeouts, refused connections, error statuses) count towards the circuit breaker, so
/// one malformed user record, or one `sub` the directory refuses, cannot take the directory down
/// for every other user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    Transport(String),
    Data(String),
    /// A status that refuses this one request rather than say the directory is failing.
    Refused(String),
}

impl FetchError {
    /// The error for an answer of `status` that is neither a user nor "no such user". A client
    /// error that concerns the request itself (`400`, `414 URI Too Long` for a huge `sub`...) is
    /// [`FetchError::Refused`]: the directory is up, and a tenant whose identity provider mints
    /// such subs, by mistake or on purpose, must not open the breaker for every tenant sharing the
    /// directory. Server errors, and the client errors that say the directory cannot serve anyone
    /// now (`401`, `403` and `407`: subguard's credentials; `408`, `429`: overload), count.
    pub fn for_status(status: u16) -> FetchError {
        let message = format!("status {status}");
        match status {
            400..=499 if !matches!(status, 401 | 403 | 407 | 408 | 429) => FetchError::Refused(message),
            _ => FetchError::Transport(message),
        }
    }
}

impl From<FetchError> for DirectoryError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Transport(m) => DirectoryError(m),
            FetchError::Data(m) => DirectoryError(format!("invalid directory data: {m}")),
            FetchError::Refused(m) => DirectoryError(format!("the directory refused the lookup: {m}")),
        }
    }
}

/// Where lookups go.
#[derive(Debug)]
pub enum Backend {
    File(FileDirectory),
    Http(http::HttpDirectory),
    Scim(scim::ScimDirectory),
}

impl Backend {
    /// An answer the backend gives without a request (a `sub` of `.` or `..` in a URL path): it
    /// holds whatever state the breaker is in, so [`Directory`] decides it before the breaker is
    /// asked, and [`Backend::fetch`] before any request (the uncached paths).
    fn answer_without_asking(&self, sub: &str) -> Option<Lookup> {
        match self {
            Backend::File(_) => None,
            Backend::Http(_) => http::is_path_step(sub).then_some(Lookup::NotFound),
            Backend::Scim(s) => (s.sub_in_path() && http::is_path_step(sub)).then_some(Lookup::NotFound),
        }
    }

    async fn fetch(&self, tenant: &str, sub: &str) -> Result<Lookup, FetchError> {
        if let Some(known) = self.answer_without_asking(sub) {
            return Ok(known);
        }
        match self {
            Backend::File(f) => Ok(f.lookup(tenant, sub)),
            // Boxed: an HTTP request's future is kilobytes, which the file directory's lookups
            // would otherwise carry and copy on every check.
            Backend::Http(h) => Box::pin(h.fetch(tenant, sub)).await,
            Backend::Scim(s) => Box::pin(s.fetch(tenant, sub)).await,
        }
    }
}

/// One answer with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub result: Result<Lookup, DirectoryError>,
    pub served: Served,
}

/// A directory as the pipeline uses it: normalisation, cache, breaker, backend.
#[derive(Debug)]
pub struct Directory {
    /// `default` or the tenant that configured it.
    name: Arc<str>,
    backend: Backend,
    cache: Option<DirectoryCache>,
    breaker: Breaker,
    normalize: Normalize,
    metrics: Arc<Metrics>,
    /// Failed and stale lookups are warned about at most once a second.
    warnings: WarnGate,
}

/// Lets one warning through a second and counts the rest. In an outage every uncached check
/// fails its lookup (at once, with the breaker open) or is served stale: a warning for each
/// would write megabytes a second into the platform's logs at full traffic, and say nothing the
/// first line, the breaker's state changes and `subguard_directory_lookups_total` do not.
#[derive(Debug)]
struct WarnGate {
    started: Instant,
    /// Milliseconds from `started` at the last warning let through, plus one (0: none yet).
    last: std::sync::atomic::AtomicU64,
    held_back: std::sync::atomic::AtomicU64,
}

impl WarnGate {
    const EVERY_MS: u64 = 1000;

    fn new() -> Self {
        WarnGate {
            started: Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: warn now, `n` warnings having been held back since the last one; `None`: hold
    /// this one back.
    fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + Self::EVERY_MS {
            self.held_back.fetch_add(1, Relaxed);
            return None;
        }
        // One caller wins the second; a loser is held back like any other.
        if self.last.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            self.held_back.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.held_back.swap(0, Relaxed))
    }
}

impl Directory {
    /// Builds the runtime directory for a validated config.
    pub fn build(config: &DirectoryConfig, metrics: Arc<Metrics>) -> Result<Directory, String> {
        let (backend, remote) = match &config.kind {
            DirectoryKind::File { path, users } => {
                (Backend::File(FileDirectory::new(path.clone(), users.clone())), false)
            }
            DirectoryKind::Http { url, http } => {
                (Backend::Http(http::HttpDirectory::new(url.clone(), http)?), true)
            }
            DirectoryKind::Scim { base, match_by, roles_from, http } => {
                (Backend::Scim(scim::ScimDirectory::new(base, *match_by, *roles_from, http)?), true)
            }
        };
        let name: Arc<str> = Arc::from(config.name.as_str());
        if remote {
            metrics.breaker_changed(&name, BreakerState::Closed);
        }
        Ok(Directory {
            name,
            backend,
            cache: remote.then(|| DirectoryCache::new(config.cache)),
            breaker: Breaker::new(config.breaker),
            normalize: config.normalize,
            metrics,
            warnings: WarnGate::new(),
        })
    }

    /// `default` or the tenant that configured it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn cache(&self) -> Option<&DirectoryCache> {
        self.cache.as_ref()
    }

    /// The sub as this directory compares it (`normalize: [trim, lowercase]`).
    pub fn normalize<'a>(&self, sub: &'a str) -> std::borrow::Cow<'a, str> {
        self.normalize.apply(sub)
    }

    /// Where lookups go, for logs and `explain`.
    pub fn describe(&self, tenant: &str, sub: &str) -> String {
        if self.backend.answer_without_asking(sub).is_some() {
            return format!("not asked: a sub of `{sub}` would be a step in the URL's path, never a user");
        }
        match &self.backend {
            Backend::File(f) => format!("file {} (tenant {tenant})", f.path().display()),
            Backend::Http(h) => h.describe(tenant, sub),
            Backend::Scim(s) => s.describe(tenant, sub),
        }
    }

    /// Resolves `sub` in `tenant`. Counts `subguard_directory_lookups_total` and logs the outcome.
    pub async fn lookup(&self, tenant: &Arc<str>, sub: &str) -> Answer {
        let sub = self.normalize(sub);
        let started = Instant::now();
        let answer = match &self.cache {
            None => Answer {
                result: self.backend.fetch(tenant, &sub).await.map_err(DirectoryError::from),
                served: Served::Directory,
            },
            Some(cache) => {
                let key = (tenant.clone(), Arc::from(sub.as_ref()));
                let (result, served) =
                    Box::pin(cache.get_or_load(key, self.guarded_fetch(tenant, &sub))).await;
                Answer { result, served }
            }
        };
        let outcome = match (&answer.result, answer.served) {
            (Ok(_), Served::CacheHit) => "cache_hit",
            (Ok(_), Served::Stale) => "stale",
            (Ok(Lookup::Found(_)), _) => "found",
            (Ok(Lookup::NotFound), _) => "not_found",
            (Err(_), _) => "error",
        };
        self.metrics.directory_lookup(tenant, outcome);
        if !matches!(self.backend, Backend::File(_)) && answer.served != Served::CacheHit {
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let failed = answer.result.is_err() || answer.served == Served::Stale;
            let warn = if failed { self.warnings.admit() } else { None };
            match (&answer.result, warn) {
                (Err(e), Some(held_back)) => tracing::warn!(
                    tenant = &**tenant,
                    sub = &*sub,
                    outcome,
                    error = %e.0,
                    ms,
                    held_back,
                    "directory lookup"
                ),
                (Ok(_), Some(held_back)) => tracing::warn!(
                    tenant = &**tenant,
                    sub = &*sub,
                    outcome,
                    ms,
                    held_back,
                    "directory lookup failed; serving stale user"
                ),
                (Err(e), None) => {
                    tracing::debug!(tenant = &**tenant, sub = &*sub, outcome, error = %e.0, ms, "directory lookup")
                }
                (Ok(_), None) => {
                    tracing::debug!(tenant = &**tenant, sub = &*sub, outcome, ms, "directory lookup")
                }
            }
        }
        answer
    }

    /// Drops the cached answer for `sub` in `tenant` (a user event), so the next check asks again.
    pub async fn evict(&self, tenant: &Arc<str>, sub: &str) {
        if let Some(cache) = &self.cache {
            cache.evict(&(tenant.clone(), Arc::from(self.normalize(sub).as_ref()))).await;
        }
    }

    /// Drops every cached answer (the revocation subscriber may have missed events).
    pub fn evict_all(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// Asks the backend directly for exactly `sub`: no normalisation, cache, breaker or metrics.
    /// For `explain`'s hints, which must not change what the live path will see.
    pub async fn lookup_uncached(&self, tenant: &str, sub: &str) -> Result<Lookup, DirectoryError> {
        self.backend.fetch(tenant, sub).await.map_err(DirectoryError::from)
    }

    /// A backend call that respects the breaker.
    async fn guarded_fetch(&self, tenant: &str, sub: &str) -> Result<Lookup, DirectoryError> {
        if let Some(known) = self.backend.answer_without_asking(sub) {
            return Ok(known);
        }
        let permit = self.breaker.acquire();
        match permit {
            Permit::Rejected => {
                return Err(DirectoryError("circuit breaker open after repeated failures".into()));
            }
            Permit::Probe => self.breaker_changed(tenant, BreakerState::HalfOpen),
            Permit::Normal => {}
        }
        let result = self.backend.fetch(tenant, sub).await;
        let transport_ok = !matches!(result, Err(FetchError::Transport(_)));
        if let Some(state) = self.breaker.record(&permit, transport_ok) {
            self.breaker_changed(tenant, state);
        }
        result.map_err(DirectoryError::from)
    }

    fn breaker_changed(&self, tenant: &str, state: BreakerState) {
        self.metrics.breaker_changed(&self.name, state);
        tracing::warn!(directory = &*self.name, tenant, state = ?state, "directory circuit breaker changed state");
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}
