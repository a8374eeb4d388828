//! The measured workloads, each against one target and bounded in time or count:
//! logins (C clients looping connect + TLS + LOGIN + LOGOUT), idle sessions (LOGIN, SELECT,
//! IDLE, held open), bulk FETCH of the 10 MiB message, NOOP round trips, and the mixed
//! workload (C logged-in sessions looping over a mail client's commands, [`crate::mix`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context as _, Result};
use rustls::pki_types::ServerName;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use crate::imap::{self, Client, Tls};
use crate::mix::{Mix, Op};
use crate::setup::{password, user, MESSAGES, MESSAGE_USERS};
use crate::tls::Negotiated;

/// The longest any one step (connect, handshake, command) may take.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer of a client that only logs in or idles.
const SMALL_BUFFER: usize = 4 * 1024;
/// Read buffer of the bulk client.
const BULK_BUFFER: usize = 256 * 1024;
/// Read buffer of a mixed-workload client (a header fetch brings a few KiB).
const MIXED_BUFFER: usize = 16 * 1024;

/// How to reach one target.
#[derive(Clone)]
pub struct Conn {
    pub addr: SocketAddr,
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

impl Conn {
    pub async fn open(&self, buffer: usize) -> Result<Client<Tls>> {
        timeout(
            OP_TIMEOUT,
            imap::connect_tls(self.addr, &self.connector, &self.name, buffer),
        )
        .await
        .map_err(|_| anyhow!("connect + TLS + greeting took over {OP_TIMEOUT:?}"))?
    }

    /// A logged-in session of user `i`.
    pub async fn session(&self, i: u32, buffer: usize) -> Result<Client<Tls>> {
        let mut client = self.open(buffer).await?;
        step(client.login(&user(i), &password(i))).await?;
        Ok(client)
    }
}

async fn step<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    timeout(OP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("no reply in {OP_TIMEOUT:?}"))?
}

/// Which users a login run takes: each of `first..=last` once, or round and round.
pub struct Users {
    first: u32,
    last: u32,
    next: AtomicU32,
    cycle: bool,
}

impl Users {
    /// Every user once: first logins.
    pub fn once(first: u32, last: u32) -> Arc<Users> {
        Arc::new(Users {
            first,
            last,
            next: AtomicU32::new(first),
            cycle: false,
        })
    }

    /// The same users again and again: repeat logins.
    pub fn cycle(first: u32, last: u32) -> Arc<Users> {
        Arc::new(Users {
            first,
            last,
            next: AtomicU32::new(first),
            cycle: true,
        })
    }

    fn take(&self) -> Option<u32> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if self.cycle {
            let span = self.last - self.first + 1;
            Some(self.first + (n - self.first) % span)
        } else {
            (n <= self.last).then_some(n)
        }
    }
}

#[derive(Debug, Default)]
pub struct LoginRun {
    pub ok: u64,
    pub failed: u64,
    /// Handshakes that resumed a TLS session.
    pub resumed: u64,
    pub elapsed: Duration,
    pub negotiated: Option<Negotiated>,
    pub first_error: Option<String>,
}

impl LoginRun {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One concurrent client per `Conn` (each with its own TLS session store, as each device keeps
/// its own tickets), each looping connect + TLS + LOGIN + LOGOUT until `duration` is over or
/// the users run out.
pub async fn logins(clients: &[Conn], users: Arc<Users>, duration: Duration) -> LoginRun {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for conn in clients {
        let conn = conn.clone();
        let users = users.clone();
        tasks.spawn(async move {
            let mut run = LoginRun::default();
            while Instant::now() < deadline {
                let Some(i) = users.take() else { break };
                match one_login(&conn, i).await {
                    Ok(negotiated) => {
                        run.ok += 1;
                        run.resumed += u64::from(negotiated.resumed);
                        run.negotiated.get_or_insert(negotiated);
                    }
                    Err(e) => {
                        run.failed += 1;
                        run.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A target that refuses everything must not be hammered.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            run
        });
    }
    let mut total = LoginRun::default();
    while let Some(done) = tasks.join_next().await {
        let Ok(run) = done else { continue };
        total.ok += run.ok;
        total.failed += run.failed;
        total.resumed += run.resumed;
        if total.negotiated.is_none() {
            total.negotiated = run.negotiated;
        }
        if total.first_error.is_none() {
            total.first_error = run.first_error;
        }
    }
    total.elapsed = start.elapsed();
    total
}

async fn one_login(conn: &Conn, i: u32) -> Result<Negotiated> {
    let mut client = conn.session(i, SMALL_BUFFER).await?;
    let negotiated = client.negotiated();
    step(client.logout()).await?;
    Ok(negotiated)
}

/// Sessions held open in IDLE.
pub struct IdleSessions {
    pub clients: Vec<Client<Tls>>,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Opens `n` sessions (users `1..=users` in turn, `concurrency` at a time), each logged in,
/// INBOX selected, in IDLE.
pub async fn open_idle(conn: &Conn, n: usize, users: u32, concurrency: usize) -> IdleSessions {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for k in 0..n {
        let conn = conn.clone();
        let permits = permits.clone();
        let i = 1 + (k as u32) % users.max(1);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let mut client = conn.session(i, SMALL_BUFFER).await?;
            step(client.select("INBOX")).await?;
            step(client.idle()).await?;
            Ok::<_, anyhow::Error>(client)
        });
    }
    let mut out = IdleSessions {
        clients: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
    };
    while let Some(done) = tasks.join_next().await {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(client) => out.clients.push(client),
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    out
}

/// FETCH of user 1's last message (the 10 MiB one) on one session, again and again for
/// `duration` (after one unmeasured fetch). Returns the bytes of the measured fetches and
/// their time.
pub async fn bulk(conn: &Conn, duration: Duration) -> Result<(u64, Duration)> {
    let mut client = conn.session(1, BULK_BUFFER).await?;
    let last = step(client.select("INBOX")).await?;
    let command = format!("FETCH {last} BODY.PEEK[]");
    let warm = fetch(&mut client, &command).await?;
    ensure!(
        warm.literal_bytes >= crate::setup::BIG_MESSAGE as u64,
        "message {last} of user 1 has {} bytes, not the 10 MiB one (reseed: remove the cache)",
        warm.literal_bytes
    );
    let start = Instant::now();
    let mut bytes = 0;
    let mut fetches = 0;
    while fetches < 3 || start.elapsed() < duration {
        bytes += fetch(&mut client, &command).await?.literal_bytes;
        fetches += 1;
    }
    let elapsed = start.elapsed();
    step(client.logout()).await.context("LOGOUT after FETCH")?;
    Ok((bytes, elapsed))
}

async fn fetch(client: &mut Client<Tls>, command: &str) -> Result<crate::imap::Reply> {
    let limit = OP_TIMEOUT * 2;
    timeout(limit, client.run(command))
        .await
        .map_err(|_| anyhow!("FETCH took over {limit:?}"))?
}

/// `count` NOOP round trips on user 2's session (after 50 unmeasured), each timed.
pub async fn noops(conn: &Conn, count: usize) -> Result<Vec<Duration>> {
    let mut client = conn.session(2, SMALL_BUFFER).await?;
    step(client.select("INBOX")).await?;
    for _ in 0..50 {
        step(client.run("NOOP")).await?;
    }
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        step(client.run("NOOP")).await?;
        times.push(start.elapsed());
    }
    step(client.logout()).await?;
    Ok(times)
}

/// One logged-in session of the mixed workload, INBOX selected.
pub struct MixedSession {
    client: Client<Tls>,
    /// Messages in INBOX (nobody adds or removes any during a run).
    exists: u32,
    mix: Mix,
}

/// The sessions of a mixed-workload run, and the ones that could not be opened.
pub struct MixedSessions {
    pub sessions: Vec<MixedSession>,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Opens `clients` sessions at once, session `k` as user `1 + k % 5` (the users holding
/// messages), each logged in with INBOX selected; its operations come from seed `seed + k`.
pub async fn open_mixed(conn: &Conn, clients: usize, seed: u64) -> MixedSessions {
    let mut tasks = JoinSet::new();
    for k in 0..clients {
        let conn = conn.clone();
        let i = 1 + (k as u32) % MESSAGE_USERS;
        tasks.spawn(async move {
            let mut client = conn.session(i, MIXED_BUFFER).await?;
            let exists = step(client.select("INBOX")).await?;
            // User 1's 10 MiB message comes after its small ones and is never fetched whole.
            let small = exists.min(MESSAGES);
            ensure!(
                small > 0,
                "user {i} has no messages (reseed: remove the cache)"
            );
            Ok::<_, anyhow::Error>(MixedSession {
                client,
                exists,
                mix: Mix::new(seed.wrapping_add(k as u64), small),
            })
        });
    }
    let mut out = MixedSessions {
        sessions: Vec::with_capacity(clients),
        failed: 0,
        first_error: None,
    };
    while let Some(done) = tasks.join_next().await {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(session) => out.sessions.push(session),
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    out
}

#[derive(Debug, Default)]
pub struct MixedRun {
    /// Round trips answered OK and as expected.
    pub ops: u64,
    /// Sessions that stopped on an error (a failed or wrong answer ends its session's loop).
    pub failed: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
    /// Per kind of operation ([`Op::name`]): how many, and their round trips' total time.
    pub by_op: BTreeMap<&'static str, (u64, Duration)>,
}

impl MixedRun {
    /// `name mean-µs` per kind of operation, slowest first.
    pub fn latencies(&self) -> String {
        let mut means: Vec<(&str, f64)> = self
            .by_op
            .iter()
            .map(|(name, (n, total))| (*name, total.as_secs_f64() * 1e6 / (*n).max(1) as f64))
            .collect();
        means.sort_by(|a, b| b.1.total_cmp(&a.1));
        means
            .iter()
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Every session loops over its operations, one round trip at a time, until `duration` is
/// over. Returns the figures and the sessions still good (to be closed unmeasured).
pub async fn mixed(
    sessions: Vec<MixedSession>,
    duration: Duration,
) -> (MixedRun, Vec<MixedSession>) {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut session in sessions {
        tasks.spawn(async move {
            let mut by_op: BTreeMap<&'static str, (u64, Duration)> = BTreeMap::new();
            while Instant::now() < deadline {
                let op = session.mix.next_op();
                let sent = Instant::now();
                if let Err(e) = one_op(&mut session, op).await {
                    return (by_op, Err(format!("{}: {e:#}", op.command())));
                }
                let entry = by_op.entry(op.name()).or_default();
                entry.0 += 1;
                entry.1 += sent.elapsed();
            }
            (by_op, Ok(session))
        });
    }
    let mut run = MixedRun::default();
    let mut good = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (by_op, outcome) = match done {
            Ok(done) => done,
            Err(e) => (BTreeMap::new(), Err(format!("task: {e}"))),
        };
        for (name, (n, time)) in by_op {
            run.ops += n;
            let entry = run.by_op.entry(name).or_default();
            entry.0 += n;
            entry.1 += time;
        }
        match outcome {
            Ok(session) => good.push(session),
            Err(e) => {
                run.failed += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    run.elapsed = start.elapsed();
    (run, good)
}

async fn one_op(session: &mut MixedSession, op: Op) -> Result<()> {
    let reply = step(session.client.run(&op.command())).await?;
    op.check(&reply, session.exists)
}

/// LOGOUT of every session, at once; errors do not matter any more.
pub async fn close_mixed(sessions: Vec<MixedSession>) {
    let mut tasks = JoinSet::new();
    for mut session in sessions {
        tasks.spawn(async move { step(session.client.logout()).await });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_once_then_none() {
        let users = Users::once(5, 7);
        let taken: Vec<Option<u32>> = (0..4).map(|_| users.take()).collect();
        assert_eq!(taken, [Some(5), Some(6), Some(7), None]);
    }

    #[test]
    fn users_cycle() {
        let users = Users::cycle(1, 3);
        let taken: Vec<Option<u32>> = (0..5).map(|_| users.take()).collect();
        assert_eq!(taken, [Some(1), Some(2), Some(3), Some(1), Some(2)]);
    }

    #[test]
    fn latencies_slowest_first() {
        let mut run = MixedRun::default();
        run.by_op.insert("NOOP", (4, Duration::from_micros(400)));
        run.by_op.insert("STATUS", (2, Duration::from_micros(600)));
        run.by_op.insert("SELECT", (0, Duration::ZERO));
        assert_eq!(run.latencies(), "STATUS 300, NOOP 100, SELECT 0");
    }
}
