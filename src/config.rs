//! Configuration: one serde tree (`deny_unknown_fields`), typed fields, validated completely
//! before anything binds. Every error names the file, the line and the key.
//!
//! `Config::load(path)` parses and validates; `mailgate check` prints the same messages.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A secret read from config: its `Debug` and `Display` never show it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

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

/// A duration written as `500ms`, `30s`, `5m`, `24h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

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

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (count, per) = s.split_once('/').ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not a rate (write e.g. 10/1m)"))
        })?;
        let count = count
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{s}`: `{count}` is not a count")))?;
        let per = parse_duration(per).map_err(serde::de::Error::custom)?;
        Ok(Rate { count, per })
    }
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
    /// Make a self-signed development certificate on start when the files are missing.
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
    /// `host:port` of each IMAP backend.
    #[serde(default)]
    pub imap: Vec<String>,
    /// `host:port` of each SMTP submission backend.
    #[serde(default)]
    pub smtp: Vec<String>,
    #[serde(default)]
    pub backend_tls: BackendTls,
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

#[derive(Debug, Clone, Deserialize)]
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
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub max_sessions_per_user_ip: u32,
    pub max_auth_attempts: u32,
    pub auth_failure_delay: HumanDuration,
    pub auth_failure_max_delay: HumanDuration,
    pub failures_per_ip: Rate,
    pub failures_per_user: Rate,
    pub trusted_networks: Vec<String>,
    pub trusted_proxies: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: HumanDuration(Duration::from_secs(10)),
            preauth_timeout: HumanDuration(Duration::from_secs(60)),
            idle_timeout: HumanDuration(Duration::from_secs(30 * 60)),
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
    pub unavailable: String,
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
            unavailable: "Mail server temporarily unavailable".into(),
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
    pub line: Option<usize>,
    /// Dotted key path, e.g. `listeners[0].address`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: {}: {}",
                self.file.display(),
                line,
                self.key,
                self.message
            ),
            None => write!(f, "{}: {}: {}", self.file.display(), self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates `path`.
    ///
    /// # Errors
    /// Every problem found, each naming file, line and key.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let _ = path;
        todo!("config loading: helper")
    }
}
