//! The login outcome shared by IMAP and SMTP: one enum, one word per result (the same word in
//! the session log line and in `mailgate_logins_total{result}`), mapped to the wire in
//! `imap::reply` and `smtp::reply`.

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
