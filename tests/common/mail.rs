//! What the SMTP suites share: the test message and reading swaks' transcript.

use super::Output;

/// A message with CRLF line ends whose body exercises what a relay can get wrong: leading
/// dots (dot-stuffing), 8-bit UTF-8, trailing white space, tabs, empty lines, a long line.
/// No `%` or backslash: swaks would treat those as tokens. Returns (whole message, body).
pub fn message(from: &str, to: &str, subject: &str) -> (Vec<u8>, Vec<u8>) {
    let long = "0123456789abcdef".repeat(60);
    let body = format!(
        "Hello from {subject}.\r\n.a line that starts with a dot\r\n..and one with two\r\n.\r\n\
         日本語の本文です。 UTF-8, sent as 8bit.\r\ntrailing spaces   \r\n\ttab first\r\n\r\n\r\n\
         {long}\r\nlast line\r\n"
    );
    let headers = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    );
    let mut whole = headers.into_bytes();
    whole.extend_from_slice(body.as_bytes());
    (whole, body.into_bytes())
}

/// The server's final reply to AUTH in a swaks transcript (`<~  235 ...` over TLS; `<~*` for an
/// error).
pub fn swaks_auth_reply(out: &Output) -> String {
    out.stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("<~*").or_else(|| l.strip_prefix("<~"))?;
            let rest = rest.trim_start();
            let code = rest.get(..3)?;
            matches!(code, "235" | "454" | "525" | "534" | "535" | "530").then(|| rest.to_owned())
        })
        .next_back()
        .unwrap_or_default()
}

/// Header fields, each with its continuation lines joined to it (CRLF or LF line ends).
pub fn unfold(header: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for line in header.lines() {
        match (line.starts_with([' ', '\t']), fields.last_mut()) {
            (true, Some(last)) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => fields.push(line.to_owned()),
        }
    }
    fields
}
