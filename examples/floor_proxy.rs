//! The floor of a login through mailgate's I/O stack: the least an implicit-TLS IMAP proxy
//! does per login, built from mailgate's own parts (its TLS server config with tickets, its
//! `LeanTlsStream` with the greeting in the server flight, its workers: a current-thread
//! runtime per core and a `SO_REUSEPORT` socket each) and nothing else: no account check,
//! policy, verification cache, metrics, log line, timers, backend `ID` or master-user login.
//! The client's `LOGIN` line goes to the first backend of the first pool as it came, its
//! reply back, then the two sockets are spliced with tokio's `copy_bidirectional`.
//!
//! It is a measuring instrument for the benchmarks (README, *Benchmarks*), not a proxy to run:
//! it takes the command line mailgate does, so the bench can run it in mailgate-b's place:
//!
//! ```sh
//! cargo build --release --example floor_proxy
//! scripts/bench --targets mailgate,mailgate-b,nginx --phases repeat-logins --reps 4 \
//!     --mailgate-b target/release/examples/floor_proxy
//! ```
//!
//! It stops on SIGTERM or Ctrl-C (the default signal action).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use mailgate::config::Config;
use mailgate::tls::Tls;
use mailgate::workers::{self, Workers};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The greeting mailgate sends (with the capabilities a client needs to log in).
const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN] ready\r\n";

/// The longest command or reply line taken before the splice (mailgate's own limit).
const MAX_LINE: usize = 8 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [run, flag, path] = args.as_slice() else {
        bail!("usage: floor_proxy run --config FILE");
    };
    if run != "run" || flag != "--config" {
        bail!("usage: floor_proxy run --config FILE");
    }
    let config = Config::load(&PathBuf::from(path)).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{path}: {}", lines.join("; "))
    })?;
    let listener = config.listeners.first().context("no listener")?;
    let backend = config
        .pools
        .values()
        .find_map(|p| p.imap.first())
        .context("no IMAP backend")?
        .clone();
    let tls = Tls::from_config(&config.tls).context("TLS certificates")?;
    let (address, sockets) = workers::bind(listener.address, workers::count(), None)
        .with_context(|| format!("cannot bind {}", listener.address))?;
    let workers = Workers::start(sockets.len()).context("workers")?;
    for (socket, worker) in sockets.into_iter().zip(workers.handles()) {
        let (tls, backend) = (tls.config.clone(), backend.clone());
        worker.spawn(async move {
            let socket = match TcpListener::from_std(socket) {
                Ok(socket) => socket,
                Err(e) => return eprintln!("floor_proxy: {e}"),
            };
            loop {
                let tcp = match socket.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        eprintln!("floor_proxy: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (tls, backend) = (tls.clone(), backend.clone());
                tokio::spawn(async move {
                    let _ = session(tls, tcp, &backend).await;
                });
            }
        });
    }
    eprintln!("floor_proxy: listening on {address}, backend {backend}");
    // The workers run until the process is stopped.
    loop {
        std::thread::park();
    }
}

/// One session: TLS with the greeting in the server flight, the client's first line to the
/// backend, the backend's reply lines up to the tagged one back, then the splice.
///
/// Its errors are `io::Error`s, not `anyhow`'s as at start-up: most sessions end in one (a
/// peer gone without `close_notify`), and an `anyhow::Error` walks the stack for a backtrace
/// when `RUST_BACKTRACE` is set, which cost the floor ~2 % of its CPU per login.
async fn session(tls: Arc<rustls::ServerConfig>, tcp: TcpStream, backend: &str) -> io::Result<()> {
    let (mut client, sent) = mailgate::tls_stream::accept(tls, tcp, GREETING).await?;
    if !sent {
        client.write_all(GREETING).await?;
        client.flush().await?;
    }
    let login = read_line(&mut client).await?;
    let tag = login
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default()
        .to_vec();
    let mut backend = TcpStream::connect(backend).await?;
    backend.set_nodelay(true)?;
    read_line(&mut backend).await?; // the backend's greeting
    backend.write_all(&login).await?;
    let mut reply = Vec::new();
    while !tagged(&reply, &tag) {
        reply.extend_from_slice(&read_line(&mut backend).await?);
        if reply.len() > MAX_LINE {
            return Err(io::Error::other("login reply too long"));
        }
    }
    client.write_all(&reply).await?;
    client.flush().await?;
    tokio::io::copy_bidirectional(&mut client, &mut backend).await?;
    Ok(())
}

/// Whether `reply` holds the line tagged `tag` (the login's answer).
fn tagged(reply: &[u8], tag: &[u8]) -> bool {
    reply
        .split(|&b| b == b'\n')
        .any(|line| line.starts_with(tag) && line.get(tag.len()) == Some(&b' '))
}

/// What arrived up to a line's end (one line, or a few when they came together: the client
/// waits for the reply before it sends more, as IMAP's login does).
async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(256);
    loop {
        let mut chunk = [0_u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&chunk[..n]);
        if line.last() == Some(&b'\n') {
            return Ok(line);
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::other("line too long"));
        }
    }
}
