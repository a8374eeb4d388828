//! The IMAP-aware relay's driver: the sockets around `imap::aware`'s filter, with the splice's
//! idle timeout, drain and byte counts.
//!
//! Two pumps run in one task: client → filter → backend, and backend → filter → client. Each
//! is the only writer of its destination; the filter's own lines for the other side (a `NO` to
//! the client, an `EXPUNGE` to the backend) wake the other pump. Back-pressure is the
//! splice's: a pump that cannot write does not read; the client is not read either while
//! mailgate's own replies to it pile up.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::buffers::{PooledBuf, Size};
use crate::imap::aware::Aware;
use crate::relay::{quiet_for, Meter, RelayEnd, RelayStats, CLOSE_GRACE};
use crate::shutdown::{Phase, Shutdown};

/// The client is not read while this much waits to be written to it.
const CLIENT_BACKLOG: usize = 256 * 1024;

/// Relays a logged-in IMAP session through `filter` until both sides are done (or the backend
/// is, and the client has been silent for `CLOSE_GRACE` since), the idle timeout passes, or
/// the shutdown reaches `Closing`. `pipelined` is what the client sent after its login (not
/// yet seen by the backend). The streams stay the caller's, for the goodbye.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    filter: Aware,
    pipelined: &[u8],
    idle_timeout: Duration,
    shutdown: &mut Shutdown,
    meter: &(dyn Meter + Sync),
) -> (RelayEnd, RelayStats)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let filter = Mutex::new(filter);
    lock(&filter).client_bytes(pipelined);
    let wake_up = Notify::new();
    let wake_down = Notify::new();
    let start = Instant::now();
    // Milliseconds after `start` of the last read either way.
    let last_ms = AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_ms.store(ms, Ordering::Relaxed);
    };
    let last = || start + Duration::from_millis(last_ms.load(Ordering::Relaxed));
    // The client closed its side: a backend that closes after it needs no explaining.
    let client_done = AtomicBool::new(false);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut backend_rd, mut backend_wr) = tokio::io::split(backend);

    let up = async {
        loop {
            let out = lock(&filter).take_for_backend();
            if !out.is_empty() {
                backend_wr.write_all(&out).await?;
                backend_wr.flush().await?;
            }
            let full = lock(&filter).client_backlog() > CLIENT_BACKLOG;
            tokio::select! {
                r = read_pooled(&mut client_rd), if !full => {
                    let (buf, n) = r?;
                    if n == 0 {
                        client_done.store(true, Ordering::Relaxed);
                        backend_wr.shutdown().await?;
                        return Ok::<(), io::Error>(());
                    }
                    touch();
                    up_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    meter.client_to_backend(n as u64);
                    let mut f = lock(&filter);
                    f.client_bytes(buf.get(..n).unwrap_or_default());
                    if f.client_backlog() > 0 {
                        wake_down.notify_one();
                    }
                }
                () = wake_up.notified() => {}
            }
        }
    };
    let down = async {
        loop {
            let out = lock(&filter).take_for_client();
            if !out.is_empty() {
                client_wr.write_all(&out).await?;
                client_wr.flush().await?;
                // The client may be read again.
                wake_up.notify_one();
            }
            tokio::select! {
                r = read_pooled(&mut backend_rd) => {
                    let (buf, n) = match r {
                        Ok((_, 0)) | Err(_) => {
                            // The backend is gone: the client hears why, unless it left first.
                            let out = {
                                let mut f = lock(&filter);
                                if !client_done.load(Ordering::Relaxed) {
                                    f.backend_gone();
                                }
                                f.take_for_client()
                            };
                            let told = async {
                                client_wr.write_all(&out).await?;
                                client_wr.shutdown().await
                            };
                            // How the backend's side ended is how the session did.
                            return match r {
                                Ok(_) => told.await,
                                Err(e) => {
                                    let _ = told.await;
                                    Err(e)
                                }
                            };
                        }
                        Ok(read) => read,
                    };
                    touch();
                    down_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    meter.backend_to_client(n as u64);
                    let mut f = lock(&filter);
                    f.backend_bytes(buf.get(..n).unwrap_or_default());
                    if f.has_for_backend() {
                        wake_up.notify_one();
                    }
                }
                () = wake_down.notified() => {}
            }
        }
    };
    let idle = quiet_for(last, idle_timeout);
    // Both pumps done; or the backend's (its close passed on to the client) and then the
    // client silent for `CLOSE_GRACE`, as in the splice.
    let done = async {
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut up => {
                r?;
                down.await
            }
            r = &mut down => {
                r?;
                let done_at = Instant::now();
                let grace = quiet_for(|| done_at.max(last()), CLOSE_GRACE);
                tokio::select! {
                    r = up => r,
                    () = grace => Ok(()),
                }
            }
        }
    };
    let end = tokio::select! {
        r = done => RelayEnd::of(r),
        () = idle => RelayEnd::IdleTimeout,
        () = shutdown.reached(Phase::Closing) => RelayEnd::Shutdown,
    };
    let stats = RelayStats {
        client_to_backend: up_bytes.load(Ordering::Relaxed),
        backend_to_client: down_bytes.load(Ordering::Relaxed),
    };
    (end, stats)
}

/// The filter is only ever locked between awaits, by one task: never contended, and a panic
/// cannot happen while it is held, so poisoning is not a state worth a branch.
fn lock(filter: &Mutex<Aware>) -> MutexGuard<'_, Aware> {
    filter.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads into a buffer from the per-thread pool, held only while the read completes: a poll
/// that finds nothing gives it back, so an idle aware session holds no read buffer (as the
/// splice). Returns the buffer and how many bytes it got.
async fn read_pooled<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
) -> io::Result<(PooledBuf, usize)> {
    std::future::poll_fn(|cx| {
        let mut buf = PooledBuf::take(Size::Relay);
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *reader).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                Poll::Ready(Ok((buf, n)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The buffer goes back to the pool here.
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::aware::{utf7_encode, Rules};
    use crate::relay::NoMeter;
    use tokio::io::AsyncReadExt;

    fn filter() -> Aware {
        Aware::new(
            Rules {
                folders: Some(vec![utf7_encode("INBOX"), utf7_encode("Work")]),
                expunge_immediately: true,
            },
            b"a OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] Logged in\r\n",
        )
    }

    /// The relay with `filter()`, a 30-minute idle timeout and no meter.
    async fn filtered(
        client: &mut tokio::io::DuplexStream,
        backend: &mut tokio::io::DuplexStream,
        pipelined: &[u8],
        shutdown: &mut Shutdown,
    ) -> (RelayEnd, RelayStats) {
        let idle = Duration::from_secs(1800);
        relay(
            client,
            backend,
            filter(),
            pipelined,
            idle,
            shutdown,
            &NoMeter,
        )
        .await
    }

    async fn read_until(stream: &mut (impl AsyncRead + Unpin), needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(needle.len()).any(|w| w == needle) {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "EOF before {:?} in {:?}", needle, got);
            got.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        got
    }

    #[test]
    fn a_read_that_finds_nothing_gives_its_buffer_back() {
        use std::future::Future as _;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let (_peer, mut stream) = tokio::io::duplex(64);
        // The pool's next buffer is this one: whoever takes it and gives it back, it returns.
        let first = PooledBuf::take(Size::Relay);
        let ptr = first.as_ptr();
        drop(first);
        let mut read = Box::pin(read_pooled(&mut stream));
        assert!(read.as_mut().poll(&mut cx).is_pending());
        let again = PooledBuf::take(Size::Relay);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "a read waiting for bytes kept its buffer"
        );
    }

    #[tokio::test]
    async fn refuses_filters_expunges_and_counts() {
        let (mut client_side, mut client) = tokio::io::duplex(1024);
        let (mut backend, mut backend_side) = tokio::io::duplex(1024);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let relay = tokio::spawn(async move {
            filtered(&mut client, &mut backend, b"p0 NOOP\r\n", &mut shutdown).await
        });
        // The pipelined command reaches the backend first.
        assert_eq!(read_until(&mut backend_side, b"\r\n").await, b"p0 NOOP\r\n");
        client_side
            .write_all(b"a1 SELECT Private\r\na2 LIST \"\" *\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_until(&mut client_side, b"\r\n").await,
            b"a1 NO [NONEXISTENT] No such folder\r\n"
        );
        assert_eq!(
            read_until(&mut backend_side, b"\r\n").await,
            b"a2 LIST \"\" *\r\n"
        );
        backend_side
            .write_all(b"* LIST () \".\" INBOX\r\n* LIST () \".\" Private\r\na2 OK done\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_until(&mut client_side, b"a2 OK done\r\n").await,
            b"* LIST () \".\" INBOX\r\na2 OK done\r\n"
        );
        client_side
            .write_all(b"a3 UID STORE 7 +FLAGS (\\Deleted)\r\n")
            .await
            .expect("write");
        read_until(&mut backend_side, b"\r\n").await;
        backend_side
            .write_all(b"a3 OK stored\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_until(&mut backend_side, b"\r\n").await,
            b"mgx1 UID EXPUNGE 7\r\n"
        );
        backend_side
            .write_all(b"* 1 EXPUNGE\r\nmgx1 OK gone\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_until(&mut client_side, b"* 1 EXPUNGE\r\n").await,
            b"a3 OK stored\r\n* 1 EXPUNGE\r\n"
        );
        // Half-close both ways ends the relay.
        client_side.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        backend_side.read_to_end(&mut rest).await.expect("eof");
        drop(backend_side);
        client_side.read_to_end(&mut rest).await.expect("eof");
        assert!(
            rest.is_empty(),
            "mailgate's own tagged reply was shown: {rest:?}"
        );
        let (end, stats) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(stats.client_to_backend, 33 + 34);
        assert_eq!(stats.backend_to_client, 56 + 14 + 27);
    }

    #[tokio::test]
    async fn a_backend_that_closes_without_its_bye_leaves_the_client_one() {
        let (mut client_side, mut client) = tokio::io::duplex(1024);
        let (mut backend, mut backend_side) = tokio::io::duplex(1024);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let relay =
            tokio::spawn(
                async move { filtered(&mut client, &mut backend, b"", &mut shutdown).await },
            );
        client_side.write_all(b"a1 NOOP\r\n").await.expect("write");
        read_until(&mut backend_side, b"\r\n").await;
        backend_side
            .write_all(b"* 2 EXISTS\r\n")
            .await
            .expect("write");
        // The mail store's process dies before its tagged reply.
        drop(backend_side);
        let mut seen = Vec::new();
        client_side.read_to_end(&mut seen).await.expect("eof");
        assert_eq!(
            String::from_utf8_lossy(&seen),
            "* 2 EXISTS\r\n* BYE [UNAVAILABLE] Lost the connection to the mail server, try again\r\n"
        );
        drop(client_side);
        let (end, _) = relay.await.expect("join");
        assert_eq!(end, RelayEnd::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stays_after_the_backend_closed_gets_the_close_grace() {
        let stats = crate::relay::client_stays_after_the_backend_closed(
            |mut client, mut backend| async move {
                let (_trigger, mut shutdown) = crate::shutdown::channel();
                filtered(&mut client, &mut backend, b"", &mut shutdown).await
            },
        )
        .await;
        assert_eq!((stats.backend_to_client, stats.client_to_backend), (7, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_and_drain_end_it() {
        let (_client_side, mut client) = tokio::io::duplex(64);
        let (mut backend, _backend_side) = tokio::io::duplex(64);
        let (_trigger, mut shutdown) = crate::shutdown::channel();
        let (end, _) = filtered(&mut client, &mut backend, b"", &mut shutdown).await;
        assert_eq!(end, RelayEnd::IdleTimeout);

        let (trigger, mut shutdown) = crate::shutdown::channel();
        trigger.advance(Phase::Closing);
        let (end, _) = filtered(&mut client, &mut backend, b"", &mut shutdown).await;
        assert_eq!(end, RelayEnd::Shutdown);
    }
}
