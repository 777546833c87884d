//! The verified-token cache: a token whose signature verified for a tenant is remembered (by a
//! SHA-256 of tenant and token) with what verification established, so the next check of the same
//! token skips parsing and the signature. Everything that depends on the clock (exp, nbf, iat) or
//! the directory (the user, disabled, tokens_valid_after) is still checked on every request.
//!
//! An entry lives until the token expires (plus leeway), at most an hour, and is only used while
//! the issuer still publishes the very key that verified it (same `kid`, same key material), so
//! removing or replacing a key in the JWKS stops its tokens at the next refresh. Only tokens with a
//! `kid` are cached. The cache belongs to one policy: a reload starts empty. Tokens that fail
//! verification are never cached, so an attacker cannot fill it with forgeries.
//!
//! Why not moka, like the directory cache: this cache needs neither coalesced loads (a duplicate
//! verification is harmless) nor async, and it is on the warm path of every check and holds one
//! entry per live token. Measured with 100 000 entries (docs/benchmarks.md), moka's sync cache
//! took about 420 bytes of bookkeeping per entry beside the entry itself and about 390 ns per
//! `get`; a few mutex-guarded hash maps keyed by the digest take about 75 bytes and tens of
//! nanoseconds. Eviction is deliberately simple: expired entries go first; a shard that is still
//! full drops about half of its entries (an evicted token is only verified again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;
use prometheus_client::metrics::counter::Counter;

use super::Tenant;

/// What signature verification established about a token. One is kept per cached token, so it
/// is laid out to be small (about 100 bytes beside the `sub` and `jti` strings).
#[derive(Debug)]
pub struct TokenFacts {
    /// Index of the matched issuer in the tenant's issuers.
    pub issuer: usize,
    /// `aud` holds one of the issuer's audiences.
    pub audience_ok: bool,
    /// The token names its key (`kid`); only such tokens are cached.
    pub has_kid: bool,
    /// Fingerprint of the key that verified the signature: its `kid` and its key material.
    pub key: [u8; 32],
    /// Shared with every decision that reports it (no copy per check).
    pub sub: Option<Arc<str>>,
    pub exp: Time,
    pub nbf: Time,
    pub iat: Time,
    /// The token's id, checked against the fleet's revoked `jti`s; kept only when the policy
    /// has a revocation channel (`revocation:`).
    pub jti: Option<Box<str>>,
}

impl TokenFacts {
    /// Whether the very key that verified this token is still published by its issuer under the
    /// same `kid` (a key replaced under its old `kid` is a different key; the fingerprint covers
    /// both).
    pub fn still_verifiable(&self, tenant: &Tenant) -> bool {
        let Some(issuer) = tenant.issuers.get(self.issuer).filter(|_| self.has_kid) else {
            return false;
        };
        issuer.keys.current().is_some_and(|set| set.keys.iter().any(|k| k.fingerprint == self.key))
    }
}

/// An optional NumericDate (`exp`, `nbf`, `iat`) in eight bytes instead of sixteen: NaN, which
/// JSON cannot express, stands for "absent".
#[derive(Clone, Copy, Debug)]
pub struct Time(f64);

impl Time {
    pub fn get(self) -> Option<f64> {
        (!self.0.is_nan()).then_some(self.0)
    }
}

impl From<Option<f64>> for Time {
    /// A NaN claim reads as absent, which is how every check already treated it (NaN compares
    /// false with everything).
    fn from(t: Option<f64>) -> Self {
        Time(t.unwrap_or(f64::NAN))
    }
}

/// Longest an entry is kept, whatever the token's `exp`.
const MAX_LIFETIME_SECONDS: i64 = 3600;

/// Shards of a large cache, so concurrent checks rarely wait for one another's lock.
const SHARDS: usize = 16;

/// Below this many entries per shard a single shard is used (a tiny cache split 16 ways would
/// evict at random long before it is full).
const MIN_SHARD_ENTRIES: u64 = 1024;

/// Where a token's entry lives: a SHA-256 of tenant and token, computed once per check and used
/// for both the lookup and, on a miss, the insert.
pub type Key = [u8; 32];

struct Entry {
    facts: Arc<TokenFacts>,
    /// Unix seconds; the entry is not used from then on.
    expires_at: i64,
}

struct Shard {
    entries: HashMap<Key, Entry>,
    /// Incremented at every eviction, so successive evictions drop different halves.
    evictions: u8,
}

pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    /// Counts the entries dropped to make room while still valid.
    evictions: Counter,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.entry_count()).finish()
    }
}

/// The cache key of `token` checked for `tenant`.
pub fn key(tenant: &str, token: &str) -> Key {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(tenant.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl TokenCache {
    /// `None` when `max_entries` is 0 (cache disabled). Valid entries dropped to make room are
    /// counted in `evictions`.
    pub fn new(max_entries: u64, evictions: Counter) -> Option<TokenCache> {
        if max_entries == 0 {
            return None;
        }
        let shards = if max_entries >= SHARDS as u64 * MIN_SHARD_ENTRIES { SHARDS } else { 1 };
        let per_shard = usize::try_from(max_entries.div_ceil(shards as u64)).unwrap_or(usize::MAX);
        let shards =
            (0..shards).map(|_| Mutex::new(Shard { entries: HashMap::new(), evictions: 0 })).collect();
        Some(TokenCache { shards, per_shard, evictions })
    }

    /// The key's shard. The key is a SHA-256 digest, so any of its bytes is evenly spread.
    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        &self.shards[usize::from(key[31]) % self.shards.len()]
    }

    /// The facts of a token verified before (by its [`key`]), if its entry has not expired at
    /// `now` (unix seconds).
    pub fn get(&self, key: &Key, now: i64) -> Option<Arc<TokenFacts>> {
        // A poisoned lock only means another check panicked mid-insert; the map is still sound.
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        shard.entries.get(key).filter(|e| now < e.expires_at).map(|e| e.facts.clone())
    }

    /// Remembers a verified token until its `exp` + leeway (at most an hour). Tokens without
    /// `kid` or `exp`, or already expired, are not kept.
    pub fn insert(&self, key: Key, facts: &Arc<TokenFacts>, now: i64, leeway: u64) {
        let (true, Some(exp)) = (facts.has_kid, facts.exp.get()) else { return };
        let remaining = exp + leeway as f64 - now as f64;
        if remaining.is_nan() || remaining <= 0.0 {
            return;
        }
        // Whole seconds, rounded up: an entry never outlives the token by more than a second, and
        // the check itself still tests exp on every request.
        let lifetime = remaining.min(MAX_LIFETIME_SECONDS as f64).ceil() as i64;
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        if shard.entries.len() >= self.per_shard && !shard.entries.contains_key(&key) {
            let dropped = shard.make_room(now, self.per_shard);
            self.evictions.inc_by(dropped as u64);
        }
        shard.entries.insert(key, Entry { facts: facts.clone(), expires_at: now + lifetime });
    }

    pub fn entry_count(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len() as u64).sum()
    }
}

impl Shard {
    /// Drops the expired entries; if that frees less than a quarter of the shard, also about half
    /// of the others (chosen by one bit of their digest), so a full shard costs one pass per many
    /// inserts rather than one per insert. The survivors then move to a fresh table made for
    /// `per_shard` entries. Returns how many entries that were still valid it dropped.
    fn make_room(&mut self, now: i64, per_shard: usize) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| now < e.expires_at);
        let valid = self.entries.len();
        if self.entries.len() * 4 > before * 3 {
            self.evictions = self.evictions.wrapping_add(1);
            let bit = self.evictions % 8;
            self.entries.retain(|k, _| k[0] >> bit & 1 == 0);
        }
        // Should that bit have kept them all (a tiny shard can be that unlucky), one more goes.
        if self.entries.len() * 4 > before * 3
            && let Some(k) = self.entries.keys().next().copied()
        {
            self.entries.remove(&k);
        }
        // Removing leaves a tombstone in the table that counts against its capacity until the
        // table is rehashed, and hashbrown rehashes a table more than half full into one twice
        // the size. Left in place, every shard of a cache that keeps evicting doubled after a few
        // evictions: 8 MiB more resident with 100 000 entries (docs/benchmarks.md). Moving the
        // survivors costs one pass over half a shard, once per eviction, like the removal.
        let mut fresh = HashMap::with_capacity(per_shard);
        fresh.extend(self.entries.drain());
        self.entries = fresh;
        valid - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kid: Option<&str>, exp: Option<f64>) -> Arc<TokenFacts> {
        Arc::new(TokenFacts {
            issuer: 0,
            audience_ok: true,
            has_kid: kid.is_some(),
            key: [0; 32],
            sub: Some("s".into()),
            exp: exp.into(),
            nbf: None.into(),
            iat: None.into(),
            jti: None,
        })
    }

    #[test]
    fn entries_are_per_tenant_and_token() {
        let c = TokenCache::new(10, Counter::default()).unwrap();
        c.insert(key("acme", "t1"), &facts(Some("k"), Some(2000.0)), 1000, 60);
        assert!(c.get(&key("acme", "t1"), 1000).is_some());
        assert!(c.get(&key("globex", "t1"), 1000).is_none());
        assert!(c.get(&key("acme", "t2"), 1000).is_none());
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    #[test]
    fn expired_kidless_and_exp_less_tokens_are_not_kept() {
        let c = TokenCache::new(10, Counter::default()).unwrap();
        c.insert(key("acme", "old"), &facts(Some("k"), Some(900.0)), 1000, 60);
        c.insert(key("acme", "nokid"), &facts(None, Some(2000.0)), 1000, 60);
        c.insert(key("acme", "noexp"), &facts(Some("k"), None), 1000, 60);
        assert!(c.get(&key("acme", "old"), 1000).is_none());
        assert!(c.get(&key("acme", "nokid"), 1000).is_none());
        assert!(c.get(&key("acme", "noexp"), 1000).is_none());
        assert_eq!(c.entry_count(), 0);
    }

    #[test]
    fn an_entry_lives_until_exp_plus_leeway_and_at_most_an_hour() {
        let c = TokenCache::new(10, Counter::default()).unwrap();
        c.insert(key("acme", "short"), &facts(Some("k"), Some(1100.0)), 1000, 60);
        assert!(c.get(&key("acme", "short"), 1159).is_some());
        assert!(c.get(&key("acme", "short"), 1160).is_none());
        c.insert(key("acme", "long"), &facts(Some("k"), Some(1_000_000.0)), 1000, 60);
        assert!(c.get(&key("acme", "long"), 1000 + 3599).is_some());
        assert!(c.get(&key("acme", "long"), 1000 + 3600).is_none());
    }

    #[test]
    fn a_full_cache_stays_within_its_bound_and_keeps_working() {
        for max in [10u64, 20_000] {
            let evictions = Counter::default();
            let c = TokenCache::new(max, evictions.clone()).unwrap();
            for i in 0..3 * max {
                c.insert(key("acme", &format!("t{i}")), &facts(Some("k"), Some(2000.0)), 1000, 60);
                assert!(c.entry_count() <= max, "{} entries, max {max}", c.entry_count());
            }
            let last = format!("t{}", 3 * max - 1);
            assert!(c.get(&key("acme", &last), 1000).is_some(), "the newest entry is kept");
            assert!(c.entry_count() > 0);
            // Every valid token that left was counted: none expired, so inserted = kept + evicted.
            assert_eq!(evictions.get() + c.entry_count(), 3 * max);
        }
    }

    #[test]
    fn a_cache_that_keeps_evicting_does_not_grow_its_tables() {
        // 100 000 entries in 16 shards; five times as many distinct tokens go through it.
        let c = TokenCache::new(100_000, Counter::default()).unwrap();
        let made_for = HashMap::<Key, Entry>::with_capacity(c.per_shard).capacity();
        let f = facts(Some("k"), Some(5000.0));
        for i in 0..500_000u32 {
            c.insert(key("acme", &i.to_string()), &f, 1000, 0);
        }
        for (n, shard) in c.shards.iter().enumerate() {
            let capacity = shard.lock().unwrap().entries.capacity();
            assert!(capacity <= made_for, "shard {n}: room for {capacity} entries, made for {made_for}");
        }
        assert!(c.entry_count() <= 100_000);
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let evictions = Counter::default();
        let c = TokenCache::new(4, evictions.clone()).unwrap();
        for i in 0..3 {
            c.insert(key("acme", &format!("old{i}")), &facts(Some("k"), Some(1010.0)), 1000, 0);
        }
        c.insert(key("acme", "fresh"), &facts(Some("k"), Some(5000.0)), 1000, 0);
        // At 1020 the three old entries have expired: room is made from them alone.
        c.insert(key("acme", "new"), &facts(Some("k"), Some(5000.0)), 1020, 0);
        assert!(c.get(&key("acme", "fresh"), 1020).is_some());
        assert!(c.get(&key("acme", "new"), 1020).is_some());
        assert_eq!(c.entry_count(), 2);
        assert_eq!(evictions.get(), 0, "expired entries are not evictions");
    }

    #[test]
    fn disabled_with_zero_entries() {
        assert!(TokenCache::new(0, Counter::default()).is_none());
    }
}
