//! The account model: what the account source says about a user and an organisation.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::password::PasswordHash;

/// A switch the user (or an operator) flips in the account settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    Enabled,
    Disabled,
}

/// What an organisation's mail policy says about one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Allowed,
    Denied,
}

/// What happens when an IMAP client deletes or moves a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// The message stays marked `\Deleted` until the client expunges (plain IMAP).
    #[default]
    MarkOnly,
    /// The message is expunged at once (needs the IMAP-aware relay).
    ExpungeImmediately,
}

/// An organisation's mail policy, looked up by the domain of the login address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    #[serde(default)]
    pub imap: Access,
    #[serde(default)]
    pub smtp: Access,
}

impl Organisation {
    pub const ALLOW_ALL: Organisation = Organisation {
        imap: Access::Allowed,
        smtp: Access::Allowed,
    };
}

/// A password generated for one mail client; the only way in for federated and two-step
/// accounts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPassword {
    /// The label the user gave it (`thunderbird-laptop`), so they can revoke the right one.
    pub name: String,
    pub hash: PasswordHash,
}

/// One user, as loaded and validated from the account source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The full address, lowercase.
    pub address: String,
    /// The main password; `None` for federated accounts (and app-password-only accounts).
    pub password: Option<PasswordHash>,
    /// The user's own IMAP switch; off until the user turns it on.
    pub imap: Switch,
    /// Submission for this user; on unless an operator turns it off.
    pub smtp: Switch,
    /// Two-step verification: the main password alone is refused, app passwords only.
    pub two_step: bool,
    /// The external identity provider (`google`, `facebook`, ...), for accounts that sign in
    /// there and have no mail password of their own.
    pub federated: Option<String>,
    pub app_passwords: Vec<AppPassword>,
    /// The folders an IMAP client may see; `None` = all of them.
    pub imap_folders: Option<Vec<String>>,
    pub imap_delete: DeleteMode,
}

impl Account {
    /// Whether this user's IMAP session needs the IMAP-aware relay instead of the plain splice.
    pub fn needs_imap_filter(&self) -> bool {
        self.imap_folders.is_some() || self.imap_delete == DeleteMode::ExpungeImmediately
    }
}

/// All accounts and organisations of one load of the account source. Immutable: a reload
/// builds a new store and swaps it in (`Authenticator::replace_store`).
#[derive(Debug, Default)]
pub struct AccountStore {
    pub(super) users: HashMap<String, Arc<Account>>,
    pub(super) organisations: HashMap<String, Organisation>,
}

impl AccountStore {
    /// A store from accounts built in code (tests, and sources other than the file).
    /// Addresses and domains must already be lowercase; a later duplicate replaces an earlier.
    pub fn from_parts(
        users: impl IntoIterator<Item = Account>,
        organisations: impl IntoIterator<Item = (String, Organisation)>,
    ) -> AccountStore {
        AccountStore {
            users: users
                .into_iter()
                .map(|account| (account.address.clone(), Arc::new(account)))
                .collect(),
            organisations: organisations.into_iter().collect(),
        }
    }

    /// The account for `address` (full address, already lowercase).
    pub fn user(&self, address: &str) -> Option<&Arc<Account>> {
        self.users.get(address)
    }

    /// The organisation policy for `domain` (lowercase); `None` = no policy, all allowed.
    pub fn organisation(&self, domain: &str) -> Option<&Organisation> {
        self.organisations.get(domain)
    }

    /// The organisation for the domain of `address`, if it has one.
    pub fn organisation_of(&self, address: &str) -> Option<&Organisation> {
        let (_, domain) = address.rsplit_once('@')?;
        self.organisation(domain)
    }

    /// Every user's address, in no particular order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Number of organisations.
    pub fn organisations_len(&self) -> usize {
        self.organisations.len()
    }
}
