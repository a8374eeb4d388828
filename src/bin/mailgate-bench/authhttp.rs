//! `mailgate-bench auth-http`: the auth_http service nginx's mail proxy asks before every
//! login. By default it does the account check a production auth service must do, with
//! mailgate's own code: it looks the user up in the bench's account file, verifies the
//! password (argon2id, with mailgate's HMAC-keyed verification cache, hashing on the blocking
//! pool) and applies the account rules, then answers `Auth-Status: OK` and the Dovecot
//! backend's address, or the refusal. `--check none` answers OK to everything (the password
//! is then only checked by Dovecot, against its plaintext passwd-file). One current-thread
//! tokio runtime, one connection per request (as nginx makes them), so its CPU per login can be
//! read from `/proc` like the proxies'.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use mailgate::accounts::{AccountStore, Authenticator};
use mailgate::config::{ConfigError, Messages, Protocol};
use mailgate::policy::Decision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request accepted (nginx's are a few hundred bytes).
const MAX_REQUEST: usize = 16 * 1024;

/// What the responder checks before it answers OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// The account check mailgate does: password (with the verification cache) and rules.
    Accounts,
    /// Nothing: every login is OK (Dovecot still checks the password).
    None,
}

impl Check {
    /// As given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Check::Accounts => "accounts",
            Check::None => "none",
        }
    }

    /// What it means, for the report.
    pub fn description(self) -> &'static str {
        match self {
            Check::Accounts => "the account check mailgate does, with mailgate's code: argon2id, verification cache, rules",
            Check::None => "every login OK; the password is checked only by Dovecot's plaintext passwd-file",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    backend: SocketAddr,
    /// The account file (mailgate's format); needed by `--check accounts`.
    #[arg(long)]
    accounts: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "accounts")]
    check: Check,
}

struct Responder {
    ok: Vec<u8>,
    /// `None` with `--check none`.
    auth: Option<Authenticator>,
    messages: Messages,
}

pub fn run(args: Args) -> Result<()> {
    let auth = match args.check {
        Check::None => None,
        Check::Accounts => {
            let path = args
                .accounts
                .as_deref()
                .context("--check accounts needs --accounts")?;
            let store = AccountStore::load(path)
                .map_err(|errors| anyhow::anyhow!(ConfigError::summary("account data", &errors)))?;
            Some(Authenticator::new(store))
        }
    };
    let responder = Arc::new(Responder {
        ok: format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\n\r\n",
            args.backend.ip(),
            args.backend.port()
        )
        .into_bytes(),
        auth,
        messages: Messages::default(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(serve(args.listen, args.backend, args.check, responder))
}

async fn serve(
    listen: SocketAddr,
    backend: SocketAddr,
    check: Check,
    responder: Arc<Responder>,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("auth-http: listening on {listen}, sending logins to {backend}, checking {check:?}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("auth-http: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &responder)).await;
            if let Ok(Err(e)) = answered {
                eprintln!("auth-http: {e:#}");
            }
        });
    }
}

/// Reads one request's headers and answers it.
async fn answer(mut stream: TcpStream, responder: &Responder) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A connect-and-close (the bench's readiness probe) is no error.
            anyhow::ensure!(buf.is_empty(), "request cut short");
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        anyhow::ensure!(buf.len() <= MAX_REQUEST, "request too large");
    }
    let refusal = match &responder.auth {
        None => None,
        Some(auth) => {
            let user = header(&buf, "auth-user")
                .map(percent_decode)
                .unwrap_or_default();
            let pass = header(&buf, "auth-pass")
                .map(percent_decode)
                .unwrap_or_default();
            let address = String::from_utf8_lossy(&user).to_lowercase();
            match auth
                .authenticate(&address, &pass, Protocol::Imap)
                .await
                .decision
            {
                Decision::Allow => None,
                Decision::Deny(result) => Some(mailgate::login::message(
                    result,
                    Protocol::Imap,
                    &responder.messages,
                )),
            }
        }
    };
    match refusal {
        None => stream.write_all(&responder.ok).await?,
        Some(text) => {
            let reply = format!("HTTP/1.0 200 OK\r\nAuth-Status: {text}\r\n\r\n");
            stream.write_all(reply.as_bytes()).await?;
        }
    }
    stream.shutdown().await?;
    Ok(())
}

/// The value of header `name` (lowercase) in a request head, if present.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (key, rest) = line.split_at(colon);
        key.eq_ignore_ascii_case(name.as_bytes())
            .then(|| rest.get(1..).unwrap_or_default().trim_ascii())
    })
}

/// nginx sends `Auth-User` and `Auth-Pass` %-escaped; a `%` not followed by two hex digits
/// is kept as it is.
fn percent_decode(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        let hex = value
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\n\
Auth-User: User7@Skydesk.jp\r\nAuth-Pass: pa%25ss%20word%zz\r\nAuth-Protocol: imap\r\n\r\n";

    #[test]
    fn headers_are_found_by_name_whatever_their_case() {
        assert_eq!(header(REQUEST, "auth-user"), Some(&b"User7@Skydesk.jp"[..]));
        assert_eq!(header(REQUEST, "auth-protocol"), Some(&b"imap"[..]));
        assert_eq!(header(REQUEST, "auth-salt"), None);
    }

    #[test]
    fn nginx_escapes_are_undone_and_stray_percents_kept() {
        let pass = header(REQUEST, "auth-pass").map(percent_decode);
        assert_eq!(pass.as_deref(), Some(&b"pa%ss word%zz"[..]));
        assert_eq!(percent_decode(b"100%"), b"100%");
    }
}
