//! The pre-auth SMTP command line, parsed by a pure function over one line (without CRLF).
//!
//! Hand-written rather than `smtp-proto`: before AUTH only a dozen verbs matter and most of
//! them are refused; what needs care (line bounds, bare CR/LF, SASL lines, pipelined tails
//! kept byte-exact for the backend) lives in the session's framer, which `smtp-proto`'s
//! `Request` parser would not replace.

use std::fmt;

use super::reply::{self, Reply};

/// RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
const DOMAIN_MAX: usize = 255;

/// One command line, as far as the pre-auth session cares. `Debug` is written by hand: an
/// `AUTH` initial response carries the credentials (base64 masks nothing).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    /// `EHLO <domain>`, the domain checked to be visible ASCII.
    Ehlo(&'a str),
    Helo(&'a str),
    StartTls,
    /// `AUTH <mechanism> [initial-response]`, both still raw.
    Auth {
        mechanism: &'a [u8],
        initial: Option<&'a [u8]>,
    },
    Noop,
    Rset,
    Quit,
    Vrfy,
    Expn,
    Help,
    /// `MAIL`, `RCPT`, `DATA`, `BDAT`: need authentication first.
    Transaction,
    /// `XCLIENT`, `XFORWARD`: only mailgate itself may say who the client is.
    Refused,
    Unknown,
    /// A known verb with wrong arguments; the reply says which syntax was expected.
    Syntax(Reply<'static>),
}

impl fmt::Debug for Command<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo(name) => f.debug_tuple("Ehlo").field(name).finish(),
            Command::Helo(name) => f.debug_tuple("Helo").field(name).finish(),
            Command::Auth { mechanism, initial } => f
                .debug_struct("Auth")
                .field("mechanism", &mechanism.escape_ascii().to_string())
                .field("initial", &initial.map(|_| "***"))
                .finish(),
            Command::StartTls => f.write_str("StartTls"),
            Command::Noop => f.write_str("Noop"),
            Command::Rset => f.write_str("Rset"),
            Command::Quit => f.write_str("Quit"),
            Command::Vrfy => f.write_str("Vrfy"),
            Command::Expn => f.write_str("Expn"),
            Command::Help => f.write_str("Help"),
            Command::Transaction => f.write_str("Transaction"),
            Command::Refused => f.write_str("Refused"),
            Command::Unknown => f.write_str("Unknown"),
            Command::Syntax(reply) => f.debug_tuple("Syntax").field(reply).finish(),
        }
    }
}

/// Parses one line (CRLF already removed). Never fails: anything unexpected is `Unknown` or
/// `Syntax`.
pub(crate) fn parse(line: &[u8]) -> Command<'_> {
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(space) => {
            let (verb, rest) = line.split_at(space);
            (verb, rest.get(1..).unwrap_or_default().trim_ascii())
        }
        None => (line, &b""[..]),
    };
    let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
    if is(b"EHLO") {
        domain(args).map_or(Command::Syntax(reply::EHLO_SYNTAX), Command::Ehlo)
    } else if is(b"HELO") {
        domain(args).map_or(Command::Syntax(reply::HELO_SYNTAX), Command::Helo)
    } else if is(b"AUTH") {
        let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
        match (words.next(), words.next(), words.next()) {
            (Some(mechanism), initial, None) => Command::Auth { mechanism, initial },
            _ => Command::Syntax(reply::AUTH_SYNTAX),
        }
    } else if is(b"STARTTLS") {
        no_args(args, Command::StartTls)
    } else if is(b"RSET") {
        no_args(args, Command::Rset)
    } else if is(b"NOOP") {
        Command::Noop
    } else if is(b"QUIT") {
        // Arguments are not allowed, but a client that wants to leave is let go.
        Command::Quit
    } else if is(b"VRFY") {
        Command::Vrfy
    } else if is(b"EXPN") {
        Command::Expn
    } else if is(b"HELP") {
        Command::Help
    } else if is(b"MAIL") || is(b"RCPT") || is(b"DATA") || is(b"BDAT") {
        Command::Transaction
    } else if is(b"XCLIENT") || is(b"XFORWARD") {
        Command::Refused
    } else {
        Command::Unknown
    }
}

fn no_args(args: &[u8], command: Command<'static>) -> Command<'static> {
    if args.is_empty() {
        command
    } else {
        Command::Syntax(reply::NO_PARAMETERS)
    }
}

/// The first word of the arguments, if it can be a domain or address literal: visible ASCII
/// only, because the driver repeats it to the backend (`EHLO <helo>`, `XCLIENT HELO=`).
fn domain(args: &[u8]) -> Option<&str> {
    let word = args.split(|&b| b == b' ').next().unwrap_or_default();
    let visible = word.iter().all(|b| (0x21..=0x7e).contains(b));
    if word.is_empty() || word.len() > DOMAIN_MAX || !visible {
        return None;
    }
    std::str::from_utf8(word).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `prop_tests::auth_debug_shows_no_credentials`: the derived `Debug` printed the
    /// initial response, i.e. the base64 of user name and password.
    #[test]
    fn auth_debug_masks_the_initial_response() {
        let shown = format!("{:?}", parse(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI="));
        assert_eq!(
            shown,
            r#"Auth { mechanism: "PLAIN", initial: Some("***") }"#
        );
        assert_eq!(
            format!("{:?}", parse(b"AUTH LOGIN")),
            r#"Auth { mechanism: "LOGIN", initial: None }"#
        );
    }

    #[test]
    fn verbs_and_arguments() {
        let cases: &[(&[u8], Command<'_>)] = &[
            (
                b"EHLO client.example.com",
                Command::Ehlo("client.example.com"),
            ),
            (b"ehlo [192.0.2.1]", Command::Ehlo("[192.0.2.1]")),
            (b"EHLO  spaced   extra", Command::Ehlo("spaced")),
            (b"EHLO", Command::Syntax(reply::EHLO_SYNTAX)),
            (b"EHLO ", Command::Syntax(reply::EHLO_SYNTAX)),
            (b"EHLO bad\x01name", Command::Syntax(reply::EHLO_SYNTAX)),
            (b"EHLO h\xc3\xa9", Command::Syntax(reply::EHLO_SYNTAX)),
            (b"HELO x", Command::Helo("x")),
            (b"HELO", Command::Syntax(reply::HELO_SYNTAX)),
            (b"EHLOX", Command::Unknown),
            (
                b"AUTH PLAIN AGFsaWNlAHB3",
                Command::Auth {
                    mechanism: b"PLAIN",
                    initial: Some(b"AGFsaWNlAHB3"),
                },
            ),
            (
                b"auth login",
                Command::Auth {
                    mechanism: b"login",
                    initial: None,
                },
            ),
            (b"AUTH", Command::Syntax(reply::AUTH_SYNTAX)),
            (b"AUTH PLAIN a b", Command::Syntax(reply::AUTH_SYNTAX)),
            (b"STARTTLS", Command::StartTls),
            (b"StartTLS ", Command::StartTls),
            (b"STARTTLS now", Command::Syntax(reply::NO_PARAMETERS)),
            (b"RSET", Command::Rset),
            (b"RSET x", Command::Syntax(reply::NO_PARAMETERS)),
            (b"NOOP anything", Command::Noop),
            (b"QUIT", Command::Quit),
            (b"VRFY postmaster", Command::Vrfy),
            (b"EXPN list", Command::Expn),
            (b"HELP", Command::Help),
            (b"MAIL FROM:<a@example.com>", Command::Transaction),
            (b"rcpt TO:<b@example.com>", Command::Transaction),
            (b"DATA", Command::Transaction),
            (b"BDAT 10 LAST", Command::Transaction),
            (b"XCLIENT ADDR=192.0.2.1", Command::Refused),
            (b"XFORWARD NAME=x", Command::Refused),
            (b"", Command::Unknown),
            (b" NOOP", Command::Unknown),
            (b"\xff\xfe", Command::Unknown),
        ];
        for (line, expected) in cases {
            assert_eq!(
                &parse(line),
                expected,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn domain_length_is_bounded() {
        let long = format!("EHLO {}", "a".repeat(DOMAIN_MAX + 1));
        assert_eq!(parse(long.as_bytes()), Command::Syntax(reply::EHLO_SYNTAX));
        let max = format!("EHLO {}", "a".repeat(DOMAIN_MAX));
        assert!(matches!(parse(max.as_bytes()), Command::Ehlo(_)));
    }
}

/// Property tests ("fuzz") of the command line parser.
#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::smtp::session::prop_tests::{b64, config, password, shows, user};

    fn verb() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "EHLO", "HELO", "AUTH", "STARTTLS", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
                "HELP", "MAIL", "RCPT", "DATA", "BDAT", "XCLIENT", "XFORWARD",
            ])
            .prop_map(str::to_owned),
            1 => "[A-Za-z]{0,10}",
        ]
    }

    proptest! {
        #![proptest_config(config(2048))]

        /// Any line parses to something, and what it borrows is the client's own bytes
        /// within the limits (a domain is visible ASCII, at most 255 octets).
        #[test]
        fn any_line_parses(
            line in (verb(), prop::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(verb, rest)| [verb.as_bytes(), b" ", &rest].concat()),
        ) {
            let within = |part: &[u8]| line.windows(part.len().max(1)).any(|w| w == part);
            match parse(&line) {
                Command::Ehlo(name) | Command::Helo(name) => {
                    prop_assert!(!name.is_empty() && name.len() <= DOMAIN_MAX);
                    prop_assert!(name.bytes().all(|b| b.is_ascii_graphic()));
                    prop_assert!(within(name.as_bytes()));
                }
                Command::Auth { mechanism, initial } => {
                    prop_assert!(!mechanism.is_empty() && within(mechanism));
                    prop_assert!(initial.is_none_or(|i| !i.is_empty() && within(i)));
                }
                _ => {}
            }
            let _ = parse(line.get(5..).unwrap_or_default());
        }

        /// `EHLO`/`HELO` give back the domain; `AUTH` its mechanism and initial response.
        #[test]
        fn commands_round_trip(
            domain in "[!-~]{1,255}",
            mechanism in "[A-Za-z0-9-]{1,20}",
            initial in prop::option::of("[A-Za-z0-9+/]{1,40}={0,2}"),
            spaces in (1usize..4, 0usize..3),
        ) {
            let gap = " ".repeat(spaces.0);
            let trailing = " ".repeat(spaces.1);
            let ehlo = format!("EHLO{gap}{domain}{trailing}");
            prop_assert_eq!(parse(ehlo.as_bytes()), Command::Ehlo(&domain));
            let helo = format!("helo{gap}{domain}");
            prop_assert_eq!(parse(helo.as_bytes()), Command::Helo(&domain));
            let line = match &initial {
                Some(ir) => format!("AUTH{gap}{mechanism}{gap}{ir}{trailing}"),
                None => format!("AUTH{gap}{mechanism}{trailing}"),
            };
            prop_assert_eq!(
                parse(line.as_bytes()),
                Command::Auth { mechanism: mechanism.as_bytes(), initial: initial.as_deref().map(str::as_bytes) }
            );
        }

        /// An `AUTH` line carries credentials in its initial response: its `Debug` must not
        /// show them.
        #[test]
        fn auth_debug_shows_no_credentials(user in user(), password in password()) {
            let line = format!("AUTH PLAIN {}", b64(format!("\0{user}\0{password}").as_bytes()));
            let debug = format!("{:?}", parse(line.as_bytes()));
            prop_assert!(!shows(&debug, format!("\0{user}\0{password}").as_bytes()), "{}", debug);
            let line = format!("AUTH LOGIN {}", b64(password.as_bytes()));
            let debug = format!("{:?}", parse(line.as_bytes()));
            prop_assert!(!shows(&debug, password.as_bytes()), "{}", debug);
        }
    }
}
