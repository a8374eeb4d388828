//! What both protocols' backend logins share: the connect step, the TLS to the backend, and
//! the error that says whether the next backend in the user's order may serve.
//!
//! A pool reaches its backends in plaintext, with STARTTLS, or with implicit TLS
//! ([`Transport`]), by IP address or by host name (resolved by [`Resolver`], which caches
//! answers for their TTL and keeps the last good one through a DNS outage). TLS to a backend
//! always verifies its certificate against the host part of the backend's address (DNS name
//! or IP address), with the pool's `backend_ca` bundle or the system's trust store; there is
//! no way to turn verification off. A backend that asks for a client certificate gets the
//! pool's `backend_client_certificate` ([`ClientCertificate`], re-read at a reload), or none
//! ([`CertificateRequests`]: the pool then stops resuming TLS sessions, which Dovecot fails once
//! it verifies clients). A reload also reads the trusted CAs again
//! ([`Transport::prepare_roots`]).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, NamedGroup, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendTls, CertificateConfig, HostPort, Protocol};
use crate::keepalive::Keepalive;
use crate::metrics::Metrics;
use crate::resolver::Resolver;
use crate::routing::Pool;
use crate::tls::{LoadedCertificate, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Could not connect, or the backend turned us away at once (BYE / 421 greeting):
    /// another backend may serve.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The backend refused the login, with its response code (IMAP) or reply code (SMTP)
    /// if it gave one.
    #[error("login refused{}", code.as_deref().map(|c| format!(" [{c}]")).unwrap_or_default())]
    Refused { code: Option<String> },
    /// The backend broke the protocol, closed, or was too slow after connect.
    #[error("backend failed: {0}")]
    Failed(String),
}

impl BackendError {
    /// Whether the next backend in the user's order should be tried.
    pub fn try_next(&self) -> bool {
        matches!(self, BackendError::Unreachable(_))
    }
}

/// Resolves `address` (IP literals at once, host names from the resolver's TTL cache or DNS),
/// then connects to its addresses in order, as `TcpStream::connect` does, with `TCP_NODELAY`
/// (login exchanges are small round trips) and `keepalive`. `timeout` bounds the whole step,
/// DNS included.
///
/// # Errors
/// `Unreachable` on DNS failure, refusal or timeout.
async fn connect_tcp(
    resolver: &Resolver,
    address: &str,
    timeout: Duration,
    keepalive: Option<Keepalive>,
) -> Result<TcpStream, BackendError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let addrs = tokio::time::timeout_at(deadline, resolver.resolve(address))
        .await
        .map_err(|_| BackendError::Unreachable(format!("{address}: name resolution timed out")))?
        .map_err(|e| BackendError::Unreachable(e.to_string()))?;
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                if let Some(keepalive) = keepalive {
                    // As `TCP_NODELAY`: a connection without it still works.
                    let _ = keepalive.apply(socket2::SockRef::from(&stream));
                }
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                return Err(BackendError::Unreachable(format!(
                    "{address}: connect timed out"
                )))
            }
        }
    }
    Err(BackendError::Unreachable(match last {
        Some(e) => format!("{address}: {e}"),
        None => format!("{address}: no addresses"),
    }))
}

/// How a pool reaches its backends: the resolver for their host names (shared by every pool,
/// so each name has one cache), and plaintext or TLS.
#[derive(Clone, Debug)]
pub struct Transport {
    resolver: Resolver,
    tls: Tls,
    client: Option<Arc<ClientCertificate>>,
    /// A TLS pool without a certificate: whether a backend asked for one.
    requests: Option<Arc<CertificateRequests>>,
    /// `limits.tcp_keepalive` for every backend connection (`None`: the kernel's defaults).
    keepalive: Option<Keepalive>,
}

/// The certificate a pool presents to backends that ask for one. A reload replaces it whole;
/// handshakes under way keep the one they took.
#[derive(Debug)]
pub struct ClientCertificate {
    current: ArcSwap<LoadedCertificate>,
}

impl ClientCertificate {
    /// Reads the chain and key of a pool's `backend_client_certificate`.
    ///
    /// # Errors
    /// Missing or unparsable files, or a key that does not belong to the certificate.
    pub fn load(config: &CertificateConfig) -> Result<ClientCertificate, TlsError> {
        Ok(ClientCertificate {
            current: ArcSwap::from_pointee(load_client_certificate(config)?),
        })
    }

    /// Puts a certificate loaded by [`load_client_certificate`] in place (reload).
    pub fn replace(&self, loaded: LoadedCertificate) {
        self.current.store(Arc::new(loaded));
    }

    /// The certificate in use: for the expiry metric.
    pub fn current(&self) -> Arc<LoadedCertificate> {
        self.current.load_full()
    }
}

/// Reads a `backend_client_certificate` (at start, and again at a reload).
///
/// # Errors
/// As [`crate::tls::load_certificate`].
pub fn load_client_certificate(config: &CertificateConfig) -> Result<LoadedCertificate, TlsError> {
    crate::tls::load_certificate(config, &rustls::crypto::aws_lc_rs::default_provider())
}

impl ResolvesClientCert for ClientCertificate {
    /// The one certificate, whatever CAs the backend names: a backend that trusts another CA
    /// refuses the handshake, and the log says which backend.
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS pool without `backend_client_certificate` answers a backend's certificate request
/// with none, and notes that it was asked: Dovecot 2.3 (OpenSSL without a session id context)
/// fails every resumed handshake once it verifies client certificates, so from then on the
/// pool keeps no TLS sessions ([`PoolSessions`]) and every connection is a full handshake.
/// Pool-wide (the request does not say which server asked), and kept across reloads.
#[derive(Debug)]
pub struct CertificateRequests {
    pool: Box<str>,
    asked: AtomicBool,
    warned: AtomicBool,
}

impl CertificateRequests {
    fn new(pool: &str) -> CertificateRequests {
        CertificateRequests {
            pool: pool.into(),
            asked: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        }
    }

    /// Whether a backend of the pool has asked for a client certificate.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// After a handshake with `address`: the first time a backend has asked, says so.
    fn warn_once(&self, address: &str) {
        if self.asked() && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pool = %self.pool,
                backend = %address,
                "backend asked for a client certificate; the pool has none \
                 (backend_client_certificate) and sends none; TLS session resumption to the \
                 pool's backends is off from now on"
            );
        }
    }
}

impl ResolvesClientCert for CertificateRequests {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// A pool's TLS sessions for resumption (rustls' in-memory cache, as by default), given out
/// and taken in only while no backend of the pool has asked for a client certificate.
#[derive(Debug)]
struct PoolSessions {
    cache: ClientSessionMemoryCache,
    requests: Arc<CertificateRequests>,
}

/// As rustls' default `Resumption`.
const SESSIONS_PER_POOL: usize = 256;

impl ClientSessionStore for PoolSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        if !self.requests.asked() {
            self.cache.set_tls12_session(server_name, value);
        }
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        if self.requests.asked() {
            return None;
        }
        self.cache.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.cache.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        if !self.requests.asked() {
            self.cache.insert_tls13_ticket(server_name, value);
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if self.requests.asked() {
            return None;
        }
        self.cache.take_tls13_ticket(server_name)
    }
}

/// The TLS variants carry the pool's client config (roots, session cache for resumption),
/// built when the pool is and again when a reload reads the CAs anew.
#[derive(Clone)]
enum Tls {
    Plain,
    /// Plaintext greeting, then the protocol's STARTTLS and a handshake before anything else.
    Starttls(Arc<ArcSwap<ClientConfig>>),
    /// A handshake before the greeting.
    Implicit(Arc<ArcSwap<ClientConfig>>),
}

/// A pool's client config built from the CAs as they are now, ready for
/// [`Transport::install_roots`].
pub struct PreparedRoots(Arc<ClientConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Plain => "Plain",
            Tls::Starttls(_) => "Starttls",
            Tls::Implicit(_) => "Implicit",
        })
    }
}

/// Why a pool's TLS client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("backend_ca: {0}")]
    Ca(String),
    #[error("backend_client_certificate: {0}")]
    ClientCertificate(#[from] TlsError),
    #[error(
        "no usable certificate in the system's trust store{}; set backend_ca",
        .0.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
    )]
    NoSystemRoots(Option<String>),
    #[error("TLS client config: {0}")]
    Config(#[from] rustls::Error),
}

impl Transport {
    /// The transport for the pool `pool`'s `backend_tls`, trusting the certificates of `ca` (a
    /// PEM bundle), or the system's trust store when `ca` is `None`, and presenting `client` to
    /// backends that ask for a certificate.
    ///
    /// # Errors
    /// The bundle or the client certificate cannot be loaded, or there are no system roots to
    /// trust.
    pub fn new(
        pool: &str,
        mode: BackendTls,
        ca: Option<&Path>,
        client: Option<&CertificateConfig>,
        resolver: Resolver,
    ) -> Result<Transport, TransportError> {
        if mode == BackendTls::None {
            return Ok(Transport::plain(resolver));
        }
        let roots = trusted_roots(ca)?;
        let client = client
            .map(ClientCertificate::load)
            .transpose()?
            .map(Arc::new);
        Ok(Transport::with_roots(pool, mode, roots, client, resolver)?)
    }

    /// Plaintext to the backends.
    pub fn plain(resolver: Resolver) -> Transport {
        Transport {
            resolver,
            tls: Tls::Plain,
            client: None,
            requests: None,
            keepalive: None,
        }
    }

    /// The transport of `pool` for `mode`, trusting exactly `roots`, presenting `client` when
    /// asked.
    ///
    /// # Errors
    /// rustls refuses the config (it does not with its own defaults).
    pub fn with_roots(
        pool: &str,
        mode: BackendTls,
        roots: RootCertStore,
        client: Option<Arc<ClientCertificate>>,
        resolver: Resolver,
    ) -> Result<Transport, rustls::Error> {
        let requests = match (&client, mode) {
            (None, BackendTls::Starttls | BackendTls::Implicit) => {
                Some(Arc::new(CertificateRequests::new(pool)))
            }
            _ => None,
        };
        let connector = || -> Result<Arc<ArcSwap<ClientConfig>>, rustls::Error> {
            let config = client_config(roots, client.clone(), requests.clone())?;
            Ok(Arc::new(ArcSwap::from_pointee(config)))
        };
        let tls = match mode {
            BackendTls::None => Tls::Plain,
            BackendTls::Starttls => Tls::Starttls(connector()?),
            BackendTls::Implicit => Tls::Implicit(connector()?),
        };
        Ok(Transport {
            resolver,
            tls,
            client,
            requests,
            keepalive: None,
        })
    }

    /// The same transport, setting `keepalive` on each backend connection.
    pub fn with_keepalive(self, keepalive: Option<Keepalive>) -> Transport {
        Transport { keepalive, ..self }
    }

    /// The certificate this pool presents to backends, if it has one.
    pub fn client_certificate(&self) -> Option<&Arc<ClientCertificate>> {
        self.client.as_ref()
    }

    /// Reads the CAs a TLS pool trusts again (`ca`, or the system's trust store), for a
    /// reload: nothing changes until [`Transport::install_roots`]. `None` for a plaintext
    /// pool.
    ///
    /// # Errors
    /// As [`Transport::new`]: the bundle does not load, or there are no system roots.
    pub fn prepare_roots(
        &self,
        ca: Option<&Path>,
    ) -> Result<Option<PreparedRoots>, TransportError> {
        if matches!(self.tls, Tls::Plain) {
            return Ok(None);
        }
        let config = client_config(
            trusted_roots(ca)?,
            self.client.clone(),
            self.requests.clone(),
        )?;
        Ok(Some(PreparedRoots(Arc::new(config))))
    }

    /// Puts the CAs of [`Transport::prepare_roots`] in place: the next handshake verifies
    /// against them (handshakes under way finish with the old ones). Resumption starts over.
    pub fn install_roots(&self, prepared: PreparedRoots) {
        if let Tls::Starttls(config) | Tls::Implicit(config) = &self.tls {
            config.store(prepared.0);
        }
    }

    /// The `backend_tls` mode this transport implements.
    pub fn mode(&self) -> BackendTls {
        match self.tls {
            Tls::Plain => BackendTls::None,
            Tls::Starttls(_) => BackendTls::Starttls,
            Tls::Implicit(_) => BackendTls::Implicit,
        }
    }

    /// Resolves `address` and connects to it; with implicit TLS, also completes the
    /// handshake. Each step has `timeout` (resolving and connecting share one).
    ///
    /// # Errors
    /// `Unreachable` when the connection or the handshake fails (a certificate the pool does
    /// not trust included): another backend may serve.
    pub async fn connect(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<BackendStream, BackendError> {
        let tcp = connect_tcp(&self.resolver, address, timeout, self.keepalive).await?;
        match &self.tls {
            Tls::Implicit(connector) => {
                handshake(connector, self.requests.as_deref(), tcp, address, timeout).await
            }
            Tls::Plain | Tls::Starttls(_) => Ok(BackendStream::Plain(tcp)),
        }
    }

    /// The TLS handshake after the backend accepted STARTTLS. The caller has already dropped
    /// every byte the backend sent in plaintext: only the TCP stream comes in.
    ///
    /// # Errors
    /// `Failed` when this transport is not STARTTLS (a programming error, not the backend's);
    /// `Unreachable` when the handshake fails.
    pub async fn starttls(
        &self,
        tcp: TcpStream,
        address: &str,
        timeout: Duration,
    ) -> Result<BackendStream, BackendError> {
        match &self.tls {
            Tls::Starttls(connector) => {
                handshake(connector, self.requests.as_deref(), tcp, address, timeout).await
            }
            other => Err(BackendError::Failed(format!(
                "STARTTLS with a {other:?} transport"
            ))),
        }
    }
}

/// The CAs a TLS pool trusts: its `backend_ca` bundle, or the system's trust store.
fn trusted_roots(ca: Option<&Path>) -> Result<RootCertStore, TransportError> {
    match ca {
        Some(path) => crate::config::load_ca_bundle(path).map_err(TransportError::Ca),
        None => system_roots(),
    }
}

/// The system's trust store (`/etc/ssl/certs` and the like, via rustls-native-certs): where
/// operators install the CA of their internal backends. A certificate the store holds but
/// rustls cannot use is skipped.
fn system_roots() -> Result<RootCertStore, TransportError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _skipped) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TransportError::NoSystemRoots(
            found.errors.first().map(ToString::to_string),
        ));
    }
    Ok(roots)
}

/// A client config that verifies the backend's certificate chain and name (webpki), with the
/// aws-lc-rs provider the server side uses too, and presents `client` when a backend asks; a
/// pool without one notes the request in `requests`.
fn client_config(
    roots: RootCertStore,
    client: Option<Arc<ClientCertificate>>,
    requests: Option<Arc<CertificateRequests>>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(crate::tls_provider::shared_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        Some(client) => {
            let mut config = builder.with_client_cert_resolver(client);
            // A full handshake per connection: Dovecot 2.3 (OpenSSL without a session id
            // context) fails every resumed handshake once it verifies client certificates,
            // and a resumed session would keep the certificate of before a reload.
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
        None => match requests {
            Some(requests) => {
                let mut config = builder.with_client_cert_resolver(requests.clone());
                // Sessions of the config: a reload that reads the CAs again starts over.
                config.resumption = rustls::client::Resumption::store(Arc::new(PoolSessions {
                    cache: ClientSessionMemoryCache::new(SESSIONS_PER_POOL),
                    requests,
                }));
                config
            }
            None => builder.with_no_client_auth(),
        },
    })
}

/// The name the backend's certificate must carry: the host part of `address`.
fn server_name(address: &str) -> Result<ServerName<'static>, BackendError> {
    let host = address
        .parse::<HostPort>()
        .map_err(|e| BackendError::Failed(format!("backend address {e}")))?
        .host;
    ServerName::try_from(host)
        .map_err(|e| BackendError::Failed(format!("{address}: no name to verify: {e}")))
}

/// The TLS handshake on `tcp` with `config`; `requests` is the pool's record of certificate
/// requests when it has no certificate.
async fn handshake(
    config: &ArcSwap<ClientConfig>,
    requests: Option<&CertificateRequests>,
    tcp: TcpStream,
    address: &str,
    timeout: Duration,
) -> Result<BackendStream, BackendError> {
    let name = server_name(address)?;
    let connector = TlsConnector::from(config.load_full());
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => {
            if let Some(requests) = requests {
                requests.warn_once(address);
            }
            Ok(BackendStream::Tls(Box::new(tls)))
        }
        Ok(Err(e)) => {
            let hint = if requests.is_some_and(CertificateRequests::asked) {
                " (the backend asked for a client certificate; the pool has none: \
                 backend_client_certificate)"
            } else {
                ""
            };
            Err(BackendError::Unreachable(format!(
                "{address}: TLS handshake failed: {e}{hint}"
            )))
        }
        Err(_) => Err(BackendError::Unreachable(format!(
            "{address}: TLS handshake timed out"
        ))),
    }
}

/// The backend side of a connection: plain TCP, or TLS (boxed: a rustls connection is more
/// than a kilobyte, and the login and the splice do not care which it is).
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for BackendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, tcp) = match self {
            BackendStream::Plain(s) => ("Plain", s),
            BackendStream::Tls(s) => ("Tls", s.get_ref().0),
        };
        f.debug_tuple(kind).field(&tcp.peer_addr().ok()).finish()
    }
}

impl BackendStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Tries `login` on each backend of `pool` in the user's rendezvous order (healthy backends
/// first), moving on only when a backend is unreachable. Returns the backend's address with
/// the session. Each attempt's time goes to `mailgate_backend_connect_duration_seconds`; an
/// unreachable backend counts as a failed health check.
///
/// # Errors
/// The first error that is not "unreachable", or `Unreachable` when every backend was.
pub async fn first_available<T, F, Fut>(
    session_id: &str,
    pool: &Pool,
    protocol: Protocol,
    user: &str,
    metrics: &Metrics,
    mut login: F,
) -> Result<(String, T), BackendError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let histogram = metrics.backend_connect(&pool.name);
    for backend in pool.order(protocol, user) {
        let timer = histogram.map(|h| h.start_timer());
        let result = login(backend.address.clone()).await;
        drop(timer);
        match result {
            Ok(session) => return Ok((backend.address.clone(), session)),
            Err(e) if e.try_next() => {
                if backend.health().record(false) == Some(false) {
                    tracing::warn!(pool = %pool.name, backend = %backend.address, "backend marked down after failed logins");
                }
                tracing::warn!(session = session_id, pool = %pool.name, backend = %backend.address, error = %e, "backend unreachable; trying the next");
            }
            Err(e) => {
                tracing::warn!(session = session_id, pool = %pool.name, backend = %backend.address, error = %e, "backend login failed");
                return Err(e);
            }
        }
    }
    Err(BackendError::Unreachable(format!(
        "no {} backend of pool {} reachable",
        protocol.as_str(),
        pool.name
    )))
}

/// A test CA and leaf certificates it signs, and the server side of a TLS handshake with them:
/// for scripted backends in the unit tests of the backend logins.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    use rustls::RootCertStore;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::TlsAcceptor;

    /// One line (with its CRLF) read byte by byte from a plaintext stream, so nothing
    /// past it is consumed before a handshake.
    pub async fn read_line(tcp: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            match tcp.read_u8().await {
                Ok(b) => line.push(b),
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    pub struct Pki {
        ca: CertificateDer<'static>,
        ca_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        /// A CA whose subject is `name`.
        pub fn new(name: &str) -> Pki {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            let ca = params.self_signed(&key).expect("CA cert");
            Pki {
                ca: ca.der().clone(),
                ca_pem: ca.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// The CA certificate as a PEM bundle, for `backend_ca`.
        pub fn ca_pem(&self) -> &str {
            &self.ca_pem
        }

        /// Roots that trust exactly this CA.
        pub fn roots(&self) -> RootCertStore {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).expect("CA as root");
            roots
        }

        /// A TLS server with a leaf for `names` (IP addresses become IP SANs).
        pub fn acceptor(&self, names: &[&str]) -> TlsAcceptor {
            self.server(names, None)
        }

        /// As [`Pki::acceptor`], asking every client for a certificate of this CA, and
        /// taking clients without one too (Dovecot's `ssl_verify_client_cert`).
        pub fn acceptor_asking_clients(&self, names: &[&str]) -> TlsAcceptor {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(self.roots()),
                crate::tls_provider::shared_provider(),
            )
            .allow_unauthenticated()
            .build()
            .expect("client verifier");
            self.server(names, Some(verifier))
        }

        fn server(
            &self,
            names: &[&str],
            clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
        ) -> TlsAcceptor {
            let key = KeyPair::generate().expect("leaf key");
            let params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .expect("leaf params");
            let leaf = params.signed_by(&key, &self.issuer).expect("leaf cert");
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions");
            let builder = match clients {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            let config = builder
                .with_single_cert(vec![leaf.der().clone()], key)
                .expect("server config");
            TlsAcceptor::from(Arc::new(config))
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::test_pki::Pki;
    use super::*;

    /// A TLS server that answers one connection with `hello` over TLS; its address.
    async fn tls_server(acceptor: tokio_rustls::TlsAcceptor) -> String {
        tls_server_for(acceptor, 1).await
    }

    /// As [`tls_server`], for `connections` connections one after the other.
    async fn tls_server_for(acceptor: tokio_rustls::TlsAcceptor, connections: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            for _ in 0..connections {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.flush().await;
                    let mut sink = [0u8; 16];
                    let _ = tls.read(&mut sink).await;
                }
            }
        });
        address
    }

    /// Connects, reads the server's `hello` (and with it the session tickets before it), and
    /// says how the handshake went.
    async fn handshake_kind(transport: &Transport, address: &str) -> rustls::HandshakeKind {
        let stream = transport
            .connect(address, Duration::from_secs(5))
            .await
            .expect("handshake");
        let BackendStream::Tls(mut tls) = stream else {
            panic!("not TLS");
        };
        let mut hello = [0u8; 5];
        tls.read_exact(&mut hello).await.expect("read");
        assert_eq!(&hello, b"hello");
        tls.get_ref().1.handshake_kind().expect("handshake done")
    }

    /// A pool without a client certificate resumes its TLS sessions until a backend asks for a
    /// certificate; from then on every handshake is full, to every backend of the pool (Dovecot
    /// fails resumed handshakes once it verifies clients).
    #[tokio::test]
    async fn a_request_for_a_client_certificate_turns_resumption_off() {
        use rustls::HandshakeKind::{Full, Resumed};
        let pki = Pki::new("mailgate test CA");
        let resolver = Resolver::system().expect("resolver");
        let transport =
            Transport::with_roots("test", BackendTls::Implicit, pki.roots(), None, resolver)
                .expect("transport");
        let requests = transport
            .requests
            .clone()
            .expect("a pool without a certificate");

        let plain = tls_server_for(pki.acceptor(&["127.0.0.1"]), 3).await;
        assert_eq!(handshake_kind(&transport, &plain).await, Full);
        assert_eq!(handshake_kind(&transport, &plain).await, Resumed);
        assert!(!requests.asked());

        let asking = tls_server_for(pki.acceptor_asking_clients(&["127.0.0.1"]), 2).await;
        assert_eq!(handshake_kind(&transport, &asking).await, Full);
        assert!(requests.asked());
        assert_eq!(handshake_kind(&transport, &asking).await, Full);
        assert_eq!(handshake_kind(&transport, &plain).await, Full);

        // A reload that reads the CAs again (new config, new session store) keeps what the
        // pool learnt.
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("ca.pem");
        std::fs::write(&bundle, pki.ca_pem()).expect("write CA");
        let prepared = transport.prepare_roots(Some(&bundle)).expect("CA bundle");
        transport.install_roots(prepared.expect("a TLS pool"));
        let plain = tls_server_for(pki.acceptor(&["127.0.0.1"]), 2).await;
        assert_eq!(handshake_kind(&transport, &plain).await, Full);
        assert_eq!(handshake_kind(&transport, &plain).await, Full);
    }

    #[tokio::test]
    async fn implicit_tls_verifies_the_chain_and_the_address_name() {
        let pki = Pki::new("mailgate test CA");
        let t = Duration::from_secs(5);
        let resolver = Resolver::system().expect("resolver");
        let trusted =
            Transport::with_roots("test", BackendTls::Implicit, pki.roots(), None, resolver)
                .expect("transport");

        // Signed by the pool's CA, for the address's IP: the bytes come through TLS.
        let address = tls_server(pki.acceptor(&["127.0.0.1", "localhost"])).await;
        let mut stream = trusted.connect(&address, t).await.expect("handshake");
        assert!(stream.is_tls());
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.expect("read");
        assert_eq!(&hello, b"hello");

        // By DNS name too.
        let address = tls_server(pki.acceptor(&["localhost"])).await;
        let port = address.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        let by_name = trusted.connect(&format!("localhost:{port}"), t).await;
        assert!(by_name.is_ok(), "{by_name:?}");

        // Another CA's certificate: refused, and the error says why.
        let stranger = Pki::new("someone else's CA");
        let address = tls_server(stranger.acceptor(&["127.0.0.1"])).await;
        let refused = trusted.connect(&address, t).await;
        assert!(
            matches!(&refused, Err(BackendError::Unreachable(e)) if e.contains("invalid peer certificate") && e.contains("UnknownIssuer")),
            "{refused:?}"
        );

        // The right CA, but a certificate for another name than the address's host.
        let address = tls_server(pki.acceptor(&["backend.example.com"])).await;
        let refused = trusted.connect(&address, t).await;
        assert!(
            matches!(&refused, Err(BackendError::Unreachable(e)) if e.contains("invalid peer certificate: certificate not valid for name \"127.0.0.1\"")),
            "{refused:?}"
        );
    }

    /// The connect timeout bounds the whole step: a name server that never answers makes the
    /// backend unreachable within it, and the error names the address.
    #[tokio::test]
    async fn a_silent_name_server_cannot_hold_a_connect_past_its_timeout() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dns = silent.local_addr().expect("addr");
        let resolver = Resolver::with_nameservers(vec![dns]).expect("resolver");
        let transport = Transport::plain(resolver);
        let started = std::time::Instant::now();
        let refused = transport
            .connect("imap1.example.com:143", Duration::from_millis(300))
            .await;
        assert!(
            matches!(&refused, Err(BackendError::Unreachable(e)) if e == "imap1.example.com:143: name resolution timed out"),
            "{refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn backend_connections_get_the_keepalive_and_none_without_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let resolver = Resolver::system().expect("resolver");
        let t = Duration::from_secs(5);
        let on = Transport::plain(resolver.clone())
            .with_keepalive(Keepalive::new(Duration::from_secs(60)));
        let Ok(BackendStream::Plain(tcp)) = on.connect(&address, t).await else {
            panic!("a plain connection");
        };
        assert_eq!(
            crate::keepalive::tests::read_back(socket2::SockRef::from(&tcp)),
            (
                true,
                Duration::from_secs(60),
                Duration::from_secs(30),
                crate::keepalive::PROBES,
                Duration::from_secs(180)
            )
        );
        let off = Transport::plain(resolver);
        let Ok(BackendStream::Plain(tcp)) = off.connect(&address, t).await else {
            panic!("a plain connection");
        };
        let socket = socket2::SockRef::from(&tcp);
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"), None);
    }

    #[test]
    fn a_plain_transport_needs_no_roots() {
        let resolver = Resolver::system().expect("resolver");
        let plain =
            Transport::new("test", BackendTls::None, None, None, resolver.clone()).expect("plain");
        assert_eq!(plain.mode(), BackendTls::None);
        let missing = Transport::new(
            "test",
            BackendTls::Starttls,
            Some(Path::new("/nonexistent/ca.pem")),
            None,
            resolver,
        );
        assert!(matches!(missing, Err(TransportError::Ca(_))), "{missing:?}");
    }
}
