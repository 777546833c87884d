//! Configuration: reads the YAML file once into the serde schema of [`raw`], then turns it into
//! typed runtime values ([`Config`]): compiled host patterns, parsed keys, parsed users, resolved
//! paths. Every problem found is reported with the YAML path it concerns, and all of them are
//! reported at once, so `subguard validate` can list them one per line.
//!
//! This module reads files (the config, key files, users files) but never touches the network:
//! what it accepts is exactly what `validate` can check offline.

pub mod raw;
pub mod read;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::check::tenant::{HostPattern, is_dns_label};
use crate::directory::breaker::BreakerSettings;
use crate::directory::file::UsersFile;
use crate::directory::http::{HttpSettings, UrlTemplate};
use crate::directory::scim::{RolesFrom, ScimMatch};
use crate::keys::{KeySet, url_is_allowed};

/// One configuration problem: where (a YAML path such as `tenants.acme.issuers[0].jwks_file`)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

/// One error is one line (`validate` prints one per line, logs carry one per field): control
/// characters from the YAML (a key or path with a newline) are shown escaped, never written.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write_escaped(f, &self.path)?;
            f.write_str(": ")?;
        }
        write_escaped(f, &self.message)
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
}

/// A YAML parser's error as one line: the position and what is wrong, without the source
/// excerpt it draws under it or advice addressed to the program using the parser.
pub fn yaml_error(e: &impl fmt::Display) -> String {
    let text = e.to_string();
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = first.split(", set DuplicateKeyPolicy").next().unwrap_or(first);
    let first = first.split("; use from_str_multiple").next().unwrap_or(first);
    format!("invalid YAML: {first}")
}

/// Where the gRPC listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub grpc: ListenAddr,
    pub admin: Option<SocketAddr>,
}

/// Where a request's tenant comes from (besides a route's `context_extensions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSources {
    /// Lowercased request header name.
    pub header: Option<String>,
    pub host: Option<HostPattern>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSettings {
    pub max_bytes: usize,
    pub leeway_seconds: u64,
    pub cache_max_entries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySettings {
    pub refresh: Duration,
    pub min_refetch: Duration,
    pub fetch_timeout: Duration,
    /// How long a check waits for the key fetch its unknown `kid` (or an issuer without keys)
    /// started; the fetch itself goes on for up to `fetch_timeout`.
    pub check_wait: Duration,
}

/// Headers set on allowed requests (all lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub tenant_header: String,
    pub user_header: String,
    pub roles_header: String,
    pub strip_authorization: bool,
}

/// OTLP/HTTP trace export (cargo feature `otel`).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The traces URL (`/v1/traces` added when only a base URL is given).
    pub otlp_endpoint: String,
    pub service_name: String,
    /// Share of traces sampled when the caller did not decide (parent-based sampling otherwise).
    pub sample_ratio: f64,
}

/// How `directory_unavailable`, `keys_unavailable` and `internal_error` reach Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageResponse {
    /// A denial with the 503/500 response (default): the client sees subguard's reason.
    Deny,
    /// `CheckResponse.error_response` (Envoy >= 1.37): Envoy treats it as an authorization-service
    /// error and applies `failure_mode_allow` / `status_on_error`.
    Error,
}

/// A secret that never reaches a log line or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Fleet-wide revocation through Redis (SPEC §5, docs/revocation.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// The URL as written, with any password replaced by `***` (for logs).
    pub display_url: String,
    /// The URL as written (may carry credentials).
    pub url: Redacted,
    pub username: Option<String>,
    pub password: Option<Redacted>,
    pub ca_pem: Option<Vec<u8>>,
    pub key_prefix: String,
    pub channel: String,
    pub jti_cache: Duration,
    pub timeout: Duration,
    pub fail_closed: bool,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub ping_interval: Duration,
    pub event_hold: Duration,
}

impl RevocationSettings {
    /// The Redis key that marks `jti` revoked.
    pub fn jti_key(&self, jti: &str) -> String {
        format!("{}revoked:{jti}", self.key_prefix)
    }
}

/// Where an issuer's verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A JWKS on disk; parsed at load time (so `validate` checks it), re-read on an unknown `kid`.
    File { path: PathBuf, initial: Arc<KeySet> },
    /// A JWKS over HTTP(S).
    Uri(String),
    /// OIDC discovery from the issuer URL.
    Discovery,
}

impl KeySource {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::File { .. } => "file",
            KeySource::Uri(_) => "uri",
            KeySource::Discovery => "discovery",
        }
    }
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub keys: KeySource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
    pub max_entries: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(300),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryKind {
    /// The users file, held in memory.
    File { path: PathBuf, users: Arc<UsersFile> },
    /// `GET` a URL template per lookup.
    Http { url: UrlTemplate, http: HttpSettings },
    /// SCIM 2.0.
    Scim { base: String, match_by: ScimMatch, roles_from: RolesFrom, http: HttpSettings },
}

/// Optional `sub` normalisation before a directory lookup. Off by default: a directory that stores
/// `Alice` and an IdP that mints `alice` should be fixed at the source, but when that cannot be
/// done this avoids a false `user_not_found`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Normalize {
    pub trim: bool,
    pub lowercase: bool,
}

impl Normalize {
    pub fn apply<'a>(&self, sub: &'a str) -> std::borrow::Cow<'a, str> {
        let s = if self.trim { sub.trim() } else { sub };
        if self.lowercase && s.chars().any(char::is_uppercase) {
            std::borrow::Cow::Owned(s.to_lowercase())
        } else {
            std::borrow::Cow::Borrowed(s)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// Which directory of the config this is: its YAML path, `directory` for the top-level one
    /// (shared by every tenant without its own), `tenants.<name>.directory` for a tenant's own.
    /// The name can't tell the two apart: a tenant may be called `default`.
    pub path: String,
    /// `default` for the top-level directory, else the tenant's name (metrics, logs).
    pub name: String,
    pub kind: DirectoryKind,
    pub cache: CacheSettings,
    pub breaker: BreakerSettings,
    pub normalize: Normalize,
}

impl DirectoryConfig {
    /// Whether `other` asks the same directory the same way: same path, kind, URL, SCIM matching
    /// and normalisation (timeouts, headers, TLS, breaker and cache settings may differ). Users
    /// cached by one are users of the other.
    pub fn same_source(&self, other: &DirectoryConfig) -> bool {
        let kind = match (&self.kind, &other.kind) {
            (DirectoryKind::Http { url: a, .. }, DirectoryKind::Http { url: b, .. }) => a == b,
            (
                DirectoryKind::Scim { base: a, match_by: ma, roles_from: ra, .. },
                DirectoryKind::Scim { base: b, match_by: mb, roles_from: rb, .. },
            ) => a == b && ma == mb && ra == rb,
            _ => false,
        };
        kind && self.path == other.path && self.normalize == other.normalize
    }
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub issuers: Vec<IssuerConfig>,
    pub directory: DirectoryConfig,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, as given.
    pub path: PathBuf,
    pub listen: Listen,
    pub tenant_sources: TenantSources,
    pub token: TokenSettings,
    pub keys: KeySettings,
    pub shutdown_grace: Duration,
    /// Checks beyond this many in flight are refused at once (`RESOURCE_EXHAUSTED`; Envoy then
    /// applies `status_on_error`) instead of queueing without bound.
    pub max_in_flight: usize,
    pub forward: Forward,
    pub outage_response: OutageResponse,
    /// OpenTelemetry trace export; `None` when not configured.
    pub tracing: Option<TracingSettings>,
    /// Redis revocation; `None` when not configured.
    pub revocation: Option<RevocationSettings>,
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Further files the config read (header secrets, CA bundles): watched for reload.
    pub extra_files: Vec<PathBuf>,
    /// Problems that do not stop the config from working (a skipped JWKS key, users of a tenant
    /// that is not configured): printed by `validate`, logged by `serve`.
    pub warnings: Vec<ConfigError>,
}

/// Parses a JWS `alg` name into one of the supported public-key algorithms.
///
/// HMAC is deliberately absent: a shared secret cannot be published in a JWKS, and accepting HS*
/// next to public keys is the classic key-confusion hole. `none` is absent for the obvious reason.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        // RFC 9864's fully-specified name for EdDSA on Ed25519, the only EdDSA curve subguard
        // verifies: the same algorithm under either name.
        "EdDSA" | "Ed25519" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// Reads and validates the config file at `path`, with every file it names.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = read::any_text(path, read::CONFIG_MAX_BYTES).map_err(|e| {
        vec![ConfigError::new("", format!("cannot read config file {}: {e}", path.display()))]
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    from_yaml(&text, path, &base)
}

/// Validates config text; relative paths resolve against `base`.
pub fn from_yaml(text: &str, path: &Path, base: &Path) -> Result<Config, Vec<ConfigError>> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| vec![ConfigError::new("", yaml_error(&e))])?;
    Loader { base: base.to_path_buf(), errors: Vec::new(), warnings: Vec::new(), extra_files: Vec::new() }
        .load(doc, path)
}

/// Users files already read while loading one config, by path and size limit: directories naming
/// the same file share one parsed copy.
type UsersCache = BTreeMap<(PathBuf, u64), Option<Arc<UsersFile>>>;

struct Loader {
    base: PathBuf,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    extra_files: Vec<PathBuf>,
}

/// Headers that frame or route the request, or that Envoy and subguard set themselves: an identity
/// written into one would corrupt the request (`content-length`) or be taken for something else.
fn is_reserved_header(name: &str) -> bool {
    const RESERVED: [&str; 13] = [
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
        "x-forwarded-for",
        "x-subguard-reason",
    ];
    RESERVED.contains(&name) || name.starts_with("x-envoy-")
}

/// `token.leeway_seconds` above this is refused: it would keep tokens alive for hours past `exp`.
const MAX_LEEWAY_SECONDS: u64 = 3600;
/// ... and above this it is accepted with a warning.
const LEEWAY_WARN_SECONDS: u64 = 300;

const TOP_LEVEL_KEYS: [&str; 12] = [
    "listen",
    "tenant",
    "token",
    "keys",
    "shutdown_grace_seconds",
    "directory",
    "forward",
    "tenants",
    "revocation",
    "outage_response",
    "tracing",
    "max_in_flight_checks",
];

impl Loader {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Deserializes one section, recording a path-qualified error on failure.
    fn section<T: DeserializeOwned>(&mut self, prefix: &str, value: Value) -> Option<T> {
        deserialize_at(prefix, value).map_err(|e| self.errors.push(e)).ok()
    }

    /// The file `p` names, resolved against the config's folder; `None` (reported at `at`) when
    /// `p` is empty, which would name the folder itself. Errors about the file show this resolved
    /// path, as the users file's do, so `no such file: keys.json` never sends anyone looking in
    /// their current folder.
    fn file_path(&mut self, at: String, p: &str) -> Option<PathBuf> {
        if p.trim().is_empty() {
            self.err(at, "must name a file, not be empty");
            return None;
        }
        Some(self.resolve(p))
    }

    /// The PEM of `{p}.ca_file` (watched for reloads), or `None` with its error reported.
    fn ca_file(&mut self, p: &str, f: &str) -> Option<Vec<u8>> {
        let path = self.file_path(format!("{p}.ca_file"), f)?;
        self.extra_files.push(path.clone());
        read::file(&path, read::SMALL_FILE_MAX_BYTES)
            .map_err(|e| self.err(format!("{p}.ca_file"), format!("{e}: {}", path.display())))
            .ok()
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn load(mut self, doc: Value, path: &Path) -> Result<Config, Vec<ConfigError>> {
        let mut top = match doc {
            Value::Object(m) => m,
            Value::Null => {
                return Err(vec![ConfigError::new("", "the config file is empty")]);
            }
            _ => return Err(vec![ConfigError::new("", "the config must be a YAML mapping")]),
        };
        let keys: Vec<String> = top.keys().cloned().collect();
        for k in keys {
            if !TOP_LEVEL_KEYS.contains(&k.as_str()) {
                self.err(
                    k.clone(),
                    format!("unknown key `{k}`, expected one of {}", TOP_LEVEL_KEYS.join(", ")),
                );
            }
        }
        let mut take = |k: &str| top.remove(k).filter(|v| !v.is_null());

        let listen_raw: raw::Listen =
            take("listen").and_then(|v| self.section("listen", v)).unwrap_or_default();
        // `None` when the section is present but unreadable (already reported).
        let tenant_raw: Option<raw::TenantSource> = match take("tenant") {
            Some(v) => self.section("tenant", v),
            None => Some(raw::TenantSource::default()),
        };
        let token_raw: raw::Token = take("token").and_then(|v| self.section("token", v)).unwrap_or_default();
        let keys_raw: raw::Keys = take("keys").and_then(|v| self.section("keys", v)).unwrap_or_default();
        let max_in_flight: usize = take("max_in_flight_checks")
            .and_then(|v| self.section("max_in_flight_checks", v))
            .unwrap_or(4096);
        if max_in_flight == 0 {
            self.err("max_in_flight_checks", "must be greater than 0");
        }
        let grace: u64 = take("shutdown_grace_seconds")
            .and_then(|v| self.section("shutdown_grace_seconds", v))
            .unwrap_or(10);
        let outage_response = match take("outage_response")
            .and_then(|v| self.section::<String>("outage_response", v))
            .as_deref()
        {
            None | Some("deny") => OutageResponse::Deny,
            Some("error") => OutageResponse::Error,
            Some(other) => {
                self.err("outage_response", format!("unknown `{other}`, expected deny or error"));
                OutageResponse::Deny
            }
        };
        let tracing =
            take("tracing").and_then(|v| self.section::<raw::Tracing>("tracing", v)).and_then(|t| {
                if !cfg!(feature = "otel") {
                    self.err(
                        "tracing",
                        "this build has no OpenTelemetry export (build with the cargo feature `otel`)",
                    );
                    return None;
                }
                let endpoint = match reqwest::Url::parse(&t.otlp_endpoint) {
                    Ok(mut u) if matches!(u.scheme(), "http" | "https") => {
                        if u.path() == "/" || u.path().is_empty() {
                            u.set_path("/v1/traces");
                        }
                        u.to_string()
                    }
                    _ => {
                        self.err(
                            "tracing.otlp_endpoint",
                            format!("`{}` is not an http(s) URL", t.otlp_endpoint),
                        );
                        return None;
                    }
                };
                let sample_ratio = t.sample_ratio.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&sample_ratio) {
                    self.err("tracing.sample_ratio", "must be between 0 and 1");
                }
                Some(TracingSettings {
                    otlp_endpoint: endpoint,
                    service_name: t.service_name.unwrap_or_else(|| "subguard".into()),
                    sample_ratio,
                })
            });
        let forward_raw: raw::Forward =
            take("forward").and_then(|v| self.section("forward", v)).unwrap_or_default();
        // `Some(None)`: given but unreadable (its error is reported), so that tenants which would
        // take it get no directory without a second, misleading "no directory" error each.
        let default_dir_raw: Option<Option<raw::Directory>> =
            take("directory").map(|v| self.section("directory", v));
        let revocation = take("revocation")
            .and_then(|v| self.section::<raw::Revocation>("revocation", v))
            .and_then(|r| self.revocation(r));
        let tenants_raw = take("tenants");

        let listen = self.listen(listen_raw);
        let tenant_sources = match tenant_raw {
            Some(t) => self.tenant_sources(t),
            None => TenantSources { header: None, host: None },
        };
        if token_raw.max_bytes == 0 {
            self.err("token.max_bytes", "must be greater than 0");
        }
        // The leeway widens every token's validity on both ends: a typo (`600000`) must not turn
        // the exp / nbf / iat checks off, and minutes are already generous for clock skew.
        if token_raw.leeway_seconds > MAX_LEEWAY_SECONDS {
            self.err(
                "token.leeway_seconds",
                format!("must be at most {MAX_LEEWAY_SECONDS} (clock skew is seconds, not hours)"),
            );
        } else if token_raw.leeway_seconds > LEEWAY_WARN_SECONDS {
            self.warnings.push(ConfigError::new(
                "token.leeway_seconds",
                format!(
                    "{} s accepts tokens that long after they expire; clock skew rarely needs over {LEEWAY_WARN_SECONDS}",
                    token_raw.leeway_seconds
                ),
            ));
        }
        let token = TokenSettings {
            max_bytes: token_raw.max_bytes,
            leeway_seconds: token_raw.leeway_seconds,
            cache_max_entries: token_raw.cache_max_entries,
        };
        if keys_raw.refresh_seconds == 0 {
            self.err("keys.refresh_seconds", "must be greater than 0");
        }
        if keys_raw.min_refetch_seconds == 0 {
            // The limit is what keeps made-up `kid`s from turning into one key fetch each; 0 is a
            // choice (a local `jwks_file` is cheap to re-read), but worth a word.
            self.warnings.push(ConfigError::new(
                "keys.min_refetch_seconds",
                "0: every token with an unknown kid re-fetches its issuer's keys, however many arrive",
            ));
        }
        for (field, value) in
            [("fetch_timeout_ms", keys_raw.fetch_timeout_ms), ("check_wait_ms", keys_raw.check_wait_ms)]
        {
            if value == 0 {
                self.err(format!("keys.{field}"), "must be greater than 0");
            }
        }
        let keys = KeySettings {
            refresh: Duration::from_secs(keys_raw.refresh_seconds.max(1)),
            min_refetch: Duration::from_secs(keys_raw.min_refetch_seconds),
            fetch_timeout: Duration::from_millis(keys_raw.fetch_timeout_ms.max(1)),
            check_wait: Duration::from_millis(keys_raw.check_wait_ms.max(1)),
        };
        let forward = self.forward(forward_raw);

        let mut users_cache = UsersCache::new();
        let default_dir = default_dir_raw
            .map(|raw| raw.and_then(|d| self.directory("directory", &d, None, &mut users_cache)));

        let mut tenants = BTreeMap::new();
        match tenants_raw {
            None => self.err("tenants", "at least one tenant must be configured"),
            Some(Value::Object(map)) => {
                if map.is_empty() {
                    self.err("tenants", "at least one tenant must be configured");
                }
                for (name, v) in map {
                    let p = format!("tenants.{name}");
                    if !is_dns_label(&name) {
                        self.err(
                            p.clone(),
                            "a tenant name must be a lowercase DNS label ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)",
                        );
                    }
                    let Some(t) = self.section::<raw::Tenant>(&p, v) else { continue };
                    if let Some(tc) = self.tenant(&p, t, default_dir.as_ref(), &mut users_cache) {
                        tenants.insert(name, tc);
                    }
                }
            }
            Some(_) => self.err("tenants", "must be a mapping of tenant name to settings"),
        }

        // Each users file once, however many tenants share it (thousands may).
        let mut files_seen: HashSet<*const UsersFile> = HashSet::new();
        for (name, t) in &tenants {
            if let DirectoryKind::File { path, users } = &t.directory.kind {
                if files_seen.insert(Arc::as_ptr(users)) {
                    let mut unused: Vec<&String> =
                        users.tenants.keys().filter(|k| !tenants.contains_key(*k)).collect();
                    unused.sort_unstable();
                    for other in unused {
                        self.warnings.push(ConfigError::new(
                            path.display().to_string(),
                            format!("users of `{other}` are never used: no such tenant is configured"),
                        ));
                    }
                }
                let listed = users.tenants.get(name);
                if let Some(listed) = listed
                    && t.directory.normalize != Normalize::default()
                {
                    let norm = t.directory.normalize;
                    let mut unmatchable: Vec<&str> =
                        listed.keys().map(|s| &**s).filter(|s| norm.apply(s) != *s).collect();
                    if !unmatchable.is_empty() {
                        unmatchable.sort_unstable();
                        let how = match (norm.trim, norm.lowercase) {
                            (true, true) => "trims and lowercases",
                            (true, false) => "trims",
                            _ => "lowercases",
                        };
                        self.warnings.push(ConfigError::new(
                            path.display().to_string(),
                            format!(
                                "{name}: {} user(s) can never match ({:?}{}): the directory's normalize {how} \
                                 every token's sub before the lookup; write the entries in that form",
                                unmatchable.len(),
                                unmatchable[0],
                                if unmatchable.len() > 1 { ", ..." } else { "" }
                            ),
                        ));
                    }
                }
                if let Some(listed) = listed {
                    let mut spaced: Vec<&str> = listed
                        .values()
                        .map(|u| &*u.id)
                        .filter(|id| crate::directory::has_outer_whitespace(id))
                        .collect();
                    if !spaced.is_empty() {
                        spaced.sort_unstable();
                        self.warnings.push(ConfigError::new(
                            path.display().to_string(),
                            format!(
                                "{name}: {} user(s) without an `id` have a sub that starts or ends with a space or \
                                 tab ({:?}{}); HTTP drops those around a header value, so the upstream would \
                                 see another user: such users are never allowed (internal_error) until they \
                                 have an `id`",
                                spaced.len(),
                                spaced[0],
                                if spaced.len() > 1 { ", ..." } else { "" }
                            ),
                        ));
                    }
                }
                if listed.is_none_or(|users| users.is_empty()) {
                    self.warnings.push(ConfigError::new(
                        format!("tenants.{name}"),
                        format!(
                            "{} lists no users for this tenant: every check will be user_not_found",
                            path.display()
                        ),
                    ));
                }
            }
        }
        self.shared_directory_warnings(&tenants);
        if self.errors.is_empty() {
            Ok(Config {
                path: path.to_path_buf(),
                listen,
                tenant_sources,
                token,
                keys,
                shutdown_grace: Duration::from_secs(grace),
                max_in_flight,
                forward,
                outage_response,
                tracing,
                revocation,
                tenants,
                warnings: self.warnings,
                extra_files: self.extra_files,
            })
        } else {
            Err(self.errors)
        }
    }

    fn listen(&mut self, raw: raw::Listen) -> Listen {
        const MAX_SOCKET_PATH: usize = 107;
        let grpc_text = raw.grpc.unwrap_or_else(|| "127.0.0.1:9191".into());
        let grpc = if let Some(p) = grpc_text.strip_prefix("unix://") {
            if !p.starts_with('/') {
                self.err("listen.grpc", "a unix socket needs an absolute path: unix:///path/to.sock");
            }
            // sockaddr_un's sun_path holds 108 bytes, the closing NUL included (Linux).
            if p.len() > MAX_SOCKET_PATH {
                self.err(
                    "listen.grpc",
                    format!(
                        "the socket path is {} bytes; a Unix socket path can have at most {MAX_SOCKET_PATH}",
                        p.len()
                    ),
                );
            }
            ListenAddr::Unix(PathBuf::from(p))
        } else {
            match grpc_text.parse::<SocketAddr>() {
                Ok(a) => ListenAddr::Tcp(a),
                Err(_) => {
                    self.err("listen.grpc", format!("`{grpc_text}` is neither ip:port nor unix:///path"));
                    ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 9191)))
                }
            }
        };
        let admin_text = raw.admin.unwrap_or_else(|| "127.0.0.1:9192".into());
        let admin = if admin_text.is_empty() || admin_text == "off" {
            None
        } else {
            match admin_text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.err("listen.admin", format!("`{admin_text}` is not ip:port"));
                    None
                }
            }
        };
        // Both on one port would make `serve` fail to bind: say so offline. An unspecified address
        // (0.0.0.0, ::) takes the port on every address.
        if let (ListenAddr::Tcp(g), Some(a)) = (&grpc, admin)
            && g.port() == a.port()
            && g.port() != 0
            && (g.ip() == a.ip() || g.ip().is_unspecified() || a.ip().is_unspecified())
        {
            self.err("listen.admin", format!("`{a}` takes the port of listen.grpc `{g}`"));
        }
        Listen { grpc, admin }
    }

    fn tenant_sources(&mut self, raw: raw::TenantSource) -> TenantSources {
        let header = raw.header.map(|h| {
            let h = h.to_ascii_lowercase();
            if !is_header_name(&h) {
                self.err("tenant.header", format!("`{h}` is not a valid HTTP header name"));
            }
            h
        });
        let host_given = raw.host.is_some();
        let host = raw.host.and_then(|h| match HostPattern::parse(&h) {
            Ok(p) => Some(p),
            Err(msg) => {
                self.err("tenant.host", msg);
                None
            }
        });
        if header.is_none() && !host_given {
            self.err("tenant", "set at least one of `header` and `host`");
        }
        TenantSources { header, host }
    }

    fn forward(&mut self, raw: raw::Forward) -> Forward {
        let mut name = |field: &str, v: String| {
            let v = v.to_ascii_lowercase();
            if !is_header_name(&v) || v.starts_with(':') {
                self.err(format!("forward.{field}"), format!("`{v}` is not a valid HTTP header name"));
            }
            if v == "authorization" || v == "host" || is_reserved_header(&v) {
                self.err(format!("forward.{field}"), format!("`{v}` cannot carry identity"));
            }
            v
        };
        let f = Forward {
            tenant_header: name("tenant_header", raw.tenant_header),
            user_header: name("user_header", raw.user_header),
            roles_header: name("roles_header", raw.roles_header),
            strip_authorization: raw.strip_authorization,
        };
        if f.tenant_header == f.user_header
            || f.tenant_header == f.roles_header
            || f.user_header == f.roles_header
        {
            self.err("forward", "tenant_header, user_header and roles_header must differ");
        }
        f
    }

    /// Warnings about the top-level directory that only the tenants using it can show: a remote
    /// one asked by several tenants without the tenant in its URL answers every tenant from the
    /// same users; and a tenant called `default` with a directory of its own shares the name logs
    /// and metrics give the top-level one.
    fn shared_directory_warnings(&mut self, tenants: &BTreeMap<String, TenantConfig>) {
        let sharing: Vec<&str> = tenants
            .iter()
            .filter(|(_, t)| t.directory.path == "directory")
            .map(|(n, _)| n.as_str())
            .collect();
        let Some(shared) = sharing.first().map(|name| &tenants[*name].directory) else { return };
        let names_tenant = match &shared.kind {
            DirectoryKind::File { .. } => true,
            DirectoryKind::Http { url, .. } => url.names_tenant(),
            DirectoryKind::Scim { base, .. } => base.contains("{tenant}"),
        };
        if !names_tenant && sharing.len() > 1 {
            self.warnings.push(ConfigError::new(
                "directory.url",
                format!(
                    "has no {{tenant}} placeholder but serves {} tenants ({}, ...): each of them is answered \
                     from the same users, so a sub known to one is a user of all. Put {{tenant}} in the URL, \
                     or give each tenant its own directory",
                    sharing.len(),
                    sharing[..2].join(", ")
                ),
            ));
        }
        if tenants.get("default").is_some_and(|t| t.directory.path != "directory") {
            self.warnings.push(ConfigError::new(
                "tenants.default.directory",
                "logs and metrics name this directory `default`, as they name the top-level directory, \
                 which other tenants use: their series (subguard_directory_breaker_state{directory=\"default\"}, \
                 the cache gauges) and log lines cannot be told apart. Users are not mixed",
            ));
        }
    }

    fn directory(
        &mut self,
        p: &str,
        raw: &raw::Directory,
        defaults: Option<&CacheSettings>,
        users_cache: &mut UsersCache,
    ) -> Option<DirectoryConfig> {
        let base = defaults.copied().unwrap_or_default();
        let cache = match &raw.cache {
            None => base,
            Some(c) => {
                let cache = CacheSettings {
                    ttl: c.ttl_seconds.map(Duration::from_secs).unwrap_or(base.ttl),
                    negative_ttl: c
                        .negative_ttl_seconds
                        .map(Duration::from_secs)
                        .unwrap_or(base.negative_ttl),
                    stale_if_error: c
                        .stale_if_error_seconds
                        .map(Duration::from_secs)
                        .unwrap_or(base.stale_if_error),
                    max_entries: c.max_entries.unwrap_or(base.max_entries),
                };
                if cache.max_entries == 0 {
                    self.err(format!("{p}.cache.max_entries"), "must be greater than 0");
                }
                cache
            }
        };
        let name = if p == "directory" {
            "default".to_string()
        } else {
            p.split('.').nth(1).unwrap_or(p).to_string()
        };
        let normalize = self.normalize(p, raw.normalize.as_deref().unwrap_or(&[]));
        let breaker = self.breaker(p, raw.breaker.clone().unwrap_or_default());
        let kind = match raw.kind.as_str() {
            "file" => {
                for (field, set) in [
                    ("url", raw.url.is_some()),
                    ("timeout_ms", raw.timeout_ms.is_some()),
                    ("connect_timeout_ms", raw.connect_timeout_ms.is_some()),
                    ("headers", raw.headers.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                    ("max_response_bytes", raw.max_response_bytes.is_some()),
                    ("match", raw.match_by.is_some()),
                    ("roles_from", raw.roles_from.is_some()),
                    ("breaker", raw.breaker.is_some()),
                ] {
                    if set {
                        self.err(format!("{p}.{field}"), "not used by `kind: file`");
                    }
                }
                let Some(file) = raw.path.as_deref().filter(|f| !f.trim().is_empty()) else {
                    self.err(format!("{p}.path"), "`kind: file` needs the users file path");
                    return None;
                };
                let max_bytes = raw.max_file_bytes.unwrap_or(read::USERS_FILE_MAX_BYTES);
                if max_bytes == 0 {
                    self.err(format!("{p}.max_file_bytes"), "must be greater than 0");
                    return None;
                }
                let full = self.resolve(file);
                let users = match users_cache.get(&(full.clone(), max_bytes)) {
                    Some(cached) => cached.clone(),
                    None => {
                        let parsed = match UsersFile::load(&full, max_bytes) {
                            Ok(u) => Some(Arc::new(u)),
                            Err(errs) => {
                                for e in errs {
                                    let at = if e.path.is_empty() {
                                        format!("{p}.path")
                                    } else {
                                        format!("{p}.path ({file}: {})", e.path)
                                    };
                                    self.err(at, e.message);
                                }
                                None
                            }
                        };
                        users_cache.insert((full.clone(), max_bytes), parsed.clone());
                        parsed
                    }
                }?;
                DirectoryKind::File { path: full, users }
            }
            "http" | "scim" => {
                for (field, set) in
                    [("path", raw.path.is_some()), ("max_file_bytes", raw.max_file_bytes.is_some())]
                {
                    if set {
                        self.err(format!("{p}.{field}"), format!("not used by `kind: {}`", raw.kind));
                    }
                }
                let http = self.http_settings(p, raw)?;
                let Some(url) = raw.url.as_deref() else {
                    self.err(format!("{p}.url"), format!("`kind: {}` needs `url`", raw.kind));
                    return None;
                };
                if raw.kind == "http" {
                    for (field, set) in
                        [("match", raw.match_by.is_some()), ("roles_from", raw.roles_from.is_some())]
                    {
                        if set {
                            self.err(format!("{p}.{field}"), "only used by `kind: scim`");
                        }
                    }
                    match UrlTemplate::parse(url) {
                        Ok(url) => DirectoryKind::Http { url, http },
                        Err(msg) => {
                            self.err(format!("{p}.url"), msg);
                            return None;
                        }
                    }
                } else {
                    let match_by = match raw.match_by.as_deref() {
                        None => ScimMatch::UserName,
                        Some(m) => match ScimMatch::parse(m) {
                            Some(m) => m,
                            None => {
                                self.err(
                                    format!("{p}.match"),
                                    format!("unknown `{m}`, expected userName, externalId or id"),
                                );
                                return None;
                            }
                        },
                    };
                    let roles_from = match raw.roles_from.as_deref() {
                        None | Some("groups") => RolesFrom::Groups,
                        Some("roles") => RolesFrom::Roles,
                        Some(r) => {
                            self.err(
                                format!("{p}.roles_from"),
                                format!("unknown `{r}`, expected groups or roles"),
                            );
                            return None;
                        }
                    };
                    let sample = url.replace("{tenant}", "tenant");
                    if sample.contains(['{', '}']) && !url.contains("{sub}") {
                        self.err(
                            format!("{p}.url"),
                            format!("`{url}`: unknown placeholder; a SCIM base URL may hold {{tenant}} only"),
                        );
                        return None;
                    }
                    match reqwest::Url::parse(&sample) {
                        // Lookups append `/Users...` to the base: after a query or a fragment
                        // that path would not reach the server, and every sub would be one request.
                        Ok(u)
                            if matches!(u.scheme(), "http" | "https")
                                && !url.contains("{sub}")
                                && u.query().is_none()
                                && u.fragment().is_none() => {}
                        _ => {
                            self.err(
                                format!("{p}.url"),
                                format!("`{url}` must be the SCIM base URL (http or https, no {{sub}}, no query or fragment), e.g. https://idp.example.com/scim/v2"),
                            );
                            return None;
                        }
                    }
                    DirectoryKind::Scim { base: url.to_string(), match_by, roles_from, http }
                }
            }
            other => {
                self.err(format!("{p}.kind"), format!("unknown kind `{other}`, expected file, http or scim"));
                return None;
            }
        };
        Some(DirectoryConfig { path: p.to_string(), name, kind, cache, breaker, normalize })
    }

    fn normalize(&mut self, p: &str, names: &[String]) -> Normalize {
        let mut n = Normalize::default();
        for (i, name) in names.iter().enumerate() {
            match name.as_str() {
                "trim" => n.trim = true,
                "lowercase" => n.lowercase = true,
                other => self.err(
                    format!("{p}.normalize[{i}]"),
                    format!("unknown `{other}`, expected trim or lowercase"),
                ),
            }
        }
        n
    }

    fn breaker(&mut self, p: &str, raw: raw::Breaker) -> BreakerSettings {
        let d = BreakerSettings::default();
        let cooldown = raw.cooldown_ms.map(Duration::from_millis).unwrap_or(d.cooldown);
        if cooldown.is_zero() {
            self.err(format!("{p}.breaker.cooldown_ms"), "must be greater than 0");
        }
        BreakerSettings { failure_threshold: raw.failure_threshold.unwrap_or(d.failure_threshold), cooldown }
    }

    /// Timeouts, headers (secrets from files or the environment), CA bundle, size limit.
    fn http_settings(&mut self, p: &str, raw: &raw::Directory) -> Option<HttpSettings> {
        let before = self.errors.len();
        let timeout = Duration::from_millis(raw.timeout_ms.unwrap_or(250));
        let connect_timeout = Duration::from_millis(raw.connect_timeout_ms.unwrap_or(100));
        if timeout.is_zero() {
            self.err(format!("{p}.timeout_ms"), "must be greater than 0");
        }
        if connect_timeout.is_zero() {
            self.err(format!("{p}.connect_timeout_ms"), "must be greater than 0");
        }
        let max_response_bytes = raw.max_response_bytes.unwrap_or(64 * 1024);
        if max_response_bytes == 0 {
            self.err(format!("{p}.max_response_bytes"), "must be greater than 0");
        }
        let mut headers = Vec::new();
        for (name, src) in raw.headers.iter().flatten() {
            let hp = format!("{p}.headers.{name}");
            let lower = name.to_ascii_lowercase();
            if !is_header_name(&lower) {
                self.err(hp.clone(), "not a valid HTTP header name");
                continue;
            }
            let Some(value) =
                self.secret(&hp, src.value.as_deref(), src.from_file.as_deref(), src.from_env.as_deref())
            else {
                continue;
            };
            let value = format!("{}{value}", src.prefix.as_deref().unwrap_or(""));
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                self.err(hp, "the value contains control characters");
                continue;
            }
            headers.push((lower, value));
        }
        let ca_pem = raw.ca_file.as_deref().and_then(|f| self.ca_file(p, f));
        let settings = HttpSettings { timeout, connect_timeout, headers, ca_pem, max_response_bytes };
        if self.errors.len() == before
            && let Err(msg) = crate::directory::http::DirectoryClient::new(&settings)
        {
            self.err(if msg.contains("CA") { format!("{p}.ca_file") } else { p.to_string() }, msg);
        }
        (self.errors.len() == before).then_some(settings)
    }

    fn revocation(&mut self, raw: raw::Revocation) -> Option<RevocationSettings> {
        let before = self.errors.len();
        let p = "revocation";
        let url = match url::Url::parse(&raw.redis_url) {
            Ok(u) => Some(u),
            Err(e) => {
                self.err(format!("{p}.redis_url"), format!("not a URL: {e}"));
                None
            }
        };
        let mut display_url = raw.redis_url.clone();
        if let Some(u) = &url {
            let tls = u.scheme() == "rediss";
            if !matches!(u.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
                self.err(
                    format!("{p}.redis_url"),
                    format!("scheme `{}` is not redis://, rediss:// (TLS) or unix://", u.scheme()),
                );
            }
            if u.fragment().is_some() {
                self.err(
                    format!("{p}.redis_url"),
                    "a URL fragment (such as `#insecure`) is not allowed: TLS certificates are always verified; \
                     set revocation.ca_file for a private CA",
                );
            }
            if u.password().is_some() {
                if raw.password.is_some() {
                    self.err(
                        format!("{p}.password"),
                        "the password is given twice: in redis_url and in revocation.password",
                    );
                }
                self.warnings.push(ConfigError::new(
                    format!("{p}.redis_url"),
                    "holds a password; prefer revocation.password.from_file or from_env so the config carries no secret",
                ));
                let mut shown = u.clone();
                let _ = shown.set_password(Some("***"));
                display_url = shown.to_string();
            }
            if !u.username().is_empty() && raw.username.is_some() {
                self.err(
                    format!("{p}.username"),
                    "the username is given twice: in redis_url and in revocation.username",
                );
            }
            if raw.ca_file.is_some() && !tls {
                self.err(format!("{p}.ca_file"), "only used with a rediss:// (TLS) URL");
            }
        }
        let password = raw.password.as_ref().and_then(|s| {
            self.secret(
                &format!("{p}.password"),
                s.value.as_deref(),
                s.from_file.as_deref(),
                s.from_env.as_deref(),
            )
        });
        let ca_pem = raw.ca_file.as_deref().and_then(|f| self.ca_file(p, f));
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "subguard:".into());
        let channel = raw.channel.unwrap_or_else(|| "subguard:events".into());
        if channel.is_empty() {
            self.err(format!("{p}.channel"), "must not be empty");
        }
        let positive = |me: &mut Self, field: &str, v: Option<u64>, default: u64| -> u64 {
            let v = v.unwrap_or(default);
            if v == 0 {
                me.err(format!("{p}.{field}"), "must be greater than 0");
            }
            v.max(1)
        };
        let timeout = positive(self, "timeout_ms", raw.timeout_ms, 100);
        let reconnect_min = positive(self, "reconnect_min_ms", raw.reconnect_min_ms, 100);
        let reconnect_max = positive(self, "reconnect_max_ms", raw.reconnect_max_ms, 5000);
        if reconnect_max < reconnect_min {
            self.err(format!("{p}.reconnect_max_ms"), "must not be below reconnect_min_ms");
        }
        let ping = positive(self, "ping_seconds", raw.ping_seconds, 5);
        let hold = positive(self, "event_hold_seconds", raw.event_hold_seconds, 300);
        let settings = RevocationSettings {
            display_url,
            url: Redacted(raw.redis_url),
            username: raw.username,
            password: password.map(Redacted),
            ca_pem,
            key_prefix,
            channel,
            jti_cache: Duration::from_millis(raw.jti_cache_ms.unwrap_or(1000)),
            timeout: Duration::from_millis(timeout),
            fail_closed: raw.fail_closed.unwrap_or(false),
            reconnect_min: Duration::from_millis(reconnect_min),
            reconnect_max: Duration::from_millis(reconnect_max),
            ping_interval: Duration::from_secs(ping),
            event_hold: Duration::from_secs(hold),
        };
        if self.errors.len() == before
            && let Err(msg) = crate::revocation::redis_client(&settings)
        {
            let at = if msg.contains("CA") { format!("{p}.ca_file") } else { format!("{p}.redis_url") };
            self.err(at, msg);
        }
        (self.errors.len() == before).then_some(settings)
    }

    /// A value given as exactly one of `value`, `from_file` (trailing newline removed; the file is
    /// watched for reload) and `from_env`. Reports errors under `p`.
    fn secret(
        &mut self,
        p: &str,
        value: Option<&str>,
        from_file: Option<&str>,
        from_env: Option<&str>,
    ) -> Option<String> {
        // An empty secret is a mistake (a Secret key not mounted, a variable set from nothing), and
        // sending it would only make every lookup fail at the other end: refused here instead.
        match (value, from_file, from_env) {
            (Some(""), None, None) => {
                self.err(format!("{p}.value"), "must not be empty");
                None
            }
            (Some(v), None, None) => Some(v.to_string()),
            (None, Some(f), None) => {
                let path = self.file_path(format!("{p}.from_file"), f)?;
                self.extra_files.push(path.clone());
                match read::text(&path, read::SMALL_FILE_MAX_BYTES) {
                    Ok(v) if v.trim_end_matches(['\n', '\r']).is_empty() => {
                        self.err(format!("{p}.from_file"), format!("the file is empty: {}", path.display()));
                        None
                    }
                    Ok(v) => Some(v.trim_end_matches(['\n', '\r']).to_string()),
                    Err(e) => {
                        self.err(format!("{p}.from_file"), format!("{e}: {}", path.display()));
                        None
                    }
                }
            }
            (None, None, Some(var)) => match std::env::var(var) {
                Ok(v) if v.is_empty() => {
                    self.err(format!("{p}.from_env"), format!("environment variable `{var}` is empty"));
                    None
                }
                Ok(v) => Some(v),
                Err(_) => {
                    self.err(format!("{p}.from_env"), format!("environment variable `{var}` is not set"));
                    None
                }
            },
            _ => {
                self.err(p, "set exactly one of `value`, `from_file` and `from_env`");
                None
            }
        }
    }

    fn tenant(
        &mut self,
        p: &str,
        raw: raw::Tenant,
        default_dir: Option<&Option<DirectoryConfig>>,
        users_cache: &mut UsersCache,
    ) -> Option<TenantConfig> {
        if raw.issuers.is_empty() {
            self.err(format!("{p}.issuers"), "at least one issuer must be configured");
        }
        let mut issuers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, iss) in raw.issuers.into_iter().enumerate() {
            let ip = format!("{p}.issuers[{i}]");
            if !seen.insert(iss.issuer.clone()) {
                self.err(format!("{ip}.issuer"), "the same issuer is listed twice for this tenant");
            }
            if let Some(ic) = self.issuer(&ip, iss) {
                issuers.push(ic);
            }
        }
        let directory = match (&raw.directory, default_dir) {
            (Some(d), defaults) => {
                let default_cache = defaults.and_then(|d| d.as_ref()).map(|d| d.cache);
                self.directory(&format!("{p}.directory"), d, default_cache.as_ref(), users_cache)
            }
            (None, Some(d)) => d.clone(),
            (None, None) => {
                self.err(
                    format!("{p}.directory"),
                    "no directory: set `directory` at the top level or for this tenant",
                );
                None
            }
        }?;
        Some(TenantConfig { issuers, directory })
    }

    fn issuer(&mut self, ip: &str, raw: raw::Issuer) -> Option<IssuerConfig> {
        let before = self.errors.len();
        if raw.issuer.is_empty() {
            self.err(format!("{ip}.issuer"), "must not be empty");
        }
        if raw.audiences.is_empty() || raw.audiences.iter().any(String::is_empty) {
            self.err(format!("{ip}.audiences"), "list at least one non-empty audience");
        }
        let mut algorithms = Vec::new();
        let names = raw.algorithms.unwrap_or_else(|| vec!["RS256".into()]);
        if names.is_empty() {
            self.err(format!("{ip}.algorithms"), "list at least one algorithm");
        }
        for (j, name) in names.iter().enumerate() {
            match parse_algorithm(name) {
                Some(a) => algorithms.push(a),
                None if name.starts_with("HS") => self.err(
                    format!("{ip}.algorithms[{j}]"),
                    format!("`{name}` needs a shared secret; subguard verifies public-key algorithms only (RS*, PS*, ES256, ES384, EdDSA / Ed25519)"),
                ),
                None => self.err(
                    format!("{ip}.algorithms[{j}]"),
                    format!("unsupported algorithm `{name}`, expected one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, Ed25519"),
                ),
            }
        }
        let sources =
            [raw.jwks_file.is_some(), raw.jwks_uri.is_some(), raw.discovery].iter().filter(|s| **s).count();
        if sources != 1 {
            self.err(ip.to_string(), "set exactly one of `jwks_file`, `jwks_uri` and `discovery: true`");
            return None;
        }
        let keys = if let Some(file) = raw.jwks_file {
            let path = self.file_path(format!("{ip}.jwks_file"), &file)?;
            match read::file(&path, crate::keys::MAX_DOCUMENT_BYTES as u64) {
                Err(e) => {
                    self.err(format!("{ip}.jwks_file"), format!("{e}: {}", path.display()));
                    return None;
                }
                Ok(bytes) => match KeySet::from_jwks(&bytes) {
                    Ok(set) => {
                        for skipped in &set.skipped {
                            self.warnings.push(ConfigError::new(
                                format!("{ip}.jwks_file"),
                                format!("key skipped: {skipped}"),
                            ));
                        }
                        if !algorithms.is_empty() && set.fits_none(&algorithms) {
                            self.warnings.push(ConfigError::new(
                                format!("{ip}.jwks_file"),
                                format!(
                                    "no key in the file can verify any of the issuer's algorithms ({}): its tokens will be unsupported_algorithm or unknown_key",
                                    names.join(", ")
                                ),
                            ));
                        }
                        KeySource::File { path, initial: Arc::new(set) }
                    }
                    Err(e) => {
                        self.err(format!("{ip}.jwks_file"), format!("{}: {e}", path.display()));
                        return None;
                    }
                },
            }
        } else if let Some(uri) = raw.jwks_uri {
            if let Err(msg) = url_is_allowed(&uri) {
                self.err(format!("{ip}.jwks_uri"), msg);
            }
            KeySource::Uri(uri)
        } else {
            if let Err(msg) = url_is_allowed(&raw.issuer) {
                self.err(format!("{ip}.issuer"), format!("discovery needs an issuer URL: {msg}"));
            }
            KeySource::Discovery
        };
        (self.errors.len() == before).then_some(IssuerConfig {
            issuer: raw.issuer,
            audiences: raw.audiences,
            algorithms,
            keys,
        })
    }
}

/// Deserializes `value`, naming the failing YAML path (below `prefix`) in the error.
pub(crate) fn deserialize_at<T: DeserializeOwned>(prefix: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize::<_, T>(crate::strict::Strict(value)).map_err(|e| {
        let inner = e.path().to_string();
        let path = match inner.as_str() {
            "." => prefix.to_string(),
            p if prefix.is_empty() => p.to_string(),
            p if p.starts_with('[') => format!("{prefix}{p}"),
            p => format!("{prefix}.{p}"),
        };
        ConfigError::new(path, e.into_inner().to_string())
    })
}

pub(crate) fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b))
}
