//! What mailgate answers to EHLO/HELO: the backend's extensions (probed) minus what mailgate
//! itself owns, plus mailgate's own AUTH and STARTTLS.

/// Extension lines longer than this are dropped rather than risk a reply line over 512 octets.
const EXTENSION_MAX: usize = 500;

/// Keywords the client must never see from the backend: authentication and TLS are mailgate's,
/// and XCLIENT/XFORWARD are for mailgate's own use towards the backend.
const OWNED: [&str; 4] = ["AUTH", "STARTTLS", "XCLIENT", "XFORWARD"];

/// The EHLO extension list shown to clients: the backend's, minus AUTH (also Postfix's old
/// `AUTH=...` form), STARTTLS, XCLIENT and XFORWARD; plus `STARTTLS` when it is offered and TLS
/// is not active yet; plus `AUTH PLAIN LOGIN` when TLS is active or no STARTTLS is offered (a
/// `tls: none` test listener). Before STARTTLS no AUTH is advertised (RFC 4954 §4: no
/// plaintext mechanisms over an unprotected channel).
///
/// Backend lines that are empty, too long, or contain anything but printable ASCII are
/// dropped: they would be repeated to every client.
pub fn client_extensions(
    backend: &[String],
    tls_active: bool,
    starttls_offered: bool,
) -> Vec<String> {
    let mut extensions: Vec<String> = backend
        .iter()
        .map(|line| line.trim())
        .filter(|line| printable(line) && !owned_by_mailgate(line))
        .map(str::to_owned)
        .collect();
    if starttls_offered && !tls_active {
        extensions.push("STARTTLS".to_owned());
    }
    if tls_active || !starttls_offered {
        extensions.push("AUTH PLAIN LOGIN".to_owned());
    }
    extensions
}

fn printable(line: &str) -> bool {
    !line.is_empty()
        && line.len() <= EXTENSION_MAX
        && line.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn owned_by_mailgate(line: &str) -> bool {
    let keyword = line.split([' ', '=']).next().unwrap_or_default();
    OWNED
        .iter()
        .any(|owned| keyword.eq_ignore_ascii_case(owned))
}

/// The multi-line EHLO reply (RFC 5321 §4.1.1.1): `250-<hostname>`, then one line per
/// extension, the last with `250 `.
pub fn ehlo_reply(hostname: &str, extensions: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 * (extensions.len() + 1));
    let lines = std::iter::once(hostname).chain(extensions.iter().map(String::as_str));
    let count = extensions.len() + 1;
    for (i, line) in lines.enumerate() {
        out.extend_from_slice(if i + 1 == count { b"250 " } else { b"250-" });
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The HELO reply: no extensions (RFC 5321 §4.1.1.1).
pub fn helo_reply(hostname: &str) -> Vec<u8> {
    format!("250 {hostname}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A submission-port Postfix 3.x EHLO reply (`smtpd_tls_security_level=may`,
    /// `broken_sasl_auth_clients=yes`, XCLIENT/XFORWARD for the proxy's address).
    fn postfix() -> Vec<String> {
        [
            "PIPELINING",
            "SIZE 10240000",
            "VRFY",
            "ETRN",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "AUTH=PLAIN LOGIN",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
            "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT",
            "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT",
        ]
        .map(String::from)
        .to_vec()
    }

    const KEPT: [&str; 9] = [
        "PIPELINING",
        "SIZE 10240000",
        "VRFY",
        "ETRN",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ];

    fn expect(tail: &[&str]) -> Vec<String> {
        KEPT.iter().chain(tail).map(|s| s.to_string()).collect()
    }

    #[test]
    fn postfix_list_before_and_after_tls() {
        // 587 before STARTTLS: STARTTLS, no AUTH.
        assert_eq!(
            client_extensions(&postfix(), false, true),
            expect(&["STARTTLS"])
        );
        // 465, or 587 after STARTTLS: AUTH, no STARTTLS.
        assert_eq!(
            client_extensions(&postfix(), true, false),
            expect(&["AUTH PLAIN LOGIN"])
        );
        // A driver that forgot to clear starttls_offered after the handshake.
        assert_eq!(
            client_extensions(&postfix(), true, true),
            expect(&["AUTH PLAIN LOGIN"])
        );
        // tls: none (loopback test listener).
        assert_eq!(
            client_extensions(&postfix(), false, false),
            expect(&["AUTH PLAIN LOGIN"])
        );
    }

    #[test]
    fn odd_backend_lines_are_dropped() {
        let backend = [
            "  SIZE 1000  ",
            "",
            "x-bad\r\n250 INJECTED",
            "auth login",
            "starttls",
            "Xclient ADDR",
            "BINARYMIME",
        ]
        .map(String::from);
        assert_eq!(
            client_extensions(&backend, true, false),
            ["SIZE 1000", "BINARYMIME", "AUTH PLAIN LOGIN"]
        );
        let long = ["X".repeat(EXTENSION_MAX + 1)];
        assert_eq!(client_extensions(&long, true, false), ["AUTH PLAIN LOGIN"]);
    }

    #[test]
    fn replies() {
        let exts = ["PIPELINING".to_string(), "AUTH PLAIN LOGIN".to_string()];
        assert_eq!(
            ehlo_reply("mx.example.com", &exts),
            b"250-mx.example.com\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"
        );
        assert_eq!(ehlo_reply("mx.example.com", &[]), b"250 mx.example.com\r\n");
        assert_eq!(helo_reply("mx.example.com"), b"250 mx.example.com\r\n");
    }
}
