//! `limits:` end to end: the real `mailgate` binary in front of a real Dovecot (and a real
//! Postfix for the SMTP rows), Python clients connecting from 127.0.0.1 and 127.0.0.2 (one
//! address trusted, the other not), and what a user and an SRE see: reply lines, closed
//! connections, how long a failed reply took, and `/metrics`.
//!
//! Delays are small (100–500 ms) and only lower bounds are asserted.

mod common;

use std::time::Duration;

use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{
    field, keepalive_left, run_python_args, seconds, Dovecot, DovecotOpts, Postfix, PostfixOpts,
    PY_KEEPALIVE_TIMERS,
};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// Demo accounts (`config/accounts.yaml`) the tests log in as; one Dovecot holds them all.
const USERS: [&str; 4] = [
    "alice@skydesk.jp",
    "bob@skydesk.jp",
    "grace@example.com",
    "dave@example.com",
];
const DOMAINS: [&str; 2] = ["skydesk.jp", "example.com"];

/// Raw clients over TCP and TLS from a chosen source address, a line reader that says ""
/// at EOF, an IMAP login that times its tagged reply, and a `/metrics` scrape.
const PRELUDE: &str = r#"
import base64, imaplib, smtplib, socket, ssl, sys, time, urllib.request
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
PORTS = dict(arg.split("=") for arg in sys.argv[1:])
IMAPS, IMAP = int(PORTS["imaps"]), int(PORTS["imap"])
SMTPS = int(PORTS.get("submissions", 0))
SUBMISSION = int(PORTS.get("submission", 0))
METRICS = PORTS["metrics"]

def tcp(port, source="127.0.0.1"):
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))

def tls(port, source="127.0.0.1"):
    return CTX.wrap_socket(tcp(port, source), server_hostname="imap.skydesk.jp")

def line(sock):
    """One line without its CRLF; "" when the server closed the connection."""
    out = b""
    while not out.endswith(b"\n"):
        try:
            b = sock.recv(1)
        except (ConnectionResetError, ssl.SSLError):
            b = b""
        if not b:
            return out.decode()
        out += b
    return out.decode().rstrip("\r\n")

def login(sock, tag, user, password):
    """The tagged reply to LOGIN and how long it took."""
    start = time.monotonic()
    sock.sendall(('%s LOGIN "%s" "%s"\r\n' % (tag, user, password)).encode())
    while True:
        reply = line(sock)
        if reply.startswith(tag + " ") or reply == "":
            return reply, time.monotonic() - start

def imap_session(user, password, source="127.0.0.1"):
    """A TLS connection logged in (or not) as `user`: (socket, tagged reply)."""
    s = tls(IMAPS, source)
    line(s)
    reply, _ = login(s, "l1", user, password)
    return s, reply

def logout(sock):
    sock.sendall(b"z LOGOUT\r\n")
    while line(sock):
        pass
    sock.close()

def smtp_reply(sock):
    lines = []
    while True:
        l = line(sock)
        lines.append(l)
        if l[3:4] != "-":
            return "\n".join(lines)

def smtp_auth(sock, user, password):
    start = time.monotonic()
    token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
    sock.sendall(("AUTH PLAIN %s\r\n" % token).encode())
    reply = smtp_reply(sock)
    return reply, time.monotonic() - start

def smtps(source="127.0.0.2"):
    s = tls(SMTPS, source)
    smtp_reply(s)
    s.sendall(b"EHLO client.example\r\n")
    smtp_reply(s)
    return s

def metrics(*needles):
    """The /metrics lines that start with one of `needles`."""
    text = urllib.request.urlopen("http://%s/metrics" % METRICS, timeout=10).read().decode()
    return [l for l in text.splitlines() if l.startswith(needles)]

def metric(name):
    for l in metrics(name + " "):
        return float(l.split()[-1])
    return 0.0
"#;

/// One Dovecot for both pools (and Postfix delivering into it, when SMTP is wanted), and
/// mailgate in front with the given `limits:` lines.
struct Stack {
    // Field order is drop order: mailgate stops before its backends.
    mailgate: Mailgate,
    postfix: Option<Postfix>,
    _dovecot: Dovecot,
}

impl Stack {
    fn start(smtp: bool, limits: &[&str]) -> Stack {
        let mut opts = DovecotOpts::default().master(MASTER.0, MASTER.1);
        if smtp {
            opts = opts.with_lmtp();
        }
        for user in USERS {
            opts = opts.user(user, "unused-here");
        }
        let dovecot = Dovecot::start(opts);
        let postfix = smtp.then(|| {
            Postfix::start(PostfixOpts::default().delivering_to(dovecot.lmtp_addr(), &DOMAINS))
        });
        let smtp_addrs: Vec<_> = postfix.iter().map(Postfix::submission_addr).collect();
        let pool = Pool::master(&[dovecot.imap_addr()], &smtp_addrs, MASTER.0, MASTER.1);
        let mut opts = MailgateOpts::new(pool.clone(), pool);
        for line in limits {
            opts = opts.limit(line);
        }
        Stack {
            mailgate: Mailgate::start(&opts),
            postfix,
            _dovecot: dovecot,
        }
    }

    /// Runs `body` after the prelude; panics with the logs unless it succeeds; returns stdout.
    fn python(&self, body: &str) -> String {
        let script = format!("{PRELUDE}\n{body}");
        let mut args = vec![
            format!("imaps={}", self.mailgate.port("imaps")),
            format!("imap={}", self.mailgate.port("imap")),
            format!("metrics={}", self.mailgate.metrics_addr()),
        ];
        if self.postfix.is_some() {
            args.push(format!("submissions={}", self.mailgate.port("submissions")));
            args.push(format!("submission={}", self.mailgate.port("submission")));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_python_args(&script, &args, CLIENT_TIMEOUT);
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}\n--- postfix ---\n{}",
            self.mailgate.log(),
            self.postfix.as_ref().map(Postfix::log).unwrap_or_default()
        );
        out.stdout
    }
}

#[test]
fn connections_are_capped_per_ip_and_in_total_and_trusted_networks_are_not() {
    let stack = Stack::start(
        false,
        &[
            "max_connections_per_ip: 2",
            "max_connections: 6",
            "trusted_networks: [127.0.0.2]",
        ],
    );
    let out = stack.python(
        r#"
a, b = tcp(IMAP), tcp(IMAP)
print("a=" + line(a))
print("b=" + line(b))
c = tcp(IMAP)
print("c=" + line(c))
print("c_after=" + line(c) + "|")
# The implicit-TLS listener closes without a handshake (the cap counts every listener).
try:
    d = tls(IMAPS)
    print("d=handshake " + line(d))
except (ssl.SSLError, OSError) as e:
    print("d=closed")
# The trusted address has no per-IP cap: 4 more, 6 in all ...
t = [tcp(IMAP, "127.0.0.2") for _ in range(4)]
print("trusted=" + ",".join(line(s)[:4] for s in t))
# ... and max_connections holds for everyone.
e = tcp(IMAP, "127.0.0.2")
print("e=" + line(e))
for l in metrics("mailgate_connections_rejected_total"):
    print("metric " + l)
# A closed connection gives its place back.
a.sendall(b"x LOGOUT\r\n")
while line(a):
    pass
a.close()
for _ in range(50):
    f = tcp(IMAP)
    got = line(f)
    if got.startswith("* OK"):
        break
    time.sleep(0.1)
print("f=" + got)
"#,
    );
    let bye = "* BYE [UNAVAILABLE] Too many connections, try again later";
    assert!(field(&out, "a").starts_with("* OK"), "{out}");
    assert!(field(&out, "b").starts_with("* OK"), "{out}");
    assert_eq!(field(&out, "c"), bye, "{out}");
    assert_eq!(field(&out, "c_after"), "|", "closed after the BYE: {out}");
    assert_eq!(field(&out, "d"), "closed", "{out}");
    assert_eq!(field(&out, "trusted"), "* OK,* OK,* OK,* OK", "{out}");
    assert_eq!(field(&out, "e"), bye, "{out}");
    assert!(field(&out, "f").starts_with("* OK"), "{out}");
    for metric in [
        "mailgate_connections_rejected_total{listener=\"imap\",reason=\"max_connections_per_ip\"} 1",
        "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections_per_ip\"} 1",
        "mailgate_connections_rejected_total{listener=\"imap\",reason=\"max_connections\"} 1",
        "mailgate_connections_rejected_total{listener=\"imaps\",reason=\"max_connections\"} 0",
    ] {
        assert!(
            out.lines().any(|l| l == format!("metric {metric}")),
            "no {metric} in:\n{out}"
        );
    }
}

#[test]
fn a_third_session_of_one_user_from_one_address_is_refused_until_one_ends() {
    let stack = Stack::start(false, &["max_sessions_per_user_ip: 2"]);
    let out = stack.python(
        r#"
s1, r1 = imap_session("alice@skydesk.jp", "alice-pass")
s2, r2 = imap_session("alice@skydesk.jp", "alice-pass")
print("first=" + r1[:5] + " second=" + r2[:5])
s3, r3 = imap_session("alice@skydesk.jp", "alice-pass")
print("third=" + r3)
# Another address, another user: counted apart.
s4, r4 = imap_session("alice@skydesk.jp", "alice-pass", "127.0.0.2")
s5, r5 = imap_session("dave@example.com", "dave-pass")
print("other_ip=" + r4[:5] + " other_user=" + r5[:5])
print("metric=" + ",".join(metrics('mailgate_logins_total{pool="imap",protocol="imap",result="too_many_connections"}')))
logout(s1)
for _ in range(50):
    s6, r6 = imap_session("alice@skydesk.jp", "alice-pass")
    if r6.startswith("l1 OK"):
        break
    time.sleep(0.1)
print("after_logout=" + r6[:5])
"#,
    );
    assert_eq!(field(&out, "first"), "l1 OK second=l1 OK", "{out}");
    assert_eq!(
        field(&out, "third"),
        "l1 NO [LIMIT] Too many connections for this account",
        "{out}"
    );
    assert_eq!(field(&out, "other_ip"), "l1 OK other_user=l1 OK", "{out}");
    assert_eq!(
        field(&out, "metric"),
        "mailgate_logins_total{pool=\"imap\",protocol=\"imap\",result=\"too_many_connections\"} 1",
        "{out}"
    );
    assert_eq!(field(&out, "after_logout"), "l1 OK", "{out}");
}

#[test]
fn failed_logins_are_delayed_and_an_address_over_its_budget_is_throttled_without_hashing() {
    let stack = Stack::start(
        false,
        &[
            "failures_per_ip: 3/1m",
            "auth_failure_delay: 200ms",
            "auth_failure_max_delay: 500ms",
            "max_auth_attempts: 5",
        ],
    );
    let out = stack.python(
        r#"
SUM = 'mailgate_auth_duration_seconds_sum{protocol="imap"}'
COUNT = 'mailgate_auth_duration_seconds_count{protocol="imap"}'
s = tls(IMAPS)
line(s)
for i in range(3):
    reply, took = login(s, "f%d" % i, "grace@example.com", "wrong-%d" % i)
    print("fail%d=%s" % (i, reply))
    print("took%d=%.3f" % (i, took))
HASHES = "mailgate_password_hashes_total"
print("failed_hashes=%d" % metric(HASHES))
before_sum, before_count, before_hashes = metric(SUM), metric(COUNT), metric(HASHES)
# The right password, never verified before: refused without a hash, after the longest delay.
reply, took = login(s, "r1", "grace@example.com", "grace-pass")
print("throttled=" + reply)
print("throttled_took=%.3f" % took)
print("throttled_count=%d" % (metric(COUNT) - before_count))
print("throttled_hashes=%d" % (metric(HASHES) - before_hashes))
# Another address is not throttled.
o, reply = imap_session("grace@example.com", "grace-pass", "127.0.0.2")
print("other=" + reply[:5])
for l in metrics('mailgate_logins_total{pool="imappro",protocol="imap"'):
    print("metric " + l)
"#,
    );
    for i in 0..3 {
        assert_eq!(
            field(&out, &format!("fail{i}")),
            format!("f{i} NO [AUTHENTICATIONFAILED] Invalid credentials"),
            "{out}"
        );
    }
    // 200 ms × recent failures, capped at 500 ms (lower bounds only).
    assert!(seconds(&out, "took0") >= 0.2, "{out}");
    assert!(seconds(&out, "took1") >= 0.4, "{out}");
    assert!(seconds(&out, "took2") >= 0.5, "{out}");
    assert_eq!(
        field(&out, "throttled"),
        "r1 NO [UNAVAILABLE] Too many failed logins, try again later",
        "{out}"
    );
    assert!(seconds(&out, "throttled_took") >= 0.5, "{out}");
    // One hash per wrong password, and none for the throttled login.
    assert_eq!(field(&out, "failed_hashes"), "3", "{out}");
    assert_eq!(field(&out, "throttled_count"), "1", "{out}");
    assert_eq!(field(&out, "throttled_hashes"), "0", "{out}");
    stack.mailgate.wait_for_log(
        "login throttled: refused without password verification",
        Duration::from_secs(5),
    );
    assert_eq!(field(&out, "other"), "l1 OK", "{out}");
    for metric in [
        "mailgate_logins_total{pool=\"imappro\",protocol=\"imap\",result=\"invalid_credentials\"} 3",
        "mailgate_logins_total{pool=\"imappro\",protocol=\"imap\",result=\"throttled\"} 1",
    ] {
        assert!(
            out.lines().any(|l| l == format!("metric {metric}")),
            "no {metric} in:\n{out}"
        );
    }
    let log = stack.mailgate.log();
    assert!(
        log.lines()
            .any(|l| l.contains("mailgate::session") && l.contains("result=throttled")),
        "no session line with result=throttled:\n{log}"
    );
}

#[test]
fn a_user_over_its_budget_still_logs_in_with_a_cached_password_and_nothing_else() {
    let stack = Stack::start(
        false,
        &[
            "failures_per_user: 2/1h",
            "failures_per_ip: 100/1m",
            "auth_failure_delay: 100ms",
            "auth_failure_max_delay: 200ms",
        ],
    );
    let out = stack.python(
        r#"
s, r = imap_session("bob@skydesk.jp", "bob-app-pass")
print("warm=" + r[:5])
logout(s)
# Someone elsewhere guesses bob's password twice: bob's budget is spent.
for i in range(2):
    s, r = imap_session("bob@skydesk.jp", "guess-%d" % i, "127.0.0.2")
    print("guess%d=%s" % (i, r))
s, r = imap_session("bob@skydesk.jp", "bob-app-pass")
print("cached=" + r[:5])
logout(s)
# bob's main password is right, but was never verified: not verified now either.
s, r = imap_session("bob@skydesk.jp", "bob-pass")
print("uncached=" + r)
s, r = imap_session("bob@skydesk.jp", "guess-3")
print("guess3=" + r)
# Other users, same addresses: unaffected.
s, r = imap_session("alice@skydesk.jp", "alice-pass", "127.0.0.2")
print("alice=" + r[:5])
"#,
    );
    assert_eq!(field(&out, "warm"), "l1 OK", "{out}");
    for i in 0..2 {
        assert_eq!(
            field(&out, &format!("guess{i}")),
            "l1 NO [AUTHENTICATIONFAILED] Invalid credentials",
            "{out}"
        );
    }
    assert_eq!(field(&out, "cached"), "l1 OK", "{out}");
    let throttled = "l1 NO [UNAVAILABLE] Too many failed logins, try again later";
    assert_eq!(field(&out, "uncached"), throttled, "{out}");
    assert_eq!(field(&out, "guess3"), throttled, "{out}");
    assert_eq!(field(&out, "alice"), "l1 OK", "{out}");
}

#[test]
fn smtp_gets_421_over_the_caps_and_454_when_throttled() {
    let stack = Stack::start(
        true,
        &[
            "max_connections_per_ip: 2",
            "max_sessions_per_user_ip: 1",
            "failures_per_ip: 2/1m",
            "auth_failure_delay: 100ms",
            "auth_failure_max_delay: 300ms",
        ],
    );
    let out = stack.python(
        r#"
a, b = tcp(SUBMISSION, "127.0.0.2"), tcp(SUBMISSION, "127.0.0.2")
print("a=" + smtp_reply(a)[:4] + " b=" + smtp_reply(b)[:4])
c = tcp(SUBMISSION, "127.0.0.2")
print("c=" + smtp_reply(c))
print("c_after=" + line(c) + "|")
for s in (a, b, c):
    s.close()
time.sleep(0.3)
# One logged-in session of alice from this address; a second is refused and closed.
first = smtps()
print("first=" + smtp_auth(first, "alice@skydesk.jp", "alice-pass")[0])
second = smtps()
print("second=" + smtp_auth(second, "alice@skydesk.jp", "alice-pass")[0])
print("second_after=" + line(second) + "|")
first.sendall(b"QUIT\r\n")
smtp_reply(first)
first.close()
second.close()
time.sleep(0.3)
# Two failures spend this address's budget; the right password then gets 454.
s = smtps()
for i in range(2):
    print("fail%d=%s" % (i, smtp_auth(s, "dave@example.com", "wrong")[0]))
reply, took = smtp_auth(s, "dave@example.com", "dave-pass")
print("throttled=" + reply)
print("throttled_took=%.3f" % took)
for l in metrics("mailgate_connections_rejected_total", 'mailgate_logins_total{pool="imappro",protocol="smtp",result="throttled"}', 'mailgate_logins_total{pool="imap",protocol="smtp",result="too_many_connections"}'):
    print("metric " + l)
"#,
    );
    assert_eq!(field(&out, "a"), "220  b=220 ", "{out}");
    assert_eq!(
        field(&out, "c"),
        "421 4.7.0 Too many connections, try again later",
        "{out}"
    );
    assert_eq!(field(&out, "c_after"), "|", "{out}");
    assert!(field(&out, "first").starts_with("235 "), "{out}");
    assert_eq!(
        field(&out, "second"),
        "421 4.7.0 Too many connections for this account",
        "{out}"
    );
    assert_eq!(
        field(&out, "second_after"),
        "|",
        "closed after the 421: {out}"
    );
    for i in 0..2 {
        assert!(
            field(&out, &format!("fail{i}")).starts_with("535 5.7.8"),
            "{out}"
        );
    }
    assert_eq!(
        field(&out, "throttled"),
        "454 4.7.0 Too many failed logins, try again later",
        "{out}"
    );
    assert!(seconds(&out, "throttled_took") >= 0.2, "{out}");
    for metric in [
        "mailgate_connections_rejected_total{listener=\"submission\",reason=\"max_connections_per_ip\"} 1",
        "mailgate_connections_rejected_total{listener=\"submissions\",reason=\"max_connections_per_ip\"} 0",
        "mailgate_logins_total{pool=\"imappro\",protocol=\"smtp\",result=\"throttled\"} 1",
        "mailgate_logins_total{pool=\"imap\",protocol=\"smtp\",result=\"too_many_connections\"} 1",
    ] {
        assert!(
            out.lines().any(|l| l == format!("metric {metric}")),
            "no {metric} in:\n{out}"
        );
    }
}

#[test]
fn client_and_backend_connections_carry_the_configured_tcp_keepalive() {
    let stack = Stack::start(false, &["tcp_keepalive: 7s"]);
    let pid = stack.mailgate.pid().expect("pid");
    let dovecot = stack._dovecot.imap_addr().port();
    let out = stack.python(&format!(
        r#"{PY_KEEPALIVE_TIMERS}
s, reply = imap_session("alice@skydesk.jp", "alice-pass")
print("login=" + reply)
time.sleep(0.5)  # the login reply acknowledged: no retransmission timer in the way
keepalive_timers({pid}, IMAPS, {dovecot})
logout(s)
"#
    ));
    assert!(field(&out, "login").starts_with("l1 OK"), "{out}");
    for side in ["client", "backend"] {
        let secs = keepalive_left(&out, side);
        assert!(
            secs > 0.0 && secs <= 7.0,
            "{side}: the timer is the kernel's default, not limits.tcp_keepalive: {out}"
        );
    }
}
