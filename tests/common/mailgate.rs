//! The real `mailgate` binary for one test: a config written into a temp dir (listeners on
//! `127.0.0.1:0`, a development certificate made on first start), the process's stderr
//! collected, the bound ports read from its `listening` log lines (and the metrics endpoint's
//! from `metrics listening`), stopped on drop.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The demo account file; its passwords are listed in the README and in its comments.
pub const DEMO_ACCOUNTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/accounts.yaml");

/// How mailgate logs in to a pool's IMAP backends.
#[derive(Debug, Clone)]
pub enum Login {
    Master {
        user: String,
        password: String,
    },
    /// A master login whose password is read from `password_file`.
    MasterFile {
        user: String,
        password_file: PathBuf,
    },
    Passthrough,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub imap: Vec<SocketAddr>,
    pub smtp: Vec<SocketAddr>,
    pub login: Login,
    /// `backend_tls`: `none`, `starttls` or `implicit`.
    pub backend_tls: String,
    /// `backend_ca`: the PEM bundle that signs the backends' certificates.
    pub backend_ca: Option<PathBuf>,
    /// Names the backends by this host (e.g. `localhost`) instead of their IP address, so
    /// TLS verifies a DNS name rather than an IP address.
    pub host: Option<String>,
    /// `backend_client_certificate`: (cert, key) PEM files.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

impl Pool {
    pub fn master(imap: &[SocketAddr], smtp: &[SocketAddr], user: &str, password: &str) -> Pool {
        Pool {
            imap: imap.to_vec(),
            smtp: smtp.to_vec(),
            login: Login::Master {
                user: user.into(),
                password: password.into(),
            },
            backend_tls: "none".into(),
            backend_ca: None,
            host: None,
            client_certificate: None,
        }
    }

    /// A master login as `user` with the password read from `password_file` (see
    /// [`write_password_file`]).
    pub fn master_file(
        imap: &[SocketAddr],
        smtp: &[SocketAddr],
        user: &str,
        password_file: &Path,
    ) -> Pool {
        Pool {
            login: Login::MasterFile {
                user: user.into(),
                password_file: password_file.to_path_buf(),
            },
            ..Pool::master(imap, smtp, user, "")
        }
    }

    /// TLS to the backends: `mode` (`starttls`, `implicit`), trusting the CA bundle `ca`
    /// (the system's trust store when `None`).
    pub fn tls(mut self, mode: &str, ca: Option<&Path>) -> Pool {
        self.backend_tls = mode.into();
        self.backend_ca = ca.map(Path::to_path_buf);
        self
    }

    /// Names the backends `host:PORT` instead of `IP:PORT`.
    pub fn host(mut self, host: &str) -> Pool {
        self.host = Some(host.into());
        self
    }

    /// Presents this certificate to backends that ask for one.
    pub fn client_certificate(mut self, cert: &Path, key: &Path) -> Pool {
        self.client_certificate = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }
}

/// What a [`Mailgate`] is started with.
#[derive(Debug, Clone)]
pub struct MailgateOpts {
    /// The consumer pool (`imap`: skydesk.jp and bare names).
    pub imap: Pool,
    /// The organisation pool (`imappro`: every other domain).
    pub imappro: Pool,
    pub accounts: PathBuf,
    /// YAML lines under `limits:` (indented by the helper).
    pub limits: Vec<String>,
    /// Pools besides `imap` and `imappro`, by name (for `domain_pools`); none by default.
    pub extra_pools: Vec<(String, Pool)>,
    /// `routing.domain_pools` entries (`"skydesk.jp: imappro"`); none by default.
    pub domain_pools: Vec<String>,
    /// YAML lines under `messages:` (indented by the helper).
    pub messages: Vec<String>,
    pub drain_timeout: String,
    pub smtp_login: String,
    /// Every pool's `health:` value (a YAML flow mapping).
    pub health: String,
    /// Adds `imaps-proxied` and `imap-proxied`: the IMAP listeners again with
    /// `proxy_protocol: true` (set `limits.trusted_proxies` too).
    pub proxied_listeners: bool,
    /// Connection workers (`TOKIO_WORKER_THREADS`); `None`: one per core.
    pub workers: Option<usize>,
}

impl MailgateOpts {
    pub fn new(imap: Pool, imappro: Pool) -> MailgateOpts {
        MailgateOpts {
            imap,
            imappro,
            accounts: PathBuf::from(DEMO_ACCOUNTS),
            limits: vec!["preauth_timeout: 30s".into()],
            messages: vec!["help_url: https://help.example/app-passwords".into()],
            extra_pools: Vec::new(),
            domain_pools: Vec::new(),
            drain_timeout: "30s".into(),
            smtp_login: "xclient".into(),
            health: "{ interval: 5s, timeout: 2s, fall: 2, rise: 2 }".into(),
            proxied_listeners: false,
            workers: None,
        }
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Sets every pool's health checks, e.g. `{ interval: 200ms, timeout: 100ms, fall: 1, rise: 1 }`.
    pub fn health(mut self, value: &str) -> Self {
        self.health = value.into();
        self
    }

    /// Sets one `limits:` key (`"idle_timeout: 5s"`), replacing an earlier value of that key.
    pub fn limit(mut self, line: &str) -> Self {
        set_key(&mut self.limits, line);
        self
    }

    /// Sets one `messages:` key (`"throttled: Wait"`), replacing an earlier value of that key.
    pub fn message(mut self, line: &str) -> Self {
        set_key(&mut self.messages, line);
        self
    }

    pub fn drain_timeout(mut self, value: &str) -> Self {
        self.drain_timeout = value.into();
        self
    }
}

/// Puts the YAML line `key: value` in `lines`, in place of an earlier line of that key.
fn set_key(lines: &mut Vec<String>, line: &str) {
    let key = line.split(':').next().unwrap_or_default();
    lines.retain(|l| l.split(':').next() != Some(key));
    lines.push(line.into());
}

/// A running mailgate. Dropping it kills the process.
pub struct Mailgate {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    addrs: HashMap<String, SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    dir: TempDir,
}

fn list(addrs: &[SocketAddr], host: Option<&str>) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|a| match host {
            Some(host) => format!("\"{host}:{}\"", a.port()),
            None => format!("\"{a}\""),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn pool_yaml(out: &mut String, name: &str, pool: &Pool, smtp_login: &str, health: &str) {
    let _ = writeln!(out, "  {name}:");
    let host = pool.host.as_deref();
    let _ = writeln!(out, "    imap: {}", list(&pool.imap, host));
    let _ = writeln!(out, "    smtp: {}", list(&pool.smtp, host));
    let _ = writeln!(out, "    backend_tls: {}", pool.backend_tls);
    if let Some(ca) = &pool.backend_ca {
        let _ = writeln!(out, "    backend_ca: \"{}\"", ca.display());
    }
    if let Some((cert, key)) = &pool.client_certificate {
        let _ = writeln!(out, "    backend_client_certificate:");
        let _ = writeln!(out, "      cert: \"{}\"", cert.display());
        let _ = writeln!(out, "      key: \"{}\"", key.display());
    }
    match &pool.login {
        Login::Master { user, password } => {
            let _ = writeln!(
                out,
                "    login: {{ mode: master, user: \"{user}\", password: \"{password}\" }}"
            );
        }
        Login::MasterFile {
            user,
            password_file,
        } => {
            let path = password_file.display();
            let _ = writeln!(
                out,
                "    login: {{ mode: master, user: \"{user}\", password_file: \"{path}\" }}"
            );
        }
        Login::Passthrough => {
            let _ = writeln!(out, "    login: {{ mode: passthrough }}");
        }
    }
    let _ = writeln!(out, "    smtp_login: {smtp_login}");
    let _ = writeln!(out, "    health: {health}");
}

impl Mailgate {
    /// Writes the config and starts `mailgate run`; waits until every listener is bound.
    ///
    /// # Panics
    /// When it does not come up within 20 s; the message carries its log.
    pub fn start(opts: &MailgateOpts) -> Mailgate {
        let dir = tempfile::Builder::new()
            .prefix("mgtest-mailgate-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let config = Self::config(dir.path(), opts);
        let path = dir.path().join("mailgate.yaml");
        std::fs::write(&path, &config).unwrap_or_else(|e| panic!("writing config: {e}"));
        // Set by cargo for integration tests; the demo example compiles this module too.
        let binary = option_env!("CARGO_BIN_EXE_mailgate").unwrap_or("target/debug/mailgate");
        let mut command = Command::new(binary);
        if let Some(n) = opts.workers {
            command.env("TOKIO_WORKER_THREADS", n.to_string());
        }
        let mut child = command
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info,mailgate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting mailgate: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut log) = log.lock() {
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
            });
        }
        let mut mailgate = Mailgate {
            child: Some(child),
            log,
            addrs: HashMap::new(),
            metrics_addr: None,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = mailgate.log();
            mailgate.addrs = parse_listening(&log);
            mailgate.metrics_addr = parse_metrics_listening(&log);
            if mailgate.addrs.len() == Self::listeners(opts).len()
                && mailgate.metrics_addr.is_some()
            {
                return mailgate;
            }
            if let Some(status) = mailgate.try_wait() {
                panic!(
                    "mailgate exited ({status}) before listening:\n{}\nconfig:\n{config}",
                    mailgate.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mailgate did not listen in 20 s:\n{}",
                mailgate.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// IMAP listeners always; SMTP ones when the pools have SMTP backends; the proxied IMAP
    /// ones when asked for. (name, protocol, tls, proxy_protocol)
    fn listeners(opts: &MailgateOpts) -> Vec<(&'static str, &'static str, &'static str, bool)> {
        let mut listeners = vec![
            ("imaps", "imap", "implicit", false),
            ("imap", "imap", "starttls", false),
        ];
        if !opts.imap.smtp.is_empty() || !opts.imappro.smtp.is_empty() {
            listeners.push(("submissions", "smtp", "implicit", false));
            listeners.push(("submission", "smtp", "starttls", false));
        }
        if opts.proxied_listeners {
            listeners.push(("imaps-proxied", "imap", "implicit", true));
            listeners.push(("imap-proxied", "imap", "starttls", true));
        }
        listeners
    }

    fn config(dir: &Path, opts: &MailgateOpts) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "listeners:");
        for (name, protocol, tls, proxy_protocol) in Self::listeners(opts) {
            let _ = writeln!(
                out,
                "  - {{ name: {name}, protocol: {protocol}, address: \"127.0.0.1:0\", tls: {tls}, proxy_protocol: {proxy_protocol} }}"
            );
        }
        let _ = writeln!(out, "tls:");
        let _ = writeln!(out, "  self_signed_if_missing: true");
        let _ = writeln!(
            out,
            "  certificates:\n    - {{ cert: \"{0}/tls/dev.crt\", key: \"{0}/tls/dev.key\" }}",
            dir.display()
        );
        let _ = writeln!(
            out,
            "accounts:\n  source: file\n  path: \"{}\"",
            opts.accounts.display()
        );
        let _ = writeln!(
            out,
            "routing:\n  consumer_domains: [skydesk.jp]\n  default_domain: skydesk.jp\n  consumer_pool: imap\n  organisation_pool: imappro"
        );
        if !opts.domain_pools.is_empty() {
            let _ = writeln!(
                out,
                "  domain_pools: {{ {} }}",
                opts.domain_pools.join(", ")
            );
        }
        let _ = writeln!(out, "pools:");
        pool_yaml(&mut out, "imap", &opts.imap, &opts.smtp_login, &opts.health);
        pool_yaml(
            &mut out,
            "imappro",
            &opts.imappro,
            &opts.smtp_login,
            &opts.health,
        );
        for (name, pool) in &opts.extra_pools {
            pool_yaml(&mut out, name, pool, &opts.smtp_login, &opts.health);
        }
        let _ = writeln!(out, "limits:");
        for line in &opts.limits {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(out, "shutdown:\n  drain_timeout: {}", opts.drain_timeout);
        let _ = writeln!(out, "messages:");
        for line in &opts.messages {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(out, "metrics:\n  address: \"127.0.0.1:0\"");
        out
    }

    /// Writes the config for `opts` over the running one (a `SIGHUP` then reads it). The
    /// listeners follow `opts` as at start: they do not reload.
    pub fn rewrite_config(&self, opts: &MailgateOpts) {
        let path = self.dir.path().join("mailgate.yaml");
        std::fs::write(&path, Self::config(self.dir.path(), opts))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// The bound address of listener `name` (`imaps`, `imap`, `submissions`, `submission`).
    #[track_caller]
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", self.addrs))
    }

    /// The bound address of the metrics endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[track_caller]
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", self.log()))
    }

    /// The value of the sample whose line starts with `series` (name and labels, e.g.
    /// `mailgate_config_reloads_total{result="ok"}`), read from `/metrics` with curl.
    ///
    /// # Panics
    /// When there is no such sample.
    #[track_caller]
    pub fn metric(&self, series: &str) -> u64 {
        let url = format!("http://{}/metrics", self.metrics_addr());
        let out = super::run_cmd("curl", &["-sS", &url], Duration::from_secs(30));
        let prefix = format!("{series} ");
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{}", out.stdout))
    }

    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }

    /// The development certificate mailgate made (PEM), for clients that verify.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("tls/dev.crt")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything mailgate logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls the log for `needle`; returns the log.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        super::wait_for_text("mailgate's log", needle, timeout, || self.log())
    }

    /// Sends a signal (`"TERM"`, `"INT"`) to the process.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mailgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `address=ADDR` from the `metrics listening` line.
fn parse_metrics_listening(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("metrics listening"))
        .find_map(|line| {
            line.split_ascii_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .and_then(|v| v.trim_matches('"').parse().ok())
        })
}

/// `listener=NAME ... address=ADDR` from each `listening` line.
fn parse_listening(log: &str) -> HashMap<String, SocketAddr> {
    log.lines()
        .filter(|l| l.contains("listening"))
        .filter_map(|line| {
            let field = |key: &str| {
                line.split_ascii_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(|v| v.trim_matches('"').to_string())
            };
            let name = field("listener=")?;
            let addr = field("address=")?.parse().ok()?;
            Some((name, addr))
        })
        .collect()
}

/// Writes `password` as an operator's secret file holds it (one line) to `path`.
pub fn write_password_file(path: &Path, password: &str) {
    std::fs::write(path, format!("{password}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
