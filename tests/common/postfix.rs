//! A private Postfix 3.7 for one test: one submission `smtpd` on a free loopback port that
//! trusts `XCLIENT` from loopback, delivering over LMTP to a Dovecot; stopped on drop. With
//! [`PostfixOpts::dovecot_sasl`] it takes `AUTH` and has a Dovecot's auth service judge it. With
//! [`PostfixOpts::with_tls`] it offers STARTTLS there and runs a second `smtpd` with implicit
//! TLS (`smtpd_tls_wrappermode`, logging as `postfix/submissions`).
//!
//! Several instances run side by side without `multi_instance_*`: each has its own
//! `config_directory`, `queue_directory` (which holds `pid/master.pid` and the `public/`,
//! `private/` sockets) and `data_directory`, and root may start Postfix with any `-c` directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::dovecot::ServerTls;
use super::{
    free_ports, lookup_ids, process_alive, read_lossy, run_cmd, signal, start_with_retry,
    wait_for_greeting, wait_process_gone, StartFailure, START_TIMEOUT,
};

/// How long `postfix start` may take (it runs its integrity checks first).
const POSTFIX_CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping Postfix gets before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a [`Postfix`] is started with.
#[derive(Debug, Clone)]
pub struct PostfixOpts {
    /// Where mail for `domains` goes (`virtual_transport = lmtp:inet:…`); `None` discards it.
    pub lmtp: Option<SocketAddr>,
    /// `virtual_mailbox_domains`: the domains delivered over LMTP.
    pub domains: Vec<String>,
    /// `message_size_limit` in bytes.
    pub message_size_limit: u64,
    /// `myhostname`: the name in the greeting and in `Received: … by NAME`.
    pub myhostname: String,
    /// Per-domain LMTP destinations (`transport_maps`), over `lmtp` for these domains: the
    /// demo delivers each pool's domains to that pool's Dovecot.
    pub routes: Vec<(String, SocketAddr)>,
    /// A fixed submission port instead of a free one (the demo).
    pub port: Option<u16>,
    /// Serve TLS with this certificate: STARTTLS on the submission port
    /// (`smtpd_tls_security_level = may`) and implicit TLS on `submissions_addr`.
    pub tls: Option<ServerTls>,
    /// Authenticate `AUTH` against a Dovecot auth service at this address
    /// (`smtpd_sasl_type = dovecot`, `smtpd_sasl_path = inet:ADDR`); without it SASL is
    /// `cyrus` with no mechanisms, there only so that `XCLIENT LOGIN=` counts.
    pub dovecot_sasl: Option<SocketAddr>,
    /// Further `main.cf` lines, after the generated ones (a later setting wins).
    pub main_cf: Vec<String>,
}

impl Default for PostfixOpts {
    fn default() -> Self {
        Self {
            lmtp: None,
            domains: vec!["example.com".to_owned()],
            message_size_limit: 30 * 1024 * 1024,
            myhostname: "mx.mailgate.test".to_owned(),
            routes: Vec::new(),
            port: None,
            tls: None,
            dovecot_sasl: None,
            main_cf: Vec::new(),
        }
    }
}

impl PostfixOpts {
    /// Delivers mail for `domains` to the Dovecot LMTP listener at `lmtp`.
    pub fn delivering_to(mut self, lmtp: SocketAddr, domains: &[&str]) -> Self {
        self.lmtp = Some(lmtp);
        self.domains = domains.iter().map(|d| (*d).to_owned()).collect();
        self
    }

    /// Delivers mail for `domain` to the LMTP listener at `lmtp` (adds it to the domains).
    pub fn route(mut self, domain: &str, lmtp: SocketAddr) -> Self {
        if !self.domains.iter().any(|d| d == domain) {
            self.domains.push(domain.to_owned());
        }
        self.routes.push((domain.to_owned(), lmtp));
        self
    }

    pub fn message_size_limit(mut self, bytes: u64) -> Self {
        self.message_size_limit = bytes;
        self
    }

    pub fn myhostname(mut self, name: &str) -> Self {
        self.myhostname = name.to_owned();
        self
    }

    /// Takes `AUTH` from clients (mailgate's `smtp_login: master` / `passthrough`) and has the
    /// Dovecot auth service at `sasl` judge it ([`super::Dovecot::sasl_addr`]).
    pub fn dovecot_sasl(mut self, sasl: SocketAddr) -> Self {
        self.dovecot_sasl = Some(sasl);
        self
    }

    /// Adds a `main.cf` line such as `smtpd_tls_auth_only = yes`.
    pub fn main_cf(mut self, line: &str) -> Self {
        self.main_cf.push(line.to_owned());
        self
    }

    /// Serves TLS with `tls`: STARTTLS on the submission port, implicit TLS on
    /// `submissions_addr`.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// A running Postfix. Dropping it stops the daemon and removes its files.
pub struct Postfix {
    config_dir: PathBuf,
    queue_dir: PathBuf,
    log_path: PathBuf,
    submission_addr: SocketAddr,
    /// The implicit-TLS `smtpd`, only with a certificate.
    submissions_addr: Option<SocketAddr>,
    /// The master daemon, once it has written its pid file; `None` after `stop`.
    master_pid: Option<u32>,
    // Last: removed only after the daemon has stopped (fields drop after `Drop::drop`).
    dir: TempDir,
}

impl Postfix {
    /// Starts a Postfix and waits until its submission port greets (at most [`START_TIMEOUT`]
    /// after `postfix start` returns).
    ///
    /// # Panics
    ///
    /// When it does not come up; the message carries its log.
    pub fn start(opts: PostfixOpts) -> Postfix {
        let (postfix_uid, postfix_gid) = lookup_ids("postfix")
            .unwrap_or_else(|| panic!("no user postfix: run scripts/install-deps"));
        start_with_retry("Postfix", || {
            Self::try_start(&opts, postfix_uid, postfix_gid)
        })
    }

    fn try_start(opts: &PostfixOpts, uid: u32, gid: u32) -> Result<Postfix, StartFailure> {
        let dir = super::daemon_tempdir("postfix");
        let root = dir.path().to_path_buf();
        let config_dir = root.join("etc");
        let queue_dir = root.join("queue");
        let data_dir = root.join("data");
        for d in [&config_dir, &queue_dir, &data_dir] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", data_dir.display()));

        let ports = free_ports(2);
        let port = opts
            .port
            .unwrap_or_else(|| ports.first().copied().unwrap_or_default());
        let submission_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let submissions_addr = opts
            .tls
            .as_ref()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], ports.get(1).copied().unwrap_or_default())));
        let log_path = root.join("postfix.log");
        write_file(
            &config_dir.join("main.cf"),
            &main_cf(opts, &root, &queue_dir, &data_dir, &log_path),
        );
        write_file(
            &config_dir.join("master.cf"),
            &master_cf(submission_addr, submissions_addr),
        );

        let mut postfix = Postfix {
            config_dir,
            queue_dir,
            log_path,
            submission_addr,
            submissions_addr,
            master_pid: None,
            dir,
        };
        // On failure `postfix` drops here, which stops whatever did start.
        let out = postfix.command("start");
        postfix.master_pid = postfix.read_master_pid();
        if !out.success() {
            return Err(StartFailure::new(format!(
                "postfix start failed:\n{out}\n--- log ---\n{}",
                postfix.log()
            )));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        if let Err(e) = wait_for_greeting(submission_addr, "220 ", deadline) {
            return Err(StartFailure::new(format!(
                "{e}\n--- log ---\n{}",
                postfix.log()
            )));
        }
        Ok(postfix)
    }

    /// The submission listener (`smtpd`, plaintext, trusts `XCLIENT` from loopback).
    pub fn submission_addr(&self) -> SocketAddr {
        self.submission_addr
    }

    /// The implicit-TLS `smtpd` (`smtpd_tls_wrappermode = yes`).
    ///
    /// # Panics
    ///
    /// When started without [`PostfixOpts::with_tls`].
    pub fn submissions_addr(&self) -> SocketAddr {
        self.submissions_addr
            .unwrap_or_else(|| panic!("this Postfix was started without tls"))
    }

    /// The `config_directory`, for `postfix -c` / `postqueue -c` in a test.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The temp dir holding config, queue and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log so far (`maillog_file`).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Polls the log until it contains `needle`; returns the first line that does.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let log = super::wait_for_text("Postfix log", needle, timeout, || self.log());
        super::line_with(&log, needle)
    }

    /// Stops the daemon (idempotent): `postfix stop`, then `postfix abort` and a kill if the
    /// master lingers. The log stays readable until the handle drops.
    pub fn stop(&mut self) {
        let Some(pid) = self.master_pid.take().or_else(|| self.read_master_pid()) else {
            return;
        };
        if !process_alive(pid) {
            return;
        }
        self.command("stop");
        if wait_process_gone(pid, STOP_TIMEOUT) {
            return;
        }
        self.command("abort");
        if !wait_process_gone(pid, STOP_TIMEOUT) {
            signal(pid, "KILL");
        }
    }

    fn command(&self, verb: &str) -> super::Output {
        let conf = self.config_dir.to_string_lossy().into_owned();
        run_cmd("postfix", &["-c", &conf, verb], POSTFIX_CMD_TIMEOUT)
    }

    fn read_master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.queue_dir.join("pid").join("master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

fn main_cf(
    opts: &PostfixOpts,
    root: &Path,
    queue_dir: &Path,
    data_dir: &Path,
    log_path: &Path,
) -> String {
    let transport = match opts.lmtp {
        Some(addr) => format!("lmtp:inet:{}:{}", addr.ip(), addr.port()),
        None => "discard:".to_owned(),
    };
    format!(
        r#"# Generated by tests/common/postfix.rs
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
# No syslog here: postlogd writes this file, which must lie under a listed prefix.
maillog_file = {log}
maillog_file_prefixes = {root}
myhostname = {myhostname}
mydestination =
mynetworks = 127.0.0.0/8
inet_protocols = ipv4
inet_interfaces = 127.0.0.1
alias_maps =
alias_database =
biff = no
smtpd_authorized_xclient_hosts = 127.0.0.0/8
# SASL on, so that XCLIENT LOGIN= makes the session authenticated (and, with Dovecot's auth
# service, so that AUTH is judged there).
smtpd_sasl_auth_enable = yes
{sasl}
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_sasl_authenticated, reject
message_size_limit = {size}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
virtual_mailbox_domains = {domains}
virtual_transport = {transport}
{transport_maps}
{tls}
{extra}
"#,
        queue = queue_dir.display(),
        data = data_dir.display(),
        log = log_path.display(),
        root = root.display(),
        myhostname = opts.myhostname,
        size = opts.message_size_limit,
        domains = opts.domains.join(", "),
        extra = opts.main_cf.join("\n"),
        sasl = match opts.dovecot_sasl {
            Some(addr) => format!(
                "smtpd_sasl_type = dovecot\nsmtpd_sasl_path = inet:{}:{}",
                addr.ip(),
                addr.port()
            ),
            None => "smtpd_sasl_type = cyrus".to_owned(),
        },
        tls = match &opts.tls {
            Some(tls) => format!(
                "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\n\
                 smtpd_tls_loglevel = 1\nsmtpd_tls_received_header = yes",
                tls.cert.display(),
                tls.key.display()
            ),
            None => String::new(),
        },
        transport_maps = if opts.routes.is_empty() {
            String::new()
        } else {
            let routes: Vec<String> = opts
                .routes
                .iter()
                .map(|(domain, lmtp)| format!("{domain}=lmtp:inet:{}:{}", lmtp.ip(), lmtp.port()))
                .collect();
            format!("transport_maps = inline:{{ {} }}", routes.join(", "))
        },
    )
}

/// The services a submission-to-LMTP Postfix needs, none chrooted (the temp dir has no chroot
/// skeleton), plus `postlog` for `maillog_file`.
fn master_cf(submission: SocketAddr, submissions: Option<SocketAddr>) -> String {
    let submissions = match submissions {
        Some(addr) => format!(
            "{addr} inet n - n - - smtpd\n  -o syslog_name=postfix/submissions\n  \
             -o smtpd_tls_wrappermode=yes\n  -o smtpd_tls_security_level=encrypt\n"
        ),
        None => String::new(),
    };
    format!(
        r#"# Generated by tests/common/postfix.rs
{submission} inet n - n - - smtpd
{submissions}pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
proxywrite unix  - - n -  1 proxymap
smtp       unix  - - n -  - smtp
relay      unix  - - n -  - smtp
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
lmtp       unix  - - n -  - lmtp
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"#
    )
}

fn write_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
