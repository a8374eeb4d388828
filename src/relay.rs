//! The splice: bytes copied both ways after login, with an idle timeout, half-close
//! propagation and per-direction byte counts.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::shutdown::{Phase, Shutdown};

/// Buffer per direction while data flows: a full TLS record.
const RELAY_BUFFER: usize = 16 * 1024;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed (or one closed and the other finished).
    Closed,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// The drain deadline passed (or a fast shutdown).
    Shutdown,
    /// A read or write failed (reset, broken pipe, TLS error).
    Error,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Shared between the two metered streams and the idle watch.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte read from either side.
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

/// A stream that counts the bytes read from it and marks activity.
struct Metered<'a, S> {
    inner: &'a mut S,
    read: u64,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies bytes both ways until both sides are done, the idle timeout passes, or the
/// shutdown reaches `Closing`. The streams are handed back (borrowed) so the caller can say
/// goodbye in the protocol.
pub async fn splice<C, B>(
    client: &mut C,
    backend: &mut B,
    idle_timeout: Duration,
    shutdown: &mut Shutdown,
) -> (RelayEnd, RelayStats)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut client = Metered {
        inner: client,
        read: 0,
        activity: &activity,
    };
    let mut backend = Metered {
        inner: backend,
        read: 0,
        activity: &activity,
    };
    let idle = async {
        loop {
            let deadline = activity.last() + idle_timeout;
            tokio::time::sleep_until(deadline).await;
            if activity.last() + idle_timeout <= Instant::now() {
                return;
            }
        }
    };
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, RELAY_BUFFER, RELAY_BUFFER) => {
            match r {
                Ok(_) => RelayEnd::Closed,
                Err(e) if is_disconnect(&e) => RelayEnd::Closed,
                Err(_) => RelayEnd::Error,
            }
        }
        () = idle => RelayEnd::IdleTimeout,
        () = shutdown.reached(Phase::Closing) => RelayEnd::Shutdown,
    };
    let stats = RelayStats {
        client_to_backend: client.read,
        backend_to_client: backend.read,
    };
    (end, stats)
}

/// An ordinary way for a peer to go away (a reset, or TLS closed without close_notify, as
/// many clients do): not an error worth reporting.
fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_counts_and_propagates_half_close() {
        let (mut client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, mut backend_side) = tokio::io::duplex(64);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(async move {
            splice(
                &mut client,
                &mut backend,
                Duration::from_secs(60),
                &mut shutdown,
            )
            .await
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
        let (end, stats) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(stats.client_to_backend, 9);
        assert_eq!(stats.backend_to_client, 12 + 7);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_splice() {
        let (mut client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, _backend_side) = tokio::io::duplex(64);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(async move {
            splice(
                &mut client,
                &mut backend,
                Duration::from_secs(1800),
                &mut shutdown,
            )
            .await
        });
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

    #[tokio::test]
    async fn closing_phase_ends_the_splice() {
        let (_client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, _backend_side) = tokio::io::duplex(64);
        let (trigger, mut shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(async move {
            splice(
                &mut client,
                &mut backend,
                Duration::from_secs(60),
                &mut shutdown,
            )
            .await
        });
        trigger.advance(Phase::Draining);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!relay.is_finished(), "draining lets spliced sessions run");
        trigger.advance(Phase::Closing);
        let (end, _) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Shutdown);
    }
}
