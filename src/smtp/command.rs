//! The pre-auth SMTP command line, parsed by a pure function over one line (without CRLF).
//!
//! Hand-written rather than `smtp-proto`: before AUTH only a dozen verbs matter and most of
//! them are refused; what needs care (line bounds, bare CR/LF, SASL lines, pipelined tails
//! kept byte-exact for the backend) lives in the session's framer, which `smtp-proto`'s
//! `Request` parser would not replace.

use super::reply::{self, Reply};

/// RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
const DOMAIN_MAX: usize = 255;

/// One command line, as far as the pre-auth session cares.
#[derive(Debug, Clone, PartialEq, Eq)]
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
