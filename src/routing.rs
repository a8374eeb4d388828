//! Routing: login name → address → pool → backends in this user's order.
//!
//! The order inside a pool is rendezvous (highest-random-weight) hashing of the user over the
//! pool's backends: every mailgate instance computes the same order without talking to the
//! others, and when a backend fails only its own users move (to their second choice). Backends
//! marked down by their health checks (`health`) go to the end of the order: still tried when
//! every backend is down, rather than refusing the login outright.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::backend::Transport;
use crate::config::{
    Config, HealthConfig, LoginConfig, MasterPasswordError, PoolConfig, Protocol, RoutingConfig,
    Secret, SmtpLogin,
};
use crate::health::{BackendHealth, Thresholds};
use crate::resolver::{Resolver, SetupError};
use crate::tls::LoadedCertificate;

/// One backend server, as configured (`host:port`).
#[derive(Debug, Clone)]
pub struct Backend {
    pub address: String,
    /// Hash seed derived from the address, so a backend keeps its weights when others change.
    seed: u64,
    /// Up or down, shared with this backend's health check.
    health: Arc<BackendHealth>,
}

impl PartialEq for Backend {
    fn eq(&self, other: &Backend) -> bool {
        self.address == other.address
    }
}

impl Eq for Backend {}

impl Backend {
    /// A backend with the default fall/rise thresholds.
    pub fn new(address: impl Into<String>) -> Backend {
        Backend::with_thresholds(address, Thresholds::default())
    }

    pub fn with_thresholds(address: impl Into<String>, thresholds: Thresholds) -> Backend {
        let address = address.into();
        let seed = xxh3_64_with_seed(address.as_bytes(), 0x6d61_696c_6761_7465);
        Backend {
            address,
            seed,
            health: Arc::new(BackendHealth::new(thresholds)),
        }
    }

    pub fn health(&self) -> &Arc<BackendHealth> {
        &self.health
    }

    fn weight(&self, user: &str) -> u64 {
        xxh3_64_with_seed(user.as_bytes(), self.seed)
    }
}

/// How mailgate logs in to this pool's IMAP backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImapLogin {
    Master { user: String, password: Secret },
    Passthrough,
}

impl ImapLogin {
    /// The login `config` gives, its master password from `password` or read now from
    /// `password_file` (see [`LoginConfig::master_password`]).
    ///
    /// # Errors
    /// A master login with neither, or with an unreadable or empty `password_file`.
    pub fn from_config(config: &LoginConfig) -> Result<ImapLogin, MasterPasswordError> {
        Ok(match (config, config.master_password()?) {
            (LoginConfig::Master { user, .. }, Some(password)) => ImapLogin::Master {
                user: user.clone(),
                password,
            },
            _ => ImapLogin::Passthrough,
        })
    }
}

/// A pool's backends, per protocol. A reload (`SIGHUP`) replaces the lists whole; a backend
/// kept across it keeps its health state.
#[derive(Debug, Default)]
pub struct Backends {
    pub imap: Vec<Backend>,
    pub smtp: Vec<Backend>,
}

impl Backends {
    pub fn new(imap: Vec<Backend>, smtp: Vec<Backend>) -> Backends {
        Backends { imap, smtp }
    }

    pub fn get(&self, protocol: Protocol) -> &[Backend] {
        match protocol {
            Protocol::Imap => &self.imap,
            Protocol::Smtp => &self.smtp,
        }
    }

    /// Whether `address` is one of the backends of either protocol.
    pub fn contains(&self, address: &str) -> bool {
        self.imap
            .iter()
            .chain(&self.smtp)
            .any(|b| b.address == address)
    }
}

/// What a reload changes in a pool's backend lists, computed before anything is swapped
/// ([`Pool::prepare_backends`]) and put in place by [`Pool::install_backends`].
#[derive(Debug)]
pub struct BackendChange {
    next: Backends,
    /// Backends new to the pool: they need a health check.
    pub added: Vec<(Protocol, Backend)>,
    /// Backends gone from the pool: their health checks stop.
    pub removed: Vec<(Protocol, Backend)>,
}

impl BackendChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    backends: ArcSwap<Backends>,
    /// Plaintext or TLS to the backends (`backend_tls`, `backend_ca`), for logins and health
    /// probes alike.
    pub transport: Transport,
    /// A reload may put a new master user or password in place ([`Pool::imap_login`]).
    imap_login: ArcSwap<ImapLogin>,
    pub smtp_login: SmtpLogin,
    /// The pool's health checks (interval, timeout, fall, rise), as at start: backends added
    /// by a reload are checked the same way.
    pub health: HealthConfig,
}

impl Pool {
    /// A pool with `backends`, checked as `health` says.
    pub fn new(
        name: impl Into<String>,
        backends: Backends,
        transport: Transport,
        imap_login: ImapLogin,
        smtp_login: SmtpLogin,
        health: HealthConfig,
    ) -> Pool {
        Pool {
            name: name.into(),
            backends: ArcSwap::from_pointee(backends),
            transport,
            imap_login: ArcSwap::from_pointee(imap_login),
            smtp_login,
            health,
        }
    }

    /// How the next login logs in to the backends (this one stays as it was taken).
    pub fn imap_login(&self) -> Arc<ImapLogin> {
        self.imap_login.load_full()
    }

    /// Puts a reloaded master user and password in place for the next login.
    pub fn install_imap_login(&self, login: ImapLogin) {
        self.imap_login.store(Arc::new(login));
    }

    /// How long a backend connect may take: the pool's health timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.health.timeout.0
    }

    /// The backends now (a reload may replace them; this list stays as it was taken).
    pub fn backends(&self) -> Arc<Backends> {
        self.backends.load_full()
    }

    /// The pool's backends for `protocol`, best first for `user`: the healthy ones in
    /// rendezvous order, then the ones marked down, in rendezvous order too.
    pub fn order(&self, protocol: Protocol, user: &str) -> Vec<Backend> {
        let backends = self.backends.load();
        let mut ranked: Vec<(bool, u64, &Backend)> = backends
            .get(protocol)
            .iter()
            .map(|b| (b.health.is_up(), b.weight(user), b))
            .collect();
        // Up before down, then highest weight first; the address breaks (astronomically
        // unlikely) ties.
        ranked.sort_unstable_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.2.address.cmp(&b.2.address))
        });
        ranked.into_iter().map(|(_, _, b)| b.clone()).collect()
    }

    /// The backend lists `config` names, against the running ones: a backend that stays keeps
    /// its health (state and check); a new one starts up, with the pool's running thresholds.
    /// Changes nothing until [`Pool::install_backends`].
    pub fn prepare_backends(&self, config: &PoolConfig) -> BackendChange {
        let running = self.backends();
        let thresholds = Thresholds::from(&self.health);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut next = Backends::default();
        for (protocol, wanted, list) in [
            (Protocol::Imap, &config.imap, &mut next.imap),
            (Protocol::Smtp, &config.smtp, &mut next.smtp),
        ] {
            // Config::load rejects a backend listed twice, so each address is one backend.
            let now = running.get(protocol);
            for address in wanted {
                let backend = match now.iter().find(|b| &b.address == address) {
                    Some(kept) => kept.clone(),
                    None => {
                        let new = Backend::with_thresholds(address, thresholds);
                        added.push((protocol, new.clone()));
                        new
                    }
                };
                list.push(backend);
            }
            removed.extend(
                now.iter()
                    .filter(|b| !wanted.contains(&b.address))
                    .map(|b| (protocol, b.clone())),
            );
        }
        BackendChange {
            next,
            added,
            removed,
        }
    }

    /// Puts prepared backend lists in place: the next login's order uses them. Logins already
    /// past their order, and spliced sessions, keep the backend they have.
    /// `change` keeps its `added` and `removed` lists, for the caller to start and stop health
    /// checks.
    pub fn install_backends(&self, change: &mut BackendChange) {
        self.backends
            .store(Arc::new(std::mem::take(&mut change.next)));
    }
}

/// Where a login goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The full lowercase address (`alice` → `alice@skydesk.jp`).
    pub address: String,
    pub pool: Arc<Pool>,
}

/// Which pool each domain goes to (`routing:`), with the pools named in it resolved.
#[derive(Debug)]
pub struct Routes {
    consumer_domains: HashSet<String>,
    default_domain: String,
    consumer_pool: Arc<Pool>,
    organisation_pool: Arc<Pool>,
    domain_pools: HashMap<String, Arc<Pool>>,
}

impl Routes {
    /// `routing` over `pools`.
    ///
    /// # Errors
    /// It names a pool `pools` does not have.
    fn new(
        routing: &RoutingConfig,
        pools: &BTreeMap<String, Arc<Pool>>,
    ) -> Result<Routes, RouterError> {
        let find = |name: &str| {
            pools
                .get(name)
                .cloned()
                .ok_or_else(|| RouterError::UnknownPool(name.to_string()))
        };
        let mut domain_pools = HashMap::new();
        for (domain, pool) in &routing.domain_pools {
            domain_pools.insert(domain.to_ascii_lowercase(), find(pool)?);
        }
        Ok(Routes {
            consumer_domains: routing
                .consumer_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            default_domain: routing.default_domain.to_ascii_lowercase(),
            consumer_pool: find(&routing.consumer_pool)?,
            organisation_pool: find(&routing.organisation_pool)?,
            domain_pools,
        })
    }
}

#[derive(Debug)]
pub struct Router {
    /// Replaced whole by a reload ([`Router::install_routes`]).
    routes: ArcSwap<Routes>,
    pools: BTreeMap<String, Arc<Pool>>,
    /// The one resolver every pool's transport shares.
    resolver: Resolver,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("pools.{pool}: {message}")]
    Pool { pool: String, message: String },
    #[error("routing: pool `{0}` is not defined")]
    UnknownPool(String),
    #[error(transparent)]
    Resolver(#[from] SetupError),
}

impl Router {
    /// Builds the router from a validated config; `master_password` reads a pool's master
    /// password (inline or from its file). Each TLS pool gets its TLS client here, once, and
    /// every pool the one resolver for backend host names (one cache per name, not per pool).
    ///
    /// # Errors
    /// A pool named in routing that does not exist, a master password that cannot be read, or
    /// a pool's CA bundle (or the system's trust store) that cannot be loaded, or a DNS
    /// resolver hickory refuses to build.
    pub fn from_config(config: &Config) -> Result<Router, RouterError> {
        let resolver = Resolver::system()?;
        let mut pools = BTreeMap::new();
        for (name, pool) in &config.pools {
            let thresholds = Thresholds::from(&pool.health);
            let backends = |addresses: &[String]| {
                addresses
                    .iter()
                    .map(|a| Backend::with_thresholds(a, thresholds))
                    .collect()
            };
            let imap_login =
                ImapLogin::from_config(&pool.login).map_err(|e| RouterError::Pool {
                    pool: name.clone(),
                    message: format!("login: {e}"),
                })?;
            let transport = Transport::new(
                name,
                pool.backend_tls,
                pool.backend_ca.as_deref(),
                pool.backend_client_certificate.as_ref(),
                resolver.clone(),
            )
            .map_err(|e| RouterError::Pool {
                pool: name.clone(),
                message: e.to_string(),
            })?
            .with_keepalive(config.limits.keepalive());
            pools.insert(
                name.clone(),
                Arc::new(Pool::new(
                    name.clone(),
                    Backends::new(backends(&pool.imap), backends(&pool.smtp)),
                    transport,
                    imap_login,
                    pool.smtp_login,
                    pool.health.clone(),
                )),
            );
        }
        Ok(Router {
            routes: ArcSwap::from_pointee(Routes::new(&config.routing, &pools)?),
            pools,
            resolver,
        })
    }

    /// The routes of `routing` over the running pools, for [`install_routes`](Self::install_routes).
    ///
    /// # Errors
    /// It names a pool that is not running (one new in the config since the start).
    pub fn prepare_routes(&self, routing: &RoutingConfig) -> Result<Routes, RouterError> {
        Routes::new(routing, &self.pools)
    }

    /// Puts `routes` in force for the next login; sessions routed before stay where they are.
    pub fn install_routes(&self, routes: Routes) {
        self.routes.store(Arc::new(routes));
    }

    /// The resolver of the backends' host names (shared by every pool).
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The full lowercase address for a login name, or `None` when it cannot be an address
    /// (empty, several `@`, spaces or control characters).
    pub fn normalize(&self, login: &str) -> Option<String> {
        normalize(login, &self.routes.load().default_domain)
    }

    /// The route for a login name.
    pub fn route(&self, login: &str) -> Option<Route> {
        let routes = self.routes.load();
        let address = normalize(login, &routes.default_domain)?;
        let domain = address.rsplit_once('@').map(|(_, d)| d)?;
        let pool = if let Some(pool) = routes.domain_pools.get(domain) {
            pool.clone()
        } else if routes.consumer_domains.contains(domain) {
            routes.consumer_pool.clone()
        } else {
            routes.organisation_pool.clone()
        };
        Some(Route { address, pool })
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    /// The client certificates the pools present to their backends, as now in use.
    pub fn client_certificates(&self) -> Vec<Arc<LoadedCertificate>> {
        self.pools()
            .filter_map(|pool| pool.transport.client_certificate())
            .map(|client| client.current())
            .collect()
    }
}

/// `alice` → `alice@default`; `Alice@Example.COM` → `alice@example.com`.
pub fn normalize(login: &str, default_domain: &str) -> Option<String> {
    if login.is_empty()
        || login.len() > 320
        || login
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        return None;
    }
    let address = match login.split_once('@') {
        None => format!("{login}@{default_domain}"),
        Some((local, domain)) => {
            if local.is_empty() || domain.is_empty() || domain.contains('@') {
                return None;
            }
            login.to_string()
        }
    };
    Some(address.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_route_to_their_pools() {
        let yaml = format!(
            r#"listeners:
  - {{ name: plain, protocol: imap, address: "127.0.0.1:0", tls: none }}
tls: {{ certificates: [] }}
accounts: {{ source: file, path: "{root}/config/accounts.yaml" }}
routing:
  consumer_domains: [skydesk.jp, Skydesk.co.jp]
  default_domain: skydesk.jp
  consumer_pool: imap
  organisation_pool: imappro
  domain_pools: {{ Big-Customer.example: imappro-2 }}
pools:
  imap: {{ imap: ["192.0.2.1:143"], login: {{ mode: passthrough }} }}
  imappro: {{ imap: ["192.0.2.2:143"], login: {{ mode: passthrough }} }}
  imappro-2: {{ imap: ["192.0.2.3:143"], login: {{ mode: passthrough }} }}
"#,
            root = env!("CARGO_MANIFEST_DIR")
        );
        let config = Config::from_yaml(&yaml, std::path::Path::new("test.yaml")).expect("config");
        let router = Router::from_config(&config).expect("router");
        let cases = [
            ("alice", "alice@skydesk.jp", "imap"),
            ("Alice@SkyDesk.JP", "alice@skydesk.jp", "imap"),
            ("kenji@skydesk.co.jp", "kenji@skydesk.co.jp", "imap"),
            ("dave@example.com", "dave@example.com", "imappro"),
            (
                "ceo@big-customer.example",
                "ceo@big-customer.example",
                "imappro-2",
            ),
            (
                "CEO@BIG-CUSTOMER.EXAMPLE",
                "ceo@big-customer.example",
                "imappro-2",
            ),
        ];
        for (login, address, pool) in cases {
            let route = router.route(login).expect(login);
            assert_eq!(
                (route.address.as_str(), route.pool.name.as_str()),
                (address, pool),
                "{login}"
            );
        }
        assert!(router.route("no spaces allowed").is_none());
        assert!(router.route("").is_none());

        // A reload's routing over the same pools is in force for the next route.
        let mut routing = config.routing.clone();
        routing.default_domain = "example.com".into();
        routing.domain_pools = [("skydesk.jp".to_string(), "imappro-2".to_string())].into();
        let routes = router.prepare_routes(&routing).expect("routes");
        assert_eq!(
            router
                .route("alice")
                .map(|r| r.pool.name.clone())
                .as_deref(),
            Some("imap")
        );
        router.install_routes(routes);
        let route = router.route("alice").expect("alice");
        assert_eq!(
            (route.address.as_str(), route.pool.name.as_str()),
            ("alice@example.com", "imappro")
        );
        let route = router.route("alice@skydesk.jp").expect("alice");
        assert_eq!(route.pool.name, "imappro-2");
        // One that names a pool the router does not run is refused.
        routing.organisation_pool = "new-pool".into();
        assert!(matches!(
            router.prepare_routes(&routing),
            Err(RouterError::UnknownPool(name)) if name == "new-pool"
        ));
    }

    fn pool(backends: &[&str]) -> Pool {
        Pool::new(
            "p",
            Backends::new(
                backends.iter().map(|b| Backend::new(*b)).collect(),
                Vec::new(),
            ),
            Transport::plain(Resolver::system().expect("resolver")),
            ImapLogin::Passthrough,
            SmtpLogin::Xclient,
            HealthConfig::default(),
        )
    }

    #[test]
    fn normalizes_login_names() {
        let cases = [
            ("alice", Some("alice@skydesk.jp")),
            ("Alice", Some("alice@skydesk.jp")),
            ("Dave@Example.COM", Some("dave@example.com")),
            ("", None),
            ("a b", None),
            ("@example.com", None),
            ("dave@", None),
            ("a@b@c", None),
            ("tab\there", None),
        ];
        for (login, want) in cases {
            assert_eq!(normalize(login, "skydesk.jp").as_deref(), want, "{login:?}");
        }
    }

    #[test]
    fn rendezvous_order_is_stable_and_moves_only_the_failed_backends_users() {
        let three = pool(&["10.0.0.1:143", "10.0.0.2:143", "10.0.0.3:143"]);
        let two = pool(&["10.0.0.1:143", "10.0.0.3:143"]);
        let mut first_choice = HashMap::new();
        let mut moved = 0;
        for i in 0..3000 {
            let user = format!("user{i}@example.com");
            let order = three.order(Protocol::Imap, &user);
            assert_eq!(order.len(), 3);
            // Same answer every time (no per-process randomness).
            assert_eq!(order, three.order(Protocol::Imap, &user));
            *first_choice.entry(order[0].address.clone()).or_insert(0) += 1;
            let without = two.order(Protocol::Imap, &user);
            if order[0].address == "10.0.0.2:143" {
                // Users of the removed backend go to their own second choice...
                assert_eq!(without[0], order[1]);
            } else if without[0] != order[0] {
                // ...and nobody else moves.
                moved += 1;
            }
        }
        assert_eq!(moved, 0);
        // Spread: each backend gets a fair share (1000 expected; allow wide noise).
        for (backend, n) in &first_choice {
            assert!((800..1200).contains(n), "{backend}: {n}");
        }
    }

    /// Marks the IMAP backend `address` of `pool` down (two failed probes: the default
    /// thresholds) and returns its health.
    fn marked_down(pool: &Pool, address: &str) -> Arc<BackendHealth> {
        let health = pool
            .backends()
            .imap
            .iter()
            .find(|b| b.address == address)
            .map(|b| b.health().clone())
            .unwrap_or_else(|| panic!("no {address}"));
        health.record(false);
        health.record(false);
        assert!(!health.is_up());
        health
    }

    #[test]
    fn new_backend_lists_keep_the_health_of_backends_that_stay() {
        let running = pool(&["10.0.0.1:143", "10.0.0.2:143"]);
        let kept = marked_down(&running, "10.0.0.2:143");
        let config = PoolConfig {
            imap: vec!["10.0.0.2:143".into(), "10.0.0.3:143".into()],
            smtp: vec!["10.0.0.9:587".into()],
            backend_tls: Default::default(),
            backend_ca: None,
            backend_client_certificate: None,
            login: LoginConfig::Passthrough,
            smtp_login: SmtpLogin::Xclient,
            health: HealthConfig::default(),
        };
        let mut change = running.prepare_backends(&config);
        let names = |list: &[(Protocol, Backend)]| -> Vec<String> {
            list.iter()
                .map(|(p, b)| format!("{}/{}", p.as_str(), b.address))
                .collect()
        };
        assert_eq!(
            names(&change.added),
            ["imap/10.0.0.3:143", "smtp/10.0.0.9:587"]
        );
        assert_eq!(names(&change.removed), ["imap/10.0.0.1:143"]);
        // Nothing changes before the install.
        assert_eq!(running.backends().imap.len(), 2);
        assert!(running.backends().smtp.is_empty());
        running.install_backends(&mut change);
        let now = running.backends();
        let addresses: Vec<&str> = now.imap.iter().map(|b| b.address.as_str()).collect();
        assert_eq!(addresses, ["10.0.0.2:143", "10.0.0.3:143"]);
        // The kept backend is the same one: still down, sharing its check's state.
        let same = now.imap.iter().find(|b| b.address == "10.0.0.2:143");
        assert!(same.is_some_and(|b| Arc::ptr_eq(b.health(), &kept)));
        for i in 0..50 {
            let user = format!("user{i}@example.com");
            let order = running.order(Protocol::Imap, &user);
            assert_eq!(order.len(), 2);
            // The new one is up, the kept one still down: it goes last.
            assert_eq!(order[0].address, "10.0.0.3:143", "{user}");
        }
        assert_eq!(running.order(Protocol::Smtp, "a@example.com").len(), 1);
        // The same lists again change nothing.
        assert!(running.prepare_backends(&config).is_empty());
    }

    #[test]
    fn down_backends_go_last_and_the_rest_keep_their_rendezvous_order() {
        let three = pool(&["10.0.0.1:143", "10.0.0.2:143", "10.0.0.3:143"]);
        let two = pool(&["10.0.0.1:143", "10.0.0.3:143"]);
        marked_down(&three, "10.0.0.2:143");
        for i in 0..300 {
            let user = format!("user{i}@example.com");
            let order: Vec<String> = three
                .order(Protocol::Imap, &user)
                .into_iter()
                .map(|b| b.address)
                .collect();
            let healthy: Vec<String> = two
                .order(Protocol::Imap, &user)
                .into_iter()
                .map(|b| b.address)
                .collect();
            // Rendezvous over the healthy backends, and the down one still tried last.
            assert_eq!(order.get(..2), Some(&healthy[..]), "{user}");
            assert_eq!(
                order.get(2).map(String::as_str),
                Some("10.0.0.2:143"),
                "{user}"
            );
        }
    }
}
