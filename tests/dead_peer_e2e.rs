//! Dead peers end to end (`limits.tcp_keepalive`): the real `mailgate` binary in front of a real
//! Dovecot, Python clients in IMAP IDLE, and a peer that vanishes mid-session — its kernel stops
//! answering, as a phone that left coverage or a backend host that lost power does. mailgate
//! frees the session within the keepalive's bound instead of holding it until the idle
//! timeout (30 min here).
//!
//! A peer is made to vanish with an nftables rule that drops every packet of its connection.
//! So that no rule touches the rest of the machine, the test runs again in a network namespace
//! of its own (`unshare --net`: its own loopback, its own empty ruleset, gone when it ends),
//! with Dovecot, mailgate and the clients inside it. Needs root and `nft`
//! (`scripts/install-deps`).

mod common;

use std::time::Duration;

use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{field, run_cmd, run_python_args, seconds, Dovecot, DovecotOpts};

const MASTER: (&str, &str) = ("proxy", "master-secret");
/// Spliced (no folder rules) and IMAP-aware (`imap_folders`) demo accounts.
const SPLICED: (&str, &str) = ("dave@example.com", "dave-pass");
const AWARE: (&str, &str) = ("grace@example.com", "grace-pass");
/// With `tcp_keepalive: 1s` the kernel probes after 1 s of silence, every second, and gives up
/// when nothing is acknowledged for 1 + 4 × 1 = 5 s.
const KEEPALIVE: &str = "tcp_keepalive: 1s";
/// How long the clients wait for mailgate to let a dead session go: well past the 5 s, far
/// short of the idle timeout.
const GIVE_UP: Duration = Duration::from_secs(25);
const INNER_TIMEOUT: Duration = Duration::from_secs(120);
/// Set in the environment of the run inside the namespace.
const INNER: &str = "MAILGATE_TEST_PRIVATE_NETWORK";

/// True inside the private network namespace, with its loopback up: run the test's body. False
/// outside, after running `test` again inside one (`unshare --net`) and asserting that it ran
/// and passed there: the caller returns.
fn in_private_network(test: &str) -> bool {
    if std::env::var_os(INNER).is_some() {
        let up = run_cmd("ip", &["link", "set", "lo", "up"], Duration::from_secs(10));
        assert!(up.success(), "{up}");
        return true;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
    let exe = exe.to_string_lossy();
    let inner = format!("{INNER}=1");
    let out = run_cmd(
        "unshare",
        &[
            "--net",
            "--",
            "env",
            &inner,
            &exe,
            test,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ],
        INNER_TIMEOUT,
    );
    assert!(
        out.success() && out.stdout.contains("test result: ok. 1 passed"),
        "the run in a private network namespace (needs root):\n{out}"
    );
    false
}

/// Logs in as `SPLICED` and `AWARE` and IDLEs in both. Then the spliced client's connection to
/// mailgate goes dead (its packets dropped both ways): prints `client_gone=` the seconds until
/// mailgate's `/metrics` shows one session fewer. Then the aware session's backend connection
/// goes dead: prints `backend_gone=` the seconds until the client reads a line (other than
/// Dovecot's IDLE keep-alive) or its connection is closed, and what it read.
const CLIENT: &str = r#"
import re, socket, ssl, subprocess, sys, time, urllib.request
imaps, metrics, pid, dovecot, give_up = sys.argv[1:6]
give_up = float(give_up)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

def nft(*args):
    subprocess.run(["nft"] + list(args), check=True, timeout=10)

nft("add", "table", "inet", "t")
nft("add", "chain", "inet", "t", "in", "{ type filter hook input priority 0; }")

def vanish(port):
    """Every packet to or from local port `port` is dropped from now on: that peer is gone."""
    nft("add", "rule", "inet", "t", "in", "tcp", "sport", str(port), "drop")
    nft("add", "rule", "inet", "t", "in", "tcp", "dport", str(port), "drop")

def active():
    text = urllib.request.urlopen("http://%s/metrics" % metrics, timeout=5).read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith("mailgate_connections_active{"))

def line(s):
    out = b""
    while not out.endswith(b"\n"):
        try:
            b = s.recv(1)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            b = b""
        if not b:
            break
        out += b
    return out.decode(errors="replace").rstrip("\r\n")

def idling(user, password):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(imaps)), timeout=10),
                        server_hostname="imap.skydesk.jp")
    assert line(s).startswith("* OK"), user
    s.sendall(('l LOGIN "%s" "%s"\r\n' % (user, password)).encode())
    while True:
        reply = line(s)
        if reply.startswith("l "):
            break
    assert reply.startswith("l OK"), reply
    s.sendall(b"s SELECT INBOX\r\n")
    while not line(s).startswith("s OK"):
        pass
    s.sendall(b"i IDLE\r\n")
    assert line(s).startswith("+"), user
    return s

spliced = idling(*sys.argv[6:8])
aware = idling(*sys.argv[8:10])
time.sleep(0.5)  # every byte so far acknowledged
print("active_before=%d" % active())

# The spliced client vanishes.
vanish(spliced.getsockname()[1])
start = time.monotonic()
gone = "never"
while time.monotonic() - start < give_up:
    if active() == 1:
        gone = "%.1f" % (time.monotonic() - start)
        break
    time.sleep(0.1)
print("client_gone=" + gone)

# The aware session's backend vanishes: mailgate's connection to Dovecot, found with ss.
ss = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True,
                    timeout=10).stdout
ports = [l.split()[2].rsplit(":", 1)[1] for l in ss.splitlines()
         if "pid=%s," % pid in l and l.split()[3].endswith(":" + dovecot)]
print("backend_connections=%d" % len(ports))
vanish(ports[0])
start = time.monotonic()
aware.settimeout(give_up)
last = line(aware)
while last == "* OK Still here":  # Dovecot's IDLE keep-alive, sent before the cut
    last = line(aware)
print("backend_gone=%.1f read=%r" % (time.monotonic() - start, last))
print("active_after=%d" % active())
"#;

#[test]
fn a_session_whose_client_or_backend_vanished_is_freed_within_the_keepalive_bound() {
    if !in_private_network(
        "a_session_whose_client_or_backend_vanished_is_freed_within_the_keepalive_bound",
    ) {
        return;
    }
    let mut opts = DovecotOpts::default().master(MASTER.0, MASTER.1);
    for user in [SPLICED.0, AWARE.0] {
        opts = opts.user(user, "unused-here");
    }
    let dovecot = Dovecot::start(opts);
    let pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
    let mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool).limit(KEEPALIVE));
    let pid = mailgate.pid().expect("mailgate's pid").to_string();
    let args = [
        mailgate.port("imaps").to_string(),
        mailgate.metrics_addr().to_string(),
        pid,
        dovecot.imap_addr().port().to_string(),
        GIVE_UP.as_secs().to_string(),
        SPLICED.0.into(),
        SPLICED.1.into(),
        AWARE.0.into(),
        AWARE.1.into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python_args(CLIENT, &args, GIVE_UP * 3);
    let log = mailgate.log();
    assert!(out.success(), "{out}\n--- mailgate ---\n{log}");
    assert_eq!(field(&out.stdout, "active_before"), "2", "{out}");

    // The keepalive's bound is 5 s from the last acknowledged byte. Dovecot's `* OK Still
    // here` in IDLE comes at a random point of its first interval: one sent into the dead
    // connection just before the probes would have given up starts the retransmission
    // clock instead (TCP_USER_TIMEOUT, 5 s more), so up to ~10 s, and a second for the
    // polling. Without keepalive the session would wait for the idle timeout.
    let bound = 11.0;
    let client = seconds(&out.stdout, "client_gone");
    assert!(client <= bound, "client: {client} s\n{out}\n{log}");
    let session = |user: &str| common::line_with(&log, &format!("user={user}"));
    let spliced = session(SPLICED.0);
    assert!(spliced.contains("end=peer_timeout"), "{spliced}");

    assert_eq!(field(&out.stdout, "backend_connections"), "1", "{out}");
    let backend = seconds(&out.stdout, "backend_gone");
    assert!(backend <= bound, "backend: {backend} s\n{out}\n{log}");
    // The aware relay is between responses (in IDLE): the client is told why.
    assert!(
        field(&out.stdout, "backend_gone").ends_with(
            "read='* BYE [UNAVAILABLE] Lost the connection to the mail server, try again'"
        ),
        "{out}"
    );
    let aware = session(AWARE.0);
    assert!(aware.contains("end=peer_timeout"), "{aware}");
    assert_eq!(field(&out.stdout, "active_after"), "0", "{out}\n{log}");
}
