//! Listeners, the accept loop, connection tasks, shutdown and drain.
//!
//! The accept loop only accepts: handshakes, authentication and backend connects run inside
//! each connection's own task, under timeouts, so one connection's trouble never reaches the
//! listener.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::accounts::{AccountStore, Authenticator};
use crate::backend::BackendStream;
use crate::config::{Config, ConfigError, ListenerConfig, ListenerTls, Protocol};
use crate::health::Readiness;
use crate::limits::{ConnectionPermit, Limiter, Rejection, SessionPermit};
use crate::login::LoginResult;
use crate::metrics::{ConnectionGuard, ListenerMetrics, Metrics};
use crate::relay::RelayEnd;
use crate::routing::Router;
use crate::shutdown::{self, Phase, Shutdown};
use crate::smtp::backend::BackendExtensions;
use crate::tls::Tls;
use crate::workers::{self, Workers};

/// What every connection shares.
pub struct Context {
    /// The config the process started with: listeners, `tls`, `metrics` and
    /// `limits.tcp_keepalive` are its for as long as it runs, and a reload names what differs
    /// from it ([`Config::restart_only_changes`]).
    pub started: Config,
    /// The config of the last successful reload (the one it started with until then):
    /// `limits` (but `tcp_keepalive`), `messages` and `shutdown` are read from it at each
    /// connection, login, reply and shutdown ([`Context::current`]). Its routing is the
    /// router's, and its pools are what the reload put in place of them; its listeners, `tls`,
    /// `metrics` and `tcp_keepalive` are not in force: read those from `started`.
    current: ArcSwap<Config>,
    pub router: Router,
    pub auth: Authenticator,
    /// `None` when no listener uses TLS.
    pub tls: Option<Tls>,
    /// mailgate's name in SMTP greetings and EHLO.
    pub hostname: String,
    /// The SMTP extensions every submission backend offers (probed at start and by each
    /// health probe), shown to clients after mailgate's own changes.
    pub smtp_extensions: Arc<BackendExtensions>,
    pub metrics: Arc<Metrics>,
    /// Connection caps, sessions per user and address, failed-login budgets.
    pub limiter: Limiter,
    /// The server's own shutdown phase (what `serve` passes on), for tasks started later: the
    /// health checks of backends a reload adds.
    pub shutdown: Shutdown,
}

/// Sets the certificate expiry gauges to the certificates in use now: those served to clients
/// and those the pools present to their backends.
pub fn report_certificates(metrics: &Metrics, tls: Option<&Tls>, router: &Router) {
    let served = tls.map(|t| t.resolver.current());
    let clients = router.client_certificates();
    metrics.certificates(
        served
            .iter()
            .flat_map(|set| set.certificates.iter())
            .chain(clients.iter().map(|c| &**c)),
    );
}

impl Context {
    /// The config in force, for its `limits`, `messages` and `shutdown`. Each call takes what
    /// the last reload put in place; keep the result for as long as one decision needs the
    /// same values.
    pub fn current(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Puts a reloaded config in force for the next [`current`](Self::current), and its
    /// limits in the limiter.
    pub fn put_in_force(&self, config: Config) {
        self.limiter.apply(&config.limits);
        self.current.store(Arc::new(config));
    }

    /// Counts one login attempt under the pool `login` routes to (`none` when it routes
    /// nowhere, or when there is no name to route: a `tls_required` refusal).
    pub fn count_login(&self, protocol: Protocol, login: Option<&str>, result: LoginResult) {
        let route = login.and_then(|name| self.router.route(name));
        let pool = route.as_ref().map(|r| r.pool.name.as_str());
        self.metrics.login(protocol, pool, result);
    }
}

/// One bound listener.
pub struct Listener {
    pub config: ListenerConfig,
    /// The address actually bound (differs from the config's when it asked for port 0).
    pub local_addr: SocketAddr,
    /// This listener's connection counters.
    pub metrics: ListenerMetrics,
}

/// A listener and its sockets, one per worker (`workers`). Each socket stays with its accept
/// loop alone (connections share only the `Listener`), so it closes the moment draining
/// begins: new clients are refused at once instead of waiting in the kernel's accept queue.
struct Bound {
    listener: Listener,
    sockets: Vec<std::net::TcpListener>,
}

/// A server with its listeners bound, ready to serve.
pub struct Server {
    context: Arc<Context>,
    listeners: Vec<Bound>,
    /// The bound `/metrics` endpoint, when `metrics.address` is configured.
    metrics_socket: Option<TcpListener>,
    readiness: Arc<Readiness>,
    /// Moves `context.shutdown` on (`serve`).
    trigger: shutdown::Trigger,
    /// Where the connections run.
    workers: Workers,
}

impl Server {
    /// What the sessions share; a reload (`SIGHUP`) swaps account data and certificates in it.
    pub fn context(&self) -> Arc<Context> {
        self.context.clone()
    }

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
        let store = AccountStore::load(&config.accounts.path)
            .map_err(|errors| anyhow::anyhow!(ConfigError::summary("account data", &errors)))?;
        // Also builds each TLS pool's client config (roots, session cache), once.
        let router = Router::from_config(&config)?;
        let metrics = Metrics::new(&prometheus::Registry::new(), &config).context("metrics")?;
        report_certificates(&metrics, tls.as_ref(), &router);
        let worker_count = workers::count();
        let keepalive = config.limits.keepalive();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let (local_addr, sockets) = workers::bind(l.address, worker_count, keepalive)
                .with_context(|| format!("listeners `{}`: cannot bind {}", l.name, l.address))?;
            listeners.push(Bound {
                listener: Listener {
                    config: l.clone(),
                    local_addr,
                    metrics: metrics
                        .listener(&l.name)
                        .with_context(|| format!("listeners `{}`: no metrics", l.name))?,
                },
                sockets,
            });
        }
        let metrics_socket = match &config.metrics {
            Some(m) => Some(
                TcpListener::bind(m.address)
                    .await
                    .with_context(|| format!("metrics: cannot bind {}", m.address))?,
            ),
            None => None,
        };
        let readiness = Arc::new(Readiness::new(&config, &router));
        let auth = Authenticator::new(store).counting_hashes_in(metrics.password_hashes());
        let hostname = hostname(tls.as_ref());
        let smtp_extensions = Arc::new(BackendExtensions::new(&hostname));
        probe_smtp(&config, &router, &smtp_extensions).await;
        let limiter = Limiter::new(&config.limits);
        let (trigger, inner) = shutdown::channel();
        let workers = Workers::start(worker_count).context("starting the worker threads")?;
        Ok(Server {
            context: Arc::new(Context {
                current: ArcSwap::from_pointee(config.clone()),
                started: config,
                router,
                auth,
                tls,
                hostname,
                smtp_extensions,
                metrics: Arc::new(metrics),
                limiter,
                shutdown: inner,
            }),
            trigger,
            listeners,
            metrics_socket,
            readiness,
            workers,
        })
    }

    /// The bound addresses, by listener name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|b| (b.listener.config.name.clone(), b.listener.local_addr))
            .collect()
    }

    /// The bound address of the metrics endpoint, if one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_socket
            .as_ref()
            .and_then(|s| s.local_addr().ok())
    }

    /// Serves until `shutdown`: on `Draining`, stops accepting and lets sessions finish until
    /// `shutdown.drain_timeout`; then (or on `Closing`) closes the rest.
    pub async fn serve(self, mut outer: Shutdown) {
        let (trigger, inner) = (self.trigger, self.context.shutdown.clone());
        let tracker = TaskTracker::new();
        crate::health::spawn_checkers(
            &self.context.router,
            &self.context.metrics,
            &self.context.smtp_extensions,
            &inner,
        );
        tokio::spawn(prune_limits(self.context.clone(), inner.clone()));
        if let Some(socket) = self.metrics_socket {
            if let Ok(address) = socket.local_addr() {
                tracing::info!(address = %address, "metrics listening");
            }
            tokio::spawn(crate::metrics::serve(
                socket,
                self.context.metrics.clone(),
                self.readiness.clone(),
                inner.clone(),
            ));
        }
        for bound in self.listeners {
            let listener = Arc::new(bound.listener);
            tracing::info!(
                listener = %listener.config.name,
                protocol = %listener.config.protocol.as_str(),
                address = %listener.local_addr,
                tls = ?listener.config.tls,
                workers = self.workers.handles().len(),
                "listening"
            );
            for (socket, worker) in bound.sockets.into_iter().zip(self.workers.handles()) {
                tracker.spawn_on(
                    accept_loop(
                        listener.clone(),
                        socket,
                        self.context.clone(),
                        inner.clone(),
                        tracker.clone(),
                    ),
                    worker,
                );
            }
        }
        self.readiness.set_listening(true);
        outer.reached(Phase::Draining).await;
        self.readiness.set_listening(false);
        trigger.advance(Phase::Draining);
        tracker.close();
        let drain = self.context.current().shutdown.drain_timeout.0;
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
        // The sessions still left are dropped with their worker.
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    }
}

/// The name mailgate gives itself: the certificate name meant for SMTP (`smtp.` first), else
/// the default certificate's first name.
fn hostname(tls: Option<&Tls>) -> String {
    let set = tls.map(|t| t.resolver.current());
    let names: Vec<String> = set
        .iter()
        .flat_map(|s| s.certificates.iter().flat_map(|c| c.names.iter().cloned()))
        .filter(|n| !n.starts_with('*'))
        .collect();
    names
        .iter()
        .find(|n| n.starts_with("smtp."))
        .or(names.first())
        .cloned()
        .unwrap_or_else(|| "localhost".to_string())
}

/// Asks every SMTP backend for its EHLO extensions before the first client arrives.
async fn probe_smtp(config: &Config, router: &Router, extensions: &BackendExtensions) {
    if !config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Smtp)
    {
        return;
    }
    let mut answered = false;
    for pool in router.pools() {
        for backend in &pool.backends().smtp {
            match extensions
                .probe(&backend.address, &pool.transport, pool.connect_timeout())
                .await
            {
                Ok(()) => answered = true,
                Err(e) => {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, error = %e, "SMTP backend probe failed")
                }
            }
        }
    }
    if !answered {
        tracing::warn!(
            "no SMTP backend answered the EHLO probe; offering a minimal extension list until one does"
        );
    }
}

/// Forgets forgiven failed-login state and gives back memory, every `PRUNE_INTERVAL`.
async fn prune_limits(context: Arc<Context>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(crate::limits::PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => context.limiter.prune(),
            () = shutdown.reached(Phase::Closing) => return,
        }
    }
}

/// Runs on a worker: the connections `socket` accepts are served on that worker.
async fn accept_loop(
    listener: Arc<Listener>,
    socket: std::net::TcpListener,
    context: Arc<Context>,
    mut shutdown: Shutdown,
    tracker: TaskTracker,
) {
    // Registered with this worker's runtime, as is every socket accepted from it.
    let socket = match TcpListener::from_std(socket) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!(listener = %listener.config.name, error = %e, "cannot register the listening socket");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            // Returning drops the socket: the port closes.
            () = shutdown.reached(Phase::Draining) => return,
        };
        match accepted {
            Ok((stream, peer)) if listener.config.proxy_protocol => {
                // The header is read on the connection's own task: a slow balancer must not
                // hold up the accept loop.
                let (listener, context, shutdown) =
                    (listener.clone(), context.clone(), shutdown.clone());
                tracker.spawn(async move {
                    if let Some((stream, client)) = proxied(&listener, &context, stream, peer).await
                    {
                        if let Some(connection) =
                            admit(&listener, &context, &shutdown, &stream, client)
                        {
                            connection.serve(stream).await;
                        }
                    }
                });
            }
            Ok((stream, peer)) => {
                if let Some(connection) = admit(&listener, &context, &shutdown, &stream, peer) {
                    tracker.spawn(connection.serve(stream));
                }
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %listener.config.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The connection's place under the caps for `client`, or (after the refusal) `None`.
fn admit(
    listener: &Arc<Listener>,
    context: &Arc<Context>,
    shutdown: &Shutdown,
    stream: &TcpStream,
    client: SocketAddr,
) -> Option<Connection> {
    match context.limiter.admit(client.ip()) {
        Ok(permit) => Some(Connection {
            permit,
            metered: listener.metrics.accepted(),
            context: context.clone(),
            listener: listener.clone(),
            peer: client,
            shutdown: shutdown.clone(),
            id: session_id(),
            start: Instant::now(),
        }),
        Err(reason) => {
            refuse(listener, stream, client, reason);
            None
        }
    }
}

/// On a `proxy_protocol` listener: the client a trusted balancer names in its PROXY header
/// (its own address for a `LOCAL`/`UNKNOWN` header, e.g. its health check). A peer outside
/// `limits.trusted_proxies`, or no valid header within `limits.handshake_timeout`, and the
/// connection is closed without a word (a plaintext line would reach the balancer, not a mail
/// client).
async fn proxied(
    listener: &Listener,
    context: &Context,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    let peer_ip = peer.ip().to_canonical();
    let current = context.current();
    let trusted = current
        .limits
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer_ip));
    let reason = if trusted {
        let timeout = current.limits.handshake_timeout.0;
        match tokio::time::timeout(timeout, crate::proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(client)) => return Some((stream, client.unwrap_or(peer))),
            Ok(Err(e)) => {
                tracing::warn!(listener = %listener.config.name, proxy = %peer, error = %e, "connection closed: PROXY header");
                Rejection::ProxyHeader
            }
            Err(_) => {
                tracing::warn!(listener = %listener.config.name, proxy = %peer, "connection closed: no PROXY header within limits.handshake_timeout");
                Rejection::ProxyHeader
            }
        }
    } else {
        // Debug: anyone can connect; the metric counts them.
        tracing::debug!(listener = %listener.config.name, peer = %peer, "connection closed: peer not in limits.trusted_proxies");
        Rejection::UntrustedProxy
    };
    listener.metrics.rejected(reason);
    None
}

/// IMAP's and SMTP's last word to a connection over a cap, before any TLS.
const IMAP_TOO_MANY: &[u8] = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n";
const SMTP_TOO_MANY: &[u8] = b"421 4.7.0 Too many connections, try again later\r\n";

/// Turns away a connection over a cap, without waiting for anything: on a plaintext or
/// STARTTLS listener one line, if the socket takes it at once; on an implicit-TLS listener
/// nothing (no handshake work for a flood). The caller closes it by dropping it.
fn refuse(listener: &Listener, stream: &TcpStream, peer: SocketAddr, reason: Rejection) {
    listener.metrics.rejected(reason);
    if listener.config.tls != ListenerTls::Implicit {
        let line = match listener.config.protocol {
            Protocol::Imap => IMAP_TOO_MANY,
            Protocol::Smtp => SMTP_TOO_MANY,
        };
        // A fresh socket's send buffer is empty: one non-blocking send takes the line or fails.
        // Straight to the socket: tokio's `try_write` would say "would block" until the
        // reactor has seen the new socket writable.
        let _ = socket2::SockRef::from(stream).send(line);
    }
    // Debug, not info: under a flood this would be a line per refused connection; the
    // metric counts them.
    tracing::debug!(
        target: "mailgate::session",
        listener = %listener.config.name,
        client = %peer,
        end = reason.as_str(),
        "connection refused"
    );
}

/// One accepted client connection.
pub struct Connection {
    pub context: Arc<Context>,
    pub listener: Arc<Listener>,
    pub peer: SocketAddr,
    pub shutdown: Shutdown,
    pub id: String,
    pub start: Instant,
    /// Keeps the connection counted as active until it is dropped.
    pub metered: ConnectionGuard,
    /// Its place under `max_connections` / `max_connections_per_ip`, given back on drop.
    pub permit: ConnectionPermit,
}

impl Connection {
    /// The pre-auth phase (TLS, session, login) runs as one boxed future, freed when it ends:
    /// a spliced session, which may live for hours, keeps only the splice's own state.
    async fn serve(self, stream: TcpStream) {
        let spliced = match self.listener.config.protocol {
            Protocol::Imap => {
                Box::pin(crate::preauth::serve(
                    &crate::imap::proxy::Imap,
                    self,
                    stream,
                ))
                .await
            }
            Protocol::Smtp => {
                Box::pin(crate::preauth::serve(
                    &crate::smtp::proxy::Smtp,
                    self,
                    stream,
                ))
                .await
            }
        };
        if let Some(spliced) = spliced {
            spliced.run().await;
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr
    }

    /// One login attempt's outcome: its word in the session's log line and its count in
    /// `mailgate_logins_total` (pool: the one `login` routes to; `none` without a name).
    pub fn record_login(&self, log: &mut SessionLog, login: Option<&str>, result: LoginResult) {
        log.result = result.as_str();
        self.context
            .count_login(self.listener.config.protocol, login, result);
    }

    /// The server side of a TLS handshake, under the handshake timeout; `first` (may be
    /// empty) goes with the server's flight where TLS 1.3 allows it, and the `bool` says
    /// whether it went. A failure is the client's business: logged at debug, recorded in the
    /// session log.
    pub async fn tls_handshake(
        &self,
        log: &mut SessionLog,
        tcp: TcpStream,
        first: &[u8],
    ) -> Option<(TlsStream, bool)> {
        let Some(tls) = self.context.tls.as_ref() else {
            log.end = "tls_unconfigured";
            return None;
        };
        let limit = self.context.current().limits.handshake_timeout.0;
        let handshake = crate::tls_stream::accept(tls.config.clone(), tcp, first);
        match tokio::time::timeout(limit, handshake).await {
            Ok(Ok(accepted)) => Some(accepted),
            Ok(Err(e)) => {
                tracing::debug!(session = %self.id, error = %e, "TLS handshake failed");
                self.listener.metrics.tls_handshake_failed();
                log.end = "tls_handshake_failed";
                None
            }
            Err(_) => {
                self.listener.metrics.tls_handshake_failed();
                log.end = "tls_handshake_timeout";
                None
            }
        }
    }
}

pub type TlsStream = crate::tls_stream::LeanTlsStream;

/// The client's side of a connection: plain TCP, or TLS (boxed: a rustls connection is more
/// than a kilobyte, and most of the code does not care which it is).
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl From<TcpStream> for ClientStream {
    fn from(stream: TcpStream) -> Self {
        ClientStream::Plain(stream)
    }
}

impl From<TlsStream> for ClientStream {
    fn from(stream: TlsStream) -> Self {
        ClientStream::Tls(Box::new(stream))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A logged-in session, handed from the protocol's pre-auth phase to the splice: the one
/// splice both protocols share.
pub struct Spliced {
    pub conn: Connection,
    pub log: SessionLog,
    pub client: ClientStream,
    pub backend: BackendStream,
    /// The protocol's goodbye when the drain deadline passes (`* BYE ...`, `421 ...`).
    pub bye_shutdown: &'static [u8],
    /// ... and after the idle timeout.
    pub bye_idle: &'static [u8],
    /// The login's place under `max_sessions_per_user_ip`, given back when the splice ends.
    pub session: SessionPermit,
    /// The IMAP-aware relay's filter, for accounts with folder or delete rules; `None`: the
    /// plain splice.
    pub aware: Option<Box<AwareSession>>,
}

/// An IMAP session for the aware relay (`imap::aware_relay`).
pub struct AwareSession {
    pub filter: crate::imap::aware::Aware,
    /// What the client sent after its login, for the filter before the backend.
    pub pipelined: bytes::BytesMut,
}

impl Spliced {
    /// Relays until either side is done, the idle timeout, or the drain deadline; then the
    /// goodbye, the byte counts and the session's log line.
    pub async fn run(self) {
        let Spliced {
            mut conn,
            mut log,
            mut client,
            mut backend,
            bye_shutdown,
            bye_idle,
            session,
            aware,
        } = self;
        let protocol = conn.listener.config.protocol;
        let idle = conn.context.current().limits.idle_timeout.0;
        let context = conn.context.clone();
        let meter = context.metrics.relay_meter(protocol);
        let (end, stats) = match aware {
            Some(aware) => {
                let AwareSession { filter, pipelined } = *aware;
                // Boxed: inline, its state would make every spliced session's task larger.
                Box::pin(crate::imap::aware_relay::relay(
                    &mut client,
                    &mut backend,
                    filter,
                    &pipelined,
                    idle,
                    &mut conn.shutdown,
                    meter,
                ))
                .await
            }
            None => {
                crate::relay::splice(&mut client, &mut backend, idle, &mut conn.shutdown, meter)
                    .await
            }
        };
        log.client_to_backend += stats.client_to_backend;
        log.backend_to_client += stats.backend_to_client;
        log.end = end.as_str();
        match end {
            RelayEnd::Shutdown => goodbye(&mut client, bye_shutdown).await,
            RelayEnd::IdleTimeout => goodbye(&mut client, bye_idle).await,
            RelayEnd::Closed | RelayEnd::PeerTimeout | RelayEnd::Error => {}
        }
        log.emit(&conn);
        drop(session);
    }
}

/// How long a goodbye may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes and flushes (a TLS stream sends nothing until flushed).
///
/// # Errors
/// The peer is gone.
pub async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Best effort: a last line and a close, bounded in time.
pub async fn goodbye<S: AsyncWrite + Unpin>(stream: &mut S, line: &[u8]) {
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        write(stream, line).await?;
        stream.shutdown().await
    })
    .await;
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
            protocol = %conn.listener.config.protocol.as_str(),
            client = %conn.peer,
            user = %self.user.as_deref().unwrap_or("-"),
            pool = %self.pool.as_deref().unwrap_or("-"),
            backend = %self.backend.as_deref().unwrap_or("-"),
            result = %self.result,
            end = %self.end,
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
