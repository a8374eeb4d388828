//! Prometheus metrics (DESIGN.md, "Observability contract") and the HTTP endpoint that serves
//! them with the health answers: `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! Every metric is registered on a `Registry` passed in (tests read a fresh one). Label
//! children for the fixed label sets (listener × protocol, protocol × pool × result, direction,
//! pool × backend) are created once at start and held, so counting on the hot path is an
//! atomic increment, never a label lookup in the registry. No label carries a user, an address
//! of a client or an IP: `backend` is the configured `host:port` of a backend.
//!
//! A login whose name cannot be routed (not an address) is counted under `pool="none"`, as is
//! a `tls_required` refusal: the credentials sent in the clear are not looked at.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Encoder as _, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{Config, Protocol};
use crate::health::Readiness;
use crate::limits::Rejection;
use crate::login::LoginResult;
use crate::shutdown::{Phase, Shutdown};
use crate::tls::LoadedCertificate;

/// The `pool` label of a login that was not routed to any pool.
pub const NO_POOL: &str = "none";

/// Argon2 verification takes tens of milliseconds, a cached one microseconds; a backend login
/// over a slow link can take seconds.
const LOGIN_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// From a refused connection (milliseconds) to an IMAP IDLE client that stays all day.
const SESSION_BUCKETS: [f64; 15] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    86400.0,
];

/// One value per protocol, without indexing.
#[derive(Debug, Clone)]
struct PerProtocol<T> {
    imap: T,
    smtp: T,
}

impl<T> PerProtocol<T> {
    fn build(mut f: impl FnMut(Protocol) -> T) -> PerProtocol<T> {
        PerProtocol {
            imap: f(Protocol::Imap),
            smtp: f(Protocol::Smtp),
        }
    }

    fn get(&self, protocol: Protocol) -> &T {
        match protocol {
            Protocol::Imap => &self.imap,
            Protocol::Smtp => &self.smtp,
        }
    }
}

/// The two directions of `mailgate_relay_bytes_total`; the relay counts each chunk as it
/// moves, so long sessions show in throughput while they run.
#[derive(Debug, Clone)]
pub struct Directions {
    client_to_backend: IntCounter,
    backend_to_client: IntCounter,
}

impl crate::relay::Meter for Directions {
    fn client_to_backend(&self, bytes: u64) {
        self.client_to_backend.inc_by(bytes);
    }
    fn backend_to_client(&self, bytes: u64) {
        self.backend_to_client.inc_by(bytes);
    }
}

/// Every metric of the contract, with its label children resolved.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    listeners: HashMap<String, ListenerMetrics>,
    /// pool (or `none`) → protocol → result.
    logins: HashMap<String, PerProtocol<HashMap<LoginResult, IntCounter>>>,
    auth_duration: PerProtocol<Histogram>,
    backend_connect: HashMap<String, Histogram>,
    /// (pool, backend address) → 1 up, 0 down.
    /// By pool and backend; a reload adds and removes backends.
    backend_up: IntGaugeVec,
    relay_bytes: PerProtocol<Directions>,
    reloads_ok: IntCounter,
    reloads_error: IntCounter,
    certificate_expiry: GaugeVec,
    password_hashes: IntCounter,
}

/// Name and help of `mailgate_password_hashes_total`; the [`crate::accounts::Authenticator`]
/// counts into it.
pub const PASSWORD_HASHES: (&str, &str) = (
    "mailgate_password_hashes_total",
    "Password hash verifications run (argon2id, bcrypt, SHA512-CRYPT; the dummy one for an \
     unknown user included). A login answered from the verification cache, or refused by \
     throttling, runs none.",
);

/// What one listener counts; cloned into the listener at bind.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    connections: IntCounter,
    active: IntGauge,
    tls_handshake_errors: IntCounter,
    session_duration: Histogram,
    /// Connections refused at accept, by reason (in `Rejection::ALL`'s order).
    rejected: [IntCounter; Rejection::ALL.len()],
}

impl ListenerMetrics {
    /// Counts an accepted connection; the guard keeps it active until dropped, then records
    /// the session's duration.
    pub fn accepted(&self) -> ConnectionGuard {
        self.connections.inc();
        self.active.inc();
        ConnectionGuard {
            active: self.active.clone(),
            duration: self.session_duration.clone(),
            start: Instant::now(),
        }
    }

    /// A TLS handshake that failed or timed out.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_errors.inc();
    }

    /// A connection refused at accept (over a cap, or a PROXY header missing or from a peer
    /// not trusted to send one). It is not counted in `mailgate_connections_total`.
    pub fn rejected(&self, reason: Rejection) {
        if let Some(counter) = self.rejected.get(reason as usize) {
            counter.inc();
        }
    }
}

/// Held by a connection for its whole life.
#[derive(Debug)]
pub struct ConnectionGuard {
    active: IntGauge,
    duration: Histogram,
    start: Instant,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.active.dec();
        self.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: T,
) -> prometheus::Result<T> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    /// Registers every metric on `registry`, with a child for each listener and pool of
    /// `config` and each login result, at zero.
    ///
    /// # Errors
    /// A metric already registered on `registry` (a registry is meant for one `Metrics`).
    pub fn new(registry: &Registry, config: &Config) -> prometheus::Result<Metrics> {
        let connections = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_connections_total",
                    "Client connections accepted, by listener.",
                ),
                &["listener", "protocol"],
            )?,
        )?;
        let active = register(
            registry,
            IntGaugeVec::new(
                opts(
                    "mailgate_connections_active",
                    "Client connections open now, by listener.",
                ),
                &["listener", "protocol"],
            )?,
        )?;
        let rejected = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_connections_rejected_total",
                    "Client connections refused at accept, by listener and the limit they hit.",
                ),
                &["listener", "reason"],
            )?,
        )?;
        let logins = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_logins_total",
                    "Login attempts by protocol, routed pool (`none`: not routed) and result.",
                ),
                &["protocol", "pool", "result"],
            )?,
        )?;
        let password_hashes = register(
            registry,
            IntCounter::with_opts(opts(PASSWORD_HASHES.0, PASSWORD_HASHES.1))?,
        )?;
        let auth_duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailgate_auth_duration_seconds",
                    "Time to check a login against the account rules (password verification included).",
                )
                .buckets(LOGIN_BUCKETS.to_vec()),
                &["protocol"],
            )?,
        )?;
        let backend_connect = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailgate_backend_connect_duration_seconds",
                    "Time to get a logged-in backend session (connect, greeting, login), per attempt.",
                )
                .buckets(LOGIN_BUCKETS.to_vec()),
                &["pool"],
            )?,
        )?;
        let backend_up = register(
            registry,
            IntGaugeVec::new(
                opts(
                    "mailgate_backend_up",
                    "1 when the backend passes its health checks, 0 when marked down.",
                ),
                &["pool", "backend"],
            )?,
        )?;
        let relay_bytes = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_relay_bytes_total",
                    "Bytes relayed after login, by direction.",
                ),
                &["protocol", "direction"],
            )?,
        )?;
        let tls_errors = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_tls_handshake_errors_total",
                    "Client TLS handshakes that failed or timed out.",
                ),
                &["listener"],
            )?,
        )?;
        let session_duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailgate_session_duration_seconds",
                    "Lifetime of client connections, from accept to close.",
                )
                .buckets(SESSION_BUCKETS.to_vec()),
                &["protocol"],
            )?,
        )?;
        let reloads = register(
            registry,
            IntCounterVec::new(
                opts(
                    "mailgate_config_reloads_total",
                    "Configuration reloads by result.",
                ),
                &["result"],
            )?,
        )?;
        let certificate_expiry = register(
            registry,
            GaugeVec::new(
                opts(
                    "mailgate_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of each certificate in use (served to clients, or presented to \
                     backends), seconds since the epoch.",
                ),
                &["certificate"],
            )?,
        )?;
        let build_info = register(
            registry,
            IntGaugeVec::new(
                opts("mailgate_build_info", "Always 1; the version is the label."),
                &["version"],
            )?,
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let session_duration =
            PerProtocol::build(|p| session_duration.with_label_values(&[p.as_str()]));
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let labels = [l.name.as_str(), l.protocol.as_str()];
                let metrics = ListenerMetrics {
                    connections: connections.with_label_values(&labels),
                    active: active.with_label_values(&labels),
                    tls_handshake_errors: tls_errors.with_label_values(&[l.name.as_str()]),
                    session_duration: session_duration.get(l.protocol).clone(),
                    rejected: Rejection::ALL
                        .map(|r| rejected.with_label_values(&[l.name.as_str(), r.as_str()])),
                };
                (l.name.clone(), metrics)
            })
            .collect();
        let logins = config
            .pools
            .keys()
            .map(String::as_str)
            .chain([NO_POOL])
            .map(|pool| {
                let children = PerProtocol::build(|p| {
                    LoginResult::ALL
                        .iter()
                        .map(|r| {
                            let child = logins.with_label_values(&[p.as_str(), pool, r.as_str()]);
                            (*r, child)
                        })
                        .collect()
                });
                (pool.to_string(), children)
            })
            .collect();
        let backend_connect = config
            .pools
            .keys()
            .map(|pool| (pool.clone(), backend_connect.with_label_values(&[pool])))
            .collect();
        for (pool, p) in &config.pools {
            for backend in p.imap.iter().chain(&p.smtp) {
                // Backends start up (see `health`).
                backend_up.with_label_values(&[pool, backend]).set(1);
            }
        }
        let relay_bytes = PerProtocol::build(|p| Directions {
            client_to_backend: relay_bytes.with_label_values(&[p.as_str(), "client_to_backend"]),
            backend_to_client: relay_bytes.with_label_values(&[p.as_str(), "backend_to_client"]),
        });
        Ok(Metrics {
            registry: registry.clone(),
            listeners,
            logins,
            auth_duration: PerProtocol::build(|p| auth_duration.with_label_values(&[p.as_str()])),
            backend_connect,
            backend_up,
            relay_bytes,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_error: reloads.with_label_values(&["error"]),
            certificate_expiry,
            password_hashes,
        })
    }

    /// The counter of password hash verifications, for the authenticator to count into.
    pub fn password_hashes(&self) -> IntCounter {
        self.password_hashes.clone()
    }

    /// The counters of listener `name` (from the config this was built with).
    pub fn listener(&self, name: &str) -> Option<ListenerMetrics> {
        self.listeners.get(name).cloned()
    }

    /// Counts one login attempt. `pool` is the routed pool, `None` when the name was not
    /// routed.
    pub fn login(&self, protocol: Protocol, pool: Option<&str>, result: LoginResult) {
        let by_pool = pool
            .and_then(|p| self.logins.get(p))
            .or_else(|| self.logins.get(NO_POOL));
        if let Some(counter) = by_pool.and_then(|p| p.get(protocol).get(&result)) {
            counter.inc();
        }
    }

    pub fn auth_duration(&self, protocol: Protocol) -> &Histogram {
        self.auth_duration.get(protocol)
    }

    /// The backend connect histogram of `pool`.
    pub fn backend_connect(&self, pool: &str) -> Option<&Histogram> {
        self.backend_connect.get(pool)
    }

    /// The up gauge of one backend, for its health check (made when a reload added the
    /// backend).
    pub fn backend_up(&self, pool: &str, backend: &str) -> IntGauge {
        self.backend_up.with_label_values(&[pool, backend])
    }

    /// Drops the up gauge of a backend a reload removed from `pool`, so no series stays for a
    /// backend that is gone.
    pub fn remove_backend(&self, pool: &str, backend: &str) {
        let _ = self.backend_up.remove_label_values(&[pool, backend]);
    }

    /// Adds a finished splice's bytes (those the client pipelined after its login included).
    /// The relay's meter for `protocol`.
    pub fn relay_meter(&self, protocol: Protocol) -> &Directions {
        self.relay_bytes.get(protocol)
    }

    /// Counts a configuration reload.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_error.inc();
        }
    }

    /// Sets the expiry gauges to the certificates in use: those served to clients and the
    /// pools' client certificates (and drops those no longer in use).
    pub fn certificates<'a>(&self, in_use: impl IntoIterator<Item = &'a LoadedCertificate>) {
        self.certificate_expiry.reset();
        for c in in_use {
            // f64 holds every timestamp until the year 285 million exactly.
            #[allow(clippy::cast_precision_loss)]
            let not_after = c.not_after as f64;
            let gauge: Gauge = self
                .certificate_expiry
                .with_label_values(&[c.label.as_str()]);
            gauge.set(not_after);
        }
    }

    /// The text exposition format of everything registered.
    ///
    /// # Errors
    /// A collector produced something the encoder refuses.
    pub fn encode(&self) -> prometheus::Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// What the HTTP handlers read.
#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` reaches
/// `Closing` (while draining it still answers, with `/readyz` saying no).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: Shutdown,
) {
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoint { metrics, readiness });
    let stop = async move { shutdown.reached(Phase::Closing).await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

async fn scrape(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn ready(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.readiness.check() {
        Ok(()) => "ok\n".into_response(),
        Err(not) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(not.to_json())).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
listeners:
  - { name: imaps, protocol: imap, address: \"127.0.0.1:0\", tls: none }
  - { name: submission, protocol: smtp, address: \"127.0.0.1:0\", tls: none }
tls:
  certificates: []
accounts: { source: file, path: ACCOUNTS }
routing:
  consumer_domains: [skydesk.jp]
  default_domain: skydesk.jp
  consumer_pool: imap
  organisation_pool: imap
pools:
  imap:
    imap: [\"192.0.2.1:143\"]
    smtp: [\"192.0.2.1:587\"]
    login: { mode: passthrough }
";

    fn config() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let accounts = dir.path().join("accounts.yaml");
        std::fs::write(&accounts, "users: {}\n").unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("mailgate.yaml");
        let text = CONFIG.replace("ACCOUNTS", &accounts.display().to_string());
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e:?}"));
        (dir, config)
    }

    fn metrics() -> (tempfile::TempDir, Metrics) {
        let (dir, config) = config();
        let metrics = Metrics::new(&Registry::new(), &config).unwrap_or_else(|e| panic!("{e}"));
        (dir, metrics)
    }

    fn text(metrics: &Metrics) -> String {
        metrics.encode().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_child_exists_at_zero_from_the_start() {
        let (_dir, m) = metrics();
        let text = text(&m);
        for line in [
            "mailgate_connections_total{listener=\"imaps\",protocol=\"imap\"} 0",
            "mailgate_connections_active{listener=\"submission\",protocol=\"smtp\"} 0",
            "mailgate_tls_handshake_errors_total{listener=\"imaps\"} 0",
            "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections\"} 0",
            "mailgate_connections_rejected_total{listener=\"submission\",reason=\"max_connections_per_ip\"} 0",
            "mailgate_logins_total{pool=\"imap\",protocol=\"smtp\",result=\"smtp_disabled\"} 0",
            "mailgate_logins_total{pool=\"none\",protocol=\"imap\",result=\"tls_required\"} 0",
            "mailgate_backend_up{backend=\"192.0.2.1:143\",pool=\"imap\"} 1",
            "mailgate_backend_up{backend=\"192.0.2.1:587\",pool=\"imap\"} 1",
            "mailgate_relay_bytes_total{direction=\"backend_to_client\",protocol=\"imap\"} 0",
            "mailgate_config_reloads_total{result=\"ok\"} 0",
            "mailgate_config_reloads_total{result=\"error\"} 0",
            "mailgate_auth_duration_seconds_count{protocol=\"smtp\"} 0",
            "mailgate_password_hashes_total 0",
            "mailgate_backend_connect_duration_seconds_count{pool=\"imap\"} 0",
            "mailgate_session_duration_seconds_count{protocol=\"imap\"} 0",
            &format!(
                "mailgate_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // 2 protocols × (1 pool + none) × 10 results.
        let logins = text
            .lines()
            .filter(|l| l.starts_with("mailgate_logins_total{"))
            .count();
        assert_eq!(logins, 2 * 2 * LoginResult::ALL.len());
    }

    #[test]
    fn increments_show_with_their_exact_labels() {
        let (_dir, m) = metrics();
        let imaps = m
            .listener("imaps")
            .unwrap_or_else(|| panic!("no imaps listener metrics"));
        let guard = imaps.accepted();
        let _second = imaps.accepted();
        imaps.tls_handshake_failed();
        imaps.rejected(Rejection::MaxConnectionsPerIp);
        drop(guard);
        m.login(Protocol::Imap, Some("imap"), LoginResult::Ok);
        m.login(Protocol::Imap, Some("imap"), LoginResult::Ok);
        m.login(Protocol::Smtp, None, LoginResult::InvalidCredentials);
        // An unknown pool name is counted as not routed rather than lost.
        m.login(Protocol::Imap, Some("gone"), LoginResult::TlsRequired);
        m.auth_duration(Protocol::Imap).observe(0.02);
        if let Some(h) = m.backend_connect("imap") {
            h.observe(0.003);
        }
        crate::relay::Meter::client_to_backend(m.relay_meter(Protocol::Smtp), 120);
        crate::relay::Meter::backend_to_client(m.relay_meter(Protocol::Smtp), 7);
        m.reloaded(false);
        m.backend_up("imap", "192.0.2.1:143").set(0);
        // A reload added one backend and removed another.
        m.backend_up("imap", "192.0.2.9:143").set(1);
        m.remove_backend("imap", "192.0.2.1:587");
        let text = text(&m);
        assert!(
            !text.contains("backend=\"192.0.2.1:587\""),
            "a removed backend's series stays:\n{text}"
        );
        for line in [
            "mailgate_connections_total{listener=\"imaps\",protocol=\"imap\"} 2",
            "mailgate_connections_active{listener=\"imaps\",protocol=\"imap\"} 1",
            "mailgate_session_duration_seconds_count{protocol=\"imap\"} 1",
            "mailgate_session_duration_seconds_count{protocol=\"smtp\"} 0",
            "mailgate_tls_handshake_errors_total{listener=\"imaps\"} 1",
            "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections_per_ip\"} 1",
            "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections\"} 0",
            "mailgate_logins_total{pool=\"imap\",protocol=\"imap\",result=\"ok\"} 2",
            "mailgate_logins_total{pool=\"none\",protocol=\"smtp\",result=\"invalid_credentials\"} 1",
            "mailgate_logins_total{pool=\"none\",protocol=\"imap\",result=\"tls_required\"} 1",
            "mailgate_logins_total{pool=\"imap\",protocol=\"smtp\",result=\"ok\"} 0",
            "mailgate_auth_duration_seconds_bucket{protocol=\"imap\",le=\"0.025\"} 1",
            "mailgate_auth_duration_seconds_bucket{protocol=\"imap\",le=\"0.01\"} 0",
            "mailgate_backend_connect_duration_seconds_count{pool=\"imap\"} 1",
            "mailgate_relay_bytes_total{direction=\"client_to_backend\",protocol=\"smtp\"} 120",
            "mailgate_relay_bytes_total{direction=\"backend_to_client\",protocol=\"smtp\"} 7",
            "mailgate_relay_bytes_total{direction=\"client_to_backend\",protocol=\"imap\"} 0",
            "mailgate_config_reloads_total{result=\"error\"} 1",
            "mailgate_backend_up{backend=\"192.0.2.1:143\",pool=\"imap\"} 0",
            "mailgate_backend_up{backend=\"192.0.2.9:143\",pool=\"imap\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn certificate_expiry_is_labelled_by_the_configured_file() {
        let (_dir, m) = metrics();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cfg = crate::config::CertificateConfig {
            cert: dir.path().join("a.crt"),
            key: dir.path().join("a.key"),
        };
        let tls = crate::tls::Tls::from_config(&crate::config::TlsConfig {
            certificates: vec![cfg.clone()],
            self_signed_if_missing: true,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let set = tls.resolver.current();
        let not_after = set
            .certificates
            .first()
            .map(|c| c.not_after)
            .unwrap_or_default();
        assert!(not_after > 1_700_000_000);
        m.certificates(&set.certificates);
        let line = format!(
            "mailgate_tls_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}} {not_after}",
            cfg.cert.display()
        );
        let text = text(&m);
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }

    #[test]
    fn a_registry_holds_one_metrics() {
        let (_dir, config) = config();
        let registry = Registry::new();
        assert!(Metrics::new(&registry, &config).is_ok());
        assert!(Metrics::new(&registry, &config).is_err());
    }
}
