//! The cache in front of remote directories (SPEC §5).
//!
//! Per (tenant, sub): a found user is served for `ttl`, then refreshed; while the directory fails,
//! a found user keeps being served for `stale_if_error` past its ttl. A not-found answer is served
//! for `negative_ttl` and never past it, whatever the directory's state. Concurrent lookups of one
//! key that miss share one directory request. No lock is held across the directory call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use super::{DirectoryError, Lookup};
use crate::config::CacheSettings;

/// Keys carry the tenant: one tenant's answers can never serve another.
pub type Key = (Arc<str>, Arc<str>);

#[derive(Clone, Debug)]
struct Entry {
    answer: Lookup,
    at: Instant,
}

struct EntryExpiry {
    found: Duration,
    not_found: Duration,
}

impl EntryExpiry {
    fn life(&self, e: &Entry) -> Duration {
        match e.answer {
            Lookup::Found(_) => self.found,
            Lookup::NotFound => self.not_found,
        }
    }
}

impl Expiry<Key, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &Key, e: &Entry, _: std::time::Instant) -> Option<Duration> {
        Some(self.life(e))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        e: &Entry,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.life(e))
    }
}

/// Where an answer came from (the `outcome` of `subguard_directory_lookups_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Fresh from the cache.
    CacheHit,
    /// From the directory just now.
    Directory,
    /// A found user past its ttl, because the directory failed.
    Stale,
}

pub struct DirectoryCache {
    settings: CacheSettings,
    entries: Cache<Key, Entry>,
    /// Loads in flight: concurrent misses of one key await the same directory request.
    flights: Cache<Key, Lookup>,
}

impl std::fmt::Debug for DirectoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryCache").field("settings", &self.settings).finish()
    }
}

impl DirectoryCache {
    pub fn new(settings: CacheSettings) -> Self {
        let entries = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(EntryExpiry {
                found: settings.ttl + settings.stale_if_error,
                not_found: settings.negative_ttl,
            })
            .build();
        // Entries only live while a load is in flight (removed right after); the bound is a guard.
        let flights =
            Cache::builder().max_capacity(settings.max_entries).time_to_live(Duration::from_secs(60)).build();
        DirectoryCache { settings, entries, flights }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// A fresh cached answer, if any.
    pub async fn fresh(&self, key: &Key) -> Option<Lookup> {
        let e = self.entries.get(key).await?;
        let ttl = match e.answer {
            Lookup::Found(_) => self.settings.ttl,
            Lookup::NotFound => self.settings.negative_ttl,
        };
        (e.at.elapsed() < ttl).then_some(e.answer)
    }

    /// Answers from the cache when fresh, else asks `load` (once for all concurrent callers of this
    /// key), else falls back to a stale found user within `stale_if_error`.
    pub async fn get_or_load<F>(&self, key: Key, load: F) -> (Result<Lookup, DirectoryError>, Served)
    where
        F: Future<Output = Result<Lookup, DirectoryError>>,
    {
        if let Some(answer) = self.fresh(&key).await {
            return (Ok(answer), Served::CacheHit);
        }
        let entries = &self.entries;
        let k = key.clone();
        let loaded = self
            .flights
            .try_get_with(key.clone(), async move {
                let answer = load.await?;
                entries.insert(k, Entry { answer: answer.clone(), at: Instant::now() }).await;
                Ok::<_, DirectoryError>(answer)
            })
            .await;
        self.flights.invalidate(&key).await;
        match loaded {
            Ok(answer) => (Ok(answer), Served::Directory),
            Err(err) => {
                let window = self.settings.ttl + self.settings.stale_if_error;
                match self.entries.get(&key).await {
                    Some(Entry { answer: Lookup::Found(u), at }) if at.elapsed() < window => {
                        (Ok(Lookup::Found(u)), Served::Stale)
                    }
                    _ => (Err((*err).clone()), Served::Directory),
                }
            }
        }
    }

    /// Takes over `old`'s found users that are still within this cache's `ttl + stale_if_error`,
    /// with their age: a reload that rebuilt the directory (new timeouts, a rotated credential)
    /// keeps serving them as the old one would have, stale ones included while the directory
    /// fails. Not-found answers are not taken over: they are short-lived by design, and asking
    /// again is what a user created a moment ago needs.
    pub async fn adopt_found(&self, old: &DirectoryCache) -> usize {
        let window = self.settings.ttl + self.settings.stale_if_error;
        let mut adopted = 0;
        for (key, entry) in old.entries.iter() {
            if matches!(entry.answer, Lookup::Found(_)) && entry.at.elapsed() < window {
                self.entries.insert((*key).clone(), entry).await;
                adopted += 1;
            }
        }
        adopted
    }

    /// Drops one user's cached answer (user events, `explain --no-cache`).
    pub async fn evict(&self, key: &Key) {
        self.entries.invalidate(key).await;
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Cached answers, as of the cache's last housekeeping ([`DirectoryCache::settle`]).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Does the cache's pending housekeeping (applying recent inserts, dropping expired
    /// entries), which traffic otherwise triggers from time to time.
    pub async fn settle(&self) {
        self.entries.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::User;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings(ttl_ms: u64, neg_ms: u64, stale_ms: u64) -> CacheSettings {
        CacheSettings {
            ttl: Duration::from_millis(ttl_ms),
            negative_ttl: Duration::from_millis(neg_ms),
            stale_if_error: Duration::from_millis(stale_ms),
            max_entries: 100,
        }
    }

    fn key(t: &str, s: &str) -> Key {
        (Arc::from(t), Arc::from(s))
    }

    fn found() -> Lookup {
        Lookup::Found(User { id: "u".into(), roles: None, disabled: false, tokens_valid_after: None })
    }

    #[tokio::test]
    async fn a_new_cache_adopts_found_users_with_their_age_and_no_not_found() {
        let old = DirectoryCache::new(settings(60_000, 60_000, 0));
        assert!(old.get_or_load(key("acme", "alice"), async { Ok(found()) }).await.0.is_ok());
        assert!(old.get_or_load(key("acme", "ghost"), async { Ok(Lookup::NotFound) }).await.0.is_ok());
        let new = DirectoryCache::new(settings(60_000, 60_000, 0));
        assert_eq!(new.adopt_found(&old).await, 1);
        assert!(matches!(new.fresh(&key("acme", "alice")).await, Some(Lookup::Found(_))));
        assert!(new.fresh(&key("acme", "ghost")).await.is_none(), "not-found answers are asked again");
        // An entry older than the new cache's ttl + stale_if_error is not taken.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let short = DirectoryCache::new(settings(10, 60_000, 10));
        assert_eq!(short.adopt_found(&old).await, 0);
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_request() {
        let cache = Arc::new(DirectoryCache::new(settings(60_000, 5_000, 0)));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load(key("acme", "alice"), async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(found())
                    })
                    .await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap().0, Ok(Lookup::Found(_))));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tenants_never_share_entries() {
        let cache = DirectoryCache::new(settings(60_000, 60_000, 0));
        let (r, _) = cache.get_or_load(key("acme", "alice"), async { Ok(found()) }).await;
        assert!(matches!(r, Ok(Lookup::Found(_))));
        let (r, served) = cache.get_or_load(key("globex", "alice"), async { Ok(Lookup::NotFound) }).await;
        assert_eq!((r, served), (Ok(Lookup::NotFound), Served::Directory));
    }

    #[tokio::test]
    async fn stale_if_error_then_expiry() {
        let cache = DirectoryCache::new(settings(20, 20, 200));
        let _ = cache.get_or_load(key("acme", "alice"), async { Ok(found()) }).await;
        let (_, served) = cache.get_or_load(key("acme", "alice"), async { Ok(found()) }).await;
        assert_eq!(served, Served::CacheHit);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let fail = || async { Err(DirectoryError("status 500".into())) };
        let (r, served) = cache.get_or_load(key("acme", "alice"), fail()).await;
        assert!(matches!(r, Ok(Lookup::Found(_))));
        assert_eq!(served, Served::Stale);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (r, _) = cache.get_or_load(key("acme", "alice"), fail()).await;
        assert_eq!(r, Err(DirectoryError("status 500".into())));
    }

    #[tokio::test]
    async fn not_found_is_never_served_past_its_ttl() {
        let cache = DirectoryCache::new(settings(60_000, 30, 60_000));
        let _ = cache.get_or_load(key("acme", "new"), async { Ok(Lookup::NotFound) }).await;
        let (r, served) = cache.get_or_load(key("acme", "new"), async { Ok(found()) }).await;
        assert_eq!((r, served), (Ok(Lookup::NotFound), Served::CacheHit));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The directory now fails: a stale not-found must not be served.
        let (r, _) =
            cache.get_or_load(key("acme", "new"), async { Err(DirectoryError("down".into())) }).await;
        assert!(r.is_err());
        let (r, served) = cache.get_or_load(key("acme", "new"), async { Ok(found()) }).await;
        assert!(matches!(r, Ok(Lookup::Found(_))));
        assert_eq!(served, Served::Directory);
    }
}
