//! The file directory: a YAML users file (SPEC §2), held in memory.
//!
//! The file maps tenant names to lists of users. Lookups are exact on `sub` within the request's
//! tenant; nothing is normalised, so `Alice` and `alice` are different users, exactly as the IdP
//! minted them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
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

    /// Parses a users file. Every user is checked and every error reported (by tenant name, then
    /// position), not just the first.
    ///
    /// The file is read in one pass: each user goes from YAML to a small JSON value (so scalars
    /// are typed exactly as in the rest of the config) to its [`User`], and the value is dropped
    /// at once. The whole file is never held as a tree: with 100 000 users that tree was about
    /// a hundred megabytes, which the allocator kept long after the file was loaded.
    ///
    /// A file that is JSON (which is YAML too, so the format is the same) is read by serde_json
    /// through the same visitors, so it is checked exactly alike, path for path: about five
    /// times faster than the YAML parser, which matters for machine-generated files of a hundred
    /// thousand users (docs/benchmarks.md). Anything that is not strict JSON is read as YAML.
    pub fn parse(text: &str) -> Result<UsersFile, Vec<ConfigError>> {
        let json = match text.trim_start().starts_with('{') {
            true => serde_json::from_str::<Parsed>(text).ok(),
            false => None,
        };
        let Parsed(parsed) = match json {
            Some(parsed) => parsed,
            None => serde_saphyr::from_str_with_options(text, yaml_options(text))
                .map_err(|e| vec![ConfigError::new("", format!("invalid YAML: {e}"))])?,
        };
        let mut tenants = parsed?;
        // Errors as the tree-based reader gave them: tenants in name order, users in file order.
        tenants.sort_by(|a, b| a.0.cmp(&b.0));
        let mut errors = Vec::new();
        let mut out = HashMap::with_capacity(tenants.len());
        for (name, users, errs) in tenants {
            errors.extend(errs);
            out.insert(name, users);
        }
        if errors.is_empty() { Ok(UsersFile { tenants: out }) } else { Err(errors) }
    }
}

/// One tenant as read: its users and the errors found in its list.
type TenantRead = (String, HashMap<String, Arc<User>>, Vec<ConfigError>);

/// The whole file as read, or why its top level is not a mapping of tenants.
struct Parsed(Result<Vec<TenantRead>, Vec<ConfigError>>);

/// Accepts at every level what `serde_json::Value` accepts (the reader was built on it): `null`
/// and a non-finite float are null, every other scalar is a value of the wrong kind.
macro_rules! not_a {
    ($what:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(self.wrong())
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(self.wrong())
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(self.wrong())
        }
        // Beyond 64 bits a JSON value has no number: the same error as it gives.
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Self::Value, E> {
            let de = serde::de::value::I128Deserializer::<E>::new(v);
            <serde_json::Number as serde::Deserialize>::deserialize(de).map(|_| self.wrong())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Self::Value, E> {
            let de = serde::de::value::U128Deserializer::<E>::new(v);
            <serde_json::Number as serde::Deserialize>::deserialize(de).map(|_| self.wrong())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(if v.is_finite() { self.wrong() } else { self.empty() })
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(self.wrong())
        }
        fn visit_string<E: serde::de::Error>(self, _: String) -> Result<Self::Value, E> {
            Ok(self.wrong())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.empty())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.empty())
        }
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str($what)
        }
    };
}

impl<'de> serde::Deserialize<'de> for Parsed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl TopVisitor {
    fn wrong(self) -> Parsed {
        Parsed(Err(vec![ConfigError::new("", "must be a mapping of tenant name to a list of users")]))
    }
    fn empty(self) -> Parsed {
        Parsed(Ok(Vec::new()))
    }
}

impl<'de> serde::de::Visitor<'de> for TopVisitor {
    type Value = Parsed;
    not_a!("a mapping of tenant name to a list of users");

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        <Parsed as serde::Deserialize>::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(self.wrong())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut tenants = Vec::new();
        // Users with the same roles share one joined string.
        let mut roles = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(tenant) = map.next_key::<String>()? {
            let read = map.next_value_seed(TenantSeed { tenant: &tenant, roles: &mut roles })?;
            // A JSON reader keeps the last of two equal keys; one tenant's list must not silently
            // replace another's.
            if !seen.insert(tenant.clone()) {
                return Err(serde::de::Error::custom(format!("tenant `{tenant}` is listed twice")));
            }
            tenants.push((tenant, read.0, read.1));
        }
        Ok(Parsed(Ok(tenants)))
    }
}

/// The list of users of one tenant.
struct TenantSeed<'a> {
    tenant: &'a str,
    roles: &'a mut HashMap<String, Arc<str>>,
}

type UsersRead = (HashMap<String, Arc<User>>, Vec<ConfigError>);

impl TenantSeed<'_> {
    fn wrong(self) -> UsersRead {
        (HashMap::new(), vec![ConfigError::new(self.tenant, "must be a list of users")])
    }
    fn empty(self) -> UsersRead {
        (HashMap::new(), Vec::new())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for TenantSeed<'_> {
    type Value = UsersRead;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<UsersRead, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TenantSeed<'_> {
    type Value = UsersRead;
    not_a!("a list of users");

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<UsersRead, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UsersRead, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(self.wrong())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UsersRead, A::Error> {
        let mut by_sub = HashMap::with_capacity(seq.size_hint().unwrap_or(0));
        let mut errors = Vec::new();
        let mut i = 0;
        while let Some(v) = seq.next_element::<Value>()? {
            let at = format!("{}[{i}]", self.tenant);
            i += 1;
            match user(&at, v, self.roles) {
                Ok((sub, user)) => match by_sub.entry(sub) {
                    Entry::Occupied(e) => errors
                        .push(ConfigError::new(format!("{at}.sub"), format!("duplicate sub `{}`", e.key()))),
                    Entry::Vacant(e) => {
                        e.insert(Arc::new(user));
                    }
                },
                Err(e) => errors.push(e),
            }
        }
        by_sub.shrink_to_fit();
        Ok((by_sub, errors))
    }
}

/// One user of the file, checked: its sub and the user.
fn user(at: &str, v: Value, roles: &mut HashMap<String, Arc<str>>) -> Result<(String, User), ConfigError> {
    let u: FileUser = deserialize_at(at, v)?;
    if u.sub.is_empty() {
        return Err(ConfigError::new(format!("{at}.sub"), "must not be empty"));
    }
    if u.roles.iter().any(|r| r.is_empty() || r.contains(',') || r.chars().any(char::is_control)) {
        return Err(ConfigError::new(
            format!("{at}.roles"),
            "a role must be non-empty and contain no comma or control character",
        ));
    }
    // The id (or the sub standing in for it) becomes a request header upstream.
    if u.id.as_deref().unwrap_or(&u.sub).chars().any(char::is_control) {
        return Err(ConfigError::new(format!("{at}.id"), "must not contain control characters"));
    }
    let joined = (!u.roles.is_empty()).then(|| u.roles.join(","));
    let user = User {
        id: Arc::from(u.id.as_deref().unwrap_or(&u.sub)),
        roles: joined.map(|j| roles.entry(j).or_insert_with_key(|j| Arc::from(j.as_str())).clone()),
        disabled: u.disabled,
        tokens_valid_after: u.tokens_valid_after,
    };
    Ok((u.sub, user))
}

/// serde-saphyr's default budget (250 000 nodes, 1 000 000 events) guards small config files
/// against YAML bombs, but refuses a users file past about 30 000 users with ids and roles (8 nodes
/// each). Here the budget grows with the file instead: every node and every event needs at least
/// one byte of input (aliases, which do not, keep the default alias limits), so the work stays
/// linear in the size of a file the operator wrote.
fn yaml_options(text: &str) -> serde_saphyr::Options {
    let defaults = serde_saphyr::Budget::default();
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: defaults.max_nodes.max(text.len()),
            max_events: defaults.max_events.max(2 * text.len()),
        },
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

    /// The same files written as JSON and as block YAML read alike: the same users, or the same
    /// errors at the same paths.
    #[test]
    fn json_and_yaml_files_read_alike() {
        let pairs = [
            (
                r#"{"acme": [{"sub": "a", "id": "u-1", "roles": ["reader", "writer"]}, {"sub": "b", "disabled": true, "tokens_valid_after": 17}], "globex": []}"#,
                "acme:\n  - {sub: a, id: u-1, roles: [reader, writer]}\n  - {sub: b, disabled: true, tokens_valid_after: 17}\nglobex: []\n",
            ),
            (
                r#"{"acme": [{"sub": "a"}, {"sub": "a"}, {"sub": 5}, {"sub": "c", "roles": "admin"}, {"sub": "d", "extra": 1}], "globex": 7}"#,
                "acme:\n  - {sub: a}\n  - {sub: a}\n  - {sub: 5}\n  - {sub: c, roles: admin}\n  - {sub: d, extra: 1}\nglobex: 7\n",
            ),
            (r#"{"acme": null}"#, "acme:\n"),
            (
                r#"{"acme": [{"sub": ""}, {"sub": "a", "roles": ["x,y"]}, {"sub": "b"}, {"sub": "b"}, {"sub": "c", "id": "i\nd"}]}"#,
                "acme:\n  - {sub: ''}\n  - {sub: a, roles: ['x,y']}\n  - {sub: b}\n  - {sub: b}\n  - {sub: c, id: \"i\\nd\"}\n",
            ),
            (r#"{"acme": [{"sub": "a\u0007b"}]}"#, "acme:\n  - sub: \"a\\ab\"\n"),
        ];
        for (json, yaml) in pairs {
            assert_eq!(UsersFile::parse(json), UsersFile::parse(yaml), "{json}");
        }
        assert!(UsersFile::parse(pairs[0].0).is_ok());
        assert!(UsersFile::parse(pairs[1].0).is_err());
    }

    #[test]
    fn a_tenant_listed_twice_is_refused_in_either_form() {
        for text in
            [r#"{"acme": [{"sub": "a"}], "acme": [{"sub": "b"}]}"#, "acme: [{sub: a}]\nacme: [{sub: b}]\n"]
        {
            assert!(UsersFile::parse(text).is_err(), "{text} was accepted");
        }
    }

    /// Flow-style YAML that starts like JSON but is not JSON still reads as YAML.
    #[test]
    fn yaml_flow_mappings_are_not_mistaken_for_json() {
        let f = UsersFile::parse("{acme: [{sub: alice, roles: [admin]}]}").unwrap();
        assert_eq!(f.tenants["acme"]["alice"].roles.as_deref(), Some("admin"));
    }

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
    fn odd_shapes_read_as_a_yaml_tree_would() {
        let errors = |text: &str| -> Vec<String> {
            UsersFile::parse(text).unwrap_err().iter().map(ToString::to_string).collect()
        };
        for empty in ["", "~", "null"] {
            assert_eq!(UsersFile::parse(empty).unwrap(), UsersFile::default(), "{empty:?}");
        }
        let f = UsersFile::parse("acme:\nglobex: ~").unwrap();
        assert!(f.tenants["acme"].is_empty() && f.tenants["globex"].is_empty());
        for top in ["3", "[a, b]", "text", "true"] {
            assert_eq!(errors(top), ["must be a mapping of tenant name to a list of users"], "{top:?}");
        }
        for tenant in ["acme: 3", "acme: {sub: x}", "acme: 99999999999999999999999"] {
            assert_eq!(errors(tenant), ["acme: must be a list of users"], "{tenant:?}");
        }
        // Tenants in name order, users in file order, whatever the order in the file.
        assert_eq!(
            errors("zeta: [{sub: x}, {sub: x}, {sub: \"\"}]\nacme: [{sub: 1}]\nmid: 3"),
            [
                "acme[0].sub: invalid type: integer `1`, expected a string",
                "mid: must be a list of users",
                "zeta[1].sub: duplicate sub `x`",
                "zeta[2].sub: must not be empty",
            ]
        );
    }

    #[test]
    fn users_with_the_same_roles_share_them() {
        let f = UsersFile::parse("acme: [{sub: a, roles: [r, s]}, {sub: b, roles: [r, s]}]").unwrap();
        let (a, b) = (&f.tenants["acme"]["a"], &f.tenants["acme"]["b"]);
        assert_eq!(a.roles.as_deref(), Some("r,s"));
        assert!(Arc::ptr_eq(a.roles.as_ref().unwrap(), b.roles.as_ref().unwrap()));
    }

    #[test]
    fn a_file_past_the_default_yaml_budget_loads() {
        // 32 000 users with id and roles are 256 000 nodes: over serde-saphyr's default 250 000.
        let mut text = String::from("acme:\n");
        for i in 0..32_000 {
            text.push_str(&format!("  - {{sub: user-{i}, id: u-{i}, roles: [reader]}}\n"));
        }
        assert_eq!(UsersFile::parse(&text).unwrap().tenants["acme"].len(), 32_000);
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
