//! Real-backend test harness shared by the integration tests (`mod common;`).
//!
//! # Layout
//!
//! - [`dovecot`]: a private Dovecot 2.3 (IMAP, optional LMTP, optional auth service on a TCP
//!   port for Postfix's SASL) in a temp dir, with plaintext users, a master user and
//!   `login_trusted_networks` so a proxy may forward the client address.
//! - [`postfix`]: a private Postfix 3.7 with one submission listener that trusts `XCLIENT` from
//!   loopback and counts `XCLIENT LOGIN=` as authenticated, delivering to a Dovecot over LMTP;
//!   optionally judging `AUTH` through that Dovecot's auth service (`smtpd_sasl_type = dovecot`).
//! - [`clients`]: run Python `imaplib`/`smtplib` scripts and command-line clients (`curl`,
//!   `swaks`, `mbsync`) with a deadline, killing them when it passes, and drive TLS command-line
//!   clients (`tstclnt`, `gnutls-cli`) a step at a time.
//!
//! Everything here is blocking and bounded in time. From a `#[tokio::test]` on the default
//! current-thread runtime, use the `*_async` client helpers while the proxy runs on that
//! runtime: they move the blocking wait to `spawn_blocking`, so the proxy keeps being polled.
//! Daemons stop when their handle drops, including while a failing test unwinds.
//!
//! Runs as root (the CI machines do): the daemons are started directly and a system user
//! ([`MAIL_USER`]) is created on first use to own the maildirs. `scripts/install-deps` installs
//! the programs. Dovecot takes about a second to stop (its log process lingers to flush).
//!
//! This module is compiled into every test crate that declares `mod common;`, and each uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod clients;
pub mod dovecot;
pub mod mail;
pub mod mailgate;
pub mod postfix;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

// Not every test crate uses every helper.
#[allow(unused_imports)]
pub use clients::{
    gnutls_cli, nss_db, run_cmd, run_cmd_async, run_cmd_stdin, run_mbsync, run_python,
    run_python_args, run_python_async, tstclnt, Interactive, Launch, Output, TlsVersion,
};
#[allow(unused_imports)]
pub use dovecot::{Dovecot, DovecotOpts};
#[allow(unused_imports)]
pub use postfix::{Postfix, PostfixOpts};

/// How long a daemon may take to answer its first greeting before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a start is retried when a port picked as free was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

/// The system user that owns test maildirs (Dovecot's `mail_uid`).
pub const MAIL_USER: &str = "mailgate-test";

/// Polls `read` (a daemon's log) until it contains `needle`; returns the whole text then.
///
/// # Panics
///
/// After `timeout`, naming `what` and showing the text.
#[track_caller]
pub fn wait_for_text(
    what: &str,
    needle: &str,
    timeout: Duration,
    read: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what} has no {needle:?} after {timeout:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The value after `key=` on the line of `out` (a client script's output) that starts with
/// `key=`.
///
/// # Panics
/// When no line does.
#[track_caller]
pub fn field<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    out.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

/// The number of seconds that [`field`] `key` starts with (`key=5.2 read=''`).
///
/// # Panics
/// When there is no such field, or it does not start with a number (`never`).
#[track_caller]
pub fn seconds(out: &str, key: &str) -> f64 {
    let value = field(out, key);
    value
        .split_whitespace()
        .next()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("{key}: `{value}` is not a number of seconds:\n{out}"))
}

/// A Python function for client scripts: `keepalive_timers(pid, client_port, backend_port)`
/// prints `client=KIND SECONDS` and `backend=KIND SECONDS` for process `pid`'s established
/// connections whose local port is `client_port` (a client's leg) or whose peer port is
/// `backend_port` (a backend's), from `ss`: the kind of the socket's timer (`keepalive` when
/// only the keepalive clock runs) and the seconds left on it; `SIDE=none LINE` when it has none.
pub const PY_KEEPALIVE_TIMERS: &str = r#"
import re, subprocess
def keepalive_timers(pid, client_port, backend_port):
    ss = subprocess.run(["ss", "-tnpoH", "state", "established"], capture_output=True, text=True, timeout=10).stdout
    for l in ss.splitlines():
        if "pid=%d," % pid not in l:
            continue
        local, peer = l.split()[2], l.split()[3]
        side = "client" if local.endswith(":%d" % client_port) else "backend" if peer.endswith(":%d" % backend_port) else None
        if side:
            # ss writes the time left as `1min59sec`, `6sec`, `6.692ms` (6 s 692 ms) or `692ms`.
            timer = re.search(r"timer:\((\w+),(?:(\d+)min)?(?:(\d+)(?:sec|\.))?(?:(\d+)ms)?", l)
            if timer:
                kind, minutes, secs, ms = timer.groups()
                left = int(minutes or 0) * 60 + int(secs or 0) + int(ms or 0) / 1000
                print("%s=%s %.1f" % (side, kind, left))
            else:
                print("%s=none %s" % (side, l))
"#;

/// The seconds left on the `keepalive` timer that [`PY_KEEPALIVE_TIMERS`] printed for `side`.
///
/// # Panics
/// When it printed none for `side`, or another kind of timer.
#[track_caller]
pub fn keepalive_left(out: &str, side: &str) -> f64 {
    field(out, side)
        .strip_prefix("keepalive ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{side}: no keepalive timer: {out}"))
}

/// The first line of `text` that contains `needle` (empty when none does).
pub fn line_with(text: &str, needle: &str) -> String {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default()
        .to_owned()
}

/// Picks `n` distinct free loopback ports.
///
/// All `n` listeners are held until every port is known, so one call never returns the same port
/// twice; they are released on return, so another process may take one before the daemon binds
/// it (the starters retry on `Address already in use`).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("local_addr of a bound listener: {e}"))
                .port()
        })
        .collect()
}

/// A name no other harness instance (in this or a concurrent test process) uses.
pub(crate) fn unique_name(kind: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("mgtest-{kind}-{}-{n}", std::process::id())
}

/// Creates a temp dir that the daemons' unprivileged processes (dovenull, postfix, the mail
/// user) can traverse: `tempfile` makes it 0700, which would lock them out of their sockets.
pub(crate) fn daemon_tempdir(kind: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(&format!("mgtest-{kind}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a temp dir for {kind}: {e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", dir.path().display()));
    dir
}

/// The uid and gid of a system user, created (`useradd --system`) if it does not exist yet.
pub(crate) fn system_user(name: &str) -> (u32, u32) {
    // One creation at a time within this process; across processes `useradd` exits 9 ("already
    // exists") for the loser of the race, which is fine.
    static CREATE: Mutex<()> = Mutex::new(());
    let _guard = CREATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(ids) = lookup_ids(name) {
        return ids;
    }
    let out = run_cmd(
        "useradd",
        &[
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        Duration::from_secs(10),
    );
    lookup_ids(name).unwrap_or_else(|| panic!("creating system user {name} failed:\n{out}"))
}

/// The uid and gid of an existing user.
pub(crate) fn lookup_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Reads a (log) file as text; a missing file reads as empty.
pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Connects to `addr` and reads one line, retrying until `deadline`. `Ok(line)` once a line
/// starting with `expect` arrives; `Err(last problem)` at the deadline.
pub(crate) fn wait_for_greeting(
    addr: SocketAddr,
    expect: &str,
    deadline: Instant,
) -> Result<String, String> {
    let mut last = String::from("never tried");
    while Instant::now() < deadline {
        match read_greeting(addr) {
            Ok(line) if line.starts_with(expect) => return Ok(line),
            Ok(line) => last = format!("unexpected greeting {line:?}"),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr} did not greet with {expect:?}: {last}"))
}

fn read_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Whether process `pid` still runs. A zombie counts as gone: PID 1 on these machines reaps
/// orphans late, and a zombie holds no port or file.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) state ...", where comm may contain spaces and parentheses.
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Polls until `pid` is gone or `timeout` passes; true when gone.
pub(crate) fn wait_process_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    !process_alive(pid)
}

/// Sends `signal` (e.g. "TERM", "KILL") to `pid`, ignoring failure: used on shutdown paths,
/// which must not panic.
pub(crate) fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .output();
}

/// Sends `signal` to every process of the process group `pgid`, ignoring failure.
pub(crate) fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".to_owned(), format!("-{pgid}")])
        .output();
}

/// Runs `start` up to [`START_ATTEMPTS`] times while it fails because a port picked as free was
/// taken in the meantime, then panics with the last failure.
pub(crate) fn start_with_retry<T>(
    what: &str,
    mut start: impl FnMut() -> Result<T, StartFailure>,
) -> T {
    let mut last = None;
    for _ in 0..START_ATTEMPTS {
        match start() {
            Ok(started) => return started,
            Err(failure) if failure.port_taken => last = Some(failure),
            Err(failure) => panic!("{what} failed to start: {}", failure.report),
        }
    }
    let report = last.map(|f| f.report).unwrap_or_default();
    panic!("{what} failed to start {START_ATTEMPTS} times, ports taken: {report}")
}

/// Why a daemon did not come up, with everything it said.
pub(crate) struct StartFailure {
    /// Retrying with other ports may help.
    pub port_taken: bool,
    pub report: String,
}

impl StartFailure {
    pub fn new(report: String) -> Self {
        let port_taken = report.contains("Address already in use");
        Self { port_taken, report }
    }
}
