//! Configuration: one serde tree (`deny_unknown_fields`), typed fields, validated completely
//! before anything binds. Every error names the file, the line and the key.
//!
//! `Config::load(path)` parses and validates; `mailgate check` prints the same messages, and
//! `Config::notes()` for what is accepted but not active yet.
//!
//! Lines come from two places. serde_norway reports the line and the key path of the first
//! parse error (its path names the enclosing mapping for an unknown or missing field; the field
//! is added here). Problems found after parsing are located with [`KeyLines`], an index from key
//! path to line built from saphyr-parser's spanned events, because serde_norway's `Value` keeps
//! no positions and an indentation walker would have to re-implement YAML's flow mappings
//! (`{ mode: master, user: proxy }`) that the shipped files use.
//!
//! Paths inside the config (certificates, accounts, password files) are relative to the
//! working directory, not to the config file, as in `config/mailgate.yaml`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use saphyr_parser::{Event, Parser};
use serde::de::{self, Visitor};
use serde::Deserialize;

/// A secret read from config: its `Debug` and `Display` never show it, comparing two takes the
/// same time wherever they differ, and its bytes are wiped when it is dropped.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Compared at a reload (has the master password changed?): in constant time, so how long the
/// comparison took says nothing of how much of the old secret the new one shares.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), other.0.as_bytes())
            .is_ok()
    }
}

impl Eq for Secret {}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it (backend login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `24h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// What a reload says of a changed setting that waits for a restart.
pub const RESTART_CHANGE: &str = "changed; it takes effect at a restart";

/// A rate written as `10/1m`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write e.g. 30s, 5m, 24h)"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}` is not a duration (units: ms, s, m, h, d)")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// Parses `10/1m`: a count, a slash, a duration.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (count, per) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a rate (write e.g. 10/1m)"))?;
    let count = count
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: `{count}` is not a count"))?;
    let per = parse_duration(per).map_err(|e| format!("`{s}`: {e}"))?;
    Ok(Rate { count, per })
}

/// Deserializes a string through `parse` *inside* the deserializer's call, so serde_norway pins
/// an error on the value's own line and key path. (Checking after `String::deserialize` returns
/// would blame the enclosing mapping: `limits` instead of `limits.idle_timeout`.)
fn deserialize_parsed<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct ParsedVisitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for ParsedVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(ParsedVisitor { expecting, parse })
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_parsed(d, "a duration such as 30s", |s| {
            parse_duration(s).map(HumanDuration)
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_parsed(d, "a rate such as 10/1m", parse_rate)
    }
}

/// An IP network written as a CIDR (`192.0.2.0/24`, `2001:db8::/32`) or a single address
/// (`192.0.2.7`, a /32 or /128). Host bits are cleared: `192.0.2.7/24` is `192.0.2.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// # Errors
    /// A prefix longer than the address (33+ for IPv4, 129+ for IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpNet, String> {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = prefix_mask_v4(prefix_len)
                    .ok_or_else(|| format!("prefix /{prefix_len} is longer than 32 bits"))?;
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = prefix_mask_v6(prefix_len)
                    .ok_or_else(|| format!("prefix /{prefix_len} is longer than 128 bits"))?;
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(IpNet { addr, prefix_len })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside this network. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`,
    /// what a dual-stack socket reports for an IPv4 peer) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_mask_v4(self.prefix_len)
                .is_some_and(|mask| u32::from(ip) & mask == u32::from(net)),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_mask_v6(self.prefix_len)
                .is_some_and(|mask| u128::from(ip) & mask == u128::from(net)),
            _ => false,
        }
    }
}

fn prefix_mask_v4(len: u8) -> Option<u32> {
    match len {
        0 => Some(0),
        1..=32 => Some(u32::MAX << (32 - u32::from(len))),
        _ => None,
    }
}

fn prefix_mask_v6(len: u8) -> Option<u128> {
    match len {
        0 => Some(0),
        1..=128 => Some(u128::MAX << (128 - u32::from(len))),
        _ => None,
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let bad = || format!("`{s}` is not an IP address or CIDR (write e.g. 192.0.2.0/24)");
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len = match len {
            Some(len) => len.parse::<u8>().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpNet::new(addr, len).map_err(|e| format!("`{s}`: {e}"))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_parsed(d, "an IP address or CIDR", str::parse)
    }
}

/// A backend address `host:port`: a host name, an IPv4 address, or an IPv6 address in
/// brackets; port 1–65535.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP address, without brackets (ready for a resolver or `IpAddr::from_str`).
    pub host: String,
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<HostPort, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{s}` is not host:port (write e.g. [2001:db8::1]:143)"))?;
            host.parse::<Ipv6Addr>()
                .map_err(|_| format!("`{s}`: `{host}` is not an IPv6 address"))?;
            (host, port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| {
                format!("`{s}` is not host:port (write e.g. mail1.example.com:143)")
            })?;
            if host.contains(':') {
                return Err(format!(
                    "`{s}`: an IPv6 address must be in brackets (write e.g. [2001:db8::1]:143)"
                ));
            }
            if host.parse::<Ipv4Addr>().is_err() && !is_host_name(host) {
                return Err(format!("`{s}`: `{host}` is not a host name or IP address"));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(format!(
                    "`{s}`: port `{port}` is not a number from 1 to 65535"
                ))
            }
        };
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (not at a label's ends),
/// 1–63 characters each, 253 in all; one trailing dot allowed.
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub accounts: AccountsConfig,
    pub routing: RoutingConfig,
    pub pools: BTreeMap<String, PoolConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub messages: Messages,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Where the file was read from; not part of the YAML.
    #[serde(skip)]
    pub source: PathBuf,
    /// Line of each key in `source`, so later checks (accounts, reload) can point at a line too.
    #[serde(skip)]
    pub key_lines: KeyLines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// TLS from the first byte (993, 465).
    Implicit,
    /// Plaintext greeting, STARTTLS required before login (143, 587).
    Starttls,
    /// No TLS at all: only allowed on loopback addresses, for tests.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub tls: ListenerTls,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
    /// Development convenience: when both files of a certificate are missing, the server makes
    /// a self-signed one there on first start (and logs a warning) instead of refusing to start.
    #[serde(default)]
    pub self_signed_if_missing: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountSource {
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    pub source: AccountSource,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    pub consumer_domains: Vec<String>,
    pub default_domain: String,
    pub consumer_pool: String,
    pub organisation_pool: String,
    #[serde(default)]
    pub domain_pools: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTls {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `host:port` of each IMAP backend (validated by `Config::load`; parse with
    /// `HostPort::from_str`).
    #[serde(default)]
    pub imap: Vec<String>,
    /// `host:port` of each SMTP submission backend.
    #[serde(default)]
    pub smtp: Vec<String>,
    #[serde(default)]
    pub backend_tls: BackendTls,
    /// PEM bundle of the CA certificates that sign the backends' certificates (`backend_tls`
    /// starttls or implicit). Absent: the system's trust store.
    #[serde(default)]
    pub backend_ca: Option<PathBuf>,
    /// The certificate mailgate presents to backends that ask for one (`backend_tls`
    /// starttls or implicit), re-read at a reload. Absent: no client certificate.
    #[serde(default)]
    pub backend_client_certificate: Option<CertificateConfig>,
    pub login: LoginConfig,
    #[serde(default)]
    pub smtp_login: SmtpLogin,
    #[serde(default)]
    pub health: HealthConfig,
}

/// How mailgate logs in to the IMAP backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum LoginConfig {
    /// Master user: `AUTHENTICATE PLAIN` with the user as authorization identity.
    Master {
        user: String,
        #[serde(default)]
        password: Option<Secret>,
        #[serde(default)]
        password_file: Option<PathBuf>,
    },
    /// The client's own credentials.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpLogin {
    #[default]
    Xclient,
    Master,
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub fall: u32,
    pub rise: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(2)),
            fall: 2,
            rise: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub handshake_timeout: HumanDuration,
    pub preauth_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
    /// Silence before the kernel probes a peer on client and backend connections
    /// (`keepalive`); `0s`: off.
    pub tcp_keepalive: HumanDuration,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub max_sessions_per_user_ip: u32,
    pub max_auth_attempts: u32,
    pub auth_failure_delay: HumanDuration,
    pub auth_failure_max_delay: HumanDuration,
    pub failures_per_ip: Rate,
    pub failures_per_user: Rate,
    /// Exempt from per-IP limits (webmail, NAT).
    pub trusted_networks: Vec<IpNet>,
    /// The only peers that may send a PROXY header.
    pub trusted_proxies: Vec<IpNet>,
}

impl Limits {
    /// `tcp_keepalive` for the sockets (`None`: off).
    pub fn keepalive(&self) -> Option<crate::keepalive::Keepalive> {
        crate::keepalive::Keepalive::new(self.tcp_keepalive.0)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: HumanDuration(Duration::from_secs(10)),
            preauth_timeout: HumanDuration(Duration::from_secs(60)),
            idle_timeout: HumanDuration(Duration::from_secs(30 * 60)),
            tcp_keepalive: HumanDuration(Duration::from_secs(2 * 60)),
            max_connections: 50_000,
            max_connections_per_ip: 50,
            max_sessions_per_user_ip: 10,
            max_auth_attempts: 3,
            auth_failure_delay: HumanDuration(Duration::from_secs(2)),
            auth_failure_max_delay: HumanDuration(Duration::from_secs(15)),
            failures_per_ip: Rate {
                count: 10,
                per: Duration::from_secs(60),
            },
            failures_per_user: Rate {
                count: 30,
                per: Duration::from_secs(3600),
            },
            trusted_networks: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub drain_timeout: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// Reply texts; response codes are fixed. `{help_url}` is replaced by `help_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Messages {
    pub help_url: String,
    pub app_password_required: String,
    pub imap_disabled: String,
    pub smtp_disabled: String,
    pub imap_policy_denied: String,
    pub smtp_policy_denied: String,
    pub invalid_credentials: String,
    /// SMTP's wording of `invalid_credentials` (DESIGN.md's SMTP column differs from IMAP's).
    pub smtp_invalid_credentials: String,
    pub unavailable: String,
    /// SMTP's wording of `unavailable`.
    pub smtp_unavailable: String,
    pub throttled: String,
    pub too_many_connections: String,
}

impl Default for Messages {
    fn default() -> Self {
        Messages {
            help_url: "https://example.com/help/app-passwords".into(),
            app_password_required: "Application-specific password required: {help_url}".into(),
            imap_disabled: "IMAP access is disabled for this account; enable it in your mail settings".into(),
            smtp_disabled: "SMTP access is disabled for this account".into(),
            imap_policy_denied: "IMAP access is not allowed by your organisation's policy; contact your administrator".into(),
            smtp_policy_denied: "SMTP access is not allowed by your organisation's policy; contact your administrator".into(),
            invalid_credentials: "Invalid credentials".into(),
            smtp_invalid_credentials: "Authentication credentials invalid".into(),
            unavailable: "Mail server temporarily unavailable".into(),
            smtp_unavailable: "Temporary authentication failure".into(),
            throttled: "Too many failed logins, try again later".into(),
            too_many_connections: "Too many connections for this account".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub address: SocketAddr,
}

/// A config error: which file, which line, which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// `None` when the key is not in the file (a missing required key) or the file is unreadable.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `listeners[0].address`; empty when the whole file is at fault.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// The problems of one load as a single message: `what`, then one indented line each.
    pub fn summary(what: &str, errors: &[ConfigError]) -> String {
        let mut text = format!("{what}:");
        for e in errors {
            text.push_str(&format!("\n  {e}"));
        }
        text
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why the master password of a pool could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MasterPasswordError {
    #[error("no pool named `{0}`")]
    UnknownPool(String),
    #[error("pool `{0}` does not log in with a master user")]
    NotMaster(String),
    #[error("login has neither `password` nor `password_file`")]
    Missing,
    #[error("cannot read password_file `{}`: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("password_file `{}` is empty", .0.display())]
    Empty(PathBuf),
}

impl Config {
    /// Reads, parses and validates `path`.
    ///
    /// # Errors
    /// Every problem found, each naming file, line and key. A parse error stops there (serde
    /// stops at the first); once the file parses, every semantic problem is reported at once.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                file: path.to_path_buf(),
                line: None,
                key: String::new(),
                message: format!("cannot read the config file: {e}"),
            }]
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates YAML text; `source` names the file in errors. Files the config
    /// refers to are still checked on disk (relative to the working directory).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_yaml(text: &str, source: &Path) -> Result<Config, Vec<ConfigError>> {
        let key_lines = KeyLines::from_yaml(text);
        let mut config: Config =
            serde_norway::from_str(text).map_err(|e| vec![parse_error(source, &key_lines, &e)])?;
        config.source = source.to_path_buf();
        config.key_lines = key_lines;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// `message` about the setting `key` (`pools.imap.health`) of this file, with the line it
    /// is on (or, for a key the file does not have, the line of the nearest one it has).
    pub fn at(&self, key: String, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.source.clone(),
            line: self.key_lines.nearest_line(&key),
            key,
            message: message.into(),
        }
    }

    /// What `mailgate check` should tell the operator that is not an error: sections that parse
    /// but do nothing yet in this version, certificates that will be made on first start, pools
    /// that no route uses. Each as `file:line: key: text`, in line order.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut note = |key: String, text: String| notes.push(self.at(key, text));
        for (i, c) in self.tls.certificates.iter().enumerate() {
            if self.tls.self_signed_if_missing && !c.cert.exists() && !c.key.exists() {
                note(
                    format!("tls.certificates[{i}]"),
                    format!(
                        "`{}` and `{}` do not exist: a self-signed development certificate \
                         will be made there on first start (clients will not trust it)",
                        c.cert.display(),
                        c.key.display()
                    ),
                );
            }
        }
        let used = self.routed_pools();
        for name in self.pools.keys() {
            if !used.contains(name.as_str()) {
                note(
                    format!("pools.{name}"),
                    "no route uses this pool (routing.consumer_pool, organisation_pool, \
                     domain_pools)"
                        .into(),
                );
            }
        }
        notes.sort_by_key(|n| n.line);
        notes.iter().map(ToString::to_string).collect()
    }

    /// The settings a reload cannot put in place: those of `new` that differ from `self` (the
    /// config the process started with) in the listeners, `tls.self_signed_if_missing`,
    /// `limits.tcp_keepalive` or metrics, each as `file:line: key: ...` in `new`'s
    /// file, in line order. The pools' settings are compared by the reload itself, which puts
    /// some of them in place; the account file and certificates always reload.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<ConfigError> {
        self.changes(new, false, RESTART_CHANGE)
    }

    /// The settings a reload puts in place: those of `new` that differ from `self` (the
    /// config in force until now) in routing, limits (but `tcp_keepalive`), shutdown and
    /// messages, as
    /// [`restart_only_changes`](Self::restart_only_changes) lists its own.
    pub fn live_changes(&self, new: &Config) -> Vec<ConfigError> {
        self.changes(new, true, "changed; in place now")
    }

    /// Whether a reload puts the setting `key` (as [`changes`](Self::changes) names it) in
    /// place. Only what is read again at each connection, login, reply or shutdown is:
    /// `tcp_keepalive` is set on the listening sockets and the pools' connections at start.
    fn reloads_live(key: &str) -> bool {
        key.starts_with("routing.")
            || key.starts_with("messages.")
            || key.starts_with("shutdown.")
            || (key.starts_with("limits.") && key != "limits.tcp_keepalive")
    }

    /// The settings of `new` that differ from `self`, outside the pools, the accounts and the
    /// certificate files: those a reload puts in place (`live`) or those it does not.
    fn changes(&self, new: &Config, live: bool, message: &str) -> Vec<ConfigError> {
        // Destructured in full, so a new setting cannot be left out of the comparison.
        let Config {
            listeners,
            tls:
                TlsConfig {
                    certificates: _,
                    self_signed_if_missing,
                },
            accounts: _,
            routing,
            pools: _,
            limits,
            shutdown,
            messages,
            metrics,
            source: _,
            key_lines: _,
        } = self;
        let mut keys = Vec::new();
        let mut differ = |key: String, same: bool| {
            if !same {
                keys.push(key);
            }
        };
        // Each named field of a section (`$ty` destructured in full: a new field must be
        // listed) compared with the same field of the new one.
        macro_rules! fields {
            ($section:expr, $ty:ident, $old:expr, $new:expr, [$($field:ident),+ $(,)?]) => {{
                let $ty { $($field: _),+ } = $old;
                $(differ(
                    format!("{}.{}", $section, stringify!($field)),
                    $old.$field == $new.$field,
                );)+
            }};
        }
        if listeners.len() == new.listeners.len() {
            for (i, (old, now)) in listeners.iter().zip(&new.listeners).enumerate() {
                fields!(
                    format!("listeners[{i}]"),
                    ListenerConfig,
                    old,
                    now,
                    [name, protocol, address, tls, proxy_protocol]
                );
            }
        } else {
            differ("listeners".into(), false);
        }
        differ(
            "tls.self_signed_if_missing".into(),
            *self_signed_if_missing == new.tls.self_signed_if_missing,
        );
        fields!(
            "routing",
            RoutingConfig,
            routing,
            new.routing,
            [
                consumer_domains,
                default_domain,
                consumer_pool,
                organisation_pool,
                domain_pools,
            ]
        );
        fields!(
            "limits",
            Limits,
            limits,
            new.limits,
            [
                handshake_timeout,
                preauth_timeout,
                idle_timeout,
                tcp_keepalive,
                max_connections,
                max_connections_per_ip,
                max_sessions_per_user_ip,
                max_auth_attempts,
                auth_failure_delay,
                auth_failure_max_delay,
                failures_per_ip,
                failures_per_user,
                trusted_networks,
                trusted_proxies,
            ]
        );
        fields!(
            "shutdown",
            ShutdownConfig,
            shutdown,
            new.shutdown,
            [drain_timeout]
        );
        fields!(
            "messages",
            Messages,
            messages,
            new.messages,
            [
                help_url,
                app_password_required,
                imap_disabled,
                smtp_disabled,
                imap_policy_denied,
                smtp_policy_denied,
                invalid_credentials,
                smtp_invalid_credentials,
                unavailable,
                smtp_unavailable,
                throttled,
                too_many_connections,
            ]
        );
        differ(
            "metrics.address".into(),
            metrics.as_ref().map(|MetricsConfig { address }| address)
                == new.metrics.as_ref().map(|m| &m.address),
        );
        let mut changes: Vec<ConfigError> = keys
            .into_iter()
            .filter(|key| Self::reloads_live(key) == live)
            .map(|key| new.at(key, message))
            .collect();
        changes.sort_by_key(|c| c.line);
        changes
    }

    /// The master password of `pool`, from `password` or read now from `password_file`
    /// (surrounding whitespace and the final newline trimmed). The file is read on every call,
    /// so call it at start and at reload, not per login: a rotated file takes effect at reload.
    ///
    /// # Errors
    /// Unknown pool, a pool that does not use `mode: master`, or an unreadable or empty file.
    pub fn master_password(&self, pool: &str) -> Result<Secret, MasterPasswordError> {
        let config = self
            .pools
            .get(pool)
            .ok_or_else(|| MasterPasswordError::UnknownPool(pool.to_string()))?;
        config
            .login
            .master_password()?
            .ok_or_else(|| MasterPasswordError::NotMaster(pool.to_string()))
    }

    /// Pools that routing sends users to.
    fn routed_pools(&self) -> BTreeSet<&str> {
        let r = &self.routing;
        [r.consumer_pool.as_str(), r.organisation_pool.as_str()]
            .into_iter()
            .chain(r.domain_pools.values().map(String::as_str))
            .filter(|name| self.pools.contains_key(*name))
            .collect()
    }

    /// Checks everything, normalising as it goes (domains lowercased), and returns every
    /// problem found.
    fn validate(&mut self) -> Vec<ConfigError> {
        let mut p = Problems {
            file: &self.source,
            lines: &self.key_lines,
            errors: Vec::new(),
        };
        for (key, first, second) in self.key_lines.duplicates() {
            p.errors.push(ConfigError {
                file: self.source.clone(),
                line: Some(second),
                key: key.to_string(),
                message: format!("is already given on line {first}; give each key once"),
            });
        }
        // Before normalising, so errors spell domain keys as the file does (and find their line).
        check_routing(&self.routing, &self.pools, &mut p);
        normalise_routing(&mut self.routing, &mut p);
        check_listeners(&self.listeners, &self.limits, &mut p);
        check_tls(&self.tls, &self.listeners, &mut p);
        check_file("accounts.path", &self.accounts.path, &mut p);
        check_pools(self, &mut p);
        check_limits(&self.limits, &mut p);
        check_messages(&self.messages, &mut p);
        if let Some(metrics) = &self.metrics {
            if let Some(i) = self
                .listeners
                .iter()
                .position(|l| l.address == metrics.address && l.address.port() != 0)
            {
                p.push(
                    "metrics.address".into(),
                    format!("`{}` is also listeners[{i}]'s address", metrics.address),
                );
            }
        }
        let mut errors = p.errors;
        errors.sort_by_key(|e| e.line);
        errors
    }
}

impl LoginConfig {
    /// `Some` master password for `mode: master` (see [`Config::master_password`]), `None` for
    /// passthrough.
    ///
    /// # Errors
    /// Neither or an unreadable/empty `password_file`.
    pub fn master_password(&self) -> Result<Option<Secret>, MasterPasswordError> {
        match self {
            LoginConfig::Passthrough => Ok(None),
            LoginConfig::Master {
                password: Some(password),
                ..
            } => Ok(Some(password.clone())),
            LoginConfig::Master {
                password_file: Some(path),
                ..
            } => {
                let text =
                    fs::read_to_string(path).map_err(|source| MasterPasswordError::Read {
                        path: path.clone(),
                        source,
                    })?;
                let password = text.trim();
                if password.is_empty() {
                    return Err(MasterPasswordError::Empty(path.clone()));
                }
                Ok(Some(Secret::new(password)))
            }
            LoginConfig::Master { .. } => Err(MasterPasswordError::Missing),
        }
    }
}

/// Collects problems, finding each key's line (or its nearest ancestor's) in the file.
struct Problems<'a> {
    file: &'a Path,
    lines: &'a KeyLines,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn push(&mut self, key: String, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: self.lines.nearest_line(&key),
            key,
            message,
        });
    }
}

fn check_listeners(listeners: &[ListenerConfig], limits: &Limits, p: &mut Problems<'_>) {
    if listeners.is_empty() {
        p.push("listeners".into(), "at least one listener is needed".into());
    }
    for (i, l) in listeners.iter().enumerate() {
        let key = |field: &str| format!("listeners[{i}].{field}");
        if l.name.trim().is_empty() {
            p.push(key("name"), "must not be empty".into());
        }
        let earlier = listeners.iter().take(i).enumerate();
        if let Some((j, _)) = earlier.clone().find(|(_, o)| o.name == l.name) {
            p.push(
                key("name"),
                format!("`{}` is also the name of listeners[{j}]", l.name),
            );
        }
        // Port 0 asks the OS for a free port, so two of those never collide (tests use it).
        if l.address.port() != 0 {
            if let Some((j, _)) = earlier.clone().find(|(_, o)| o.address == l.address) {
                p.push(
                    key("address"),
                    format!("`{}` is also the address of listeners[{j}]", l.address),
                );
            } else if let Some((j, o)) = earlier
                .clone()
                .find(|(_, o)| overlaps(o.address, l.address))
            {
                p.push(
                    key("address"),
                    format!(
                        "`{}` overlaps `{}` of listeners[{j}]: a wildcard address takes the \
                         port on every address of its family",
                        l.address, o.address
                    ),
                );
            }
        }
        if l.tls == ListenerTls::None && !l.address.ip().is_loopback() {
            p.push(
                key("tls"),
                format!(
                    "`none` is only allowed on a loopback address (127.0.0.1, [::1]), not on `{}`; \
                     use implicit or starttls",
                    l.address
                ),
            );
        }
        if l.proxy_protocol && limits.trusted_proxies.is_empty() {
            p.push(
                key("proxy_protocol"),
                "needs limits.trusted_proxies: only those peers may send a PROXY header".into(),
            );
        }
    }
}

/// Two different addresses on the same port where one is the wildcard of the other's family:
/// the second bind would fail.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn check_tls(tls: &TlsConfig, listeners: &[ListenerConfig], p: &mut Problems<'_>) {
    if tls.certificates.is_empty() && listeners.iter().any(|l| l.tls != ListenerTls::None) {
        p.push(
            "tls.certificates".into(),
            "at least one certificate is needed: listeners use TLS".into(),
        );
    }
    for (i, c) in tls.certificates.iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        check_certificate_pair(&key, c, tls.self_signed_if_missing, p);
    }
}

/// A certificate chain and key (`tls.certificates[i]`, a pool's `backend_client_certificate`):
/// both files readable, and they load and belong together. Problems go under `KEY.cert` or
/// `KEY.key`. `self_signed_if_missing`: both files missing is fine (a development certificate
/// will be made there), one missing is not.
fn check_certificate_pair(
    key: &str,
    c: &CertificateConfig,
    self_signed_if_missing: bool,
    p: &mut Problems<'_>,
) {
    let (cert, pkey) = (FileState::of(&c.cert), FileState::of(&c.key));
    match (&cert, &pkey) {
        (FileState::Missing, FileState::Missing) if self_signed_if_missing => return,
        (FileState::Present, FileState::Present) => {}
        _ => {
            let hint = if self_signed_if_missing {
                " (tls.self_signed_if_missing makes both files, so both must be missing or \
                 both present)"
            } else {
                ""
            };
            cert.report(format!("{key}.cert"), &c.cert, hint, p);
            pkey.report(format!("{key}.key"), &c.key, hint, p);
            return;
        }
    }
    if let Err((field, message)) = load_certified_key(c) {
        p.push(format!("{key}.{field}"), message);
    }
}

/// Loads a certificate chain and its key the way the server will, and checks they belong
/// together. The error names the field at fault and the file.
fn load_certified_key(c: &CertificateConfig) -> Result<CertifiedKey, (&'static str, String)> {
    let chain = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("cert", pem_problem(&c.cert, "a PEM certificate chain", &e)))?;
    if chain.is_empty() {
        return Err((
            "cert",
            format!("`{}` holds no CERTIFICATE block", c.cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| ("key", pem_problem(&c.key, "a PEM private key", &e)))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::aws_lc_rs::default_provider()).map_err(
        |e| {
            let why = match e {
                rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                    "it is not the private key of that certificate".to_string()
                }
                e => e.to_string(),
            };
            (
                "key",
                format!(
                    "`{}` does not go with `{}`: {why}",
                    c.key.display(),
                    c.cert.display()
                ),
            )
        },
    )
}

fn pem_problem(path: &Path, what: &str, e: &pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => format!("`{}` is not {what}: no such block", path.display()),
        e => format!("`{}` is not {what}: {e}", path.display()),
    }
}

/// Whether a file the config names can be opened.
enum FileState {
    Present,
    Missing,
    Unreadable(io::Error),
}

impl FileState {
    fn of(path: &Path) -> FileState {
        match fs::File::open(path).and_then(|f| f.metadata()) {
            Ok(meta) if meta.is_file() => FileState::Present,
            Ok(_) => FileState::Unreadable(io::Error::other("not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => FileState::Missing,
            Err(e) => FileState::Unreadable(e),
        }
    }

    fn report(&self, key: String, path: &Path, hint: &str, p: &mut Problems<'_>) {
        match self {
            FileState::Present => {}
            FileState::Missing => p.push(key, format!("`{}` does not exist{hint}", path.display())),
            FileState::Unreadable(e) => {
                p.push(key, format!("cannot read `{}`: {e}", path.display()))
            }
        }
    }
}

fn check_file(key: &str, path: &Path, p: &mut Problems<'_>) {
    FileState::of(path).report(key.into(), path, "", p);
}

/// Lowercases the routing domains (logins are matched in lowercase) and checks they are
/// domains. Keys in errors are spelt as in the file, so their lines are found.
fn normalise_routing(r: &mut RoutingConfig, p: &mut Problems<'_>) {
    let domain_problem = |d: &str| {
        if d.contains('@') {
            Some(format!("`{d}` is an address; write only the domain"))
        } else if !is_host_name(d) {
            Some(format!("`{d}` is not a domain name"))
        } else {
            None
        }
    };
    for (i, d) in r.consumer_domains.iter_mut().enumerate() {
        if let Some(problem) = domain_problem(d) {
            p.push(format!("routing.consumer_domains[{i}]"), problem);
        }
        *d = d.to_ascii_lowercase();
    }
    if let Some(problem) = domain_problem(&r.default_domain) {
        p.push("routing.default_domain".into(), problem);
    }
    r.default_domain = r.default_domain.to_ascii_lowercase();
    let mut lowered = BTreeMap::new();
    for (domain, pool) in std::mem::take(&mut r.domain_pools) {
        let key = format!("routing.domain_pools.{domain}");
        if let Some(problem) = domain_problem(&domain) {
            p.push(key.clone(), problem);
        }
        let lower = domain.to_ascii_lowercase();
        if lowered.contains_key(&lower) {
            p.push(
                key,
                format!("`{lower}` is listed twice (domains are case-insensitive)"),
            );
        }
        lowered.insert(lower, pool);
    }
    r.domain_pools = lowered;
}

fn check_routing(r: &RoutingConfig, pools: &BTreeMap<String, PoolConfig>, p: &mut Problems<'_>) {
    let defined = pools
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut check = |key: String, pool: &str| {
        if !pools.contains_key(pool) {
            p.push(
                key,
                format!("no pool named `{pool}` (pools defined: {defined})"),
            );
        }
    };
    check("routing.consumer_pool".into(), &r.consumer_pool);
    check("routing.organisation_pool".into(), &r.organisation_pool);
    for (domain, pool) in &r.domain_pools {
        check(format!("routing.domain_pools.{domain}"), pool);
    }
}

fn check_pools(config: &Config, p: &mut Problems<'_>) {
    let routed = config.routed_pools();
    let has_listener = |proto| config.listeners.iter().any(|l| l.protocol == proto);
    for (name, pool) in &config.pools {
        let key = |field: &str| format!("pools.{name}.{field}");
        for (proto, backends) in [(Protocol::Imap, &pool.imap), (Protocol::Smtp, &pool.smtp)] {
            for (i, backend) in backends.iter().enumerate() {
                let at = format!("pools.{name}.{}[{i}]", proto.as_str());
                if let Err(e) = backend.parse::<HostPort>() {
                    p.push(at, e);
                } else if backends[..i].contains(backend) {
                    p.push(at, format!("`{backend}` is listed twice"));
                }
            }
            if backends.is_empty() && routed.contains(name.as_str()) && has_listener(proto) {
                p.push(
                    key(proto.as_str()),
                    format!(
                        "no {0} backend, but routing uses this pool and there are {0} listeners",
                        proto.as_str()
                    ),
                );
            }
        }
        check_login(name, pool, p);
        check_backend_tls(name, pool, p);
        let h = &pool.health;
        if h.fall < 1 {
            p.push(key("health.fall"), "must be at least 1".into());
        }
        if h.rise < 1 {
            p.push(key("health.rise"), "must be at least 1".into());
        }
        if h.interval.0.is_zero() {
            p.push(key("health.interval"), "must be more than 0s".into());
        }
        if h.timeout.0.is_zero() {
            p.push(key("health.timeout"), "must be more than 0s".into());
        } else if h.timeout.0 >= h.interval.0 {
            p.push(
                key("health.timeout"),
                format!(
                    "{:?} must be shorter than health.interval ({:?})",
                    h.timeout.0, h.interval.0
                ),
            );
        }
    }
}

fn check_login(name: &str, pool: &PoolConfig, p: &mut Problems<'_>) {
    let key = |field: &str| format!("pools.{name}.login.{field}");
    match &pool.login {
        LoginConfig::Master {
            user,
            password,
            password_file,
        } => {
            if user.trim().is_empty() {
                p.push(key("user"), "must not be empty".into());
            }
            match (password, password_file) {
                (Some(_), Some(_)) => p.push(
                    key("password_file"),
                    "give `password` or `password_file`, not both".into(),
                ),
                (None, None) => p.push(
                    format!("pools.{name}.login"),
                    "mode: master needs `password` or `password_file`".into(),
                ),
                (Some(password), None) if password.expose().is_empty() => {
                    p.push(key("password"), "must not be empty".into());
                }
                (Some(_), None) => {}
                (None, Some(path)) => match FileState::of(path) {
                    FileState::Present => {
                        if let Err(e) = pool.login.master_password() {
                            p.push(key("password_file"), e.to_string());
                        }
                    }
                    state => state.report(key("password_file"), path, "", p),
                },
            }
        }
        LoginConfig::Passthrough => {
            if pool.smtp_login == SmtpLogin::Master {
                p.push(
                    format!("pools.{name}.smtp_login"),
                    "`master` needs login: { mode: master, ... } for the credentials".into(),
                );
            }
        }
    }
}

/// A TLS pool's backends must be names a certificate can be verified against, and its CA
/// bundle and client certificate must load; either without TLS is a mistake, not a no-op.
fn check_backend_tls(name: &str, pool: &PoolConfig, p: &mut Problems<'_>) {
    let key = |field: &str| format!("pools.{name}.{field}");
    if pool.backend_tls == BackendTls::None {
        for (field, set) in [
            ("backend_ca", pool.backend_ca.is_some()),
            (
                "backend_client_certificate",
                pool.backend_client_certificate.is_some(),
            ),
        ] {
            if set {
                p.push(
                    key(field),
                    format!(
                        "has no effect with backend_tls: none; set backend_tls: starttls or \
                         implicit, or remove {field}"
                    ),
                );
            }
        }
        return;
    }
    if let Some(c) = &pool.backend_client_certificate {
        check_certificate_pair(&key("backend_client_certificate"), c, false, p);
    }
    for (proto, backends) in [(Protocol::Imap, &pool.imap), (Protocol::Smtp, &pool.smtp)] {
        for (i, backend) in backends.iter().enumerate() {
            let Ok(host_port) = backend.parse::<HostPort>() else {
                continue; // reported by check_pools
            };
            if rustls_pki_types::ServerName::try_from(host_port.host.as_str()).is_err() {
                p.push(
                    format!("pools.{name}.{}[{i}]", proto.as_str()),
                    format!(
                        "`{}` is not a name a backend certificate can be verified against",
                        host_port.host
                    ),
                );
            }
        }
    }
    if let Some(path) = &pool.backend_ca {
        match FileState::of(path) {
            FileState::Present => {
                if let Err(e) = load_ca_bundle(path) {
                    p.push(key("backend_ca"), e);
                }
            }
            state => state.report(key("backend_ca"), path, "", p),
        }
    }
}

/// The CA certificates of a PEM bundle (`pools.<name>.backend_ca`) as a root store: the
/// certificates a backend's chain must lead to.
///
/// # Errors
/// The file cannot be read, holds no CERTIFICATE block, or a certificate cannot be a trust
/// anchor; the message names the file.
pub fn load_ca_bundle(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_problem(path, "a PEM CA bundle", &e))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no CERTIFICATE block", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!(
                "`{}`: certificate {} cannot be a trust anchor: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(roots)
}

fn check_limits(l: &Limits, p: &mut Problems<'_>) {
    for (name, d) in [
        ("handshake_timeout", l.handshake_timeout),
        ("preauth_timeout", l.preauth_timeout),
        ("idle_timeout", l.idle_timeout),
    ] {
        if d.0.is_zero() {
            p.push(format!("limits.{name}"), "must be more than 0s".into());
        }
    }
    let keepalive = l.tcp_keepalive.0;
    if !keepalive.is_zero()
        && !(Duration::from_secs(1)..=crate::keepalive::MAX_IDLE).contains(&keepalive)
    {
        p.push(
            "limits.tcp_keepalive".into(),
            format!(
                "must be 0s (off) or from 1s to {}s",
                crate::keepalive::MAX_IDLE.as_secs()
            ),
        );
    }
    for (name, n) in [
        ("max_connections", l.max_connections),
        ("max_connections_per_ip", l.max_connections_per_ip),
        ("max_sessions_per_user_ip", l.max_sessions_per_user_ip),
        ("max_auth_attempts", l.max_auth_attempts),
    ] {
        if n < 1 {
            p.push(format!("limits.{name}"), "must be at least 1".into());
        }
    }
    if l.auth_failure_delay.0 > l.auth_failure_max_delay.0 {
        p.push(
            "limits.auth_failure_delay".into(),
            format!(
                "{:?} is longer than limits.auth_failure_max_delay ({:?})",
                l.auth_failure_delay.0, l.auth_failure_max_delay.0
            ),
        );
    }
    for (name, rate) in [
        ("failures_per_ip", l.failures_per_ip),
        ("failures_per_user", l.failures_per_user),
    ] {
        if rate.count < 1 || rate.per.is_zero() {
            p.push(
                format!("limits.{name}"),
                "needs a count of at least 1 over more than 0s (e.g. 10/1m)".into(),
            );
        }
    }
}

fn check_messages(m: &Messages, p: &mut Problems<'_>) {
    let texts = [
        ("help_url", &m.help_url),
        ("app_password_required", &m.app_password_required),
        ("imap_disabled", &m.imap_disabled),
        ("smtp_disabled", &m.smtp_disabled),
        ("imap_policy_denied", &m.imap_policy_denied),
        ("smtp_policy_denied", &m.smtp_policy_denied),
        ("invalid_credentials", &m.invalid_credentials),
        ("smtp_invalid_credentials", &m.smtp_invalid_credentials),
        ("unavailable", &m.unavailable),
        ("smtp_unavailable", &m.smtp_unavailable),
        ("throttled", &m.throttled),
        ("too_many_connections", &m.too_many_connections),
    ];
    for (name, text) in texts {
        let mut rest = text.as_str();
        while let Some((_, after)) = rest.split_once('{') {
            let Some((placeholder, next)) = after.split_once('}') else {
                break;
            };
            if placeholder != "help_url" || name == "help_url" {
                p.push(
                    format!("messages.{name}"),
                    format!("unknown placeholder `{{{placeholder}}}`: only {{help_url}} is replaced, and not in help_url itself"),
                );
            }
            rest = next;
        }
        if text.contains(['\r', '\n']) {
            p.push(
                format!("messages.{name}"),
                "must be one line: it is sent as a protocol reply".into(),
            );
        }
    }
}

/// Where each key of a YAML document is: its path, spelt as serde_norway spells paths in its
/// errors (`listeners[0].address`, `pools.imap.login.user`), and its 1-based line. A sequence
/// item's line is where the item starts. Anchors and aliases are not followed.
#[derive(Clone, Default)]
pub struct KeyLines {
    /// In document order, for finding an unknown field under a mapping.
    keys: Vec<(String, usize)>,
    /// First line of each path.
    by_path: HashMap<String, usize>,
}

/// Short, so `{config:?}` in a log stays readable.
impl fmt::Debug for KeyLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyLines({} keys)", self.keys.len())
    }
}

impl KeyLines {
    /// Indexes `text`; a YAML syntax error ends the index there (serde_norway reports it).
    pub fn from_yaml(text: &str) -> KeyLines {
        enum Frame {
            /// `key`: `Some(path)` while the value of that key is awaited.
            Map {
                path: String,
                key: Option<String>,
            },
            Seq {
                path: String,
                next: usize,
            },
        }
        let join = |parent: &str, key: &str| {
            if parent.is_empty() {
                key.to_string()
            } else {
                format!("{parent}.{key}")
            }
        };
        let mut index = KeyLines::default();
        let mut stack: Vec<Frame> = Vec::new();
        // Depth inside a mapping or sequence used as a mapping key (legal YAML, never ours).
        let mut skip = 0usize;
        let mut parser = Parser::new_from_str(text);
        while let Some(Ok((event, span))) = parser.next_event() {
            let line = span.start.line();
            let is_start = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            let is_end = matches!(event, Event::MappingEnd | Event::SequenceEnd);
            if skip > 0 {
                if is_start {
                    skip += 1;
                } else if is_end {
                    skip -= 1;
                    if skip == 0 {
                        if let Some(Frame::Map { path, key }) = stack.last_mut() {
                            *key = Some(join(path, "?"));
                        }
                    }
                }
                continue;
            }
            if is_end {
                stack.pop();
                continue;
            }
            let node = match &event {
                Event::Scalar(value, ..) => Some(value.as_ref()),
                Event::Alias(_) => Some("*"),
                _ if is_start => None,
                _ => continue,
            };
            // The path of this node as a value, or record it as a key.
            let path = match stack.last_mut() {
                Some(Frame::Map { path, key }) => match key.take() {
                    Some(value_path) => value_path,
                    None => match node {
                        Some(name) => {
                            let key_path = join(path, name);
                            index.record(&key_path, line);
                            *key = Some(key_path);
                            continue;
                        }
                        None => {
                            skip = 1;
                            continue;
                        }
                    },
                },
                Some(Frame::Seq { path, next }) => {
                    let item = format!("{path}[{next}]");
                    *next += 1;
                    index.record(&item, line);
                    item
                }
                None => String::new(),
            };
            match event {
                Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
                Event::SequenceStart(..) => stack.push(Frame::Seq { path, next: 0 }),
                _ => {}
            }
        }
        index
    }

    fn record(&mut self, path: &str, line: usize) {
        self.keys.push((path.to_string(), line));
        self.by_path.entry(path.to_string()).or_insert(line);
    }

    /// The line of the `n`th (from 0) occurrence of `path`: a duplicated key is at 1.
    fn occurrence(&self, path: &str, n: usize) -> Option<usize> {
        self.keys
            .iter()
            .filter(|(p, _)| p == path)
            .nth(n)
            .map(|(_, line)| *line)
    }

    /// Keys that appear twice in one mapping, with the line of their first and second
    /// occurrence. serde silently keeps the last entry of a map (`pools`, `domain_pools`).
    /// Keys under a duplicated key are not listed again.
    fn duplicates(&self) -> Vec<(&str, usize, usize)> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut duplicates: Vec<(&str, usize, usize)> = Vec::new();
        for (path, line) in &self.keys {
            match seen.get(path.as_str()) {
                None => {
                    seen.insert(path, *line);
                }
                Some(first) => {
                    let under_reported = duplicates.iter().any(|(d, _, _)| {
                        *d == path.as_str()
                            || path
                                .strip_prefix(d)
                                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
                    });
                    if !under_reported {
                        duplicates.push((path, *first, *line));
                    }
                }
            }
        }
        duplicates
    }

    /// The line of `path`, if the file has that key.
    pub fn line(&self, path: &str) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// The line of `path`, or of its nearest ancestor the file has (a defaulted key is blamed
    /// on its section).
    pub fn nearest_line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.line(path) {
                return Some(line);
            }
            let cut = path.rfind(['.', '['])?;
            path = path.get(..cut)?;
        }
    }

    /// The first key named `field` under `parent` at or after `from_line`: where serde_norway
    /// reports an unknown field of an internally tagged enum (`login: {mode: .., pasword: ..}`)
    /// it names only the enclosing mapping.
    fn find_field(&self, parent: &str, field: &str, from_line: usize) -> Option<(&str, usize)> {
        let exact = if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        };
        if let Some(line) = self.line(&exact) {
            return Some((
                self.keys.iter().find(|(p, _)| *p == exact)?.0.as_str(),
                line,
            ));
        }
        self.keys
            .iter()
            .find(|(path, line)| {
                *line >= from_line
                    && (parent.is_empty() || path.starts_with(&format!("{parent}.")))
                    && path.ends_with(&format!(".{field}"))
            })
            .map(|(path, line)| (path.as_str(), *line))
    }
}

/// Turns serde_norway's error into file:line: key: message. Its text is `path: message at line
/// L column C`, where for an unknown or missing field `path` is the enclosing mapping.
fn parse_error(file: &Path, lines: &KeyLines, err: &serde_norway::Error) -> ConfigError {
    let location = err.location();
    let mut text = err.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        text = text.replacen(&suffix, "", 1);
    }
    let (path, message) = match text.split_once(": ") {
        Some((head, rest))
            if lines.line(head).is_some()
                || (!head.is_empty() && !head.contains([' ', '`', '\'', '"'])) =>
        {
            (head.to_string(), rest.to_string())
        }
        _ => (String::new(), text),
    };
    let join = |field: &str| {
        if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    let line = location.as_ref().map(|l| l.line());
    let (key, line, message) = if let Some(field) = backticked_after(&message, "unknown field `") {
        let (key, line) = match lines.find_field(&path, field, line.unwrap_or(1)) {
            Some((key, line)) => (key.to_string(), Some(line)),
            None => (join(field), line),
        };
        let message = match did_you_mean(field, &message) {
            Some(guess) => format!("{message}; did you mean `{guess}`?"),
            None => message,
        };
        (key, line, message)
    } else if let Some(field) = backticked_after(&message, "missing field `") {
        // The key is not in the file; point at the mapping that lacks it, if there is one.
        let line = if path.is_empty() {
            None
        } else {
            lines.line(&path).or(line)
        };
        (join(field), line, message)
    } else if let Some(field) = backticked_after(&message, "duplicate field `") {
        // Reported at the enclosing mapping; point at the second occurrence.
        let key = join(field);
        let line = lines.occurrence(&key, 1).or(line);
        (key, line, message)
    } else if path.is_empty() {
        // A YAML syntax error: no key, but the line is right.
        ("(yaml)".to_string(), line, message)
    } else {
        (path.clone(), line, message)
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        key,
        message,
    }
}

/// The text between `prefix` and the next backtick.
fn backticked_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let rest = text.get(start..)?;
    rest.split_once('`').map(|(name, _)| name)
}

/// The expected field closest to a typo (edit distance ≤ 2), from serde's "expected one of
/// `a`, `b`" list.
fn did_you_mean<'a>(typo: &str, message: &'a str) -> Option<&'a str> {
    let (_, expected) = message.split_once("expected")?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (edit_distance(typo, candidate), candidate))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = i;
        let mut next = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let left = next.last().copied().unwrap_or(0);
            let up = row.get(j + 1).copied().unwrap_or(0);
            let cost = diagonal + usize::from(ca != *cb);
            next.push(cost.min(left + 1).min(up + 1));
            diagonal = up;
        }
        row = next;
    }
    row.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value_and_never_show() {
        let secret = Secret::new("master-secret");
        assert!(secret == Secret::new("master-secret"));
        assert!(secret != Secret::new("master-secreT"));
        assert!(secret != Secret::new("master-secret2"));
        assert!(secret != Secret::new(""));
        assert!(Secret::new("") == Secret::new(""));
        assert_eq!(format!("{secret} {secret:?}"), "*** ***");
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("24h", Duration::from_secs(86_400)),
            ("7d", Duration::from_secs(7 * 86_400)),
            (" 0s ", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "s",
            "30",
            "30x",
            "1.5s",
            "-1s",
            "30 s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(text).is_err(), "{text} parsed");
        }
        assert_eq!(
            parse_duration("30sec"),
            Err("`30sec` is not a duration (units: ms, s, m, h, d)".to_string())
        );
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("10/1m"),
            Ok(Rate {
                count: 10,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            parse_rate("30/1h").map(|r| (r.count, r.per)),
            Ok((30, Duration::from_secs(3600)))
        );
        for text in ["10", "x/1m", "10/1x", "/1m", "10/", "-1/1m"] {
            assert!(parse_rate(text).is_err(), "{text} parsed");
        }
    }

    #[test]
    fn host_port() {
        for (text, host, port) in [
            ("127.0.0.1:143", "127.0.0.1", 143),
            ("mail1.example.com:993", "mail1.example.com", 993),
            ("mail.example.com.:25", "mail.example.com.", 25),
            ("backend_1:65535", "backend_1", 65535),
            ("[2001:db8::1]:143", "2001:db8::1", 143),
            ("[::1]:1", "::1", 1),
        ] {
            let parsed: HostPort = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((parsed.host.as_str(), parsed.port), (host, port), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        for (text, why) in [
            ("2001:db8::1:143", "must be in brackets"),
            ("mail.example.com", "is not host:port"),
            ("mail.example.com:0", "not a number from 1 to 65535"),
            ("mail.example.com:65536", "not a number from 1 to 65535"),
            ("mail.example.com:imap", "not a number from 1 to 65535"),
            ("[2001:db8::1]143", "is not host:port"),
            ("[mail.example.com]:143", "is not an IPv6 address"),
            (":143", "is not a host name"),
            ("-bad.example.com:143", "is not a host name"),
            ("mail example.com:143", "is not a host name"),
        ] {
            match text.parse::<HostPort>() {
                Ok(hp) => panic!("{text} parsed as {hp:?}"),
                Err(e) => assert!(e.contains(why), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn ip_networks() {
        let net: IpNet = "192.0.2.7/24".parse().expect("cidr");
        assert_eq!(net.to_string(), "192.0.2.0/24");
        assert!(net.contains("192.0.2.200".parse().expect("ip")));
        assert!(!net.contains("192.0.3.1".parse().expect("ip")));
        // What a dual-stack socket reports for an IPv4 peer.
        assert!(net.contains("::ffff:192.0.2.9".parse().expect("ip")));
        assert!(!net.contains("2001:db8::1".parse().expect("ip")));

        let single: IpNet = "198.51.100.7".parse().expect("address");
        assert_eq!(single.prefix_len(), 32);
        assert!(single.contains("198.51.100.7".parse().expect("ip")));
        assert!(!single.contains("198.51.100.8".parse().expect("ip")));

        let v6: IpNet = "2001:db8::/32".parse().expect("v6 cidr");
        assert!(v6.contains("2001:db8:ffff::1".parse().expect("ip")));
        assert!(!v6.contains("2001:db9::1".parse().expect("ip")));
        let all: IpNet = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains("203.0.113.1".parse().expect("ip")));

        for text in [
            "192.0.2.0/33",
            "2001:db8::/129",
            "192.0.2.0/",
            "192.0.2/24",
            "example.com",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(text.parse::<IpNet>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn key_lines_follow_block_and_flow_yaml() {
        let yaml = "\
listeners:
  - name: imaps
    address: 127.0.0.1:993
  - { name: imap, address: \"127.0.0.1:143\" }
pools:
  imap:
    imap: [\"a:1\",
           \"b:2\"]
    login: { mode: master,
             user: proxy }
    ? [complex, key]
    : ignored
    after: 1
routing:
  domain_pools:
    Big.Example: imap
";
        let lines = KeyLines::from_yaml(yaml);
        for (path, line) in [
            ("listeners", 1),
            ("listeners[0]", 2),
            ("listeners[0].name", 2),
            ("listeners[0].address", 3),
            ("listeners[1]", 4),
            ("listeners[1].address", 4),
            ("pools.imap.imap[0]", 7),
            ("pools.imap.imap[1]", 8),
            ("pools.imap.login.mode", 9),
            ("pools.imap.login.user", 10),
            ("pools.imap.after", 13),
            ("routing.domain_pools.Big.Example", 16),
        ] {
            assert_eq!(lines.line(path), Some(line), "{path}");
        }
        assert_eq!(lines.line("pools.imap.health"), None);
        assert_eq!(lines.nearest_line("pools.imap.health.fall"), Some(6));
        assert_eq!(lines.nearest_line("listeners[1].tls"), Some(4));
        assert_eq!(lines.nearest_line("limits.idle_timeout"), None);
        assert_eq!(
            lines.find_field("pools.imap", "user", 1),
            Some(("pools.imap.login.user", 10))
        );
    }

    #[test]
    fn key_lines_stop_at_a_syntax_error() {
        let lines = KeyLines::from_yaml("a: 1\nb: [1, 2\nc: 3\n");
        assert_eq!(lines.line("a"), Some(1));
        assert_eq!(lines.line("c"), None);
    }

    /// A config that passes validation without any file on disk.
    fn plain(extra: &str) -> String {
        format!(
            "\
listeners:
  - {{ name: t, protocol: imap, address: \"127.0.0.1:0\", tls: none }}
tls: {{ certificates: [] }}
accounts: {{ source: file, path: Cargo.toml }}
routing:
  consumer_domains: [Example.COM]
  default_domain: EXAMPLE.com
  consumer_pool: p
  organisation_pool: p
pools:
  p:
    imap: [\"127.0.0.1:1\"]
    login: {{ mode: passthrough }}
{extra}"
        )
    }

    fn errors_of(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, Path::new("t.yaml")) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn tcp_keepalive_is_on_by_default_off_at_zero_and_bounded() {
        let load = |extra: &str| Config::from_yaml(&plain(extra), Path::new("t.yaml"));
        let default = load("").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(default.limits.tcp_keepalive.0, Duration::from_secs(120));
        let off = load("limits:\n  tcp_keepalive: 0s\n").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(off.limits.keepalive(), None);
        for value in ["500ms", "10h"] {
            let errors = errors_of(&plain(&format!("limits:\n  tcp_keepalive: {value}\n")));
            assert_eq!(
                errors,
                ["t.yaml:15: limits.tcp_keepalive: must be 0s (off) or from 1s to 32767s"],
                "{value}"
            );
        }
    }

    #[test]
    fn a_reload_names_each_changed_setting_and_whether_it_waits_for_a_restart() {
        let load = |yaml: &str| {
            Config::from_yaml(yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e:?}"))
        };
        let running = load(&plain("limits:\n  idle_timeout: 10m\n"));
        let show = |changes: Vec<ConfigError>| -> Vec<String> {
            changes.iter().map(ToString::to_string).collect()
        };
        let restart = |yaml: &str| show(running.restart_only_changes(&load(yaml)));
        let live = |yaml: &str| show(running.live_changes(&load(yaml)));
        // The same settings, spelt differently or left at their defaults, are no change; nor is
        // what a reload puts in place or compares itself (the pools).
        let same = plain("limits:\n  idle_timeout: 30m\n")
            .replace(
                "idle_timeout: 30m",
                "idle_timeout: 600s\n  max_connections: 50000",
            )
            .replace(
                "consumer_domains: [Example.COM]",
                "consumer_domains: [example.com]",
            )
            .replace("127.0.0.1:1", "127.0.0.1:2")
            .replace("mode: passthrough", "mode: master, user: u, password: p");
        assert_eq!(restart(&same), Vec::<String>::new());
        assert_eq!(live(&same), Vec::<String>::new());

        let edited = plain(
            "limits:\n  idle_timeout: 5m\n  max_connections: 10\n  tcp_keepalive: 1m\n\
             messages:\n  throttled: Wait\nshutdown:\n  drain_timeout: 1s\n\
             metrics:\n  address: \"127.0.0.1:9\"\n",
        )
        .replace("127.0.0.1:0", "127.0.0.1:143")
        .replace("default_domain: EXAMPLE.com", "default_domain: example.net");
        assert_eq!(
            restart(&edited),
            [
                "t.yaml:2: listeners[0].address: changed; it takes effect at a restart",
                "t.yaml:17: limits.tcp_keepalive: changed; it takes effect at a restart",
                "t.yaml:23: metrics.address: changed; it takes effect at a restart",
            ]
        );
        assert_eq!(
            live(&edited),
            [
                "t.yaml:7: routing.default_domain: changed; in place now",
                "t.yaml:15: limits.idle_timeout: changed; in place now",
                "t.yaml:16: limits.max_connections: changed; in place now",
                "t.yaml:19: messages.throttled: changed; in place now",
                "t.yaml:21: shutdown.drain_timeout: changed; in place now",
            ]
        );

        // A listener added is the list's change; a setting gone from the file is blamed on
        // the nearest key it still has (none here: the file's name alone).
        let added = plain("").replace(
            "tls: none }\n",
            "tls: none }\n  - { name: u, protocol: imap, address: \"127.0.0.1:0\", tls: none }\n",
        );
        assert_eq!(
            restart(&added),
            ["t.yaml:1: listeners: changed; it takes effect at a restart"]
        );
        assert_eq!(
            live(&added),
            ["t.yaml: limits.idle_timeout: changed; in place now"]
        );
    }

    #[test]
    fn a_plain_config_loads_and_is_normalised() {
        let config =
            Config::from_yaml(&plain(""), Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(config.routing.consumer_domains, ["example.com"]);
        assert_eq!(config.routing.default_domain, "example.com");
        assert_eq!(config.source, Path::new("t.yaml"));
        assert_eq!(config.limits.max_auth_attempts, 3);
        assert!(config.notes().is_empty(), "{:?}", config.notes());
    }

    #[test]
    fn parse_errors_name_line_and_key() {
        for (extra, want) in [
            (
                "limits:\n  handshake_timeout: 10s\n  idle_timeout: 30x\n",
                "t.yaml:16: limits.idle_timeout: `30x` is not a duration",
            ),
            (
                "limits:\n  failures_per_user: 3/1y\n",
                "t.yaml:15: limits.failures_per_user: `3/1y`: `1y` is not a duration",
            ),
            (
                "limits: { trusted_proxies: [10.0.0.0/8, nonsense] }\n",
                "t.yaml:14: limits.trusted_proxies[1]: `nonsense` is not an IP address or CIDR",
            ),
            (
                "limits:\n  max_auth_attemps: 3\n",
                "t.yaml:15: limits.max_auth_attemps: unknown field `max_auth_attemps`",
            ),
            (
                "shutdown:\n  drain_timeout: 5s\n  grace: 1s\n",
                "t.yaml:16: shutdown.grace: unknown field `grace`",
            ),
            (
                "metrics: {}\n",
                "t.yaml:14: metrics.address: missing field `address`",
            ),
            (
                "limits:\n  max_connections: lots\n",
                "t.yaml:15: limits.max_connections: invalid type: string \"lots\", expected u32",
            ),
        ] {
            let errors = errors_of(&plain(extra));
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "want {want}\ngot {errors:#?}"
            );
            assert_eq!(errors.len(), 1, "{errors:#?}");
        }
    }

    #[test]
    fn a_backend_listed_twice_is_an_error() {
        let errors = errors_of(&plain(
            "  q:\n    imap: [\"a.example:143\", \"b.example:143\", \"a.example:143\"]\n    login: { mode: passthrough }\n",
        ));
        assert_eq!(
            errors,
            ["t.yaml:15: pools.q.imap[2]: `a.example:143` is listed twice"],
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let errors = Config::load(Path::new("no/such/mailgate.yaml"))
            .err()
            .unwrap_or_default();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 1);
        assert!(
            shown[0].starts_with("no/such/mailgate.yaml: cannot read the config file: "),
            "{shown:?}"
        );
    }

    #[test]
    fn semantic_errors_are_all_reported_in_line_order() {
        let yaml = plain(
            "  q:
    login: { mode: master, user: \"\", password: \"\" }
    smtp_login: master
    health: { interval: 1s, timeout: 1s, fall: 0, rise: 0 }
limits:
  handshake_timeout: 0s
  max_connections: 0
  auth_failure_delay: 20s
  failures_per_ip: 0/1m
messages:
  help_url: \"https://example.com/{help_url}\"
  throttled: \"{help_url} {when}\"
  unavailable: \"two\\nlines\"
metrics: { address: \"127.0.0.1:0\" }
",
        );
        let errors = errors_of(&yaml);
        let want = [
            "t.yaml:15: pools.q.login.user: must not be empty",
            "t.yaml:15: pools.q.login.password: must not be empty",
            "t.yaml:17: pools.q.health.fall: must be at least 1",
            "t.yaml:17: pools.q.health.rise: must be at least 1",
            "t.yaml:17: pools.q.health.timeout: 1s must be shorter than health.interval (1s)",
            "t.yaml:19: limits.handshake_timeout: must be more than 0s",
            "t.yaml:20: limits.max_connections: must be at least 1",
            "t.yaml:21: limits.auth_failure_delay: 20s is longer than limits.auth_failure_max_delay (15s)",
            "t.yaml:22: limits.failures_per_ip: needs a count of at least 1",
            "t.yaml:24: messages.help_url: unknown placeholder `{help_url}`",
            "t.yaml:25: messages.throttled: unknown placeholder `{when}`",
            "t.yaml:26: messages.unavailable: must be one line",
        ];
        for w in want {
            assert!(
                errors.iter().any(|e| e.starts_with(w)),
                "want {w}\ngot {errors:#?}"
            );
        }
        // Port 0 never collides, so metrics on 127.0.0.1:0 is no error.
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
    }

    #[test]
    fn listener_problems() {
        let yaml = "\
listeners:
  - { name: a, protocol: imap, address: \"0.0.0.0:993\", tls: implicit }
  - { name: b, protocol: imap, address: \"192.0.2.1:993\", tls: implicit }
  - { name: c, protocol: imap, address: \"[::]:993\", tls: implicit }
  - { name: d, protocol: imap, address: \"[::1]:143\", tls: none }
  - { name: e, protocol: smtp, address: \"[2001:db8::1]:25\", tls: none }
tls: { certificates: [] }
accounts: { source: file, path: Cargo.toml }
routing: { consumer_domains: [], default_domain: example.com, consumer_pool: p, organisation_pool: p }
pools:
  p: { imap: [\"127.0.0.1:1\"], login: { mode: passthrough } }
";
        let errors = errors_of(yaml);
        let want = [
            "t.yaml:3: listeners[1].address: `192.0.2.1:993` overlaps `0.0.0.0:993` of listeners[0]",
            "t.yaml:6: listeners[4].tls: `none` is only allowed on a loopback address",
            "t.yaml:7: tls.certificates: at least one certificate is needed",
            "t.yaml:11: pools.p.smtp: no smtp backend",
        ];
        for w in want {
            assert!(
                errors.iter().any(|e| e.starts_with(w)),
                "want {w}\ngot {errors:#?}"
            );
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec![format!("{name}.example.com")]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        fs::write(&cert_path, cert.pem()).expect("write cert");
        fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn with_certificates(pairs: &[(&Path, &Path)], self_signed: bool) -> String {
        let certs: String = pairs
            .iter()
            .map(|(c, k)| {
                format!(
                    "    - {{ cert: \"{}\", key: \"{}\" }}\n",
                    c.display(),
                    k.display()
                )
            })
            .collect();
        format!(
            "\
listeners:
  - {{ name: t, protocol: imap, address: \"127.0.0.1:0\", tls: implicit }}
tls:
  self_signed_if_missing: {self_signed}
  certificates:
{certs}accounts: {{ source: file, path: Cargo.toml }}
routing: {{ consumer_domains: [], default_domain: example.com, consumer_pool: p, organisation_pool: p }}
pools:
  p: {{ imap: [\"127.0.0.1:1\"], login: {{ mode: passthrough }} }}
"
        )
    }

    #[test]
    fn certificates_are_loaded_and_must_match_their_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_crt, a_key) = write_pair(dir.path(), "a");
        let (b_crt, b_key) = write_pair(dir.path(), "b");
        let good = with_certificates(&[(&a_crt, &a_key), (&b_crt, &b_key)], false);
        assert_eq!(errors_of(&good), Vec::<String>::new());

        let swapped = with_certificates(&[(&a_crt, &b_key)], false);
        let errors = errors_of(&swapped);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("t.yaml:6: tls.certificates[0].key: ")
                && errors[0].ends_with("it is not the private key of that certificate"),
            "{errors:#?}"
        );

        let key_as_cert = with_certificates(&[(&a_key, &a_key)], false);
        let errors = errors_of(&key_as_cert);
        assert!(
            errors[0].contains("holds no CERTIFICATE block"),
            "{errors:#?}"
        );
        let cert_as_key = with_certificates(&[(&a_crt, &a_crt)], false);
        let errors = errors_of(&cert_as_key);
        assert!(
            errors[0].contains("is not a PEM private key"),
            "{errors:#?}"
        );
    }

    #[test]
    fn missing_certificates_are_errors_unless_self_signed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (crt, key) = (dir.path().join("dev.crt"), dir.path().join("dev.key"));
        let strict = with_certificates(&[(&crt, &key)], false);
        let errors = errors_of(&strict);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with("t.yaml:6: tls.certificates[0].cert: `")
                && errors[0].ends_with("dev.crt` does not exist"),
            "{errors:#?}"
        );

        let lenient = with_certificates(&[(&crt, &key)], true);
        let config =
            Config::from_yaml(&lenient, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e:?}"));
        let notes = config.notes();
        assert_eq!(notes.len(), 1, "{notes:#?}");
        assert!(
            notes[0].starts_with("t.yaml:6: tls.certificates[0]: `"),
            "{notes:#?}"
        );
        assert!(
            notes[0].contains("self-signed development certificate"),
            "{notes:#?}"
        );
    }

    #[test]
    fn master_password_from_a_file_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("master");
        fs::write(&file, "  s3cret \n").expect("write");
        let yaml = plain(&format!(
            "  q:\n    imap: [\"127.0.0.1:2\"]\n    login: {{ mode: master, user: proxy, password_file: \"{}\" }}\n",
            file.display()
        ));
        let config =
            Config::from_yaml(&yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            config
                .master_password("q")
                .map(|s| s.expose().to_string())
                .ok(),
            Some("s3cret".to_string())
        );
        assert!(matches!(
            config.master_password("p"),
            Err(MasterPasswordError::NotMaster(_))
        ));
        assert!(matches!(
            config.master_password("nope"),
            Err(MasterPasswordError::UnknownPool(_))
        ));
        assert_eq!(
            format!("{:?}", config.master_password("q").ok()),
            "Some(***)"
        );
        // An unused pool is worth a note.
        assert!(config
            .notes()
            .iter()
            .any(|n| n.starts_with("t.yaml:14: pools.q: no route uses")));
    }

    #[test]
    fn limits_and_proxy_protocol_are_active_and_get_no_note() {
        let yaml = plain(
            "    health: { interval: 5s, timeout: 2s }\n\
limits:\n  idle_timeout: 30m\n  max_connections: 10\n  trusted_proxies: [10.0.0.1]\n\
metrics: { address: \"127.0.0.1:9993\" }\n",
        );
        let yaml = yaml.replace("tls: none }", "tls: none, proxy_protocol: true }");
        let config =
            Config::from_yaml(&yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(config.notes(), Vec::<String>::new());
    }

    #[test]
    fn domain_overrides_are_lowercased_and_checked() {
        let yaml = plain("").replace(
            "  organisation_pool: p\n",
            "  organisation_pool: p\n  domain_pools: { Big.Example: p, big.example: p, \"a b\": p }\n",
        );
        let errors = errors_of(&yaml);
        assert_eq!(
            errors,
            [
                "t.yaml:10: routing.domain_pools.a b: `a b` is not a domain name",
                "t.yaml:10: routing.domain_pools.big.example: `big.example` is listed twice (domains are case-insensitive)",
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let pool_twice =
            plain("  p:\n    imap: [\"127.0.0.1:9\"]\n    login: { mode: passthrough }\n");
        assert_eq!(
            errors_of(&pool_twice),
            ["t.yaml:14: pools.p: is already given on line 11; give each key once"]
        );
        let field_twice = plain("").replace("    login:", "    imap: []\n    login:");
        assert_eq!(
            errors_of(&field_twice),
            ["t.yaml:13: pools.p.imap: duplicate field `imap`"]
        );
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(edit_distance("adress", "address"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            did_you_mean(
                "adress",
                "unknown field `adress`, expected one of `name`, `address`"
            ),
            Some("address")
        );
        assert_eq!(
            did_you_mean("zzz", "unknown field `zzz`, expected `name`"),
            None
        );
    }

    #[test]
    fn backend_ca_must_load_and_needs_backend_tls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed");
        fs::write(&ca, cert.pem()).expect("write");
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not a certificate\n").expect("write");
        let missing = dir.path().join("missing.pem");
        let pool = |tls: &str, ca: &Path| {
            plain("").replace(
                "    login: { mode: passthrough }\n",
                &format!(
                    "    login: {{ mode: passthrough }}\n    backend_tls: {tls}\n    backend_ca: \"{}\"\n",
                    ca.display()
                ),
            )
        };

        let config = Config::from_yaml(&pool("starttls", &ca), Path::new("t.yaml"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(config.pools["p"].backend_ca.as_deref(), Some(ca.as_path()));
        assert_eq!(load_ca_bundle(&ca).map(|r| r.len()), Ok(1));

        let errors = errors_of(&pool("implicit", &garbage));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("t.yaml:15: pools.p.backend_ca: `")
                && errors[0].contains("garbage.pem` holds no CERTIFICATE block"),
            "{errors:#?}"
        );
        let errors = errors_of(&pool("implicit", &missing));
        assert!(
            errors.len() == 1 && errors[0].ends_with("missing.pem` does not exist"),
            "{errors:#?}"
        );
        assert_eq!(
            errors_of(&pool("none", &ca)),
            [
                "t.yaml:15: pools.p.backend_ca: has no effect with backend_tls: none; set \
              backend_tls: starttls or implicit, or remove backend_ca"
            ]
        );
    }

    #[test]
    fn backend_client_certificate_must_load_match_and_need_backend_tls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_pair = |name: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let params = rcgen::CertificateParams::new(vec!["mailgate".to_string()]).expect("p");
            let cert = params.self_signed(&key).expect("self-signed");
            let (cert_path, key_path) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}.key")),
            );
            fs::write(&cert_path, cert.pem()).expect("write");
            fs::write(&key_path, key.serialize_pem()).expect("write");
            (cert_path, key_path)
        };
        let (cert, key) = write_pair("client");
        let (_, other_key) = write_pair("other");
        let pool = |tls: &str, cert: &Path, key: &Path| {
            plain("").replace(
                "    login: { mode: passthrough }\n",
                &format!(
                    "    login: {{ mode: passthrough }}\n    backend_tls: {tls}\n    \
                     backend_client_certificate:\n      cert: \"{}\"\n      key: \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
            )
        };

        let config = Config::from_yaml(&pool("implicit", &cert, &key), Path::new("t.yaml"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let loaded = config.pools["p"].backend_client_certificate.as_ref();
        assert_eq!(loaded.map(|c| c.cert.as_path()), Some(cert.as_path()));

        let errors = errors_of(&pool("starttls", &cert, &other_key));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("t.yaml:17: pools.p.backend_client_certificate.key: `")
                && errors[0].ends_with("it is not the private key of that certificate"),
            "{errors:#?}"
        );
        let missing = dir.path().join("missing.pem");
        let errors = errors_of(&pool("implicit", &missing, &key));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("t.yaml:16: pools.p.backend_client_certificate.cert: `")
                && errors[0].ends_with("missing.pem` does not exist"),
            "{errors:#?}"
        );
        assert_eq!(
            errors_of(&pool("none", &cert, &key)),
            [
                "t.yaml:15: pools.p.backend_client_certificate: has no effect with backend_tls: \
                 none; set backend_tls: starttls or implicit, or remove backend_client_certificate"
            ]
        );
    }
}
