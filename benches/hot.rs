//! `cargo bench --bench hot`: the pure functions on every login's path, a figure per call.
//!
//! - `preauth`: [`PreAuth::input`] from a fresh session to the login event, for the ways
//!   clients log in (LOGIN, AUTHENTICATE PLAIN with SASL-IR, ID then LOGIN, a literal).
//! - `decide`: [`policy::decide`] for the rows of the decision table.
//! - `order`: [`Pool::order`], the rendezvous ranking of a pool's backends for one user.
//! - `accounts`: [`AccountStore::parse`] of an account file of N users (start-up, `mailgate
//!   check` and every reload), per file: linear in N, which the figures for 1,000 and 10,000
//!   users show.

use std::hint::black_box;

use mailgate::accounts::{
    hash_password, Access, Account, AccountStore, DeleteMode, Organisation, PasswordHash, Switch,
};
use mailgate::config::{HealthConfig, Protocol, SmtpLogin};
use mailgate::imap::session::{Event, PreAuth, SessionConfig};
use mailgate::policy::{self, Credential, Decision};
use mailgate::routing::{Backend, Backends, ImapLogin, Pool};

fn main() {
    divan::main();
}

mod preauth {
    use super::*;

    const TLS: SessionConfig = SessionConfig {
        tls_active: true,
        starttls_offered: false,
    };

    /// Feeds `chunks` to a fresh session; returns whether the last step was the login event.
    fn run(chunks: &[&[u8]]) -> bool {
        let mut session = PreAuth::new(TLS);
        let mut login = false;
        for chunk in chunks {
            let step = session.input(black_box(chunk));
            login = matches!(step.event, Some(Event::Login(_)));
        }
        login
    }

    #[divan::bench]
    fn login_command() -> bool {
        run(&[b"a1 LOGIN user1234@skydesk.jp \"pass-1234\"\r\n"])
    }

    #[divan::bench]
    fn authenticate_plain_sasl_ir() -> bool {
        // base64("\0user1234@skydesk.jp\0pass-1234")
        run(&[b"a1 AUTHENTICATE PLAIN AHVzZXIxMjM0QHNreWRlc2suanAAcGFzcy0xMjM0\r\n"])
    }

    #[divan::bench]
    fn capability_id_login() -> bool {
        run(&[
            b"a1 CAPABILITY\r\n",
            b"a2 ID (\"name\" \"Thunderbird\" \"version\" \"128.5.0\")\r\n",
            b"a3 LOGIN user1234@skydesk.jp \"pass-1234\"\r\n",
        ])
    }

    #[divan::bench]
    fn login_with_literal_plus() -> bool {
        run(&[b"a1 LOGIN {19+}\r\nuser1234@skydesk.jp {9+}\r\npass-1234\r\n"])
    }

    /// The login line arriving one byte per read (the worst case for the framer).
    #[divan::bench]
    fn login_byte_by_byte() -> bool {
        let line = b"a1 LOGIN user1234@skydesk.jp \"pass-1234\"\r\n";
        let chunks: Vec<&[u8]> = line.chunks(1).collect();
        run(&chunks)
    }
}

mod decide {
    use super::*;

    fn account(two_step: bool, imap: Switch) -> Account {
        Account {
            address: "user1234@skydesk.jp".to_owned(),
            password: hash_password(b"pass-1234").parse::<PasswordHash>().ok(),
            imap,
            smtp: Switch::Enabled,
            two_step,
            federated: None,
            app_passwords: Vec::new(),
            imap_folders: None,
            imap_delete: DeleteMode::MarkOnly,
        }
    }

    #[divan::bench]
    fn allow(bencher: divan::Bencher) {
        let account = account(false, Switch::Enabled);
        bencher.bench(|| {
            let decision = policy::decide(
                black_box(Some(&account)),
                black_box(None),
                black_box(Credential::MainPassword),
                black_box(Protocol::Imap),
            );
            debug_assert_eq!(decision, Decision::Allow);
            decision
        });
    }

    #[divan::bench]
    fn two_step_main_password(bencher: divan::Bencher) {
        let account = account(true, Switch::Enabled);
        bencher.bench(|| {
            policy::decide(
                black_box(Some(&account)),
                black_box(None),
                black_box(Credential::MainPassword),
                black_box(Protocol::Imap),
            )
        });
    }

    #[divan::bench]
    fn organisation_denies(bencher: divan::Bencher) {
        let account = account(false, Switch::Enabled);
        let organisation = Organisation {
            imap: Access::Denied,
            smtp: Access::Allowed,
        };
        bencher.bench(|| {
            policy::decide(
                black_box(Some(&account)),
                black_box(Some(&organisation)),
                black_box(Credential::AppPassword),
                black_box(Protocol::Imap),
            )
        });
    }

    #[divan::bench]
    fn unknown_user() -> Decision {
        policy::decide(
            black_box(None),
            black_box(None),
            black_box(Credential::Invalid),
            black_box(Protocol::Imap),
        )
    }
}

mod order {
    use super::*;

    fn pool(backends: usize) -> Pool {
        let imap = (0..backends)
            .map(|i| Backend::new(format!("10.0.{}.{}:143", i / 250, i % 250 + 1)))
            .collect();
        Pool::new(
            "imap",
            Backends::new(imap, Vec::new()),
            mailgate::backend::Transport::plain(
                mailgate::resolver::Resolver::system().expect("resolver"),
            ),
            ImapLogin::Passthrough,
            SmtpLogin::Xclient,
            HealthConfig::default(),
        )
    }

    #[divan::bench(args = [1, 3, 10, 50])]
    fn backends(bencher: divan::Bencher, n: usize) {
        let pool = pool(n);
        bencher.bench(|| {
            pool.order(black_box(Protocol::Imap), black_box("user1234@skydesk.jp"))
                .len()
        });
    }
}

mod accounts {
    use super::*;
    use std::fmt::Write as _;
    use std::path::Path;

    /// An account file of `users` users in the shape of a real one: an argon2id hash each,
    /// every tenth with two-step verification and an app password, a few organisations.
    fn file(users: usize) -> String {
        let hash = hash_password(b"pass-1234");
        let mut text = String::from(
            "organisations:\n  example.com: { imap: allowed, smtp: allowed }\n  \
             strict.example: { imap: denied, smtp: allowed }\nusers:\n",
        );
        for i in 0..users {
            let domain = ["skydesk.jp", "example.com", "strict.example"][i % 3];
            let _ = writeln!(
                text,
                "  user{i}@{domain}:\n    password: \"{hash}\"\n    imap: enabled"
            );
            if i % 10 == 0 {
                let _ = writeln!(
                    text,
                    "    two_step: true\n    app_passwords:\n      - {{ name: phone, hash: \"{hash}\" }}"
                );
            }
        }
        text
    }

    #[divan::bench(args = [1_000, 10_000], sample_count = 20, sample_size = 1)]
    fn parse(bencher: divan::Bencher, users: usize) {
        let text = file(users);
        let path = Path::new("accounts.yaml");
        let store = AccountStore::parse(path, &text).expect("the generated file is valid");
        assert_eq!(store.len(), users);
        bencher.bench(|| AccountStore::parse(path, black_box(&text)).is_ok());
    }
}
