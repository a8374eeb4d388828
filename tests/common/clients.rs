//! Real clients with a deadline: Python scripts (`imaplib`, `smtplib`) and command-line tools
//! (`curl`, `swaks`, `mbsync`, `doveadm`), and TLS command-line clients driven a step at a time
//! ([`Interactive`]: NSS's `tstclnt`, GnuTLS' `gnutls-cli`).
//!
//! A client that outlives its deadline is killed and its [`Output`] says `timed_out`, so a hung
//! proxy fails the test instead of hanging it.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long to keep reading a finished client's pipes (held open only by a stray grandchild).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What a finished (or killed) client printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// The program and its arguments, for failure messages.
    pub command: String,
    /// The exit code; `None` when killed by a signal (including our timeout kill).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The deadline passed and the client was killed.
    pub timed_out: bool,
}

impl Output {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }

    /// Panics with everything the client printed unless it succeeded; returns stdout.
    #[track_caller]
    pub fn assert_success(&self) -> &str {
        assert!(self.success(), "client failed:\n{self}");
        &self.stdout
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "$ {}\nstatus: {:?}{}",
            self.command,
            self.status,
            if self.timed_out {
                " (killed: timed out)"
            } else {
                ""
            }
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// Runs `program args…` with no standard input; kills it after `timeout`.
pub fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> Output {
    run(program, args, None, timeout)
}

/// Writes `config` to `DIR/mbsyncrc` and runs `mbsync -c DIR/mbsyncrc -a`; kills it after
/// `timeout`.
pub fn run_mbsync(dir: &std::path::Path, config: &str, timeout: Duration) -> Output {
    let rc = dir.join("mbsyncrc");
    std::fs::write(&rc, config).unwrap_or_else(|e| panic!("writing {}: {e}", rc.display()));
    run_cmd("mbsync", &["-c", &rc.to_string_lossy(), "-a"], timeout)
}

/// Runs `program args…` with `stdin` as its standard input; kills it after `timeout`.
pub fn run_cmd_stdin(program: &str, args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    run(program, args, Some(stdin), timeout)
}

/// Runs a Python 3 script given as text (written to a temp file, run unbuffered with `-u`).
pub fn run_python(script: &str, timeout: Duration) -> Output {
    run_python_args(script, &[], timeout)
}

/// Like [`run_python`], with `sys.argv[1..]` = `args`.
pub fn run_python_args(script: &str, args: &[&str], timeout: Duration) -> Output {
    let mut file = tempfile::Builder::new()
        .prefix("mgtest-client-")
        .suffix(".py")
        .tempfile()
        .unwrap_or_else(|e| panic!("creating a temp file for a Python script: {e}"));
    file.write_all(script.as_bytes())
        .and_then(|()| file.flush())
        .unwrap_or_else(|e| panic!("writing the Python script: {e}"));
    let path = file.path().to_string_lossy().into_owned();
    let mut argv = vec!["-u", path.as_str()];
    argv.extend_from_slice(args);
    run("python3", &argv, None, timeout)
}

/// [`run_python`] for async tests: the blocking wait runs on tokio's blocking pool, so a proxy
/// spawned on the test's (current-thread) runtime keeps running meanwhile.
pub async fn run_python_async(script: &str, timeout: Duration) -> Output {
    let script = script.to_owned();
    tokio::task::spawn_blocking(move || run_python(&script, timeout))
        .await
        .unwrap_or_else(|e| panic!("Python client task: {e}"))
}

/// [`run_cmd`] for async tests; see [`run_python_async`].
pub async fn run_cmd_async(program: &str, args: &[&str], timeout: Duration) -> Output {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cmd(&program, &args, timeout)
    })
    .await
    .unwrap_or_else(|e| panic!("client task: {e}"))
}

/// A command-line client kept running and driven a step at a time, as a user at a terminal
/// would: [`Interactive::send`] writes to its standard input, [`Interactive::expect`] waits, with
/// a deadline, for a text in what it has printed since. Killed, with its process group, when
/// dropped.
pub struct Interactive {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Drain,
    stderr: Drain,
    /// How much of stdout earlier `expect` calls returned.
    seen: usize,
}

impl Interactive {
    pub fn spawn(program: &str, args: &[&str]) -> Interactive {
        let command = command_line(program, args);
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `{command}`: {e}"));
        let stdin = child.stdin.take();
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Interactive {
            command,
            child,
            stdin,
            stdout,
            stderr,
            seen: 0,
        }
    }

    /// Writes `text` as it is (line ends included) to the client's standard input.
    ///
    /// # Errors
    /// The client closed its input (it exited): the transcript so far.
    pub fn send(&mut self, text: &str) -> Result<(), String> {
        let written = match self.stdin.as_mut() {
            Some(pipe) => pipe.write_all(text.as_bytes()).and_then(|()| pipe.flush()),
            None => return Err(self.transcript()),
        };
        written.map_err(|e| format!("writing {text:?}: {e}\n{}", self.transcript()))
    }

    /// Waits until what the client printed since the last `expect` holds `needle`, and returns
    /// that text up to the end of the line holding it.
    ///
    /// # Errors
    /// `timeout` passed first, or the client exited first: the transcript so far.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read before the search: output that came just before the client exited is
            // still searched once.
            let exited = self.stdout.reader.is_finished();
            {
                let bytes = self.stdout.bytes.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = bytes.get(self.seen..).unwrap_or_default();
                if let Some(at) = find(fresh, needle.as_bytes()) {
                    let rest = fresh.get(at..).unwrap_or_default();
                    let line_end = rest.iter().position(|&b| b == b'\n').map(|n| at + n + 1);
                    // A line still arriving (a long reply split across reads) is waited for;
                    // a client that exited mid-line gives what it printed.
                    let end = match line_end {
                        Some(end) => Some(end),
                        None if exited || Instant::now() >= deadline => Some(fresh.len()),
                        None => None,
                    };
                    if let Some(end) = end {
                        let text = String::from_utf8_lossy(fresh.get(..end).unwrap_or_default())
                            .into_owned();
                        self.seen += end;
                        return Ok(text);
                    }
                }
            }
            if exited || Instant::now() >= deadline {
                let why = if exited {
                    "the client exited"
                } else {
                    "timed out"
                };
                return Err(format!(
                    "waiting for {needle:?}: {why}\n{}",
                    self.transcript()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`send`](Self::send) `text` (nothing when it is empty), then [`expect`](Self::expect)
    /// `needle`.
    ///
    /// # Errors
    /// As theirs.
    pub fn exchange(
        &mut self,
        text: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        if !text.is_empty() {
            self.send(text)?;
        }
        self.expect(needle, timeout)
    }

    /// The command and everything it printed so far.
    pub fn transcript(&self) -> String {
        let text = |d: &Drain| {
            let bytes = d.bytes.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&bytes).into_owned()
        };
        format!(
            "$ {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            text(&self.stdout),
            text(&self.stderr)
        )
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        self.stdin.take();
        super::signal_group(self.child.id(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How a test table's case starts its client.
pub type Launch<'a> = &'a dyn Fn() -> Interactive;

/// The one TLS version a command-line client is held to.
#[derive(Debug, Clone, Copy)]
pub enum TlsVersion {
    V12,
    V13,
}

/// NSS's `tstclnt` (Thunderbird's TLS stack) connected to `127.0.0.1:port` over implicit TLS,
/// sending `server_name`, taking any certificate (`-o`: the development one) and speaking
/// `version` only; `db` is an [`nss_db`].
pub fn tstclnt(port: u16, server_name: &str, db: &str, version: TlsVersion) -> Interactive {
    let version = match version {
        TlsVersion::V12 => "tls1.2:tls1.2",
        TlsVersion::V13 => "tls1.3:tls1.3",
    };
    let port = port.to_string();
    let args = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-a",
        server_name,
        "-d",
        db,
        "-o",
        "-V",
        version,
    ];
    Interactive::spawn("tstclnt", &args)
}

/// GnuTLS' `gnutls-cli` (Evolution's and Geary's TLS stack) connected to `127.0.0.1:port`,
/// sending `server_name`, taking any certificate and speaking `version` only. With `starttls`
/// (`imap`, `smtp`) it first does that protocol's `STARTTLS` itself, reading the greeting (and,
/// for SMTP, sending its own `EHLO`); otherwise the TLS is implicit. It prints a line
/// `- Description: (TLS1.3-…` once the handshake is done.
pub fn gnutls_cli(
    port: u16,
    server_name: &str,
    version: TlsVersion,
    starttls: Option<&str>,
) -> Interactive {
    let priority = match version {
        TlsVersion::V12 => "NORMAL:-VERS-ALL:+VERS-TLS1.2",
        TlsVersion::V13 => "NORMAL:-VERS-ALL:+VERS-TLS1.3",
    };
    let port = port.to_string();
    let starttls = starttls.map(|proto| format!("--starttls-proto={proto}"));
    let mut args = vec![
        "--insecure",
        "--priority",
        priority,
        "--sni-hostname",
        server_name,
    ];
    args.extend(starttls.as_deref());
    args.extend(["-p", &port, "127.0.0.1"]);
    Interactive::spawn("gnutls-cli", &args)
}

/// An empty NSS certificate database in `dir` (what `tstclnt -d` needs even when the server's
/// certificate is not checked); returns its `sql:` name.
pub fn nss_db(dir: &Path) -> String {
    let db = format!("sql:{}", dir.display());
    run_cmd(
        "certutil",
        &["-N", "-d", &db, "--empty-password"],
        Duration::from_secs(20),
    )
    .assert_success();
    db
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(program: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let command = command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kill takes any grandchildren along.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning `{command}`: {e}"));

    // Pipes are drained on their own threads so a chatty client never blocks on a full pipe.
    let feeder = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(bytes)) => {
            let bytes = bytes.to_vec();
            // A client that exits early closes its stdin; the write error is not ours to report.
            Some(thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                super::signal_group(child.id(), "KILL");
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Output {
        command,
        status: status.and_then(|s| s.code()),
        stdout: joined(stdout),
        stderr: joined(stderr),
        timed_out,
    }
}

/// A pipe being read on its own thread into a shared buffer.
struct Drain {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: thread::JoinHandle<()>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drain {
    let bytes = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&bytes);
    let reader = thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
            sink.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    });
    Drain { bytes, reader }
}

/// What the pipe carried, waiting at most [`DRAIN_GRACE`] for its end.
fn joined(drain: Drain) -> String {
    let deadline = Instant::now() + DRAIN_GRACE;
    while !drain.reader.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let bytes = drain.bytes.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&bytes).into_owned()
}
