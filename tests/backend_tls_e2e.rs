//! TLS on the backend leg, end to end: a real Dovecot and a real Postfix serving STARTTLS and
//! implicit TLS with certificates from a test CA, mailgate in front with `backend_tls:
//! starttls` on one pool and `implicit` on the other (`backend_ca` = the test CA), real clients
//! (Python `imaplib` / `smtplib`) connecting from 127.0.0.2 so the backends' record of the
//! client address is visibly the client's and not mailgate's (127.0.0.1).
//!
//! The consumer pool (`imap`: alice@skydesk.jp) reaches its backends by IP address with
//! STARTTLS; the organisation pool (`imappro`: dave@example.com) by the name `localhost` with
//! implicit TLS. So both the IP-address and the DNS-name checks of the certificate run.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::dovecot::ServerTls;
use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{run_python_args, Dovecot, DovecotOpts, Postfix, PostfixOpts};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// Fast health checks, so a backend's state shows in the metrics within a second.
const HEALTH: &str = "{ interval: 500ms, timeout: 400ms, fall: 1, rise: 1 }";

const PRELUDE: &str = r#"
import imaplib, smtplib, socket, ssl, sys
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
SOURCE = ("127.0.0.2", 0)

class Imap(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=SOURCE)
        return self.ssl_context.wrap_socket(sock, server_hostname="imap.skydesk.jp")

def imap_login(port, user, password):
    m = Imap("127.0.0.1", port, ssl_context=CTX, timeout=20)
    try:
        typ, data = m.login(user, password)
        return m, typ + " " + data[0].decode()
    except imaplib.IMAP4.error as e:
        text = e.args[0]
        return m, "NO " + (text.decode() if isinstance(text, bytes) else str(text))

def smtps(port):
    return smtplib.SMTP_SSL("127.0.0.1", port, context=CTX, source_address=SOURCE, timeout=30)

def submission(port):
    s = smtplib.SMTP("127.0.0.1", port, source_address=SOURCE, timeout=30)
    s.starttls(context=CTX)
    return s

def smtp_login(s, user, password):
    try:
        code, text = s.login(user, password)
    except smtplib.SMTPAuthenticationError as e:
        code, text = e.smtp_code, e.smtp_error
    return "%d %s" % (code, text.decode() if isinstance(text, bytes) else text)

IMAPS, SMTPS, SUBMISSION = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
"#;

/// A test CA: PEM files of its certificate, and leaves it signs.
struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("mgtest-pki-")
            .tempdir()
            .expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_owned());
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write CA");
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, for `backend_ca`.
    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for 127.0.0.1 (IP SAN) and `localhost`, written as `NAME.crt` / `NAME.key`.
    fn leaf(&self, name: &str) -> ServerTls {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let tls = ServerTls {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            client_ca: None,
            client_certificate_required: false,
        };
        std::fs::write(&tls.cert, cert.pem()).expect("write leaf");
        std::fs::write(&tls.key, key.serialize_pem()).expect("write key");
        tls
    }

    /// A client certificate (CN `mailgate`, for client authentication) valid until 1 January
    /// of `until_year`, written as `NAME.crt` / `NAME.key` (over an earlier one of that name).
    fn client(&self, name: &str, until_year: i32) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::CommonName, "mailgate");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_after = rcgen::date_time_ymd(until_year, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).expect("client");
        let paths = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&paths.0, cert.pem()).expect("write client");
        std::fs::write(&paths.1, key.serialize_pem()).expect("write key");
        paths
    }
}

/// Dovecot (IMAP with STARTTLS and imaps, LMTP) and Postfix (submission with STARTTLS and an
/// implicit-TLS smtpd) serving `tls`, and mailgate in front: pool `imap` with STARTTLS by IP
/// address, pool `imappro` with implicit TLS by the name `localhost`, both trusting `ca`.
struct Setup {
    dovecot: Dovecot,
    postfix: Postfix,
    mailgate: Mailgate,
}

impl Setup {
    fn start(tls: &ServerTls, ca: &Path) -> Setup {
        let dovecot = Dovecot::start(
            DovecotOpts::default()
                .master(MASTER.0, MASTER.1)
                .user("alice@skydesk.jp", "unused-here")
                .user("dave@example.com", "unused-here")
                .with_lmtp()
                .with_tls(tls.clone()),
        );
        let postfix = Postfix::start(
            PostfixOpts::default()
                .delivering_to(dovecot.lmtp_addr(), &["skydesk.jp", "example.com"])
                .with_tls(tls.clone()),
        );
        let starttls = Pool::master(
            &[dovecot.imap_addr()],
            &[postfix.submission_addr()],
            MASTER.0,
            MASTER.1,
        )
        .tls("starttls", Some(ca));
        let implicit = Pool::master(
            &[dovecot.imaps_addr()],
            &[postfix.submissions_addr()],
            MASTER.0,
            MASTER.1,
        )
        .tls("implicit", Some(ca))
        .host("localhost");
        let mailgate = Mailgate::start(&MailgateOpts::new(starttls, implicit).health(HEALTH));
        Setup {
            dovecot,
            postfix,
            mailgate,
        }
    }

    /// Runs `body` after the prelude; returns what it printed, panicking with every log
    /// unless it succeeded.
    fn python(&self, body: &str) -> String {
        let ports =
            ["imaps", "submissions", "submission"].map(|l| self.mailgate.port(l).to_string());
        let args: Vec<&str> = ports.iter().map(String::as_str).collect();
        let out = run_python_args(&format!("{PRELUDE}\n{body}"), &args, CLIENT_TIMEOUT);
        assert!(out.success(), "{out}\n{}", self.logs());
        out.stdout
    }

    fn logs(&self) -> String {
        format!(
            "--- mailgate ---\n{}\n--- dovecot ---\n{}\n--- postfix ---\n{}",
            self.mailgate.log(),
            self.dovecot.log(),
            self.postfix.log()
        )
    }

    /// Polls `/metrics` until every `mailgate_backend_up` sample reads `want`; returns them.
    fn wait_backends_up(&self, want: u8, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples: Vec<String> = metrics(self.mailgate.metrics_addr())
                .lines()
                .filter(|l| l.starts_with("mailgate_backend_up{"))
                .map(str::to_owned)
                .collect();
            if samples.len() == 4 && samples.iter().all(|s| s.ends_with(&format!(" {want}"))) {
                return samples;
            }
            assert!(
                Instant::now() < deadline,
                "backends not all {want} after {timeout:?}: {samples:#?}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The `/metrics` text.
fn metrics(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

const SEED: &[u8] =
    b"From: postmaster@example.com\r\nSubject: seeded over TLS\r\n\r\nseeded body\r\n";

#[test]
fn imap_and_smtp_reach_starttls_and_implicit_tls_backends() {
    let ca = TestCa::new("mailgate backend test CA");
    let setup = Setup::start(&ca.leaf("backend"), &ca.ca_path());
    for user in ["alice@skydesk.jp", "dave@example.com"] {
        setup.dovecot.deliver(user, "INBOX", SEED);
    }
    // Health probes speak TLS too: every backend stays up.
    setup.wait_backends_up(1, Duration::from_secs(5));

    let out = setup.python(
        r#"
for user, password in [("alice", "alice-pass"), ("dave@example.com", "dave-pass")]:
    m, r = imap_login(IMAPS, user, password)
    print(user, "LOGIN", r)
    m.select("INBOX")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    print(user, "BODY", data[0][1].decode().replace("\r\n", "|"))
    m.logout()
"#,
    );
    for user in ["alice", "dave@example.com"] {
        assert!(
            out.contains(&format!("{user} LOGIN OK [CAPABILITY IMAP4rev1")),
            "{out}\n{}",
            setup.logs()
        );
        assert!(
            out.contains(&format!(
                "{user} BODY From: postmaster@example.com|Subject: seeded over TLS|"
            )),
            "{out}"
        );
    }
    // A command pipelined behind the login reaches the backend through the TLS leg.
    let out = setup.python(
        r#"
sock = CTX.wrap_socket(socket.create_connection(("127.0.0.1", IMAPS), 20, source_address=SOURCE))
f = sock.makefile("rb")
f.readline()
sock.sendall(b"a LOGIN dave@example.com dave-pass\r\nb EXAMINE INBOX\r\n")
while True:
    line = f.readline().decode()
    if line.startswith(("a ", "b ")):
        print(line.strip())
    if line.startswith("b ") or not line:
        break
"#,
    );
    assert!(out.contains("a OK [CAPABILITY "), "{out}");
    assert!(out.contains("b OK [READ-ONLY]"), "{out}");
    // Dovecot saw the logins over TLS, from the client's address (forwarded by ID).
    for user in ["alice@skydesk.jp", "dave@example.com"] {
        let line = setup
            .dovecot
            .wait_for_log(&format!("Login: user=<{user}>"), Duration::from_secs(5));
        assert!(line.contains("rip=127.0.0.2"), "{line}");
        assert!(line.contains(", TLS,"), "{line}");
    }

    let out = setup.python(
        r#"
s = smtps(SMTPS)
print("alice AUTH", smtp_login(s, "alice", "alice-pass"))
s.sendmail("alice@skydesk.jp", ["dave@example.com"], b"Subject: from alice over TLS\r\n\r\nhello dave\r\n")
s.quit()
s = submission(SUBMISSION)
print("dave AUTH", smtp_login(s, "dave@example.com", "dave-pass"))
s.sendmail("dave@example.com", ["alice@skydesk.jp"], b"Subject: from dave over TLS\r\n\r\nhello alice\r\n")
s.quit()
"#,
    );
    assert!(out.contains("alice AUTH 235 2.7.0"), "{out}");
    assert!(out.contains("dave AUTH 235 2.7.0"), "{out}");
    for (to, from) in [
        ("dave@example.com", "alice@skydesk.jp"),
        ("alice@skydesk.jp", "dave@example.com"),
    ] {
        let messages = setup
            .dovecot
            .wait_for_messages(to, "INBOX", 2, DELIVERY_TIMEOUT);
        let message =
            String::from_utf8_lossy(messages.last().map(Vec::as_slice).unwrap_or_default())
                .into_owned();
        // XCLIENT still works over TLS: the session is the user's, from the client's address.
        assert!(
            message.contains(&format!("(Authenticated sender: {from})")),
            "{message}"
        );
        assert!(message.contains("[127.0.0.2]"), "{message}");
        // ... and Postfix counts the relayed session as TLS and authenticated.
        assert!(message.contains("(using TLSv1.3 with cipher"), "{message}");
        assert!(message.contains("with ESMTPSA id"), "{message}");
    }
    // Postfix saw TLS from mailgate on both smtpd services.
    let log = setup.postfix.log();
    for service in ["postfix/smtpd", "postfix/submissions/smtpd"] {
        assert!(
            log.lines()
                .any(|l| l.contains(service) && l.contains("TLS connection established from")),
            "no TLS by {service}:\n{log}"
        );
    }
}

#[test]
fn a_backend_certificate_from_another_ca_is_refused() {
    let ca = TestCa::new("mailgate backend test CA");
    let stranger = TestCa::new("someone else's CA");
    let setup = Setup::start(&stranger.leaf("backend"), &ca.ca_path());
    // The health probes cannot verify the backends either: all marked down.
    setup.wait_backends_up(0, Duration::from_secs(5));

    let out = setup.python(
        r#"
for user, password in [("alice", "alice-pass"), ("dave@example.com", "dave-pass")]:
    m, r = imap_login(IMAPS, user, password)
    print(user, "IMAP", r)
    s = smtps(SMTPS)
    print(user, "SMTPS", smtp_login(s, user, password))
    s.close()
    s = submission(SUBMISSION)
    print(user, "SUBMISSION", smtp_login(s, user, password))
    s.close()
"#,
    );
    for user in ["alice", "dave@example.com"] {
        assert!(
            out.contains(&format!(
                "{user} IMAP NO [UNAVAILABLE] Mail server temporarily unavailable"
            )),
            "{out}\n{}",
            setup.logs()
        );
        assert!(out.contains(&format!("{user} SMTPS 454 4.7.0")), "{out}");
        assert!(
            out.contains(&format!("{user} SUBMISSION 454 4.7.0")),
            "{out}"
        );
    }
    let log = setup.mailgate.log();
    assert!(
        log.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    // mailgate gave up in the handshake (the backends saw its `unknown ca` alert), and nobody
    // logged in, or had a session handed over, in plaintext or otherwise.
    let dovecot = setup.dovecot.log();
    assert!(dovecot.contains("alert unknown ca"), "{dovecot}");
    assert!(!dovecot.contains("Login: user=<"), "{dovecot}");
    let postfix = setup.postfix.log();
    for service in ["postfix/smtpd", "postfix/submissions/smtpd"] {
        assert!(
            postfix
                .lines()
                .any(|l| l.contains(service) && l.contains("alert unknown ca")),
            "{postfix}"
        );
    }
    assert!(!postfix.contains("sasl_username="), "{postfix}");
    assert!(!postfix.contains("Authenticated sender"), "{postfix}");
}

/// A Dovecot serving `tls` on its implicit-TLS listener, with alice and dave and the master
/// user.
fn imaps_backend(tls: ServerTls) -> Dovecot {
    Dovecot::start(
        DovecotOpts::default()
            .master(MASTER.0, MASTER.1)
            .user("alice@skydesk.jp", "unused-here")
            .user("dave@example.com", "unused-here")
            .with_tls(tls),
    )
}

/// Two pools on `dovecot`'s implicit-TLS listener trusting `ca`: one presenting `cert` /
/// `key`, one without a client certificate.
fn imaps_pools(dovecot: &Dovecot, ca: &TestCa, cert: &Path, key: &Path) -> (Pool, Pool) {
    let without = Pool::master(&[dovecot.imaps_addr()], &[], MASTER.0, MASTER.1)
        .tls("implicit", Some(&ca.ca_path()));
    (without.clone().client_certificate(cert, key), without)
}

/// A Dovecot that lets no one log in without a client certificate from the test CA: the pool
/// with `backend_client_certificate` logs its users in, the pool without is turned away, and a
/// renewed client certificate is presented after `SIGHUP`.
#[test]
fn a_backend_that_requires_a_client_certificate_gets_the_pools() {
    let ca = TestCa::new("mailgate backend test CA");
    let tls = ca
        .leaf("backend")
        .requiring_client_certificates(&ca.ca_path());
    let dovecot = imaps_backend(tls);
    let (cert, key) = ca.client("mailgate-client", 2031);
    let (with_certificate, without) = imaps_pools(&dovecot, &ca, &cert, &key);
    let mailgate = Mailgate::start(&MailgateOpts::new(with_certificate, without).health(HEALTH));
    let logs = || {
        format!(
            "--- mailgate ---\n{}\n--- dovecot ---\n{}",
            mailgate.log(),
            dovecot.log()
        )
    };
    let logins = || {
        // No SMTP here: the prelude's SMTP ports are given the IMAP one, unused.
        let port = mailgate.port("imaps").to_string();
        let args = [port.as_str(); 3];
        let body = r#"
for user, password in [("alice", "alice-pass"), ("dave@example.com", "dave-pass")]:
    m, r = imap_login(IMAPS, user, password)
    print(user, "IMAP", r)
    if r.startswith("OK"):
        print(user, "SELECT", m.select("INBOX")[0])
        m.logout()
"#;
        let out = run_python_args(&format!("{PRELUDE}\n{body}"), &args, CLIENT_TIMEOUT);
        assert!(out.success(), "{out}\n{}", logs());
        out.stdout
    };
    let expiry = || {
        let label = format!(
            "mailgate_tls_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}} ",
            cert.display()
        );
        metrics(mailgate.metrics_addr())
            .lines()
            .find_map(|l| l.strip_prefix(&label).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {label}in the metrics\n{}", logs()))
    };

    let out = logins();
    assert!(out.contains("alice IMAP OK"), "{out}\n{}", logs());
    assert!(out.contains("alice SELECT OK"), "{out}");
    // Dovecot turns the pool without a certificate away; the client hears it as unavailable.
    assert!(
        out.contains("dave@example.com IMAP NO [UNAVAILABLE] Mail server temporarily unavailable"),
        "{out}\n{}",
        logs()
    );
    let log = dovecot.log();
    assert!(log.contains("Login: user=<alice@skydesk.jp>"), "{log}");
    assert!(!log.contains("Login: user=<dave@example.com>"), "{log}");
    // mailgate's log says what the pool lacks.
    assert!(
        mailgate.log().lines().any(|l| l.contains("WARN")
            && l.contains("backend asked for a client certificate; the pool has none")
            && l.contains("pool=imappro ")),
        "{}",
        logs()
    );
    // 2031-01-01T00:00:00Z.
    assert_eq!(expiry(), "1924992000", "{}", logs());

    // Renewed in place (a new key too); after SIGHUP the next handshakes present it.
    ca.client("mailgate-client", 2032);
    mailgate.signal("HUP");
    mailgate.wait_for_log("SIGHUP: reloaded", Duration::from_secs(10));
    assert_eq!(expiry(), "1956528000", "{}", logs());
    let out = logins();
    assert!(out.contains("alice IMAP OK"), "{out}\n{}", logs());

    // A certificate from another CA: the reload loads it (it is a valid pair), Dovecot refuses
    // it, and the pool's logins fail the way they would without one.
    let stranger = TestCa::new("someone else's CA");
    let (other_cert, other_key) = stranger.client("stranger", 2031);
    std::fs::copy(&other_cert, &cert).expect("copy cert");
    std::fs::copy(&other_key, &key).expect("copy key");
    let before = mailgate.log().len();
    mailgate.signal("HUP");
    common::wait_for_text(
        "mailgate's log",
        "SIGHUP: reloaded",
        Duration::from_secs(10),
        || mailgate.log().get(before..).unwrap_or_default().to_owned(),
    );
    let out = logins();
    assert!(
        out.contains("alice IMAP NO [UNAVAILABLE]"),
        "{out}\n{}",
        logs()
    );
}

/// A Dovecot that asks every TLS client for a certificate but logs users in without one: a
/// pool without `backend_client_certificate` sends none, says so once in the log, and turns
/// TLS session resumption off for its backends, because Dovecot 2.3 fails every resumed
/// handshake once it verifies clients ("session id context uninitialized"). Without that,
/// every other connection to the backend failed its handshake.
#[test]
fn a_backend_that_asks_for_a_client_certificate_gets_full_handshakes() {
    let ca = TestCa::new("mailgate backend test CA");
    let tls = ca.leaf("backend").asking_client_certificates(&ca.ca_path());
    let dovecot = imaps_backend(tls);
    let (cert, key) = ca.client("mailgate-client", 2031);
    let (with_certificate, without) = imaps_pools(&dovecot, &ca, &cert, &key);
    let mailgate = Mailgate::start(&MailgateOpts::new(without, with_certificate).health(HEALTH));
    let logs = || {
        format!(
            "--- mailgate ---\n{}\n--- dovecot ---\n{}",
            mailgate.log(),
            dovecot.log()
        )
    };
    // Health probes (every 500 ms) and logins take turns on the backend: eight logins in a
    // row, each a new connection, a second apart, see both.
    let port = mailgate.port("imaps").to_string();
    let args = [port.as_str(); 3];
    let body = r#"
import time
for i in range(8):
    for user, password in [("alice", "alice-pass"), ("dave@example.com", "dave-pass")]:
        m, r = imap_login(IMAPS, user, password)
        print(i, user, "IMAP", r)
        if r.startswith("OK"):
            m.logout()
    time.sleep(0.3)
"#;
    let out = run_python_args(&format!("{PRELUDE}\n{body}"), &args, CLIENT_TIMEOUT);
    assert!(out.success(), "{out}\n{}", logs());
    for i in 0..8 {
        for user in ["alice", "dave@example.com"] {
            let want = format!("{i} {user} IMAP OK");
            assert!(
                out.stdout.contains(&want),
                "no {want:?}:\n{out}\n{}",
                logs()
            );
        }
    }
    let log = mailgate.log();
    assert!(!log.contains("TLS handshake failed"), "{}", logs());
    let asked = "asked for a client certificate";
    assert_eq!(
        log.matches(asked).count(),
        1,
        "one warning for the pool without a certificate, none for the other:\n{}",
        logs()
    );
    assert!(
        log.lines()
            .any(|l| l.contains(asked) && l.contains("pool=imap ") && l.contains("WARN")),
        "{}",
        logs()
    );
    // The pool with a certificate presents it (Dovecot verifies it) and logs its user in.
    let dlog = dovecot.log();
    assert!(dlog.contains("Login: user=<dave@example.com>"), "{dlog}");
}

/// The CAs a pool trusts are read again at `SIGHUP`: a backend whose certificate comes from a
/// new CA is unavailable until the pool's `backend_ca` file holds that CA and mailgate reloads;
/// a broken bundle fails the reload and changes nothing.
#[test]
fn sighup_reads_the_backend_ca_bundle_again() {
    let (old_ca, new_ca) = (TestCa::new("retired CA"), TestCa::new("new CA"));
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("backend-ca.pem");
    std::fs::copy(old_ca.ca_path(), &bundle).expect("bundle");
    let setup = Setup::start(&new_ca.leaf("backend"), &bundle);
    let login = || {
        setup.python(
            r#"
m, r = imap_login(IMAPS, "alice", "alice-pass")
print("alice IMAP", r)
"#,
        )
    };
    let reloads = |result: &str| {
        setup.mailgate.metric(&format!(
            "mailgate_config_reloads_total{{result=\"{result}\"}}"
        ))
    };
    let reload = |result: &str, count: u64| {
        setup.mailgate.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads(result) < count {
            assert!(
                Instant::now() < deadline,
                "no reload {result}\n{}",
                setup.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };

    let out = login();
    assert!(
        out.contains("alice IMAP NO [UNAVAILABLE] Mail server temporarily unavailable"),
        "{out}\n{}",
        setup.logs()
    );

    // Not a bundle: the reload fails with the config's file, line and key, and changes
    // nothing.
    std::fs::write(&bundle, "not a certificate\n").expect("write");
    reload("error", 1);
    let log = setup.mailgate.log();
    let failed = log
        .split("SIGHUP: reload failed")
        .nth(1)
        .unwrap_or_default();
    let place = format!("{}:", setup.mailgate.dir().join("mailgate.yaml").display());
    assert!(
        failed.lines().any(|l| l.contains(&place)
            && l.contains(": pools.imap.backend_ca: `")
            && l.ends_with("backend-ca.pem` holds no CERTIFICATE block")),
        "{log}"
    );
    assert!(login().contains("alice IMAP NO [UNAVAILABLE]"));

    // The new CA in the bundle: after the reload the backend verifies, and alice is in.
    std::fs::copy(new_ca.ca_path(), &bundle).expect("bundle");
    reload("ok", 1);
    let out = login();
    assert!(out.contains("alice IMAP OK"), "{out}\n{}", setup.logs());
    assert_eq!(reloads("error"), 1);
}
