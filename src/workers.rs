//! The connection workers: one thread per core, each with its own single-threaded tokio
//! runtime, and per listener one listening socket per worker (`SO_REUSEPORT`, so the kernel
//! spreads new connections over them).
//!
//! A connection lives on the worker that accepted it: its socket, its backend socket, its
//! timers and its buffers (`buffers`' per-thread pools) all belong to that one thread. So no
//! worker ever wakes another one. On tokio's work-stealing runtime every batch of socket events
//! one worker took from the kernel made it wake the other (a `futex` or an `eventfd` write
//! each time, and the other thread's switch back in), ~2 of a login's ~10 context switches; a
//! wake-up across cores costs ~20 µs of CPU on the VMs mailgate is measured on (`perf bench
//! sched pipe`: 39 µs of CPU per round trip across cores, 7 on one core). It is nginx's and
//! HAProxy's model, with the same trade: a worker kept busy by a few heavy sessions does not
//! hand its other sessions to an idle one.
//!
//! The server's own tasks (signals, `/metrics`, health checks, reloads) stay on the runtime
//! that started it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::keepalive::Keepalive;

/// Connections waiting in the kernel for `accept`, per socket (tokio's `TcpListener::bind`).
const BACKLOG: i32 = 1024;

/// How long a stopping worker waits for blocking tasks (a password hash) to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// How many workers: `TOKIO_WORKER_THREADS` when it is set to a number above 0 (the variable
/// tokio's own runtime reads), else one per core this process may run on.
pub fn count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The running workers. Dropping this stops them without waiting; [`Workers::stop`] waits.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Workers {
    /// Starts `count` workers (at least one), each on its own thread.
    ///
    /// # Errors
    /// A runtime or a thread that cannot be started.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("mg-worker-{i}"))
                .spawn(move || {
                    // A sent stop or a dropped `Workers`: either ends the worker.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Sessions still open are dropped, which closes their sockets.
                    runtime.shutdown_timeout(STOP_TIMEOUT);
                })?;
            workers.push(Worker {
                handle,
                stop,
                thread,
            });
        }
        Ok(Workers { workers })
    }

    /// Each worker's runtime, to spawn its accept loops on.
    pub fn handles(&self) -> impl ExactSizeIterator<Item = &Handle> {
        self.workers.iter().map(|w| &w.handle)
    }

    /// Stops every worker, dropping the sessions still on it, and waits for its thread.
    pub fn stop(self) {
        let threads: Vec<_> = self
            .workers
            .into_iter()
            .map(|w| {
                let _ = w.stop.send(());
                w.thread
            })
            .collect();
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// Binds `count` listening sockets to `address` (non-blocking, `TCP_NODELAY` and `keepalive`
/// for the connections they accept; `SO_REUSEPORT` when there is more than one). Returns the
/// address they are bound to (the port chosen for port 0) and the sockets.
///
/// `SO_REUSEPORT` would also let a second mailgate started by mistake share the port
/// silently, so the address is first bound by a socket without it: that fails ("address in
/// use") wherever anyone already listens, as a plain bind would. Port 0 picks one port for
/// all of them.
///
/// # Errors
/// The address cannot be bound.
pub fn bind(
    address: SocketAddr,
    count: usize,
    keepalive: Option<Keepalive>,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let address = {
        let probe = socket(address, false)?;
        probe.bind(&address.into())?;
        probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound to a non-IP address"))?
    };
    let reuse_port = count > 1;
    let sockets = (0..count.max(1))
        .map(|_| {
            let s = socket(address, reuse_port)?;
            if let Some(keepalive) = keepalive {
                keepalive.apply(SockRef::from(&s))?;
            }
            s.bind(&address.into())?;
            s.listen(BACKLOG)?;
            Ok(s.into())
        })
        .collect::<io::Result<_>>()?;
    Ok((address, sockets))
}

fn socket(address: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As tokio's `TcpListener::bind`: a restart can bind while old connections linger.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Linux copies the option into each accepted connection: one call per socket, not per
    // client.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_and_every_socket_accepts() {
        let keepalive = Keepalive::new(Duration::from_secs(120));
        let (address, sockets) =
            bind("127.0.0.1:0".parse().expect("address"), 3, keepalive).expect("bind");
        assert_eq!(sockets.len(), 3);
        let port = address.port();
        assert_ne!(port, 0);
        assert!(sockets
            .iter()
            .all(|s| s.local_addr().expect("addr").port() == port));
        // The kernel spreads connections by their address hash: enough of them reach each. A
        // loopback connect returns with the connection already in the accept queue.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect();
        let mut accepted = 0;
        for s in &sockets {
            let mut mine = 0;
            while let Ok((stream, _)) = s.accept() {
                assert!(stream.nodelay().expect("nodelay"), "inherits TCP_NODELAY");
                let (on, idle, _, _, user_timeout) =
                    crate::keepalive::tests::read_back(SockRef::from(&stream));
                assert_eq!(
                    (on, idle, user_timeout),
                    (true, Duration::from_secs(120), Duration::from_secs(240)),
                    "inherits the keepalive"
                );
                mine += 1;
            }
            assert!(mine > 0, "every socket of the group gets connections");
            accepted += mine;
        }
        assert_eq!(accepted, clients.len());
    }

    #[test]
    fn an_address_in_use_is_refused_even_for_a_second_group() {
        let (taken, _first) = bind("127.0.0.1:0".parse().expect("address"), 2, None).expect("bind");
        let err = bind(taken, 2, None).expect_err("a second group on the same port");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("plain");
        let err = bind(plain.local_addr().expect("addr"), 1, None).expect_err("a plain listener");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn workers_run_tasks_on_their_own_threads_and_stop() {
        let workers = Workers::start(2).expect("start");
        assert_eq!(workers.handles().len(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        for handle in workers.handles() {
            let tx = tx.clone();
            handle.spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = tx.send(std::thread::current().name().map(str::to_string));
            });
        }
        let mut names: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).expect("ran"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                Some("mg-worker-0".to_string()),
                Some("mg-worker-1".to_string())
            ]
        );
        workers.stop();
    }
}
