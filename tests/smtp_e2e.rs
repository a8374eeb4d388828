//! SMTP submission end to end: a real Postfix behind mailgate (submission with `XCLIENT` from
//! loopback, delivering over LMTP into a real Dovecot), real clients in front (`swaks`, Python
//! `smtplib` and raw sockets, `curl`, and NSS's `tstclnt` and GnuTLS' `gnutls-cli` for those TLS
//! stacks), the real `mailgate` binary in between.
//!
//! Clients connect from 127.0.0.2 so that the address Postfix records (from `XCLIENT ADDR=`)
//! is visibly the client's and not mailgate's (127.0.0.1).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use common::mail::{message, swaks_auth_reply, unfold};
use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{
    gnutls_cli, nss_db, run_cmd, run_python_args, tstclnt, Dovecot, DovecotOpts, Launch, Output,
    Postfix, PostfixOpts, TlsVersion,
};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// The client's address: not mailgate's, so Postfix's record of it proves XCLIENT worked.
const CLIENT_IP: &str = "127.0.0.2";
const HELP_URL: &str = "https://help.example/app-passwords";

/// Mail users of the demo account file (Dovecot needs them to accept LMTP deliveries).
const MAILBOXES: [&str; 5] = [
    "alice@skydesk.jp",
    "bob@skydesk.jp",
    "carol@skydesk.jp",
    "eve@skydesk.jp",
    "dave@example.com",
];
const DOMAINS: [&str; 4] = [
    "skydesk.jp",
    "example.com",
    "strict.example",
    "smtpoff.example",
];

/// Python prelude: TLS without verification (the development certificate), clients that
/// connect from `CLIENT_IP`, and a raw line reader for tests that look at single replies.
const PRELUDE: &str = r#"
import base64, smtplib, socket, ssl, sys
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
SOURCE = ("127.0.0.2", 0)

def smtps(port):
    return smtplib.SMTP_SSL("127.0.0.1", port, context=CTX, source_address=SOURCE, timeout=30)

def submission(port):
    s = smtplib.SMTP("127.0.0.1", port, source_address=SOURCE, timeout=30)
    s.starttls(context=CTX)
    return s

def raw(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=SOURCE)

def reply(sock):
    """One whole (multi-line) reply, read byte by byte so nothing past it is consumed."""
    lines = []
    while True:
        line = b""
        while not line.endswith(b"\n"):
            b = sock.recv(1)
            if not b:
                raise EOFError("closed after %r" % (lines + [line]))
            line += b
        lines.append(line.decode())
        if line[3:4] != b"-":
            return "".join(lines)

def plain(user, password):
    return base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
"#;

/// Dovecot (LMTP) holding the demo mailboxes, Postfix delivering into it, mailgate in front
/// with both pools' SMTP backend set to that Postfix.
struct Setup {
    dovecot: Dovecot,
    postfix: Postfix,
    mailgate: Mailgate,
}

impl Setup {
    fn start(postfix: PostfixOpts) -> Setup {
        let mut opts = DovecotOpts::default()
            .master(MASTER.0, MASTER.1)
            .with_lmtp();
        for user in MAILBOXES {
            opts = opts.user(user, "unused-here");
        }
        let dovecot = Dovecot::start(opts);
        let postfix = Postfix::start(postfix.delivering_to(dovecot.lmtp_addr(), &DOMAINS));
        let pool = Pool::master(
            &[dovecot.imap_addr()],
            &[postfix.submission_addr()],
            MASTER.0,
            MASTER.1,
        );
        let mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool));
        Setup {
            dovecot,
            postfix,
            mailgate,
        }
    }

    fn port(&self, listener: &str) -> String {
        self.mailgate.port(listener).to_string()
    }

    /// Runs `body` after the prelude with `SMTPS` and `SUBMISSION` set to mailgate's ports and
    /// `ARGS` to `args`; panics with both logs unless it succeeds.
    fn python(&self, body: &str, args: &[&str]) -> String {
        python(&self.mailgate, Some(&self.postfix), body, args)
    }

    #[track_caller]
    fn assert_ok(&self, out: &Output) {
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}\n--- postfix ---\n{}",
            self.mailgate.log(),
            self.postfix.log()
        );
    }
}

fn python(mailgate: &Mailgate, postfix: Option<&Postfix>, body: &str, args: &[&str]) -> String {
    let script = format!(
        "{PRELUDE}\nSMTPS = int(sys.argv[1])\nSUBMISSION = int(sys.argv[2])\nARGS = sys.argv[3:]\n{body}"
    );
    let smtps = mailgate.port("submissions").to_string();
    let submission = mailgate.port("submission").to_string();
    let mut argv = vec![smtps.as_str(), submission.as_str()];
    argv.extend_from_slice(args);
    let out = run_python_args(&script, &argv, CLIENT_TIMEOUT);
    assert!(
        out.success(),
        "{out}\n--- mailgate ---\n{}\n--- postfix ---\n{}",
        mailgate.log(),
        postfix.map(Postfix::log).unwrap_or_default()
    );
    out.stdout
}

/// The maildir stores lines with bare LF.
fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'\r' && tail.first() == Some(&b'\n') {
            rest = tail;
            continue;
        }
        out.push(b);
        rest = tail;
    }
    out
}

/// Header and body of a stored message (split at the first empty line).
fn split_message(stored: &[u8]) -> (String, &[u8]) {
    let at = stored
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(stored.len());
    let header = String::from_utf8_lossy(stored.get(..at).unwrap_or_default()).into_owned();
    (header, stored.get(at + 2..).unwrap_or_default())
}

/// The stored message whose header has `Subject: <subject>`, waiting for it to arrive.
#[track_caller]
fn delivered(dovecot: &Dovecot, user: &str, subject: &str) -> Vec<u8> {
    let needle = format!("\nSubject: {subject}\n");
    let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let found = dovecot.messages(user, "INBOX").into_iter().find(|m| {
            let (header, _) = split_message(m);
            format!("\n{header}\n").contains(&needle)
        });
        if let Some(message) = found {
            return message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no message {subject:?} for {user} after {DELIVERY_TIMEOUT:?}:\n{}",
            dovecot.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The unfolded `Received:` header Postfix added (the last one: Dovecot's LMTP adds its own
/// on top).
fn postfix_received(header: &str) -> String {
    unfold(header)
        .into_iter()
        .rfind(|f| f.starts_with("Received:") && f.contains("(Postfix)"))
        .unwrap_or_default()
}

#[test]
fn messages_arrive_intact_on_465_and_587_with_user_and_client_address() {
    let setup = Setup::start(PostfixOpts::default());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        path.to_string_lossy().into_owned()
    };
    // (client, port, sender, password, recipient)
    let cases = [
        (
            "curl",
            "submissions",
            "alice@skydesk.jp",
            "alice-pass",
            "dave@example.com",
        ),
        (
            "smtplib",
            "submission",
            "alice@skydesk.jp",
            "alice-pass",
            "dave@example.com",
        ),
        (
            "swaks",
            "submissions",
            "dave@example.com",
            "dave-pass",
            "alice@skydesk.jp",
        ),
        (
            "swaks",
            "submission",
            "dave@example.com",
            "dave-pass",
            "alice@skydesk.jp",
        ),
        (
            "smtplib",
            "submissions",
            "dave@example.com",
            "dave-pass",
            "alice@skydesk.jp",
        ),
    ];
    let mut bodies = Vec::new();
    for (i, (client, listener, from, password, to)) in cases.iter().enumerate() {
        let subject = format!("case {i} {client} {listener} {from}");
        let (whole, body) = message(from, to, &subject);
        // swaks ends DATA with "\r\n.\r\n" after the file's content: give it the message
        // without its last CRLF, or the body grows an empty line that no relay added.
        let content = match *client {
            "swaks" => whole.strip_suffix(b"\r\n").unwrap_or(&whole),
            _ => &whole,
        };
        let file = write(&format!("m{i}.eml"), content);
        let port = setup.port(listener);
        let out = match *client {
            "curl" => {
                let url = format!("smtps://127.0.0.1:{port}");
                let user = format!("{from}:{password}");
                let from_arg = format!("<{from}>");
                let to_arg = format!("<{to}>");
                run_cmd(
                    "curl",
                    &[
                        "-sSk",
                        "--max-time",
                        "30",
                        "--interface",
                        CLIENT_IP,
                        "--url",
                        &url,
                        "--user",
                        &user,
                        "--mail-from",
                        &from_arg,
                        "--mail-rcpt",
                        &to_arg,
                        "--upload-file",
                        &file,
                    ],
                    CLIENT_TIMEOUT,
                )
            }
            "swaks" => {
                let mut args = vec![
                    "--server",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--local-interface",
                    CLIENT_IP,
                    "--ehlo",
                    "client.example",
                    "--auth",
                    "PLAIN",
                    "--auth-user",
                    from,
                    "--auth-password",
                    password,
                    "--from",
                    from,
                    "--to",
                    to,
                ];
                let data = format!("@{file}");
                args.extend([
                    if *listener == "submissions" {
                        "--tls-on-connect"
                    } else {
                        "--tls"
                    },
                    "--data",
                    &data,
                ]);
                run_cmd("swaks", &args, CLIENT_TIMEOUT)
            }
            _ => {
                let script = format!(
                    "{PRELUDE}\nport, user, password, to, path, implicit = sys.argv[1:7]\n\
                     s = smtps(int(port)) if implicit == 'yes' else submission(int(port))\n\
                     s.login(user, password)\n\
                     s.sendmail(user, [to], open(path, 'rb').read())\n\
                     s.quit()\n"
                );
                let implicit = if *listener == "submissions" {
                    "yes"
                } else {
                    "no"
                };
                run_python_args(
                    &script,
                    &[&port, from, password, to, &file, implicit],
                    CLIENT_TIMEOUT,
                )
            }
        };
        setup.assert_ok(&out);
        bodies.push((subject, *from, *to, body));
    }
    for (subject, from, to, body) in &bodies {
        let stored = delivered(&setup.dovecot, to, subject);
        let (header, stored_body) = split_message(&stored);
        let expected = lf(body);
        assert!(
            stored_body == expected.as_slice(),
            "body of {subject:?} changed on the way:\n{}\n--- sent ---\n{}",
            String::from_utf8_lossy(stored_body),
            String::from_utf8_lossy(&expected)
        );
        let received = postfix_received(&header);
        assert!(
            received.contains(&format!("(Authenticated sender: {from})"))
                && received.contains(&format!("[{CLIENT_IP}]")),
            "Postfix's Received: of {subject:?} lacks the user or the client address:\n{header}"
        );
        // XCLIENT HELO= and the repeated EHLO carry the client's own EHLO name.
        if subject.contains("swaks") {
            assert!(
                received.starts_with("Received: from client.example (unknown [127.0.0.2])"),
                "{received}"
            );
        }
    }
    let log = setup.mailgate.log();
    for user in ["alice@skydesk.jp", "dave@example.com"] {
        assert!(
            log.lines().any(|l| l.contains("result=ok")
                && l.contains(&format!("user={user} "))
                && l.contains(CLIENT_IP)),
            "no session line with result=ok user={user} from {CLIENT_IP}:\n{log}"
        );
    }
    assert!(
        !log.contains("alice-pass") && !log.contains("dave-pass"),
        "a password reached the log:\n{log}"
    );
}

/// Thunderbird's TLS stack (NSS, through its `tstclnt`) on 465 and GnuTLS' `gnutls-cli` on 587
/// after `STARTTLS`, typed as a user would: `EHLO`, `AUTH PLAIN`, a dot-stuffed message; it
/// arrives with its body as sent.
#[test]
fn nss_and_gnutls_clients_submit_messages_that_arrive_intact() {
    let setup = Setup::start(PostfixOpts::default());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let db = nss_db(dir.path());
    let (smtps, submission) = (
        setup.mailgate.port("submissions"),
        setup.mailgate.port("submission"),
    );
    let name = "smtp.skydesk.jp";
    let nss = || tstclnt(smtps, name, &db, TlsVersion::V13);
    let gnutls = || gnutls_cli(submission, name, TlsVersion::V13, Some("smtp"));
    // (name, client, sender, password, recipient, whether the greeting is ours to read: after
    // STARTTLS gnutls-cli has read it, and sent its own EHLO, itself)
    let cases: [(&str, Launch, &str, &str, &str, bool); 2] = [
        (
            "NSS 465",
            &nss,
            "alice@skydesk.jp",
            "alice-pass",
            "dave@example.com",
            true,
        ),
        (
            "GnuTLS 587",
            &gnutls,
            "dave@example.com",
            "dave-pass",
            "alice@skydesk.jp",
            false,
        ),
    ];
    for (name, spawn, from, password, to, greeted) in cases {
        let mut client = spawn();
        let mut step = |send: &str, needle: &str| -> String {
            client
                .exchange(send, needle, CLIENT_TIMEOUT)
                .unwrap_or_else(|e| {
                    panic!(
                        "{name}: {e}\n--- mailgate ---\n{}\n--- postfix ---\n{}",
                        setup.mailgate.log(),
                        setup.postfix.log()
                    )
                })
        };
        if greeted {
            step("", "220 ");
        }
        let ehlo = step("EHLO client.example\r\n", "250 ");
        assert!(ehlo.contains("AUTH PLAIN"), "{name}: {ehlo}");
        let plain = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("\0{from}\0{password}"),
        );
        step(&format!("AUTH PLAIN {plain}\r\n"), "235 ");
        step(&format!("MAIL FROM:<{from}>\r\n"), "250 ");
        step(&format!("RCPT TO:<{to}>\r\n"), "250 ");
        step("DATA\r\n", "354 ");
        let subject = format!("typed through {name}");
        let (whole, body) = message(from, to, &subject);
        let whole = String::from_utf8(whole).unwrap_or_else(|e| panic!("message: {e}"));
        let stuffed: String = whole
            .split_inclusive("\r\n")
            .map(|line| {
                if line.starts_with('.') {
                    format!(".{line}")
                } else {
                    line.to_owned()
                }
            })
            .collect();
        let queued = step(&format!("{stuffed}.\r\n"), "250 ");
        assert!(queued.contains("queued as"), "{name}: {queued}");
        step("QUIT\r\n", "221 ");
        let stored = delivered(&setup.dovecot, to, &subject);
        let (_, stored_body) = split_message(&stored);
        let expected = lf(&body);
        assert!(
            stored_body == expected.as_slice(),
            "{name}: the body changed on the way:\n{}\n--- sent ---\n{}",
            String::from_utf8_lossy(stored_body),
            String::from_utf8_lossy(&expected)
        );
    }
}

/// Every SMTP row of DESIGN.md's decision table, with swaks, AUTH PLAIN and AUTH LOGIN, on 465
/// and on 587 after STARTTLS.
#[test]
fn every_decision_row_gives_its_reply_to_swaks() {
    // No delivery here: Postfix only has to take the XCLIENT sessions.
    let postfix = Postfix::start(PostfixOpts::default());
    let pool = Pool::master(
        &[unused_addr()],
        &[postfix.submission_addr()],
        MASTER.0,
        MASTER.1,
    );
    let mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool));
    let policy = "525 5.7.13 SMTP access is not allowed by your organisation's policy; \
                  contact your administrator";
    let app_password = format!("534 5.7.9 Application-specific password required: {HELP_URL}");
    let invalid = "535 5.7.8 Authentication credentials invalid";
    let ok = "235 2.7.0 Authentication successful";
    let rows: [(&str, &str, &str); 12] = [
        ("alice@skydesk.jp", "wrong-pass", invalid),
        ("nobody@skydesk.jp", "alice-pass", invalid),
        ("carol@skydesk.jp", "ya29.google-oauth-token", invalid),
        ("bob@skydesk.jp", "bob-pass", &app_password),
        (
            "frank@skydesk.jp",
            "frank-pass",
            "525 5.7.13 SMTP access is disabled for this account",
        ),
        ("mallory@smtpoff.example", "mallory-pass", policy),
        ("bob@skydesk.jp", "bob-app-pass", ok),
        ("carol@skydesk.jp", "carol-app-pass", ok),
        ("alice", "alice-pass", ok),
        // IMAP off (eve) or forbidden by the organisation (sam) says nothing about SMTP.
        ("eve@skydesk.jp", "eve-pass", ok),
        ("sam@strict.example", "sam-pass", ok),
        ("dave@example.com", "dave-pass", ok),
    ];
    let smtps = mailgate.port("submissions").to_string();
    let submission = mailgate.port("submission").to_string();
    let ways = [
        (&smtps, true, "PLAIN"),
        (&smtps, true, "LOGIN"),
        (&submission, false, "PLAIN"),
        (&submission, false, "LOGIN"),
    ];
    let results: Vec<(String, String)> = thread::scope(|scope| {
        let handles: Vec<_> = rows
            .iter()
            .flat_map(|row| ways.map(|way| (row, way)))
            .map(
                |((user, password, expected), (port, implicit, mechanism))| {
                    scope.spawn(move || {
                        let out = swaks_auth(port, implicit, mechanism, user, password);
                        let case = format!("{user} {password} {mechanism} port {port}");
                        (case, expected.to_string(), out)
                    })
                },
            )
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("swaks thread panicked")))
            .map(|(case, expected, out)| {
                let line = swaks_auth_reply(&out);
                assert_eq!(
                    line,
                    expected,
                    "{case}:\n{out}\n--- mailgate ---\n{}",
                    mailgate.log()
                );
                (case, line)
            })
            .collect()
    });
    assert_eq!(results.len(), rows.len() * ways.len());
    let log = mailgate.log();
    for word in [
        "invalid_credentials",
        "app_password_required",
        "smtp_disabled",
        "policy_denied",
        "ok",
    ] {
        assert!(
            log.contains(&format!("result={word} ")) || log.contains(&format!("result={word}\n")),
            "no result={word} in the log:\n{log}"
        );
    }
    for password in ["wrong-pass", "bob-pass", "carol-app-pass", "ya29."] {
        assert!(
            !log.contains(password),
            "{password} reached the log:\n{log}"
        );
    }
}

#[test]
fn no_reachable_backend_is_454_temporary_failure() {
    let nowhere = unused_addr();
    let pool = Pool::master(&[nowhere], &[nowhere], MASTER.0, MASTER.1);
    let mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool));
    let port = mailgate.port("submissions").to_string();
    for mechanism in ["PLAIN", "LOGIN"] {
        let out = swaks_auth(&port, true, mechanism, "alice@skydesk.jp", "alice-pass");
        assert_eq!(
            swaks_auth_reply(&out),
            "454 4.7.0 Temporary authentication failure",
            "{out}\n{}",
            mailgate.log()
        );
    }
    // The rules come first: a wrong password is still a 535, not a hint that the backend is down.
    let out = swaks_auth(&port, true, "PLAIN", "alice@skydesk.jp", "wrong");
    assert_eq!(
        swaks_auth_reply(&out),
        "535 5.7.8 Authentication credentials invalid"
    );
    let log = mailgate.log();
    assert!(log.contains("result=backend_unavailable"), "{log}");
}

/// One pre-auth session at a time on a Postfix with a 1 MiB limit: EHLO as the client sees it,
/// STARTTLS pipelining, no relay before AUTH, pipelined AUTH + MAIL, and the backend's own
/// size refusal with the session staying usable.
#[test]
fn submission_protocol_details_against_postfix() {
    const LIMIT: u64 = 1024 * 1024;
    let setup = Setup::start(PostfixOpts::default().message_size_limit(LIMIT));
    let out = setup.python(
        r#"
# --- EHLO on 587 before and after TLS, and on 465 ---
s = raw(SUBMISSION)
print("greeting:", reply(s).strip())
s.sendall(b"EHLO client.example\r\n")
print("587 plain ehlo:", reply(s).replace("\r\n", "|"))
s.sendall(b"AUTH PLAIN " + plain("alice@skydesk.jp", "alice-pass").encode() + b"\r\n")
print("587 auth before tls:", reply(s).strip())
s.sendall(b"MAIL FROM:<alice@skydesk.jp>\r\n")
print("587 plain mail:", reply(s).strip())
# STARTTLS with an EHLO pipelined behind it: that EHLO must be dropped with the plaintext.
s.sendall(b"STARTTLS\r\nEHLO injected.example\r\n")
print("starttls:", reply(s).strip())
t = CTX.wrap_socket(s, server_hostname="smtp.skydesk.jp")
t.settimeout(1.5)
try:
    early = t.recv(100)
    print("early bytes:", early)
except socket.timeout:
    print("early bytes: none")
t.settimeout(10)
t.sendall(b"MAIL FROM:<alice@skydesk.jp>\r\n")
print("587 tls mail:", reply(t).strip())
t.sendall(b"EHLO client.example\r\n")
print("587 tls ehlo:", reply(t).replace("\r\n", "|"))
t.sendall(b"RCPT TO:<dave@example.com>\r\n")
print("587 tls rcpt:", reply(t).strip())
t.sendall(b"QUIT\r\n")
print("587 quit:", reply(t).strip())
t.close()

s = CTX.wrap_socket(raw(SMTPS), server_hostname="smtp.skydesk.jp")
print("465 greeting:", reply(s).strip())
s.sendall(b"EHLO client.example\r\n")
print("465 ehlo:", reply(s).replace("\r\n", "|"))
s.sendall(b"MAIL FROM:<alice@skydesk.jp>\r\n")
print("465 mail:", reply(s).strip())
s.sendall(b"DATA\r\n")
print("465 data:", reply(s).strip())
# --- pipelined AUTH PLAIN and MAIL FROM in one write ---
s.sendall(b"AUTH PLAIN " + plain("alice@skydesk.jp", "alice-pass").encode()
          + b"\r\nMAIL FROM:<alice@skydesk.jp>\r\n")
print("pipelined auth:", reply(s).strip())
print("pipelined mail:", reply(s).strip())
# --- over the backend's SIZE: Postfix's own refusal, then the session goes on ---
s.sendall(b"RSET\r\n")
print("rset:", reply(s).strip())
big = b"Subject: too big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2100
s.sendall(b"MAIL FROM:<alice@skydesk.jp>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n")
print("big mail:", reply(s).strip())
print("big rcpt:", reply(s).strip())
print("big data:", reply(s).strip())
s.sendall(big + b".\r\n")
print("too big:", reply(s).strip())
s.sendall(b"MAIL FROM:<alice@skydesk.jp>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n")
print("again mail:", reply(s).strip())
print("again rcpt:", reply(s).strip())
print("again data:", reply(s).strip())
s.sendall(b"Subject: small after big\r\n\r\nsmall body\r\n.\r\n")
print("small:", reply(s).strip())
# Declared too big in MAIL: refused before any data. (Postfix 3.7 then keeps refusing MAIL in
# this session, so this comes last.)
s.sendall(b"MAIL FROM:<alice@skydesk.jp> SIZE=2000000\r\n")
print("declared too big:", reply(s).strip())
s.sendall(b"QUIT\r\n")
print("465 quit:", reply(s).strip())

# --- a client's own XCLIENT, and the per-connection limit of failed AUTHs ---
s = CTX.wrap_socket(raw(SMTPS), server_hostname="smtp.skydesk.jp")
reply(s)
s.sendall(b"EHLO client.example\r\n")
reply(s)
s.sendall(b"XCLIENT ADDR=192.0.2.1 LOGIN=alice@skydesk.jp\r\n")
print("client xclient:", reply(s).strip())
for i in range(3):
    s.sendall(b"AUTH PLAIN " + plain("alice@skydesk.jp", "wrong-%d" % i).encode() + b"\r\n")
    print("failed auth %d:" % i, reply(s).strip())
print("limit:", reply(s).strip())
print("after limit:", s.recv(100))
"#,
        &[],
    );
    let line = |key: &str| -> String {
        let prefix = format!("{key}: ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no `{key}` in:\n{out}"))
            .to_owned()
    };
    let starts = |key: &str, expected: &str| {
        let got = line(key);
        assert!(
            got.starts_with(expected),
            "{key}: expected `{expected}`, got `{got}`\n--- all ---\n{out}\n--- mailgate ---\n{}",
            setup.mailgate.log()
        );
    };
    starts("greeting", "220 ");
    assert!(line("greeting").ends_with(" ESMTP mailgate"), "{out}");

    // EHLO before TLS on 587: STARTTLS, no AUTH; the backend's extensions, none of its own
    // STARTTLS/AUTH/XCLIENT.
    let plain_ehlo = extensions(&line("587 plain ehlo"));
    assert!(plain_ehlo.iter().any(|e| e == "STARTTLS"), "{plain_ehlo:?}");
    assert!(
        !plain_ehlo.iter().any(|e| e.starts_with("AUTH")),
        "{plain_ehlo:?}"
    );
    starts(
        "587 auth before tls",
        "530 5.7.0 Must issue a STARTTLS command first",
    );
    starts("587 plain mail", "530 5.7.0 Authentication required");
    starts("starttls", "220 2.0.0 ");
    assert_eq!(
        line("early bytes"),
        "none",
        "a reply came before the client's own EHLO after STARTTLS"
    );
    // The injected EHLO was dropped: the session after TLS has no EHLO yet, so MAIL is
    // refused as unauthenticated and the next EHLO is the first.
    starts("587 tls mail", "530 5.7.0 Authentication required");
    for key in ["587 tls ehlo", "465 ehlo"] {
        let ehlo = extensions(&line(key));
        for wanted in [
            format!("SIZE {LIMIT}"),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
            "AUTH PLAIN LOGIN".into(),
        ] {
            assert!(ehlo.contains(&wanted), "{key}: no {wanted} in {ehlo:?}");
        }
        for unwanted in ["STARTTLS", "XCLIENT", "XFORWARD", "AUTH="] {
            assert!(
                !ehlo.iter().any(|e| e.starts_with(unwanted)),
                "{key}: {unwanted} in {ehlo:?}"
            );
        }
        assert_eq!(
            ehlo.iter().filter(|e| e.starts_with("AUTH")).count(),
            1,
            "{ehlo:?}"
        );
    }
    starts("587 tls rcpt", "530 5.7.0 Authentication required");
    starts("587 quit", "221 2.0.0");
    starts("465 greeting", "220 ");
    starts("465 mail", "530 5.7.0 Authentication required");
    starts("465 data", "530 5.7.0 Authentication required");
    starts("pipelined auth", "235 2.7.0 Authentication successful");
    starts("pipelined mail", "250 2.1.0");
    starts("rset", "250 2.0.0");
    starts("big mail", "250 2.1.0");
    starts("big rcpt", "250 2.1.5");
    starts("big data", "354 ");
    starts("too big", "552 5.3.4 Error: message file too big");
    starts("again mail", "250 2.1.0");
    starts("again rcpt", "250 2.1.5");
    starts("again data", "354 ");
    starts("small", "250 2.0.0");
    starts(
        "declared too big",
        "552 5.3.4 Message size exceeds fixed limit",
    );
    starts("465 quit", "221 2.0.0");
    starts("client xclient", "550 5.7.0 Command refused");
    for i in 0..3 {
        starts(
            &format!("failed auth {i}"),
            "535 5.7.8 Authentication credentials invalid",
        );
    }
    starts("limit", "421 4.7.0 Too many failed authentications");
    starts("after limit", "b''");
    let stored = delivered(&setup.dovecot, "dave@example.com", "small after big");
    assert!(split_message(&stored).1 == b"small body\n", "{stored:?}");
    // The refused message was not delivered.
    assert_eq!(
        setup.dovecot.messages("dave@example.com", "INBOX").len(),
        1,
        "{}",
        setup.postfix.log()
    );
}

#[test]
fn twenty_mib_message_goes_through_intact() {
    let setup = Setup::start(PostfixOpts::default());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let path = dir.path().join("big.eml");
    let mut whole =
        b"From: alice@skydesk.jp\r\nTo: dave@example.com\r\nSubject: twenty MiB\r\n\r\n".to_vec();
    let header_len = whole.len();
    // Varied lines (so a dropped or repeated chunk shows), some starting with a dot.
    let mut n: u64 = 0x9e37_79b9_7f4a_7c15;
    while whole.len() < header_len + 20 * 1024 * 1024 {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        let width = 40 + (n % 900) as usize;
        let mut line: Vec<u8> = (0..width)
            .map(|i| {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(n as usize + i) % 64]
            })
            .collect();
        if n % 17 == 0 {
            line.insert(0, b'.');
        }
        whole.extend_from_slice(&line);
        whole.extend_from_slice(b"\r\n");
    }
    std::fs::write(&path, &whole).unwrap_or_else(|e| panic!("writing the message: {e}"));
    let path = path.to_string_lossy().into_owned();
    setup.python(
        r#"
s = smtps(SMTPS)
s.login("alice@skydesk.jp", "alice-pass")
s.sendmail("alice@skydesk.jp", ["dave@example.com"], open(ARGS[0], "rb").read())
s.quit()
"#,
        &[&path],
    );
    let stored = delivered(&setup.dovecot, "dave@example.com", "twenty MiB");
    let (_, body) = split_message(&stored);
    let expected = lf(whole.get(header_len..).unwrap_or_default());
    assert!(
        body == expected.as_slice(),
        "the 20 MiB body changed: {} bytes stored, {} expected",
        body.len(),
        expected.len()
    );
}

/// `AUTH` with swaks (`--quit-after AUTH`) on an implicit-TLS (`tls`) or STARTTLS port.
fn swaks_auth(port: &str, implicit: bool, mechanism: &str, user: &str, password: &str) -> Output {
    run_cmd(
        "swaks",
        &[
            "--server",
            "127.0.0.1",
            "--port",
            port,
            "--local-interface",
            CLIENT_IP,
            if implicit {
                "--tls-on-connect"
            } else {
                "--tls"
            },
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--quit-after",
            "AUTH",
        ],
        CLIENT_TIMEOUT,
    )
}

/// The extension lines of a `|`-joined EHLO reply, without the first (the host name).
fn extensions(joined: &str) -> Vec<String> {
    joined
        .split('|')
        .filter(|l| !l.is_empty())
        .skip(1)
        .map(|l| l.get(4..).unwrap_or_default().to_owned())
        .collect()
}

/// A loopback address nothing listens on.
fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
}

/// SIGTERM: a session still in pre-auth gets `421 4.3.2` at once; a spliced session keeps
/// working until the drain deadline, then gets `421 4.3.2` and is closed; mailgate exits.
#[test]
fn sigterm_says_421_before_auth_at_once_and_to_spliced_sessions_at_the_deadline() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};

    let postfix = Postfix::start(PostfixOpts::default());
    let pool = Pool::master(
        &[unused_addr()],
        &[postfix.submission_addr()],
        MASTER.0,
        MASTER.1,
    );
    let mut mailgate = Mailgate::start(&MailgateOpts::new(pool.clone(), pool).drain_timeout("3s"));
    let script = format!(
        r#"{PRELUDE}
import time
SMTPS = int(sys.argv[1])
pre = CTX.wrap_socket(raw(SMTPS), server_hostname="smtp.skydesk.jp")
reply(pre)
pre.sendall(b"EHLO client.example\r\n")
reply(pre)
live = CTX.wrap_socket(raw(SMTPS), server_hostname="smtp.skydesk.jp")
reply(live)
live.sendall(b"EHLO client.example\r\nAUTH PLAIN " + plain("alice", "alice-pass").encode() + b"\r\n")
reply(live)
print("auth", reply(live).strip(), flush=True)
sys.stdin.readline()
start = time.time()
print("pre-auth", reply(pre).strip(), round(time.time() - start, 1), flush=True)
for i in range(20):
    try:
        live.sendall(b"NOOP\r\n")
        print("noop", round(time.time() - start, 1), reply(live).strip(), flush=True)
    except Exception as e:
        print("closed", round(time.time() - start, 1), type(e).__name__, flush=True)
        break
    time.sleep(0.5)
"#
    );
    let port = mailgate.port("submissions").to_string();
    let mut child = Command::new("python3")
        .args(["-u", "-c", &script, &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().unwrap_or_else(|| panic!("stdout")));
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    assert!(
        line.starts_with("auth 235 2.7.0"),
        "{line}\n{}",
        mailgate.log()
    );
    mailgate.signal("TERM");
    mailgate.wait_for_log("draining", Duration::from_secs(5));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
    let _ = stdin.write_all(b"go\n");
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);
    let _ = child.wait();
    assert!(
        rest.lines()
            .any(|l| l.starts_with("pre-auth 421 4.3.2 Service shutting down")),
        "{rest}"
    );
    // The spliced session's NOOPs are answered by Postfix through the drain, then the
    // deadline's 421 arrives (as the reply to the NOOP in flight, or alone) and it closes.
    let worked: Vec<f64> = rest
        .lines()
        .filter(|l| l.starts_with("noop") && l.contains(" 250 2.0.0"))
        .filter_map(|l| l.split_ascii_whitespace().nth(1)?.parse().ok())
        .collect();
    assert!(
        worked.iter().any(|&t| t >= 1.5),
        "NOOP stopped working early:\n{rest}"
    );
    assert!(
        rest.contains("421 4.3.2 Service shutting down") && rest.contains("closed"),
        "the spliced session was not told and closed at the deadline:\n{rest}"
    );
    let status = mailgate.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "mailgate did not exit: {status:?}\n{}",
        mailgate.log()
    );
    let log = mailgate.log();
    assert!(log.contains("end=shutdown"), "{log}");
}

/// The extensions offered to clients follow the backend: a Postfix that was down when
/// mailgate started is learned by the health probe once it answers.
#[test]
fn extensions_are_relearned_when_a_backend_comes_up() {
    let later = unused_addr();
    let imap = Dovecot::start(DovecotOpts::default().master(MASTER.0, MASTER.1));
    let pool = Pool::master(&[imap.imap_addr()], &[later], MASTER.0, MASTER.1);
    let mailgate = Mailgate::start(
        &MailgateOpts::new(pool.clone(), pool)
            .health("{ interval: 200ms, timeout: 150ms, fall: 1, rise: 1 }"),
    );
    let ehlo = || {
        let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP_SSL("127.0.0.1", int(sys.argv[1]), context=ctx, timeout=10)
code, text = s.ehlo("probe.example")
print(code, text.decode().replace("\n", "|"))
s.quit()
"#;
        let out = run_python_args(
            script,
            &[&mailgate.port("submissions").to_string()],
            CLIENT_TIMEOUT,
        );
        out.assert_success().to_string()
    };
    let before = ehlo();
    assert!(
        !before.contains("SIZE"),
        "no backend was probed yet: {before}"
    );
    assert!(before.contains("AUTH PLAIN LOGIN"), "{before}");

    let mut opts = PostfixOpts::default().message_size_limit(1_234_567);
    opts.port = Some(later.port());
    let _postfix = Postfix::start(opts);
    mailgate.wait_for_log("SMTP backend extensions", Duration::from_secs(10));
    let after = ehlo();
    assert!(
        after.contains("SIZE 1234567"),
        "the backend's SIZE was not learned: {after}"
    );
    assert!(
        !after.contains("XCLIENT") && !after.contains("STARTTLS"),
        "{after}"
    );
}
