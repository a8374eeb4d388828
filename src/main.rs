//! The `mailgate` command: parse the command line, load the config, call the library.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

use mailgate::config::Config;
use mailgate::shutdown::{self, Phase};

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "IMAP and SMTP-submission reverse proxy"
)]
struct Cli {
    /// Log format: `text` for a terminal, `json` for log pipelines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, default_value = "config/mailgate.yaml")]
        config: PathBuf,
    },
    /// Validate the config and the account data, then exit.
    Check {
        #[arg(long, default_value = "config/mailgate.yaml")]
        config: PathBuf,
    },
    /// Read a password on standard input and print its argon2id hash (PHC string).
    HashPassword,
}

fn main() -> ExitCode {
    // rustls is built with two providers (aws-lc-rs, and ring for its AEADs), so it cannot pick a
    // process default itself: ours is it, for anything that asks for the default.
    let _ = rustls::crypto::CryptoProvider::install_default(mailgate::tls_provider::provider());
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::HashPassword => hash_password(),
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a file or a log pipeline.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            None
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    let store = match mailgate::accounts::AccountStore::load(&config.accounts.path) {
        Ok(store) => store,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    for note in config.notes() {
        println!("note: {note}");
    }
    println!(
        "{}: ok ({} listeners, {} pools, {} accounts in {})",
        path.display(),
        config.listeners.len(),
        config.pools.len(),
        store.len(),
        config.accounts.path.display()
    );
    ExitCode::SUCCESS
}

fn hash_password() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("error: reading standard input: {e}");
        return ExitCode::from(2);
    }
    // One line: drop the newline the shell or `echo` added.
    while matches!(input.last(), Some(b'\n' | b'\r')) {
        input.pop();
    }
    if input.is_empty() {
        eprintln!("error: no password on standard input");
        return ExitCode::from(2);
    }
    match mailgate::accounts::try_hash_password(&input) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `SIGHUP`: account data, certificates, the pools' CAs and backends and the DNS configuration again (see
/// `mailgate::reload`); one log line either way.
async fn reload(context: &Arc<mailgate::server::Context>, path: &std::path::Path) {
    let (context, path) = (context.clone(), path.to_path_buf());
    match tokio::task::spawn_blocking(move || mailgate::reload::reload(&context, &path)).await {
        Ok(Ok(r)) => tracing::info!(
            users = r.users,
            organisations = r.organisations,
            certificates = r.certificates,
            dns_names = r.dns_names,
            backends_added = r.backends_added,
            backends_removed = r.backends_removed,
            "SIGHUP: reloaded account data, certificates, pool backends and DNS configuration (other settings apply at restart)"
        ),
        Ok(Err(e)) => tracing::error!("SIGHUP: reload failed, nothing changed: {e:#}"),
        Err(e) => tracing::error!("SIGHUP: reload failed, nothing changed: {e}"),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    // Signals, `/metrics`, health checks and reloads; connections run on the workers
    // (`mailgate::workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (trigger, shutdown) = shutdown::channel();
        let server = match mailgate::server::Server::bind(config).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("error: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let context = server.context();
        let config_path = path.to_path_buf();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        // First SIGTERM drains; a second one closes at once.
                        let next = if trigger.subscribe().phase() == Phase::Running { Phase::Draining } else { Phase::Closing };
                        tracing::info!(?next, "SIGTERM");
                        trigger.advance(next);
                    }
                    _ = int.recv() => {
                        tracing::info!("SIGINT: closing now");
                        trigger.advance(Phase::Closing);
                    }
                    _ = hup.recv() => reload(&context, &config_path).await,
                }
            }
        });
        server.serve(shutdown).await;
        ExitCode::SUCCESS
    })
}
