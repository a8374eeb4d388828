//! The IMAP pre-auth driver: feeds the pure session from the socket, authorizes logins, logs
//! in to the backend in the user's order, and builds the tagged OK for the hand-over.
//! TLS, STARTTLS, the deadline and the splice itself are `preauth`'s and `server`'s.

use std::sync::LazyLock;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::backend::{first_available, BackendError};
use crate::config::Protocol;
use crate::imap::backend::{self, BackendSession, LoginRequest};
use crate::imap::reply;
use crate::imap::session::{Credentials, Event, PreAuth, SessionConfig, BYE_SHUTDOWN, BYE_TIMEOUT};
use crate::login::{authorize, Grant, LoginResult};
use crate::preauth::{self, Driver, Goodbyes, LoggedIn, Mode, PreauthEnd};
use crate::routing::ImapLogin;
use crate::server::{write, ClientStream, Connection, SessionLog};

/// How long mailgate waits for the backend to finish logging in once connected.
const BACKEND_LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The IMAP side of `preauth::serve`.
pub struct Imap;

impl Driver for Imap {
    const PROTOCOL: Protocol = Protocol::Imap;
    const GOODBYES: Goodbyes = Goodbyes {
        timeout: BYE_TIMEOUT,
        shutdown: BYE_SHUTDOWN,
        idle: b"* BYE Idle for too long\r\n",
    };

    /// The implicit-TLS greeting depends on nothing but the listener's mode: made once.
    fn tls_greeting(&self) -> &'static [u8] {
        static GREETING: LazyLock<Vec<u8>> = LazyLock::new(|| {
            PreAuth::new(SessionConfig {
                tls_active: true,
                starttls_offered: false,
            })
            .greeting()
        });
        &GREETING
    }

    /// Runs the pre-auth session on `stream` until it ends in STARTTLS, a login accepted by a
    /// backend, or the end of the session.
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
        let mut session = PreAuth::new(SessionConfig {
            tls_active: mode.tls_active,
            starttls_offered: mode.starttls_offered,
        });
        let mut pending: Vec<u8> = if mode.greet {
            session.greeting()
        } else {
            Vec::new()
        };
        let mut step = session.input(&[]);
        let mut attempts = 0u32;
        let max_attempts = conn.context.current().limits.max_auth_attempts;
        let mut buf = vec![0u8; 4096];
        loop {
            pending.append(&mut step.write);
            if !pending.is_empty() {
                if write(&mut stream, &pending).await.is_err() {
                    log.end = "client_gone";
                    return PreauthEnd::Done;
                }
                pending.clear();
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
                Some(Event::Logout) => {
                    log.end = "logout";
                    return PreauthEnd::Done;
                }
                Some(Event::Close) => {
                    log.end = "protocol_error";
                    return PreauthEnd::Done;
                }
                Some(Event::Login(credentials)) => {
                    attempts += 1;
                    log.user = Some(credentials.username.clone());
                    match log_in(conn, &session, &credentials).await {
                        Ok((grant, address, backend)) => {
                            log.backend = Some(address);
                            let name = Some(credentials.username.as_str());
                            conn.record_login(log, name, LoginResult::Ok);
                            let reply = reply::logged_in(&credentials.tag, &backend.capabilities);
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
                            pending = reply::refused(
                                &credentials.tag,
                                result,
                                &conn.context.current().messages,
                            );
                            if attempts >= max_attempts {
                                pending.extend_from_slice(b"* BYE Too many failed logins\r\n");
                                let _ = write(&mut stream, &pending).await;
                                log.end = "too_many_attempts";
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

/// Account rules, then the backends in the user's order.
async fn log_in(
    conn: &Connection,
    session: &PreAuth,
    credentials: &Credentials,
) -> Result<(Grant, String, BackendSession), LoginResult> {
    let grant = authorize(
        &conn.context,
        conn.peer.ip(),
        &credentials.username,
        credentials.authzid.as_deref(),
        credentials.password.as_bytes(),
        Protocol::Imap,
    )
    .await?;
    let pool = &grant.route.pool;
    let (peer, local) = (conn.peer, conn.local_addr());
    let (peer_ip, peer_port) = (peer.ip().to_string(), peer.port().to_string());
    let (local_ip, local_port) = (local.ip().to_string(), local.port().to_string());
    let mut id = vec![
        ("x-originating-ip", peer_ip.as_str()),
        ("x-originating-port", peer_port.as_str()),
        ("x-connected-ip", local_ip.as_str()),
        ("x-connected-port", local_port.as_str()),
        ("x-session-id", conn.id.as_str()),
    ];
    // The client's own fields, but never an `x-` one: those tell the backend things
    // (addresses, forwarded user fields) that only mailgate may say.
    id.extend(
        session
            .client_id()
            .iter()
            .filter(|(k, _)| !k.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")))
            .filter_map(|(k, v)| v.as_deref().map(|v| (k.as_str(), v))),
    );
    let login = pool.imap_login();
    let request = LoginRequest {
        user: &grant.route.address,
        password: credentials.password.as_bytes(),
        login: &login,
        transport: &pool.transport,
        id: &id,
        connect_timeout: pool.connect_timeout(),
        login_timeout: BACKEND_LOGIN_TIMEOUT,
    };
    let user = grant.route.address.clone();
    let metrics = &conn.context.metrics;
    match first_available(&conn.id, pool, Protocol::Imap, &user, metrics, |address| {
        let request = &request;
        async move { backend::login(&address, request).await }
    })
    .await
    {
        Ok((address, session)) => Ok((grant, address, session)),
        Err(BackendError::Refused { code }) => Err(refused_result(
            code.as_deref(),
            matches!(*login, ImapLogin::Master { .. }),
        )),
        Err(_) => Err(LoginResult::BackendUnavailable),
    }
}

/// What a backend's `NO [CODE]` means for the client; the backend's own text never reaches
/// the client. With the client's own credentials (passthrough), a refusal without a code is a
/// failed authentication. With the master user (`master`), mailgate has checked the password
/// already: a refusal is the backend's or the setup's (a user the backend does not know, a
/// wrong master password, a client certificate it does not accept), so the client hears
/// "temporarily unavailable" and keeps its password, and no failed login counts against it.
fn refused_result(code: Option<&str>, master: bool) -> LoginResult {
    match code.map(str::to_ascii_uppercase).as_deref() {
        Some("LIMIT") => LoginResult::TooManyConnections,
        Some("UNAVAILABLE") | Some("SERVERBUG") => LoginResult::BackendUnavailable,
        _ if master => LoginResult::BackendUnavailable,
        _ => LoginResult::InvalidCredentials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_refusals_map_to_client_results() {
        for master in [false, true] {
            assert_eq!(
                refused_result(Some("unavailable"), master),
                LoginResult::BackendUnavailable
            );
            assert_eq!(
                refused_result(Some("LIMIT"), master),
                LoginResult::TooManyConnections
            );
        }
        // The client's own password, refused: theirs to fix.
        for code in [None, Some("AUTHENTICATIONFAILED"), Some("ALERT")] {
            assert_eq!(refused_result(code, false), LoginResult::InvalidCredentials);
        }
        // mailgate's master login, refused: the backend's or the setup's.
        for code in [None, Some("AUTHENTICATIONFAILED"), Some("ALERT")] {
            assert_eq!(refused_result(code, true), LoginResult::BackendUnavailable);
        }
    }
}
