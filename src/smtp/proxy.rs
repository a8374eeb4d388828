//! The SMTP submission pre-auth driver: feeds the pure session from the socket (greeting,
//! early-talker check), authorizes `AUTH`, hands the session to a backend (XCLIENT / master /
//! passthrough) and builds the 235 for the hand-over. TLS, STARTTLS, the deadline and the
//! splice itself are `preauth`'s and `server`'s.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;

use crate::backend::{first_available, BackendError};
use crate::config::{Protocol, SmtpLogin};
use crate::login::{authorize, Grant, LoginResult};
use crate::preauth::{self, Driver, Goodbyes, LoggedIn, Mode, PreauthEnd};
use crate::routing::ImapLogin;
use crate::server::{goodbye, write, ClientStream, Connection, SessionLog};
use crate::smtp::backend::{self, BackendSession, LoginRequest};
use crate::smtp::reply::{self, login_reply, REPLY_SHUTDOWN, REPLY_TIMEOUT};
use crate::smtp::session::{Credentials, Event, PreAuth, SessionConfig};

/// How long mailgate waits for the backend to take the session once connected.
const BACKEND_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The SMTP side of `preauth::serve`.
pub struct Smtp;

impl Driver for Smtp {
    const PROTOCOL: Protocol = Protocol::Smtp;
    const GOODBYES: Goodbyes = Goodbyes {
        timeout: REPLY_TIMEOUT,
        shutdown: REPLY_SHUTDOWN,
        idle: b"421 4.4.2 Idle for too long\r\n",
    };

    /// Nothing early: the greeting waits until the early-talker check has looked for input
    /// after the handshake.
    fn tls_greeting(&self) -> &'static [u8] {
        b""
    }

    /// Runs the pre-auth session until STARTTLS, an AUTH the backend took, or the end.
    async fn session<S>(
        &self,
        conn: &mut Connection,
        log: &mut SessionLog,
        mut stream: S,
        mode: Mode,
        deadline: Instant,
    ) -> PreauthEnd<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Into<ClientStream>,
    {
        let context = conn.context.clone();
        let mut session = PreAuth::new(SessionConfig {
            hostname: context.hostname.clone(),
            tls_active: mode.tls_active,
            starttls_offered: mode.starttls_offered,
            backend_extensions: context.smtp_extensions.offered().as_ref().clone(),
        });
        let mut buf = vec![0u8; 4096];
        if mode.greet {
            // A client that talks before the greeting is not speaking SMTP (or is a spam bot
            // racing the server): refuse it without reading what it sent.
            if let Some(Ok(n)) = poll_once(stream.read(&mut buf)).await {
                if n > 0 {
                    goodbye(&mut stream, reply::early_talker()).await;
                    log.end = "early_talker";
                    return PreauthEnd::Done;
                }
            }
            if write(&mut stream, &session.greeting()).await.is_err() {
                log.end = "client_gone";
                return PreauthEnd::Done;
            }
        }
        let mut step = session.input(&[]);
        let mut attempts = 0u32;
        let max_attempts = context.current().limits.max_auth_attempts;
        loop {
            if !step.write.is_empty() && write(&mut stream, &step.write).await.is_err() {
                log.end = "client_gone";
                return PreauthEnd::Done;
            }
            step = match step.event.take() {
                None => {
                    match preauth::read(conn, log, &mut stream, &mut buf, deadline, &Self::GOODBYES)
                        .await
                    {
                        Some(n) => session.input(buf.get(..n).unwrap_or_default()),
                        None => return PreauthEnd::Done,
                    }
                }
                Some(Event::StartTls) => return PreauthEnd::StartTls(stream),
                Some(Event::TlsRequired) => {
                    conn.record_login(log, None, LoginResult::TlsRequired);
                    session.input(&[])
                }
                Some(Event::Quit) => {
                    log.end = "quit";
                    return PreauthEnd::Done;
                }
                Some(Event::Close) => {
                    log.end = "protocol_error";
                    return PreauthEnd::Done;
                }
                Some(Event::Auth(credentials)) => {
                    attempts += 1;
                    log.user = Some(credentials.username.clone());
                    let helo = session.helo().unwrap_or("unknown").to_string();
                    match log_in(conn, &credentials, &helo).await {
                        Ok((grant, address, backend)) => {
                            let name = Some(credentials.username.as_str());
                            conn.record_login(log, name, LoginResult::Ok);
                            log.backend = Some(address);
                            let reply = login_reply(LoginResult::Ok, &context.current().messages);
                            return PreauthEnd::LoggedIn(Box::new(LoggedIn {
                                client: stream.into(),
                                grant,
                                backend: backend.stream,
                                reply,
                                leftover: backend.leftover.to_vec(),
                                pipelined: session.into_pipelined(),
                            }));
                        }
                        Err(result) => {
                            let name = Some(credentials.username.as_str());
                            conn.record_login(log, name, result);
                            let refusal = login_reply(result, &context.current().messages);
                            let last = result == LoginResult::TooManyConnections
                                || attempts >= max_attempts;
                            if last {
                                let mut bye = refusal;
                                // A 421 (too many sessions) closes by itself; its log line
                                // already says `result=too_many_connections`.
                                if result == LoginResult::TooManyConnections {
                                    log.end = "refused";
                                } else {
                                    bye.extend_from_slice(
                                        b"421 4.7.0 Too many failed authentications\r\n",
                                    );
                                    log.end = "too_many_attempts";
                                }
                                goodbye(&mut stream, &bye).await;
                                return PreauthEnd::Done;
                            }
                            if write(&mut stream, &refusal).await.is_err() {
                                log.end = "client_gone";
                                return PreauthEnd::Done;
                            }
                            session.input(&[])
                        }
                    }
                }
            };
        }
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
        conn.peer.ip(),
        &credentials.username,
        credentials.authzid.as_deref(),
        credentials.password.expose().as_bytes(),
        Protocol::Smtp,
    )
    .await?;
    let pool = &grant.route.pool;
    let login = pool.imap_login();
    let master = match &*login {
        ImapLogin::Master { user, password } => Some((user.as_str(), password)),
        ImapLogin::Passthrough => None,
    };
    let request = LoginRequest {
        user: &grant.route.address,
        password: credentials.password.expose().as_bytes(),
        mode: pool.smtp_login,
        transport: &pool.transport,
        master,
        client: conn.peer,
        client_helo: helo,
        hostname: &conn.context.hostname,
        connect_timeout: pool.connect_timeout(),
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
        // In passthrough the backend judges the client's own password: its 5xx means wrong
        // credentials. With XCLIENT or a master user, mailgate already proved the password;
        // a refusal is the backend's configuration (XCLIENT not authorized, master user
        // wrong), so the client hears "temporary failure", not "your password is wrong".
        Err(BackendError::Refused { code })
            if pool.smtp_login == SmtpLogin::Passthrough
                && code.as_deref().is_some_and(|c| c.starts_with('5')) =>
        {
            Err(LoginResult::InvalidCredentials)
        }
        Err(_) => Err(LoginResult::BackendUnavailable),
    }
}
