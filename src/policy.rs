//! `decide`: the account rules as a pure function (no I/O, no clock, no files).
//!
//! The order of the checks is part of the design (DESIGN.md, "Login decisions"):
//! 1. the credential must be proven (unknown user, wrong password and a federated account's
//!    external sign-in look the same) — policy reasons are revealed only after that;
//! 2. two-step accounts refuse the main password (it is not full proof of identity there, so it
//!    must not reveal any other setting);
//! 3. the organisation's policy (enabling IMAP in the user's settings would not help);
//! 4. the user's own switch for the protocol.

use crate::accounts::{Access, Account, Organisation, Switch};
use crate::config::Protocol;
use crate::login::LoginResult;

/// Which secret the client proved it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential {
    MainPassword,
    AppPassword,
    /// No stored hash matched (or the user does not exist).
    Invalid,
}

/// What the login may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(LoginResult),
}

/// Decides a login. `organisation` is the policy of the address's domain (`None` = no policy).
pub fn decide(
    account: Option<&Account>,
    organisation: Option<&Organisation>,
    credential: Credential,
    protocol: Protocol,
) -> Decision {
    let Some(account) = account else {
        return Decision::Deny(LoginResult::InvalidCredentials);
    };
    match credential {
        Credential::Invalid => return Decision::Deny(LoginResult::InvalidCredentials),
        // A federated account has no mail password: whatever was presented as one is not
        // proof, and must get the same reply as a wrong password.
        Credential::MainPassword if account.federated.is_some() => {
            return Decision::Deny(LoginResult::InvalidCredentials)
        }
        Credential::MainPassword if account.two_step => {
            return Decision::Deny(LoginResult::AppPasswordRequired)
        }
        Credential::MainPassword | Credential::AppPassword => {}
    }
    let organisation = organisation.copied().unwrap_or(Organisation::ALLOW_ALL);
    let (org_access, user_switch, user_off) = match protocol {
        Protocol::Imap => (organisation.imap, account.imap, LoginResult::ImapDisabled),
        Protocol::Smtp => (organisation.smtp, account.smtp, LoginResult::SmtpDisabled),
    };
    if org_access == Access::Denied {
        return Decision::Deny(LoginResult::PolicyDenied);
    }
    if user_switch == Switch::Disabled {
        return Decision::Deny(user_off);
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::DeleteMode;

    use Credential::{AppPassword as App, Invalid, MainPassword as Main};
    use Decision::{Allow, Deny};
    use LoginResult::*;
    use Protocol::{Imap, Smtp};

    /// The kinds of account the rules tell apart.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Unknown,
        /// imap and smtp both on.
        Ordinary,
        ImapOff,
        SmtpOff,
        BothOff,
        TwoStep,
        /// two-step with imap off: the two-step refusal comes first.
        TwoStepImapOff,
        Federated,
        /// federated with imap off.
        FederatedImapOff,
        /// federated and two-step at once.
        FederatedTwoStep,
    }

    #[derive(Debug, Clone, Copy)]
    enum Org {
        None,
        AllowAll,
        ImapDenied,
        SmtpDenied,
        BothDenied,
    }

    fn account(kind: Kind) -> Option<Account> {
        let mut a = Account {
            address: "user@example.com".into(),
            password: None,
            imap: Switch::Enabled,
            smtp: Switch::Enabled,
            two_step: false,
            federated: None,
            app_passwords: Vec::new(),
            imap_folders: None,
            imap_delete: DeleteMode::MarkOnly,
        };
        match kind {
            Kind::Unknown => return None,
            Kind::Ordinary => {}
            Kind::ImapOff => a.imap = Switch::Disabled,
            Kind::SmtpOff => a.smtp = Switch::Disabled,
            Kind::BothOff => {
                a.imap = Switch::Disabled;
                a.smtp = Switch::Disabled;
            }
            Kind::TwoStep => a.two_step = true,
            Kind::TwoStepImapOff => {
                a.two_step = true;
                a.imap = Switch::Disabled;
            }
            Kind::Federated => a.federated = Some("google".into()),
            Kind::FederatedImapOff => {
                a.federated = Some("google".into());
                a.imap = Switch::Disabled;
            }
            Kind::FederatedTwoStep => {
                a.federated = Some("facebook".into());
                a.two_step = true;
            }
        }
        Some(a)
    }

    fn org(o: Org) -> Option<Organisation> {
        let (imap, smtp) = match o {
            Org::None => return None,
            Org::AllowAll => (Access::Allowed, Access::Allowed),
            Org::ImapDenied => (Access::Denied, Access::Allowed),
            Org::SmtpDenied => (Access::Allowed, Access::Denied),
            Org::BothDenied => (Access::Denied, Access::Denied),
        };
        Some(Organisation { imap, smtp })
    }

    #[test]
    fn decision_table() {
        #[rustfmt::skip]
        let table: &[(Kind, Org, Credential, Protocol, Decision)] = &[
            // Rule 1: nothing is revealed before the credential is proven.
            (Kind::Unknown,   Org::None,       Main,    Imap, Deny(InvalidCredentials)),
            (Kind::Unknown,   Org::None,       App,     Smtp, Deny(InvalidCredentials)),
            (Kind::Unknown,   Org::BothDenied, Invalid, Imap, Deny(InvalidCredentials)),
            (Kind::Ordinary,  Org::None,       Invalid, Imap, Deny(InvalidCredentials)),
            (Kind::Ordinary,  Org::None,       Invalid, Smtp, Deny(InvalidCredentials)),
            (Kind::BothOff,   Org::BothDenied, Invalid, Imap, Deny(InvalidCredentials)),
            (Kind::BothOff,   Org::BothDenied, Invalid, Smtp, Deny(InvalidCredentials)),
            (Kind::TwoStep,   Org::None,       Invalid, Imap, Deny(InvalidCredentials)),
            (Kind::Federated, Org::None,       Main,    Imap, Deny(InvalidCredentials)),
            (Kind::Federated, Org::None,       Main,    Smtp, Deny(InvalidCredentials)),
            (Kind::Federated, Org::None,       Invalid, Imap, Deny(InvalidCredentials)),
            (Kind::Federated, Org::None,       Invalid, Smtp, Deny(InvalidCredentials)),
            // A federated account's "main password" is refused as invalid even when every
            // policy reason would also apply.
            (Kind::FederatedImapOff, Org::BothDenied, Main, Imap, Deny(InvalidCredentials)),
            (Kind::FederatedTwoStep, Org::None,       Main, Imap, Deny(InvalidCredentials)),
            // Rule 2: the main password of a two-step account is refused before any policy.
            (Kind::TwoStep,        Org::None,       Main, Imap, Deny(AppPasswordRequired)),
            (Kind::TwoStep,        Org::None,       Main, Smtp, Deny(AppPasswordRequired)),
            (Kind::TwoStepImapOff, Org::None,       Main, Imap, Deny(AppPasswordRequired)),
            (Kind::TwoStep,        Org::BothDenied, Main, Imap, Deny(AppPasswordRequired)),
            (Kind::TwoStep,        Org::BothDenied, Main, Smtp, Deny(AppPasswordRequired)),
            // ... and its app passwords go on to the policy checks.
            (Kind::TwoStep,        Org::None,       App,  Imap, Allow),
            (Kind::TwoStep,        Org::None,       App,  Smtp, Allow),
            (Kind::TwoStepImapOff, Org::None,       App,  Imap, Deny(ImapDisabled)),
            (Kind::TwoStep,        Org::ImapDenied, App,  Imap, Deny(PolicyDenied)),
            // Federated accounts get in with an app password, then face the same policy.
            (Kind::Federated,        Org::None,       App, Imap, Allow),
            (Kind::Federated,        Org::None,       App, Smtp, Allow),
            (Kind::FederatedImapOff, Org::None,       App, Imap, Deny(ImapDisabled)),
            (Kind::FederatedImapOff, Org::None,       App, Smtp, Allow),
            (Kind::Federated,        Org::SmtpDenied, App, Smtp, Deny(PolicyDenied)),
            (Kind::FederatedTwoStep, Org::None,       App, Imap, Allow),
            // Rule 3: the organisation denies before the user's switch is looked at.
            (Kind::Ordinary, Org::ImapDenied, Main, Imap, Deny(PolicyDenied)),
            (Kind::Ordinary, Org::ImapDenied, Main, Smtp, Allow),
            (Kind::Ordinary, Org::SmtpDenied, Main, Smtp, Deny(PolicyDenied)),
            (Kind::Ordinary, Org::SmtpDenied, Main, Imap, Allow),
            (Kind::ImapOff,  Org::ImapDenied, Main, Imap, Deny(PolicyDenied)),
            (Kind::SmtpOff,  Org::SmtpDenied, Main, Smtp, Deny(PolicyDenied)),
            (Kind::BothOff,  Org::BothDenied, App,  Imap, Deny(PolicyDenied)),
            (Kind::BothOff,  Org::BothDenied, App,  Smtp, Deny(PolicyDenied)),
            // Rule 4: the user's switch, per protocol.
            (Kind::ImapOff, Org::None,     Main, Imap, Deny(ImapDisabled)),
            (Kind::ImapOff, Org::None,     Main, Smtp, Allow),
            (Kind::ImapOff, Org::AllowAll, App,  Imap, Deny(ImapDisabled)),
            (Kind::SmtpOff, Org::None,     Main, Smtp, Deny(SmtpDisabled)),
            (Kind::SmtpOff, Org::None,     Main, Imap, Allow),
            (Kind::BothOff, Org::None,     Main, Imap, Deny(ImapDisabled)),
            (Kind::BothOff, Org::None,     Main, Smtp, Deny(SmtpDisabled)),
            // The other protocol's denial does not leak into this one.
            (Kind::ImapOff, Org::SmtpDenied, Main, Imap, Deny(ImapDisabled)),
            (Kind::SmtpOff, Org::ImapDenied, Main, Smtp, Deny(SmtpDisabled)),
            // Rule 5: otherwise allowed, with either kind of credential.
            (Kind::Ordinary, Org::None,     Main, Imap, Allow),
            (Kind::Ordinary, Org::None,     Main, Smtp, Allow),
            (Kind::Ordinary, Org::AllowAll, Main, Imap, Allow),
            (Kind::Ordinary, Org::AllowAll, App,  Smtp, Allow),
            (Kind::Ordinary, Org::None,     App,  Imap, Allow),
        ];
        for &(kind, o, credential, protocol, expected) in table {
            let a = account(kind);
            let got = decide(a.as_ref(), org(o).as_ref(), credential, protocol);
            assert_eq!(
                got, expected,
                "account {kind:?}, organisation {o:?}, {credential:?}, {protocol:?}"
            );
        }
    }

    /// Every combination: the result never depends on anything the credential has not proven.
    #[test]
    fn invalid_credentials_reveal_nothing_in_any_combination() {
        let kinds = [
            Kind::Unknown,
            Kind::Ordinary,
            Kind::ImapOff,
            Kind::SmtpOff,
            Kind::BothOff,
            Kind::TwoStep,
            Kind::TwoStepImapOff,
            Kind::Federated,
            Kind::FederatedImapOff,
            Kind::FederatedTwoStep,
        ];
        let orgs = [
            Org::None,
            Org::AllowAll,
            Org::ImapDenied,
            Org::SmtpDenied,
            Org::BothDenied,
        ];
        let mut checked = 0;
        for kind in kinds {
            for o in orgs {
                for protocol in [Imap, Smtp] {
                    let a = account(kind);
                    let got = decide(a.as_ref(), org(o).as_ref(), Invalid, protocol);
                    assert_eq!(got, Deny(InvalidCredentials), "{kind:?} {o:?} {protocol:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 100);
    }
}
