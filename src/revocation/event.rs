//! The messages on the revocation channel: one JSON object per message (docs/revocation.md).
//!
//! ```json
//! {"type":"user.deleted","tenant":"acme","sub":"alice"}
//! {"type":"user.disabled","tenant":"acme","sub":"alice"}
//! {"type":"user.updated","tenant":"acme","sub":"alice"}
//! {"type":"user.tokens_revoked","tenant":"acme","sub":"alice","tokens_valid_after":1763900000}
//! {"type":"token.revoked","jti":"4f1c…","exp":1763903600}
//! ```
//!
//! Unknown fields are ignored (publishers may add their own, such as `at` or `by`); a message
//! that is not one of these shapes is counted and logged, never applied.

use serde::{Deserialize, Serialize};

use crate::check::tenant::is_dns_label;

/// Messages longer than this are refused unread.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

/// Longest `sub` or `jti` accepted (a token is at most `token.max_bytes` anyway).
pub const MAX_ID_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// The user no longer exists: `user_not_found` at once, whatever the caches hold.
    #[serde(rename = "user.deleted")]
    UserDeleted { tenant: String, sub: String },
    /// The user is disabled: `user_disabled` at once.
    #[serde(rename = "user.disabled")]
    UserDisabled { tenant: String, sub: String },
    /// The user changed (roles, id, re-enabled, re-created): forget cached answers and any earlier
    /// event about this user, and ask the directory again.
    #[serde(rename = "user.updated")]
    UserUpdated { tenant: String, sub: String },
    /// Every token of the user issued (`iat`) before `tokens_valid_after` is revoked.
    #[serde(rename = "user.tokens_revoked")]
    UserTokensRevoked { tenant: String, sub: String, tokens_valid_after: i64 },
    /// One token, by `jti`, until its `exp`.
    #[serde(rename = "token.revoked")]
    TokenRevoked { jti: String, exp: i64 },
}

impl Event {
    /// The `type` field, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::UserDeleted { .. } => "user.deleted",
            Event::UserDisabled { .. } => "user.disabled",
            Event::UserUpdated { .. } => "user.updated",
            Event::UserTokensRevoked { .. } => "user.tokens_revoked",
            Event::TokenRevoked { .. } => "token.revoked",
        }
    }

    /// The (tenant, sub) a user event names.
    pub fn user(&self) -> Option<(&str, &str)> {
        match self {
            Event::UserDeleted { tenant, sub }
            | Event::UserDisabled { tenant, sub }
            | Event::UserUpdated { tenant, sub }
            | Event::UserTokensRevoked { tenant, sub, .. } => Some((tenant, sub)),
            Event::TokenRevoked { .. } => None,
        }
    }

    /// Parses and validates one message.
    pub fn parse(payload: &[u8]) -> Result<Event, String> {
        if payload.len() > MAX_EVENT_BYTES {
            return Err(format!("{} bytes, over the {MAX_EVENT_BYTES}-byte limit", payload.len()));
        }
        let event: Event = crate::strict::object_from_slice(payload).map_err(|e| e.to_string())?;
        event.validate()?;
        Ok(event)
    }

    /// Checks what serde cannot: names that could be a tenant, non-empty bounded ids.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = |what: &str, v: &str| -> Result<(), String> {
            if v.is_empty() {
                Err(format!("`{what}` is empty"))
            } else if v.len() > MAX_ID_BYTES {
                Err(format!("`{what}` is longer than {MAX_ID_BYTES} bytes"))
            } else {
                Ok(())
            }
        };
        match self {
            Event::TokenRevoked { jti, .. } => id_ok("jti", jti),
            _ => {
                let (tenant, sub) = self.user().unwrap_or_default();
                if !is_dns_label(tenant) {
                    return Err("`tenant` is not a tenant name (a lowercase DNS label)".into());
                }
                id_ok("sub", sub)
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_shape() {
        let cases = [
            (r#"{"type":"user.deleted","tenant":"acme","sub":"alice"}"#, "user.deleted"),
            (r#"{"type":"user.disabled","tenant":"acme","sub":"alice","at":17}"#, "user.disabled"),
            (r#"{"type":"user.updated","tenant":"acme","sub":"alice"}"#, "user.updated"),
            (
                r#"{"type":"user.tokens_revoked","tenant":"acme","sub":"a","tokens_valid_after":5}"#,
                "user.tokens_revoked",
            ),
            (r#"{"type":"token.revoked","jti":"j-1","exp":1763903600}"#, "token.revoked"),
        ];
        for (text, kind) in cases {
            let e = Event::parse(text.as_bytes()).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(e.kind(), kind);
            assert_eq!(Event::parse(e.to_json().as_bytes()), Ok(e), "round trip of {text}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_apply_safely() {
        for bad in [
            "not json",
            r#"{"type":"user.exploded","tenant":"acme","sub":"a"}"#,
            r#"{"type":"user.deleted","tenant":"ACME","sub":"a"}"#,
            r#"{"type":"user.deleted","tenant":"acme","sub":""}"#,
            r#"{"type":"user.deleted","sub":"a"}"#,
            r#"{"type":"user.tokens_revoked","tenant":"acme","sub":"a"}"#,
            r#"{"type":"user.tokens_revoked","tenant":"acme","sub":"a","tokens_valid_after":"yesterday"}"#,
            r#"{"type":"token.revoked","jti":"","exp":1}"#,
            r#"{"type":"token.revoked","jti":"j"}"#,
            r#"["user.deleted"]"#,
            // serde alone reads an internally tagged enum from a list: the tag, then the fields.
            r#"["user.deleted", "acme", "alice"]"#,
            r#"["token.revoked", "j-1", 1763903600]"#,
        ] {
            assert!(Event::parse(bad.as_bytes()).is_err(), "{bad} was accepted");
        }
        let huge = format!(r#"{{"type":"user.deleted","tenant":"acme","sub":"{}"}}"#, "a".repeat(20_000));
        assert!(Event::parse(huge.as_bytes()).is_err());
    }
}
