//! mailgate: an IMAP and SMTP-submission reverse proxy.
//!
//! A client connects to a listener (`server`), gets TLS (`tls`), talks to a pure pre-auth
//! session (`imap::session`, `smtp::session`) until it logs in; the login is checked against
//! the account rules (`accounts`, `policy`, `login`), routed to a pool and a backend
//! (`routing`), logged in there (`imap::backend`, `smtp::backend`), and then spliced
//! (`relay`) until either side closes.
//!
//! # Layout
//!
//! - `config`: the YAML schema, defaults and validation (file:line:key errors).
//! - `server`: listeners, accept loop, connection tasks, drain; `shutdown`: the phases;
//!   `workers`: the thread-per-core runtimes the connections run on, `SO_REUSEPORT` sockets.
//! - `tls`: rustls server config, certificate by SNI, development certificate;
//!   `tls_stream`: the client side's TLS stream, which holds no buffers while idle.
//! - `preauth`: what both protocols share before login (the listener's TLS mode, STARTTLS,
//!   the pre-auth deadline and drain, the hand-over to the splice).
//! - `imap/`, `smtp/`: per protocol, the pure session, the reply mapping, the backend login
//!   and the pre-auth driver (`proxy`: the session loop, authorize, backend login).
//! - `backend`: the backend connection (plain or TLS) and the try-the-next-backend loop;
//!   `resolver`: backend host names to addresses (hickory, TTL cache, serve-stale).
//! - `accounts/`: account data, password verification and its cache; `policy`: the rules.
//! - `login`: the outcome words and the authorize step both protocols share.
//! - `routing`: login → pool → backend order (rendezvous hashing).
//! - `limits`: connection caps, sessions per user and address, failed-login budgets.
//! - `relay`: the splice; `buffers`: the per-thread buffer pool it and `tls_stream` share.
//! - `metrics`: the Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint;
//!   `health`: backend health checks and readiness.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod backend;
pub mod buffers;
pub mod config;
pub mod health;
pub mod imap;
pub mod keepalive;
pub mod limits;
pub mod login;
pub mod metrics;
pub mod policy;
pub mod preauth;
#[cfg(test)]
mod prop_support;
pub mod proxy_protocol;
pub mod relay;
pub mod reload;
pub mod resolver;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod tls;
pub mod tls_provider;
pub mod tls_stream;
pub mod workers;

/// Binds every listener of `config` and serves until `shutdown` says stop.
///
/// # Errors
/// Anything that stops the server from starting (certificates, account data, binding).
pub async fn run(config: config::Config, shutdown: shutdown::Shutdown) -> anyhow::Result<()> {
    server::Server::bind(config).await?.serve(shutdown).await;
    Ok(())
}
