//! Listeners, the accept loop, connection tasks, shutdown and drain.
//!
//! The accept loop only accepts: handshakes, authentication and backend connects run inside
//! each connection's own task, under timeouts, so one connection's trouble never reaches the
//! listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::accounts::{AccountStore, Authenticator};
use crate::config::{Config, ListenerConfig, ListenerTls, Protocol};
use crate::routing::Router;
use crate::shutdown::{self, Phase, Shutdown};
use crate::tls::Tls;

/// What every connection shares.
pub struct Context {
    pub config: Config,
    pub router: Router,
    pub auth: Authenticator,
    /// `None` when no listener uses TLS.
    pub tls: Option<Tls>,
}

/// One bound listener.
pub struct Listener {
    pub config: ListenerConfig,
    /// The address actually bound (differs from the config's when it asked for port 0).
    pub local_addr: SocketAddr,
    socket: TcpListener,
}

/// A server with its listeners bound, ready to serve.
pub struct Server {
    context: Arc<Context>,
    listeners: Vec<Listener>,
}

impl Server {
    /// Builds everything from a validated config (certificates, accounts, routes), then binds
    /// every listener. Nothing is bound unless all of it succeeded.
    ///
    /// # Errors
    /// A certificate, account file or pool that cannot be used, or an address that cannot be
    /// bound.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let uses_tls = config.listeners.iter().any(|l| l.tls != ListenerTls::None);
        let tls = if uses_tls {
            Some(Tls::from_config(&config.tls).context("TLS certificates")?)
        } else {
            None
        };
        let store = AccountStore::load(&config.accounts.path).map_err(|errors| {
            anyhow::anyhow!(
                "account data:\n{}",
                errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n")
            )
        })?;
        let router = Router::from_config(&config)?;
        for pool in router.pools() {
            if pool.backend_tls != crate::config::BackendTls::None {
                anyhow::bail!(
                    "pools.{}.backend_tls: TLS to the backend is not supported by this version; use `none` \
                     (backends on a trusted network or loopback)",
                    pool.name
                );
            }
        }
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket = TcpListener::bind(l.address)
                .await
                .with_context(|| format!("listeners `{}`: cannot bind {}", l.name, l.address))?;
            let local_addr = socket.local_addr()?;
            listeners.push(Listener {
                config: l.clone(),
                local_addr,
                socket,
            });
        }
        let auth = Authenticator::new(store);
        Ok(Server {
            context: Arc::new(Context {
                config,
                router,
                auth,
                tls,
            }),
            listeners,
        })
    }

    /// The bound addresses, by listener name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.config.name.clone(), l.local_addr))
            .collect()
    }

    /// Serves until `shutdown`: on `Draining`, stops accepting and lets sessions finish until
    /// `shutdown.drain_timeout`; then (or on `Closing`) closes the rest.
    pub async fn serve(self, mut outer: Shutdown) {
        let (trigger, inner) = shutdown::channel();
        let tracker = TaskTracker::new();
        for listener in self.listeners {
            tracing::info!(
                listener = %listener.config.name,
                protocol = listener.config.protocol.as_str(),
                address = %listener.local_addr,
                tls = ?listener.config.tls,
                "listening"
            );
            tracker.spawn(accept_loop(
                listener,
                self.context.clone(),
                inner.clone(),
                tracker.clone(),
            ));
        }
        outer.reached(Phase::Draining).await;
        trigger.advance(Phase::Draining);
        tracker.close();
        let drain = self.context.config.shutdown.drain_timeout.0;
        tracing::info!(drain_timeout = ?drain, sessions = tracker.len(), "draining");
        tokio::select! {
            () = tracker.wait() => {}
            () = tokio::time::sleep(drain) => {}
            () = outer.reached(Phase::Closing) => {}
        }
        trigger.advance(Phase::Closing);
        // Sessions say goodbye and close at once; don't wait for a stuck peer forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        tracing::info!(left = tracker.len(), "stopped");
    }
}

async fn accept_loop(
    listener: Listener,
    context: Arc<Context>,
    mut shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let listener = Arc::new(listener);
    loop {
        let accepted = tokio::select! {
            r = listener.socket.accept() => r,
            () = shutdown.reached(Phase::Draining) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let connection = Connection {
                    context: context.clone(),
                    listener: listener.clone(),
                    peer,
                    shutdown: shutdown.clone(),
                    id: session_id(),
                    start: Instant::now(),
                };
                tracker.spawn(connection.serve(stream));
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %listener.config.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One accepted client connection.
pub struct Connection {
    pub context: Arc<Context>,
    pub listener: Arc<Listener>,
    pub peer: SocketAddr,
    pub shutdown: Shutdown,
    pub id: String,
    pub start: Instant,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        match self.listener.config.protocol {
            Protocol::Imap => crate::imap::proxy::serve(self, stream).await,
            Protocol::Smtp => crate::smtp::proxy::serve(self, stream).await,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr
    }
}

/// The one log line a session leaves.
#[derive(Debug, Default)]
pub struct SessionLog {
    pub user: Option<String>,
    pub pool: Option<String>,
    pub backend: Option<String>,
    /// The last login result word, or how the session ended before any login.
    pub result: &'static str,
    pub end: &'static str,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

impl SessionLog {
    pub fn new() -> SessionLog {
        SessionLog {
            result: "none",
            end: "closed",
            ..SessionLog::default()
        }
    }

    pub fn emit(&self, conn: &Connection) {
        tracing::info!(
            target: "mailgate::session",
            session = %conn.id,
            listener = %conn.listener.config.name,
            protocol = conn.listener.config.protocol.as_str(),
            client = %conn.peer,
            user = self.user.as_deref().unwrap_or("-"),
            pool = self.pool.as_deref().unwrap_or("-"),
            backend = self.backend.as_deref().unwrap_or("-"),
            result = self.result,
            end = self.end,
            bytes_in = self.client_to_backend,
            bytes_out = self.backend_to_client,
            duration_ms = u64::try_from(conn.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            "session"
        );
    }
}

/// 16 hex digits, random: unique enough to find a session across mailgate's and the
/// backend's logs.
fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
