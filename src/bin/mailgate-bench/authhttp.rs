//! `mailgate-bench auth-http`: the auth_http service nginx's mail proxy asks before every
//! login. It answers every request with `Auth-Status: OK` and the Dovecot backend's address;
//! the password itself is checked by Dovecot when nginx logs in there with it. One
//! current-thread tokio runtime, one connection per request (as nginx makes them), so its CPU
//! per login can be read from `/proc` like the proxies'.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request accepted (nginx's are a few hundred bytes).
const MAX_REQUEST: usize = 16 * 1024;

pub fn run(listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(serve(listen, backend))
}

async fn serve(listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let reply = format!(
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\n\r\n",
        backend.ip(),
        backend.port()
    );
    let reply: &'static [u8] = Box::leak(reply.into_bytes().into_boxed_slice());
    eprintln!("auth-http: listening on {listen}, sending logins to {backend}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("auth-http: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, reply)).await;
            if let Ok(Err(e)) = answered {
                eprintln!("auth-http: {e:#}");
            }
        });
    }
}

/// Reads one request's headers and answers OK.
async fn answer(mut stream: TcpStream, reply: &[u8]) -> Result<()> {
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
    stream.write_all(reply).await?;
    stream.shutdown().await?;
    Ok(())
}
