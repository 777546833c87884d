//! Tenant extraction: `check::tenant::normalize` and `HostPattern::tenant` never panic, and what
//! they return is always a DNS label (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`) taken from the input,
//! or nothing. `resolve` never lets two different tenants through.
//!
//! Input (lossy UTF-8): the whole input is a header value and a host for fixed patterns; when it
//! holds a newline, the first line is also compiled as a `tenant.host` pattern and the rest is a
//! host matched against it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use subguard::check::tenant::{HostPattern, Source, is_dns_label, normalize, resolve};
use subguard::decision::Reason;

/// The spec's label rule, written independently of the code under test.
fn label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || c == b'-')
}

const PATTERNS: [&str; 4] =
    ["{tenant}.api.example.com", "api.{tenant}.example.com", "{tenant}", "{tenant}.a."];

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    let input = input.as_ref();

    let header = normalize(input);
    if let Some(t) = &header {
        assert!(label(t), "normalize returned a non-label {t:?} for {input:?}");
        assert!(is_dns_label(t));
        assert_eq!(*t, input.to_ascii_lowercase(), "normalize changed more than case");
    } else {
        assert!(!label(&input.to_ascii_lowercase()), "normalize refused the label {input:?}");
    }

    let mut from_host = None;
    for pattern in PATTERNS {
        let p = HostPattern::parse(pattern).expect("fixed patterns compile");
        check_host(&p, pattern, input);
        if from_host.is_none() {
            from_host = p.tenant(input);
        }
    }

    if let Some((pattern, host)) = input.split_once('\n')
        && let Ok(p) = HostPattern::parse(pattern)
    {
        check_host(&p, pattern, host);
    }

    // Combining sources: a result is always one of the inputs, and different inputs never pass.
    let found = [(Source::Header, header.clone()), (Source::Host, from_host.clone())];
    match resolve(&found) {
        Ok(t) => {
            assert!(label(&t));
            assert!(Some(t) == header.as_deref() || Some(t) == from_host.as_deref());
            if let (Some(h), Some(o)) = (&header, &from_host) {
                assert_eq!(h, o, "two different tenants resolved to {t:?}");
            }
        }
        Err(Reason::TenantMismatch) => {
            assert!(header.is_some() && from_host.is_some() && header != from_host)
        }
        Err(Reason::MissingTenant) => assert!(header.is_none() && from_host.is_none()),
        Err(other) => panic!("resolve failed with {other:?}"),
    }
});

/// A tenant found in `host` is a label, and `host` (case, port and one trailing dot aside) is
/// exactly the pattern with the tenant in place of `{tenant}`.
fn check_host(p: &HostPattern, pattern: &str, host: &str) {
    let Some(t) = p.tenant(host) else { return };
    assert!(label(&t), "pattern {pattern:?} found the non-label {t:?} in {host:?}");
    let pattern = pattern.to_ascii_lowercase();
    let pattern = pattern.strip_suffix('.').unwrap_or(&pattern);
    let expected = pattern.replacen("{tenant}", &t, 1);
    let mut h = host.to_ascii_lowercase();
    if let Some((name, port)) = h.rsplit_once(':') {
        // `port = *DIGIT` (RFC 3986 §3.2.3): an empty port is the default one.
        assert!(port.bytes().all(|b| b.is_ascii_digit()), "bad port accepted: {host:?}");
        h = name.to_string();
    }
    let h = h.strip_suffix('.').unwrap_or(&h);
    assert_eq!(h, expected, "pattern {pattern:?} took {t:?} from {host:?}");
}
