//! SASL PLAIN (RFC 4616) and LOGIN as SMTP carries them (RFC 4954): base64 lines in, typed
//! credentials out. Decoded secrets live in zeroizing buffers.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

/// The SASL mechanisms mailgate offers to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism named in `AUTH <name>` (case-insensitive), if we offer it.
    pub fn parse(name: &[u8]) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// A client's password: wiped from memory on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn new(password: String) -> Password {
        Password(Zeroizing::new(password))
    }

    /// The password itself, for verification and passthrough backend login only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What the client presented in `AUTH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The authentication identity (PLAIN's authcid, LOGIN's user name), as sent.
    pub username: String,
    pub password: Password,
    /// PLAIN's authorization identity when not empty; the driver decides whether it may differ
    /// from `username` (normally it may not).
    pub authzid: Option<String>,
    /// For the access log and metrics.
    pub mechanism: Mechanism,
}

/// Why a SASL response was not accepted; each maps to one 501 reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaslError {
    /// The client sent `*` (RFC 4954 §4).
    Cancelled,
    /// Not base64.
    Base64,
    /// Base64, but not what the mechanism expects (fields, NULs, UTF-8, control characters).
    Malformed,
}

/// Decodes one client response: `*` cancels, `=` is the empty response, anything else is
/// base64 (surrounding blanks tolerated).
pub(crate) fn decode_response(line: &[u8]) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    let line = line.trim_ascii();
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"=" => Ok(Zeroizing::new(Vec::new())),
        _ => STANDARD
            .decode(line)
            .map(Zeroizing::new)
            .map_err(|_| SaslError::Base64),
    }
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`, exactly two NULs, UTF-8.
pub(crate) fn plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut fields = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Malformed);
    };
    let authzid = identity(authzid)?;
    Ok(Credentials {
        username: identity(authcid)?,
        password: password(passwd)?,
        authzid: (!authzid.is_empty()).then_some(authzid),
        mechanism: Mechanism::Plain,
    })
}

/// LOGIN's first response: the user name.
pub(crate) fn login_username(decoded: &[u8]) -> Result<String, SaslError> {
    identity(decoded)
}

/// LOGIN's second response: the password, completing the credentials.
pub(crate) fn login_credentials(
    username: String,
    decoded: &[u8],
) -> Result<Credentials, SaslError> {
    Ok(Credentials {
        username,
        password: password(decoded)?,
        authzid: None,
        mechanism: Mechanism::Login,
    })
}

/// A user name or authzid: UTF-8 without control characters, so it is safe in logs and in the
/// backend's XCLIENT LOGIN= (which the driver xtext-escapes anyway).
fn identity(bytes: &[u8]) -> Result<String, SaslError> {
    let s = std::str::from_utf8(bytes).map_err(|_| SaslError::Malformed)?;
    if s.chars().any(char::is_control) {
        return Err(SaslError::Malformed);
    }
    Ok(s.to_owned())
}

/// A password: UTF-8 without NUL (a NUL could not be passed on in a backend AUTH PLAIN).
fn password(bytes: &[u8]) -> Result<Password, SaslError> {
    let s = std::str::from_utf8(bytes).map_err(|_| SaslError::Malformed)?;
    if s.contains('\0') {
        return Err(SaslError::Malformed);
    }
    Ok(Password::new(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fields() {
        let c = plain(b"\0alice@example.com\0secret pw").unwrap();
        assert_eq!(c.username, "alice@example.com");
        assert_eq!(c.password.expose(), "secret pw");
        assert_eq!(c.authzid, None);
        assert_eq!(c.mechanism, Mechanism::Plain);
        let c = plain(b"admin@example.com\0alice\0pw").unwrap();
        assert_eq!(c.authzid.as_deref(), Some("admin@example.com"));
        for bad in [
            &b""[..],
            b"alice",
            b"\0alice",
            b"\0alice\0pw\0",
            b"\0al\nice\0pw",
            b"\0\xff\0pw",
            b"\0alice\0\xfe",
        ] {
            assert_eq!(plain(bad), Err(SaslError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn responses() {
        assert_eq!(decode_response(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_response(b"="), Ok(Zeroizing::new(Vec::new())));
        assert_eq!(
            decode_response(b"YWxpY2U="),
            Ok(Zeroizing::new(b"alice".to_vec()))
        );
        assert_eq!(
            decode_response(b"YWxpY2U=  "),
            Ok(Zeroizing::new(b"alice".to_vec()))
        );
        assert_eq!(decode_response(b"YWxpY2U"), Err(SaslError::Base64));
        assert_eq!(decode_response(b"!!!!"), Err(SaslError::Base64));
        assert_eq!(login_username(b"bob\0"), Err(SaslError::Malformed));
        assert_eq!(
            login_credentials("bob".into(), b"p\0w").map(|c| c.username),
            Err(SaslError::Malformed)
        );
    }

    #[test]
    fn password_debug_is_masked() {
        let c = plain(b"\0alice\0hunter2").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
}

/// Property tests ("fuzz") of the SASL decoding.
#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::smtp::session::prop_tests::{b64, config, password, shows, user};

    proptest! {
        #![proptest_config(config(2048))]

        /// No panic on any response, decoded or not; what is accepted meets the rules.
        #[test]
        fn any_response_is_judged(line in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..48).prop_map(|v| b64(&v).into_bytes()),
        ]) {
            if let Ok(decoded) = decode_response(&line) {
                if let Ok(c) = plain(&decoded) {
                    prop_assert!(!c.username.chars().any(char::is_control));
                    prop_assert!(!c.password.expose().contains('\0'));
                }
                let _ = login_username(&decoded);
                let _ = login_credentials(String::new(), &decoded);
            }
            let _ = plain(&line);
            let _ = login_username(&line);
            let _ = login_credentials(String::new(), &line);
        }

        /// PLAIN and LOGIN give back the identities and password encoded, blanks around the
        /// base64 tolerated; `Debug` of the outcome shows no password.
        #[test]
        fn credentials_round_trip(
            authzid in prop_oneof![Just(String::new()), user()],
            user in user(),
            password in password(),
            blanks in ("[ \t]{0,2}", "[ \t]{0,2}"),
        ) {
            let message = format!("{authzid}\0{user}\0{password}");
            let line = format!("{}{}{}", blanks.0, b64(message.as_bytes()), blanks.1);
            let decoded = decode_response(line.as_bytes());
            prop_assert_eq!(decoded.as_deref().map(Vec::as_slice), Ok(message.as_bytes()));
            let outcome = decoded.map(|d| plain(&d));
            let debug = format!("{outcome:?}");
            prop_assert!(!shows(&debug, password.as_bytes()), "{}", debug);
            let Ok(Ok(c)) = outcome else {
                return Err(TestCaseError::fail(debug));
            };
            prop_assert_eq!(&c.username, &user);
            prop_assert_eq!(c.password.expose(), password.as_str());
            prop_assert_eq!(c.authzid, (!authzid.is_empty()).then_some(authzid));
            let login = login_credentials(user.clone(), password.as_bytes());
            let debug = format!("{login:?}");
            prop_assert!(!shows(&debug, password.as_bytes()), "{}", debug);
            prop_assert_eq!(login.map(|c| c.password), Ok(Password::new(password)));
        }
    }
}
