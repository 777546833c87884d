//! Which tenant a request belongs to (SPEC §3): from a request header, from the host, and from
//! the route's `context_extensions`. Every source present must agree.
//!
//! Values are lowercased and must be DNS labels; anything else counts as no tenant from that
//! source. Envoy joins a repeated header with commas, so a repeated tenant header is never a label.

use std::borrow::Cow;

use crate::decision::Reason;

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?` — checked on already-lowercased input.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(ok)
        && b.last().is_some_and(ok)
        && b.iter().all(|c| ok(c) || *c == b'-')
}

/// A lowercased tenant label, or `None` if the value is not a DNS label. Borrowed when the value
/// is lowercase already, as it nearly always is.
pub fn normalize(value: &str) -> Option<Cow<'_, str>> {
    if !value.bytes().any(|b| b.is_ascii_uppercase()) {
        return is_dns_label(value).then_some(Cow::Borrowed(value));
    }
    let v = value.to_ascii_lowercase();
    is_dns_label(&v).then_some(Cow::Owned(v))
}

/// A compiled `tenant.host` pattern such as `{tenant}.api.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    prefix: String,
    suffix: String,
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let p = pattern.to_ascii_lowercase();
        let p = p.strip_suffix('.').unwrap_or(&p);
        let Some((prefix, suffix)) = p.split_once("{tenant}") else {
            return Err(format!("`{pattern}` has no {{tenant}} placeholder"));
        };
        if suffix.contains("{tenant}") {
            return Err(format!("`{pattern}` has more than one {{tenant}} placeholder"));
        }
        let valid = |s: &str| {
            s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        };
        if !valid(prefix) || !valid(suffix) {
            return Err(format!(
                "`{pattern}` may contain only a host name (letters, digits, `-`, `.`) around {{tenant}}; no port or scheme"
            ));
        }
        if !(prefix.is_empty() || prefix.ends_with('.')) || !(suffix.is_empty() || suffix.starts_with('.')) {
            return Err(format!("`{pattern}`: {{tenant}} must be a whole DNS label, separated by dots"));
        }
        // Every other label a DNS label too: no empty one (`..`, a leading dot), none too long,
        // none starting or ending with `-`. Such a pattern could only match hosts no DNS name has.
        let labels =
            prefix.strip_suffix('.').into_iter().chain(suffix.strip_prefix('.')).flat_map(|s| s.split('.'));
        for label in labels {
            if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
                return Err(format!(
                    "`{pattern}`: every label around {{tenant}} must be a DNS label (1 to 63 letters, digits \
                     or inner `-`); found `{label}`"
                ));
            }
        }
        Ok(HostPattern { prefix: prefix.to_string(), suffix: suffix.to_string() })
    }

    /// The tenant named by `host` (an `:authority` value: port, case and a trailing dot ignored).
    pub fn tenant<'h>(&self, host: &'h str) -> Option<Cow<'h, str>> {
        let host = strip_port(host)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.len() < self.prefix.len() + self.suffix.len() {
            return None;
        }
        let (head, rest) = host.split_at_checked(self.prefix.len())?;
        let (label, tail) = rest.split_at_checked(rest.len() - self.suffix.len())?;
        if !head.eq_ignore_ascii_case(&self.prefix) || !tail.eq_ignore_ascii_case(&self.suffix) {
            return None;
        }
        normalize(label)
    }
}

/// `host[:port]` → `host`; IPv6 literals and garbage → `None` (an IP is never a tenant).
fn strip_port(authority: &str) -> Option<&str> {
    if authority.starts_with('[') {
        return None;
    }
    match authority.rsplit_once(':') {
        // An empty port is no port (RFC 3986 §3.2.3).
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Some(h),
        Some(_) => None,
        None => Some(authority),
    }
}

/// Where a tenant came from (for logs and `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Host,
    Route,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::Host => "host",
            Source::Route => "route",
        }
    }
}

/// What one source said: the normalised tenant, or `None` (absent or not a DNS label).
pub type Candidate<'a> = (Source, Option<Cow<'a, str>>);

/// What each configured source said, at most one per source, kept inline.
pub struct Candidates<'a> {
    items: [Candidate<'a>; 3],
    len: usize,
}

impl<'a> Candidates<'a> {
    pub fn new() -> Self {
        Candidates { items: [(Source::Header, None), (Source::Host, None), (Source::Route, None)], len: 0 }
    }

    pub fn push(&mut self, source: Source, tenant: Option<Cow<'a, str>>) {
        // One entry per source, and there are three sources.
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = (source, tenant);
            self.len += 1;
        }
    }
}

impl Default for Candidates<'_> {
    fn default() -> Self {
        Candidates::new()
    }
}

impl<'a> std::ops::Deref for Candidates<'a> {
    type Target = [Candidate<'a>];

    fn deref(&self) -> &[Candidate<'a>] {
        &self.items[..self.len]
    }
}

/// Whether a route pinned a value that is no tenant name (a route's source is only present when
/// the route pins something).
pub fn pins_no_tenant(found: &[Candidate<'_>]) -> bool {
    found.iter().any(|(s, t)| *s == Source::Route && t.is_none())
}

/// Combines what each source found: all present must name the same tenant.
///
/// A route's pin is set by the operator, not the client: one that is present but no tenant name
/// (`tenant: ""` from an unset template value, `"acme "`) fails closed, as `tenant_mismatch`
/// beside any other source and `missing_tenant` alone, instead of counting as no pin and leaving
/// the choice to the client's header.
pub fn resolve<'f>(found: &'f [Candidate<'_>]) -> Result<&'f str, Reason> {
    let bad_pin = pins_no_tenant(found);
    let mut tenant: Option<&str> = None;
    for (_, t) in found {
        if let Some(t) = t {
            match tenant {
                None => tenant = Some(t),
                Some(prev) if prev != t => return Err(Reason::TenantMismatch),
                Some(_) => {}
            }
        }
    }
    match tenant {
        Some(_) if bad_pin => Err(Reason::TenantMismatch),
        Some(t) => Ok(t),
        None => Err(Reason::MissingTenant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "acme", "a-b", "a1", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a_b", "Acme", "acme,acme", &"a".repeat(64), "ä", "a b"] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn header_values_are_lowercased_and_validated() {
        assert_eq!(normalize("ACME").as_deref(), Some("acme"));
        assert!(matches!(normalize("acme"), Some(Cow::Borrowed("acme"))));
        assert_eq!(normalize("AC ME"), None);
        assert_eq!(normalize("acme,acme"), None);
        assert_eq!(normalize(" acme"), None);
        assert_eq!(normalize("../acme"), None);
    }

    #[test]
    fn host_pattern_ignores_port_case_and_trailing_dot() {
        let p = HostPattern::parse("{tenant}.api.example.com").unwrap();
        assert_eq!(p.tenant("acme.api.example.com").as_deref(), Some("acme"));
        assert_eq!(p.tenant("ACME.Api.Example.COM:8443").as_deref(), Some("acme"));
        assert_eq!(p.tenant("acme.api.example.com.").as_deref(), Some("acme"));
        assert_eq!(p.tenant("acme.api.example.com.:443").as_deref(), Some("acme"));
        assert_eq!(p.tenant("api.example.com"), None);
        assert_eq!(p.tenant(".api.example.com"), None);
        assert_eq!(p.tenant("a.b.api.example.com"), None);
        assert_eq!(p.tenant("acme.api.example.org"), None);
        assert_eq!(p.tenant("acme.api.example.com:"), Some("acme".into()));
        assert_eq!(p.tenant("acme.api.example.com:x"), None);
        assert_eq!(p.tenant("acme.api.example.com::443"), None);
        assert_eq!(p.tenant("[::1]:8080"), None);
        assert_eq!(p.tenant("xn--bcher-kva.api.example.com").as_deref(), Some("xn--bcher-kva"));
        assert_eq!(p.tenant("bücher.api.example.com"), None);
    }

    #[test]
    fn host_pattern_in_the_middle_and_errors() {
        let p = HostPattern::parse("api.{tenant}.example.com").unwrap();
        assert_eq!(p.tenant("api.globex.example.com").as_deref(), Some("globex"));
        assert!(HostPattern::parse("api.example.com").is_err());
        assert!(HostPattern::parse("{tenant}.{tenant}.com").is_err());
        assert!(HostPattern::parse("x{tenant}.example.com").is_err());
        assert!(HostPattern::parse("{tenant}.example.com:8080").is_err());
        for bad in [".{tenant}.example.com", "{tenant}..example.com", "{tenant}.-x.com", "a..{tenant}.com"] {
            assert!(HostPattern::parse(bad).unwrap_err().contains("must be a DNS label"), "{bad}");
        }
        let long = format!("{{tenant}}.{}.com", "a".repeat(64));
        assert!(HostPattern::parse(&long).is_err());
        assert!(
            HostPattern::parse("{tenant}").is_ok() && HostPattern::parse("api.{tenant}.example.com.").is_ok()
        );
    }

    #[test]
    fn sources_must_agree() {
        let s = |h: Option<&str>, o: Option<&str>| {
            resolve(&[(Source::Header, h.map(Cow::Borrowed)), (Source::Host, o.map(Cow::Borrowed))])
                .map(str::to_string)
        };
        assert_eq!(s(Some("acme"), None), Ok("acme".into()));
        assert_eq!(s(None, Some("acme")), Ok("acme".into()));
        assert_eq!(s(Some("acme"), Some("acme")), Ok("acme".into()));
        assert_eq!(s(Some("acme"), Some("globex")), Err(Reason::TenantMismatch));
        assert_eq!(s(None, None), Err(Reason::MissingTenant));
        // A route's pin that is no tenant name (None here) fails closed.
        let pinned = |h: Option<&str>| {
            resolve(&[(Source::Header, h.map(Cow::Borrowed)), (Source::Route, None)]).map(str::to_string)
        };
        assert_eq!(pinned(Some("acme")), Err(Reason::TenantMismatch));
        assert_eq!(pinned(None), Err(Reason::MissingTenant));
    }
}
