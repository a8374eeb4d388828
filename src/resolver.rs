//! Backend addresses to socket addresses: hickory-resolver behind our own [`Resolver`], so the
//! rest of the code sees one small type and one error, and swapping or instrumenting the DNS
//! client is this file.
//!
//! Why not the system's `getaddrinfo` (what `TcpStream::connect("host:port")` does): it runs on
//! tokio's blocking pool at every backend connect and caches nothing (glibc has no cache without
//! nscd), so every login would pay a DNS round trip, and a DNS outage would fail every login.
//! Here:
//!
//! - IP literals (`127.0.0.1:143`, `[::1]:143`) never touch DNS.
//! - Host names are looked up by hickory: `/etc/hosts` first, then the name servers of
//!   `/etc/resolv.conf`. An answer is used until its TTL runs out (hickory's `valid_until`),
//!   then the name is looked up again; not before.
//! - Serve-stale (RFC 8767): when the lookup of a name that resolved before fails (no answer,
//!   timeout, SERVFAIL), the last good addresses are used, with one warning per failure streak,
//!   and DNS is asked again only after [`Timing::recheck`]. A DNS outage must not take the mail
//!   service down. An authoritative "no such name" or "no address records" (NXDOMAIN, NODATA)
//!   is an answer, not a failure: the name then fails like one that never resolved.
//! - A lookup runs in a task of its own, bounded by [`Timing::lookup`]: a login whose connect
//!   deadline gives up on it does not cancel it, and its answer (or failure) is recorded for the
//!   next login. While a name with a stale answer is being looked up again, other logins use the
//!   stale answer at once instead of waiting for DNS too.
//! - A stale answer is used for at most [`Timing::max_stale`] (a day, RFC 8767's suggested
//!   floor) past its TTL: an address not confirmed by DNS for that long may belong to another
//!   machine by now, and a login must not send a master password there.
//! - [`Resolver::reload`] (`SIGHUP`) reads the configuration again (`/etc/hosts`, whose
//!   answers hickory keeps for a day, and `/etc/resolv.conf`) and expires every cached answer,
//!   so an edited `/etc/hosts` takes effect at the next login.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::HostPort;

/// Why a backend address gives no socket address. Each names the address as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Not `host:port` (config validation makes this a programming error, not DNS's).
    #[error("{0}")]
    Address(String),
    /// DNS answered that the name has no address: a retry helps only once DNS changes.
    #[error("{address}: {host} does not resolve: {reason}")]
    NotFound {
        address: String,
        host: String,
        reason: String,
    },
    /// The lookup failed (no answer in time, SERVFAIL, no name server) and there is no earlier
    /// answer to fall back on: a retry may help.
    #[error("{address}: cannot resolve {host}: {reason}")]
    Failed {
        address: String,
        host: String,
        reason: String,
    },
}

/// Why a resolver cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct SetupError(String);

/// How long DNS may take, and how stale answers are used.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// One DNS request's timeout (hickory's); `/etc/resolv.conf` may set it lower.
    request: Duration,
    /// Hickory's attempts per request; `/etc/resolv.conf` may set fewer.
    attempts: usize,
    /// The bound on one whole lookup, whatever hickory does inside it (A and AAAA, search
    /// domains, several name servers, retries), so no lookup task outlives it.
    lookup: Duration,
    /// How long a login waits for a new answer when a stale one is at hand: a healthy name
    /// server answers well within it, and it stays far below the backend connect timeout.
    stale_wait: Duration,
    /// After a failed lookup, how long the stale answer is used without asking DNS again
    /// (RFC 8767's failure recheck timer), so an outage does not cost every login a timeout.
    recheck: Duration,
    /// How long past its TTL an answer may still be served stale (RFC 8767's maximum stale
    /// timer); after that the name fails like one that never resolved until DNS answers.
    max_stale: Duration,
}

impl Timing {
    const DEFAULT: Timing = Timing {
        request: Duration::from_secs(2),
        attempts: 2,
        lookup: Duration::from_secs(5),
        stale_wait: Duration::from_millis(500),
        recheck: Duration::from_secs(30),
        max_stale: Duration::from_secs(24 * 60 * 60),
    };
}

/// Resolves backend addresses (`host:port`). Cloning is cheap and shares the cache: one
/// resolver serves every pool.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

/// Where a resolver's configuration comes from; read again at each [`Resolver::reload`].
type Source = Arc<dyn Fn() -> Result<(ResolverConfig, ResolverOpts), String> + Send + Sync>;

struct Inner {
    /// hickory's client; replaced whole by a reload (lookups under way keep the old one).
    dns: ArcSwap<TokioResolver>,
    source: Source,
    /// Counts reloads: an answer looked up under an earlier configuration is handed to the
    /// login that waits for it but not cached.
    generation: AtomicU64,
    /// The last good answer per host name, for serve-stale; also what the hot path reads while
    /// the answer is fresh. Holds only names from the config, so it stays small.
    names: Mutex<HashMap<String, Entry>>,
    timing: Timing,
}

#[derive(Debug, Clone)]
struct Entry {
    ips: Arc<[IpAddr]>,
    /// Until when the answer is fresh: its TTL, as hickory computed it.
    valid_until: Instant,
    /// When a lookup started that has not finished: other logins use the stale answer instead
    /// of starting another one.
    refreshing_since: Option<Instant>,
    /// Set while lookups fail: DNS is not asked again before then. Also says that this failure
    /// streak was already logged.
    failing_until: Option<Instant>,
}

/// What the cache says about a name.
enum Cached {
    Fresh(Arc<[IpAddr]>),
    /// Past its TTL; `lookup`: whether this caller should start the new lookup.
    Stale {
        ips: Arc<[IpAddr]>,
        lookup: bool,
    },
    Unknown,
}

/// Why a lookup gave no addresses (the caller adds the address).
#[derive(Debug, Clone)]
enum Failure {
    NotFound(String),
    Failed(String),
}

impl Failure {
    fn for_address(self, address: &str, host: &str) -> ResolveError {
        let (address, host) = (address.to_owned(), host.to_owned());
        match self {
            Failure::NotFound(reason) => ResolveError::NotFound {
                address,
                host,
                reason,
            },
            Failure::Failed(reason) => ResolveError::Failed {
                address,
                host,
                reason,
            },
        }
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("names", &self.inner.names().len())
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver configured like the system's: `/etc/hosts`, then the name servers, search
    /// domains and options of `/etc/resolv.conf` (timeouts capped at 2 s and 2 attempts, so a
    /// dead name server cannot hold a login). When `/etc/resolv.conf` cannot be read, names
    /// resolve from `/etc/hosts` only, with a warning: a broken DNS setup must not stop
    /// mailgate from starting with backends written as IP addresses.
    ///
    /// # Errors
    /// hickory refuses the configuration (it does not without DNS-over-TLS features).
    pub fn system() -> Result<Resolver, SetupError> {
        let source: Source = Arc::new(|| {
            let (config, mut options) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?;
            options.use_hosts_file = ResolveHosts::Always;
            Ok((config, options))
        });
        let (config, options) = source().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "backend host names resolve from /etc/hosts only");
            let mut options = ResolverOpts::default();
            options.use_hosts_file = ResolveHosts::Always;
            (ResolverConfig::from_name_servers(Vec::new()), options)
        });
        Resolver::build(source, config, options, Timing::DEFAULT)
    }

    /// A resolver that asks exactly `servers` (UDP, then TCP for truncated answers), with no
    /// search domains and no `/etc/hosts`.
    ///
    /// # Errors
    /// hickory refuses the configuration (it does not without DNS-over-TLS features).
    pub fn with_nameservers(servers: Vec<SocketAddr>) -> Result<Resolver, SetupError> {
        let source: Source =
            Arc::new(move || Ok((nameservers(servers.clone()), hermetic_options())));
        let (config, options) = source().map_err(SetupError)?;
        Resolver::build(source, config, options, Timing::DEFAULT)
    }

    fn build(
        source: Source,
        config: ResolverConfig,
        options: ResolverOpts,
        timing: Timing,
    ) -> Result<Resolver, SetupError> {
        let dns = client(config, options, timing)?;
        Ok(Resolver {
            inner: Arc::new(Inner {
                dns: ArcSwap::from_pointee(dns),
                source,
                generation: AtomicU64::new(0),
                names: Mutex::new(HashMap::new()),
                timing,
            }),
        })
    }

    /// Reads the configuration again (for [`Resolver::system`]: `/etc/hosts` and
    /// `/etc/resolv.conf`), puts it in place, and expires every cached answer, so each name is
    /// looked up again under the new configuration at its next login. The old answers stay as
    /// the serve-stale fallback. Returns how many names were expired. Reads files: call it off
    /// the async workers.
    ///
    /// # Errors
    /// The configuration cannot be read (an unreadable `/etc/resolv.conf`) or built; the
    /// resolver is unchanged then.
    pub fn reload(&self) -> Result<usize, SetupError> {
        let (config, options) = (self.inner.source)().map_err(SetupError)?;
        let dns = client(config, options, self.inner.timing)?;
        let mut names = self.inner.names();
        self.inner.dns.store(Arc::new(dns));
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        for entry in names.values_mut() {
            entry.valid_until = entry.valid_until.min(now);
            entry.refreshing_since = None;
            entry.failing_until = None;
        }
        Ok(names.len())
    }

    /// The socket addresses of `address` (`127.0.0.1:143`, `[::1]:143`, `imap1.internal:143`),
    /// in the order to try them. IP literals come back at once; host names from the cache
    /// while their TTL lasts, else from DNS, else (DNS failing) from the last good answer.
    ///
    /// # Errors
    /// `address` is not `host:port`, DNS says the name has no address, or the lookup of a
    /// name that never resolved failed.
    pub async fn resolve(&self, address: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let HostPort { host, port } = address.parse().map_err(ResolveError::Address)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let ips = self
            .ips(&host)
            .await
            .map_err(|failure| failure.for_address(address, &host))?;
        Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect())
    }

    async fn ips(&self, host: &str) -> Result<Arc<[IpAddr]>, Failure> {
        let stale = match self.inner.cached(host, Instant::now()) {
            Cached::Fresh(ips) => return Ok(ips),
            Cached::Stale { ips, lookup: false } => return Ok(ips),
            Cached::Stale { ips, lookup: true } => Some(ips),
            Cached::Unknown => None,
        };
        let lookup = tokio::spawn(Inner::lookup(self.inner.clone(), host.to_owned()));
        let lost = |e: tokio::task::JoinError| Failure::Failed(format!("lookup task: {e}"));
        match stale {
            None => lookup.await.map_err(lost)?,
            Some(stale) => match tokio::time::timeout(self.inner.timing.stale_wait, lookup).await {
                Ok(Ok(Ok(fresh))) => Ok(fresh),
                Ok(Ok(Err(Failure::NotFound(reason)))) => Err(Failure::NotFound(reason)),
                // Failed, or slower than a healthy name server: the last good answer serves.
                Ok(Ok(Err(Failure::Failed(_)))) | Ok(Err(_)) | Err(_) => Ok(stale),
            },
        }
    }
}

impl Inner {
    /// The map, even if a thread panicked while holding it (entries are always whole).
    fn names(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, host: &str, now: Instant) -> Cached {
        let mut names = self.names();
        let Some(entry) = names.get_mut(host) else {
            return Cached::Unknown;
        };
        if now < entry.valid_until {
            return Cached::Fresh(entry.ips.clone());
        }
        if now.saturating_duration_since(entry.valid_until) >= self.timing.max_stale {
            tracing::warn!(host, last = ?entry.ips, max_stale = ?self.timing.max_stale, "the last good addresses of a backend name are too old to use; looking it up as new");
            names.remove(host);
            return Cached::Unknown;
        }
        let in_flight = entry
            .refreshing_since
            .is_some_and(|since| now.saturating_duration_since(since) < self.timing.lookup);
        let resting = entry.failing_until.is_some_and(|until| now < until);
        let lookup = !in_flight && !resting;
        if lookup {
            entry.refreshing_since = Some(now);
        }
        Cached::Stale {
            ips: entry.ips.clone(),
            lookup,
        }
    }

    /// One bounded lookup of `host`, recorded in the cache whoever still waits for it.
    async fn lookup(self: Arc<Inner>, host: String) -> Result<Arc<[IpAddr]>, Failure> {
        let bound = self.timing.lookup;
        let generation = self.generation.load(Ordering::SeqCst);
        let dns = self.dns.load_full();
        let result = match tokio::time::timeout(bound, dns.lookup_ip(host.as_str())).await {
            Ok(Ok(found)) => {
                let ips: Arc<[IpAddr]> = found.iter().collect();
                if ips.is_empty() {
                    Err(Failure::NotFound("no A or AAAA records".into()))
                } else {
                    Ok((ips, found.valid_until()))
                }
            }
            Ok(Err(e)) if e.is_nx_domain() => Err(Failure::NotFound("no such name".into())),
            Ok(Err(e)) if e.is_no_records_found() => {
                Err(Failure::NotFound("no A or AAAA records".into()))
            }
            Ok(Err(e)) => Err(Failure::Failed(e.to_string())),
            Err(_) => Err(Failure::Failed(format!("no answer within {bound:?}"))),
        };
        self.record(&host, generation, result)
    }

    fn record(
        &self,
        host: &str,
        generation: u64,
        result: Result<(Arc<[IpAddr]>, Instant), Failure>,
    ) -> Result<Arc<[IpAddr]>, Failure> {
        let mut names = self.names();
        // Reloaded while this lookup ran: its answer is of the old configuration.
        if self.generation.load(Ordering::SeqCst) != generation {
            return result.map(|(ips, _)| ips);
        }
        match result {
            Ok((ips, valid_until)) => {
                let entry = Entry {
                    ips: ips.clone(),
                    valid_until,
                    refreshing_since: None,
                    failing_until: None,
                };
                let previous = names.insert(host.to_owned(), entry);
                if previous.is_some_and(|p| p.failing_until.is_some()) {
                    tracing::info!(host, addresses = ?ips, "DNS answers again for a backend name");
                }
                Ok(ips)
            }
            Err(Failure::NotFound(reason)) => {
                if let Some(gone) = names.remove(host) {
                    tracing::warn!(host, error = %reason, last = ?gone.ips, "DNS says a backend name no longer resolves");
                }
                Err(Failure::NotFound(reason))
            }
            Err(Failure::Failed(reason)) => {
                if let Some(entry) = names.get_mut(host) {
                    entry.refreshing_since = None;
                    if entry.failing_until.is_none() {
                        tracing::warn!(host, error = %reason, addresses = ?entry.ips, "DNS lookup failed; using the last good addresses until it answers again");
                    }
                    entry.failing_until = Some(Instant::now() + self.timing.recheck);
                }
                Err(Failure::Failed(reason))
            }
        }
    }
}

/// hickory's client for `config`, with its timeouts capped by `timing`.
fn client(
    config: ResolverConfig,
    mut options: ResolverOpts,
    timing: Timing,
) -> Result<TokioResolver, SetupError> {
    options.timeout = options.timeout.min(timing.request);
    options.attempts = options.attempts.min(timing.attempts);
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .map_err(|e| SetupError(e.to_string()))
}

/// UDP and TCP to each of `servers`, on its own port.
fn nameservers(servers: Vec<SocketAddr>) -> ResolverConfig {
    let config = |server: SocketAddr| {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        NameServerConfig::new(server.ip(), true, vec![udp, tcp])
    };
    ResolverConfig::from_name_servers(servers.into_iter().map(config).collect())
}

/// Options for [`Resolver::with_nameservers`]: only the given servers answer.
fn hermetic_options() -> ResolverOpts {
    let mut options = ResolverOpts::default();
    options.use_hosts_file = ResolveHosts::Never;
    options
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::UdpSocket;
    use tokio::task::JoinHandle;

    use super::*;

    /// What the test name server knows: A records by name (lowercase, no trailing dot).
    #[derive(Default)]
    struct Zone {
        records: HashMap<String, (Ipv4Addr, u32)>,
        /// Drops every query unanswered (a dead name server that still counts).
        silent: bool,
        /// Answers each query this late (a slow name server).
        delay: Duration,
    }

    /// A name server on 127.0.0.1 that answers A queries from its [`Zone`] (NXDOMAIN for names
    /// it does not know, NODATA for other types of names it knows) and counts the queries.
    struct NameServer {
        address: SocketAddr,
        zone: Arc<Mutex<Zone>>,
        queries: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for NameServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl NameServer {
        async fn start() -> NameServer {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            let address = socket.local_addr().expect("addr");
            let zone = Arc::new(Mutex::new(Zone::default()));
            let queries = Arc::new(AtomicUsize::new(0));
            let task = tokio::spawn({
                let (zone, queries) = (zone.clone(), queries.clone());
                async move {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                        queries.fetch_add(1, Ordering::SeqCst);
                        let (reply, delay) = {
                            let zone = zone.lock().expect("zone");
                            if zone.silent {
                                continue;
                            }
                            (answer(&buf[..n], &zone), zone.delay)
                        };
                        tokio::time::sleep(delay).await;
                        if let Some(reply) = reply {
                            let _ = socket.send_to(&reply, peer).await;
                        }
                    }
                }
            });
            NameServer {
                address,
                zone,
                queries,
                task,
            }
        }

        fn serve(&self, name: &str, ip: [u8; 4], ttl: u32) {
            let mut zone = self.zone.lock().expect("zone");
            zone.records.insert(name.into(), (Ipv4Addr::from(ip), ttl));
        }

        fn forget(&self, name: &str) {
            self.zone.lock().expect("zone").records.remove(name);
        }

        fn silence(&self) {
            self.zone.lock().expect("zone").silent = true;
        }

        fn answer_after(&self, delay: Duration) {
            self.zone.lock().expect("zone").delay = delay;
        }

        fn queries(&self) -> usize {
            self.queries.load(Ordering::SeqCst)
        }

        /// A resolver that asks only this server, with short timeouts so the failure cases
        /// finish in about a second.
        fn resolver(&self) -> Resolver {
            switchable(self.address, SHORT).0
        }
    }

    const SHORT: Timing = Timing {
        request: Duration::from_millis(200),
        attempts: 1,
        lookup: Duration::from_secs(1),
        ..Timing::DEFAULT
    };

    /// A resolver whose configuration names the name server in the returned cell when it is
    /// read (at the start and at each reload); `None` in the cell makes reading it fail.
    fn switchable(first: SocketAddr, timing: Timing) -> (Resolver, Arc<Mutex<Option<SocketAddr>>>) {
        let cell = Arc::new(Mutex::new(Some(first)));
        let source: Source = Arc::new({
            let cell = cell.clone();
            move || match *cell.lock().expect("cell") {
                Some(server) => Ok((nameservers(vec![server]), hermetic_options())),
                None => Err("cannot read the test's configuration".into()),
            }
        });
        let (config, options) = source().expect("configuration");
        let resolver = Resolver::build(source, config, options, timing).expect("resolver");
        (resolver, cell)
    }

    /// The reply to one query (RFC 1035 §4.1, hand-parsed: header, one question), or `None`
    /// for bytes that are not a query.
    fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
        let header = query.get(..12)?;
        let mut pos = 12;
        let mut labels = Vec::new();
        loop {
            let len = usize::from(*query.get(pos)?);
            pos += 1;
            if len == 0 {
                break;
            }
            let label = std::str::from_utf8(query.get(pos..pos + len)?).ok()?;
            labels.push(label.to_ascii_lowercase());
            pos += len;
        }
        let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
        let question = query.get(12..pos + 4)?;
        let (rcode, record) = match zone.records.get(&labels.join(".")) {
            None => (3, None),                                // NXDOMAIN
            Some(&record) if qtype == 1 => (0, Some(record)), // A
            Some(_) => (0, None),                             // NODATA (AAAA and the rest)
        };
        let mut reply = Vec::with_capacity(64);
        reply.extend_from_slice(&header[..2]); // the query's id
        reply.push(0x84 | (header[2] & 0x01)); // QR, AA, the query's RD
        reply.push(0x80 | rcode); // RA
        reply.extend_from_slice(&[0, 1, 0, u8::from(record.is_some()), 0, 0, 0, 0]);
        reply.extend_from_slice(question);
        if let Some((ip, ttl)) = record {
            reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // the question's name, A, IN
            reply.extend_from_slice(&ttl.to_be_bytes());
            reply.extend_from_slice(&[0, 4]);
            reply.extend_from_slice(&ip.octets());
        }
        Some(reply)
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter()
            .map(|a| a.parse().expect("socket addr"))
            .collect()
    }

    #[tokio::test]
    async fn ip_literals_need_no_query() {
        let server = NameServer::start().await;
        let resolver = server.resolver();
        for (address, expected) in [
            ("127.0.0.1:143", "127.0.0.1:143"),
            ("[::1]:143", "[::1]:143"),
            ("192.0.2.7:587", "192.0.2.7:587"),
        ] {
            assert_eq!(resolver.resolve(address).await, Ok(addrs(&[expected])));
        }
        assert_eq!(server.queries(), 0);
        let bad = resolver.resolve("imap1.example.com").await;
        assert!(
            matches!(&bad, Err(ResolveError::Address(e)) if e.contains("imap1.example.com")),
            "{bad:?}"
        );
    }

    #[tokio::test]
    async fn a_name_resolves_and_is_cached_for_its_ttl() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 300);
        let resolver = server.resolver();
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        let asked = server.queries();
        assert!(asked > 0, "no query reached the server");
        // Within the TTL: the same answer (another port too), and no new query.
        let again = resolver.resolve("imap1.example.com:587").await;
        assert_eq!(again, Ok(addrs(&["192.0.2.10:587"])));
        assert_eq!(server.queries(), asked);
    }

    #[tokio::test]
    async fn a_name_is_asked_again_when_its_ttl_runs_out() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 1);
        let resolver = server.resolver();
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        let asked = server.queries();
        server.serve("imap1.example.com", [192, 0, 2, 11], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let moved = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(moved, Ok(addrs(&["192.0.2.11:143"])));
        assert!(server.queries() > asked, "the name was not asked again");
    }

    #[tokio::test]
    async fn a_dead_name_server_leaves_the_last_good_answer_in_use() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 1);
        let resolver = server.resolver();
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        server.silence();
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // Past the TTL, DNS silent: the stale answer, after at most the stale wait.
        let asked = server.queries();
        let started = Instant::now();
        let stale = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(stale, Ok(addrs(&["192.0.2.10:143"])));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(server.queries() > asked, "DNS was not asked again");

        // The lookup gives up within its bound and the failure is recorded...
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let failing = resolver.inner.names().get("imap1.example.com").cloned();
        assert!(
            failing.as_ref().is_some_and(|e| e.failing_until.is_some()),
            "{failing:?}"
        );
        // ...so the next logins get the stale answer at once, without asking DNS again.
        let asked = server.queries();
        let started = Instant::now();
        let stale = resolver.resolve("imap1.example.com:993").await;
        assert_eq!(stale, Ok(addrs(&["192.0.2.10:993"])));
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.queries(), asked);
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_is_an_error_naming_it() {
        let server = NameServer::start().await;
        let resolver = server.resolver();
        let missing = resolver.resolve("missing.example.com:143").await;
        assert!(
            matches!(&missing, Err(e @ ResolveError::NotFound { .. })
                if e.to_string() == "missing.example.com:143: missing.example.com does not resolve: no such name"),
            "{missing:?}"
        );

        // No answer at all: an error too, within the lookup bound.
        server.silence();
        let started = Instant::now();
        let silent = resolver.resolve("imap9.example.com:143").await;
        assert!(
            matches!(&silent, Err(e @ ResolveError::Failed { .. })
                if e.to_string().starts_with("imap9.example.com:143: cannot resolve imap9.example.com: ")),
            "{silent:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_name_that_dns_says_is_gone_is_not_served_stale() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 1);
        let resolver = server.resolver();
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        server.forget("imap1.example.com");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let gone = resolver.resolve("imap1.example.com:143").await;
        assert!(
            matches!(&gone, Err(ResolveError::NotFound { host, .. }) if host == "imap1.example.com"),
            "{gone:?}"
        );
    }

    #[tokio::test]
    async fn a_stale_answer_is_not_served_past_its_maximum_age() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 1);
        let timing = Timing {
            max_stale: Duration::from_secs(1),
            ..SHORT
        };
        let resolver = switchable(server.address, timing).0;
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        server.silence();
        // Half a second past the TTL: still served stale.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stale = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(stale, Ok(addrs(&["192.0.2.10:143"])));
        // Past the maximum age: DNS is asked again (although the recheck timer still runs)
        // and, silent, the name fails like one that never resolved.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let asked = server.queries();
        let old = resolver.resolve("imap1.example.com:143").await;
        assert!(
            matches!(&old, Err(ResolveError::Failed { host, .. }) if host == "imap1.example.com"),
            "{old:?}"
        );
        assert!(server.queries() > asked, "DNS was not asked again");
    }

    #[tokio::test]
    async fn a_reload_reads_the_configuration_again_and_expires_every_answer() {
        let (old, new) = (NameServer::start().await, NameServer::start().await);
        old.serve("imap1.example.com", [192, 0, 2, 10], 300);
        new.serve("imap1.example.com", [192, 0, 2, 20], 300);
        let (resolver, cell) = switchable(old.address, SHORT);
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));

        // The configuration changes; until a reload, the cached answer (TTL 300 s) serves.
        *cell.lock().expect("cell") = Some(new.address);
        let cached = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(cached, Ok(addrs(&["192.0.2.10:143"])));
        assert_eq!(new.queries(), 0);

        assert_eq!(resolver.reload().map_err(|e| e.to_string()), Ok(1));
        let moved = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(moved, Ok(addrs(&["192.0.2.20:143"])));
        assert!(new.queries() > 0, "the new name server was not asked");
        let asked = new.queries();
        let again = resolver.resolve("imap1.example.com:993").await;
        assert_eq!(again, Ok(addrs(&["192.0.2.20:993"])));
        assert_eq!(new.queries(), asked, "the new answer is cached for its TTL");
    }

    /// A lookup that was under way when the reload came finishes for whoever waits for it, but
    /// its answer, from the old configuration, is not cached: the next login asks the new name
    /// server.
    #[tokio::test]
    async fn an_answer_looked_up_across_a_reload_is_not_cached() {
        let (old, new) = (NameServer::start().await, NameServer::start().await);
        old.serve("imap1.example.com", [192, 0, 2, 10], 300);
        old.answer_after(Duration::from_secs(1));
        new.serve("imap1.example.com", [192, 0, 2, 20], 300);
        let patient = Timing {
            request: Duration::from_secs(3),
            attempts: 1,
            lookup: Duration::from_secs(5),
            ..Timing::DEFAULT
        };
        let (resolver, cell) = switchable(old.address, patient);
        let under_way = tokio::spawn({
            let resolver = resolver.clone();
            async move { resolver.resolve("imap1.example.com:143").await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while old.queries() == 0 {
            assert!(
                Instant::now() < deadline,
                "the old name server was never asked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        *cell.lock().expect("cell") = Some(new.address);
        // Nothing cached yet: the old server holds its answer for a second.
        assert_eq!(resolver.reload().map_err(|e| e.to_string()), Ok(0));

        let finished = under_way.await.expect("lookup task");
        assert_eq!(finished, Ok(addrs(&["192.0.2.10:143"])));
        let next = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(next, Ok(addrs(&["192.0.2.20:143"])));
        assert!(new.queries() > 0, "the new name server was not asked");
    }

    #[tokio::test]
    async fn a_reload_that_cannot_read_the_configuration_changes_nothing() {
        let server = NameServer::start().await;
        server.serve("imap1.example.com", [192, 0, 2, 10], 300);
        let (resolver, cell) = switchable(server.address, SHORT);
        let first = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(first, Ok(addrs(&["192.0.2.10:143"])));
        let asked = server.queries();

        *cell.lock().expect("cell") = None;
        let failed = resolver.reload().map_err(|e| e.to_string());
        assert_eq!(
            failed,
            Err("DNS resolver: cannot read the test's configuration".into())
        );
        // The answer is still fresh and the old name server still the one asked.
        let cached = resolver.resolve("imap1.example.com:143").await;
        assert_eq!(cached, Ok(addrs(&["192.0.2.10:143"])));
        assert_eq!(server.queries(), asked);
        server.serve("imap2.example.com", [192, 0, 2, 11], 300);
        let other = resolver.resolve("imap2.example.com:143").await;
        assert_eq!(other, Ok(addrs(&["192.0.2.11:143"])));
    }

    #[tokio::test]
    async fn the_system_resolver_knows_localhost_without_a_name_server() {
        let resolver = Resolver::system().expect("resolver");
        let found = resolver.resolve("localhost:143").await.expect("localhost");
        assert!(
            found.contains(&"127.0.0.1:143".parse().expect("addr")),
            "{found:?}"
        );
        // A reload reads /etc/hosts and /etc/resolv.conf again; localhost still resolves.
        let expired = tokio::task::spawn_blocking({
            let resolver = resolver.clone();
            move || resolver.reload().map_err(|e| e.to_string())
        })
        .await
        .expect("reload task");
        assert_eq!(expired, Ok(1));
        let again = resolver.resolve("localhost:143").await.expect("localhost");
        assert_eq!(again, found);
    }
}
