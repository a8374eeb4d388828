//! IMAP end to end: real Dovecot instances behind mailgate (one per pool, each with a master
//! user and `login_trusted_networks` for loopback), real clients in front (Python `imaplib`,
//! `curl`, `mbsync`, and NSS's `tstclnt` and GnuTLS' `gnutls-cli` for those TLS stacks), the
//! real `mailgate` binary in between.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{
    gnutls_cli, nss_db, run_cmd, run_mbsync, run_python, run_python_args, tstclnt, Dovecot,
    DovecotOpts, Launch, TlsVersion,
};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Demo accounts of `config/accounts.yaml` by the Dovecot (pool) that holds their mail.
const CONSUMER_USERS: [(&str, &str); 5] = [
    ("alice@skydesk.jp", "alice-pass"),
    ("bob@skydesk.jp", "bob-pass"),
    ("carol@skydesk.jp", "carol-app-pass"),
    ("eve@skydesk.jp", "eve-pass"),
    ("frank@skydesk.jp", "frank-pass"),
];
const ORGANISATION_USERS: [(&str, &str); 3] = [
    ("dave@example.com", "dave-pass"),
    ("sam@strict.example", "sam-pass"),
    ("mallory@smtpoff.example", "mallory-pass"),
];

/// Python prelude: TLS without verification (the development certificate), a connect helper
/// that can pick the client's source address, and a login that prints what the client saw.
const PRELUDE: &str = r#"
import imaplib, socket, ssl, sys
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE

class Client(imaplib.IMAP4_SSL):
    source = None
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=self.source)
        return self.ssl_context.wrap_socket(sock, server_hostname="imap.skydesk.jp")

def connect(port, source=None):
    Client.source = (source, 0) if source else None
    return Client("127.0.0.1", port, ssl_context=CTX, timeout=20)

def text(value):
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value.decode() if isinstance(value, bytes) else str(value)

def try_login(port, user, password):
    m = connect(port)
    try:
        typ, data = m.login(user, password)
        return m, typ + " " + text(data)
    except imaplib.IMAP4.error as e:
        return m, "NO " + text(e.args[0])
"#;

/// Two Dovecots (pools `imap` and `imappro`) holding the demo accounts, each INBOX seeded with
/// a message that names its pool, and mailgate in front.
struct Setup {
    consumer: Dovecot,
    organisation: Dovecot,
    mailgate: Mailgate,
}

fn dovecot(users: &[(&str, &str)], pool: &str) -> Dovecot {
    let mut opts = DovecotOpts::default().master(MASTER.0, MASTER.1);
    for (user, password) in users {
        opts = opts.user(user, password);
    }
    let dovecot = Dovecot::start(opts);
    for (user, _) in users {
        let message = format!(
            "From: postmaster@skydesk.jp\r\nTo: {user}\r\nSubject: welcome from pool {pool}\r\n\r\nThis mailbox lives in pool {pool}.\r\n"
        );
        dovecot.deliver(user, "INBOX", message.as_bytes());
    }
    dovecot
}

fn pool(dovecot: &Dovecot) -> Pool {
    Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1)
}

impl Setup {
    fn start() -> Setup {
        Setup::with(|opts| opts)
    }

    fn with(customize: impl FnOnce(MailgateOpts) -> MailgateOpts) -> Setup {
        let consumer = dovecot(&CONSUMER_USERS, "imap");
        let organisation = dovecot(&ORGANISATION_USERS, "imappro");
        let opts = customize(MailgateOpts::new(pool(&consumer), pool(&organisation)));
        let mailgate = Mailgate::start(&opts);
        Setup {
            consumer,
            organisation,
            mailgate,
        }
    }

    fn imaps(&self) -> String {
        self.mailgate.port("imaps").to_string()
    }

    /// Runs `body` after the prelude with `PORT` = the implicit-TLS listener's port.
    fn python(&self, body: &str) -> String {
        let script = format!("{PRELUDE}\nPORT = int(sys.argv[1])\n{body}");
        let out = run_python_args(&script, &[&self.imaps()], CLIENT_TIMEOUT);
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}",
            self.mailgate.log()
        );
        out.stdout
    }
}

#[test]
fn logins_land_in_their_pool_with_imaplib_and_curl() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
for user, password in [("alice@skydesk.jp", "alice-pass"), ("Alice", "alice-pass"), ("dave@example.com", "dave-pass")]:
    m, result = try_login(PORT, user, password)
    print(user, "login:", result)
    m.select("INBOX")
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    print(user, "subject:", data[0][1].decode().strip())
    m.logout()
"#,
    );
    assert!(
        out.contains("alice@skydesk.jp subject: Subject: welcome from pool imap\n"),
        "{out}"
    );
    assert!(
        out.contains("Alice subject: Subject: welcome from pool imap\n"),
        "{out}"
    );
    assert!(
        out.contains("dave@example.com subject: Subject: welcome from pool imappro\n"),
        "{out}"
    );
    // The tagged OK carries the backend's post-login capabilities (SORT is not in mailgate's
    // own pre-auth list), under the client's own tag.
    for user in ["alice@skydesk.jp", "Alice", "dave@example.com"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{user} login:")))
            .unwrap_or_default();
        assert!(
            line.contains("OK [CAPABILITY IMAP4rev1")
                && line.contains(" SORT")
                && line.ends_with("] Logged in"),
            "{line}"
        );
    }

    // curl, a different client: a bare user name and an organisation user.
    for (user, pool) in [
        ("alice:alice-pass", "imap"),
        ("dave@example.com:dave-pass", "imappro"),
    ] {
        let url = format!("imaps://127.0.0.1:{}/INBOX;UID=1", setup.imaps());
        let out = run_cmd(
            "curl",
            &["-sSk", "--max-time", "20", "-u", user, &url],
            CLIENT_TIMEOUT,
        );
        assert!(
            out.assert_success()
                .contains(&format!("This mailbox lives in pool {pool}.")),
            "{out}"
        );
    }
    let log = setup.mailgate.log();
    assert!(
        log.contains("user=alice@skydesk.jp pool=imap backend="),
        "{log}"
    );
    assert!(
        log.contains("user=dave@example.com pool=imappro backend="),
        "{log}"
    );
    assert!(
        !log.contains("alice-pass") && !log.contains("dave-pass"),
        "a password reached the log:\n{log}"
    );
}

#[test]
fn every_decision_row_gives_its_reply_to_imaplib() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
cases = [
    ("eve@skydesk.jp", "eve-pass"),
    ("sam@strict.example", "sam-pass"),
    ("bob@skydesk.jp", "bob-pass"),
    ("bob@skydesk.jp", "bob-app-pass"),
    ("carol@skydesk.jp", "carol-app-pass"),
    ("carol@skydesk.jp", "ya29.google-oauth-token"),
    ("alice@skydesk.jp", "wrong-pass"),
    ("nobody@skydesk.jp", "alice-pass"),
]
for user, password in cases:
    m, result = try_login(PORT, user, password)
    print(f"{user} {password} => {result}")
    try:
        m.logout()
    except Exception:
        pass
"#,
    );
    let expect = [
        "eve@skydesk.jp eve-pass => NO [AUTHORIZATIONFAILED] IMAP access is disabled for this account; enable it in your mail settings",
        "sam@strict.example sam-pass => NO [CONTACTADMIN] IMAP access is not allowed by your organisation's policy; contact your administrator",
        "bob@skydesk.jp bob-pass => NO [ALERT] Application-specific password required: https://help.example/app-passwords",
        "carol@skydesk.jp ya29.google-oauth-token => NO [AUTHENTICATIONFAILED] Invalid credentials",
        "alice@skydesk.jp wrong-pass => NO [AUTHENTICATIONFAILED] Invalid credentials",
        "nobody@skydesk.jp alice-pass => NO [AUTHENTICATIONFAILED] Invalid credentials",
    ];
    for line in expect {
        assert!(
            out.lines().any(|l| l == line),
            "missing `{line}` in:\n{out}"
        );
    }
    for ok in [
        "bob@skydesk.jp bob-app-pass => OK [CAPABILITY",
        "carol@skydesk.jp carol-app-pass => OK [CAPABILITY",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(ok)),
            "missing `{ok}` in:\n{out}"
        );
    }
    let log = setup.mailgate.log();
    for word in [
        "imap_disabled",
        "policy_denied",
        "app_password_required",
        "invalid_credentials",
    ] {
        assert!(
            log.contains(&format!("result={word}")),
            "no result={word} in the log:\n{log}"
        );
    }
}

#[test]
fn ten_mib_append_and_fetch_are_byte_identical() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
import base64, hashlib, os, re
body = b"\r\n".join(base64.b64encode(os.urandom(57)) for _ in range(10 * 1024 * 1024 // 78))
msg = b"From: alice@skydesk.jp\r\nTo: alice@skydesk.jp\r\nSubject: big\r\n\r\n" + body + b"\r\n"
m, result = try_login(PORT, "alice", "alice-pass")
typ, data = m.append("INBOX", None, None, msg)
print("append", typ, len(msg))
uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
m.select("INBOX")
typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
got = data[0][1]
print("fetch", typ, len(got), "identical" if got == msg else "DIFFERENT", hashlib.sha256(got).hexdigest() == hashlib.sha256(msg).hexdigest())
m.logout()
"#,
    );
    assert!(out.contains("append OK"), "{out}");
    assert!(out.contains("identical True"), "{out}");
}

#[test]
fn mbsync_through_mailgate_equals_a_direct_sync() {
    let setup = Setup::start();
    // A few hundred messages, appended straight to the backend.
    let seed = format!(
        r#"
import imaplib
m = imaplib.IMAP4("127.0.0.1", {port})
m.login("alice@skydesk.jp", "alice-pass")
for i in range(300):
    msg = f"From: n{{i}}@example.com\r\nTo: alice@skydesk.jp\r\nSubject: message {{i}}\r\nMessage-ID: <m{{i}}@example.com>\r\n\r\nbody {{i}}\r\n" + "line\r\n" * (i % 50)
    m.append("INBOX", "\\Seen" if i % 3 else None, None, msg.encode())
m.logout()
print("seeded")
"#,
        port = setup.consumer.imap_addr().port()
    );
    assert!(run_python(&seed, CLIENT_TIMEOUT)
        .assert_success()
        .contains("seeded"));

    // Each message as (maildir flags, content without mbsync's own per-sync `X-TUID:` line).
    let sync = |name: &str, account: &str| -> Vec<(String, Vec<u8>)> {
        let dir = setup.mailgate.dir().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = format!(
            "{account}\nIMAPStore remote\nAccount acct\n\nMaildirStore local\nPath {d}/\nInbox {d}/INBOX\n\nChannel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n",
            d = dir.display()
        );
        let out = run_mbsync(&dir, &config, CLIENT_TIMEOUT);
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}",
            setup.mailgate.log()
        );
        let mut messages: Vec<(String, Vec<u8>)> = ["cur", "new"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(dir.join("INBOX").join(sub)).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let flags = name
                    .rsplit_once(":2,")
                    .map(|(_, f)| f.to_string())
                    .unwrap_or_default();
                let content = std::fs::read(e.path()).ok()?;
                let text = String::from_utf8_lossy(&content);
                let kept: String = text
                    .split_inclusive('\n')
                    .filter(|l| !l.starts_with("X-TUID: "))
                    .collect();
                Some((flags, kept.into_bytes()))
            })
            .collect();
        messages.sort();
        messages
    };
    let through = sync(
        "through",
        &format!(
            "IMAPAccount acct\nHost localhost\nPort {}\nUser alice\nPass alice-pass\nSSLType IMAPS\nCertificateFile {}\n",
            setup.imaps(),
            setup.mailgate.cert_path().display()
        ),
    );
    let direct = sync(
        "direct",
        &format!(
            "IMAPAccount acct\nHost 127.0.0.1\nPort {}\nUser alice@skydesk.jp\nPass alice-pass\nSSLType None\nAuthMechs LOGIN\n",
            setup.consumer.imap_addr().port()
        ),
    );
    assert_eq!(through.len(), 301, "300 seeded + the welcome message");
    let seen = through
        .iter()
        .filter(|(flags, _)| flags.contains('S'))
        .count();
    assert_eq!(seen, 200, "flags did not come through");
    assert_eq!(through.len(), direct.len());
    for (a, b) in through.iter().zip(&direct) {
        assert!(
            a == b,
            "mbsync through mailgate and direct differ:\n{} {}\n---\n{} {}",
            a.0,
            String::from_utf8_lossy(&a.1),
            b.0,
            String::from_utf8_lossy(&b.1)
        );
    }
}

#[test]
fn starttls_discards_pipelined_commands_and_login_before_tls_is_refused() {
    let setup = Setup::start();
    let script = r#"
import socket, ssl, sys, time
port = int(sys.argv[1])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE

def lines(sock, until, limit=5.0):
    data, end = b"", time.time() + limit
    sock.settimeout(0.5)
    while until not in data and time.time() < end:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")

s = socket.create_connection(("127.0.0.1", port), 10)
print("GREETING", lines(s, b"\r\n").strip())
s.sendall(b"p LOGIN alice alice-pass\r\n")
print("PLAIN-LOGIN", lines(s, b"p ").strip())
s.sendall(b"a STARTTLS\r\nz NOOP\r\n")
print("STARTTLS", lines(s, b"a OK").strip())
t = ctx.wrap_socket(s, server_hostname="imap.skydesk.jp")
t.sendall(b"b CAPABILITY\r\n")
after = lines(t, b"b OK")
time.sleep(0.5)
after += lines(t, b"never", 1.0)
print("AFTER", after.replace("\r\n", " | "))
"#;
    let out = run_python_args(
        script,
        &[&setup.mailgate.port("imap").to_string()],
        CLIENT_TIMEOUT,
    );
    let out = out.assert_success();
    assert!(
        out.contains("GREETING * OK [CAPABILITY IMAP4rev1")
            && out.contains("STARTTLS LOGINDISABLED"),
        "{out}"
    );
    assert!(out.contains("PLAIN-LOGIN p NO [PRIVACYREQUIRED]"), "{out}");
    assert!(out.contains("STARTTLS a OK"), "{out}");
    let after = out
        .lines()
        .find(|l| l.starts_with("AFTER"))
        .unwrap_or_default();
    assert!(after.contains("b OK"), "{out}");
    assert!(
        after.contains("AUTH=PLAIN") && !after.contains("LOGINDISABLED"),
        "{out}"
    );
    assert!(
        !after.contains("z "),
        "the pipelined `z NOOP` was answered: {out}"
    );
}

/// A real OpenSSL client (Python's `ssl` over memory BIOs, so the test holds the client's
/// bytes back): on the implicit-TLS listener with TLS 1.3, the greeting comes with the
/// server's handshake flight, before the client has sent its `Finished`; the client then sends
/// its `Finished` and `LOGIN` in one write and is logged in.
#[test]
fn the_tls13_greeting_arrives_before_the_clients_finished_leaves() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
import time
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname="imap.skydesk.jp")
s = socket.create_connection(("127.0.0.1", PORT), 10)
s.settimeout(5)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
s.sendall(outgoing.read())  # the ClientHello, nothing else
held, greeting, done = b"", b"", False
deadline = time.time() + 5
while b"\r\n" not in greeting and time.time() < deadline:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    incoming.write(chunk)
    if not done:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            continue
    held += outgoing.read()  # the client's Finished: held back, not sent
    try:
        greeting += tls.read(4096)
    except ssl.SSLWantReadError:
        pass
print("VERSION", tls.version())
print("HELD", len(held))
print("EARLY", greeting.decode(errors="replace").strip())
tls.write(b"a1 LOGIN alice alice-pass\r\n")
s.sendall(held + outgoing.read())  # Finished and LOGIN together
reply = b""
while b"a1 " not in reply:
    chunk = s.recv(65536)
    if not chunk:
        break
    incoming.write(chunk)
    try:
        reply += tls.read(65536)
    except ssl.SSLWantReadError:
        pass
print("LOGIN", reply.decode(errors="replace").split("a1 ")[-1].split(" ")[0])
"#,
    );
    assert!(out.contains("VERSION TLSv1.3"), "{out}");
    let held = out
        .lines()
        .find_map(|l| l.strip_prefix("HELD "))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    assert!(held > 0, "the client had its Finished to send: {out}");
    assert!(
        out.contains("EARLY * OK [CAPABILITY IMAP4rev1"),
        "no greeting before the client's Finished:\n{out}\n--- mailgate ---\n{}",
        setup.mailgate.log()
    );
    assert!(out.contains("LOGIN OK"), "{out}");
}

/// The TLS stacks of mail clients that Python, curl and mbsync (all OpenSSL) do not cover:
/// NSS, Thunderbird's (through its `tstclnt`), and GnuTLS, that of Evolution and Geary
/// (`gnutls-cli`). Each logs in, reads its pool's message and logs out over implicit TLS 1.3
/// (where the greeting comes as 0.5-RTT data) and 1.2; GnuTLS also after `STARTTLS`.
#[test]
fn nss_and_gnutls_clients_log_in_read_and_log_out() {
    let setup = Setup::start();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let db = nss_db(dir.path());
    let (imaps, imap) = (setup.mailgate.port("imaps"), setup.mailgate.port("imap"));
    let name = "imap.skydesk.jp";
    let nss = |version| tstclnt(imaps, name, &db, version);
    let gnutls = |version| gnutls_cli(imaps, name, version, None);
    let gnutls_starttls = || gnutls_cli(imap, name, TlsVersion::V13, Some("imap"));
    // (name, client, what gnutls-cli says it negotiated, whether the greeting is ours to read:
    // after STARTTLS gnutls-cli has read it itself)
    let clients: [(&str, Launch, Option<&str>, bool); 5] = [
        ("NSS, TLS 1.3", &|| nss(TlsVersion::V13), None, true),
        ("NSS, TLS 1.2", &|| nss(TlsVersion::V12), None, true),
        (
            "GnuTLS, TLS 1.3",
            &|| gnutls(TlsVersion::V13),
            Some("(TLS1.3-"),
            true,
        ),
        (
            "GnuTLS, TLS 1.2",
            &|| gnutls(TlsVersion::V12),
            Some("(TLS1.2-"),
            true,
        ),
        (
            "GnuTLS, STARTTLS",
            &gnutls_starttls,
            Some("(TLS1.3-"),
            false,
        ),
    ];
    for (name, spawn, description, greeted) in clients {
        let mut client = spawn();
        let mut step = |send: &str, needle: &str| -> String {
            client
                .exchange(send, needle, CLIENT_TIMEOUT)
                .unwrap_or_else(|e| {
                    panic!("{name}: {e}\n--- mailgate ---\n{}", setup.mailgate.log())
                })
        };
        if let Some(description) = description {
            // gnutls-cli describes the session it made before handing over the terminal.
            step("", description);
        }
        if greeted {
            let greeting = step("", "* OK");
            assert!(
                greeting.contains("* OK [CAPABILITY IMAP4rev1"),
                "{name}: {greeting}"
            );
        }
        let login = step("a LOGIN alice alice-pass\r\n", "a ");
        assert!(login.trim_end().ends_with("Logged in"), "{name}: {login}");
        assert!(login.contains("a OK "), "{name}: {login}");
        step("b SELECT INBOX\r\n", "b OK");
        let fetched = step("c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n", "c OK");
        assert!(
            fetched.contains("Subject: welcome from pool imap"),
            "{name}: {fetched}"
        );
        let logout = step("d LOGOUT\r\n", "d OK");
        assert!(logout.contains("* BYE"), "{name}: {logout}");
    }
}

#[test]
fn the_backend_logs_the_clients_real_address_and_id_but_no_forged_address() {
    let setup = Setup::start();
    // The client's own ID before login: its name reaches Dovecot, quote and all; the
    // address it claims does not (only mailgate says `x-` things).
    let out = setup.python(
        r#"
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")
m = connect(PORT, source="127.0.0.2")
print(m.xatom("ID", '("name" "Thunder\\"bird" "x-originating-ip" "192.0.2.66")')[0])
print(m.login("alice", "alice-pass")[0])
m.logout()
"#,
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["OK", "OK"], "{out}");
    // mailgate connects from 127.0.0.1; Dovecot logs the client (127.0.0.2) through ID.
    let log = setup
        .consumer
        .wait_for_log("Login: user=<alice@skydesk.jp>", Duration::from_secs(10));
    assert!(log.contains("rip=127.0.0.2,"), "{log}");
    let id = setup
        .consumer
        .wait_for_log("ID sent:", Duration::from_secs(10));
    assert!(id.contains("x-originating-ip=127.0.0.2"), "{id}");
    assert!(id.contains(r#"name=Thunder"bird"#), "{id}");
    assert!(!id.contains("192.0.2.66"), "{id}");
    let session = setup
        .mailgate
        .wait_for_log("client=127.0.0.2:", Duration::from_secs(10));
    assert!(session.contains("result=ok"), "{session}");
}

/// A user mailgate knows whom the backend does not (not provisioned there yet): mailgate has
/// proven the password, Dovecot refuses the master login, and the client hears "temporarily
/// unavailable", not "wrong password", so it keeps the password and retries later.
#[test]
fn a_backend_that_refuses_the_master_login_is_unavailable_not_a_wrong_password() {
    let unprovisioned = dovecot(&[], "imap");
    let organisation = dovecot(&ORGANISATION_USERS, "imappro");
    let mailgate = Mailgate::start(&MailgateOpts::new(
        pool(&unprovisioned),
        pool(&organisation),
    ));
    let script = format!(
        "{PRELUDE}\nPORT = int(sys.argv[1])\n{}",
        r#"
m, result = try_login(PORT, "alice", "alice-pass")
print("alice:", result)
"#
    );
    let out = run_python_args(
        &script,
        &[&mailgate.port("imaps").to_string()],
        CLIENT_TIMEOUT,
    );
    assert!(out.success(), "{out}\n{}", mailgate.log());
    assert!(
        out.stdout
            .contains("alice: NO [UNAVAILABLE] Mail server temporarily unavailable"),
        "{out}\n{}",
        mailgate.log()
    );
    // The refusal was Dovecot's, to the master login.
    let log = unprovisioned.wait_for_log("alice@skydesk.jp", Duration::from_secs(10));
    assert!(!log.contains("Login: user=<alice@skydesk.jp>"), "{log}");
    let session = mailgate.wait_for_log("result=backend_unavailable", Duration::from_secs(10));
    assert!(session.contains("login refused"), "{session}");
    assert_eq!(
        mailgate.metric(
            "mailgate_logins_total{pool=\"imap\",protocol=\"imap\",result=\"backend_unavailable\"}"
        ),
        1
    );
}

/// A pool backend written `localhost:PORT` (as operators write host names): mailgate resolves
/// it itself (hickory, `/etc/hosts`, no DNS server needed) and the login reaches Dovecot.
#[test]
fn a_backend_named_by_host_name_serves_logins() {
    let setup = Setup::with(|mut opts| {
        opts.imap = opts.imap.host("localhost");
        opts
    });
    let out = setup.python(
        r#"
m, result = try_login(PORT, "alice", "alice-pass")
print("login:", result)
m.select("INBOX")
typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
print("subject:", data[0][1].decode().strip())
m.logout()
"#,
    );
    assert!(out.contains("login: OK [CAPABILITY IMAP4rev1"), "{out}");
    assert!(
        out.contains("subject: Subject: welcome from pool imap\n"),
        "{out}"
    );
    let backend = format!("backend=localhost:{}", setup.consumer.imap_addr().port());
    let log = setup
        .mailgate
        .wait_for_log(&backend, Duration::from_secs(10));
    let session = log
        .lines()
        .find(|l| l.contains(&backend) && l.contains("result="))
        .unwrap_or_default();
    assert!(session.contains("result=ok"), "{log}");
}

/// A port nothing listens on.
fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}

#[test]
fn an_unreachable_backend_makes_the_login_try_the_next_in_the_users_order() {
    // Pick a dead address that ranks before the live Dovecot for alice, so the login must
    // move on (the order is mailgate's own rendezvous hash).
    let consumer = dovecot(&CONSUMER_USERS, "imap");
    let live = consumer.imap_addr().to_string();
    let dead = loop {
        let candidate = dead_port().to_string();
        let probe = mailgate::routing::Pool::new(
            "imap",
            mailgate::routing::Backends::new(
                vec![
                    mailgate::routing::Backend::new(candidate.clone()),
                    mailgate::routing::Backend::new(live.clone()),
                ],
                Vec::new(),
            ),
            mailgate::backend::Transport::plain(
                mailgate::resolver::Resolver::system().expect("resolver"),
            ),
            mailgate::routing::ImapLogin::Passthrough,
            mailgate::config::SmtpLogin::Xclient,
            mailgate::config::HealthConfig::default(),
        );
        if probe.order(mailgate::config::Protocol::Imap, "alice@skydesk.jp")[0].address == candidate
        {
            break candidate.parse::<SocketAddr>().expect("addr");
        }
    };
    let organisation = dovecot(&ORGANISATION_USERS, "imappro");
    let imap = Pool::master(&[dead, consumer.imap_addr()], &[], MASTER.0, MASTER.1);
    let mailgate = Mailgate::start(&MailgateOpts::new(imap, pool(&organisation)));
    let script = format!(
        "{PRELUDE}\nm, r = try_login({}, 'alice', 'alice-pass')\nprint(r)\n",
        mailgate.port("imaps")
    );
    let out = run_python(&script, CLIENT_TIMEOUT);
    assert!(
        out.assert_success().starts_with("OK [CAPABILITY"),
        "{out}\n{}",
        mailgate.log()
    );
    let log = mailgate.wait_for_log("trying the next", Duration::from_secs(5));
    assert!(
        log.contains(&format!("backend={}", consumer.imap_addr())),
        "{log}"
    );
}

/// A Python client (run with `-c`) that does its setup, prints `ready`, waits for a line on
/// stdin, then finishes: the test acts in between (stops a backend, signals mailgate).
struct Paused {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Paused {
    /// Starts the client and waits (bounded) for its `ready`.
    #[track_caller]
    fn start(script: &str, mailgate_log: impl Fn() -> String) -> Paused {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args(["-u", "-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while !line.contains("ready") {
                line.clear();
                if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
            }
            let _ = tx.send(line);
            stdout
        });
        let line = rx.recv_timeout(CLIENT_TIMEOUT).unwrap_or_default();
        if !line.contains("ready") {
            let _ = child.kill();
        }
        let stdout = reader.join().expect("reader");
        assert!(
            line.contains("ready"),
            "the client did not get ready: {line:?}\n{}",
            mailgate_log()
        );
        Paused { child, stdout }
    }

    /// Lets the client go on; everything it printed after `ready`.
    fn resume(mut self) -> String {
        use std::io::{Read, Write};
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let _ = self.child.wait();
        rest
    }
}

#[test]
fn a_stopped_backend_gives_unavailable_before_login_and_a_prompt_close_after() {
    let mut setup = Setup::start();
    // Mid-session: log in, then stop the backend under the session.
    let script = format!(
        r#"{PRELUDE}
import time
m, r = try_login({port}, "dave@example.com", "dave-pass")
print("login", r.split()[0])
m.select("INBOX")
print("ready", flush=True)
sys.stdin.readline()
start = time.time()
try:
    m.noop()
    print("noop answered")
except Exception as e:
    print("closed after", round(time.time() - start, 1), type(e).__name__)
"#,
        port = setup.imaps()
    );
    let client = Paused::start(&script, || setup.mailgate.log());
    setup.organisation.stop();
    let rest = client.resume();
    assert!(rest.contains("closed after"), "{rest}");
    let secs: f64 = rest
        .split_ascii_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(99.0);
    assert!(secs < 10.0, "the close took {secs} s: {rest}");

    // Before login: the organisation pool's only backend is gone.
    let out = setup.python(
        r#"
m, r = try_login(PORT, "dave@example.com", "dave-pass")
print(r)
"#,
    );
    assert!(
        out.contains("NO [UNAVAILABLE] Mail server temporarily unavailable"),
        "{out}"
    );
    assert!(setup.mailgate.log().contains("result=backend_unavailable"));
}

#[test]
fn sigterm_lets_a_spliced_session_work_until_the_drain_deadline() {
    let mut setup = Setup::with(|o| o.drain_timeout("4s"));
    let script = format!(
        r#"{PRELUDE}
import time
m, r = try_login({port}, "alice", "alice-pass")
m.select("INBOX")
# A second client that has not logged in yet.
waiting = CTX.wrap_socket(socket.create_connection(("127.0.0.1", {port}), 10), server_hostname="imap.skydesk.jp")
waiting.recv(4096)
print("ready", flush=True)
sys.stdin.readline()
start = time.time()
waiting.settimeout(3)
try:
    said = waiting.recv(4096).decode(errors="replace").strip()
except Exception as e:
    said = "nothing: " + type(e).__name__
print("preauth", said, flush=True)
for i in range(20):
    try:
        typ, _ = m.noop()
        print("noop", round(time.time() - start, 1), typ, flush=True)
    except Exception as e:
        print("closed", round(time.time() - start, 1), type(e).__name__, flush=True)
        break
    time.sleep(0.5)
"#,
        port = setup.imaps()
    );
    let client = Paused::start(&script, || setup.mailgate.log());
    setup.mailgate.signal("TERM");
    setup
        .mailgate
        .wait_for_log("draining", Duration::from_secs(5));
    // Draining: no new connections. The log line comes from the signal handler; each
    // listener's accept loop closes its socket as it sees the phase change, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::net::TcpStream::connect(setup.mailgate.addr("imaps")).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "new connections still accepted 2 s into draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest = client.resume();
    // NOOPs keep working for about the drain deadline, then the session is closed.
    let worked: Vec<f64> = rest
        .lines()
        .filter(|l| l.starts_with("noop") && l.ends_with("OK"))
        .filter_map(|l| l.split_ascii_whitespace().nth(1)?.parse().ok())
        .collect();
    assert!(
        worked.iter().any(|&t| t >= 2.0),
        "NOOP stopped working early:\n{rest}"
    );
    assert!(
        rest.contains("closed"),
        "the session was not closed at the deadline:\n{rest}"
    );
    // The session that had not logged in was told goodbye when the drain began.
    assert!(
        rest.lines()
            .any(|l| l == "preauth * BYE Server shutting down"),
        "{rest}"
    );
    // The process exits after the drain.
    let status = setup.mailgate.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "mailgate did not exit: {status:?}\n{}",
        setup.mailgate.log()
    );
    let log = setup.mailgate.log();
    assert!(log.contains("end=shutdown"), "{log}");
}

/// The listening sockets on `port` (IPv4, any address), from `/proc/net/tcp`.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let fields: Vec<&str> = l.split_ascii_whitespace().collect();
            fields.get(1).is_some_and(|a| a.ends_with(&local)) && fields.get(3) == Some(&"0A")
        })
        .count()
}

/// Each `mg-worker-N` thread of `pid` and the nanoseconds it has run on a CPU so far
/// (`/proc/PID/task/TID/schedstat`, first field).
fn worker_run_times(pid: u32) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("tasks: {e}"))
        .filter_map(Result::ok)
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let name = name.trim_end().to_string();
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ran = stat.split_whitespace().next()?.parse().ok()?;
            name.starts_with("mg-worker-").then_some((name, ran))
        })
        .collect()
}

#[test]
fn each_worker_listens_serves_logins_and_a_second_instance_cannot_share_the_port() {
    let setup = Setup::with(|o| o.workers(3));
    let port = setup.mailgate.port("imaps");
    // One socket per worker on the listener's port, and a thread each.
    assert_eq!(listening_sockets(port), 3, "listening sockets on {port}");
    let pid = setup.mailgate.pid().unwrap_or_else(|| panic!("no pid"));
    let before = worker_run_times(pid);
    assert_eq!(before.len(), 3, "worker threads: {before:?}");

    // Thirty sessions, six at a time (under the per-user-and-address cap of 10; each one a new
    // connection the kernel gives to one of the sockets): each logs in, reads its mailbox and
    // logs out.
    let out = setup.python(
        r#"
import threading
results = []
def sessions():
    for _ in range(5):
        try:
            m, r = try_login(PORT, "alice", "alice-pass")
            typ, data = m.select("INBOX")
            m.logout()
            results.append(r.split()[0] + " " + typ + " " + text(data))
        except Exception as e:
            results.append("error " + repr(e))
threads = [threading.Thread(target=sessions) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
for r in sorted(results): print(r)
"#,
    );
    assert_eq!(
        out.lines().filter(|l| *l == "OK OK 1").count(),
        30,
        "every session logged in and saw its one message:\n{out}"
    );
    // An idle worker is never woken (its runtime has no timers of its own), so one that ran
    // since served some of the sessions: the kernel spread them over every socket.
    let after = worker_run_times(pid);
    for (name, ran) in &after {
        let earlier = before.get(name).copied().unwrap_or_default();
        assert!(
            *ran > earlier,
            "{name} served none of the 30 sessions: {before:?} {after:?}"
        );
    }

    // A second mailgate with the same port is refused before it binds anything, as a plain
    // bind would be: SO_REUSEPORT does not let it share the port.
    let config = std::fs::read_to_string(setup.mailgate.dir().join("mailgate.yaml"))
        .unwrap_or_else(|e| panic!("config: {e}"));
    let imaps_line = config
        .lines()
        .find(|l| l.contains("name: imaps,"))
        .unwrap_or_else(|| panic!("no imaps listener in:\n{config}"));
    let taken = imaps_line.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let path = dir.path().join("mailgate.yaml");
    std::fs::write(&path, config.replace(imaps_line, &taken))
        .unwrap_or_else(|e| panic!("writing config: {e}"));
    let second = run_cmd(
        env!("CARGO_BIN_EXE_mailgate"),
        &["run", "--config", &path.to_string_lossy()],
        CLIENT_TIMEOUT,
    );
    assert!(!second.success(), "a second instance started:\n{second}");
    assert!(
        second
            .stderr
            .contains(&format!("listeners `imaps`: cannot bind 127.0.0.1:{port}")),
        "{second}"
    );
    assert_eq!(listening_sockets(port), 3, "the first instance's sockets");
}

#[test]
fn silent_or_garbage_clients_get_a_bye_before_login() {
    let setup = Setup::with(|o| o.limit("preauth_timeout: 2s"));
    let script = r#"
import socket, ssl, sys, time
port = int(sys.argv[1])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE

def read_all(sock, limit):
    data, end = b"", time.time() + limit
    sock.settimeout(0.5)
    while time.time() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return data.decode(errors="replace"), round(time.time() - start, 1)
        data += chunk
    return data.decode(errors="replace"), None

# A client that says nothing is told goodbye at the pre-auth deadline.
start = time.time()
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10), server_hostname="imap.skydesk.jp")
data, closed_at = read_all(s, 8)
print("SILENT", closed_at, data.replace("\r\n", " | "))

# Garbage: five bad commands, then BYE and close.
start = time.time()
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10), server_hostname="imap.skydesk.jp")
s.sendall(b"".join(b"x%d FROB\r\n" % i for i in range(8)))
data, closed_at = read_all(s, 5)
print("GARBAGE", closed_at, data.replace("\r\n", " | "))
"#;
    let out = run_python_args(script, &[&setup.imaps()], CLIENT_TIMEOUT);
    let out = out.assert_success();
    let silent = out
        .lines()
        .find(|l| l.starts_with("SILENT"))
        .unwrap_or_default();
    assert!(silent.contains("* BYE"), "{out}");
    let secs: f64 = silent
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(99.0);
    assert!(
        (1.5..6.0).contains(&secs),
        "closed after {secs} s, deadline 2 s: {out}"
    );
    let garbage = out
        .lines()
        .find(|l| l.starts_with("GARBAGE"))
        .unwrap_or_default();
    assert_eq!(garbage.matches(" BAD ").count(), 5, "{out}");
    assert!(
        garbage.contains("* BYE Too many invalid commands") && !garbage.contains("x5 "),
        "{out}"
    );
    assert!(!garbage.contains("None"), "not closed: {out}");
    let log = setup.mailgate.log();
    assert!(
        log.contains("end=preauth_timeout") && log.contains("end=protocol_error"),
        "{log}"
    );
}
