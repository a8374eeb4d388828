//! `mailgate-bench`: the load generator and orchestrator behind `scripts/bench` (README,
//! "Benchmarks"), and the auth_http responder nginx's mail proxy asks.
//!
//! `mailgate-bench run` starts a seeded Dovecot backend and, in front of it, mailgate, nginx's
//! mail proxy and (as the floor) Dovecot's own implicit-TLS listener, all with one certificate;
//! measures logins/s and CPU per login, idle memory per session, bulk FETCH throughput, NOOP
//! latency and mixed-workload ops/s against each, interleaved round-robin over several
//! repetitions; and prints a table
//! of medians and ratios (also written to `--out`). Every phase is bounded; everything started
//! is stopped on exit, error, Ctrl-C or SIGTERM.

mod authhttp;
mod daemons;
mod imap;
mod load;
mod mix;
mod procfs;
mod report;
mod run;
mod setup;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailgate-bench",
    about = "mailgate vs nginx mail proxy vs direct Dovecot"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the targets and measure them (what scripts/bench runs).
    Run(Box<run::Args>),
    /// The auth_http service for nginx's mail proxy: checks the account (or nothing) and
    /// sends the login to `--backend`.
    AuthHttp(authhttp::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::main(*args),
        Command::AuthHttp(args) => authhttp::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailgate-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/bench-cache` under the current directory (the repository root in scripts/bench).
fn default_cache() -> PathBuf {
    PathBuf::from("target/bench-cache")
}
