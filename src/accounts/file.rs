//! The file account source (`accounts: { source: file }`): YAML as in DESIGN.md "Account data".
//!
//! Parsing is serde (`deny_unknown_fields`, hashes parsed by `PasswordHash`'s `Deserialize`), so
//! a syntax error, an unknown key, a bad value or a bad hash stops the load with serde_norway's
//! path and line. The checks serde cannot make (address syntax, duplicates after lowercasing,
//! contradictions) run afterwards, all of them, and find their line with a small scan of the text.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::model::{Account, AccountStore, AppPassword, DeleteMode, Organisation, Switch};
use super::password::PasswordHash;
use crate::config::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    organisations: Entries<Organisation>,
    #[serde(default)]
    users: Entries<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    #[serde(default)]
    password: Option<PasswordHash>,
    #[serde(default)]
    imap: Option<Switch>,
    #[serde(default)]
    smtp: Option<Switch>,
    #[serde(default)]
    two_step: bool,
    #[serde(default)]
    federated: Option<String>,
    #[serde(default)]
    app_passwords: Vec<AppPassword>,
    #[serde(default)]
    imap_folders: Option<Vec<String>>,
    #[serde(default)]
    imap_delete: DeleteMode,
}

/// A YAML mapping kept as a list of entries in file order, so that a key written twice is
/// reported instead of silently replacing the first.
struct Entries<T>(Vec<(String, T)>);

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for EntriesVisitor<T> {
            type Value = Entries<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                // `users:` with nothing under it.
                Ok(Entries(Vec::new()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, T>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        d.deserialize_any(EntriesVisitor(PhantomData))
    }
}

/// Reads, parses and validates the account file at `path`.
///
/// # Errors
/// Every problem found, each naming the file, the line and the key. A parse error stops the
/// load at the first one; the checks after parsing report all they find.
pub fn load(path: &Path) -> Result<AccountStore, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: path.to_owned(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read the account file: {e}"),
        }]
    })?;
    parse(path, &text)
}

/// Parses and validates account-file text; `path` is only used in errors.
///
/// # Errors
/// As [`load`].
pub fn parse(path: &Path, text: &str) -> Result<AccountStore, Vec<ConfigError>> {
    let raw: RawFile = if text.lines().all(is_blank_or_comment) {
        // serde_norway refuses an empty document; an empty account file is an empty store.
        RawFile {
            organisations: Entries::default(),
            users: Entries::default(),
        }
    } else {
        serde_norway::from_str(text).map_err(|e| vec![yaml_error(path, &e)])?
    };
    let mut check = Checker {
        path,
        scan: Scan::new(text),
        errors: Vec::new(),
    };
    let organisations = check.organisations(raw.organisations);
    let users = check.users(raw.users);
    if check.errors.is_empty() {
        Ok(AccountStore {
            users,
            organisations,
        })
    } else {
        Err(check.errors)
    }
}

/// Turns serde_norway's `path: message at line L column C` into a `ConfigError`.
fn yaml_error(path: &Path, e: &serde_norway::Error) -> ConfigError {
    let location = e.location();
    let mut text = e.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_owned();
        }
    }
    // serde_norway puts the key path first (`users.bob@skydesk.jp.imap: ...`) unless the error
    // is at the top level. A message of its own never starts with a space-free word and `: `.
    let (mut key, message) = match text.split_once(": ") {
        Some((key, message)) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            (key.to_owned(), message.to_owned())
        }
        _ => (String::new(), text),
    };
    // For an unknown key, name the key itself, not its parent.
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
    }
    if key.is_empty() {
        key = "(top level)".into();
    }
    ConfigError {
        file: path.to_owned(),
        line: location.map(|l| l.line()),
        key,
        message,
    }
}

struct Checker<'a> {
    path: &'a Path,
    scan: Scan<'a>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, line: Option<usize>, key: String, message: String) {
        self.errors.push(ConfigError {
            file: self.path.to_owned(),
            line,
            key,
            message,
        });
    }

    fn organisations(&mut self, raw: Entries<Organisation>) -> HashMap<String, Organisation> {
        let mut out = HashMap::new();
        // Written key and its occurrence number (for its line, looked up only for an error).
        let mut seen: HashMap<String, (String, usize)> = HashMap::new();
        let mut occurrences: HashMap<String, usize> = HashMap::new();
        for (written, organisation) in raw.0 {
            let nth = bump(&mut occurrences, &written);
            let line = |scan: &Scan<'_>| scan.entry("organisations", &written, nth);
            let key = format!("organisations.{written}");
            let domain = written.trim().to_lowercase();
            if domain.is_empty()
                || domain.contains('@')
                || domain.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                let line = line(&self.scan);
                self.error(
                    line,
                    key,
                    format!("`{written}` is not a domain (write e.g. example.com)"),
                );
                continue;
            }
            if let Some((first, first_nth)) = seen.get(&domain) {
                let first_line = self.scan.entry("organisations", first, *first_nth);
                let message = duplicate_message(first, first_line);
                let line = line(&self.scan);
                self.error(line, key, message);
                continue;
            }
            seen.insert(domain.clone(), (written, nth));
            out.insert(domain, organisation);
        }
        out
    }

    fn users(&mut self, raw: Entries<RawUser>) -> HashMap<String, Arc<Account>> {
        let mut out = HashMap::new();
        // As in `organisations`: an entry's line is looked up (a scan of the file) only for an
        // error, so a file of many users parses in linear time.
        let mut seen: HashMap<String, (String, usize)> = HashMap::new();
        let mut occurrences: HashMap<String, usize> = HashMap::new();
        for (written, user) in raw.0 {
            let nth = bump(&mut occurrences, &written);
            let line = |scan: &Scan<'_>| scan.entry("users", &written, nth);
            let key = format!("users.{written}");
            let address = written.trim().to_lowercase();
            if !is_address(&address) {
                let line = line(&self.scan);
                self.error(
                    line,
                    key,
                    format!("`{written}` is not a full address (write user@domain)"),
                );
                continue;
            }
            if let Some((first, first_nth)) = seen.get(&address) {
                let first_line = self.scan.entry("users", first, *first_nth);
                let message = duplicate_message(first, first_line);
                let line = line(&self.scan);
                self.error(line, key, message);
                continue;
            }
            let errors_before = self.errors.len();
            self.check_user(&user, &key, None);
            if self.errors.len() > errors_before {
                // Checked again, now with the lines the errors point to.
                self.errors.truncate(errors_before);
                let line = line(&self.scan);
                self.check_user(&user, &key, line);
            }
            seen.insert(address.clone(), (written, nth));
            if self.errors.len() == errors_before {
                let account = Account {
                    address: address.clone(),
                    password: user.password,
                    imap: user.imap.unwrap_or(Switch::Disabled),
                    smtp: user.smtp.unwrap_or(Switch::Enabled),
                    two_step: user.two_step,
                    federated: user.federated,
                    app_passwords: user.app_passwords,
                    imap_folders: user.imap_folders,
                    imap_delete: user.imap_delete,
                };
                out.insert(address, Arc::new(account));
            }
        }
        out
    }

    /// The checks on one user that serde cannot make. `line` is the line of the user's key.
    fn check_user(&mut self, user: &RawUser, key: &str, line: Option<usize>) {
        let field = |scan: &Scan<'_>, name: &str, nth: usize| -> Option<usize> {
            line.and_then(|l| scan.field(l, name, nth)).or(line)
        };
        if let Some(provider) = &user.federated {
            if provider.trim().is_empty() {
                let l = field(&self.scan, "federated", 0);
                self.error(
                    l,
                    format!("{key}.federated"),
                    "name the identity provider (e.g. google)".into(),
                );
            }
            if user.password.is_some() {
                let l = field(&self.scan, "password", 0);
                self.error(
                    l,
                    format!("{key}.password"),
                    format!(
                        "a federated account (federated: {provider}) has no password of its \
                         own; remove `password` or `federated`"
                    ),
                );
            }
        } else if user.password.is_none() && user.app_passwords.is_empty() {
            self.error(
                line,
                key.to_owned(),
                "no `password`, `federated` or `app_passwords`: nobody could log in as this user"
                    .into(),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, app) in user.app_passwords.iter().enumerate() {
            let name = app.name.trim();
            let l = field(&self.scan, "name", i);
            if name.is_empty() {
                self.error(
                    l,
                    format!("{key}.app_passwords[{i}].name"),
                    "an app password needs a name (the user revokes it by name)".into(),
                );
            } else if let Some(first) = names.insert(name, i) {
                self.error(
                    l,
                    format!("{key}.app_passwords[{i}].name"),
                    format!("`{name}` is already the name of app_passwords[{first}]"),
                );
            }
        }
        if let Some(folders) = &user.imap_folders {
            let l = field(&self.scan, "imap_folders", 0);
            if folders.is_empty() {
                self.error(
                    l,
                    format!("{key}.imap_folders"),
                    "an empty list would hide every folder, INBOX too; leave the key out to \
                     show all folders"
                        .into(),
                );
            }
            for (i, folder) in folders.iter().enumerate() {
                if folder.trim().is_empty() {
                    self.error(
                        l,
                        format!("{key}.imap_folders[{i}]"),
                        "empty folder name".into(),
                    );
                }
            }
        }
    }
}

fn bump(occurrences: &mut HashMap<String, usize>, key: &str) -> usize {
    let n = occurrences.entry(key.to_owned()).or_insert(0);
    let nth = *n;
    *n += 1;
    nth
}

fn duplicate_message(first: &str, first_line: Option<usize>) -> String {
    match first_line {
        Some(l) => format!("the same as `{first}` on line {l} (compared in lowercase)"),
        None => format!("the same as `{first}` (compared in lowercase)"),
    }
}

/// `local@domain`, one `@`, no spaces or control characters (a NUL could not reach the cache
/// key unambiguously, and no mail server accepts such an address anyway).
fn is_address(address: &str) -> bool {
    match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !address.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t == "---"
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// A line finder for errors found after parsing: serde has forgotten where things were, and
/// the account file is simple enough (a section, its entries, their fields) that a scan by
/// indentation finds the line an operator needs to look at.
struct Scan<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Scan<'a> {
    fn new(text: &'a str) -> Scan<'a> {
        Scan {
            lines: text.lines().collect(),
        }
    }

    /// The 1-based line of the `nth` (0-based) occurrence of `key:` under the top-level
    /// `section:`.
    fn entry(&self, section: &str, key: &str, nth: usize) -> Option<usize> {
        let start = self.lines.iter().position(|l| {
            indent(l) == 0
                && l.strip_prefix(section)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })?;
        let candidates = [key.to_owned(), format!("\"{key}\""), format!("'{key}'")];
        let mut seen = 0;
        for (i, line) in self.lines.iter().enumerate().skip(start + 1) {
            if is_blank_or_comment(line) {
                continue;
            }
            if indent(line) == 0 {
                break;
            }
            let t = line.trim_start();
            let is_key = candidates.iter().any(|c| {
                t.strip_prefix(c.as_str())
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            });
            if is_key {
                if seen == nth {
                    return Some(i + 1);
                }
                seen += 1;
            }
        }
        None
    }

    /// The 1-based line of the `nth` occurrence of `field:` inside the entry whose key is on
    /// 1-based line `entry_line` (on that line itself, for flow style, or below it).
    fn field(&self, entry_line: usize, field: &str, nth: usize) -> Option<usize> {
        let first = entry_line.checked_sub(1)?;
        let entry_indent = indent(self.lines.get(first)?);
        let mut seen = 0;
        for (i, line) in self.lines.iter().enumerate().skip(first) {
            if i > first && !is_blank_or_comment(line) && indent(line) <= entry_indent {
                break;
            }
            // On the entry's own line, skip the entry key (which may contain `field:`).
            let text = if i == first {
                line.split_once(':').map_or("", |(_, rest)| rest)
            } else {
                line
            };
            let text = text.split(" #").next().unwrap_or(text);
            for (pos, _) in text.match_indices(field) {
                let before = text.get(..pos).and_then(|t| t.chars().next_back());
                let after = text.get(pos + field.len()..).unwrap_or("").trim_start();
                let starts_token = matches!(before, None | Some(' ' | '{' | ',' | '-' | '\t'));
                if starts_token && after.starts_with(':') {
                    if seen == nth {
                        return Some(i + 1);
                    }
                    seen += 1;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::AccountStore;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("accounts.yaml"), text) {
            Ok(store) => panic!("accepted, {} users", store.len()),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    const ARGON: &str = "$argon2id$v=19$m=256,t=1,p=1$PdHzxHuJEe528T4iH7j+Cw$8lnJf9j7w2mbZrR8hqnlzVbSu5hZ7HZYbgwEo2mbp0c";

    #[test]
    fn defaults_and_lowercasing() {
        let text = format!(
            "organisations:\n  Example.COM: {{ imap: denied }}\nusers:\n  Dave@Example.com:\n    password: \"{ARGON}\"\n"
        );
        let store = match parse(Path::new("a.yaml"), &text) {
            Ok(s) => s,
            Err(e) => panic!("{e:?}"),
        };
        let dave = store.user("dave@example.com").map(|a| a.as_ref().clone());
        let dave = dave.unwrap_or_else(|| panic!("dave missing"));
        assert_eq!(dave.address, "dave@example.com");
        assert_eq!(dave.imap, Switch::Disabled, "imap absent = disabled");
        assert_eq!(dave.smtp, Switch::Enabled, "smtp absent = enabled");
        assert!(!dave.two_step);
        assert_eq!(dave.imap_delete, DeleteMode::MarkOnly);
        assert_eq!(dave.imap_folders, None);
        assert!(!dave.needs_imap_filter());
        let org = store.organisation("example.com").copied();
        assert_eq!(
            org,
            Some(Organisation {
                imap: super::super::Access::Denied,
                smtp: super::super::Access::Allowed
            })
        );
        assert_eq!(store.organisation_of("dave@example.com"), org.as_ref());
    }

    #[test]
    fn empty_file_is_an_empty_store() {
        for text in [
            "",
            "# nobody yet\n",
            "users:\n",
            "organisations: {}\nusers: {}\n",
        ] {
            match parse(Path::new("a.yaml"), text) {
                Ok(store) => assert!(store.is_empty(), "{text:?}"),
                Err(e) => panic!("{text:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn semantic_errors_name_line_and_key_and_are_all_reported() {
        let text = format!(
            "users:
  alice@skydesk.jp:
    password: \"{ARGON}\"
  Alice@Skydesk.JP:
    password: \"{ARGON}\"
  carol@skydesk.jp:
    federated: google
    password: \"{ARGON}\"
  nobody@skydesk.jp:
    imap: enabled
  bare:
    password: \"{ARGON}\"
  dave@example.com:
    password: \"{ARGON}\"
    imap_folders: []
    app_passwords:
      - {{ name: phone, hash: \"{ARGON}\" }}
      - {{ name: phone, hash: \"{ARGON}\" }}
organisations:
  example.com: {{ imap: denied }}
  EXAMPLE.com: {{ smtp: denied }}
"
        );
        let got = errors(&text);
        let expected = [
            "accounts.yaml:21: organisations.EXAMPLE.com: the same as `example.com` on line 20 (compared in lowercase)",
            "accounts.yaml:4: users.Alice@Skydesk.JP: the same as `alice@skydesk.jp` on line 2 (compared in lowercase)",
            "accounts.yaml:8: users.carol@skydesk.jp.password: a federated account (federated: google) has no password of its own; remove `password` or `federated`",
            "accounts.yaml:9: users.nobody@skydesk.jp: no `password`, `federated` or `app_passwords`: nobody could log in as this user",
            "accounts.yaml:11: users.bare: `bare` is not a full address (write user@domain)",
            "accounts.yaml:18: users.dave@example.com.app_passwords[1].name: `phone` is already the name of app_passwords[0]",
            "accounts.yaml:15: users.dave@example.com.imap_folders: an empty list would hide every folder, INBOX too; leave the key out to show all folders",
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn an_exact_duplicate_key_is_reported_not_overwritten() {
        let text = format!(
            "users:\n  eve@skydesk.jp:\n    password: \"{ARGON}\"\n  eve@skydesk.jp:\n    password: \"{ARGON}\"\n    imap: enabled\n"
        );
        assert_eq!(
            errors(&text),
            ["accounts.yaml:4: users.eve@skydesk.jp: the same as `eve@skydesk.jp` on line 2 (compared in lowercase)"]
        );
    }

    #[test]
    fn parse_errors_name_line_and_key() {
        let cases = [
            (
                "users:\n  eve@skydesk.jp:\n    imap: on\n".to_owned(),
                "accounts.yaml:3: users.eve@skydesk.jp.imap: unknown variant `on`, expected `enabled` or `disabled`",
            ),
            (
                format!("users:\n  eve@skydesk.jp:\n    password: \"{ARGON}\"\n    imapp: enabled\n"),
                "accounts.yaml:4: users.eve@skydesk.jp.imapp: unknown field `imapp`, expected one of",
            ),
            (
                "usres: {}\n".to_owned(),
                "accounts.yaml:1: usres: unknown field `usres`, expected `organisations` or `users`",
            ),
            (
                "users:\n  bob@skydesk.jp:\n    app_passwords:\n      - { name: x, hash: \"$2b$04$short\" }\n".to_owned(),
                "accounts.yaml:4: users.bob@skydesk.jp.app_passwords[0].hash: not a supported hash: bcrypt:",
            ),
            (
                "users: [\n".to_owned(),
                "accounts.yaml:1: users: invalid type: sequence, expected a mapping",
            ),
            (
                "users:\n  alice@skydesk.jp:\n    imap: enabled\n   smtp: enabled\n".to_owned(),
                "accounts.yaml:4: (top level): did not find expected key",
            ),
            (
                "organisations:\n  strict.example: { imap: forbidden }\n".to_owned(),
                "accounts.yaml:2: organisations.strict.example.imap: unknown variant `forbidden`, expected `allowed` or `denied`",
            ),
        ];
        for (text, expected) in cases {
            let got = errors(&text);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got.first().is_some_and(|g| g.starts_with(expected)),
                "got {got:?}\nwanted {expected}"
            );
        }
    }

    fn testdata(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// Each invalid fixture fails with exactly one error: its line, its key, its message.
    #[test]
    fn invalid_fixtures_fail_with_the_right_message() {
        let cases = [
            (
                "unknown-key.yaml",
                5,
                "users.alice@skydesk.jp.imapp",
                "unknown field `imapp`, expected one of `password`, `imap`, `smtp`, `two_step`, \
                 `federated`, `app_passwords`, `imap_folders`, `imap_delete`",
            ),
            (
                "bad-hash.yaml",
                8,
                "users.bob@skydesk.jp.app_passwords[0].hash",
                "not a supported hash: expected an argon2 PHC string ($argon2id$...), bcrypt \
                 ($2b$...) or SHA512-CRYPT ($6$...)",
            ),
            (
                "bad-imap.yaml",
                5,
                "users.eve@skydesk.jp.imap",
                "unknown variant `yes-please`, expected `enabled` or `disabled`",
            ),
            (
                "duplicate-address.yaml",
                5,
                "users.Dave@Example.COM",
                "the same as `dave@example.com` on line 3 (compared in lowercase)",
            ),
            (
                "federated-with-password.yaml",
                5,
                "users.carol@skydesk.jp.password",
                "a federated account (federated: google) has no password of its own; remove \
                 `password` or `federated`",
            ),
            (
                "bad-organisation.yaml",
                2,
                "organisations.strict.example.pop3",
                "unknown field `pop3`, expected `imap` or `smtp`",
            ),
        ];
        for (name, line, key, message) in cases {
            let path = testdata(&format!("testdata/accounts/invalid/{name}"));
            let errors = match AccountStore::load(&path) {
                Ok(_) => panic!("{name} accepted"),
                Err(errors) => errors,
            };
            let expected = ConfigError {
                file: path.clone(),
                line: Some(line),
                key: key.into(),
                message: message.into(),
            };
            assert_eq!(errors, [expected], "{name}");
        }
    }

    #[test]
    fn a_yaml_syntax_error_names_file_and_line() {
        let path = testdata("testdata/accounts/invalid/not-yaml.yaml");
        let errors = AccountStore::load(&path).err().unwrap_or_default();
        let [error] = errors.as_slice() else {
            panic!("{errors:?}");
        };
        assert_eq!(error.file, path);
        assert!(error.line.is_some_and(|l| l >= 3), "{error}");
        assert!(error.message.contains("quoted scalar"), "{error}");
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_panic() {
        let path = testdata("testdata/accounts/no-such-file.yaml");
        let errors = AccountStore::load(&path).err().unwrap_or_default();
        let [error] = errors.as_slice() else {
            panic!("{errors:?}");
        };
        assert_eq!(error.line, None);
        assert!(
            error.message.starts_with("cannot read the account file"),
            "{error}"
        );
    }

    #[test]
    fn the_demo_file_loads_with_every_account() {
        let store = match AccountStore::load(&testdata("config/accounts.yaml")) {
            Ok(store) => store,
            Err(errors) => panic!("{errors:?}"),
        };
        assert_eq!(store.len(), 9);
        assert_eq!(store.organisations_len(), 3);
        let grace = store.user("grace@example.com");
        assert!(grace.is_some_and(|g| g.needs_imap_filter()
            && g.imap_folders.as_deref()
                == Some(&["INBOX".into(), "Sent".into(), "Work".into()][..])
            && g.imap_delete == DeleteMode::ExpungeImmediately));
    }

    #[test]
    fn scan_finds_fields_in_block_and_flow_style() {
        let text = "users:\n  a@b.c: { password: x, imap: enabled }\n  d@e.f:\n    # imap: no\n    imap: enabled\n    app_passwords: [ { name: p, hash: h }, { name: q, hash: h } ]\n  g@h.i:\n    imap: disabled\n";
        let scan = Scan::new(text);
        assert_eq!(scan.entry("users", "a@b.c", 0), Some(2));
        assert_eq!(scan.field(2, "imap", 0), Some(2));
        assert_eq!(scan.entry("users", "d@e.f", 0), Some(3));
        assert_eq!(scan.field(3, "imap", 0), Some(5));
        assert_eq!(scan.field(3, "name", 1), Some(6));
        assert_eq!(scan.field(3, "name", 2), None, "stops at the next entry");
        assert_eq!(scan.entry("users", "x@y.z", 0), None);
        assert_eq!(scan.entry("organisations", "a@b.c", 0), None);
    }
}
