//! Proves the real-backend harness with real clients and no proxy: Dovecot logins (plain, master
//! user, forwarded client address), delivery and FETCH, Postfix XCLIENT submission delivered over
//! LMTP, two Postfix instances at once, and the client helpers' deadlines.

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    run_cmd, run_cmd_stdin, run_python_args, run_python_async, Dovecot, DovecotOpts, Postfix,
    PostfixOpts,
};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Logs in three ways and prints what each session sees, one `key value` line per fact.
/// argv: host port user password master master_password
const IMAP_LOGINS: &str = r#"
import imaplib, sys
host, port, user, password, master, master_password = sys.argv[1:7]
port = int(port)

def fetch_first(m):
    typ, data = m.select('INBOX')
    assert typ == 'OK', (typ, data)
    typ, data = m.fetch('1', '(BODY.PEEK[])')
    assert typ == 'OK', (typ, data)
    return data[0][1]

# Plain LOGIN, after forwarding a client address with ID (we are on a trusted network).
m = imaplib.IMAP4(host, port)
typ, _ = m.xatom('ID', '("x-originating-ip" "192.0.2.7" "x-originating-port" "40123" "x-session-id" "selftest-1")')
print('id', typ)
typ, _ = m.login(user, password)
print('login', typ)
print('login_body', fetch_first(m).hex())
m.logout()

# Master user: AUTHENTICATE PLAIN with authzid = user, authcid = master.
m = imaplib.IMAP4(host, port)
typ, _ = m.authenticate('PLAIN', lambda _: b'\0'.join([user.encode(), master.encode(), master_password.encode()]))
print('master', typ)
print('master_body', fetch_first(m).hex())
m.logout()

# A wrong password is refused.
m = imaplib.IMAP4(host, port)
try:
    m.login(user, password + '-wrong')
    print('wrong', 'OK')
except imaplib.IMAP4.error:
    print('wrong', 'NO')
m.logout()
"#;

/// Value of the `key value` line in a client's stdout.
fn fact<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key:?} in client output:\n{stdout}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn imap_logins(dovecot: &Dovecot, user: &str, password: &str) -> String {
    let port = dovecot.imap_addr().port().to_string();
    let out = run_python_args(
        IMAP_LOGINS,
        &[
            "127.0.0.1",
            &port,
            user,
            password,
            dovecot.master_user(),
            dovecot.master_password(),
        ],
        CLIENT_TIMEOUT,
    );
    out.assert_success().to_owned()
}

#[test]
fn dovecot_plain_and_master_logins_see_the_users_mailbox() {
    let started = Instant::now();
    let (alice_store, mut bob_store) = thread::scope(|s| {
        let a = s.spawn(|| {
            Dovecot::start(
                DovecotOpts::default()
                    .user("alice@example.com", "alice-pw")
                    .master("proxy", "proxy-pw"),
            )
        });
        let b =
            s.spawn(|| Dovecot::start(DovecotOpts::default().user("bob@example.org", "bob-pw")));
        (
            a.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
            b.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        )
    });
    assert_ne!(alice_store.imap_addr(), bob_store.imap_addr());

    let to_alice = b"From: carol@example.net\r\nTo: alice@example.com\r\nSubject: for alice\r\n\r\nHello Alice.\r\n";
    let to_bob =
        b"From: carol@example.net\r\nTo: bob@example.org\r\nSubject: for bob\r\n\r\nHello Bob.\r\n";
    alice_store.deliver("alice@example.com", "INBOX", to_alice);
    bob_store.deliver("bob@example.org", "INBOX", to_bob);
    alice_store.deliver("alice@example.com", "Archive", b"Subject: old\r\n\r\nx\r\n");
    assert_eq!(
        alice_store.messages("alice@example.com", "Archive").len(),
        1
    );

    let alice = imap_logins(&alice_store, "alice@example.com", "alice-pw");
    assert_eq!(fact(&alice, "id"), "OK");
    assert_eq!(fact(&alice, "login"), "OK");
    assert_eq!(
        fact(&alice, "login_body"),
        hex(to_alice),
        "FETCH after LOGIN"
    );
    assert_eq!(fact(&alice, "master"), "OK");
    assert_eq!(
        fact(&alice, "master_body"),
        hex(to_alice),
        "FETCH as master"
    );
    assert_eq!(fact(&alice, "wrong"), "NO");

    let log = alice_store.log();
    assert!(
        log.contains("Login: user=<alice@example.com>, method=PLAIN, rip=192.0.2.7,"),
        "forwarded client address not logged:\n{log}"
    );
    assert!(
        log.contains("Master user logging in as alice@example.com"),
        "master login not logged:\n{log}"
    );

    // The other store has its own user and not alice.
    let bob = imap_logins(&bob_store, "bob@example.org", "bob-pw");
    assert_eq!(fact(&bob, "login_body"), hex(to_bob));
    assert_eq!(
        fact(&bob, "master"),
        "OK",
        "default master user proxy/master-secret"
    );
    let port = bob_store.imap_addr().port().to_string();
    let alice_at_bob = run_python_args(
        IMAP_LOGINS,
        &[
            "127.0.0.1",
            &port,
            "alice@example.com",
            "alice-pw",
            "proxy",
            "x",
        ],
        CLIENT_TIMEOUT,
    );
    assert!(
        !alice_at_bob.success(),
        "alice logged in at bob's store:\n{alice_at_bob}"
    );
    assert!(
        alice_at_bob.stderr.contains("AUTHENTICATIONFAILED"),
        "{alice_at_bob}"
    );

    // Stopping leaves nothing listening.
    let bob_addr = bob_store.imap_addr();
    bob_store.stop();
    assert!(
        TcpStream::connect_timeout(&bob_addr, Duration::from_secs(1)).is_err(),
        "{bob_addr} still accepts after stop"
    );
    eprintln!("dovecot self-test took {:?}", started.elapsed());
}

/// argv: host port user. Prints `relay_without_xclient CODE`, `xclient CODE`, `sent OK`.
const SMTP_XCLIENT: &str = r#"
import smtplib, sys
host, port, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
msg = ('From: %s\r\nTo: %s\r\nSubject: via xclient\r\n\r\nHello over submission.\r\n' % (user, user)).encode()

# Without XCLIENT the session is not authenticated: relaying is refused.
s = smtplib.SMTP(host, port, timeout=10)
s.ehlo('client.example.net')
s.mail(user)
code, _ = s.rcpt(user)
print('relay_without_xclient', code)
s.quit()

s = smtplib.SMTP(host, port, timeout=10)
s.ehlo('client.example.net')
assert s.has_extn('xclient'), s.esmtp_features
code, reply = s.docmd('XCLIENT', 'ADDR=192.0.2.9 LOGIN=' + user)
print('xclient', code)
s.ehlo('client.example.net')
refused = s.sendmail(user, [user], msg)
assert not refused, refused
print('sent OK')
s.quit()
"#;

#[test]
fn postfix_xclient_login_relays_and_delivers_over_lmtp() {
    let started = Instant::now();
    let dovecot = Dovecot::start(
        DovecotOpts::default()
            .user("alice@example.com", "alice-pw")
            .with_lmtp(),
    );
    let postfix =
        Postfix::start(PostfixOpts::default().delivering_to(dovecot.lmtp_addr(), &["example.com"]));

    let port = postfix.submission_addr().port().to_string();
    let out = run_python_args(
        SMTP_XCLIENT,
        &["127.0.0.1", &port, "alice@example.com"],
        CLIENT_TIMEOUT,
    );
    let stdout = out.assert_success();
    assert!(
        fact(stdout, "relay_without_xclient").starts_with('5'),
        "{out}"
    );
    assert_eq!(fact(stdout, "xclient"), "220", "{out}");
    assert_eq!(fact(stdout, "sent"), "OK");

    postfix.wait_for_log(
        "sasl_method=XCLIENT, sasl_username=alice@example.com",
        Duration::from_secs(5),
    );
    let messages =
        dovecot.wait_for_messages("alice@example.com", "INBOX", 1, Duration::from_secs(10));
    let delivered =
        String::from_utf8_lossy(messages.first().map_or(&[][..], Vec::as_slice)).into_owned();
    let received = unfolded_headers(&delivered, "Received");
    let by_postfix = received
        .iter()
        .find(|r| r.contains("(Authenticated sender: alice@example.com)"))
        .unwrap_or_else(|| panic!("no authenticated Received: header in\n{delivered}"));
    assert!(by_postfix.contains("[192.0.2.9]"), "{by_postfix}");
    assert!(
        by_postfix.contains("by mx.mailgate.test (Postfix)"),
        "{by_postfix}"
    );
    assert!(delivered.contains("Hello over submission."), "{delivered}");
    eprintln!("postfix self-test took {:?}", started.elapsed());
}

/// The values of every `name:` header, continuation lines joined.
fn unfolded_headers(message: &str, name: &str) -> Vec<String> {
    let head = message
        .split("\r\n\r\n")
        .next()
        .and_then(|h| h.split("\n\n").next())
        .unwrap_or_default();
    let mut fields: Vec<String> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            fields.push(line.trim_end().to_owned());
        }
    }
    let prefix = format!("{}:", name.to_ascii_lowercase());
    fields
        .into_iter()
        .filter(|f| f.to_ascii_lowercase().starts_with(&prefix))
        .collect()
}

#[test]
fn two_postfix_instances_run_side_by_side() {
    let (mut first, second) = thread::scope(|s| {
        let a = s.spawn(|| Postfix::start(PostfixOpts::default().myhostname("one.mailgate.test")));
        let b = s.spawn(|| Postfix::start(PostfixOpts::default().myhostname("two.mailgate.test")));
        (
            a.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
            b.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        )
    });
    let greeting = |p: &Postfix| {
        let out = run_cmd(
            "swaks",
            &[
                "--server",
                &p.submission_addr().to_string(),
                "--quit-after",
                "EHLO",
            ],
            CLIENT_TIMEOUT,
        );
        out.assert_success().to_owned()
    };
    assert!(greeting(&first).contains("220 one.mailgate.test ESMTP"));
    assert!(greeting(&second).contains("220 two.mailgate.test ESMTP"));

    let first_addr = first.submission_addr();
    first.stop();
    assert!(TcpStream::connect_timeout(&first_addr, Duration::from_secs(1)).is_err());
    assert!(
        greeting(&second).contains("220 two.mailgate.test ESMTP"),
        "stopping one instance stopped the other"
    );
}

#[test]
fn clients_are_killed_at_their_deadline() {
    let started = Instant::now();
    let out = run_cmd("sleep", &["30"], Duration::from_millis(300));
    assert!(out.timed_out && !out.success(), "{out}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let out = run_cmd_stdin("cat", &[], b"line one\nline two\n", Duration::from_secs(5));
    assert_eq!(out.assert_success(), "line one\nline two\n");
}

/// The async helper must not block the runtime: the server below runs on the test's
/// current-thread runtime while the Python client talks to it.
#[tokio::test]
async fn async_python_client_runs_beside_a_server_on_the_same_runtime() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port();
    // A tiny IMAP server: answers CAPABILITY and LOGOUT, returns the commands it saw.
    let server = tokio::spawn(async move {
        let (stream, _) = listener
            .accept()
            .await
            .unwrap_or_else(|e| panic!("accept: {e}"));
        let (read, mut write) = stream.into_split();
        write.write_all(b"* OK selftest ready\r\n").await.ok();
        let mut lines = BufReader::new(read).lines();
        let mut commands = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split(' ');
            let tag = words.next().unwrap_or_default().to_owned();
            let command = words.next().unwrap_or_default().to_ascii_uppercase();
            let reply = match command.as_str() {
                "CAPABILITY" => format!("* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n"),
                "LOGOUT" => format!("* BYE\r\n{tag} OK done\r\n"),
                _ => format!("{tag} BAD unknown\r\n"),
            };
            write.write_all(reply.as_bytes()).await.ok();
            commands.push(command);
        }
        commands
    });
    let script = format!(
        "import imaplib\nm = imaplib.IMAP4('127.0.0.1', {port})\nprint(m.welcome.decode())\nprint(m.logout()[0])\n"
    );
    let out = run_python_async(&script, CLIENT_TIMEOUT).await;
    let stdout = out.assert_success();
    assert!(stdout.contains("selftest ready"), "{out}");
    assert!(stdout.contains("BYE"), "{out}");
    let commands = server.await.unwrap_or_else(|e| panic!("server task: {e}"));
    assert_eq!(commands, ["CAPABILITY", "LOGOUT"]);
}
