//! The file directory: a YAML users file (SPEC §2), held in memory.
//!
//! The file maps tenant names to lists of users. Lookups are exact on `sub` within the request's
//! tenant; nothing is normalised, so `Alice` and `alice` are different users, exactly as the IdP
//! minted them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::{Lookup, User};
use crate::config::{ConfigError, deserialize_at, io_reason, raw::FileUser};

/// The parsed users file: tenant → sub → user.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UsersFile {
    pub tenants: HashMap<String, HashMap<String, Arc<User>>>,
}

impl UsersFile {
    /// Reads and parses a users file. Errors name the path inside the file (`acme[2].roles`).
    pub fn load(path: &Path) -> Result<UsersFile, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![ConfigError::new("", format!("{}: {}", io_reason(&e), path.display()))])?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<UsersFile, Vec<ConfigError>> {
        let doc: Value = serde_saphyr::from_str(text)
            .map_err(|e| vec![ConfigError::new("", format!("invalid YAML: {e}"))])?;
        let map = match doc {
            Value::Null => return Ok(UsersFile::default()),
            Value::Object(m) => m,
            _ => {
                return Err(vec![ConfigError::new(
                    "",
                    "must be a mapping of tenant name to a list of users",
                )]);
            }
        };
        let mut errors = Vec::new();
        let mut tenants = HashMap::with_capacity(map.len());
        for (tenant, users) in map {
            let list = match users {
                Value::Array(a) => a,
                Value::Null => Vec::new(),
                _ => {
                    errors.push(ConfigError::new(tenant.clone(), "must be a list of users"));
                    continue;
                }
            };
            let mut by_sub = HashMap::with_capacity(list.len());
            for (i, v) in list.into_iter().enumerate() {
                let at = format!("{tenant}[{i}]");
                let u: FileUser = match deserialize_at(&at, v) {
                    Ok(u) => u,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                if u.sub.is_empty() {
                    errors.push(ConfigError::new(format!("{at}.sub"), "must not be empty"));
                    continue;
                }
                if u.roles.iter().any(|r| r.is_empty() || r.contains(',') || r.chars().any(char::is_control))
                {
                    errors.push(ConfigError::new(
                        format!("{at}.roles"),
                        "a role must be non-empty and contain no comma or control character",
                    ));
                    continue;
                }
                // The id (or the sub standing in for it) becomes a request header upstream.
                if u.id.as_deref().unwrap_or(&u.sub).chars().any(char::is_control) {
                    errors.push(ConfigError::new(format!("{at}.id"), "must not contain control characters"));
                    continue;
                }
                let user = User {
                    id: Arc::from(u.id.as_deref().unwrap_or(&u.sub)),
                    roles: (!u.roles.is_empty()).then(|| Arc::from(u.roles.join(","))),
                    disabled: u.disabled,
                    tokens_valid_after: u.tokens_valid_after,
                };
                if by_sub.insert(u.sub.clone(), Arc::new(user)).is_some() {
                    errors.push(ConfigError::new(format!("{at}.sub"), format!("duplicate sub `{}`", u.sub)));
                }
            }
            tenants.insert(tenant, by_sub);
        }
        if errors.is_empty() { Ok(UsersFile { tenants }) } else { Err(errors) }
    }
}

/// A users file in memory; a reload swaps the whole file atomically.
#[derive(Debug)]
pub struct FileDirectory {
    path: PathBuf,
    users: ArcSwap<UsersFile>,
}

impl FileDirectory {
    pub fn new(path: PathBuf, users: Arc<UsersFile>) -> Self {
        FileDirectory { path, users: ArcSwap::new(users) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lookup(&self, tenant: &str, sub: &str) -> Lookup {
        match self.users.load().tenants.get(tenant).and_then(|t| t.get(sub)) {
            Some(u) => Lookup::Found(u.clone()),
            None => Lookup::NotFound,
        }
    }

    /// All users of all tenants (for `explain` hints).
    pub fn snapshot(&self) -> Arc<UsersFile> {
        self.users.load_full()
    }

    pub fn replace(&self, users: Arc<UsersFile>) {
        self.users.store(users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example() {
        let f = UsersFile::parse(
            r#"
acme:
  - sub: "5b7e0a52"
    id: "u-1001"
    roles: [admin, billing]
  - sub: "alice@acme.test"
    disabled: true
    tokens_valid_after: 1767225600
globex:
  - sub: "u-77"
"#,
        )
        .unwrap();
        let u = &f.tenants["acme"]["5b7e0a52"];
        assert_eq!(&*u.id, "u-1001");
        assert_eq!(u.roles.as_deref(), Some("admin,billing"));
        let a = &f.tenants["acme"]["alice@acme.test"];
        assert!(a.disabled);
        assert_eq!(a.tokens_valid_after, Some(1767225600));
        assert_eq!(&*f.tenants["globex"]["u-77"].id, "u-77");
        assert_eq!(f.tenants["globex"]["u-77"].roles, None);
    }

    #[test]
    fn lookups_never_cross_tenants_or_case() {
        let f = UsersFile::parse("acme: [{sub: alice}]\nglobex: [{sub: bob}]").unwrap();
        let d = FileDirectory::new("users.yaml".into(), Arc::new(f));
        assert!(matches!(d.lookup("acme", "alice"), Lookup::Found(_)));
        assert_eq!(d.lookup("globex", "alice"), Lookup::NotFound);
        assert_eq!(d.lookup("acme", "Alice"), Lookup::NotFound);
        assert_eq!(d.lookup("acme", " alice"), Lookup::NotFound);
        assert_eq!(d.lookup("nope", "alice"), Lookup::NotFound);
    }

    #[test]
    fn errors_name_the_path_inside_the_file() {
        let errs = UsersFile::parse("acme:\n  - sub: a\n  - sub: b\n    rolez: [x]\n  - sub: a\nglobex: 3")
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(text.iter().any(|e| e.starts_with("acme[1].rolez") || e.starts_with("acme[1]:")), "{text:?}");
        assert!(text.iter().any(|e| e.starts_with("acme[2].sub: duplicate sub")), "{text:?}");
        assert!(text.iter().any(|e| e.starts_with("globex: must be a list")), "{text:?}");
    }
}
