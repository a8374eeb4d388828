//! SMTP submission with `smtp_login: master` and `smtp_login: passthrough` end to end: a real
//! Postfix behind mailgate that judges `AUTH` through a real Dovecot's auth service
//! (`smtpd_sasl_type = dovecot` over TCP, with the same users and master user that Dovecot's
//! IMAP uses) and delivers over LMTP into that Dovecot; real clients in front (Python
//! `smtplib`, `swaks`); the real `mailgate` binary in between.
//!
//! What Postfix records is read back from the delivered message over IMAP, straight from
//! Dovecot (`BODY.PEEK[]`, CRLF as stored), so the body is compared byte for byte.
//!
//! Dovecot's passwords are the demo account file's, except that it knows no app passwords
//! but Carol's: in passthrough the backend judges the client's own password, so an app
//! password only works there when the backend's password store holds it too (Carol: yes,
//! Bob: no); with a master user the backend never sees the client's password and every
//! password mailgate accepts works.
//!
//! Refusals: a wrong password is mailgate's 535 and never reaches Postfix; a backend that
//! refuses the master login gives 454 (mailgate had proven the password); in passthrough the
//! backend's own 535 is the client's 535; a Postfix that offers no `AUTH` to mailgate is 454.
//!
//! Rotation: a master password changed on Dovecot gives 454 until mailgate's `password_file`
//! holds it too and mailgate is sent `SIGHUP`; then submissions are taken again.

mod common;

use std::time::Duration;

use common::mail::{message, swaks_auth_reply, unfold};
use common::mailgate::{write_password_file, Mailgate, MailgateOpts, Pool};
use common::{run_cmd, run_python_args, Dovecot, DovecotOpts, Postfix, PostfixOpts};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients connect from here, so that an address Postfix records is visibly theirs (through
/// XCLIENT) and not mailgate's (127.0.0.1).
const CLIENT_IP: &str = "127.0.0.2";

/// The backend's users: the demo accounts' passwords, and for Carol (federated, no password of
/// her own) her app password; Bob's app password is not among them.
const BACKEND_USERS: [(&str, &str); 4] = [
    ("alice@skydesk.jp", "alice-pass"),
    ("dave@example.com", "dave-pass"),
    ("carol@skydesk.jp", "carol-app-pass"),
    ("bob@skydesk.jp", "bob-pass"),
];
const DOMAINS: [&str; 2] = ["skydesk.jp", "example.com"];

const OK: &str = "235 2.7.0 Authentication successful";
const INVALID: &str = "535 5.7.8 Authentication credentials invalid";
const UNAVAILABLE: &str = "454 4.7.0 Temporary authentication failure";

/// Sends one message: `port implicit user password to path` → prints `sent`, or the reply
/// code and text of a refused AUTH (sent by hand, so that smtplib does not retry it with
/// another mechanism).
const SEND: &str = r#"
import base64, smtplib, ssl, sys
port, implicit, user, password, to, path = sys.argv[1:7]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
kw = dict(local_hostname="client.example", source_address=("127.0.0.2", 0), timeout=25)
if implicit == "yes":
    s = smtplib.SMTP_SSL("127.0.0.1", int(port), context=ctx, **kw)
else:
    s = smtplib.SMTP("127.0.0.1", int(port), **kw)
    s.starttls(context=ctx)
s.ehlo("client.example")
plain = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
code, text = s.docmd("AUTH", "PLAIN " + plain)
print(code, text.decode())
if code == 235:
    s.sendmail(user, [to], open(path, "rb").read())
    print("sent")
s.quit()
"#;

/// The message in `user`'s INBOX whose subject is `subject`, as Dovecot stores it
/// (`BODY.PEEK[]`), waiting up to 20 s for it: logs in to Dovecot's IMAP as the master user.
const FETCH: &str = r#"
import base64, imaplib, sys, time
port, user, master, password, subject = sys.argv[1:6]
m = imaplib.IMAP4("127.0.0.1", int(port))
m.login(user + "*" + master, password)
deadline = time.time() + 20
while True:
    m.select("INBOX", readonly=True)
    typ, data = m.uid("SEARCH", "HEADER", "Subject", '"%s"' % subject)
    uids = data[0].split()
    if uids:
        break
    if time.time() > deadline:
        sys.exit("no message %r for %s" % (subject, user))
    time.sleep(0.1)
typ, data = m.uid("FETCH", uids[-1], "(BODY.PEEK[])")
print(base64.b64encode(data[0][1]).decode())
m.logout()
"#;

/// Dovecot (IMAP, LMTP, and its auth service on a TCP port for Postfix) and a Postfix that
/// takes `AUTH` through that auth service.
struct Backends {
    dovecot: Dovecot,
    postfix: Postfix,
}

impl Backends {
    fn start() -> Backends {
        let mut opts = DovecotOpts::default()
            .master(MASTER.0, MASTER.1)
            .with_lmtp()
            .with_sasl();
        for (user, password) in BACKEND_USERS {
            opts = opts.user(user, password);
        }
        let dovecot = Dovecot::start(opts);
        let postfix = Postfix::start(
            PostfixOpts::default()
                .delivering_to(dovecot.lmtp_addr(), &DOMAINS)
                .dovecot_sasl(dovecot.sasl_addr()),
        );
        Backends { dovecot, postfix }
    }

    /// mailgate in front of these backends with `smtp_login` and the master password
    /// `master_password` in both pools.
    fn mailgate(&self, smtp_login: &str, master_password: &str) -> Mailgate {
        self.mailgate_for(&self.postfix, smtp_login, master_password)
    }

    /// The same, in front of `postfix`.
    fn mailgate_for(&self, postfix: &Postfix, smtp_login: &str, master_password: &str) -> Mailgate {
        let pool = Pool::master(
            &[self.dovecot.imap_addr()],
            &[postfix.submission_addr()],
            MASTER.0,
            master_password,
        );
        let mut opts = MailgateOpts::new(pool.clone(), pool);
        opts.smtp_login = smtp_login.into();
        Mailgate::start(&opts)
    }

    /// mailgate's, Postfix's and Dovecot's logs so far, for failure messages.
    fn logs(&self, mailgate: &Mailgate) -> String {
        format!(
            "--- mailgate ---\n{}\n--- postfix ---\n{}\n--- dovecot ---\n{}",
            mailgate.log(),
            self.postfix.log(),
            self.dovecot.log()
        )
    }

    /// The message `subject` as delivered to `user`: (unfolded header fields, body bytes).
    fn delivered(&self, user: &str, subject: &str) -> (Vec<String>, Vec<u8>) {
        let port = self.dovecot.imap_addr().port().to_string();
        let out = run_python_args(
            FETCH,
            &[&port, user, MASTER.0, MASTER.1, subject],
            CLIENT_TIMEOUT,
        );
        assert!(out.success(), "{out}\n{}", self.dovecot.log());
        let raw = base64_decode(out.stdout.trim());
        let at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(raw.len());
        let header = String::from_utf8_lossy(raw.get(..at).unwrap_or_default()).into_owned();
        (
            unfold(&header),
            raw.get(at + 4..).unwrap_or_default().to_vec(),
        )
    }
}

/// A sender, its password, a recipient, and how the client connects.
struct Case<'a> {
    client: &'a str,
    listener: &'a str,
    user: &'a str,
    password: &'a str,
    to: &'a str,
}

impl Case<'_> {
    fn subject(&self) -> String {
        format!("{} {} {}", self.client, self.listener, self.user)
    }
}

/// Sends `case`'s message through `mailgate`; returns the AUTH reply, whether the message
/// was taken, and the body that was sent.
fn send(mailgate: &Mailgate, case: &Case<'_>, dir: &std::path::Path) -> (String, bool, Vec<u8>) {
    let (whole, body) = message(case.user, case.to, &case.subject());
    let path = dir.join(format!("{}.eml", case.subject().replace([' ', '@'], "_")));
    // swaks ends DATA with "\r\n.\r\n" after the file: give it the message without its last
    // CRLF, or the body grows an empty line no relay added.
    let content = match case.client {
        "swaks" => whole.strip_suffix(b"\r\n").unwrap_or(&whole),
        _ => &whole,
    };
    std::fs::write(&path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let file = path.to_string_lossy().into_owned();
    let port = mailgate.port(case.listener).to_string();
    let implicit = case.listener == "submissions";
    let out = match case.client {
        "swaks" => {
            let data = format!("@{file}");
            run_cmd(
                "swaks",
                &[
                    "--server",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--local-interface",
                    CLIENT_IP,
                    "--ehlo",
                    "client.example",
                    if implicit {
                        "--tls-on-connect"
                    } else {
                        "--tls"
                    },
                    "--auth",
                    "LOGIN",
                    "--auth-user",
                    case.user,
                    "--auth-password",
                    case.password,
                    "--from",
                    case.user,
                    "--to",
                    case.to,
                    "--data",
                    &data,
                ],
                CLIENT_TIMEOUT,
            )
        }
        _ => run_python_args(
            SEND,
            &[
                &port,
                if implicit { "yes" } else { "no" },
                case.user,
                case.password,
                case.to,
                &file,
            ],
            CLIENT_TIMEOUT,
        ),
    };
    assert!(!out.timed_out, "{out}\n{}", mailgate.log());
    let (reply, sent) = match case.client {
        "swaks" => (swaks_auth_reply(&out), out.success()),
        _ => (
            out.stdout.lines().next().unwrap_or_default().to_owned(),
            out.success() && out.stdout.lines().any(|l| l == "sent"),
        ),
    };
    (reply, sent, body)
}

/// Sends every case, expecting the AUTH to succeed and the message to arrive intact with
/// Postfix's `Received:` naming the user.
fn assert_delivered(backends: &Backends, mailgate: &Mailgate, cases: &[Case<'_>]) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut sent = Vec::new();
    for case in cases {
        let (reply, taken, body) = send(mailgate, case, dir.path());
        assert!(
            reply == OK && taken,
            "{}: AUTH answered {reply:?}, message taken: {taken}\n{}",
            case.subject(),
            backends.logs(mailgate)
        );
        sent.push((case, body));
    }
    for (case, body) in sent {
        let subject = case.subject();
        let (fields, stored) = backends.delivered(case.to, &subject);
        assert!(
            stored == body,
            "body of {subject:?} changed on the way:\n{}\n--- sent ---\n{}",
            String::from_utf8_lossy(&stored),
            String::from_utf8_lossy(&body)
        );
        let received = fields
            .iter()
            .rfind(|f| f.starts_with("Received:") && f.contains("(Postfix)"))
            .cloned()
            .unwrap_or_default();
        // The user, not the master user that logged in for them; and (the harness's Postfix
        // takes XCLIENT from mailgate, which sends it before AUTH) the client's address and
        // EHLO name, not mailgate's.
        assert!(
            received.contains(&format!("(Authenticated sender: {})", case.user))
                && !received.contains(MASTER.0)
                && received.starts_with("Received: from client.example ")
                && received.contains(&format!("[{CLIENT_IP}]"))
                && !received.contains("[127.0.0.1]"),
            "Postfix's Received: of {subject:?} does not name the user:\n{}",
            fields.join("\n")
        );
    }
}

/// Tries `user`/`password` on both listeners; asserts each AUTH gets `expected` and nothing
/// is sent.
fn assert_refused(
    backends: &Backends,
    mailgate: &Mailgate,
    user: &str,
    password: &str,
    expected: &str,
) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    for (client, listener) in [("smtplib", "submissions"), ("swaks", "submission")] {
        let case = Case {
            client,
            listener,
            user,
            password,
            to: "dave@example.com",
        };
        let (reply, taken, _) = send(mailgate, &case, dir.path());
        assert!(
            reply == expected && !taken,
            "{}: expected {expected:?}, got {reply:?} (message taken: {taken})\n{}",
            case.subject(),
            backends.logs(mailgate)
        );
    }
}

/// A refusal mailgate gives on its own: asserts that neither Postfix nor Dovecot's auth
/// service heard of it (their logs grow by no AUTH, and by nothing that names the user).
fn assert_refused_before_the_backend(
    backends: &Backends,
    mailgate: &Mailgate,
    user: &str,
    password: &str,
) {
    let postfix_before = backends.postfix.log().len();
    let dovecot_before = backends.dovecot.log().len();
    assert_refused(backends, mailgate, user, password, INVALID);
    let postfix = backends.postfix.log();
    let dovecot = backends.dovecot.log();
    let postfix_new = postfix.get(postfix_before..).unwrap_or_default();
    let dovecot_new = dovecot.get(dovecot_before..).unwrap_or_default();
    assert!(
        !postfix_new.contains("SASL")
            && !postfix_new.contains(" auth=")
            && !postfix_new.contains(user),
        "the refused login reached Postfix:\n{postfix_new}"
    );
    assert!(
        !dovecot_new.contains(user) && !dovecot_new.contains("auth:"),
        "the refused login reached Dovecot's auth service:\n{dovecot_new}"
    );
}

#[test]
fn master_mode_sends_as_the_user_through_postfix_and_dovecot_sasl() {
    let backends = Backends::start();
    let mailgate = backends.mailgate("master", MASTER.1);
    assert_delivered(
        &backends,
        &mailgate,
        &[
            Case {
                client: "smtplib",
                listener: "submissions",
                user: "alice@skydesk.jp",
                password: "alice-pass",
                to: "dave@example.com",
            },
            Case {
                client: "swaks",
                listener: "submission",
                user: "dave@example.com",
                password: "dave-pass",
                to: "alice@skydesk.jp",
            },
            // The backend never sees the client's password: an app password the backend does
            // not know works, because mailgate proved it.
            Case {
                client: "smtplib",
                listener: "submission",
                user: "bob@skydesk.jp",
                password: "bob-app-pass",
                to: "alice@skydesk.jp",
            },
        ],
    );
    // Postfix's SASL login is the user's (Dovecot returns the authorization identity as the
    // user name), and Dovecot's auth service logged the master user in for them (Bob is only
    // a sender here: no IMAP fetch logs in as him).
    let postfix = backends.postfix.log();
    for user in ["alice@skydesk.jp", "dave@example.com", "bob@skydesk.jp"] {
        assert!(
            postfix.contains(&format!("sasl_method=PLAIN, sasl_username={user}\n")),
            "Postfix did not record {user} as the SASL user:\n{postfix}"
        );
    }
    assert!(!postfix.contains("sasl_username=proxy"), "{postfix}");
    backends.dovecot.wait_for_log(
        "auth: Info: Master user logging in as bob@skydesk.jp",
        Duration::from_secs(5),
    );
    assert_refused_before_the_backend(&backends, &mailgate, "alice@skydesk.jp", "wrong-pass");
    let log = mailgate.log();
    assert!(
        !log.contains("alice-pass") && !log.contains(MASTER.1),
        "a password reached mailgate's log:\n{log}"
    );

    // The master password in mailgate's config is wrong: Postfix (Dovecot) refuses the master
    // login. mailgate had proven the client's password, so the client hears "temporary
    // failure", not "your password is wrong".
    let misconfigured = backends.mailgate("master", "not-the-master-secret");
    assert_refused(
        &backends,
        &misconfigured,
        "alice@skydesk.jp",
        "alice-pass",
        UNAVAILABLE,
    );
    backends
        .postfix
        .wait_for_log("SASL PLAIN authentication failed", Duration::from_secs(5));
    let log = misconfigured.wait_for_log("result=backend_unavailable", Duration::from_secs(5));
    assert!(
        !log.contains("not-the-master-secret"),
        "the master password reached mailgate's log:\n{log}"
    );
}

/// The master password is rotated on the backend and in mailgate's `password_file`, then
/// mailgate is sent `SIGHUP`: submissions in between get 454 (mailgate proved the client's
/// password, the backend refused the master login), and after the reload they are taken again.
#[test]
fn sighup_reads_a_rotated_master_password_file_for_submission() {
    let mut backends = Backends::start();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let password_file = dir.path().join("smtp-master");
    let write = |password: &str| write_password_file(&password_file, password);
    write(MASTER.1);
    let pool = Pool::master_file(
        &[backends.dovecot.imap_addr()],
        &[backends.postfix.submission_addr()],
        MASTER.0,
        &password_file,
    );
    let mut opts = MailgateOpts::new(pool.clone(), pool);
    opts.smtp_login = "master".into();
    let mailgate = Mailgate::start(&opts);
    let alice = |client| Case {
        client,
        listener: "submissions",
        user: "alice@skydesk.jp",
        password: "alice-pass",
        to: "dave@example.com",
    };
    let taken = |backends: &Backends, case: &Case<'_>| {
        let (reply, taken, _) = send(&mailgate, case, dir.path());
        assert!(
            reply == OK && taken,
            "{}: AUTH answered {reply:?}, message taken: {taken}\n{}",
            case.subject(),
            backends.logs(&mailgate)
        );
    };
    taken(&backends, &alice("smtplib"));

    const ROTATED: &str = "rotated-master-secret";
    backends.dovecot.set_master_password(ROTATED);
    assert_refused(
        &backends,
        &mailgate,
        "alice@skydesk.jp",
        "alice-pass",
        UNAVAILABLE,
    );

    write(ROTATED);
    mailgate.signal("HUP");
    let log = mailgate.wait_for_log("SIGHUP: reloaded", Duration::from_secs(10));
    assert_eq!(
        log.matches("the master user or password changed").count(),
        2,
        "both pools read the file:\n{log}"
    );
    taken(&backends, &alice("smtplib"));
    taken(&backends, &alice("swaks"));
    let log = mailgate.log();
    assert!(
        !log.contains(MASTER.1) && !log.contains(ROTATED),
        "a master password reached mailgate's log:\n{log}"
    );
}

#[test]
fn passthrough_sends_the_clients_own_credentials_through_postfix_and_dovecot_sasl() {
    let backends = Backends::start();
    let mailgate = backends.mailgate("passthrough", MASTER.1);
    assert_delivered(
        &backends,
        &mailgate,
        &[
            Case {
                client: "smtplib",
                listener: "submissions",
                user: "alice@skydesk.jp",
                password: "alice-pass",
                to: "dave@example.com",
            },
            // AUTH LOGIN from the client; mailgate says AUTH PLAIN to Postfix.
            Case {
                client: "swaks",
                listener: "submission",
                user: "dave@example.com",
                password: "dave-pass",
                to: "alice@skydesk.jp",
            },
            // An app password the backend also knows.
            Case {
                client: "swaks",
                listener: "submissions",
                user: "carol@skydesk.jp",
                password: "carol-app-pass",
                to: "dave@example.com",
            },
        ],
    );
    assert_refused_before_the_backend(&backends, &mailgate, "dave@example.com", "wrong-pass");

    // Bob's app password passes mailgate's rules, but the backend judges the client's own
    // password and does not know it: the backend's refusal reaches the client as 535.
    assert_refused(
        &backends,
        &mailgate,
        "bob@skydesk.jp",
        "bob-app-pass",
        INVALID,
    );
    let line = backends
        .postfix
        .wait_for_log("SASL PLAIN authentication failed", Duration::from_secs(5));
    assert!(line.contains(CLIENT_IP), "{line}");
    mailgate.wait_for_log("result=invalid_credentials", Duration::from_secs(5));
    let log = mailgate.log();
    assert!(
        !log.contains("alice-pass") && !log.contains("bob-app-pass"),
        "a password reached mailgate's log:\n{log}"
    );

    // A Postfix that offers no AUTH on mailgate's plaintext leg (`smtpd_tls_auth_only`): its
    // `503 authentication not enabled` says nothing about the password, so the client hears
    // "temporary failure" (and no failure counts against the user), and the password is not
    // sent there at all.
    let auth_only = Postfix::start(
        PostfixOpts::default()
            .delivering_to(backends.dovecot.lmtp_addr(), &DOMAINS)
            .dovecot_sasl(backends.dovecot.sasl_addr())
            .main_cf("smtpd_tls_auth_only = yes"),
    );
    let misconfigured = backends.mailgate_for(&auth_only, "passthrough", MASTER.1);
    assert_refused(
        &backends,
        &misconfigured,
        "alice@skydesk.jp",
        "alice-pass",
        UNAVAILABLE,
    );
    let log = misconfigured.wait_for_log("does not offer AUTH PLAIN", Duration::from_secs(5));
    assert!(log.contains("result=backend_unavailable"), "{log}");
    assert!(!auth_only.log().contains(" auth="), "{}", auth_only.log());
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("base64 from the IMAP fetch: {e}"))
}
