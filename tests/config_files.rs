//! Every shipped config file and every fixture under `testdata/config/` is loaded here.
//!
//! Cargo runs integration tests in the crate root, which is what the relative paths in these
//! files are relative to (as they are for `mailgate run` started from the repository root).
//!
//! Invalid fixtures say what they must fail with on their first lines:
//! `# expect: 7: listeners[0].adress: unknown field` means some error reads
//! `testdata/config/invalid/<file>.yaml:7: listeners[0].adress: unknown field ...`; one line per
//! expected error, and there must be no others.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use mailgate::config::{Config, ConfigError};

fn show(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}\n"))
        .collect::<String>()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yaml files in {dir}");
    files
}

#[test]
fn shipped_development_config_loads() {
    let accounts = Path::new("config/accounts.yaml");
    assert!(
        accounts.exists(),
        "config/mailgate.yaml names config/accounts.yaml, which is not there: it comes with \
         the account loader's branch; merge that too"
    );
    let config = Config::load(Path::new("config/mailgate.yaml"))
        .unwrap_or_else(|errors| panic!("config/mailgate.yaml:\n{}", show(&errors)));

    let listeners: Vec<(&str, String)> = config
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.address.to_string()))
        .collect();
    assert_eq!(
        listeners,
        [
            ("imaps", "127.0.0.1:10993".to_string()),
            ("imap", "127.0.0.1:10143".to_string()),
            ("submissions", "127.0.0.1:10465".to_string()),
            ("submission", "127.0.0.1:10587".to_string()),
        ]
    );
    assert!(config.tls.self_signed_if_missing);
    assert_eq!(
        config
            .master_password("imap")
            .map(|s| s.expose().to_string())
            .ok(),
        Some("masterpass".to_string())
    );
    assert_eq!(config.pools["imappro"].imap, ["127.0.0.1:22143"]);
    // The development file writes the defaults out: it must say what the code defaults to.
    let defaults = mailgate::config::Limits::default();
    assert_eq!(format!("{:?}", config.limits), format!("{defaults:?}"));
}

#[test]
fn production_example_fails_only_on_files_absent_here() {
    let path = Path::new("config/production.example.yaml");
    let errors = match Config::load(path) {
        Ok(_) => panic!(
            "{} loaded: are its /etc/mailgate files present here?",
            path.display()
        ),
        Err(errors) => errors,
    };
    let keys: BTreeSet<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "tls.certificates[0].cert",
        "tls.certificates[0].key",
        "tls.certificates[1].cert",
        "tls.certificates[1].key",
        "accounts.path",
        "pools.imap.login.password_file",
        "pools.imappro.login.password_file",
        "pools.imappro-dedicated.login.password_file",
        "pools.imappro-dedicated.backend_ca",
        "pools.imappro-dedicated.backend_client_certificate.cert",
        "pools.imappro-dedicated.backend_client_certificate.key",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected, "errors:\n{}", show(&errors));
    assert_eq!(errors.len(), expected.len(), "errors:\n{}", show(&errors));
    for e in &errors {
        assert!(
            e.message.starts_with("`/etc/mailgate/") && e.message.ends_with("` does not exist"),
            "not a missing-file error: {e}"
        );
        assert!(e.line.is_some(), "no line: {e}");
    }
}

#[test]
fn valid_fixtures_load() {
    for path in yaml_files("testdata/config/valid") {
        if let Err(errors) = Config::load(&path) {
            panic!("{} should load:\n{}", path.display(), show(&errors));
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_their_expected_errors() {
    for path in yaml_files("testdata/config/invalid") {
        let text = fs::read_to_string(&path).expect("fixture is readable");
        let expects: Vec<&str> = text
            .lines()
            .map_while(|line| line.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect: ` first line",
            path.display()
        );
        let errors = match Config::load(&path) {
            Ok(_) => panic!("{} loaded, but should fail", path.display()),
            Err(errors) => errors,
        };
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for expect in &expects {
            // `7: key: ...` has a line; `key: ...` is for a key the file lacks.
            let wanted = if expect.starts_with(|c: char| c.is_ascii_digit()) {
                format!("{}:{expect}", path.display())
            } else {
                format!("{}: {expect}", path.display())
            };
            assert!(
                shown.iter().any(|e| e.starts_with(&wanted)),
                "{}: no error starts with\n  {wanted}\nerrors:\n{}",
                path.display(),
                show(&errors)
            );
        }
        assert_eq!(
            errors.len(),
            expects.len(),
            "{}: more errors than expected:\n{}",
            path.display(),
            show(&errors)
        );
    }
}
