//! IMAP backend login: connect, read the greeting, STARTTLS when the pool says so, send `ID`
//! with the client's real address, log in (master user or the client's own credentials), learn
//! the post-login capabilities.
//!
//! After the backend's `OK` to STARTTLS, whatever else it sent in plaintext is dropped with the
//! plaintext connection: a man in the middle could have put it there. Capabilities are asked
//! for again over TLS for the same reason.
//!
//! mailgate uses its own tags (`mg1`, `mg2`, ...) here; the client's tag is used only in the
//! reply mailgate writes to the client. Backend texts never reach the client: a refusal comes
//! back as a response code (or none) and the caller maps it.

use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use zeroize::Zeroize;

pub use crate::backend::BackendError;
use crate::backend::{BackendStream, Transport};
use crate::config::BackendTls;
use crate::routing::ImapLogin;

/// Longest backend response mailgate reads during login (lines plus literals).
const MAX_RESPONSE: usize = 64 * 1024;

/// What a backend login needs.
pub struct LoginRequest<'a> {
    /// The full address the backend knows the user by.
    pub user: &'a str,
    /// The client's password; sent only in passthrough mode.
    pub password: &'a [u8],
    pub login: &'a ImapLogin,
    /// Plaintext, STARTTLS or implicit TLS: the pool's.
    pub transport: &'a Transport,
    /// `ID` fields, in order: mailgate's `x-` fields, then the client's own.
    pub id: &'a [(&'a str, &'a str)],
    pub connect_timeout: Duration,
    /// For the whole exchange after connect.
    pub login_timeout: Duration,
}

/// A logged-in backend connection, ready to splice.
#[derive(Debug)]
pub struct BackendSession {
    pub stream: BackendStream,
    /// The post-login capability list, space-separated.
    pub capabilities: String,
    /// Bytes the backend sent after the login reply (normally none): forward them first.
    pub leftover: BytesMut,
}

/// Connects to `address` and logs in as `request.user`.
///
/// # Errors
/// `Unreachable` when the connection fails (try the next backend), `Refused` when the
/// backend says NO, `Failed` for anything else.
pub async fn login(
    address: &str,
    request: &LoginRequest<'_>,
) -> Result<BackendSession, BackendError> {
    let stream = request
        .transport
        .connect(address, request.connect_timeout)
        .await?;
    tokio::time::timeout(
        request.login_timeout,
        Conn::new(stream).log_in(address, request),
    )
    .await
    .map_err(|_| BackendError::Failed(format!("{address}: login timed out")))?
}

/// Connects to `address` as a login would (TLS included), reads the greeting, and logs out:
/// the health probe of an IMAP backend, all within `timeout`.
///
/// # Errors
/// What went wrong, for the health log.
pub async fn probe(
    address: &str,
    transport: &Transport,
    timeout: Duration,
) -> Result<(), BackendError> {
    let attempt = async {
        let stream = transport.connect(address, timeout).await?;
        let mut conn = Conn::new(stream).open(address, transport, timeout).await?.0;
        // Best effort: a polite goodbye, so the backend logs no error.
        let tag = conn.tag();
        let _ = conn.send(format!("{tag} LOGOUT\r\n").as_bytes()).await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        BackendError::Unreachable(format!("{address}: no greeting within {timeout:?}"))
    })?
}

struct Conn {
    stream: BackendStream,
    buf: BytesMut,
    next_tag: u32,
}

impl Conn {
    fn new(stream: BackendStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::with_capacity(1024),
            next_tag: 1,
        }
    }

    /// The greeting, then STARTTLS when the transport says so. Returns the connection (a new
    /// one after STARTTLS) and the capabilities the greeting announced, if they can be
    /// trusted (never those of a plaintext greeting before STARTTLS).
    ///
    /// `timeout` bounds the STARTTLS handshake.
    async fn open(
        mut self,
        address: &str,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<(Conn, Option<String>), BackendError> {
        let greeting = self.read_response().await?;
        let capabilities = match parse(&greeting) {
            Response::Untagged {
                status: Some(Status::Ok),
                code,
                ..
            } => capability_code(code),
            Response::Untagged {
                status: Some(Status::Bye),
                ..
            } => return Err(BackendError::Unreachable("greeted with BYE".into())),
            Response::Untagged {
                status: Some(Status::PreAuth),
                ..
            } => return Err(BackendError::Failed("greeted with PREAUTH: refused".into())),
            _ => return Err(BackendError::Failed("unexpected greeting".into())),
        };
        match transport.mode() {
            BackendTls::Starttls => Ok((self.starttls(address, transport, timeout).await?, None)),
            BackendTls::None | BackendTls::Implicit => Ok((self, capabilities)),
        }
    }

    /// `STARTTLS`, its tagged `OK`, then the handshake on the bare TCP stream. The plaintext
    /// buffer, with anything the backend sent past the `OK`, is dropped with `self`.
    async fn starttls(
        mut self,
        address: &str,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<Conn, BackendError> {
        let tag = self.tag();
        self.send(format!("{tag} STARTTLS\r\n").as_bytes()).await?;
        let (status, _) = self.read_tagged(&tag, &mut None).await?;
        if status != Status::Ok {
            // A backend that does not do STARTTLS: another one of the pool may.
            return Err(BackendError::Unreachable(format!(
                "{address}: STARTTLS refused ({status:?})"
            )));
        }
        let Conn {
            stream, next_tag, ..
        } = self;
        let BackendStream::Plain(tcp) = stream else {
            return Err(BackendError::Failed("STARTTLS inside TLS".into()));
        };
        let stream = transport.starttls(tcp, address, timeout).await?;
        Ok(Conn {
            next_tag,
            ..Conn::new(stream)
        })
    }

    async fn log_in(
        self,
        address: &str,
        request: &LoginRequest<'_>,
    ) -> Result<BackendSession, BackendError> {
        let (mut conn, capabilities) = self
            .open(address, request.transport, request.login_timeout)
            .await?;
        let caps = match capabilities {
            Some(caps) => caps,
            None => conn.capability().await?,
        };
        conn.authenticate(request, &caps).await
    }

    async fn authenticate(
        mut self,
        request: &LoginRequest<'_>,
        caps: &str,
    ) -> Result<BackendSession, BackendError> {
        // `ID` first, so the backend logs the real client; when the login needs no
        // continuation it goes in the same write (one round trip instead of two).
        let mut out = Vec::with_capacity(512);
        let id_tag = if has_capability(caps, "ID") && !request.id.is_empty() {
            let tag = self.tag();
            out.extend_from_slice(format!("{tag} ID ").as_bytes());
            put_id_list(&mut out, request.id);
            out.extend_from_slice(b"\r\n");
            Some(tag)
        } else {
            None
        };
        let tag = self.tag();
        let mut after_login = None;
        let sasl_plain = |user: &str, password: &str| {
            let mut plain =
                Vec::with_capacity(request.user.len() + user.len() + password.len() + 2);
            plain.extend_from_slice(request.user.as_bytes());
            plain.push(0);
            plain.extend_from_slice(user.as_bytes());
            plain.push(0);
            plain.extend_from_slice(password.as_bytes());
            let b64 = base64::engine::general_purpose::STANDARD.encode(&plain);
            plain.zeroize();
            b64
        };
        let one_shot = match request.login {
            ImapLogin::Master { user, password } if has_capability(caps, "SASL-IR") => {
                let mut b64 = sasl_plain(user, password.expose());
                out.extend_from_slice(format!("{tag} AUTHENTICATE PLAIN {b64}\r\n").as_bytes());
                b64.zeroize();
                true
            }
            ImapLogin::Passthrough if has_capability(caps, "LITERAL+") => {
                let (user, pass) = (request.user.as_bytes(), request.password);
                out.extend_from_slice(format!("{tag} LOGIN {{{}+}}\r\n", user.len()).as_bytes());
                out.extend_from_slice(user);
                out.extend_from_slice(format!(" {{{}+}}\r\n", pass.len()).as_bytes());
                out.extend_from_slice(pass);
                out.extend_from_slice(b"\r\n");
                true
            }
            _ => false,
        };
        if !out.is_empty() {
            let sent = self.send(&out).await;
            out.zeroize();
            sent?;
        }
        if let Some(id_tag) = id_tag {
            // The answer does not matter: an older backend may say BAD, and login goes on.
            self.read_tagged(&id_tag, &mut None).await?;
        }
        if !one_shot {
            match request.login {
                ImapLogin::Master { user, password } => {
                    let mut b64 = sasl_plain(user, password.expose());
                    self.send(format!("{tag} AUTHENTICATE PLAIN\r\n").as_bytes())
                        .await?;
                    self.expect_continuation(&tag).await?;
                    let mut line = format!("{b64}\r\n");
                    b64.zeroize();
                    let sent = self.send(line.as_bytes()).await;
                    line.zeroize();
                    sent?;
                }
                ImapLogin::Passthrough => {
                    let user = request.user.as_bytes();
                    let pass = request.password;
                    self.send(format!("{tag} LOGIN {{{}}}\r\n", user.len()).as_bytes())
                        .await?;
                    self.expect_continuation(&tag).await?;
                    let mut cmd = user.to_vec();
                    cmd.extend_from_slice(format!(" {{{}}}\r\n", pass.len()).as_bytes());
                    self.send(&cmd).await?;
                    self.expect_continuation(&tag).await?;
                    let mut cmd = pass.to_vec();
                    cmd.extend_from_slice(b"\r\n");
                    let sent = self.send(&cmd).await;
                    cmd.zeroize();
                    sent?;
                }
            }
        }
        let (status, code) = self.read_tagged(&tag, &mut after_login).await?;
        match status {
            Status::Ok => {}
            Status::No => {
                return Err(BackendError::Refused {
                    code: code.map(|c| c.0),
                })
            }
            _ => return Err(BackendError::Failed("login answered BAD".into())),
        }
        let capabilities = match code.filter(|c| c.0.eq_ignore_ascii_case("CAPABILITY")) {
            Some(CodeOwned(_, caps)) => caps,
            None => match after_login {
                Some(caps) => caps,
                None => self.capability().await?,
            },
        };
        Ok(BackendSession {
            stream: self.stream,
            capabilities,
            leftover: self.buf,
        })
    }

    fn tag(&mut self) -> String {
        let tag = format!("mg{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    /// Writes and flushes (a TLS stream may hold records until flushed).
    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        crate::server::write(&mut self.stream, bytes)
            .await
            .map_err(|e| BackendError::Failed(format!("write: {e}")))
    }

    /// `CAPABILITY`, returning the untagged list.
    async fn capability(&mut self) -> Result<String, BackendError> {
        let tag = self.tag();
        self.send(format!("{tag} CAPABILITY\r\n").as_bytes())
            .await?;
        let mut caps = None;
        let (status, _) = self.read_tagged(&tag, &mut caps).await?;
        match (status, caps) {
            (Status::Ok, Some(caps)) => Ok(caps),
            _ => Err(BackendError::Failed("CAPABILITY failed".into())),
        }
    }

    async fn expect_continuation(&mut self, tag: &str) -> Result<(), BackendError> {
        loop {
            let response = self.read_response().await?;
            match parse(&response) {
                Response::Continue => return Ok(()),
                Response::Tagged {
                    tag: t,
                    status: Status::No,
                    code,
                    ..
                } if t == tag => {
                    return Err(BackendError::Refused {
                        code: code.map(|c| c.0.to_string()),
                    })
                }
                Response::Tagged { .. } => {
                    return Err(BackendError::Failed("expected a continuation".into()))
                }
                _ => continue,
            }
        }
    }

    /// Reads responses until the one tagged `tag`; an untagged CAPABILITY on the way is kept
    /// in `capabilities`.
    async fn read_tagged(
        &mut self,
        tag: &str,
        capabilities: &mut Option<String>,
    ) -> Result<(Status, Option<CodeOwned>), BackendError> {
        loop {
            let response = self.read_response().await?;
            match parse(&response) {
                Response::Tagged {
                    tag: t,
                    status,
                    code,
                    ..
                } if t == tag => {
                    return Ok((
                        status,
                        code.map(|c| CodeOwned(c.0.to_string(), c.1.to_string())),
                    ))
                }
                Response::Capability(list) => *capabilities = Some(list.to_string()),
                Response::Untagged {
                    status: Some(Status::Bye),
                    ..
                } => return Err(BackendError::Failed("backend said BYE".into())),
                Response::Tagged { .. } | Response::Continue => {
                    return Err(BackendError::Failed("unexpected response".into()))
                }
                _ => continue,
            }
        }
    }

    /// One whole response: a line, and for each literal it announces, the literal and the rest
    /// of the line. Bounded by `MAX_RESPONSE`.
    async fn read_response(&mut self) -> Result<Vec<u8>, BackendError> {
        let mut response = Vec::new();
        loop {
            let line = self.read_line().await?;
            let literal = literal_size(&line);
            response.extend_from_slice(&line);
            let Some(size) = literal else {
                return Ok(response);
            };
            if response.len() + size > MAX_RESPONSE {
                return Err(BackendError::Failed("response too long".into()));
            }
            while self.buf.len() < size {
                self.fill().await?;
            }
            response.extend_from_slice(&self.buf.split_to(size));
        }
    }

    /// A line including its CRLF.
    async fn read_line(&mut self) -> Result<BytesMut, BackendError> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.split_to(pos + 2));
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(BackendError::Failed("response line too long".into()));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), BackendError> {
        self.buf.reserve(4096);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(BackendError::Failed("backend closed the connection".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(BackendError::Failed(format!("read: {e}"))),
        }
    }
}

/// `{123}` or `{123+}` at the end of a line (before CRLF).
fn literal_size(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?;
    let line = line.strip_suffix(b"}")?;
    let line = line.strip_suffix(b"+").unwrap_or(line);
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = line.get(open + 1..)?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    No,
    Bad,
    Bye,
    PreAuth,
}

/// A response code: its name and the rest inside the brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Code<'a>(&'a str, &'a str);

#[derive(Debug, Clone, PartialEq, Eq)]
struct CodeOwned(String, String);

#[derive(Debug, PartialEq, Eq)]
enum Response<'a> {
    Continue,
    /// `* CAPABILITY ...`
    Capability(&'a str),
    /// `* OK|NO|BAD|BYE|PREAUTH [code] text`, or other untagged data (status None).
    Untagged {
        status: Option<Status>,
        code: Option<Code<'a>>,
    },
    Tagged {
        tag: &'a str,
        status: Status,
        code: Option<Code<'a>>,
    },
    Unparsable,
}

fn parse(response: &[u8]) -> Response<'_> {
    let Ok(text) = std::str::from_utf8(response.strip_suffix(b"\r\n").unwrap_or(response)) else {
        return Response::Unparsable;
    };
    if text == "+" || text.starts_with("+ ") {
        return Response::Continue;
    }
    let Some((tag, rest)) = text.split_once(' ') else {
        return Response::Unparsable;
    };
    let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match word.to_ascii_uppercase().as_str() {
        "OK" => Some(Status::Ok),
        "NO" => Some(Status::No),
        "BAD" => Some(Status::Bad),
        "BYE" => Some(Status::Bye),
        "PREAUTH" => Some(Status::PreAuth),
        "CAPABILITY" if tag == "*" => return Response::Capability(rest.trim()),
        _ => None,
    };
    let code = rest
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(inside, _)| {
            let (name, args) = inside.split_once(' ').unwrap_or((inside, ""));
            Code(name, args)
        });
    match (tag, status) {
        ("*", status) => Response::Untagged { status, code },
        (tag, Some(status)) => Response::Tagged { tag, status, code },
        _ => Response::Unparsable,
    }
}

fn capability_code(code: Option<Code<'_>>) -> Option<String> {
    code.filter(|c| c.0.eq_ignore_ascii_case("CAPABILITY"))
        .map(|c| c.1.to_string())
}

fn has_capability(list: &str, name: &str) -> bool {
    list.split_ascii_whitespace()
        .any(|c| c.eq_ignore_ascii_case(name))
}

/// Appends `("k" "v" ...)` to `out`, each string quoted; pairs whose key or value cannot be a
/// quoted string (controls, 8-bit) are left out, and `NIL` stands for a list left empty.
fn put_id_list(out: &mut Vec<u8>, fields: &[(&str, &str)]) {
    let quotable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
    let quote = |out: &mut Vec<u8>, s: &str| {
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    };
    let mut open = false;
    for (k, v) in fields.iter().filter(|(k, v)| quotable(k) && quotable(v)) {
        out.push(if open { b' ' } else { b'(' });
        open = true;
        quote(out, k);
        out.push(b' ');
        quote(out, v);
    }
    out.extend_from_slice(if open { b")" } else { b"NIL" });
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::login as login_to;
    use super::*;

    fn resolver() -> crate::resolver::Resolver {
        crate::resolver::Resolver::system().expect("resolver")
    }

    #[test]
    fn parses_login_phase_responses() {
        assert_eq!(parse(b"+ \r\n"), Response::Continue);
        assert_eq!(parse(b"+\r\n"), Response::Continue);
        assert_eq!(
            parse(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID] Dovecot ready.\r\n"),
            Response::Untagged {
                status: Some(Status::Ok),
                code: Some(Code("CAPABILITY", "IMAP4rev1 SASL-IR ID")),
            }
        );
        assert_eq!(
            parse(b"* CAPABILITY IMAP4rev1 IDLE\r\n"),
            Response::Capability("IMAP4rev1 IDLE")
        );
        assert_eq!(
            parse(b"mg3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            Response::Tagged {
                tag: "mg3",
                status: Status::No,
                code: Some(Code("AUTHENTICATIONFAILED", "")),
            }
        );
        assert_eq!(
            parse(b"mg3 no Login failed\r\n"),
            Response::Tagged {
                tag: "mg3",
                status: Status::No,
                code: None
            }
        );
        assert_eq!(
            parse(b"* PREAUTH hi\r\n"),
            Response::Untagged {
                status: Some(Status::PreAuth),
                code: None
            }
        );
        assert_eq!(parse(b"garbage\r\n"), Response::Unparsable);
    }

    #[test]
    fn finds_literals_at_line_end() {
        assert_eq!(literal_size(b"* ID (\"name\" {7}\r\n"), Some(7));
        assert_eq!(literal_size(b"a LOGIN {5+}\r\n"), Some(5));
        assert_eq!(literal_size(b"* OK {x}\r\n"), None);
        assert_eq!(literal_size(b"* OK done\r\n"), None);
        assert_eq!(literal_size(b"* OK {9999999999}\r\n"), None);
    }

    #[test]
    fn id_list_quotes_and_drops_unquotable_pairs() {
        let id = |fields: &[(&str, &str)]| {
            let mut out = b"mg1 ID ".to_vec();
            put_id_list(&mut out, fields);
            String::from_utf8(out).expect("ASCII")
        };
        assert_eq!(
            id(&[
                ("x-originating-ip", "192.0.2.7"),
                ("name", "Thunder\"bird\\"),
                ("evil", "a\r\nb"),
                ("caf\u{e9}", "8-bit key"),
            ]),
            r#"mg1 ID ("x-originating-ip" "192.0.2.7" "name" "Thunder\"bird\\")"#
        );
        // RFC 2971: a list is never empty, NIL says "nothing".
        assert_eq!(id(&[("evil", "a\0b")]), "mg1 ID NIL");
    }

    /// The STARTTLS injection: a backend (or a man in the middle) sends more in plaintext right
    /// after `OK Begin TLS`, in the same write. None of it may count as the backend's words
    /// over TLS: not a harmless untagged line, and not forged answers to the commands mailgate
    /// is about to send.
    #[tokio::test]
    async fn plaintext_after_the_starttls_ok_is_dropped() {
        use tokio::io::{AsyncBufReadExt, BufReader};

        use crate::backend::test_pki::{read_line, Pki};

        let pki = Pki::new("mailgate test CA");
        let transport =
            Transport::with_roots("test", BackendTls::Starttls, pki.roots(), None, resolver())
                .expect("transport");
        let forged: &[u8] = b"* CAPABILITY IMAP4rev1 SASL-IR FORGED\r\nmg2 OK done\r\n\
                              mg3 OK [CAPABILITY IMAP4rev1 FORGED] Logged in\r\n";
        for injected in [&b"* OK injected\r\n"[..], forged] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("addr").to_string();
            let acceptor = pki.acceptor(&["127.0.0.1"]);
            let backend = tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.expect("accept");
                tcp.write_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n")
                    .await
                    .expect("greet");
                let mut seen = vec![read_line(&mut tcp).await];
                let mut ok = b"mg1 OK Begin TLS\r\n".to_vec();
                ok.extend_from_slice(injected);
                tcp.write_all(&ok).await.expect("one write");
                let tls = acceptor.accept(tcp).await.expect("handshake");
                let mut tls = BufReader::new(tls);
                for reply in [
                    &b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\nmg2 OK done\r\n"[..],
                    b"mg3 OK [CAPABILITY IMAP4rev1 IDLE REAL] Logged in\r\n",
                ] {
                    let mut line = String::new();
                    tls.read_line(&mut line).await.expect("read");
                    seen.push(line);
                    tls.get_mut().write_all(reply).await.expect("reply");
                    tls.get_mut().flush().await.expect("flush");
                }
                seen
            });
            let login = ImapLogin::Master {
                user: "proxy".into(),
                password: crate::config::Secret::new("master-secret"),
            };
            let request = LoginRequest {
                user: "alice@skydesk.jp",
                password: b"",
                login: &login,
                transport: &transport,
                id: &[],
                connect_timeout: Duration::from_secs(5),
                login_timeout: Duration::from_secs(5),
            };
            let session = login_to(&address, &request).await.expect("login");
            assert!(session.stream.is_tls());
            assert_eq!(session.capabilities, "IMAP4rev1 IDLE REAL");
            assert!(session.leftover.is_empty(), "{:?}", session.leftover);
            let plain = base64::engine::general_purpose::STANDARD
                .encode("alice@skydesk.jp\0proxy\0master-secret");
            assert_eq!(
                backend.await.expect("backend"),
                [
                    "mg1 STARTTLS\r\n".to_string(),
                    "mg2 CAPABILITY\r\n".to_string(),
                    format!("mg3 AUTHENTICATE PLAIN {plain}\r\n"),
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_refused_starttls_is_not_a_plaintext_login() {
        use crate::backend::test_pki::{read_line, Pki};

        let pki = Pki::new("mailgate test CA");
        let transport =
            Transport::with_roots("test", BackendTls::Starttls, pki.roots(), None, resolver())
                .expect("transport");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let backend = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            tcp.write_all(b"* OK hi\r\n").await.expect("greet");
            let first = read_line(&mut tcp).await;
            tcp.write_all(b"mg1 BAD no TLS here\r\n")
                .await
                .expect("bad");
            let rest = read_line(&mut tcp).await;
            (first, rest)
        });
        let refused = probe(&address, &transport, Duration::from_secs(5)).await;
        assert!(
            matches!(&refused, Err(BackendError::Unreachable(e)) if e.contains("STARTTLS refused")),
            "{refused:?}"
        );
        // Nothing else was sent: the connection was given up.
        assert_eq!(
            backend.await.expect("backend"),
            ("mg1 STARTTLS\r\n".to_string(), String::new())
        );
    }
}
