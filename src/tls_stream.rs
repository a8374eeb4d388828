//! The client side's TLS stream, on rustls' unbuffered API: it holds no buffers while idle.
//!
//! tokio-rustls keeps rustls' own buffers for the life of a connection: the deframer buffer
//! stays at 4 KiB or more once anything was read, and the send and plaintext queues keep their
//! capacity. Most of a proxy's sessions sit idle for hours, so here rustls keeps only the
//! connection state, and the bytes live in buffers on loan from the per-thread pool
//! (`buffers`):
//! - incoming TLS bytes are read into a pooled buffer only once the socket is readable; the
//!   buffer goes back as soon as every complete record in it is decrypted, and stays only
//!   while a partial record (or a handshake message spanning records) waits for the rest;
//! - plaintext the reader had no room for waits in a small buffer until it is read;
//! - outgoing records are encrypted into a pooled buffer (a 16 KiB write becomes one full
//!   record, the relay's 64 KiB write four), written in one go, and the buffer goes back once
//!   the socket has taken them all; small writes wait for the flush, so a reply and the
//!   `close_notify` after it leave together.
//!
//! `accept` takes what the server says first (IMAP's greeting): in TLS 1.3 it leaves
//! encrypted in the server's first flight, right after its Finished (0.5-RTT data, RFC 8446
//! section 2), so the client reads it one round trip sooner and sends its Finished and its
//! first command together; in TLS 1.2 it is not sent, and the caller writes it as usual.
//!
//! Like tokio-rustls: the handshake completes both ways before `accept` returns; a
//! `close_notify` from the peer reads as EOF; a TCP EOF without one is `UnexpectedEof`;
//! `shutdown` sends `close_notify`, then shuts the socket's write side. Unlike it, the TLS
//! 1.3 session ticket rustls issues after the client's Finished waits for the first write (the
//! greeting, or where that went early the reply to the login) and leaves in the same segment,
//! or leaves at the first read that has to wait: one send and one wakeup of the client fewer
//! per login.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::buffers::{PooledBuf, Size};

/// Plaintext per record: a full one.
const MAX_PLAINTEXT_PER_RECORD: usize = 16 * 1024;
/// Room a record takes in `outgoing` beyond its plaintext, with margin (header 5, content
/// type 1, AEAD tag 16).
const RECORD_OVERHEAD: usize = 256;
/// Up to this many queued bytes (a session ticket, a small record the socket did not take at
/// once) a write's record joins the queue instead of waiting for it to leave; a queue this
/// small after a write waits for the flush or the shutdown.
const COALESCE_BELOW: usize = 4 * 1024;
/// The most incoming bytes kept while rustls waits for the rest of a handshake message that
/// spans records (rustls caps a handshake message at 64 KiB).
const MAX_INCOMING: usize = 96 * 1024;

/// Runs the server side of a TLS handshake on `tcp` (nothing read from it yet) with
/// mailgate's `config`; the caller bounds it in time. `first` (may be empty) is what the
/// server says before the client does: sent with the server's flight where TLS 1.3 allows it
/// (`config.send_half_rtt_data`). Returns the stream and whether `first` was sent; if not,
/// the caller writes it.
///
/// # Errors
/// The client sent something that is not an acceptable TLS handshake (`InvalidData`, after
/// rustls' alert was sent where the socket took it), closed the connection
/// (`UnexpectedEof`), or the socket failed.
pub async fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    first: &[u8],
) -> io::Result<(LeanTlsStream, bool)> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = LeanTlsStream {
        tcp,
        conn,
        incoming: Incoming::default(),
        outgoing: Outgoing::default(),
        plaintext: Plaintext::default(),
        peer_closed: false,
        close_sent: false,
        failed: false,
    };
    // One record or none: a longer `first` is the caller's to write after the handshake.
    let mut early = (!first.is_empty() && first.len() <= MAX_PLAINTEXT_PER_RECORD).then_some(first);
    let sent = early.is_some();
    poll_fn(|cx| stream.poll_handshake(cx, &mut early)).await?;
    // `early` is taken once its record is queued; still there, it never was.
    Ok((stream, sent && early.is_none()))
}

/// A server-side TLS stream over TCP whose buffers are on loan only while bytes move.
pub struct LeanTlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Incoming,
    outgoing: Outgoing,
    plaintext: Plaintext,
    /// The peer sent `close_notify`: reads are at EOF once `plaintext` is drained.
    peer_closed: bool,
    /// We queued our `close_notify`; nothing more may be encrypted.
    close_sent: bool,
    /// A fatal TLS error happened (and was reported): rustls must not be driven again.
    failed: bool,
}

/// What `process` should do once rustls is ready for application data.
#[derive(Clone, Copy)]
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// What one turn of rustls' state machine came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Records were processed or output queued; take another turn.
    Again,
    /// The handshake needs more bytes from the peer.
    NeedInput,
    /// Application data may flow and nothing buffered is left to process; `Want::Nothing`.
    Traffic,
    /// The `Want` was done: this many plaintext bytes were encrypted (0 for `close_notify`).
    Wrote(usize),
    /// The peer's `close_notify` arrived (reported once).
    PeerClosed,
    /// Both sides sent `close_notify`.
    Closed,
}

impl LeanTlsStream {
    /// One turn of rustls over the buffered incoming bytes: decrypted plaintext goes to `dst`
    /// (the rest waits in `plaintext`), handshake records and alerts go to `outgoing`.
    fn process(
        &mut self,
        mut dst: Option<&mut ReadBuf<'_>>,
        want: Want<'_>,
    ) -> Result<Step, rustls::Error> {
        let LeanTlsStream {
            conn,
            incoming,
            outgoing,
            plaintext,
            close_sent,
            ..
        } = self;
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(incoming.filled_mut());
        let step = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => loop {
                match traffic.next_record() {
                    None => break Ok(Step::Again),
                    Some(Err(e)) => break Err(e),
                    Some(Ok(record)) => {
                        discard += record.discard;
                        plaintext.deliver(record.payload, dst.as_deref_mut());
                    }
                }
            },
            Ok(ConnectionState::EncodeTlsData(mut data)) => outgoing
                .append(|out| data.encode(out).map_err(Room::from))
                .map(|()| Step::Again),
            Ok(ConnectionState::TransmitTlsData(data)) => {
                // What was encoded is in `outgoing`, which every caller sends before it waits.
                data.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedInput),
            Ok(ConnectionState::PeerClosed) => Ok(Step::PeerClosed),
            Ok(ConnectionState::Closed) => Ok(Step::Closed),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                write_traffic(&mut traffic, want, outgoing, close_sent)
            }
            // 0-RTT is off in mailgate's config (`max_early_data_size` 0), so rustls never
            // accepts early data; anything else is a state this rustls did not have.
            Ok(_) => Err(rustls::Error::General(
                "unexpected TLS connection state".to_string(),
            )),
        };
        incoming.discard(discard);
        step
    }

    /// Drives the handshake until it is complete both ways and our flights have left (the
    /// session ticket may wait in `outgoing` for the first write). `early` is encrypted as
    /// soon as rustls lets application data go before the client's Finished (and taken):
    /// it leaves with the server's flight.
    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        early: &mut Option<&[u8]>,
    ) -> Poll<io::Result<()>> {
        loop {
            let want = match early {
                Some(data) if self.conn.is_handshaking() => Want::Encrypt(data),
                _ => Want::Nothing,
            };
            let step = match self.process(None, want) {
                Ok(step) => step,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            match step {
                Step::Again => {}
                Step::Wrote(_) => *early = None,
                // rustls lets a TLS 1.3 server send right after its Finished, before the
                // client's (`send_half_rtt_data`): the handshake is done when the client's
                // Finished is in too.
                // In TLS 1.3 what is queued now is the session ticket, which the client does
                // not wait for: it goes with the first write. In TLS 1.2 it is our Finished,
                // which the client does wait for: it goes now.
                Step::Traffic if !self.conn.is_handshaking() => {
                    if self.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                        ready!(self.outgoing.poll_send(cx, &mut self.tcp))?;
                    }
                    return Poll::Ready(Ok(()));
                }
                Step::Traffic | Step::NeedInput => {
                    // Our flight must reach the client before we wait for its answer.
                    ready!(self.outgoing.poll_send(cx, &mut self.tcp))?;
                    if ready!(self.incoming.poll_fill(cx, &mut self.tcp))? == 0 {
                        return Poll::Ready(Err(eof("the client closed during the TLS handshake")));
                    }
                }
                Step::PeerClosed | Step::Closed => {
                    return Poll::Ready(Err(eof("the client closed during the TLS handshake")));
                }
            }
        }
    }

    /// A fatal TLS error: hands rustls' alert to the socket if it takes it now, drops every
    /// buffer, and says what went wrong.
    fn fail(&mut self, error: rustls::Error) -> io::Error {
        // What rustls queued (its alert last) comes out of more turns; rustls hands queued
        // records over before it looks at incoming bytes again, which it must not (it would
        // fail on them a second time).
        self.failed = true;
        for _ in 0..8 {
            if !self.conn.wants_write() || self.process(None, Want::Nothing) != Ok(Step::Again) {
                break;
            }
        }
        self.outgoing.try_send(&self.tcp);
        self.incoming = Incoming::default();
        self.outgoing = Outgoing::default();
        self.plaintext = Plaintext::default();
        tls_error(error)
    }

    /// Whether the stream has any buffer on loan or pending plaintext (tests: an idle stream
    /// must hold none).
    #[cfg(test)]
    pub(crate) fn holds_buffers(&self) -> bool {
        self.incoming.buf.is_some()
            || self.outgoing.buf.is_some()
            || self.plaintext.buf.capacity() > 0
    }
}

/// Handles rustls' `WriteTraffic` state for `want`.
fn write_traffic(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    want: Want<'_>,
    outgoing: &mut Outgoing,
    close_sent: &mut bool,
) -> Result<Step, rustls::Error> {
    match want {
        Want::Nothing => Ok(Step::Traffic),
        Want::Encrypt(data) => {
            let data = data.get(..MAX_PLAINTEXT_PER_RECORD).unwrap_or(data);
            outgoing.append(|out| traffic.encrypt(data, out).map_err(Room::from))?;
            Ok(Step::Wrote(data.len()))
        }
        Want::CloseNotify => {
            outgoing.append(|out| traffic.queue_close_notify(out).map_err(Room::from))?;
            *close_sent = true;
            Ok(Step::Wrote(0))
        }
    }
}

impl AsyncRead for LeanTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(failed_before()));
        }
        loop {
            if this.plaintext.take_into(buf) > 0 || this.peer_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let step = match this.process(Some(buf), Want::Nothing) {
                Ok(step) => step,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            };
            match step {
                Step::Again | Step::Wrote(_) => {
                    if buf.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                Step::PeerClosed | Step::Closed => {
                    this.peer_closed = true;
                    continue;
                }
                Step::Traffic | Step::NeedInput => {}
            }
            // Whatever is queued (a write not yet sent, or what rustls queued on its own: a
            // refused renegotiation) goes out if the socket takes it now. Without registering
            // for write readiness: a writer on another task (`tokio::io::split`) waits for
            // that, and its wakeup must not be taken from it; it or the flush sends the rest.
            this.outgoing.try_send(&this.tcp);
            if ready!(this.incoming.poll_fill(cx, &mut this.tcp))? == 0 {
                return Poll::Ready(Err(eof(
                    "the peer closed the connection without sending TLS close_notify",
                )));
            }
        }
    }
}

impl AsyncWrite for LeanTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.failed {
            return Poll::Ready(Err(failed_before()));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after TLS close_notify",
            )));
        }
        // One write's records in flight at most, but a small queue (the session ticket) is
        // sent together with this write's records. A write is encrypted a record at a time
        // while the TLS buffer has room for another (four from a full relay buffer), then
        // sent in one go.
        if this.outgoing.len() >= COALESCE_BELOW {
            ready!(this.outgoing.poll_send(cx, &mut this.tcp))?;
        }
        let mut written = 0;
        loop {
            let rest = data.get(written..).unwrap_or_default();
            let step = match this.process(None, Want::Encrypt(rest)) {
                Ok(step) => step,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            };
            match step {
                Step::Wrote(n) => {
                    written += n;
                    if written < data.len()
                        && this.outgoing.len() + MAX_PLAINTEXT_PER_RECORD + RECORD_OVERHEAD
                            <= crate::buffers::TLS_BUFFER
                    {
                        continue;
                    }
                    // A small queue waits for the flush (or the next write, or the shutdown,
                    // whose close_notify then leaves in the same segment: a session's last
                    // reply and its end are one send). A large one goes out at once if the
                    // socket takes it; otherwise the next write or the flush sends the rest.
                    if this.outgoing.len() >= COALESCE_BELOW {
                        if let Poll::Ready(Err(e)) = this.outgoing.poll_send(cx, &mut this.tcp) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    return Poll::Ready(Ok(written));
                }
                Step::Again | Step::Traffic => {}
                Step::PeerClosed => this.peer_closed = true,
                Step::NeedInput | Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "TLS connection not open for writing",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.outgoing.poll_send(cx, &mut this.tcp))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A connection that failed just closes.
        while !this.close_sent && !this.failed {
            match this.process(None, Want::CloseNotify) {
                Ok(Step::Wrote(_) | Step::Closed | Step::NeedInput) | Err(_) => break,
                Ok(Step::PeerClosed) => this.peer_closed = true,
                Ok(Step::Again | Step::Traffic) => {}
            }
        }
        ready!(this.outgoing.poll_send(cx, &mut this.tcp))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Incoming TLS bytes not yet processed: `buf[start..end]`; no buffer while there are none.
#[derive(Default)]
struct Incoming {
    buf: Option<PooledBuf>,
    start: usize,
    end: usize,
}

impl Incoming {
    fn filled_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(buf) => buf.get_mut(self.start..self.end).unwrap_or_default(),
            None => &mut [],
        }
    }

    /// rustls is done with the first `n` bytes; the buffer goes back once none are left.
    fn discard(&mut self, n: usize) {
        self.start = self.end.min(self.start + n);
        if self.start == self.end {
            *self = Incoming::default();
        }
    }

    /// Reads what the socket has, taking a buffer only once it is readable. `Ready(Ok(0))`
    /// is the peer's EOF.
    /// The read goes through tokio's `poll_read`: a read that does not fill the room tells
    /// tokio the socket is drained, so the next read waits for readiness instead of trying
    /// (and failing with `EAGAIN`) first.
    fn poll_fill(&mut self, cx: &mut Context<'_>, tcp: &mut TcpStream) -> Poll<io::Result<usize>> {
        ready!(tcp.poll_read_ready(cx))?;
        let buf = self.buf.get_or_insert_with(|| PooledBuf::take(Size::Tls));
        if self.end == buf.len() {
            if self.start > 0 {
                buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if buf.len() < MAX_INCOMING {
                buf.grow((buf.len() * 2).min(MAX_INCOMING));
            } else {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake message too large",
                )));
            }
        }
        let read = match buf.get_mut(self.end..) {
            Some(room) => {
                let mut room = ReadBuf::new(room);
                Pin::new(&mut *tcp)
                    .poll_read(cx, &mut room)
                    .map_ok(|()| room.filled().len())
            }
            None => Poll::Ready(Ok(0)),
        };
        if let Poll::Ready(Ok(n)) = read {
            self.end += n;
        }
        // Readiness was stale (`Pending`: tokio waits for the socket again) or the read
        // failed: the buffer goes back unless bytes wait in it.
        self.discard(0);
        read
    }
}

/// Encrypted bytes not yet written: `buf[start..end]`; no buffer while there are none.
#[derive(Default)]
struct Outgoing {
    buf: Option<PooledBuf>,
    start: usize,
    end: usize,
}

/// Why rustls could not write into the room it was given.
enum Room {
    /// It needs this many bytes.
    Needs(usize),
    Fatal(rustls::Error),
}

impl From<EncodeError> for Room {
    fn from(e: EncodeError) -> Room {
        match e {
            EncodeError::InsufficientSize(s) => Room::Needs(s.required_size),
            EncodeError::AlreadyEncoded => Room::Fatal(rustls::Error::General(
                "TLS record encoded twice".to_string(),
            )),
        }
    }
}

impl From<EncryptError> for Room {
    fn from(e: EncryptError) -> Room {
        match e {
            EncryptError::InsufficientSize(s) => Room::Needs(s.required_size),
            EncryptError::EncryptExhausted => Room::Fatal(rustls::Error::EncryptError),
        }
    }
}

impl Outgoing {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn queued(&self) -> Option<&[u8]> {
        self.buf
            .as_ref()
            .and_then(|b| b.get(self.start..self.end))
            .filter(|b| !b.is_empty())
    }

    /// Lets rustls write at the end of the queue, making room once if it asks for more.
    fn append(
        &mut self,
        mut fill: impl FnMut(&mut [u8]) -> Result<usize, Room>,
    ) -> Result<(), rustls::Error> {
        let buf = self.buf.get_or_insert_with(|| PooledBuf::take(Size::Tls));
        let mut grown = false;
        let result = loop {
            let room = buf.get_mut(self.end..).unwrap_or_default();
            match fill(room) {
                Ok(n) => {
                    self.end += n;
                    break Ok(());
                }
                Err(Room::Needs(required)) if !grown => {
                    buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    buf.grow(self.end + required);
                    grown = true;
                }
                Err(Room::Needs(required)) => {
                    break Err(rustls::Error::General(format!(
                        "TLS output needs {required} bytes more than given"
                    )))
                }
                Err(Room::Fatal(e)) => break Err(e),
            }
        };
        if self.start == self.end {
            *self = Outgoing::default();
        }
        result
    }

    /// Writes what the socket takes now, without waiting.
    fn try_send(&mut self, tcp: &TcpStream) {
        while let Some(bytes) = self.queued() {
            match tcp.try_write(bytes) {
                Ok(n) if n > 0 => self.start += n,
                _ => return,
            }
        }
        *self = Outgoing::default();
    }

    /// Writes the queue out; the buffer goes back once it is all written.
    fn poll_send(&mut self, cx: &mut Context<'_>, tcp: &mut TcpStream) -> Poll<io::Result<()>> {
        while let Some(bytes) = self.queued() {
            let n = ready!(Pin::new(&mut *tcp).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.start += n;
        }
        *self = Outgoing::default();
        Poll::Ready(Ok(()))
    }
}

/// Decrypted bytes the reader had no room for: `buf[pos..]`; no heap while empty.
#[derive(Default)]
struct Plaintext {
    buf: Vec<u8>,
    pos: usize,
}

impl Plaintext {
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Hands a record's plaintext to `dst` as far as it has room (and nothing is waiting
    /// ahead of it); keeps the rest.
    fn deliver(&mut self, mut payload: &[u8], dst: Option<&mut ReadBuf<'_>>) {
        if let Some(dst) = dst.filter(|_| self.is_empty()) {
            let n = dst.remaining().min(payload.len());
            let (now, later) = payload.split_at(n);
            dst.put_slice(now);
            payload = later;
        }
        if !payload.is_empty() {
            self.buf.extend_from_slice(payload);
        }
    }

    /// Moves what fits into `dst`; how many bytes that was.
    fn take_into(&mut self, dst: &mut ReadBuf<'_>) -> usize {
        let waiting = self.buf.get(self.pos..).unwrap_or_default();
        let n = dst.remaining().min(waiting.len());
        if let Some(now) = waiting.get(..n) {
            dst.put_slice(now);
        }
        self.pos += n;
        if self.is_empty() {
            *self = Plaintext::default();
        }
        n
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn failed_before() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the TLS connection failed earlier",
    )
}

fn eof(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::client::ClientConnection;
    use rustls::{ClientConfig, HandshakeKind, RootCertStore, SupportedProtocolVersion};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::client::TlsStream as ClientTls;
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::config::{CertificateConfig, TlsConfig};
    use crate::tls::Tls;

    const NAME: &str = "imap.example.com";

    /// mailgate's own server config (SNI resolver, tickets) with a leaf from a test CA, and
    /// roots that trust that CA.
    struct Pki {
        server: Arc<ServerConfig>,
        roots: RootCertStore,
        _dir: tempfile::TempDir,
    }

    fn pki() -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailgate test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec![NAME.to_string()])
            .expect("leaf params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = CertificateConfig {
            cert: dir.path().join("leaf.crt"),
            key: dir.path().join("leaf.key"),
        };
        std::fs::write(&cert.cert, leaf.pem()).expect("write cert");
        std::fs::write(&cert.key, leaf_key.serialize_pem()).expect("write key");
        let tls = Tls::from_config(&TlsConfig {
            certificates: vec![cert],
            self_signed_if_missing: false,
        })
        .expect("mailgate TLS config");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        Pki {
            server: tls.config.clone(),
            roots,
            _dir: dir,
        }
    }

    impl Pki {
        fn client(&self, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
            let config = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
            Arc::new(config)
        }
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from(NAME).expect("name")
    }

    /// A listener whose next connection gets the lean server handshake.
    async fn server(
        config: Arc<ServerConfig>,
    ) -> (SocketAddr, JoinHandle<io::Result<LeanTlsStream>>) {
        let (listener, address) = listen().await;
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            Ok(accept(config, tcp, b"").await?.0)
        });
        (address, task)
    }

    /// The same, with `first` for the server to say first; the task also says whether it went.
    async fn server_first(
        config: Arc<ServerConfig>,
        first: &'static [u8],
    ) -> (SocketAddr, JoinHandle<io::Result<(LeanTlsStream, bool)>>) {
        let (listener, address) = listen().await;
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            accept(config, tcp, first).await
        });
        (address, task)
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        (listener, address)
    }

    const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1] ready\r\n";

    #[tokio::test]
    async fn tls13_sends_the_greeting_with_the_servers_flight() {
        let pki = pki();
        let (address, server) = server_first(pki.server.clone(), GREETING).await;
        let mut client = ManualClient::connect(&pki, address, usize::MAX).await;
        let hello = client.pending_tls();
        client.send_raw(&hello).await;
        // Only the ClientHello went: what comes back is the server's flight and the greeting,
        // readable before the client's Finished has left.
        let greeting = tokio::time::timeout(
            Duration::from_secs(5),
            client.read_plaintext(GREETING.len()),
        )
        .await
        .expect("the greeting came before the client's Finished left");
        assert_eq!(greeting, GREETING);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !server.is_finished(),
            "the server waits for the client's Finished"
        );
        let finished = client.pending_tls();
        client.send_raw(&finished).await;
        let (mut server, greeted) = server.await.expect("join").expect("server handshake");
        assert!(greeted, "accept says the greeting went");
        // The session goes on as usual; the ticket leaves at the server's first write.
        server.write_all(b"* BYE\r\n").await.expect("write");
        server.flush().await.expect("flush");
        let bye = tokio::time::timeout(Duration::from_secs(5), client.read_plaintext(7))
            .await
            .expect("the server's first write arrived");
        assert_eq!(bye, b"* BYE\r\n");
        assert!(!server.holds_buffers(), "idle after the flush");
    }

    #[tokio::test]
    async fn tls12_leaves_the_greeting_to_the_caller() {
        let pki = pki();
        let (address, server) = server_first(pki.server.clone(), GREETING).await;
        let tcp = TcpStream::connect(address).await.expect("connect");
        let mut client = TlsConnector::from(pki.client(&[&rustls::version::TLS12]))
            .connect(name(), tcp)
            .await
            .expect("client handshake");
        let (mut server, greeted) = server.await.expect("join").expect("server handshake");
        assert!(!greeted, "TLS 1.2 has no data before the client's Finished");
        // Nothing was sent early: the first bytes the client reads are the server's first write.
        server.write_all(b"* OK now\r\n").await.expect("write");
        server.flush().await.expect("flush");
        let mut line = [0u8; 10];
        client.read_exact(&mut line).await.expect("read");
        assert_eq!(&line, b"* OK now\r\n");
    }

    /// A connected pair: mailgate's side and a tokio-rustls client.
    async fn pair(pki: &Pki, client: Arc<ClientConfig>) -> (LeanTlsStream, ClientTls<TcpStream>) {
        let (address, server) = server(pki.server.clone()).await;
        let tcp = TcpStream::connect(address).await.expect("connect");
        let client = TlsConnector::from(client)
            .connect(name(), tcp)
            .await
            .expect("client handshake");
        let server = server.await.expect("join").expect("server handshake");
        (server, client)
    }

    fn payload(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn tls13_and_tls12_handshake_echo_and_hold_nothing_while_idle() {
        let pki = pki();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, mut client) = pair(&pki, pki.client(&[version])).await;
            // TLS 1.3: the session ticket waits for the first write or read, and only it.
            assert_eq!(
                server.holds_buffers(),
                version.version == rustls::ProtocolVersion::TLSv1_3,
                "{version:?}: after the handshake"
            );
            client.write_all(b"a1 NOOP\r\n").await.expect("write");
            client.flush().await.expect("flush");
            let mut line = [0u8; 9];
            server.read_exact(&mut line).await.expect("read");
            assert_eq!(&line, b"a1 NOOP\r\n");
            assert!(!server.holds_buffers(), "{version:?}: idle after a read");
            server
                .write_all(b"a1 OK NOOP done\r\n")
                .await
                .expect("write");
            server.flush().await.expect("flush");
            assert!(!server.holds_buffers(), "{version:?}: idle after a flush");
            let mut reply = [0u8; 17];
            client.read_exact(&mut reply).await.expect("read");
            assert_eq!(&reply, b"a1 OK NOOP done\r\n");
            assert_eq!(
                client.get_ref().1.protocol_version(),
                Some(version.version),
                "negotiated what the client allowed"
            );
        }
    }

    #[tokio::test]
    async fn session_tickets_resume_the_next_handshake() {
        let pki = pki();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client_config = pki.client(&[version]);
            for (round, expected) in [(0, HandshakeKind::Full), (1, HandshakeKind::Resumed)] {
                let (mut server, mut client) = pair(&pki, client_config.clone()).await;
                // A round trip, so a TLS 1.3 client reads the tickets sent after the handshake.
                server.write_all(b"* OK\r\n").await.expect("write");
                server.flush().await.expect("flush");
                let mut greeting = [0u8; 6];
                client.read_exact(&mut greeting).await.expect("read");
                assert_eq!(
                    client.get_ref().1.handshake_kind(),
                    Some(expected),
                    "{version:?} round {round}"
                );
                client.shutdown().await.expect("close");
                let mut rest = Vec::new();
                assert_eq!(server.read_to_end(&mut rest).await.expect("eof"), 0);
            }
        }
    }

    #[tokio::test]
    async fn a_server_that_reads_first_still_hands_out_its_ticket() {
        // After STARTTLS the client speaks first: the ticket must leave at the server's read.
        let pki = pki();
        let client_config = pki.client(&[&rustls::version::TLS13]);
        for (round, expected) in [(0, HandshakeKind::Full), (1, HandshakeKind::Resumed)] {
            let (mut server, mut client) = pair(&pki, client_config.clone()).await;
            client.write_all(b"EHLO c\r\n").await.expect("write");
            let mut line = [0u8; 8];
            server.read_exact(&mut line).await.expect("read");
            assert!(!server.holds_buffers(), "round {round}: the ticket left");
            server.write_all(b"250 ok\r\n").await.expect("write");
            server.flush().await.expect("flush");
            let mut reply = [0u8; 8];
            client.read_exact(&mut reply).await.expect("read");
            assert_eq!(client.get_ref().1.handshake_kind(), Some(expected));
            client.shutdown().await.expect("close");
            let mut rest = Vec::new();
            assert_eq!(server.read_to_end(&mut rest).await.expect("eof"), 0);
        }
    }

    #[tokio::test]
    async fn a_small_write_waits_for_the_flush_or_leaves_with_the_close_notify() {
        let pki = pki();
        let (mut server, mut client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        server.write_all(b"* BYE bye\r\n").await.expect("write");
        let mut line = [0u8; 11];
        let early =
            tokio::time::timeout(Duration::from_millis(200), client.read_exact(&mut line)).await;
        assert!(early.is_err(), "a small write left before the flush");
        assert!(server.holds_buffers(), "the record waits in the queue");
        // The shutdown queues the close_notify behind the record and sends the queue: one
        // write when the socket takes it all.
        server.shutdown().await.expect("shutdown");
        assert!(!server.holds_buffers(), "everything left");
        client.read_exact(&mut line).await.expect("read");
        assert_eq!(&line, b"* BYE bye\r\n");
        let mut rest = Vec::new();
        assert_eq!(
            client.read_to_end(&mut rest).await.expect("close_notify"),
            0
        );
    }

    #[tokio::test]
    async fn large_transfers_both_ways_at_once_from_split_halves() {
        let pki = pki();
        let (server, client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        let up = payload(6 * 1024 * 1024 + 123, 1);
        let down = payload(5 * 1024 * 1024 + 77, 2);
        let (mut sr, mut sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (up2, down2) = (up.clone(), down.clone());
        let client_writer = tokio::spawn(async move {
            for chunk in up2.chunks(7000) {
                cw.write_all(chunk).await.expect("client write");
            }
            cw.flush().await.expect("flush");
            cw
        });
        let server_writer = tokio::spawn(async move {
            sw.write_all(&down2).await.expect("server write");
            sw.flush().await.expect("flush");
            sw
        });
        let server_reader = tokio::spawn(async move {
            let mut got = vec![0u8; up.len()];
            sr.read_exact(&mut got).await.expect("server read");
            (got == up, sr)
        });
        let mut at_client = vec![0u8; down.len()];
        cr.read_exact(&mut at_client).await.expect("client read");
        assert!(
            at_client == down,
            "the client got the server's bytes intact"
        );
        let (intact, sr) = server_reader.await.expect("join");
        assert!(intact, "the server got the client's bytes intact");
        let sw = server_writer.await.expect("join");
        let _cw = client_writer.await.expect("join");
        let server = sr.unsplit(sw);
        assert!(!server.holds_buffers(), "drained: nothing held");
    }

    #[tokio::test]
    async fn echo_of_several_mib_from_one_task_like_the_relay() {
        let pki = pki();
        let (mut server, client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; crate::buffers::RELAY_BUFFER];
            loop {
                match server.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let Some(bytes) = buf.get(..n) else { break };
                        server.write_all(bytes).await.expect("echo write");
                        server.flush().await.expect("echo flush");
                    }
                    Err(e) => panic!("echo read: {e}"),
                }
            }
            server.shutdown().await.expect("shutdown");
            server.holds_buffers()
        });
        let sent = payload(4 * 1024 * 1024, 3);
        let (mut cr, mut cw) = tokio::io::split(client);
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&to_send).await.expect("write");
            cw.shutdown().await.expect("close_notify");
        });
        let mut back = Vec::new();
        cr.read_to_end(&mut back)
            .await
            .expect("read to the server's close_notify");
        writer.await.expect("join");
        assert!(
            back == sent,
            "echoed intact ({} of {} bytes)",
            back.len(),
            sent.len()
        );
        assert!(!echo.await.expect("join"), "nothing held after the close");
    }

    /// A rustls client driven by hand, so the test decides how its bytes reach the server.
    struct ManualClient {
        conn: ClientConnection,
        tcp: TcpStream,
        /// Bytes per write to the socket, with a pause after each so the server reads them
        /// one write at a time.
        feed: usize,
    }

    impl ManualClient {
        /// A TLS 1.3 client connected to `address`, nothing sent yet.
        async fn connect(pki: &Pki, address: SocketAddr, feed: usize) -> ManualClient {
            let tcp = TcpStream::connect(address).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let conn = ClientConnection::new(pki.client(&[&rustls::version::TLS13]), name())
                .expect("client");
            ManualClient { conn, tcp, feed }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            for piece in bytes.chunks(self.feed) {
                self.tcp.write_all(piece).await.expect("feed");
                if self.feed < bytes.len() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }

        /// What rustls has to send, as TLS bytes.
        fn pending_tls(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out).expect("write_tls");
            }
            out
        }

        async fn handshake(&mut self) {
            while self.conn.is_handshaking() {
                let out = self.pending_tls();
                self.send_raw(&out).await;
                if !self.conn.is_handshaking() {
                    break;
                }
                self.receive().await;
            }
            let out = self.pending_tls();
            self.send_raw(&out).await;
        }

        async fn receive(&mut self) {
            let mut buf = vec![0u8; 32 * 1024];
            let n = self.tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "server closed");
            let mut slice = buf.get(..n).expect("n <= len");
            while !slice.is_empty() {
                self.conn.read_tls(&mut slice).expect("read_tls");
                self.conn
                    .process_new_packets()
                    .expect("TLS from the server");
            }
        }

        /// Receives until `len` bytes of plaintext have been decrypted, and returns them.
        async fn read_plaintext(&mut self, len: usize) -> Vec<u8> {
            use std::io::Read;
            let mut got = Vec::new();
            loop {
                let mut chunk = [0u8; 256];
                match self.conn.reader().read(&mut chunk) {
                    Ok(n) => got.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client read: {e}"),
                }
                if got.len() >= len {
                    return got;
                }
                self.receive().await;
            }
        }

        fn records(&mut self, plaintext: &[u8]) -> Vec<u8> {
            use std::io::Write;
            self.conn.writer().write_all(plaintext).expect("plaintext");
            self.pending_tls()
        }
    }

    async fn manual_pair(pki: &Pki, feed: usize) -> (LeanTlsStream, ManualClient) {
        let (address, server) = server(pki.server.clone()).await;
        let mut client = ManualClient::connect(pki, address, feed).await;
        client.handshake().await;
        let server = server.await.expect("join").expect("server handshake");
        (server, client)
    }

    #[tokio::test]
    async fn records_fed_one_byte_at_a_time_are_reassembled() {
        let pki = pki();
        // The handshake's every byte boundary, then records of several sizes.
        let (mut server, mut client) = manual_pair(&pki, 1).await;
        let mut sent = Vec::new();
        let mut wire = Vec::new();
        for (i, len) in [1usize, 9, 300, 700].into_iter().enumerate() {
            let plaintext = payload(len, i as u32);
            wire.extend(client.records(&plaintext));
            sent.extend_from_slice(&plaintext);
        }
        // The server reads while the bytes trickle in, so it sees each one on its own.
        let expected = sent.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected];
            server.read_exact(&mut got).await.expect("read");
            (got, server)
        });
        client.send_raw(&wire).await;
        let (got, server) = reader.await.expect("join");
        assert!(got == sent, "reassembled intact");
        assert!(!server.holds_buffers());
    }

    #[tokio::test]
    async fn handshake_messages_and_data_in_tiny_records() {
        // A client that fragments everything into 64-byte records: its ClientHello spans
        // several records, which rustls coalesces in our incoming buffer.
        let pki = pki();
        let mut config = (*pki.client(&[&rustls::version::TLS13])).clone();
        config.max_fragment_size = Some(64);
        let (mut server, mut client) = pair(&pki, Arc::new(config)).await;
        let sent = payload(5000, 8);
        client.write_all(&sent).await.expect("write");
        client.flush().await.expect("flush");
        let mut got = vec![0u8; sent.len()];
        server.read_exact(&mut got).await.expect("read");
        assert!(got == sent);
        assert!(!server.holds_buffers());
    }

    #[tokio::test]
    async fn a_partial_record_holds_a_buffer_until_it_completes() {
        let pki = pki();
        let (mut server, mut client) = manual_pair(&pki, usize::MAX).await;
        // A record and a half: the first is read, the half waits in the buffer.
        let mut tls = client.records(b"a1 NOOP\r\n");
        tls.extend(client.records(b"a2 NOOP\r\n"));
        let split = tls.len() - 7;
        let (now, later) = tls.split_at(split);
        client.tcp.write_all(now).await.expect("write");
        let mut line = [0u8; 9];
        server.read_exact(&mut line).await.expect("first record");
        assert_eq!(&line, b"a1 NOOP\r\n");
        let waited = tokio::time::timeout(Duration::from_millis(100), server.read(&mut line)).await;
        assert!(waited.is_err(), "half a record is not readable");
        assert!(server.holds_buffers(), "the partial record is kept");
        client.tcp.write_all(later).await.expect("write");
        server.read_exact(&mut line).await.expect("second record");
        assert_eq!(&line, b"a2 NOOP\r\n");
        assert!(!server.holds_buffers(), "complete: the buffer went back");
    }

    #[tokio::test]
    async fn a_small_reader_gets_a_large_record_in_pieces() {
        let pki = pki();
        let (mut server, mut client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        let sent = payload(16 * 1024, 9);
        client.write_all(&sent).await.expect("write");
        client.flush().await.expect("flush");
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        while got.len() < sent.len() {
            let n = server.read(&mut small).await.expect("read");
            assert!(n > 0 && n <= small.len());
            got.extend_from_slice(small.get(..n).expect("n <= len"));
        }
        assert!(got == sent);
        assert!(!server.holds_buffers(), "the pending plaintext was freed");
    }

    #[tokio::test]
    async fn sixteen_kib_writes_become_full_records() {
        let pki = pki();
        let (mut server, client) = manual_pair(&pki, usize::MAX).await;
        let sent = payload(3 * MAX_PLAINTEXT_PER_RECORD, 4);
        for chunk in sent.chunks(MAX_PLAINTEXT_PER_RECORD) {
            server.write_all(chunk).await.expect("write");
        }
        server.flush().await.expect("flush");
        assert_full_records(client, &sent).await;
    }

    #[tokio::test]
    async fn one_write_of_a_relay_buffer_is_taken_whole_as_full_records() {
        let pki = pki();
        let (mut server, client) = manual_pair(&pki, usize::MAX).await;
        let sent = payload(crate::buffers::RELAY_BUFFER, 5);
        // One poll_write: the relay hands over a whole buffer, and it is encrypted and sent
        // in one go (one send instead of one per record).
        let n = server.write(&sent).await.expect("write");
        assert_eq!(n, sent.len(), "one write took the relay's whole buffer");
        server.flush().await.expect("flush");
        assert!(!server.holds_buffers(), "idle after the flush");
        assert_full_records(client, &sent).await;
    }

    /// Reads what the server sent: `sent` in records of 16 KiB each, nothing smaller (after
    /// the session ticket), decrypted intact.
    async fn assert_full_records(client: ManualClient, sent: &[u8]) {
        let ManualClient {
            mut conn, mut tcp, ..
        } = client;
        let expected = sent.len() / MAX_PLAINTEXT_PER_RECORD;
        let mut wire = Vec::new();
        let mut records = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while records.len() < expected {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0);
            wire.extend_from_slice(buf.get(..n).expect("n <= len"));
            records.clear();
            let mut at = 0;
            while let Some(header) = wire.get(at..at + 5) {
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                if wire.len() < at + 5 + len {
                    break;
                }
                records.push(len);
                at += 5 + len;
            }
            // Skip the session tickets that came first (handshake records in TLS 1.3 are
            // disguised as application data too, but are much smaller).
            records.retain(|len| *len > 1024);
        }
        // Plaintext + content type + 16-byte tag.
        assert_eq!(records, vec![MAX_PLAINTEXT_PER_RECORD + 17; expected]);
        let mut slice = wire.as_slice();
        let mut got = Vec::new();
        while !slice.is_empty() {
            conn.read_tls(&mut slice).expect("read_tls");
            conn.process_new_packets().expect("process");
            // rustls holds 16 KiB of plaintext at most: take it as it comes.
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(n) = std::io::Read::read(&mut conn.reader(), &mut chunk) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(chunk.get(..n).expect("n <= len"));
            }
        }
        assert!(got == sent);
    }

    #[tokio::test]
    async fn close_notify_from_the_client_reads_as_eof_and_the_server_can_still_answer() {
        let pki = pki();
        let (mut server, mut client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        client.write_all(b"a1 LOGOUT\r\n").await.expect("write");
        client.shutdown().await.expect("close_notify");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("clean EOF");
        assert_eq!(got, b"a1 LOGOUT\r\n");
        server
            .write_all(b"* BYE\r\n")
            .await
            .expect("write after the peer's close");
        server.shutdown().await.expect("close_notify back");
        assert!(
            server.write_all(b"late").await.is_err(),
            "nothing after our close_notify"
        );
        let mut tail = Vec::new();
        client
            .read_to_end(&mut tail)
            .await
            .expect("the client sees our close_notify: a clean EOF");
        assert_eq!(tail, b"* BYE\r\n");
        assert!(!server.holds_buffers());
    }

    #[tokio::test]
    async fn close_notify_from_the_server_reads_as_eof_at_the_client() {
        let pki = pki();
        let (mut server, mut client) = pair(&pki, pki.client(&[&rustls::version::TLS12])).await;
        server.write_all(b"* BYE idle\r\n").await.expect("write");
        server.shutdown().await.expect("close_notify");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("clean EOF");
        assert_eq!(got, b"* BYE idle\r\n");
    }

    #[tokio::test]
    async fn tcp_eof_without_close_notify_is_unexpected_eof() {
        let pki = pki();
        let (mut server, mut client) = pair(&pki, pki.client(&[&rustls::version::TLS13])).await;
        client.write_all(b"a1 NOOP\r\n").await.expect("write");
        client.flush().await.expect("flush");
        client.get_mut().0.shutdown().await.expect("TCP close");
        let mut line = [0u8; 9];
        server
            .read_exact(&mut line)
            .await
            .expect("data before the EOF");
        let err = server.read(&mut line).await.expect_err("no close_notify");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!server.holds_buffers());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_fails_it_with_an_alert() {
        let pki = pki();
        for garbage in [
            &b"a1 LOGIN user password\r\n"[..],
            &b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"[..],
            &[0x17, 0x03, 0x03, 0xff, 0xff, 0, 0][..],
        ] {
            let (address, server) = server(pki.server.clone()).await;
            let mut tcp = TcpStream::connect(address).await.expect("connect");
            tcp.write_all(garbage).await.expect("write");
            let err = server
                .await
                .expect("join: no panic")
                .err()
                .expect("the handshake must fail");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            assert_eq!(answer.first(), Some(&0x15), "a TLS alert: {answer:?}");
        }
    }

    #[tokio::test]
    async fn a_client_gone_mid_handshake_is_unexpected_eof() {
        let pki = pki();
        let (address, server) = server(pki.server.clone()).await;
        let mut client = ManualClient::connect(&pki, address, usize::MAX).await;
        let hello = client.pending_tls();
        let (part, _) = hello.split_at(hello.len() / 2);
        client.tcp.write_all(part).await.expect("write");
        drop(client);
        let err = server.await.expect("join").err().expect("must fail");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
