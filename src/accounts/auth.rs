//! `Authenticator`: verify a login's password against the account store (cache first, then the
//! hash on the blocking pool) and apply `policy::decide`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::cache::{CacheConfig, VerificationCache};
use super::model::{Account, AccountStore, Organisation};
use super::password::verify_dummy;
use crate::config::Protocol;
use crate::login::LoginResult;
use crate::policy::{self, Credential, Decision};

/// The result of one login attempt.
#[derive(Debug, Clone)]
pub struct AuthOutcome {
    pub decision: Decision,
    /// The account, when the credential was proven for it (an `Allow`, or a policy denial such
    /// as `ImapDisabled`); `None` for unknown users and invalid credentials, so that nothing
    /// downstream can act on an account the client has not proven it owns.
    pub account: Option<Arc<Account>>,
    /// Which secret matched (`Invalid` when none did), for the session log.
    pub credential: Credential,
}

/// One generation of account data: a reload replaces store and cache together, so a
/// verification that started against the old store can only ever fill the old cache.
struct Generation {
    store: Arc<AccountStore>,
    cache: VerificationCache,
}

/// Shared by every connection (behind an `Arc`).
pub struct Authenticator {
    current: ArcSwap<Generation>,
    cache_config: CacheConfig,
    /// Bounds the hashes running at once: argon2 with default params takes 19 MiB, and the
    /// blocking pool would otherwise run up to 512 of them during a password-guessing burst.
    hashing: Semaphore,
    /// Hash verifications run (including the dummy ones for unknown users): a cache hit does
    /// not move it. `mailgate_password_hashes_total` once [`Authenticator::counting_hashes_in`]
    /// gave it the registered counter.
    hash_runs: IntCounter,
}

impl Authenticator {
    pub fn new(store: AccountStore) -> Authenticator {
        Authenticator::with_cache(store, CacheConfig::default())
    }

    /// An authenticator whose verification cache has the given TTL and capacity.
    pub fn with_cache(store: AccountStore, cache_config: CacheConfig) -> Authenticator {
        let parallel = std::thread::available_parallelism().map_or(2, usize::from);
        Authenticator {
            current: ArcSwap::from_pointee(Generation {
                store: Arc::new(store),
                cache: VerificationCache::new(cache_config),
            }),
            cache_config,
            hashing: Semaphore::new(parallel.max(2)),
            hash_runs: unregistered_hash_counter(),
        }
    }

    /// Counts the hash verifications in `counter` (the metric) from now on.
    #[must_use]
    pub fn counting_hashes_in(mut self, counter: IntCounter) -> Authenticator {
        self.hash_runs = counter;
        self
    }

    /// Swaps in a reloaded store and starts an empty cache (a changed password or a revoked
    /// app password must not stay valid through the cache).
    pub fn replace_store(&self, store: AccountStore) {
        self.current.store(Arc::new(Generation {
            store: Arc::new(store),
            cache: VerificationCache::new(self.cache_config),
        }));
    }

    /// The store in use now.
    pub fn store(&self) -> Arc<AccountStore> {
        Arc::clone(&self.current.load().store)
    }

    /// How many password hashes have been verified since start.
    pub fn hash_verifications(&self) -> u64 {
        self.hash_runs.get()
    }

    /// Entries in the current verification cache.
    pub fn cached_logins(&self) -> usize {
        self.current.load().cache.len()
    }

    /// Verifies `password` for `address` (full, lowercase) and decides the login.
    ///
    /// A cache hit answers at once; otherwise the hashes run on tokio's blocking pool. An
    /// unknown user costs one default argon2id verification (against a dummy hash), like a
    /// wrong password for an account with one argon2id hash.
    pub async fn authenticate(
        &self,
        address: &str,
        password: &[u8],
        protocol: Protocol,
    ) -> AuthOutcome {
        let generation = self.current.load_full();
        let account = generation.store.user(address).cloned();
        let organisation = generation.store.organisation_of(address).copied();

        let credential = match &account {
            Some(account) => {
                let tag = generation.cache.tag(address, password);
                match generation.cache.lookup(&tag) {
                    Some(credential) => credential,
                    None => {
                        let credential = self.verify(Some(Arc::clone(account)), password).await;
                        generation.cache.insert(tag, credential);
                        credential
                    }
                }
            }
            None => self.verify(None, password).await,
        };
        decide(account, organisation.as_ref(), credential, protocol)
    }

    /// [`Authenticator::authenticate`] from the verification cache alone: `None` when this
    /// password was not proven for `address` recently. Nothing is hashed, so it costs what a
    /// cache hit costs; for a user whose failed-login budget is spent (see `limits`).
    pub fn authenticate_cached(
        &self,
        address: &str,
        password: &[u8],
        protocol: Protocol,
    ) -> Option<AuthOutcome> {
        let generation = self.current.load();
        let account = generation.store.user(address).cloned()?;
        let organisation = generation.store.organisation_of(address).copied();
        let credential = generation
            .cache
            .lookup(&generation.cache.tag(address, password))?;
        Some(decide(
            Some(account),
            organisation.as_ref(),
            credential,
            protocol,
        ))
    }

    /// Runs the hashes of `account` (or the dummy hash) on the blocking pool.
    async fn verify(&self, account: Option<Arc<Account>>, password: &[u8]) -> Credential {
        // The semaphore is never closed, so this only fails if that changes; failing closed.
        let Ok(_permit) = self.hashing.acquire().await else {
            return Credential::Invalid;
        };
        let password = Zeroizing::new(password.to_vec());
        let runs = self.hash_runs.clone();
        let task = tokio::task::spawn_blocking(move || match account {
            Some(account) => verify_account(&account, &password, &runs),
            None => {
                runs.inc();
                verify_dummy(&password);
                Credential::Invalid
            }
        });
        match task.await {
            Ok(credential) => credential,
            Err(e) => {
                tracing::error!(error = %e, "password verification task failed");
                Credential::Invalid
            }
        }
    }
}

/// The policy's decision on a verified (or failed) credential; the account is handed out only
/// when the credential was proven for it.
fn decide(
    account: Option<Arc<Account>>,
    organisation: Option<&Organisation>,
    credential: Credential,
    protocol: Protocol,
) -> AuthOutcome {
    let decision = policy::decide(account.as_deref(), organisation, credential, protocol);
    let proven = !matches!(decision, Decision::Deny(LoginResult::InvalidCredentials));
    AuthOutcome {
        decision,
        account: if proven { account } else { None },
        credential,
    }
}

/// A counter of our own until the metric's is given (tests, the bench's auth responder).
fn unregistered_hash_counter() -> IntCounter {
    let (name, help) = crate::metrics::PASSWORD_HASHES;
    // A constant, valid name and help: `with_opts` only fails on an invalid name.
    IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{name}: {e}"))
}

/// The main password first, then each app password; the first match says which it was.
/// Stopping at a match reveals nothing the reply does not (the client knows what it sent);
/// a wrong password always runs every hash of the account.
fn verify_account(account: &Account, password: &[u8], runs: &IntCounter) -> Credential {
    if let Some(hash) = &account.password {
        runs.inc();
        if hash.verify(password) {
            return Credential::MainPassword;
        }
    }
    for app in &account.app_passwords {
        runs.inc();
        if app.hash.verify(password) {
            return Credential::AppPassword;
        }
    }
    if account.password.is_none() && account.app_passwords.is_empty() {
        // A federated account without app passwords: fail after the same work as anyone.
        runs.inc();
        verify_dummy(password);
    }
    Credential::Invalid
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.store().len())
            .field("cache", &self.cache_config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::accounts::{DeleteMode, Switch};
    use crate::login::LoginResult::{
        AppPasswordRequired, ImapDisabled, InvalidCredentials, PolicyDenied, SmtpDisabled,
    };
    use Decision::{Allow, Deny};
    use Protocol::{Imap, Smtp};

    fn demo_store() -> AccountStore {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/accounts.yaml");
        match AccountStore::load(&path) {
            Ok(store) => store,
            Err(errors) => panic!("{errors:?}"),
        }
    }

    /// Every demo account with its listed password, and the decision the README promises.
    #[tokio::test]
    async fn demo_accounts_get_their_documented_decisions() {
        let auth = Authenticator::new(demo_store());
        #[rustfmt::skip]
        let table: &[(&str, &str, Protocol, Decision, Credential)] = &[
            ("alice@skydesk.jp", "alice-pass", Imap, Allow, Credential::MainPassword),
            ("alice@skydesk.jp", "alice-pass", Smtp, Allow, Credential::MainPassword),
            ("eve@skydesk.jp", "eve-pass", Imap, Deny(ImapDisabled), Credential::MainPassword),
            ("eve@skydesk.jp", "eve-pass", Smtp, Allow, Credential::MainPassword),
            ("bob@skydesk.jp", "bob-pass", Imap, Deny(AppPasswordRequired), Credential::MainPassword),
            ("bob@skydesk.jp", "bob-pass", Smtp, Deny(AppPasswordRequired), Credential::MainPassword),
            ("bob@skydesk.jp", "bob-app-pass", Imap, Allow, Credential::AppPassword),
            ("bob@skydesk.jp", "bob-app-pass", Smtp, Allow, Credential::AppPassword),
            ("carol@skydesk.jp", "carol-app-pass", Imap, Allow, Credential::AppPassword),
            ("carol@skydesk.jp", "carol-app-pass", Smtp, Allow, Credential::AppPassword),
            ("frank@skydesk.jp", "frank-pass", Imap, Allow, Credential::MainPassword),
            ("frank@skydesk.jp", "frank-pass", Smtp, Deny(SmtpDisabled), Credential::MainPassword),
            ("dave@example.com", "dave-pass", Imap, Allow, Credential::MainPassword),
            ("dave@example.com", "dave-pass", Smtp, Allow, Credential::MainPassword),
            ("grace@example.com", "grace-pass", Imap, Allow, Credential::MainPassword),
            ("sam@strict.example", "sam-pass", Imap, Deny(PolicyDenied), Credential::MainPassword),
            ("sam@strict.example", "sam-pass", Smtp, Allow, Credential::MainPassword),
            ("mallory@smtpoff.example", "mallory-pass", Imap, Allow, Credential::MainPassword),
            ("mallory@smtpoff.example", "mallory-pass", Smtp, Deny(PolicyDenied), Credential::MainPassword),
            // Wrong passwords, unknown users: the same reply, and no account handed out.
            ("alice@skydesk.jp", "alice-pass ", Imap, Deny(InvalidCredentials), Credential::Invalid),
            ("eve@skydesk.jp", "alice-pass", Imap, Deny(InvalidCredentials), Credential::Invalid),
            ("sam@strict.example", "wrong", Imap, Deny(InvalidCredentials), Credential::Invalid),
            ("carol@skydesk.jp", "", Imap, Deny(InvalidCredentials), Credential::Invalid),
            ("nobody@skydesk.jp", "alice-pass", Imap, Deny(InvalidCredentials), Credential::Invalid),
            ("ALICE@skydesk.jp", "alice-pass", Imap, Deny(InvalidCredentials), Credential::Invalid),
        ];
        for &(address, password, protocol, decision, credential) in table {
            let outcome = auth
                .authenticate(address, password.as_bytes(), protocol)
                .await;
            let what = format!("{address} / {password:?} / {protocol:?}");
            assert_eq!(outcome.decision, decision, "{what}");
            assert_eq!(outcome.credential, credential, "{what}");
            let account = outcome.account.as_ref().map(|a| a.address.as_str());
            match decision {
                Deny(InvalidCredentials) => assert_eq!(account, None, "{what}"),
                _ => assert_eq!(account, Some(address), "{what}"),
            }
        }
    }

    #[tokio::test]
    async fn a_repeat_login_is_served_from_the_cache() {
        let auth = Authenticator::new(demo_store());
        let first = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(first.decision, Allow);
        assert_eq!(auth.hash_verifications(), 1);
        assert_eq!(auth.cached_logins(), 1);

        let again = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Smtp)
            .await;
        assert_eq!(again.decision, Allow);
        assert_eq!(auth.hash_verifications(), 1, "no hash for a cached login");

        // The cached credential still goes through the policy: bob's main password.
        let bob = auth.authenticate("bob@skydesk.jp", b"bob-pass", Imap).await;
        assert_eq!(bob.decision, Deny(AppPasswordRequired));
        assert_eq!(auth.hash_verifications(), 2);
        let bob = auth.authenticate("bob@skydesk.jp", b"bob-pass", Imap).await;
        assert_eq!(bob.decision, Deny(AppPasswordRequired));
        assert_eq!(auth.hash_verifications(), 2);
    }

    #[tokio::test]
    async fn a_wrong_password_is_never_served_from_the_cache() {
        let auth = Authenticator::new(demo_store());
        let ok = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(ok.decision, Allow);
        for n in 2..5 {
            let bad = auth.authenticate("alice@skydesk.jp", b"guess", Imap).await;
            assert_eq!(bad.decision, Deny(InvalidCredentials));
            assert_eq!(
                auth.hash_verifications(),
                n,
                "each wrong password is hashed"
            );
        }
        // The right password for one user is not a cache hit for another.
        let other = auth
            .authenticate("eve@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(other.decision, Deny(InvalidCredentials));
        assert_eq!(auth.cached_logins(), 1);
    }

    #[tokio::test]
    async fn unknown_users_and_accounts_without_hashes_cost_one_hash() {
        let carol_without_app_passwords = Account {
            address: "carol@skydesk.jp".into(),
            password: None,
            imap: Switch::Enabled,
            smtp: Switch::Enabled,
            two_step: false,
            federated: Some("google".into()),
            app_passwords: Vec::new(),
            imap_folders: None,
            imap_delete: DeleteMode::MarkOnly,
        };
        let store = AccountStore::from_parts([carol_without_app_passwords], []);
        let auth = Authenticator::new(store);
        let unknown = auth.authenticate("nobody@skydesk.jp", b"x", Imap).await;
        assert_eq!(unknown.decision, Deny(InvalidCredentials));
        assert_eq!(auth.hash_verifications(), 1);
        let carol = auth.authenticate("carol@skydesk.jp", b"x", Imap).await;
        assert_eq!(carol.decision, Deny(InvalidCredentials));
        assert_eq!(auth.hash_verifications(), 2);
    }

    #[tokio::test]
    async fn replace_store_clears_the_cache_and_applies_the_new_data() {
        let auth = Authenticator::new(demo_store());
        let ok = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(ok.decision, Allow);
        assert_eq!(auth.hash_verifications(), 1);

        // Reload: alice's password changed to the one in the small-params fixture.
        let path = Path::new("reloaded.yaml");
        let hash = "$argon2id$v=19$m=256,t=1,p=1$PdHzxHuJEe528T4iH7j+Cw$8lnJf9j7w2mbZrR8hqnlzVbSu5hZ7HZYbgwEo2mbp0c";
        let text =
            format!("users:\n  alice@skydesk.jp:\n    password: \"{hash}\"\n    imap: enabled\n");
        let reloaded = match AccountStore::parse(path, &text) {
            Ok(store) => store,
            Err(errors) => panic!("{errors:?}"),
        };
        auth.replace_store(reloaded);
        assert_eq!(auth.cached_logins(), 0);
        assert_eq!(auth.store().len(), 1);

        let old = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(
            old.decision,
            Deny(InvalidCredentials),
            "the old password is gone"
        );
        assert_eq!(auth.hash_verifications(), 2);
        let new = auth
            .authenticate("alice@skydesk.jp", b"correct horse", Imap)
            .await;
        assert_eq!(new.decision, Allow);
        assert_eq!(auth.hash_verifications(), 3);
    }

    #[tokio::test]
    async fn an_expired_entry_runs_the_hash_again() {
        let config = CacheConfig {
            ttl: Duration::ZERO,
            capacity: 10,
        };
        let auth = Authenticator::with_cache(demo_store(), config);
        for n in 1..=2 {
            let ok = auth
                .authenticate("dave@example.com", b"dave-pass", Imap)
                .await;
            assert_eq!(ok.decision, Allow);
            assert_eq!(auth.hash_verifications(), n);
        }
    }

    #[tokio::test]
    async fn cached_only_answers_proven_passwords_and_hashes_nothing() {
        let auth = Authenticator::new(demo_store());
        let cold = auth.authenticate_cached("alice@skydesk.jp", b"alice-pass", Imap);
        assert!(cold.is_none(), "not proven yet");
        let ok = auth
            .authenticate("alice@skydesk.jp", b"alice-pass", Imap)
            .await;
        assert_eq!(ok.decision, Allow);
        assert_eq!(auth.hash_verifications(), 1);
        let warm = auth.authenticate_cached("alice@skydesk.jp", b"alice-pass", Smtp);
        assert_eq!(warm.map(|o| o.decision), Some(Allow));
        assert!(auth
            .authenticate_cached("alice@skydesk.jp", b"guess", Imap)
            .is_none());
        assert!(auth
            .authenticate_cached("nobody@skydesk.jp", b"alice-pass", Imap)
            .is_none());
        // The policy still applies to a cached credential.
        let _ = auth.authenticate("bob@skydesk.jp", b"bob-pass", Imap).await;
        let bob = auth.authenticate_cached("bob@skydesk.jp", b"bob-pass", Imap);
        assert_eq!(bob.map(|o| o.decision), Some(Deny(AppPasswordRequired)));
        assert_eq!(auth.hash_verifications(), 2, "cached-only never hashes");
    }

    #[test]
    fn authenticator_is_send_and_sync() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Authenticator>();
        shared::<AuthOutcome>();
    }
}
