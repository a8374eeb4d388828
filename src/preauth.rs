//! What the IMAP and SMTP drivers share before login: the listener's TLS mode (implicit,
//! STARTTLS, none), the pre-auth deadline and the drain, and the hand-over to the splice.
//! Each protocol supplies only its session loop and its hand-over (`Driver`).

use std::future::Future;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::BackendStream;
use crate::config::{ListenerTls, Protocol};
use crate::login::Grant;
use crate::server::{goodbye, write, AwareSession, ClientStream, Connection, SessionLog, Spliced};
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
pub enum PreauthEnd<S> {
    /// STARTTLS: the plain stream, for the handshake. Everything the client pipelined after
    /// STARTTLS went with the session.
    StartTls(S),
    /// Logged in at a backend (boxed: the other variants are small).
    LoggedIn(Box<LoggedIn>),
    /// Logout/QUIT, error, timeout or shutdown: nothing more to do.
    Done,
}

/// A login a backend accepted, ready for the splice.
pub struct LoggedIn {
    pub client: ClientStream,
    pub grant: Grant,
    pub backend: BackendStream,
    /// The client's answer (IMAP's tagged OK with the backend's capabilities, SMTP's 235).
    pub reply: Vec<u8>,
    /// What the backend sent past its own login reply, in the same read: the client's next,
    /// through the aware filter where there is one.
    pub leftover: Vec<u8>,
    /// What the client sent after its login, for the backend.
    pub pipelined: BytesMut,
}

/// One protocol's pre-auth phase.
pub trait Driver: Sync {
    const PROTOCOL: Protocol;
    const GOODBYES: Goodbyes;

    /// What the server says first on an implicit-TLS listener, to go with the TLS 1.3
    /// handshake's flight (`tls_stream::accept`); empty for a protocol that must see whether
    /// the client talks first (SMTP's early-talker check).
    fn tls_greeting(&self) -> &'static [u8];

    /// Runs the protocol's pre-auth session on `stream`.
    fn session<S>(
        &self,
        conn: &mut Connection,
        log: &mut SessionLog,
        stream: S,
        mode: Mode,
        deadline: Instant,
    ) -> impl Future<Output = PreauthEnd<S>> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Into<ClientStream>;
}

/// Runs one connection up to the splice: TLS as the listener says, the protocol's session,
/// the hand-over. `None` when the connection ended before a login (its log line left).
pub async fn serve<D: Driver>(driver: &D, mut conn: Connection, tcp: TcpStream) -> Option<Spliced> {
    let mut log = SessionLog::new();
    let deadline = Instant::now() + conn.context.current().limits.preauth_timeout.0;
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
        ListenerTls::Implicit => {
            match conn
                .tls_handshake(&mut log, tcp, driver.tls_greeting())
                .await
            {
                Some((tls, greeted)) => driver
                    .session(
                        &mut conn,
                        &mut log,
                        tls,
                        mode(true, false, !greeted),
                        deadline,
                    )
                    .await
                    .logged_in(),
                None => None,
            }
        }
        ListenerTls::Starttls => {
            let first = driver.session(&mut conn, &mut log, tcp, mode(false, true, true), deadline);
            match first.await {
                PreauthEnd::StartTls(tcp) => match conn.tls_handshake(&mut log, tcp, b"").await {
                    Some((tls, _)) => driver
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
        Some(session) => hand_over(conn, log, session, D::PROTOCOL, &D::GOODBYES).await,
        None => {
            log.emit(&conn);
            None
        }
    }
}

impl<S> PreauthEnd<S> {
    fn logged_in(self) -> Option<LoggedIn> {
        match self {
            PreauthEnd::LoggedIn(session) => Some(*session),
            PreauthEnd::StartTls(_) | PreauthEnd::Done => None,
        }
    }
}

/// The protocol's goodbyes.
pub struct Goodbyes {
    /// At the pre-auth deadline (`* BYE ...`, `421 4.4.2 ...`).
    pub timeout: &'static [u8],
    /// When the server drains: at once before login, at the drain deadline after
    /// (`* BYE ...`, `421 4.3.2 ...`).
    pub shutdown: &'static [u8],
    /// After the idle timeout of a spliced session.
    pub idle: &'static [u8],
}

/// Answers the login, passes on what the client pipelined, and hands the session to the
/// splice; nothing of the login phase stays allocated. `None` when a side went away here
/// (after the session's log line).
async fn hand_over(
    conn: Connection,
    mut log: SessionLog,
    session: LoggedIn,
    protocol: Protocol,
    goodbyes: &Goodbyes,
) -> Option<Spliced> {
    let LoggedIn {
        mut client,
        grant,
        mut backend,
        reply,
        leftover,
        pipelined,
    } = session;
    log.user = Some(grant.route.address.clone());
    log.pool = Some(grant.route.pool.name.clone());
    // Rules 5-6 need the IMAP-aware relay; it takes what the client pipelined through its
    // filter, and the client is not offered COMPRESS (the filter must read the stream).
    let mut aware = (protocol == Protocol::Imap && grant.account.needs_imap_filter()).then(|| {
        crate::imap::aware::Aware::new(crate::imap::aware::Rules::of(&grant.account), &reply)
    });
    let reply = match aware.as_mut() {
        Some(filter) => {
            // The filter's first output for the client, written by the relay.
            filter.backend_bytes(&leftover);
            crate::imap::aware::Aware::strip_capabilities(&reply)
        }
        None => {
            let mut reply = reply;
            reply.extend_from_slice(&leftover);
            reply
        }
    };
    if write(&mut client, &reply).await.is_err() {
        log.end = "client_gone";
    } else if aware.is_none()
        && !pipelined.is_empty()
        && write(&mut backend, &pipelined).await.is_err()
    {
        log.end = "backend_gone";
    } else {
        log.client_to_backend += pipelined.len() as u64;
        let meter = conn.context.metrics.relay_meter(protocol);
        crate::relay::Meter::client_to_backend(meter, pipelined.len() as u64);
        return Some(Spliced {
            conn,
            log,
            client,
            backend,
            bye_shutdown: goodbyes.shutdown,
            bye_idle: goodbyes.idle,
            session: grant.session,
            aware: aware.map(|filter| Box::new(AwareSession { filter, pipelined })),
        });
    }
    log.emit(&conn);
    None
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
