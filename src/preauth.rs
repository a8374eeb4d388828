//! What the IMAP and SMTP drivers share before login: the listener's TLS mode (implicit,
//! STARTTLS, none), the pre-auth deadline and the drain, and the hand-over to the splice.
//! Each protocol supplies only its session loop and its hand-over (`Driver`).

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ListenerTls;
use crate::server::{goodbye, ClientStream, Connection, SessionLog, Spliced};
use crate::shutdown::Phase;

/// How a pre-auth session runs on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// TLS is on (implicit listener, or after STARTTLS).
    pub tls_active: bool,
    /// A STARTTLS listener before TLS: offer STARTTLS, refuse logins.
    pub starttls_offered: bool,
    /// Send the greeting (not after STARTTLS: RFC 3501 6.2.1, RFC 3207).
    pub greet: bool,
}

/// How a pre-auth session ended.
pub enum PreauthEnd<S, L> {
    /// STARTTLS: the plain stream, for the handshake. Everything the client pipelined after
    /// STARTTLS went with the session.
    StartTls(S),
    /// Logged in at a backend (boxed: the other variants are small).
    LoggedIn(Box<L>),
    /// Logout/QUIT, error, timeout or shutdown: nothing more to do.
    Done,
}

/// One protocol's pre-auth phase.
pub trait Driver: Sync {
    /// What a successful login hands to `hand_over`.
    type LoggedIn: Send;

    /// Runs the protocol's pre-auth session on `stream`.
    fn session<S>(
        &self,
        conn: &mut Connection,
        log: &mut SessionLog,
        stream: S,
        mode: Mode,
        deadline: Instant,
    ) -> impl Future<Output = PreauthEnd<S, Self::LoggedIn>> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Into<ClientStream>;

    /// Answers the successful login and passes on what was pipelined; `None` when the
    /// session ended there (its log line already left).
    fn hand_over(
        &self,
        conn: Connection,
        log: SessionLog,
        session: Self::LoggedIn,
    ) -> impl Future<Output = Option<Spliced>> + Send;
}

/// Runs one connection up to the splice: TLS as the listener says, the protocol's session,
/// the hand-over. `None` when the connection ended before a login (its log line left).
pub async fn serve<D: Driver>(driver: &D, mut conn: Connection, tcp: TcpStream) -> Option<Spliced> {
    let mut log = SessionLog::new();
    let deadline = Instant::now() + conn.context.config.limits.preauth_timeout.0;
    let mode = |tls_active, starttls_offered, greet| Mode {
        tls_active,
        starttls_offered,
        greet,
    };
    let logged_in = match conn.listener.config.tls {
        ListenerTls::None => driver
            .session(&mut conn, &mut log, tcp, mode(false, false, true), deadline)
            .await
            .logged_in(),
        ListenerTls::Implicit => match conn.tls_handshake(&mut log, tcp).await {
            Some(tls) => driver
                .session(&mut conn, &mut log, tls, mode(true, false, true), deadline)
                .await
                .logged_in(),
            None => None,
        },
        ListenerTls::Starttls => {
            let first = driver.session(&mut conn, &mut log, tcp, mode(false, true, true), deadline);
            match first.await {
                PreauthEnd::StartTls(tcp) => match conn.tls_handshake(&mut log, tcp).await {
                    Some(tls) => driver
                        .session(&mut conn, &mut log, tls, mode(true, false, false), deadline)
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
        Some(session) => driver.hand_over(conn, log, session).await,
        None => {
            log.emit(&conn);
            None
        }
    }
}

impl<S, L> PreauthEnd<S, L> {
    fn logged_in(self) -> Option<L> {
        match self {
            PreauthEnd::LoggedIn(session) => Some(*session),
            PreauthEnd::StartTls(_) | PreauthEnd::Done => None,
        }
    }
}

/// The protocol's goodbyes before login.
pub struct Goodbyes {
    /// At the pre-auth deadline (`* BYE ...`, `421 4.4.2 ...`).
    pub timeout: &'static [u8],
    /// When the server starts draining (`* BYE ...`, `421 4.3.2 ...`).
    pub shutdown: &'static [u8],
}

/// Reads the client's next bytes before login. `None` when the session is over: the client
/// went away, the pre-auth deadline passed, or the server is draining — in the last two
/// cases after the protocol's goodbye. Records why in `log.end`.
pub async fn read<S>(
    conn: &mut Connection,
    log: &mut SessionLog,
    stream: &mut S,
    buf: &mut [u8],
    deadline: Instant,
    goodbyes: &Goodbyes,
) -> Option<usize>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let read = tokio::select! {
        r = stream.read(buf) => r,
        () = tokio::time::sleep_until(deadline) => {
            goodbye(stream, goodbyes.timeout).await;
            log.end = "preauth_timeout";
            return None;
        }
        () = conn.shutdown.reached(Phase::Draining) => {
            goodbye(stream, goodbyes.shutdown).await;
            log.end = "shutdown";
            return None;
        }
    };
    match read {
        Ok(n) if n > 0 => Some(n),
        Ok(_) | Err(_) => {
            log.end = "client_gone";
            None
        }
    }
}
