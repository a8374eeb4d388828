//! A private Dovecot 2.3 for one test: IMAP (and optionally LMTP) on free loopback ports, all
//! state in a temp dir, stopped on drop. With [`DovecotOpts::with_tls`] it also serves TLS:
//! STARTTLS on the IMAP listener and implicit TLS on an `imaps` one. With
//! [`DovecotOpts::with_sasl`] its auth service listens on a TCP port for Postfix's Dovecot SASL
//! client; `AUTH PLAIN` there with authzid = user and the master user's credentials logs in
//! as the user, who is what Postfix then records as the authenticated sender.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    free_ports, read_lossy, run_cmd, run_cmd_stdin, signal, start_with_retry, system_user,
    unique_name, wait_for_greeting, StartFailure, MAIL_USER, START_TIMEOUT,
};

/// How long `doveadm` may take for one command.
const DOVEADM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping Dovecot gets before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a [`Dovecot`] is started with.
#[derive(Debug, Clone)]
pub struct DovecotOpts {
    /// (address, plaintext password) of each mail user; addresses are lower-cased, as Dovecot's
    /// default `auth_username_format = %Lu` looks them up.
    pub users: Vec<(String, String)>,
    /// The master user a proxy logs in as on a user's behalf (`AUTHENTICATE PLAIN` with
    /// authzid = user, or `LOGIN user*master password`).
    pub master_user: String,
    pub master_password: String,
    /// Also listen for LMTP, so a [`super::Postfix`] can deliver here.
    pub lmtp: bool,
    /// Fixed ports instead of free ones (the demo, whose config names its backends' ports).
    pub imap_port: Option<u16>,
    pub lmtp_port: Option<u16>,
    /// Serve TLS with this certificate: `ssl = yes` (STARTTLS on `imap`) and an `imaps`
    /// listener.
    pub tls: Option<ServerTls>,
    /// Open the auth service to SASL clients on a loopback TCP port (`service auth {
    /// inet_listener sasl }`), so a Postfix with `smtpd_sasl_type = dovecot` authenticates
    /// against these users and this master user.
    pub sasl: bool,
}

/// A server certificate chain and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Ask every TLS client for a certificate signed by this CA (Dovecot only; Postfix
    /// ignores it).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: let no one log in without such a certificate.
    pub client_certificate_required: bool,
}

impl ServerTls {
    /// Requires TLS clients to present a certificate that `ca` signed.
    pub fn requiring_client_certificates(mut self, ca: &Path) -> ServerTls {
        self.client_ca = Some(ca.to_path_buf());
        self.client_certificate_required = true;
        self
    }

    /// Asks TLS clients for a certificate that `ca` signed, and verifies one that comes, but
    /// logs users in without one too.
    pub fn asking_client_certificates(mut self, ca: &Path) -> ServerTls {
        self.client_ca = Some(ca.to_path_buf());
        self.client_certificate_required = false;
        self
    }
}

impl Default for DovecotOpts {
    fn default() -> Self {
        Self {
            users: Vec::new(),
            master_user: "proxy".to_owned(),
            master_password: "master-secret".to_owned(),
            lmtp: false,
            imap_port: None,
            lmtp_port: None,
            tls: None,
            sasl: false,
        }
    }
}

impl DovecotOpts {
    /// Adds a mail user.
    pub fn user(mut self, address: &str, password: &str) -> Self {
        self.users.push((address.to_owned(), password.to_owned()));
        self
    }

    /// Sets the master user and its password.
    pub fn master(mut self, user: &str, password: &str) -> Self {
        self.master_user = user.to_owned();
        self.master_password = password.to_owned();
        self
    }

    /// Listens for IMAP on `port` (e.g. the port of a Dovecot that was stopped).
    pub fn imap_port(mut self, port: u16) -> Self {
        self.imap_port = Some(port);
        self
    }

    /// Enables the LMTP listener.
    pub fn with_lmtp(mut self) -> Self {
        self.lmtp = true;
        self
    }

    /// Opens the auth service to SASL clients (Postfix) on [`Dovecot::sasl_addr`].
    pub fn with_sasl(mut self) -> Self {
        self.sasl = true;
        self
    }

    /// Serves TLS with `tls`: STARTTLS on the IMAP listener, implicit TLS on `imaps_addr`.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// A running Dovecot. Dropping it stops the daemon and removes its files.
pub struct Dovecot {
    /// The `dovecot -F` master, our child so it can always be reaped.
    child: Option<Child>,
    /// `instance_name`: every process of this Dovecot carries it in its title.
    instance: String,
    conf: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    mail_root: PathBuf,
    imap_addr: SocketAddr,
    imaps_addr: Option<SocketAddr>,
    lmtp_addr: Option<SocketAddr>,
    sasl_addr: Option<SocketAddr>,
    opts: DovecotOpts,
    // Last: removed only after the daemon has stopped (fields drop after `Drop::drop`).
    dir: TempDir,
}

impl Dovecot {
    /// Starts a Dovecot and waits until its IMAP port greets (at most [`START_TIMEOUT`]).
    ///
    /// # Panics
    ///
    /// When it does not come up; the message carries its log.
    pub fn start(opts: DovecotOpts) -> Dovecot {
        for (address, password) in &opts.users {
            check_passwd_field(address);
            check_passwd_field(password);
        }
        check_passwd_field(&opts.master_user);
        check_passwd_field(&opts.master_password);
        let (uid, gid) = system_user(MAIL_USER);
        start_with_retry("Dovecot", || Self::try_start(&opts, uid, gid))
    }

    fn try_start(opts: &DovecotOpts, uid: u32, gid: u32) -> Result<Dovecot, StartFailure> {
        let dir = super::daemon_tempdir("dovecot");
        let root = dir.path().to_path_buf();
        let mail_root = root.join("mail");
        create_dir(&mail_root);
        std::os::unix::fs::chown(&mail_root, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", mail_root.display()));

        let mut users = String::new();
        for (address, password) in &opts.users {
            let _ = writeln!(
                users,
                "{}:{{PLAIN}}{password}::::::",
                address.to_lowercase()
            );
        }
        write_file(&root.join("users"), &users);
        write_file(
            &root.join("masters"),
            &format!(
                "{}:{{PLAIN}}{}::::::\n",
                opts.master_user, opts.master_password
            ),
        );

        let ports = free_ports(4);
        let imap_addr = loopback(
            opts.imap_port
                .unwrap_or_else(|| ports.first().copied().unwrap_or_default()),
        );
        let lmtp_addr = opts.lmtp.then(|| {
            loopback(
                opts.lmtp_port
                    .unwrap_or_else(|| ports.get(1).copied().unwrap_or_default()),
            )
        });
        let imaps_addr = opts
            .tls
            .as_ref()
            .map(|_| loopback(ports.get(2).copied().unwrap_or_default()));
        let sasl_addr = opts
            .sasl
            .then(|| loopback(ports.get(3).copied().unwrap_or_default()));
        let conf = root.join("dovecot.conf");
        let instance = unique_name("dovecot");
        let listeners = Listeners {
            imap: imap_addr,
            imaps: imaps_addr,
            lmtp: lmtp_addr,
            sasl: sasl_addr,
        };
        write_file(
            &conf,
            &config(&root, &instance, uid, gid, &listeners, opts.tls.as_ref()),
        );

        let log_path = root.join("dovecot.log");
        let stderr_path = root.join("dovecot.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning dovecot (is it installed?): {e}"));

        let mut dovecot = Dovecot {
            child: Some(child),
            instance,
            conf,
            log_path,
            stderr_path,
            mail_root,
            imap_addr,
            imaps_addr,
            lmtp_addr,
            sasl_addr,
            opts: opts.clone(),
            dir,
        };
        // On failure `dovecot` drops here, which stops whatever did start.
        dovecot.wait_ready()?;
        Ok(dovecot)
    }

    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut waiting = vec![(self.imap_addr, "* OK")];
        if let Some(lmtp) = self.lmtp_addr {
            waiting.push((lmtp, "220 "));
        }
        if let Some(sasl) = self.sasl_addr {
            // The auth service's handshake starts with its protocol version.
            waiting.push((sasl, "VERSION"));
        }
        for (addr, greeting) in waiting {
            loop {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(StartFailure::new(format!(
                            "dovecot exited ({status}) before greeting\n{}",
                            self.diagnostics()
                        )));
                    }
                }
                let slice = (Instant::now() + Duration::from_millis(500)).min(deadline);
                match wait_for_greeting(addr, greeting, slice) {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(StartFailure::new(format!("{e}\n{}", self.diagnostics())))
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The plaintext IMAP listener (with STARTTLS when started [`DovecotOpts::with_tls`]).
    pub fn imap_addr(&self) -> SocketAddr {
        self.imap_addr
    }

    /// The implicit-TLS IMAP listener.
    ///
    /// # Panics
    ///
    /// When started without [`DovecotOpts::with_tls`].
    pub fn imaps_addr(&self) -> SocketAddr {
        self.imaps_addr
            .unwrap_or_else(|| panic!("this Dovecot was started without tls"))
    }

    /// The LMTP listener.
    ///
    /// # Panics
    ///
    /// When started without [`DovecotOpts::with_lmtp`].
    pub fn lmtp_addr(&self) -> SocketAddr {
        self.lmtp_addr
            .unwrap_or_else(|| panic!("this Dovecot was started without lmtp"))
    }

    /// The auth service's SASL listener (Postfix: `smtpd_sasl_path = inet:ADDR`).
    ///
    /// # Panics
    ///
    /// When started without [`DovecotOpts::with_sasl`].
    pub fn sasl_addr(&self) -> SocketAddr {
        self.sasl_addr
            .unwrap_or_else(|| panic!("this Dovecot was started without sasl"))
    }

    pub fn master_user(&self) -> &str {
        &self.opts.master_user
    }

    pub fn master_password(&self) -> &str {
        &self.opts.master_password
    }

    /// Rotates the master user's password: Dovecot's passwd-file passdb reads the file again
    /// when it changes, so the next login is checked against `password`.
    pub fn set_master_password(&mut self, password: &str) {
        check_passwd_field(password);
        // The passdb notices a change by the file's mtime, which has a one-second grain.
        std::thread::sleep(Duration::from_millis(1100));
        self.opts.master_password = password.to_owned();
        write_file(
            &self.dir.path().join("masters"),
            &format!("{}:{{PLAIN}}{password}::::::\n", self.opts.master_user),
        );
    }

    /// The configuration file, for `doveadm -c` in a test.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The temp dir holding config, log, sockets and mail.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log so far (`log_path`: logins with `rip=`, auth, LMTP deliveries).
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
        let log = super::wait_for_text("Dovecot log", needle, timeout, || self.log());
        super::line_with(&log, needle)
    }

    /// Stores `message` into `mailbox` of `user` with `doveadm save`, creating the mailbox if
    /// needed. Dovecot keeps the bytes, so an IMAP `FETCH BODY[]` returns them unchanged as long
    /// as lines end in CRLF.
    ///
    /// # Panics
    ///
    /// When `doveadm` fails.
    #[track_caller]
    pub fn deliver(&self, user: &str, mailbox: &str, message: &[u8]) {
        let conf = self.conf.to_string_lossy().into_owned();
        if !mailbox.eq_ignore_ascii_case("INBOX") {
            // Fails harmlessly when the mailbox exists.
            run_cmd(
                "doveadm",
                &["-c", &conf, "mailbox", "create", "-u", user, mailbox],
                DOVEADM_TIMEOUT,
            );
        }
        let out = run_cmd_stdin(
            "doveadm",
            &["-c", &conf, "save", "-u", user, "-m", mailbox],
            message,
            DOVEADM_TIMEOUT,
        );
        assert!(out.success(), "doveadm save failed:\n{out}\n{}", self.log());
    }

    /// The messages in `mailbox` of `user`, oldest first, read straight from the maildir.
    /// Dovecot stores lines with bare LF; compare with that in mind (or FETCH over IMAP).
    pub fn messages(&self, user: &str, mailbox: &str) -> Vec<Vec<u8>> {
        let mut maildir = self.mail_root.join(user.to_lowercase()).join("Maildir");
        if !mailbox.eq_ignore_ascii_case("INBOX") {
            maildir = maildir.join(format!(".{mailbox}"));
        }
        // Maildir file names start with the delivery time in seconds, then a unique part; the
        // modification time orders deliveries within one second.
        let mut files: Vec<(std::time::SystemTime, String, PathBuf)> = ["new", "cur"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(maildir.join(sub)).ok())
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| {
                let modified = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let name = entry.file_name().to_string_lossy().into_owned();
                (modified, name, entry.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, _, path)| std::fs::read(path).ok())
            .collect()
    }

    /// Polls until `mailbox` of `user` holds at least `count` messages; returns them all.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log.
    #[track_caller]
    pub fn wait_for_messages(
        &self,
        user: &str,
        mailbox: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages(user, mailbox);
            if messages.len() >= count {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "{user}'s {mailbox} has {} of {count} messages after {timeout:?}:\n{}",
                messages.len(),
                self.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the daemon (idempotent): SIGTERM to the master, then a kill if it lingers. The log stays
    /// readable until the handle drops.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // What `doveadm stop` does, without its one-second polling.
            signal(child.id(), "TERM");
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
        // A session process (`dovecot-<instance>/imap`) outlives its master: end them too, so
        // a stopped backend is really gone and nothing is left behind.
        let pattern = format!("dovecot-{}/", self.instance);
        let _ = run_cmd("pkill", &["-KILL", "-f", &pattern], Duration::from_secs(5));
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- {} ---\n{}\n--- dovecot stderr ---\n{}",
            self.log_path.display(),
            self.log(),
            read_lossy(&self.stderr_path)
        )
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a Dovecot listens.
struct Listeners {
    imap: SocketAddr,
    /// Implicit TLS, only with a certificate.
    imaps: Option<SocketAddr>,
    lmtp: Option<SocketAddr>,
    /// The auth service for SASL clients.
    sasl: Option<SocketAddr>,
}

fn config(
    root: &Path,
    name: &str,
    uid: u32,
    gid: u32,
    listeners: &Listeners,
    tls: Option<&ServerTls>,
) -> String {
    let root = root.display();
    let imap = listeners.imap;
    let lmtp = listeners.lmtp;
    let protocols = if lmtp.is_some() { "imap lmtp" } else { "imap" };
    let ssl = match tls {
        Some(tls) => {
            let mut ssl = format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}",
                tls.cert.display(),
                tls.key.display()
            );
            if let Some(ca) = &tls.client_ca {
                // No CRL in the test CA: do not ask for one.
                let _ = write!(
                    ssl,
                    "\nssl_ca = <{}\nssl_verify_client_cert = yes\nssl_require_crl = no\n\
                     auth_ssl_require_client_cert = {}",
                    ca.display(),
                    if tls.client_certificate_required {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
            ssl
        }
        None => "ssl = no".to_owned(),
    };
    let imaps = match listeners.imaps {
        Some(addr) => format!(
            "  inet_listener imaps {{\n    address = {}\n    port = {}\n    ssl = yes\n  }}",
            addr.ip(),
            addr.port()
        ),
        None => "  inet_listener imaps {\n    port = 0\n  }".to_owned(),
    };
    let lmtp_service = match lmtp {
        Some(addr) => format!(
            "service lmtp {{\n  inet_listener lmtp {{\n    address = {}\n    port = {}\n  }}\n}}\n",
            addr.ip(),
            addr.port()
        ),
        None => String::new(),
    };
    let sasl_service = match listeners.sasl {
        Some(addr) => format!(
            "service auth {{\n  inet_listener sasl {{\n    address = {}\n    port = {}\n  }}\n}}\n",
            addr.ip(),
            addr.port()
        ),
        None => String::new(),
    };
    format!(
        r#"# Generated by tests/common/dovecot.rs
instance_name = {name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
listen = 127.0.0.1
protocols = {protocols}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Refused logins answer at once (default 2 s): tests of refusals stay fast.
auth_failure_delay = 0
auth_master_user_separator = *
login_trusted_networks = 127.0.0.0/8 ::1
# Every ID field a login got, in the log: tests see what mailgate forwarded.
imap_id_log = *
mail_max_userip_connections = 100000
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
# Many concurrent sessions in load tests; the fd limit here is 20000 per process.
default_process_limit = 2000
default_client_limit = 4000
# The master passdb first: it only answers logins that name a master user.
passdb {{
  driver = passwd-file
  args = {root}/masters
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%Lu
}}
service anvil {{
  client_limit = 5000
}}
# High-performance login mode: a few long-lived login processes, no fork per connection.
service imap-login {{
  service_count = 0
  process_min_avail = 2
  inet_listener imap {{
    address = {imap_ip}
    port = {imap_port}
  }}
{imaps}
}}
{lmtp_service}{sasl_service}"#,
        imap_ip = imap.ip(),
        imap_port = imap.port(),
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// passwd-file fields cannot hold ':' or line breaks.
fn check_passwd_field(field: &str) {
    assert!(
        !field.contains([':', '\n', '\r']),
        "{field:?}: Dovecot passwd-file fields cannot contain ':' or line breaks"
    );
}

fn create_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

fn write_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
