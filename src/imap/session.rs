//! The IMAP pre-auth session: a state machine without I/O.
//!
//! Bytes from the client go in through [`PreAuth::input`]; bytes to write and at most one
//! [`Event`] come out in a [`Step`]. The async driver owns the socket, TLS, authentication and
//! the backend login; this file owns the protocol up to the moment the client has handed over
//! its credentials, with every buffer capped (see [`parse`](super::parse) for the limits).
//!
//! Secrets: passwords live in [`Password`] (zeroized on drop), and every consumed command is
//! wiped from the input buffer before the buffer moves on, so no password lingers in it.

use std::fmt;

use bytes::{Buf, BytesMut};
use zeroize::{Zeroize, Zeroizing};

use super::parse::{
    self, Bad, Command, Frame, LineFrame, LiteralKind, Name, Progress, SaslMechanism, Tagged,
    TooLong,
};

pub use super::parse::MAX_BUFFERED;

/// Sent by the driver when the pre-auth timeout expires.
pub const BYE_TIMEOUT: &[u8] = b"* BYE Autologout; pre-login timeout\r\n";
/// Sent by the driver when the server shuts down before the client logged in.
pub const BYE_SHUTDOWN: &[u8] = b"* BYE Server shutting down\r\n";

/// After this many refused commands the session says goodbye.
pub const MAX_INVALID_COMMANDS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// TLS is active on this connection (implicit TLS listener, or after STARTTLS).
    pub tls_active: bool,
    /// The listener is a STARTTLS one and TLS is not yet active: advertise STARTTLS LOGINDISABLED.
    pub starttls_offered: bool,
}

/// What the connection offers, which decides the capabilities and whether a login may be
/// taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tls,
    /// A STARTTLS listener before the upgrade: no login yet.
    BeforeStartTls,
    /// `tls: none` (loopback test listeners): plaintext login allowed, no STARTTLS.
    Cleartext,
}

impl Transport {
    fn new(cfg: SessionConfig) -> Transport {
        if cfg.tls_active {
            Transport::Tls
        } else if cfg.starttls_offered {
            Transport::BeforeStartTls
        } else {
            Transport::Cleartext
        }
    }

    /// Only what we accept now, plus what a client needs to choose SASL-IR and LITERAL+. The
    /// post-login list is the backend's, sent with the tagged OK of the login.
    fn capabilities(self) -> &'static str {
        match self {
            Transport::Tls | Transport::Cleartext => {
                "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN"
            }
            Transport::BeforeStartTls => "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED",
        }
    }

    fn login_allowed(self) -> bool {
        !matches!(self, Transport::BeforeStartTls)
    }
}

/// A password as the client sent it: any octets the grammar allows, wiped on drop, never
/// printed.
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Password {
        Password(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the client logged in (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// The LOGIN command.
    Login,
    /// AUTHENTICATE PLAIN.
    Plain,
    /// AUTHENTICATE LOGIN.
    AuthLogin,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::AuthLogin => "auth-login",
        }
    }
}

#[derive(Debug)]
pub struct Credentials {
    /// The client's tag, for the driver's tagged reply.
    pub tag: String,
    pub username: String,
    pub password: Password,
    /// SASL PLAIN authorization identity when non-empty.
    pub authzid: Option<String>,
    pub mechanism: Mechanism,
}

#[derive(Debug)]
pub enum Event {
    /// A login (LOGIN or AUTHENTICATE) with full credentials. While a login is pending the
    /// session parses nothing further; `input` with bytes only buffers them. The driver answers
    /// the tagged reply itself, then on failure calls `input(&[])` to continue, on success
    /// `into_pipelined`.
    Login(Credentials),
    /// `tag OK Begin TLS negotiation now` is in `write`. The driver writes it, drops this
    /// session (and so everything the client pipelined after STARTTLS), does the handshake and
    /// makes a new PreAuth with `tls_active = true`.
    StartTls,
    /// A login command refused because TLS is not active on a STARTTLS listener; the
    /// `NO [PRIVACYREQUIRED]` reply is in `write`. The driver counts it, then calls
    /// `input(&[])`.
    TlsRequired,
    /// LOGOUT: `* BYE` and the tagged OK are in `write`; the driver writes and closes.
    Logout,
    /// The session ends: a `* BYE ...` is in `write`. The driver writes and closes.
    Close,
}

#[derive(Debug, Default)]
pub struct Step {
    pub write: Vec<u8>,
    pub event: Option<Event>,
}

/// Where the conversation is; each state carries what is valid in it.
enum State {
    /// Waiting for a command.
    Command,
    /// `AUTHENTICATE PLAIN` without initial response: `+ ` sent, waiting for the message.
    AuthPlain { tag: String },
    /// `AUTHENTICATE LOGIN`: asked for the user name.
    AuthLoginUser { tag: String },
    /// `AUTHENTICATE LOGIN`: have the user name, asked for the password.
    AuthLoginPassword { tag: String, username: String },
    /// An [`Event::Login`] is out; input is only buffered until the driver resumes us.
    LoginPending,
    /// STARTTLS, LOGOUT or BYE: nothing more is read.
    Finished,
}

/// What one step of the machine asks for next.
enum Flow {
    Continue,
    NeedInput,
    Stop(Event),
}

pub struct PreAuth {
    transport: Transport,
    state: State,
    /// Client bytes not yet consumed; never more than [`MAX_BUFFERED`].
    buf: BytesMut,
    /// How far the framer has looked into `buf`.
    framing: Progress,
    /// Refused commands so far (BAD, and NO for commands we do not take before login).
    invalid_commands: u32,
    /// From the client's last `ID`, passed on to the backend.
    client_id: Vec<(String, Option<String>)>,
}

impl PreAuth {
    pub fn new(cfg: SessionConfig) -> PreAuth {
        PreAuth {
            transport: Transport::new(cfg),
            state: State::Command,
            buf: BytesMut::new(),
            framing: Progress::default(),
            invalid_commands: 0,
            client_id: Vec::new(),
        }
    }

    /// `* OK [CAPABILITY ...] mailgate ready.`
    pub fn greeting(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Reply::Greeting(self.transport.capabilities()).write_to(&mut out);
        out
    }

    /// Feed bytes read from the client (may be empty to resume after an event). Processes as
    /// much buffered input as possible and stops at the first event the driver must act on.
    ///
    /// While a login is pending, non-empty input is only buffered, and `input(&[])` means
    /// "that login failed, go on". Should the buffer overflow meanwhile, the step is a
    /// `* BYE` and [`Event::Close`].
    pub fn input(&mut self, bytes: &[u8]) -> Step {
        let mut out = Vec::new();
        match self.state {
            State::Finished => return Step::default(),
            State::LoginPending if !bytes.is_empty() => {
                if self.buf.len() + bytes.len() > MAX_BUFFERED {
                    return self.close_step(out, Reply::Bye("Too much input before login"));
                }
                self.append(bytes);
                return Step::default();
            }
            State::LoginPending => self.state = State::Command,
            _ => {}
        }
        let mut rest = bytes;
        loop {
            let room = MAX_BUFFERED.saturating_sub(self.buf.len());
            if room == 0 && !rest.is_empty() {
                // Unreachable while the framer enforces its caps; a safety net all the same.
                return self.close_step(out, Reply::Bye("Too much input before login"));
            }
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.append(now);
            rest = later;
            if let Some(event) = self.advance(&mut out) {
                return self.stop(out, event, rest);
            }
            if rest.is_empty() {
                return Step {
                    write: out,
                    event: None,
                };
            }
        }
    }

    /// The client's ID fields (from an ID command, if any), to be passed on to the backend.
    pub fn client_id(&self) -> &[(String, Option<String>)] {
        &self.client_id
    }

    /// After a successful login: the bytes the client pipelined after its login command.
    pub fn into_pipelined(mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }

    /// Bytes of client input held (for tests and metrics).
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Hand an event to the driver with what is left of this read: kept for a login (pipelined
    /// commands) or after TlsRequired (we go on), dropped otherwise.
    fn stop(&mut self, out: Vec<u8>, event: Event, rest: &[u8]) -> Step {
        match event {
            Event::Login(_) | Event::TlsRequired => {
                if self.buf.len() + rest.len() > MAX_BUFFERED {
                    // Dropping the event drops (and wipes) the credentials.
                    return self.close_step(out, Reply::Bye("Too much input before login"));
                }
                self.append(rest);
            }
            Event::StartTls | Event::Logout | Event::Close => self.finish(),
        }
        Step {
            write: out,
            event: Some(event),
        }
    }

    fn close_step(&mut self, mut out: Vec<u8>, bye: Reply<'_>) -> Step {
        bye.write_to(&mut out);
        self.finish();
        Step {
            write: out,
            event: Some(Event::Close),
        }
    }

    /// Run the machine over the buffer until it needs input or has an event.
    fn advance(&mut self, out: &mut Vec<u8>) -> Option<Event> {
        loop {
            let flow = match self.state {
                State::Command => self.next_command(out),
                State::AuthPlain { .. }
                | State::AuthLoginUser { .. }
                | State::AuthLoginPassword { .. } => self.next_response(out),
                State::LoginPending | State::Finished => Flow::NeedInput,
            };
            match flow {
                Flow::Continue => {}
                Flow::NeedInput => return None,
                Flow::Stop(event) => return Some(event),
            }
        }
    }

    fn next_command(&mut self, out: &mut Vec<u8>) -> Flow {
        match parse::command_frame(&self.buf, self.framing) {
            Frame::Incomplete(progress) => {
                self.framing = progress;
                Flow::NeedInput
            }
            Frame::TooLong(what) => self.close(out, too_long_text(what)),
            Frame::LiteralTooLarge { header_end } => {
                let head = parse::head(&self.buf);
                self.consume(header_end);
                let tag = head.as_ref().map(|h| h.tag.as_str());
                self.refuse(out, tag, Bad::LiteralTooLarge)
            }
            Frame::Literal {
                header_end,
                size,
                kind,
            } => {
                if kind == LiteralKind::Synchronizing {
                    if let Some(flow) = self.refuse_literal(out, header_end) {
                        return flow;
                    }
                    Reply::Continue("Ready for literal data").write_to(out);
                }
                self.framing = Progress::at(header_end + size);
                Flow::Continue
            }
            Frame::Complete(len) => {
                let parsed = parse::command(self.buf.get(..len).unwrap_or_default());
                self.consume(len);
                self.execute(out, parsed)
            }
        }
    }

    /// Before inviting a synchronizing literal with `+`, refuse commands that cannot take one,
    /// so nobody gets us to buffer data for a command we will reject anyway, and no password
    /// is invited over cleartext. The client sends no data for a refused literal.
    fn refuse_literal(&mut self, out: &mut Vec<u8>, header_end: usize) -> Option<Flow> {
        let prefix = self.buf.get(..header_end).unwrap_or_default();
        let head = parse::head(prefix);
        let has_nul = prefix.contains(&0);
        let flow = match head {
            None => {
                self.consume(header_end);
                self.refuse(out, None, Bad::Tag)
            }
            Some(head) => {
                let refusal = self.literal_refusal(head.name, has_nul)?;
                self.consume(header_end);
                refusal.apply(self, out, &head.tag)
            }
        };
        Some(flow)
    }

    fn literal_refusal(&self, name: Name, has_nul: bool) -> Option<Refusal> {
        match name {
            Name::Login if !self.transport.login_allowed() => Some(Refusal::TlsRequired),
            Name::Login | Name::Id if has_nul => Some(Refusal::Bad(Bad::Nul)),
            Name::Login | Name::Id => None,
            Name::NeedsAuth => Some(Refusal::NotLoggedIn),
            Name::Unknown => Some(Refusal::Bad(Bad::UnknownCommand)),
            Name::Authenticate if !self.transport.login_allowed() => Some(Refusal::TlsRequired),
            Name::Capability | Name::Noop | Name::Logout | Name::StartTls | Name::Authenticate => {
                Some(Refusal::Bad(Bad::Syntax))
            }
        }
    }

    fn execute(&mut self, out: &mut Vec<u8>, parsed: Result<Tagged, Bad>) -> Flow {
        let Tagged { tag, name, args } = match parsed {
            Ok(tagged) => tagged,
            Err(bad) => return self.refuse(out, None, bad),
        };
        if name.is_login() && !self.transport.login_allowed() {
            return Refusal::TlsRequired.apply(self, out, &tag);
        }
        let command = match args {
            Ok(command) => command,
            Err(bad) => return self.refuse(out, Some(&tag), bad),
        };
        match command {
            Command::Capability => {
                Reply::Capability(self.transport.capabilities()).write_to(out);
                Reply::Ok(&tag, "Capability completed").write_to(out);
                Flow::Continue
            }
            Command::Noop => {
                Reply::Ok(&tag, "NOOP completed").write_to(out);
                Flow::Continue
            }
            Command::Logout => {
                Reply::Bye("Logging out").write_to(out);
                Reply::Ok(&tag, "Logout completed").write_to(out);
                self.finish();
                Flow::Stop(Event::Logout)
            }
            Command::StartTls => match self.transport {
                Transport::BeforeStartTls => {
                    Reply::Ok(&tag, "Begin TLS negotiation now").write_to(out);
                    self.finish();
                    Flow::Stop(Event::StartTls)
                }
                Transport::Tls => self.refuse(out, Some(&tag), Bad::TlsActive),
                Transport::Cleartext => self.refuse(out, Some(&tag), Bad::StartTlsUnavailable),
            },
            Command::Login { username, password } => self.login(Credentials {
                tag,
                username,
                password: Password(password),
                authzid: None,
                mechanism: Mechanism::Login,
            }),
            Command::Authenticate {
                mechanism,
                initial_response,
            } => self.authenticate(out, tag, mechanism, initial_response),
            Command::Id(fields) => {
                self.client_id = fields;
                Reply::Id.write_to(out);
                Reply::Ok(&tag, "ID completed").write_to(out);
                Flow::Continue
            }
            Command::NeedsAuth => Refusal::NotLoggedIn.apply(self, out, &tag),
        }
    }

    fn authenticate(
        &mut self,
        out: &mut Vec<u8>,
        tag: String,
        mechanism: SaslMechanism,
        initial_response: Option<parse::Secret>,
    ) -> Flow {
        match (mechanism, initial_response) {
            (SaslMechanism::Unsupported, _) => Refusal::UnsupportedMechanism.apply(self, out, &tag),
            (SaslMechanism::Plain, Some(message)) => self.plain(out, tag, &message),
            (SaslMechanism::Plain, None) => {
                Reply::Continue("").write_to(out);
                self.state = State::AuthPlain { tag };
                Flow::Continue
            }
            (SaslMechanism::Login, Some(username)) => self.login_username(out, tag, &username),
            (SaslMechanism::Login, None) => {
                Reply::Continue("VXNlcm5hbWU6").write_to(out);
                self.state = State::AuthLoginUser { tag };
                Flow::Continue
            }
        }
    }

    fn plain(&mut self, out: &mut Vec<u8>, tag: String, message: &[u8]) -> Flow {
        match parse::sasl_plain(message) {
            Ok(plain) => self.login(Credentials {
                tag,
                username: plain.username,
                password: Password(plain.password),
                authzid: plain.authzid,
                mechanism: Mechanism::Plain,
            }),
            Err(bad) => self.refuse(out, Some(&tag), bad),
        }
    }

    fn login_username(&mut self, out: &mut Vec<u8>, tag: String, username: &[u8]) -> Flow {
        match parse::user_name(username) {
            Ok(username) => {
                Reply::Continue("UGFzc3dvcmQ6").write_to(out);
                self.state = State::AuthLoginPassword { tag, username };
                Flow::Continue
            }
            Err(bad) => self.refuse(out, Some(&tag), bad),
        }
    }

    /// One response line of an AUTHENTICATE exchange.
    fn next_response(&mut self, out: &mut Vec<u8>) -> Flow {
        let (content_end, len) = match parse::line_frame(&self.buf, self.framing) {
            LineFrame::Incomplete(progress) => {
                self.framing = progress;
                return Flow::NeedInput;
            }
            LineFrame::TooLong => return self.close(out, "Command line too long"),
            LineFrame::Complete { content_end, len } => (content_end, len),
        };
        let response = match self.buf.get(..content_end).unwrap_or_default() {
            b"*" => Err(Bad::Aborted),
            text => parse::base64(text),
        };
        self.consume(len);
        match (std::mem::replace(&mut self.state, State::Command), response) {
            (
                State::AuthPlain { tag }
                | State::AuthLoginUser { tag }
                | State::AuthLoginPassword { tag, .. },
                Err(bad),
            ) => self.refuse(out, Some(&tag), bad),
            (State::AuthPlain { tag }, Ok(message)) => self.plain(out, tag, &message),
            (State::AuthLoginUser { tag }, Ok(username)) => {
                self.login_username(out, tag, &username)
            }
            (State::AuthLoginPassword { tag, username }, Ok(password)) => {
                match parse::sasl_password(password) {
                    Ok(password) => self.login(Credentials {
                        tag,
                        username,
                        password: Password(password),
                        authzid: None,
                        mechanism: Mechanism::AuthLogin,
                    }),
                    Err(bad) => self.refuse(out, Some(&tag), bad),
                }
            }
            (state @ (State::Command | State::LoginPending | State::Finished), _) => {
                // Not reached: `advance` calls us only in the AUTHENTICATE states.
                self.state = state;
                Flow::NeedInput
            }
        }
    }

    fn login(&mut self, credentials: Credentials) -> Flow {
        self.state = State::LoginPending;
        Flow::Stop(Event::Login(credentials))
    }

    /// `BAD`, counted.
    fn refuse(&mut self, out: &mut Vec<u8>, tag: Option<&str>, bad: Bad) -> Flow {
        Reply::Bad(tag, bad).write_to(out);
        self.count_invalid(out)
    }

    fn count_invalid(&mut self, out: &mut Vec<u8>) -> Flow {
        self.invalid_commands += 1;
        if self.invalid_commands >= MAX_INVALID_COMMANDS {
            self.close(out, "Too many invalid commands")
        } else {
            Flow::Continue
        }
    }

    fn close(&mut self, out: &mut Vec<u8>, text: &'static str) -> Flow {
        Reply::Bye(text).write_to(out);
        self.finish();
        Flow::Stop(Event::Close)
    }

    fn finish(&mut self) {
        self.state = State::Finished;
        self.consume(self.buf.len());
    }

    /// Append client bytes. Growth goes to a fresh allocation and the old one is wiped, so
    /// reallocation leaves no copy of a password behind.
    fn append(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let needed = self.buf.len() + bytes.len();
        if self.buf.capacity() < needed {
            let capacity = needed
                .max(2 * self.buf.capacity())
                .clamp(1024, MAX_BUFFERED.max(needed));
            let mut grown = BytesMut::with_capacity(capacity);
            grown.extend_from_slice(&self.buf);
            self.buf.as_mut().zeroize();
            self.buf = grown;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Drop `len` bytes from the front of the buffer, wiped first.
    fn consume(&mut self, len: usize) {
        let len = len.min(self.buf.len());
        if let Some(consumed) = self.buf.get_mut(..len) {
            consumed.zeroize();
        }
        self.buf.advance(len);
        self.framing = Progress::default();
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.buf.as_mut().zeroize();
    }
}

/// Refusals that are not a plain `BAD`.
enum Refusal {
    Bad(Bad),
    TlsRequired,
    NotLoggedIn,
    UnsupportedMechanism,
}

impl Refusal {
    fn apply(self, session: &mut PreAuth, out: &mut Vec<u8>, tag: &str) -> Flow {
        match self {
            Refusal::Bad(bad) => session.refuse(out, Some(tag), bad),
            Refusal::TlsRequired => {
                Reply::No(
                    tag,
                    Some("PRIVACYREQUIRED"),
                    "Login not allowed before STARTTLS",
                )
                .write_to(out);
                Flow::Stop(Event::TlsRequired)
            }
            Refusal::NotLoggedIn => {
                Reply::No(tag, None, "Not logged in").write_to(out);
                session.count_invalid(out)
            }
            Refusal::UnsupportedMechanism => {
                Reply::No(tag, None, "Unsupported authentication mechanism").write_to(out);
                session.count_invalid(out)
            }
        }
    }
}

fn too_long_text(what: TooLong) -> &'static str {
    match what {
        TooLong::Command => "Command line too long",
        TooLong::Literal => "Literal too large",
    }
}

/// Every line this session writes, built in one place. Tags echoed here passed the tag
/// grammar, so no client byte can break a reply line.
enum Reply<'a> {
    Greeting(&'static str),
    Capability(&'static str),
    Id,
    Ok(&'a str, &'static str),
    No(&'a str, Option<&'static str>, &'static str),
    /// `None`: untagged, when the client gave no usable tag.
    Bad(Option<&'a str>, Bad),
    Continue(&'static str),
    Bye(&'static str),
}

impl Reply<'_> {
    fn write_to(&self, out: &mut Vec<u8>) {
        let line = match self {
            Reply::Greeting(caps) => format!("* OK [CAPABILITY {caps}] mailgate ready."),
            Reply::Capability(caps) => format!("* CAPABILITY {caps}"),
            Reply::Id => "* ID (\"name\" \"mailgate\")".to_owned(),
            Reply::Ok(tag, text) => format!("{tag} OK {text}"),
            Reply::No(tag, Some(code), text) => format!("{tag} NO [{code}] {text}"),
            Reply::No(tag, None, text) => format!("{tag} NO {text}"),
            Reply::Bad(tag, bad) => format!("{} BAD {}", tag.unwrap_or("*"), bad.text()),
            Reply::Continue(text) => format!("+ {text}"),
            Reply::Bye(text) => format!("* BYE {text}"),
        };
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::imap::parse::{ID_LINE_MAX, LINE_MAX, LITERAL_MAX};

    const TLS: SessionConfig = SessionConfig {
        tls_active: true,
        starttls_offered: false,
    };
    const STARTTLS: SessionConfig = SessionConfig {
        tls_active: false,
        starttls_offered: true,
    };
    const CLEARTEXT: SessionConfig = SessionConfig {
        tls_active: false,
        starttls_offered: false,
    };

    /// What the test driver does with a Login event.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        /// Answer `NO [AUTHENTICATIONFAILED]` as the real driver would, then `input(&[])`.
        Reject,
        /// Log in: feed the rest only to be buffered, then `into_pipelined`.
        Accept,
    }
    use Outcome::{Accept, Reject};

    fn describe(event: &Event) -> String {
        match event {
            Event::Login(c) => format!(
                "<login tag={} user={} pass={} authzid={} mech={}>",
                c.tag,
                c.username,
                c.password.as_bytes().escape_ascii(),
                c.authzid.as_deref().unwrap_or("-"),
                c.mechanism.as_str()
            ),
            Event::StartTls => "<starttls>".to_owned(),
            Event::TlsRequired => "<tls-required>".to_owned(),
            Event::Logout => "<logout>".to_owned(),
            Event::Close => "<close>".to_owned(),
        }
    }

    /// Run a session over `chunks` the way the driver would and return everything the client
    /// sees, with events marked inline, and the pipelined bytes after an accepted login.
    fn run(cfg: SessionConfig, chunks: &[&[u8]], outcomes: &[Outcome]) -> String {
        let mut session = PreAuth::new(cfg);
        let mut seen = String::new();
        let mut outcomes = outcomes.iter();
        let mut accepted = false;
        for chunk in chunks {
            if accepted {
                if !chunk.is_empty() {
                    let step = session.input(chunk);
                    assert!(step.write.is_empty() && step.event.is_none());
                }
                continue;
            }
            let mut step = session.input(chunk);
            loop {
                assert!(session.buffered_len() <= MAX_BUFFERED);
                seen.push_str(std::str::from_utf8(&step.write).expect("replies are ASCII"));
                let Some(event) = step.event else { break };
                seen.push_str(&describe(&event));
                match event {
                    Event::Login(credentials) => {
                        if outcomes.next().copied().unwrap_or(Accept) == Accept {
                            accepted = true;
                            break;
                        }
                        let _ = write!(
                            seen,
                            "{} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n",
                            credentials.tag
                        );
                        step = session.input(&[]);
                    }
                    Event::TlsRequired => step = session.input(&[]),
                    Event::StartTls | Event::Logout | Event::Close => return seen,
                }
            }
        }
        if accepted {
            let pipelined = session.into_pipelined();
            let _ = write!(seen, "<pipelined {}>", pipelined.escape_ascii());
        }
        seen
    }

    /// The same transcript whether the input comes whole, in two pieces split anywhere
    /// (every `stride`-th point), or byte by byte.
    fn check_with_stride(
        cfg: SessionConfig,
        input: &[u8],
        outcomes: &[Outcome],
        expected: &str,
        stride: usize,
    ) {
        let shown = String::from_utf8_lossy(input.get(..200).unwrap_or(input)).into_owned();
        assert_eq!(run(cfg, &[input], outcomes), expected, "whole: {shown:?}");
        for at in (0..=input.len()).step_by(stride).chain([input.len()]) {
            let (a, b) = input.split_at(at);
            assert_eq!(
                run(cfg, &[a, b], outcomes),
                expected,
                "split at {at}: {shown:?}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            run(cfg, &bytes, outcomes),
            expected,
            "byte by byte: {shown:?}"
        );
    }

    fn check(cfg: SessionConfig, input: &[u8], outcomes: &[Outcome], expected: &str) {
        check_with_stride(cfg, input, outcomes, expected, 1);
    }

    struct Case {
        name: &'static str,
        cfg: SessionConfig,
        input: &'static [u8],
        outcomes: &'static [Outcome],
        expected: &'static str,
    }

    const CASES: &[Case] = &[
        Case {
            name: "login with atoms",
            cfg: TLS,
            input: b"a LOGIN alice secret\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=secret authzid=- mech=login><pipelined >",
        },
        Case {
            name: "command names are case-insensitive",
            cfg: TLS,
            input: b"a1 lOgIn alice@example.com secret\r\n",
            outcomes: &[],
            expected: "<login tag=a1 user=alice@example.com pass=secret authzid=- mech=login>\
                       <pipelined >",
        },
        Case {
            name: "login with quoted strings and escapes",
            cfg: TLS,
            input: b"a LOGIN \"al\\\"ice\" \"p\\\\a ss\"\r\n",
            outcomes: &[],
            expected: "<login tag=a user=al\"ice pass=p\\\\a ss authzid=- mech=login><pipelined >",
        },
        Case {
            name: "login with empty quoted strings",
            cfg: TLS,
            input: b"a LOGIN \"\" \"\"\r\n",
            outcomes: &[],
            expected: "<login tag=a user= pass= authzid=- mech=login><pipelined >",
        },
        Case {
            name: "login with synchronizing literals",
            cfg: TLS,
            input: b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\n",
            outcomes: &[],
            expected: "+ Ready for literal data\r\n+ Ready for literal data\r\n\
                       <login tag=a user=alice pass=secret authzid=- mech=login><pipelined >",
        },
        Case {
            name: "login with LITERAL+",
            cfg: TLS,
            input: b"a LOGIN {5+}\r\nalice {8+}\r\nse\r\ncr\"t\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=se\\r\\ncr\\\"t authzid=- mech=login>\
                       <pipelined >",
        },
        Case {
            name: "8-bit password in a quoted string",
            cfg: TLS,
            input: b"a LOGIN alice \"p\xc3\xa4ss\xff\"\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=p\\xc3\\xa4ss\\xff authzid=- mech=login>\
                       <pipelined >",
        },
        Case {
            name: "8-bit password in a literal",
            cfg: TLS,
            input: b"a LOGIN alice {3+}\r\n\xe2\x82\xac\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=\\xe2\\x82\\xac authzid=- mech=login>\
                       <pipelined >",
        },
        Case {
            name: "8-bit bytes in an atom",
            cfg: TLS,
            input: b"a LOGIN alice p\xc3\xa4ss\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD 8-bit data outside a string\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "user name that is not UTF-8",
            cfg: TLS,
            input: b"a LOGIN \"al\xffice\" secret\r\n",
            outcomes: &[],
            expected: "a BAD Invalid user name\r\n",
        },
        Case {
            name: "NUL in a command",
            cfg: TLS,
            input: b"a LOGIN al\0ice secret\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD NUL byte in command\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "NUL in a literal",
            cfg: TLS,
            input: b"a LOGIN alice {3+}\r\na\0b\r\n",
            outcomes: &[],
            expected: "a BAD NUL byte in command\r\n",
        },
        Case {
            name: "NUL before a synchronizing literal: no + invitation",
            cfg: TLS,
            input: b"a LOGIN al\0ice {6}\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD NUL byte in command\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "pipelined commands after login stay buffered",
            cfg: TLS,
            input: b"a LOGIN alice secret\r\nb SELECT INBOX\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=secret authzid=- mech=login>\
                       <pipelined b SELECT INBOX\\r\\n>",
        },
        Case {
            name: "failed login, then the pipelined command is answered",
            cfg: TLS,
            input: b"a LOGIN alice wrong\r\nb SELECT INBOX\r\nc LOGIN alice secret\r\n",
            outcomes: &[Reject],
            expected: "<login tag=a user=alice pass=wrong authzid=- mech=login>\
                       a NO [AUTHENTICATIONFAILED] Invalid credentials\r\n\
                       b NO Not logged in\r\n\
                       <login tag=c user=alice pass=secret authzid=- mech=login><pipelined >",
        },
        Case {
            name: "authenticate plain with initial response",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=secret authzid=- mech=plain>\
                       <pipelined b NOOP\\r\\n>",
        },
        Case {
            name: "authenticate plain with an authorization identity",
            cfg: TLS,
            input: b"a authenticate plain YWRtaW4AYWxpY2UAc2VjcmV0\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=secret authzid=admin mech=plain><pipelined >",
        },
        Case {
            name: "authenticate plain without initial response",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nb SELECT INBOX\r\n",
            outcomes: &[],
            expected: "+ \r\n<login tag=a user=alice pass=secret authzid=- mech=plain>\
                       <pipelined b SELECT INBOX\\r\\n>",
        },
        Case {
            name: "authenticate plain with the empty initial response",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN =\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Invalid SASL PLAIN message\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "authenticate plain with an empty password",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNlAA==\r\n",
            outcomes: &[],
            expected: "a BAD Invalid SASL PLAIN message\r\n",
        },
        Case {
            name: "authenticate plain, 8-bit password",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNlAHDDpHNz/w==\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=p\\xc3\\xa4ss\\xff authzid=- mech=plain>\
                       <pipelined >",
        },
        Case {
            name: "authenticate plain, user name not UTF-8",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFs/2ljZQBzZWNyZXQ=\r\n",
            outcomes: &[],
            expected: "a BAD Invalid SASL PLAIN message\r\n",
        },
        Case {
            name: "authenticate aborted with *",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN\r\n*\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "+ \r\na BAD Authentication aborted\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "authenticate with bad base64 as initial response",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNl=AHNl\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Invalid base64 data\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "authenticate with bad base64 as response",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "+ \r\na BAD Invalid base64 data\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "authenticate login",
            cfg: TLS,
            input: b"a AUTHENTICATE LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nb LOGOUT\r\n",
            outcomes: &[],
            expected: "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n\
                       <login tag=a user=alice pass=secret authzid=- mech=auth-login>\
                       <pipelined b LOGOUT\\r\\n>",
        },
        Case {
            name: "authenticate login with the user name as initial response",
            cfg: TLS,
            input: b"a AUTHENTICATE LOGIN YWxpY2U=\r\nc2VjcmV0\r\n",
            outcomes: &[],
            expected: "+ UGFzc3dvcmQ6\r\n\
                       <login tag=a user=alice pass=secret authzid=- mech=auth-login><pipelined >",
        },
        Case {
            name: "authenticate login aborted at the password",
            cfg: TLS,
            input: b"a AUTHENTICATE LOGIN\r\nYWxpY2U=\r\n*\r\n",
            outcomes: &[],
            expected: "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\na BAD Authentication aborted\r\n",
        },
        Case {
            name: "authenticate login, NUL in the password",
            cfg: TLS,
            input: b"a AUTHENTICATE LOGIN YWxpY2U=\r\nc2UAY3JldA==\r\n",
            outcomes: &[],
            expected: "+ UGFzc3dvcmQ6\r\na BAD Invalid password\r\n",
        },
        Case {
            name: "unsupported mechanism",
            cfg: TLS,
            input: b"a AUTHENTICATE CRAM-MD5\r\n",
            outcomes: &[],
            expected: "a NO Unsupported authentication mechanism\r\n",
        },
        Case {
            name: "failed authenticate then resume",
            cfg: TLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n",
            outcomes: &[Reject],
            expected: "<login tag=a user=alice pass=secret authzid=- mech=plain>\
                       a NO [AUTHENTICATIONFAILED] Invalid credentials\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "ID NIL",
            cfg: TLS,
            input: b"a ID NIL\r\n",
            outcomes: &[],
            expected: "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n",
        },
        Case {
            name: "ID with pairs, NIL value and a literal",
            cfg: STARTTLS,
            input: b"a ID (\"name\" \"Thunderbird\" \"version\" NIL \"os\" {5}\r\nLinux)\r\n",
            outcomes: &[],
            expected: "+ Ready for literal data\r\n\
                       * ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n",
        },
        Case {
            name: "ID with an unterminated list",
            cfg: TLS,
            input: b"a ID (\"name\" \"x\"\r\n",
            outcomes: &[],
            expected: "a BAD Syntax error\r\n",
        },
        Case {
            name: "ID with a control character",
            cfg: TLS,
            input: b"a ID (\"name\" {3+}\r\na\rb)\r\n",
            outcomes: &[],
            expected: "a BAD Invalid ID field\r\n",
        },
        Case {
            name: "capability with TLS",
            cfg: TLS,
            input: b"a CAPABILITY\r\n",
            outcomes: &[],
            expected: "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\n\
                       a OK Capability completed\r\n",
        },
        Case {
            name: "capability before STARTTLS",
            cfg: STARTTLS,
            input: b"a capability\r\n",
            outcomes: &[],
            expected: "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED\r\n\
                       a OK Capability completed\r\n",
        },
        Case {
            name: "STARTTLS drops what was pipelined after it",
            cfg: STARTTLS,
            input: b"a STARTTLS\r\nz NOOP\r\n",
            outcomes: &[],
            expected: "a OK Begin TLS negotiation now\r\n<starttls>",
        },
        Case {
            name: "STARTTLS with TLS active",
            cfg: TLS,
            input: b"a STARTTLS\r\nz NOOP\r\n",
            outcomes: &[],
            expected: "a BAD TLS is already active\r\nz OK NOOP completed\r\n",
        },
        Case {
            name: "STARTTLS on a cleartext listener",
            cfg: CLEARTEXT,
            input: b"a STARTTLS\r\n",
            outcomes: &[],
            expected: "a BAD STARTTLS is not available\r\n",
        },
        Case {
            name: "cleartext listener allows login",
            cfg: CLEARTEXT,
            input: b"a LOGIN alice secret\r\n",
            outcomes: &[],
            expected: "<login tag=a user=alice pass=secret authzid=- mech=login><pipelined >",
        },
        Case {
            name: "login before STARTTLS",
            cfg: STARTTLS,
            input: b"a LOGIN alice secret\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a NO [PRIVACYREQUIRED] Login not allowed before STARTTLS\r\n\
                       <tls-required>b OK NOOP completed\r\n",
        },
        Case {
            name: "login literal before STARTTLS: no + invitation",
            cfg: STARTTLS,
            input: b"a LOGIN {5}\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a NO [PRIVACYREQUIRED] Login not allowed before STARTTLS\r\n\
                       <tls-required>b OK NOOP completed\r\n",
        },
        Case {
            name: "authenticate before STARTTLS, then STARTTLS",
            cfg: STARTTLS,
            input: b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\nb STARTTLS\r\n",
            outcomes: &[],
            expected: "a NO [PRIVACYREQUIRED] Login not allowed before STARTTLS\r\n\
                       <tls-required>b OK Begin TLS negotiation now\r\n<starttls>",
        },
        Case {
            name: "logout",
            cfg: TLS,
            input: b"a LOGOUT\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "* BYE Logging out\r\na OK Logout completed\r\n<logout>",
        },
        Case {
            name: "bare LF ends a line, as in Dovecot",
            cfg: TLS,
            input: b"a NOOP\nb LOGIN {5}\nalice secret\n",
            outcomes: &[],
            expected: "a OK NOOP completed\r\n+ Ready for literal data\r\n\
                       <login tag=b user=alice pass=secret authzid=- mech=login><pipelined >",
        },
        Case {
            name: "stray CR",
            cfg: TLS,
            input: b"a NOOP\r\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Syntax error\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "no tag",
            cfg: TLS,
            input: b"\r\n* NOOP\r\n+ NOOP\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "* BAD Missing or invalid tag\r\n* BAD Missing or invalid tag\r\n\
                       * BAD Missing or invalid tag\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "tag without command",
            cfg: TLS,
            input: b"a\r\nb \r\n",
            outcomes: &[],
            expected: "a BAD Syntax error\r\nb BAD Unknown command\r\n",
        },
        Case {
            name: "arguments where none belong",
            cfg: TLS,
            input: b"a NOOP now\r\n",
            outcomes: &[],
            expected: "a BAD Syntax error\r\n",
        },
        Case {
            name: "commands valid only after login",
            cfg: TLS,
            input: b"a SELECT INBOX\r\nb uid fetch 1 body[]\r\n",
            outcomes: &[],
            expected: "a NO Not logged in\r\nb NO Not logged in\r\n",
        },
        Case {
            name: "synchronizing literal of an unknown command: no + invitation",
            cfg: TLS,
            input: b"a XYZZY {5}\r\nb APPEND INBOX {5}\r\nc NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Unknown command\r\nb NO Not logged in\r\nc OK NOOP completed\r\n",
        },
        Case {
            name: "LITERAL+ of an unknown command is skipped over",
            cfg: TLS,
            input: b"a XYZZY {5+}\r\n\r\nb\r\n\r\nc NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Unknown command\r\nc OK NOOP completed\r\n",
        },
        Case {
            name: "five invalid commands",
            cfg: TLS,
            input: b"a FOO\r\nb SELECT INBOX\r\n\r\nd NOOP x\r\ne BAR\r\nf NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Unknown command\r\nb NO Not logged in\r\n\
                       * BAD Missing or invalid tag\r\nd BAD Syntax error\r\n\
                       e BAD Unknown command\r\n* BYE Too many invalid commands\r\n<close>",
        },
        Case {
            name: "synchronizing literal too large",
            cfg: TLS,
            input: b"a LOGIN {8193}\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Literal too large\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "synchronizing literal with an absurd size",
            cfg: TLS,
            input: b"a LOGIN {99999999999999999999999}\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "a BAD Literal too large\r\nb OK NOOP completed\r\n",
        },
        Case {
            name: "LITERAL+ too large",
            cfg: TLS,
            input: b"a LOGIN {8193+}\r\nb NOOP\r\n",
            outcomes: &[],
            expected: "* BYE Literal too large\r\n<close>",
        },
    ];

    #[test]
    fn table_at_every_split_point() {
        for case in CASES {
            let shown = case.name;
            let got = run(case.cfg, &[case.input], case.outcomes);
            assert_eq!(got, case.expected, "{shown}");
            check(case.cfg, case.input, case.outcomes, case.expected);
        }
    }

    #[test]
    fn tag_length() {
        let longest = "t".repeat(parse::TAG_MAX);
        check(
            TLS,
            format!("{longest} NOOP\r\n").as_bytes(),
            &[],
            &format!("{longest} OK NOOP completed\r\n"),
        );
        check(
            TLS,
            format!("{longest}t NOOP\r\nb NOOP\r\n").as_bytes(),
            &[],
            "* BAD Missing or invalid tag\r\nb OK NOOP completed\r\n",
        );
    }

    #[test]
    fn greetings() {
        assert_eq!(
            PreAuth::new(TLS).greeting(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] \
              mailgate ready.\r\n"
        );
        assert_eq!(
            PreAuth::new(CLEARTEXT).greeting(),
            PreAuth::new(TLS).greeting()
        );
        assert_eq!(
            PreAuth::new(STARTTLS).greeting(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] \
              mailgate ready.\r\n"
        );
        // An already-upgraded STARTTLS connection is a TLS one.
        let upgraded = SessionConfig {
            tls_active: true,
            starttls_offered: true,
        };
        assert_eq!(
            PreAuth::new(upgraded).greeting(),
            PreAuth::new(TLS).greeting()
        );
    }

    /// The `+` comes exactly once, as soon as the whole literal header is in, and never before.
    #[test]
    fn continuation_after_the_header_only() {
        let input = b"a LOGIN {5}\r\nalice secret\r\n";
        let header_end = b"a LOGIN {5}\r\n".len();
        for len in 0..=input.len() {
            let mut session = PreAuth::new(TLS);
            let step = session.input(input.get(..len).unwrap_or_default());
            let plus = b"+ Ready for literal data\r\n";
            let count = step.write.windows(plus.len()).filter(|w| w == plus).count();
            assert_eq!(count, usize::from(len >= header_end), "prefix {len}");
            assert_eq!(step.write, if len >= header_end { &plus[..] } else { b"" });
            // The rest of the input brings the invitation if it has not come yet, never twice.
            let rest = session.input(input.get(len..).unwrap_or_default());
            let expected: &[u8] = if len >= header_end { b"" } else { plus };
            assert_eq!(rest.write, expected, "prefix {len}");
            let login = matches!(step.event, Some(Event::Login(_)))
                || matches!(rest.event, Some(Event::Login(_)));
            assert!(login, "prefix {len}");
        }
    }

    #[test]
    fn id_fields_are_remembered_last_wins() {
        let mut session = PreAuth::new(TLS);
        let step = session.input(b"a ID (\"name\" \"Thunderbird\" \"version\" NIL)\r\n");
        assert_eq!(
            step.write,
            b"* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n"
        );
        assert_eq!(
            session.client_id(),
            [
                ("name".to_owned(), Some("Thunderbird".to_owned())),
                ("version".to_owned(), None)
            ]
        );
        let step = session.input(b"b id nil\r\n");
        assert_eq!(
            step.write,
            b"* ID (\"name\" \"mailgate\")\r\nb OK ID completed\r\n"
        );
        assert!(session.client_id().is_empty());
    }

    fn id_command(pairs: usize, key_len: usize, value_len: usize) -> Vec<u8> {
        let mut command = b"a ID (".to_vec();
        for i in 0..pairs {
            if i > 0 {
                command.push(b' ');
            }
            let key = format!("{i:0>key_len$}");
            command.extend_from_slice(format!("\"{key}\" \"").as_bytes());
            // Escaped quotes: the line is longer than the value.
            command.extend(std::iter::repeat_n(b"\\\"", value_len).flatten());
            command.push(b'"');
        }
        command.extend_from_slice(b")\r\nb NOOP\r\n");
        command
    }

    #[test]
    fn id_limits() {
        const OK: &str =
            "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\nb OK NOOP completed\r\n";
        // The largest ID we take is far beyond the 8 KiB line cap of other commands.
        let largest = id_command(30, 30, 1024);
        assert!(largest.len() > 60_000 && largest.len() < ID_LINE_MAX);
        check_with_stride(TLS, &largest, &[], OK, 997);
        let mut session = PreAuth::new(TLS);
        session.input(&largest);
        assert_eq!(session.client_id().len(), 30);
        assert_eq!(
            session.client_id().first().and_then(|(_, v)| v.as_deref()),
            Some("\"".repeat(1024).as_str())
        );

        let bad = |text: &str| format!("a BAD {text}\r\nb OK NOOP completed\r\n");
        check(TLS, &id_command(31, 2, 1), &[], &bad("Too many ID fields"));
        check(
            TLS,
            &id_command(1, 31, 1),
            &[],
            &bad("ID field name too long"),
        );
        check_with_stride(
            TLS,
            &id_command(1, 2, 1025),
            &[],
            &bad("ID field value too long"),
            13,
        );
    }

    #[test]
    fn oversize_lines() {
        // Exactly at the cap: taken.
        let prefix = b"a LOGIN alice ";
        let mut at_cap = prefix.to_vec();
        at_cap.resize(LINE_MAX, b'x');
        at_cap.extend_from_slice(b"\r\n");
        let expected = format!(
            "<login tag=a user=alice pass={} authzid=- mech=login><pipelined >",
            "x".repeat(LINE_MAX - prefix.len())
        );
        check_with_stride(TLS, &at_cap, &[], &expected, 101);

        // One byte over, with or without the line ending.
        let mut over = prefix.to_vec();
        over.resize(LINE_MAX + 1, b'x');
        let bye = "* BYE Command line too long\r\n<close>";
        check_with_stride(TLS, &over, &[], "", 101);
        over.extend_from_slice(b"\r\nb NOOP\r\n");
        check_with_stride(TLS, &over, &[], bye, 101);
        let mut endless = vec![b'x'; LINE_MAX + 2];
        check_with_stride(TLS, &endless, &[], bye, 101);
        // Still too long however it is fed: the buffer never goes past the cap.
        endless.resize(MAX_BUFFERED * 3, b'x');
        let mut session = PreAuth::new(TLS);
        let step = session.input(&endless);
        assert_eq!(step.write, b"* BYE Command line too long\r\n");
        assert!(matches!(step.event, Some(Event::Close)));
        assert_eq!(session.buffered_len(), 0);

        // An ID line has its own, larger cap.
        let mut long_id = b"a ID (\"k\" \"".to_vec();
        long_id.resize(ID_LINE_MAX + 2, b'v');
        check_with_stride(TLS, &long_id, &[], bye, 4999);

        // An AUTHENTICATE response line has the ordinary cap.
        let mut response = b"a AUTHENTICATE PLAIN\r\n".to_vec();
        response.resize(response.len() + LINE_MAX + 2, b'A');
        check_with_stride(
            TLS,
            &response,
            &[],
            "+ \r\n* BYE Command line too long\r\n<close>",
            101,
        );
    }

    #[test]
    fn oversize_literals() {
        // The largest literal is invited.
        let mut largest = format!("a LOGIN alice {{{LITERAL_MAX}}}\r\n").into_bytes();
        largest.resize(largest.len() + LITERAL_MAX, b'p');
        largest.extend_from_slice(b"\r\n");
        let expected = format!(
            "+ Ready for literal data\r\n<login tag=a user=alice pass={} authzid=- mech=login>\
             <pipelined >",
            "p".repeat(LITERAL_MAX)
        );
        check_with_stride(TLS, &largest, &[], &expected, 101);

        // LITERAL+ that would take the command past its total cap.
        let mut total = Vec::new();
        total.extend_from_slice(format!("a LOGIN {{{LITERAL_MAX}+}}\r\n").as_bytes());
        total.resize(total.len() + LITERAL_MAX, b'u');
        total.extend_from_slice(format!(" {{{LITERAL_MAX}+}}\r\n").as_bytes());
        total.resize(total.len() + LITERAL_MAX, b'p');
        total.extend_from_slice(format!(" {{{LITERAL_MAX}+}}\r\n").as_bytes());
        check_with_stride(TLS, &total, &[], "* BYE Literal too large\r\n<close>", 211);
        // The synchronizing kind is refused without an invitation.
        total.truncate(total.len() - format!(" {{{LITERAL_MAX}+}}\r\n").len());
        total.extend_from_slice(format!(" {{{LITERAL_MAX}}}\r\nb NOOP\r\n").as_bytes());
        check_with_stride(
            TLS,
            &total,
            &[],
            "a BAD Literal too large\r\nb OK NOOP completed\r\n",
            211,
        );
    }

    #[test]
    fn large_pipelined_input_in_one_read() {
        let mut input = Vec::new();
        for i in 0..20_000 {
            input.extend_from_slice(format!("n{i} NOOP\r\n").as_bytes());
        }
        let mut session = PreAuth::new(TLS);
        let step = session.input(&input);
        assert!(step.event.is_none());
        let replies = String::from_utf8(step.write).unwrap_or_default();
        assert_eq!(replies.lines().count(), 20_000);
        assert!(replies.ends_with("n19999 OK NOOP completed\r\n"));
        assert_eq!(session.buffered_len(), 0);
    }

    #[test]
    fn input_while_login_pending_is_bounded() {
        let mut session = PreAuth::new(TLS);
        let step = session.input(b"a LOGIN alice secret\r\nb NOOP\r\n");
        assert!(matches!(step.event, Some(Event::Login(_))));
        // Buffered, not answered.
        let step = session.input(b"c NOOP\r\n");
        assert!(step.write.is_empty() && step.event.is_none());
        assert_eq!(session.buffered_len(), 16);
        let flood = vec![b'x'; MAX_BUFFERED];
        let step = session.input(&flood);
        assert_eq!(step.write, b"* BYE Too much input before login\r\n");
        assert!(matches!(step.event, Some(Event::Close)));
        assert_eq!(session.buffered_len(), 0);
        // Finished: nothing more happens.
        let step = session.input(b"d NOOP\r\n");
        assert!(step.write.is_empty() && step.event.is_none());
    }

    #[test]
    fn pipelined_tail_larger_than_the_buffer_closes() {
        let mut input = b"a LOGIN alice secret\r\n".to_vec();
        input.resize(input.len() + MAX_BUFFERED + 1, b'x');
        let mut session = PreAuth::new(TLS);
        let step = session.input(&input);
        assert_eq!(step.write, b"* BYE Too much input before login\r\n");
        assert!(matches!(step.event, Some(Event::Close)));
    }

    #[test]
    fn failed_login_resumes_with_pending_input() {
        let mut session = PreAuth::new(TLS);
        let step = session.input(b"a LOGIN alice wrong\r\n");
        assert!(
            matches!(step.event, Some(Event::Login(ref c)) if c.password.as_bytes() == b"wrong")
        );
        assert!(session
            .input(b"b NOOP\r\nc LOGIN bob {3+}\r\n")
            .write
            .is_empty());
        let step = session.input(&[]);
        assert_eq!(step.write, b"b OK NOOP completed\r\n");
        assert!(step.event.is_none());
        let step = session.input(b"pw\"\r\nd SELECT INBOX\r\n");
        let Some(Event::Login(credentials)) = step.event else {
            panic!("no login: {step:?}");
        };
        assert_eq!(
            (credentials.tag.as_str(), credentials.username.as_str()),
            ("c", "bob")
        );
        assert_eq!(credentials.password.as_bytes(), b"pw\"");
        assert_eq!(&session.into_pipelined()[..], b"d SELECT INBOX\r\n");
    }

    #[test]
    fn secrets_do_not_print() {
        let credentials = Credentials {
            tag: "a".to_owned(),
            username: "alice".to_owned(),
            password: Password::new(b"hunter2".to_vec()),
            authzid: None,
            mechanism: Mechanism::Login,
        };
        let shown = format!("{:?}", Event::Login(credentials));
        assert!(shown.contains("password: ***"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    /// xorshift64*: deterministic, no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }

    /// Commands a client might send, so the fuzzer gets deep into the machine.
    const TEMPLATES: &[&[u8]] = &[
        b"a LOGIN alice secret\r\n",
        b"a LOGIN \"al\\\"ice\" \"p\xc3\xa4ss\"\r\n",
        b"a LOGIN {5}\r\nalice {6+}\r\nsecret\r\n",
        b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
        b"a AUTHENTICATE PLAIN =\r\n",
        b"a AUTHENTICATE PLAIN\r\n*\r\n",
        b"a AUTHENTICATE LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n",
        b"a AUTHENTICATE LOGIN YWxpY2U=\r\nc2VjcmV0\r\n",
        b"a ID (\"name\" \"x\" \"version\" NIL \"os\" {3}\r\nabc)\r\n",
        b"a ID NIL\r\n",
        b"a STARTTLS\r\n",
        b"a NOOP\r\n",
        b"a CAPABILITY\r\n",
        b"a SELECT INBOX\r\n",
        b"a LOGOUT\r\n",
    ];

    const PIECES: &[&[u8]] = &[
        b" ",
        b"(",
        b")",
        b"\"",
        b"\\",
        b"NIL",
        b"{5}\r\n",
        b"{0}\r\n",
        b"{3+}\r\n",
        b"{9000}\r\n",
        b"{9000+}\r\n",
        b"{8192}\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"*",
        b"=",
        b"\0",
        b"\xff",
        b"+",
        b"}",
        b"{",
    ];

    fn pick<'a>(rng: &mut Rng, from: &[&'a [u8]]) -> &'a [u8] {
        from.get(rng.below(from.len())).copied().unwrap_or_default()
    }

    /// A few template commands, then a few mutations: bytes changed, pieces inserted, ranges
    /// cut, runs of filler to reach the caps.
    fn random_input(rng: &mut Rng) -> Vec<u8> {
        let mut input = Vec::new();
        for _ in 0..1 + rng.below(6) {
            input.extend_from_slice(pick(rng, TEMPLATES));
        }
        for _ in 0..rng.below(4) {
            let at = rng.below(input.len() + 1);
            match rng.below(8) {
                0 | 1 => {
                    if let Some(byte) = input.get_mut(at) {
                        *byte = rng.next().to_le_bytes()[0];
                    }
                }
                2..=4 => {
                    let piece = pick(rng, PIECES);
                    input.splice(at..at, piece.iter().copied());
                }
                5 => {
                    let end = (at + rng.below(8)).min(input.len());
                    input.drain(at..end);
                }
                6 => {
                    let filler = rng.below(2 * LINE_MAX);
                    input.splice(at..at, std::iter::repeat_n(b'x', filler));
                }
                _ => {
                    let filler = rng.below(80_000);
                    input.splice(at..at, std::iter::repeat_n(b' ', filler));
                }
            }
        }
        input
    }

    #[test]
    fn fuzz_no_panic_and_bounded() {
        let mut rng = Rng(0x6d61_696c_6761_7465);
        let configs = [TLS, STARTTLS, CLEARTEXT];
        for _ in 0..5000 {
            let cfg = configs
                .get(rng.below(configs.len()))
                .copied()
                .unwrap_or(TLS);
            let input = random_input(&mut rng);
            if input.len() <= 4096 {
                // However the bytes are split into reads, the client sees the same thing.
                let mut chunks = Vec::new();
                let mut rest = &input[..];
                while !rest.is_empty() {
                    let (chunk, later) = rest.split_at(1 + rng.below(rest.len().min(64)));
                    chunks.push(chunk);
                    rest = later;
                }
                let outcomes = [Reject, Accept];
                assert_eq!(
                    run(cfg, &chunks, &outcomes),
                    run(cfg, &[&input], &outcomes),
                    "{:?}",
                    input.escape_ascii().to_string()
                );
            }
            let mut session = PreAuth::new(cfg);
            let mut rest = &input[..];
            'feed: while !rest.is_empty() {
                let (chunk, later) = rest.split_at(1 + rng.below(rest.len().min(4096)));
                rest = later;
                let mut step = session.input(chunk);
                loop {
                    assert!(session.buffered_len() <= MAX_BUFFERED);
                    assert!(step.write.is_ascii());
                    assert!(step.write.is_empty() || step.write.ends_with(b"\r\n"));
                    match step.event {
                        None => break,
                        Some(Event::Login(_)) if rng.below(2) == 0 => {
                            let pipelined = session.into_pipelined();
                            assert!(pipelined.len() <= MAX_BUFFERED);
                            break 'feed;
                        }
                        Some(Event::Login(_) | Event::TlsRequired) => step = session.input(&[]),
                        Some(Event::StartTls | Event::Logout | Event::Close) => break 'feed,
                    }
                }
            }
        }
    }
}

/// Property tests ("fuzz"): the session driven the way the driver drives it, over near-valid
/// random input in random pieces.
#[cfg(test)]
mod prop_tests {
    use std::fmt::Write as _;

    use base64::Engine as _;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;
    use crate::imap::parse::prop_tests::{
        astring, config, cuts, form, imap_noise, password, pieces, shows, user,
    };

    const CONFIGS: [SessionConfig; 3] = [
        SessionConfig {
            tls_active: true,
            starttls_offered: false,
        },
        SessionConfig {
            tls_active: false,
            starttls_offered: true,
        },
        SessionConfig {
            tls_active: false,
            starttls_offered: false,
        },
    ];

    fn session_config() -> impl Strategy<Value = SessionConfig> {
        prop::sample::select(CONFIGS.to_vec())
    }

    use crate::prop_support::check_write;

    /// Run a session over `chunks` as the driver does: every login refused, or the first one
    /// accepted (then later chunks are only buffered). Everything the client sees, events
    /// inline, then the pipelined bytes of an accepted login. Checks the bounds on the way.
    fn transcript(
        cfg: SessionConfig,
        chunks: &[&[u8]],
        accept: bool,
    ) -> Result<String, TestCaseError> {
        let mut session = PreAuth::new(cfg);
        let mut seen = String::new();
        let mut accepted = false;
        for chunk in chunks {
            let mut step = session.input(chunk);
            loop {
                prop_assert!(session.buffered_len() <= MAX_BUFFERED);
                check_write(&step.write)?;
                prop_assert!(!accepted || step.write.is_empty() || step.event.is_some());
                seen.push_str(&String::from_utf8_lossy(&step.write));
                let Some(event) = step.event else { break };
                match event {
                    Event::Login(c) => {
                        let _ = write!(
                            seen,
                            "<login {} {} {} {:?} {}>",
                            c.tag,
                            c.username,
                            c.password.as_bytes().escape_ascii(),
                            c.authzid,
                            c.mechanism.as_str()
                        );
                        if accept {
                            accepted = true;
                            break;
                        }
                        let _ = write!(seen, "{} NO [AUTHENTICATIONFAILED] x\r\n", c.tag);
                        step = session.input(&[]);
                    }
                    Event::TlsRequired => {
                        seen.push_str("<tls-required>");
                        step = session.input(&[]);
                    }
                    Event::StartTls | Event::Logout | Event::Close => {
                        // Nothing pipelined survives the plaintext session.
                        prop_assert_eq!(session.buffered_len(), 0);
                        prop_assert!(session.input(b"a NOOP\r\n").write.is_empty());
                        let _ = write!(seen, "<{event:?}>");
                        return Ok(seen);
                    }
                }
            }
        }
        if accepted {
            let _ = write!(
                seen,
                "<pipelined {}>",
                session.into_pipelined().escape_ascii()
            );
        }
        Ok(seen)
    }

    /// LOGIN, AUTHENTICATE PLAIN (with or without initial response) or AUTHENTICATE LOGIN
    /// for `user` and `password`, in the string forms given.
    fn login_command(
        kind: u8,
        user: &str,
        password: &[u8],
        forms: (parse::prop_tests::Form, parse::prop_tests::Form),
    ) -> Vec<u8> {
        let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
        let plain = [b"\0", user.as_bytes(), b"\0", password].concat();
        match kind % 4 {
            0 => [
                b"t1 LOGIN ",
                &astring(user.as_bytes(), forms.0, true)[..],
                b" ",
                &astring(password, forms.1, true),
                b"\r\n",
            ]
            .concat(),
            1 => format!("t1 AUTHENTICATE PLAIN {}\r\n", b64(&plain)).into_bytes(),
            2 => format!("t1 AUTHENTICATE PLAIN\r\n{}\r\n", b64(&plain)).into_bytes(),
            _ => format!(
                "t1 AUTHENTICATE LOGIN\r\n{}\r\n{}\r\n",
                b64(user.as_bytes()),
                b64(password)
            )
            .into_bytes(),
        }
    }

    proptest! {
        #![proptest_config(config(1024))]

        /// No panic and no buffer past its cap on near-valid input, replies always whole
        /// printable lines, whether logins are refused or accepted.
        #[test]
        fn any_input_is_bounded(
            cfg in session_config(),
            input in imap_noise(),
            cuts in cuts(),
            accept in any::<bool>(),
        ) {
            transcript(cfg, &pieces(&input, &cuts), accept)?;
        }

        /// A flood after some near-valid input: the buffer stays capped.
        #[test]
        fn a_flood_is_bounded(
            cfg in session_config(),
            input in imap_noise(),
            flood in (any::<u8>(), 0usize..2 * MAX_BUFFERED),
            cuts in cuts(),
            accept in any::<bool>(),
        ) {
            let input = [input, vec![flood.0; flood.1]].concat();
            transcript(cfg, &pieces(&input, &cuts), accept)?;
        }

        /// The client sees the same replies and events however its bytes were split into
        /// reads (within what the session may hold: past that, a login already handed out
        /// before the overflow was seen is the documented difference).
        #[test]
        fn chunking_does_not_matter(
            cfg in session_config(),
            input in imap_noise(),
            cuts in cuts(),
            accept in any::<bool>(),
        ) {
            let input = input.get(..MAX_BUFFERED).unwrap_or(&input);
            let whole = transcript(cfg, &[input], accept)?;
            let split = transcript(cfg, &pieces(input, &cuts), accept)?;
            prop_assert_eq!(split, whole);
        }

        /// Every way to log in hands over exactly the user name and password sent, with only
        /// continuations written; no `Debug` of what comes out shows the password.
        #[test]
        fn credentials_round_trip(
            kind in any::<u8>(),
            user in user().prop_filter("non-empty", |u| !u.is_empty()),
            password in password(),
            forms in (form(), form()),
            tail in imap_noise(),
            cuts in cuts(),
        ) {
            let command = login_command(kind, &user, &password, forms);
            let input = [command.clone(), tail.clone()].concat();
            let mut session = PreAuth::new(CONFIGS[0]);
            let mut login = None;
            let mut fed = 0;
            for piece in pieces(&input, &cuts) {
                let step = session.input(piece);
                fed += piece.len();
                let debug = format!("{step:?}");
                prop_assert!(!shows(&debug, &password), "{}", debug);
                for line in step.write.split_inclusive(|&b| b == b'\n') {
                    prop_assert!(line.starts_with(b"+ "), "{}", step.write.escape_ascii());
                }
                if let Some(event) = step.event {
                    login = Some(event);
                    break;
                }
            }
            let Some(Event::Login(credentials)) = login else {
                return Err(TestCaseError::fail(format!("no login: {login:?}")));
            };
            prop_assert_eq!(&credentials.username, &user);
            prop_assert_eq!(credentials.password.as_bytes(), password.as_slice());
            prop_assert_eq!(credentials.tag.as_str(), "t1");
            // What the client pipelined after its login is kept byte for byte.
            let mut pipelined = session.into_pipelined().to_vec();
            pipelined.extend_from_slice(input.get(fed..).unwrap_or_default());
            prop_assert_eq!(pipelined, tail);
        }
    }
}
