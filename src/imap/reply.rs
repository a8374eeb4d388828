//! Login outcomes on the IMAP wire: the one place that turns a `LoginResult` into a tagged
//! reply. Response codes are fixed (RFC 5530); texts come from `messages`.

use crate::config::{Messages, Protocol};
use crate::login::{message, LoginResult};

/// The RFC 5530 response code for a failed login.
pub fn code(result: LoginResult) -> &'static str {
    match result {
        LoginResult::Ok => "CAPABILITY",
        LoginResult::InvalidCredentials => "AUTHENTICATIONFAILED",
        LoginResult::AppPasswordRequired => "ALERT",
        LoginResult::ImapDisabled | LoginResult::SmtpDisabled => "AUTHORIZATIONFAILED",
        LoginResult::PolicyDenied => "CONTACTADMIN",
        LoginResult::TlsRequired => "PRIVACYREQUIRED",
        LoginResult::Throttled | LoginResult::BackendUnavailable => "UNAVAILABLE",
        LoginResult::TooManyConnections => "LIMIT",
    }
}

/// `tag NO [CODE] text` for a refused login.
pub fn refused(tag: &str, result: LoginResult, messages: &Messages) -> Vec<u8> {
    let text = message(result, Protocol::Imap, messages);
    format!("{tag} NO [{}] {text}\r\n", code(result)).into_bytes()
}

/// `tag OK [CAPABILITY ...] Logged in` under the client's own tag, with the backend's
/// post-login capabilities.
pub fn logged_in(tag: &str, capabilities: &str) -> Vec<u8> {
    format!("{tag} OK [CAPABILITY {capabilities}] Logged in\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_matches_the_design_table() {
        let m = Messages::default();
        let rows: [(LoginResult, &str); 8] = [
            (LoginResult::InvalidCredentials, "a NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"),
            (
                LoginResult::AppPasswordRequired,
                "a NO [ALERT] Application-specific password required: https://example.com/help/app-passwords\r\n",
            ),
            (
                LoginResult::ImapDisabled,
                "a NO [AUTHORIZATIONFAILED] IMAP access is disabled for this account; enable it in your mail settings\r\n",
            ),
            (
                LoginResult::PolicyDenied,
                "a NO [CONTACTADMIN] IMAP access is not allowed by your organisation's policy; contact your administrator\r\n",
            ),
            (LoginResult::TlsRequired, "a NO [PRIVACYREQUIRED] Login not allowed before STARTTLS\r\n"),
            (LoginResult::Throttled, "a NO [UNAVAILABLE] Too many failed logins, try again later\r\n"),
            (LoginResult::TooManyConnections, "a NO [LIMIT] Too many connections for this account\r\n"),
            (LoginResult::BackendUnavailable, "a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"),
        ];
        for (result, want) in rows {
            assert_eq!(
                String::from_utf8_lossy(&refused("a", result, &m)),
                want,
                "{result:?}"
            );
        }
        assert_eq!(
            logged_in("x7", "IMAP4rev1 IDLE"),
            b"x7 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        );
    }
}
