//! Backend health: a background probe per backend, the up/down state routing reads, and the
//! readiness answer behind `/readyz`.
//!
//! Every `health.interval` each backend is connected to (within `health.timeout`) as a login
//! would, TLS included, and its greeting read (`* OK` for IMAP, `220` and an EHLO for SMTP). `fall` failures in a row mark it down,
//! `rise` successes in a row mark it up again; a login whose connect fails counts as a failure
//! too, so a dead backend is noticed by the first user who hits it. Backends start up, so
//! logins work before the first probe has answered.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::backend::Transport;
use crate::config::{Config, HealthConfig, Protocol};
use crate::metrics::Metrics;
use crate::routing::{Backend, Pool, Router};
use crate::shutdown::{Phase, Shutdown};
use crate::smtp::backend::BackendExtensions;

/// How many results in a row flip a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures in a row that mark an up backend down.
    pub fall: u32,
    /// Successes in a row that mark a down backend up.
    pub rise: u32,
}

impl From<&HealthConfig> for Thresholds {
    fn from(config: &HealthConfig) -> Thresholds {
        Thresholds {
            fall: config.fall.max(1),
            rise: config.rise.max(1),
        }
    }
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds::from(&HealthConfig::default())
    }
}

/// The fall/rise state machine, without clocks or sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    thresholds: Thresholds,
    up: bool,
    /// Results in a row that disagree with `up` (failures while up, successes while down).
    against: u32,
}

impl Tracker {
    pub fn new(thresholds: Thresholds) -> Tracker {
        Tracker {
            thresholds,
            up: true,
            against: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one result; returns the new state when it changed.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if success == self.up {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let needed = if self.up {
            self.thresholds.fall
        } else {
            self.thresholds.rise
        };
        if self.against < needed {
            return None;
        }
        self.up = success;
        self.against = 0;
        Some(self.up)
    }
}

/// One backend's health, shared by its probe task and the logins routed to it.
#[derive(Debug)]
pub struct BackendHealth {
    /// Mirror of `tracker.up`, so routing reads it without a lock.
    up: AtomicBool,
    tracker: Mutex<Tracker>,
    /// Whether a probe task was started for it (one per backend, however often asked).
    checked: AtomicBool,
    /// Set when a reload removed the backend from its pool: its probe task stops.
    retired: watch::Sender<bool>,
}

impl BackendHealth {
    pub fn new(thresholds: Thresholds) -> BackendHealth {
        BackendHealth {
            up: AtomicBool::new(true),
            tracker: Mutex::new(Tracker::new(thresholds)),
            checked: AtomicBool::new(false),
            retired: watch::Sender::new(false),
        }
    }

    /// The backend left its pool (reload): its probe task stops.
    pub fn retire(&self) {
        self.retired.send_replace(true);
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    /// Resolves once the backend is retired.
    async fn retirement(&self) {
        let mut rx = self.retired.subscribe();
        let _ = rx.wait_for(|retired| *retired).await;
    }

    /// True the first time only: whoever gets it starts the probe task.
    fn claim_check(&self) -> bool {
        !self.checked.swap(true, Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a probe or login-connect result; returns the new state when it changed.
    pub fn record(&self, success: bool) -> Option<bool> {
        let mut tracker = self
            .tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = tracker.record(success);
        self.up.store(tracker.is_up(), Ordering::Relaxed);
        changed
    }
}

impl Default for BackendHealth {
    fn default() -> BackendHealth {
        BackendHealth::new(Thresholds::default())
    }
}

/// Connects to `address` the way a login does (TLS included, per the pool's `transport`) and
/// reads its greeting, all within `timeout`: `* OK` for IMAP (after STARTTLS when the pool
/// uses it), an EHLO answer for SMTP. Says goodbye politely (best effort) so the backend logs
/// no error.
///
/// # Errors
/// What went wrong, for the log: refused, timed out, closed, a certificate not trusted, or
/// the wrong greeting.
pub async fn probe(
    address: &str,
    protocol: Protocol,
    transport: &Transport,
    timeout: Duration,
) -> Result<(), String> {
    let result = match protocol {
        Protocol::Imap => crate::imap::backend::probe(address, transport, timeout).await,
        Protocol::Smtp => crate::smtp::backend::probe(address, "mailgate", transport, timeout)
            .await
            .map(drop),
    };
    result.map_err(|e| e.to_string())
}

/// Probes one backend every `interval` until `shutdown` reaches `Closing` or the backend is
/// retired, recording each result in `health` and mirroring the state in `gauge`. The first
/// probe runs at once.
pub async fn check_loop<P, F>(
    name: String,
    health: Arc<BackendHealth>,
    gauge: Option<IntGauge>,
    interval: Duration,
    mut probe: P,
    mut shutdown: Shutdown,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            biased;
            () = health.retirement() => return,
            () = shutdown.reached(Phase::Closing) => return,
            _ = ticker.tick() => {
                tokio::select! {
                    biased;
                    () = health.retirement() => return,
                    () = shutdown.reached(Phase::Closing) => return,
                    r = probe() => r,
                }
            }
        };
        match (health.record(result.is_ok()), &result) {
            (Some(false), Err(e)) => {
                tracing::warn!(backend = %name, error = %e, "backend marked down")
            }
            (Some(false), Ok(())) => tracing::warn!(backend = %name, "backend marked down"),
            (Some(true), _) => tracing::info!(backend = %name, "backend marked up"),
            (None, Err(e)) => tracing::debug!(backend = %name, error = %e, "health probe failed"),
            (None, Ok(())) => {}
        }
        if let Some(gauge) = &gauge {
            gauge.set(i64::from(health.is_up()));
        }
    }
}

/// Starts one probe task per backend of every pool (IMAP and SMTP), each stopping when
/// `shutdown` reaches `Closing` or a reload retires its backend.
pub fn spawn_checkers(
    router: &Router,
    metrics: &Metrics,
    smtp_extensions: &Arc<BackendExtensions>,
    shutdown: &Shutdown,
) {
    for pool in router.pools() {
        let backends = pool.backends();
        for protocol in [Protocol::Imap, Protocol::Smtp] {
            for backend in backends.get(protocol) {
                spawn_checker(pool, protocol, backend, metrics, smtp_extensions, shutdown);
            }
        }
    }
}

/// Starts the probe task of one backend of `pool`, unless it runs already, with the pool's
/// health settings. An SMTP backend's probe is an EHLO, whose answer also refreshes the
/// extensions mailgate offers clients (`smtp_extensions`).
pub fn spawn_checker(
    pool: &Pool,
    protocol: Protocol,
    backend: &Backend,
    metrics: &Metrics,
    smtp_extensions: &Arc<BackendExtensions>,
    shutdown: &Shutdown,
) {
    let health = backend.health().clone();
    if !health.claim_check() {
        return;
    }
    let address = backend.address.clone();
    let name = format!("{}/{}/{}", pool.name, protocol.as_str(), address);
    let extensions = smtp_extensions.clone();
    let transport = pool.transport.clone();
    let timeout = pool.connect_timeout();
    let gauge = metrics.backend_up(&pool.name, &address);
    gauge.set(i64::from(health.is_up()));
    let probed = health.clone();
    tokio::spawn(check_loop(
        name,
        health,
        Some(gauge),
        pool.health.interval.0,
        move || {
            let address = address.clone();
            let extensions = extensions.clone();
            let transport = transport.clone();
            let probed = probed.clone();
            async move {
                match protocol {
                    Protocol::Imap => probe(&address, protocol, &transport, timeout).await,
                    Protocol::Smtp => {
                        extensions
                            .probe_for(&address, &transport, timeout, Some(&probed))
                            .await
                    }
                }
            }
        },
        shutdown.clone(),
    ));
}

/// Whether this instance should get traffic: listeners bound (and not draining), and every
/// pool with at least one backend up for each protocol it serves.
#[derive(Debug)]
pub struct Readiness {
    listening: AtomicBool,
    pools: Vec<Arc<Pool>>,
    /// Protocols some listener speaks; a pool's backends of other protocols are not needed.
    protocols: Vec<Protocol>,
}

/// Why `/readyz` says no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub listening: bool,
    /// (pool, protocol) pairs with no backend up.
    pub pools: Vec<(String, Protocol)>,
}

impl NotReady {
    /// The short JSON body of a 503.
    pub fn to_json(&self) -> serde_json::Value {
        let pools: Vec<serde_json::Value> = self
            .pools
            .iter()
            .map(|(pool, protocol)| serde_json::json!({ "pool": pool, "protocol": protocol.as_str() }))
            .collect();
        serde_json::json!({
            "ready": false,
            "listening": self.listening,
            "pools_without_backend": pools,
        })
    }
}

impl Readiness {
    pub fn new(config: &Config, router: &Router) -> Readiness {
        let protocols = [Protocol::Imap, Protocol::Smtp]
            .into_iter()
            .filter(|p| config.listeners.iter().any(|l| l.protocol == *p))
            .collect();
        Readiness {
            listening: AtomicBool::new(false),
            pools: router.pools().cloned().collect(),
            protocols,
        }
    }

    /// Set when every listener accepts; cleared when draining starts.
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    /// # Errors
    /// What is missing.
    pub fn check(&self) -> Result<(), NotReady> {
        let listening = self.listening.load(Ordering::Relaxed);
        let mut pools = Vec::new();
        for pool in &self.pools {
            let now = pool.backends();
            for protocol in [Protocol::Imap, Protocol::Smtp] {
                let backends = now.get(protocol);
                let served = self.protocols.contains(&protocol) && !backends.is_empty();
                if served && !backends.iter().any(|b| b.health().is_up()) {
                    pools.push((pool.name.clone(), protocol));
                }
            }
        }
        if listening && pools.is_empty() {
            Ok(())
        } else {
            Err(NotReady { listening, pools })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::shutdown;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut t = Tracker::new(Thresholds { fall: 2, rise: 3 });
        assert!(t.is_up());
        // One failure between successes never marks it down.
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert!(t.is_up());
        assert_eq!(t.record(false), Some(false));
        assert!(!t.is_up());
        assert_eq!(t.record(false), None);
        // Two successes and a failure start the count again.
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert!(t.is_up());
    }

    #[test]
    fn fall_of_one_marks_down_at_the_first_failure() {
        let health = BackendHealth::new(Thresholds { fall: 1, rise: 1 });
        assert_eq!(health.record(false), Some(false));
        assert!(!health.is_up());
        assert_eq!(health.record(true), Some(true));
        assert!(health.is_up());
    }

    #[tokio::test(start_paused = true)]
    async fn the_check_loop_probes_every_interval_and_sets_the_gauge() {
        let health = Arc::new(BackendHealth::new(Thresholds { fall: 2, rise: 2 }));
        let gauge = IntGauge::new("up", "test").unwrap_or_else(|e| panic!("{e}"));
        gauge.set(1);
        // Probes 0..3 fail, 4.. succeed.
        let calls = Arc::new(AtomicUsize::new(0));
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(check_loop(
            "p/imap/x".into(),
            health.clone(),
            Some(gauge.clone()),
            Duration::from_secs(5),
            {
                let calls = calls.clone();
                move || {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 4 {
                            Err("refused".to_string())
                        } else {
                            Ok(())
                        }
                    }
                }
            },
            shutdown,
        ));
        let settle = || tokio::time::sleep(Duration::from_millis(1));
        settle().await;
        // t=0: first probe fails, still up (fall 2).
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(health.is_up());
        assert_eq!(gauge.get(), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        settle().await;
        // t=5: second failure: down.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!health.is_up());
        assert_eq!(gauge.get(), 0);
        tokio::time::sleep(Duration::from_secs(15)).await;
        settle().await;
        // t=20: probes 3 and 4 failed, probe 5 succeeded: one success, still down.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert!(!health.is_up());
        tokio::time::sleep(Duration::from_secs(5)).await;
        settle().await;
        // t=25: second success in a row: up.
        assert!(health.is_up());
        assert_eq!(gauge.get(), 1);
        trigger.advance(Phase::Closing);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| panic!("the check loop did not stop on shutdown"))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_backend_stops_being_probed_even_mid_probe() {
        let health = Arc::new(BackendHealth::new(Thresholds { fall: 1, rise: 1 }));
        let calls = Arc::new(AtomicUsize::new(0));
        let (_trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(check_loop(
            "p/imap/x".into(),
            health.clone(),
            None,
            Duration::from_secs(5),
            {
                let calls = calls.clone();
                move || {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        // The second probe hangs: retirement must end it.
                        if n == 1 {
                            std::future::pending::<()>().await;
                        }
                        Ok(())
                    }
                }
            },
            shutdown,
        ));
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!health.is_retired());
        health.retire();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| panic!("the check loop did not stop on retirement"))
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "probed after retirement");
    }

    #[test]
    fn a_backends_check_is_claimed_once() {
        let health = BackendHealth::new(Thresholds::default());
        assert!(health.claim_check());
        assert!(!health.claim_check());
    }

    #[tokio::test]
    async fn probe_reads_the_greeting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        tokio::spawn(async move {
            // Each greeting, then the answer to the probe's first command.
            for (greeting, answer) in [
                (&b"* OK ready\r\n"[..], &b""[..]),
                (b"220 mx ESMTP\r\n", b"250 mx\r\n"),
                (b"* BYE busy\r\n", b""),
            ] {
                if let Ok((mut s, _)) = listener.accept().await {
                    let _ = s.write_all(greeting).await;
                    let mut sink = [0u8; 64];
                    let _ = s.read(&mut sink).await;
                    let _ = s.write_all(answer).await;
                    let _ = s.read(&mut sink).await;
                }
            }
        });
        let t = Duration::from_secs(2);
        let plain = Transport::plain(crate::resolver::Resolver::system().expect("resolver"));
        assert_eq!(probe(&addr, Protocol::Imap, &plain, t).await, Ok(()));
        assert_eq!(probe(&addr, Protocol::Smtp, &plain, t).await, Ok(()));
        let bye = probe(&addr, Protocol::Imap, &plain, t).await;
        assert!(
            bye.as_ref().is_err_and(|e| e.contains("greeted with BYE")),
            "{bye:?}"
        );
        // Nobody listens there any more.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let dead = closed
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        drop(closed);
        let refused = probe(&dead, Protocol::Imap, &plain, t).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.starts_with("unreachable:") && e.contains("refused")),
            "{refused:?}"
        );
    }
}
