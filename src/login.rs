//! The login outcome shared by IMAP and SMTP: one enum, one word per result (the same word in
//! the session log line and in `mailgate_logins_total{result}`), mapped to the wire in
//! `imap::reply` and `smtp::reply`.

use crate::config::{Messages, Protocol};

/// Why a login ended the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoginResult {
    Ok,
    InvalidCredentials,
    AppPasswordRequired,
    ImapDisabled,
    SmtpDisabled,
    PolicyDenied,
    Throttled,
    TooManyConnections,
    BackendUnavailable,
    TlsRequired,
}

impl LoginResult {
    pub const ALL: [LoginResult; 10] = [
        LoginResult::Ok,
        LoginResult::InvalidCredentials,
        LoginResult::AppPasswordRequired,
        LoginResult::ImapDisabled,
        LoginResult::SmtpDisabled,
        LoginResult::PolicyDenied,
        LoginResult::Throttled,
        LoginResult::TooManyConnections,
        LoginResult::BackendUnavailable,
        LoginResult::TlsRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::InvalidCredentials => "invalid_credentials",
            LoginResult::AppPasswordRequired => "app_password_required",
            LoginResult::ImapDisabled => "imap_disabled",
            LoginResult::SmtpDisabled => "smtp_disabled",
            LoginResult::PolicyDenied => "policy_denied",
            LoginResult::Throttled => "throttled",
            LoginResult::TooManyConnections => "too_many_connections",
            LoginResult::BackendUnavailable => "backend_unavailable",
            LoginResult::TlsRequired => "tls_required",
        }
    }
}

/// The operator's (or default) reply text for `result` on `protocol`, with `{help_url}`
/// substituted and anything that could break a reply line (CR, LF, NUL, other controls)
/// replaced by a space. Used by both protocols' reply mappers.
pub fn message(result: LoginResult, protocol: Protocol, messages: &Messages) -> String {
    let template = match (result, protocol) {
        (LoginResult::Ok, _) => "Logged in",
        (LoginResult::InvalidCredentials, _) => &messages.invalid_credentials,
        (LoginResult::AppPasswordRequired, _) => &messages.app_password_required,
        (LoginResult::ImapDisabled, _) => &messages.imap_disabled,
        (LoginResult::SmtpDisabled, _) => &messages.smtp_disabled,
        (LoginResult::PolicyDenied, Protocol::Imap) => &messages.imap_policy_denied,
        (LoginResult::PolicyDenied, Protocol::Smtp) => &messages.smtp_policy_denied,
        (LoginResult::Throttled, _) => &messages.throttled,
        (LoginResult::TooManyConnections, _) => &messages.too_many_connections,
        (LoginResult::BackendUnavailable, _) => &messages.unavailable,
        (LoginResult::TlsRequired, Protocol::Imap) => "Login not allowed before STARTTLS",
        (LoginResult::TlsRequired, Protocol::Smtp) => "Must issue a STARTTLS command first",
    };
    template
        .replace("{help_url}", &messages.help_url)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_substitute_help_url_and_cannot_break_lines() {
        let mut messages = Messages::default();
        messages.help_url = "https://help.example/app\r\nA1 OK".into();
        let text = message(LoginResult::AppPasswordRequired, Protocol::Imap, &messages);
        assert_eq!(
            text,
            "Application-specific password required: https://help.example/app  A1 OK"
        );
        assert!(!text.contains('\r') && !text.contains('\n'));
    }

    #[test]
    fn result_words_are_unique() {
        let words: std::collections::HashSet<_> =
            LoginResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(words.len(), LoginResult::ALL.len());
    }
}
