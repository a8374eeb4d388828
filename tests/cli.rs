//! The `mailgate` command line as an operator uses it: `check` on good and broken configs,
//! `hash-password`, `--version`, and what `run` logs (JSON lines; the session line and the
//! `RUST_LOG` filter that leaves it out).

use std::io::Write;
use std::process::{Command, Stdio};

fn mailgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run mailgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_config() {
    let (code, stdout, stderr) = mailgate(&["check", "--config", "config/mailgate.yaml"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("config/mailgate.yaml: ok (4 listeners, 2 pools,"),
        "{stdout}"
    );
}

#[test]
fn check_names_file_line_and_key_of_a_typo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mailgate.yaml"))
            .expect("read");
    let broken = text.replacen(
        "    address: 127.0.0.1:10143",
        "    adress: 127.0.0.1:10143",
        1,
    );
    assert_ne!(
        broken, text,
        "the shipped config changed shape; update this test"
    );
    let line = broken
        .lines()
        .position(|l| l.contains("adress:"))
        .expect("line")
        + 1;
    let path = dir.path().join("typo.yaml");
    std::fs::write(&path, broken).expect("write");
    let (code, stdout, stderr) = mailgate(&["check", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let want = format!("{}:{line}: listeners[1].adress:", path.display());
    assert!(stderr.contains(&want), "want `{want}` in:\n{stderr}");
}

#[test]
fn check_names_a_missing_certificate_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mailgate.yaml"))
            .expect("read");
    let broken = text
        .replace(
            "self_signed_if_missing: true",
            "self_signed_if_missing: false",
        )
        .replace(
            "config/dev/tls/mailgate.crt",
            "/nonexistent/mailgate/tls/server.crt",
        );
    let path = dir.path().join("nocert.yaml");
    std::fs::write(&path, broken).expect("write");
    let (code, _, stderr) = mailgate(&["check", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/mailgate/tls/server.crt"),
        "{stderr}"
    );
}

#[test]
fn hash_password_prints_an_argon2id_hash_that_verifies() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s3cret pass\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    let parsed: mailgate::accounts::PasswordHash = hash.parse().expect("parses");
    assert!(parsed.verify(b"s3cret pass"));
    assert!(!parsed.verify(b"s3cret pass\n"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));
}

#[test]
fn version_is_the_crate_version() {
    let (code, stdout, _) = mailgate(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("mailgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_running, rx) = start_run(dir.path(), &["--log-format", "json"], None);
    let listening = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(line) if line.contains("listening") => break line,
            Ok(_) => continue,
            Err(e) => panic!("no `listening` line: {e}"),
        }
    };
    assert!(
        listening.starts_with('{') && listening.ends_with('}'),
        "{listening}"
    );
    assert!(
        listening.contains(r#""message":"listening""#),
        "{listening}"
    );
    assert!(listening.contains(r#""listener":"plain""#), "{listening}");
    assert!(listening.contains(r#""level":"INFO""#), "{listening}");
}

/// A config with one plaintext IMAP listener on a free port and a pool nobody answers on.
fn plain_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = format!(
        r#"listeners:
  - {{ name: plain, protocol: imap, address: "127.0.0.1:0", tls: none }}
tls:
  certificates: []
accounts: {{ source: file, path: "{root}/config/accounts.yaml" }}
routing: {{ consumer_domains: [skydesk.jp], default_domain: skydesk.jp, consumer_pool: p, organisation_pool: p }}
pools:
  p: {{ imap: ["127.0.0.1:9"], login: {{ mode: passthrough }} }}
"#,
        root = env!("CARGO_MANIFEST_DIR")
    );
    let path = dir.join("plain.yaml");
    std::fs::write(&path, config).expect("write");
    path
}

/// A `mailgate run`, killed however the test ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mailgate {options} run` on [`plain_config`] (under `rust_log` when given); its log
/// lines arrive on the receiver.
fn start_run(
    dir: &std::path::Path,
    options: &[&str],
    rust_log: Option<&str>,
) -> (Running, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailgate"));
    command
        .args(options)
        .args(["run", "--config"])
        .arg(plain_config(dir))
        .stderr(Stdio::piped());
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let mut child = command.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Running(child), rx)
}

/// The log of a `mailgate run` under `rust_log` that serves one session (greeting, `LOGOUT`)
/// and is then stopped with SIGTERM: every line up to its last.
fn log_of_one_session(rust_log: &str) -> Vec<String> {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, rx) = start_run(dir.path(), &[], Some(rust_log));
    let next = |what: &str| match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(line) => Some(line),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
        Err(e) => panic!("waiting for {what}: {e}"),
    };
    let mut lines = Vec::new();
    let address = loop {
        let line = next("the listening line").expect("mailgate exited before listening");
        let address = line
            .contains("listening")
            .then(|| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix("address="))
            })
            .flatten()
            .map(str::to_string);
        lines.push(line);
        if let Some(address) = address {
            break address;
        }
    };
    let mut client = std::net::TcpStream::connect(&address).expect("connect");
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    client.write_all(b"a LOGOUT\r\n").expect("LOGOUT");
    let mut reply = String::new();
    client.read_to_string(&mut reply).expect("read until close");
    assert!(reply.contains("a OK"), "{reply}");
    drop(client);
    // The session's line, if any, is written before the session ends, so before "stopped".
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    while let Some(line) = next("the end of the log") {
        lines.push(line);
    }
    lines
}

#[test]
fn the_session_line_is_logged_and_can_be_left_out_alone() {
    let session = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("mailgate::session"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let default = log_of_one_session("info");
    assert!(
        default.iter().any(|l| l.contains(" stopped")),
        "{default:#?}"
    );
    let lines = session(&default);
    assert_eq!(lines.len(), 1, "{default:#?}");
    assert!(lines[0].contains("protocol=imap"), "{}", lines[0]);
    assert!(lines[0].contains("end="), "{}", lines[0]);
    // README, Operations: this filter drops the session line and keeps every other one.
    let quiet = log_of_one_session("info,mailgate::session=warn");
    assert!(session(&quiet).is_empty(), "{quiet:#?}");
    assert!(quiet.iter().any(|l| l.contains(" listening")), "{quiet:#?}");
    assert!(quiet.iter().any(|l| l.contains(" stopped")), "{quiet:#?}");
}
