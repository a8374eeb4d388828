//! PROXY protocol end to end: the real `mailgate` binary with IMAP listeners that take a PROXY
//! header (`proxy_protocol: true`) from `limits.trusted_proxies` only, a real Dovecot behind
//! it, and Python clients playing the load balancer (v1 text and v2 binary headers) in front.
//! The client address the header names is the one mailgate logs, sends to Dovecot (`rip=`)
//! and applies its per-address limits to.

mod common;

use std::time::Duration;

use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{run_python_args, Dovecot, DovecotOpts};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// `header(kind, client_ip, client_port)` builds a header; `proxied_imaps(port, header,
/// source)` connects from `source`, sends the header, then TLS; `proxied_plain` the same
/// without TLS; `result(fn)` prints what came of it.
const PRELUDE: &str = r#"
import imaplib, socket, ssl, struct, sys
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE

def header(kind, ip, port):
    if kind == "v1":
        return f"PROXY TCP4 {ip} 127.0.0.1 {port} 993\r\n".encode()
    if kind == "v2":
        body = socket.inet_aton(ip) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 993)
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
    if kind == "local":
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0])
    return kind.encode()

class Proxied(imaplib.IMAP4):
    def __init__(self, port, head, source, tls):
        self.head, self.source, self.tls = head, source, tls
        super().__init__("127.0.0.1", port, timeout=15)
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        sock.sendall(self.head)
        return CTX.wrap_socket(sock, server_hostname="imap.skydesk.jp") if self.tls else sock

def attempt(port, head, source, tls, user="alice@skydesk.jp", password="alice-pass"):
    try:
        m = Proxied(port, head, source, tls)
    except Exception as e:
        return "closed: " + type(e).__name__
    try:
        if not tls:
            m.starttls(ssl_context=CTX)
        typ, data = m.login(user, password)
        m.logout()
        return typ + " " + data[0].decode()
    except imaplib.IMAP4.error as e:
        t = e.args[0]
        return "NO " + (t.decode() if isinstance(t, bytes) else str(t))
    except Exception as e:
        return "closed: " + type(e).__name__

IMAPS, PLAIN = int(sys.argv[1]), int(sys.argv[2])
"#;

struct Setup {
    dovecot: Dovecot,
    mailgate: Mailgate,
}

impl Setup {
    fn start(limits: &[&str]) -> Setup {
        let dovecot = Dovecot::start(
            DovecotOpts::default()
                .master(MASTER.0, MASTER.1)
                .user("alice@skydesk.jp", "alice-pass"),
        );
        let pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
        let mut opts = MailgateOpts::new(pool.clone(), pool);
        opts.proxied_listeners = true;
        // The balancer is 127.0.0.1; clients that connect straight from 127.0.0.2 are not one.
        opts = opts.limit("trusted_proxies: [127.0.0.1/32]");
        for line in limits {
            opts = opts.limit(line);
        }
        let mailgate = Mailgate::start(&opts);
        Setup { dovecot, mailgate }
    }

    fn python(&self, body: &str) -> String {
        let script = format!("{PRELUDE}\n{body}");
        let imaps = self.mailgate.port("imaps-proxied").to_string();
        let plain = self.mailgate.port("imap-proxied").to_string();
        let out = run_python_args(&script, &[&imaps, &plain], CLIENT_TIMEOUT);
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}",
            self.mailgate.log()
        );
        out.stdout
    }
}

#[test]
fn the_client_a_trusted_balancer_names_is_the_client() {
    let setup = Setup::start(&[]);
    let out = setup.python(
        r#"
print("v1 tls:", attempt(IMAPS, header("v1", "203.0.113.7", 40001), "127.0.0.1", True))
print("v2 starttls:", attempt(PLAIN, header("v2", "198.51.100.9", 40002), "127.0.0.1", False))
print("local:", attempt(IMAPS, header("local", "", 0), "127.0.0.1", True))
"#,
    );
    assert!(out.contains("v1 tls: OK"), "{out}");
    assert!(out.contains("v2 starttls: OK"), "{out}");
    assert!(out.contains("local: OK"), "{out}");
    // mailgate's session lines and Dovecot (through ID) name the balancer's clients.
    let log = setup
        .mailgate
        .wait_for_log("client=198.51.100.9:40002", LOG_TIMEOUT);
    assert!(log.contains("client=203.0.113.7:40001"), "{log}");
    setup.dovecot.wait_for_log("rip=203.0.113.7", LOG_TIMEOUT);
    setup.dovecot.wait_for_log("rip=198.51.100.9", LOG_TIMEOUT);
}

#[test]
fn untrusted_peers_and_missing_headers_are_closed_and_counted() {
    let setup = Setup::start(&["handshake_timeout: 1s"]);
    let out = setup.python(
        r#"
# Straight from a client (127.0.0.2 is not a trusted proxy), even with a well-formed header.
print("untrusted:", attempt(IMAPS, header("v1", "203.0.113.7", 40001), "127.0.0.2", True))
# The balancer without a header: TLS straight away, or garbage.
print("no header:", attempt(IMAPS, b"", "127.0.0.1", True))
print("garbage:", attempt(PLAIN, b"a1 LOGIN alice alice-pass\r\n", "127.0.0.1", False))
# The plain listeners next to them are not affected.
"#,
    );
    assert!(out.contains("untrusted: closed"), "{out}");
    assert!(out.contains("no header: closed"), "{out}");
    assert!(out.contains("garbage: closed"), "{out}");
    let rejected = |listener: &str, reason: &str| {
        setup.mailgate.metric(&format!(
            "mailgate_connections_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ))
    };
    let untrusted = rejected("imaps-proxied", "untrusted_proxy");
    let no_header = rejected("imaps-proxied", "proxy_header");
    let garbage = rejected("imap-proxied", "proxy_header");
    assert_eq!((untrusted, no_header, garbage), (1, 1, 1));
    let log = setup.mailgate.log();
    assert!(log.contains("PROXY header"), "{log}");
    assert!(
        !log.contains("alice-pass"),
        "a password reached the log:\n{log}"
    );
}

#[test]
fn per_address_limits_count_the_named_client_not_the_balancer() {
    let setup = Setup::start(&["max_connections_per_ip: 2"]);
    let out = setup.python(
        r#"
import time
held = []
for i in range(2):
    held.append(Proxied(PLAIN, header("v1", "203.0.113.50", 41000 + i), "127.0.0.1", False))
# A third connection of the same client is over its cap...
try:
    Proxied(PLAIN, header("v1", "203.0.113.50", 41009), "127.0.0.1", False)
    print("third: admitted")
except imaplib.IMAP4.error as e:
    print("third:", e.args[0].decode())
# ... while another client behind the same balancer is not.
print("other:", attempt(PLAIN, header("v1", "203.0.113.51", 42000), "127.0.0.1", False))
"#,
    );
    assert!(
        out.contains("third: * BYE [UNAVAILABLE] Too many connections"),
        "{out}"
    );
    assert!(out.contains("other: OK"), "{out}");
}
