//! The decision pipeline (SPEC §3): tenant → token → issuer → algorithm → key → signature →
//! time → audience → subject → directory → disabled → revoked. The first step that fails is the
//! reason.
//!
//! This module owns the compiled [`Policy`] (tenants with their issuers, key stores and
//! directories) and knows nothing of gRPC or protobuf: it reads a request through the small
//! [`RequestView`] trait and returns a [`Decision`]. That keeps every reason testable without
//! Envoy, and lets `explain` run exactly the same code as the live server.

pub mod explain;
pub mod tenant;
pub mod token;
pub mod token_cache;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::{Config, ConfigError, Forward, KeySource, TenantSources, TokenSettings};
use crate::decision::{Decision, Identity, Outcome, Reason};
use crate::directory::{Directory, Lookup};
use crate::keys::{KeyMatch, KeyStore, Refetched, http_client, spawn_refresh};
use crate::revocation::{JtiStatus, Revocation};
use crate::telemetry::Metrics;
use explain::{Status, Trace, note, step};
use serde_json::{Value, json};
use tenant::{Candidate, Candidates, Source};
use token_cache::{TokenCache, TokenFacts};

/// A token without `kid` tries at most this many fitting keys, so a large JWKS cannot turn one
/// request into dozens of signature verifications.
const MAX_KIDLESS_CANDIDATES: usize = 8;

/// What the pipeline needs from a request. Header names are lowercase.
pub trait RequestView {
    fn header(&self, name: &str) -> Option<&str>;
    /// The `:authority` / `Host` value.
    fn host(&self) -> Option<&str>;
    /// The tenant pinned by the route (`context_extensions.tenant`).
    fn route_tenant(&self) -> Option<&str>;
}

/// One issuer trusted by one tenant.
#[derive(Debug)]
pub struct Issuer {
    pub iss: Arc<str>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub keys: Arc<KeyStore>,
}

/// A configured tenant.
#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    pub issuers: Vec<Issuer>,
    pub directory: Arc<Directory>,
}

impl Tenant {
    fn issuer(&self, iss: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| &*i.iss == iss)
    }
}

/// The compiled configuration the pipeline runs against. A reload builds a new one and swaps it in.
#[derive(Debug)]
pub struct Policy {
    pub tenant_sources: TenantSources,
    pub token: TokenSettings,
    pub forward: Arc<Forward>,
    pub tenants: HashMap<String, Arc<Tenant>>,
    /// Each issuer, with the first tenant (by name) that trusts it: an `untrusted_issuer` deny
    /// names the tenant the token was meant for without a pass over every tenant.
    trusted_by: HashMap<Arc<str>, Arc<str>>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Tokens whose signature verified, so a repeated token skips parsing and verification.
    token_cache: Option<TokenCache>,
    /// Fleet-wide revocation through Redis, when configured.
    pub revocation: Option<Arc<Revocation>>,
}

impl Policy {
    /// Builds the runtime objects (key stores, directories) for a validated config. Starts no task.
    pub fn build(config: Config, metrics: Arc<Metrics>) -> Result<Policy, String> {
        Self::build_reusing(config, metrics, None)
    }

    /// Like [`Policy::build`], reusing from `previous` every directory whose settings did not
    /// change (so its cache survives a reload) and every remote key store whose source did not
    /// change (so its keys need no re-fetch).
    pub fn build_reusing(
        config: Config,
        metrics: Arc<Metrics>,
        previous: Option<&Policy>,
    ) -> Result<Policy, String> {
        let client = http_client(&config.keys);
        // The default directory is shared by the tenants that have none of their own (its cache
        // keys carry the tenant, so sharing never mixes answers).
        let mut directories: HashMap<String, Arc<Directory>> = HashMap::new();
        let mut tenants = HashMap::with_capacity(config.tenants.len());
        for (name, tc) in &config.tenants {
            let directory = match directories.get(&tc.directory.path) {
                Some(d) => d.clone(),
                None => {
                    let d = match previous.and_then(|p| p.directory_like(&tc.directory)) {
                        Some(d) => d,
                        None => Arc::new(
                            Directory::build(&tc.directory, metrics.clone())
                                .map_err(|e| format!("tenants.{name}.directory: {e}"))?,
                        ),
                    };
                    directories.insert(tc.directory.path.clone(), d.clone());
                    d
                }
            };
            let issuers = tc
                .issuers
                .iter()
                .map(|ic| {
                    let iss: Arc<str> = Arc::from(ic.issuer.as_str());
                    let reused = previous.and_then(|p| p.key_store_like(name, ic, &config.keys));
                    Issuer {
                        iss: iss.clone(),
                        audiences: ic.audiences.clone(),
                        algorithms: ic.algorithms.clone(),
                        keys: reused.unwrap_or_else(|| {
                            Arc::new(KeyStore::new(
                                iss,
                                ic.algorithms.clone(),
                                ic.keys.clone(),
                                config.keys,
                                client.clone(),
                                metrics.clone(),
                            ))
                        }),
                    }
                })
                .collect();
            let tenant = Tenant { name: Arc::from(name.as_str()), issuers, directory };
            metrics.declare_tenant(&tenant.name, tenant.issuers.iter().map(|i| &i.iss));
            tenants.insert(name.clone(), Arc::new(tenant));
        }
        // `config.tenants` is ordered by name, so the first tenant seen is the first by name.
        let mut trusted_by: HashMap<Arc<str>, Arc<str>> = HashMap::new();
        for name in config.tenants.keys() {
            let Some(tenant) = tenants.get(name) else { continue };
            for issuer in &tenant.issuers {
                trusted_by.entry(issuer.iss.clone()).or_insert_with(|| tenant.name.clone());
            }
        }
        let revocation = match &config.revocation {
            None => None,
            Some(settings) => match previous.and_then(|p| p.revocation.as_ref()) {
                Some(r) if r.settings() == settings => Some(r.clone()),
                previous => Some(Arc::new(
                    Revocation::new(settings.clone(), previous.map(|r| r.known()), metrics.clone())
                        .map_err(|e| format!("revocation: {e}"))?,
                )),
            },
        };
        Ok(Policy {
            revocation,
            tenant_sources: config.tenant_sources.clone(),
            token: config.token,
            forward: Arc::new(config.forward.clone()),
            tenants,
            trusted_by,
            token_cache: TokenCache::new(config.token.cache_max_entries, metrics.token_cache_evictions()),
            config: Arc::new(config),
            metrics,
        })
    }

    /// After a reload: every remote directory built anew whose predecessor (same YAML path) asked the
    /// same place the same way (kind, URL, match, normalisation) takes over that predecessor's
    /// found users, so a changed timeout or a rotated credential does not turn users served from
    /// the cache, stale ones during an outage, into `directory_unavailable`.
    pub async fn adopt_directory_caches(&self, previous: &Policy) {
        // A directory shared by tenants (the top-level one) is handled once: by its YAML path.
        let mut done = HashSet::new();
        for (name, t) in &self.tenants {
            let new = &t.directory;
            let Some(new_cache) = new.cache() else { continue };
            let (Some(new_config), Some(old_config)) =
                (self.config.tenants.get(name), previous.config.tenants.get(name))
            else {
                continue;
            };
            if !done.insert(new_config.directory.path.as_str()) {
                continue;
            }
            let Some(old) = previous.tenants.get(name).map(|t| &t.directory) else { continue };
            if Arc::ptr_eq(old, new) || !new_config.directory.same_source(&old_config.directory) {
                continue;
            }
            if let Some(old_cache) = old.cache() {
                let adopted = new_cache.adopt_found(old_cache).await;
                tracing::debug!(directory = %new_config.directory.name, adopted, "directory rebuilt; cached users taken over");
            }
        }
    }

    /// After a reload from `previous`: forgets the metric series of what this policy no longer
    /// has (tenants, issuers no tenant trusts, directories), so dashboards stop showing them.
    pub fn forget_metrics_of_what_is_gone(&self, previous: &Policy) {
        let issuers = |p: &Policy| -> HashSet<Arc<str>> {
            p.tenants.values().flat_map(|t| t.issuers.iter().map(|i| i.iss.clone())).collect()
        };
        let directories = |p: &Policy| -> HashSet<Arc<str>> {
            p.tenants.values().map(|t| Arc::<str>::from(t.directory.name())).collect()
        };
        for (name, tenant) in &previous.tenants {
            if !self.tenants.contains_key(name) {
                self.metrics.forget_tenant(&tenant.name);
            }
        }
        let kept = issuers(self);
        for issuer in issuers(previous).difference(&kept) {
            self.metrics.forget_issuer(issuer);
        }
        let kept = directories(self);
        for directory in directories(previous).difference(&kept) {
            self.metrics.forget_directory(directory);
        }
    }

    /// This policy's directory built from exactly these settings, if any.
    fn directory_like(&self, wanted: &crate::config::DirectoryConfig) -> Option<Arc<Directory>> {
        self.config
            .tenants
            .iter()
            .find(|(_, t)| t.directory == *wanted)
            .and_then(|(name, _)| self.tenants.get(name).map(|t| t.directory.clone()))
    }

    /// This policy's key store for the same tenant and issuer with the same remote source.
    fn key_store_like(
        &self,
        tenant: &str,
        wanted: &crate::config::IssuerConfig,
        settings: &crate::config::KeySettings,
    ) -> Option<Arc<KeyStore>> {
        if self.config.keys != *settings {
            return None;
        }
        let old = self.tenants.get(tenant)?.issuer(&wanted.issuer)?;
        if old.algorithms != wanted.algorithms {
            return None;
        }
        let same = match (old.keys.source(), &wanted.keys) {
            (KeySource::Uri(a), KeySource::Uri(b)) => a == b,
            (KeySource::Discovery, KeySource::Discovery) => true,
            // Key files are re-read by the reload itself: a new store carries the new keys.
            _ => false,
        };
        same.then(|| old.keys.clone())
    }

    /// Fetches the keys of every issuer that has none yet (a new issuer after a reload), all at
    /// once. Any failure is reported with its issuer's YAML path.
    ///
    /// A key store carried over from `previous` (the policy a reload replaces) is left to its
    /// own refresh task even when it has no keys yet: the serving version has none for it either,
    /// so the new version loses nothing, and one unreachable identity provider must not keep
    /// every other change (a user removed from the users file) from taking effect.
    pub async fn fetch_missing_keys(&self, previous: Option<&Policy>) -> Result<(), Vec<ConfigError>> {
        self.fetch_missing_keys_of(previous, |_| true).await
    }

    /// [`Policy::fetch_missing_keys`] for the tenants `wanted` names only (`explain` needs the
    /// keys of one tenant, not of two thousand).
    pub async fn fetch_missing_keys_of(
        &self,
        previous: Option<&Policy>,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<(), Vec<ConfigError>> {
        let carried_over = |store: &Arc<KeyStore>| {
            previous.is_some_and(|p| p.key_stores().any(|old| Arc::ptr_eq(old, store)))
        };
        let mut fetches = tokio::task::JoinSet::new();
        for (name, t) in self.tenants.iter().filter(|(name, _)| wanted(name)) {
            for (i, issuer) in t.issuers.iter().enumerate() {
                if !issuer.keys.is_ready() && !carried_over(&issuer.keys) {
                    let store = issuer.keys.clone();
                    let path = format!("tenants.{name}.issuers[{i}]");
                    fetches.spawn(async move {
                        store.refresh().await.map_err(|e| ConfigError::new(path, e.to_string()))
                    });
                }
            }
        }
        let mut errors = Vec::new();
        while let Some(r) = fetches.join_next().await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(ConfigError::new("", format!("key fetch task failed: {e}"))),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Every key store, once each.
    pub fn key_stores(&self) -> impl Iterator<Item = &Arc<KeyStore>> {
        self.tenants.values().flat_map(|t| t.issuers.iter().map(|i| &i.keys))
    }

    /// Starts the background key refresh of every issuer; the tasks end when this policy is dropped.
    pub fn start_key_refresh(&self) {
        for store in self.key_stores() {
            spawn_refresh(store);
        }
    }

    /// Every directory, once each: the default one is shared by the tenants without their own.
    pub fn directories(&self) -> impl Iterator<Item = &Arc<Directory>> {
        // Addresses as integers keep the iterator Send, so an async caller may hold it.
        let mut seen = HashSet::new();
        self.tenants.values().map(|t| &t.directory).filter(move |d| seen.insert(Arc::as_ptr(d) as usize))
    }

    /// Brings every remote directory's cache count up to date (before a scrape reads them).
    pub async fn settle_directory_caches(&self) {
        for cache in self.directories().filter_map(|d| d.cache()) {
            cache.settle().await;
        }
    }

    /// Tokens in this policy's verified-token cache (0 when it has none).
    pub fn token_cache_entries(&self) -> u64 {
        self.token_cache.as_ref().map_or(0, TokenCache::entry_count)
    }

    /// Ready when every issuer has usable keys.
    pub fn is_ready(&self) -> bool {
        self.key_stores().all(|k| k.is_ready())
    }

    /// The configured tenant the sources agree on (see [`Policy::tenant_candidates`]).
    pub fn resolve_tenant(&self, found: &[Candidate<'_>]) -> Result<Arc<Tenant>, Reason> {
        let name = tenant::resolve(found)?;
        self.tenants.get(name).cloned().ok_or(Reason::UnknownTenant)
    }

    /// What each tenant source says, normalised (`None`: absent or not a DNS label).
    pub fn tenant_candidates<'r>(&self, req: &'r impl RequestView) -> Candidates<'r> {
        let mut found = Candidates::new();
        if let Some(h) = &self.tenant_sources.header {
            found.push(Source::Header, req.header(h).and_then(tenant::normalize));
        }
        if let Some(p) = &self.tenant_sources.host {
            found.push(Source::Host, req.host().and_then(|h| p.tenant(h)));
        }
        if let Some(r) = req.route_tenant() {
            found.push(Source::Route, tenant::normalize(r));
        }
        found
    }

    /// Runs the whole pipeline for one request. `now` is unix seconds.
    pub async fn check(&self, req: &impl RequestView, now: i64) -> Decision {
        self.check_with(req, now, None).await
    }

    /// [`Policy::check`], recording what each step saw into `trace` when one is given (`explain`).
    /// A traced check always verifies the token: it neither reads nor fills the verified-token
    /// cache, so what it shows is what verification concludes now.
    pub async fn check_with(
        &self,
        req: &impl RequestView,
        now: i64,
        mut trace: Option<&mut Trace>,
    ) -> Decision {
        let found = self.tenant_candidates(req);
        let resolved = self.resolve_tenant(&found);
        note(&mut trace, || tenant_step(&found, &resolved, self));
        let tenant = match resolved {
            Ok(t) => t,
            Err(r) => {
                let mut d = Decision::deny(r);
                if let Some(pin) = req.route_tenant().filter(|_| tenant::pins_no_tenant(&found)) {
                    d.detail =
                        Some(format!("the route pins tenant {:?}, which is not a tenant name", clip(pin)));
                }
                return d;
            }
        };
        let mut d = Decision::deny(Reason::InternalError);
        d.tenant = Some(tenant.name.clone());
        d.outcome = match self.authorize(&tenant, req, now, &mut d, trace).await {
            Ok(identity) => Outcome::Allow(identity),
            Err(reason) => Outcome::Deny(reason),
        };
        d
    }

    async fn authorize(
        &self,
        tenant: &Tenant,
        req: &impl RequestView,
        now: i64,
        d: &mut Decision,
        mut trace: Option<&mut Trace>,
    ) -> Result<Identity, Reason> {
        let raw = match token::bearer(req.header("authorization")) {
            Ok(raw) => raw,
            Err(r) => {
                if let (Reason::MalformedToken, Some(value)) = (r, req.header("authorization")) {
                    d.detail = Some(token::why_bearer_malformed(value));
                }
                note(&mut trace, || {
                    let summary = match (r, req.header("authorization")) {
                        (Reason::MissingToken, None) => "no Authorization header".to_string(),
                        (Reason::MissingToken, Some(_)) => {
                            "the Authorization header holds no Bearer token".to_string()
                        }
                        _ => d.detail.clone().unwrap_or_default(),
                    };
                    step("token", Status::Fail, summary, Value::Null)
                });
                return Err(r);
            }
        };
        if raw.len() > self.token.max_bytes {
            d.detail =
                Some(format!("token of {} bytes exceeds max_bytes {}", raw.len(), self.token.max_bytes));
            note(&mut trace, || {
                step(
                    "token",
                    Status::Fail,
                    format!("{} bytes, over max_bytes {}", raw.len(), self.token.max_bytes),
                    json!({"bytes": raw.len(), "max_bytes": self.token.max_bytes}),
                )
            });
            return Err(Reason::MalformedToken);
        }
        let traced = trace.is_some();
        // The cache's key is hashed once: a miss inserts under it after verification.
        let cache =
            self.token_cache.as_ref().filter(|_| !traced).map(|c| (c, token_cache::key(&tenant.name, raw)));
        let cached = cache.map(|(c, key)| c.get(&key, now).filter(|f| f.still_verifiable(tenant)));
        if let Some(found) = &cached {
            self.metrics.token_cache_lookup(found.is_some());
        }
        let facts = match cached.flatten() {
            Some(cached) => cached,
            None => {
                // Boxed: the cold path's future (signature, key re-fetch over HTTP) is kilobytes, and
                // every check would otherwise carry, move and copy that space.
                let facts =
                    Arc::new(Box::pin(self.verify_token(tenant, raw, d, trace.as_deref_mut())).await?);
                if let Some((cache, key)) = cache {
                    cache.insert(key, &facts, now, self.token.leeway_seconds);
                }
                facts
            }
        };
        d.issuer = Some(tenant.issuers[facts.issuer].iss.clone());
        d.sub = facts.sub.clone().filter(|s| !s.is_empty());
        let claims = &facts;

        let leeway = self.token.leeway_seconds as f64;
        let now_f = now as f64;
        match claims.exp.get() {
            None => {
                d.detail = Some("the token has no exp".into());
                note(&mut trace, || {
                    time_step(claims, now, leeway, Status::Fail, "the token has no exp".into())
                });
                return Err(Reason::TokenExpired);
            }
            Some(exp) if now_f >= exp + leeway => {
                d.detail = Some(format!(
                    "expired {} ago (leeway {}s)",
                    whole_seconds(now_f - exp, false),
                    leeway as i64
                ));
                note(&mut trace, || {
                    let ago = explain::human_duration((now_f - exp) as i64);
                    time_step(
                        claims,
                        now,
                        leeway,
                        Status::Fail,
                        format!("expired {ago} ago, leeway {}s", leeway as i64),
                    )
                });
                return Err(Reason::TokenExpired);
            }
            Some(_) => {}
        }
        for (name, t) in [("nbf", claims.nbf.get()), ("iat", claims.iat.get())] {
            if let Some(t) = t
                && t - leeway > now_f
            {
                // Rounded up: 60.5 s ahead with a leeway of 60 s must not read "60s".
                d.detail = Some(format!(
                    "{name} is {} in the future (leeway {}s)",
                    whole_seconds(t - now_f, true),
                    leeway as i64
                ));
                note(&mut trace, || {
                    let ahead = explain::human_duration((t - now_f) as i64);
                    let summary = format!("{name} is {ahead} in the future, leeway {}s", leeway as i64);
                    time_step(claims, now, leeway, Status::Fail, summary)
                });
                return Err(Reason::TokenNotYetValid);
            }
        }
        note(&mut trace, || {
            let left =
                claims.exp.get().map(|e| explain::human_duration((e - now_f) as i64)).unwrap_or_default();
            let summary = if claims.exp.get().is_some_and(|e| e > now_f) {
                format!("valid: expires in {left}, leeway {}s", leeway as i64)
            } else {
                format!("valid within the leeway: expired {left} ago, leeway {}s", leeway as i64)
            };
            time_step(claims, now, leeway, Status::Pass, summary)
        });
        let issuer = &tenant.issuers[facts.issuer];
        if !claims.audience_ok {
            note(&mut trace, || {
                step(
                    "audience",
                    Status::Fail,
                    format!("no aud of the token is among the issuer's audiences {:?}", issuer.audiences),
                    json!({"accepted": issuer.audiences}),
                )
            });
            return Err(Reason::InvalidAudience);
        }
        note(&mut trace, || {
            step(
                "audience",
                Status::Pass,
                format!("aud matches one of {:?}", issuer.audiences),
                json!({"accepted": issuer.audiences}),
            )
        });
        let Some(sub) = claims.sub.as_deref().filter(|s| !s.is_empty()) else {
            note(&mut trace, || {
                step("subject", Status::Fail, "the token has no sub (or an empty one)", Value::Null)
            });
            return Err(Reason::MissingSubject);
        };
        note(&mut trace, || step("subject", Status::Pass, format!("sub {sub:?}"), json!({"sub": sub})));

        // What the revocation channel said about this user overrides the directory for a while.
        let mark = self.revocation.as_ref().and_then(|r| r.user_mark(&tenant.name, &tenant.directory, sub));
        if mark.is_some_and(|m| m.deleted) {
            d.detail = Some("a user.deleted event named this user (revocation channel)".into());
            note(&mut trace, || {
                step(
                    "directory",
                    Status::Fail,
                    "a user.deleted event on the revocation channel named this user; the directory was not asked",
                    json!({"event": "user.deleted"}),
                )
            });
            return Err(Reason::UserNotFound);
        }
        let answer = tenant.directory.lookup(&tenant.name, sub).await;
        if trace.is_some() {
            note(&mut trace, || directory_step(tenant, sub, &answer));
        }
        let user = match answer.result {
            Ok(Lookup::Found(u)) => u,
            Ok(Lookup::NotFound) => {
                let looked_up = tenant.directory.normalize(sub);
                d.detail =
                    Some(format!("no such user: {}", tenant.directory.describe(&tenant.name, &looked_up)));
                return Err(Reason::UserNotFound);
            }
            Err(e) => {
                d.detail = Some(e.to_string());
                return Err(Reason::DirectoryUnavailable);
            }
        };
        if user.disabled || mark.is_some_and(|m| m.disabled) {
            let by_event = !user.disabled;
            if by_event {
                d.detail = Some("a user.disabled event named this user (revocation channel)".into());
            }
            note(&mut trace, || {
                let summary = if by_event {
                    "a user.disabled event on the revocation channel named this user"
                } else {
                    "the user is disabled in the directory"
                };
                step("user", Status::Fail, summary, Value::Null)
            });
            return Err(Reason::UserDisabled);
        }
        let event_valid_after = mark.and_then(|m| m.tokens_valid_after);
        let valid_after = match (user.tokens_valid_after, event_valid_after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(valid_after) = valid_after {
            let revoked = match claims.iat.get() {
                None => Some("the user has tokens_valid_after and the token has no iat".to_string()),
                Some(iat) if iat < valid_after as f64 => {
                    Some(format!("iat {iat} is before tokens_valid_after {valid_after}"))
                }
                Some(_) => None,
            };
            if let Some(mut why) = revoked {
                if event_valid_after == Some(valid_after) && user.tokens_valid_after != Some(valid_after) {
                    why.push_str(" (from a user.tokens_revoked event)");
                }
                note(&mut trace, || {
                    step(
                        "revocation",
                        Status::Fail,
                        format!("revoked: {why}"),
                        json!({"iat": claims.iat.get(), "tokens_valid_after": valid_after}),
                    )
                });
                d.detail = Some(why);
                return Err(Reason::TokenRevoked);
            }
        }
        if let (Some(r), Some(jti)) = (&self.revocation, claims.jti.as_deref()) {
            match Box::pin(r.jti_status(jti)).await {
                JtiStatus::Revoked => {
                    d.detail = Some("the token's jti is on the fleet's revoked list".into());
                    note(&mut trace, || {
                        step(
                            "revocation",
                            Status::Fail,
                            "the jti is revoked (Redis revocation list)",
                            Value::Null,
                        )
                    });
                    return Err(Reason::TokenRevoked);
                }
                JtiStatus::NotRevoked => note(&mut trace, || {
                    step("revocation", Status::Pass, "the jti is not revoked", Value::Null)
                }),
                JtiStatus::Unavailable(e) => {
                    let fail_closed = r.settings().fail_closed;
                    note(&mut trace, || {
                        let summary = if fail_closed {
                            format!("cannot ask Redis whether the jti is revoked ({e}); fail_closed denies")
                        } else {
                            format!(
                                "cannot ask Redis whether the jti is revoked ({e}); allowed on what is known"
                            )
                        };
                        let status = if fail_closed { Status::Fail } else { Status::Info };
                        step("revocation", status, summary, json!({"fail_closed": fail_closed}))
                    });
                    d.detail = Some(format!("revocation store unavailable: {e}"));
                    if fail_closed {
                        return Err(Reason::RevocationUnavailable);
                    }
                }
            }
        }
        if crate::directory::has_outer_whitespace(&user.id) {
            // Forwarded, `bob ` would reach the upstream as `bob`: another user. Only a users-file
            // entry without `id` gets here (remote answers and explicit ids are refused earlier).
            d.detail = Some(format!(
                "the user id {:?} starts or ends with a space or tab, which a forwarded header cannot carry \
                 (the upstream would read another user); give the user an `id`",
                &*user.id
            ));
            note(&mut trace, || {
                step("user", Status::Fail, d.detail.clone().unwrap_or_default(), Value::Null)
            });
            return Err(Reason::InternalError);
        }
        note(&mut trace, || {
            step(
                "user",
                Status::Pass,
                format!(
                    "enabled, not revoked; id {:?}, roles {:?}",
                    &*user.id,
                    user.roles.as_deref().unwrap_or("")
                ),
                json!({"id": &*user.id, "roles": user.roles.as_deref(), "tokens_valid_after": valid_after}),
            )
        });
        Ok(Identity { user_id: user.id, roles: user.roles })
    }

    /// The expensive, cacheable half of a check: parse the token, match its issuer among the
    /// tenant's, check the algorithm, find the key and verify the signature. What it learns does not
    /// depend on the clock or the directory, so it can be reused for the token's lifetime.
    async fn verify_token(
        &self,
        tenant: &Tenant,
        raw: &str,
        d: &mut Decision,
        mut trace: Option<&mut Trace>,
    ) -> Result<TokenFacts, Reason> {
        let parsed = token::parse(raw);
        if parsed.is_err() {
            d.detail = Some(token::why_malformed(raw));
        }
        note(&mut trace, || {
            let (header, claims) = explain::decode_for_display(raw);
            let data = json!({
                "bytes": raw.len(),
                "max_bytes": self.token.max_bytes,
                "header": header,
                "claims": claims,
            });
            match &parsed {
                Ok(_) => step(
                    "token",
                    Status::Pass,
                    format!("well-formed JWS, {} bytes (max_bytes {})", raw.len(), self.token.max_bytes),
                    data,
                ),
                Err(_) => step(
                    "token",
                    Status::Fail,
                    format!("not a well-formed compact JWS: {}", d.detail.as_deref().unwrap_or_default()),
                    data,
                ),
            }
        });
        let jws = parsed?;
        let claims = &jws.claims;

        let Some(index) =
            claims.iss.as_deref().and_then(|iss| tenant.issuers.iter().position(|i| &*i.iss == iss))
        else {
            d.detail = Some(match claims.iss.as_deref() {
                None => "the token has no iss".into(),
                Some(iss) => match self.tenant_trusting(iss) {
                    Some(other) => format!("iss {:?} is trusted by tenant {other}, not this one", clip(iss)),
                    None => format!("iss {:?} is not trusted by any tenant", clip(iss)),
                },
            });
            note(&mut trace, || {
                let trusted: Vec<&str> = tenant.issuers.iter().map(|i| &*i.iss).collect();
                let other = claims.iss.as_deref().and_then(|iss| self.tenant_trusting(iss));
                step(
                    "issuer",
                    Status::Fail,
                    d.detail.clone().unwrap_or_default(),
                    json!({"iss": claims.iss, "tenant_trusts": trusted, "trusted_by_tenant": other}),
                )
            });
            return Err(Reason::UntrustedIssuer);
        };
        let issuer = &tenant.issuers[index];
        d.issuer = Some(issuer.iss.clone());
        note(&mut trace, || {
            step(
                "issuer",
                Status::Pass,
                format!("iss {:?} is trusted by tenant {}", &*issuer.iss, tenant.name),
                json!({"iss": &*issuer.iss}),
            )
        });

        let allowed =
            crate::config::parse_algorithm(&jws.header.alg).filter(|a| issuer.algorithms.contains(a));
        let names: Vec<String> = match trace {
            Some(_) => issuer.algorithms.iter().map(|a| format!("{a:?}")).collect(),
            None => Vec::new(),
        };
        let Some(alg) = allowed else {
            d.detail = Some(format!("alg {:?} is not allowed for this issuer", clip(&jws.header.alg)));
            note(&mut trace, || {
                step(
                    "algorithm",
                    Status::Fail,
                    format!("alg {:?} is not among the issuer's algorithms {names:?}", jws.header.alg),
                    json!({"alg": jws.header.alg, "allowed": names}),
                )
            });
            return Err(Reason::UnsupportedAlgorithm);
        };
        note(&mut trace, || {
            step(
                "algorithm",
                Status::Pass,
                format!("alg {alg:?} is allowed ({names:?})"),
                json!({"alg": jws.header.alg, "allowed": names}),
            )
        });

        let key = verify_signature(issuer, &jws, alg, d, trace).await?;
        let token::Jws { header, claims, .. } = jws;
        Ok(TokenFacts {
            issuer: index,
            audience_ok: claims.aud.as_ref().is_some_and(|a| a.contains_any(&issuer.audiences)),
            has_kid: header.kid.is_some(),
            key,
            sub: claims.sub.map(Arc::from),
            exp: claims.exp.into(),
            nbf: claims.nbf.into(),
            iat: claims.iat.into(),
            jti: claims.jti.filter(|_| self.revocation.is_some()).map(String::into_boxed_str),
        })
    }

    /// The first tenant (by name) that trusts `iss`, for the detail of a tenant that does not
    /// (the classic wrong-tenant mistake).
    fn tenant_trusting(&self, iss: &str) -> Option<&str> {
        self.trusted_by.get(iss).map(|name| &**name)
    }
}

/// At most [`CLIP`] bytes of a value taken from an unverified token, for a deny's detail: the
/// detail is logged at info for every deny, and a kilobyte-long `kid`, `alg` or `iss` would make
/// each forged request cost the log that much.
fn clip(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= CLIP {
        return value.into();
    }
    let end = (0..=CLIP).rev().find(|&i| value.is_char_boundary(i)).unwrap_or(0);
    format!("{}… ({} bytes)", &value[..end], value.len()).into()
}

const CLIP: usize = 128;

/// A distance in time for a deny detail: whole seconds (`"61s"`), rounded up or down, or "over
/// 100 years" for the far-off values a claim can hold (1e300 would saturate to i64::MAX).
fn whole_seconds(seconds: f64, round_up: bool) -> String {
    const CENTURY: f64 = 100.0 * 365.25 * 86_400.0;
    if seconds > CENTURY {
        return "over 100 years".into();
    }
    format!("{}s", if round_up { seconds.ceil() } else { seconds.floor() } as i64)
}

/// Key lookup and signature verification, re-fetching the issuer's keys once (rate-limited) when
/// the token names a key the current set lacks.
async fn verify_signature(
    issuer: &Issuer,
    jws: &token::Jws<'_>,
    alg: jsonwebtoken::Algorithm,
    d: &mut Decision,
    mut trace: Option<&mut Trace>,
) -> Result<[u8; 32], Reason> {
    let kid = jws.header.kid.as_deref();
    let mut set = issuer.keys.current();
    let mut refetched = false;
    loop {
        let Some(keys) = set.as_ref() else {
            let refetch = if refetched { Refetched::No } else { issuer.keys.refetch_on_miss(None).await };
            if refetch == Refetched::Maybe {
                refetched = true;
                set = issuer.keys.current();
                continue;
            }
            let detail = match refetch {
                Refetched::StillFetching => format!(
                    "no keys have been loaded for this issuer; the fetch for them is still running after {} ms",
                    issuer.keys.check_wait().as_millis()
                ),
                _ => "no keys have been loaded for this issuer".into(),
            };
            note(&mut trace, || key_step(issuer, None, kid, refetched, Status::Fail, detail.clone()));
            d.detail = Some(detail);
            return Err(Reason::KeysUnavailable);
        };
        let refusal = match keys.find(kid, alg) {
            KeyMatch::Candidates(candidates) => {
                note(&mut trace, || {
                    let kinds: Vec<&str> = candidates.iter().map(|k| k.kind.name()).collect();
                    let summary = match kid {
                        Some(k) => format!("kid {k:?} found: {} key, fits {alg:?}", kinds.join(", ")),
                        None => format!(
                            "no kid: trying {} key(s) that fit {alg:?} (at most {MAX_KIDLESS_CANDIDATES})",
                            candidates.len()
                        ),
                    };
                    key_step(issuer, Some(keys), kid, refetched, Status::Pass, summary)
                });
                for key in candidates.into_iter().take(MAX_KIDLESS_CANDIDATES) {
                    if key.verify(alg, jws.signing_input.as_bytes(), jws.signature) {
                        note(&mut trace, || {
                            step("signature", Status::Pass, format!("valid {alg:?} signature"), Value::Null)
                        });
                        return Ok(key.fingerprint);
                    }
                }
                note(&mut trace, || {
                    step(
                        "signature",
                        Status::Fail,
                        "the signature does not verify with the key: signed by another key, or the token was altered",
                        Value::Null,
                    )
                });
                return Err(Reason::InvalidSignature);
            }
            KeyMatch::WrongType(key) => match key.alg {
                // The type fits; the JWK's own `alg` is what refuses this one.
                Some(pinned) if key.kind.fits(alg) => format!(
                    "kid {:?} pins alg {pinned:?} in the JWKS; the token is {alg:?}",
                    clip(kid.unwrap_or_default())
                ),
                _ => format!(
                    "kid {:?} is an {} key, which cannot verify {alg:?}",
                    clip(kid.unwrap_or_default()),
                    key.kind.name()
                ),
            },
            KeyMatch::Unusable(why) => {
                format!(
                    "kid {:?} names a key subguard does not verify with: {why}",
                    clip(kid.unwrap_or_default())
                )
            }
            KeyMatch::NotFound => {
                let refetch =
                    if refetched { Refetched::No } else { issuer.keys.refetch_on_miss(Some(keys)).await };
                if refetch == Refetched::Maybe {
                    refetched = true;
                    set = issuer.keys.current();
                    continue;
                }
                if refetch == Refetched::StillFetching {
                    // Not known to be unknown: the client's retry will find the keys fetched.
                    let detail = format!(
                        "{}: the re-fetch of the issuer's keys is still running after {} ms",
                        match kid {
                            Some(k) => format!("no key with kid {:?} yet", clip(k)),
                            None => format!("no key fits {alg:?} yet"),
                        },
                        issuer.keys.check_wait().as_millis()
                    );
                    note(&mut trace, || {
                        key_step(issuer, Some(keys), kid, false, Status::Fail, detail.clone())
                    });
                    d.detail = Some(detail);
                    return Err(Reason::KeysUnavailable);
                }
                d.detail = Some(match kid {
                    Some(k) => format!("no key with kid {:?}", clip(k)),
                    None => format!("no key fits {alg:?}"),
                });
                note(&mut trace, || {
                    let kids: Vec<&str> = keys.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                    let summary =
                        format!("{}; the issuer's kids are {kids:?}", d.detail.as_deref().unwrap_or(""));
                    key_step(issuer, Some(keys), kid, refetched, Status::Fail, summary)
                });
                return Err(Reason::UnknownKey);
            }
        };
        // A key with this kid exists but cannot verify this alg (the algorithm's second check).
        note(&mut trace, || key_step(issuer, Some(keys), kid, refetched, Status::Fail, refusal.clone()));
        d.detail = Some(refusal);
        return Err(Reason::UnsupportedAlgorithm);
    }
}

/// What each tenant source said, and which tenant they gave.
fn tenant_step(
    found: &[Candidate<'_>],
    resolved: &Result<Arc<Tenant>, Reason>,
    policy: &Policy,
) -> explain::Step {
    let sources: Vec<Value> = found.iter().map(|(s, t)| json!({"source": s.name(), "tenant": t})).collect();
    let said: Vec<String> =
        found.iter().map(|(s, t)| format!("{}={}", s.name(), t.as_deref().unwrap_or("(none)"))).collect();
    let said = if said.is_empty() {
        "no tenant source is configured or present".to_string()
    } else {
        said.join(", ")
    };
    let (status, summary) = match resolved {
        Ok(t) => {
            let from: Vec<&str> =
                found.iter().filter(|(_, v)| v.as_deref() == Some(&*t.name)).map(|(s, _)| s.name()).collect();
            (Status::Pass, format!("tenant {} (from {}); sources: {said}", t.name, from.join(", ")))
        }
        Err(Reason::TenantMismatch) => (Status::Fail, format!("the sources disagree: {said}")),
        Err(Reason::UnknownTenant) => {
            let mut known: Vec<&str> = policy.tenants.keys().map(String::as_str).collect();
            known.sort_unstable();
            (
                Status::Fail,
                format!("no configured tenant of that name ({said}); configured: {}", known.join(", ")),
            )
        }
        Err(_) => (Status::Fail, format!("no source gave a tenant (or not a valid DNS label): {said}")),
    };
    explain::step("tenant", status, summary, json!({"sources": sources}))
}

/// The key lookup: kid, source, where and when the keys were fetched.
fn key_step(
    issuer: &Issuer,
    keys: Option<&Arc<crate::keys::KeySet>>,
    kid: Option<&str>,
    refetched: bool,
    status: Status,
    summary: String,
) -> explain::Step {
    let source = issuer.keys.source();
    let from = match source {
        KeySource::File { path, .. } => Some(path.display().to_string()),
        _ => issuer.keys.resolved_from().map(|s| s.to_string()),
    };
    let fetched_at =
        keys.and_then(|k| k.fetched_at.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
    let summary = format!(
        "{summary} [keys: {} source{}{}{}]",
        source.kind(),
        from.as_deref().map(|f| format!(" {f}")).unwrap_or_default(),
        fetched_at.map(|t| format!(", fetched at {t}")).unwrap_or_default(),
        if refetched { ", re-fetched for this token" } else { "" },
    );
    explain::step(
        "key",
        status,
        summary,
        json!({
            "kid": kid,
            "source": source.kind(),
            "resolved_from": from,
            "fetched_at": fetched_at,
            "refetched": refetched,
            "kids": keys.map(|k| k.keys.iter().map(|k| json!({"kid": k.kid, "type": k.kind.name()})).collect::<Vec<_>>()),
            "skipped": keys.map(|k| k.skipped.clone()),
        }),
    )
}

/// The time claims against the clock.
fn time_step(claims: &TokenFacts, now: i64, leeway: f64, status: Status, summary: String) -> explain::Step {
    explain::step(
        "time",
        status,
        format!("{summary} (now {now})"),
        json!({"now": now, "leeway_seconds": leeway as i64, "exp": claims.exp.get(), "nbf": claims.nbf.get(), "iat": claims.iat.get()}),
    )
}

/// The directory lookup as made: where, for which sub, the answer and whether the cache gave it.
fn directory_step(tenant: &Tenant, sub: &str, answer: &crate::directory::Answer) -> explain::Step {
    let looked_up = tenant.directory.normalize(sub);
    let lookup = tenant.directory.describe(&tenant.name, &looked_up);
    let served = match answer.served {
        crate::directory::cache::Served::CacheHit => "cache hit",
        crate::directory::cache::Served::Directory => "asked the directory",
        crate::directory::cache::Served::Stale => "stale cache entry (the directory failed)",
    };
    let cache = if tenant.directory.cache().is_some() { served } else { "no cache (file directory)" };
    let (status, found) = match &answer.result {
        Ok(Lookup::Found(_)) => (Status::Pass, "found"),
        Ok(Lookup::NotFound) => (Status::Fail, "not found"),
        Err(_) => (Status::Fail, "error"),
    };
    let mut summary = format!("{found}: {lookup}; {cache}");
    if looked_up != sub {
        summary.push_str(&format!("; sub {sub:?} normalised to {:?}", &*looked_up));
    }
    if let Err(e) = &answer.result {
        summary.push_str(&format!("; {e}"));
    }
    explain::step(
        "directory",
        status,
        summary,
        json!({"lookup": lookup, "sub": sub, "looked_up": &*looked_up, "answer": found, "cache": cache}),
    )
}

#[cfg(test)]
mod tests {
    use super::whole_seconds;

    /// 60.5 s ahead with a leeway of 60 s is refused, and must not read "60s" (inside the leeway);
    /// a claim of 1e300 must not read as i64::MAX seconds.
    #[test]
    fn time_details_round_away_from_the_leeway_and_stay_readable() {
        assert_eq!(whole_seconds(60.5, true), "61s");
        assert_eq!(whole_seconds(60.5, false), "60s");
        assert_eq!(whole_seconds(192.0, false), "192s");
        assert_eq!(whole_seconds(1e300, true), "over 100 years");
        assert_eq!(whole_seconds(f64::INFINITY, false), "over 100 years");
    }
}
