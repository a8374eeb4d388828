//! `SIGHUP`: reload what changes while mailgate runs — the account data (a user turns IMAP on,
//! changes a password, adds an app password), the certificates (a renewal, of those served to
//! clients and of the pools' `backend_client_certificate`), the CAs the pools trust
//! (`backend_ca`, or the system's trust store) and the pools' backend lists (a backend added,
//! drained or replaced) — without touching a session.
//! The config file is read and checked again in full; from it the account file and the
//! certificate files are loaded, and only when everything loaded is it all swapped in, so a
//! reload that fails changes nothing. Then the backend-name resolver reads
//! `/etc/hosts` and `/etc/resolv.conf` again and forgets its cached answers; when it cannot,
//! it keeps what it had, with a warning, and the reload still counts as done: a broken
//! `/etc/resolv.conf` must not hold back an account change.
//!
//! A pool's new backend lists are in place for the next login: a backend that stays keeps its
//! health state and check; one that is new starts up and is probed at once; one that is gone
//! stops being probed and chosen, its `mailgate_backend_up` series is dropped, and the sessions
//! spliced to it go on until they end. A pool's master user and password (`password`, or
//! `password_file` read again) are the next login's.
//!
//! `routing`, `limits` (but `tcp_keepalive`), `messages` and `shutdown` are in force for what
//! comes next: a login routed, a connection accepted, a login checked, a reply written, a
//! shutdown begun. A session routed before keeps its pool and backend; routing that names a
//! pool new since the start waits for the restart (with a warning), and the running routing
//! stays. A session open
//! already keeps the timeouts and the attempt budget it started with, and none is closed for
//! being over a lowered cap: the caps count it and let no new one in until it is under them.
//! A failure budget whose rate changed starts afresh. Each setting changed is named at info.
//!
//! Other settings (listeners, `tls.self_signed_if_missing`, `limits.tcp_keepalive`,
//! new pools, a pool's `backend_tls`, login mode, `smtp_login` and health settings, metrics)
//! take effect at the next start, and each one changed against the config the process started
//! with is named in a warning, at every reload until then.

use std::path::Path;

use anyhow::Context as _;

use crate::accounts::AccountStore;
use crate::backend::load_client_certificate;
use crate::config::{Config, ConfigError, LoginConfig, Protocol, RESTART_CHANGE};
use crate::health;
use crate::routing::{BackendChange, ImapLogin, Pool, RouterError};
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
    /// Backends the pools gained and lost (per pool and protocol).
    pub backends_added: usize,
    pub backends_removed: usize,
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
    let mut changes = Vec::new();
    let mut logins = Vec::new();
    for name in config.pools.keys() {
        if !context.router.pools().any(|pool| &pool.name == name) {
            let change = config.at(
                format!("pools.{name}"),
                "new; it serves from the next start",
            );
            tracing::warn!(pool = %name, "SIGHUP: {change}");
        }
    }
    // A pool's setting that waits for a restart, named with its line in the new file.
    let waits = |pool: &Pool, key: &str, message: &str| {
        let change = config.at(format!("pools.{}.{key}", pool.name), message);
        tracing::warn!(pool = %pool.name, "SIGHUP: {change}");
    };
    for pool in context.router.pools() {
        let Some(configured) = config.pools.get(&pool.name) else {
            let change = config.at(
                format!("pools.{}", pool.name),
                "gone from the config; the pool serves until a restart",
            );
            tracing::warn!(pool = %pool.name, "SIGHUP: {change}");
            continue;
        };
        if configured.health != pool.health {
            waits(pool, "health", RESTART_CHANGE);
        }
        // A master login takes its new user and password (a rotated password_file is read
        // again); a change of mode waits for a restart, as smtp_login does.
        let running = pool.imap_login();
        match (&configured.login, &*running) {
            (LoginConfig::Passthrough, ImapLogin::Passthrough) => {}
            (LoginConfig::Master { .. }, ImapLogin::Master { .. }) => {
                let login = ImapLogin::from_config(&configured.login)
                    .with_context(|| format!("pools.{}.login", pool.name))?;
                if login != *running {
                    logins.push((pool, login));
                }
            }
            _ => {
                waits(pool, "login.mode", RESTART_CHANGE);
            }
        }
        if configured.smtp_login != pool.smtp_login {
            waits(pool, "smtp_login", RESTART_CHANGE);
        }
        if configured.backend_tls != pool.transport.mode() {
            // New backends would be spoken to as the old ones are: the lists wait too.
            waits(
                pool,
                "backend_tls",
                "changed; it and the pool's backends take effect at a restart",
            );
        } else {
            if let Some(prepared) = pool
                .transport
                .prepare_roots(configured.backend_ca.as_deref())
                .with_context(|| format!("pools.{}", pool.name))?
            {
                roots.push((&pool.transport, prepared));
            }
            let change = pool.prepare_backends(configured);
            if !change.is_empty() {
                changes.push((pool, change));
            }
        }
        let Some(running) = pool.transport.client_certificate() else {
            continue;
        };
        let Some(files) = &configured.backend_client_certificate else {
            waits(
                pool,
                "backend_client_certificate",
                "gone from the config; the pool presents its certificate until a restart",
            );
            continue;
        };
        let loaded = load_client_certificate(files)
            .with_context(|| format!("pools.{}.backend_client_certificate", pool.name))?;
        clients.push((running, loaded));
    }
    // The routes over the running pools; routing that names a pool new since the start waits
    // for it (and the restart), and the routing in force stays what it is.
    let mut config = config;
    let routes = match context.router.prepare_routes(&config.routing) {
        Ok(routes) => Some(routes),
        Err(e) => {
            let why = match e {
                RouterError::UnknownPool(name) => {
                    format!("names pools.{name}, new since the start")
                }
                other => other.to_string(),
            };
            let change = config.at(
                "routing".into(),
                format!("{why}; the routing in force stays until a restart"),
            );
            tracing::warn!("SIGHUP: {change}");
            config.routing = context.current().routing.clone();
            None
        }
    };
    let mut reloaded = Reloaded {
        users: store.len(),
        organisations: store.organisations_len(),
        certificates: certificates
            .as_ref()
            .map_or(0, |(_, set)| set.certificates.len())
            + clients.len(),
        dns_names: None,
        backends_added: changes.iter().map(|(_, c)| c.added.len()).sum(),
        backends_removed: changes.iter().map(|(_, c)| c.removed.len()).sum(),
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
    for (pool, change) in &mut changes {
        pool.install_backends(change);
    }
    if let Some(routes) = routes {
        context.router.install_routes(routes);
    }
    for (pool, login) in logins {
        pool.install_imap_login(login);
        tracing::info!(pool = %pool.name, "SIGHUP: pools.{}.login: the master user or password changed; the next login uses it", pool.name);
    }
    settle_backends(context, &changes);
    for change in context.started.restart_only_changes(&config) {
        tracing::warn!("SIGHUP: {change}");
    }
    for change in context.current().live_changes(&config) {
        tracing::info!("SIGHUP: {change}");
    }
    context.put_in_force(config);
    report_certificates(&context.metrics, context.tls.as_ref(), &context.router);
    match context.router.resolver().reload() {
        Ok(names) => reloaded.dns_names = Some(names),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: the DNS configuration did not reload; backend host names resolve as before")
        }
    }
    Ok(reloaded)
}

/// After new backend lists are in place: starts the checks of the added backends, stops those
/// of the removed ones, drops their `mailgate_backend_up` series and the SMTP extension lists
/// of backends no pool has any more.
fn settle_backends(context: &Context, changes: &[(&std::sync::Arc<Pool>, BackendChange)]) {
    for (pool, change) in changes {
        let now = pool.backends();
        for (protocol, backend) in &change.removed {
            backend.health().retire();
            if !now.contains(&backend.address) {
                context.metrics.remove_backend(&pool.name, &backend.address);
            }
            tracing::info!(pool = %pool.name, protocol = protocol.as_str(), backend = %backend.address, "SIGHUP: backend removed; its sessions go on until they end");
        }
        for (protocol, backend) in &change.added {
            tracing::info!(pool = %pool.name, protocol = protocol.as_str(), backend = %backend.address, "SIGHUP: backend added");
            health::spawn_checker(
                pool,
                *protocol,
                backend,
                &context.metrics,
                &context.smtp_extensions,
                &context.shutdown,
            );
        }
    }
    let gone: Vec<&str> = changes
        .iter()
        .flat_map(|(_, change)| &change.removed)
        .filter(|(protocol, _)| *protocol == Protocol::Smtp)
        .map(|(_, backend)| backend.address.as_str())
        .filter(|address| {
            !context
                .router
                .pools()
                .any(|pool| pool.backends().smtp.iter().any(|b| &b.address == address))
        })
        .collect();
    context.smtp_extensions.forget(&gone);
}

fn listed(what: &str, errors: &[ConfigError]) -> anyhow::Error {
    anyhow::anyhow!(ConfigError::summary(what, errors))
}
