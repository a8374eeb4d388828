//! The SMTP submission pre-auth session: a state machine without I/O.
//!
//! Bytes from the client go in through [`PreAuth::input`]; replies to write and at most one
//! [`Event`] for the driver come out in a [`Step`]. The async driver owns the socket, does
//! TLS, judges credentials (account rules), logs in to the backend and splices; this file
//! knows nothing of sockets or time.
//!
//! States: `Fresh` --EHLO/HELO--> `Greeted` --AUTH--> `Sasl` --last response-->
//! `AwaitingVerdict`; an AUTH whose initial response completes the credentials goes straight
//! to `AwaitingVerdict`. A cancelled, undecodable or overlong SASL exchange returns to
//! `Greeted`, and so does a refused verdict (the driver's next `input`). QUIT, STARTTLS and
//! the error limit lead to `Finished`, which reads nothing more.
//!
//! Bounds: a command line is at most 512 octets with CRLF (RFC 5321 §4.5.3.1.4), a SASL
//! response line 12 KiB (RFC 4954's 12288). A longer line is answered `500 5.5.6` and skipped
//! through its LF without being buffered. The `AUTH` command line itself may also be 12 KiB:
//! an initial response for a long address and password does not fit in 512 octets, and
//! Postfix (2048) and Dovecot accept longer lines too, so strictness here would only fail
//! real clients.

use std::mem;

use bytes::BytesMut;
use zeroize::Zeroize;

use super::command::{self, Command};
use super::ehlo;
use super::reply::{self, Reply};
use super::sasl::{self, SaslError};

pub use super::ehlo::client_extensions;
pub use super::reply::{early_talker, REPLY_SHUTDOWN, REPLY_TIMEOUT};
pub use super::sasl::{Credentials, Mechanism, Password};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const COMMAND_LINE_MAX: usize = 512;
/// RFC 4954 §4: a SASL response line (and here the AUTH command line) is at most 12288
/// octets.
pub const SASL_LINE_MAX: usize = 12 * 1024;
/// After this many error replies the session says `421 4.7.0 Too many errors` and closes.
pub const MAX_ERRORS: u32 = 10;

/// What the driver knows about the listener and the backend when the session starts.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// For the greeting and the EHLO reply.
    pub hostname: String,
    /// Implicit TLS (465), or a session made after STARTTLS.
    pub tls_active: bool,
    /// 587 before TLS: STARTTLS is advertised and AUTH is refused until it is done.
    pub starttls_offered: bool,
    /// The backend's EHLO extension lines as probed, e.g. `["PIPELINING", "SIZE 10240000",
    /// "8BITMIME", "AUTH PLAIN", "STARTTLS", "XCLIENT NAME ADDR", "ENHANCEDSTATUSCODES",
    /// "SMTPUTF8", "CHUNKING"]`; filtered by [`client_extensions`].
    pub backend_extensions: Vec<String>,
}

/// The result of one [`PreAuth::input`] call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Reply bytes to write to the client, in order, before acting on `event`.
    pub write: Vec<u8>,
    /// Something only the driver can do. Processing stopped there; what the client sent after
    /// it stays buffered.
    pub event: Option<Event>,
}

/// What the driver must do after writing `Step::write`.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Judge these credentials. Refused: write `reply::login_reply(..)` and call `input(&[])`
    /// to carry on with what the client pipelined. Accepted: write the `235` reply, log in to
    /// the backend and send it `into_pipelined()`.
    Auth(Credentials),
    /// `220 2.0.0 Ready to start TLS` is in `write`. Drop this session (with every byte the
    /// client pipelined after STARTTLS), handshake, and make a new `PreAuth` with
    /// `tls_active: true` and `starttls_offered: false`; send no greeting.
    StartTls,
    /// AUTH before STARTTLS on a STARTTLS listener: `530 5.7.0 Must issue a STARTTLS command
    /// first` is in `write`. Count it (`mailgate_logins_total{result="tls_required"}`), then
    /// call `input(&[])`.
    TlsRequired,
    /// `221 2.0.0 Bye` is in `write`; close.
    Quit,
    /// A `421 4.7.0` is in `write` (too many errors); close.
    Close,
}

/// The pre-auth session of one client connection. Its `Debug` shows no client bytes: the
/// buffer or the SASL exchange may hold credentials.
pub struct PreAuth {
    /// Precomputed replies that depend only on the configuration.
    greeting: Vec<u8>,
    ehlo_reply: Vec<u8>,
    helo_reply: Vec<u8>,
    /// Whether AUTH must wait for STARTTLS, and whether STARTTLS is possible.
    tls: Tls,
    state: State,
    framing: Framing,
    /// Unprocessed client bytes. Bounded: after `input` returns without an event it holds less
    /// than one line limit; with an event, at most that plus the last `input`'s bytes.
    buf: BytesMut,
    /// Error replies so far, for `MAX_ERRORS`.
    errors: u32,
}

impl std::fmt::Debug for PreAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuth")
            .field("tls", &self.tls)
            .field("buffered", &self.buf.len())
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Implicit TLS, or after STARTTLS.
    Active,
    /// Plaintext, STARTTLS available and required before AUTH.
    Offered,
    /// Plaintext with no STARTTLS (a `tls: none` loopback test listener): AUTH allowed.
    None,
}

#[derive(Debug)]
enum State {
    /// Connected; no EHLO/HELO yet.
    Fresh,
    /// After EHLO or HELO.
    Greeted(Hello),
    /// AUTH started (only after EHLO); the next line is a SASL response.
    Sasl { helo: String, exchange: Exchange },
    /// `Event::Auth` was handed out; the driver's next `input` means "refused".
    AwaitingVerdict { helo: String },
    /// QUIT, STARTTLS or a 421: nothing more is read.
    Finished,
}

#[derive(Debug)]
enum Hello {
    Ehlo(String),
    Helo(String),
}

/// Where a SASL exchange is.
#[derive(Debug)]
enum Exchange {
    /// `AUTH PLAIN` without initial response; `334 ` sent.
    Plain,
    /// `AUTH LOGIN`; `334 VXNlcm5hbWU6` sent.
    LoginUsername,
    /// `334 UGFzc3dvcmQ6` sent.
    LoginPassword { username: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Reading lines.
    Lines,
    /// A line went over its limit: dropping input through the next LF.
    Discarding,
}

/// What one line led to.
enum Outcome {
    /// A positive or intermediate reply.
    Reply(Reply<'static>),
    Ehlo,
    Helo,
    /// A negative reply; counts towards `MAX_ERRORS`.
    Error(Reply<'static>),
    /// AUTH before STARTTLS: an error reply and `Event::TlsRequired`.
    TlsRequired,
    /// A last reply (`221`, `220 Ready to start TLS`) and the event that ends the session.
    Final(Reply<'static>, Event),
    Auth(Credentials),
}

/// What the framer found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Incomplete,
    /// A CRLF-terminated line: `len` octets of content, `total` with the CRLF.
    Line {
        len: usize,
        total: usize,
    },
    /// A line ending in LF without CR.
    BareLf {
        total: usize,
    },
    /// A CRLF-terminated line with a CR inside.
    BareCr {
        total: usize,
    },
    /// No LF within the limit; `through` is where the next LF ends, if it is in the buffer.
    TooLong {
        through: Option<usize>,
    },
}

impl PreAuth {
    pub fn new(cfg: SessionConfig) -> PreAuth {
        let hostname = sanitise_hostname(&cfg.hostname);
        let extensions = client_extensions(
            &cfg.backend_extensions,
            cfg.tls_active,
            cfg.starttls_offered,
        );
        let tls = match (cfg.tls_active, cfg.starttls_offered) {
            (true, _) => Tls::Active,
            (false, true) => Tls::Offered,
            (false, false) => Tls::None,
        };
        PreAuth {
            greeting: format!("220 {hostname} ESMTP mailgate\r\n").into_bytes(),
            ehlo_reply: ehlo::ehlo_reply(&hostname, &extensions),
            helo_reply: ehlo::helo_reply(&hostname),
            tls,
            state: State::Fresh,
            framing: Framing::Lines,
            buf: BytesMut::new(),
            errors: 0,
        }
    }

    /// `220 <hostname> ESMTP mailgate`: only for the first session of a connection. After
    /// STARTTLS the client speaks first (EHLO) and no greeting is sent (RFC 3207 §4.2).
    /// A client that talks before the greeting gets [`early_talker`] instead (the driver checks
    /// readability before writing this).
    pub fn greeting(&self) -> Vec<u8> {
        self.greeting.clone()
    }

    /// Feeds client bytes (possibly none) and runs the session until it needs more input or
    /// has an event for the driver. Commands are answered in order (RFC 2920 pipelining).
    ///
    /// After `Event::Auth`, the next call means the credentials were refused (the driver has
    /// written its reply); the session returns to the EHLO state and goes on. After
    /// `StartTls`, `Quit` or `Close` nothing more is read.
    pub fn input(&mut self, bytes: &[u8]) -> Step {
        let mut step = Step::default();
        self.state = match mem::replace(&mut self.state, State::Finished) {
            State::Finished => return step,
            State::AwaitingVerdict { helo } => State::Greeted(Hello::Ehlo(helo)),
            other => other,
        };
        self.absorb(bytes);
        while step.event.is_none() {
            match frame(&self.buf, self.line_limit()) {
                Frame::Incomplete => break,
                Frame::Line { len, total } => {
                    let mut line = self.buf.split_to(total);
                    let outcome = self.line(line.get(..len).unwrap_or_default());
                    // The line may have carried a password.
                    line.as_mut().zeroize();
                    self.apply(outcome, &mut step);
                }
                Frame::BareLf { total } => {
                    self.consume(total);
                    self.framing_error(reply::BARE_LF, &mut step);
                }
                Frame::BareCr { total } => {
                    self.consume(total);
                    self.framing_error(reply::BARE_CR, &mut step);
                }
                Frame::TooLong { through } => {
                    match through {
                        Some(end) => self.consume(end),
                        None => {
                            self.consume(self.buf.len());
                            self.framing = Framing::Discarding;
                        }
                    }
                    self.framing_error(reply::LINE_TOO_LONG, &mut step);
                }
            }
        }
        step
    }

    /// The client's EHLO/HELO name, once it has sent one (for the backend's `EHLO` and
    /// `XCLIENT HELO=`). Still there while `Event::Auth` awaits the verdict.
    pub fn helo(&self) -> Option<&str> {
        match &self.state {
            State::Greeted(Hello::Ehlo(name) | Hello::Helo(name)) => Some(name),
            State::Sasl { helo, .. } | State::AwaitingVerdict { helo } => Some(helo),
            State::Fresh | State::Finished => None,
        }
    }

    /// After `Event::Auth` was accepted: what the client pipelined after its AUTH, byte for
    /// byte, to be sent to the backend once the backend session is up.
    pub fn into_pipelined(self) -> BytesMut {
        self.buf
    }

    /// Appends client bytes, dropping the rest of an overlong line first.
    fn absorb(&mut self, bytes: &[u8]) {
        let bytes = match self.framing {
            Framing::Lines => bytes,
            Framing::Discarding => match bytes.iter().position(|&b| b == b'\n') {
                Some(lf) => {
                    self.framing = Framing::Lines;
                    bytes.get(lf + 1..).unwrap_or_default()
                }
                None => return,
            },
        };
        self.buf.extend_from_slice(bytes);
    }

    /// The limit for the line at the start of the buffer.
    fn line_limit(&self) -> usize {
        let auth = self
            .buf
            .get(..5)
            .is_some_and(|verb| verb.eq_ignore_ascii_case(b"AUTH "));
        match self.state {
            State::Sasl { .. } => SASL_LINE_MAX,
            _ if auth => SASL_LINE_MAX,
            _ => COMMAND_LINE_MAX,
        }
    }

    /// Drops `n` buffered bytes, wiping them.
    fn consume(&mut self, n: usize) {
        let mut gone = self.buf.split_to(n.min(self.buf.len()));
        gone.as_mut().zeroize();
    }

    /// One complete line, CRLF removed: a SASL response or a command.
    fn line(&mut self, line: &[u8]) -> Outcome {
        let (next, outcome) = match mem::replace(&mut self.state, State::Finished) {
            State::Sasl { helo, exchange } => sasl_response(helo, exchange, line),
            State::Fresh => self.command(None, line),
            State::Greeted(hello) => self.command(Some(hello), line),
            // Not reached: `input` leaves these before reading lines.
            state @ (State::AwaitingVerdict { .. } | State::Finished) => {
                (state, Outcome::Error(reply::UNKNOWN_COMMAND))
            }
        };
        self.state = next;
        outcome
    }

    fn command(&self, hello: Option<Hello>, line: &[u8]) -> (State, Outcome) {
        let stay = |hello: Option<Hello>| hello.map_or(State::Fresh, State::Greeted);
        match command::parse(line) {
            Command::Ehlo(name) => (State::Greeted(Hello::Ehlo(name.to_owned())), Outcome::Ehlo),
            Command::Helo(name) => (State::Greeted(Hello::Helo(name.to_owned())), Outcome::Helo),
            Command::StartTls => match self.tls {
                Tls::Offered => (
                    State::Finished,
                    Outcome::Final(reply::READY_TO_START_TLS, Event::StartTls),
                ),
                Tls::Active => (stay(hello), Outcome::Error(reply::TLS_ALREADY_ACTIVE)),
                Tls::None => (stay(hello), Outcome::Error(reply::STARTTLS_UNAVAILABLE)),
            },
            Command::Auth { mechanism, initial } => {
                if self.tls == Tls::Offered {
                    return (stay(hello), Outcome::TlsRequired);
                }
                let helo = match hello {
                    Some(Hello::Ehlo(helo)) => helo,
                    other => return (stay(other), Outcome::Error(reply::EHLO_FIRST)),
                };
                match Mechanism::parse(mechanism) {
                    Some(mechanism) => start_sasl(helo, mechanism, initial),
                    None => (
                        State::Greeted(Hello::Ehlo(helo)),
                        Outcome::Error(reply::UNKNOWN_MECHANISM),
                    ),
                }
            }
            Command::Noop | Command::Rset => (stay(hello), Outcome::Reply(reply::OK)),
            Command::Quit => (State::Finished, Outcome::Final(reply::BYE, Event::Quit)),
            Command::Vrfy => (stay(hello), Outcome::Reply(reply::VRFY)),
            Command::Help => (stay(hello), Outcome::Reply(reply::HELP)),
            Command::Expn => (stay(hello), Outcome::Error(reply::EXPN)),
            Command::Transaction => (stay(hello), Outcome::Error(reply::AUTH_REQUIRED)),
            Command::Refused => (stay(hello), Outcome::Error(reply::REFUSED)),
            Command::Unknown => (stay(hello), Outcome::Error(reply::UNKNOWN_COMMAND)),
            Command::Syntax(r) => (stay(hello), Outcome::Error(r)),
        }
    }

    fn apply(&mut self, outcome: Outcome, step: &mut Step) {
        match outcome {
            Outcome::Reply(r) => r.write_to(&mut step.write),
            Outcome::Ehlo => step.write.extend_from_slice(&self.ehlo_reply),
            Outcome::Helo => step.write.extend_from_slice(&self.helo_reply),
            Outcome::Error(r) => self.error(r, step),
            Outcome::TlsRequired => {
                self.error(reply::TLS_REQUIRED, step);
                // If that was one error too many, the Close stands.
                step.event.get_or_insert(Event::TlsRequired);
            }
            Outcome::Final(r, event) => {
                r.write_to(&mut step.write);
                step.event = Some(event);
                self.finish();
            }
            Outcome::Auth(credentials) => step.event = Some(Event::Auth(credentials)),
        }
    }

    /// A framing error ends a SASL exchange, then is an ordinary error reply.
    fn framing_error(&mut self, r: Reply<'static>, step: &mut Step) {
        self.state = match mem::replace(&mut self.state, State::Finished) {
            State::Sasl { helo, .. } => State::Greeted(Hello::Ehlo(helo)),
            other => other,
        };
        self.error(r, step);
    }

    fn error(&mut self, r: Reply<'static>, step: &mut Step) {
        r.write_to(&mut step.write);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            reply::TOO_MANY_ERRORS.write_to(&mut step.write);
            step.event = Some(Event::Close);
            self.finish();
        }
    }

    /// Nothing more is read; pipelined bytes are dropped (after STARTTLS they must never
    /// reach the TLS session).
    fn finish(&mut self) {
        self.state = State::Finished;
        self.framing = Framing::Lines;
        self.consume(self.buf.len());
    }
}

/// `AUTH <mechanism> [initial-response]` after EHLO.
fn start_sasl(helo: String, mechanism: Mechanism, initial: Option<&[u8]>) -> (State, Outcome) {
    let (exchange, challenge) = match mechanism {
        Mechanism::Plain => (Exchange::Plain, reply::CONTINUE),
        Mechanism::Login => (Exchange::LoginUsername, reply::LOGIN_USERNAME),
    };
    match initial {
        // RFC 4954 §4: the initial response is the answer to the first challenge.
        Some(initial) => sasl_response(helo, exchange, initial),
        None => (State::Sasl { helo, exchange }, Outcome::Reply(challenge)),
    }
}

/// What a good SASL response leads to.
enum Progress {
    Done(Credentials),
    /// LOGIN has the user name and asks for the password.
    NeedPassword(String),
}

/// One client response in a SASL exchange (or an initial response). Any failure ends the
/// exchange and returns to the EHLO state (RFC 4954 §4).
fn sasl_response(helo: String, exchange: Exchange, line: &[u8]) -> (State, Outcome) {
    let progress = sasl::decode_response(line).and_then(|decoded| match exchange {
        Exchange::Plain => sasl::plain(&decoded).map(Progress::Done),
        Exchange::LoginUsername => sasl::login_username(&decoded).map(Progress::NeedPassword),
        Exchange::LoginPassword { username } => {
            sasl::login_credentials(username, &decoded).map(Progress::Done)
        }
    });
    match progress {
        Ok(Progress::Done(credentials)) => {
            (State::AwaitingVerdict { helo }, Outcome::Auth(credentials))
        }
        Ok(Progress::NeedPassword(username)) => (
            State::Sasl {
                helo,
                exchange: Exchange::LoginPassword { username },
            },
            Outcome::Reply(reply::LOGIN_PASSWORD),
        ),
        Err(error) => {
            let r = match error {
                SaslError::Cancelled => reply::AUTH_CANCELLED,
                SaslError::Base64 => reply::BAD_BASE64,
                SaslError::Malformed => reply::BAD_SASL,
            };
            (State::Greeted(Hello::Ehlo(helo)), Outcome::Error(r))
        }
    }
}

/// Finds the first line in `buf`, looking no further than `limit` octets for its LF.
fn frame(buf: &[u8], limit: usize) -> Frame {
    let window = buf.get(..limit).unwrap_or(buf);
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() < limit {
            return Frame::Incomplete;
        }
        let rest = buf.get(limit..).unwrap_or_default();
        let through = rest.iter().position(|&b| b == b'\n').map(|i| limit + i + 1);
        return Frame::TooLong { through };
    };
    let total = lf + 1;
    match window.get(..lf).and_then(<[u8]>::split_last) {
        Some((b'\r', content)) if content.contains(&b'\r') => Frame::BareCr { total },
        Some((b'\r', content)) => Frame::Line {
            len: content.len(),
            total,
        },
        _ => Frame::BareLf { total },
    }
}

/// The host name goes into every greeting and EHLO reply: visible ASCII only.
fn sanitise_hostname(hostname: &str) -> String {
    let clean: String = hostname
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if clean.is_empty() {
        "localhost".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    use super::*;

    const HOST: &str = "mx.example.com";
    /// `\0alice@example.com\0secret`
    const ALICE_PLAIN: &str = "AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==";

    fn backend() -> Vec<String> {
        [
            "PIPELINING",
            "SIZE 10240000",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "XCLIENT NAME ADDR",
        ]
        .map(String::from)
        .to_vec()
    }

    fn session(tls_active: bool, starttls_offered: bool) -> PreAuth {
        PreAuth::new(SessionConfig {
            hostname: HOST.into(),
            tls_active,
            starttls_offered,
            backend_extensions: backend(),
        })
    }

    /// 465, or 587 after STARTTLS.
    fn tls() -> PreAuth {
        session(true, false)
    }

    /// 587 before STARTTLS.
    fn plaintext_587() -> PreAuth {
        session(false, true)
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// Plays the driver: refuses every AUTH with a 535, goes on after TlsRequired, stops at
    /// StartTls/Quit/Close. Returns what the client would read, events marked in brackets.
    fn drive(s: &mut PreAuth, chunks: &[&[u8]]) -> String {
        let mut seen = String::new();
        for chunk in chunks {
            let mut step = s.input(chunk);
            loop {
                seen += &text(&step.write);
                match step.event.take() {
                    None => break,
                    Some(Event::Auth(c)) => {
                        seen += &format!(
                            "[auth {:?} {} {:?} {:?}]535 5.7.8 Invalid credentials\r\n",
                            c.mechanism,
                            c.username,
                            c.password.expose(),
                            c.authzid
                        );
                        step = s.input(&[]);
                    }
                    Some(Event::TlsRequired) => {
                        seen += "[tls required]";
                        step = s.input(&[]);
                    }
                    Some(other) => {
                        seen += &format!("[{other:?}]");
                        return seen;
                    }
                }
            }
        }
        seen
    }

    fn whole(s: &mut PreAuth, input: &[u8]) -> String {
        drive(s, &[input])
    }

    fn ehlo_tls() -> String {
        format!("250-{HOST}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 AUTH PLAIN LOGIN\r\n")
    }

    /// Client scripts with the exact transcript a client reads, on a TLS session.
    fn tls_scripts() -> Vec<(String, String)> {
        let long_ok = format!("NOOP {}\r\n", "x".repeat(COMMAND_LINE_MAX - 7));
        let long_bad = format!("NOOP {}\r\n", "x".repeat(COMMAND_LINE_MAX - 6));
        vec![
            (
                format!("EHLO client.example.com\r\nAUTH PLAIN {ALICE_PLAIN}\r\nQUIT\r\n"),
                format!(
                    "{}[auth Plain alice@example.com \"secret\" None]\
                     535 5.7.8 Invalid credentials\r\n221 2.0.0 Bye\r\n[Quit]",
                    ehlo_tls()
                ),
            ),
            (
                format!("EHLO c\r\nAUTH PLAIN\r\n{ALICE_PLAIN}\r\nNOOP\r\n"),
                format!(
                    "{}334 \r\n[auth Plain alice@example.com \"secret\" None]\
                     535 5.7.8 Invalid credentials\r\n250 2.0.0 OK\r\n",
                    ehlo_tls()
                ),
            ),
            (
                // authzid, lower-case verbs
                "ehlo c\r\nauth plain YWRtaW4AYWxpY2UAcHc=\r\n".into(),
                format!(
                    "{}[auth Plain alice \"pw\" Some(\"admin\")]535 5.7.8 Invalid credentials\r\n",
                    ehlo_tls()
                ),
            ),
            (
                // LOGIN: user name and password in two steps
                "EHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n".into(),
                format!(
                    "{}334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n\
                     [auth Login alice \"secret\" None]535 5.7.8 Invalid credentials\r\n",
                    ehlo_tls()
                ),
            ),
            (
                // LOGIN with the user name as initial response
                "EHLO c\r\nAUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n".into(),
                format!(
                    "{}334 UGFzc3dvcmQ6\r\n[auth Login alice \"secret\" None]\
                     535 5.7.8 Invalid credentials\r\n",
                    ehlo_tls()
                ),
            ),
            (
                // `=`: the empty response; an empty LOGIN user name is the driver's to refuse
                "EHLO c\r\nAUTH LOGIN =\r\n=\r\n".into(),
                format!(
                    "{}334 UGFzc3dvcmQ6\r\n[auth Login  \"\" None]535 5.7.8 Invalid credentials\r\n",
                    ehlo_tls()
                ),
            ),
            (
                // `=` is not a PLAIN message (no NULs)
                "EHLO c\r\nAUTH PLAIN =\r\nAUTH PLAIN\r\n=\r\n".into(),
                format!(
                    "{}501 5.5.2 Malformed authentication data\r\n334 \r\n\
                     501 5.5.2 Malformed authentication data\r\n",
                    ehlo_tls()
                ),
            ),
            (
                "EHLO c\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN\r\n*\r\nNOOP\r\n".into(),
                format!(
                    "{}334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n\
                     334 \r\n501 5.7.0 Authentication cancelled\r\n250 2.0.0 OK\r\n",
                    ehlo_tls()
                ),
            ),
            (
                "EHLO c\r\nAUTH PLAIN !!!!\r\nAUTH LOGIN\r\nYWxpY2U\r\nNOOP\r\n".into(),
                format!(
                    "{}501 5.5.2 Invalid base64 data\r\n334 VXNlcm5hbWU6\r\n\
                     501 5.5.2 Invalid base64 data\r\n250 2.0.0 OK\r\n",
                    ehlo_tls()
                ),
            ),
            (
                "AUTH PLAIN AGEAYg==\r\nEHLO c\r\nAUTH CRAM-MD5\r\nAUTH\r\n".into(),
                format!(
                    "503 5.5.1 EHLO first\r\n{}504 5.5.4 Unrecognized authentication type\r\n\
                     501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n",
                    ehlo_tls()
                ),
            ),
            (
                "HELO c\r\nAUTH PLAIN AGEAYg==\r\nEHLO\r\n".into(),
                format!(
                    "250 {HOST}\r\n503 5.5.1 EHLO first\r\n501 5.5.4 Syntax: EHLO hostname\r\n"
                ),
            ),
            (
                "MAIL FROM:<a@example.com>\r\nEHLO c\r\nMAIL FROM:<a@example.com>\r\n\
                 RCPT TO:<b@example.com>\r\nDATA\r\nBDAT 5 LAST\r\n"
                    .into(),
                format!(
                    "530 5.7.0 Authentication required\r\n{}{}",
                    ehlo_tls(),
                    "530 5.7.0 Authentication required\r\n".repeat(4)
                ),
            ),
            (
                "NOOP\r\nRSET\r\nVRFY postmaster\r\nEXPN staff\r\nHELP\r\n\
                 XCLIENT ADDR=192.0.2.1\r\nXFORWARD NAME=x\r\nFROB\r\nSTARTTLS\r\n"
                    .into(),
                "250 2.0.0 OK\r\n250 2.0.0 OK\r\n\
                 252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n\
                 502 5.5.1 EXPN not available\r\n\
                 214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT; see RFC 5321\r\n\
                 550 5.7.0 Command refused\r\n550 5.7.0 Command refused\r\n\
                 500 5.5.2 Syntax error, command unrecognized\r\n503 5.5.1 TLS already active\r\n"
                    .into(),
            ),
            (
                "NOOP\nNO\rOP\r\nNOOP\r\n".into(),
                "500 5.5.2 Syntax error, lines must end with CRLF\r\n\
                 500 5.5.2 Syntax error, bare CR\r\n250 2.0.0 OK\r\n"
                    .into(),
            ),
            (
                format!("{long_ok}{long_bad}NOOP\r\n"),
                "250 2.0.0 OK\r\n500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n".into(),
            ),
            (
                "QUIT\r\nNOOP\r\n".into(),
                "221 2.0.0 Bye\r\n[Quit]".into(),
            ),
        ]
    }

    #[test]
    fn greeting_is_the_hostname() {
        assert_eq!(tls().greeting(), b"220 mx.example.com ESMTP mailgate\r\n");
        let odd = PreAuth::new(SessionConfig {
            hostname: "mx.example.com\r\n250 injected".into(),
            tls_active: true,
            starttls_offered: false,
            backend_extensions: vec![],
        });
        assert_eq!(
            odd.greeting(),
            b"220 mx.example.com250injected ESMTP mailgate\r\n"
        );
    }

    #[test]
    fn scripts_give_the_expected_transcript() {
        for (script, expected) in tls_scripts() {
            assert_eq!(whole(&mut tls(), script.as_bytes()), expected, "{script:?}");
        }
    }

    #[test]
    fn every_two_split_and_byte_by_byte_give_the_same_transcript() {
        let mut scripts = tls_scripts();
        scripts.push((
            "EHLO c\r\nAUTH PLAIN AGEAYg==\r\nSTARTTLS\r\nEHLO c\r\n".into(),
            String::new(),
        ));
        for (script, _) in &scripts {
            let bytes = script.as_bytes();
            for (make, name) in [(tls as fn() -> PreAuth, "tls"), (plaintext_587, "587")] {
                let expected = whole(&mut make(), bytes);
                for cut in 0..=bytes.len() {
                    let (a, b) = bytes.split_at(cut);
                    assert_eq!(
                        drive(&mut make(), &[a, b]),
                        expected,
                        "{name} {script:?} @{cut}"
                    );
                }
                let bytes: Vec<&[u8]> = bytes.chunks(1).collect();
                assert_eq!(
                    drive(&mut make(), &bytes),
                    expected,
                    "{name} {script:?} bytewise"
                );
            }
        }
    }

    #[test]
    fn pipelined_after_auth_is_kept_for_the_backend() {
        let mut s = tls();
        assert_eq!(
            s.input(b"EHLO client.example.com\r\n").write,
            ehlo_tls().as_bytes()
        );
        let input = format!("AUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDA");
        let step = s.input(input.as_bytes());
        assert_eq!(step.write, b"");
        let Some(Event::Auth(credentials)) = step.event else {
            panic!("{step:?}");
        };
        assert_eq!(credentials.username, "alice@example.com");
        assert_eq!(credentials.password.expose(), "secret");
        assert_eq!(credentials.mechanism, Mechanism::Plain);
        assert_eq!(s.helo(), Some("client.example.com"));
        assert_eq!(
            &s.into_pipelined()[..],
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDA"
        );
    }

    #[test]
    fn pipelined_ehlo_auth_mail_in_one_read() {
        let mut s = tls();
        let input = format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<a@b>\r\n");
        let step = s.input(input.as_bytes());
        assert_eq!(text(&step.write), ehlo_tls());
        assert!(matches!(step.event, Some(Event::Auth(_))));
        assert_eq!(&s.into_pipelined()[..], b"MAIL FROM:<a@b>\r\n");
    }

    #[test]
    fn refused_auth_goes_on_with_what_was_pipelined() {
        let mut s = tls();
        let step =
            s.input(format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nNOOP\r\nMAIL").as_bytes());
        assert!(matches!(step.event, Some(Event::Auth(_))));
        let step = s.input(&[]);
        assert_eq!(
            step,
            Step {
                write: b"250 2.0.0 OK\r\n".to_vec(),
                event: None
            }
        );
        assert_eq!(s.helo(), Some("c"));
        let step = s.input(b" FROM:<a@b>\r\n");
        assert_eq!(text(&step.write), "530 5.7.0 Authentication required\r\n");
    }

    #[test]
    fn starttls_drops_everything_pipelined_after_it() {
        let mut s = plaintext_587();
        let step = s.input(b"EHLO c\r\nSTARTTLS\r\nEHLO x\r\n");
        let ehlo = format!("250-{HOST}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n");
        assert_eq!(
            text(&step.write),
            format!("{ehlo}220 2.0.0 Ready to start TLS\r\n")
        );
        assert_eq!(step.event, Some(Event::StartTls));
        assert_eq!(s.input(b"NOOP\r\n"), Step::default());
        assert_eq!(s.helo(), None);
        assert!(s.into_pipelined().is_empty());

        let mut s = plaintext_587();
        let step = s.input(b"STARTTLS\r\nEHLO x\r\n");
        assert_eq!(step.write, b"220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(step.event, Some(Event::StartTls));
        assert!(s.into_pipelined().is_empty());
    }

    #[test]
    fn starttls_only_where_offered() {
        let mut s = session(false, false);
        assert_eq!(
            s.input(b"STARTTLS\r\n").write,
            b"502 5.5.1 STARTTLS not available\r\n"
        );
        assert_eq!(
            s.input(b"STARTTLS please\r\n").write,
            b"501 5.5.4 Syntax error, no parameters allowed\r\n"
        );
        let mut s = tls();
        assert_eq!(
            s.input(b"STARTTLS\r\n").write,
            b"503 5.5.1 TLS already active\r\n"
        );
    }

    #[test]
    fn auth_before_tls_on_587_is_refused_and_reported() {
        let mut s = plaintext_587();
        let step = s.input(format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nNOOP\r\n").as_bytes());
        assert!(
            text(&step.write).ends_with("\r\n530 5.7.0 Must issue a STARTTLS command first\r\n")
        );
        assert_eq!(step.event, Some(Event::TlsRequired));
        assert_eq!(s.input(&[]).write, b"250 2.0.0 OK\r\n");
        // Without TLS and without STARTTLS (a test listener), AUTH is allowed.
        let mut s = session(false, false);
        let step = s.input(format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\n").as_bytes());
        assert!(matches!(step.event, Some(Event::Auth(_))));
    }

    #[test]
    fn ehlo_resets_and_helo_is_remembered() {
        let mut s = tls();
        assert_eq!(s.helo(), None);
        s.input(b"HELO first.example.com\r\n");
        assert_eq!(s.helo(), Some("first.example.com"));
        s.input(b"EHLO second.example.com\r\nAUTH LOGIN\r\n");
        assert_eq!(s.helo(), Some("second.example.com"));
        // EHLO in the middle of SASL is a (bad) SASL response.
        let step = s.input(b"EHLO third\r\n");
        assert_eq!(step.write, b"501 5.5.2 Invalid base64 data\r\n");
        assert_eq!(s.helo(), Some("second.example.com"));
    }

    #[test]
    fn line_of_513_octets_is_too_long() {
        let line = format!("NOOP {}\r\n", "x".repeat(COMMAND_LINE_MAX - 6));
        assert_eq!(line.len(), COMMAND_LINE_MAX + 1);
        let mut s = tls();
        let step = s.input(line.as_bytes());
        assert_eq!(step.write, b"500 5.5.6 Line too long\r\n");
        assert_eq!(s.input(b"NOOP\r\n").write, b"250 2.0.0 OK\r\n");
    }

    #[test]
    fn overlong_line_is_discarded_without_buffering() {
        let mut s = tls();
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen.extend(s.input(&[b'x'; 1000]).write);
            assert!(s.buf.len() < COMMAND_LINE_MAX, "{}", s.buf.len());
        }
        assert_eq!(seen, b"500 5.5.6 Line too long\r\n");
        assert_eq!(s.input(b"yyy\r\nNOOP\r\n").write, b"250 2.0.0 OK\r\n");
    }

    /// `AUTH PLAIN` then a PLAIN response of exactly `total` octets with CRLF.
    fn sasl_line(total: usize) -> String {
        let b64_len = (total - 2) / 4 * 4;
        let raw_len = b64_len / 4 * 3;
        let mut line = STANDARD.encode(format!("\0bob\0{}", "p".repeat(raw_len - 5)));
        assert_eq!(line.len(), b64_len);
        line.push_str(&" ".repeat(total - 2 - b64_len));
        line.push_str("\r\n");
        assert_eq!(line.len(), total);
        line
    }

    #[test]
    fn sasl_line_of_12_kib_is_accepted_and_one_more_octet_is_not() {
        let mut s = tls();
        s.input(b"EHLO c\r\nAUTH PLAIN\r\n");
        let step = s.input(sasl_line(SASL_LINE_MAX).as_bytes());
        let Some(Event::Auth(c)) = step.event else {
            panic!("{step:?}");
        };
        assert_eq!(c.username, "bob");

        let mut s = tls();
        s.input(b"EHLO c\r\nAUTH PLAIN\r\n");
        let step = s.input(sasl_line(SASL_LINE_MAX + 1).as_bytes());
        assert_eq!(
            step,
            Step {
                write: b"500 5.5.6 Line too long\r\n".to_vec(),
                event: None
            }
        );
        // The exchange is over: back to commands.
        assert_eq!(s.input(b"NOOP\r\n").write, b"250 2.0.0 OK\r\n");
    }

    #[test]
    fn auth_command_line_may_carry_a_long_initial_response() {
        let response = STANDARD.encode(format!(
            "\0{}@example.com\0{}",
            "u".repeat(64),
            "p".repeat(400)
        ));
        let line = format!("AUTH PLAIN {response}\r\n");
        assert!(line.len() > COMMAND_LINE_MAX);
        let mut s = tls();
        let step = s.input(format!("EHLO c\r\n{line}").as_bytes());
        assert!(matches!(step.event, Some(Event::Auth(_))), "{step:?}");
    }

    #[test]
    fn too_many_errors_close_the_session() {
        let mut s = tls();
        let step = s.input("FROB\r\n".repeat(MAX_ERRORS as usize + 5).as_bytes());
        let expected = format!(
            "{}421 4.7.0 Too many errors\r\n",
            "500 5.5.2 Syntax error, command unrecognized\r\n".repeat(MAX_ERRORS as usize)
        );
        assert_eq!(text(&step.write), expected);
        assert_eq!(step.event, Some(Event::Close));
        assert_eq!(s.input(b"NOOP\r\n"), Step::default());
    }

    #[test]
    fn error_limit_wins_over_tls_required() {
        let mut s = plaintext_587();
        s.input("FROB\r\n".repeat(MAX_ERRORS as usize - 1).as_bytes());
        let step = s.input(b"AUTH PLAIN AGEAYg==\r\n");
        assert_eq!(
            text(&step.write),
            "530 5.7.0 Must issue a STARTTLS command first\r\n421 4.7.0 Too many errors\r\n"
        );
        assert_eq!(step.event, Some(Event::Close));
    }

    #[test]
    fn event_debug_hides_the_password() {
        let mut s = tls();
        let step = s.input(format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\n").as_bytes());
        let shown = format!("{step:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("alice@example.com"), "{shown}");
    }

    #[test]
    fn session_debug_shows_no_client_bytes() {
        let mut s = tls();
        // A second AUTH pipelined behind the first waits in the buffer.
        let _ = s.input(
            format!("EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nAUTH PLAIN {ALICE_PLAIN}\r\n")
                .as_bytes(),
        );
        // The case this test is about: the credentials are in the session's buffer.
        assert!(
            s.buf
                .windows(ALICE_PLAIN.len())
                .any(|w| w == ALICE_PLAIN.as_bytes()),
            "nothing buffered to hide"
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains(ALICE_PLAIN), "{shown}");
        assert!(shown.contains("buffered"), "{shown}");
    }

    #[test]
    fn frame_table() {
        let cases: &[(&[u8], usize, Frame)] = &[
            (b"", 10, Frame::Incomplete),
            (b"NOOP\r", 10, Frame::Incomplete),
            (b"NOOP\r\nX", 10, Frame::Line { len: 4, total: 6 }),
            (b"\r\n", 10, Frame::Line { len: 0, total: 2 }),
            (b"\n", 10, Frame::BareLf { total: 1 }),
            (b"a\rb\r\n", 10, Frame::BareCr { total: 5 }),
            (b"12345678\r\n", 10, Frame::Line { len: 8, total: 10 }),
            (b"123456789\r\n", 10, Frame::TooLong { through: Some(11) }),
            (b"1234567890", 10, Frame::TooLong { through: None }),
            (b"123456789", 10, Frame::Incomplete),
        ];
        for (buf, limit, expected) in cases {
            assert_eq!(&frame(buf, *limit), expected, "{buf:?}");
        }
    }

    /// xorshift64*: deterministic, no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_input(rng: &mut Rng) -> Vec<u8> {
        const PIECES: &[&[u8]] = &[
            b"EHLO c\r\n",
            b"HELO c\r\n",
            b"AUTH PLAIN ",
            b"AUTH LOGIN",
            b"AUTH PLAIN\r\n",
            b"AUTH PLAIN AGFsaWNlAHB3\r\n",
            b"AUTH LOGIN\r\nYWxpY2U=\r\ncHc=\r\n",
            b"EHLO c\r\nAUTH PLAIN\r\nAGFsaWNlAHB3\r\n",
            b"AGFsaWNlAHB3",
            b"YWxpY2U=",
            b"=",
            b"*",
            b"STARTTLS\r\n",
            b"NOOP\r\n",
            b"RSET\r\n",
            b"QUIT\r\n",
            b"MAIL FROM:<a@b>\r\n",
            b"XCLIENT ADDR=x\r\n",
            b"\r\n",
            b"\r",
            b"\n",
            b" ",
            b"\0",
            b"\xff",
        ];
        let mut input = Vec::new();
        for _ in 0..rng.below(24) {
            match rng.below(30) {
                0 => input.extend(std::iter::repeat_n(b'A', rng.below(14_000))),
                1 => input.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
                _ => input.extend_from_slice(PIECES[rng.below(PIECES.len())]),
            }
        }
        input
    }

    /// Checks one step's output: complete CRLF lines within 512 octets, no bare CR or LF.
    fn check_write(write: &[u8]) {
        if write.is_empty() {
            return;
        }
        assert!(write.ends_with(b"\r\n"), "{:?}", text(write));
        for line in write.split_inclusive(|&b| b == b'\n') {
            assert!(line.len() <= reply::REPLY_LINE_MAX);
            let body = line.strip_suffix(b"\r\n").unwrap_or(line);
            assert!(
                !body.contains(&b'\r') && !body.contains(&b'\n'),
                "{:?}",
                text(write)
            );
        }
    }

    #[test]
    fn fuzz_no_panic_bounded_buffers_split_invariant() {
        let mut rng = Rng(0x6d61_696c_6761_7465);
        let mut covered = [
            "[auth",
            "[tls required]",
            "[StartTls]",
            "[Quit]",
            "[Close]",
            "Line too long",
            "334 ",
        ]
        .map(|marker| (marker, 0u32));
        for round in 0..3000 {
            let input = random_input(&mut rng);
            let (tls_active, starttls_offered) =
                [(true, false), (false, true), (false, false)][round % 3];
            let expected = whole(&mut session(tls_active, starttls_offered), &input);

            let mut s = session(tls_active, starttls_offered);
            let mut rest = &input[..];
            let mut seen = String::new();
            'feed: while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rng.below(4096).min(rest.len()).max(1));
                rest = tail;
                let mut step = s.input(chunk);
                loop {
                    check_write(&step.write);
                    assert!(s.buf.len() <= SASL_LINE_MAX + chunk.len());
                    assert!(s.errors <= MAX_ERRORS);
                    seen += &text(&step.write);
                    match step.event.take() {
                        None => {
                            assert!(s.buf.len() < SASL_LINE_MAX, "{}", s.buf.len());
                            break;
                        }
                        Some(Event::Auth(c)) => {
                            seen += &format!(
                                "[auth {:?} {} {:?} {:?}]535 5.7.8 Invalid credentials\r\n",
                                c.mechanism,
                                c.username,
                                c.password.expose(),
                                c.authzid
                            );
                            step = s.input(&[]);
                        }
                        Some(Event::TlsRequired) => {
                            seen += "[tls required]";
                            step = s.input(&[]);
                        }
                        Some(other) => {
                            seen += &format!("[{other:?}]");
                            break 'feed;
                        }
                    }
                }
            }
            assert_eq!(seen, expected, "round {round}: {:?}", text(&input));
            for (marker, count) in &mut covered {
                *count += u32::from(seen.contains(*marker));
            }
        }
        // The generator reaches every path, not just the error limit.
        for (marker, count) in covered {
            assert!(count > 50, "{marker}: {count}");
        }
    }
}

/// Property tests ("fuzz"): the session driven the way the driver drives it, over near-valid
/// random input in random pieces. The generators serve `command` and `sasl` too.
#[cfg(test)]
pub(super) mod prop_tests {
    use std::fmt::Write as _;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;

    use super::*;

    pub(in crate::smtp) use crate::prop_support::config;

    /// `bytes` cut at the given points, empty pieces left out.
    fn pieces<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .filter_map(|w| match *w {
                [a, b] => bytes.get(a..b),
                _ => None,
            })
            .collect()
    }

    fn cuts() -> impl Strategy<Value = Vec<Index>> {
        prop::collection::vec(any::<Index>(), 0..24)
    }

    /// A user name the session accepts: UTF-8 without control characters.
    pub(in crate::smtp) fn user() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z][a-z0-9._-]{0,20}@example\\.com", "[^\\p{Cc}]{1,24}"]
    }

    /// A password: UTF-8 without NUL, long enough not to turn up in a dump by chance.
    pub(in crate::smtp) fn password() -> impl Strategy<Value = String> {
        "[^\\x00]{8,32}"
    }

    pub(in crate::smtp) fn b64(data: &[u8]) -> String {
        STANDARD.encode(data)
    }

    /// Whether `debug` shows `secret`: as text, escaped, as a list of byte values, or in
    /// base64.
    pub(in crate::smtp) fn shows(debug: &str, secret: &[u8]) -> bool {
        let numbers = format!("{secret:?}");
        let inner = numbers.trim_start_matches('[').trim_end_matches(']');
        let encoded = b64(secret);
        let encoded_numbers = format!("{:?}", encoded.as_bytes());
        debug.contains(inner)
            || debug.contains(&secret.escape_ascii().to_string())
            || std::str::from_utf8(secret).is_ok_and(|s| debug.contains(s))
            || debug.contains(encoded.trim_end_matches('='))
            || debug.contains(
                encoded_numbers
                    .trim_start_matches('[')
                    .trim_end_matches(']'),
            )
    }

    fn eol() -> impl Strategy<Value = &'static [u8]> {
        prop_oneof![
            8 => Just(&b"\r\n"[..]),
            1 => Just(&b"\n"[..]),
            1 => Just(&b"\r"[..]),
            1 => Just(&b"\r\r\n"[..]),
        ]
    }

    /// One line as a client might send it before login: a command, a SASL response, a long
    /// line near a limit, or random bytes.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let verb = prop::sample::select(vec![
            "EHLO", "ehlo", "HELO", "AUTH", "auth", "STARTTLS", "RSET", "NOOP", "QUIT", "VRFY",
            "EXPN", "HELP", "MAIL", "RCPT", "DATA", "BDAT", "XCLIENT", "XFORWARD", "FOO", "",
        ]);
        let argument = prop_oneof![
            3 => "[a-z0-9.-]{1,20}(\\.example\\.com)?",
            2 => prop::sample::select(vec!["PLAIN", "LOGIN", "plain", "CRAM-MD5", "=", "*"])
                .prop_map(str::to_owned),
            2 => prop::collection::vec(any::<u8>(), 0..32).prop_map(|v| b64(&v)),
            1 => (user(), password()).prop_map(|(u, p)| b64(format!("\0{u}\0{p}").as_bytes())),
            1 => "[ -~]{0,16}",
            1 => prop::collection::vec(any::<u8>(), 0..12)
                .prop_map(|v| String::from_utf8_lossy(&v).into_owned()),
        ];
        let command =
            (verb, prop::collection::vec(argument, 0..3), eol()).prop_map(|(verb, args, eol)| {
                let mut line = verb.as_bytes().to_vec();
                for arg in args {
                    line.push(b' ');
                    line.extend_from_slice(arg.as_bytes());
                }
                [&line[..], eol].concat()
            });
        let response = (
            prop_oneof![
                3 => prop::collection::vec(any::<u8>(), 0..32).prop_map(|v| b64(&v)),
                2 => (user(), password()).prop_map(|(u, p)| b64(format!("\0{u}\0{p}").as_bytes())),
                1 => Just("*".to_owned()),
                1 => Just("=".to_owned()),
            ],
            eol(),
        )
            .prop_map(|(r, eol)| [r.as_bytes(), eol].concat());
        let long = (
            prop::sample::select(vec!["", "AUTH ", "AUTH PLAIN "]),
            any::<u8>(),
            prop_oneof![
                505usize..520,
                SASL_LINE_MAX - 8..SASL_LINE_MAX + 4,
                0usize..2 * SASL_LINE_MAX,
            ],
            eol(),
        )
            .prop_map(|(prefix, b, n, eol)| [prefix.as_bytes(), &vec![b; n], eol].concat());
        let valid = (0u8..8, user(), password()).prop_map(|(kind, u, p)| {
            let plain = b64(format!("\0{u}\0{p}").as_bytes());
            let (u, p) = (b64(u.as_bytes()), b64(p.as_bytes()));
            match kind {
                0 => format!("AUTH PLAIN {plain}\r\n"),
                1 => format!("AUTH PLAIN\r\n{plain}\r\n"),
                2 => format!("AUTH LOGIN {u}\r\n{p}\r\n"),
                3 => format!("AUTH LOGIN\r\n{u}\r\n{p}\r\n"),
                4 => "NOOP\r\n".to_owned(),
                5 => "EHLO again.example.com\r\n".to_owned(),
                6 => "MAIL FROM:<a@example.com>\r\n".to_owned(),
                _ => "RSET\r\n".to_owned(),
            }
            .into_bytes()
        });
        prop_oneof![
            6 => valid,
            6 => command,
            2 => response,
            1 => long,
            1 => prop::collection::vec(any::<u8>(), 0..40),
        ]
    }

    /// Near-valid client input: an `EHLO` most of the time, then random lines.
    pub(in crate::smtp) fn smtp_noise() -> impl Strategy<Value = Vec<u8>> {
        (any::<bool>(), prop::collection::vec(line(), 0..16)).prop_map(|(ehlo, lines)| {
            let start: &[u8] = if ehlo {
                b"EHLO client.example.com\r\n"
            } else {
                b""
            };
            [start.to_vec(), lines.concat()].concat()
        })
    }

    fn session_config() -> impl Strategy<Value = SessionConfig> {
        prop::sample::select(vec![(true, false), (false, true), (false, false)]).prop_map(
            |(tls_active, starttls_offered)| SessionConfig {
                hostname: "mx.example.com".into(),
                tls_active,
                starttls_offered,
                backend_extensions: ["PIPELINING", "SIZE 10240000", "AUTH PLAIN LOGIN"]
                    .map(String::from)
                    .to_vec(),
            },
        )
    }

    use crate::prop_support::check_write;

    /// Run a session over `chunks` as the driver does: every AUTH refused, or the first one
    /// accepted (the driver then stops reading into the session and sends the pipelined
    /// bytes and the later reads to the backend). What the client sees, events inline, then
    /// what reaches the backend. Checks the buffer bound on the way.
    fn transcript(
        cfg: &SessionConfig,
        chunks: &[&[u8]],
        accept: bool,
    ) -> Result<String, TestCaseError> {
        let mut session = PreAuth::new(cfg.clone());
        let mut seen = String::new();
        let mut chunks = chunks.iter();
        while let Some(chunk) = chunks.next() {
            let mut step = session.input(chunk);
            loop {
                check_write(&step.write)?;
                seen.push_str(&String::from_utf8_lossy(&step.write));
                let Some(event) = step.event else {
                    // Without an event the session holds less than one line limit.
                    prop_assert!(session.buf.len() < SASL_LINE_MAX, "{}", session.buf.len());
                    break;
                };
                // With one, at most that plus this read.
                prop_assert!(session.buf.len() < SASL_LINE_MAX + chunk.len());
                match event {
                    Event::Auth(c) => {
                        let _ = write!(
                            seen,
                            "<auth {:?} {} {:?} {:?}>",
                            c.mechanism,
                            c.username,
                            c.password.expose(),
                            c.authzid
                        );
                        if accept {
                            let mut backend = session.into_pipelined().to_vec();
                            for chunk in chunks {
                                backend.extend_from_slice(chunk);
                            }
                            let _ = write!(seen, "<backend {}>", backend.escape_ascii());
                            return Ok(seen);
                        }
                        seen.push_str("535 5.7.8 x\r\n");
                        step = session.input(&[]);
                    }
                    Event::TlsRequired => {
                        seen.push_str("<tls-required>");
                        step = session.input(&[]);
                    }
                    Event::StartTls | Event::Quit | Event::Close => {
                        // Nothing pipelined survives the plaintext session.
                        prop_assert!(session.buf.is_empty());
                        prop_assert_eq!(session.input(b"NOOP\r\n"), Step::default());
                        let _ = write!(seen, "<{event:?}>");
                        return Ok(seen);
                    }
                }
            }
        }
        Ok(seen)
    }

    proptest! {
        #![proptest_config(config(1024))]

        /// No panic and no buffer past its bound, replies always whole printable lines.
        #[test]
        fn any_input_is_bounded(
            cfg in session_config(),
            input in smtp_noise(),
            cuts in cuts(),
            accept in any::<bool>(),
        ) {
            transcript(&cfg, &pieces(&input, &cuts), accept)?;
        }

        /// The client sees the same replies and events, and the backend the same pipelined
        /// bytes, however the client's bytes were split into reads.
        #[test]
        fn chunking_does_not_matter(
            cfg in session_config(),
            input in smtp_noise(),
            cuts in cuts(),
            accept in any::<bool>(),
        ) {
            let whole = transcript(&cfg, &[&input], accept)?;
            let split = transcript(&cfg, &pieces(&input, &cuts), accept)?;
            prop_assert_eq!(split, whole);
        }

        /// AUTH PLAIN and LOGIN, with or without initial response, hand over exactly the
        /// credentials sent and keep what was pipelined after them; no `Debug` of a step
        /// shows the password.
        #[test]
        fn credentials_round_trip(
            kind in 0u8..4,
            authzid in prop_oneof![Just(String::new()), user()],
            user in user(),
            password in password(),
            tail in smtp_noise(),
            cuts in cuts(),
        ) {
            let plain = b64(format!("{authzid}\0{user}\0{password}").as_bytes());
            let (u, p) = (b64(user.as_bytes()), b64(password.as_bytes()));
            let auth = match kind {
                0 => format!("AUTH PLAIN {plain}\r\n"),
                1 => format!("AUTH PLAIN\r\n{plain}\r\n"),
                2 => format!("AUTH LOGIN {u}\r\n{p}\r\n"),
                _ => format!("AUTH LOGIN\r\n{u}\r\n{p}\r\n"),
            };
            let input = [b"EHLO client.example.com\r\n", auth.as_bytes(), &tail].concat();
            let cfg = SessionConfig {
                hostname: "mx.example.com".into(),
                tls_active: true,
                starttls_offered: false,
                backend_extensions: Vec::new(),
            };
            let mut session = PreAuth::new(cfg);
            let mut fed = 0;
            let mut auth = None;
            for piece in pieces(&input, &cuts) {
                let step = session.input(piece);
                fed += piece.len();
                let debug = format!("{step:?}");
                prop_assert!(!shows(&debug, password.as_bytes()), "{}", debug);
                check_write(&step.write)?;
                prop_assert!(!step.write.starts_with(b"5"), "{}", step.write.escape_ascii());
                if let Some(event) = step.event {
                    auth = Some(event);
                    break;
                }
            }
            let Some(Event::Auth(credentials)) = auth else {
                return Err(TestCaseError::fail(format!("no auth: {auth:?}")));
            };
            prop_assert_eq!(&credentials.username, &user);
            prop_assert_eq!(credentials.password.expose(), password.as_str());
            let expected_authzid = (kind < 2 && !authzid.is_empty()).then_some(authzid);
            prop_assert_eq!(credentials.authzid, expected_authzid);
            let mut pipelined = session.into_pipelined().to_vec();
            pipelined.extend_from_slice(input.get(fed..).unwrap_or_default());
            prop_assert_eq!(pipelined, tail);
        }
    }
}
