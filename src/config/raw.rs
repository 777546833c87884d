//! The YAML schema exactly as users write it (SPEC §2): plain serde structs, unknown keys refused.
//!
//! Nothing here is validated beyond types; `config::load` turns these into typed runtime values.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub grpc: Option<String>,
    #[serde(default, deserialize_with = "address_or_off")]
    pub admin: Option<String>,
}

/// An address, or `off`: YAML 1.1 reads an unquoted `off` (and `no`, `false`) as the boolean
/// false, which means the same here.
fn address_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct AddressOrOff;
    impl serde::de::Visitor<'_> for AddressOrOff {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an ip:port address, or \"off\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            match v {
                false => Ok(Some("off".to_string())),
                true => Err(E::invalid_value(serde::de::Unexpected::Bool(true), &self)),
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(AddressOrOff)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSource {
    pub header: Option<String>,
    pub host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Token {
    pub max_bytes: usize,
    pub leeway_seconds: u64,
    /// Verified tokens remembered (0 disables the cache).
    pub cache_max_entries: u64,
}

impl Default for Token {
    fn default() -> Self {
        Token { max_bytes: 8192, leeway_seconds: 60, cache_max_entries: 100_000 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keys {
    pub refresh_seconds: u64,
    pub min_refetch_seconds: u64,
    /// Timeout of one JWKS or discovery request.
    pub fetch_timeout_ms: u64,
    /// How long a check waits for a key fetch it needs.
    pub check_wait_ms: u64,
}

impl Default for Keys {
    fn default() -> Self {
        Keys { refresh_seconds: 300, min_refetch_seconds: 10, fetch_timeout_ms: 5000, check_wait_ms: 400 }
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    pub ttl_seconds: Option<u64>,
    pub negative_ttl_seconds: Option<u64>,
    pub stale_if_error_seconds: Option<u64>,
    pub max_entries: Option<u64>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    pub kind: String,
    /// `file`: the users file.
    pub path: Option<String>,
    /// `http`: the URL template; `scim`: the SCIM base URL.
    pub url: Option<String>,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    /// Request headers, each from a literal, a file or an environment variable.
    pub headers: Option<std::collections::BTreeMap<String, HeaderSource>>,
    /// PEM bundle of extra trusted CA certificates.
    pub ca_file: Option<String>,
    pub max_response_bytes: Option<usize>,
    /// `file`: longest users file read (a longer one is refused).
    pub max_file_bytes: Option<u64>,
    /// `scim`: `userName` (default), `externalId` or `id`.
    #[serde(rename = "match")]
    pub match_by: Option<String>,
    /// `scim`: `groups` (default, `groups[].display`) or `roles` (`roles[].value`).
    pub roles_from: Option<String>,
    /// Sub normalisation before lookup: `trim`, `lowercase`.
    pub normalize: Option<Vec<String>>,
    pub breaker: Option<Breaker>,
    pub cache: Option<Cache>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderSource {
    pub value: Option<String>,
    pub from_file: Option<String>,
    pub from_env: Option<String>,
    /// Prepended to the value, e.g. `"Bearer "`.
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    pub failure_threshold: Option<u32>,
    pub cooldown_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Forward {
    pub tenant_header: String,
    pub user_header: String,
    pub roles_header: String,
    pub strip_authorization: bool,
}

impl Default for Forward {
    fn default() -> Self {
        Forward {
            tenant_header: "x-tenant-id".into(),
            user_header: "x-user-id".into(),
            roles_header: "x-user-roles".into(),
            strip_authorization: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub issuers: Vec<Issuer>,
    pub directory: Option<Directory>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Option<Vec<String>>,
    pub jwks_file: Option<String>,
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub discovery: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// `redis://`, `rediss://` (TLS) or `unix://` / `redis+unix://`.
    pub redis_url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM bundle of the CA that signed the Redis server's certificate (`rediss://`).
    pub ca_file: Option<String>,
    pub key_prefix: Option<String>,
    pub channel: Option<String>,
    /// How long a "this jti is not revoked" answer is reused locally.
    pub jti_cache_ms: Option<u64>,
    /// Timeout of one Redis command (and of connecting).
    pub timeout_ms: Option<u64>,
    /// Deny (`revocation_unavailable`) instead of allowing when Redis cannot be asked.
    pub fail_closed: Option<bool>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    /// The subscriber pings Redis this often to notice a dead connection.
    pub ping_seconds: Option<u64>,
    /// How long an event's verdict (deleted, disabled, tokens revoked) overrides the directory.
    pub event_hold_seconds: Option<u64>,
}

/// A secret given inline, from a file or from an environment variable (exactly one).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    pub value: Option<String>,
    pub from_file: Option<String>,
    pub from_env: Option<String>,
}

/// One user of the users file (`directory.kind: file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUser {
    pub sub: String,
    pub id: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    pub tokens_valid_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    pub otlp_endpoint: String,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}
