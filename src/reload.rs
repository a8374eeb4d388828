//! `SIGHUP`: reload what changes while mailgate runs — the account data (a user turns IMAP on,
//! changes a password, adds an app password), the certificates (a renewal, of those served to
//! clients and of the pools' `backend_client_certificate`) and the CAs the pools trust
//! (`backend_ca`, or the system's trust store) — without touching a session.
//! The config file is read and checked again in full; from it the account file and the
//! certificate files are loaded, and only when everything loaded is it all swapped in, so a
//! reload that fails changes nothing. Then the backend-name resolver reads
//! `/etc/hosts` and `/etc/resolv.conf` again and forgets its cached answers; when it cannot,
//! it keeps what it had, with a warning, and the reload still counts as done: a broken
//! `/etc/resolv.conf` must not hold back an account change. Other settings (listeners, the
//! pools' backends, modes and logins, limits, messages) take effect at the next start.

use std::path::Path;

use anyhow::Context as _;

use crate::accounts::AccountStore;
use crate::backend::load_client_certificate;
use crate::config::{Config, ConfigError};
use crate::server::{report_certificates, Context};
use crate::tls;

/// What a successful reload put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    pub users: usize,
    pub organisations: usize,
    pub certificates: usize,
    /// Backend host names whose cached addresses were dropped (`None`: the DNS configuration
    /// could not be read, and the resolver kept the old one).
    pub dns_names: Option<usize>,
}

/// Reloads from the config file at `path` into the running `context`, and counts the result in
/// `mailgate_config_reloads_total`. Reads files: call it off the async workers
/// (`spawn_blocking`).
///
/// # Errors
/// A config or account file that does not load (each problem with file, line and key), or a
/// certificate that does not load; nothing was changed then.
pub fn reload(context: &Context, path: &Path) -> anyhow::Result<Reloaded> {
    let result = load_and_swap(context, path);
    context.metrics.reloaded(result.is_ok());
    result
}

fn load_and_swap(context: &Context, path: &Path) -> anyhow::Result<Reloaded> {
    let config = Config::load(path).map_err(|errors| listed("config", &errors))?;
    let store =
        AccountStore::load(&config.accounts.path).map_err(|e| listed("account data", &e))?;
    let certificates = match &context.tls {
        Some(running) => {
            let provider = running.config.crypto_provider();
            let set = tls::load_certificates(&config.tls, provider).context("certificates")?;
            Some((running, set))
        }
        // No listener used TLS at start; one that does now needs a restart anyway.
        None => None,
    };
    // A TLS pool trusts the CAs its new config names; a pool that presented a client
    // certificate at start reads the files its new config names. A pool that changes its
    // backend_tls, or gains or loses a client certificate, needs a restart, like every other
    // pool setting.
    let mut roots = Vec::new();
    let mut clients = Vec::new();
    for pool in context.router.pools() {
        let Some(configured) = config.pools.get(&pool.name) else {
            tracing::warn!(pool = %pool.name, "SIGHUP: the pool is gone from the config; it serves until a restart");
            continue;
        };
        if configured.backend_tls != pool.transport.mode() {
            tracing::warn!(pool = %pool.name, "SIGHUP: pools.{}.backend_tls changed; it takes effect at a restart", pool.name);
        } else if let Some(prepared) = pool
            .transport
            .prepare_roots(configured.backend_ca.as_deref())
            .with_context(|| format!("pools.{}", pool.name))?
        {
            roots.push((&pool.transport, prepared));
        }
        let Some(running) = pool.transport.client_certificate() else {
            continue;
        };
        let Some(files) = &configured.backend_client_certificate else {
            tracing::warn!(pool = %pool.name, "SIGHUP: pools.{}.backend_client_certificate is gone from the config; the pool presents its certificate until a restart", pool.name);
            continue;
        };
        let loaded = load_client_certificate(files)
            .with_context(|| format!("pools.{}.backend_client_certificate", pool.name))?;
        clients.push((running, loaded));
    }
    let mut reloaded = Reloaded {
        users: store.len(),
        organisations: store.organisations_len(),
        certificates: certificates
            .as_ref()
            .map_or(0, |(_, set)| set.certificates.len())
            + clients.len(),
        dns_names: None,
    };
    context.auth.replace_store(store);
    if let Some((running, set)) = certificates {
        running.resolver.replace(set);
    }
    for (running, loaded) in clients {
        running.replace(loaded);
    }
    for (transport, prepared) in roots {
        transport.install_roots(prepared);
    }
    report_certificates(&context.metrics, context.tls.as_ref(), &context.router);
    match context.router.resolver().reload() {
        Ok(names) => reloaded.dns_names = Some(names),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: the DNS configuration did not reload; backend host names resolve as before")
        }
    }
    Ok(reloaded)
}

fn listed(what: &str, errors: &[ConfigError]) -> anyhow::Error {
    anyhow::anyhow!(ConfigError::summary(what, errors))
}
