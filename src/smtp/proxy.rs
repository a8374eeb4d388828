//! The SMTP submission driver: owns the socket, runs TLS, feeds the pure pre-auth session,
//! authorizes `AUTH`, hands the session to a backend (XCLIENT / master / passthrough) and
//! splices.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::{first_available, BackendError};
use crate::config::{ListenerTls, Protocol, SmtpLogin};
use crate::login::{authorize, Grant, LoginResult};
use crate::routing::ImapLogin;
use crate::server::{goodbye, write, ClientStream, Connection, SessionLog, Spliced};
use crate::shutdown::Phase;
use crate::smtp::backend::{self, BackendSession, LoginRequest};
use crate::smtp::reply::{self, login_reply, REPLY_SHUTDOWN, REPLY_TIMEOUT};
use crate::smtp::session::{Credentials, Event, PreAuth, SessionConfig};

/// How long mailgate waits for the backend to take the session once connected.
const BACKEND_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one SMTP client connection up to the splice: TLS, the pre-auth session, AUTH and
/// the backend login. Returns the session for the shared splice, or `None` when the
/// connection ended here (after leaving its log line).
pub async fn serve(mut conn: Connection, tcp: TcpStream) -> Option<Spliced> {
    let mut log = SessionLog::new();
    let deadline = Instant::now() + conn.context.config.limits.preauth_timeout.0;
    let logged_in = match conn.listener.config.tls {
        ListenerTls::None => session(&mut conn, &mut log, tcp, false, false, true, deadline)
            .await
            .logged_in(),
        ListenerTls::Implicit => match conn.tls_handshake(&mut log, tcp).await {
            Some(tls) => session(&mut conn, &mut log, tls, true, false, true, deadline)
                .await
                .logged_in(),
            None => None,
        },
        ListenerTls::Starttls => {
            match session(&mut conn, &mut log, tcp, false, true, true, deadline).await {
                PreauthEnd::StartTls(tcp) => match conn.tls_handshake(&mut log, tcp).await {
                    // No new greeting after STARTTLS; the client must EHLO again (RFC 3207).
                    Some(tls) => session(&mut conn, &mut log, tls, true, false, false, deadline)
                        .await
                        .logged_in(),
                    None => None,
                },
                PreauthEnd::LoggedIn(session) => Some(*session),
                PreauthEnd::Done => None,
            }
        }
    };
    match logged_in {
        Some(session) => hand_over(conn, log, session).await,
        None => {
            log.emit(&conn);
            None
        }
    }
}

/// How the pre-auth phase ended.
enum PreauthEnd<S> {
    /// STARTTLS: the plain stream, for the handshake; everything pipelined went with the
    /// session.
    StartTls(S),
    LoggedIn(Box<LoggedIn>),
    /// QUIT, error, timeout or shutdown.
    Done,
}

impl<S> PreauthEnd<S> {
    fn logged_in(self) -> Option<LoggedIn> {
        match self {
            PreauthEnd::LoggedIn(session) => Some(*session),
            PreauthEnd::StartTls(_) | PreauthEnd::Done => None,
        }
    }
}

/// An AUTH the backend took.
struct LoggedIn {
    client: ClientStream,
    grant: Grant,
    backend: BackendSession,
    /// What the client sent after its AUTH, for the backend.
    pipelined: BytesMut,
}

/// Runs the pre-auth session until STARTTLS, an AUTH the backend took, or the end.
async fn session<S>(
    conn: &mut Connection,
    log: &mut SessionLog,
    mut stream: S,
    tls_active: bool,
    starttls_offered: bool,
    greet: bool,
    deadline: Instant,
) -> PreauthEnd<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Into<ClientStream>,
{
    let context = conn.context.clone();
    let mut session = PreAuth::new(SessionConfig {
        hostname: context.hostname.clone(),
        tls_active,
        starttls_offered,
        backend_extensions: context.smtp_extensions.offered().as_ref().clone(),
    });
    let mut buf = vec![0u8; 4096];
    if greet {
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
    let max_attempts = context.config.limits.max_auth_attempts;
    loop {
        if !step.write.is_empty() && write(&mut stream, &step.write).await.is_err() {
            log.end = "client_gone";
            return PreauthEnd::Done;
        }
        step = match step.event.take() {
            None => {
                let read = tokio::select! {
                    r = stream.read(&mut buf) => r,
                    () = tokio::time::sleep_until(deadline) => {
                        goodbye(&mut stream, REPLY_TIMEOUT).await;
                        log.end = "preauth_timeout";
                        return PreauthEnd::Done;
                    }
                    () = conn.shutdown.reached(Phase::Draining) => {
                        goodbye(&mut stream, REPLY_SHUTDOWN).await;
                        log.end = "shutdown";
                        return PreauthEnd::Done;
                    }
                };
                match read {
                    Ok(0) | Err(_) => {
                        log.end = "client_gone";
                        return PreauthEnd::Done;
                    }
                    Ok(n) => session.input(buf.get(..n).unwrap_or_default()),
                }
            }
            Some(Event::StartTls) => return PreauthEnd::StartTls(stream),
            Some(Event::TlsRequired) => {
                log.result = LoginResult::TlsRequired.as_str();
                conn.context
                    .count_login(Protocol::Smtp, None, LoginResult::TlsRequired);
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
                        log.result = LoginResult::Ok.as_str();
                        let pool = Some(grant.route.pool.name.as_str());
                        conn.context
                            .metrics
                            .login(Protocol::Smtp, pool, LoginResult::Ok);
                        log.backend = Some(address);
                        return PreauthEnd::LoggedIn(Box::new(LoggedIn {
                            client: stream.into(),
                            grant,
                            backend,
                            pipelined: session.into_pipelined(),
                        }));
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
        transport: &pool.transport,
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

/// Answers the client's AUTH with 235, passes on what it pipelined, and hands the session
/// to the splice. Nothing of the login phase stays allocated.
async fn hand_over(conn: Connection, mut log: SessionLog, session: LoggedIn) -> Option<Spliced> {
    let LoggedIn {
        mut client,
        grant,
        backend,
        pipelined,
    } = session;
    let BackendSession {
        stream: mut backend,
        leftover,
    } = backend;
    log.user = Some(grant.route.address.clone());
    log.pool = Some(grant.route.pool.name.clone());
    let mut hello = login_reply(LoginResult::Ok, &conn.context.config.messages);
    hello.extend_from_slice(&leftover);
    if write(&mut client, &hello).await.is_err() {
        log.end = "client_gone";
    } else if !pipelined.is_empty() && write(&mut backend, &pipelined).await.is_err() {
        log.end = "backend_gone";
    } else {
        log.client_to_backend += pipelined.len() as u64;
        let meter = conn.context.metrics.relay_meter(Protocol::Smtp);
        crate::relay::Meter::client_to_backend(meter, pipelined.len() as u64);
        return Some(Spliced {
            conn,
            log,
            client,
            backend,
            bye_shutdown: REPLY_SHUTDOWN,
            bye_idle: b"421 4.4.2 Idle for too long\r\n",
        });
    }
    log.emit(&conn);
    None
}
