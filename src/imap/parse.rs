//! Pre-auth IMAP client input: framing and parsing, pure functions over `&[u8]`.
//!
//! Framing ([`command_frame`], [`line_frame`]) finds where a command ends without interpreting
//! it, and stops at every literal header so the session can send the `+` continuation itself
//! and check the declared size before anything is buffered. Parsing ([`command`]) turns one
//! complete frame into a [`Tagged`] command. Only what a client may say before login is
//! understood; every length is capped by the constants below.

use base64::Engine as _;
use zeroize::Zeroizing;

/// Longest line (one fragment of a command, without its line ending) before login.
pub const LINE_MAX: usize = 8 * 1024;
/// Largest literal before login.
pub const LITERAL_MAX: usize = 8 * 1024;
/// Largest whole command (lines and literals) other than `ID`: room for `LOGIN` with two
/// maximal literals.
pub const COMMAND_MAX: usize = 3 * LINE_MAX;
/// Longest tag we echo back.
pub const TAG_MAX: usize = 64;
/// `ID` limits, as Dovecot's.
pub const ID_FIELDS_MAX: usize = 30;
pub const ID_KEY_MAX: usize = 30;
pub const ID_VALUE_MAX: usize = 1024;
/// Longest `ID` line: 30 maximal pairs as quoted strings where every byte is escaped.
pub const ID_LINE_MAX: usize = TAG_MAX
    + " ID (".len()
    + ID_FIELDS_MAX * ((2 * ID_KEY_MAX + 2) + 1 + (2 * ID_VALUE_MAX + 2) + 1)
    + ")".len();
/// Largest whole `ID` command (literal values take less room than escaped quoted ones).
pub const ID_COMMAND_MAX: usize = ID_LINE_MAX;
/// The session never holds more than this many bytes of client input.
pub const MAX_BUFFERED: usize = ID_COMMAND_MAX + LINE_MAX;

const _: () = assert!(COMMAND_MAX + 2 < MAX_BUFFERED && ID_COMMAND_MAX + 2 < MAX_BUFFERED);
const _: () = assert!(ID_LINE_MAX <= 64 * 1024);

/// Why a command is refused with `BAD` (the text is the one place the reason meets the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Tag,
    UnknownCommand,
    Syntax,
    EightBit,
    Nul,
    LiteralTooLarge,
    UserName,
    IdTooManyFields,
    IdKeyTooLong,
    IdValueTooLong,
    IdField,
    Base64,
    SaslPlain,
    Password,
    Aborted,
    TlsActive,
    StartTlsUnavailable,
}

impl Bad {
    pub fn text(self) -> &'static str {
        match self {
            Bad::Tag => "Missing or invalid tag",
            Bad::UnknownCommand => "Unknown command",
            Bad::Syntax => "Syntax error",
            Bad::EightBit => "8-bit data outside a string",
            Bad::Nul => "NUL byte in command",
            Bad::LiteralTooLarge => "Literal too large",
            Bad::UserName => "Invalid user name",
            Bad::IdTooManyFields => "Too many ID fields",
            Bad::IdKeyTooLong => "ID field name too long",
            Bad::IdValueTooLong => "ID field value too long",
            Bad::IdField => "Invalid ID field",
            Bad::Base64 => "Invalid base64 data",
            Bad::SaslPlain => "Invalid SASL PLAIN message",
            Bad::Password => "Invalid password",
            Bad::Aborted => "Authentication aborted",
            Bad::TlsActive => "TLS is already active",
            Bad::StartTlsUnavailable => "STARTTLS is not available",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// How far the framer has looked into the buffer, so that a client sending one byte at a time
/// costs linear, not quadratic, work. Reset to the default whenever bytes are consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Where the current line fragment starts (0, or just after a literal's data).
    line_start: usize,
    /// Bytes before this offset hold no line feed of the current fragment.
    scanned: usize,
}

impl Progress {
    /// Continue at `offset`, the start of a new line fragment.
    pub fn at(offset: usize) -> Progress {
        Progress {
            line_start: offset,
            scanned: offset,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteralKind {
    /// `{n}`: the client waits for our `+` before sending the data.
    Synchronizing,
    /// `{n+}` (LITERAL+): the data follows at once.
    NonSynchronizing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLong {
    /// A line, or the whole command, went past its cap. One kind for both: which cap a
    /// client hits first can depend on how its bytes were split into reads.
    Command,
    /// A LITERAL+ announced more than we take.
    Literal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole command is `buf[..len]`.
    Complete(usize),
    /// A literal header ends at `header_end`; its `size` bytes of data follow from there.
    Literal {
        header_end: usize,
        size: usize,
        kind: LiteralKind,
    },
    /// More input is needed; call again with this progress.
    Incomplete(Progress),
    /// A synchronizing literal over the cap: refuse the command up to `header_end`; the client
    /// will not send the data since it gets no `+`.
    LiteralTooLarge { header_end: usize },
    /// The client went past a cap in a way we cannot recover from.
    TooLong(TooLong),
}

struct Limits {
    line: usize,
    command: usize,
}

/// An `ID` command may be longer than the others; the first line says which it is.
fn limits(buf: &[u8]) -> Limits {
    let head = buf.get(..TAG_MAX + " ID ".len()).unwrap_or(buf);
    let mut words = head.splitn(3, |&b| b == b' ');
    let _tag = words.next();
    let is_id =
        words.next().is_some_and(|w| w.eq_ignore_ascii_case(b"ID")) && words.next().is_some();
    if is_id {
        Limits {
            line: ID_LINE_MAX,
            command: ID_COMMAND_MAX,
        }
    } else {
        Limits {
            line: LINE_MAX,
            command: COMMAND_MAX,
        }
    }
}

/// The line `[line_start, lf)` without its optional CR.
fn line_content(buf: &[u8], line_start: usize, lf: usize) -> &[u8] {
    let line = buf.get(line_start..lf).unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Where the next command ends. A line feed ends a line (a preceding CR is optional, as in
/// Dovecot); a line that ends in `{n}` or `{n+}` continues after `n` bytes of literal data.
pub fn command_frame(buf: &[u8], progress: Progress) -> Frame {
    let limits = limits(buf);
    let Progress {
        line_start,
        scanned,
    } = progress;
    // Literal data announced earlier has not all arrived yet.
    let Some(unscanned) = buf.get(scanned..) else {
        return Frame::Incomplete(progress);
    };
    let Some(offset) = unscanned.iter().position(|&b| b == b'\n') else {
        return if buf.len().saturating_sub(line_start) > limits.line + 1
            || buf.len() > limits.command
        {
            Frame::TooLong(TooLong::Command)
        } else {
            Frame::Incomplete(Progress {
                line_start,
                scanned: buf.len(),
            })
        };
    };
    let lf = scanned + offset;
    let content = line_content(buf, line_start, lf);
    let end = lf + 1;
    if content.len() > limits.line || end > limits.command {
        return Frame::TooLong(TooLong::Command);
    }
    let Some((size, kind)) = literal_header(content) else {
        return Frame::Complete(end);
    };
    let fits = size.is_some_and(|n| n <= LITERAL_MAX && end + n <= limits.command);
    match (size, kind) {
        (Some(size), kind) if fits => Frame::Literal {
            header_end: end,
            size,
            kind,
        },
        (_, LiteralKind::Synchronizing) => Frame::LiteralTooLarge { header_end: end },
        (_, LiteralKind::NonSynchronizing) => Frame::TooLong(TooLong::Literal),
    }
}

/// `{digits}` or `{digits+}` at the end of a line: the declared size (`None` when it does not
/// fit a `usize`) and the kind.
fn literal_header(content: &[u8]) -> Option<(Option<usize>, LiteralKind)> {
    let inner = content.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let inner = inner.get(open + 1..)?;
    let (digits, kind) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, LiteralKind::NonSynchronizing),
        None => (inner, LiteralKind::Synchronizing),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((number(digits), kind))
}

/// A decimal number, `None` if it does not fit.
fn number(digits: &[u8]) -> Option<usize> {
    digits.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFrame {
    /// A line: its content is `buf[..content_end]`, `len` bytes with the line ending.
    Complete {
        content_end: usize,
        len: usize,
    },
    Incomplete(Progress),
    TooLong,
}

/// One plain line (an AUTHENTICATE response), no literals.
pub fn line_frame(buf: &[u8], progress: Progress) -> LineFrame {
    let scanned = progress.scanned;
    let unscanned = buf.get(scanned..).unwrap_or_default();
    match unscanned.iter().position(|&b| b == b'\n') {
        None if buf.len() > LINE_MAX + 1 => LineFrame::TooLong,
        None => LineFrame::Incomplete(Progress {
            line_start: 0,
            scanned: buf.len(),
        }),
        Some(offset) => {
            let lf = scanned + offset;
            let content = line_content(buf, 0, lf);
            if content.len() > LINE_MAX {
                LineFrame::TooLong
            } else {
                LineFrame::Complete {
                    content_end: content.len(),
                    len: lf + 1,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// The command names we tell apart before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Capability,
    Noop,
    Logout,
    StartTls,
    Login,
    Authenticate,
    Id,
    /// A command that is valid only after login: `NO Not logged in`.
    NeedsAuth,
    Unknown,
}

const NEEDS_AUTH: &[&str] = &[
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "STATUS",
    "APPEND",
    "CHECK",
    "CLOSE",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "IDLE",
    "ENABLE",
    "NAMESPACE",
    "UNSELECT",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "GETACL",
    "SETACL",
    "DELETEACL",
    "LISTRIGHTS",
    "MYRIGHTS",
    "GETMETADATA",
    "SETMETADATA",
    "SORT",
    "THREAD",
    "COMPRESS",
    "NOTIFY",
];

impl Name {
    fn from_atom(atom: &[u8]) -> Name {
        const NAMES: &[(&str, Name)] = &[
            ("CAPABILITY", Name::Capability),
            ("NOOP", Name::Noop),
            ("LOGOUT", Name::Logout),
            ("STARTTLS", Name::StartTls),
            ("LOGIN", Name::Login),
            ("AUTHENTICATE", Name::Authenticate),
            ("ID", Name::Id),
        ];
        if let Some((_, name)) = NAMES
            .iter()
            .find(|(text, _)| atom.eq_ignore_ascii_case(text.as_bytes()))
        {
            *name
        } else if NEEDS_AUTH
            .iter()
            .any(|text| atom.eq_ignore_ascii_case(text.as_bytes()))
        {
            Name::NeedsAuth
        } else {
            Name::Unknown
        }
    }

    /// A command that carries credentials (refused before STARTTLS).
    pub fn is_login(self) -> bool {
        matches!(self, Name::Login | Name::Authenticate)
    }

    /// A pre-auth command with string arguments, which may come as literals.
    pub fn takes_strings(self) -> bool {
        matches!(self, Name::Login | Name::Id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    Login,
    Unsupported,
}

pub type Secret = Zeroizing<Vec<u8>>;

#[derive(Debug)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    Login {
        username: String,
        password: Secret,
    },
    Authenticate {
        mechanism: SaslMechanism,
        /// Decoded SASL-IR (`=` is the empty response).
        initial_response: Option<Secret>,
    },
    /// `ID NIL` is the empty list.
    Id(Vec<(String, Option<String>)>),
    NeedsAuth,
}

/// A command with a usable tag; the arguments may still be wrong.
#[derive(Debug)]
pub struct Tagged {
    pub tag: String,
    pub name: Name,
    pub args: Result<Command, Bad>,
}

/// The tag and command name at the start of a (possibly partial) command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub tag: String,
    pub name: Name,
}

/// Parse the tag and name; `None` when there is no usable tag.
pub fn head(buf: &[u8]) -> Option<Head> {
    let mut cursor = Cursor::new(buf);
    let tag = cursor.tag()?;
    let name = if cursor.expect(b' ').is_ok() {
        cursor.atom().map_or(Name::Unknown, Name::from_atom)
    } else {
        Name::Unknown
    };
    Some(Head { tag, name })
}

/// Parse one complete frame from [`command_frame`].
///
/// # Errors
/// `Err` when the command has no usable tag (answered with an untagged `* BAD`).
pub fn command(frame: &[u8]) -> Result<Tagged, Bad> {
    let mut cursor = Cursor::new(frame);
    let tag = cursor.tag().ok_or(Bad::Tag)?;
    let name = if cursor.expect(b' ').is_ok() {
        cursor.atom().map_or(Name::Unknown, Name::from_atom)
    } else {
        return Ok(Tagged {
            tag,
            name: Name::Unknown,
            args: Err(cursor.error()),
        });
    };
    let args = if frame.contains(&0) {
        Err(Bad::Nul)
    } else {
        arguments(&mut cursor, name)
    };
    Ok(Tagged { tag, name, args })
}

fn arguments(c: &mut Cursor<'_>, name: Name) -> Result<Command, Bad> {
    match name {
        Name::Capability => c.end().map(|()| Command::Capability),
        Name::Noop => c.end().map(|()| Command::Noop),
        Name::Logout => c.end().map(|()| Command::Logout),
        Name::StartTls => c.end().map(|()| Command::StartTls),
        Name::Login => {
            c.expect(b' ')?;
            let username = c.astring()?;
            c.expect(b' ')?;
            let password = c.astring()?;
            c.end()?;
            Ok(Command::Login {
                username: user_name(&username)?,
                password,
            })
        }
        Name::Authenticate => {
            c.expect(b' ')?;
            let mechanism = c.atom()?;
            let initial = if c.peek() == Some(b' ') {
                c.expect(b' ')?;
                Some(c.base64_token()?)
            } else {
                None
            };
            c.end()?;
            let mechanism = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
                SaslMechanism::Plain
            } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
                SaslMechanism::Login
            } else {
                SaslMechanism::Unsupported
            };
            let initial_response = match (mechanism, initial) {
                (SaslMechanism::Unsupported, _) | (_, None) => None,
                (_, Some(b"=")) => Some(Zeroizing::new(Vec::new())),
                (_, Some(token)) => Some(base64(token)?),
            };
            Ok(Command::Authenticate {
                mechanism,
                initial_response,
            })
        }
        Name::Id => {
            c.expect(b' ')?;
            let fields = id_fields(c)?;
            c.end()?;
            Ok(Command::Id(fields))
        }
        Name::NeedsAuth => Ok(Command::NeedsAuth),
        Name::Unknown => Err(Bad::UnknownCommand),
    }
}

/// `NIL` or `"(" [string SP nstring *(SP string SP nstring)] ")"` (RFC 2971; we also take the
/// empty list), within Dovecot's limits.
fn id_fields(c: &mut Cursor<'_>) -> Result<Vec<(String, Option<String>)>, Bad> {
    let mut fields = Vec::new();
    if c.nil() {
        return Ok(fields);
    }
    c.expect(b'(')?;
    if c.peek() == Some(b')') {
        c.expect(b')')?;
        return Ok(fields);
    }
    loop {
        if fields.len() == ID_FIELDS_MAX {
            return Err(Bad::IdTooManyFields);
        }
        let key = c.string()?;
        if key.len() > ID_KEY_MAX {
            return Err(Bad::IdKeyTooLong);
        }
        c.expect(b' ')?;
        let value = if c.nil() { None } else { Some(c.string()?) };
        if value.as_ref().is_some_and(|v| v.len() > ID_VALUE_MAX) {
            return Err(Bad::IdValueTooLong);
        }
        fields.push((
            id_text(&key)?,
            value.as_deref().map(|v| id_text(v)).transpose()?,
        ));
        match c.peek() {
            Some(b')') => {
                c.expect(b')')?;
                return Ok(fields);
            }
            _ => c.expect(b' ')?,
        }
    }
}

/// ID fields go on to the backend: UTF-8 without control characters.
fn id_text(bytes: &[u8]) -> Result<String, Bad> {
    printable_utf8(bytes).ok_or(Bad::IdField)
}

/// A user name: UTF-8 without control characters (they could only come in a literal, and no
/// account has them; refusing them keeps logs and backend commands clean).
pub fn user_name(bytes: &[u8]) -> Result<String, Bad> {
    printable_utf8(bytes).ok_or(Bad::UserName)
}

fn printable_utf8(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    (!text.chars().any(char::is_control)).then(|| text.to_owned())
}

/// Standard base64 with padding, as SASL (RFC 4959) uses; decoded into zeroizing memory.
///
/// # Errors
/// [`Bad::Base64`] when the text is not canonical base64.
pub fn base64(text: &[u8]) -> Result<Secret, Bad> {
    let engine = &base64::engine::general_purpose::STANDARD;
    // Reserve the whole estimate first so decoding never reallocates (and leaves no copy).
    let mut out = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(text.len())));
    engine.decode_vec(text, &mut out).map_err(|_| Bad::Base64)?;
    Ok(out)
}

/// A SASL PLAIN message (RFC 4616): `[authzid] NUL authcid NUL passwd`.
pub struct Plain {
    pub authzid: Option<String>,
    pub username: String,
    pub password: Secret,
}

/// # Errors
/// [`Bad::SaslPlain`] unless there are exactly three fields, a non-empty user name and
/// password, and UTF-8 identities.
pub fn sasl_plain(message: &[u8]) -> Result<Plain, Bad> {
    let mut fields = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(Bad::SaslPlain);
    };
    if authcid.is_empty() || passwd.is_empty() {
        return Err(Bad::SaslPlain);
    }
    let username = user_name(authcid).map_err(|_| Bad::SaslPlain)?;
    let authzid = match authzid {
        [] => None,
        id => Some(user_name(id).map_err(|_| Bad::SaslPlain)?),
    };
    Ok(Plain {
        authzid,
        username,
        password: Zeroizing::new(passwd.to_vec()),
    })
}

/// The password of AUTHENTICATE LOGIN: any octets but NUL (which no string we could hand to
/// the backend can carry).
///
/// # Errors
/// [`Bad::Password`] when it holds a NUL.
pub fn sasl_password(password: Secret) -> Result<Secret, Bad> {
    if password.contains(&0) {
        Err(Bad::Password)
    } else {
        Ok(password)
    }
}

fn is_atom_char(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
}

/// A position in one frame; every method refuses rather than reads past the end.
struct Cursor<'a> {
    frame: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(frame: &'a [u8]) -> Cursor<'a> {
        Cursor { frame, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.frame.get(self.pos).copied()
    }

    fn rest(&self) -> &'a [u8] {
        self.frame.get(self.pos..).unwrap_or_default()
    }

    /// The error for an unexpected byte at the current position.
    fn error(&self) -> Bad {
        match self.peek() {
            Some(b) if b >= 0x80 => Bad::EightBit,
            Some(0) => Bad::Nul,
            _ => Bad::Syntax,
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), Bad> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error())
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let rest = self.rest();
        let n = rest.iter().position(|&b| !f(b)).unwrap_or(rest.len());
        self.pos += n;
        rest.get(..n).unwrap_or_default()
    }

    fn tag(&mut self) -> Option<String> {
        let tag = self.take_while(is_tag_char);
        if tag.is_empty() || tag.len() > TAG_MAX {
            return None;
        }
        std::str::from_utf8(tag).ok().map(str::to_owned)
    }

    fn atom(&mut self) -> Result<&'a [u8], Bad> {
        match self.take_while(is_atom_char) {
            [] => Err(self.error()),
            atom => Ok(atom),
        }
    }

    fn base64_token(&mut self) -> Result<&'a [u8], Bad> {
        match self.take_while(is_base64_char) {
            [] => Err(self.error()),
            token => Ok(token),
        }
    }

    /// `NIL`, consumed if present.
    fn nil(&mut self) -> bool {
        let is_nil = self
            .rest()
            .get(..3)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"NIL"))
            && !self.rest().get(3).copied().is_some_and(is_atom_char);
        if is_nil {
            self.pos += 3;
        }
        is_nil
    }

    fn astring(&mut self) -> Result<Secret, Bad> {
        match self.peek() {
            Some(b'"' | b'{') => self.string(),
            _ => match self.take_while(is_astring_char) {
                [] => Err(self.error()),
                atom => Ok(Zeroizing::new(atom.to_vec())),
            },
        }
    }

    fn string(&mut self) -> Result<Secret, Bad> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal().map(|data| Zeroizing::new(data.to_vec())),
            _ => Err(self.error()),
        }
    }

    /// A quoted string: `\"` and `\\` are the only escapes; CR, LF and NUL are not allowed;
    /// 8-bit bytes are (passwords, UTF-8).
    fn quoted(&mut self) -> Result<Secret, Bad> {
        self.expect(b'"')?;
        let body = self.rest();
        // First pass: validate and measure, so the value is allocated once (no stray copies).
        let mut i = 0;
        let mut len = 0;
        loop {
            match body.get(i) {
                None | Some(b'\r' | b'\n') => return Err(Bad::Syntax),
                Some(0) => return Err(Bad::Nul),
                Some(b'"') => break,
                Some(b'\\') => match body.get(i + 1) {
                    Some(b'"' | b'\\') => i += 2,
                    _ => return Err(Bad::Syntax),
                },
                Some(_) => i += 1,
            }
            len += 1;
        }
        let mut value = Zeroizing::new(Vec::with_capacity(len));
        let mut escaped = false;
        for &b in body.get(..i).unwrap_or_default() {
            if b == b'\\' && !escaped {
                escaped = true;
            } else {
                value.push(b);
                escaped = false;
            }
        }
        self.pos += i + 1;
        Ok(value)
    }

    /// `{n}` or `{n+}`, a line ending, then `n` bytes.
    fn literal(&mut self) -> Result<&'a [u8], Bad> {
        self.expect(b'{')?;
        let digits = self.take_while(|b| b.is_ascii_digit());
        let size = number(digits)
            .filter(|_| !digits.is_empty())
            .ok_or(Bad::Syntax)?;
        if self.peek() == Some(b'+') {
            self.pos += 1;
        }
        self.expect(b'}')?;
        if self.peek() == Some(b'\r') {
            self.pos += 1;
        }
        self.expect(b'\n')?;
        let data = self.rest().get(..size).ok_or(Bad::Syntax)?;
        self.pos += size;
        Ok(data)
    }

    /// The line ending, and nothing after it.
    fn end(&mut self) -> Result<(), Bad> {
        if self.peek() == Some(b'\r') {
            self.pos += 1;
        }
        self.expect(b'\n')?;
        if self.rest().is_empty() {
            Ok(())
        } else {
            Err(Bad::Syntax)
        }
    }
}

/// Property tests ("fuzz"): random and near-valid client input for the framer and the parser.
/// The generators are shared with the session's property tests.
#[cfg(test)]
pub(crate) mod prop_tests {
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;

    use super::*;

    pub(crate) use crate::prop_support::config;

    /// `bytes` cut at the given points, empty pieces left out.
    pub(crate) fn pieces<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .filter_map(|w| match *w {
                [a, b] => bytes.get(a..b),
                _ => None,
            })
            .collect()
    }

    /// Cut points for [`pieces`].
    pub(crate) fn cuts() -> impl Strategy<Value = Vec<Index>> {
        prop::collection::vec(any::<Index>(), 0..24)
    }

    /// A literal size: small, near the caps, or absurd.
    fn literal_size() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0usize..16).prop_map(|n| n.to_string()),
            1 => (LITERAL_MAX - 2..LITERAL_MAX + 3).prop_map(|n| n.to_string()),
            1 => (COMMAND_MAX - 4..COMMAND_MAX + 4).prop_map(|n| n.to_string()),
            1 => Just("18446744073709551616".to_owned()),
            1 => Just("0000000000000000000000000007".to_owned()),
            1 => Just(String::new()),
        ]
    }

    /// One token of near-valid IMAP client input.
    fn token() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "LOGIN", "login", "AUTHENTICATE", "ID", "CAPABILITY", "NOOP", "LOGOUT",
                "STARTTLS", "SELECT", "PLAIN", "LOGIN", "Plain", "NIL", "nil", "(", ")", "()",
                "\"", "\\", "*", "=", "+", "a1", "A001", "tag", "{", "}", "{5}", "{3+}",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            3 => prop::sample::select(vec![" ", "  ", "\r\n", "\n", "\r", "\0", "\x7f"])
                .prop_map(|s| s.as_bytes().to_vec()),
            2 => (literal_size(), any::<bool>())
                .prop_map(|(n, plus)| format!("{{{n}{}}}\r\n", if plus { "+" } else { "" })
                    .into_bytes()),
            2 => prop::collection::vec(any::<u8>(), 0..12),
            1 => "[A-Za-z0-9+/]{0,24}={0,2}".prop_map(String::into_bytes),
            1 => "\"([^\"\\\\\r\n]|\\\\[\"\\\\]){0,12}\"".prop_map(String::into_bytes),
            1 => (any::<u8>(), prop_oneof![0usize..100, TAG_MAX - 2..TAG_MAX + 3,
                    LINE_MAX - 3..LINE_MAX + 4])
                .prop_map(|(b, n)| vec![b; n]),
        ]
    }

    /// Token soup: command words, arguments, literal headers and line ends mixed with random
    /// bytes.
    fn soup() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(token(), 0..48).prop_map(|tokens| tokens.concat())
    }

    /// A line ending, mostly a proper one.
    fn eol() -> impl Strategy<Value = &'static [u8]> {
        prop_oneof![
            6 => Just(&b"\r\n"[..]),
            2 => Just(&b"\n"[..]),
            1 => Just(&b"\r"[..]),
            1 => Just(&b""[..]),
        ]
    }

    /// A literal with its data; the declared size is sometimes not the size sent.
    fn literal() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(any::<u8>(), 0..24),
            any::<bool>(),
            eol(),
            prop_oneof![8 => Just(0i64), 1 => -3i64..4, 1 => Just(LITERAL_MAX as i64)],
        )
            .prop_map(|(data, plus, eol, delta)| {
                let size = (data.len() as i64 + delta).max(0);
                let plus = if plus { "+" } else { "" };
                [format!("{{{size}{plus}}}").as_bytes(), eol, &data].concat()
            })
    }

    /// One argument of a pre-auth command.
    fn argument() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => "[A-Za-z0-9@._-]{1,16}".prop_map(String::into_bytes),
            2 => (prop::collection::vec(any::<u8>(), 0..16), form(), any::<bool>())
                .prop_map(|(v, f, crlf)| astring(&v, f, crlf)),
            2 => literal(),
            1 => "[A-Za-z0-9+/]{0,24}={0,2}".prop_map(String::into_bytes),
            1 => Just(b"=".to_vec()),
            1 => Just(b"NIL".to_vec()),
            1 => prop::collection::vec("\"[a-z]{1,8}\" (\"[a-z ]{0,8}\"|NIL)", 0..4)
                .prop_map(|pairs| format!("({})", pairs.join(" ")).into_bytes()),
            1 => token(),
        ]
    }

    /// A command line as a client might send it, with a random token slipped in now and
    /// then; or an AUTHENTICATE response line.
    fn command_like() -> impl Strategy<Value = Vec<u8>> {
        let tag = prop_oneof![
            8 => "[A-Za-z0-9.]{1,8}",
            1 => "[a-z]{65,70}",
            1 => Just(String::new()),
            1 => Just("*".to_owned()),
        ];
        let name = prop::sample::select(vec![
            "LOGIN",
            "login",
            "AUTHENTICATE",
            "ID",
            "CAPABILITY",
            "NOOP",
            "LOGOUT",
            "STARTTLS",
            "SELECT",
            "FETCH",
            "XYZZY",
            "",
        ]);
        let mechanism = prop::sample::select(vec!["PLAIN", "LOGIN", "plain", "CRAM-MD5"]);
        let command = (
            tag,
            name,
            mechanism,
            prop::collection::vec(argument(), 0..4),
            eol(),
        )
            .prop_map(|(tag, name, mechanism, args, eol)| {
                let mut line = format!("{tag} {name}").into_bytes();
                if name == "AUTHENTICATE" {
                    line.push(b' ');
                    line.extend_from_slice(mechanism.as_bytes());
                }
                for arg in args {
                    line.push(b' ');
                    line.extend_from_slice(&arg);
                }
                line.extend_from_slice(eol);
                line
            });
        let response = (
            prop_oneof![
                3 => prop::collection::vec(any::<u8>(), 0..24)
                    .prop_map(|v| base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD, v).into_bytes()),
                1 => Just(b"*".to_vec()),
                1 => "[A-Za-z0-9+/= ]{0,12}".prop_map(String::into_bytes),
            ],
            eol(),
        )
            .prop_map(|(line, eol)| [&line[..], eol].concat());
        prop_oneof![
            6 => valid_command(),
            4 => command,
            1 => response,
            1 => (command_noise(), token()).prop_map(|((mut line, at), junk)| {
                let at = at.index(line.len() + 1);
                line.splice(at..at, junk);
                line
            }),
        ]
    }

    /// A well-formed pre-auth command (so that sessions get past the first few lines).
    fn valid_command() -> impl Strategy<Value = Vec<u8>> {
        let b64 =
            |data: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, data);
        (
            "[A-Za-z0-9.]{1,8}",
            0u8..16,
            user(),
            password(),
            (form(), form()),
            eol(),
        )
            .prop_map(move |(tag, kind, user, password, forms, eol)| {
                let plain = [b"\0", user.as_bytes(), b"\0", &password].concat();
                let eol = if eol.is_empty() { &b"\r\n"[..] } else { eol };
                let crlf = eol == b"\r\n";
                let body: Vec<u8> = match kind {
                    0..=2 => b"NOOP".to_vec(),
                    3 | 4 => b"CAPABILITY".to_vec(),
                    5..=7 => [
                        &b"LOGIN "[..],
                        &astring(user.as_bytes(), forms.0, crlf),
                        b" ",
                        &astring(&password, forms.1, crlf),
                    ]
                    .concat(),
                    8 => {
                        format!("ID (\"name\" \"{}\")", user.replace(['"', '\\'], "")).into_bytes()
                    }
                    9 => b"ID NIL".to_vec(),
                    10 => format!("AUTHENTICATE PLAIN {}", b64(&plain)).into_bytes(),
                    11 => [b"AUTHENTICATE PLAIN", eol, b64(&plain).as_bytes()].concat(),
                    12 => [
                        b"AUTHENTICATE LOGIN",
                        eol,
                        b64(user.as_bytes()).as_bytes(),
                        eol,
                        b64(&password).as_bytes(),
                    ]
                    .concat(),
                    13 => b"LOGOUT".to_vec(),
                    14 => b"STARTTLS".to_vec(),
                    _ => b"SELECT INBOX".to_vec(),
                };
                [tag.as_bytes(), b" ", &body, eol].concat()
            })
    }

    fn command_noise() -> impl Strategy<Value = (Vec<u8>, Index)> {
        (
            "[A-Za-z0-9]{1,4} (LOGIN|AUTHENTICATE PLAIN|ID|NOOP) [a-z]{0,8}\r\n",
            any::<Index>(),
        )
            .prop_map(|(line, at)| (line.into_bytes(), at))
    }

    /// Near-valid client input: mostly sequences of command-like lines, sometimes token soup.
    pub(crate) fn imap_noise() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::collection::vec(command_like(), 0..12).prop_map(|lines| lines.concat()),
            1 => soup(),
        ]
    }

    /// A user name the parser accepts: UTF-8 without control characters.
    pub(crate) fn user() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z][a-z0-9._-]{0,20}@example\\.com", "[^\\p{Cc}]{0,24}",]
    }

    /// A password: any bytes but NUL, long enough not to turn up in a dump by chance.
    pub(crate) fn password() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(1u8..=255, 8..48)
    }

    /// A string argument in every form the grammar allows for it.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Form {
        Atom,
        Quoted,
        Literal,
        LiteralPlus,
    }

    pub(crate) fn form() -> impl Strategy<Value = Form> {
        prop::sample::select(vec![
            Form::Atom,
            Form::Quoted,
            Form::Literal,
            Form::LiteralPlus,
        ])
    }

    /// `value` as an astring in `form`, or as the closest form that can carry it (an atom
    /// needs atom characters, a quoted string no CR, LF or NUL).
    pub(crate) fn astring(value: &[u8], form: Form, crlf: bool) -> Vec<u8> {
        let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let atom_ok = !value.is_empty() && value.iter().all(|&b| is_astring_char(b));
        let quoted_ok = !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0));
        match form {
            Form::Atom if atom_ok => value.to_vec(),
            Form::Atom | Form::Quoted if quoted_ok => {
                let mut out = vec![b'"'];
                for &b in value {
                    if b == b'"' || b == b'\\' {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'"');
                out
            }
            Form::LiteralPlus => [format!("{{{}+}}", value.len()).as_bytes(), eol, value].concat(),
            _ => [format!("{{{}}}", value.len()).as_bytes(), eol, value].concat(),
        }
    }

    /// Frame from the start of `buf` the way the session does (following literals), with
    /// `progress` carried over from earlier calls. The literals seen and how it ended.
    fn drive(buf: &[u8], progress: &mut Progress, literals: &mut Vec<(usize, usize)>) -> Frame {
        loop {
            match command_frame(buf, *progress) {
                Frame::Literal {
                    header_end, size, ..
                } => {
                    literals.push((header_end, size));
                    *progress = Progress::at(header_end + size);
                }
                Frame::Incomplete(next) => {
                    *progress = next;
                    return Frame::Incomplete(next);
                }
                end => return end,
            }
        }
    }

    /// Everything `debug` shows of `secret`, as text or as a list of numbers.
    pub(crate) fn shows(debug: &str, secret: &[u8]) -> bool {
        let numbers = format!("{secret:?}");
        let inner = numbers.trim_start_matches('[').trim_end_matches(']');
        let escaped = secret.escape_ascii().to_string();
        debug.contains(inner)
            || debug.contains(&escaped)
            || std::str::from_utf8(secret).is_ok_and(|s| debug.contains(s))
    }

    proptest! {
        #![proptest_config(config(2048))]

        /// No panic on any input, and every answer stays inside the buffer and the caps.
        #[test]
        fn framing_and_parsing_never_panic(buf in imap_noise()) {
            match command_frame(&buf, Progress::default()) {
                Frame::Complete(len) => {
                    prop_assert!(len <= buf.len() && len <= ID_COMMAND_MAX);
                    prop_assert_eq!(buf.get(len - 1), Some(&b'\n'));
                    let _ = command(buf.get(..len).unwrap_or_default());
                }
                Frame::Literal { header_end, size, .. } => {
                    prop_assert!(header_end <= buf.len() && size <= LITERAL_MAX);
                }
                Frame::LiteralTooLarge { header_end } => prop_assert!(header_end <= buf.len()),
                Frame::Incomplete(_) => prop_assert!(buf.len() <= ID_COMMAND_MAX),
                Frame::TooLong(_) => {}
            }
            if let LineFrame::Complete { content_end, len } =
                line_frame(&buf, Progress::default())
            {
                prop_assert!(content_end < len && len <= buf.len() && content_end <= LINE_MAX);
            }
            let _ = command(&buf);
            let _ = head(&buf);
            let _ = user_name(&buf);
            let _ = base64(&buf);
            let _ = sasl_plain(&buf);
        }

        /// Framing a buffer as it grows, with the progress carried over, finds what framing
        /// the whole buffer at once finds.
        #[test]
        fn framing_does_not_depend_on_how_bytes_arrive(buf in imap_noise(), cuts in cuts()) {
            let mut whole_literals = Vec::new();
            let whole = drive(&buf, &mut Progress::default(), &mut whole_literals);
            let mut progress = Progress::default();
            let mut literals = Vec::new();
            let mut end = 0;
            let mut last = Frame::Incomplete(progress);
            for piece in pieces(&buf, &cuts) {
                end += piece.len();
                last = drive(buf.get(..end).unwrap_or_default(), &mut progress, &mut literals);
                if !matches!(last, Frame::Incomplete(_)) {
                    break;
                }
            }
            prop_assert_eq!(literals, whole_literals);
            match (last, whole) {
                (Frame::Incomplete(_), Frame::Incomplete(_)) => {}
                (last, whole) => prop_assert_eq!(last, whole),
            }
        }

        /// `LOGIN` with any user name and password, in any string form, parses back to them;
        /// its `Debug` never shows the password.
        #[test]
        fn login_round_trips(
            tag in "[A-Za-z0-9.]{1,64}",
            user in user(),
            password in password(),
            forms in (form(), form()),
            crlf in any::<bool>(),
        ) {
            let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let line = [
                tag.as_bytes(),
                b" LOGIN ",
                &astring(user.as_bytes(), forms.0, crlf),
                b" ",
                &astring(&password, forms.1, crlf),
                eol,
            ]
            .concat();
            let mut progress = Progress::default();
            let frame = drive(&line, &mut progress, &mut Vec::new());
            prop_assert_eq!(frame, Frame::Complete(line.len()));
            let tagged = command(&line).map_err(|bad| TestCaseError::fail(bad.text()))?;
            prop_assert!(!shows(&format!("{tagged:?}"), &password), "{:?}", tagged);
            prop_assert_eq!(&tagged.tag, &tag);
            match tagged.args {
                Ok(Command::Login { username, password: parsed }) => {
                    prop_assert_eq!(username, user);
                    prop_assert_eq!(parsed.as_slice(), password.as_slice());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// `AUTHENTICATE PLAIN` with an initial response decodes to the same identities and
        /// password; `Debug` shows no password.
        #[test]
        fn authenticate_plain_round_trips(
            authzid in prop_oneof![Just(String::new()), user()],
            user in user().prop_filter("non-empty", |u| !u.is_empty()),
            password in password().prop_map(|p| p.into_iter().map(|b| b.max(1)).collect::<Vec<u8>>()),
        ) {
            use base64::Engine as _;
            let message = [authzid.as_bytes(), b"\0", user.as_bytes(), b"\0", &password].concat();
            let encoded = base64::engine::general_purpose::STANDARD.encode(&message);
            let line = format!("a AUTHENTICATE PLAIN {encoded}\r\n");
            let tagged = command(line.as_bytes()).map_err(|bad| TestCaseError::fail(bad.text()))?;
            prop_assert!(!shows(&format!("{tagged:?}"), &password), "{:?}", tagged);
            let Ok(Command::Authenticate { mechanism: SaslMechanism::Plain, initial_response: Some(ir) }) = tagged.args else {
                return Err(TestCaseError::fail(format!("{:?}", tagged.args)));
            };
            prop_assert_eq!(ir.as_slice(), message.as_slice());
            let plain = sasl_plain(&ir).map_err(|bad| TestCaseError::fail(bad.text()))?;
            prop_assert_eq!(plain.username, user);
            prop_assert_eq!(plain.authzid.unwrap_or_default(), authzid);
            prop_assert_eq!(plain.password.as_slice(), password.as_slice());
        }

        /// Base64 decodes what standard base64 encodes, and nothing that is not canonical.
        #[test]
        fn base64_round_trips(data in prop::collection::vec(any::<u8>(), 0..64)) {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
            let decoded = base64(encoded.as_bytes()).map_err(|bad| TestCaseError::fail(bad.text()))?;
            prop_assert_eq!(decoded.as_slice(), data.as_slice());
            let debug = format!("{:?}", base64(encoded.as_bytes()));
            prop_assert!(data.len() < 8 || !shows(&debug, &data), "{}", debug);
        }
    }
}
