//! The SMTP submission driver: owns the socket, runs TLS, feeds the pure pre-auth session,
//! authorizes `AUTH`, hands the session to a backend (XCLIENT / master / passthrough) and
//! splices.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::{first_available, BackendError};
use crate::config::{ListenerTls, Protocol};
use crate::login::{authorize, Grant, LoginResult};
use crate::relay::{self, RelayEnd};
use crate::routing::ImapLogin;
use crate::server::{goodbye, write, Connection, SessionLog};
use crate::shutdown::Phase;
use crate::smtp::backend::{self, BackendSession, LoginRequest};
use crate::smtp::reply::{self, login_reply, REPLY_SHUTDOWN, REPLY_TIMEOUT};
use crate::smtp::session::{Credentials, Event, PreAuth, SessionConfig};

/// How long mailgate waits for the backend to take the session once connected.
const BACKEND_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one SMTP client connection to its end and leaves one log line.
pub async fn serve(mut conn: Connection, tcp: TcpStream) {
    let mut log = SessionLog::new();
    let deadline = Instant::now() + conn.context.config.limits.preauth_timeout.0;
    match conn.listener.config.tls {
        ListenerTls::None => {
            let _ = session(&mut conn, &mut log, tcp, false, false, true, deadline).await;
        }
        ListenerTls::Implicit => {
            if let Some(tls) = conn.tls_handshake(&mut log, tcp).await {
                let _ = session(&mut conn, &mut log, tls, true, false, true, deadline).await;
            }
        }
        ListenerTls::Starttls => {
            if let Some(tcp) = session(&mut conn, &mut log, tcp, false, true, true, deadline).await
            {
                if let Some(tls) = conn.tls_handshake(&mut log, tcp).await {
                    // No new greeting after STARTTLS; the client must EHLO again (RFC 3207).
                    let _ = session(&mut conn, &mut log, tls, true, false, false, deadline).await;
                }
            }
        }
    }
    log.emit(&conn);
}

/// Runs the pre-auth session and, after a successful AUTH, the splice. Returns the stream
/// only when the client asked for STARTTLS; the session, and everything the client pipelined
/// after STARTTLS, is dropped.
async fn session<S>(
    conn: &mut Connection,
    log: &mut SessionLog,
    mut stream: S,
    tls_active: bool,
    starttls_offered: bool,
    greet: bool,
    deadline: Instant,
) -> Option<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let context = conn.context.clone();
    let mut session = PreAuth::new(SessionConfig {
        hostname: context.hostname.clone(),
        tls_active,
        starttls_offered,
        backend_extensions: context.smtp_extensions.load().as_ref().clone(),
    });
    let mut buf = vec![0u8; 4096];
    if greet {
        // A client that talks before the greeting is not speaking SMTP (or is a spam bot
        // racing the server): refuse it without reading what it sent.
        if let Some(Ok(n)) = poll_once(stream.read(&mut buf)).await {
            if n > 0 {
                goodbye(&mut stream, reply::early_talker()).await;
                log.end = "early_talker";
                return None;
            }
        }
        if write(&mut stream, &session.greeting()).await.is_err() {
            log.end = "client_gone";
            return None;
        }
    }
    let mut step = session.input(&[]);
    let mut attempts = 0u32;
    let max_attempts = context.config.limits.max_auth_attempts;
    loop {
        if !step.write.is_empty() && write(&mut stream, &step.write).await.is_err() {
            log.end = "client_gone";
            return None;
        }
        step = match step.event.take() {
            None => {
                let read = tokio::select! {
                    r = stream.read(&mut buf) => r,
                    () = tokio::time::sleep_until(deadline) => {
                        goodbye(&mut stream, REPLY_TIMEOUT).await;
                        log.end = "preauth_timeout";
                        return None;
                    }
                    () = conn.shutdown.reached(Phase::Draining) => {
                        goodbye(&mut stream, REPLY_SHUTDOWN).await;
                        log.end = "shutdown";
                        return None;
                    }
                };
                match read {
                    Ok(0) | Err(_) => {
                        log.end = "client_gone";
                        return None;
                    }
                    Ok(n) => session.input(buf.get(..n).unwrap_or_default()),
                }
            }
            Some(Event::StartTls) => return Some(stream),
            Some(Event::TlsRequired) => {
                log.result = LoginResult::TlsRequired.as_str();
                conn.context
                    .count_login(Protocol::Smtp, None, LoginResult::TlsRequired);
                session.input(&[])
            }
            Some(Event::Quit) => {
                log.end = "quit";
                return None;
            }
            Some(Event::Close) => {
                log.end = "protocol_error";
                return None;
            }
            Some(Event::Auth(credentials)) => {
                attempts += 1;
                log.user = Some(credentials.username.clone());
                let helo = session.helo().unwrap_or("unknown").to_string();
                match log_in(conn, &credentials, &helo).await {
                    Ok((grant, address, backend)) => {
                        log.result = LoginResult::Ok.as_str();
                        let pool = Some(grant.route.pool.name.as_str());
                        conn.context
                            .metrics
                            .login(Protocol::Smtp, pool, LoginResult::Ok);
                        log.backend = Some(address);
                        let pipelined = session.into_pipelined();
                        splice(conn, log, stream, grant, backend, &pipelined).await;
                        return None;
                    }
                    Err(result) => {
                        log.result = result.as_str();
                        let name = Some(credentials.username.as_str());
                        conn.context.count_login(Protocol::Smtp, name, result);
                        let refusal = login_reply(result, &context.config.messages);
                        let last =
                            result == LoginResult::TooManyConnections || attempts >= max_attempts;
                        if last {
                            let mut bye = refusal;
                            if result != LoginResult::TooManyConnections {
                                bye.extend_from_slice(
                                    b"421 4.7.0 Too many failed authentications\r\n",
                                );
                            }
                            goodbye(&mut stream, &bye).await;
                            log.end = "too_many_attempts";
                            return None;
                        }
                        if write(&mut stream, &refusal).await.is_err() {
                            log.end = "client_gone";
                            return None;
                        }
                        session.input(&[])
                    }
                }
            }
        };
    }
}

/// `Some(output)` when the future is ready at once, `None` when it would wait.
async fn poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = future => Some(out),
        () = std::future::ready(()) => None,
    }
}

/// Account rules, then the pool's SMTP backends in the user's order.
async fn log_in(
    conn: &Connection,
    credentials: &Credentials,
    helo: &str,
) -> Result<(Grant, String, BackendSession), LoginResult> {
    let grant = authorize(
        &conn.context,
        &credentials.username,
        credentials.authzid.as_deref(),
        credentials.password.expose().as_bytes(),
        Protocol::Smtp,
    )
    .await?;
    let pool = &grant.route.pool;
    let master = match &pool.imap_login {
        ImapLogin::Master { user, password } => Some((user.as_str(), password)),
        ImapLogin::Passthrough => None,
    };
    let request = LoginRequest {
        user: &grant.route.address,
        password: credentials.password.expose().as_bytes(),
        mode: pool.smtp_login,
        master,
        client: conn.peer,
        client_helo: helo,
        hostname: &conn.context.hostname,
        connect_timeout: pool.connect_timeout,
        login_timeout: BACKEND_LOGIN_TIMEOUT,
    };
    let user = grant.route.address.clone();
    let metrics = &conn.context.metrics;
    match first_available(&conn.id, pool, Protocol::Smtp, &user, metrics, |address| {
        let request = &request;
        async move { backend::login(&address, request).await }
    })
    .await
    {
        Ok((address, session)) => Ok((grant, address, session)),
        // The backend refused a session the account rules allowed: a configuration fault
        // (XCLIENT not authorized, master user wrong), or a wrong password in passthrough.
        Err(BackendError::Refused { code })
            if code.as_deref().is_some_and(|c| c.starts_with('5')) =>
        {
            Err(LoginResult::InvalidCredentials)
        }
        Err(_) => Err(LoginResult::BackendUnavailable),
    }
}

async fn splice<S>(
    conn: &mut Connection,
    log: &mut SessionLog,
    mut client: S,
    grant: Grant,
    mut backend: BackendSession,
    pipelined: &[u8],
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    log.user = Some(grant.route.address.clone());
    log.pool = Some(grant.route.pool.name.clone());
    let mut hello = login_reply(LoginResult::Ok, &conn.context.config.messages);
    hello.extend_from_slice(&backend.leftover);
    if write(&mut client, &hello).await.is_err() {
        log.end = "client_gone";
        return;
    }
    if !pipelined.is_empty() && backend.stream.write_all(pipelined).await.is_err() {
        log.end = "backend_gone";
        return;
    }
    log.client_to_backend += pipelined.len() as u64;
    let idle = conn.context.config.limits.idle_timeout.0;
    let (end, stats) =
        relay::splice(&mut client, &mut backend.stream, idle, &mut conn.shutdown).await;
    log.client_to_backend += stats.client_to_backend;
    log.backend_to_client += stats.backend_to_client;
    let (sent, received) = (log.client_to_backend, log.backend_to_client);
    conn.context.metrics.relayed(Protocol::Smtp, sent, received);
    log.end = end.as_str();
    match end {
        RelayEnd::Shutdown => goodbye(&mut client, REPLY_SHUTDOWN).await,
        RelayEnd::IdleTimeout => goodbye(&mut client, b"421 4.4.2 Idle for too long\r\n").await,
        RelayEnd::Closed | RelayEnd::Error => {}
    }
}
