//! Every SMTP reply mailgate writes before the splice, in one place: the fixed replies of the
//! pre-auth session and `login_reply`, the SMTP column of DESIGN.md's decision table.
//!
//! Replies are typed values (`Reply`) encoded by one function, which also keeps operator text
//! from breaking the protocol: control characters (CR and LF above all) become spaces and an
//! overlong text is cut so the line stays within RFC 5321's 512 octets.

use std::borrow::Cow;

use crate::config::{Messages, Protocol};
use crate::login::{message, LoginResult};

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF.
pub const REPLY_LINE_MAX: usize = 512;

/// The pre-auth timeout expired. No host name: the 421 text is free-form (RFC 5321 §4.2 only
/// fixes the domain in the greeting and the EHLO reply), and a const is easier for the driver.
pub const REPLY_TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
/// The server is draining (SIGTERM) and closes a session that has not logged in yet.
pub const REPLY_SHUTDOWN: &[u8] = b"421 4.3.2 Service shutting down\r\n";

/// One reply line: `<code> [<enhanced>] <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    pub code: u16,
    /// RFC 3463 enhanced status code, e.g. `5.7.8`; empty for replies that carry none (the
    /// greeting, `334` continuations).
    pub enhanced: &'static str,
    pub text: Cow<'a, str>,
}

impl Reply<'static> {
    pub const fn fixed(code: u16, enhanced: &'static str, text: &'static str) -> Reply<'static> {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }
}

impl Reply<'_> {
    /// Appends the reply line, CRLF-terminated, sanitised and at most `REPLY_LINE_MAX` octets.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(self.code.to_string().as_bytes());
        out.push(b' ');
        if !self.enhanced.is_empty() {
            out.extend_from_slice(self.enhanced.as_bytes());
            out.push(b' ');
        }
        let room = REPLY_LINE_MAX.saturating_sub(out.len() - start + 2);
        push_sanitised(out, &self.text, room);
        out.extend_from_slice(b"\r\n");
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }
}

/// Appends `text` with every control character (CR, LF, TAB, DEL, C1...) turned into a space,
/// cut at a character boundary so at most `room` bytes are added.
fn push_sanitised(out: &mut Vec<u8>, text: &str, room: usize) {
    let mut used = 0;
    let mut utf8 = [0u8; 4];
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        let encoded = c.encode_utf8(&mut utf8).as_bytes();
        if used + encoded.len() > room {
            break;
        }
        out.extend_from_slice(encoded);
        used += encoded.len();
    }
}

/// Sent instead of the greeting to a client that talks before it (a spam-bot trait): RFC 5321
/// §3.1 allows a 554 opening reply; the driver then closes.
pub fn early_talker() -> &'static [u8] {
    b"554 5.5.1 Protocol error: data sent before the greeting\r\n"
}

// The pre-auth session's own replies.
pub const OK: Reply<'static> = Reply::fixed(250, "2.0.0", "OK");
pub const BYE: Reply<'static> = Reply::fixed(221, "2.0.0", "Bye");
pub const READY_TO_START_TLS: Reply<'static> = Reply::fixed(220, "2.0.0", "Ready to start TLS");
pub const HELP: Reply<'static> = Reply::fixed(
    214,
    "2.0.0",
    "Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT; see RFC 5321",
);
/// RFC 5321 §3.5.3: 252 when the server will not verify; says nothing about which users exist.
pub const VRFY: Reply<'static> = Reply::fixed(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
/// RFC 4954 §4: the empty server challenge of PLAIN without an initial response.
pub const CONTINUE: Reply<'static> = Reply::fixed(334, "", "");
/// `Username:` in base64 (the de-facto LOGIN mechanism).
pub const LOGIN_USERNAME: Reply<'static> = Reply::fixed(334, "", "VXNlcm5hbWU6");
/// `Password:` in base64.
pub const LOGIN_PASSWORD: Reply<'static> = Reply::fixed(334, "", "UGFzc3dvcmQ6");

pub const TLS_REQUIRED: Reply<'static> =
    Reply::fixed(530, "5.7.0", "Must issue a STARTTLS command first");
pub const AUTH_REQUIRED: Reply<'static> = Reply::fixed(530, "5.7.0", "Authentication required");
pub const EHLO_FIRST: Reply<'static> = Reply::fixed(503, "5.5.1", "EHLO first");
pub const AUTH_CANCELLED: Reply<'static> = Reply::fixed(501, "5.7.0", "Authentication cancelled");
pub const BAD_BASE64: Reply<'static> = Reply::fixed(501, "5.5.2", "Invalid base64 data");
pub const BAD_SASL: Reply<'static> = Reply::fixed(501, "5.5.2", "Malformed authentication data");
pub const UNKNOWN_MECHANISM: Reply<'static> =
    Reply::fixed(504, "5.5.4", "Unrecognized authentication type");
pub const AUTH_SYNTAX: Reply<'static> =
    Reply::fixed(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]");
pub const EHLO_SYNTAX: Reply<'static> = Reply::fixed(501, "5.5.4", "Syntax: EHLO hostname");
pub const HELO_SYNTAX: Reply<'static> = Reply::fixed(501, "5.5.4", "Syntax: HELO hostname");
pub const NO_PARAMETERS: Reply<'static> =
    Reply::fixed(501, "5.5.4", "Syntax error, no parameters allowed");
pub const STARTTLS_UNAVAILABLE: Reply<'static> =
    Reply::fixed(502, "5.5.1", "STARTTLS not available");
pub const TLS_ALREADY_ACTIVE: Reply<'static> = Reply::fixed(503, "5.5.1", "TLS already active");
pub const EXPN: Reply<'static> = Reply::fixed(502, "5.5.1", "EXPN not available");
pub const REFUSED: Reply<'static> = Reply::fixed(550, "5.7.0", "Command refused");
pub const UNKNOWN_COMMAND: Reply<'static> =
    Reply::fixed(500, "5.5.2", "Syntax error, command unrecognized");
pub const LINE_TOO_LONG: Reply<'static> = Reply::fixed(500, "5.5.6", "Line too long");
pub const BARE_LF: Reply<'static> =
    Reply::fixed(500, "5.5.2", "Syntax error, lines must end with CRLF");
pub const BARE_CR: Reply<'static> = Reply::fixed(500, "5.5.2", "Syntax error, bare CR");
pub const TOO_MANY_ERRORS: Reply<'static> = Reply::fixed(421, "4.7.0", "Too many errors");

/// The reply to an AUTH whose credentials were judged: the SMTP column of DESIGN.md's table.
///
/// Codes are fixed here; texts come from [`crate::login::message`] (operator-configurable,
/// `{help_url}` substituted, shared with IMAP's reply mapper). `TooManyConnections` is a `421`:
/// the driver closes after writing it. `ImapDisabled` cannot come out of an SMTP login; should
/// it, it is reported as what it is, with the SMTP-disabled code.
pub fn login_reply(result: LoginResult, messages: &Messages) -> Vec<u8> {
    let (code, enhanced) = match result {
        LoginResult::Ok => (235, "2.7.0"),
        LoginResult::InvalidCredentials => (535, "5.7.8"),
        LoginResult::AppPasswordRequired => (534, "5.7.9"),
        LoginResult::ImapDisabled | LoginResult::SmtpDisabled | LoginResult::PolicyDenied => {
            (525, "5.7.13")
        }
        LoginResult::TlsRequired => (530, "5.7.0"),
        LoginResult::Throttled | LoginResult::BackendUnavailable => (454, "4.7.0"),
        LoginResult::TooManyConnections => (421, "4.7.0"),
    };
    Reply {
        code,
        enhanced,
        text: Cow::Owned(message(result, Protocol::Smtp, messages)),
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(result: LoginResult) -> String {
        String::from_utf8(login_reply(result, &Messages::default())).unwrap()
    }

    #[test]
    fn login_reply_rows_with_default_messages() {
        let rows = [
            (LoginResult::Ok, "235 2.7.0 Authentication successful\r\n"),
            (
                LoginResult::InvalidCredentials,
                "535 5.7.8 Authentication credentials invalid\r\n",
            ),
            (
                LoginResult::AppPasswordRequired,
                "534 5.7.9 Application-specific password required: \
                 https://example.com/help/app-passwords\r\n",
            ),
            (
                LoginResult::ImapDisabled,
                "525 5.7.13 IMAP access is disabled for this account; \
                 enable it in your mail settings\r\n",
            ),
            (
                LoginResult::SmtpDisabled,
                "525 5.7.13 SMTP access is disabled for this account\r\n",
            ),
            (
                LoginResult::PolicyDenied,
                "525 5.7.13 SMTP access is not allowed by your organisation's policy; \
                 contact your administrator\r\n",
            ),
            (
                LoginResult::TlsRequired,
                "530 5.7.0 Must issue a STARTTLS command first\r\n",
            ),
            (
                LoginResult::Throttled,
                "454 4.7.0 Too many failed logins, try again later\r\n",
            ),
            (
                LoginResult::BackendUnavailable,
                "454 4.7.0 Temporary authentication failure\r\n",
            ),
            (
                LoginResult::TooManyConnections,
                "421 4.7.0 Too many connections for this account\r\n",
            ),
        ];
        assert_eq!(rows.len(), LoginResult::ALL.len());
        for (result, expected) in rows {
            assert_eq!(reply(result), expected, "{result:?}");
        }
    }

    #[test]
    fn operator_text_is_substituted_and_sanitised() {
        let messages = Messages {
            help_url: "https://help.example.com/app\r\nRSET".into(),
            app_password_required: "App password needed\r\n250 fake: {help_url}".into(),
            smtp_invalid_credentials: "認証に失敗しました\n".into(),
            ..Messages::default()
        };
        let app = login_reply(LoginResult::AppPasswordRequired, &messages);
        assert_eq!(
            app,
            b"534 5.7.9 App password needed  250 fake: https://help.example.com/app  RSET\r\n"
        );
        let invalid = login_reply(LoginResult::InvalidCredentials, &messages);
        assert_eq!(invalid, "535 5.7.8 認証に失敗しました \r\n".as_bytes());
    }

    #[test]
    fn overlong_text_is_cut_at_a_char_boundary() {
        let messages = Messages {
            throttled: "あ".repeat(400),
            ..Messages::default()
        };
        let line = login_reply(LoginResult::Throttled, &messages);
        assert!(line.len() <= REPLY_LINE_MAX, "{}", line.len());
        assert!(line.ends_with(b"\r\n"));
        let text = String::from_utf8(line).unwrap();
        assert!(text.starts_with("454 4.7.0 あああ"));
        assert_eq!(text.matches('\n').count(), 1);
    }

    #[test]
    fn fixed_byte_replies_are_well_formed() {
        for bytes in [REPLY_TIMEOUT, REPLY_SHUTDOWN, early_talker()] {
            assert!(bytes.ends_with(b"\r\n"));
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
            assert!(bytes.starts_with(b"421 4.") || bytes.starts_with(b"554 5."));
        }
        assert_eq!(CONTINUE.to_bytes(), b"334 \r\n");
        assert_eq!(LOGIN_USERNAME.to_bytes(), b"334 VXNlcm5hbWU6\r\n");
        assert_eq!(
            TLS_REQUIRED.to_bytes(),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
    }
}
