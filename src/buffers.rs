//! Byte buffers on loan from a per-thread pool, for the splice (`relay`) and the client side's
//! TLS stream (`tls_stream`).
//!
//! Most of a proxy's sessions sit idle for hours, so a session takes a buffer only while bytes
//! are in flight and gives it back as soon as they have moved on. Taking one is a pop from this
//! worker thread's pool (an allocation only when the pool is empty); a buffer dropped on another
//! thread goes to that thread's pool. Each pool keeps at most `POOL_PER_THREAD` buffers; more are
//! freed, so a burst does not pin its peak memory for ever.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// A relay buffer: four full TLS records' plaintext, so that a read of a full buffer becomes
/// four full records on the client's TLS side, sent in one write (a bulk download makes a
/// quarter of the system calls and wake-ups it made with one record per read).
pub const RELAY_BUFFER: usize = 64 * 1024;
/// A TLS wire buffer: a relay buffer's four records (16 KiB of plaintext and 22 bytes each), and
/// more than the largest record rustls accepts (16 KiB of plaintext, 2 KiB of expansion, the
/// 5-byte header), so a partial incoming record always fits.
pub const TLS_BUFFER: usize = RELAY_BUFFER + 2048 + 5;
/// Buffers kept per worker thread and size for reuse; more are freed.
const POOL_PER_THREAD: usize = 64;

/// What a buffer is for; each size has its own pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// `RELAY_BUFFER` bytes.
    Relay,
    /// `TLS_BUFFER` bytes.
    Tls,
}

impl Size {
    pub const fn bytes(self) -> usize {
        match self {
            Size::Relay => RELAY_BUFFER,
            Size::Tls => TLS_BUFFER,
        }
    }

    fn pool(self) -> &'static LocalKey<RefCell<Vec<Vec<u8>>>> {
        match self {
            Size::Relay => &RELAY_POOL,
            Size::Tls => &TLS_POOL,
        }
    }
}

thread_local! {
    static RELAY_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static TLS_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer on loan from this thread's pool (its whole length is usable); back to a pool on
/// drop, unless it was grown.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    size: Size,
}

impl PooledBuf {
    pub fn take(size: Size) -> PooledBuf {
        let reused = size.pool().with(|p| p.borrow_mut().pop());
        PooledBuf {
            buf: reused.unwrap_or_else(|| vec![0; size.bytes()]),
            size,
        }
    }

    /// Grows the buffer to `len` bytes (the rare message that spans several TLS records); a
    /// grown buffer is freed, not pooled, when it is dropped.
    pub fn grow(&mut self, len: usize) {
        if len > self.buf.len() {
            self.buf.resize(len, 0);
        }
    }
}

impl Deref for PooledBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.buf.len() != self.size.bytes() {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        // `try_with`: a buffer dropped while its thread's locals are torn down is just freed.
        let _ = self.size.pool().try_with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_PER_THREAD {
                pool.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled(size: Size) -> usize {
        size.pool().with(|p| p.borrow().len())
    }

    #[test]
    fn buffers_come_back_to_their_own_pool_and_grown_ones_are_freed() {
        let (relay, tls) = (pooled(Size::Relay), pooled(Size::Tls));
        let a = PooledBuf::take(Size::Relay);
        let b = PooledBuf::take(Size::Tls);
        assert_eq!((a.len(), b.len()), (RELAY_BUFFER, TLS_BUFFER));
        drop(a);
        drop(b);
        assert_eq!(pooled(Size::Relay), relay + 1);
        assert_eq!(pooled(Size::Tls), tls + 1);
        let mut c = PooledBuf::take(Size::Tls);
        assert_eq!(pooled(Size::Tls), tls, "taken from the pool, not allocated");
        c.grow(2 * TLS_BUFFER);
        assert_eq!(c.len(), 2 * TLS_BUFFER);
        drop(c);
        assert_eq!(pooled(Size::Tls), tls, "a grown buffer is not pooled");
    }

    #[test]
    fn a_pool_keeps_a_bounded_number_of_buffers() {
        let many: Vec<PooledBuf> = (0..POOL_PER_THREAD + 8)
            .map(|_| PooledBuf::take(Size::Relay))
            .collect();
        drop(many);
        assert_eq!(pooled(Size::Relay), POOL_PER_THREAD);
    }
}
