//! The verified-token cache: a token whose signature verified for a tenant is remembered (by a
//! SHA-256 of tenant and token) with what verification established, so the next check of the same
//! token skips parsing and the signature. Everything that depends on the clock (exp, nbf, iat) or
//! the directory (the user, disabled, tokens_valid_after) is still checked on every request.
//!
//! An entry lives until the token expires (plus leeway), at most an hour, and is only used while
//! the issuer still publishes the very key that verified it (same `kid`, same key material), so
//! removing or replacing a key in the JWKS stops its tokens at the next refresh. Only tokens with a `kid` are cached. The cache belongs to one
//! policy: a reload starts empty. Tokens that fail verification are never cached, so an attacker
//! cannot fill it with forgeries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use moka::Expiry;
use moka::sync::Cache;

use super::Tenant;

/// What signature verification established about a token.
#[derive(Debug)]
pub struct TokenFacts {
    /// Index of the matched issuer in the tenant's issuers.
    pub issuer: usize,
    pub kid: Option<String>,
    /// Fingerprint of the key that verified the signature.
    pub key: [u8; 32],
    /// `aud` holds one of the issuer's audiences.
    pub audience_ok: bool,
    pub sub: Option<String>,
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
    pub iat: Option<f64>,
    /// The token's id, checked against the fleet's revoked `jti`s (`revocation:`).
    pub jti: Option<String>,
}

impl TokenFacts {
    /// Whether the very key that verified this token is still published by its issuer under the
    /// same `kid` (a key replaced under its old `kid` is a different key).
    pub fn still_verifiable(&self, tenant: &Tenant) -> bool {
        let (Some(issuer), Some(kid)) = (tenant.issuers.get(self.issuer), self.kid.as_deref()) else {
            return false;
        };
        issuer.keys.current().is_some_and(|set| {
            set.keys.iter().any(|k| k.kid.as_deref() == Some(kid) && k.fingerprint == self.key)
        })
    }
}

/// Longest an entry is kept, whatever the token's `exp`.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);

type Key = [u8; 32];

struct Entry {
    facts: Arc<TokenFacts>,
    lifetime: Duration,
}

impl Clone for Entry {
    fn clone(&self) -> Self {
        Entry { facts: self.facts.clone(), lifetime: self.lifetime }
    }
}

struct UntilExpiry;

impl Expiry<Key, Entry> for UntilExpiry {
    fn expire_after_create(&self, _: &Key, e: &Entry, _: Instant) -> Option<Duration> {
        Some(e.lifetime)
    }
}

pub struct TokenCache {
    entries: Cache<Key, Entry>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.entries.entry_count()).finish()
    }
}

fn key(tenant: &str, token: &str) -> Key {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(tenant.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl TokenCache {
    /// `None` when `max_entries` is 0 (cache disabled).
    pub fn new(max_entries: u64) -> Option<TokenCache> {
        (max_entries > 0).then(|| TokenCache {
            entries: Cache::builder().max_capacity(max_entries).expire_after(UntilExpiry).build(),
        })
    }

    pub fn get(&self, tenant: &str, token: &str) -> Option<Arc<TokenFacts>> {
        self.entries.get(&key(tenant, token)).map(|e| e.facts)
    }

    /// Remembers a verified token until its `exp` + leeway (at most an hour). Tokens without
    /// `kid` or `exp`, or already expired, are not kept.
    pub fn insert(&self, tenant: &str, token: &str, facts: &Arc<TokenFacts>, now: i64, leeway: u64) {
        let (Some(_), Some(exp)) = (facts.kid.as_ref(), facts.exp) else { return };
        let remaining = exp + leeway as f64 - now as f64;
        if remaining.is_nan() || remaining <= 0.0 {
            return;
        }
        let lifetime = Duration::from_secs_f64(remaining.min(MAX_LIFETIME.as_secs_f64()));
        self.entries.insert(key(tenant, token), Entry { facts: facts.clone(), lifetime });
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kid: Option<&str>, exp: Option<f64>) -> Arc<TokenFacts> {
        Arc::new(TokenFacts {
            issuer: 0,
            kid: kid.map(String::from),
            key: [0; 32],
            audience_ok: true,
            sub: Some("s".into()),
            exp,
            nbf: None,
            iat: None,
            jti: None,
        })
    }

    #[test]
    fn entries_are_per_tenant_and_token() {
        let c = TokenCache::new(10).unwrap();
        c.insert("acme", "t1", &facts(Some("k"), Some(2000.0)), 1000, 60);
        assert!(c.get("acme", "t1").is_some());
        assert!(c.get("globex", "t1").is_none());
        assert!(c.get("acme", "t2").is_none());
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    #[test]
    fn expired_kidless_and_exp_less_tokens_are_not_kept() {
        let c = TokenCache::new(10).unwrap();
        c.insert("acme", "old", &facts(Some("k"), Some(900.0)), 1000, 60);
        c.insert("acme", "nokid", &facts(None, Some(2000.0)), 1000, 60);
        c.insert("acme", "noexp", &facts(Some("k"), None), 1000, 60);
        assert!(c.get("acme", "old").is_none());
        assert!(c.get("acme", "nokid").is_none());
        assert!(c.get("acme", "noexp").is_none());
    }

    #[test]
    fn disabled_with_zero_entries() {
        assert!(TokenCache::new(0).is_none());
    }
}
