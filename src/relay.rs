//! The splice: bytes copied both ways after login, with an idle timeout, half-close
//! propagation and per-direction byte counts.
//!
//! Most of a proxy's sessions sit idle for hours (IMAP IDLE), so an idle session must cost as
//! little memory as possible. A direction holds a buffer only while bytes are in flight: it
//! takes one from the per-thread pool (`buffers`) when it tries to read, gives it back at once
//! when the read would block, and otherwise as soon as the bytes are written. An idle spliced
//! session holds no relay buffer at all.
//!
//! When the backend is done (it said `BYE` or `221` and closed), its close is passed on to the
//! client, which then has `CLOSE_GRACE` of silence to close its side: a client that never does
//! must not keep the session, its descriptors and its place under the caps until the idle
//! timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::buffers::{PooledBuf, Size};
use crate::shutdown::{Phase, Shutdown};

/// How long a client may take to close after the backend closed and mailgate passed that on.
/// The backend reads nothing more, so this only lets the client's own close (its
/// `close_notify`, its FIN) arrive before the socket goes, instead of meeting a reset.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed (or one closed and the other finished).
    Closed,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// The drain deadline passed (or a fast shutdown).
    Shutdown,
    /// The kernel gave up on a peer that stopped answering (`limits.tcp_keepalive`): a phone
    /// that left coverage, a backend host that lost power.
    PeerTimeout,
    /// A read or write failed otherwise (a TLS error, say).
    Error,
}

impl RelayEnd {
    /// How a relay whose copying returned `result` ended.
    pub(crate) fn of(result: io::Result<()>) -> RelayEnd {
        match result {
            Ok(()) => RelayEnd::Closed,
            Err(e) if is_disconnect(&e) => RelayEnd::Closed,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => RelayEnd::PeerTimeout,
            Err(_) => RelayEnd::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::PeerTimeout => "peer_timeout",
            RelayEnd::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Called with the bytes of each chunk as it is relayed (metrics), so long sessions show up
/// in throughput while they run, not only when they end.
pub trait Meter {
    fn client_to_backend(&self, bytes: u64);
    fn backend_to_client(&self, bytes: u64);
}

/// A meter that counts nothing (tests, callers without metrics).
pub struct NoMeter;

impl Meter for NoMeter {
    fn client_to_backend(&self, _: u64) {}
    fn backend_to_client(&self, _: u64) {}
}

/// One direction of the copy.
#[derive(Default)]
struct Transfer {
    /// Bytes read but not yet written: `buf[pos..cap]`. `None` while nothing is in flight.
    buf: Option<PooledBuf>,
    pos: usize,
    cap: usize,
    /// The reader said EOF.
    read_done: bool,
    /// The writer was shut down after EOF (half-close passed on).
    shut_down: bool,
    /// Written since the last flush.
    need_flush: bool,
    amount: u64,
}

impl Transfer {
    /// Moves bytes from `reader` to `writer` until the reader would block (with nothing in
    /// flight) or is done; `Ready` when this direction is finished.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if let Some(buf) = &self.buf {
                while self.pos < self.cap {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.need_flush = true;
                }
                // Drained: the buffer goes back to the pool.
                self.buf = None;
                self.pos = 0;
                self.cap = 0;
            }
            if self.read_done {
                // The shutdown flushes first (`AsyncWrite`'s contract): a TLS writer sends
                // what it holds and its close_notify together.
                if !self.shut_down {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            let mut buf = PooledBuf::take(Size::Relay);
            let mut read_buf = ReadBuf::new(&mut buf);
            match reader.as_mut().poll_read(cx, &mut read_buf) {
                Poll::Pending => {
                    // Nothing to read: give the buffer back, and make sure what was written
                    // actually leaves (a TLS writer holds records until flushed).
                    drop(buf);
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read_buf.filled().len();
                    if n == 0 {
                        self.read_done = true;
                    } else {
                        self.amount += n as u64;
                        on_bytes(n as u64);
                        self.pos = 0;
                        self.cap = n;
                        self.buf = Some(buf);
                    }
                }
            }
        }
    }
}

/// When bytes last moved, shared by both directions and the idle watch.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last chunk relayed either way.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Both directions, polled from one task.
struct Bidirectional<'a, C: ?Sized, B: ?Sized> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Transfer,
    down: Transfer,
    meter: &'a (dyn Meter + Sync),
    activity: &'a Activity,
    /// When the backend's side was done (its close passed on to the client).
    down_done_at: Option<Instant>,
    /// The client's time to close after that (`CLOSE_GRACE`).
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<C, B> Future for Bidirectional<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (meter, activity) = (this.meter, this.activity);
        let up = this.up.poll_copy(
            cx,
            Pin::new(&mut *this.client),
            Pin::new(&mut *this.backend),
            &mut |n| {
                meter.client_to_backend(n);
                activity.touch();
            },
        )?;
        let down = this.down.poll_copy(
            cx,
            Pin::new(&mut *this.backend),
            Pin::new(&mut *this.client),
            &mut |n| {
                meter.backend_to_client(n);
                activity.touch();
            },
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(()));
        }
        if down.is_ready() {
            // The client's time to close counts from the backend's close, or from the last
            // bytes the client sent after it.
            let done_at = *this.down_done_at.get_or_insert_with(Instant::now);
            let deadline = done_at.max(activity.last()) + CLOSE_GRACE;
            let grace = this
                .grace
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if grace.deadline() != deadline {
                grace.as_mut().reset(deadline);
            }
            if grace.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        Poll::Pending
    }
}

/// Copies bytes both ways until both sides are done (or the backend is, and the client has
/// been silent for `CLOSE_GRACE` since), the idle timeout passes, or the shutdown reaches
/// `Closing`. The streams stay the caller's, so it can say goodbye in the protocol.
pub async fn splice<C, B>(
    client: &mut C,
    backend: &mut B,
    idle_timeout: Duration,
    shutdown: &mut Shutdown,
    meter: &(dyn Meter + Sync),
) -> (RelayEnd, RelayStats)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut copy = Bidirectional {
        client,
        backend,
        up: Transfer::default(),
        down: Transfer::default(),
        meter,
        activity: &activity,
        down_done_at: None,
        grace: None,
    };
    let end = {
        let idle = quiet_for(|| activity.last(), idle_timeout);
        tokio::select! {
            r = &mut copy => RelayEnd::of(r),
            () = idle => RelayEnd::IdleTimeout,
            () = shutdown.reached(Phase::Closing) => RelayEnd::Shutdown,
        }
    };
    let stats = RelayStats {
        client_to_backend: copy.up.amount,
        backend_to_client: copy.down.amount,
    };
    (end, stats)
}

/// Returns once `span` has passed since `last()`, which is read again after each wait (bytes
/// that moved meanwhile put it later): the idle timeout, and the aware relay's close grace.
pub(crate) async fn quiet_for(last: impl Fn() -> Instant, span: Duration) {
    loop {
        tokio::time::sleep_until(last() + span).await;
        if last() + span <= Instant::now() {
            return;
        }
    }
}

/// An ordinary way for a peer to go away (a reset, or TLS closed without close_notify, as
/// many clients do): not an error worth reporting.
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// For both relays' tests (paused time): the backend says `* BYE` and closes its sending side
/// but keeps reading; the client reads to the end, sends a late command half a grace later
/// (which must reach the backend), then stays silent and never closes. Asserts that the relay
/// `start` runs (on the relay's ends of the client's and the backend's streams) ends as
/// `Closed` one `CLOSE_GRACE` after the late bytes, long before its idle timeout.
#[cfg(test)]
pub(crate) async fn client_stays_after_the_backend_closed<F, Fut>(start: F) -> RelayStats
where
    F: FnOnce(tokio::io::DuplexStream, tokio::io::DuplexStream) -> Fut,
    Fut: Future<Output = (RelayEnd, RelayStats)> + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_side, client) = tokio::io::duplex(1024);
    let (backend, mut backend_side) = tokio::io::duplex(1024);
    let run = start(client, backend);
    let relay = tokio::spawn(async move { (run.await, Instant::now()) });
    let begin = Instant::now();
    backend_side.write_all(b"* BYE\r\n").await.expect("write");
    backend_side.shutdown().await.expect("shutdown");
    let mut tail = Vec::new();
    client_side.read_to_end(&mut tail).await.expect("read");
    assert_eq!(tail, b"* BYE\r\n", "the close reaches the client");
    tokio::time::sleep(CLOSE_GRACE / 2).await;
    client_side.write_all(b"a9 NOOP\r\n").await.expect("write");
    let mut late = [0u8; 9];
    backend_side.read_exact(&mut late).await.expect("read");
    assert_eq!(&late, b"a9 NOOP\r\n", "late bytes still pass");
    let written = Instant::now();
    let ((end, stats), ended) = relay.await.expect("join");
    assert_eq!(end, RelayEnd::Closed);
    assert!(
        ended >= written + CLOSE_GRACE,
        "the client's late bytes restart its grace"
    );
    assert!(
        ended < begin + 2 * CLOSE_GRACE,
        "the session ends a grace after the client's last bytes, not at the idle timeout: {:?}",
        ended - begin
    );
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A splice of two owned streams without a meter (to spawn).
    async fn unmetered(
        mut client: tokio::io::DuplexStream,
        mut backend: tokio::io::DuplexStream,
        idle_timeout: Duration,
        mut shutdown: Shutdown,
    ) -> (RelayEnd, RelayStats) {
        splice(
            &mut client,
            &mut backend,
            idle_timeout,
            &mut shutdown,
            &NoMeter,
        )
        .await
    }

    #[derive(Default)]
    struct Counting(AtomicU64, AtomicU64);

    impl Meter for Counting {
        fn client_to_backend(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn backend_to_client(&self, n: u64) {
            self.1.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_peer_the_kernel_gave_up_on_is_its_own_end() {
        use io::ErrorKind::*;
        let end = |kind| RelayEnd::of(Err(io::Error::from(kind))).as_str();
        assert_eq!(RelayEnd::of(Ok(())).as_str(), "closed");
        assert_eq!(end(ConnectionReset), "closed");
        assert_eq!(end(UnexpectedEof), "closed");
        assert_eq!(end(TimedOut), "peer_timeout");
        assert_eq!(end(InvalidData), "error");
    }

    #[tokio::test]
    async fn copies_both_ways_counts_and_propagates_half_close() {
        let (mut client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, mut backend_side) = tokio::io::duplex(64);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(async move {
            let meter = Counting::default();
            let r = splice(
                &mut client,
                &mut backend,
                Duration::from_secs(60),
                &mut shutdown,
                &meter,
            )
            .await;
            (
                r,
                meter.0.load(Ordering::Relaxed),
                meter.1.load(Ordering::Relaxed),
            )
        });
        client_side.write_all(b"a1 NOOP\r\n").await.expect("write");
        let mut buf = [0u8; 9];
        backend_side.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"a1 NOOP\r\n");
        backend_side
            .write_all(b"a1 OK done\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 12];
        client_side.read_exact(&mut buf).await.expect("read");
        // Client half-closes: the backend sees EOF, then answers and closes too.
        client_side.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        backend_side.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty());
        backend_side.write_all(b"* BYE\r\n").await.expect("write");
        drop(backend_side);
        let mut tail = Vec::new();
        client_side.read_to_end(&mut tail).await.expect("read");
        assert_eq!(tail, b"* BYE\r\n");
        let ((end, stats), up, down) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(stats.client_to_backend, 9);
        assert_eq!(stats.backend_to_client, 12 + 7);
        assert_eq!((up, down), (9, 19), "the meter sees every chunk");
    }

    #[tokio::test]
    async fn large_transfers_both_ways_at_once_do_not_deadlock() {
        // Each side writes 4 MiB while the other writes too, through small pipes: a relay
        // that served one direction at a time would block forever.
        let (client_side, client) = tokio::io::duplex(1024);
        let (backend, backend_side) = tokio::io::duplex(1024);
        let (_trigger, shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(unmetered(
            client,
            backend,
            Duration::from_secs(60),
            shutdown,
        ));
        let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut cr, mut cw) = tokio::io::split(client_side);
        let (mut br, mut bw) = tokio::io::split(backend_side);
        let p1 = payload.clone();
        let p2 = payload.clone();
        let w1 = tokio::spawn(async move {
            cw.write_all(&p1).await.expect("client write");
            cw.shutdown().await.expect("shutdown");
        });
        let w2 = tokio::spawn(async move {
            bw.write_all(&p2).await.expect("backend write");
            bw.shutdown().await.expect("shutdown");
        });
        let mut at_backend = Vec::new();
        let mut at_client = Vec::new();
        let (a, b) = tokio::join!(
            br.read_to_end(&mut at_backend),
            cr.read_to_end(&mut at_client)
        );
        a.expect("read");
        b.expect("read");
        w1.await.expect("join");
        w2.await.expect("join");
        assert!(at_backend == payload && at_client == payload);
        let (end, stats) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(stats.client_to_backend, payload.len() as u64);
        assert_eq!(stats.backend_to_client, payload.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_splice() {
        let (mut client_side, client) = tokio::io::duplex(64);
        let (backend, _backend_side) = tokio::io::duplex(64);
        let (_trigger, shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(unmetered(
            client,
            backend,
            Duration::from_secs(1800),
            shutdown,
        ));
        tokio::time::sleep(Duration::from_secs(1000)).await;
        client_side.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert!(
            !relay.is_finished(),
            "activity at 1000s must extend the deadline"
        );
        let (end, _) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::IdleTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stays_after_the_backend_closed_gets_the_close_grace() {
        let stats = client_stays_after_the_backend_closed(|client, backend| async move {
            let (_trigger, shutdown) = crate::shutdown::channel();
            unmetered(client, backend, Duration::from_secs(1800), shutdown).await
        })
        .await;
        assert_eq!(stats.backend_to_client, 7);
        assert_eq!(stats.client_to_backend, 9);
    }

    #[tokio::test]
    async fn closing_phase_ends_the_splice() {
        let (_client_side, client) = tokio::io::duplex(64);
        let (backend, _backend_side) = tokio::io::duplex(64);
        let (trigger, shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(unmetered(
            client,
            backend,
            Duration::from_secs(60),
            shutdown,
        ));
        trigger.advance(Phase::Draining);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!relay.is_finished(), "draining lets spliced sessions run");
        trigger.advance(Phase::Closing);
        let (end, _) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Shutdown);
    }

    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let (_client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, _backend_side) = tokio::io::duplex(64);
        let mut t = Transfer::default();
        let poll = t.poll_copy(
            &mut cx,
            Pin::new(&mut client),
            Pin::new(&mut backend),
            &mut |_| {},
        );
        assert!(poll.is_pending());
        assert!(
            t.buf.is_none(),
            "a direction waiting to read must not hold a buffer"
        );
    }
}
