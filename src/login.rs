//! The login outcome shared by IMAP and SMTP: one enum, one word per result (the same word in
//! the session log line and in `mailgate_logins_total{result}`), mapped to the wire in
//! `imap::reply` and `smtp::reply`.

use std::net::IpAddr;
use std::sync::Arc;

use crate::accounts::Account;
use crate::config::{Messages, Protocol};
use crate::limits::{Gate, SessionPermit};
use crate::policy::Decision;
use crate::routing::Route;
use crate::server::Context;

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
        (LoginResult::Ok, Protocol::Imap) => "Logged in",
        (LoginResult::Ok, Protocol::Smtp) => "Authentication successful",
        (LoginResult::InvalidCredentials, Protocol::Imap) => &messages.invalid_credentials,
        (LoginResult::InvalidCredentials, Protocol::Smtp) => &messages.smtp_invalid_credentials,
        (LoginResult::AppPasswordRequired, _) => &messages.app_password_required,
        (LoginResult::ImapDisabled, _) => &messages.imap_disabled,
        (LoginResult::SmtpDisabled, _) => &messages.smtp_disabled,
        (LoginResult::PolicyDenied, Protocol::Imap) => &messages.imap_policy_denied,
        (LoginResult::PolicyDenied, Protocol::Smtp) => &messages.smtp_policy_denied,
        (LoginResult::Throttled, _) => &messages.throttled,
        (LoginResult::TooManyConnections, _) => &messages.too_many_connections,
        (LoginResult::BackendUnavailable, Protocol::Imap) => &messages.unavailable,
        (LoginResult::BackendUnavailable, Protocol::Smtp) => &messages.smtp_unavailable,
        (LoginResult::TlsRequired, Protocol::Imap) => "Login not allowed before STARTTLS",
        (LoginResult::TlsRequired, Protocol::Smtp) => "Must issue a STARTTLS command first",
    };
    template
        .replace("{help_url}", &messages.help_url)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A login that passed the account rules: where it goes, whose it is, and its place under
/// `max_sessions_per_user_ip` (held by the spliced session).
#[derive(Debug)]
pub struct Grant {
    pub route: Route,
    pub account: Arc<Account>,
    pub session: SessionPermit,
}

/// Authenticates a login name and password and applies the account rules and the login
/// limits: the step both protocols share between reading credentials and logging in to a
/// backend.
///
/// Before any password work, the failure budgets of `peer` and of the user are looked at
/// (`limits::Gate`): an address that has spent its budget is refused (`Throttled`) without a
/// hash; for a user that has, only a password already in the verification cache is accepted.
/// A wrong password (or unknown user) is recorded against both budgets, and every refusal for
/// one (`InvalidCredentials`, `Throttled`) is answered only after the failure delay. Other
/// refusals (two-step, IMAP disabled, policy) prove the password right and cost nothing.
///
/// A SASL authorization identity other than the user itself is refused (mailgate does not
/// let one user act as another), after the same password work as any other login.
///
/// # Errors
/// The refusal, as the `LoginResult` the client's reply is made from.
pub async fn authorize(
    context: &Context,
    peer: IpAddr,
    username: &str,
    authzid: Option<&str>,
    password: &[u8],
    protocol: Protocol,
) -> Result<Grant, LoginResult> {
    let route = context.router.route(username);
    // An unroutable name is verified as-is, against the dummy hash: same work, same answer.
    let address = route
        .as_ref()
        .map(|r| r.address.clone())
        .unwrap_or_else(|| username.to_lowercase());
    let limiter = &context.limiter;
    let gate = limiter.gate(peer, &address);
    let timer = context.metrics.auth_duration(protocol).start_timer();
    let outcome = match gate {
        Gate::Open => Some(
            context
                .auth
                .authenticate(&address, password, protocol)
                .await,
        ),
        Gate::CachedOnly => context
            .auth
            .authenticate_cached(&address, password, protocol),
        Gate::Throttled => None,
    };
    timer.observe_duration();
    let Some(outcome) = outcome else {
        tracing::debug!(
            target: "mailgate::limits",
            client = %peer,
            user = %address,
            gate = ?gate,
            "login throttled: refused without password verification"
        );
        tokio::time::sleep(limiter.throttled_delay(peer)).await;
        return Err(LoginResult::Throttled);
    };
    let authzid_ok =
        authzid.is_none_or(|z| context.router.normalize(z).as_deref() == Some(address.as_str()));
    match (outcome.decision, route, outcome.account) {
        (Decision::Allow, Some(route), Some(account)) if authzid_ok => {
            match limiter.open_session(protocol, &route.address, peer) {
                Some(session) => Ok(Grant {
                    route,
                    account,
                    session,
                }),
                None => Err(LoginResult::TooManyConnections),
            }
        }
        (Decision::Deny(result), _, _) if result != LoginResult::InvalidCredentials => Err(result),
        _ => {
            tokio::time::sleep(limiter.failed(peer, &address)).await;
            Err(LoginResult::InvalidCredentials)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_substitute_help_url_and_cannot_break_lines() {
        let messages = Messages {
            help_url: "https://help.example/app\r\nA1 OK".into(),
            ..Messages::default()
        };
        let text = message(LoginResult::AppPasswordRequired, Protocol::Imap, &messages);
        assert_eq!(
            text,
            "Application-specific password required: https://help.example/app  A1 OK"
        );
        assert!(!text.contains('\r') && !text.contains('\n'));
    }

    #[test]
    fn smtp_has_its_own_wording_for_two_rows() {
        let messages = Messages::default();
        let pairs = [
            (
                LoginResult::InvalidCredentials,
                "Invalid credentials",
                "Authentication credentials invalid",
            ),
            (
                LoginResult::BackendUnavailable,
                "Mail server temporarily unavailable",
                "Temporary authentication failure",
            ),
            (LoginResult::Ok, "Logged in", "Authentication successful"),
        ];
        for (result, imap, smtp) in pairs {
            assert_eq!(message(result, Protocol::Imap, &messages), imap);
            assert_eq!(message(result, Protocol::Smtp, &messages), smtp);
        }
        // Every other row reads the same for both protocols (policy texts name their protocol
        // in their own keys).
        let same = message(LoginResult::AppPasswordRequired, Protocol::Smtp, &messages);
        assert_eq!(
            same,
            message(LoginResult::AppPasswordRequired, Protocol::Imap, &messages)
        );
    }

    #[test]
    fn result_words_are_unique() {
        let words: std::collections::HashSet<_> =
            LoginResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(words.len(), LoginResult::ALL.len());
    }
}
