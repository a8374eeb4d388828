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

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::backend::Transport;
use crate::config::{Config, LoginConfig, Protocol, Secret, SmtpLogin};
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
#[derive(Debug, Clone)]
pub enum ImapLogin {
    Master { user: String, password: Secret },
    Passthrough,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub imap: Vec<Backend>,
    pub smtp: Vec<Backend>,
    /// Plaintext or TLS to the backends (`backend_tls`, `backend_ca`), for logins and health
    /// probes alike.
    pub transport: Transport,
    pub imap_login: ImapLogin,
    pub smtp_login: SmtpLogin,
    /// How long a backend connect may take (the pool's health timeout).
    pub connect_timeout: Duration,
}

impl Pool {
    /// The pool's backends for `protocol`, best first for `user`: the healthy ones in
    /// rendezvous order, then the ones marked down, in rendezvous order too.
    pub fn order(&self, protocol: Protocol, user: &str) -> Vec<&Backend> {
        let backends = match protocol {
            Protocol::Imap => &self.imap,
            Protocol::Smtp => &self.smtp,
        };
        let mut ranked: Vec<(bool, u64, &Backend)> = backends
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
        ranked.into_iter().map(|(_, _, b)| b).collect()
    }
}

/// Where a login goes.
#[derive(Debug, Clone)]
pub struct Route {
    /// The full lowercase address (`alice` → `alice@skydesk.jp`).
    pub address: String,
    pub pool: Arc<Pool>,
}

#[derive(Debug)]
pub struct Router {
    consumer_domains: HashSet<String>,
    default_domain: String,
    consumer_pool: Arc<Pool>,
    organisation_pool: Arc<Pool>,
    domain_pools: HashMap<String, Arc<Pool>>,
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
            let imap_login = match &pool.login {
                LoginConfig::Passthrough => ImapLogin::Passthrough,
                LoginConfig::Master {
                    user,
                    password,
                    password_file,
                } => {
                    let password = match (password, password_file) {
                        (Some(p), _) => p.clone(),
                        (None, Some(file)) => std::fs::read_to_string(file)
                            .map(|s| Secret::new(s.trim_end_matches(['\r', '\n'])))
                            .map_err(|e| RouterError::Pool {
                                pool: name.clone(),
                                message: format!("login.password_file {}: {e}", file.display()),
                            })?,
                        (None, None) => {
                            return Err(RouterError::Pool {
                                pool: name.clone(),
                                message: "login: master mode needs password or password_file"
                                    .into(),
                            })
                        }
                    };
                    ImapLogin::Master {
                        user: user.clone(),
                        password,
                    }
                }
            };
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
            })?;
            pools.insert(
                name.clone(),
                Arc::new(Pool {
                    name: name.clone(),
                    imap: backends(&pool.imap),
                    smtp: backends(&pool.smtp),
                    transport,
                    imap_login,
                    smtp_login: pool.smtp_login,
                    connect_timeout: pool.health.timeout.0,
                }),
            );
        }
        let find = |name: &str| {
            pools
                .get(name)
                .cloned()
                .ok_or_else(|| RouterError::UnknownPool(name.to_string()))
        };
        let routing = &config.routing;
        let mut domain_pools = HashMap::new();
        for (domain, pool) in &routing.domain_pools {
            domain_pools.insert(domain.to_ascii_lowercase(), find(pool)?);
        }
        Ok(Router {
            consumer_domains: routing
                .consumer_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            default_domain: routing.default_domain.to_ascii_lowercase(),
            consumer_pool: find(&routing.consumer_pool)?,
            organisation_pool: find(&routing.organisation_pool)?,
            domain_pools,
            pools,
            resolver,
        })
    }

    /// The resolver of the backends' host names (shared by every pool).
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The full lowercase address for a login name, or `None` when it cannot be an address
    /// (empty, several `@`, spaces or control characters).
    pub fn normalize(&self, login: &str) -> Option<String> {
        normalize(login, &self.default_domain)
    }

    /// The route for a login name.
    pub fn route(&self, login: &str) -> Option<Route> {
        let address = self.normalize(login)?;
        let domain = address.rsplit_once('@').map(|(_, d)| d)?;
        let pool = if let Some(pool) = self.domain_pools.get(domain) {
            pool.clone()
        } else if self.consumer_domains.contains(domain) {
            self.consumer_pool.clone()
        } else {
            self.organisation_pool.clone()
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
    }

    fn pool(backends: &[&str]) -> Pool {
        Pool {
            name: "p".into(),
            imap: backends.iter().map(|b| Backend::new(*b)).collect(),
            smtp: Vec::new(),
            transport: Transport::plain(Resolver::system().expect("resolver")),
            imap_login: ImapLogin::Passthrough,
            smtp_login: SmtpLogin::Xclient,
            connect_timeout: Duration::from_secs(1),
        }
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

    #[test]
    fn down_backends_go_last_and_the_rest_keep_their_rendezvous_order() {
        let three = pool(&["10.0.0.1:143", "10.0.0.2:143", "10.0.0.3:143"]);
        let two = pool(&["10.0.0.1:143", "10.0.0.3:143"]);
        let down = three
            .imap
            .iter()
            .find(|b| b.address == "10.0.0.2:143")
            .map(|b| b.health().clone())
            .unwrap_or_else(|| panic!("no 10.0.0.2"));
        // Default thresholds: two failures in a row mark it down.
        down.record(false);
        down.record(false);
        assert!(!down.is_up());
        for i in 0..300 {
            let user = format!("user{i}@example.com");
            let order: Vec<&str> = three
                .order(Protocol::Imap, &user)
                .iter()
                .map(|b| b.address.as_str())
                .collect();
            let healthy: Vec<&str> = two
                .order(Protocol::Imap, &user)
                .iter()
                .map(|b| b.address.as_str())
                .collect();
            // Rendezvous over the healthy backends, and the down one still tried last.
            assert_eq!(order.get(..2), Some(&healthy[..]), "{user}");
            assert_eq!(order.get(2), Some(&"10.0.0.2:143"), "{user}");
        }
    }
}
