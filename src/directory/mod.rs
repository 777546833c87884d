//! User directories: where a token's `sub` is resolved to a user of one tenant.
//!
//! A [`Directory`] answers one question per (tenant, sub): the user exists ([`Lookup::Found`]),
//! the directory says it does not ([`Lookup::NotFound`]), or the directory could not be asked
//! ([`DirectoryError`]). The last two are never confused: an outage is `directory_unavailable`,
//! never `user_not_found`. Tenants never share answers: every lookup names its tenant.

pub mod file;

use std::sync::Arc;

pub use file::FileDirectory;

/// A user as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Forwarded as `forward.user_header` (the sub when the directory has no id).
    pub id: Arc<str>,
    /// Roles joined by `,`, ready for `forward.roles_header`; `None` when the user has none.
    pub roles: Option<Arc<str>>,
    pub disabled: bool,
    /// Unix seconds: tokens issued (`iat`) before this are revoked.
    pub tokens_valid_after: Option<i64>,
}

/// The directory's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<User>),
    NotFound,
}

/// The directory could not answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// A tenant's directory.
#[derive(Debug)]
pub enum Directory {
    File(FileDirectory),
}

impl Directory {
    pub async fn lookup(&self, tenant: &str, sub: &str) -> Result<Lookup, DirectoryError> {
        match self {
            Directory::File(f) => Ok(f.lookup(tenant, sub)),
        }
    }

    /// Where lookups go, for logs and `explain`.
    pub fn describe(&self) -> String {
        match self {
            Directory::File(f) => format!("file {}", f.path().display()),
        }
    }
}
