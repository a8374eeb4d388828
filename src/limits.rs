//! The abuse limits of `limits:`: connection caps at accept, logged-in sessions per user and
//! address, and the failed-login budgets with their growing reply delay.
//!
//! - **Connections**: `max_connections` (every listener together) and `max_connections_per_ip`
//!   are checked in the accept loop ([`Limiter::admit`]); the [`ConnectionPermit`] lives as long
//!   as the connection and gives its place back when dropped.
//! - **Sessions**: `max_sessions_per_user_ip` counts logged-in sessions of one user from one
//!   address, **per protocol** (as Dovecot's `mail_max_userip_connections` does): an IMAP client
//!   with many folders open never blocks the same user's mail submission. The
//!   [`SessionPermit`] is taken when the password is proven and held by the spliced session.
//! - **Failed logins**: governor's keyed GCRA limiters count failures only (a right password
//!   never spends budget), one per client address and one per user. [`Limiter::failed`]
//!   records a failure and says how long to wait before the reply: `auth_failure_delay` times
//!   the address's recent failures, at most `auth_failure_max_delay`. [`Limiter::gate`], before
//!   any password work, says whether the address or the user has spent its budget.
//!
//! Addresses in `trusted_networks` (webmail, NAT gateways) are exempt from every per-address
//! limit: no per-IP connection cap, no session cap, no per-IP failure budget, and a flat
//! failure delay. The per-user budget applies to them too: it protects the account, wherever
//! the guesses come from.
//!
//! Every map here is pruned: connection and session counts remove an entry at zero, and
//! [`Limiter::prune`] (on a timer) drops failure state that has been forgiven.
//!
//! A reload ([`Limiter::apply`]) replaces the values checked against; the counts stay, so the
//! connections and sessions open then count under the new caps.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::hash::{BuildHasher as _, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{IpNet, Limits, Protocol, Rate};

/// How often [`Limiter::prune`] runs.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// Why a connection was refused at accept: the `reason` label of
/// `mailgate_connections_rejected_total`, and the word in the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// `max_connections`: every listener together is full.
    MaxConnections,
    /// `max_connections_per_ip`: this client address has its share.
    MaxConnectionsPerIp,
    /// A `proxy_protocol` listener, and the peer is not in `trusted_proxies`.
    UntrustedProxy,
    /// A `proxy_protocol` listener, and no valid PROXY header came in time.
    ProxyHeader,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::MaxConnections,
        Rejection::MaxConnectionsPerIp,
        Rejection::UntrustedProxy,
        Rejection::ProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::MaxConnectionsPerIp => "max_connections_per_ip",
            Rejection::UntrustedProxy => "untrusted_proxy",
            Rejection::ProxyHeader => "proxy_header",
        }
    }
}

/// What the failure budgets allow a login before any password work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Verify as usual.
    Open,
    /// The user has spent its budget: only a password already proven right (in the
    /// verification cache) logs in; nothing is hashed. The real user, whose client logs in
    /// again and again with the right password, is not locked out by someone guessing.
    CachedOnly,
    /// The client address has spent its budget: refused without looking at the password.
    Throttled,
}

/// Connection and session counts, shared with the permits that give their place back.
#[derive(Debug, Default)]
struct Counts {
    total: AtomicU32,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    sessions: Mutex<HashMap<SessionKey, u32>>,
    /// Keys the session map (randomly seeded, so a user name cannot be picked to share
    /// another's count).
    session_hasher: RandomState,
}

/// A (protocol, user, address) triple as a 64-bit hash: a permit held by every logged-in
/// session for hours carries 8 bytes instead of a copy of the user name.
type SessionKey = u64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while counting cannot leave a count half-written; go on with the data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes one from `key`'s count, removing the entry at zero.
fn release<K: Hash + Eq>(map: &Mutex<HashMap<K, u32>>, key: &K) {
    let mut map = lock(map);
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// After a flood the maps are empty again but keep their capacity; give it back.
fn shrink<K: Hash + Eq, V>(map: &Mutex<HashMap<K, V>>) {
    let mut map = lock(map);
    if map.capacity() > 2 * map.len() + 64 {
        map.shrink_to_fit();
    }
}

/// One accepted connection's place under `max_connections` (and `max_connections_per_ip`,
/// unless the peer is trusted). Dropping it gives the place back.
#[derive(Debug)]
pub struct ConnectionPermit {
    counts: Arc<Counts>,
    /// The address counted per IP; `None` for a trusted peer (or before it was counted).
    ip: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            release(&self.counts.per_ip, &ip);
        }
    }
}

/// One logged-in session's place under `max_sessions_per_user_ip`, held by the spliced
/// session. Dropping it gives the place back.
#[derive(Debug)]
pub struct SessionPermit {
    counts: Arc<Counts>,
    /// `None` for a trusted peer: nothing counted.
    key: Option<SessionKey>,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            release(&self.counts.sessions, key);
        }
    }
}

type FailureLimiter<K, C> =
    RateLimiter<K, DefaultKeyedStateStore<K>, C, StateInformationMiddleware>;

/// One failure budget (`failures_per_ip` or `failures_per_user`): a keyed GCRA limiter that
/// sees failures only, and the keys whose budget is spent.
struct FailureBudget<K: Hash + Eq + Clone, C: Clock> {
    limiter: FailureLimiter<K, C>,
    /// Keys that have spent their budget, until when. governor cannot tell whether a key is
    /// over its quota without spending a cell, and the check before a login must not count as
    /// a failure; so a failure that leaves no budget puts its key here.
    spent: Mutex<HashMap<K, C::Instant>>,
    /// As configured: a reload with the same rate keeps this budget.
    rate: Rate,
    /// The budget: failures allowed in a burst.
    count: u32,
    /// How long until one failure is forgiven (`per / count`).
    refill: Duration,
    clock: C,
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> FailureBudget<K, C> {
    fn new(rate: Rate, clock: C) -> Self {
        let count = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
        let refill = (rate.per / count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(refill)
            .unwrap_or_else(|| Quota::per_second(count))
            .allow_burst(count);
        FailureBudget {
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
            spent: Mutex::new(HashMap::new()),
            rate,
            count: count.get(),
            refill,
            clock,
        }
    }

    /// This budget when it already counts at `rate`, else a fresh one that does.
    fn at_rate(self: &Arc<Self>, rate: Rate, clock: &C) -> Arc<Self> {
        if self.rate == rate {
            Arc::clone(self)
        } else {
            Arc::new(FailureBudget::new(rate, clock.clone()))
        }
    }

    /// Whether `key` has spent its budget. One lookup; an expired mark is removed.
    fn is_spent<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut spent = lock(&self.spent);
        match spent.get(key) {
            Some(until) if *until > self.clock.now() => true,
            Some(_) => {
                spent.remove(key);
                false
            }
            None => false,
        }
    }

    /// Records one failure of `key`; returns its recent failures, this one included (the
    /// budget when it is spent).
    fn fail(&self, key: K) -> u32 {
        match self.limiter.check_key(&key) {
            Ok(state) => {
                let left = state.remaining_burst_capacity();
                if left == 0 {
                    // The next failure conforms within one refill period; wait that long.
                    let until = self.clock.now() + Nanos::from(self.refill);
                    lock(&self.spent).insert(key, until);
                }
                self.count.saturating_sub(left)
            }
            Err(not_until) => {
                // Failures that raced past the check before the login.
                lock(&self.spent).insert(key, not_until.earliest_possible());
                self.count
            }
        }
    }

    /// Forgets what no longer matters: keys the limiter cannot tell from fresh ones, marks
    /// that have expired.
    fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = self.clock.now();
        lock(&self.spent).retain(|_, until| *until > now);
        shrink(&self.spent);
    }

    /// Keys with state (limiter and marks), for tests and debugging.
    fn len(&self) -> usize {
        self.limiter.len() + lock(&self.spent).len()
    }
}

/// The values of `limits:` that the counts and budgets are checked against: what a reload
/// replaces ([`Limiter::apply`]).
struct Rules<C: Clock> {
    max_connections: u32,
    max_connections_per_ip: u32,
    max_sessions_per_user_ip: u32,
    failure_delay: Duration,
    failure_max_delay: Duration,
    trusted: Vec<IpNet>,
    /// Shared with the rules a reload puts in place when its rate is the same, so the failures
    /// counted so far still count.
    failures_ip: Arc<FailureBudget<IpAddr, C>>,
    failures_user: Arc<FailureBudget<String, C>>,
}

impl<C: Clock> Rules<C> {
    /// `limits`' values, checked with the given failure budgets (of `limits`' rates).
    fn new(
        limits: &Limits,
        failures_ip: Arc<FailureBudget<IpAddr, C>>,
        failures_user: Arc<FailureBudget<String, C>>,
    ) -> Self {
        Rules {
            max_connections: limits.max_connections,
            max_connections_per_ip: limits.max_connections_per_ip,
            max_sessions_per_user_ip: limits.max_sessions_per_user_ip,
            failure_delay: limits.auth_failure_delay.0,
            failure_max_delay: limits.auth_failure_max_delay.0,
            trusted: limits.trusted_networks.clone(),
            failures_ip,
            failures_user,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    fn delay_after(&self, failures: u32) -> Duration {
        self.failure_delay
            .saturating_mul(failures.max(1))
            .min(self.failure_max_delay)
    }
}

/// Every limit of `limits:` that needs state. Shared by all connections (`Context`).
///
/// The counts live as long as the process; the rules they are checked against are replaced
/// whole by a reload ([`Limiter::apply`]), between two checks.
pub struct Limiter<C: Clock = DefaultClock> {
    rules: ArcSwap<Rules<C>>,
    counts: Arc<Counts>,
    clock: C,
}

impl Limiter<DefaultClock> {
    pub fn new(limits: &Limits) -> Limiter<DefaultClock> {
        Limiter::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// A limiter whose failure budgets run on `clock` (tests use governor's fake clock).
    pub fn with_clock(limits: &Limits, clock: C) -> Limiter<C> {
        let rules = Rules::new(
            limits,
            Arc::new(FailureBudget::new(limits.failures_per_ip, clock.clone())),
            Arc::new(FailureBudget::new(limits.failures_per_user, clock.clone())),
        );
        Limiter {
            rules: ArcSwap::from_pointee(rules),
            counts: Arc::new(Counts::default()),
            clock,
        }
    }

    /// Puts a reloaded `limits:` in place for the next check. The counts stay: connections and
    /// sessions open now count under the new caps (none is closed for being over a lowered
    /// one), and a trusted address's permits give back what they took. A failure budget whose
    /// rate is the same keeps its failures; one whose rate changed starts afresh.
    pub fn apply(&self, limits: &Limits) {
        let running = self.rules.load();
        let failures_ip = running
            .failures_ip
            .at_rate(limits.failures_per_ip, &self.clock);
        let failures_user = running
            .failures_user
            .at_rate(limits.failures_per_user, &self.clock);
        self.rules
            .store(Arc::new(Rules::new(limits, failures_ip, failures_user)));
    }

    /// Whether `ip` is in `trusted_networks`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.rules.load().is_trusted(ip)
    }

    /// Counts a new connection from `ip`, or says which cap it is over. Never waits.
    ///
    /// # Errors
    /// The cap the connection would exceed.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionPermit, Rejection> {
        let rules = self.rules.load();
        let before = self.counts.total.fetch_add(1, Ordering::AcqRel);
        // From here on, dropping the permit gives the place back.
        let mut permit = ConnectionPermit {
            counts: Arc::clone(&self.counts),
            ip: None,
        };
        if before >= rules.max_connections {
            return Err(Rejection::MaxConnections);
        }
        let ip = ip.to_canonical();
        if rules.is_trusted(ip) {
            return Ok(permit);
        }
        let mut per_ip = lock(&self.counts.per_ip);
        let n = per_ip.get(&ip).copied().unwrap_or(0);
        if n >= rules.max_connections_per_ip {
            return Err(Rejection::MaxConnectionsPerIp);
        }
        per_ip.insert(ip, n + 1);
        permit.ip = Some(ip);
        Ok(permit)
    }

    /// A place for one more logged-in `protocol` session of `user` from `ip`; `None` when
    /// `max_sessions_per_user_ip` are open already.
    pub fn open_session(
        &self,
        protocol: Protocol,
        user: &str,
        ip: IpAddr,
    ) -> Option<SessionPermit> {
        let rules = self.rules.load();
        let ip = ip.to_canonical();
        if rules.is_trusted(ip) {
            return Some(SessionPermit {
                counts: Arc::clone(&self.counts),
                key: None,
            });
        }
        let key = self.counts.session_hasher.hash_one((protocol, user, ip));
        let mut sessions = lock(&self.counts.sessions);
        let n = sessions.get(&key).copied().unwrap_or(0);
        if n >= rules.max_sessions_per_user_ip {
            return None;
        }
        sessions.insert(key, n + 1);
        Some(SessionPermit {
            counts: Arc::clone(&self.counts),
            key: Some(key),
        })
    }

    /// What the failure budgets allow a login of `user` (the full, lowercase address) from
    /// `ip`, before any password work: two map lookups.
    pub fn gate(&self, ip: IpAddr, user: &str) -> Gate {
        let rules = self.rules.load();
        let ip = ip.to_canonical();
        if !rules.is_trusted(ip) && rules.failures_ip.is_spent(&ip) {
            Gate::Throttled
        } else if rules.failures_user.is_spent(user) {
            Gate::CachedOnly
        } else {
            Gate::Open
        }
    }

    /// Records a failed login (a wrong password) of `user` from `ip`; returns how long to wait
    /// before the reply: `auth_failure_delay` times the address's recent failures, at most
    /// `auth_failure_max_delay` (flat `auth_failure_delay` for a trusted address).
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let rules = self.rules.load();
        rules.failures_user.fail(user.to_string());
        let ip = ip.to_canonical();
        if rules.is_trusted(ip) {
            return rules.failure_delay;
        }
        let recent = rules.failures_ip.fail(ip);
        rules.delay_after(recent)
    }

    /// How long to wait before a `Throttled` reply: as after a failure with the budget spent.
    pub fn throttled_delay(&self, ip: IpAddr) -> Duration {
        let rules = self.rules.load();
        if rules.is_trusted(ip.to_canonical()) {
            rules.failure_delay
        } else {
            rules.delay_after(rules.failures_ip.count)
        }
    }

    /// Drops forgiven failure state and gives back memory after a flood; run on a timer
    /// ([`PRUNE_INTERVAL`]).
    pub fn prune(&self) {
        let rules = self.rules.load();
        rules.failures_ip.prune();
        rules.failures_user.prune();
        shrink(&self.counts.per_ip);
        shrink(&self.counts.sessions);
    }

    /// Connections counted now (all listeners).
    pub fn connections(&self) -> u32 {
        self.counts.total.load(Ordering::Acquire)
    }

    /// Entries held: per-IP connection counts, session counts, failure state. For tests and
    /// debugging (memory stays bounded).
    pub fn entries(&self) -> usize {
        let rules = self.rules.load();
        lock(&self.counts.per_ip).len()
            + lock(&self.counts.sessions).len()
            + rules.failures_ip.len()
            + rules.failures_user.len()
    }
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("connections", &self.counts.total.load(Ordering::Relaxed))
            .field("max_connections", &self.rules.load().max_connections)
            .field("trusted", &self.rules.load().trusted)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[test]
    fn rejection_reasons_are_in_all_at_their_own_index() {
        // `ListenerMetrics` keeps one counter per reason, indexed by `reason as usize`.
        for (i, reason) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }
    use crate::config::HumanDuration;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
    const WEBMAIL: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));

    fn limits() -> Limits {
        Limits {
            max_connections: 5,
            max_connections_per_ip: 2,
            max_sessions_per_user_ip: 2,
            auth_failure_delay: HumanDuration(Duration::from_millis(200)),
            auth_failure_max_delay: HumanDuration(Duration::from_millis(700)),
            failures_per_ip: Rate {
                count: 3,
                per: Duration::from_secs(60),
            },
            failures_per_user: Rate {
                count: 5,
                per: Duration::from_secs(3600),
            },
            trusted_networks: vec!["198.51.100.0/24"
                .parse()
                .unwrap_or_else(|e: String| panic!("{e}"))],
            ..Limits::default()
        }
    }

    fn limiter() -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Limiter::with_clock(&limits(), clock.clone()), clock)
    }

    #[test]
    fn connections_are_capped_per_ip_and_given_back_on_drop() {
        let (limiter, _) = limiter();
        let first = limiter.admit(CLIENT).ok();
        let second = limiter.admit(CLIENT).ok();
        assert!(first.is_some() && second.is_some());
        assert_eq!(
            limiter.admit(CLIENT).err(),
            Some(Rejection::MaxConnectionsPerIp)
        );
        // The refused one is not counted; another address has its own share.
        assert_eq!(limiter.connections(), 2);
        let other = limiter.admit(OTHER).ok();
        assert!(other.is_some());
        drop(first);
        assert!(limiter.admit(CLIENT).is_ok(), "a place came back");
        drop((second, other));
        assert_eq!(limiter.connections(), 0);
        assert_eq!(limiter.entries(), 0, "an address at zero leaves the map");
    }

    #[test]
    fn the_total_cap_counts_every_address_and_trusted_ones_too() {
        let (limiter, _) = limiter();
        // A trusted address has no per-IP cap (2 here) ...
        let webmail: Vec<_> = (0..4).filter_map(|_| limiter.admit(WEBMAIL).ok()).collect();
        assert_eq!(webmail.len(), 4);
        let client = limiter.admit(CLIENT).ok();
        assert!(client.is_some());
        // ... but the total (5) holds for everyone.
        assert_eq!(limiter.admit(OTHER).err(), Some(Rejection::MaxConnections));
        assert_eq!(
            limiter.admit(WEBMAIL).err(),
            Some(Rejection::MaxConnections)
        );
        assert_eq!(limiter.connections(), 5);
        drop(webmail);
        assert_eq!(limiter.connections(), 1);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let (limiter, _) = limiter();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        let _a = limiter.admit(CLIENT);
        let _b = limiter.admit(mapped);
        assert_eq!(
            limiter.admit(CLIENT).err(),
            Some(Rejection::MaxConnectionsPerIp)
        );
    }

    #[test]
    fn sessions_are_capped_per_user_address_and_protocol() {
        let (limiter, _) = limiter();
        let user = "alice@example.com";
        let a = limiter.open_session(Protocol::Imap, user, CLIENT);
        let b = limiter.open_session(Protocol::Imap, user, CLIENT);
        assert!(a.is_some() && b.is_some());
        assert!(limiter.open_session(Protocol::Imap, user, CLIENT).is_none());
        // Other protocol, other address, other user: counted apart.
        assert!(limiter.open_session(Protocol::Smtp, user, CLIENT).is_some());
        assert!(limiter.open_session(Protocol::Imap, user, OTHER).is_some());
        assert!(limiter
            .open_session(Protocol::Imap, "bob@example.com", CLIENT)
            .is_some());
        // Trusted: never capped.
        let webmail: Vec<_> = (0..5)
            .filter_map(|_| limiter.open_session(Protocol::Imap, user, WEBMAIL))
            .collect();
        assert_eq!(webmail.len(), 5);
        drop(a);
        let c = limiter.open_session(Protocol::Imap, user, CLIENT);
        assert!(c.is_some(), "a logout gives the place back");
        drop((b, c, webmail));
        assert_eq!(limiter.entries(), 0);
    }

    #[test]
    fn a_reload_puts_new_caps_in_place_and_the_open_connections_stay_counted() {
        let (limiter, _) = limiter();
        let a = limiter.admit(CLIENT).ok();
        let b = limiter.admit(CLIENT).ok();
        assert!(a.is_some() && b.is_some());
        let session = limiter.open_session(Protocol::Imap, "a@example.com", CLIENT);
        assert!(session.is_some());

        // Lowered below what is open: nothing is closed, nothing more is let in.
        limiter.apply(&Limits {
            max_connections_per_ip: 1,
            max_sessions_per_user_ip: 1,
            ..limits()
        });
        assert_eq!(limiter.connections(), 2);
        assert_eq!(
            limiter.admit(CLIENT).err(),
            Some(Rejection::MaxConnectionsPerIp)
        );
        assert!(limiter
            .open_session(Protocol::Imap, "a@example.com", CLIENT)
            .is_none());
        drop(a);
        assert_eq!(
            limiter.admit(CLIENT).err(),
            Some(Rejection::MaxConnectionsPerIp),
            "one still open is the new cap"
        );
        drop(b);
        let c = limiter.admit(CLIENT).ok();
        assert!(c.is_some(), "under the new cap again");

        // Raised: the next ones are let in at once.
        limiter.apply(&Limits {
            max_connections_per_ip: 3,
            ..limits()
        });
        let more: Vec<_> = (0..3).filter_map(|_| limiter.admit(CLIENT).ok()).collect();
        assert_eq!(more.len(), 2, "3 with the one open");
        drop((c, more, session));
        assert_eq!(limiter.entries(), 0, "every place given back");
    }

    #[test]
    fn a_network_trusted_or_untrusted_by_a_reload_gives_back_what_it_took() {
        let (limiter, _) = limiter();
        let counted = limiter.admit(CLIENT).ok();
        let exempt = limiter.admit(WEBMAIL).ok();
        assert!(counted.is_some() && exempt.is_some());
        // CLIENT's network becomes trusted and WEBMAIL's no longer is.
        limiter.apply(&Limits {
            trusted_networks: vec!["192.0.2.0/24"
                .parse()
                .unwrap_or_else(|e: String| panic!("{e}"))],
            max_connections: 10,
            ..limits()
        });
        assert!(limiter.is_trusted(CLIENT) && !limiter.is_trusted(WEBMAIL));
        let trusted: Vec<_> = (0..3).filter_map(|_| limiter.admit(CLIENT).ok()).collect();
        assert_eq!(trusted.len(), 3, "no per-IP cap for a trusted address");
        assert_eq!(limiter.failed(CLIENT, "a@example.com").as_millis(), 200);
        let webmail: Vec<_> = (0..3).filter_map(|_| limiter.admit(WEBMAIL).ok()).collect();
        assert_eq!(
            webmail.len(),
            2,
            "capped at 2 now; the one taken while trusted is not counted"
        );
        drop((counted, exempt, trusted, webmail));
        assert_eq!(limiter.connections(), 0);
        assert_eq!(
            lock(&limiter.counts.per_ip).len(),
            0,
            "no count left behind"
        );
    }

    #[test]
    fn a_reload_keeps_the_failures_counted_at_the_same_rate_and_starts_afresh_at_another() {
        let (limiter, _) = limiter();
        for _ in 0..3 {
            limiter.failed(CLIENT, "a@example.com");
        }
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Throttled);
        // The same rate (other settings changed): the guesses so far still count.
        limiter.apply(&Limits {
            auth_failure_delay: HumanDuration(Duration::from_millis(100)),
            ..limits()
        });
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Throttled);
        assert_eq!(limiter.throttled_delay(CLIENT).as_millis(), 300);
        // Another rate: a new budget, counted from nothing.
        limiter.apply(&Limits {
            failures_per_ip: Rate {
                count: 4,
                per: Duration::from_secs(60),
            },
            ..limits()
        });
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Open);
        assert_eq!(limiter.failed(CLIENT, "a@example.com").as_millis(), 200);
    }

    #[test]
    fn the_failure_delay_grows_per_address_up_to_the_cap() {
        let (limiter, _) = limiter();
        let delays: Vec<_> = (0..3)
            .map(|_| limiter.failed(CLIENT, "a@example.com").as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 600]);
        // Another address starts from the first step, whoever it guesses for.
        assert_eq!(
            limiter.failed(OTHER, "a@example.com"),
            Duration::from_millis(200)
        );
        // Spent budget: the delay is the largest, capped.
        assert_eq!(limiter.throttled_delay(CLIENT), Duration::from_millis(600));
        let mut many = limits();
        many.failures_per_ip.count = 10;
        let limiter = Limiter::with_clock(&many, FakeRelativeClock::default());
        let last = (0..10)
            .map(|_| limiter.failed(CLIENT, "a@example.com"))
            .last();
        assert_eq!(last, Some(Duration::from_millis(700)), "capped at the max");
        // A trusted address gets the flat delay.
        let flat: Vec<_> = (0..4)
            .map(|_| limiter.failed(WEBMAIL, "b@example.com"))
            .collect();
        assert_eq!(flat, [Duration::from_millis(200); 4]);
    }

    #[test]
    fn an_address_that_spent_its_budget_is_throttled_until_it_refills() {
        let (limiter, clock) = limiter();
        assert_eq!(limiter.gate(CLIENT, "a@example.com"), Gate::Open);
        // 3 failures per minute: one is forgiven every 20 s.
        for n in 0..3 {
            assert_eq!(limiter.gate(CLIENT, "a@example.com"), Gate::Open, "{n}");
            limiter.failed(CLIENT, "a@example.com");
        }
        assert_eq!(limiter.gate(CLIENT, "a@example.com"), Gate::Throttled);
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Throttled);
        assert_eq!(limiter.gate(OTHER, "a@example.com"), Gate::Open);
        clock.advance(Duration::from_secs(19));
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Throttled);
        clock.advance(Duration::from_secs(1));
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Open);
        // One failure was forgiven: one more spends the budget again.
        limiter.failed(CLIENT, "b@example.com");
        assert_eq!(limiter.gate(CLIENT, "b@example.com"), Gate::Throttled);
    }

    #[test]
    fn successes_spend_nothing() {
        let (limiter, _) = limiter();
        // Checking the gate (what every login does) is not a failure.
        for _ in 0..100 {
            assert_eq!(limiter.gate(CLIENT, "a@example.com"), Gate::Open);
        }
        assert_eq!(limiter.entries(), 0);
    }

    #[test]
    fn a_user_that_spent_its_budget_is_cached_only_from_everywhere() {
        let (limiter, clock) = limiter();
        let user = "victim@example.com";
        // Five guesses from five addresses (each under its own budget of 3).
        for last in 1..=5u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, last));
            limiter.failed(ip, user);
        }
        assert_eq!(limiter.gate(OTHER, user), Gate::CachedOnly);
        assert_eq!(limiter.gate(WEBMAIL, user), Gate::CachedOnly, "trusted too");
        assert_eq!(limiter.gate(OTHER, "someone@example.com"), Gate::Open);
        // 5 per hour: one forgiven after 12 minutes.
        clock.advance(Duration::from_secs(12 * 60));
        assert_eq!(limiter.gate(OTHER, user), Gate::Open);
    }

    #[test]
    fn trusted_addresses_have_no_failure_budget() {
        let (limiter, _) = limiter();
        for n in 0..4 {
            limiter.failed(WEBMAIL, &format!("user{n}@example.com"));
        }
        assert_eq!(limiter.gate(WEBMAIL, "new@example.com"), Gate::Open);
    }

    #[test]
    fn pruning_forgets_forgiven_failures() {
        let (limiter, clock) = limiter();
        for n in 0..50u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, n));
            limiter.failed(ip, &format!("user{n}@example.com"));
        }
        limiter.failed(CLIENT, "a@example.com");
        limiter.failed(CLIENT, "a@example.com");
        limiter.failed(CLIENT, "a@example.com");
        assert!(limiter.entries() >= 102);
        limiter.prune();
        assert!(limiter.entries() >= 102, "nothing forgiven yet");
        // Three failures 20 s apart are forgiven after 60 s; governor lets a key go one
        // refill period later. Per-user failures (one every 12 minutes) take longer.
        clock.advance(Duration::from_secs(80));
        limiter.prune();
        assert_eq!(limiter.rules.load().failures_ip.len(), 0);
        assert_eq!(limiter.gate(CLIENT, "a@example.com"), Gate::Open);
        clock.advance(Duration::from_secs(3600));
        limiter.prune();
        assert_eq!(limiter.entries(), 0);
    }
}
