//! How a peer that vanished without a FIN or a reset is noticed: a phone that left coverage, a
//! NAT that forgot the flow, a backend host that lost power. Without this such a session lasts
//! until the idle timeout, or, when bytes are in flight to the dead peer (an IMAP IDLE session
//! always has some: the backend's keep-alive lines), until the kernel's retransmissions give
//! up, ~15 minutes.
//!
//! `limits.tcp_keepalive` (`idle`) sets both of the kernel's ways on client and backend
//! connections: after `idle` of silence it sends a probe every `interval`, and drops the
//! connection after `PROBES` unanswered ones (`SO_KEEPALIVE`); and it drops a connection whose
//! sent bytes stay unacknowledged for `give_up_after` (`TCP_USER_TIMEOUT`, which keepalive
//! alone never ends). A peer that is there answers both from its kernel, whatever its
//! application does, so a slow or silent client is not cut.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Unanswered probes before the connection is dropped.
pub const PROBES: u32 = 4;

/// The longest wait between two probes.
const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// The longest `idle` Linux takes (`TCP_KEEPIDLE`, in whole seconds).
pub const MAX_IDLE: Duration = Duration::from_secs(32_767);

/// A validated keepalive setting (see the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    idle: Duration,
}

impl Keepalive {
    /// `None` for `0s` (off: the kernel's defaults, no probes). `idle` is taken in whole
    /// seconds, as the kernel does; the config check keeps it within 1 s and `MAX_IDLE`.
    pub fn new(idle: Duration) -> Option<Keepalive> {
        let idle = Duration::from_secs(idle.as_secs()).min(MAX_IDLE);
        (!idle.is_zero()).then_some(Keepalive { idle })
    }

    /// Silence before the first probe.
    pub fn idle(self) -> Duration {
        self.idle
    }

    /// Between probes: 30 s, or `idle` when that is shorter.
    pub fn interval(self) -> Duration {
        self.idle.min(MAX_INTERVAL)
    }

    /// How long a peer may answer nothing: `idle` and the probes; also the most sent bytes
    /// may stay unacknowledged.
    pub fn give_up_after(self) -> Duration {
        self.idle + self.interval() * PROBES
    }

    /// Sets it on `socket`. On a listening socket, Linux copies both options into every
    /// connection it accepts: one call per listener, not per client.
    ///
    /// # Errors
    /// The kernel refuses an option (not a TCP socket).
    pub fn apply(self, socket: SockRef<'_>) -> io::Result<()> {
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval())
                .with_retries(PROBES),
        )?;
        socket.set_tcp_user_timeout(Some(self.give_up_after()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What the kernel says `socket` has: (keepalive on, idle, interval, probes, user timeout).
    pub(crate) fn read_back(socket: SockRef<'_>) -> (bool, Duration, Duration, u32, Duration) {
        (
            socket.keepalive().expect("SO_KEEPALIVE"),
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
            socket
                .tcp_user_timeout()
                .expect("TCP_USER_TIMEOUT")
                .unwrap_or_default(),
        )
    }

    #[test]
    fn zero_is_off_and_short_settings_probe_as_often_as_they_wait() {
        assert_eq!(Keepalive::new(Duration::ZERO), None);
        assert_eq!(Keepalive::new(Duration::from_millis(900)), None);
        let default = Keepalive::new(Duration::from_secs(120)).expect("on");
        assert_eq!(default.interval(), Duration::from_secs(30));
        assert_eq!(default.give_up_after(), Duration::from_secs(240));
        let short = Keepalive::new(Duration::from_secs(10)).expect("on");
        assert_eq!(short.interval(), Duration::from_secs(10));
        assert_eq!(short.give_up_after(), Duration::from_secs(50));
        let long = Keepalive::new(Duration::from_secs(100_000)).expect("on");
        assert_eq!(long.idle(), MAX_IDLE);
    }

    #[test]
    fn the_kernel_takes_every_option() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let keepalive = Keepalive::new(Duration::from_secs(120)).expect("on");
        keepalive.apply(SockRef::from(&socket)).expect("apply");
        assert_eq!(
            read_back(SockRef::from(&socket)),
            (
                true,
                Duration::from_secs(120),
                Duration::from_secs(30),
                4,
                Duration::from_secs(240)
            )
        );
    }
}
