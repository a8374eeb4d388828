//! `mailgate-bench run`: start the lab, run the phases round-robin, report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::authhttp::Check;
use crate::daemons::{self, loopback, Build, Daemon, Env, Ports};
use crate::load::{self, Conn, Users};
use crate::procfs;
use crate::report::{quantile, Kind, Metric, Results};
use crate::setup;
use crate::tls::{self, TlsChoice};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Small and fast: 1 repetition, 2 s login phases, 200 idle sessions, 1 s bulk, 300 NOOPs,
    /// 8 mixed-workload clients for 2 s.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every phase (default 3; --quick 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Concurrent clients in the login phases (default 32; --quick 16).
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds of each login phase (default 5; --quick 2).
    #[arg(long)]
    login_secs: Option<f64>,
    /// Idle sessions opened per target (default 2000; --quick 200).
    #[arg(long)]
    idle_sessions: Option<usize>,
    /// Sessions being opened at once in the idle phase.
    #[arg(long, default_value_t = 32)]
    idle_concurrency: usize,
    /// Distinct users of the idle sessions (and of the repeat logins).
    #[arg(long, default_value_t = 100)]
    repeat_users: u32,
    /// Seconds of FETCHing the 10 MiB message (default 3; --quick 1).
    #[arg(long)]
    bulk_secs: Option<f64>,
    /// Timed NOOP round trips (default 2000; --quick 300).
    #[arg(long)]
    noops: Option<usize>,
    /// Concurrent sessions in the mixed-workload phase (default 16; --quick 8).
    #[arg(long)]
    mixed_clients: Option<usize>,
    /// Seconds of the mixed-workload phase (default 5; --quick 2).
    #[arg(long)]
    mixed_secs: Option<f64>,
    /// Users in the account data and the backend.
    #[arg(long, default_value_t = 5000)]
    users: u32,
    /// Targets, comma-separated, in round-robin order (default: mailgate,nginx,direct, and
    /// mailgate-b when `--mailgate-b` is given).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The certificate (PEM) and key every target serves.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// How the key was made, for the report (`RSA-2048`, `ECDSA P-256`).
    #[arg(long, default_value = "RSA-2048")]
    key_type: String,
    /// The one cipher suite the client offers (rustls name; a TLS 1.2 one selects TLS 1.2).
    #[arg(long, default_value = "TLS13_AES_256_GCM_SHA384")]
    cipher: String,
    /// Offer no TLS session resumption (every handshake full).
    #[arg(long)]
    no_resumption: bool,
    /// The run's work dir (configs, logs, pid files); made if missing.
    #[arg(long)]
    work: PathBuf,
    /// Account files and seeded maildirs, kept between runs.
    #[arg(long, default_value_os_t = crate::default_cache())]
    cache: PathBuf,
    /// Where the results (Markdown) go.
    #[arg(long, default_value = "target/bench/results.md")]
    out: PathBuf,
    /// The mailgate binary (default: next to this one).
    #[arg(long)]
    mailgate: Option<PathBuf>,
    /// A second mailgate binary, measured as the target `mailgate-b` beside the first (an A/B
    /// of two builds in one run; the table's `mailgate/mailgate-b` column is the ratio).
    /// Adds `mailgate-b` to the targets unless `--targets` is given.
    #[arg(long)]
    mailgate_b: Option<PathBuf>,
    /// The system user owning the maildirs.
    #[arg(long, default_value = "mgbench")]
    mail_user: String,
    /// mailgate's worker threads (`TOKIO_WORKER_THREADS`).
    #[arg(long, default_value_t = 2)]
    tokio_workers: usize,
    /// nginx's worker_processes.
    #[arg(long, default_value = "auto")]
    nginx_workers: String,
    /// Dovecot's imap-login processes.
    #[arg(long, default_value_t = 2)]
    dovecot_login_processes: usize,
    /// What nginx's auth_http responder checks: `accounts` (the account check mailgate does,
    /// with mailgate's code: argon2id, verification cache, rules) or `none` (every login OK).
    #[arg(long, value_enum, default_value = "accounts")]
    auth_check: Check,
    /// The phases to run, comma-separated (default: all), e.g. `repeat-logins` to profile one.
    #[arg(long, value_delimiter = ',', value_enum)]
    phases: Vec<Phase>,
}

/// The resolved settings of one run.
#[derive(Debug, Clone)]
struct Plan {
    reps: usize,
    clients: usize,
    login: Duration,
    idle_sessions: usize,
    idle_concurrency: usize,
    repeat_users: u32,
    bulk: Duration,
    noops: usize,
    mixed_clients: usize,
    mixed: Duration,
    users: u32,
    kinds: Vec<Kind>,
    phases: Vec<Phase>,
}

impl Plan {
    fn new(a: &Args) -> Result<Plan> {
        let q = a.quick;
        let kinds = if a.targets.is_empty() {
            let mut kinds = vec![Kind::Mailgate, Kind::Nginx, Kind::Direct];
            if a.mailgate_b.is_some() {
                kinds.push(Kind::MailgateB);
            }
            kinds
        } else {
            a.targets
                .iter()
                .map(|t| Kind::parse(t.trim()).with_context(|| format!("unknown target {t}")))
                .collect::<Result<Vec<_>>>()?
        };
        if kinds.contains(&Kind::MailgateB) && a.mailgate_b.is_none() {
            bail!("target mailgate-b needs --mailgate-b PATH");
        }
        let plan = Plan {
            reps: a.reps.unwrap_or(if q { 1 } else { 3 }).max(1),
            clients: a.clients.unwrap_or(if q { 16 } else { 32 }).max(1),
            login: Duration::from_secs_f64(a.login_secs.unwrap_or(if q { 2.0 } else { 5.0 })),
            idle_sessions: a.idle_sessions.unwrap_or(if q { 200 } else { 2000 }),
            idle_concurrency: a.idle_concurrency,
            repeat_users: a.repeat_users.max(1),
            bulk: Duration::from_secs_f64(a.bulk_secs.unwrap_or(if q { 1.0 } else { 3.0 })),
            noops: a.noops.unwrap_or(if q { 300 } else { 2000 }).max(1),
            mixed_clients: a.mixed_clients.unwrap_or(if q { 8 } else { 16 }).max(1),
            mixed: Duration::from_secs_f64(a.mixed_secs.unwrap_or(if q { 2.0 } else { 5.0 })),
            users: a.users,
            kinds,
            phases: if a.phases.is_empty() {
                Phase::ALL.to_vec()
            } else {
                a.phases.clone()
            },
        };
        if plan.users <= plan.repeat_users + plan.reps as u32 * 10 {
            bail!(
                "--users {} leaves too few users for first logins beyond the {} repeat users",
                plan.users,
                plan.repeat_users
            );
        }
        if plan.idle_sessions > 9000 {
            bail!("--idle-sessions {}: at most 9000 (20,000 open files per process, two per spliced session)", plan.idle_sessions);
        }
        Ok(plan)
    }

    /// Users for first logins in repetition `rep`: a range no earlier repetition touched.
    fn first_users(&self, rep: usize) -> (u32, u32) {
        let pool = self.users - self.repeat_users;
        let chunk = pool / self.reps as u32;
        let start = self.repeat_users + 1 + rep as u32 * chunk;
        (start, start + chunk - 1)
    }
}

pub fn main(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            result = bench(args) => result,
            _ = term.recv() => bail!("SIGTERM: stopped everything"),
            _ = int.recv() => bail!("interrupted: stopped everything"),
        }
    })
}

/// The running processes. Dropping it stops them all.
struct Lab {
    env: Env,
    // Drop order: the proxies before the backend.
    mailgate: Option<Daemon>,
    mailgate_b: Option<Daemon>,
    nginx: Option<Daemon>,
    auth: Option<Daemon>,
    dovecot: Option<Daemon>,
}

impl Lab {
    fn daemon(&mut self, kind: Kind) -> Option<&mut Daemon> {
        match kind {
            Kind::Mailgate => self.mailgate.as_mut(),
            Kind::MailgateB => self.mailgate_b.as_mut(),
            Kind::Nginx => self.nginx.as_mut(),
            Kind::Direct => self.dovecot.as_mut(),
        }
    }

    fn pid(d: &Option<Daemon>) -> u32 {
        d.as_ref().map_or(0, Daemon::pid)
    }

    /// The process tree measured as the target.
    fn target_pid(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Mailgate => Self::pid(&self.mailgate),
            Kind::MailgateB => Self::pid(&self.mailgate_b),
            Kind::Nginx => Self::pid(&self.nginx),
            Kind::Direct => Self::pid(&self.dovecot),
        }
    }

    /// The target's auth service, measured with it (nginx's auth_http responder).
    fn aux_pid(&self, kind: Kind) -> Option<u32> {
        (kind == Kind::Nginx).then(|| Self::pid(&self.auth))
    }

    fn backend_pid(&self) -> u32 {
        Self::pid(&self.dovecot)
    }

    /// An error naming every started process that has exited.
    fn check_alive(&mut self) -> Result<()> {
        let mut dead = Vec::new();
        for d in [
            &mut self.dovecot,
            &mut self.auth,
            &mut self.nginx,
            &mut self.mailgate,
            &mut self.mailgate_b,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(why) = d.exited() {
                dead.push(why);
            }
        }
        if dead.is_empty() {
            Ok(())
        } else {
            bail!("{}", dead.join("\n"))
        }
    }

    fn start(&mut self, kind: Kind) -> Result<()> {
        match kind {
            Kind::Mailgate => {
                self.mailgate = Some(daemons::start_mailgate(&self.env, Build::A)?);
            }
            Kind::MailgateB => {
                self.mailgate_b = Some(daemons::start_mailgate(&self.env, Build::B)?);
            }
            Kind::Nginx => self.nginx = Some(daemons::start_nginx(&self.env)?),
            Kind::Direct => self.dovecot = Some(daemons::start_dovecot(&self.env)?),
        }
        Ok(())
    }

    fn stop(&mut self, kind: Kind) {
        if let Some(d) = self.daemon(kind) {
            d.stop();
        }
    }
}

/// Polls until a TLS login of user 1 through `conn` works (the target is up and reaches the
/// backend), at most 30 s.
async fn wait_login(lab: &mut Lab, kind: Kind, conn: &Conn) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut client = conn.session(1, 4096).await?;
            client.logout().await
        };
        let err = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("no answer in 5 s"),
        };
        lab.check_alive()?;
        if Instant::now() > deadline {
            return Err(err.context(format!("{} did not take a login in 30 s", kind.name())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `addr` greets in plaintext (Dovecot's own port).
async fn wait_plain(lab: &mut Lab, addr: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), crate::imap::connect_plain(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(e.context("Dovecot did not come up in 30 s"))
            }
            _ => {}
        }
        lab.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_tcp(lab: &mut Lab, addr: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        lab.check_alive()?;
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn ms_per(ticks: u64, clk: u64, n: u64) -> f64 {
    ticks as f64 * 1000.0 / clk as f64 / n.max(1) as f64
}

/// Where a login phase's figures go.
struct LoginMetrics {
    logins: Metric,
    cpu: Metric,
    system: Option<Metric>,
    auth: Option<Metric>,
    backend: Option<Metric>,
}

impl LoginMetrics {
    fn of(phase: Phase) -> LoginMetrics {
        match phase {
            Phase::FirstLogins => LoginMetrics {
                logins: Metric::LoginsFirst,
                cpu: Metric::CpuFirst,
                system: None,
                auth: None,
                backend: None,
            },
            Phase::FullHandshakes => LoginMetrics {
                logins: Metric::LoginsFull,
                cpu: Metric::CpuFull,
                system: None,
                auth: None,
                backend: Some(Metric::BackendCpuFull),
            },
            _ => LoginMetrics {
                logins: Metric::LoginsRepeat,
                cpu: Metric::CpuRepeat,
                system: Some(Metric::SysCpuRepeat),
                auth: Some(Metric::AuthCpuRepeat),
                backend: Some(Metric::BackendCpuRepeat),
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Phase {
    FirstLogins,
    RepeatLogins,
    /// Repeat logins with TLS session resumption off: every handshake full (a client without
    /// a session cache, or one whose ticket expired).
    FullHandshakes,
    Bulk,
    Noop,
    Mixed,
    Idle,
}

impl Phase {
    /// Every phase, in the order a run takes them (idle last: it restarts the targets).
    const ALL: [Phase; 7] = [
        Phase::FirstLogins,
        Phase::RepeatLogins,
        Phase::FullHandshakes,
        Phase::Bulk,
        Phase::Noop,
        Phase::Mixed,
        Phase::Idle,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::FirstLogins => "first logins",
            Phase::RepeatLogins => "repeat logins",
            Phase::FullHandshakes => "full handshakes",
            Phase::Bulk => "bulk FETCH",
            Phase::Noop => "NOOP latency",
            Phase::Mixed => "mixed ops",
            Phase::Idle => "idle",
        }
    }
}

struct Bench {
    plan: Plan,
    lab: Lab,
    /// Per target, one connection per login client, each with its own TLS session store (kept
    /// for the whole run, as a device keeps its tickets); the first also serves the phases of
    /// one or a few sessions.
    conns: Vec<(Kind, Vec<Conn>)>,
    /// The same targets, offering no TLS session resumption (the full-handshake phase).
    full_conns: Vec<(Kind, Vec<Conn>)>,
    clk: u64,
    results: Results,
}

impl Bench {
    /// The target's login clients' connections, with or without TLS session resumption.
    fn client_conns(&self, kind: Kind, resumption: bool) -> Result<&[Conn]> {
        let conns = if resumption {
            &self.conns
        } else {
            &self.full_conns
        };
        conns
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, c)| c.as_slice())
            .filter(|c| !c.is_empty())
            .with_context(|| format!("no connection for {}", kind.name()))
    }

    /// The connection of the phases that hold one or a few sessions (the first login client's).
    fn conn(&self, kind: Kind) -> Result<Conn> {
        Ok(self.client_conns(kind, true)?[0].clone())
    }

    /// CPU ticks of the target, its auth service, the backend, and the system time of the
    /// first two.
    fn cpu(&self, kind: Kind) -> (u64, u64, u64, u64) {
        let (user, system) = procfs::cpu_ticks_split(self.lab.target_pid(kind));
        let (aux_user, aux_system) = self
            .lab
            .aux_pid(kind)
            .map_or((0, 0), procfs::cpu_ticks_split);
        (
            user + system,
            aux_user + aux_system,
            procfs::cpu_ticks(self.lab.backend_pid()),
            system + aux_system,
        )
    }

    async fn phase(&mut self, phase: Phase, kind: Kind, rep: usize) -> Result<()> {
        let conn = self.conn(kind)?;
        let who = format!(
            "rep {}/{} {:<13} {:<8}",
            rep + 1,
            self.plan.reps,
            phase.name(),
            kind.name()
        );
        match phase {
            Phase::FirstLogins | Phase::RepeatLogins | Phase::FullHandshakes => {
                self.logins(phase, kind, rep, &who).await?;
            }
            Phase::Bulk => {
                let (bytes, elapsed) = load::bulk(&conn, self.plan.bulk).await?;
                let mibs = bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9);
                self.results.record(Metric::BulkMibs, kind, rep, mibs);
                println!(
                    "{who}: {:.0} MiB in {:.2} s = {mibs:.0} MiB/s",
                    bytes as f64 / 1048576.0,
                    elapsed.as_secs_f64()
                );
            }
            Phase::Noop => {
                let times = load::noops(&conn, self.plan.noops).await?;
                let mut us: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
                us.sort_by(f64::total_cmp);
                let med = quantile(&us, 0.5).unwrap_or(0.0);
                let p99 = quantile(&us, 0.99).unwrap_or(0.0);
                self.results.record(Metric::NoopMedianUs, kind, rep, med);
                self.results.record(Metric::NoopP99Us, kind, rep, p99);
                println!(
                    "{who}: {} NOOPs, median {med:.0} µs, p99 {p99:.0} µs",
                    us.len()
                );
            }
            Phase::Mixed => self.mixed(&who, &conn, kind, rep).await?,
            Phase::Idle => self.idle(kind, rep).await?,
        }
        Ok(())
    }

    /// A login phase: C clients looping connect + TLS + LOGIN + LOGOUT. First logins take
    /// each user of a fresh range once; repeat logins and full handshakes cycle over the
    /// repeat users after logging each in once (unmeasured), the latter without resumption.
    async fn logins(&mut self, phase: Phase, kind: Kind, rep: usize, who: &str) -> Result<()> {
        let m = LoginMetrics::of(phase);
        let conns = self
            .client_conns(kind, phase != Phase::FullHandshakes)?
            .to_vec();
        let users = if phase == Phase::FirstLogins {
            let (a, b) = self.plan.first_users(rep);
            Users::once(a, b)
        } else {
            self.warm_up(&conns, who).await;
            Users::cycle(1, self.plan.repeat_users)
        };
        let before = self.cpu(kind);
        let run = load::logins(&conns, users, self.plan.login).await;
        let after = self.cpu(kind);
        self.lab.check_alive()?;
        if run.failed > 0 {
            self.problem(
                who,
                &format!(
                    "{} of {} logins failed: {}",
                    run.failed,
                    run.ok + run.failed,
                    run.first_error.clone().unwrap_or_default()
                ),
            );
        }
        if run.ok == 0 {
            bail!("no login succeeded");
        }
        let target = after.0.saturating_sub(before.0);
        let aux = after.1.saturating_sub(before.1);
        let backend = after.2.saturating_sub(before.2);
        let system = after.3.saturating_sub(before.3);
        let per = |ticks| ms_per(ticks, self.clk, run.ok);
        let (cpu, aux_ms, backend_ms, system_ms) =
            (per(target + aux), per(aux), per(backend), per(system));
        let r = &mut self.results;
        r.record(m.logins, kind, rep, run.per_second());
        r.record(m.cpu, kind, rep, cpu);
        if let Some(metric) = m.system {
            r.record(metric, kind, rep, system_ms);
        }
        if let Some(metric) = m.auth.filter(|_| kind == Kind::Nginx) {
            r.record(metric, kind, rep, aux_ms);
        }
        if let Some(metric) = m.backend {
            r.record(metric, kind, rep, backend_ms);
        }
        if phase == Phase::RepeatLogins {
            let resumed = run.resumed as f64 * 100.0 / run.ok as f64;
            r.record(Metric::ResumedPercent, kind, rep, resumed);
        }
        if let Some(n) = run
            .negotiated
            .as_ref()
            .filter(|_| phase != Phase::FullHandshakes)
        {
            r.negotiated.entry(kind).or_insert_with(|| n.clone());
        }
        let auth_note = if kind == Kind::Nginx {
            format!(" (auth_http {aux_ms:.2})")
        } else {
            String::new()
        };
        println!(
            "{who}: {:>5} logins in {:.1} s = {:>6.0}/s; CPU ms/login: target {cpu:.2}{auth_note}, Dovecot {backend_ms:.2}; resumed {}",
            run.ok,
            run.elapsed.as_secs_f64(),
            run.per_second(),
            run.resumed,
        );
        Ok(())
    }

    /// The mixed workload: the sessions log in (unmeasured), then loop over the mix; CPU is
    /// read around the loop only. Every target gets the same operations in a repetition.
    async fn mixed(&mut self, who: &str, conn: &Conn, kind: Kind, rep: usize) -> Result<()> {
        let opened = load::open_mixed(conn, self.plan.mixed_clients, rep as u64 * 1000).await;
        if opened.failed > 0 {
            self.problem(
                who,
                &format!(
                    "{} of {} sessions failed to open: {}",
                    opened.failed,
                    self.plan.mixed_clients,
                    opened.first_error.unwrap_or_default()
                ),
            );
        }
        if opened.sessions.is_empty() {
            bail!("no session opened");
        }
        let sessions = opened.sessions.len();
        let before = self.cpu(kind);
        let (run, good) = load::mixed(opened.sessions, self.plan.mixed).await;
        let after = self.cpu(kind);
        load::close_mixed(good).await;
        self.lab.check_alive()?;
        if run.failed > 0 {
            self.problem(
                who,
                &format!(
                    "{} of {sessions} sessions stopped on an error: {}",
                    run.failed,
                    run.first_error.as_deref().unwrap_or_default()
                ),
            );
        }
        if run.ops == 0 {
            bail!("no operation succeeded");
        }
        let target = after.0.saturating_sub(before.0) + after.1.saturating_sub(before.1);
        let backend = after.2.saturating_sub(before.2);
        let per_1000 = |ticks| ms_per(ticks, self.clk, run.ops) * 1000.0;
        let (ops_s, cpu, dovecot) = (run.per_second(), per_1000(target), per_1000(backend));
        self.results.record(Metric::MixedOps, kind, rep, ops_s);
        self.results.record(Metric::MixedCpu, kind, rep, cpu);
        self.results
            .record(Metric::MixedBackendCpu, kind, rep, dovecot);
        println!(
            "{who}: {:>6} ops on {sessions} sessions in {:.1} s = {ops_s:>6.0}/s; CPU ms/1,000 ops: target {cpu:.1}, Dovecot {dovecot:.1}; mean µs: {}",
            run.ops,
            run.elapsed.as_secs_f64(),
            run.latencies(),
        );
        Ok(())
    }

    /// Restart the target, open the idle sessions, read its RSS before and after.
    async fn idle(&mut self, kind: Kind, rep: usize) -> Result<()> {
        let who = format!(
            "rep {}/{} {:<13} {:<8}",
            rep + 1,
            self.plan.reps,
            "idle sessions",
            kind.name()
        );
        let conns = self.client_conns(kind, true)?.to_vec();
        let conn = conns[0].clone();
        self.lab.stop(kind);
        self.lab.start(kind)?;
        if kind == Kind::Direct {
            let plain = loopback(self.lab.env.ports.dovecot_plain);
            wait_plain(&mut self.lab, plain).await?;
        }
        wait_login(&mut self.lab, kind, &conn).await?;
        let pid = self.lab.target_pid(kind);
        let fresh = procfs::rss_kib(pid);
        // Each idle user logs in once first, so one-off costs that are not per session
        // (mailgate's argon2 runs and its verification cache) are in `before`.
        self.warm_up(&conns, &who).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = procfs::rss_kib(pid);
        let start = Instant::now();
        let sessions = load::open_idle(
            &conn,
            self.plan.idle_sessions,
            self.plan.repeat_users,
            self.plan.idle_concurrency,
        )
        .await;
        let opened = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = procfs::rss_kib(pid);
        self.lab.check_alive()?;
        let n = sessions.clients.len();
        if sessions.failed > 0 {
            self.problem(
                &who,
                &format!(
                    "{} of {} sessions failed: {}",
                    sessions.failed,
                    self.plan.idle_sessions,
                    sessions.first_error.clone().unwrap_or_default()
                ),
            );
        }
        if n == 0 || sessions.failed * 20 > self.plan.idle_sessions {
            bail!(
                "only {n} of {} idle sessions opened",
                self.plan.idle_sessions
            );
        }
        let per = after.saturating_sub(before) as f64 / n as f64;
        self.results.record(Metric::IdleKib, kind, rep, per);
        self.results.record(
            Metric::WarmRssMib,
            kind,
            rep,
            (before as f64 - fresh as f64) / 1024.0,
        );
        println!(
            "{who}: {n} sessions opened in {:.1} s; RSS {fresh} KiB after restart, {before} after one login per user, {after} with the sessions = {per:.1} KiB/session",
            opened.as_secs_f64()
        );
        drop(sessions);
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Logs each repeat user in once through the login clients (unmeasured), so one-off costs
    /// (mailgate's argon2 runs, Dovecot creating mailboxes) are out of what is measured next,
    /// and every client that logged a user in holds a ticket.
    async fn warm_up(&mut self, clients: &[Conn], who: &str) {
        let warm = load::logins(
            clients,
            Users::once(1, self.plan.repeat_users),
            Duration::from_secs(120),
        )
        .await;
        if warm.failed > 0 {
            self.problem(
                who,
                &format!(
                    "warm-up: {} logins failed: {}",
                    warm.failed,
                    warm.first_error.unwrap_or_default()
                ),
            );
        }
    }

    fn problem(&mut self, who: &str, what: &str) {
        let line = format!(
            "{}: {what}",
            who.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        eprintln!("warning: {line}");
        self.results.problems.push(line);
    }
}

async fn bench(args: Args) -> Result<()> {
    let plan = Plan::new(&args)?;
    let choice = TlsChoice::new(&args.cipher, !args.no_resumption)?;
    let clk = procfs::clock_ticks()?;
    let (uid, gid) = setup::mail_ids(&args.mail_user)?;
    std::fs::create_dir_all(&args.work)?;
    let work = std::fs::canonicalize(&args.work)?;
    std::fs::create_dir_all(&args.cache)?;
    let cache = std::fs::canonicalize(&args.cache)?;
    let self_bin = std::env::current_exe().context("own path")?;
    let mailgate_bin = args
        .mailgate
        .clone()
        .unwrap_or_else(|| self_bin.with_file_name("mailgate"));
    if !mailgate_bin.exists() {
        bail!(
            "no mailgate binary at {} (cargo build --release)",
            mailgate_bin.display()
        );
    }
    if let Some(b) = args.mailgate_b.as_ref().filter(|b| !b.exists()) {
        bail!("--mailgate-b: no mailgate binary at {}", b.display());
    }

    let users = plan.users;
    let cache2 = cache.clone();
    let (passwd_file, accounts_file) =
        tokio::task::spawn_blocking(move || setup::account_files(&cache2, users)).await??;
    let mail_root = cache.join("mail");
    let must_seed = setup::prepare_mail_root(&mail_root, users, uid, gid)?;

    let env = Env {
        work: work.clone(),
        passwd_file,
        accounts_file,
        mail_root: mail_root.clone(),
        mail_uid: uid,
        mail_gid: gid,
        cert: std::fs::canonicalize(&args.cert).context("--cert")?,
        key: std::fs::canonicalize(&args.key).context("--key")?,
        mailgate_bin,
        mailgate_b_bin: args.mailgate_b.clone(),
        self_bin,
        tokio_workers: args.tokio_workers,
        nginx_workers: args.nginx_workers.clone(),
        dovecot_login_processes: args.dovecot_login_processes,
        auth_check: args.auth_check,
        ports: Ports::pick()?,
    };
    let mut lab = Lab {
        env: env.clone(),
        mailgate: None,
        mailgate_b: None,
        nginx: None,
        auth: None,
        dovecot: None,
    };
    lab.start(Kind::Direct)?;
    wait_plain(&mut lab, loopback(env.ports.dovecot_plain)).await?;
    if must_seed {
        setup::seed(loopback(env.ports.dovecot_plain), &mail_root, users).await?;
    }
    lab.auth = Some(daemons::start_auth_http(&env)?);
    wait_tcp(&mut lab, loopback(env.ports.auth_http)).await?;
    if plan.kinds.contains(&Kind::Nginx) {
        lab.start(Kind::Nginx)?;
    }
    for kind in [Kind::Mailgate, Kind::MailgateB] {
        if plan.kinds.contains(&kind) {
            lab.start(kind)?;
        }
    }
    let name = tls::server_name()?;
    let mut conns = Vec::new();
    let mut full_conns = Vec::new();
    for &kind in &plan.kinds {
        let port = match kind {
            Kind::Mailgate => env.ports.mailgate,
            Kind::MailgateB => env.ports.mailgate_b,
            Kind::Nginx => env.ports.nginx,
            Kind::Direct => env.ports.dovecot_tls,
        };
        let full = TlsChoice {
            resumption: false,
            ..choice.clone()
        };
        let clients = |choice: &TlsChoice| -> Result<Vec<Conn>> {
            (0..plan.clients)
                .map(|_| {
                    Ok(Conn {
                        addr: loopback(port),
                        connector: choice.connector()?,
                        name: name.clone(),
                    })
                })
                .collect()
        };
        let resuming = clients(&choice)?;
        wait_login(&mut lab, kind, &resuming[0]).await?;
        full_conns.push((kind, clients(&full)?));
        conns.push((kind, resuming));
    }
    let header = header(&plan, &args, &env);
    println!("{header}");

    let mut bench = Bench {
        plan: plan.clone(),
        lab,
        conns,
        full_conns,
        clk,
        results: Results::default(),
    };
    let started = Instant::now();
    for rep in 0..plan.reps {
        let order = rotate(&plan.kinds, rep);
        for &phase in plan.phases.iter().filter(|p| **p != Phase::Idle) {
            for &kind in &order {
                if let Err(e) = bench.phase(phase, kind, rep).await {
                    bench.lab.check_alive()?;
                    let who = format!("rep {} {} {}", rep + 1, phase.name(), kind.name());
                    bench.problem(&who, &format!("phase failed: {e:#}"));
                }
            }
        }
    }
    for rep in 0..plan.reps {
        if !plan.phases.contains(&Phase::Idle) {
            break;
        }
        for &kind in &rotate(&plan.kinds, rep) {
            if let Err(e) = bench.idle(kind, rep).await {
                let who = format!("rep {} idle {}", rep + 1, kind.name());
                bench.problem(&who, &format!("phase failed: {e:#}"));
                bench.lab.check_alive()?;
            }
        }
    }
    let took = started.elapsed();
    bench.results.derive();

    let mut doc = String::new();
    let _ = writeln!(doc, "{header}");
    let _ = writeln!(doc, "Measured in {:.0} s.\n", took.as_secs_f64());
    let _ = writeln!(doc, "{}", bench.results.table(&plan.kinds));
    let _ = writeln!(doc, "{}", FOOTNOTES);
    let _ = writeln!(
        doc,
        "\n### Against issue 5's targets\n\n{}",
        bench.results.checks()
    );
    let _ = writeln!(
        doc,
        "### Every repetition\n\n{}",
        bench.results.raw(&plan.kinds)
    );
    if !bench.results.problems.is_empty() {
        let _ = writeln!(doc, "### Problems during the run\n");
        for p in &bench.results.problems {
            let _ = writeln!(doc, "- {p}");
        }
    }
    println!("\n{doc}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &doc).with_context(|| format!("writing {}", args.out.display()))?;
    println!("written to {}", args.out.display());
    let problems = bench.results.problems.len();
    drop(bench);
    if problems > 0 {
        bail!("{problems} problem(s) during the run (listed in the results)");
    }
    Ok(())
}

const FOOTNOTES: &str = "¹ CPU (user + system, from `/proc/PID/stat`) of the target's own processes per successful login: mailgate's process (TLS, account check with argon2id or its cache, backend login); nginx's master and workers **plus its auth_http responder**; for direct, all of Dovecot (which is also the backend). The backend's share is the Dovecot row.  \n\
² RSS (`VmRSS` summed over the target's process tree) after opening N sessions minus before, divided by N; the target is restarted just before, and each of the sessions' users logs in (and out) once before \"before\" is read, so one-off costs such as mailgate's argon2 runs are not spread over the sessions. For direct this counts Dovecot's one `imap` process per session.  \n\
³ The same restart, before any session is open: RSS after each of the idle users (`--repeat-users`) logged in once, minus RSS right after the restart. Not per session, but memory the process keeps.  \n\
⁴ C sessions (users 1–5, INBOX of 200 small messages) logged in before the clock starts, each looping one command at a time over a mail client's mix: NOOP 4, header fetch of 20 messages 3, `FETCH n BODY.PEEK[]` of one small message 3, `UID FETCH 1:* (FLAGS)` 2, `UID SEARCH UNSEEN` 2, `STATUS INBOX` 2, `SELECT INBOX` 1 (weights of 17); every answer checked; each round trip one op. The same seeded sequence on every target in a repetition. CPU is read around the loop only (no logins in it).  \n\
⁵ The machine's speed drifts between repetitions (every process's CPU per login, Dovecot's too, moves by 20–30 % together), so the target's CPU is divided by the Dovecot's in the same repetition: Dovecot does about the same work per login behind each target (behind mailgate `ID` and a master-user `AUTHENTICATE PLAIN`, behind nginx `LOGIN`; its raw CPU per login behind the two agrees within the drift). The mailgate/nginx ratio of this row is the low-noise one (its repetitions agree within a few %); the row above it is the raw figure.  \n\
Load generator and targets share the machine's cores: read the figures as ratios within this run.";

fn rotate(kinds: &[Kind], rep: usize) -> Vec<Kind> {
    let n = kinds.len().max(1);
    let mut out = kinds.to_vec();
    out.rotate_left(rep % n);
    out
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

fn header(plan: &Plan, args: &Args, env: &Env) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let mut h = String::new();
    let _ = writeln!(h, "## mailgate-bench results\n");
    let _ = writeln!(
        h,
        "- date: {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(
        h,
        "- machine: {cores} cores ({cpu}), {mem} GiB, Linux {}",
        command_line("uname", &["-r"])
    );
    let _ = writeln!(
        h,
        "- versions: {}; nginx {}; Dovecot {}; mailgate-bench at {}",
        command_line(&env.mailgate_bin.to_string_lossy(), &["--version"]),
        command_line("nginx", &["-v"]).trim_start_matches("nginx version: nginx/"),
        command_line("dovecot", &["--version"]),
        command_line("git", &["rev-parse", "--short", "HEAD"]),
    );
    if let Some(b) = &env.mailgate_b_bin {
        let _ = writeln!(
            h,
            "- mailgate-b (A/B): {} ({}), same config as mailgate (`{}`)",
            b.display(),
            command_line(&b.to_string_lossy(), &["--version"]),
            env.mailgate_bin.display(),
        );
    }
    let _ = writeln!(
        h,
        "- targets: mailgate (release, {} workers, a thread each); nginx mail proxy (`worker_processes {}`, auth_http → `mailgate-bench auth-http --check {}`: {}); direct = Dovecot's own TLS listener ({} imap-login processes, high-performance mode). Backend: one Dovecot, plaintext on loopback, {} users, one `imap` process per session.",
        env.tokio_workers,
        env.nginx_workers,
        env.auth_check.name(),
        env.auth_check.description(),
        env.dovecot_login_processes,
        plan.users
    );
    let _ = writeln!(
        h,
        "- TLS: {} certificate on every target; client offers only {}{}",
        args.key_type,
        args.cipher,
        if args.no_resumption {
            ", no resumption"
        } else {
            ", session resumption on (one ticket store per login client and target)"
        }
    );
    let _ = writeln!(
        h,
        "- load: {} repetitions, round-robin; logins: {} clients × {:.0} s (first: each user once; repeat: {} users round and round); idle: {} sessions (LOGIN, SELECT INBOX, IDLE) after a restart; bulk: FETCH BODY.PEEK[] of a 10 MiB message for {:.0} s; latency: {} NOOPs on one session; mixed workload: {} sessions × {:.0} s",
        plan.reps,
        plan.clients,
        plan.login.as_secs_f64(),
        plan.repeat_users,
        plan.idle_sessions,
        plan.bulk.as_secs_f64(),
        plan.noops,
        plan.mixed_clients,
        plan.mixed.as_secs_f64(),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_login_ranges_do_not_overlap() {
        let plan = Plan {
            reps: 3,
            clients: 1,
            login: Duration::ZERO,
            idle_sessions: 0,
            idle_concurrency: 1,
            repeat_users: 100,
            bulk: Duration::ZERO,
            noops: 1,
            mixed_clients: 1,
            mixed: Duration::ZERO,
            users: 5000,
            kinds: Kind::ALL.to_vec(),
            phases: Phase::ALL.to_vec(),
        };
        let ranges: Vec<(u32, u32)> = (0..3).map(|r| plan.first_users(r)).collect();
        assert_eq!(ranges, [(101, 1733), (1734, 3366), (3367, 4999)]);
    }

    #[test]
    fn rotation() {
        assert_eq!(
            rotate(&[Kind::Mailgate, Kind::Nginx, Kind::Direct], 1),
            [Kind::Nginx, Kind::Direct, Kind::Mailgate]
        );
    }
}
