//! The processes of a bench run: the Dovecot backend, mailgate, nginx's mail proxy and the
//! auth_http responder. Each is started from a config written into the run's work dir, in its
//! own process group (a Ctrl-C at the terminal reaches only us, and we stop them in order), with
//! its pid in `WORK/pids/NAME.pid` so `scripts/bench`'s trap can stop it should we die. A
//! [`Daemon`] stops its process tree when dropped.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::authhttp::Check;
use crate::procfs;

/// How long a stopping process gets before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where nginx keeps the mail module on Debian (`libnginx-mod-mail`).
const NGINX_MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";

/// The Dovecot master user mailgate logs in as.
pub const MASTER_USER: &str = "proxy";
pub const MASTER_PASSWORD: &str = "bench-master-secret";

/// Everything the configs need, fixed for one run.
#[derive(Debug, Clone)]
pub struct Env {
    /// The run's work dir (configs, logs, sockets, pid files).
    pub work: PathBuf,
    /// Dovecot's passwd-file of the bench users.
    pub passwd_file: PathBuf,
    /// mailgate's account file of the same users.
    pub accounts_file: PathBuf,
    /// The maildirs (`MAIL_ROOT/<address>/Maildir`), owned by the mail user.
    pub mail_root: PathBuf,
    pub mail_uid: u32,
    pub mail_gid: u32,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub mailgate_bin: PathBuf,
    /// The second mailgate build of an A/B run (`--mailgate-b`).
    pub mailgate_b_bin: Option<PathBuf>,
    pub self_bin: PathBuf,
    /// mailgate's worker threads (`TOKIO_WORKER_THREADS`).
    pub tokio_workers: usize,
    /// nginx's `worker_processes` (`auto` = one per core).
    pub nginx_workers: String,
    /// Dovecot's long-lived imap-login processes (high-performance mode).
    pub dovecot_login_processes: usize,
    /// What nginx's auth_http responder checks.
    pub auth_check: Check,
    pub ports: Ports,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub dovecot_plain: u16,
    pub dovecot_tls: u16,
    pub mailgate: u16,
    pub mailgate_b: u16,
    pub nginx: u16,
    pub auth_http: u16,
}

impl Ports {
    /// Six free loopback ports (held together while picked, so all differ).
    pub fn pick() -> Result<Ports> {
        let listeners = (0..6)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("picking free ports")?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let [dovecot_plain, dovecot_tls, mailgate, mailgate_b, nginx, auth_http] = ports[..] else {
            bail!("picking free ports: got {ports:?}");
        };
        Ok(Ports {
            dovecot_plain,
            dovecot_tls,
            mailgate,
            mailgate_b,
            nginx,
            auth_http,
        })
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A started process; stopped (with its descendants) on drop.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` in its own process group, stdout and stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, work: &Path, log: &Path) -> Result<Daemon> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        let pids = work.join("pids");
        std::fs::create_dir_all(&pids)?;
        let pidfile = pids.join(format!("{name}.pid"));
        std::fs::write(&pidfile, format!("{}\n", child.id()))?;
        Ok(Daemon {
            name: name.to_owned(),
            child: Some(child),
            pidfile,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `Some(description with the log's tail)` when the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!(
            "{} exited ({status}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 20)
        ))
    }

    /// SIGTERM to the process, SIGKILL after [`STOP_TIMEOUT`]; then SIGKILL to whatever of its
    /// descendants outlived it (Dovecot's session processes can). Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let descendants: Vec<u32> = procfs::tree(pid).into_iter().skip(1).collect();
        if matches!(child.try_wait(), Ok(None)) {
            signal(pid, "TERM");
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(2);
        while descendants.iter().any(|&p| procfs::alive(p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        for p in descendants.into_iter().filter(|&p| procfs::alive(p)) {
            signal(p, "KILL");
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The Dovecot backend: plaintext IMAP for the proxies (master user, trusted network) and an
/// implicit-TLS listener with the bench certificate for the direct target.
pub fn start_dovecot(env: &Env) -> Result<Daemon> {
    let dir = env.work.join("dovecot");
    let conf = dir.join("dovecot.conf");
    write(
        &dir.join("masters"),
        &format!("{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}::::::\n"),
    )?;
    write(&conf, &dovecot_conf(env, &dir))?;
    let mut cmd = Command::new("dovecot");
    cmd.arg("-F").arg("-c").arg(&conf);
    Daemon::spawn("dovecot", cmd, &env.work, &dir.join("dovecot.stderr"))
}

fn dovecot_conf(env: &Env, dir: &Path) -> String {
    let root = dir.display();
    let uid = env.mail_uid;
    let gid = env.mail_gid;
    format!(
        r#"# Generated by mailgate-bench
instance_name = mgbench-{pid}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
listen = 127.0.0.1
protocols = imap
# TLS only on the imaps listener below (the direct target); the proxies use plaintext on
# loopback, which login_trusted_networks lets log in.
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
ssl_prefer_server_ciphers = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
login_trusted_networks = 127.0.0.0/8
mail_max_userip_connections = 100000
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
# One imap process per session, thousands of idle sessions; 20,000 open files per process.
default_process_limit = 100
default_client_limit = 12000
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = {root}/masters
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%Lu
}}
# High-performance login mode: long-lived login processes, no fork per connection.
service imap-login {{
  service_count = 0
  process_min_avail = {logins}
  process_limit = {logins}
  client_limit = 6000
  inet_listener imap {{
    address = 127.0.0.1
    port = {plain}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls}
    ssl = yes
  }}
}}
service imap {{
  process_limit = 12000
}}
"#,
        pid = std::process::id(),
        cert = env.cert.display(),
        key = env.key.display(),
        passwd = env.passwd_file.display(),
        mail = env.mail_root.display(),
        logins = env.dovecot_login_processes,
        plain = env.ports.dovecot_plain,
        tls = env.ports.dovecot_tls,
    )
}

/// Which of the two mailgate builds of an A/B run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// `--mailgate` (or the one next to mailgate-bench).
    A,
    /// `--mailgate-b`.
    B,
}

impl Build {
    fn name(self) -> &'static str {
        match self {
            Build::A => "mailgate",
            Build::B => "mailgate-b",
        }
    }
}

/// mailgate, release build: one implicit-TLS IMAP listener, the pool on the Dovecot. Both
/// builds of an A/B run get the same config, on ports of their own.
pub fn start_mailgate(env: &Env, build: Build) -> Result<Daemon> {
    let (bin, port) = match build {
        Build::A => (&env.mailgate_bin, env.ports.mailgate),
        Build::B => match &env.mailgate_b_bin {
            Some(bin) => (bin, env.ports.mailgate_b),
            None => bail!("target mailgate-b needs --mailgate-b PATH"),
        },
    };
    let name = build.name();
    let dir = env.work.join(name);
    let conf = dir.join("mailgate.yaml");
    write(&conf, &mailgate_conf(env, port))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&conf)
        .env("TOKIO_WORKER_THREADS", env.tokio_workers.to_string())
        .env_remove("RUST_LOG");
    Daemon::spawn(name, cmd, &env.work, &dir.join("mailgate.log"))
}

pub fn mailgate_conf(env: &Env, port: u16) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Generated by mailgate-bench");
    let _ = writeln!(out, "listeners:");
    let _ = writeln!(
        out,
        "  - {{ name: imaps, protocol: imap, address: \"127.0.0.1:{port}\", tls: implicit }}"
    );
    let _ = writeln!(out, "tls:\n  certificates:");
    let _ = writeln!(
        out,
        "    - {{ cert: \"{}\", key: \"{}\" }}",
        env.cert.display(),
        env.key.display()
    );
    let _ = writeln!(
        out,
        "accounts:\n  source: file\n  path: \"{}\"",
        env.accounts_file.display()
    );
    let _ = writeln!(
        out,
        "routing:\n  consumer_domains: [skydesk.jp]\n  default_domain: skydesk.jp\n  consumer_pool: imap\n  organisation_pool: imap"
    );
    let _ = writeln!(out, "pools:\n  imap:");
    let _ = writeln!(out, "    imap: [\"127.0.0.1:{}\"]", env.ports.dovecot_plain);
    let _ = writeln!(out, "    smtp: []\n    backend_tls: none");
    let _ = writeln!(
        out,
        "    login: {{ mode: master, user: \"{MASTER_USER}\", password: \"{MASTER_PASSWORD}\" }}"
    );
    let _ = writeln!(out, "    smtp_login: xclient");
    let _ = writeln!(
        out,
        "    health: {{ interval: 5s, timeout: 2s, fall: 2, rise: 2 }}"
    );
    // One client address opens thousands of sessions of few users: the per-IP and per-user
    // caps are raised, everything else keeps its default.
    let _ = writeln!(
        out,
        "limits:\n  max_connections: 50000\n  max_connections_per_ip: 20000\n  max_sessions_per_user_ip: 20000\n  trusted_networks: [\"127.0.0.0/8\"]"
    );
    let _ = writeln!(out, "shutdown:\n  drain_timeout: 1s");
    out
}

/// nginx's mail proxy: implicit TLS, `proxy on`, logins checked by our auth_http responder.
pub fn start_nginx(env: &Env) -> Result<Daemon> {
    let dir = env.work.join("nginx");
    let conf = dir.join("nginx.conf");
    write(&conf, &nginx_conf(env, &dir))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    Daemon::spawn("nginx", cmd, &env.work, &dir.join("nginx.stderr"))
}

fn nginx_conf(env: &Env, dir: &Path) -> String {
    format!(
        r#"# Generated by mailgate-bench
load_module {NGINX_MAIL_MODULE};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{
    worker_connections 10000;
}}
mail {{
    server_name imap.skydesk.jp;
    auth_http 127.0.0.1:{auth}/auth;
    proxy_pass_error_message on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    imap_capabilities IMAP4rev1 LITERAL+ SASL-IR ID IDLE;
    server {{
        listen 127.0.0.1:{port} ssl;
        protocol imap;
        proxy on;
    }}
}}
"#,
        workers = env.nginx_workers,
        dir = dir.display(),
        auth = env.ports.auth_http,
        cert = env.cert.display(),
        key = env.key.display(),
        port = env.ports.nginx,
    )
}

/// Our auth_http responder for nginx (`mailgate-bench auth-http`).
pub fn start_auth_http(env: &Env) -> Result<Daemon> {
    let dir = env.work.join("auth-http");
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(&env.self_bin);
    cmd.arg("auth-http")
        .arg("--listen")
        .arg(loopback(env.ports.auth_http).to_string())
        .arg("--backend")
        .arg(loopback(env.ports.dovecot_plain).to_string())
        .arg("--accounts")
        .arg(&env.accounts_file)
        .arg("--check")
        .arg(env.auth_check.name());
    Daemon::spawn("auth-http", cmd, &env.work, &dir.join("auth-http.log"))
}
