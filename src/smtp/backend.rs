//! SMTP backend side: probing a backend's EHLO extensions, and handing an authenticated
//! session to it — by XCLIENT (Postfix: the backend treats the session as coming from the
//! client's address, authenticated as the user), by `AUTH PLAIN` as a master user, or with
//! the client's own credentials.
//!
//! With `backend_tls: starttls` the backend is asked for STARTTLS after the first EHLO; once
//! it says `220`, whatever else it sent in plaintext is dropped with the plaintext connection,
//! and the EHLO is said again over TLS (the plaintext extensions are not trusted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;

pub use crate::backend::BackendError;
use crate::backend::{BackendStream, Transport};
use crate::config::{BackendTls, Secret, SmtpLogin};
use crate::health::BackendHealth;

/// Longest reply line read from a backend (RFC 5321 says 512; be generous).
const MAX_LINE: usize = 4096;
/// Most lines in one multi-line reply (an EHLO reply has a few dozen at most).
const MAX_LINES: usize = 128;

/// What a backend login needs.
pub struct LoginRequest<'a> {
    /// The full address the backend knows the user by.
    pub user: &'a str,
    /// The client's password: sent only in passthrough mode.
    pub password: &'a [u8],
    pub mode: SmtpLogin,
    /// Plaintext, STARTTLS or implicit TLS: the pool's.
    pub transport: &'a Transport,
    /// Master credentials (the pool's IMAP master user), for `mode: master`.
    pub master: Option<(&'a str, &'a Secret)>,
    pub client: SocketAddr,
    /// The client's EHLO/HELO name.
    pub client_helo: &'a str,
    /// mailgate's own name in its EHLO to the backend.
    pub hostname: &'a str,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
}

/// A backend session in the client's name, ready to splice.
#[derive(Debug)]
pub struct BackendSession {
    pub stream: BackendStream,
    /// Bytes the backend sent past the last reply read (normally none).
    pub leftover: BytesMut,
}

/// Connects to `address` as a login would (TLS included), reads the greeting, says EHLO and
/// returns the extension lines (without the first line, which is the server's name), then
/// QUIT.
///
/// # Errors
/// As for `login`.
pub async fn probe(
    address: &str,
    hostname: &str,
    transport: &Transport,
    timeout: Duration,
) -> Result<Vec<String>, BackendError> {
    let stream = transport.connect(address, timeout).await?;
    tokio::time::timeout(timeout, async {
        let (mut conn, extensions) = Conn::new(stream)
            .open(address, hostname, transport, timeout)
            .await?;
        let _ = conn.send(b"QUIT\r\n").await;
        Ok(extensions)
    })
    .await
    .map_err(|_| BackendError::Failed(format!("{address}: EHLO probe timed out")))?
}

/// Connects to `address` and makes the session the client's.
///
/// # Errors
/// `Unreachable` (try the next backend), `Refused` (the backend said no to the login or to
/// XCLIENT), `Failed` for anything else.
pub async fn login(
    address: &str,
    request: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    let stream = request
        .transport
        .connect(address, request.connect_timeout)
        .await?;
    let conn = tokio::time::timeout(
        request.login_timeout,
        Conn::new(stream).log_in(address, request),
    )
    .await
    .map_err(|_| BackendError::Failed(format!("{address}: login timed out")))??;
    Ok(BackendSession {
        stream: conn.stream,
        leftover: conn.buf,
    })
}

/// A reply: its code and its lines' texts (after the code and separator).
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

struct Conn {
    stream: BackendStream,
    buf: BytesMut,
}

impl Conn {
    fn new(stream: BackendStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// The greeting and EHLO as `hostname`; with STARTTLS, then the upgrade and EHLO again.
    /// Returns the connection (a new one after STARTTLS) and the extensions of its last EHLO.
    ///
    /// `timeout` bounds the STARTTLS handshake.
    async fn open(
        mut self,
        address: &str,
        hostname: &str,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<(Conn, Vec<String>), BackendError> {
        self.greeting().await?;
        let extensions = self.ehlo(hostname).await?;
        match transport.mode() {
            BackendTls::None | BackendTls::Implicit => Ok((self, extensions)),
            BackendTls::Starttls => {
                if !extensions.iter().any(|e| keyword(e) == "STARTTLS") {
                    return Err(BackendError::Unreachable(format!(
                        "{address}: does not offer STARTTLS"
                    )));
                }
                let mut conn = self.starttls(address, transport, timeout).await?;
                let extensions = conn.ehlo(hostname).await?;
                Ok((conn, extensions))
            }
        }
    }

    /// `STARTTLS`, its `220`, then the handshake on the bare TCP stream. The plaintext
    /// buffer, with anything the backend sent past the `220`, is dropped with `self`.
    async fn starttls(
        mut self,
        address: &str,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<Conn, BackendError> {
        self.send(b"STARTTLS\r\n").await?;
        let reply = self.reply().await?;
        if reply.code != 220 {
            return Err(BackendError::Unreachable(format!(
                "{address}: STARTTLS answered {}",
                reply.code
            )));
        }
        let BackendStream::Plain(tcp) = self.stream else {
            return Err(BackendError::Failed("STARTTLS inside TLS".into()));
        };
        Ok(Conn::new(transport.starttls(tcp, address, timeout).await?))
    }

    async fn log_in(self, address: &str, request: &LoginRequest<'_>) -> Result<Conn, BackendError> {
        let (mut conn, extensions) = self
            .open(
                address,
                request.hostname,
                request.transport,
                request.login_timeout,
            )
            .await?;
        conn.hand_over(request, &extensions).await?;
        Ok(conn)
    }

    /// Makes the session the client's: XCLIENT, or AUTH as master or as the client.
    async fn hand_over(
        &mut self,
        request: &LoginRequest<'_>,
        extensions: &[String],
    ) -> Result<(), BackendError> {
        match request.mode {
            SmtpLogin::Xclient => {
                if !offers_xclient(extensions) {
                    return Err(BackendError::Failed(
                        "backend does not offer XCLIENT to mailgate (check smtpd_authorized_xclient_hosts)".into(),
                    ));
                }
                self.xclient(request, Some(request.user)).await?;
            }
            SmtpLogin::Master | SmtpLogin::Passthrough => {
                // Where the backend lets mailgate say who the client is, it does (without
                // LOGIN: the AUTH below logs in), so the backend's `Received:` and logs name
                // the client and its EHLO name instead of mailgate.
                let extensions = if offers_xclient(extensions) {
                    self.xclient(request, None).await?
                } else {
                    extensions.to_vec()
                };
                if !offers_auth_plain(&extensions) {
                    // Without it the AUTH would get a 503 that says nothing about the
                    // password; the client's password is not sent to a server that did not
                    // ask for it.
                    return Err(BackendError::Failed(
                        "backend does not offer AUTH PLAIN to mailgate (check smtpd_sasl_auth_enable, and smtpd_tls_auth_only with backend_tls: none)".into(),
                    ));
                }
                if request.mode == SmtpLogin::Master {
                    let Some((master, secret)) = request.master else {
                        return Err(BackendError::Failed(
                            "master mode without master credentials".into(),
                        ));
                    };
                    self.auth_plain(request.user, master, secret.expose().as_bytes())
                        .await?;
                } else {
                    self.auth_plain("", request.user, request.password).await?;
                }
            }
        }
        Ok(())
    }

    /// `XCLIENT` with the client's address, port and EHLO name (and `LOGIN` when given); the
    /// session restarts as the client's, so the client's EHLO name goes again. Returns the
    /// extensions the backend offers the restarted session.
    async fn xclient(
        &mut self,
        request: &LoginRequest<'_>,
        login: Option<&str>,
    ) -> Result<Vec<String>, BackendError> {
        let command = xclient_command(request.client, login, request.client_helo);
        self.send(command.as_bytes()).await?;
        let reply = self.reply().await?;
        if reply.code != 220 {
            return Err(BackendError::Refused {
                code: Some(reply.code.to_string()),
            });
        }
        self.ehlo(request.client_helo).await
    }

    async fn auth_plain(
        &mut self,
        authzid: &str,
        authcid: &str,
        password: &[u8],
    ) -> Result<(), BackendError> {
        let mut plain = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
        plain.extend_from_slice(authzid.as_bytes());
        plain.push(0);
        plain.extend_from_slice(authcid.as_bytes());
        plain.push(0);
        plain.extend_from_slice(password);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&plain);
        self.send(format!("AUTH PLAIN {b64}\r\n").as_bytes())
            .await?;
        let reply = self.reply().await?;
        match reply.code {
            235 => Ok(()),
            // The backend judged the credentials (535), the mechanism or password kind (534),
            // or could not judge them now (454 and other 4xx).
            code @ (534 | 535 | 400..=499) => Err(BackendError::Refused {
                code: Some(code.to_string()),
            }),
            // 500/501/503/504/538: the backend's configuration or mailgate's command, never the
            // client's password: not a reason to tell the client its password is wrong.
            code => Err(BackendError::Failed(format!("AUTH answered {code}"))),
        }
    }

    async fn greeting(&mut self) -> Result<(), BackendError> {
        let reply = self.reply().await?;
        match reply.code {
            220 => Ok(()),
            421 | 554 => Err(BackendError::Unreachable(format!(
                "greeted with {}",
                reply.code
            ))),
            code => Err(BackendError::Failed(format!("unexpected greeting {code}"))),
        }
    }

    /// EHLO; the extension lines.
    async fn ehlo(&mut self, name: &str) -> Result<Vec<String>, BackendError> {
        self.send(format!("EHLO {name}\r\n").as_bytes()).await?;
        let reply = self.reply().await?;
        if reply.code != 250 {
            return Err(BackendError::Failed(format!(
                "EHLO answered {}",
                reply.code
            )));
        }
        Ok(reply.lines.into_iter().skip(1).collect())
    }

    /// Writes and flushes (a TLS stream may hold records until flushed).
    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        crate::server::write(&mut self.stream, bytes)
            .await
            .map_err(|e| BackendError::Failed(format!("write: {e}")))
    }

    /// One (possibly multi-line) reply.
    async fn reply(&mut self) -> Result<Reply, BackendError> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await?;
            let (code, last, text) = parse_reply_line(&line)
                .ok_or_else(|| BackendError::Failed("malformed reply line".into()))?;
            lines.push(text);
            if last {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_LINES {
                return Err(BackendError::Failed("reply has too many lines".into()));
            }
        }
    }

    async fn line(&mut self) -> Result<String, BackendError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let raw = self.buf.split_to(pos + 1);
                let text = String::from_utf8_lossy(&raw);
                return Ok(text.trim_end_matches(['\r', '\n']).to_string());
            }
            if self.buf.len() > MAX_LINE {
                return Err(BackendError::Failed("reply line too long".into()));
            }
            self.buf.reserve(1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(BackendError::Failed("backend closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err(BackendError::Failed(format!("read: {e}"))),
            }
        }
    }
}

/// `250-SIZE 1000` → (250, false, "SIZE 1000"); `250 OK` → (250, true, "OK").
fn parse_reply_line(line: &str) -> Option<(u16, bool, String)> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code = code.parse().ok()?;
    let (last, text) = match line.get(3..4) {
        None => (true, ""),
        Some(" ") => (true, line.get(4..).unwrap_or_default()),
        Some("-") => (false, line.get(4..).unwrap_or_default()),
        Some(_) => return None,
    };
    Some((code, last, text.to_string()))
}

/// Whether an EHLO reply offers `XCLIENT`.
fn offers_xclient(extensions: &[String]) -> bool {
    extensions.iter().any(|e| keyword(e) == "XCLIENT")
}

/// Whether an EHLO reply offers `AUTH PLAIN` (`AUTH PLAIN LOGIN`, or the old `AUTH=PLAIN`).
fn offers_auth_plain(extensions: &[String]) -> bool {
    extensions.iter().any(|e| {
        let e = e.to_ascii_uppercase();
        e.strip_prefix("AUTH ")
            .or_else(|| e.strip_prefix("AUTH="))
            .is_some_and(|mechanisms| mechanisms.split_ascii_whitespace().any(|m| m == "PLAIN"))
    })
}

/// The first word of an extension line, uppercase.
fn keyword(extension: &str) -> String {
    extension
        .split_ascii_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// `XCLIENT ADDR=.. PORT=.. LOGIN=.. NAME=[UNAVAILABLE] HELO=.. PROTO=ESMTP`, values
/// xtext-encoded (RFC 3461), IPv6 addresses as `IPV6:...`.
fn xclient_command(client: SocketAddr, login: Option<&str>, helo: &str) -> String {
    let addr = match client {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPV6:{}", v6.ip()),
        },
    };
    let login = login.map(|user| format!(" LOGIN={}", xtext(user)));
    format!(
        "XCLIENT ADDR={} PORT={}{} NAME=[UNAVAILABLE] HELO={} PROTO=ESMTP\r\n",
        xtext(&addr),
        client.port(),
        login.unwrap_or_default(),
        xtext(helo),
    )
}

/// RFC 3461 xtext: `+XX` for `+`, `=`, and anything outside `!`..`~`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line("250-SIZE 1000"),
            Some((250, false, "SIZE 1000".into()))
        );
        assert_eq!(parse_reply_line("250 OK"), Some((250, true, "OK".into())));
        assert_eq!(parse_reply_line("220"), Some((220, true, String::new())));
        assert_eq!(parse_reply_line("2x0 OK"), None);
        assert_eq!(parse_reply_line("250_OK"), None);
    }

    #[test]
    fn xclient_is_xtext_encoded() {
        let client: SocketAddr = "192.0.2.7:50123".parse().expect("addr");
        assert_eq!(
            xclient_command(client, Some("a+b=c@example.com"), "my host"),
            "XCLIENT ADDR=192.0.2.7 PORT=50123 LOGIN=a+2Bb+3Dc@example.com NAME=[UNAVAILABLE] HELO=my+20host PROTO=ESMTP\r\n"
        );
        let v6: SocketAddr = "[2001:db8::1]:25".parse().expect("addr");
        assert!(xclient_command(v6, Some("u"), "h")
            .starts_with("XCLIENT ADDR=IPV6:2001:db8::1 PORT=25 "));
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:25".parse().expect("addr");
        assert!(xclient_command(mapped, Some("u"), "h").starts_with("XCLIENT ADDR=192.0.2.1 "));
    }
}

/// Extensions to offer when no SMTP backend has answered an EHLO probe yet: what any
/// submission server honours.
const FALLBACK_EXTENSIONS: [&str; 3] = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"];

/// The EHLO extensions of every SMTP backend, as last probed (at start, then on each health
/// probe), and what mailgate offers clients from them: the extensions all backends share.
/// A backend that stops answering keeps its last list, so its limits still count, until a
/// reload takes it out of every pool ([`BackendExtensions::forget`]).
#[derive(Debug)]
pub struct BackendExtensions {
    hostname: String,
    by_backend: std::sync::Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    offered: arc_swap::ArcSwap<Vec<String>>,
}

impl BackendExtensions {
    pub fn new(hostname: &str) -> BackendExtensions {
        BackendExtensions {
            hostname: hostname.to_string(),
            by_backend: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            offered: arc_swap::ArcSwap::from_pointee(
                FALLBACK_EXTENSIONS.map(String::from).to_vec(),
            ),
        }
    }

    /// What clients are offered now (before mailgate's own AUTH/STARTTLS changes).
    pub fn offered(&self) -> Arc<Vec<String>> {
        self.offered.load_full()
    }

    /// EHLO-probes `address` and, when it answers, records its list and recomputes the offer.
    ///
    /// # Errors
    /// Why the probe failed, for the log.
    pub async fn probe(
        &self,
        address: &str,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<(), String> {
        self.probe_for(address, transport, timeout, None).await
    }

    /// [`BackendExtensions::probe`] as a backend's health probe: the answer of a backend that
    /// a reload has retired meanwhile is not recorded (the reload forgets its list).
    ///
    /// # Errors
    /// Why the probe failed, for the health log.
    pub async fn probe_for(
        &self,
        address: &str,
        transport: &Transport,
        timeout: Duration,
        health: Option<&BackendHealth>,
    ) -> Result<(), String> {
        let extensions = probe(address, &self.hostname, transport, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut by_backend = self.by_backend.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock that `forget` takes after retiring.
        if health.is_some_and(BackendHealth::is_retired) {
            return Ok(());
        }
        if by_backend.get(address) != Some(&extensions) {
            tracing::info!(backend = address, extensions = %extensions.join(", "), "SMTP backend extensions");
            by_backend.insert(address.to_string(), extensions);
            self.offer(&by_backend);
        }
        Ok(())
    }

    /// Drops the lists of backends no pool has any more (after a reload removed them): the
    /// offer is then what the remaining backends share.
    pub fn forget(&self, gone: &[&str]) {
        let mut by_backend = self.by_backend.lock().unwrap_or_else(|p| p.into_inner());
        let before = by_backend.len();
        by_backend.retain(|address, _| !gone.contains(&address.as_str()));
        if by_backend.len() != before {
            self.offer(&by_backend);
        }
    }

    fn offer(&self, by_backend: &std::collections::BTreeMap<String, Vec<String>>) {
        let offered = if by_backend.is_empty() {
            FALLBACK_EXTENSIONS.map(String::from).to_vec()
        } else {
            let lists: Vec<Vec<String>> = by_backend.values().cloned().collect();
            common_extensions(&lists)
        };
        self.offered.store(Arc::new(offered));
    }
}

/// The extensions every probed backend offers (by keyword, in the first list's order), with
/// `SIZE` at the smallest limit: what mailgate may promise before it knows the user's pool.
pub fn common_extensions(probed: &[Vec<String>]) -> Vec<String> {
    let Some((first, rest)) = probed.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for extension in first {
        let key = keyword(extension);
        let others: Vec<&String> = rest
            .iter()
            .filter_map(|list| list.iter().find(|e| keyword(e) == key))
            .collect();
        if others.len() != rest.len() {
            continue;
        }
        if key == "SIZE" {
            let size = std::iter::once(extension)
                .chain(others)
                .filter_map(|e| e.split_ascii_whitespace().nth(1)?.parse::<u64>().ok())
                .filter(|&n| n > 0)
                .min();
            out.push(match size {
                Some(n) => format!("SIZE {n}"),
                None => "SIZE".to_string(),
            });
        } else {
            out.push(extension.clone());
        }
    }
    out
}

#[cfg(test)]
mod combine_tests {
    use super::*;

    #[test]
    fn common_extensions_intersect_and_take_the_smallest_size() {
        let a = vec![
            "PIPELINING".to_string(),
            "SIZE 30000000".into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
        ];
        let b = vec![
            "SIZE 10240000".to_string(),
            "PIPELINING".into(),
            "8BITMIME".into(),
        ];
        assert_eq!(
            common_extensions(&[a.clone(), b]),
            vec![
                "PIPELINING".to_string(),
                "SIZE 10240000".into(),
                "8BITMIME".into()
            ]
        );
        assert_eq!(common_extensions(std::slice::from_ref(&a)), a);
        assert!(common_extensions(&[]).is_empty());
    }

    #[test]
    fn forgetting_a_backend_offers_what_the_rest_share() {
        let extensions = BackendExtensions::new("mailgate.test");
        {
            let mut lists = extensions
                .by_backend
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            lists.insert("a:587".into(), vec!["PIPELINING".into(), "SIZE 100".into()]);
            lists.insert(
                "b:587".into(),
                vec!["PIPELINING".into(), "SIZE 50".into(), "8BITMIME".into()],
            );
            extensions.offer(&lists);
        }
        assert_eq!(*extensions.offered(), ["PIPELINING", "SIZE 50"]);
        extensions.forget(&["b:587", "not:587"]);
        assert_eq!(*extensions.offered(), ["PIPELINING", "SIZE 100"]);
        // None left: the fallback, as before any probe answered.
        extensions.forget(&["a:587"]);
        assert_eq!(*extensions.offered(), FALLBACK_EXTENSIONS);
    }
}

/// The three login modes against a scripted backend on loopback: the exact lines mailgate
/// sends and how it reads the answers. (All three also run against a real Postfix: xclient in
/// `tests/smtp_e2e.rs`, master and passthrough through Dovecot SASL in
/// `tests/smtp_auth_e2e.rs`.)
#[cfg(test)]
mod login_tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    const EHLO_PLAIN: &str = "250-mx.example.com\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n";
    const EHLO_XCLIENT: &str =
        "250-mx.example.com\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR PORT LOGIN HELO PROTO\r\n";

    /// A backend that greets, then answers each line it reads with the next reply of
    /// `replies`; returns the lines it read.
    async fn backend(replies: Vec<&'static str>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            write
                .write_all(b"220 mx.example.com ESMTP\r\n")
                .await
                .expect("greet");
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                seen.push(line);
                write.write_all(reply.as_bytes()).await.expect("reply");
            }
            seen
        });
        (address, task)
    }

    /// The addresses in these tests are IP literals: the resolver is never asked.
    static PLAIN: std::sync::LazyLock<Transport> =
        std::sync::LazyLock::new(|| Transport::plain(resolver()));

    fn resolver() -> crate::resolver::Resolver {
        crate::resolver::Resolver::system().expect("resolver")
    }

    fn request<'a>(mode: SmtpLogin, master: Option<(&'a str, &'a Secret)>) -> LoginRequest<'a> {
        LoginRequest {
            user: "alice@skydesk.jp",
            password: b"alice pass",
            mode,
            transport: &PLAIN,
            master,
            client: "192.0.2.7:50123".parse::<SocketAddr>().expect("addr"),
            client_helo: "client.example",
            hostname: "smtp.skydesk.jp",
            connect_timeout: Duration::from_secs(5),
            login_timeout: Duration::from_secs(5),
        }
    }

    fn plain(authzid: &str, authcid: &str, password: &str) -> String {
        let raw = format!("{authzid}\0{authcid}\0{password}");
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    #[tokio::test]
    async fn xclient_then_the_clients_ehlo() {
        let (address, seen) = backend(vec![
            EHLO_XCLIENT,
            "220 mx.example.com ESMTP\r\n",
            "250-mx.example.com\r\n250 8BITMIME\r\n",
        ])
        .await;
        let session = login(&address, &request(SmtpLogin::Xclient, None))
            .await
            .expect("login");
        assert!(session.leftover.is_empty());
        assert_eq!(
            seen.await.expect("backend"),
            [
                "EHLO smtp.skydesk.jp\r\n",
                "XCLIENT ADDR=192.0.2.7 PORT=50123 LOGIN=alice@skydesk.jp NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP\r\n",
                "EHLO client.example\r\n",
            ]
        );
    }

    #[tokio::test]
    async fn xclient_refused_or_not_offered() {
        let (address, _seen) = backend(vec![
            EHLO_XCLIENT,
            "550 5.7.0 Insufficient authorization\r\n",
        ])
        .await;
        let refused = login(&address, &request(SmtpLogin::Xclient, None)).await;
        assert!(
            matches!(&refused, Err(BackendError::Refused { code: Some(c) }) if c == "550"),
            "{refused:?}"
        );
        let (address, _seen) = backend(vec![EHLO_PLAIN]).await;
        let missing = login(&address, &request(SmtpLogin::Xclient, None)).await;
        assert!(
            matches!(missing, Err(BackendError::Failed(_))),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn master_sends_the_user_as_authorization_identity() {
        let secret = Secret::new("master-secret");
        let (address, seen) =
            backend(vec![EHLO_PLAIN, "235 2.7.0 Authentication successful\r\n"]).await;
        login(
            &address,
            &request(SmtpLogin::Master, Some(("proxy", &secret))),
        )
        .await
        .expect("login");
        let expected = format!(
            "AUTH PLAIN {}\r\n",
            plain("alice@skydesk.jp", "proxy", "master-secret")
        );
        assert_eq!(
            seen.await.expect("backend"),
            ["EHLO smtp.skydesk.jp\r\n".to_string(), expected]
        );

        let (address, _seen) = backend(vec![
            EHLO_PLAIN,
            "535 5.7.8 Error: authentication failed\r\n",
        ])
        .await;
        let refused = login(
            &address,
            &request(SmtpLogin::Master, Some(("proxy", &secret))),
        )
        .await;
        assert!(
            matches!(&refused, Err(BackendError::Refused { code: Some(c) }) if c == "535"),
            "{refused:?}"
        );
    }

    /// A backend that takes XCLIENT from mailgate learns the client's address and EHLO name
    /// first (no LOGIN: the AUTH logs in), and AUTH goes to the restarted session.
    #[tokio::test]
    async fn master_and_passthrough_name_the_client_where_xclient_is_offered() {
        let secret = Secret::new("master-secret");
        let ehlo_both = "250-mx.example.com\r\n250-XCLIENT NAME ADDR PROTO HELO PORT LOGIN\r\n250 AUTH PLAIN\r\n";
        for (mode, master, auth) in [
            (
                SmtpLogin::Master,
                Some(("proxy", &secret)),
                plain("alice@skydesk.jp", "proxy", "master-secret"),
            ),
            (
                SmtpLogin::Passthrough,
                None,
                plain("", "alice@skydesk.jp", "alice pass"),
            ),
        ] {
            let (address, seen) = backend(vec![
                ehlo_both,
                "220 mx.example.com ESMTP\r\n",
                ehlo_both,
                "235 2.7.0 OK\r\n",
            ])
            .await;
            login(&address, &request(mode, master))
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
            assert_eq!(
                seen.await.expect("backend"),
                [
                    "EHLO smtp.skydesk.jp\r\n".to_string(),
                    "XCLIENT ADDR=192.0.2.7 PORT=50123 NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP\r\n".to_string(),
                    "EHLO client.example\r\n".to_string(),
                    format!("AUTH PLAIN {auth}\r\n"),
                ],
                "{mode:?}"
            );
        }
    }

    #[tokio::test]
    async fn passthrough_sends_the_clients_own_credentials() {
        let (address, seen) = backend(vec![EHLO_PLAIN, "235 2.7.0 OK\r\n"]).await;
        login(&address, &request(SmtpLogin::Passthrough, None))
            .await
            .expect("login");
        let expected = format!(
            "AUTH PLAIN {}\r\n",
            plain("", "alice@skydesk.jp", "alice pass")
        );
        assert_eq!(
            seen.await.expect("backend"),
            ["EHLO smtp.skydesk.jp\r\n".to_string(), expected]
        );
    }

    /// A backend that does not offer AUTH PLAIN (Postfix with `smtpd_sasl_auth_enable = no`,
    /// or `smtpd_tls_auth_only = yes` on a plaintext leg) is a configuration problem: no
    /// credentials are sent to it, and the error is not a refusal of the client's password.
    #[tokio::test]
    async fn auth_not_offered_sends_no_credentials_and_is_not_a_refusal() {
        let secret = Secret::new("master-secret");
        for (mode, master) in [
            (SmtpLogin::Master, Some(("proxy", &secret))),
            (SmtpLogin::Passthrough, None),
        ] {
            let (address, seen) = backend(vec![
                "250-mx.example.com\r\n250-PIPELINING\r\n250 AUTH=LOGIN\r\n",
                "235 2.7.0 OK\r\n",
            ])
            .await;
            let failed = login(&address, &request(mode, master)).await;
            assert!(
                matches!(&failed, Err(BackendError::Failed(e)) if e.contains("AUTH PLAIN")),
                "{mode:?}: {failed:?}"
            );
            assert_eq!(seen.await.expect("backend"), ["EHLO smtp.skydesk.jp\r\n"]);
        }
    }

    /// Only 534/535 (and temporary 4xx) are the backend's verdict on the credentials; a 503
    /// ("authentication not enabled"), 504 or 538 is not the client's fault, so in passthrough
    /// it must not reach the client as "credentials invalid".
    #[tokio::test]
    async fn auth_replies_that_judge_the_credentials_are_refusals_others_failures() {
        let cases: [(&'static str, Option<&str>); 6] = [
            ("535 5.7.8 Error: authentication failed\r\n", Some("535")),
            (
                "534 5.7.9 Please use an application password\r\n",
                Some("534"),
            ),
            (
                "454 4.7.0 Temporary authentication failure\r\n",
                Some("454"),
            ),
            ("503 5.5.1 Error: authentication not enabled\r\n", None),
            ("504 5.5.4 Unrecognized authentication type\r\n", None),
            ("538 5.7.11 Encryption required\r\n", None),
        ];
        for (reply, refused) in cases {
            let (address, _seen) = backend(vec![EHLO_PLAIN, reply]).await;
            let result = login(&address, &request(SmtpLogin::Passthrough, None)).await;
            match refused {
                Some(code) => assert!(
                    matches!(&result, Err(BackendError::Refused { code: Some(c) }) if c == code),
                    "{reply}: {result:?}"
                ),
                None => assert!(
                    matches!(&result, Err(BackendError::Failed(_))),
                    "{reply}: {result:?}"
                ),
            }
        }
    }

    #[test]
    fn auth_plain_is_found_in_either_spelling() {
        let offers = |lines: &[&str]| {
            offers_auth_plain(&lines.iter().map(|l| (*l).to_string()).collect::<Vec<_>>())
        };
        assert!(offers(&["PIPELINING", "AUTH PLAIN LOGIN"]));
        assert!(offers(&["auth login plain"]));
        assert!(offers(&["AUTH=PLAIN LOGIN"]));
        assert!(!offers(&["AUTH LOGIN CRAM-MD5"]));
        assert!(!offers(&["AUTHPLAIN", "XCLIENT NAME ADDR"]));
        assert!(!offers(&["AUTH PLAINX"]));
        assert!(!offers(&[]));
    }

    /// The STARTTLS injection: replies sent in plaintext right after `220 Ready to start TLS`,
    /// in the same write, must not be read as the answers to mailgate's EHLO and XCLIENT over
    /// TLS.
    #[tokio::test]
    async fn plaintext_after_the_starttls_220_is_dropped() {
        use tokio::io::AsyncReadExt;

        use crate::backend::test_pki::{read_line, Pki};

        let pki = Pki::new("mailgate test CA");
        let transport =
            Transport::with_roots("test", BackendTls::Starttls, pki.roots(), None, resolver())
                .expect("transport");
        let forged: &str = "250-forged\r\n250 XCLIENT ADDR LOGIN\r\n220 forged\r\n250 forged\r\n";
        for injected in ["250 injected\r\n", forged] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("addr").to_string();
            let acceptor = pki.acceptor(&["127.0.0.1"]);
            let backend = tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.expect("accept");
                tcp.write_all(b"220 mx.example.com ESMTP\r\n")
                    .await
                    .expect("greet");
                let mut seen = vec![read_line(&mut tcp).await];
                tcp.write_all(b"250-mx.example.com\r\n250-XCLIENT ADDR\r\n250 STARTTLS\r\n")
                    .await
                    .expect("ehlo");
                seen.push(read_line(&mut tcp).await);
                let ready = format!("220 2.0.0 Ready to start TLS\r\n{injected}");
                tcp.write_all(ready.as_bytes()).await.expect("one write");
                let tls = acceptor.accept(tcp).await.expect("handshake");
                let mut tls = BufReader::new(tls);
                for reply in [
                    EHLO_XCLIENT,
                    "220 mx.example.com ESMTP\r\n",
                    "250 mx.example.com\r\n",
                ] {
                    let mut line = String::new();
                    tls.read_line(&mut line).await.expect("read");
                    seen.push(line);
                    tls.get_mut()
                        .write_all(reply.as_bytes())
                        .await
                        .expect("reply");
                    tls.get_mut().flush().await.expect("flush");
                }
                // The session is the client's now: what it sends arrives over TLS.
                let mut rest = String::new();
                let _ = tls.read_to_string(&mut rest).await;
                seen.push(rest);
                seen
            });
            let mut request = request(SmtpLogin::Xclient, None);
            request.transport = &transport;
            let mut session = login(&address, &request).await.expect("login");
            assert!(session.stream.is_tls());
            assert!(session.leftover.is_empty(), "{:?}", session.leftover);
            session
                .stream
                .write_all(b"QUIT\r\n")
                .await
                .expect("client bytes");
            session.stream.shutdown().await.expect("close");
            assert_eq!(
                backend.await.expect("backend"),
                [
                    "EHLO smtp.skydesk.jp\r\n",
                    "STARTTLS\r\n",
                    "EHLO smtp.skydesk.jp\r\n",
                    "XCLIENT ADDR=192.0.2.7 PORT=50123 LOGIN=alice@skydesk.jp NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP\r\n",
                    "EHLO client.example\r\n",
                    "QUIT\r\n",
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_backend_without_starttls_is_not_used_in_plaintext() {
        use crate::backend::test_pki::Pki;

        let pki = Pki::new("mailgate test CA");
        let transport =
            Transport::with_roots("test", BackendTls::Starttls, pki.roots(), None, resolver())
                .expect("transport");
        let (address, seen) = backend(vec![EHLO_XCLIENT]).await;
        let mut request = request(SmtpLogin::Xclient, None);
        request.transport = &transport;
        let refused = login(&address, &request).await;
        assert!(
            matches!(&refused, Err(BackendError::Unreachable(e)) if e.contains("does not offer STARTTLS")),
            "{refused:?}"
        );
        assert_eq!(seen.await.expect("backend"), ["EHLO smtp.skydesk.jp\r\n"]);
    }
}
