//! The single table of SPEC §3: every deny reason with its stable code, HTTP status and message.
//!
//! Nothing else in the crate hard-codes a status number or a reason string; the server turns a
//! [`Decision`] into Envoy's `CheckResponse`, `explain` and tests read the same table.

use std::sync::Arc;

/// Why a request was denied. The `code()` strings are a public contract: dashboards, alerts and
/// Envoy access logs match on them, so they never change once released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    MissingTenant,
    UnknownTenant,
    TenantMismatch,
    MissingToken,
    MalformedToken,
    UntrustedIssuer,
    UnsupportedAlgorithm,
    UnknownKey,
    InvalidSignature,
    TokenExpired,
    TokenNotYetValid,
    InvalidAudience,
    MissingSubject,
    UserNotFound,
    UserDisabled,
    TokenRevoked,
    DirectoryUnavailable,
    KeysUnavailable,
    RevocationUnavailable,
    InternalError,
}

impl Reason {
    /// Every reason, in the order the pipeline checks them.
    pub const ALL: [Reason; 20] = [
        Reason::MissingTenant,
        Reason::UnknownTenant,
        Reason::TenantMismatch,
        Reason::MissingToken,
        Reason::MalformedToken,
        Reason::UntrustedIssuer,
        Reason::UnsupportedAlgorithm,
        Reason::UnknownKey,
        Reason::InvalidSignature,
        Reason::TokenExpired,
        Reason::TokenNotYetValid,
        Reason::InvalidAudience,
        Reason::MissingSubject,
        Reason::UserNotFound,
        Reason::UserDisabled,
        Reason::TokenRevoked,
        Reason::DirectoryUnavailable,
        Reason::KeysUnavailable,
        Reason::RevocationUnavailable,
        Reason::InternalError,
    ];

    /// The stable machine-readable code (`x-subguard-reason`, body `code`, metadata `reason`).
    pub const fn code(self) -> &'static str {
        match self {
            Reason::MissingTenant => "missing_tenant",
            Reason::UnknownTenant => "unknown_tenant",
            Reason::TenantMismatch => "tenant_mismatch",
            Reason::MissingToken => "missing_token",
            Reason::MalformedToken => "malformed_token",
            Reason::UntrustedIssuer => "untrusted_issuer",
            Reason::UnsupportedAlgorithm => "unsupported_algorithm",
            Reason::UnknownKey => "unknown_key",
            Reason::InvalidSignature => "invalid_signature",
            Reason::TokenExpired => "token_expired",
            Reason::TokenNotYetValid => "token_not_yet_valid",
            Reason::InvalidAudience => "invalid_audience",
            Reason::MissingSubject => "missing_subject",
            Reason::UserNotFound => "user_not_found",
            Reason::UserDisabled => "user_disabled",
            Reason::TokenRevoked => "token_revoked",
            Reason::DirectoryUnavailable => "directory_unavailable",
            Reason::KeysUnavailable => "keys_unavailable",
            Reason::RevocationUnavailable => "revocation_unavailable",
            Reason::InternalError => "internal_error",
        }
    }

    /// The HTTP status Envoy answers the client with.
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::MissingTenant => 400,
            Reason::UnknownTenant => 404,
            Reason::TenantMismatch | Reason::UserNotFound | Reason::UserDisabled => 403,
            Reason::MissingToken
            | Reason::MalformedToken
            | Reason::UntrustedIssuer
            | Reason::UnsupportedAlgorithm
            | Reason::UnknownKey
            | Reason::InvalidSignature
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::InvalidAudience
            | Reason::MissingSubject
            | Reason::TokenRevoked => 401,
            Reason::DirectoryUnavailable | Reason::KeysUnavailable | Reason::RevocationUnavailable => 503,
            Reason::InternalError => 500,
        }
    }

    /// Seconds a client should wait before retrying, for the 503 reasons (`retry-after`).
    ///
    /// Keys are re-fetched at most every `min_refetch_seconds` (10 s by default), so asking again
    /// sooner rarely helps; a directory blip is usually over within a second.
    pub const fn retry_after_seconds(self) -> Option<u32> {
        match self {
            Reason::DirectoryUnavailable | Reason::RevocationUnavailable => Some(1),
            Reason::KeysUnavailable => Some(5),
            _ => None,
        }
    }

    /// True for reasons that mean "we could not decide" rather than "the request is not allowed".
    pub const fn is_outage(self) -> bool {
        matches!(
            self,
            Reason::DirectoryUnavailable
                | Reason::KeysUnavailable
                | Reason::RevocationUnavailable
                | Reason::InternalError
        )
    }

    /// A human sentence for the response body and `error_description`.
    ///
    /// Messages are built only from fixed text and the tenant name (a validated DNS label from the
    /// config), never from request input, so they can never contain `"` or `\` and never echo a token.
    pub fn message(self, tenant: Option<&str>) -> String {
        let t = tenant.unwrap_or("");
        match self {
            Reason::MissingTenant => "no tenant in the request (header or host)".into(),
            Reason::UnknownTenant => "the tenant is not configured".into(),
            Reason::TenantMismatch => "the tenant sources of the request name different tenants".into(),
            Reason::MissingToken => "no bearer token in the authorization header".into(),
            Reason::MalformedToken => "the bearer token is not a well-formed JWT".into(),
            Reason::UntrustedIssuer => format!("the token issuer is not trusted by tenant {t}"),
            Reason::UnsupportedAlgorithm => "the token algorithm is not allowed for its issuer or key".into(),
            Reason::UnknownKey => "no key of the issuer matches the token kid".into(),
            Reason::InvalidSignature => "the token signature does not verify".into(),
            Reason::TokenExpired => "the token has expired".into(),
            Reason::TokenNotYetValid => "the token is not valid yet".into(),
            Reason::InvalidAudience => "the token audience is not accepted".into(),
            Reason::MissingSubject => "the token has no sub claim".into(),
            Reason::UserNotFound => format!("no user with this sub in tenant {t}"),
            Reason::UserDisabled => format!("the user is disabled in tenant {t}"),
            Reason::TokenRevoked => "the token has been revoked".into(),
            Reason::DirectoryUnavailable => {
                format!("the user directory of tenant {t} is unavailable")
            }
            Reason::KeysUnavailable => "the issuer keys are unavailable".into(),
            Reason::RevocationUnavailable => "the revocation store is unavailable".into(),
            Reason::InternalError => "internal error".into(),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The identity an allowed request carries to the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The directory's id for the user (the sub when the directory has none).
    pub user_id: Arc<str>,
    /// Roles joined by `,`; `None` when the user has no roles.
    pub roles: Option<Arc<str>>,
}

/// What the pipeline concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allow(Identity),
    Deny(Reason),
}

/// The result of one check, with what was learnt on the way (for headers, metadata and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The configured tenant the request belongs to; `None` when unknown or missing.
    pub tenant: Option<Arc<str>>,
    /// The token's `sub`, recorded only once the signature has verified (an unverified sub is
    /// attacker-chosen text and must not reach access logs as if it meant something).
    pub sub: Option<Arc<str>>,
    /// The configured issuer that matched the token's `iss`.
    pub issuer: Option<Arc<str>>,
    /// Extra context for the operator's log line (never sent to the client).
    pub detail: Option<String>,
}

impl Decision {
    pub fn deny(reason: Reason) -> Self {
        Decision { outcome: Outcome::Deny(reason), tenant: None, sub: None, issuer: None, detail: None }
    }

    /// `ok` for an allow, else the reason code.
    pub fn reason_code(&self) -> &'static str {
        match &self.outcome {
            Outcome::Allow(_) => "ok",
            Outcome::Deny(r) => r.code(),
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self.outcome, Outcome::Allow(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            assert!(r.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    #[test]
    fn statuses_follow_the_spec_table() {
        let table = [
            ("missing_tenant", 400),
            ("unknown_tenant", 404),
            ("tenant_mismatch", 403),
            ("missing_token", 401),
            ("malformed_token", 401),
            ("untrusted_issuer", 401),
            ("unsupported_algorithm", 401),
            ("unknown_key", 401),
            ("invalid_signature", 401),
            ("token_expired", 401),
            ("token_not_yet_valid", 401),
            ("invalid_audience", 401),
            ("missing_subject", 401),
            ("user_not_found", 403),
            ("user_disabled", 403),
            ("token_revoked", 401),
            ("directory_unavailable", 503),
            ("keys_unavailable", 503),
            ("revocation_unavailable", 503),
            ("internal_error", 500),
        ];
        assert_eq!(table.len(), Reason::ALL.len());
        for (r, (code, status)) in Reason::ALL.iter().zip(table) {
            assert_eq!(r.code(), code);
            assert_eq!(r.http_status(), status, "{code}");
        }
    }

    #[test]
    fn only_503s_carry_retry_after() {
        for r in Reason::ALL {
            assert_eq!(r.retry_after_seconds().is_some(), r.http_status() == 503, "{r}");
        }
    }

    #[test]
    fn messages_never_contain_quotes_or_backslashes() {
        for r in Reason::ALL {
            let m = r.message(Some("acme"));
            assert!(!m.contains('"') && !m.contains('\\'), "{r}: {m}");
            assert!(!m.is_empty());
        }
    }
}
