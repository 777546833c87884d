//! The SCIM 2.0 directory (RFC 7643/7644, `kind: scim`).
//!
//! By default a user is found with `GET {base}/Users?filter=userName eq "<sub>"` (or `externalId`),
//! or `GET {base}/Users/{sub}` with `match: id`. Zero results is not found; more than one is an
//! error (ambiguous directory data must never pick a user); `active: false` is a disabled user.

use serde::Deserialize;

use super::http::{DirectoryClient, HttpSettings, encode_component, user_from};
use super::{FetchError, Lookup};
use crate::strict::object_from_slice;

/// Which SCIM attribute the token's `sub` is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScimMatch {
    UserName,
    ExternalId,
    Id,
}

impl ScimMatch {
    pub fn parse(s: &str) -> Option<ScimMatch> {
        match s {
            "userName" => Some(ScimMatch::UserName),
            "externalId" => Some(ScimMatch::ExternalId),
            "id" => Some(ScimMatch::Id),
            _ => None,
        }
    }
}

/// Where roles come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolesFrom {
    /// `groups[].display`
    Groups,
    /// `roles[].value`
    Roles,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse {
    total_results: u64,
    #[serde(rename = "Resources", default)]
    resources: Vec<ScimUser>,
}

#[derive(Debug, Deserialize)]
struct Display {
    display: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Value {
    value: Option<String>,
}

/// `null` for a multi-valued attribute is the same as absent or empty (RFC 7643 §2.5).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScimUser {
    id: Option<String>,
    user_name: Option<String>,
    external_id: Option<String>,
    active: Option<bool>,
    #[serde(default)]
    groups: Option<Vec<Display>>,
    #[serde(default)]
    roles: Option<Vec<Value>>,
}

impl ScimUser {
    /// Whether this resource is the one asked for: its matched attribute equals the sub
    /// (`userName` compared case-insensitively, as RFC 7643 defines it; `externalId` and `id`
    /// exactly). A provider (or a proxy) that drops the filter and answers with some user must
    /// not make every token of the tenant that user.
    fn is(&self, match_by: ScimMatch, sub: &str) -> bool {
        match match_by {
            ScimMatch::UserName => {
                self.user_name.as_deref().is_some_and(|u| u == sub || u.to_lowercase() == sub.to_lowercase())
            }
            ScimMatch::ExternalId => self.external_id.as_deref() == Some(sub),
            ScimMatch::Id => self.id.as_deref() == Some(sub),
        }
    }
}

/// The value of a SCIM filter string literal: `"` and `\` escaped as in JSON (RFC 7644 §3.4.2.2).
pub fn filter_literal(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[derive(Debug)]
pub struct ScimDirectory {
    /// `{base}` with any trailing `/` removed; may contain `{tenant}`.
    base: String,
    match_by: ScimMatch,
    roles_from: RolesFrom,
    client: DirectoryClient,
}

impl ScimDirectory {
    pub fn new(
        base: &str,
        match_by: ScimMatch,
        roles_from: RolesFrom,
        settings: &HttpSettings,
    ) -> Result<ScimDirectory, String> {
        Ok(ScimDirectory {
            base: base.trim_end_matches('/').to_string(),
            match_by,
            roles_from,
            client: DirectoryClient::new(settings)?,
        })
    }

    /// Whether the sub is a path segment of the lookup's URL (`match: id`), not a filter value.
    pub fn sub_in_path(&self) -> bool {
        self.match_by == ScimMatch::Id
    }

    /// The request made for one lookup.
    pub fn url(&self, tenant: &str, sub: &str) -> String {
        let base = self.base.replace("{tenant}", &encode_component(tenant));
        match self.match_by {
            ScimMatch::Id => format!("{base}/Users/{}", encode_component(sub)),
            ScimMatch::UserName | ScimMatch::ExternalId => {
                let attr = if self.match_by == ScimMatch::UserName { "userName" } else { "externalId" };
                let filter = format!("{attr} eq {}", filter_literal(sub));
                format!("{base}/Users?filter={}", encode_component(&filter))
            }
        }
    }

    pub fn describe(&self, tenant: &str, sub: &str) -> String {
        format!("GET {}", self.url(tenant, sub))
    }

    /// One lookup (with `match: id`, a sub of `.` or `..` never gets here: see `Backend::fetch`).
    pub async fn fetch(&self, tenant: &str, sub: &str) -> Result<Lookup, FetchError> {
        let url = self.url(tenant, sub);
        let (status, body) = self.client.get(&url, "application/scim+json, application/json").await?;
        let invalid = |e: serde_json::Error| FetchError::Data(format!("invalid SCIM response: {e}"));
        let user = match (self.match_by, status.as_u16()) {
            (ScimMatch::Id, 200) => object_from_slice::<ScimUser>(&body).map_err(invalid)?,
            (ScimMatch::Id, 404) => return Ok(Lookup::NotFound),
            (_, 200) => {
                let list: ListResponse = object_from_slice(&body).map_err(invalid)?;
                match (list.total_results, list.resources.len()) {
                    (0, 0) => return Ok(Lookup::NotFound),
                    (1, 1) => {
                        list.resources.into_iter().next().ok_or_else(|| FetchError::Data("empty".into()))?
                    }
                    (n, m) if n > 1 || m > 1 => {
                        tracing::warn!(
                            tenant,
                            sub,
                            matches = n.max(m as u64),
                            "SCIM filter matched more than one user; refusing to pick one"
                        );
                        return Err(FetchError::Data(format!(
                            "{} users match; directory data is ambiguous",
                            n.max(m as u64)
                        )));
                    }
                    (n, m) => {
                        return Err(FetchError::Data(format!(
                            "totalResults {n} disagrees with {m} resources"
                        )));
                    }
                }
            }
            (_, s) => return Err(FetchError::for_status(s)),
        };
        if !user.is(self.match_by, sub) {
            let attribute = match self.match_by {
                ScimMatch::UserName => "userName",
                ScimMatch::ExternalId => "externalId",
                ScimMatch::Id => "id",
            };
            return Err(FetchError::Data(format!(
                "the provider answered with a user whose {attribute} is not the sub; refusing to pick it"
            )));
        }
        let roles: Vec<String> = match self.roles_from {
            RolesFrom::Groups => {
                user.groups.unwrap_or_default().into_iter().filter_map(|g| g.display).collect()
            }
            RolesFrom::Roles => user.roles.unwrap_or_default().into_iter().filter_map(|r| r.value).collect(),
        };
        let u = user_from(sub, user.id, roles, user.active == Some(false), None)?;
        Ok(Lookup::Found(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_are_escaped_then_encoded() {
        assert_eq!(filter_literal(r#"a"b\c"#), r#""a\"b\\c""#);
        let s = ScimDirectory::new(
            "https://scim.example.com/v2/",
            ScimMatch::UserName,
            RolesFrom::Groups,
            &HttpSettings {
                timeout: std::time::Duration::from_secs(1),
                connect_timeout: std::time::Duration::from_secs(1),
                headers: vec![],
                ca_pem: None,
                max_response_bytes: 1024,
            },
        )
        .unwrap();
        assert_eq!(
            s.url("acme", r#"bjensen" or userName pr or ""#),
            "https://scim.example.com/v2/Users?filter=userName%20eq%20%22bjensen%5C%22%20or%20userName%20pr%20or%20%5C%22%22"
        );
    }
}
