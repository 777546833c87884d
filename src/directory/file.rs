//! The file directory: a YAML users file (SPEC §2), held in memory.
//!
//! The file maps tenant names to lists of users. Lookups are exact on `sub` within the request's
//! tenant; nothing is normalised, so `Alice` and `alice` are different users, exactly as the IdP
//! minted them.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Lookup, User, has_outer_whitespace, plain_yaml};
use crate::config::read::{self, ReadError};
use crate::config::{ConfigError, deserialize_at, raw::FileUser};

/// The users of one tenant by sub. Hashed with foldhash rather than SipHash: the keys come from
/// the operator's file, never from a request, so there is no hash flooding to defend against,
/// and every check hashes the token's `sub` once to look it up.
pub type Users = HashMap<Box<str>, User, foldhash::fast::RandomState>;

/// The parsed users file: tenant → sub → user.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UsersFile {
    pub tenants: HashMap<String, Users>,
}

impl UsersFile {
    /// Reads and parses a users file of at most `max_bytes`. Errors name the path inside the file
    /// (`acme[2].roles`).
    pub fn load(path: &Path, max_bytes: u64) -> Result<UsersFile, Vec<ConfigError>> {
        let text = read::text(path, max_bytes).map_err(|e| {
            let hint = if matches!(e, ReadError::TooLarge(_)) { " (raise `max_file_bytes`)" } else { "" };
            vec![ConfigError::new("", format!("{e}{hint}: {}", path.display()))]
        })?;
        let parsed = Self::parse(&text);
        // What a failed export, a full disk after `cat > users.yaml`, or a ConfigMap made from a
        // missing file leaves: nothing, or only a document marker, a comment, a null. Applied, it
        // would deny every user; refused, the version serving stays. A file that means "no
        // users" says so: `{}`.
        if parsed.as_ref().is_ok_and(|f| f.tenants.is_empty()) && !is_empty_mapping(&text) {
            return Err(vec![ConfigError::new(
                "",
                format!(
                    "the file is empty (nothing but whitespace, comments, `---` or null): {}; write \
                     `{{}}` for a directory that has no users",
                    path.display()
                ),
            )]);
        }
        if text.len() >= TRIM_AFTER_BYTES {
            drop(text);
            release_freed_memory();
        }
        parsed
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
    /// through the same visitors, so it is checked exactly alike, path for path, and about ten
    /// times faster than the YAML parser, which matters for machine-generated files of a hundred
    /// thousand users (docs/benchmarks.md). Anything that is not strict JSON is read as YAML.
    ///
    /// A YAML file in the plain shape people and generators usually write (see
    /// [`super::plain_yaml`]) is read by a shortcut that knows only that shape, about twenty
    /// times faster; it reads a file only when the general reader would read it alike, and
    /// leaves every other file, and every file with an error, to the general reader.
    pub fn parse(text: &str) -> Result<UsersFile, Vec<ConfigError>> {
        let json = match text.trim_start().starts_with('{') {
            true => serde_json::from_str::<Parsed<true>>(text).ok().map(|p| p.0),
            false => None,
        };
        let parsed = match json {
            Some(parsed) => parsed,
            None => match Self::parse_plain_yaml(text) {
                Some(file) => return Ok(file),
                None => Self::read_yaml(text)?,
            },
        };
        Self::parse_read(parsed)
    }

    /// The file read by the general YAML reader alone, without the shortcuts of [`Self::parse`].
    /// Public for the `users_file` fuzz target, which compares the two.
    #[doc(hidden)]
    pub fn parse_yaml_without_shortcut(text: &str) -> Result<UsersFile, Vec<ConfigError>> {
        Self::parse_read(Self::read_yaml(text)?)
    }

    /// The file read by the plain YAML shortcut, or `None` when it leaves the file to the general
    /// reader (any shape it does not know, and any error). Public for the fuzz target.
    #[doc(hidden)]
    pub fn parse_plain_yaml(text: &str) -> Option<UsersFile> {
        let tenants = plain_yaml::read(text)?;
        let mut roles = Roles::default();
        let mut out = HashMap::with_capacity(tenants.len());
        for (name, users) in tenants {
            let mut by_sub = Users::with_capacity_and_hasher(users.len(), Default::default());
            for u in users {
                let checked =
                    checked(String::new, u.sub, u.id, &u.roles, u.disabled, u.tokens_valid_after, &mut roles);
                let (sub, user) = checked.ok()?;
                if by_sub.insert(sub, user).is_some() {
                    return None;
                }
            }
            if out.insert(name.to_string(), by_sub).is_some() {
                return None;
            }
        }
        Some(UsersFile { tenants: out })
    }

    fn read_yaml(text: &str) -> Result<Result<Vec<TenantRead>, Vec<ConfigError>>, Vec<ConfigError>> {
        serde_saphyr::from_str_with_options::<Parsed<false>>(text, yaml_options(text))
            .map(|p| p.0)
            .map_err(|e| vec![ConfigError::new("", crate::config::yaml_error(&e))])
    }

    /// The file from its tenants as read, or every error in it.
    fn parse_read(parsed: Result<Vec<TenantRead>, Vec<ConfigError>>) -> Result<UsersFile, Vec<ConfigError>> {
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
type TenantRead = (String, Users, Vec<ConfigError>);

/// The whole file as read, or why its top level is not a mapping of tenants. `JSON`: read by
/// serde_json, whose users take the fast path of [`TenantSeed::visit_seq`].
struct Parsed<const JSON: bool>(Result<Vec<TenantRead>, Vec<ConfigError>>);

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

impl<'de, const JSON: bool> serde::Deserialize<'de> for Parsed<JSON> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor::<JSON>)
    }
}

struct TopVisitor<const JSON: bool>;

impl<const JSON: bool> TopVisitor<JSON> {
    fn wrong(self) -> Parsed<JSON> {
        Parsed(Err(vec![ConfigError::new("", "must be a mapping of tenant name to a list of users")]))
    }
    fn empty(self) -> Parsed<JSON> {
        Parsed(Ok(Vec::new()))
    }
}

impl<'de, const JSON: bool> serde::de::Visitor<'de> for TopVisitor<JSON> {
    type Value = Parsed<JSON>;
    not_a!("a mapping of tenant name to a list of users");

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Parsed<JSON>, D::Error> {
        <Parsed<JSON> as serde::Deserialize>::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed<JSON>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(self.wrong())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Parsed<JSON>, A::Error> {
        let mut tenants = Vec::new();
        let mut roles = Roles::default();
        let mut seen = HashSet::new();
        while let Some(tenant) = map.next_key::<String>()? {
            let read = map.next_value_seed(TenantSeed::<JSON> { tenant: &tenant, roles: &mut roles })?;
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

/// Users with the same roles share one joined string (`admin,billing`).
#[derive(Default)]
struct Roles {
    shared: HashSet<Arc<str>, foldhash::fast::RandomState>,
    joined: String,
}

impl Roles {
    fn get(&mut self, roles: &[impl AsRef<str>]) -> Option<Arc<str>> {
        if roles.is_empty() {
            return None;
        }
        self.joined.clear();
        for (i, r) in roles.iter().enumerate() {
            if i > 0 {
                self.joined.push(',');
            }
            self.joined.push_str(r.as_ref());
        }
        if let Some(shared) = self.shared.get(self.joined.as_str()) {
            return Some(shared.clone());
        }
        let new: Arc<str> = Arc::from(self.joined.as_str());
        self.shared.insert(new.clone());
        Some(new)
    }
}

/// The list of users of one tenant.
struct TenantSeed<'a, const JSON: bool> {
    tenant: &'a str,
    roles: &'a mut Roles,
}

type UsersRead = (Users, Vec<ConfigError>);

impl<const JSON: bool> TenantSeed<'_, JSON> {
    fn wrong(self) -> UsersRead {
        (Users::default(), vec![ConfigError::new(self.tenant, "must be a list of users")])
    }
    fn empty(self) -> UsersRead {
        (Users::default(), Vec::new())
    }
}

impl<'de, const JSON: bool> serde::de::DeserializeSeed<'de> for TenantSeed<'_, JSON> {
    type Value = UsersRead;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<UsersRead, D::Error> {
        d.deserialize_any(self)
    }
}

/// A user as a JSON file usually writes it, borrowed from the file's text. A user this does not
/// accept (a string with escapes, a wrong type, an unknown or repeated key) is read again the
/// general way, which accepts or refuses it exactly as it would have without this shortcut; so a
/// user accepted here is one that way would have accepted, with the same fields.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BorrowedUser<'a> {
    sub: &'a str,
    id: Option<&'a str>,
    #[serde(default, borrow)]
    roles: Vec<&'a str>,
    #[serde(default)]
    disabled: bool,
    tokens_valid_after: Option<i64>,
}

impl<'de, const JSON: bool> serde::de::Visitor<'de> for TenantSeed<'_, JSON> {
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
        // The users in file order with their position, then one map of the right size: each sub
        // is hashed once, never rehashed as the map grows.
        let mut read = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        let mut errors = Vec::new();
        let at = |i: usize| format!("{}[{i}]", self.tenant);
        for i in 0.. {
            let user = if JSON {
                let Some(raw) = seq.next_element::<&'de RawValue>()? else { break };
                // serde_json would also read a user written as a list, field by field by
                // position; only a mapping takes the fast way (the general way refuses the rest).
                let fast = match crate::strict::opening(raw.get().as_bytes()) == Some(b'{') {
                    true => serde_json::from_str::<BorrowedUser>(raw.get()).ok(),
                    false => None,
                };
                match fast {
                    Some(u) => {
                        checked(|| at(i), u.sub, u.id, &u.roles, u.disabled, u.tokens_valid_after, self.roles)
                    }
                    None => match serde_json::from_str::<Value>(raw.get()) {
                        Ok(v) => user(&at(i), v, self.roles),
                        Err(e) => Err(ConfigError::new(at(i), e.to_string())),
                    },
                }
            } else {
                let Some(v) = seq.next_element::<Value>()? else { break };
                user(&at(i), v, self.roles)
            };
            match user {
                Ok((sub, user)) => read.push((i, sub, user)),
                Err(e) => errors.push((i, e)),
            }
        }
        let mut by_sub = Users::with_capacity_and_hasher(read.len(), Default::default());
        for (i, sub, user) in read {
            match by_sub.entry(sub) {
                Entry::Occupied(e) => errors.push((
                    i,
                    ConfigError::new(format!("{}.sub", at(i)), format!("duplicate sub `{}`", e.key())),
                )),
                Entry::Vacant(e) => {
                    e.insert(user);
                }
            }
        }
        // Errors in file order, whichever step found them.
        errors.sort_by_key(|(i, _)| *i);
        Ok((by_sub, errors.into_iter().map(|(_, e)| e).collect()))
    }
}

/// One user of the file read the general way, as a JSON value: its sub and the user, or the first
/// thing wrong with it, named by its path in the file.
fn user(at: &str, v: Value, roles: &mut Roles) -> Result<(Box<str>, User), ConfigError> {
    let u: FileUser = deserialize_at(at, v)?;
    checked(|| at.to_string(), &u.sub, u.id.as_deref(), &u.roles, u.disabled, u.tokens_valid_after, roles)
}

/// A user's fields, checked; `at` names the user in errors (made only when there is one).
fn checked(
    at: impl Fn() -> String,
    sub: &str,
    id: Option<&str>,
    user_roles: &[impl AsRef<str>],
    disabled: bool,
    tokens_valid_after: Option<i64>,
    roles: &mut Roles,
) -> Result<(Box<str>, User), ConfigError> {
    if sub.is_empty() {
        return Err(ConfigError::new(format!("{}.sub", at()), "must not be empty"));
    }
    if user_roles.iter().map(AsRef::as_ref).any(|r| {
        r.is_empty() || r.contains(',') || r.chars().any(char::is_control) || has_outer_whitespace(r)
    }) {
        return Err(ConfigError::new(
            format!("{}.roles", at()),
            "a role must be non-empty, contain no comma or control character, and not start or end with a space or tab",
        ));
    }
    // The id (or the sub standing in for it) becomes a request header upstream: never an empty one.
    if id == Some("") {
        return Err(ConfigError::new(
            format!("{}.id", at()),
            "must not be empty (leave it out to forward the sub)",
        ));
    }
    if let Some(id) = id {
        if id.chars().any(char::is_control) {
            return Err(ConfigError::new(format!("{}.id", at()), "must not contain control characters"));
        }
        if has_outer_whitespace(id) {
            return Err(ConfigError::new(
                format!("{}.id", at()),
                "must not start or end with a space or tab: HTTP drops them around a header value, so the \
                 upstream would see another user",
            ));
        }
    } else if sub.chars().any(char::is_control) {
        return Err(ConfigError::new(
            format!("{}.sub", at()),
            "is forwarded as the user id (there is no `id`), and a header value cannot carry control \
             characters: give this user an `id`",
        ));
    }
    // A sub with a space or tab at either end and no `id` loads (it may be there to show that
    // `bob ` is not `bob`); the config warns, and such a user is never allowed (check/mod.rs).
    let id = id.unwrap_or(sub);
    let user = User { id: Arc::from(id), roles: roles.get(user_roles), disabled, tokens_valid_after };
    Ok((Box::from(sub), user))
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

/// Reading a users file this large leaves megabytes of freed parser memory in the heap.
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// Gives the heap's free pages back to the system (glibc keeps them otherwise, and RSS with
/// them). Once per large users file read, never per check.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims glibc's own heap; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
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

/// Whether a users file that read as no tenants wrote an empty mapping (`{}`, `{ }`, after any
/// byte-order mark, comments and document markers).
fn is_empty_mapping(text: &str) -> bool {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let kept: String = text
        .lines()
        .map(|l| l.split_once(" #").map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#') && *l != "---" && *l != "...")
        .collect();
    kept.chars().filter(|c| !c.is_whitespace()).collect::<String>() == "{}"
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

    /// What is forwarded as a header must reach the upstream as it is: HTTP drops spaces and tabs
    /// around a header value, so `bob ` would arrive as `bob`, another user.
    #[test]
    fn forwarded_values_with_outer_spaces_are_refused_where_they_are_written() {
        let errors = |yaml: &str| -> Vec<String> {
            match UsersFile::parse(yaml) {
                Ok(_) => Vec::new(),
                Err(e) => e.iter().map(ToString::to_string).collect(),
            }
        };
        // A sub forwarded as the id loads: the config warns, and the check refuses to forward it.
        let file = UsersFile::parse("acme:\n  - sub: \"bob \"\n").unwrap();
        assert_eq!(&*file.tenants["acme"]["bob "].id, "bob ");
        // With an id, such a sub is a user like any other: the id is what is forwarded.
        let file = UsersFile::parse("acme:\n  - sub: \"bob \"\n    id: u-7\n").unwrap();
        assert_eq!(&*file.tenants["acme"]["bob "].id, "u-7");
        let e = errors("acme:\n  - sub: bob\n    id: \" u-7\"\n");
        assert_eq!(
            e,
            [
                "acme[0].id: must not start or end with a space or tab: HTTP drops them around a header value, so the upstream would see another user"
            ]
        );
        let e = errors("acme:\n  - sub: bob\n    roles: [\"admin \"]\n");
        assert!(e[0].starts_with("acme[0].roles: a role must be non-empty"), "{e:?}");
        // Spaces inside are fine, in all three.
        assert!(UsersFile::parse("acme:\n  - sub: bob smith\n    roles: [super user]\n").is_ok());
    }

    /// The shortcut for JSON users (borrowed strings, typed fields) never changes what is accepted
    /// or what an error says: every file reads exactly as the general way reads it.
    #[test]
    fn json_users_read_alike_with_and_without_the_shortcut() {
        let general = |text: &str| {
            let read = |p: Parsed<false>| UsersFile::parse_read(p.0);
            serde_json::from_str::<Parsed<false>>(text).map(read).unwrap()
        };
        let files = [
            r#"{"acme": [{"sub": "a", "id": "u-1", "roles": ["r", "s"]}, {"sub": "b", "disabled": true, "tokens_valid_after": -5}]}"#,
            // Escapes cannot be borrowed; the general way reads them.
            r#"{"acme": [{"sub": "caf\u00e9", "id": "say \"hi\""}, {"sub": "slash", "id": "a\/b", "roles": ["r\u0073"]}]}"#,
            // A repeated key: a JSON value keeps the last.
            r#"{"acme": [{"sub": "a", "sub": "b"}, {"sub": "c", "roles": ["x"], "roles": []}]}"#,
            // Wrong types, nulls, unknown keys, numbers out of range, and duplicates among them.
            r#"{"acme": [{"sub": "a", "id": null}, {"sub": "b", "roles": null}, {"sub": "c", "disabled": null},
                {"sub": "d", "tokens_valid_after": 1.5}, {"sub": "e", "tokens_valid_after": 18446744073709551615},
                {"sub": "a"}, {"sub": "f", "rolez": []}, {"sub": ["g"]}, 7, null, {"sub": "h", "roles": [1]},
                {"sub": "", "id": "i"}, {"sub": "j", "id": "k\u0000"}, {"id": "nosub"}, {"sub": "tab", "id": "a\tb"},
                {"sub": "comma", "roles": ["a\u002cb"]}]}"#,
        ];
        for text in files {
            assert_eq!(UsersFile::parse(text), general(text), "{text}");
        }
        assert_eq!(&*UsersFile::parse(files[1]).unwrap().tenants["acme"]["café"].id, "say \"hi\"");
        assert!(UsersFile::parse(files[2]).unwrap().tenants["acme"].contains_key("b"));
        let errors = UsersFile::parse(files[3]).unwrap_err();
        assert!(errors.iter().any(|e| e.to_string() == "acme[5].sub: duplicate sub `a`"), "{errors:?}");
    }

    /// A user is a mapping of named fields: one written as a list is refused, not read field by
    /// field by position (`disabled` third would be `roles`, and so on), in JSON and YAML alike.
    #[test]
    fn a_user_written_as_a_list_is_an_error() {
        let json = r#"{"acme": [["u-1", "id-1", ["admin"], false, null], {"sub": "u-2"}]}"#;
        let yaml = "acme:\n  - [u-1, id-1, [admin], false, null]\n  - sub: u-2\n";
        for text in [json, yaml] {
            let errors: Vec<String> =
                UsersFile::parse(text).unwrap_err().iter().map(ToString::to_string).collect();
            assert_eq!(errors, ["acme[0]: invalid type: sequence, expected a mapping"], "{text}");
        }
    }

    /// The plain YAML shortcut reads a file only as the general reader reads it: random files
    /// built from the shapes it knows and from the ones it must leave alone (YAML's other words
    /// for true and null, numbers, anchors, escapes, odd indentation, comments, broken lines).
    #[test]
    fn the_shortcut_reads_exactly_as_the_general_reader() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // Mostly values the shortcut takes, now and then one it must leave alone.
        let good = [
            "alice",
            "user-000001",
            "a.b@c/d+e|f",
            "u-77",
            "bob",
            "carol",
            "dave",
            "erin",
            "\"quoted\"",
            "'single'",
            "\"say 'hi'\"",
            "'back\\slash'",
            "a~",
            "Infinity",
            "NaN",
            "inf",
        ];
        let bad = [
            "Yes",
            "NO",
            "on",
            "Off",
            "y",
            "N",
            "null",
            "Null",
            "~",
            "5",
            "5b7e",
            "0x1F",
            "1e3",
            ".inf",
            "true",
            "\"\"",
            "''",
            "'it''s'",
            "\"a\\nb\"",
            "a#b",
            "a # c",
            "a:b",
            "&x a",
            "*x",
            "!!str a",
            "a b",
            "-a",
            "a,b",
            "'x,y'",
            "@a",
            "|a",
        ];
        let scalar = |next: &mut dyn FnMut(usize) -> usize| match next(24) {
            0 => bad[next(bad.len())],
            _ => good[next(good.len())],
        };
        let numbers = [
            "17",
            "0",
            "-5",
            "17",
            "017",
            "1_000",
            "9223372036854775807",
            "99999999999999999999",
            "+5",
            "1.5",
            "-0",
            "\"5\"",
        ];
        let keys = ["sub", "id", "roles", "extra"];
        let (mut shortcut, mut files) = (0, 0);
        for _ in 0..4000 {
            let mut text = String::new();
            if next(8) == 0 {
                text.push_str("# a comment\n");
            }
            for t in 0..1 + next(3) {
                // Now and then an odd name, or one listed twice.
                let name = match next(4) {
                    0 => ["\"quoted\"", "yes", "a b", "acme", "'t-1'"][next(5)],
                    _ => ["acme", "globex", "t-1"][t],
                };
                match next(10) {
                    0 => text.push_str(&format!("{name}: []\n")),
                    1 => text.push_str(&format!("{name}:\n")),
                    2 => text.push_str(&format!(
                        "{name}: {}\n",
                        ["~", "null", "Null", "NULL", "nul", "~ # none"][next(6)]
                    )),
                    _ => {
                        text.push_str(&format!("{name}:{}\n", [" ", "", "  # users"][next(3)]));
                        let indent = " ".repeat([0, 2, 2, 4][next(4)]);
                        for _ in 0..1 + next(4) {
                            let mut fields: Vec<&str> = vec!["sub"];
                            for k in ["id", "roles", "disabled", "tokens_valid_after"] {
                                if next(2) == 0 {
                                    fields.insert(next(fields.len() + 1), k);
                                }
                            }
                            if next(20) == 0 {
                                fields.push(keys[next(keys.len())]);
                            }
                            if next(20) == 0 {
                                fields.remove(0);
                            }
                            let values: Vec<(String, bool)> = fields
                                .iter()
                                .map(|k| match *k {
                                    "roles" => match next(8) {
                                        0 | 1 => ("[]".to_string(), false),
                                        2 => (scalar(&mut next).to_string(), false),
                                        3 | 4 => (
                                            (0..1 + next(3))
                                                .map(|_| scalar(&mut next))
                                                .collect::<Vec<_>>()
                                                .join("\n- "),
                                            true,
                                        ),
                                        _ => (
                                            format!(
                                                "[{}]",
                                                (0..1 + next(3))
                                                    .map(|_| scalar(&mut next))
                                                    .collect::<Vec<_>>()
                                                    .join(", ")
                                            ),
                                            false,
                                        ),
                                    },
                                    "disabled" => (
                                        ["true", "false", "True", "yes", "\"true\"", "1"]
                                            [next(6) * usize::from(next(8) == 0)]
                                        .to_string(),
                                        false,
                                    ),
                                    "tokens_valid_after" => (
                                        numbers[next(numbers.len()) * usize::from(next(8) == 0)].to_string(),
                                        false,
                                    ),
                                    _ => (scalar(&mut next).to_string(), false),
                                })
                                .collect();
                            if next(3) == 0 && values.iter().all(|(_, block)| !block) {
                                let pairs: Vec<String> = fields
                                    .iter()
                                    .zip(&values)
                                    .map(|(k, (v, _))| format!("{k}: {v}"))
                                    .collect();
                                text.push_str(&format!(
                                    "{indent}- {{{}}}\n",
                                    pairs.join([", ", ",", " , "][next(3)])
                                ));
                                continue;
                            }
                            for (i, (k, (v, block))) in fields.iter().zip(&values).enumerate() {
                                let lead = if i == 0 { format!("{indent}- ") } else { format!("{indent}  ") };
                                let odd = usize::from(next(4) == 0);
                                let comment = ["", "", "", " # c", "   ", "#c"][next(5 + odd)];
                                if *block {
                                    let inner = format!("{indent}{}", ["  ", "    ", "      ", " "][next(4)]);
                                    text.push_str(&format!(
                                        "{lead}{k}:{comment}\n{inner}- {}\n",
                                        v.replace('\n', &format!("\n{inner}"))
                                    ));
                                } else {
                                    text.push_str(&format!("{lead}{k}: {v}{comment}\n"));
                                }
                                if next(20) == 0 {
                                    text.push_str(["\n", "  # note\n", "\t\n", "   \n", "---\n"][next(5)]);
                                }
                            }
                        }
                    }
                }
            }
            // Now and then a broken byte: one deleted, or a space, tab, quote or colon put in.
            if next(10) == 0 && !text.is_empty() {
                let at = next(text.len());
                match next(2) {
                    0 => {
                        text.remove(at);
                    }
                    _ => text.insert(at, [' ', '\t', '"', ':', '-', '\''][next(6)]),
                }
            }
            files += 1;
            if let Some(fast) = UsersFile::parse_plain_yaml(&text) {
                shortcut += 1;
                assert_eq!(Ok(fast), UsersFile::parse_yaml_without_shortcut(&text), "{text}");
            }
        }
        // The generator must give the shortcut real work, not only files it leaves alone.
        assert!(shortcut * 6 > files, "the shortcut read {shortcut} of {files} files");
    }

    /// Every word in every place a value goes: the shortcut takes a plain word for the string it
    /// spells only where YAML does (never `on`, `No`, `~`, `0x1F`, `1e3` or `.inf`).
    #[test]
    fn the_shortcut_reads_every_word_as_the_general_reader() {
        let mut words: Vec<String> = [
            "y",
            "yes",
            "true",
            "on",
            "n",
            "no",
            "false",
            "off",
            "null",
            "~",
            "inf",
            "infinity",
            "nan",
            ".inf",
            ".nan",
            "-.inf",
            "0",
            "-0",
            "+0",
            "00",
            "017",
            "0o17",
            "0x1F",
            "0b101",
            "1_000",
            "1e3",
            "1.5",
            "-5",
            "+5",
            "12:30",
            "2001-12-14",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "99999999999999999999",
            "a",
            "alice",
            "u-77",
            "a.b@c/d+e|f",
            "a~",
            "a|",
            "a@",
            "a/",
            "a.",
            "a-",
            "a_",
            "a+",
            "e5",
            "x1",
            "ok",
            "On1",
            "\"\"",
            "''",
            "\"yes\"",
            "'on'",
            "\"5\"",
            "' a '",
            "\"a#b\"",
            "'a\\b'",
            "\"a'b\"",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        let more: Vec<String> = words.iter().flat_map(|w| [w.to_uppercase(), capitalised(w)]).collect();
        words.extend(more);
        for w in &words {
            for text in [
                format!("{w}:\n  - sub: a\n"),
                format!("acme:\n  - sub: {w}\n"),
                format!("acme:\n  - {{sub: {w}}}\n"),
                format!("acme:\n  - sub: a\n    id: {w}\n"),
                format!("acme:\n  - {{sub: a, roles: [{w}, b]}}\n"),
                format!("acme:\n  - sub: a\n    roles:\n      - {w}\n"),
                format!("acme:\n  - sub: a\n    disabled: {w}\n"),
                format!("acme:\n  - sub: a\n    tokens_valid_after: {w}\n"),
                format!("acme: {w}\n"),
            ] {
                if let Some(fast) = UsersFile::parse_plain_yaml(&text) {
                    assert_eq!(Ok(fast), UsersFile::parse_yaml_without_shortcut(&text), "{text}");
                }
            }
        }
        // And it does take the plain words it can.
        assert!(UsersFile::parse_plain_yaml("acme:\n  - sub: On1\n    roles: [e5, a|]\n").is_some());
    }

    fn capitalised(w: &str) -> String {
        let mut c = w.chars();
        c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
    }

    /// Files of the harness's and of the documentation's shape take the shortcut, and read as
    /// the general reader reads them.
    #[test]
    fn large_plain_files_take_the_shortcut() {
        let (mut flow, mut block) = (String::from("# generated\nacme:\n"), String::from("acme:\n"));
        for i in 0..3000 {
            flow.push_str(&format!("  - {{sub: user-{i:06}, id: u-{i:06}, roles: [reader]}}\n"));
            block.push_str(&format!(
                "- sub: \"user-{i:06}\"\n  id: u-{i}\n  roles: [reader, writer]\n  tokens_valid_after: {i}\n"
            ));
        }
        flow.push_str("globex:\n  - {sub: u-77}\n");
        for text in [flow, block] {
            let fast = UsersFile::parse_plain_yaml(&text).expect("the shortcut read it");
            assert_eq!(fast.tenants["acme"].len(), 3000);
            assert_eq!(Ok(fast), UsersFile::parse_yaml_without_shortcut(&text));
        }
    }

    /// docs/configuration.md: unquoted YAML 1.1 booleans are not roles; quoted they are.
    #[test]
    fn yaml_boolean_words_must_be_quoted_as_roles() {
        for word in ["y", "n", "yes", "no", "on", "off"] {
            let errors = UsersFile::parse(&format!("acme: [{{sub: a, roles: [{word}]}}]")).unwrap_err();
            assert!(
                errors[0].to_string().starts_with("acme[0].roles[0]: invalid type: boolean"),
                "{word}: {errors:?}"
            );
            let f = UsersFile::parse(&format!("acme: [{{sub: a, roles: [\"{word}\"]}}]")).unwrap();
            assert_eq!(f.tenants["acme"]["a"].roles.as_deref(), Some(word));
        }
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
    fn only_an_empty_mapping_says_no_users() {
        for empty in ["{}", "{ }", "---\n{}\n", "# none yet\n{}", "\u{feff}{}", "{}  # none yet"] {
            assert!(is_empty_mapping(empty), "{empty:?}");
        }
        for nothing in ["", "\n \n", "---", "# a comment", "\u{feff}", "~", "null", "---\n...\n"] {
            assert!(!is_empty_mapping(nothing), "{nothing:?}");
        }
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
        // An empty id would forward an empty identity header: refused, in both readers.
        for text in ["acme: [{sub: a, id: \"\"}]", r#"{"acme": [{"sub": "a", "id": ""}]}"#] {
            assert_eq!(
                errors(text),
                ["acme[0].id: must not be empty (leave it out to forward the sub)"],
                "{text}"
            );
        }
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
