//! Accounts: the account model, the file source, password verification and its cache.
//!
//! - `model.rs`: `Account`, `Organisation`, `AccountStore` — what the source says.
//! - `file.rs`: the YAML file source (`AccountStore::load`), errors with file, line and key.
//! - `password.rs`: `PasswordHash` (argon2, bcrypt, SHA512-CRYPT), `hash_password`.
//! - `cache.rs`: the HMAC-keyed verification cache.
//! - `auth.rs`: `Authenticator` — cache, hash on the blocking pool, then `policy::decide`.

mod auth;
mod cache;
mod file;
mod model;
mod password;

use std::path::Path;

pub use auth::{AuthOutcome, Authenticator};
pub use cache::CacheConfig;
pub use model::{Access, Account, AccountStore, AppPassword, DeleteMode, Organisation, Switch};
pub use password::{hash_password, try_hash_password, HashError, HashParseError, PasswordHash};

use crate::config::ConfigError;

impl AccountStore {
    /// Reads, parses and validates the YAML account file (DESIGN.md "Account data").
    /// Addresses and organisation domains are lowercased; two that differ only in case are an
    /// error.
    ///
    /// # Errors
    /// Every problem found, each naming the file, the line and the key, e.g.
    /// `accounts.yaml:12: users.bob@skydesk.jp.app_passwords[0].hash: not a supported hash: ...`.
    pub fn load(path: &Path) -> Result<AccountStore, Vec<ConfigError>> {
        file::load(path)
    }

    /// [`AccountStore::load`] from text already read; `path` is only used in errors.
    ///
    /// # Errors
    /// As [`AccountStore::load`].
    pub fn parse(path: &Path, text: &str) -> Result<AccountStore, Vec<ConfigError>> {
        file::parse(path, text)
    }
}
