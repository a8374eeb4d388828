//! Reload (`SIGHUP`) end to end: the real `mailgate` binary in front of a real Dovecot, a real
//! client (Python `imaplib`). A user who turns IMAP on in the account file can log in after a
//! reload without a restart; a broken account file is refused with file and line and changes
//! nothing; a renewed certificate is served to the next handshake; the backend, written as
//! `localhost:PORT`, is looked up again under the re-read `/etc/hosts`; the reload counter says
//! what happened. A pool's backend list changed in the config is in place after a reload: new
//! logins go to the new backend, a session spliced to the removed one goes on, and the
//! `mailgate_backend_up` series follow the list. A rotated master password file is read at
//! the reload, and the next login uses it. A lowered connection cap and a reworded reply are in
//! force for the next connection and refusal, while the sessions open under the old cap go on.
//! A `domain_pools` entry added sends the next login to another pool, while a session routed
//! before stays. A changed setting that waits for a restart (`tcp_keepalive`) is named with file and line at
//! each reload until then, and the running one stays in force.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mailgate::{write_password_file, Mailgate, MailgateOpts, Pool};
use common::{run_cmd, run_python_args, Dovecot, DovecotOpts};
use rcgen::{CertificateParams, KeyPair};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const USER: (&str, &str) = ("alice@skydesk.jp", "alice-pass");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs in as `sys.argv[2]`/`sys.argv[3]` on port `sys.argv[1]` and prints the result, then the
/// SHA-256 of the certificate the server presented and whether it is the PEM file `sys.argv[4]`.
const CLIENT: &str = r#"
import hashlib, imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4_SSL("127.0.0.1", int(sys.argv[1]), ssl_context=ctx, timeout=20)
served = m.sock.getpeercert(binary_form=True)
expected = ssl.PEM_cert_to_DER_cert(open(sys.argv[4]).read())
try:
    typ, data = m.login(sys.argv[2], sys.argv[3])
    print("login:", typ, data[0].decode())
    m.logout()
except imaplib.IMAP4.error as e:
    text = e.args[0]
    print("login: NO", text.decode() if isinstance(text, bytes) else text)
print("certificate is the file's:", served == expected)
"#;

fn account_file(path: &Path, hash: &str, imap: &str) {
    let text = format!("users:\n  {}:\n    password: \"{hash}\"\n{imap}", USER.0);
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn login(mailgate: &Mailgate) -> String {
    let port = mailgate.port("imaps").to_string();
    let cert = mailgate.cert_path();
    let cert = cert.to_string_lossy();
    let out = run_python_args(CLIENT, &[&port, USER.0, USER.1, &cert], CLIENT_TIMEOUT);
    assert!(out.success(), "{out}\n--- mailgate ---\n{}", mailgate.log());
    out.stdout
}

fn reloads(mailgate: &Mailgate, result: &str) -> u64 {
    mailgate.metric(&format!(
        "mailgate_config_reloads_total{{result=\"{result}\"}}"
    ))
}

/// Counts the log lines holding `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits until the log holds `n` "SIGHUP: reloaded" lines ([`LOG_TIMEOUT`] at most).
fn wait_for_reloads(mailgate: &Mailgate, n: usize) {
    let deadline = Instant::now() + LOG_TIMEOUT;
    while count(&mailgate.log(), "SIGHUP: reloaded") < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} reloads:\n{}",
            mailgate.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_accounts_and_certificates_and_a_bad_file_changes_nothing() {
    let dovecot = Dovecot::start(
        DovecotOpts::default()
            .master(MASTER.0, MASTER.1)
            .user(USER.0, USER.1),
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let accounts = dir.path().join("accounts.yaml");
    let hash = mailgate::accounts::hash_password(USER.1.as_bytes());
    // IMAP is off until the user turns it on: no `imap:` key.
    account_file(&accounts, &hash, "");
    let mut pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
    pool.host = Some("localhost".into());
    let mut opts = MailgateOpts::new(pool.clone(), pool);
    opts.accounts = accounts.clone();
    let mailgate = Mailgate::start(&opts);

    let before = login(&mailgate);
    assert!(
        before.contains("login: NO [AUTHORIZATIONFAILED] IMAP access is disabled"),
        "{before}"
    );
    assert!(
        before.contains("certificate is the file's: True"),
        "{before}"
    );

    // The user turns IMAP on; the certificate is renewed (a new key and certificate).
    account_file(&accounts, &hash, "    imap: enabled\n");
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let renewed = CertificateParams::new(vec!["imap.skydesk.jp".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| panic!("certificate: {e}"));
    let cert_path = mailgate.cert_path();
    let old_cert = std::fs::read_to_string(&cert_path).unwrap_or_default();
    std::fs::write(&cert_path, renewed.pem()).unwrap_or_else(|e| panic!("cert: {e}"));
    std::fs::write(cert_path.with_file_name("dev.key"), key.serialize_pem())
        .unwrap_or_else(|e| panic!("key: {e}"));
    assert_ne!(old_cert, renewed.pem());

    mailgate.signal("HUP");
    let log = mailgate.wait_for_log("SIGHUP: reloaded", LOG_TIMEOUT);
    // The one backend name (`localhost`, resolved by the start-up health probe) was dropped
    // from the cache, and the login below looks it up again.
    assert!(
        log.lines()
            .any(|l| l.contains("SIGHUP: reloaded") && l.contains("dns_names=1")),
        "{log}"
    );
    let after = login(&mailgate);
    assert!(after.contains("login: OK"), "{after}");
    assert!(after.contains("certificate is the file's: True"), "{after}");
    assert_eq!(reloads(&mailgate, "ok"), 1);
    assert_eq!(reloads(&mailgate, "error"), 0);

    // A broken account file (an unknown key on line 4): refused with file and line, nothing
    // changes — IMAP stays on for the user.
    let broken = format!(
        "users:\n  {}:\n    password: \"{hash}\"\n    imap_access: enabled\n",
        USER.0
    );
    std::fs::write(&accounts, broken).unwrap_or_else(|e| panic!("accounts: {e}"));
    mailgate.signal("HUP");
    let log = mailgate.wait_for_log("SIGHUP: reload failed", LOG_TIMEOUT);
    let failure = log
        .lines()
        .find(|l| l.contains("SIGHUP: reload failed"))
        .unwrap_or_default()
        .to_string();
    let place = format!("{}:4", accounts.display());
    let following = log
        .split("SIGHUP: reload failed")
        .nth(1)
        .unwrap_or_default();
    assert!(
        failure.contains(&place) || following.contains(&place),
        "the error names the file and line {place}:\n{log}"
    );
    assert!(following.contains("imap_access"), "names the key:\n{log}");
    let still = login(&mailgate);
    assert!(still.contains("login: OK"), "{still}");
    assert_eq!(reloads(&mailgate, "ok"), 1);
    assert_eq!(reloads(&mailgate, "error"), 1);
    assert_eq!(count(&mailgate.log(), "SIGHUP: reloaded"), 1);
}

/// Logs in as `sys.argv[2]`/`sys.argv[3]` on port `sys.argv[1]` and prints the INBOX's message
/// count. With `hold` as `sys.argv[4]`, then waits for a line on stdin (at most 60 s) and counts
/// again on the same session (NOOP, then a fresh SELECT).
const COUNT: &str = r#"
import imaplib, select, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4_SSL("127.0.0.1", int(sys.argv[1]), ssl_context=ctx, timeout=20)
m.login(sys.argv[2], sys.argv[3])
typ, data = m.select("INBOX", readonly=True)
print("count:", typ, data[0].decode(), flush=True)
if sys.argv[4:] == ["hold"]:
    ready, _, _ = select.select([sys.stdin], [], [], 60)
    if not ready:
        sys.exit("no go-ahead in 60 s")
    sys.stdin.readline()
    m.noop()
    m.close()
    typ, data = m.select("INBOX", readonly=True)
    print("after:", typ, data[0].decode(), flush=True)
m.logout()
"#;

fn backend_with(messages: usize) -> Dovecot {
    let dovecot = Dovecot::start(
        DovecotOpts::default()
            .master(MASTER.0, MASTER.1)
            .user(USER.0, USER.1),
    );
    for i in 0..messages {
        let message = format!("From: a@example.com\r\nSubject: {i}\r\n\r\nbody {i}\r\n");
        dovecot.deliver(USER.0, "INBOX", message.as_bytes());
    }
    dovecot
}

/// A loopback port nobody listens on.
fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"))
}

fn metrics_text(mailgate: &Mailgate) -> String {
    let url = format!("http://{}/metrics", mailgate.metrics_addr());
    run_cmd("curl", &["-sS", &url], Duration::from_secs(30)).stdout
}

fn up_series(backend: SocketAddr) -> String {
    format!("mailgate_backend_up{{backend=\"{backend}\",pool=\"imap\"}}")
}

/// Polls `/metrics` until `series` reads `value` (10 s at most); returns the last text.
fn wait_for_sample(mailgate: &Mailgate, series: &str, value: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(mailgate);
        if text.lines().any(|l| l == format!("{series} {value}")) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no `{series} {value}` in 10 s:\n{text}\n--- mailgate ---\n{}",
            mailgate.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sighup_puts_a_pools_new_backend_list_in_place_and_spliced_sessions_go_on() {
    // Old backend A holds one message for alice, new backend B three.
    let old = backend_with(1);
    let new = backend_with(3);
    let dead = dead_port();
    let health = "{ interval: 200ms, timeout: 150ms, fall: 1, rise: 1 }";
    let organisation = Pool::master(&[new.imap_addr()], &[], MASTER.0, MASTER.1);
    let opts = MailgateOpts::new(
        Pool::master(&[old.imap_addr()], &[], MASTER.0, MASTER.1),
        organisation.clone(),
    )
    .health(health);
    let mailgate = Mailgate::start(&opts);
    let port = mailgate.port("imaps").to_string();
    wait_for_sample(&mailgate, &up_series(old.imap_addr()), "1");

    // A session on A, spliced before the reload.
    let mut session = Command::new("python3")
        .args(["-c", COUNT, &port, USER.0, USER.1, "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let mut lines = BufReader::new(session.stdout.take().unwrap_or_else(|| panic!("stdout")))
        .lines()
        .map_while(Result::ok);
    let before = lines.next().unwrap_or_default();
    assert_eq!(
        before,
        "count: OK 1",
        "--- mailgate ---\n{}",
        mailgate.log()
    );

    // The pool moves to B and a backend that is not up.
    let moved = MailgateOpts::new(
        Pool::master(&[new.imap_addr(), dead], &[], MASTER.0, MASTER.1),
        organisation.clone(),
    )
    .health(health);
    mailgate.rewrite_config(&moved);
    mailgate.signal("HUP");
    let log = mailgate.wait_for_log("SIGHUP: reloaded", LOG_TIMEOUT);
    let line = common::line_with(&log, "SIGHUP: reloaded");
    assert!(
        line.contains("backends_added=2") && line.contains("backends_removed=1"),
        "{line}"
    );
    assert!(
        !log.contains("SIGHUP: pools."),
        "no pool setting changed but the list:\n{log}"
    );

    // New logins go to B (whichever of B and the dead one the user's order puts first).
    for _ in 0..3 {
        let out = run_python_args(COUNT, &[&port, USER.0, USER.1], CLIENT_TIMEOUT);
        assert!(out.success(), "{out}\n--- mailgate ---\n{}", mailgate.log());
        assert!(out.stdout.contains("count: OK 3"), "{out}");
    }
    // The session on A goes on: it still sees A's one message.
    let mut stdin = session.stdin.take().unwrap_or_else(|| panic!("stdin"));
    stdin
        .write_all(b"go\n")
        .unwrap_or_else(|e| panic!("writing to the session: {e}"));
    let after = lines.next().unwrap_or_default();
    let status = session.wait().unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        status.success(),
        "{after}\n--- mailgate ---\n{}",
        mailgate.log()
    );
    assert_eq!(after, "after: OK 1");

    // The up gauges follow the list: A's series is gone, B is up, the dead one down; the
    // unchanged imappro pool keeps its series.
    wait_for_sample(&mailgate, &up_series(new.imap_addr()), "1");
    let text = wait_for_sample(&mailgate, &up_series(dead), "0");
    let gone = format!("{} ", up_series(old.imap_addr()));
    assert!(!text.lines().any(|l| l.starts_with(&gone)), "{text}");
    let kept = format!(
        "mailgate_backend_up{{backend=\"{}\",pool=\"imappro\"}} 1",
        new.imap_addr()
    );
    assert!(text.lines().any(|l| l == kept), "{text}");
    assert_eq!(reloads(&mailgate, "ok"), 1);
    // A is probed no more: its Dovecot logs each probe's connection, and none come now.
    let probes = || count(&old.log(), "imap-login:");
    let settled = probes();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(probes(), settled, "A is still probed:\n{}", old.log());

    // A reload that keeps B and the dead one and lists A again: only A is added, and the kept
    // ones keep their state. A kept backend made anew would start up and be marked down once
    // more at its first probe; the kept one stays down and logs nothing.
    let marked_down = |log: &str| {
        log.lines()
            .filter(|l| l.contains("backend marked down") && l.contains(&dead.to_string()))
            .count()
    };
    assert_eq!(marked_down(&mailgate.log()), 1, "{}", mailgate.log());
    let again = MailgateOpts::new(
        Pool::master(
            &[new.imap_addr(), dead, old.imap_addr()],
            &[],
            MASTER.0,
            MASTER.1,
        ),
        organisation,
    )
    .health(health);
    mailgate.rewrite_config(&again);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 2);
    let log = mailgate.log();
    let line = log
        .lines()
        .filter(|l| l.contains("SIGHUP: reloaded"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        line.contains("backends_added=1") && line.contains("backends_removed=0"),
        "{line}"
    );
    let text = wait_for_sample(&mailgate, &up_series(old.imap_addr()), "1");
    assert!(
        text.lines().any(|l| l == format!("{} 0", up_series(dead))),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == format!("{} 1", up_series(new.imap_addr()))),
        "{text}"
    );
    // Two more probe intervals for a made-anew checker to show itself.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(marked_down(&mailgate.log()), 1, "{}", mailgate.log());
    assert_eq!(reloads(&mailgate, "ok"), 2);
}

#[test]
fn sighup_reads_a_rotated_master_password_file() {
    let mut dovecot = backend_with(1);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let password_file = dir.path().join("imap-master");
    let write = |password: &str| write_password_file(&password_file, password);
    write(MASTER.1);
    let pool = Pool::master_file(&[dovecot.imap_addr()], &[], MASTER.0, &password_file);
    let mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool));
    let port = mailgate.port("imaps").to_string();
    let messages = || run_python_args(COUNT, &[&port, USER.0, USER.1], CLIENT_TIMEOUT);
    let out = messages();
    assert!(
        out.success() && out.stdout.contains("count: OK 1"),
        "{out}\n--- mailgate ---\n{}",
        mailgate.log()
    );

    // The backend's master password is rotated: mailgate's old one is refused.
    const ROTATED: &str = "rotated-master-secret";
    dovecot.set_master_password(ROTATED);
    let out = messages();
    assert!(!out.success(), "the old master password still works: {out}");
    assert!(out.stderr.contains("UNAVAILABLE"), "{out}");

    // The file is rotated too and mailgate told: the next login uses the new password.
    write(ROTATED);
    mailgate.signal("HUP");
    let log = mailgate.wait_for_log("SIGHUP: reloaded", LOG_TIMEOUT);
    // Both pools (imap and imappro) read the file: a line each.
    let changed = "the master user or password changed";
    assert_eq!(count(&log, changed), 2, "{log}");
    let out = messages();
    assert!(
        out.success() && out.stdout.contains("count: OK 1"),
        "{out}\n--- mailgate ---\n{}",
        mailgate.log()
    );
    // A reload with the file unchanged puts nothing new in place.
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 2);
    let log = mailgate.log();
    assert_eq!(count(&log, changed), 2, "{log}");
    // Neither password is ever logged.
    assert!(!log.contains(MASTER.1) && !log.contains(ROTATED), "{log}");
}

/// Opens `sys.argv[2]` TLS sessions to port `sys.argv[1]` at once and prints each greeting.
const GREETINGS: &str = r#"
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
sessions = []
for _ in range(int(sys.argv[2])):
    try:
        m = imaplib.IMAP4_SSL("127.0.0.1", int(sys.argv[1]), ssl_context=ctx, timeout=20)
        print("greeting:", m.welcome.decode())
        sessions.append(m)
    except Exception as e:
        print("refused:", e)
for m in sessions:
    m.logout()
"#;

/// The line of the config file `path` on which `key` (its last part, e.g. `idle_timeout`)
/// is set.
fn line_of(path: &Path, key: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .position(|l| l.trim_start().starts_with(&format!("{key}:")))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
}

/// What a reload logs for the setting `section.key` of `mailgate`'s config file: `outcome`
/// is `in place now` or `it takes effect at a restart`.
fn reload_line(mailgate: &Mailgate, section: &str, key: &str, outcome: &str) -> String {
    let config = mailgate.dir().join("mailgate.yaml");
    format!(
        "SIGHUP: {}:{}: {section}.{key}: changed; {outcome}",
        config.display(),
        line_of(&config, key)
    )
}

/// Opens `sys.argv[2]` IMAP sessions on port `sys.argv[1]`, logged in as alice, and prints
/// `open=N`; after a line on standard input (the test has reloaded): a fourth connection from
/// the same address, `NOOP` on each open session, a wrong password from 127.0.0.2, and the
/// logouts.
const SESSIONS_ACROSS_A_RELOAD: &str = r#"
import imaplib, socket, ssl, sys
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
PORT = int(sys.argv[1])

class From(imaplib.IMAP4_SSL):
    """An IMAP client connecting from the loopback address `source`."""
    def __init__(self, source):
        self.source = source
        super().__init__("127.0.0.1", PORT, ssl_context=CTX, timeout=20)
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)

sessions = []
for _ in range(int(sys.argv[2])):
    m = From("127.0.0.1")
    m.login("alice@skydesk.jp", "alice-pass")
    sessions.append(m)
print("open=%d" % len(sessions), flush=True)
sys.stdin.readline()
try:
    From("127.0.0.1").logout()
    print("fourth=let in")
except (OSError, imaplib.IMAP4.abort) as e:
    print("fourth=refused %s" % type(e).__name__)
print("noops=" + " ".join(m.noop()[0] for m in sessions))
m = From("127.0.0.2")
try:
    m.login("alice@skydesk.jp", "wrong")
    print("wrong=OK")
except imaplib.IMAP4.error as e:
    text = e.args[0]
    print("wrong=NO " + (text.decode() if isinstance(text, bytes) else text))
m.logout()
for m in sessions:
    m.logout()
print("done=yes", flush=True)
"#;

#[test]
fn sighup_puts_new_limits_and_messages_in_place_and_open_sessions_go_on() {
    let dovecot = backend_with(1);
    let pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
    let opts = MailgateOpts::new(pool.clone(), pool).limit("auth_failure_delay: 100ms");
    let mailgate = Mailgate::start(&opts);
    let port = mailgate.port("imaps").to_string();
    let mut client =
        common::Interactive::spawn("python3", &["-c", SESSIONS_ACROSS_A_RELOAD, &port, "3"]);
    client
        .expect("open=3", CLIENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n--- mailgate ---\n{}", mailgate.log()));

    // During an incident the operator lowers the per-address cap below what is open, and
    // words the wrong-password reply differently, and reloads.
    let text = "Wrong password; see https://help.example/login";
    let edited = opts
        .clone()
        .limit("max_connections_per_ip: 2")
        .message(&format!("invalid_credentials: \"{text}\""));
    mailgate.rewrite_config(&edited);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 1);
    let log = mailgate.log();
    for (section, key) in [
        ("limits", "max_connections_per_ip"),
        ("messages", "invalid_credentials"),
    ] {
        let line = reload_line(&mailgate, section, key, "in place now");
        assert_eq!(count(&log, &line), 1, "{line}:\n{log}");
    }
    assert_eq!(count(&log, "takes effect at a restart"), 0, "{log}");

    client.send("reloaded\n").unwrap_or_else(|e| panic!("{e}"));
    let out = client
        .expect("done=yes", CLIENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n--- mailgate ---\n{}", mailgate.log()));
    // The new cap turns away the fourth connection; the three open under the old one go on.
    assert!(
        common::field(&out, "fourth").starts_with("refused"),
        "{out}"
    );
    assert_eq!(
        mailgate.metric(
            "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections_per_ip\"}"
        ),
        1
    );
    assert_eq!(common::field(&out, "noops"), "OK OK OK", "{out}");
    // The next refusal is worded as the reloaded file says.
    assert_eq!(
        common::field(&out, "wrong"),
        format!("NO [AUTHENTICATIONFAILED] {text}"),
        "{out}"
    );

    // The file put back: the cap is 50 again, and the three connections are let in.
    mailgate.rewrite_config(&opts);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 2);
    assert_eq!(count(&mailgate.log(), "changed; in place now"), 4);
    let out = run_python_args(GREETINGS, &[&port, "3"], CLIENT_TIMEOUT);
    assert_eq!(count(&out.stdout, "greeting: * OK"), 3, "{out}");
    assert_eq!(reloads(&mailgate, "ok"), 2);
}

#[test]
fn sighup_names_each_setting_that_waits_for_a_restart_and_keeps_the_running_one() {
    let dovecot = backend_with(1);
    let pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
    let opts = MailgateOpts::new(pool.clone(), pool);
    let mailgate = Mailgate::start(&opts);
    let pid = mailgate.pid().expect("pid");
    let port = mailgate.port("imaps");

    // The operator shortens the keepalive (set on the listening sockets at start), the
    // pools' health checks (started with the pool) and the idle timeout (read at each
    // connection), and reloads.
    let edited = opts
        .clone()
        .limit("tcp_keepalive: 3s")
        .limit("idle_timeout: 5m")
        .health("{ interval: 7s, timeout: 2s, fall: 2, rise: 2 }");
    mailgate.rewrite_config(&edited);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 1);
    let waits = reload_line(
        &mailgate,
        "limits",
        "tcp_keepalive",
        "it takes effect at a restart",
    );
    let log = mailgate.log();
    assert_eq!(count(&log, &waits), 1, "{waits}:\n{log}");
    // Each pool's, at its own `health:` line.
    let config = mailgate.dir().join("mailgate.yaml");
    let text = std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
    let health_lines: Vec<usize> = (text.lines().enumerate())
        .filter(|(_, l)| l.trim_start().starts_with("health:"))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(health_lines.len(), 2, "{text}");
    for (pool, line) in ["imap", "imappro"].iter().zip(&health_lines) {
        let waits = format!(
            "SIGHUP: {}:{line}: pools.{pool}.health: changed; it takes effect at a restart",
            config.display()
        );
        assert_eq!(count(&log, &waits), 1, "{waits}:\n{log}");
    }
    assert_eq!(count(&log, "takes effect at a restart"), 3, "{log}");
    let live = reload_line(&mailgate, "limits", "idle_timeout", "in place now");
    assert_eq!(count(&log, &live), 1, "{live}:\n{log}");

    // What the warning says is so: a connection accepted after the reload still has the
    // keepalive the process started with (2m), not 3s.
    let script = format!(
        r#"{}
import imaplib, ssl, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4_SSL("127.0.0.1", {port}, ssl_context=ctx, timeout=20)
m.login("alice@skydesk.jp", "alice-pass")
time.sleep(0.5)  # the login reply acknowledged: no retransmission timer in the way
keepalive_timers({pid}, {port}, {backend})
m.logout()
"#,
        common::PY_KEEPALIVE_TIMERS,
        backend = dovecot.imap_addr().port(),
    );
    let out = run_python_args(&script, &[], CLIENT_TIMEOUT);
    assert!(out.success(), "{out}\n--- mailgate ---\n{}", mailgate.log());
    let left = common::keepalive_left(&out.stdout, "client");
    assert!(left > 3.0, "the reloaded 3s is in force: {out}");

    // Until a restart the change is still waiting, and each reload says so again; the file put
    // back as it was waits for nothing.
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 2);
    assert_eq!(count(&mailgate.log(), &waits), 2);
    assert_eq!(count(&mailgate.log(), "takes effect at a restart"), 6);
    mailgate.rewrite_config(&opts);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 3);
    let log = mailgate.log();
    assert_eq!(count(&log, "takes effect at a restart"), 6, "{log}");
    assert_eq!(reloads(&mailgate, "ok"), 3);
}

#[test]
fn sighup_routes_the_next_login_by_the_new_routing_and_a_session_stays_where_it_was() {
    // alice (skydesk.jp, the consumer pool) on A; the imappro pool on B.
    let a = backend_with(1);
    let b = backend_with(2);
    let consumer = Pool::master(&[a.imap_addr()], &[], MASTER.0, MASTER.1);
    let organisation = Pool::master(&[b.imap_addr()], &[], MASTER.0, MASTER.1);
    let opts = MailgateOpts::new(consumer, organisation);
    let mailgate = Mailgate::start(&opts);
    let port = mailgate.port("imaps").to_string();
    let inbox = || {
        let out = run_python_args(COUNT, &[&port, USER.0, USER.1], CLIENT_TIMEOUT);
        assert!(out.success(), "{out}\n--- mailgate ---\n{}", mailgate.log());
        out.stdout.trim().to_string()
    };
    assert_eq!(inbox(), "count: OK 1");
    let mut held =
        common::Interactive::spawn("python3", &["-c", COUNT, &port, USER.0, USER.1, "hold"]);
    held.expect("count: OK 1", CLIENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n--- mailgate ---\n{}", mailgate.log()));

    // The operator moves skydesk.jp to the imappro pool and reloads.
    let mut moved = opts.clone();
    moved.domain_pools = vec!["skydesk.jp: imappro".into()];
    mailgate.rewrite_config(&moved);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 1);
    let line = reload_line(&mailgate, "routing", "domain_pools", "in place now");
    assert_eq!(
        count(&mailgate.log(), &line),
        1,
        "{line}:\n{}",
        mailgate.log()
    );
    assert_eq!(inbox(), "count: OK 2", "the next login goes to B");
    // The session routed before the reload goes on on A.
    let after = held
        .exchange("go\n", "after:", CLIENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(after.trim_end().ends_with("after: OK 1"), "{after}");

    // Put back: A again.
    mailgate.rewrite_config(&opts);
    mailgate.signal("HUP");
    wait_for_reloads(&mailgate, 2);
    assert_eq!(inbox(), "count: OK 1");
    assert_eq!(count(&mailgate.log(), "takes effect at a restart"), 0);

    // Routing to a pool added in the same edit waits for it: named at each reload, and the
    // routing in force stays.
    let mut dedicated = opts.clone();
    dedicated.extra_pools = vec![(
        "dedicated".into(),
        Pool::master(&[b.imap_addr()], &[], MASTER.0, MASTER.1),
    )];
    dedicated.domain_pools = vec!["skydesk.jp: dedicated".into()];
    mailgate.rewrite_config(&dedicated);
    let config = mailgate.dir().join("mailgate.yaml");
    let waits = format!(
        "SIGHUP: {}:{}: routing: names pools.dedicated, new since the start; the routing in \
         force stays until a restart",
        config.display(),
        line_of(&config, "routing")
    );
    for reload in [3, 4] {
        mailgate.signal("HUP");
        wait_for_reloads(&mailgate, reload);
        let log = mailgate.log();
        assert_eq!(count(&log, &waits), reload - 2, "{waits}:\n{log}");
        assert_eq!(
            count(&log, "pools.dedicated: new; it serves from the next start"),
            reload - 2,
            "{log}"
        );
        assert_eq!(inbox(), "count: OK 1", "still the routing in force");
    }
    assert_eq!(reloads(&mailgate, "ok"), 4);
}
