//! The HTTP directory (SPEC §2, `kind: http`): `GET url` with `{tenant}` and `{sub}`
//! percent-encoded; 200 with a JSON user means found, 404/410 not found, anything else is an error
//! (never "not found").

use std::collections::HashMap;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use serde::Deserialize;

use super::{FetchError, Lookup, User, has_outer_whitespace};

/// Everything outside RFC 3986 *unreserved* (`A-Z a-z 0-9 - . _ ~`) is encoded, so a `sub` can
/// never add a path segment, a query or a fragment.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// A URL with `{tenant}` and `{sub}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Tenant,
    Sub,
}

impl UrlTemplate {
    /// Whether the tenant is part of the URL, so tenants sharing this template ask for their own users.
    pub fn names_tenant(&self) -> bool {
        self.parts.contains(&Part::Tenant)
    }

    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        if !template.contains("{sub}") {
            return Err(format!("`{template}` has no {{sub}} placeholder"));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(i) = rest.find('{') {
            let (lit, tail) = rest.split_at(i);
            if !lit.is_empty() {
                parts.push(Part::Literal(lit.to_string()));
            }
            if let Some(t) = tail.strip_prefix("{tenant}") {
                parts.push(Part::Tenant);
                rest = t;
            } else if let Some(t) = tail.strip_prefix("{sub}") {
                parts.push(Part::Sub);
                rest = t;
            } else {
                return Err(format!("`{template}`: unknown placeholder; only {{tenant}} and {{sub}} exist"));
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let t = UrlTemplate { parts };
        let sample = t.render("tenant", "sub");
        let url = reqwest::Url::parse(&sample).map_err(|e| format!("`{template}` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("`{template}` must be an http or https URL"));
        }
        if t.host_has_placeholder() {
            return Err(format!("`{template}`: placeholders are not allowed in the host"));
        }
        // A fragment never leaves the client: `{sub}` there would send every lookup to one URL, and
        // every user of the tenant would resolve to whatever that URL answers.
        if url.fragment().is_some() {
            return Err(format!(
                "`{template}`: a URL fragment (`#...`) is never sent to the directory; put {{sub}} in the path or query"
            ));
        }
        Ok(t)
    }

    fn host_has_placeholder(&self) -> bool {
        // Placeholders may only follow the authority: the first literal must contain "://x/".
        match self.parts.first() {
            Some(Part::Literal(l)) => match l.split_once("://") {
                Some((_, after)) => !after.contains('/'),
                None => true,
            },
            _ => true,
        }
    }

    /// The URL for one lookup, with both values percent-encoded.
    pub fn render(&self, tenant: &str, sub: &str) -> String {
        let mut out = String::with_capacity(128);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Tenant => out.push_str(&encode_component(tenant)),
                Part::Sub => out.push_str(&encode_component(sub)),
            }
        }
        out
    }
}

/// The JSON a directory answers with for a found user. Unknown members are ignored; members of the
/// wrong type make the answer invalid (an error, never "not found").
#[derive(Debug, Deserialize)]
struct HttpUser {
    id: Option<String>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    disabled: Option<bool>,
    tokens_valid_after: Option<i64>,
}

/// Builds a [`User`] from directory data; `id` defaults to the sub.
pub fn user_from(
    sub: &str,
    id: Option<String>,
    roles: Vec<String>,
    disabled: bool,
    tokens_valid_after: Option<i64>,
) -> Result<User, FetchError> {
    // Both end up in request headers for the upstream.
    if roles.iter().any(|r| {
        r.is_empty() || r.contains(',') || r.bytes().any(|b| b.is_ascii_control()) || has_outer_whitespace(r)
    }) {
        return Err(FetchError::Data(
            "a role is empty, contains a comma or control character, or starts or ends with a space or tab"
                .into(),
        ));
    }
    let (id, which) = match id.filter(|i| !i.is_empty()) {
        Some(id) => (id, "the user id"),
        None => (sub.to_string(), "the sub, forwarded as the user id (the answer has no id),"),
    };
    if id.bytes().any(|b| b.is_ascii_control()) {
        return Err(FetchError::Data(format!("{which} contains control characters")));
    }
    // HTTP drops spaces and tabs around a header value: the upstream would see another user.
    if has_outer_whitespace(&id) {
        return Err(FetchError::Data(format!(
            "{which} starts or ends with a space or tab, which a forwarded header value cannot carry"
        )));
    }
    Ok(User {
        id: id.into(),
        roles: (!roles.is_empty()).then(|| roles.join(",").into()),
        disabled,
        tokens_valid_after,
    })
}

/// A pooled client for one directory, with its headers, timeouts, CA and response size limit.
#[derive(Debug)]
pub struct DirectoryClient {
    client: reqwest::Client,
    /// Sent with every request (the directory's credentials), and the whole-request timeout:
    /// per request, so that directories differing only in these share one client.
    headers: reqwest::header::HeaderMap,
    timeout: Duration,
    max_response_bytes: usize,
}

/// The HTTP clients of the remote directories, one per connect timeout and CA bundle. A client
/// reads the system's CA store when it is built (about 150 files, a few milliseconds and 185 KB
/// each time), and a platform may give two thousand tenants a directory each that differs only
/// in its URL and token: one client each made a 2 000-tenant config take 380 MB and 5 s a reload.
/// Kept for the process's life; there are as many as there are distinct TLS settings.
static CLIENTS: std::sync::LazyLock<std::sync::Mutex<HashMap<ClientKey, reqwest::Client>>> =
    std::sync::LazyLock::new(Default::default);

/// What tells the [`CLIENTS`] apart: the connect timeout and the CA bundle (PEM).
type ClientKey = (Duration, Option<Vec<u8>>);

fn shared_client(connect_timeout: Duration, ca_pem: &Option<Vec<u8>>) -> Result<reqwest::Client, String> {
    let key = (connect_timeout, ca_pem.clone());
    if let Some(client) = CLIENTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
        return Ok(client.clone());
    }
    let mut b = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("subguard/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_pem {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("invalid CA bundle: {e}"))?;
        if certs.is_empty() {
            return Err("the CA bundle holds no certificate".into());
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    let client = b.build().map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    CLIENTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, client.clone());
    Ok(client)
}

/// Settings shared by the HTTP and SCIM kinds.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Header name and value (values may be secrets: never logged).
    pub headers: Vec<(String, String)>,
    /// PEM certificates added to the trusted roots.
    pub ca_pem: Option<Vec<u8>>,
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("ca_pem", &self.ca_pem.is_some())
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

impl DirectoryClient {
    pub fn new(s: &HttpSettings) -> Result<DirectoryClient, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &s.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`{k}` is not a valid header name"))?;
            let mut value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("the value of header `{k}` is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = shared_client(s.connect_timeout, &s.ca_pem)?;
        Ok(DirectoryClient { client, headers, timeout: s.timeout, max_response_bytes: s.max_response_bytes })
    }

    /// GETs `url`; returns the status and (size-limited) body.
    pub async fn get(&self, url: &str, accept: &'static str) -> Result<(StatusCode, Vec<u8>), FetchError> {
        // The configured headers, then `accept`, which wins over a configured one as it did when
        // the configured ones were the client's defaults.
        let mut headers = self.headers.clone();
        headers.insert(reqwest::header::ACCEPT, reqwest::header::HeaderValue::from_static(accept));
        let mut resp = self
            .client
            .get(url)
            .headers(headers)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| FetchError::Transport(request_error(&e)))?;
        let status = resp.status();
        if resp.content_length().is_some_and(|l| l > self.max_response_bytes as u64) {
            return Err(FetchError::Data(format!("response larger than {} bytes", self.max_response_bytes)));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Transport(request_error(&e)))? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(FetchError::Data(format!(
                    "response larger than {} bytes",
                    self.max_response_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }
}

fn request_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {}", crate::keys::error_chain(e))
    } else {
        crate::keys::error_chain(e)
    }
}

/// A `sub` of `.` or `..`: URL parsers (and some servers' routers, even percent-encoded) treat it
/// as a path step, so such a sub is `user_not_found` without asking the directory (SPEC §2).
pub fn is_path_step(sub: &str) -> bool {
    sub == "." || sub == ".."
}

/// `kind: http`.
#[derive(Debug)]
pub struct HttpDirectory {
    url: UrlTemplate,
    client: DirectoryClient,
}

impl HttpDirectory {
    pub fn new(url: UrlTemplate, settings: &HttpSettings) -> Result<HttpDirectory, String> {
        Ok(HttpDirectory { url, client: DirectoryClient::new(settings)? })
    }

    pub fn describe(&self, tenant: &str, sub: &str) -> String {
        format!("GET {}", self.url.render(tenant, sub))
    }

    /// One lookup (a sub of `.` or `..` never gets here: see `Backend::fetch`).
    pub async fn fetch(&self, tenant: &str, sub: &str) -> Result<Lookup, FetchError> {
        let url = self.url.render(tenant, sub);
        let (status, body) = self.client.get(&url, "application/json").await?;
        match status {
            StatusCode::OK => {
                let u: HttpUser = crate::strict::object_from_slice(&body)
                    .map_err(|e| FetchError::Data(format!("invalid user JSON: {e}")))?;
                let user = user_from(
                    sub,
                    u.id,
                    u.roles.unwrap_or_default(),
                    u.disabled.unwrap_or(false),
                    u.tokens_valid_after,
                )?;
                Ok(Lookup::Found(user))
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Lookup::NotFound),
            s => Err(FetchError::for_status(s.as_u16())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_percent_encoded_outside_unreserved() {
        let t = UrlTemplate::parse("http://users.internal/tenants/{tenant}/users/{sub}").unwrap();
        assert_eq!(t.render("acme", "alice"), "http://users.internal/tenants/acme/users/alice");
        assert_eq!(t.render("acme", "../x?y#z"), "http://users.internal/tenants/acme/users/..%2Fx%3Fy%23z");
        assert_eq!(t.render("acme", "a b%2F"), "http://users.internal/tenants/acme/users/a%20b%252F");
        assert_eq!(
            t.render("acme", "jörg@x.test"),
            "http://users.internal/tenants/acme/users/j%C3%B6rg%40x.test"
        );
        assert_eq!(t.render("acme", "A-Z_a.z~0"), "http://users.internal/tenants/acme/users/A-Z_a.z~0");
    }

    #[test]
    fn template_errors() {
        assert!(UrlTemplate::parse("http://users.internal/users").is_err());
        assert!(UrlTemplate::parse("http://users.internal/users/{user}").is_err());
        assert!(UrlTemplate::parse("ftp://users.internal/{sub}").is_err());
        assert!(UrlTemplate::parse("http://{tenant}.users.internal/{sub}").is_err());
        assert!(UrlTemplate::parse("users/{sub}").is_err());
        assert!(UrlTemplate::parse("http://u.internal/q?tenant={tenant}&sub={sub}").is_ok());
        // A fragment is not sent: `{sub}` there (or anything after a `#`) would make every lookup
        // the same request.
        for t in [
            "http://u.internal/users#{sub}",
            "http://u.internal/users/{sub}#x",
            "http://u.internal/#{tenant}/{sub}",
        ] {
            let e = UrlTemplate::parse(t).unwrap_err();
            assert!(e.contains("fragment"), "{t}: {e}");
        }
    }

    #[test]
    fn users_from_directory_data() {
        let u = user_from("s", None, vec!["a".into(), "b".into()], false, None).unwrap();
        assert_eq!((&*u.id, u.roles.as_deref()), ("s", Some("a,b")));
        assert!(user_from("s", None, vec!["a,b".into()], false, None).is_err());
        assert!(user_from("s", Some("x\ny".into()), vec![], false, None).is_err());
        // HTTP drops spaces and tabs around a header value: the upstream would see another user.
        for (sub, id, role) in
            [("bob ", None, "r"), ("bob", Some(" u-1"), "r"), ("bob", Some("u-1 "), "r"), ("bob", None, "r ")]
        {
            let e = user_from(sub, id.map(str::to_string), vec![role.into()], false, None).unwrap_err();
            assert!(
                matches!(e, FetchError::Data(ref m) if m.contains("space or tab")),
                "{sub:?} {id:?} {role:?}: {e:?}"
            );
        }
        let e = user_from("bob ", None, vec![], false, None).unwrap_err();
        assert!(
            matches!(e, FetchError::Data(ref m) if m.starts_with("the sub, forwarded as the user id")),
            "{e:?}"
        );
        assert_eq!(&*user_from("bob ", Some("u-1".into()), vec![], false, None).unwrap().id, "u-1");
    }
}
